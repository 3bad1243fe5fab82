"""Benchmark stage ``decode``: decode + preprocess images/s per CPU core (one thread), per kind of JPEG, on three
paths -- ``decode_sample(fast=True)``, ``fast=False`` (exact), and PIL + transformers' processor (the reference) --
and the largest pixel difference between fast and exact."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.measures import EncodedImage
from benchmarks.stages import BenchmarkContext

NEEDS: tuple[str, ...] = ("inputs",)


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


def decode_pixels(data: bytes, processor: Any, *, fast: bool) -> np.ndarray:
    """The uint8 crop the pipeline's decode stage makes of ``data``; RuntimeError if it fails (benchmark inputs
    are all good)."""
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
            fast = images_per_second(lambda data: decode_pixels(data, processor, fast=True), images, min_seconds)
            exact = images_per_second(lambda data: decode_pixels(data, processor, fast=False), images, min_seconds)
            ref = None
            if reference is not None:
                ref = images_per_second(
                    lambda data: reference(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"],
                    images,
                    min_seconds,
                )
            deviation = max(
                int(np.abs(decode_pixels(image.data, processor, fast=True).astype(np.int16)
                           - decode_pixels(image.data, processor, fast=False)).max())
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


def run(context: BenchmarkContext) -> dict[str, Any]:
    shared = context.shared
    per_kind = measure_decode(shared["image_sets"], shared["processor"], shared["reference"],
                              context.settings.decode_seconds)
    return {
        "kinds": list(per_kind),
        "per_kind": per_kind,
        "reference_note": "transformers installed" if shared["reference"] is not None
        else "skipped: transformers not installed",
    }
