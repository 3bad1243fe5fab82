"""Measure the whole pipeline against its bounds: model only, decode per core, end to end, and the ratios.

    python -m jobs.benchmark                      # CPU: full-size model, 64 images end to end (~5 min on 2 cores)
    python -m jobs.benchmark --quick              # tiny model, small images: checks the arithmetic in < 1 min (CI)
    python -m jobs.benchmark --json bench.json    # also write every figure as JSON

On a GPU machine (one H100, 16 cores), the production setting (prints the same table; ~5 min)::

    python -m jobs.benchmark --device cuda --dtype bfloat16 --batch-size 256 --images 20000 --two-point --json h100.json

and, to take the single-process moto S3 server out of the end-to-end path if the table shows it is the limit::

    python -m jobs.benchmark --device cuda --dtype bfloat16 --batch-size 256 --images 20000 --storage local

One run, in this order:

1. **Model only**: an :class:`~pipeline.infer.InferenceActor` is built in this process from the same checkpoint URI
   the job uses (its construction time is the actor start-up), then :func:`pipeline.infer.predict` -- uint8 batch
   already on the device -> normaliser -> model -> softmax/top-k -- is timed after warm-up batches (CUDA events and
   ``torch.cuda.synchronize`` on a GPU). Threads are the actor's: on a CPU, ``--cpus-per-actor`` torch threads.
   FLOPs per image are counted with ``FlopCounterMode`` on one image.
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
4. **Bounds**: efficiency = end-to-end images/s / min(model-only images/s x actors, per-core decode rate of the same
   mix x decode CPUs); on a GPU, model FLOP utilisation = FLOPs per image x images/s / peak (data-sheet dense peak
   of the GPU for the dtype, or ``--peak-tflops``).

``--two-point`` first runs the same job on half the images (each job on a fresh local Ray) and fits
``time = fixed + images / marginal rate``: the fixed part is what a job pays once (driver preamble, actor start-up
with the model load, first-batch warm-up), the marginal rate is the steady state. On a CPU, where a 64-image job
takes minutes, the fixed part is a visible share of the job; on 20000 images on a GPU it should not be.

``--decode-cpus`` is the total number of CPU cores given to decoding (one decode task per core); it defaults to
the cores left after the actors. On the GPU machine the moto server is a single Python process serving the input;
the table shows the input MB/s, and ``--storage local`` takes object storage out of the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import measures as benchmarking
from benchmarks.measures import EncodedImage, ImageKind

logger = logging.getLogger("jobs.benchmark")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOP_K = 5
FULL_IMAGE_SIZE = 384
QUICK_IMAGE_SIZE = 64
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "benchmark-access-key",
    "AWS_SECRET_ACCESS_KEY": "benchmark-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@dataclass(frozen=True)
class BenchmarkSettings:
    """One run's settings, resolved from the command line (``device`` is ``cpu`` or ``cuda`` by now)."""

    quick: bool
    device: str
    dtype: str
    batch_size: int
    images: int
    decode_cpus: float
    actors: int
    cpus_per_actor: float
    images_per_shard: int
    phone_every: int
    warmup_batches: int
    timed_batches: int
    decode_seconds: float
    storage: str
    peak_tflops: float | None
    json_path: str | None
    two_point: bool = False
    model: str | None = None
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# Set-up: checkpoint, processors, local S3.


