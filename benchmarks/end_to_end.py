"""Benchmark stage ``end_to_end``: the classify job itself (``pipeline.plan.run_job``) on a fresh local Ray, reading
WebDataset shards of the JPEG mix from the run's storage and writing Parquet back; with ``--two-point``, first a job
of half the images, so that the fixed start-up and the steady-state rate can be told apart.

On a CPU the job runs with its default flags (``--dtype auto``, no ``--cpus-per-actor`` / ``--decode-cpus``), i.e.
sized by :mod:`pipeline.cpu`, unless the benchmark's command line names them. The job's own time (its summary) is
what counts: starting Ray itself and writing the inputs are outside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Iterator
from typing import Any

from benchmarks import measures as benchmarking
from benchmarks.load import CpuLoadMonitor
from benchmarks.measures import EncodedImage
from benchmarks.stages import BenchmarkContext, BenchmarkSettings
from fixtures.checkout import checkout_python_path

logger = logging.getLogger(__name__)

NEEDS: tuple[str, ...] = ("inputs",)
TOP_K = 5

def write_mixed_shards(
    base: str, pools: dict[str, list[EncodedImage]], *, images: int, phone_every: int, images_per_shard: int
) -> dict[str, Any]:
    """WebDataset tar shards (``<key>.jpg`` + ``<key>.json``) of the mix under ``base``; returns what was written.

    The same few encoded files are reused across the stream (encoding thousands of 12 MP JPEGs would take longer
    than the job); every sample is still read, decoded and classified on its own.
    """
    from model.storage import join_uri, write_bytes

    kinds = benchmarking.mix_kinds(images, phone_every)
    used = {kind: 0 for kind in pools}
    total_bytes = 0
    shards = 0
    for first in range(0, images, images_per_shard):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for index in range(first, min(first + images_per_shard, images)):
                pool = pools[kinds[index]]
                image = pool[used[kinds[index]] % len(pool)]
                used[kinds[index]] += 1
                key = f"{index:08d}"
                meta = json.dumps({"kind": image.kind, "photo": image.photo}).encode()
                for name, payload in ((f"{key}.jpg", image.data), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                total_bytes += len(image.data)
        write_bytes(join_uri(base, f"part-{shards:05d}.tar"), buffer.getvalue())
        shards += 1
    return {"shards": shards, "input_bytes": total_bytes, "per_kind": used, "fractions": benchmarking.mix_fractions(kinds)}


@contextlib.contextmanager
def local_ray(num_cpus: float) -> Iterator[float]:
    """A new Ray started in-process with ``num_cpus`` CPUs; its workers import this checkout. Yields the seconds
    ``ray.init()`` took: a job that starts its own Ray (no ``RAY_ADDRESS``) pays them before its own start-up.

    ``address="local"``: never join a cluster that happens to run on the machine (``ray start``, or another job's
    session recorded in ``/tmp/ray``): its CPUs, other work and code version would all be someone else's.
    """
    import ray

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = checkout_python_path()
    try:
        from pipeline.preflight import local_ray_options

        started = time.perf_counter()
        ray.init(
            address="local", num_cpus=math.ceil(num_cpus), logging_level=logging.WARNING, log_to_driver=False,
            **local_ray_options(),  # as the job's own in-process Ray
        )
        init_seconds = time.perf_counter() - started
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines would split the table
        yield init_seconds
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def run_end_to_end(settings: BenchmarkSettings, model_uri: str, input_uri: str, output_uri: str) -> dict[str, Any]:
    """Run the classify job once on a fresh local Ray and return its summary's figures."""
    from pipeline.config import JobConfig
    from pipeline.plan import run_job

    gpu = settings.device == "cuda"
    config = JobConfig(
        task="classify",
        input=input_uri,
        output=output_uri,
        model=model_uri,
        format="webdataset",
        batch_size=settings.batch_size,
        top_k=TOP_K,
        dtype=settings.dtype_requested,
        device=settings.device,
        min_actors=settings.actors if gpu else 1,
        max_actors=settings.actors if gpu else None,
        cpus_per_actor=settings.cpus_per_actor,
        gpus_per_actor=1 if gpu else None,
        # On a GPU one core per decode task: --decode-cpus tasks at once. On a CPU the job's own sizing, unless given.
        decode_cpus=min(1.0, settings.decode_cpus) if gpu and settings.decode_cpus else settings.decode_cpus,
        overwrite=True,
    )
    with local_ray(settings.ray_cpus) as ray_init_s:
        started = time.perf_counter()
        with CpuLoadMonitor() as load:
            summary = run_job(config)
        wall = time.perf_counter() - started
    figures = summary.to_dict()
    figures["load"] = load.to_dict()
    figures["summary_images_per_s"] = figures["images_per_s"]  # rounded to 3 decimals by the summary
    figures["images_per_s"] = summary.samples / summary.seconds if summary.seconds > 0 else 0.0
    figures["wall_s"] = wall
    figures["ray_init_s"] = ray_init_s  # not in wall_s: the job joined a Ray started just before
    figures["ray_cpus"] = settings.ray_cpus
    return figures


