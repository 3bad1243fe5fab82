"""A typed job config -> the Ray Data plan, run to completion with shard-level commits.

The plan: input shards (a frozen list, recorded in the output so a rerun resumes the same work) -> CPU tasks that
read each shard and decode + preprocess its images to uint8 -> a pool of inference actors -> the driver, which groups
result rows by shard and commits each shard's Parquet files once all its rows have arrived. See
:mod:`pipeline.manifest` for the commit protocol and why it gives exactly-once output across kills and reruns.

What each failure does
    * The driver is killed (SIGKILL, OOM, node loss) or the cluster stops: only the driver writes the output, and
      committed shards are skipped on the rerun of the same command, which redoes the rest from their first rows.
      An in-process Ray dies with its driver; its last two agent processes exit on their own about a minute later
      and do not disturb a rerun (tests/test_resume.py).
    * A read/decode task or an inference actor dies: Ray re-executes it (Ray Data's defaults retry without limit);
      rows the dead attempt already delivered and the retry sends again are dropped by :class:`ShardAssembler`, and
      a shard whose rows never all arrive is not committed (:class:`IncompleteShardsError`; a rerun redoes it).
    * Transient storage errors: every storage call is retried with backoff (:func:`model.storage.with_retries`).
    * Storage errors that persist, a bad model, input or output: :class:`JobError` (or ``InputError``,
      ``OutputConflictError``, ``CheckpointError``) naming the URI and cause; model, input and (when the dtype does
      not depend on the cluster) output are checked before Ray starts.
    * Too many undecodable samples: :class:`JobAborted` once more than ``max_error_fraction`` of at least 100
      samples failed, after the finished shards are committed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from model.processing import ViTHybridImageProcessor
from pipeline import decode, sources
from pipeline.config import NO_ERROR, NOT_LAST_ROW, JobConfig
from pipeline.failpoints import failpoint
from pipeline.infer import InferenceActor, InferenceSettings, resolve_dtype
from pipeline.manifest import JobFingerprint, OutputState, ShardAssembler
from pipeline.redaction import sanitize_arguments, sanitize_uri
from pipeline.sink import commit_shard, output_schema

logger = logging.getLogger(__name__)

@dataclass
class JobSummary:
    """The figures a job ends with; printed as one line and written as JSON beside the output."""

    output: str
    samples: int = 0
    errors: int = 0
    shards_total: int = 0
    shards_skipped: int = 0
    shards_committed: int = 0
    rows_resent: int = 0  # rows that reached the driver twice (a retried Ray task) and were dropped as duplicates
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


class JobError(RuntimeError):
    """The job cannot start or go on for a reason to fix outside the code: storage refuses the model, input or output,
    or a shard cannot be read. The message names the URI and the cause; ``jobs.cli`` prints it without a traceback.
    Shards committed before the error are kept: after the fix, the same command resumes.
    """


class IncompleteShardsError(JobError):
    """The dataset ended while some shards still missed rows (rows lost between stages); a rerun redoes them."""


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
                failpoint("read.batch")  # mid-shard: a batch is out, the shard's last row is not
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


def build_fingerprint(
    config: JobConfig, weights_sha256: str, processor: ViTHybridImageProcessor, compute_dtype: str
) -> JobFingerprint:
    """What the output depends on; a resume with anything different would mix incompatible rows.

    ``compute_dtype`` is the dtype the actors will really use (``"auto"`` resolved for this cluster), so that a job
    started on GPUs in bfloat16 is not silently finished in float32 on a CPU-only cluster, or the other way round.
    """
    return JobFingerprint(
        task=config.task,
        model_uri=config.model,
        weights_sha256=weights_sha256,
        preprocessing={**processor.to_dict(), "fast_decode": config.fast_decode},
        dtype=compute_dtype,
        top_k=config.top_k if config.task == "classify" else None,
        embedding_dtype=config.embedding_dtype,
        normalize_embeddings=config.normalize_embeddings,
    )


def run_job(config: JobConfig) -> JobSummary:
    """Run (or resume) a job to completion and return its summary.

    Raises :class:`JobAborted` past the error budget, :class:`JobError` when storage refuses the model, input or
    output (the message names the URI), :class:`pipeline.sources.InputError` for an input that names nothing readable
    and :class:`pipeline.manifest.OutputConflictError` when the output holds another job's results.

    The model, the input and (when the compute dtype does not depend on the cluster) the output are checked before
    Ray is needed; then ``ray.init()`` is called unless Ray is already initialised, so the same code runs in-process,
    in tests that start Ray themselves and under ``ray job submit`` (where ``ray.init()`` joins the job's cluster).
    """
    from model.configuration import ViTHybridConfig
    from model.weights import load_checkpoint

    started = time.monotonic()
    with _storage_step("cannot load model", config.model):
        model_config = ViTHybridConfig.from_pretrained(config.model, storage_options=config.storage_options)
        # Reading the weights here (once, on the driver) fails fast on a bad --model and gives the sha256.
        _, checkpoint = load_checkpoint(config.model, storage_options=config.storage_options)
        processor = ViTHybridImageProcessor.from_pretrained(config.model, storage_options=config.storage_options)
    with _storage_step("cannot read input", config.input):
        planned = sources.plan_shards(
            config.input,
            format=config.format,
            storage_options=config.storage_options,
            images_per_shard=config.images_per_shard,
        )

    compute_dtype = _dtype_without_cluster(config)
    use_gpu: bool | None = None
    if compute_dtype is None:  # "auto" on "auto": bfloat16 if the cluster has GPUs, else float32
        use_gpu = _use_gpu(config, _connect_ray())
        compute_dtype = _dtype_name(resolve_dtype(config.dtype, torch.device("cuda" if use_gpu else "cpu")))
    fingerprint = build_fingerprint(config, checkpoint.sha256, processor, compute_dtype)
    with _storage_step("cannot open output", config.output):
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
    summary = JobSummary(
        output=sanitize_uri(config.output), shards_total=len(plan), shards_skipped=len(plan) - len(pending)
    )
    logger.info("%d shards planned, %d already committed, %d to do", len(plan), summary.shards_skipped, len(pending))
    if not pending and state.resumed:
        with _storage_step("cannot read output", config.output):
            complete = state.is_complete
        if complete:
            # Rerunning a finished job must not overwrite its manifest and summary with an empty run's figures.
            summary.status = "already complete"
            summary.seconds = time.monotonic() - started
            return summary

    schema = output_schema(config.task, model_config.hidden_size, config.embedding_dtype)
    if pending:
        from pipeline.versions import check_cluster

        check_cluster(_connect_ray())  # refuse nodes whose Ray/torch/pyarrow differ from the driver's (exit code 4)
        if use_gpu is None:
            use_gpu = _use_gpu(config, _connect_ray())
        dataset = _build_dataset(config, pending, processor, use_gpu=use_gpu, compute_dtype=compute_dtype)
        try:
            _consume_and_commit(config, dataset, summary, state.parquet_metadata, schema)
        except JobAborted:
            summary.seconds = time.monotonic() - started
            with _storage_step("cannot write output", config.output):
                state.write_summary(summary.to_dict())
            raise

    summary.seconds = time.monotonic() - started
    summary.status = "succeeded"
    with _storage_step("cannot write output", config.output):
        state.finish(summary.to_dict())
    return summary


def _connect_ray() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray


def _use_gpu(config: JobConfig, ray: Any) -> bool:
    gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0))
    if config.device == "cuda" and gpus_in_cluster == 0:
        raise JobError("--device cuda was asked for, but the Ray cluster has no GPUs")
    return config.device != "cpu" and gpus_in_cluster > 0


def _dtype_without_cluster(config: JobConfig) -> str | None:
    """The compute dtype when it does not depend on the cluster's GPUs, else None."""
    if config.dtype != "auto":
        return _dtype_name(resolve_dtype(config.dtype, torch.device("cpu")))  # a named dtype ignores the device
    if config.device == "cpu":
        return _dtype_name(resolve_dtype("auto", torch.device("cpu")))
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_storage_error(error: BaseException) -> bool:
    # fsspec and s3fs raise OSError subclasses (FileNotFoundError, PermissionError, ...); botocore raises its own
    # types for what it finds before sending a request (no credentials, an unreachable endpoint).
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("botocore", "aiobotocore")


def _describe_storage_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, PermissionError) or "credential" in text.lower() or "accessdenied" in text.lower():
        text += " (check the credentials: AWS_* variables, a profile, or --storage-options)"
    return text


