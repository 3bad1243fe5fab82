"""The inference stage: load the model once per actor, turn uint8 pixel batches into predictions and embeddings.

The compute (:func:`predict`) is a plain function of tensors so that it is tested without Ray; :class:`BatchInference`
is what each inference actor holds: the model, loaded once, and the per-batch work around it. Ray Data's
``map_batches`` runs it in a pool of actors, one per GPU (or one per node where the cluster has no GPU), through
:class:`pipeline.actor.InferenceActor`, which the driver names without importing this module (or torch).

Keeping the device busy
    A call has three parts: *prepare* (pick the rows that decoded, stage them in page-locked memory, start the copy
    to the device on a side stream), *compute* (normalise, run the model, top-k, copy the small results back) and
    *rows* (build the Arrow result table). Only compute uses the device, so only compute holds the actor's lock:
    Ray Data runs :data:`CONCURRENT_CALLS` calls of one actor at once in threads (``ActorPoolStrategy(
    max_concurrent_calls_per_actor=..., enable_true_multi_threading=True)``, see :func:`actor_pool_arguments`), and
    while one call computes, the next one prepares and the previous one builds its rows. Torch releases the GIL
    inside its kernels and copies, so the host work really runs beside the device's. Ray Data's own alternative
    (threads for fetching and batching only, the UDF serialised) cannot overlap *our* host work, which is most of it.

Lanes on a CPU node
    A CPU actor holds all of its node's inference cores as ``compute_lanes`` concurrent calls, each computing a whole
    batch on ``torch_threads`` (normally one) intra-op threads (:func:`pipeline.cpu.size_cpu_node`): the lanes share
    one process, one import of torch and Ray Data and one copy of the weights, and never wait for each other at an
    intra-op barrier. The model is safe to call from several threads: inference reads its parameters only, and the
    one lazily built state (the standardised conv weights' cache) is built by the warm-up and swapped in as one
    attribute.

Copies the host makes per image (a 384x384 crop is 442 KB, one copy ~20-80 us on one core)
    * CPU, no padding: none. The Arrow buffer is handed to torch as it is; when some rows failed to decode, the model
      runs on each run of good rows in place (a few smaller calls; on a CPU a call costs next to nothing beside an
      image's second of compute) instead of gathering them into a new buffer;
    * padding (GPUs, ``--compile``): one (the good rows gathered straight into a reused buffer);
    * CUDA: one (into a reused page-locked buffer, from which the device copies by DMA, asynchronously).
    The older path made two or three (a boolean-mask copy, ``np.ascontiguousarray``, ``pin_memory()``).

Fixed batch shapes
    With ``pad_to_batch`` (on for GPUs and for ``--compile``) every model call sees exactly ``batch_size`` rows: a
    short tail batch, or one with failed rows removed, is padded with whatever the staging buffer held (real earlier
    crops or zeros). Rows of this network do not interact (GroupNorm and LayerNorm are per sample, attention is
    within an image), so padding cannot change a real row's result; it keeps cuDNN's tuned kernels and a compiled
    graph valid for every call instead of re-tuning or recompiling for each new tail size.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from model import ViTHybridForImageClassification
from model.configuration import ViTHybridConfig
from model.numerics import numerics_policy
from model.processing import ViTHybridImageProcessor
from pipeline.actor import CONCURRENT_CALLS, InferenceSettings
from pipeline.config import NO_ERROR, NOT_LAST_ROW, canonical_dtype
from pipeline.decode import decode_batch
from pipeline.failpoints import failpoint, record_placement
from pipeline.sink import build_output_table
from pipeline.standin import ENVIRONMENT_VARIABLE as STAND_IN_VARIABLE
from pipeline.standin import StandInModel, StandInNormalizer, stand_in_latency_s

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Side in pixels of the one image an unpadded (CPU) actor warms up on (see BatchInference._warm_up).
CPU_WARM_UP_SIDE = 64

# Longest wait for the GIL when a call hands the device to the next one (see BatchInference.__init__).
SWITCH_INTERVAL_S = 0.0005

# Test seam: actors asked for "cuda" compute on the CPU, keeping the GPU path's dtype and padding. Lets tests run the
# decision "this job uses GPUs" end to end on fake GPU nodes (``ray.cluster_utils``-style autoscaling clusters).
GPU_ON_CPU_VARIABLE = "VIT_HYBRID_GPU_ACTORS_ON_CPU"


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the GPU that Ray assigned to this actor when there is one, else the CPU.

    With ``VIT_HYBRID_GPU_ACTORS_ON_CPU=1`` (tests only) a request for ``cuda`` gives the CPU.
    """
    if requested == "cuda" and os.environ.get(GPU_ON_CPU_VARIABLE) == "1":
        return torch.device("cpu")
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
    model: Any,
    normalizer: torch.nn.Module,
    pixels: torch.Tensor,
    *,
    top_k: int | None,
    rows: int | None = None,
) -> Predictions:
    """Run the model on a uint8 (N, H, W, 3) batch already on the model's device; return the first ``rows`` rows.

    Normalisation happens here, on the device, because uint8 is 4x less data than float32 to move between workers
    and onto the GPU. Softmax and top-k also run on the device so that only (N, k) numbers come back, never the
    (N, num_labels) logits. Scores are computed in float32 whatever the model dtype, so that probabilities sum to 1.
    ``rows`` (default: all) drops padding rows on the device, before anything is copied back.
    """
    keep = pixels.shape[0] if rows is None else rows
    pixel_values = normalizer(pixels)
    if top_k is None:
        embeddings = model.embed(pixel_values)[:keep]
        return Predictions(embeddings.float().cpu().numpy(), None, None)
    output = model(pixel_values)
    probabilities = torch.softmax(output.logits[:keep].float(), dim=-1)
    scores, ids = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
    return Predictions(
        output.embedding[:keep].float().cpu().numpy(),
        ids.to(torch.int32).cpu().numpy(),
        scores.cpu().numpy(),
    )


