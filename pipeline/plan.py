"""A typed job config -> the Ray Data plan, run to completion with shard-level commits.

The plan: input shards (a frozen list, recorded in the output so a rerun resumes the same work) -> CPU tasks that
read each shard and decode + preprocess its images to uint8 -> a pool of inference actors -> the driver, which groups
result rows by shard and commits each shard's Parquet files once all its rows have arrived. See
:mod:`pipeline.manifest` for the commit protocol and why it gives exactly-once output across kills and reruns.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from model.processing import ViTHybridImageProcessor
from pipeline import decode, sources
from pipeline.infer import NO_ERROR, NOT_LAST_ROW, InferenceActor, InferenceSettings
from pipeline.manifest import JobFingerprint, OutputState, ShardAssembler, sanitize_arguments
from pipeline.sink import commit_shard, output_schema

logger = logging.getLogger(__name__)

TASKS = ("classify", "embed")


@dataclass
class JobConfig:
    """Every setting of a job, built once from the command line and passed down whole."""

    task: str
    input: str
    output: str
    model: str
    format: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    id_column: str | None = None
    image_column: str | None = None
    images_per_shard: int = 256
    batch_size: int | None = None
    top_k: int = 5
    dtype: str = "auto"
    device: str = "auto"
    embedding_dtype: str = "float32"
    normalize_embeddings: bool = False
    rows_per_file: int = 100_000
    min_actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float = 1.0
    decode_memory_mb: int = 512
    fast_decode: bool = True
    max_image_pixels: int = 89_478_485
    max_error_fraction: float = 0.5
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be within [0, 1], got {self.max_error_fraction}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise ValueError(f"embedding_dtype must be float32 or float16, got {self.embedding_dtype!r}")


@dataclass
class JobSummary:
    """The figures a job ends with; printed as one line and written as JSON beside the output."""

    output: str
    samples: int = 0
    errors: int = 0
    shards_total: int = 0
    shards_skipped: int = 0
    shards_committed: int = 0
    seconds: float = 0.0
    status: str = "running"

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 3)}

    def line(self) -> str:
        return (
            f"{self.status}: {self.samples} samples, {self.errors} errors, {self.seconds:.1f} s, "
            f"{self.images_per_s:.1f} images/s ({self.shards_committed} shards committed, "
            f"{self.shards_skipped} already done) -> {self.output}"
        )


class JobAborted(RuntimeError):
    """The job stopped on purpose (too many bad samples); what it finished is committed."""


def read_and_decode_shards(
    batch: dict[str, np.ndarray],
    *,
    storage_options: dict[str, Any],
    processor: ViTHybridImageProcessor,
    fast_decode: bool,
    max_image_pixels: int,
    id_column: str | None,
    image_column: str | None,
    rows_per_batch: int,
) -> Iterator[dict[str, Any]]:
    """Ray Data generator UDF: one input row names one shard; yield its samples decoded, a few rows at a time.

    Each yielded batch carries ``shard_id`` and ``shard_rows``: ``shard_rows`` is set on the shard's last row only
    (the total only becomes known at the end of a streamed tar), which is how the driver learns that a shard is
    complete. Holding back one batch is what lets us mark the last row without reading the shard twice.
    """
    for shard_json in batch["shard"]:
        shard = sources.Shard.from_dict(json.loads(shard_json))
        held: dict[str, Any] | None = None
        rows_seen = 0
        for table in sources.read_shard(
            shard,
            storage_options=storage_options,
            batch_rows=rows_per_batch,
            id_column=id_column,
            image_column=image_column,
        ):
            decoded = decode.decode_batch(
                table, processor=processor, fast=fast_decode, max_image_pixels=max_image_pixels
            )
            rows_seen += len(decoded["key"])
            if held is not None:
                yield held
            held = _with_shard_columns(decoded, shard.shard_id, last_row_total=None)
        if held is None:
            raise RuntimeError(f"shard {shard.shard_id} produced no rows; sources must yield at least one row")
        yield _with_shard_columns(held, shard.shard_id, last_row_total=rows_seen)


def _with_shard_columns(decoded: dict[str, Any], shard_id: str, *, last_row_total: int | None) -> dict[str, Any]:
    """Add the bookkeeping columns, in encodings that survive Ray's Arrow <-> NumPy conversions unchanged.

    A column of all-None values comes back from Ray as float NaN, so between stages "no error" travels as ``""`` and
    "not the last row" as ``-1``; :class:`pipeline.infer.InferenceActor` turns both back into nulls.
    """
    count = len(decoded["key"])
    shard_rows = np.full(count, NOT_LAST_ROW, dtype=np.int64)
    if last_row_total is not None:
        shard_rows[-1] = last_row_total
    errors = np.array([error or NO_ERROR for error in decoded["error"]], dtype=object)
    return {
        **decoded,
        "error": errors,
        "shard_id": np.full(count, shard_id, dtype=object),
        "shard_rows": shard_rows,
    }


def build_fingerprint(config: JobConfig, weights_sha256: str, processor: ViTHybridImageProcessor) -> JobFingerprint:
    """What the output depends on; a resume with anything different would mix incompatible rows."""
    return JobFingerprint(
        task=config.task,
        model_uri=config.model,
        weights_sha256=weights_sha256,
        preprocessing={**processor.to_dict(), "fast_decode": config.fast_decode},
        dtype=config.dtype,
        top_k=config.top_k if config.task == "classify" else None,
        embedding_dtype=config.embedding_dtype,
        normalize_embeddings=config.normalize_embeddings,
    )


def run_job(config: JobConfig) -> JobSummary:
    """Run (or resume) a job to completion and return its summary; raises JobAborted past the error budget.

    Ray must already be initialised (the jobs call ``ray.init()``), so the same code runs in-process and under
    ``ray job submit``.
    """
    import ray

    from model.configuration import ViTHybridConfig
    from model.weights import load_checkpoint

    started = time.monotonic()
    model_config = ViTHybridConfig.from_pretrained(config.model, storage_options=config.storage_options)
    # Reading the weights here (once, on the driver) fails fast on a bad --model and gives the sha256 for provenance.
    _, checkpoint = load_checkpoint(config.model, storage_options=config.storage_options)
    processor = ViTHybridImageProcessor.from_pretrained(config.model, storage_options=config.storage_options)
    fingerprint = build_fingerprint(config, checkpoint.sha256, processor)

    planned = sources.plan_shards(
        config.input,
        format=config.format,
        storage_options=config.storage_options,
        images_per_shard=config.images_per_shard,
    )
    state = OutputState.open(
        config.output,
        fingerprint,
        [shard.to_dict() for shard in planned],
        sanitize_arguments(asdict(config)),
        overwrite=config.overwrite,
        storage_options=config.storage_options,
    )
    plan = [sources.Shard.from_dict(item) for item in state.shard_plan]
    pending = [shard for shard in plan if shard.shard_id not in state.committed_shard_ids]
    summary = JobSummary(output=config.output, shards_total=len(plan), shards_skipped=len(plan) - len(pending))
    logger.info("%d shards planned, %d already committed, %d to do", len(plan), summary.shards_skipped, len(pending))

    schema = output_schema(config.task, model_config.hidden_size, config.embedding_dtype)
    if pending:
        dataset = _build_dataset(config, pending, processor, ray)
        try:
            _consume_and_commit(config, dataset, summary, state.parquet_metadata, schema)
        except JobAborted:
            summary.seconds = time.monotonic() - started
            state.write_summary(summary.to_dict())
            raise

    summary.seconds = time.monotonic() - started
    summary.status = "succeeded"
    state.finish(summary.to_dict())
    return summary


def _build_dataset(config, pending, processor, ray):  # noqa: ANN001 - internal glue, typed by callers
    from ray.data import ActorPoolStrategy

    gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0))
    if config.device == "cuda" and gpus_in_cluster == 0:
        raise ValueError("--device cuda was asked for, but the Ray cluster has no GPUs")
    use_gpu = config.device != "cpu" and gpus_in_cluster > 0
    batch_size = config.batch_size or (256 if use_gpu else 16)
    if use_gpu:
        max_actors = config.max_actors or gpus_in_cluster
        actor_resources = {"num_gpus": config.gpus_per_actor or 1, "num_cpus": config.cpus_per_actor or 1}
    else:
        max_actors = config.max_actors or 1
        actor_resources = {"num_cpus": config.cpus_per_actor or 1}
    threads = max(1, int(actor_resources["num_cpus"]))
    settings = InferenceSettings(
        model_uri=config.model,
        task=config.task,
        top_k=config.top_k,
        dtype=config.dtype,
        device="cuda" if use_gpu else "cpu",
        embedding_dtype=config.embedding_dtype,
        normalize_embeddings=config.normalize_embeddings,
        torch_threads=None if use_gpu else threads,
        storage_options=config.storage_options or None,
    )
    items = [{"shard": json.dumps(shard.to_dict())} for shard in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(
        read_and_decode_shards,
        batch_size=1,
        batch_format="numpy",
        num_cpus=config.decode_cpus,
        # A memory reservation bounds how many decodes of large photos share a node; it also keeps Ray Data from
        # fusing decode into the inference actors (fused, the actor would decode and infer in turn, serially).
        memory=config.decode_memory_mb * 1024 * 1024,
        fn_kwargs={
            "storage_options": config.storage_options,
            "processor": processor,
            "fast_decode": config.fast_decode,
            "max_image_pixels": config.max_image_pixels,
            "id_column": config.id_column,
            "image_column": config.image_column,
            "rows_per_batch": min(batch_size, 64),
        },
    )  # Ray Data retries a failed or killed task by default (max_retries=-1), re-reading its shard from the start.
    return dataset.map_batches(
        InferenceActor,
        fn_constructor_args=(settings,),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=min(config.min_actors, max_actors), max_size=max_actors),
        **actor_resources,
    )


def _consume_and_commit(
    config: JobConfig, dataset: Any, summary: JobSummary, metadata: dict[str, str], schema: pa.Schema
) -> None:
    """Pull result batches to the driver, commit each shard as soon as all its rows are in, watch the error budget."""
    assembler = ShardAssembler()
    in_flight: list[Future] = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="commit") as committer:
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            summary.samples += table.num_rows
            summary.errors += table.num_rows - table["error"].null_count
            for shard_id, shard_table in assembler.add(table):
                in_flight.append(
                    committer.submit(
                        commit_shard,
                        config.output,
                        shard_id,
                        shard_table,
                        rows_per_file=config.rows_per_file,
                        metadata=metadata,
                        storage_options=config.storage_options,
                        schema=schema,
                    )
                )
            in_flight = _collect_finished(in_flight, summary)
            if _error_budget_exceeded(summary, config.max_error_fraction):
                break
        for future in in_flight:
            future.result()
            summary.shards_committed += 1
    if _error_budget_exceeded(summary, config.max_error_fraction):
        summary.status = "aborted"
        raise JobAborted(
            f"{summary.errors} of {summary.samples} samples failed to decode "
            f"(more than --max-error-fraction {config.max_error_fraction}); "
            f"{summary.shards_committed} finished shards were committed to {config.output}. "
            "Check the input, or raise --max-error-fraction."
        )


MIN_SAMPLES_FOR_ERROR_BUDGET = 100


def _error_budget_exceeded(summary: JobSummary, max_error_fraction: float) -> bool:
    """Judge the error rate only once enough samples were seen for the fraction to mean something."""
    if summary.samples < MIN_SAMPLES_FOR_ERROR_BUDGET:
        return False
    return summary.errors / summary.samples > max_error_fraction


def _collect_finished(in_flight: list[Future], summary: JobSummary) -> list[Future]:
    still_running = []
    for future in in_flight:
        if future.done():
            future.result()  # a failed commit stops the job with its storage error
            summary.shards_committed += 1
        else:
            still_running.append(future)
    return still_running