def write_random_checkpoint(folder: Path, *, quick: bool, seed: int, calibration: np.ndarray | None = None) -> Path:
    """A google/vit-hybrid-base-bit-384-shaped checkpoint (or the tiny --quick one) with random weights.

    The weights are variance-preserving (``jobs.benchmark_model.randomize_weights``), not transformers' std-0.02
    init. Even so, a deep random network maps every photo to nearly the same embedding, and a random head then
    gives them all one class, which would make "top-1 agreement" trivially 100%. So when ``calibration`` crops
    (uint8 ``(N, H, W, 3)``) are given, the head is centred and scaled on their embeddings: the logits then follow
    what differs between photos, and different photos land in different classes. The backbone stays random.
    """
    from jobs.benchmark_model import benchmark_config, randomize_weights
    from model import ViTHybridForImageClassification

    size = QUICK_IMAGE_SIZE if quick else FULL_IMAGE_SIZE
    config = benchmark_config(size, quick=quick)
    config.id2label = {index: f"random-class-{index}" for index in range(config.num_labels)}
    config.label2id = {label: index for index, label in config.id2label.items()}
    model = ViTHybridForImageClassification(config).eval()
    randomize_weights(model, seed)
    processor = checkpoint_processor(size)
    if calibration is not None and len(calibration) > 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            with torch.inference_mode():
                embeddings = model.embed(processor.normalizer()(torch.from_numpy(calibration))).float()
                mean = embeddings.mean(dim=0)
                scale = (embeddings - mean).std().clamp_min(1e-6)
                head = model.classifier
                weight = head.weight / scale
                head.bias.copy_(-(weight @ mean))
                head.weight.copy_(weight)
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(folder)
    processor.save_pretrained(str(folder))
    return folder


