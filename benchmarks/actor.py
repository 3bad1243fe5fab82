"""What an inference actor costs besides the model, and how close it keeps the device to busy: ``python -m benchmarks.actor``.

Measured on the CPU, without a GPU, because both questions are about the host:

1. **Host overhead per image** with the model (and the normaliser, which runs on the device) replaced by a no-op,
   one torch thread, 384x384 crops at batch 256: everything :class:`pipeline.infer.BatchInference` does per call
   besides the device's work (picking the decoded rows, staging, the output table). Clean batches, batches with a
   tenth of their rows failed, and padded tail batches (the GPU path's fixed shapes) are timed separately.
2. **Throughput against a fixed-latency device**: a stand-in model of ``--latency-ms`` per batch (pipeline/standin.py)
   fed batches by ``CONCURRENT_CALLS`` threads, as Ray Data's actor pool calls it, compared with 1/latency. The same
   with one thread shows what the overlap buys.
3. **Compiled vs eager** (``--compile``): the real network at ``--compile-size`` through the actor, eager and with
   ``torch.compile``, padded to a fixed batch; compile time reported apart.
4. **Bytes per image between stages**: JPEG bytes in (ImageNet-size and 12-megapixel photos), decoded crops between
   decode and inference (Arrow IPC, what Ray's object store moves between nodes), result rows out; and what they
   mean for the network into an 8-GPU node.

Figures are printed beside the CPU's capabilities (model, cores usable, torch version); ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.measures import hardware_summary
from pipeline.config import NO_ERROR, NOT_LAST_ROW

logger = logging.getLogger(__name__)

IMAGE_SIZE = 384
TARGET_OVERHEAD_US = 50.0
TARGET_FRACTION = 0.90


# ---------------------------------------------------------------------------------------------------------- set-up


def write_config_checkpoint(folder: Path, image_size: int = IMAGE_SIZE, *, weights: bool = False) -> Path:
    """A vit-hybrid-base-bit-384-shaped checkpoint folder: configs only (enough for the stand-in), or with random
    weights for the compile measurement."""
    from model import ViTHybridForImageClassification, ViTHybridImageProcessor
    from model.configuration import vit_base_r50_s16_384_config

    grid = -(-image_size // 16)
    config = vit_base_r50_s16_384_config(image_size=image_size, backbone_featmap_shape=[1, 1024, grid, grid])
    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        ViTHybridForImageClassification(config).eval().save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    ViTHybridImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(str(folder))
    return folder


def make_batch(count: int, *, failed_every: int = 0, image_size: int = IMAGE_SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands the actor one: uint8 crops, keys, sources, ordinals, ``""`` errors, shard columns."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, image_size, image_size, 3), dtype=np.uint8)
    pixels.setflags(write=False)  # Arrow buffers arrive read-only
    errors = np.array(
        [f"decode error: JPEG (broken data stream) row {row}" if failed_every and row % failed_every == 1 else NO_ERROR
         for row in range(count)], dtype=object,
    )
    shard_rows = np.full(count, NOT_LAST_ROW, dtype=np.int64)
    return {
        "key": np.array([f"{seed:04d}/{row:08d}" for row in range(count)], dtype=object),
        "source": np.array([f"s3://bucket/shards/part-{seed:06d}.tar"] * count, dtype=object),
        "ordinal": np.arange(count, dtype=np.int64),
        "pixels": pixels,
        "error": errors,
        "shard_id": np.array([f"part-{seed:06d}"] * count, dtype=object),
        "shard_rows": shard_rows,
    }


class NoOpModel(torch.nn.Module):
    """Returns ready-made zero outputs of the real widths: the device's work costs nothing."""

    def __init__(self, config: Any, batch_size: int) -> None:
        super().__init__()
        self.config = config
        self._logits = torch.zeros(batch_size, max(config.num_labels, 1))
        self._embedding = torch.zeros(batch_size, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, **_: object) -> Any:
        from model.modeling import ImageClassifierOutput

        rows = pixel_values.shape[0]
        return ImageClassifierOutput(logits=self._logits[:rows], embedding=self._embedding[:rows])

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self(pixel_values).embedding


