"""Measure the whole pipeline against its bounds: model only, decode per core, end to end, and the ratios.

    python -m jobs.benchmark --two-point          # CPU: full-size model, jobs of 32 and 64 images twice (~12 min on 2 cores)
    python -m jobs.benchmark --stages machine,fidelity   # only some stages (plus what they need)
    python -m jobs.benchmark --quick              # tiny model, small images: checks the arithmetic in < 1 min (CI)
    python -m jobs.benchmark --json bench.json    # also write every figure as JSON

On a GPU machine (one H100, 16 cores), the production setting (prints the same table; ~5 min)::

    python -m jobs.benchmark --device cuda --dtype bfloat16 --batch-size 256 --images 20000 --two-point --json h100.json

and, to take the single-process moto S3 server out of the end-to-end path if the table shows it is the limit::

    python -m jobs.benchmark --device cuda --dtype bfloat16 --batch-size 256 --images 20000 --storage local

The run is a list of stages (:data:`benchmarks.stages.STAGES`: one module each under ``benchmarks/``, one line in
the registry; ``--stages`` picks some, their prerequisites are added). In this order:

0. **Machine** (:mod:`benchmarks.machine`): the CPU's capabilities as :mod:`pipeline.cpu` detects them, the dtype
   ``auto`` picks on it, and the CPU-node sizing by cores (the job's pool, which also weighs memory, is stage 1's).

1. **Model only**: an :class:`~pipeline.infer.BatchInference` is built in this process from the same checkpoint URI
   the job uses (its construction time is the actor start-up), then :func:`pipeline.infer.predict` -- uint8 batch
   already on the device -> normaliser -> model -> softmax/top-k -- is timed after warm-up batches (CUDA events and
   ``torch.cuda.synchronize`` on a GPU). Threads and dtype are the job's: on a CPU, the sizing's torch threads and
   the dtype ``auto`` picks here (or ``--cpus-per-actor`` / ``--dtype`` when given).
   FLOPs per image are counted with ``FlopCounterMode`` on one image, attention included (:mod:`benchmarks.flops`).
2. **Decode + preprocess per CPU core** (one thread) on JPEGs made from scikit-image's photographs at quality 90:
   ImageNet-size (500x375) and 12-megapixel phone photos (4000x3000, with a little grain), landscape and portrait.
   Three paths: (a) ``decode_sample(fast=True)``, (b) ``fast=False`` (exact), (c) ``PIL.Image.open`` + transformers'
   ``ViTHybridImageProcessor`` (the 384 checkpoint's settings; skipped if transformers is not installed). Then the
   fast path's fidelity: max |pixel difference| to the exact path, whether the model's top-1 class is the same on
   both preprocessings of every photo, and how far the embedding moves (relative to the distance between photos).
   Random weights make a chaotic model, so a control (the exact crop with +-1 noise) shows what "agreement" is worth
   for this checkpoint; ``--model FOLDER`` runs everything with trained weights instead.
3. **End to end**: WebDataset shards (1 phone photo in ``--phone-every``, the rest ImageNet-size) and the checkpoint
   are put in S3 (moto's server on 127.0.0.1, started and stopped here) and ``pipeline.plan.run_job`` runs the
   classify job on a local Ray with ``--decode-cpus`` CPUs for decode tasks plus ``--actors`` x
   ``--cpus-per-actor`` for the inference actors, writing Parquet back to S3. The job's own time (its summary) is
   what counts: start-up of Ray itself and writing the inputs are outside it.
   On a CPU the job runs with its default flags (dtype auto, threads and decode sized by :mod:`pipeline.cpu`).
4. **Bounds**: efficiency = end-to-end images/s / min(model-only images/s x actors, per-core decode rate of the same
   mix x decode CPUs); on a GPU, model FLOP utilisation = FLOPs per image x images/s / peak (data-sheet dense peak
   of the GPU for the dtype, or ``--peak-tflops``).

5. **bf16 fidelity** (:mod:`benchmarks.fidelity`): embedding cosine and top-1 agreement of bf16 against fp32 on one
   exact crop of each sample photograph.

``--two-point`` also runs the same job on half the images, the two sizes alternating ``--two-point-repeats`` times
(default 2; each job on a fresh local Ray), and fits ``time = fixed + images / marginal rate`` through their mean
times: the fixed part is what a job pays once (driver preamble, actor start-up
with the model load, first-batch warm-up), the marginal rate is the steady state. On a CPU, where a 64-image job
takes minutes, the fixed part is a visible share of the job; on 20000 images on a GPU it should not be.

On a GPU, ``--decode-cpus`` is the total number of CPU cores given to decoding (one decode task per core); it
defaults to the cores left after the actors. On a CPU both default to the job's own sizing. On the GPU machine the
moto server is a single Python process serving the input;
the table shows the input MB/s, and ``--storage local`` takes object storage out of the measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import measures as benchmarking
from benchmarks.model_only import MEASURED_ALLOCATOR
from benchmarks.stages import (
    DEFAULT_STAGES,
    STAGES,
    BenchmarkSettings,
    report_lines,
    resolve_stages,
    run_stages,
)

logger = logging.getLogger("jobs.benchmark")

# Stages whose figures the main table (benchmarks.measures.format_report) is printed from.
TABLE_STAGES = ("model", "decode", "end_to_end", "bounds")


def run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
    """Run the chosen stages; returns every figure as a JSON-ready dict (also what the table is printed from)."""
    started = time.perf_counter()
    names = resolve_stages(settings.stages)
    with tempfile.TemporaryDirectory(prefix="vit-hybrid-benchmark-") as workdir:
        results = run_stages(settings, names, Path(workdir), initial={"hardware": benchmarking.hardware_summary()})
    results["settings"] = _settings_dict(settings)
    results["stages"] = names
    results["benchmark_seconds"] = time.perf_counter() - started
    return results


def _settings_dict(settings: BenchmarkSettings) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(settings)
    data["stages"] = list(settings.stages)
    # The bounds' arithmetic reads these: on a CPU with default flags they are the job's sizing.
    return data


def format_results(results: dict[str, Any]) -> str:
    """The main table when its stages ran, then every stage's own lines."""
    names = results["stages"]
    if not all(name in names for name in TABLE_STAGES):
        return "\n".join([f"ViT Hybrid benchmark, stages: {', '.join(names)}", *report_lines(results, names)])
    # Stages registered before the table's first (the machine) read as its preamble; the others follow it.
    first = min(names.index(name) for name in TABLE_STAGES)
    return "\n".join([
        *report_lines(results, names[:first]), "", benchmarking.format_report(results),
        *report_lines(results, names[first:]),
    ]).lstrip("\n")


