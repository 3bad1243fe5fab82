"""Pure helpers for ``jobs.benchmark``: a realistic JPEG mix, the pipeline's throughput bounds, and the report.

Nothing here starts Ray, touches storage or times anything; the measuring lives in :mod:`jobs.benchmark`. What is
here is what the figures *mean*, so that it is unit-tested on its own:

* :func:`build_image_set` turns real photographs into JPEGs of a given kind: ImageNet-size (~500x375) or
  12-megapixel phone photos (4000x3000), at quality ~90, landscape and portrait alternately;
* :func:`mix_rate` is the throughput of a stream that mixes kinds (a harmonic mean: the time per image adds up);
* :func:`pipeline_bounds` is the upper bound the pipeline can reach -- the slower of the inference actor pool and
  the decode CPUs -- and the efficiency of a measured end-to-end rate against it;
* :func:`model_flop_utilisation` and :func:`peak_tflops_for` turn FLOPs per image and images/s into a fraction of
  the device's peak.

Example::

    photos = sample_photographs()
    phone = build_image_set(PHONE, photos, count=4)
    rate = mix_rate({"imagenet": 245.0, "phone": 35.0}, mix_fractions(mix_kinds(100, phone_every=10)))
    bounds = pipeline_bounds(model_images_per_s=0.57, actors=1, decode_images_per_s_per_core=rate,
                             decode_cpus=1, end_to_end_images_per_s=0.52)
    bounds.efficiency  # 0.52 / min(0.57, 153) = 0.91
"""

from __future__ import annotations

import io
import logging
import math
import os
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Colour photographs that ship with scikit-image (no download): people, animals, objects, space, a medical image.
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ImageKind:
    """One kind of input file: its landscape size and how much sensor-like grain it carries.

    Photographs upscaled to 12 megapixels are far smoother than what a phone writes; a little grain (a Gaussian of
    ``grain`` 8-bit levels) brings their JPEG size, and so the entropy-decoding work, closer to real phone photos
    (a real 12 MP phone JPEG at quality 90 is 2-5 MB).
    """

    name: str
    width: int
    height: int
    grain: float = 0.0

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


IMAGENET = ImageKind("imagenet", 500, 375)
PHONE = ImageKind("phone", 4000, 3000, grain=3.0)
# --quick: the same two kinds, small (the tiny model's crop is 64 px, so "phone" is still a >4x downscale).
QUICK_IMAGENET = ImageKind("imagenet", 96, 72)
QUICK_PHONE = ImageKind("phone", 400, 300, grain=3.0)


@dataclass(frozen=True)
class EncodedImage:
    """One JPEG of the benchmark set: its kind, the photograph it came from, its pixel size and bytes."""

    kind: str
    photo: str
    width: int
    height: int
    data: bytes


def sample_photographs(names: Sequence[str] = PHOTO_NAMES) -> list[tuple[str, np.ndarray]]:
    """Real RGB photographs from scikit-image, as ``(name, uint8 HxWx3)`` (one home: :func:`fixtures.photos.rgb_photographs`)."""
    from fixtures.photos import rgb_photographs

    return rgb_photographs(names)