def checkpoint_processor(size: int) -> Any:
    """The 384 checkpoint's preprocessing at ``size``: shortest edge, bicubic, centre crop, mean = std = 0.5."""
    from model import ViTHybridImageProcessor

    return ViTHybridImageProcessor(
        size={"shortest_edge": size},
        resample=Image.Resampling.BICUBIC,
        crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def reference_processor(processor: Any) -> Any | None:
    """transformers' ``ViTHybridImageProcessor`` with exactly ``processor``'s settings; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    settings = {key: value for key, value in processor.to_dict().items() if key != "image_processor_type"}
    return transformers.ViTHybridImageProcessor(**settings)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_s3_server(timeout_s: float = 30.0) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with ``AWS_ENDPOINT_URL`` and fake keys in ``os.environ``.

    The variables are set before Ray starts, so every Ray worker inherits them; they are restored on exit.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {name: os.environ.get(name) for name in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {process.returncode}; is moto[server] installed?")
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server at {endpoint} did not answer within {timeout_s}s") from None
                time.sleep(0.1)
        os.environ.update(S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        _forget_s3_clients()
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _forget_s3_clients()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _forget_s3_clients() -> None:
    """fsspec caches one S3 filesystem per option set, bound to the endpoint it was made with: drop them."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


def _upload_folder(folder: Path, uri: str) -> None:
    from model.storage import join_uri, write_bytes

    for path in sorted(folder.iterdir()):
        if path.is_file():
            write_bytes(join_uri(uri, path.name), path.read_bytes())


# ---------------------------------------------------------------------------------------------------------------------
# Other load on the machine.


def _read_processes() -> dict[int, tuple[int, float, int]]:
    """``{pid: (parent pid, CPU seconds so far, start time in ticks)}`` for every process, from ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:  # the process ended between listing and reading
            continue
        fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        processes[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks, int(fields[19]))
    return processes


class CpuLoadMonitor:
    """CPU seconds spent, while it runs, by this benchmark's process tree and by every other process.

    Ray workers, the raylet and the moto server are descendants of this process; anything else (another user's
    job on a shared machine) is foreign load, which makes the timings it overlaps unreliable: the table says so.
    Linux only (``/proc``); elsewhere the figures are None.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.own_cpu_s: float | None = None
        self.foreign_cpu_s: float | None = None
        self.wall_s = 0.0
        self._seen: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        processes = _read_processes()
        children: dict[int, list[int]] = {}
        for pid, (parent, _, _) in processes.items():
            children.setdefault(parent, []).append(pid)
        own, stack = set(), [os.getpid()]
        while stack:
            pid = stack.pop()
            own.add(pid)
            stack.extend(children.get(pid, []))
        for pid, (_, cpu_s, started) in processes.items():
            key = (pid, started)  # a pid can be reused; its start time tells the two apart
            previous = self._seen.get(key)
            self._seen[key] = cpu_s
            if previous is None:
                # New since the last sample: count it all if it started after we did, else only from now on.
                previous = 0.0 if self._first_done and started >= self._start_ticks else cpu_s
            delta = cpu_s - previous
            if pid in own:
                self.own_cpu_s = (self.own_cpu_s or 0.0) + delta
            else:
                self.foreign_cpu_s = (self.foreign_cpu_s or 0.0) + delta
        self._first_done = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> CpuLoadMonitor:
        if not os.path.isdir("/proc/self"):
            return self
        with open("/proc/uptime", encoding="ascii") as uptime:
            self._start_ticks = int(float(uptime.read().split()[0]) * os.sysconf("SC_CLK_TCK"))
        self._first_done = False
        self.own_cpu_s, self.foreign_cpu_s = 0.0, 0.0
        self._sample()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="cpu-load-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._started

    def to_dict(self) -> dict[str, float | None]:
        cores = None if self.foreign_cpu_s is None or self.wall_s <= 0 else self.foreign_cpu_s / self.wall_s
        own = None if self.own_cpu_s is None or self.wall_s <= 0 else self.own_cpu_s / self.wall_s
        return {"wall_s": self.wall_s, "own_cpu_s": self.own_cpu_s, "foreign_cpu_s": self.foreign_cpu_s,
                "own_cores": own, "foreign_cores": cores}


# ---------------------------------------------------------------------------------------------------------------------
# 1. Model only.


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_predict(actor: Any, pixels: torch.Tensor, *, warmup: int, iterations: int) -> list[float]:
    """Seconds per :func:`pipeline.infer.predict` call on a batch already on the actor's device, after warm-up.

    On a GPU the time is CUDA events' (``predict`` ends in a device-to-host copy, so every call is complete).
    """
    from pipeline.infer import predict

    device = actor.device
    for _ in range(warmup):
        predict(actor.model, actor.normalizer, pixels, top_k=TOP_K)
    _synchronize(device)
    seconds = []
    for _ in range(iterations):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            predict(actor.model, actor.normalizer, pixels, top_k=TOP_K)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            predict(actor.model, actor.normalizer, pixels, top_k=TOP_K)
            seconds.append(time.perf_counter() - started)
    return seconds


def count_flops_per_image(actor: Any, pixels: torch.Tensor) -> float:
    """FLOPs of one image through predict (convolutions, matrix products, attention; a multiply-add is 2)."""
    from benchmarks.flops import measured_flops  # counts attention on a CPU too (math backend)
    from pipeline.infer import predict

    return measured_flops(
        lambda: predict(actor.model, actor.normalizer, pixels[:1], top_k=TOP_K), images=1, device_type=pixels.device.type
    )


def _batch_of(crops: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    return np.stack([crops[index % len(crops)] for index in range(batch_size)])


# ---------------------------------------------------------------------------------------------------------------------
# 2. Decode per core.


def images_per_second(function: Callable[[bytes], Any], images: Sequence[EncodedImage], min_seconds: float) -> float:
    """Images/s of ``function`` over ``images``, cycling until ``min_seconds`` have passed (at least one pass)."""
    function(images[0].data)  # warm-up: imports, Pillow plugin registry, transformers' lazy modules
    done = 0
    started = time.perf_counter()
    while True:
        for image in images:
            function(image.data)
            done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def _decode_pixels(data: bytes, processor: Any, *, fast: bool) -> np.ndarray:
    from pipeline.decode import DecodeError, decode_sample

    result = decode_sample(data, processor=processor, fast=fast)
    if isinstance(result, DecodeError):
        raise RuntimeError(f"a benchmark image failed to decode: {result.reason}")
    return result.pixels


def measure_decode(
    image_sets: dict[str, list[EncodedImage]], processor: Any, reference: Any | None, min_seconds: float
) -> dict[str, dict[str, Any]]:
    """Per kind: images/s per core of the fast, exact and reference paths, sizes, and max |pixel diff| fast-exact."""
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, images in image_sets.items():
            fast = images_per_second(lambda data: _decode_pixels(data, processor, fast=True), images, min_seconds)
            exact = images_per_second(lambda data: _decode_pixels(data, processor, fast=False), images, min_seconds)
            ref = None
            if reference is not None:
                ref = images_per_second(
                    lambda data: reference(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"],
                    images,
                    min_seconds,
                )
            deviation = max(
                int(np.abs(_decode_pixels(image.data, processor, fast=True).astype(np.int16)
                           - _decode_pixels(image.data, processor, fast=False)).max())
                for image in images
            )
            results[kind] = {
                "size": f"{images[0].width}x{images[0].height}",
                "images": len(images),
                "avg_kb": statistics.fmean(len(image.data) for image in images) / 1024,
                "fast": fast,
                "exact": exact,
                "reference": ref,
                "fast_over_reference": fast / ref if ref else None,
                "fast_over_exact": fast / exact,
                "max_abs_pixel_diff": deviation,
            }
    finally:
        torch.set_num_threads(threads)
    return results


def fast_exact_agreement(actor: Any, processor: Any, images: Sequence[EncodedImage], batch_size: int) -> dict[str, Any]:
    """Top-1 class on the fast and on the exact preprocessing of each image, per kind.

    An image whose two preprocessings are identical pixel for pixel agrees by construction and is not run.

    A control runs beside: the exact crop with +-1 of random noise on every pixel, a change nobody would call a
    different image. A random network is chaotic (tiny input changes move its output about as much as a different
    photo does), and the control shows how much: the fast path is only judged relative to it. With trained weights
    (``--model``) the control should agree ~100% and so should the fast path.
    """
    from pipeline.infer import predict

    per_kind: dict[str, dict[str, int]] = {}
    differing: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    rng = np.random.default_rng(0)
    for image in images:
        counts = per_kind.setdefault(image.kind, {"images": 0, "agree": 0, "identical_pixels": 0})
        counts["images"] += 1
        fast = _decode_pixels(image.data, processor, fast=True)
        exact = _decode_pixels(image.data, processor, fast=False)
        if np.array_equal(fast, exact):
            counts["agree"] += 1
            counts["identical_pixels"] += 1
        else:
            noise = rng.integers(-1, 2, size=exact.shape)
            control = np.clip(exact.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            differing.append((image.kind, fast, exact, control))
    classes: set[int] = set()
    shifts: list[float] = []
    control_shifts: list[float] = []
    control_agree = 0
    exact_embeddings: list[np.ndarray] = []
    threads = torch.get_num_threads()
    if actor.device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # not a timing: use every core
    try:
        for start in range(0, len(differing), batch_size):
            chunk = differing[start : start + batch_size]
            tops, embeddings = [], []
            for column in (1, 2, 3):
                pixels = torch.from_numpy(np.stack([row[column] for row in chunk])).to(actor.device)
                result = predict(actor.model, actor.normalizer, pixels, top_k=1)
                tops.append(result.topk_ids[:, 0])
                embeddings.append(result.embeddings)
            for (kind, _, _, _), top_fast, top_exact, top_control in zip(chunk, *tops):
                per_kind[kind]["agree"] += int(top_fast == top_exact)
                control_agree += int(top_control == top_exact)
                classes.add(int(top_exact))
            shifts.extend(np.linalg.norm(embeddings[0] - embeddings[1], axis=1).tolist())
            control_shifts.extend(np.linalg.norm(embeddings[2] - embeddings[1], axis=1).tolist())
            exact_embeddings.extend(embeddings[1])
    finally:
        torch.set_num_threads(threads)
    # How far the fast path moves an image's embedding, next to how far apart different photos' embeddings are.
    between = [
        float(np.linalg.norm(exact_embeddings[i] - exact_embeddings[j]))
        for i in range(len(exact_embeddings)) for j in range(i + 1, len(exact_embeddings))
    ]
    typical = statistics.median(between) if between else None
    return {
        "per_kind": per_kind,
        "embedding_shift_over_between_photos": statistics.median(shifts) / typical if typical else None,
        "control_images": len(differing),
        "control_agree": control_agree,
        "control_shift_over_between_photos": statistics.median(control_shifts) / typical if typical else None,
        "images": sum(counts["images"] for counts in per_kind.values()),
        "agree": sum(counts["agree"] for counts in per_kind.values()),
        "identical_pixels": sum(counts["identical_pixels"] for counts in per_kind.values()),
        "distinct_classes": len(classes),
    }


# ---------------------------------------------------------------------------------------------------------------------
# 3. End to end.


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
def local_ray(num_cpus: float) -> Iterator[None]:
    """A new Ray started in-process with ``num_cpus`` CPUs; its workers import this checkout.

    ``address="local"``: never join a cluster that happens to run on the machine (``ray start``, or another job's
    session recorded in ``/tmp/ray``): its CPUs, other work and code version would all be someone else's.
    """
    import ray

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), saved]))
    try:
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False
        )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines would split the table
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def run_end_to_end(settings: BenchmarkSettings, model_uri: str, input_uri: str, output_uri: str) -> dict[str, Any]:
    """Run the classify job once on a local Ray and return its summary's figures."""
    from pipeline.config import JobConfig
    from pipeline.plan import run_job

    config = JobConfig(
        task="classify",
        input=input_uri,
        output=output_uri,
        model=model_uri,
        format="webdataset",
        batch_size=settings.batch_size,
        top_k=TOP_K,
        dtype=settings.dtype,
        device=settings.device,
        min_actors=settings.actors,
        max_actors=settings.actors,
        cpus_per_actor=settings.cpus_per_actor,
        gpus_per_actor=1 if settings.device == "cuda" else None,
        decode_cpus=min(1.0, settings.decode_cpus),  # one core per decode task: --decode-cpus tasks at once
        overwrite=True,
    )
    ray_cpus = math.ceil(settings.decode_cpus + settings.actors * settings.cpus_per_actor)
    with local_ray(ray_cpus):
        started = time.perf_counter()
        with CpuLoadMonitor() as load:
            summary = run_job(config)
        wall = time.perf_counter() - started
    figures = summary.to_dict()
    figures["load"] = load.to_dict()
    figures["summary_images_per_s"] = figures["images_per_s"]  # rounded to 3 decimals by the summary
    figures["images_per_s"] = summary.samples / summary.seconds if summary.seconds > 0 else 0.0
    figures["wall_s"] = wall
    figures["ray_cpus"] = ray_cpus
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# The run.