def build_actor(checkpoint: Path, *, latency_ms: float | None, batch_size: int, pad: bool = False, compile: bool = False,
                task: str = "classify", device: str = "cpu", dtype: str = "auto") -> Any:
    """An actor as the job builds it; with ``latency_ms`` the stand-in of that latency, without it the real model."""
    from pipeline.actor import InferenceSettings
    from pipeline.infer import BatchInference
    from pipeline.standin import ENVIRONMENT_VARIABLE

    previous = os.environ.get(ENVIRONMENT_VARIABLE)
    if latency_ms is None:
        os.environ.pop(ENVIRONMENT_VARIABLE, None)
    else:
        os.environ[ENVIRONMENT_VARIABLE] = str(latency_ms)
    try:
        return BatchInference(InferenceSettings(
            model_uri=str(checkpoint), task=task, top_k=5, device=device, dtype=dtype,
            torch_threads=torch.get_num_threads() if device == "cpu" else None,
            batch_size=batch_size, pad_to_batch=pad, compile=compile,
        ))
    finally:
        if previous is None:
            os.environ.pop(ENVIRONMENT_VARIABLE, None)
        else:
            os.environ[ENVIRONMENT_VARIABLE] = previous


# ------------------------------------------------------------------------------------------------------- measures


def _no_op_device(actor: Any, batch_size: int) -> None:
    actor.model = NoOpModel(actor.config, batch_size).to(actor.device)
    actor.normalizer = torch.nn.Identity()


