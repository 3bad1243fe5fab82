"""Benchmark stage ``bounds``: the end-to-end rate against what the pipeline could reach -- min(model pool, decode
capacity of the same JPEG mix) -- the two-point fit (fixed start-up + steady-state rate) and, on a GPU, model FLOP
utilisation. Also folds the decode mix and the fast-vs-exact agreement into ``results["decode"]``."""

from __future__ import annotations

import logging
import statistics
from typing import Any

from benchmarks import measures as benchmarking
from benchmarks.stages import BenchmarkContext

logger = logging.getLogger(__name__)

NEEDS: tuple[str, ...] = ("decode", "model", "end_to_end")


def run(context: BenchmarkContext) -> dict[str, Any]:
    settings, shared, results = context.settings, context.shared, context.results
    decode, model, job = results["decode"], results["model"], results["end_to_end"]
    decode_kinds = decode["per_kind"]
    fractions = shared["written"]["fractions"]
    mix: dict[str, Any] = {
        path: benchmarking.mix_rate({kind: row[path] for kind, row in decode_kinds.items()}, fractions)
        if all(row[path] for row in decode_kinds.values()) else None
        for path in ("fast", "exact", "reference")
    }
    mix["fast_over_reference"] = mix["fast"] / mix["reference"] if mix["reference"] else None
    mix["fast_over_exact"] = mix["fast"] / mix["exact"]
    mix["label"] = f"1/{settings.phone_every} phone" if settings.phone_every else "no phone"
    mix["fractions"] = fractions
    agreement = shared["agreement"]
    for kind, row in decode_kinds.items():
        row["top1_agreement"] = agreement["per_kind"].get(kind)
    decode["mix"] = mix
    decode["top1_agreement"] = {
        key: agreement[key]
        for key in ("images", "agree", "identical_pixels", "distinct_classes", "embedding_shift_over_between_photos",
                    "control_images", "control_agree", "control_shift_over_between_photos")
    }

    actors = settings.actors
    bounds = benchmarking.pipeline_bounds(
        model_images_per_s=model["images_per_s"],
        actors=actors,
        decode_images_per_s_per_core=mix["fast"],
        decode_cpus=job["decode_cpus"],
        end_to_end_images_per_s=job["images_per_s"],
        measured_pool_images_per_s=max(
            (layout["images_per_s"] for layout in (model.get("pool"), model.get("processes")) if layout), default=None
        ),
    )
    peak = settings.peak_tflops or (
        benchmarking.peak_tflops_for(results["hardware"]["gpu"], model["dtype"]) if settings.device == "cuda" else None
    )
    results["mfu"] = {
        "peak_tflops": peak,
        # Per GPU: pool throughput over actors x one GPU's peak (one actor per GPU).
        "model_only": benchmarking.model_flop_utilisation(
            model["flops_per_image"], bounds.model_pool_images_per_s, peak, gpus=settings.actors
        ),
        "end_to_end": benchmarking.model_flop_utilisation(
            model["flops_per_image"], job["images_per_s"], peak, gpus=settings.actors
        ),
    }
    two_point = None
    small_jobs, large_jobs = shared.get("small_jobs") or [], shared.get("large_jobs") or []
    if small_jobs:
        try:
            two_point = benchmarking.two_point_rate(
                small_images=small_jobs[0]["samples"], small_runs=[run["seconds"] for run in small_jobs],
                images=job["samples"], runs=[run["seconds"] for run in large_jobs], bound_images_per_s=bounds.bound_images_per_s,
            ).to_dict()
            # What a job that starts its own Ray pays before the fixed part: every job's ray.init(), averaged.
            two_point["ray_init_s"] = statistics.fmean(run["ray_init_s"] for run in [*small_jobs, *large_jobs])
        except ValueError as error:  # too few images for the difference to rise above the noise
            logger.warning("two-point fit skipped: %s", error)
            two_point = {"error": str(error)}
    results["two_point"] = two_point
    return bounds.to_dict()