@dataclass
class _Prepared:
    """A batch's good rows, on the model's device (or on their way there), ready for :func:`predict`."""

    pixels: torch.Tensor  # (padded rows, H, W, 3) uint8 on the model's device
    rows: int  # real rows; the rest is padding
    staging: torch.Tensor | None  # host buffer to hand back once the copy has landed
    copied: Any = None  # torch.cuda.Event recorded after the host-to-device copy
    runs: list[tuple[int, int]] | None = None  # CPU, failed rows: the good rows of ``pixels`` as [start, stop) runs


def _good_runs(good: np.ndarray) -> list[tuple[int, int]]:
    """The ``[start, stop)`` runs of consecutive set entries of ``good``, in order."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], good.view(np.int8), [0]))))
    return [(int(start), int(stop)) for start, stop in zip(edges[0::2], edges[1::2])]


def _gather_rows(source: torch.Tensor, good: np.ndarray, target: torch.Tensor) -> None:
    """Copy the rows where ``good`` is set into the first rows of ``target``, run by run.

    Failed rows are rare and scattered, so the good rows form a few long runs; one ``copy_`` per run moves memory at
    memcpy speed, where a row-indexed gather (``index_select``, boolean masks) is several times slower per byte.
    """
    written = 0
    for start, stop in _good_runs(good):
        target[written : written + stop - start].copy_(source[start:stop])
        written += stop - start


class _StagingBuffers:
    """Reused host buffers (page-locked for CUDA) with room for one batch each, shared by the actor's threads.

    Allocating page-locked memory costs far more than copying into it, and a fresh 113 MB buffer per batch would
    also churn the allocator; so buffers are kept and handed out one per concurrent call.
    """

    def __init__(self, pinned: bool, keep: int = CONCURRENT_CALLS) -> None:
        self._pinned = pinned
        self._keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            for index, buffer in enumerate(self._free):
                if buffer.shape[0] >= rows and tuple(buffer.shape[1:]) == shape:
                    return self._free.pop(index)
        buffer = torch.zeros((rows, *shape), dtype=torch.uint8)  # zeros: padding never reads uninitialised memory
        return buffer.pin_memory() if self._pinned else buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self._keep:  # unpadded batches of growing sizes: keep the largest few
                self._free.sort(key=lambda kept: kept.shape[0], reverse=True)
                del self._free[self._keep :]


class BatchInference:
    """An inference actor's state and work: loads the model once, then maps decoded batches to output rows.

    Input batches (numpy format) carry ``pixels`` (N, H, W, 3) uint8 and ``error`` (``""`` or None for good rows),
    plus bookkeeping columns that pass through. Rows that already failed upstream are not run through the model; they
    come out as error rows with null predictions, so every input sample still yields exactly one output row, in the
    order it came. Safe to call from several threads at once (see the module docstring).
    """

    def __init__(self, settings: InferenceSettings) -> None:
        from pipeline.versions import check_this_worker

        check_this_worker()  # a node the autoscaler added after start-up may run other versions than the driver
        record_placement("actor")  # inert unless VIT_HYBRID_PLACEMENT_LOG is set (multi-node tests)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.device = resolve_device(settings.device)
        # The dtype follows the device that was asked for (bf16 for "cuda" even under the CPU test seam), so that it
        # is the dtype the driver recorded in the job's fingerprint.
        requested_device = torch.device("cuda") if settings.device == "cuda" else self.device
        self.dtype = resolve_dtype(settings.dtype, requested_device)
        processor = ViTHybridImageProcessor.from_pretrained(settings.model_uri, storage_options=settings.storage_options)
        self.processor = processor
        self._decoders = (
            ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
            if settings.decode_in_actor and settings.decode_threads > 1 else None
        )
        numerics_policy(str(self.dtype).removeprefix("torch.")).apply()  # the policy the fingerprint records
        latency_s = stand_in_latency_s()
        self.model: torch.nn.Module
        self.normalizer: torch.nn.Module
        if latency_s is None:
            # No sha256 of the weights here: the job's fingerprint identifies them (model.weights.checkpoint_fingerprint).
            self.model = ViTHybridForImageClassification.from_pretrained(
                settings.model_uri, storage_options=settings.storage_options, dtype=self.dtype, device=self.device,
                digest=False,
            )
            self.normalizer = processor.normalizer(device=self.device, dtype=self.dtype)
        else:
            logger.warning("%s is set: a stand-in of %.0f ms per batch replaces the model; outputs mean nothing",
                           STAND_IN_VARIABLE, latency_s * 1000)
            config = ViTHybridConfig.from_pretrained(settings.model_uri, storage_options=settings.storage_options)
            self.model = StandInModel(config, latency_s).to(self.device)
            self.normalizer = StandInNormalizer(dtype=self.dtype)
        if settings.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        model_config: Any = self.model.config
        self.config = model_config
        if settings.compile:
            # dynamic=False: padding fixes the batch shape, so one graph serves every call.
            self.model = torch.compile(self.model, dynamic=False)
        self.id2label: dict[int | str, str] = {int(k): v for k, v in model_config.id2label.items()}
        self.hidden_size: int = model_config.hidden_size
        # One call computes at a time on a GPU (one device); a CPU actor runs its lanes side by side, each call on
        # its own torch.get_num_threads() intra-op threads (torch releases the GIL inside its kernels).
        self._compute_slots = threading.BoundedSemaphore(max(1, settings.compute_lanes))
        # When one call leaves the model, the next call (waiting for its slot) also needs the GIL, which the leaving
        # call holds while it builds its rows: with the default 5 ms switch interval every hand-over idles the device
        # for up to 5 ms (5 % of a 100 ms batch). A shorter interval hands the GIL over within 0.5 ms.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._staging = _StagingBuffers(pinned=self.device.type == "cuda", keep=max(CONCURRENT_CALLS, settings.compute_lanes))
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._warm_up()
        logger.info("inference actor ready: %s on %s in %s (padding %s, compile %s)", settings.model_uri, self.device,
                    self.dtype, settings.pad_to_batch, settings.compile)

    @property
    def top_k(self) -> int | None:
        return self.settings.top_k if self.settings.task == "classify" else None

    def _warm_up(self) -> None:
        """One forward pass, once per actor, so that the first real batch does not pay for what is built lazily.

        With fixed batch shapes (padding: GPUs, ``--compile``) it runs a full batch at the model's input size:
        cuDNN picks its kernels and a compiled graph is built for the one shape every later call has. Without
        (CPUs), what a first call builds does not depend on the image size (the standardised conv weights' cache,
        torch's and oneDNN's first-call set-up; oneDNN's per-shape primitives take milliseconds), so one image of
        :data:`CPU_WARM_UP_SIDE` pixels a side runs every layer (position embeddings resampled) for ~3 % of the cost
        of a full-size image. Measured on a 2-core AVX2 machine, one thread: a 384x384 warm-up took 1.9-2.3 s of the
        actor's start-up and the first batch after it was no faster than after none (within +-0.1 s).
        """
        height, width = self.processor.output_size
        padded = self.settings.pad_to_batch and bool(self.settings.batch_size)
        if padded or not isinstance(self.model, ViTHybridForImageClassification) or max(height, width) <= CPU_WARM_UP_SIDE:
            rows = self.settings.batch_size if padded and self.settings.batch_size else 1
            pixels = torch.zeros((rows, height, width, 3), dtype=torch.uint8, device=self.device)
            predict(self.model, self.normalizer, pixels, top_k=self.top_k)
            return
        pixels = torch.zeros((1, CPU_WARM_UP_SIDE, CPU_WARM_UP_SIDE, 3), dtype=torch.uint8, device=self.device)
        with torch.inference_mode():
            pixel_values = self.normalizer(pixels)
            if self.top_k is None:
                self.model.embed(pixel_values, interpolate_pos_encoding=True)
            else:
                self.model(pixel_values, interpolate_pos_encoding=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        failpoint("infer.batch")
        if self.settings.decode_in_actor:
            batch = self.decode(batch)
        errors = [error if error != NO_ERROR and error is not None else None for error in batch["error"]]
        good = np.fromiter((error is None for error in errors), dtype=bool, count=len(errors))
        result: Predictions | None = None
        if good.any():
            prepared = self.prepare(batch["pixels"], good)
            try:
                with self._compute_slots:
                    result = self.compute(prepared)
            finally:
                if prepared.staging is not None:
                    self._staging.give_back(prepared.staging)
        return self.rows(batch, errors, good, result)

    # --------------------------------------------------------------------------------------------- the three parts

    def decode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """File bytes -> uint8 crops beside the device (``decode_location="actor"``), in threads: Pillow releases the
        GIL while it decodes and resizes. One output row per input row, as :func:`pipeline.decode.decode_batch`."""
        if self._decoders is None or len(batch["key"]) < 2:
            return decode_batch(batch, processor=self.processor, fast=self.settings.fast_decode,
                                max_image_pixels=self.settings.max_image_pixels,
                                exif_orientation=self.settings.exif_orientation)
        count = len(batch["key"])
        bounds = np.linspace(0, count, min(count, self.settings.decode_threads) + 1).astype(int)
        pieces = list(self._decoders.map(
            lambda edge: decode_batch(
                {name: column[edge[0] : edge[1]] for name, column in batch.items()}, processor=self.processor,
                fast=self.settings.fast_decode, max_image_pixels=self.settings.max_image_pixels,
                exif_orientation=self.settings.exif_orientation,
            ),
            itertools.pairwise(bounds),
        ))
        return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}

    def prepare(self, pixels: np.ndarray, good: np.ndarray) -> _Prepared:
        """Host half: the good rows, padded when asked, on the device (CUDA: copy started, not waited for)."""
        count = int(good.sum())
        all_good = count == len(good)
        with warnings.catch_warnings():
            # Ray hands over read-only views of Arrow buffers; torch warns about them although nothing writes here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            source = torch.from_numpy(pixels)
        padded = self._padded_rows(count)
        if self.device.type != "cuda" and padded == count and source.is_contiguous():
            # Zero-copy: the batch as Ray delivered it; failed rows are skipped by running the good runs in place.
            return _Prepared(source, count, staging=None, runs=None if all_good else _good_runs(good))
        staging = self._staging.take(padded, tuple(source.shape[1:]))
        target = staging[:padded]
        if all_good:
            target[:count].copy_(source)
        else:
            _gather_rows(source, good, target)
        if self._copy_stream is None:
            return _Prepared(target, count, staging=staging)
        with torch.cuda.stream(self._copy_stream):
            on_device = target.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return _Prepared(on_device, count, staging=staging, copied=copied)

    def compute(self, prepared: _Prepared) -> Predictions:
        """Device half, in one of the actor's compute slots: model calls of at most ``batch_size`` rows each."""
        pixels = prepared.pixels
        if prepared.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(prepared.copied)
            pixels.record_stream(torch.cuda.current_stream(self.device))  # the copy stream's memory, used here
        pieces = []
        if prepared.runs is not None:
            for start, stop in prepared.runs:
                pieces.append(predict(self.model, self.normalizer, pixels[start:stop], top_k=self.top_k))
        else:
            step = int(self.settings.batch_size or 0) if self.settings.pad_to_batch else int(pixels.shape[0])
            for start in range(0, prepared.rows, step):
                rows = min(step, prepared.rows - start)
                pieces.append(predict(self.model, self.normalizer, pixels[start : start + step], top_k=self.top_k, rows=rows))
        if prepared.copied is not None:
            prepared.copied.synchronize()  # (already past: results came back) the staging buffer may be reused
        if len(pieces) == 1:
            return pieces[0]
        return Predictions(
            np.concatenate([piece.embeddings for piece in pieces]),
            None if pieces[0].topk_ids is None else np.concatenate([piece.topk_ids for piece in pieces]),
            None if pieces[0].topk_scores is None else np.concatenate([piece.topk_scores for piece in pieces]),
        )

    def rows(
        self, batch: dict[str, np.ndarray], errors: list[str | None], good: np.ndarray, result: Predictions | None
    ) -> pa.Table:
        """Host half again: one output row per input row, in input order; failed rows carry their error."""
        count = len(errors)
        top_k = self.top_k
        width = 0 if top_k is None else (result.topk_ids.shape[1] if result is not None and result.topk_ids is not None else top_k)
        if result is not None and good.all():
            embeddings = result.embeddings
            topk_ids, topk_scores = result.topk_ids, result.topk_scores
        else:
            # Failed rows hold zeros; build_output_table nulls them from the error column.
            embeddings = np.zeros((count, self.hidden_size), dtype=np.float32)
            topk_ids = np.zeros((count, width), dtype=np.int32)
            topk_scores = np.zeros((count, width), dtype=np.float32)
            if result is not None:
                embeddings[good] = result.embeddings
                if result.topk_ids is not None and result.topk_scores is not None:
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

    def _padded_rows(self, rows: int) -> int:
        """Rows the model will see: ``rows`` rounded up to a whole number of batches when shapes are fixed."""
        if not self.settings.pad_to_batch:
            return rows
        step = int(self.settings.batch_size or rows)
        return -(-rows // step) * step
