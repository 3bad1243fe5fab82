"""The fast decode path against the exact one: pixel deviation, embedding cosine and speed, on a named photo corpus.

``python -m benchmarks.fastpath`` prints one table and (``--json``) writes the figures. The corpus is the colour
photographs that ship with scikit-image (:data:`benchmarks.measures.SAMPLE_PHOTOS`: astronaut, chelsea, coffee, rocket,
immunohistochemistry, hubble_deep_field, ...), each rescaled to sizes a batch job meets (:data:`SIZES`: web images,
just over twice the 384 input, 2-megapixel and 12-megapixel photos, landscape and portrait) and saved as JPEG
quality 90, plus PNG and WebP copies of the first sizes to check that those are untouched.

For every image: the ``uint8`` crops of ``to_uint8(fast=False)`` and ``to_uint8(fast=True)`` are compared (max, mean
and 99th percentile of |difference| in grey levels, over all pixels of the size class), and, unless
``--embedding-images 0``, the model's embeddings of both crops (cosine; the model is ``--model`` or random
full-size weights, under which different photos already have cosines near 1: the "base cos" column, the cosine
between two different photos of the class, gives the scale, and trained weights give the meaningful figure).
"q95 mean" is the mean deviation of the exact path between the same picture saved at JPEG quality 95 and 90: what
the producing tool's quality setting alone changes. Speed is decode +
preprocess on one thread, images/s, exact and fast, in the same run. ``--margin`` repeats the study with the draft
kept at least that many times the input size (``model.processing.FAST_DRAFT_MARGIN``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model import processing
from model.processing import ViTHybridImageProcessor

logger = logging.getLogger("benchmarks.fastpath")

# (label, long side x short side) in landscape; each size is also measured in portrait.
SIZES = (
    ("web 500x375", (500, 375)),
    ("just over 2x: 1000x872", (1000, 872)),
    ("2 Mpx 1600x1200", (1600, 1200)),
    ("12 Mpx 4000x3000", (4000, 3000)),
)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


@dataclass
class SizeResult:
    label: str
    image_format: str
    images: int
    drafted: int
    max_diff: int
    mean_diff: float
    p99_diff: float
    bit_exact_images: int
    exact_images_per_s: float
    fast_images_per_s: float
    cosines: list[float] = field(default_factory=list)
    baseline_cosine: float | None = None  # exact embeddings of two different photos of this class: the model's scale
    q95_mean_diff: float | None = None  # exact crops of the same photo saved at q95 instead of q90: encoder noise

    @property
    def speedup(self) -> float:
        return self.fast_images_per_s / self.exact_images_per_s if self.exact_images_per_s else 0.0


def corpus(sizes: Sequence[tuple[str, tuple[int, int]]], photos: Sequence[str]) -> list[tuple[str, str, bytes]]:
    """``(size label, format, encoded bytes)`` for every photo x size x orientation, JPEG q90; PNG/WebP for the first two."""
    from skimage import data

    items = []
    for name in photos:
        photo = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        for index, (label, (long_side, short_side)) in enumerate(sizes):
            for size in ((long_side, short_side), (short_side, long_side)):
                image = photo.resize(size, Image.Resampling.LANCZOS)
                formats = ["JPEG"] + (["PNG", "WEBP"] if index < 2 else [])
                for image_format in formats:
                    buffer = io.BytesIO()
                    image.save(buffer, image_format, **({"quality": 90} if image_format != "PNG" else {}))
                    items.append((label, image_format, buffer.getvalue()))
    return items


def _rate(function: Any, payloads: Sequence[bytes], min_seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while True:
        for payload in payloads:
            function(payload)
            count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return count / elapsed


def measure(
    processor: ViTHybridImageProcessor,
    items: Sequence[tuple[str, str, bytes]],
    *,
    embedder: Any | None,
    embedding_images: int,
    min_seconds: float,
) -> list[SizeResult]:
    groups: dict[tuple[str, str], list[bytes]] = {}
    for label, image_format, payload in items:
        groups.setdefault((label, image_format), []).append(payload)
    results = []
    for (label, image_format), payloads in groups.items():
        differences = []
        drafted = exact_count = 0
        cosines: list[float] = []
        for index, payload in enumerate(payloads):
            exact = processor.to_uint8(Image.open(io.BytesIO(payload)))
            opened = Image.open(io.BytesIO(payload))
            fast = processor.to_uint8(opened, fast=True)
            drafted += int(opened.size != Image.open(io.BytesIO(payload)).size)
            difference = np.abs(exact.astype(np.int16) - fast.astype(np.int16))
            differences.append(difference.ravel())
            exact_count += int(not difference.any())
            if embedder is not None and index < embedding_images and difference.any():
                cosines.append(embedder(exact, fast))
            elif embedder is not None and index < embedding_images:
                cosines.append(1.0)
        every = np.concatenate(differences)
        baseline = None
        if embedder is not None and len(payloads) > 2:
            baseline = embedder(
                processor.to_uint8(Image.open(io.BytesIO(payloads[0]))),
                processor.to_uint8(Image.open(io.BytesIO(payloads[-1]))),
            )
        q95 = None
        if image_format == "JPEG":
            q95 = _requality_noise(processor, payloads[0])
        results.append(
            SizeResult(
                label=label,
                image_format=image_format,
                images=len(payloads),
                drafted=drafted,
                max_diff=int(every.max()),
                mean_diff=float(every.mean()),
                p99_diff=float(np.percentile(every, 99)),
                bit_exact_images=exact_count,
                exact_images_per_s=_rate(lambda data: processor.to_uint8(Image.open(io.BytesIO(data))), payloads, min_seconds),
                fast_images_per_s=_rate(
                    lambda data: processor.to_uint8(Image.open(io.BytesIO(data)), fast=True), payloads, min_seconds
                ),
                cosines=cosines,
                baseline_cosine=baseline,
                q95_mean_diff=q95,
            )
        )
    return results


def _requality_noise(processor: ViTHybridImageProcessor, payload: bytes) -> float:
    """Mean |difference| between exact crops of the same picture encoded at q90 and at q95: the deviation that a
    different JPEG quality setting in the producing tool already makes, to put the fast path's figures in scale."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(payload)).save(buffer, "JPEG", quality=95)
    first = processor.to_uint8(Image.open(io.BytesIO(payload))).astype(np.int16)
    second = processor.to_uint8(Image.open(io.BytesIO(buffer.getvalue()))).astype(np.int16)
    return float(np.abs(first - second).mean())