def render_jpeg(
    photo: np.ndarray, width: int, height: int, *, grain: float = 0.0, quality: int = JPEG_QUALITY, seed: int = 0
) -> bytes:
    """Centre-crop ``photo`` to the aspect ratio of ``width x height``, resize (bicubic), add grain, encode as JPEG."""
    image = Image.fromarray(photo)
    source_w, source_h = image.size
    aspect = width / height
    if source_w / source_h > aspect:
        crop_w, crop_h = max(1, round(source_h * aspect)), source_h
    else:
        crop_w, crop_h = source_w, max(1, round(source_w / aspect))
    left, top = (source_w - crop_w) // 2, (source_h - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    if grain > 0:
        # A tiled noise field: drawing 36 million normals per 12 MP image would take seconds, and JPEG codes each
        # 8x8 block on its own, so a 256-pixel tile costs the encoder and decoder the same as fresh noise.
        rng = np.random.default_rng(seed)
        tile = rng.normal(0.0, grain, size=(256, 256, 3)).astype(np.float32)
        noise = np.tile(tile, (math.ceil(height / 256), math.ceil(width / 256), 1))[:height, :width]
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_image_set(
    kind: ImageKind, photos: Sequence[tuple[str, np.ndarray]], *, count: int, quality: int = JPEG_QUALITY, seed: int = 0
) -> list[EncodedImage]:
    """``count`` JPEGs of one kind, cycling through ``photos``; every second one is portrait (height > width)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    images = []
    for index in range(count):
        name, photo = photos[index % len(photos)]
        width, height = (kind.width, kind.height) if index % 2 == 0 else (kind.height, kind.width)
        data = render_jpeg(photo, width, height, grain=kind.grain, quality=quality, seed=seed + index)
        images.append(EncodedImage(kind.name, name, width, height, data))
    return images


def mix_kinds(total: int, phone_every: int) -> list[str]:
    """The kind of each sample in a mixed stream: every ``phone_every``-th one a phone photo (0: none)."""
    if total < 0 or phone_every < 0:
        raise ValueError(f"total and phone_every must be >= 0, got {total} and {phone_every}")
    return [
        PHONE.name if phone_every and index % phone_every == phone_every - 1 else IMAGENET.name for index in range(total)
    ]


def mix_fractions(kinds: Iterable[str]) -> dict[str, float]:
    """The fraction of each kind in a stream."""
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    total = sum(counts.values())
    if total == 0:
        raise ValueError("an empty stream has no mix")
    return {kind: count / total for kind, count in sorted(counts.items())}


def mix_rate(rates: Mapping[str, float], fractions: Mapping[str, float]) -> float:
    """Images/s of a stream mixing kinds, from each kind's images/s: times add up, so ``1 / sum(f_k / r_k)``."""
    missing = [kind for kind, fraction in fractions.items() if fraction > 0 and kind not in rates]
    if missing:
        raise KeyError(f"no rate for kind(s) {missing}; rates are known for {sorted(rates)}")
    seconds_per_image = sum(fraction / rates[kind] for kind, fraction in fractions.items() if fraction > 0)
    if seconds_per_image <= 0:
        raise ValueError(f"fractions {dict(fractions)} select nothing")
    return 1.0 / seconds_per_image


@dataclass(frozen=True)
class PipelineBounds:
    """The two throughput ceilings of the pipeline, the binding one, and how close the measured rate came to it.

    ``model_pool_images_per_s`` = one actor's model-only rate x actors, or the rate measured for a pool of actors side
    by side when that is higher (CPU: the job's single-threaded actors); ``decode_capacity_images_per_s`` = the
    per-core decode + preprocess rate of the input mix x the CPU cores given to decoding. The pipeline can go no
    faster than the smaller one; ``efficiency`` = measured end-to-end rate / that bound.
    """

    model_images_per_s_per_actor: float
    actors: int
    model_pool_images_per_s: float
    decode_images_per_s_per_core: float
    decode_cpus: float
    decode_capacity_images_per_s: float
    bound_images_per_s: float
    bottleneck: str  # "model" or "decode"
    end_to_end_images_per_s: float
    efficiency: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pipeline_bounds(
    *,
    model_images_per_s: float,
    actors: int,
    decode_images_per_s_per_core: float,
    decode_cpus: float,
    end_to_end_images_per_s: float,
    measured_pool_images_per_s: float | None = None,
) -> PipelineBounds:
    """Bound the pipeline by its slower stage and rate the measured end-to-end throughput against it.

    ``measured_pool_images_per_s``: a pool timed as a whole; the bound takes the faster of it and one actor x
    ``actors``, so a job is judged against the best the model did alone, whichever layout gave it."""
    if model_images_per_s <= 0 or decode_images_per_s_per_core <= 0:
        raise ValueError(
            f"rates must be positive, got model {model_images_per_s} and decode {decode_images_per_s_per_core} images/s"
        )
    if actors < 1 or decode_cpus <= 0:
        raise ValueError(f"need at least one actor and some decode CPUs, got {actors} and {decode_cpus}")
    model_pool = max(model_images_per_s * actors, measured_pool_images_per_s or 0.0)
    decode_capacity = decode_images_per_s_per_core * decode_cpus
    bound = min(model_pool, decode_capacity)
    return PipelineBounds(
        model_images_per_s_per_actor=model_images_per_s,
        actors=actors,
        model_pool_images_per_s=model_pool,
        decode_images_per_s_per_core=decode_images_per_s_per_core,
        decode_cpus=decode_cpus,
        decode_capacity_images_per_s=decode_capacity,
        bound_images_per_s=bound,
        bottleneck="model" if model_pool <= decode_capacity else "decode",
        end_to_end_images_per_s=end_to_end_images_per_s,
        efficiency=end_to_end_images_per_s / bound,
    )


