"""What the driver costs per image, on a multi-raylet Ray cluster with full-width result rows.

    python -m benchmarks.driver                          # N = 2,000 and 4N images, batch 256
    python -m benchmarks.driver --images 4000 --json driver.json

A ``ray.cluster_utils.Cluster`` (a head with no CPUs, two worker raylets) runs the real job (``pipeline.plan.run_job``)
twice, over N and 4N small JPEGs in WebDataset shards, with the stand-in model (``VIT_HYBRID_STAND_IN_MODEL``): 768-d
embeddings and 1,000 labels, as the real checkpoint gives, without paying for the network. Each job's driver is a
fresh subprocess joining the cluster, so its CPU time (``getrusage``) and peak RSS are its own. Figures:

* driver CPU-seconds per 1,000 images, marginal: (CPU(4N) - CPU(N)) / 3N, which removes start-up (Ray connection,
  model hash, planning); and driver CPU per second of job, marginal, since Ray Data's executor (which runs in the
  driver) costs CPU per second of running as well as per block;
* driver bytes per image: what ``iter_batches`` hands the driver (fragment metadata), divided by images;
* driver peak RSS at N and 4N, and its growth;
* GPUs one driver core can feed: 1 / (marginal CPU-s per image) / (images/s of one GPU), for 3,000 and 6,000
  images/s (one H100 in bf16, issue 9's range);
* the idle floor: what a driver joined to the same cluster spends per second doing nothing at all (Ray's own
  threads in the process), and the image rate below which that floor alone exceeds the per-image target: a
  per-image figure divides a per-second cost by the rate, so on a machine slower than that no driver can meet it.

Targets (issue 9): at most 0.005 CPU-s per 1,000 images marginal; peak RSS growth under 64 MiB from N to 4N.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GPU_RATES = (3000, 6000)
TARGET_CPU_S_PER_1000_IMAGES = 0.005
IDLE_SETTLE_S = 5.0


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One job as its own driver: run it, return its CPU, bytes and peak RSS."""
    import ray

    from pipeline import plan
    from pipeline.config import JobConfig

    stats = {"bytes": 0, "batches": 0}
    original = plan._track_and_finalize

    class Counting:
        def __init__(self, dataset: Any) -> None:
            self.dataset = dataset

        def iter_batches(self, **kwargs: Any) -> Any:
            for table in self.dataset.iter_batches(**kwargs):
                stats["bytes"] += table.nbytes
                stats["batches"] += 1
                yield table

    plan._track_and_finalize = lambda config, dataset, summary, finalizer: original(
        config, Counting(dataset), summary, finalizer
    )
    ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    config = JobConfig(
        task="classify", input=args.input, output=args.output, model=args.model, batch_size=args.batch_size,
        device="cpu", max_actors=2, rows_per_file=100_000,
    )  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    summary = plan.run_job(config)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "images": summary.samples,
        "seconds": round(seconds, 2),
        "driver_cpu_s": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 3),
        "driver_bytes": stats["bytes"],
        "metadata_batches": stats["batches"],
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
    }


def _idle_child(args: argparse.Namespace) -> dict[str, Any]:
    """A driver that joins the cluster and does nothing: its CPU per second over ``args.idle`` seconds."""
    import ray

    ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    time.sleep(IDLE_SETTLE_S)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    time.sleep(args.idle)
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    spent = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": round(seconds, 2), "driver_cpu_s": round(spent, 4)}


