"""Benchmark stage ``model``: the job's inference actor alone, in this process, from the same checkpoint URI the job
uses -- its construction time (the actor start-up: model load and warm-up), images/s of
:func:`pipeline.infer.predict` on a uint8 batch already on the device after warm-up batches, FLOPs per image, and
whether the fast decode path changes what the model says (against a +-1-noise control).

Dtype is the job's: on a CPU, the dtype ``auto`` resolves to on this node. On a CPU three layouts of the model are
timed, and the fastest is the bound "end to end / model only" is judged against:

* one actor with one torch thread per core the job gives inference (one call on every thread);
* the actor the job itself runs (:func:`pipeline.cpu.size_cpu_node` with this node's memory: on a small node one
  single-threaded call per core, all at once in one process), timed over one window (:func:`time_cpu_pool`);
* the same cores as one single-threaded process each, side by side (the layout the job used before its lanes).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.decode import decode_pixels
from benchmarks.load import CpuLoadMonitor
from benchmarks.measures import EncodedImage
from benchmarks.stages import BenchmarkContext

NEEDS: tuple[str, ...] = ("inputs",)
TOP_K = 5


# Where ``python -m jobs.benchmark`` records the GLIBC_TUNABLES it re-executed itself with (the CPU actors' allocator).
MEASURED_ALLOCATOR = "VIT_HYBRID_BENCHMARK_MEASURED_TUNABLES"


def measured_allocator() -> str | None:
    """The ``GLIBC_TUNABLES`` this process runs with, as ``python -m jobs.benchmark`` recorded them when it re-executed
    itself with the CPU actors' allocator (None on a GPU run, or when the stage runs from a plain ``main()`` call)."""
    return os.environ.get(MEASURED_ALLOCATOR)


def synchronize(device: torch.device) -> None:
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
    synchronize(device)
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