@dataclass(frozen=True)
class TwoPointRate:
    """Two job sizes split a job's time into a fixed part and a per-image part.

    ``time = fixed_s + images / marginal_images_per_s``: the fixed part is what every job pays once (driver
    preamble, actor start-up with the model load, the first batch's warm-up, the last commit); the marginal rate is
    the steady state, and ``marginal_efficiency`` compares it with the same bound as the job's efficiency. Each size
    may run several times, alternating (``small_runs``, ``runs``): the fit goes through the mean times, and
    ``fixed_s_per_pair`` (the fit through each small and large run in turn) shows how far the machine's speed moved
    it; on a 2-core machine one ~35 s round of batches moves by seconds between runs, all of which lands in the
    fixed part of a single pair.
    """

    small_images: int
    small_seconds: float
    images: int
    seconds: float
    marginal_images_per_s: float
    fixed_s: float
    marginal_efficiency: float
    small_runs: tuple[float, ...] = ()
    runs: tuple[float, ...] = ()
    fixed_s_per_pair: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def two_point_rate(
    *, small_images: int, small_runs: Sequence[float], images: int, runs: Sequence[float], bound_images_per_s: float
) -> TwoPointRate:
    """Fit ``time = fixed + images / rate`` through the mean times of two job sizes (``images > small_images``),
    each run the same number of times."""
    if images <= small_images:
        raise ValueError(f"the second job must be larger: {images} <= {small_images} images")
    if not runs or len(runs) != len(small_runs):
        raise ValueError(f"need as many runs of each size, at least one: {len(small_runs)} and {len(runs)}")
    small_seconds, seconds = statistics.fmean(small_runs), statistics.fmean(runs)
    if seconds <= small_seconds:
        raise ValueError(
            f"the larger job ({images} images, {seconds:.1f} s) was not slower than the smaller one "
            f"({small_images} images, {small_seconds:.1f} s): too few images to separate fixed from marginal cost"
        )
    marginal = (images - small_images) / (seconds - small_seconds)
    per_pair = tuple(large - images * (large - small) / (images - small_images) for small, large in zip(small_runs, runs))
    return TwoPointRate(
        small_images=small_images,
        small_seconds=small_seconds,
        images=images,
        seconds=seconds,
        marginal_images_per_s=marginal,
        fixed_s=seconds - images / marginal,
        marginal_efficiency=marginal / bound_images_per_s,
        small_runs=tuple(small_runs),
        runs=tuple(runs),
        fixed_s_per_pair=per_pair,
    )


# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by dtype. fp32 is the non-tensor-core
# figure: PyTorch does not use TF32 for matmuls unless asked to.
_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),  # SXM
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    ("A10", {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2}),
)


def _runs(two_point: Mapping[str, Any], runs: str, mean: str) -> str:
    """``41.2 s`` for one run, ``41.2 s (mean of 40.1, 42.3)`` for several."""
    values = two_point.get(runs) or ()
    text = f"{two_point[mean]:.1f} s"
    return text if len(values) < 2 else f"{text} (mean of {', '.join(f'{value:.1f}' for value in values)})"


def peak_tflops_for(device_name: str | None, dtype: str) -> float | None:
    """The data-sheet dense peak of a known NVIDIA GPU for ``dtype``; None when unknown (pass ``--peak-tflops``)."""
    if not device_name:
        return None
    for marker, peaks in _PEAK_TFLOPS:
        if marker.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