def _run_child(command: list[str], root: Path, what: str) -> dict[str, Any]:
    """Run one child driver; return the JSON it prints last."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write_inputs(folder: Path, images: int, per_shard: int) -> tuple[str, str]:
    """Small uniform JPEGs (64 x 64, the checkpoint's input size), so that decoding is cheap and the driver's share
    is what the figures show; a checkpoint with the real widths (768-d, 1,000 labels) and one thin layer."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from tests.reference import small_config_dict, write_reference_checkpoint

    model_folder = folder / "checkpoint"
    if not model_folder.exists():
        config = small_config_dict(num_labels=1000, image_size=64, hidden_size=768, num_hidden_layers=1,
                                   num_attention_heads=12)  # fmt: skip
        write_reference_checkpoint(model_folder, config, seed=1)
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    shards = folder / f"shards-{images}"
    shards.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, images, per_shard)):
        with tarfile.open(shards / f"{index:05d}.tar", "w") as tar:
            for number in range(start, min(images, start + per_shard)):
                data = encoded[number % len(encoded)]
                member = tarfile.TarInfo(f"img-{number:08d}.jpg")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return str(shards), str(model_folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="N; the second job has 4N")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images-per-shard", type=int, default=500)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="how long the idle driver is measured")
    parser.add_argument("--idle", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_idle_child(args) if args.idle else _child(args)))
        return {}

    from ray.cluster_utils import Cluster

    from benchmarks.measures import hardware_summary
    from fixtures.checkout import CHECKOUT_ROOT, checkout_python_path
    from pipeline.cpu import detect_cpu_capabilities

    os.environ["PYTHONPATH"] = checkout_python_path()
    os.environ["VIT_HYBRID_STAND_IN_MODEL"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=400 * 1024**2)
    cluster.wait_for_nodes()
    runs = {}
    try:
        with tempfile.TemporaryDirectory(prefix="driver-bench-") as folder:
            for images in (args.images, 4 * args.images):
                shards, model = _write_inputs(Path(folder), images, args.images_per_shard)
                command = [sys.executable, "-m", "benchmarks.driver", "--child", "--address", cluster.address,
                           "--input", shards, "--output", str(Path(folder, f"out-{images}")), "--model", model,
                           "--batch-size", str(args.batch_size)]  # fmt: skip
                runs[images] = _run_child(command, CHECKOUT_ROOT, f"the {images}-image job")
        command = [sys.executable, "-m", "benchmarks.driver", "--child", "--address", cluster.address,
                   "--idle", str(args.idle_seconds)]  # fmt: skip
        idle = _run_child(command, CHECKOUT_ROOT, "the idle driver")
    finally:
        cluster.shutdown()
    small, large = runs[args.images], runs[4 * args.images]
    marginal = (large["driver_cpu_s"] - small["driver_cpu_s"]) / max(1, large["images"] - small["images"])
    report = {
        "hardware": hardware_summary(),
        "batch_size": args.batch_size,
        "runs": runs,
        "driver_cpu_s_per_1000_images_marginal": round(marginal * 1000, 5),
        "driver_bytes_per_image": round(large["driver_bytes"] / max(1, large["images"]), 2),
        "driver_peak_rss_growth_mib": round(large["peak_rss_mib"] - small["peak_rss_mib"], 1),
        "driver_cpu_s_per_job_second_marginal": round(
            (large["driver_cpu_s"] - small["driver_cpu_s"]) / max(1e-9, large["seconds"] - small["seconds"]), 4
        ),
        "job_images_per_s_marginal": round(
            (large["images"] - small["images"]) / max(1e-9, large["seconds"] - small["seconds"]), 1
        ),
        "idle_driver_cpu_s_per_second": round(idle["driver_cpu_s"] / max(1e-9, idle["seconds"]), 5),
        "gpus_one_driver_core_feeds": {
            f"{rate}_images_per_s": (round(1 / (marginal * rate), 1) if marginal > 0 else None) for rate in GPU_RATES
        },
    }
    report["images_per_s_below_which_the_idle_floor_alone_misses_the_target"] = round(
        report["idle_driver_cpu_s_per_second"] / (TARGET_CPU_S_PER_1000_IMAGES / 1000), 1
    )
    capabilities = detect_cpu_capabilities()
    report["cpu_capabilities"] = capabilities.to_dict()
    hardware = report["hardware"]
    print(f"CPU: {hardware['cpu_model']} ({hardware['cpu_cores_usable']} usable of {hardware['cpu_cores']} cores); "
          f"detected: {capabilities.describe()}")
    for images, run in runs.items():
        print(
            f"{images} images: driver {run['driver_cpu_s']} CPU-s, {run['driver_bytes'] / 1e3:.1f} kB received in "
            f"{run['metadata_batches']} batches, peak RSS {run['peak_rss_mib']} MiB, job {run['seconds']} s"
        )
    print(
        f"marginal driver CPU: {report['driver_cpu_s_per_1000_images_marginal']} CPU-s per 1,000 images "
        f"(target <= 0.005), {report['driver_cpu_s_per_job_second_marginal']} CPU-s per second of job; "
        f"{report['driver_bytes_per_image']} bytes per image; peak RSS growth "
        f"{report['driver_peak_rss_growth_mib']} MiB from N to 4N (target < 64); one driver core feeds "
        + ", ".join(f"{value} GPUs at {rate}" for rate, value in report["gpus_one_driver_core_feeds"].items())
    )
    print(
        f"idle floor: a driver joined to the cluster and doing nothing spent "
        f"{report['idle_driver_cpu_s_per_second']} CPU-s per second, i.e. more than the target per image below "
        f"{report['images_per_s_below_which_the_idle_floor_alone_misses_the_target']} images/s "
        f"(these jobs ran at {report['job_images_per_s_marginal']} images/s marginal)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