def make_embedder(model_uri: str | None, cache: Path) -> Any:
    import torch

    from model import ViTHybridForImageClassification

    if model_uri is None:
        from jobs.demo import random_full_size_checkpoint

        model_uri = str(random_full_size_checkpoint(cache))
    model = ViTHybridForImageClassification.from_pretrained(model_uri).eval()
    normalizer = ViTHybridImageProcessor.from_pretrained(model_uri).normalizer()

    def cosine(exact: np.ndarray, fast: np.ndarray) -> float:
        with torch.inference_mode():
            pixels = normalizer(torch.from_numpy(np.stack([exact, fast])))
            embeddings = model.embed(pixels) if hasattr(model, "embed") else model(pixels).embedding
            return float(torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0))

    return cosine


def report(results: Sequence[SizeResult], margin: int, weights: str) -> str:
    lines = [
        f"fast decode vs exact (FAST_DRAFT_MARGIN={margin}; grey levels 0-255; JPEG q90 unless noted; {weights})",
        (
            f"{'size':<26} {'fmt':<5} {'imgs':>4} {'drafted':>7} {'exact':>5} {'max':>4} {'mean':>6} {'p99':>5} "
            f"{'min cos':>8} {'base cos':>8} {'q95 mean':>8} {'exact/s':>8} {'fast/s':>8} {'speedup':>7}"
        ),
    ]
    for result in results:
        cos = f"{min(result.cosines):.5f}" if result.cosines else "-"
        base = f"{result.baseline_cosine:.5f}" if result.baseline_cosine is not None else "-"
        q95 = f"{result.q95_mean_diff:.3f}" if result.q95_mean_diff is not None else "-"
        lines.append(
            f"{result.label:<26} {result.image_format:<5} {result.images:>4} {result.drafted:>7} "
            f"{result.bit_exact_images:>5} {result.max_diff:>4} {result.mean_diff:>6.3f} {result.p99_diff:>5.1f} "
            f"{cos:>8} {base:>8} {q95:>8} {result.exact_images_per_s:>8.1f} {result.fast_images_per_s:>8.1f} {result.speedup:>6.2f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fastpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint for the embedding cosine (default: random full-size)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vit-hybrid-batch")
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS), help="scikit-image photo names")
    parser.add_argument("--embedding-images", type=int, default=2, help="images per size class run through the model")
    parser.add_argument("--margin", type=int, nargs="+", default=[1, 2], help="FAST_DRAFT_MARGIN values to study")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing window per size class and path")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    processor = ViTHybridImageProcessor(
        size={"shortest_edge": 384}, crop_size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    items = corpus(SIZES, args.photos)
    embedder = make_embedder(args.model, args.cache) if args.embedding_images > 0 else None
    weights = "trained weights" if args.model else "random full-size weights: cosines are a lower bound"
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; photos: {', '.join(args.photos)}")
    figures: dict[str, Any] = {"photos": args.photos, "weights": args.model or "random", "runs": {}}
    saved = processing.FAST_DRAFT_MARGIN
    try:
        for margin in args.margin:
            processing.FAST_DRAFT_MARGIN = margin
            results = measure(processor, items, embedder=embedder, embedding_images=args.embedding_images,
                              min_seconds=args.min_seconds)
            print(report(results, margin, weights))
            figures["runs"][str(margin)] = [{**asdict(result), "speedup": result.speedup} for result in results]
    finally:
        processing.FAST_DRAFT_MARGIN = saved
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
    sys.exit(0)