def model_flop_utilisation(
    flops_per_image: float, images_per_s: float, peak_tflops: float | None, *, gpus: int = 1
) -> float | None:
    """MFU per GPU: achieved FLOP/s (FLOPs per image x images/s summed over all actors) over ``gpus`` x one GPU's peak.

    ``images_per_s`` is what the whole pool did, so the peak it is held against is the pool's: dividing a pool's
    throughput by one GPU's peak would report 8 busy GPUs as 800 % of one. ``flops_per_image`` must include attention
    (:mod:`benchmarks.flops`). None without a peak.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    if not peak_tflops:
        return None
    return flops_per_image * images_per_s / (gpus * peak_tflops * 1e12)


def hardware_summary() -> dict[str, Any]:
    """CPU model, cores (all, and usable by this process), GPU name and the library versions that matter."""
    import torch

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import PIL

    return {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The printed report.


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _load_line(label: str, load: Mapping[str, Any] | None) -> str | None:
    if not load or load.get("foreign_cores") is None:
        return None
    warning = "  << other processes were busy: timings unreliable" if load["foreign_cores"] > 0.1 else ""
    return (
        f"   {label:<19}{load['foreign_cores']:>10.2f} cores of other processes' load "
        f"(this benchmark's processes: {load['own_cores']:.2f} cores){warning}"
    )


def format_report(results: Mapping[str, Any]) -> str:
    """The readable table ``jobs.benchmark`` prints, from the results dict it returns (and writes as JSON)."""
    settings, hardware = results["settings"], results["hardware"]
    model, decode, e2e, bounds = results["model"], results["decode"], results["end_to_end"], results["bounds"]
    gpu = hardware["gpu"] or "no GPU"
    lines = [
        f"ViT Hybrid pipeline benchmark: {model['config']}, {model['image_size']} px, {model['dtype']} on "
        f"{model['device']}, batch {settings['batch_size']}{' (--quick)' if settings['quick'] else ''}",
        f"hardware: {hardware['cpu_model']}, {hardware['cpu_cores']} CPU cores ({hardware['cpu_cores_usable']} "
        f"usable), {gpu}; torch {hardware['torch']}, Pillow {hardware['pillow']}",
        "",
        "1. model only (pipeline.infer.predict: uint8 batch on the device -> normaliser -> model -> softmax/top-k)",
        f"   one actor          {_rate(model['images_per_s']):>10} images/s   ({model['timed_batches']} timed batches "
        f"of {settings['batch_size']} after {model['warmup_batches']} warm-up, {model['torch_threads']} torch "
        f"thread(s))",
        f"   GFLOPs per image   {model['flops_per_image'] / 1e9:>10.2f}",
        f"   actor start-up     {model['actor_startup_s']:>10.2f} s          (InferenceActor(...) from "
        f"{model['checkpoint_location']})",
    ]
    if model.get("pool"):
        pool = model["pool"]
        lines.append(f"   the job's actor    {_rate(pool['images_per_s']):>10} images/s   ({pool['lanes']} calls at once x "
                     f"{pool['torch_threads']} thread(s) in one process, {len(pool['batch_seconds'][0])} timed batches each)")
    if model.get("processes"):
        separate = model["processes"]
        lines.append(f"   separate processes {_rate(separate['images_per_s']):>10} images/s   ({separate['processes']} "
                     f"processes x {separate['torch_threads']} thread(s), side by side, the same cores)")
    if model.get("cpu_over_wall") is not None:
        lines.append(f"   CPU time / wall    {model['cpu_over_wall']:>10.2f}            (with {model['torch_threads']} "
                     f"thread(s); lower means the cores were shared)")
    if model.get("device") == "cpu":
        lines.append(f"   allocator          {model.get('allocator') or 'glibc defaults'}   (the CPU actors' GLIBC_TUNABLES, "
                     "pipeline.cpu)")
    lines += [
        "",
        "2. decode + preprocess, images/s per CPU core (1 thread)",
        f"   {'kind':<10} {'size':>10} {'avg KB':>7} {'fast':>8} {'exact':>8} {'reference':>10} {'fast/ref':>9} "
        f"{'fast/exact':>10} {'max|dpx|':>8} {'top-1 agree':>12}",
    ]
    for kind in decode["kinds"]:
        row = decode["per_kind"][kind]
        agreement = row["top1_agreement"]
        agree_text = f"{agreement['agree']}/{agreement['images']}" if agreement else "-"
        lines.append(
            f"   {kind:<10} {row['size']:>10} {row['avg_kb']:>7.0f} {_rate(row['fast']):>8} {_rate(row['exact']):>8} "
            f"{_rate(row['reference']):>10} {_ratio(row['fast_over_reference']):>9} "
            f"{_ratio(row['fast_over_exact']):>10} {row['max_abs_pixel_diff']:>8} {agree_text:>12}"
        )
    mix = decode["mix"]
    lines += [
        f"   {'mix':<10} {mix['label']:>10} {'':>7} {_rate(mix['fast']):>8} {_rate(mix['exact']):>8} "
        f"{_rate(mix['reference']):>10} {_ratio(mix['fast_over_reference']):>9} {_ratio(mix['fast_over_exact']):>10}",
        f"   (reference = PIL decode + transformers.ViTHybridImageProcessor -> float32; "
        f"{decode['reference_note']})",
        f"   fast vs exact top-1: {decode['top1_agreement']['agree']}/{decode['top1_agreement']['images']} agree "
        f"({decode['top1_agreement']['identical_pixels']} with identical pixels; "
        f"{decode['top1_agreement']['distinct_classes']} distinct top-1 classes among the others); embedding shift "
        f"{_fraction(decode['top1_agreement']['embedding_shift_over_between_photos'])} of the distance between photos",
        f"   control, exact +-1 noise: top-1 {decode['top1_agreement']['control_agree']}/"
        f"{decode['top1_agreement']['control_images']} agree, embedding shift "
        f"{_fraction(decode['top1_agreement']['control_shift_over_between_photos'])} (how chaotic the model is)",
        "",
        f"3. end to end ({e2e['storage']} -> decode tasks -> inference actors -> Parquet in {e2e['storage']})",
        f"   {e2e['images']} images ({e2e['phone_images']} phone), {e2e['shards']} shards of {e2e['images_per_shard']}, "
        f"{e2e['input_mb']:.1f} MB; {bounds['decode_cpus']:g} decode CPU(s), {e2e.get('actors', bounds['actors'])} actor(s) x "
        f"{e2e['cpus_per_actor']:g} CPU{' + 1 GPU' if model['device'] == 'cuda' else ''}"
        + (f", {e2e['calls_per_actor']} calls at once" if e2e.get("calls_per_actor", 1) > 1 else ""),
        f"   job                {e2e['seconds']:>10.1f} s -> {_rate(e2e['images_per_s'])} images/s "
        f"({e2e['samples']} samples, {e2e['errors']} errors, {e2e['shards_committed']} shards committed; "
        f"status {e2e['status']})",
        "",
        "4. bounds",
        f"   model pool         {_rate(bounds['model_pool_images_per_s']):>10} images/s   "
        + (f"(the fastest of one actor x {bounds['actors']}, the job's actor and separate processes)" if model.get("pool")
           else f"({_rate(bounds['model_images_per_s_per_actor'])} x {bounds['actors']} actor(s))"),
        f"   decode capacity    {_rate(bounds['decode_capacity_images_per_s']):>10} images/s   "
        f"({_rate(bounds['decode_images_per_s_per_core'])} per core, fast path, x {bounds['decode_cpus']:g} CPU(s))",
        f"   bound              {_rate(bounds['bound_images_per_s']):>10} images/s   ({bounds['bottleneck']}-bound)",
        f"   pipeline efficiency{bounds['efficiency']:>10.3f}      (end to end / bound)",
    ]
    two_point = results.get("two_point")
    if two_point and "error" in two_point:
        lines.append(f"   two-point fit               -      ({two_point['error']})")
    elif two_point:
        lines += [
            f"   two-point fit      {two_point['fixed_s']:>10.1f} s fixed + images / "
            f"{_rate(two_point['marginal_images_per_s'])} images/s   (jobs of {two_point['small_images']} and "
            f"{two_point['images']} images: {_runs(two_point, 'small_runs', 'small_seconds')}, "
            f"{_runs(two_point, 'runs', 'seconds')})",
            f"   marginal efficiency{two_point['marginal_efficiency']:>10.3f}      (steady state / bound)",
        ]
        if len(two_point.get("fixed_s_per_pair") or ()) > 1:
            lines.append(f"   fixed, per pair    {', '.join(f'{fixed:.1f}' for fixed in two_point['fixed_s_per_pair']):>10} s"
                         "        (each smaller job with the larger one after it: how far the machine moved it)")
        if two_point.get("ray_init_s") is not None:
            lines.append(
                f"   + ray.init()       {two_point['ray_init_s']:>10.1f} s          (before the fixed part, for a job "
                "that starts its own Ray: no RAY_ADDRESS)"
            )
    for line in (_load_line("load: model only", model.get("load")), _load_line("load: end to end", e2e.get("load"))):
        if line:
            lines.append(line)
    mfu = results["mfu"]
    if mfu["model_only"] is not None:
        lines.append(
            f"   MFU                {mfu['model_only']:>10.3%} model only, {mfu['end_to_end']:.3%} end to end "
            f"(peak {mfu['peak_tflops']:g} TFLOP/s {model['dtype']})"
        )
    else:
        lines.append("   MFU                         -      (no known peak for this device; pass --peak-tflops)")
    return "\n".join(lines)
