"""The first measurement on a GPU, as one command that writes one JSON (``scripts/gpu_check.sh`` runs it).

    python -m jobs.gpu_check --out gpu_check.json            # on a GPU machine: ~1 min start-up + < 6 min
    python -m jobs.gpu_check --dry-run --out /tmp/check.json  # tiny config on the CPU, seconds (CI runs this)

Why it is built the way it is. A GPU is lent to this project rarely, for minutes, with no second try, on a machine
that has torch, numpy, pyarrow, pillow, safetensors, fsspec and scikit-image but no Ray, no s3fs and a transformers
that no longer ships ViT Hybrid. So:

* nothing heavy is imported at module level, Ray not at all unless present: the end-to-end section runs the real
  job (``pipeline.plan.run_job``) where Ray exists, and otherwise the job's own stages in-process -- read shards ->
  decode on a thread pool -> ``InferenceActor.__call__`` -> output table -> shard commit (Parquet) -- and says so
  (``"ray": false``);
* every section runs in its own ``try``; a failure is recorded (type, message, the end of the traceback) and the next
  section still runs; the JSON is rewritten after every section, so a timeout loses only the section it hit;
* ``torch.compile`` runs in a child process under a hard time budget (a compile can take minutes), writing its
  figures after each batch size: a slow compile costs its own figures and nothing else;
* weights are random (no network), variance-preserving, so logits differ per image; inputs are scikit-image's real
  photographs (synthetic pictures where it is missing, recorded in the JSON).

Sections (keys of the JSON): ``environment`` (device, SM count, memory, bf16/TF32 support, torch/CUDA/cuDNN
versions), ``flops`` (per image: analytic vs measured on the device and on the CPU), ``layout`` (channels-last kept
stage by stage), ``parity`` (bf16 vs fp32 on the device: logits, embedding cosine, top-1; also TF32, the old
bf16 weight standardisation, and the CPU), ``throughput`` (model-only images/s and MFU at batch 64/128/256 in bf16,
eager; channels-last A/B), ``compiled`` (the same, ``torch.compile``), ``end_to_end`` (images/s through the job on
local WebDataset shards). ``summary`` is the short human report, also printed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import logging
import os
import platform
import queue
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger("jobs.gpu_check")

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP_K = 5


@dataclass(frozen=True)
class CheckSettings:
    """What one run measures; built once from the command line (``--dry-run`` shrinks everything)."""

    out: str
    dry_run: bool = False
    device: str = "cuda"
    image_size: int = 384
    batch_sizes: tuple[int, ...] = (64, 128, 256)
    warmup_batches: int = 3
    timed_batches: int = 10
    parity_images: int = 32
    compile: bool = True
    compile_backend: str = "inductor"
    compile_budget_s: float = 200.0
    total_budget_s: float = 420.0  # the compile child gets at most what is left of this when it starts
    e2e_images: int = 8192
    e2e_images_per_shard: int = 256
    e2e_batch_size: int = 256
    e2e_mode: str = "auto"  # auto (Ray if importable), ray, inprocess
    decode_threads: int = 0  # 0: one per CPU core but one (the main thread feeds the GPU)
    seed: int = 0

    @property
    def dtype_name(self) -> str:
        return "bfloat16"


def dry_run_settings(out: str, **overrides: Any) -> CheckSettings:
    """Tiny config on the CPU: every section runs, in seconds; ``backend="eager"`` exercises dynamo without codegen."""
    settings = CheckSettings(
        out=out, dry_run=True, device="cpu", image_size=32, batch_sizes=(2, 4), warmup_batches=1, timed_batches=1,
        parity_images=8, compile=True, compile_backend="eager", compile_budget_s=120.0, e2e_images=24,
        e2e_images_per_shard=8, e2e_batch_size=4, e2e_mode="inprocess", decode_threads=2,
    )
    return replace(settings, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# The report: one JSON, rewritten after each section.


class Report:
    """The JSON being built; :meth:`section` runs one part, records its result or its error, and saves.

    On SIGTERM (the wrapper's time cap) the section in progress is recorded as cut short before the process exits, so
    the JSON says where the time ran out.
    """

    def __init__(self, path: str, settings: CheckSettings) -> None:
        self.current: tuple[str, float] | None = None
        self.path = Path(path)
        self.data: dict[str, Any] = {
            "tool": "jobs.gpu_check",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": asdict(settings),
            "sections": {},
        }
        self.started = time.monotonic()
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=_json_default) + "\n")
        os.replace(temporary, self.path)  # a reader (or a kill) never sees half a file

    def remaining_s(self, budget_s: float) -> float:
        return budget_s - (time.monotonic() - self.started)

    def on_terminate(self, signum: int, _frame: Any) -> None:
        if self.current is not None:
            name, started = self.current
            self.data["sections"][name] = {
                "status": "error",
                "error": f"terminated by signal {signum} (the time cap) {time.monotonic() - started:.1f} s into the section",
                "seconds": round(time.monotonic() - started, 2),
            }
        self.data["terminated"] = True
        self.save()
        os._exit(128 + signum)

    def section(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        logger.info("section %s ...", name)
        started = time.monotonic()
        self.current = (name, started)
        entry: dict[str, Any]
        result = None
        try:
            result = run()
            entry = {"status": "ok", **result}
        except Exception as error:
            logger.exception("section %s failed", name)
            entry = {
                "status": "error",
                "error": f"{type(error).__name__}: {error}"[:2000],
                "traceback": traceback.format_exc().splitlines()[-25:],
            }
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.data["sections"][name] = entry
        self.current = None
        self.save()
        logger.info("section %s: %s in %.1f s", name, entry["status"], entry["seconds"])
        return result


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces.


def _torch() -> Any:
    import torch

    return torch


def _synchronize(device: Any) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_config(settings: CheckSettings) -> Any:
    """google/vit-hybrid-base-bit-384's architecture (or, for the dry run, a tiny one) at the settings' size."""
    from jobs.benchmark_model import benchmark_config

    return benchmark_config(settings.image_size, quick=settings.dry_run)


def build_model(settings: CheckSettings) -> Any:
    """float32 model with random variance-preserving weights, on the CPU, in eval mode."""
    from jobs.benchmark_model import randomize_weights
    from model.modeling import ViTHybridForImageClassification

    torch = _torch()
    torch.manual_seed(settings.seed)
    model = ViTHybridForImageClassification(build_config(settings))
    randomize_weights(model, settings.seed)
    return model.eval()


def build_processor(settings: CheckSettings) -> Any:
    from model.processing import ViTHybridImageProcessor

    return ViTHybridImageProcessor(
        size={"shortest_edge": settings.image_size},
        crop_size={"height": settings.image_size, "width": settings.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def load_photographs() -> tuple[list[tuple[str, Any]], str]:
    """scikit-image's sample photographs, each loaded on its own (a missing one is skipped: no network there);
    synthetic pictures when none loads. Returns the photos and where they came from, for the report."""
    from benchmarks.measures import PHOTO_NAMES
    from fixtures.photos import synthetic_picture

    photos = []
    data: Any = None
    try:
        from skimage import data
    except ImportError:
        logger.warning("scikit-image is not installed: synthetic pictures instead of photographs")
    for name in PHOTO_NAMES if data is not None else ():
        try:
            photo = _as_rgb(getattr(data, name)())
        except Exception as error:  # noqa: BLE001 - a photo that will not load is skipped, and said so
            logger.warning("scikit-image photo %s: %s", name, error)
            continue
        if photo is not None:
            photos.append((name, photo))
    if photos:
        return photos, "scikit-image: " + ", ".join(name for name, _ in photos)
    return [(f"synthetic-{index}", synthetic_picture(index)) for index in range(4)], "synthetic (no scikit-image photos)"


def _as_rgb(photo: Any) -> Any:
    import numpy as np

    array = np.asarray(photo)
    return array if array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8 else None


def photographs(count: int, seed: int) -> tuple[list[Any], str]:
    """``count`` PIL images from the sample photographs (the originals, then crops and flips), and their origin."""
    import numpy as np
    from PIL import Image

    from fixtures.photos import random_crop

    photos, origin = load_photographs()
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        _, photo = photos[index % len(photos)]
        image = Image.fromarray(photo)
        images.append(random_crop(image, rng) if index >= len(photos) else image)  # the originals, then variants
    return images, origin


def peak_tflops(device_name: str | None, dtype: str) -> float | None:
    from benchmarks.measures import peak_tflops_for

    return peak_tflops_for(device_name, dtype)


def device_name(settings: CheckSettings) -> str | None:
    torch = _torch()
    if settings.device == "cuda" and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return None


def time_forward(run: Callable[[], Any], device: Any, *, warmup: int, iterations: int) -> list[float]:
    """Seconds per call of ``run`` after ``warmup`` calls; CUDA events on a GPU, wall clock on a CPU."""
    torch = _torch()
    for _ in range(warmup):
        run()
    _synchronize(device)
    seconds = []
    for _ in range(iterations):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
    return seconds


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Sections.


def section_environment(settings: CheckSettings) -> dict[str, Any]:
    torch = _torch()
    from model.numerics import current_backend_flags

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "device_requested": settings.device,
        "packages": {
            name: _version_of(name)
            for name in (
                "numpy", "pyarrow", "pillow", "safetensors", "fsspec", "scikit-image", "transformers", "timm", "ray",
            )
        },
        "ray": has_ray(),
        "backend_flags_at_start": current_backend_flags(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        capability = (properties.major, properties.minor)
        name = properties.name
        info.update({
            "device_name": name,
            "device_count": torch.cuda.device_count(),
            "compute_capability": f"{capability[0]}.{capability[1]}",
            "sm_count": properties.multi_processor_count,
            "memory_gib": round(properties.total_memory / 2**30, 2),
            "bf16_supported": bool(torch.cuda.is_bf16_supported()),
            "tf32_supported": capability >= (8, 0),
            "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
            "peak_tflops": {dtype: peak_tflops(name, dtype) for dtype in ("bfloat16", "float32")},
        })
        l2 = getattr(properties, "L2_cache_size", None)
        if l2:
            info["l2_cache_mib"] = round(l2 / 2**20, 1)
        info["matmul_bf16_tflops_measured"] = measure_matmul_tflops()
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False)")
    return info


def measure_matmul_tflops(size: int = 8192, iterations: int = 10) -> float:
    """What this GPU really does on a large bf16 matrix product (the ceiling MFU is judged against in practice)."""
    torch = _torch()
    left = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    right = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    seconds = time_forward(lambda: left @ right, "cuda", warmup=3, iterations=iterations)
    return 2.0 * size**3 / _median(seconds) / 1e12


def has_ray() -> bool:
    """Whether Ray can be imported here (found, not imported: importing it takes seconds)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


def _version_of(distribution: str) -> str | None:
    """The installed version of a distribution, without importing it (transformers or Ray take seconds to import)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def section_flops(settings: CheckSettings, model: Any) -> dict[str, Any]:
    from benchmarks.flops import analytic_flops, model_flops_per_image
    from jobs.benchmark_model import random_pixel_values

    torch = _torch()
    analytic = analytic_flops(model.config)
    pixels = random_pixel_values(2, settings.image_size, settings.seed + 3)
    result: dict[str, Any] = {"analytic": analytic.to_dict(), "analytic_gflops": analytic.total / 1e9}
    cpu_count = model_flops_per_image(model, pixels)
    result["measured_cpu_math_attention_gflops"] = cpu_count / 1e9
    result["cpu_over_analytic"] = cpu_count / analytic.total
    if settings.device == "cuda":
        device_model = copy.deepcopy(model).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
        device_count = model_flops_per_image(device_model, pixels.to("cuda", torch.bfloat16))
        result["measured_cuda_gflops"] = device_count / 1e9
        result["cuda_over_analytic"] = device_count / analytic.total
        del device_model
    return result


def section_layout(settings: CheckSettings, model: Any) -> dict[str, Any]:
    """Memory format after the stem and after each stage, with the GroupNorm fix on and off."""
    from jobs.benchmark_model import random_pixel_values
    from model.modeling import BitGroupNormActivation

    torch = _torch()
    dtype = torch.bfloat16 if settings.device == "cuda" else torch.float32
    device_model = copy.deepcopy(model).to(settings.device, dtype).to(memory_format=torch.channels_last)
    pixels = random_pixel_values(2, settings.image_size, settings.seed + 4).to(settings.device, dtype)
    result: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
    for keep in (True, False):
        BitGroupNormActivation.keep_channels_last = keep
        try:
            result["keep_channels_last" if keep else "without_fix"] = stage_layouts(device_model, pixels)
        finally:
            BitGroupNormActivation.keep_channels_last = True
    result["channels_last_through_backbone"] = all(
        entry["channels_last"] for entry in result["keep_channels_last"].values()
    )
    return result


def stage_layouts(model: Any, pixel_values: Any) -> dict[str, dict[str, Any]]:
    """For the stem and every backbone stage that runs: output shape, strides, whether it is channels-last."""
    torch = _torch()
    bit = model.vit.embeddings.patch_embeddings.backbone.bit
    out_stage_index = model.vit.embeddings.patch_embeddings.backbone.out_stage_index
    modules = {"stem": bit.embedder}
    for index, stage in enumerate(bit.encoder.stages[:out_stage_index]):
        modules[f"stage{index + 1}"] = stage
    seen: dict[str, dict[str, Any]] = {}
    handles = []
    for name, module in modules.items():
        def hook(_module: Any, _inputs: Any, output: Any, name: str = name) -> None:
            seen[name] = {
                "shape": list(output.shape),
                "stride": list(output.stride()),
                "channels_last": bool(output.is_contiguous(memory_format=torch.channels_last)),
            }
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _compare(reference: Any, other: Any) -> dict[str, Any]:
    """Logit and embedding agreement of two ``(logits, embedding)`` pairs (float32 on the CPU)."""
    torch = _torch()
    ref_logits, ref_embedding = (tensor.float().cpu() for tensor in reference)
    logits, embedding = (tensor.float().cpu() for tensor in other)
    cosine = torch.nn.functional.cosine_similarity(embedding, ref_embedding, dim=-1)
    return {
        "max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
        "mean_abs_logit_diff": (logits - ref_logits).abs().mean().item(),
        "logit_scale": ref_logits.abs().mean().item(),
        "embedding_cosine_min": cosine.min().item(),
        "embedding_cosine_mean": cosine.mean().item(),
        "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        "top5_overlap": _topk_overlap(logits, ref_logits, 5),
    }


def _topk_overlap(logits: Any, reference: Any, k: int) -> float:
    k = min(k, logits.shape[-1])
    ours = logits.topk(k, dim=-1).indices.tolist()
    theirs = reference.topk(k, dim=-1).indices.tolist()
    return sum(len(set(a) & set(b)) for a, b in zip(ours, theirs)) / (k * len(ours))


def section_parity(settings: CheckSettings, model: Any) -> dict[str, Any]:
    """bf16 vs fp32 on the device, on real photographs; fp32 with TF32; bf16 standardised the old way; the CPU."""
    from model.modeling import WeightStandardizedConv2d
    from model.numerics import numerics_policy

    torch = _torch()
    images, origin = photographs(settings.parity_images, settings.seed)
    processor = build_processor(settings)
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    device = settings.device

    def run(variant: Any, *, tf32: bool = False) -> tuple[Any, Any]:
        numerics_policy("float32", allow_tf32=tf32).apply()
        try:
            with torch.inference_mode():
                inputs = pixel_values.to(device, next(variant.parameters()).dtype)
                output = variant(inputs)
                return output.logits.float().cpu(), output.embedding.float().cpu()
        finally:
            numerics_policy("float32").apply()

    fp32 = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)
    reference = run(fp32)
    result: dict[str, Any] = {"images": len(images), "images_from": origin, "reference": f"float32 on {device}, TF32 off"}
    bf16 = copy.deepcopy(model).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    result["bfloat16"] = _compare(reference, run(bf16))
    # The rule before the numerics policy: standardise weights already rounded to bf16.
    for module in bf16.modules():
        if isinstance(module, WeightStandardizedConv2d):
            module.clear_weight_cache()
    result["bfloat16_standardized_after_cast"] = _compare(reference, run(bf16))
    del bf16
    if device == "cuda":
        result["float32_tf32"] = _compare(reference, run(fp32, tf32=True))
        cpu_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            output = cpu_model(pixel_values)
        result["cpu_float32"] = _compare(reference, (output.logits, output.embedding))
        del cpu_model
    del fp32
    return result


def section_throughput(settings: CheckSettings, model: Any, flops_per_image: float) -> dict[str, Any]:
    """Model-only images/s and MFU, bf16, eager, per batch size; then the GroupNorm layout fix off, largest batch."""
    from model.modeling import BitGroupNormActivation
    from model.numerics import numerics_policy

    torch = _torch()
    dtype = torch.bfloat16
    numerics_policy("bfloat16").apply()
    device_model = copy.deepcopy(model).to(settings.device, dtype).to(memory_format=torch.channels_last)
    name = device_name(settings)
    peak = peak_tflops(name, "bfloat16")
    rows: dict[str, Any] = {}
    for batch in settings.batch_sizes:
        rows[str(batch)] = _measure_batch(settings, device_model, batch, dtype, flops_per_image, peak)
    largest = max(settings.batch_sizes)
    BitGroupNormActivation.keep_channels_last = False
    try:
        without = _measure_batch(settings, device_model, largest, dtype, flops_per_image, peak)
    finally:
        BitGroupNormActivation.keep_channels_last = True
    del device_model
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "dtype": "bfloat16",
        "mode": "eager",
        "device_name": name,
        "peak_tflops": peak,
        "flops_per_image": flops_per_image,
        "batches": rows,
        "without_channels_last_fix": {"batch": largest, **without},
        "channels_last_fix_speedup": rows[str(largest)]["images_per_s"] / without["images_per_s"],
    }


def _measure_batch(
    settings: CheckSettings, model: Any, batch: int, dtype: Any, flops_per_image: float, peak: float | None
) -> dict[str, Any]:
    from benchmarks.measures import model_flop_utilisation
    from jobs.benchmark_model import random_pixel_values

    torch = _torch()
    pixels = random_pixel_values(batch, settings.image_size, settings.seed + batch).to(settings.device, dtype)
    if settings.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        seconds = time_forward(
            lambda: model(pixels), settings.device, warmup=settings.warmup_batches, iterations=settings.timed_batches
        )
    median = _median(seconds)
    images_per_s = batch / median
    row = {
        "median_s": median,
        "best_s": min(seconds),
        "images_per_s": images_per_s,
        "mfu": model_flop_utilisation(flops_per_image, images_per_s, peak, gpus=1),
        "timed_batches": len(seconds),
    }
    if settings.device == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def section_compiled(settings: CheckSettings, flops_per_image: float, budget_s: float | None = None) -> dict[str, Any]:
    """``torch.compile`` figures from a child process under a hard budget (see :func:`compiled_child`)."""
    if not settings.compile:
        return {"skipped": "--no-compile"}
    budget_s = settings.compile_budget_s if budget_s is None else min(budget_s, settings.compile_budget_s)
    if budget_s < 30:
        raise RuntimeError(f"only {budget_s:.0f} s of the run's budget left: torch.compile not attempted")
    with tempfile.TemporaryDirectory(prefix="gpu-check-compile-") as folder:
        partial = Path(folder) / "compiled.json"
        command = [
            sys.executable, "-m", "jobs.gpu_check", "--compiled-child", str(partial),
            "--settings-json", json.dumps(asdict(settings)), "--flops-per-image", repr(flops_per_image),
        ]
        from fixtures.checkout import checkout_python_path

        environment = {**os.environ, "PYTHONPATH": checkout_python_path()}
        started = time.monotonic()
        timed_out = False
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        try:
            output, _ = process.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.kill()
            output, _ = process.communicate()
        result: dict[str, Any] = json.loads(partial.read_text()) if partial.exists() else {}
        result.update({
            "budget_s": round(budget_s, 1),
            "wall_s": round(time.monotonic() - started, 1),
            "timed_out": timed_out,
            "child_exit_code": process.returncode,
        })
        if timed_out or process.returncode != 0:
            result["child_output_tail"] = (output or "").splitlines()[-30:]
        if not result.get("batches"):
            raise RuntimeError(
                f"torch.compile measured nothing (exit code {process.returncode}, timed out: {timed_out}); "
                f"output: {' | '.join((output or '').splitlines()[-8:])}"
            )
        return result


def compiled_child(settings: CheckSettings, flops_per_image: float, out: Path) -> None:
    """The child of :func:`section_compiled`: compile, then measure the largest batch first (the job's default)."""
    torch = _torch()
    from model.numerics import numerics_policy

    numerics_policy("bfloat16").apply()
    model = build_model(settings).to(settings.device, torch.bfloat16).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend=settings.compile_backend, dynamic=False)
    name = device_name(settings)
    peak = peak_tflops(name, "bfloat16")
    result: dict[str, Any] = {
        "dtype": "bfloat16", "mode": f"torch.compile(backend={settings.compile_backend!r}, dynamic=False)",
        "torch": torch.__version__, "peak_tflops": peak, "batches": {},
    }
    for batch in sorted(settings.batch_sizes, reverse=True):
        started = time.monotonic()
        from jobs.benchmark_model import random_pixel_values

        pixels = random_pixel_values(batch, settings.image_size, settings.seed + batch).to(settings.device, torch.bfloat16)
        with torch.inference_mode():
            compiled(pixels)  # the compile for this shape
            _synchronize(settings.device)
            compile_s = time.monotonic() - started
        row = _measure_batch(settings, compiled, batch, torch.bfloat16, flops_per_image, peak)
        row["compile_s"] = round(compile_s, 1)
        result["batches"][str(batch)] = row
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_text(json.dumps(result, default=_json_default))
        os.replace(temporary, out)


def write_checkpoint(folder: Path, model: Any, settings: CheckSettings) -> str:
    """The model and a processor config, in the Hugging Face layout the job loads."""
    model.save_pretrained(str(folder))
    build_processor(settings).save_pretrained(str(folder))
    return str(folder)


def write_shards(folder: Path, settings: CheckSettings) -> dict[str, Any]:
    """WebDataset shards (``<key>.jpg`` + ``<key>.json``) of ImageNet-size JPEGs of real photographs.

    A few dozen distinct JPEGs are cycled (encoding thousands would take longer than the job); every sample is
    still read, decoded and classified on its own.
    """
    from benchmarks.measures import (
        IMAGENET,
        QUICK_IMAGENET,
        build_image_set,
        sample_photographs,
    )

    kind = QUICK_IMAGENET if settings.dry_run else IMAGENET
    pool = build_image_set(kind, sample_photographs(), count=min(32, settings.e2e_images))
    folder.mkdir(parents=True, exist_ok=True)
    total_bytes, shards = 0, 0
    for first in range(0, settings.e2e_images, settings.e2e_images_per_shard):
        with tarfile.open(folder / f"part-{shards:05d}.tar", "w") as tar:
            for index in range(first, min(first + settings.e2e_images_per_shard, settings.e2e_images)):
                image = pool[index % len(pool)]
                key = f"{index:08d}"
                for name, payload in ((f"{key}.jpg", image.data), (f"{key}.json", json.dumps({"photo": image.photo}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                total_bytes += len(image.data)
        shards += 1
    return {"shards": shards, "images": settings.e2e_images, "jpeg_mb": round(total_bytes / 1e6, 2),
            "image_size": kind.size, "distinct_jpegs": len(pool)}


def section_end_to_end(settings: CheckSettings, model: Any, model_images_per_s: float | None) -> dict[str, Any]:
    """Images/s through the job on local shards: the real Ray job where Ray exists, else its stages in-process."""
    ray_present = has_ray()
    mode = settings.e2e_mode
    if mode == "auto":
        mode = "ray" if ray_present else "inprocess"
    if mode == "ray" and not ray_present:
        raise RuntimeError("--e2e-mode ray, but Ray is not installed here")
    with tempfile.TemporaryDirectory(prefix="gpu-check-e2e-") as folder:
        base = Path(folder)
        started = time.monotonic()
        checkpoint = write_checkpoint(base / "model", model, settings)
        written = write_shards(base / "shards", settings)
        setup_s = time.monotonic() - started
        output = base / "predictions"
        if mode == "ray":
            figures = _run_with_ray(settings, checkpoint, str(base / "shards"), str(output))
        else:
            figures = run_in_process(settings, checkpoint, str(base / "shards"), str(output))
        figures.update(_check_output(output, settings.e2e_images))
    result = {"ray": mode == "ray", "mode": mode, "setup_s": round(setup_s, 1), "input": written, **figures}
    if model_images_per_s:
        result["model_only_images_per_s_same_batch"] = model_images_per_s
        result["efficiency_vs_model_only"] = figures["images_per_s"] / model_images_per_s
    return result


def _check_output(output: Path, expected: int) -> dict[str, Any]:
    """Every sample accounted for: the Parquet rows under ``output`` number ``expected`` and none is an error."""
    import pyarrow.parquet as pq

    files = sorted(output.glob("part-*.parquet"))
    rows = errors = 0
    for path in files:
        table = pq.read_table(path, columns=["key", "error"])
        rows += table.num_rows
        errors += table.num_rows - table.column("error").null_count
    if rows != expected:
        raise RuntimeError(f"the job wrote {rows} rows in {len(files)} files under {output}, expected {expected}")
    return {"output_files": len(files), "output_rows": rows, "output_error_rows": errors}


def _run_with_ray(settings: CheckSettings, checkpoint: str, shards: str, output: str) -> dict[str, Any]:
    import ray

    from pipeline.config import JobConfig
    from pipeline.plan import run_job
    from pipeline.preflight import local_ray_options

    config = JobConfig(
        task="classify", input=shards, output=output, model=checkpoint, format="webdataset",
        images_per_shard=settings.e2e_images_per_shard, batch_size=settings.e2e_batch_size,
        dtype="bfloat16" if settings.device == "cuda" else "float32", device=settings.device,
        decode_cpus=1.0,
    )
    ray.init(address="local", log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
             **local_ray_options())
    try:
        summary = run_job(config)
    finally:
        ray.shutdown()
    return {"samples": summary.samples, "errors": summary.errors, "seconds": summary.seconds,
            "images_per_s": summary.images_per_s, "note": "run_job: includes Ray start-up, planning and actor start"}


def run_in_process(settings: CheckSettings, checkpoint: str, shards: str, output: str) -> dict[str, Any]:
    """The job's stages without Ray: plan -> read + decode shards on threads -> InferenceActor -> commit per shard.

    The same functions the Ray plan runs (``read_and_decode_shards``, ``InferenceActor``, ``write_fragments``,
    ``ShardTracker``, ``finalize_shard``), joined by a bounded queue instead of Ray Data: decoding overlaps inference
    as in the job.
    """
    import numpy as np

    from model.processing import ViTHybridImageProcessor
    from pipeline import sources
    from pipeline.actor import InferenceSettings
    from pipeline.config import JobConfig
    from pipeline.infer import BatchInference
    from pipeline.layout import OutputLayout
    from pipeline.reader import read_and_decode_shards
    from pipeline.shards import ShardTracker
    from pipeline.sink import output_schema
    from pipeline.writer import finalize_shard, write_fragments

    dtype = "bfloat16" if settings.device == "cuda" else "float32"
    planned = sources.plan_shards(shards, format="webdataset", storage_options={}, images_per_shard=settings.e2e_images_per_shard)
    processor = ViTHybridImageProcessor.from_pretrained(checkpoint)
    started = time.monotonic()
    actor = BatchInference(InferenceSettings(model_uri=checkpoint, task="classify", top_k=TOP_K, dtype=dtype,
                                             device=settings.device, torch_threads=None))
    _synchronize(actor.device)
    actor_startup_s = time.monotonic() - started
    schema = output_schema("classify", actor.hidden_size, "float32")
    threads = settings.decode_threads or max(1, (os.cpu_count() or 2) - 1)  # a core left for feeding the GPU
    chunks: queue.Queue[Any] = queue.Queue(maxsize=max(8, 4 * threads))
    done = object()

    def decode_shard(shard: Any) -> None:
        try:
            batch = {"shard": np.array([json.dumps(shard.to_dict())], dtype=object)}
            for chunk in read_and_decode_shards(batch, config=job, processor=processor, rows_per_batch=64):
                chunks.put(chunk)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            chunks.put(error)
        finally:
            chunks.put(done)

    job = JobConfig(task="classify", input=shards, output=output, model=checkpoint, format="webdataset")
    layout = OutputLayout(output)
    tracker = ShardTracker()
    committed = 0
    busy_s = 0.0
    batches = 0
    pending: list[dict[str, Any]] = []
    pending_rows = 0
    started = time.monotonic()

    def infer(parts: list[dict[str, Any]]) -> None:
        nonlocal committed, busy_s, batches
        batch = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        call_started = time.monotonic()
        table = actor(batch)
        busy_s += time.monotonic() - call_started
        batches += 1
        for shard in tracker.add(write_fragments(table, layout=layout)):
            finalize_shard(layout, shard.shard_id, shard.fragments, shard.rows, rows_per_file=100_000, metadata={},
                           schema=schema)
            committed += 1

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        for shard in planned:
            pool.submit(decode_shard, shard)
        finished = 0
        while finished < len(planned):
            item = chunks.get()
            if item is done:
                finished += 1
                continue
            if isinstance(item, BaseException):
                raise item
            pending.append(item)
            pending_rows += len(item["key"])
            while pending_rows >= settings.e2e_batch_size:
                parts, pending, pending_rows = _take(pending, settings.e2e_batch_size)
                infer(parts)
        if pending:
            infer(pending)
    seconds = time.monotonic() - started
    incomplete = tracker.pending_shards()
    if incomplete:
        raise RuntimeError(f"shards left incomplete: {sorted(incomplete)[:5]}")
    return {
        "samples": tracker.rows_accepted,
        "errors": tracker.error_rows_accepted,
        "shards_committed": committed,
        "seconds": seconds,
        "images_per_s": tracker.rows_accepted / seconds,
        "actor_startup_s": round(actor_startup_s, 2),
        "actor_busy_fraction": busy_s / seconds,
        "inference_batches": batches,
        "batch_size": settings.e2e_batch_size,
        "decode_threads": threads,
        "dtype": dtype,
        "note": "in-process stages (no Ray): timed from the first shard read to the last commit, actor start-up apart",
    }


def _take(parts: list[dict[str, Any]], rows: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Split queued chunks into exactly ``rows`` rows (fixed batch shapes) and the rest."""
    taken: list[dict[str, Any]] = []
    count = 0
    while count < rows:
        part = parts.pop(0)
        size = len(part["key"])
        if count + size <= rows:
            taken.append(part)
            count += size
        else:
            cut = rows - count
            taken.append({name: values[:cut] for name, values in part.items()})
            parts.insert(0, {name: values[cut:] for name, values in part.items()})
            count = rows
    remaining = sum(len(part["key"]) for part in parts)
    return taken, parts, remaining


# ---------------------------------------------------------------------------------------------------------------------
# The run.


def run_check(settings: CheckSettings) -> dict[str, Any]:
    """Run every section in turn, saving the JSON after each; returns the report's data."""
    report = Report(settings.out, settings)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, report.on_terminate)
    report.section("environment", lambda: section_environment(settings))
    holder: dict[str, Any] = {}

    def setup() -> dict[str, Any]:
        holder["model"] = build_model(settings)
        config = holder["model"].config
        return {"config": "tiny (dry run)" if settings.dry_run else "vit-hybrid-base-bit-384 shape, random weights",
                "image_size": settings.image_size, "parameters": sum(p.numel() for p in holder["model"].parameters()),
                "hidden_size": config.hidden_size, "layers": config.num_hidden_layers}

    report.section("model", setup)
    model = holder.get("model")
    if model is None:
        report.data["summary"] = "no model could be built: see sections.model"
        report.save()
        return report.data
    flops = report.section("flops", lambda: section_flops(settings, model)) or {}
    flops_per_image = flops.get("analytic_gflops", 0.0) * 1e9 or _fallback_flops(model)
    report.section("layout", lambda: section_layout(settings, model))
    report.section("parity", lambda: section_parity(settings, model))
    throughput = report.section("throughput", lambda: section_throughput(settings, model, flops_per_image)) or {}
    same_batch = throughput.get("batches", {}).get(str(settings.e2e_batch_size), {}).get("images_per_s")
    report.section("end_to_end", lambda: section_end_to_end(settings, model, same_batch))
    # Last, because it is the slowest: it gets what is left of the run's budget (a few seconds kept for the end).
    report.section("compiled", lambda: section_compiled(settings, flops_per_image, report.remaining_s(settings.total_budget_s) - 10))
    try:
        report.data["summary"] = summarize(report.data)
    except Exception as error:  # the figures are in the sections; a summary bug must not hide them
        logger.exception("summary failed")
        report.data["summary"] = [f"summary failed: {type(error).__name__}: {error}; see the sections"]
    report.save()
    return report.data


def _fallback_flops(model: Any) -> float:
    from benchmarks.flops import analytic_flops

    return analytic_flops(model.config).total


def summarize(data: dict[str, Any]) -> list[str]:
    """A few lines a person reads first; every figure is also in the sections."""
    sections = data["sections"]
    lines = []
    env = sections.get("environment", {})
    lines.append(
        f"device: {env.get('device_name', 'CPU')} (SMs {env.get('sm_count', '-')}, {env.get('memory_gib', '-')} GiB), "
        f"torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, ray {env.get('ray')}"
    )
    flops = sections.get("flops", {})
    if flops.get("status") == "ok":
        lines.append(
            f"GFLOPs/image: analytic {flops['analytic_gflops']:.5g}, CPU counter (math attention) "
            f"{flops['measured_cpu_math_attention_gflops']:.5g}"
            + (f", CUDA counter {flops['measured_cuda_gflops']:.5g}" if "measured_cuda_gflops" in flops else "")
        )
    layout = sections.get("layout", {})
    if layout.get("status") == "ok":
        lines.append(f"channels-last through the backbone: {layout['channels_last_through_backbone']}")
    parity = sections.get("parity", {})
    for variant in ("bfloat16", "bfloat16_standardized_after_cast", "float32_tf32", "cpu_float32"):
        if variant in parity:
            row = parity[variant]
            lines.append(
                f"parity {variant} vs fp32: max|dlogit| {row['max_abs_logit_diff']:.3g}, cosine min "
                f"{row['embedding_cosine_min']:.6f} mean {row['embedding_cosine_mean']:.6f}, top-1 {row['top1_agreement']:.1%}"
            )
    matmul_tflops = env.get("matmul_bf16_tflops_measured")
    if matmul_tflops:
        lines.append(f"bf16 8192^3 matmul: {matmul_tflops:.0f} TFLOP/s (data-sheet peak {env['peak_tflops']['bfloat16']})")
    flops_per_image = sections.get("throughput", {}).get("flops_per_image")
    for name in ("throughput", "compiled"):
        section = sections.get(name, {})
        for batch, row in sorted(section.get("batches", {}).items(), key=lambda item: int(item[0])):
            mfu = row.get("mfu")
            of_matmul = row["images_per_s"] * flops_per_image / (matmul_tflops * 1e12) if matmul_tflops and flops_per_image else None
            lines.append(
                f"{name} bf16 batch {batch}: {row['images_per_s']:.1f} images/s"
                + (f", MFU {mfu:.1%}" if mfu is not None else "")
                + (f" ({of_matmul:.1%} of the measured matmul)" if of_matmul is not None else "")
                + (f", compile {row['compile_s']} s" if "compile_s" in row else "")
            )
        if name == "throughput" and "channels_last_fix_speedup" in section:
            lines.append(f"channels-last GroupNorm fix at batch {section['without_channels_last_fix']['batch']}: "
                         f"{section['channels_last_fix_speedup']:.3f}x")
    if sections.get("compiled", {}).get("timed_out"):
        lines.append(f"torch.compile stopped at its budget ({sections['compiled']['budget_s']} s)")
    e2e = sections.get("end_to_end", {})
    if e2e.get("status") == "ok":
        lines.append(
            f"end to end ({e2e['mode']}): {e2e['images_per_s']:.1f} images/s, {e2e['samples']} samples, "
            f"{e2e['errors']} errors" + (f", actor busy {e2e['actor_busy_fraction']:.0%}" if "actor_busy_fraction" in e2e else "")
        )
    failed = [name for name, section in sections.items() if section.get("status") != "ok"]
    lines.append("sections failed: " + (", ".join(failed) if failed else "none"))
    return lines


def parse_settings(argv: Sequence[str] | None = None) -> tuple[CheckSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m jobs.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON to write (rewritten after each section)")
    parser.add_argument("--dry-run", action="store_true", help="tiny config on the CPU, every section, in seconds")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 64,128,256)")
    parser.add_argument("--timed-batches", type=int, default=None)
    parser.add_argument("--compile-budget-s", type=float, default=None, help="hard limit for the torch.compile child")
    parser.add_argument("--total-budget-s", type=float, default=None,
                        help="the compile section gets at most what is left of this (seconds since the start)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--e2e-images", type=int, default=None)
    parser.add_argument("--e2e-mode", choices=("auto", "ray", "inprocess"), default=None)
    parser.add_argument("--decode-threads", type=int, default=None, help="in-process end to end (0: one per core, but one)")
    # Internal: the torch.compile child.
    parser.add_argument("--compiled-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--flops-per-image", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.settings_json:
        fields = json.loads(args.settings_json)
        fields["batch_sizes"] = tuple(fields["batch_sizes"])
        return CheckSettings(**fields), args
    settings = dry_run_settings(args.out) if args.dry_run else CheckSettings(out=args.out)
    overrides: dict[str, Any] = {}
    if args.device:
        overrides["device"] = args.device
    if args.batch_sizes:
        overrides["batch_sizes"] = tuple(int(size) for size in args.batch_sizes.split(",") if size.strip())
    for name in ("timed_batches", "compile_budget_s", "total_budget_s", "e2e_images", "e2e_mode", "decode_threads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_compile:
        overrides["compile"] = False
    settings = replace(settings, **overrides)
    if settings.e2e_batch_size not in settings.batch_sizes:
        settings = replace(settings, e2e_batch_size=max(settings.batch_sizes))
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, args = parse_settings(argv)
    if args.compiled_child:
        compiled_child(settings, args.flops_per_image or 0.0, Path(args.compiled_child))
        return 0
    data = run_check(settings)
    print("\n".join(data.get("summary", [])))
    print(f"written: {settings.out}")
    failed = [name for name, section in data["sections"].items() if section.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