def host_overhead(checkpoint: Path, *, batch_size: int, seconds: float, device: str = "cpu") -> dict[str, Any]:
    """Microseconds of host time per image with a no-op device, for clean, partly failed and padded batches."""
    cases = {
        "clean": {"count": batch_size, "failed_every": 0, "pad": False},
        "tenth_failed": {"count": batch_size, "failed_every": 10, "pad": False},
        "padded_tail": {"count": batch_size * 3 // 4, "failed_every": 0, "pad": True},
    }
    figures: dict[str, Any] = {}
    for name, case in cases.items():
        actor = build_actor(checkpoint, latency_ms=0, batch_size=batch_size, pad=bool(case["pad"]), device=device)
        _no_op_device(actor, batch_size)
        batches = [make_batch(int(case["count"]), failed_every=int(case["failed_every"]), seed=seed) for seed in range(2)]
        actor(batches[0])  # warm-up: staging buffers, first-call allocations
        per_image: list[float] = []
        cpu_per_image: list[float] = []
        deadline = time.perf_counter() + seconds
        index = 0
        while time.perf_counter() < deadline or len(per_image) < 5:
            batch = batches[index % 2]
            wall, cpu = time.perf_counter(), time.process_time()
            actor(batch)
            per_image.append((time.perf_counter() - wall) / len(batch["key"]) * 1e6)
            cpu_per_image.append((time.process_time() - cpu) / len(batch["key"]) * 1e6)
            index += 1
        figures[name] = {
            "us_per_image": statistics.median(per_image),
            "cpu_us_per_image": statistics.median(cpu_per_image),
            "calls": len(per_image),
            "rows_per_call": int(case["count"]),
        }
    # Where the clean-batch time goes.
    actor = build_actor(checkpoint, latency_ms=0, batch_size=batch_size, device=device)
    _no_op_device(actor, batch_size)
    batch = make_batch(batch_size)
    good = np.ones(batch_size, dtype=bool)
    errors: list[str | None] = [None] * batch_size
    parts: dict[str, list[float]] = {"prepare": [], "compute": [], "rows": []}
    for _ in range(max(5, figures["clean"]["calls"] // 2)):
        started = time.perf_counter()
        prepared = actor.prepare(batch["pixels"], good)
        after_prepare = time.perf_counter()
        result = actor.compute(prepared)
        after_compute = time.perf_counter()
        actor.rows(batch, errors, good, result)
        finished = time.perf_counter()
        if prepared.staging is not None:
            actor._staging.give_back(prepared.staging)
        parts["prepare"].append((after_prepare - started) / batch_size * 1e6)
        parts["compute"].append((after_compute - after_prepare) / batch_size * 1e6)
        parts["rows"].append((finished - after_compute) / batch_size * 1e6)
    figures["clean_breakdown_us_per_image"] = {name: statistics.median(values) for name, values in parts.items()}
    # The floor for any path that copies each crop once (CPU with failed rows or padding; every CUDA batch, into
    # page-locked memory): this machine's single-core memcpy of one batch.
    source = make_batch(batch_size)["pixels"]
    destination = np.empty_like(source)
    copies = []
    for _ in range(5):
        started = time.perf_counter()
        np.copyto(destination, source)
        copies.append((time.perf_counter() - started) / batch_size * 1e6)
    figures["one_copy_us_per_image"] = min(copies)
    figures["target_us_per_image"] = TARGET_OVERHEAD_US
    figures["meets_target"] = all(figures[name]["us_per_image"] <= TARGET_OVERHEAD_US for name in cases)
    return figures


def _run_calls(actor: Any, batches: list[dict[str, np.ndarray]], calls: int, threads: int) -> float:
    """Seconds for ``calls`` actor calls made by ``threads`` threads at once, the way Ray Data's pool calls it."""
    lock = threading.Lock()
    remaining = [calls]

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
                index = remaining[0]
            actor(batches[index % len(batches)])

    started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return time.perf_counter() - started


def stand_in_throughput(
    checkpoint: Path, *, batch_size: int, latency_ms: float, calls: int, device: str = "cpu"
) -> dict[str, Any]:
    """Images/s through one actor with a fixed-latency stand-in, against the bound batch_size / latency."""
    from pipeline.actor import CONCURRENT_CALLS

    actor = build_actor(checkpoint, latency_ms=latency_ms, batch_size=batch_size, device=device)
    batches = [make_batch(batch_size, failed_every=0, seed=seed) for seed in range(CONCURRENT_CALLS + 1)]
    _run_calls(actor, batches, CONCURRENT_CALLS, CONCURRENT_CALLS)  # warm-up
    bound = batch_size / (latency_ms / 1000.0)
    figures: dict[str, Any] = {"latency_ms": latency_ms, "batch_size": batch_size, "bound_images_per_s": bound}
    for name, threads in (("overlapped", CONCURRENT_CALLS), ("serial", 1)):
        seconds = _run_calls(actor, batches, calls, threads)
        rate = calls * batch_size / seconds
        figures[name] = {"threads": threads, "images_per_s": rate, "fraction_of_bound": rate / bound}
    figures["target_fraction"] = TARGET_FRACTION
    figures["meets_target"] = figures["overlapped"]["fraction_of_bound"] >= TARGET_FRACTION
    return figures


def real_model_through_actor(workdir: Path, *, batch_size: int, calls: int, device: str, dtype: str) -> dict[str, Any]:
    """The real network on ``device``: images/s of the model alone (pixels already on the device, back to back)
    against images/s through the actor fed host batches, concurrently and serially. The ratio is the device time
    the actor's host work does not hide."""
    from pipeline.actor import CONCURRENT_CALLS
    from pipeline.infer import predict

    checkpoint = write_config_checkpoint(workdir / "weights-384", IMAGE_SIZE, weights=True)
    actor = build_actor(checkpoint, latency_ms=None, batch_size=batch_size, pad=True, device=device, dtype=dtype)
    batches = [make_batch(batch_size, seed=seed) for seed in range(CONCURRENT_CALLS + 1)]
    on_device = torch.from_numpy(np.array(batches[0]["pixels"])).to(actor.device)
    synchronize = torch.cuda.synchronize if actor.device.type == "cuda" else (lambda: None)
    for _ in range(3):
        predict(actor.model, actor.normalizer, on_device, top_k=5)
    synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        predict(actor.model, actor.normalizer, on_device, top_k=5)  # .cpu() of the results waits for the device
    model_only = calls * batch_size / (time.perf_counter() - started)
    figures: dict[str, Any] = {"batch_size": batch_size, "dtype": str(actor.dtype), "device": str(actor.device),
                               "model_only_images_per_s": model_only}
    _run_calls(actor, batches, CONCURRENT_CALLS, CONCURRENT_CALLS)  # warm-up
    for name, threads in (("overlapped", CONCURRENT_CALLS), ("serial", 1)):
        seconds = _run_calls(actor, batches, calls, threads)
        rate = calls * batch_size / seconds
        figures[name] = {"threads": threads, "images_per_s": rate, "fraction_of_model_only": rate / model_only}
    return figures


def device_parity(workdir: Path, *, batch_size: int, device: str) -> dict[str, Any]:
    """The actor on ``device`` in float32 (padding, failed rows, two concurrent calls) against the same rows run
    through the model on the CPU: the GPU path's staging, copy stream and padding must not change a result."""
    from model import ViTHybridForImageClassification, ViTHybridImageProcessor
    from pipeline.actor import CONCURRENT_CALLS

    checkpoint = write_config_checkpoint(workdir / "weights-384", IMAGE_SIZE, weights=True)
    actor = build_actor(checkpoint, latency_ms=None, batch_size=batch_size, pad=True, device=device, dtype="float32")
    batches = [make_batch(max(2, batch_size - 3 * seed), failed_every=3 if seed % 2 else 0, seed=seed) for seed in range(4)]
    results: dict[int, Any] = {}

    def call(index: int) -> None:
        results[index] = actor(batches[index])

    for start in range(0, len(batches), CONCURRENT_CALLS):
        threads = [threading.Thread(target=call, args=(index,)) for index in range(start, start + CONCURRENT_CALLS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    model = ViTHybridForImageClassification.from_pretrained(str(checkpoint)).eval()
    normalizer = ViTHybridImageProcessor.from_pretrained(str(checkpoint)).normalizer()
    worst, agree, rows = 0.0, 0, 0
    for index, batch in enumerate(batches):
        good = np.array([error == NO_ERROR for error in batch["error"]])
        with torch.inference_mode():
            expected = model(normalizer(torch.from_numpy(np.array(batch["pixels"][good])))).embedding.numpy()
        table = results[index]
        assert table.column("key").to_pylist() == list(batch["key"]), "rows came back out of order"
        got = np.array([row for row in table.column("embedding").to_pylist() if row is not None])
        worst = max(worst, float(np.abs(got - expected).max()))
        cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        agree += int((cosine > 0.999).sum())
        rows += len(got)
    return {"device": str(actor.device), "rows": rows, "max_embedding_difference": worst,
            "rows_with_cosine_above_0.999": agree, "tf32_conv": torch.backends.cudnn.allow_tf32}


def _ipc_bytes(table: Any) -> int:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().size


def measure_wire_bytes(checkpoint: Path, *, images_per_s_per_gpu: float = 3000.0, gpus_per_node: int = 8) -> dict[str, Any]:
    """Bytes per image at each stage boundary, measured on real encodings of the benchmark photographs."""
    import pyarrow as pa

    from benchmarks.measures import IMAGENET, PHONE, build_image_set, sample_photographs
    from model import ViTHybridImageProcessor
    from pipeline.decode import decode_batch

    photos = sample_photographs()
    processor = ViTHybridImageProcessor.from_pretrained(str(checkpoint))
    figures: dict[str, Any] = {"images_per_s_per_gpu": images_per_s_per_gpu, "gpus_per_node": gpus_per_node}
    for kind, count in ((IMAGENET, 2 * len(photos)), (PHONE, 4)):
        images = build_image_set(kind, photos, count=count)
        figures[f"jpeg_{kind.name}_bytes"] = float(np.mean([len(image.data) for image in images]))
        if kind is IMAGENET:
            table = pa.table({
                "key": [f"k{index}" for index in range(count)], "source": ["s3://bucket/part-000000.tar"] * count,
                "data": [image.data for image in images], "ordinal": list(range(count)),
            })
            figures["bytes_rows_imagenet_bytes"] = _ipc_bytes(table) / count
            decoded = decode_batch(table, processor=processor, fast=True)
            crops = pa.table({
                "key": decoded["key"].tolist(), "source": decoded["source"].tolist(),
                "pixels": pa.FixedShapeTensorArray.from_numpy_ndarray(decoded["pixels"]),
                "error": [NO_ERROR] * count, "ordinal": list(range(count)),
            })
            figures["crop_bytes"] = _ipc_bytes(crops) / count
    actor = build_actor(checkpoint, latency_ms=0, batch_size=64)
    results = actor(make_batch(64))
    figures["result_row_bytes"] = _ipc_bytes(results) / 64
    figures["crop_over_jpeg_imagenet"] = figures["crop_bytes"] / figures["jpeg_imagenet_bytes"]
    node_rate = images_per_s_per_gpu * gpus_per_node
    figures["gbit_per_s_into_node_crops"] = figures["crop_bytes"] * node_rate * 8 / 1e9
    figures["gbit_per_s_into_node_jpeg_imagenet"] = figures["bytes_rows_imagenet_bytes"] * node_rate * 8 / 1e9
    figures["gbit_per_s_into_node_jpeg_phone"] = figures["jpeg_phone_bytes"] * node_rate * 8 / 1e9
    return figures


def format_wire_report(wire: dict[str, Any]) -> list[str]:
    return [
        "bytes per image between stages (Arrow IPC as Ray moves it):",
        (f"  JPEG in: ImageNet-size {wire['jpeg_imagenet_bytes'] / 1e3:.0f} kB ({wire['bytes_rows_imagenet_bytes'] / 1e3:.0f} kB "
        f"as a row), 12-megapixel {wire['jpeg_phone_bytes'] / 1e6:.2f} MB"),
        (f"  decoded crop, decode -> inference: {wire['crop_bytes'] / 1e3:.0f} kB = {wire['crop_over_jpeg_imagenet']:.1f}x "
        "the ImageNet-size JPEG"),
        f"  result row out: {wire['result_row_bytes'] / 1e3:.2f} kB",
        (f"  into one {wire['gpus_per_node']}-GPU node at {wire['images_per_s_per_gpu']:.0f} images/s per GPU: crops "
        f"{wire['gbit_per_s_into_node_crops']:.0f} Gbit/s; JPEGs {wire['gbit_per_s_into_node_jpeg_imagenet']:.0f} Gbit/s "
        f"(ImageNet-size) to {wire['gbit_per_s_into_node_jpeg_phone']:.0f} Gbit/s (12 MP)"),
    ]


def compiled_vs_eager(
    workdir: Path, *, image_size: int, batch_size: int, iterations: int, device: str = "cpu", dtype: str = "auto"
) -> dict[str, Any]:
    """Images/s of the real network through the actor, eager and torch.compile'd (both padded to batch_size)."""
    checkpoint = write_config_checkpoint(workdir / f"weights-{image_size}", image_size, weights=True)
    figures: dict[str, Any] = {"image_size": image_size, "batch_size": batch_size, "iterations": iterations}
    batch = make_batch(batch_size, image_size=image_size)
    outputs = {}
    for name, compile in (("eager", False), ("compiled", True)):
        try:
            actor = build_actor(checkpoint, latency_ms=None, batch_size=batch_size, pad=True, compile=compile,
                                device=device, dtype=dtype)
            started = time.perf_counter()
            outputs[name] = actor(batch)  # the first call compiles
            first_call_s = time.perf_counter() - started
            seconds = []
            for _ in range(iterations):
                started = time.perf_counter()
                actor(batch)
                seconds.append(time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 - a missing compiler toolchain is a figure to report, not a crash
            figures[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        figures[name] = {"images_per_s": batch_size / statistics.median(seconds), "first_call_s": first_call_s}
    if "images_per_s" in figures.get("compiled", {}) and "images_per_s" in figures.get("eager", {}):
        figures["speedup"] = figures["compiled"]["images_per_s"] / figures["eager"]["images_per_s"]
        eager = np.array(outputs["eager"].column("embedding").to_pylist())
        compiled = np.array(outputs["compiled"].column("embedding").to_pylist())
        figures["max_embedding_difference"] = float(np.abs(eager - compiled).max())
        figures["top1_agreement"] = float(np.mean(
            np.array(outputs["eager"].column("label_id").to_pylist()) == np.array(outputs["compiled"].column("label_id").to_pylist())
        ))
    return figures


# --------------------------------------------------------------------------------------------------------- report


def format_report(results: dict[str, Any]) -> str:
    hardware = results["hardware"]
    lines = [
        (f"CPU: {hardware['cpu_model']}, {hardware['cpu_cores_usable']} of {hardware['cpu_cores']} cores usable; "
         f"torch {hardware['torch']} with {results['torch_threads']} thread(s); GPU: {hardware['gpu'] or 'none'}; "
         f"load average {results['load_average']}"),
    ]
    overhead = results.get("host_overhead")
    if overhead:
        lines.append(f"host overhead per {IMAGE_SIZE}x{IMAGE_SIZE} image, no-op device, batch {results['batch_size']} "
                     f"(target <= {TARGET_OVERHEAD_US:.0f} us):")
        for name in ("clean", "tenth_failed", "padded_tail"):
            figure = overhead[name]
            lines.append(f"  {name:<14} {figure['us_per_image']:7.1f} us wall  {figure['cpu_us_per_image']:7.1f} us CPU  "
                         f"({figure['rows_per_call']} rows per call, {figure['calls']} calls)")
        parts = overhead["clean_breakdown_us_per_image"]
        lines.append("  clean, by part: " + ", ".join(f"{name} {value:.1f} us" for name, value in parts.items()))
        lines.append(f"  one memcpy of a crop on this machine: {overhead['one_copy_us_per_image']:.1f} us (the floor "
                     "for paths that copy: failed rows, padding, CUDA's page-locked staging)")
        lines.append(f"  meets target (wall, every case): {overhead['meets_target']}")
    throughput = results.get("stand_in")
    if throughput:
        lines.append(f"stand-in of {throughput['latency_ms']:.0f} ms per batch of {throughput['batch_size']}: bound "
                     f"{throughput['bound_images_per_s']:.0f} images/s (target >= {TARGET_FRACTION:.0%})")
        for name in ("overlapped", "serial"):
            figure = throughput[name]
            lines.append(f"  {name:<10} ({figure['threads']} concurrent calls) {figure['images_per_s']:8.1f} images/s "
                         f"= {figure['fraction_of_bound']:.1%} of the bound")
        lines.append(f"  meets target: {throughput['meets_target']}")
    parity = results.get("parity")
    if parity:
        lines.append(f"actor on {parity['device']} (fp32, padded, failed rows, concurrent calls) vs CPU model: max |embedding "
                     f"difference| {parity['max_embedding_difference']:.2e}, {parity['rows_with_cosine_above_0.999']} of "
                     f"{parity['rows']} rows with cosine > 0.999 (cuDNN TF32 {parity['tf32_conv']})")
    real = results.get("real_model")
    if real:
        lines.append(f"real network on {real['device']} in {real['dtype']}, batch {real['batch_size']}: model alone "
                     f"{real['model_only_images_per_s']:.1f} images/s")
        for name in ("overlapped", "serial"):
            figure = real[name]
            lines.append(f"  through the actor, {name:<10} ({figure['threads']} concurrent calls) "
                         f"{figure['images_per_s']:8.1f} images/s = {figure['fraction_of_model_only']:.1%} of the model alone")
    compiled = results.get("compile")
    if compiled:
        lines.append(f"torch.compile vs eager, real network at {compiled['image_size']}px, batch {compiled['batch_size']}:")
        for name in ("eager", "compiled"):
            figure = compiled.get(name, {})
            if "error" in figure:
                lines.append(f"  {name:<9} failed: {figure['error']}")
            elif figure:
                lines.append(f"  {name:<9} {figure['images_per_s']:8.3f} images/s (first call {figure['first_call_s']:.1f} s)")
        if "speedup" in compiled:
            lines.append(f"  compiled / eager = {compiled['speedup']:.3f}x; max |embedding difference| "
                         f"{compiled['max_embedding_difference']:.2e}")
    wire = results.get("wire")
    if wire:
        lines.extend(format_wire_report(wire))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256, help="images per actor call")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="stand-in latency per batch")
    parser.add_argument("--calls", type=int, default=30, help="actor calls timed with the stand-in")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds spent on each host-overhead case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the overhead target is for one core)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the actor's device half runs")
    parser.add_argument("--dtype", default="auto", help="compute dtype for the real-network measures")
    parser.add_argument("--real-model", action="store_true",
                        help="also time the real network alone vs through the actor (meant for --device cuda)")
    parser.add_argument("--parity", action="store_true", help="check the actor on --device against the CPU model")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile against eager (slow on a CPU)")
    parser.add_argument("--compile-size", type=int, default=IMAGE_SIZE, help="image size for the compile comparison")
    parser.add_argument("--compile-batch-size", type=int, default=2)
    parser.add_argument("--compile-iterations", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=("overhead", "stand-in", "wire"), help="parts to skip")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    results: dict[str, Any] = {"hardware": hardware_summary(), "torch_threads": torch.get_num_threads(),
                               "batch_size": args.batch_size, "device": args.device,
                               # Wall times mean little on a machine other work keeps busy: say how busy it was.
                               "load_average": ", ".join(f"{value:.1f}" for value in os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="benchmark-actor-") as workdir:
        checkpoint = write_config_checkpoint(Path(workdir) / "config-only")
        if "overhead" not in args.skip:
            results["host_overhead"] = host_overhead(
                checkpoint, batch_size=args.batch_size, seconds=args.seconds, device=args.device
            )
        if "stand-in" not in args.skip:
            results["stand_in"] = stand_in_throughput(
                checkpoint, batch_size=args.batch_size, latency_ms=args.latency_ms, calls=args.calls, device=args.device
            )
        if "wire" not in args.skip:
            results["wire"] = measure_wire_bytes(checkpoint)
        if args.parity:
            results["parity"] = device_parity(Path(workdir), batch_size=min(args.batch_size, 32), device=args.device)
        if args.real_model:
            results["real_model"] = real_model_through_actor(
                Path(workdir), batch_size=args.batch_size, calls=args.calls, device=args.device, dtype=args.dtype
            )
        if args.compile:
            results["compile"] = compiled_vs_eager(
                Path(workdir), image_size=args.compile_size, batch_size=args.compile_batch_size,
                iterations=args.compile_iterations, device=args.device, dtype=args.dtype,
            )
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
