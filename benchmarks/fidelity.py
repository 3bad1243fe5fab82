"""Benchmark stage ``fidelity``: what bf16 costs in fidelity against fp32, on real photographs (one exact crop of each
of scikit-image's sample photos): the cosine between each photo's bf16 and fp32 embedding, and top-1 agreement.

Why it is measured and not assumed: ``--dtype auto`` picks bf16 on CPUs with AVX512-BF16 or AMX (and on GPUs); the
speed is worth it only if the embeddings stay what fp32 gives. The distance between different photos' embeddings is
printed beside it, for scale. With random weights (no ``--model``) top-1 agreement says little -- a random network
is chaotic, and bf16 rounding moves its output like any tiny input change does -- so judge top-1 with trained
weights; the cosine is meaningful either way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from benchmarks.stages import BenchmarkContext

NEEDS: tuple[str, ...] = ("inputs",)


def _cosine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return (left * right).sum(axis=1) / (np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1))


def compare_dtypes(model_uri: str, processor: Any, crops: np.ndarray, device: str) -> dict[str, Any]:
    """fp32 vs bf16 embeddings and top-1 classes of ``crops`` (uint8 ``(N, H, W, 3)``) through the native model."""
    from model import ViTHybridForImageClassification
    from pipeline.infer import predict

    outputs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = ViTHybridForImageClassification.from_pretrained(model_uri, dtype=dtype, device=torch.device(device))
        normalizer = processor.normalizer(device=torch.device(device), dtype=dtype)
        pixels = torch.from_numpy(crops).to(device)
        started = time.perf_counter()
        outputs[str(dtype)] = predict(model, normalizer, pixels, top_k=1)
        seconds[str(dtype).removeprefix("torch.")] = time.perf_counter() - started
        del model
    fp32, bf16 = outputs[str(torch.float32)], outputs[str(torch.bfloat16)]
    cosines = _cosine(fp32.embeddings, bf16.embeddings)
    between = [
        float(_cosine(fp32.embeddings[i : i + 1], fp32.embeddings[j : j + 1])[0])
        for i in range(len(crops)) for j in range(i + 1, len(crops))
    ]
    return {
        "images": len(crops),
        "embedding_cosine_mean": float(cosines.mean()),
        "embedding_cosine_min": float(cosines.min()),
        "top1_agree": int((fp32.topk_ids[:, 0] == bf16.topk_ids[:, 0]).sum()),
        "distinct_top1_fp32": len(set(fp32.topk_ids[:, 0].tolist())),
        "cosine_between_photos_median": float(np.median(between)) if between else None,
        "seconds": seconds,
    }


def run(context: BenchmarkContext) -> dict[str, Any]:
    shared = context.shared
    threads = torch.get_num_threads()
    if context.settings.device == "cpu":
        torch.set_num_threads(context.settings.torch_threads)  # not a timing that matters: every core the job has
    try:
        figures = compare_dtypes(str(shared["checkpoint"]), shared["processor"], shared["photo_crops"],
                                 context.settings.device)
    finally:
        torch.set_num_threads(threads)
    figures["weights"] = "trained (--model)" if context.settings.model else "random: top-1 agreement means little"
    return figures


def report_lines(results: Mapping[str, Any]) -> list[str]:
    fidelity = results["fidelity"]
    between = fidelity["cosine_between_photos_median"]
    return [
        "",
        f"5. bf16 fidelity vs fp32 ({fidelity['images']} real photographs, exact crops; {fidelity['weights']})",
        (
            f"   embedding cosine   {fidelity['embedding_cosine_mean']:>10.5f} mean, "
            f"{fidelity['embedding_cosine_min']:.5f} min   (different photos, fp32: median cosine "
            f"{'-' if between is None else f'{between:.4f}'})"
        ),
        (
            f"   top-1 agreement    {fidelity['top1_agree']:>7}/{fidelity['images']}      "
            f"({fidelity['distinct_top1_fp32']} distinct fp32 classes; one pass each: fp32 "
            f"{fidelity['seconds']['float32']:.1f} s, bf16 {fidelity['seconds']['bfloat16']:.1f} s)"
        ),
    ]
