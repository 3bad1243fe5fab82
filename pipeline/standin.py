"""A stand-in for the network with a fixed latency per batch: measures the pipeline's own costs, not the model's.

Benchmarks and scale tests need full-width result rows (a ``hidden_size`` embedding, ``num_labels`` logits) at the
rate a fast GPU would produce them, on a CPU that runs the real network at about one image per second. With the
environment variable ``VIT_HYBRID_STAND_IN_MODEL`` set to a latency in milliseconds (``0`` for none), every inference
actor builds :class:`StandInModel` from the checkpoint's ``config.json`` instead of loading the weights. Ray workers
inherit the variable from the process that started Ray, as with :mod:`pipeline.failpoints`. Never set it for real
work: the actor logs a warning, and the outputs, though they depend on the pixels, mean nothing.

The stand-in replaces the whole device half of the actor, normalisation included (:class:`StandInNormalizer` samples
an 8x8 grid of the uint8 crop): on a GPU both take a few milliseconds per batch, while on this project's CPUs the
real normaliser alone would take longer than the latency being simulated, and the measurement would be of it.
"""

from __future__ import annotations

import os
import time

import torch
from torch import Tensor, nn

from model.configuration import ViTHybridConfig
from model.modeling import ImageClassifierOutput

ENVIRONMENT_VARIABLE = "VIT_HYBRID_STAND_IN_MODEL"


def stand_in_latency_s() -> float | None:
    """The stand-in's latency per batch in seconds when the variable is set, else None (use the real model)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if value is None or value == "":
        return None
    try:
        milliseconds = float(value)
    except ValueError:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: expected a latency in milliseconds, e.g. 100") from None
    if milliseconds < 0:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: the latency cannot be negative")
    return milliseconds / 1000.0


class StandInNormalizer(nn.Module):
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, 8, 8)``: an 8x8 grid of pixels sampled from each crop, scaled to
    [0, 1]. Costs microseconds per batch, so that the stand-in's latency is the device time being simulated."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, pixels: Tensor) -> Tensor:
        height, width = pixels.shape[1], pixels.shape[2]
        grid = pixels[:, :: max(1, height // 8), :: max(1, width // 8), :][:, :8, :8, :]
        return grid.permute(0, 3, 1, 2).to(self.dtype) / 255.0


class StandInModel(nn.Module):
    """Same interface as :class:`model.ViTHybridForImageClassification` (``forward`` -> logits and embedding,
    ``embed``), computed from an 8x8 thumbnail of the input by two fixed random projections, then held back until
    ``latency_s`` has passed since the call began, the way a device of fixed speed would return."""

    def __init__(self, config: ViTHybridConfig, latency_s: float, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.latency_s = latency_s
        generator = torch.Generator().manual_seed(seed)
        thumbnail = config.num_channels * 8 * 8
        self.register_buffer("to_embedding", torch.randn(thumbnail, config.hidden_size, generator=generator) / thumbnail**0.5)
        self.register_buffer("to_logits", torch.randn(config.hidden_size, max(config.num_labels, 1), generator=generator))

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        return self(pixel_values).embedding

    def forward(self, pixel_values: Tensor, **_: object) -> ImageClassifierOutput:
        started = time.perf_counter()
        thumbnails = nn.functional.adaptive_avg_pool2d(pixel_values.float(), 8).flatten(1)
        embedding = (thumbnails @ self.to_embedding.float()).to(pixel_values.dtype)
        logits = embedding.float() @ self.to_logits.float()
        remaining = self.latency_s - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return ImageClassifierOutput(logits=logits, embedding=embedding)