def run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
    """Measure everything; returns the figures as a JSON-ready dict (also what the table is printed from)."""
    from pipeline.infer import InferenceActor, InferenceSettings, resolve_dtype

    run_started = time.perf_counter()
    hardware = benchmarking.hardware_summary()
    if settings.model:
        from model import ViTHybridImageProcessor

        processor = ViTHybridImageProcessor.from_pretrained(settings.model)
        size = processor.output_size[0]
    else:
        size = QUICK_IMAGE_SIZE if settings.quick else FULL_IMAGE_SIZE
        processor = checkpoint_processor(size)
    reference = reference_processor(processor)

    photos = benchmarking.sample_photographs()
    imagenet_kind, phone_kind = (
        (benchmarking.QUICK_IMAGENET, benchmarking.QUICK_PHONE) if settings.quick
        else (benchmarking.IMAGENET, benchmarking.PHONE)
    )
    kinds: list[ImageKind] = [imagenet_kind, phone_kind]
    counts = {imagenet_kind.name: 4 if settings.quick else 2 * len(photos), phone_kind.name: 2 if settings.quick else len(photos)}
    image_sets = {
        kind.name: benchmarking.build_image_set(kind, photos, count=counts[kind.name], seed=settings.seed) for kind in kinds
    }

    # 2. Decode per core first, while nothing else runs.
    logger.info("timing decode + preprocess per core")
    decode_kinds = measure_decode(image_sets, processor, reference, settings.decode_seconds)

    # One image per photograph and kind: the photos the fast path is judged on, and the head is calibrated on.
    agreement_images = [image for images in image_sets.values() for image in images[: len(photos)]]
    calibration = np.stack([_decode_pixels(image.data, processor, fast=False) for image in image_sets[imagenet_kind.name][: len(photos)]])

    with tempfile.TemporaryDirectory(prefix="vit-hybrid-benchmark-") as workdir, contextlib.ExitStack() as stack:
        if settings.model:
            local_checkpoint = Path(settings.model)
        else:
            logger.info("writing a random checkpoint")
            local_checkpoint = write_random_checkpoint(
                Path(workdir) / "checkpoint", quick=settings.quick, seed=settings.seed, calibration=calibration
            )
        if settings.storage == "s3":
            import fsspec

            stack.enter_context(local_s3_server())
            bucket = f"benchmark-{uuid.uuid4().hex[:8]}"
            fsspec.filesystem("s3").mkdir(bucket)
            base = f"s3://{bucket}"
            _upload_folder(local_checkpoint, f"{base}/model")
            model_uri = f"{base}/model"
        else:
            base = str(Path(workdir) / "storage")
            model_uri = str(local_checkpoint)

        # 1. Model only, with the actor the job builds, from the same URI.
        logger.info("building the inference actor in-process and timing predict")
        actor_settings = InferenceSettings(
            model_uri=model_uri,
            task="classify",
            top_k=TOP_K,
            dtype=settings.dtype,
            device=settings.device,
            torch_threads=None if settings.device == "cuda" else max(1, int(settings.cpus_per_actor)),
        )
        threads_before = torch.get_num_threads()
        started = time.perf_counter()
        actor = InferenceActor(actor_settings)
        _synchronize(actor.device)
        actor_startup_s = time.perf_counter() - started
        crops = [_decode_pixels(image.data, processor, fast=True) for images in image_sets.values() for image in images]
        pixels = torch.from_numpy(_batch_of(crops, settings.batch_size)).to(actor.device)
        cpu_started = time.process_time()
        with CpuLoadMonitor() as model_load:
            seconds = time_predict(actor, pixels, warmup=settings.warmup_batches, iterations=settings.timed_batches)
        # On a CPU, this process's CPU time over wall time: ~threads when it had its cores to itself.
        model_cpu_over_wall = (time.process_time() - cpu_started) / model_load.wall_s if model_load.wall_s else None
        model_images_per_s = settings.batch_size * len(seconds) / sum(seconds)
        torch_threads = torch.get_num_threads()
        flops = count_flops_per_image(actor, pixels)

        # 2b. Does the fast path change what the model says?
        agreement = fast_exact_agreement(actor, processor, agreement_images, batch_size=min(settings.batch_size, 8))
        dtype_name = str(resolve_dtype(settings.dtype, actor.device)).removeprefix("torch.")
        model_config = (
            f"checkpoint {settings.model}" if settings.model
            else "tiny random (--quick)" if settings.quick else "full-size random (vit-hybrid-base-bit-384 shape)"
        )
        del actor, pixels
        gc.collect()
        if settings.device == "cuda":
            torch.cuda.empty_cache()
        torch.set_num_threads(threads_before)

        # 3. End to end; with --two-point first a job of half the images, each on a fresh Ray (as a real job).
        small_job = None
        if settings.two_point:
            small = max(1, settings.images // 2)
            write_mixed_shards(
                f"{base}/shards-small", image_sets, images=small, phone_every=settings.phone_every,
                images_per_shard=settings.images_per_shard,
            )
            logger.info("running the classify job on %d images (two-point: the smaller job)", small)
            small_job = run_end_to_end(settings, model_uri, f"{base}/shards-small", f"{base}/predictions-small")
        logger.info("writing %d images as WebDataset shards to %s", settings.images, base)
        written = write_mixed_shards(
            f"{base}/shards", image_sets, images=settings.images, phone_every=settings.phone_every,
            images_per_shard=settings.images_per_shard,
        )
        logger.info("running the classify job on %d images", settings.images)
        job = run_end_to_end(settings, model_uri, f"{base}/shards", f"{base}/predictions")

    # 4. Bounds.
    fractions = written["fractions"]
    mix = {
        path: benchmarking.mix_rate({kind: row[path] for kind, row in decode_kinds.items()}, fractions)
        if all(row[path] for row in decode_kinds.values()) else None
        for path in ("fast", "exact", "reference")
    }
    mix["fast_over_reference"] = mix["fast"] / mix["reference"] if mix["reference"] else None
    mix["fast_over_exact"] = mix["fast"] / mix["exact"]
    phone_every_label = f"1/{settings.phone_every} phone" if settings.phone_every else "no phone"
    mix["label"] = phone_every_label
    mix["fractions"] = fractions
    for kind, row in decode_kinds.items():
        row["top1_agreement"] = agreement["per_kind"].get(kind)

    bounds = benchmarking.pipeline_bounds(
        model_images_per_s=model_images_per_s,
        actors=settings.actors,
        decode_images_per_s_per_core=mix["fast"],
        decode_cpus=settings.decode_cpus,
        end_to_end_images_per_s=job["images_per_s"],
    )
    peak = settings.peak_tflops or (
        benchmarking.peak_tflops_for(hardware["gpu"], dtype_name) if settings.device == "cuda" else None
    )
    mfu = {
        "peak_tflops": peak,
        # Per GPU: pool throughput over actors x one GPU's peak (one actor per GPU).
        "model_only": benchmarking.model_flop_utilisation(flops, bounds.model_pool_images_per_s, peak, gpus=settings.actors),
        "end_to_end": benchmarking.model_flop_utilisation(flops, job["images_per_s"], peak, gpus=settings.actors),
    }
    two_point = None
    if small_job is not None:
        try:
            two_point = benchmarking.two_point_rate(
                small_images=small_job["samples"], small_seconds=small_job["seconds"],
                images=job["samples"], seconds=job["seconds"], bound_images_per_s=bounds.bound_images_per_s,
            ).to_dict()
        except ValueError as error:  # too few images for the difference to rise above the noise
            logger.warning("two-point fit skipped: %s", error)
            two_point = {"error": str(error)}

    return {
        "settings": asdict(settings),
        "hardware": hardware,
        "model": {
            "config": model_config,
            "image_size": size,
            "device": settings.device,
            "dtype": dtype_name,
            "torch_threads": torch_threads,
            "warmup_batches": settings.warmup_batches,
            "timed_batches": len(seconds),
            "batch_seconds": seconds,
            "images_per_s": model_images_per_s,
            "flops_per_image": flops,
            "actor_startup_s": actor_startup_s,
            "cpu_over_wall": model_cpu_over_wall if settings.device == "cpu" else None,
            "load": model_load.to_dict(),
            "checkpoint_location": settings.storage,
        },
        "decode": {
            "kinds": list(decode_kinds),
            "per_kind": decode_kinds,
            "mix": mix,
            "reference_note": "transformers installed" if reference is not None else "skipped: transformers not installed",
            "top1_agreement": {
                key: agreement[key]
                for key in ("images", "agree", "identical_pixels", "distinct_classes", "embedding_shift_over_between_photos",
                            "control_images", "control_agree", "control_shift_over_between_photos")
            },
        },
        "end_to_end": {
            **job,
            "storage": "S3 (moto)" if settings.storage == "s3" else "local files",
            "images": settings.images,
            "phone_images": written["per_kind"].get(phone_kind.name, 0),
            "shards": written["shards"],
            "images_per_shard": settings.images_per_shard,
            "input_mb": written["input_bytes"] / 1e6,
            "input_mb_per_s": written["input_bytes"] / 1e6 / job["seconds"] if job["seconds"] else None,
            "cpus_per_actor": settings.cpus_per_actor,
        },
        "bounds": bounds.to_dict(),
        "two_point": two_point,
        "mfu": mfu,
        "benchmark_seconds": time.perf_counter() - run_started,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, small images, few of them (CI: arithmetic, not speed)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto = bfloat16 on GPU, float32 on CPU (as the job)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per inference batch (default 256 on GPU, 16 on CPU, 8 quick)")
    parser.add_argument("--images", type=int, default=None, help="images through the end-to-end job (default 20000 GPU, 64 CPU, 24 quick)")
    parser.add_argument("--decode-cpus", type=float, default=None,
                        help="CPU cores for decode tasks (default: the cores left after the actors, at least 1)")
    parser.add_argument("--actors", type=int, default=None, help="inference actors (default: GPUs, or 1 on CPU)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (on CPU: its torch threads)")
    parser.add_argument("--images-per-shard", type=int, default=None,
                        help="images per input shard (default: about 4 shards per decode task, at least one batch)")
    parser.add_argument("--phone-every", type=int, default=10, help="one 12 MP phone photo every N images (0: none)")
    parser.add_argument("--warmup-batches", type=int, default=None, help="untimed model-only batches (default 3 GPU, 1 CPU)")
    parser.add_argument("--timed-batches", type=int, default=None, help="timed model-only batches (default 20 GPU, 2 CPU)")
    parser.add_argument("--decode-seconds", type=float, default=None, help="time spent per decode path and kind (default 2, quick 0.05)")
    parser.add_argument("--storage", choices=["s3", "local"], default="s3",
                        help="where shards, checkpoint and output live: moto S3 on 127.0.0.1, or local files")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: the data-sheet dense peak of a known GPU for the dtype)")
    parser.add_argument("--two-point", action="store_true",
                        help="also run a job of half the images first: separates the fixed cost (start-up) from the "
                             "marginal rate")
    parser.add_argument("--model", default=None,
                        help="a local checkpoint folder (HF layout, with preprocessor_config.json) instead of random "
                             "weights; with trained weights the fast/exact top-1 agreement means what it says")
    parser.add_argument("--json", dest="json_path", default=None, help="write every figure to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    """Fill the defaults that depend on the device and on --quick."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    actors = args.actors or (torch.cuda.device_count() if gpu else 1)
    batch_size = args.batch_size or (8 if args.quick else 256 if gpu else 16)
    images = args.images or (24 if args.quick else 20000 if gpu else 64)
    decode_cpus = args.decode_cpus or max(1.0, usable - actors * args.cpus_per_actor)
    if batch_size < 1 or images < 1 or actors < 1 or decode_cpus <= 0 or args.phone_every < 0:
        raise SystemExit("--batch-size, --images, --actors and --decode-cpus must be positive, --phone-every >= 0")
    decode_slots = max(1, int(decode_cpus))
    images_per_shard = args.images_per_shard or min(1000, max(batch_size, math.ceil(images / (4 * decode_slots))))
    return BenchmarkSettings(
        quick=args.quick,
        device=device,
        dtype=args.dtype,
        batch_size=batch_size,
        images=images,
        decode_cpus=decode_cpus,
        actors=actors,
        cpus_per_actor=args.cpus_per_actor,
        images_per_shard=images_per_shard,
        phone_every=args.phone_every,
        warmup_batches=args.warmup_batches if args.warmup_batches is not None else (3 if gpu else 1),
        timed_batches=args.timed_batches or (20 if gpu else 2),
        decode_seconds=args.decode_seconds or (0.05 if args.quick else 2.0),
        storage=args.storage,
        peak_tflops=args.peak_tflops,
        json_path=args.json_path,
        two_point=args.two_point,
        model=args.model,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: prints the table, writes --json, returns the results dict (tests read it)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    results = run_benchmark(settings)
    print(benchmarking.format_report(results), flush=True)
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