@contextmanager
def _storage_step(what: str, uri: str) -> Iterator[None]:
    """Turn a storage failure inside the block into a :class:`JobError` that names ``uri`` (credentials masked).

    Only storage errors are converted: anything else is a bug or a data problem and keeps its own type.
    """
    try:
        yield
    except JobError:
        raise
    except Exception as error:  # noqa: BLE001 - filtered right below, re-raised unless it is a storage error
        if not _is_storage_error(error):
            raise
        raise JobError(f"{what} {sanitize_uri(uri)}: {_describe_storage_error(error)}") from error


def _build_dataset(
    config: JobConfig,
    pending: list[sources.Shard],
    processor: ViTHybridImageProcessor,
    *,
    use_gpu: bool,
    compute_dtype: str,
) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    gpus_in_cluster = int(ray.cluster_resources().get("GPU", 0))
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
        dtype=compute_dtype,
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
    """Pull result batches to the driver, commit each shard as soon as all its rows are in, watch the error budget.

    Samples and errors are counted from the rows the assembler accepts, so rows that a retried Ray task sent twice
    count once. When reading a shard fails for a storage reason, the shards already complete are still committed
    before the :class:`JobError` naming the shard is raised.
    """
    assembler = ShardAssembler()
    in_flight: list[Future] = []
    failure: JobError | None = None
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="commit") as committer:
        try:
            for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                completed = assembler.add(table)
                summary.samples = assembler.rows_accepted
                summary.errors = assembler.error_rows_accepted
                summary.rows_resent = assembler.rows_resent
                for shard_id, shard_table in completed:
                    in_flight.append(committer.submit(_commit, config, shard_id, shard_table, metadata, schema))
                in_flight = _collect_finished(in_flight, summary)
                if _error_budget_exceeded(summary, config.max_error_fraction):
                    break
        except Exception as error:  # noqa: BLE001 - only a shard read error is translated; the rest re-raised
            read_error = _find_cause(error, sources.ShardReadError)
            if read_error is None:
                raise
            # Ray Data appends its retry advice to the exception's message; the first line is ours.
            reason = str(read_error).split("\n", 1)[0]
            failure = JobError(
                f"cannot read input: {reason}. Shards finished before it are committed to "
                f"{summary.output}; once the input is readable, run the same command again to resume."
            )
        for future in in_flight:
            future.result()
            summary.shards_committed += 1
    if failure is not None:
        raise failure from None
    if _error_budget_exceeded(summary, config.max_error_fraction):
        summary.status = "aborted"
        raise JobAborted(
            f"{summary.errors} of {summary.samples} samples failed to decode "
            f"(more than --max-error-fraction {config.max_error_fraction}); "
            f"{summary.shards_committed} finished shards were committed to {summary.output}. "
            "Check the input, or raise --max-error-fraction and run the same command again to resume."
        )
    incomplete = assembler.pending_shards()
    if incomplete:
        described = ", ".join(
            f"{shard_id} ({received} of {expected if expected is not None else '?'} rows)"
            for shard_id, (received, expected) in sorted(incomplete.items())[:5]
        )
        raise IncompleteShardsError(
            f"the dataset ended with {len(incomplete)} shard(s) still missing rows: {described}. Their rows were "
            f"lost between stages, so they were not committed; {summary.shards_committed} complete shards were. "
            "Run the same command again to redo the missing shards."
        )


def _commit(
    config: JobConfig, shard_id: str, table: pa.Table, metadata: dict[str, str], schema: pa.Schema
) -> None:
    with _storage_step(f"cannot commit shard {shard_id} to", config.output):
        commit_shard(
            config.output,
            shard_id,
            table,
            rows_per_file=config.rows_per_file,
            metadata=metadata,
            storage_options=config.storage_options,
            schema=schema,
        )


def _find_cause(error: BaseException, wanted: type[BaseException]) -> BaseException | None:
    """The first ``wanted`` exception in ``error``'s chain: Ray wraps a task's exception (``RayTaskError.cause``),
    and Ray Data wraps that again (``__cause__``)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        original = getattr(current, "cause", None)
        if isinstance(current, wanted) and not isinstance(original, BaseException):
            return current
        if isinstance(original, BaseException):
            pending.append(original)
        pending.extend([current.__context__, current.__cause__])
    return None


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