# ---------------------------------------------------------------------------------------------------------------------
# Command line.


def _stage_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if names == ("all",):
        return DEFAULT_STAGES
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or '(none)'}; known: all, {', '.join(STAGES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--stages", type=_stage_list, default=DEFAULT_STAGES,
                        help=f"comma-separated stages to run (their prerequisites are added): all, {', '.join(STAGES)}")
    parser.add_argument("--quick", action="store_true", help="tiny model, small images, few of them (CI: arithmetic, not speed)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto = as the job decides: bfloat16 on GPU; on CPU bfloat16 only with AVX512-BF16/AMX")
    parser.add_argument("--batch-size", type=int, default=None, help="images per inference batch (default 256 on GPU, 16 on CPU, 8 quick)")
    parser.add_argument("--images", type=int, default=None, help="images through the end-to-end job (default 20000 GPU, 64 CPU, 24 quick)")
    parser.add_argument("--decode-cpus", type=float, default=None,
                        help="CPU cores for decode tasks (default: GPU, the cores left after the actors; CPU, the job's sizing)")
    parser.add_argument("--actors", type=int, default=None, help="inference actors (default: GPUs, or 1 on CPU)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="CPUs per actor (default: 1 on GPU; on CPU the job's sizing, all but the decode share)")
    parser.add_argument("--images-per-shard", type=int, default=None,
                        help="images per input shard (default: about 4 shards per decode task, at least one batch)")
    parser.add_argument("--phone-every", type=int, default=10, help="one 12 MP phone photo every N images (0: none)")
    parser.add_argument("--warmup-batches", type=int, default=None, help="untimed model-only batches (default 3 GPU, 1 CPU)")
    parser.add_argument("--timed-batches", type=int, default=None, help="timed model-only batches (default 20 GPU, 4 CPU: CPU batches vary)")
    parser.add_argument("--decode-seconds", type=float, default=None, help="time spent per decode path and kind (default 2, quick 0.05)")
    parser.add_argument("--storage", choices=["s3", "local"], default="s3",
                        help="where shards, checkpoint and output live: moto S3 on 127.0.0.1, or local files")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: the data-sheet dense peak of a known GPU for the dtype)")
    parser.add_argument("--two-point", action="store_true",
                        help="also run a job of half the images: separates the fixed cost (start-up) from the "
                             "marginal rate")
    parser.add_argument("--two-point-repeats", type=int, default=2,
                        help="with --two-point: runs of each job size, alternating, whose mean times the fit goes "
                             "through (default 2)")
    parser.add_argument("--model", default=None,
                        help="a local checkpoint folder (HF layout, with preprocessor_config.json) instead of random "
                             "weights; with trained weights the fast/exact top-1 agreement means what it says")
    parser.add_argument("--json", dest="json_path", default=None, help="write every figure to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    return parser


def benchmark_device(requested: str) -> str:
    """``cuda`` or ``cpu``: what ``--device`` names, ``auto`` being cuda where torch sees one."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    """Fill the defaults that depend on the device, on this CPU and on --quick."""
    from pipeline import cpu
    from pipeline.config import canonical_dtype

    device = benchmark_device(args.device)
    gpu = device == "cuda"
    usable = cpu.usable_cpus()
    actors = args.actors or (torch.cuda.device_count() if gpu else 1)
    batch_size = args.batch_size or (8 if args.quick else 256 if gpu else 16)
    images = args.images or (24 if args.quick else 20000 if gpu else 64)
    cpus_per_actor: float | None
    decode_cpus: float | None
    if gpu:
        gpu_actor_cpus: float = args.cpus_per_actor or 1.0
        gpu_decode_cpus: float = args.decode_cpus or max(1.0, usable - actors * gpu_actor_cpus)
        cpus_per_actor, decode_cpus = gpu_actor_cpus, gpu_decode_cpus
        ray_cpus = math.ceil(gpu_decode_cpus + actors * gpu_actor_cpus)
        torch_threads = 1
        dtype = "bfloat16" if args.dtype == "auto" else canonical_dtype(args.dtype)
    else:
        # As the job on a CPU-only node: Ray gets the machine's CPUs and the job sizes actor and decode itself.
        cpus_per_actor, decode_cpus = args.cpus_per_actor, args.decode_cpus
        ray_cpus = usable
        sizing = cpu.size_cpu_node(ray_cpus)
        torch_threads = math.ceil(cpus_per_actor) if cpus_per_actor else sizing.torch_threads
        dtype = cpu.decide_on_this_node()["dtype"] if args.dtype == "auto" else canonical_dtype(args.dtype)
    if batch_size < 1 or images < 1 or actors < 1 or (decode_cpus is not None and decode_cpus <= 0) or args.phone_every < 0:
        raise SystemExit("--batch-size, --images, --actors and --decode-cpus must be positive, --phone-every >= 0")
    if args.two_point_repeats < 1:
        raise SystemExit("--two-point-repeats must be at least 1")
    decode_slots = max(1, int(decode_cpus or 1))
    images_per_shard = args.images_per_shard or min(1000, max(batch_size, math.ceil(images / (4 * decode_slots))))
    return BenchmarkSettings(
        quick=args.quick,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        images=images,
        decode_cpus=decode_cpus,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        torch_threads=torch_threads,
        ray_cpus=ray_cpus,
        images_per_shard=images_per_shard,
        phone_every=args.phone_every,
        warmup_batches=args.warmup_batches if args.warmup_batches is not None else (3 if gpu else 1),
        timed_batches=args.timed_batches or (20 if gpu else 4),
        decode_seconds=args.decode_seconds or (0.05 if args.quick else 2.0),
        storage=args.storage,
        peak_tflops=args.peak_tflops,
        json_path=args.json_path,
        two_point=args.two_point,
        two_point_repeats=args.two_point_repeats,
        model=args.model,
        seed=args.seed,
        stages=tuple(args.stages),
        dtype_requested=args.dtype,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: prints the table, writes --json, returns the results dict (tests read it)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    results = run_benchmark(settings)
    print(format_results(results), flush=True)
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    return results


# Set in the environment of the benchmark's own re-executed process (see with_actor_allocator): the GLIBC_TUNABLES the
# user had. The ones this process runs with are recorded under MEASURED_ALLOCATOR, which the model-only stage reports.
_REEXECUTED = "VIT_HYBRID_BENCHMARK_ALLOCATOR"


def with_actor_allocator(device: str) -> None:
    """On a CPU run, re-execute this command once with the CPU inference actors' allocator settings, then keep them to
    this process.

    Why: the job's CPU actors run with :func:`pipeline.cpu.cpu_actor_environment` (glibc reads it when a process
    starts), and "end to end / model only" must compare like with like, so the model-only stage, which runs in this
    process, needs the same allocator. In the re-executed process the variable is removed from ``os.environ`` at
    once: the Ray that the end-to-end stage starts, and its decode and writer workers, get the node's defaults as in
    a real job, and the inference actor gets the settings from the job itself. GPU actors keep the node's allocator,
    and so does a GPU run of the benchmark.
    """
    from pipeline.cpu import cpu_actor_environment

    inherited = os.environ.pop(_REEXECUTED, None)
    if inherited is not None:  # the re-executed process: give children back what the user had
        os.environ[MEASURED_ALLOCATOR] = os.environ.get("GLIBC_TUNABLES", "")
        if inherited:
            os.environ["GLIBC_TUNABLES"] = inherited
        else:
            os.environ.pop("GLIBC_TUNABLES", None)
        return
    if device != "cpu":
        return
    environment = {**os.environ, **cpu_actor_environment(), _REEXECUTED: os.environ.get("GLIBC_TUNABLES", "")}
    os.execve(sys.executable, [sys.executable, "-m", "jobs.benchmark", *sys.argv[1:]], environment)


if __name__ == "__main__":
    with_actor_allocator(benchmark_device(build_parser().parse_args().device))
    main()