def node_memory_bytes() -> int:
    """This machine's memory as Ray's default ``memory`` resource sees it: 70 % of it (the rest is the object store)."""
    return int(0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def job_cpu_sizing(model_uri: str, *, node_cpus: float, dtype: str, batch_size: int) -> Any:
    """:func:`pipeline.cpu.size_cpu_node` as the job computes it for this model on this node (memory included)."""
    from model import ViTHybridConfig, ViTHybridImageProcessor
    from model.weights import checkpoint_fingerprint
    from pipeline import cpu
    from pipeline.plan import actor_memory_estimate

    estimate = actor_memory_estimate(ViTHybridConfig.from_pretrained(model_uri), ViTHybridImageProcessor.from_pretrained(model_uri),
                                     checkpoint_fingerprint(model_uri).parameters)
    return cpu.size_cpu_node(node_cpus, node_memory_bytes=node_memory_bytes(),
                             actor_memory=lambda calls: estimate(dtype, batch_size, calls))


def _in_lanes(lanes: int, work: Any) -> list[list[float]]:
    """``work(out)`` in ``lanes`` threads at once (each appends batch times to its own list); the lists."""
    import threading

    outs: list[list[float]] = [[] for _ in range(lanes)]
    threads = [threading.Thread(target=work, args=(out,)) for out in outs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outs


def _pool_member(
    model_uri: str, dtype: str, threads: int, lanes: int, pixels: np.ndarray, warmup: int, iterations: int,
    barrier: Any, results: Any,
) -> None:
    """One process of :func:`time_cpu_pool`: build the actor, warm up every lane, wait for the others, then time."""
    from pipeline.actor import InferenceSettings
    from pipeline.infer import BatchInference

    actor = BatchInference(InferenceSettings(
        model_uri=model_uri, task="classify", top_k=TOP_K, dtype=dtype, device="cpu", torch_threads=threads,
        compute_lanes=lanes,
    ))
    batch = torch.from_numpy(pixels)
    _in_lanes(lanes, lambda out: out.extend(time_predict(actor, batch, warmup=warmup, iterations=0)))
    barrier.wait()
    started = time.time()
    seconds = _in_lanes(lanes, lambda out: out.extend(time_predict(actor, batch, warmup=0, iterations=iterations)))
    results.put({"started": started, "ended": time.time(), "batch_seconds": seconds})


def time_cpu_pool(
    model_uri: str, *, dtype: str, processes: int, lanes: int, threads: int, pixels: np.ndarray, warmup: int,
    iterations: int,
) -> dict[str, Any]:
    """Images/s of ``processes`` model processes, each computing ``lanes`` batches at once on ``threads`` intra-op
    threads each, all running at once: the job's CPU actor is one process of single-threaded lanes; one
    single-threaded process per core is the layout it replaced, timed as the other way to fill the same cores.

    Each process (spawned fresh, with this process's environment and so the actors' allocator) loads the model and
    warms up every lane; they start timing together and the pool's rate is all their images over the window from
    the first start to the last end.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    members = [
        context.Process(target=_pool_member,
                        args=(model_uri, dtype, threads, lanes, pixels, warmup, iterations, barrier, results))
        for _ in range(processes)
    ]
    for member in members:
        member.start()
    reports = [results.get(timeout=3600) for _ in members]
    for member in members:
        member.join()
    window = max(report["ended"] for report in reports) - min(report["started"] for report in reports)
    images = processes * lanes * iterations * len(pixels)
    return {
        "processes": processes,
        "lanes": lanes,
        "torch_threads": threads,
        "batch_seconds": [lane for report in reports for lane in report["batch_seconds"]],
        "window_s": window,
        "images_per_s": images / window,
    }


def count_flops_per_image(actor: Any, pixels: torch.Tensor) -> float:
    """FLOPs of one image through predict (convolutions, matrix products, attention; a multiply-add is 2)."""
    from benchmarks.flops import measured_flops  # counts attention on a CPU too (math backend)
    from pipeline.infer import predict

    return measured_flops(
        lambda: predict(actor.model, actor.normalizer, pixels[:1], top_k=TOP_K), images=1, device_type=pixels.device.type
    )


def _batch_of(crops: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    return np.stack([crops[index % len(crops)] for index in range(batch_size)])


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
        fast = decode_pixels(image.data, processor, fast=True)
        exact = decode_pixels(image.data, processor, fast=False)
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
                assert result.topk_ids is not None  # top_k=1 asked for
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



def run(context: BenchmarkContext) -> dict[str, Any]:
    from pipeline.actor import InferenceSettings
    from pipeline.infer import BatchInference

    settings, shared = context.settings, context.shared
    actor_settings = InferenceSettings(
        model_uri=shared["model_uri"],
        task="classify",
        top_k=TOP_K,
        dtype=settings.dtype,
        device=settings.device,
        torch_threads=None if settings.device == "cuda" else settings.torch_threads,
    )
    threads_before = torch.get_num_threads()
    started = time.perf_counter()
    actor = BatchInference(actor_settings)
    synchronize(actor.device)
    actor_startup_s = time.perf_counter() - started
    processor, image_sets = shared["processor"], shared["image_sets"]
    crops = [decode_pixels(image.data, processor, fast=True) for images in image_sets.values() for image in images]
    pixels = torch.from_numpy(_batch_of(crops, settings.batch_size)).to(actor.device)
    cpu_started = time.process_time()
    with CpuLoadMonitor() as model_load:
        seconds = time_predict(actor, pixels, warmup=settings.warmup_batches, iterations=settings.timed_batches)
    # On a CPU, this process's CPU time over wall time: ~threads when it had its cores to itself.
    cpu_over_wall = (time.process_time() - cpu_started) / model_load.wall_s if model_load.wall_s else None
    torch_threads = torch.get_num_threads()
    flops = count_flops_per_image(actor, pixels)
    photos = shared["photos"]
    agreement_images = [image for images in image_sets.values() for image in images[: len(photos)]]
    context.shared["agreement"] = fast_exact_agreement(
        actor, processor, agreement_images, batch_size=min(settings.batch_size, 8)
    )
    del actor
    gc.collect()
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    torch.set_num_threads(threads_before)
    pool, processes, sizing = None, None, None
    if settings.device == "cpu":
        sizing = job_cpu_sizing(shared["model_uri"], node_cpus=settings.ray_cpus, dtype=settings.dtype,
                                batch_size=settings.batch_size)
        if sizing.calls_per_actor > 1 and settings.cpus_per_actor is None:
            layout = {"dtype": settings.dtype, "threads": sizing.torch_threads, "pixels": pixels.numpy(),
                      "warmup": settings.warmup_batches, "iterations": max(2, settings.timed_batches // 2)}
            # The job's actor (its lanes in one process), then the same cores as one process per lane.
            pool = time_cpu_pool(shared["model_uri"], processes=1, lanes=sizing.calls_per_actor, **layout)
            processes = time_cpu_pool(shared["model_uri"], processes=sizing.calls_per_actor, lanes=1, **layout)
    del pixels
    return {
        "config": context.results["inputs"]["config"],
        "image_size": context.results["inputs"]["image_size"],
        "device": settings.device,
        "dtype": settings.dtype,
        "torch_threads": torch_threads,
        "warmup_batches": settings.warmup_batches,
        "timed_batches": len(seconds),
        "batch_seconds": seconds,
        "images_per_s": settings.batch_size * len(seconds) / sum(seconds),
        "flops_per_image": flops,
        "actor_startup_s": actor_startup_s,
        "allocator": measured_allocator(),  # the CPU actors' GLIBC_TUNABLES when run as python -m jobs.benchmark
        "cpu_over_wall": cpu_over_wall if settings.device == "cpu" else None,
        "load": model_load.to_dict(),
        "checkpoint_location": settings.storage,
        "job_sizing": sizing.to_dict() if sizing is not None else None,  # CPU: pipeline.cpu.size_cpu_node, memory too
        "pool": pool,  # CPU: the job's actor, its single-threaded lanes computing at once (None: one lane)
        "processes": processes,  # CPU: the same cores as one single-threaded process each (None: one lane)
    }