def run(context: BenchmarkContext) -> dict[str, Any]:
    settings, shared = context.settings, context.shared
    base, model_uri, image_sets = shared["storage_base"], shared["model_uri"], shared["image_sets"]
    phone_kind = shared["kinds"][1]
    logger.info("writing %d images as WebDataset shards to %s", settings.images, base)
    written = write_mixed_shards(f"{base}/shards", image_sets, images=settings.images,
                                 phone_every=settings.phone_every, images_per_shard=settings.images_per_shard)
    shared["written"] = written
    if not settings.two_point:
        logger.info("running the classify job on %d images", settings.images)
        job = run_end_to_end(settings, model_uri, f"{base}/shards", f"{base}/predictions")
    else:
        # The two sizes alternate, each on a fresh Ray, so that a slow minute of the machine weighs on both alike.
        small = max(1, settings.images // 2)
        write_mixed_shards(f"{base}/shards-small", image_sets, images=small, phone_every=settings.phone_every,
                           images_per_shard=settings.images_per_shard)
        shared["small_jobs"], shared["large_jobs"] = [], []
        for repeat in range(settings.two_point_repeats):
            logger.info("two-point, run %d of %d: the classify job on %d images, then on %d", repeat + 1,
                        settings.two_point_repeats, small, settings.images)
            shared["small_jobs"].append(
                run_end_to_end(settings, model_uri, f"{base}/shards-small", f"{base}/predictions-small"))
            shared["large_jobs"].append(run_end_to_end(settings, model_uri, f"{base}/shards", f"{base}/predictions"))
        job = shared["large_jobs"][0]  # the figures of section 3: the first run of the full size
    sizing = None
    if settings.device == "cpu":
        sizing = context.results.get("model", {}).get("job_sizing") or context.results.get("machine", {}).get("sizing")
    return {
        **job,
        "storage": "S3 (moto)" if settings.storage == "s3" else "local files",
        "images": settings.images,
        "phone_images": written["per_kind"].get(phone_kind.name, 0),
        "shards": written["shards"],
        "images_per_shard": settings.images_per_shard,
        "input_mb": written["input_bytes"] / 1e6,
        "input_mb_per_s": written["input_bytes"] / 1e6 / job["seconds"] if job["seconds"] else None,
        "cpus_per_actor": settings.cpus_per_actor or (sizing["cpus_per_actor"] if sizing else 1.0),
        "actors": settings.actors,  # on a CPU node: one, holding every inference core (pipeline.cpu.size_cpu_node)
        "calls_per_actor": sizing["calls_per_actor"] if sizing and settings.cpus_per_actor is None else 1,
        "decode_cpus": settings.decode_cpus or (sizing["decode_cpus_per_task"] * sizing["decode_tasks"] if sizing else 1.0),
        "flags": "defaults (sized by pipeline.cpu)" if settings.device == "cpu" and settings.cpus_per_actor is None
        else "as given",
    }
