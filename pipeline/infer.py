"""The inference stage: load the model once per actor, turn uint8 pixel batches into predictions and embeddings.

The compute (:func:`predict`) is a plain function of tensors so that it is tested without Ray; :class:`InferenceActor`
is the thin callable class that Ray Data's ``map_batches`` runs in a pool of actors, one per GPU (or per group of CPU
cores where the cluster has no GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from model import ViTHybridForImageClassification
from model.configuration import ViTHybridConfig
from model.processing import ViTHybridImageProcessor
from pipeline.config import NO_ERROR, NOT_LAST_ROW, canonical_dtype
from pipeline.failpoints import failpoint
from pipeline.sink import build_output_table
from pipeline.standin import ENVIRONMENT_VARIABLE as STAND_IN_VARIABLE
from pipeline.standin import StandInModel, stand_in_latency_s

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the GPU that Ray assigned to this actor when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU (tensor cores) and fp32 on a CPU (bf16 has no fast path on most CPUs)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[canonical_dtype(requested)]


@dataclass(frozen=True)
class Predictions:
    """What the model says about a batch: float32 embeddings and the top-k classes with softmax scores."""

    embeddings: np.ndarray  # (N, hidden_size) float32
    topk_ids: np.ndarray | None  # (N, k) int32, None for embeddings-only jobs
    topk_scores: np.ndarray | None  # (N, k) float32


@torch.inference_mode()
def predict(
    model: ViTHybridForImageClassification,
    normalizer: torch.nn.Module,
    pixels: torch.Tensor,
    *,
    top_k: int | None,
) -> Predictions:
    """Run the model on a uint8 (N, H, W, 3) batch already on the model's device.

    Normalisation happens here, on the device, because uint8 is 4x less data than float32 to move between workers
    and onto the GPU. Softmax and top-k also run on the device so that only (N, k) numbers come back, never the
    (N, num_labels) logits. Scores are computed in float32 whatever the model dtype, so that probabilities sum to 1.
    """
    pixel_values = normalizer(pixels)
    if top_k is None:
        embeddings = model.embed(pixel_values)
        return Predictions(embeddings.float().cpu().numpy(), None, None)
    output = model(pixel_values)
    probabilities = torch.softmax(output.logits.float(), dim=-1)
    scores, ids = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
    return Predictions(
        output.embedding.float().cpu().numpy(),
        ids.to(torch.int32).cpu().numpy(),
        scores.cpu().numpy(),
    )


@dataclass(frozen=True)
class InferenceSettings:
    """Everything an actor needs to build its model; small and picklable, sent once per actor."""

    model_uri: str
    task: str  # "classify" or "embed"
    top_k: int = 5
    dtype: str = "auto"
    device: str = "auto"
    embedding_dtype: str = "float32"
    normalize_embeddings: bool = False
    torch_threads: int | None = None
    channels_last: bool = True
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # may hold credentials


class InferenceActor:
    """Ray Data callable class: loads the model once, then maps decoded batches to output rows.

    Input batches (numpy format) carry ``pixels`` (N, H, W, 3) uint8 and ``error`` (None for good rows), plus
    bookkeeping columns that pass through. Rows that already failed upstream are not run through the model; they
    come out as error rows with null predictions, so every input sample still yields exactly one output row.
    """

    def __init__(self, settings: InferenceSettings) -> None:
        from pipeline.versions import check_this_worker

        check_this_worker()  # a node the autoscaler added after start-up may run other versions than the driver
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        latency_s = stand_in_latency_s()
        if latency_s is None:
            self.model = ViTHybridForImageClassification.from_pretrained(
                settings.model_uri, storage_options=settings.storage_options, dtype=self.dtype, device=self.device
            )
        else:
            logger.warning("%s is set: a stand-in of %.0f ms per batch replaces the model; outputs mean nothing",
                           STAND_IN_VARIABLE, latency_s * 1000)
            config = ViTHybridConfig.from_pretrained(settings.model_uri, storage_options=settings.storage_options)
            self.model = StandInModel(config, latency_s).to(self.device)
        if settings.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        processor = ViTHybridImageProcessor.from_pretrained(settings.model_uri, storage_options=settings.storage_options)
        self.normalizer = processor.normalizer(device=self.device, dtype=self.dtype)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.hidden_size = self.model.config.hidden_size
        logger.info("inference actor ready: %s on %s in %s", settings.model_uri, self.device, self.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        failpoint("infer.batch")
        errors = [error if error != NO_ERROR else None for error in batch["error"]]
        good = np.array([error is None for error in errors], dtype=bool)
        count = len(errors)
        embeddings = np.zeros((count, self.hidden_size), dtype=np.float32)
        top_k = self.settings.top_k if self.settings.task == "classify" else None
        topk_ids = np.zeros((count, top_k or 0), dtype=np.int32)
        topk_scores = np.zeros((count, top_k or 0), dtype=np.float32)
        if good.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            if self.device.type == "cuda":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            result = predict(self.model, self.normalizer, pixels, top_k=top_k)
            embeddings[good] = result.embeddings
            if result.topk_ids is not None:
                topk_ids = np.zeros((count, result.topk_ids.shape[1]), dtype=np.int32)
                topk_scores = np.zeros((count, result.topk_ids.shape[1]), dtype=np.float32)
                topk_ids[good] = result.topk_ids
                topk_scores[good] = result.topk_scores
        table = build_output_table(
            self.settings.task,
            keys=batch["key"],
            sources=batch["source"],
            ordinals=batch["ordinal"],
            errors=errors,
            embeddings=embeddings,
            topk_ids=topk_ids if top_k else None,
            topk_scores=topk_scores if top_k else None,
            id2label=self.id2label,
            hidden_size=self.hidden_size,
            embedding_dtype=self.settings.embedding_dtype,
            normalize_embeddings=self.settings.normalize_embeddings,
        )
        table = table.append_column("shard_id", pa.array(batch["shard_id"], type=pa.string()))
        shard_rows = np.asarray(batch["shard_rows"], dtype=np.int64)
        return table.append_column("shard_rows", pa.array(shard_rows, mask=shard_rows == NOT_LAST_ROW))
