"""A typed job config -> the Ray Data plan, run to completion with shard-level commits.

The plan: input shards (a frozen list, stored beside the output so a rerun resumes the same work without listing the
input again) -> CPU tasks that read each shard and decode + preprocess its images to uint8 -> a pool of inference
actors -> a writer stage that writes the rows as per-shard fragments and passes on one small metadata row per
fragment -> the driver, which tracks which rows of each shard arrived and, once a shard is complete, starts a
finalize task on a worker that commits the shard's Parquet files. Rows never reach the driver. See
:mod:`pipeline.manifest` for the commit protocol and why it gives exactly-once output across kills and reruns.

What each failure does
    * The driver is killed (SIGKILL, OOM, node loss) or the cluster stops: committed shards are skipped on the rerun
      of the same command, which redoes the rest from their first rows; fragments and staged files of the dead run
      are swept first.
      An in-process Ray dies with its driver; its last two agent processes exit on their own about a minute later
      and do not disturb a rerun (tests/test_resume.py).
    * A read/decode task or an inference actor dies: Ray re-executes it (Ray Data's defaults retry without limit);
      rows the dead attempt already delivered and the retry sends again are dropped by ordinal
      (:class:`pipeline.shards.ShardTracker`, then the finalize task), and a shard whose rows never all arrive is not
      committed (:class:`IncompleteShardsError`; a rerun redoes it). A finalize task that dies is retried by Ray.
    * A worker node is lost: its tasks and actors are re-run elsewhere as above; a job that cannot recover within
      Ray's retries fails, and the rerun finishes it.
    * Transient storage errors: every storage call is retried with backoff (:func:`model.storage.with_retries`).
    * Storage errors that persist, a bad model, input or output: :class:`JobError` (or ``InputError``,
      ``OutputConflictError``, ``CheckpointError``) naming the URI and cause; model, input and (when the dtype does
      not depend on the cluster) output are checked before Ray starts.
    * Too many undecodable samples: :class:`JobAborted` once more than ``max_error_fraction`` of at least 100
      samples failed, after the finished shards are committed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from model.numerics import numerics_policy
from model.processing import ViTHybridImageProcessor
from pipeline import cpu, planstore, sources
from pipeline.actor import InferenceActor, InferenceSettings, actor_pool_arguments
from pipeline.compute import (
    ComputeError,
    ComputePlan,
    decide_compute,
    dtype_without_cluster,
    observe_cluster,
    request_gpus,
    uses_gpu,
)
from pipeline.config import DTYPE_BYTES, JobConfig
from pipeline.dataservices import request_data_services, settle_data_service_requests
from pipeline.layout import OutputLayout
from pipeline.manifest import JobFingerprint, OutputState
from pipeline.preflight import connect_ray, plan_input, ray_started_here, run_preflight
from pipeline.reader import read_and_decode_shards
from pipeline.redaction import sanitize_arguments, sanitize_uri
from pipeline.shards import CompleteShard, ShardTracker
from pipeline.sink import output_schema
from pipeline.versions import check_cluster
from pipeline.writer import UNREADABLE, finalize_shard, write_fragments

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
    rows_resent: int = 0  # rows that arrived twice (a retried Ray task) and were dropped as duplicates
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


class UnreadableShardsError(JobError):
    """Some shards yielded nothing but a shard-error row (not a tar, not Parquet): not committed, so a rerun reads
    them again once the files are fixed. The job's exit code says so even if every other shard succeeded."""


class IncompleteShardsError(JobError):
    """The dataset ended while some shards still missed rows (rows lost between stages); a rerun redoes them."""


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
        preprocessing={
            **processor.to_dict(),
            "fast_decode": config.fast_decode,
            "exif_orientation": config.exif_orientation,
            "id_column": config.id_column,
            "image_column": config.image_column,
        },
        dtype=compute_dtype,
        top_k=config.top_k if config.task == "classify" else None,
        embedding_dtype=config.embedding_dtype,
        normalize_embeddings=config.normalize_embeddings,
        numerics=numerics_policy(compute_dtype).to_dict(),  # TF32, weight standardisation (model/numerics.py)
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
    try:
        return _run_job(config)
    finally:
        settle_data_service_requests()  # no thread of this job calls Ray after it returns or raises


def _run_job(config: JobConfig) -> JobSummary:
    started = time.monotonic()
    # Output, model files, input plan (unless resuming), weights' identity: every check that needs no Ray, cheapest
    # first (pipeline/preflight.py), so that a wrong flag fails in seconds, before Ray starts. The weights' identity
    # comes from their metadata (no full read on the driver); the actors read the weights.
    checked = run_preflight(config)
    model_config, processor, checkpoint = checked.model_config, checked.processor, checked.checkpoint

    def list_input() -> list[sources.Shard]:
        # Called by OutputState only for a new job: a resume reads the frozen plan and never lists the input again.
        return checked.shards if checked.shards is not None else plan_input(config)

    compute: ComputePlan | None = None
    compute_dtype = _dtype_without_cluster(config)
    actor_memory = actor_memory_estimate(model_config, processor, checkpoint.parameters)
    if compute_dtype is None:  # "auto": bfloat16 on GPUs; on CPU nodes what their CPU computes natively
        compute = _compute_plan(config, _connect_ray(), actor_memory)
        compute_dtype = compute.dtype
    fingerprint = build_fingerprint(config, checkpoint.digest, processor, compute_dtype)
    with _storage_step("cannot open output", config.output):
        state = OutputState.open(
            config.output,
            fingerprint,
            list_input,
            sanitize_arguments(asdict(config)),
            overwrite=config.overwrite,
            storage_options=config.storage_options,
        )
    pending = state.pending_plan()
    summary = JobSummary(
        output=sanitize_uri(config.output),
        shards_total=state.plan.num_rows,
        shards_skipped=state.plan.num_rows - pending.num_rows,
    )
    logger.info(
        "%d shards planned, %d already committed, %d to do", summary.shards_total, summary.shards_skipped, pending.num_rows
    )
    if not pending.num_rows and state.resumed:
        with _storage_step("cannot read output", config.output):
            complete = state.is_complete
        if complete:
            # Rerunning a finished job must not overwrite its manifest and summary with an empty run's figures.
            summary.status = "already complete"
            summary.seconds = time.monotonic() - started
            return summary

    schema = output_schema(config.task, model_config.hidden_size, config.embedding_dtype)
    if pending.num_rows:
        if compute is None:
            compute = _compute_plan(config, _connect_ray(), actor_memory)
        # Refuse nodes whose Ray/torch/pyarrow differ from the driver's (exit code 4).
        check_cluster(_connect_ray(), started_here=ray_started_here())
        dataset = _build_dataset(config, pending, processor, state.layout, compute)
        finalizer = RayFinalizer(config, state.layout, state.parquet_metadata, schema)
        try:
            _track_and_finalize(config, dataset, summary, finalizer)
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
    """Ray, started or joined (a failure is a ClusterStartError, exit code 4), with Ray Data's service actors asked
    for in a background thread (:mod:`pipeline.dataservices`; after the first time, three name lookups)."""
    ray = connect_ray()
    request_data_services()
    return ray


def _compute_plan(config: JobConfig, ray: Any, actor_memory: Callable[[str, int, int], int]) -> ComputePlan:
    """Device, dtype and pool for the cluster the job will have (GPUs it can scale to count): pipeline/compute.py."""
    view = observe_cluster(ray)
    if config.dtype == "auto" and not uses_gpu(config, view):
        view = dataclasses.replace(view, cpu_dtype=cpu.decide_cpu_dtype(ray).dtype)  # as on a computing node
    try:
        plan = decide_compute(config, view, actor_memory)
    except ComputeError as error:
        raise JobError(str(error)) from None
    logger.info("%s", plan.describe())
    return plan


def actor_memory_estimate(
    model_config: Any, processor: ViTHybridImageProcessor, parameters: int | None = None
) -> Callable[[str, int, int], int]:
    """``(dtype, batch_size, calls) -> bytes`` one CPU inference actor of this model needs with ``calls`` batches in
    its model at once (:func:`pipeline.cpu.actor_memory_bytes`).

    ``parameters`` is the weights' element count from the checkpoint's safetensors headers
    (:attr:`model.weights.CheckpointFingerprint.parameters`, read by the preflight), so the driver needs no torch.
    Without it (a pickled checkpoint, which the preflight loaded with torch anyway) the parameters are counted on
    torch's meta device (the model's shapes without allocating, ~0.04 s for full size) when the estimate is first
    asked for: only CPU-only pools ask, so GPU jobs and finished resumes never pay it.
    """

    @functools.cache
    def count() -> int:
        if parameters is not None:
            return parameters
        import torch

        from model import ViTHybridForImageClassification

        with torch.device("meta"):
            return sum(parameter.numel() for parameter in ViTHybridForImageClassification(model_config).parameters())

    image_size = max(processor.output_size)
    return lambda dtype, batch_size, calls: cpu.actor_memory_bytes(
        count(), batch_size=batch_size, image_size=image_size, element_bytes=DTYPE_BYTES[dtype], calls=calls
    )


def _dtype_without_cluster(config: JobConfig) -> str | None:
    """The compute dtype when it does not depend on the cluster's GPUs, else None."""
    return dtype_without_cluster(config)


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


def inference_settings(config: JobConfig, compute: ComputePlan) -> InferenceSettings:
    """The one place where the job's settings (and the compute plan decided for this cluster) become the actors'
    settings; everything else reads ``config``."""
    return InferenceSettings(
        model_uri=config.model,
        task=config.task,
        top_k=config.top_k,
        dtype=compute.dtype,
        device=compute.device,
        embedding_dtype=config.embedding_dtype,
        normalize_embeddings=config.normalize_embeddings,
        torch_threads=compute.torch_threads,
        compute_lanes=compute.calls_per_actor,
        batch_size=compute.batch_size,
        pad_to_batch=compute.pad_to_batch,
        compile=config.compile,
        decode_in_actor=config.decode_location == "actor",
        decode_threads=max(1, int(compute.actor_resources.get("num_cpus", 1))),
        fast_decode=config.fast_decode,
        exif_orientation=config.exif_orientation,
        max_image_pixels=config.max_image_pixels,
        storage_options=config.storage_options or None,
    )


#: CPU reserved per writer task: it encodes a batch's rows as Parquet and writes them, far less work than decoding.
WRITER_CPUS = 0.25


def _build_dataset(
    config: JobConfig,
    pending: pa.Table,
    processor: ViTHybridImageProcessor,
    layout: OutputLayout,
    compute: ComputePlan,
) -> Any:
    import ray
    from ray.data import ActorPoolStrategy

    request_gpus(compute)  # the whole pool's GPUs at once, not one autoscaler step per pending actor
    batch_size, max_actors, actor_resources = compute.batch_size, compute.max_actors, compute.actor_resources
    settings = inference_settings(config, compute)
    items = [{"shard": json.dumps(shard.to_dict())} for shard in planstore.shards_of(pending)]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(
        read_and_decode_shards,
        batch_size=1,
        batch_format="numpy",
        num_cpus=compute.decode_cpus,
        # A memory reservation bounds how many decodes of large photos share a node; it also keeps Ray Data from
        # fusing decode into the inference actors (fused, the actor would decode and infer in turn, serially).
        memory=config.decode_memory_mb * 1024 * 1024,
        # The settings travel whole (JobConfig is small and picklable): a new decode option is read where it is
        # used, never copied field by field into a parallel record.
        fn_kwargs={
            "config": config,
            "processor": None if config.decode_location == "actor" else processor,
            "rows_per_batch": min(batch_size, 64),
        },
    )  # Ray Data retries a failed or killed task by default (max_retries=-1), re-reading its shard from the start.
    dataset = dataset.map_batches(
        InferenceActor,
        fn_constructor_args=(settings,),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(
            min_size=compute.min_actors, max_size=max_actors,
            **actor_pool_arguments(compute.use_gpu, cpu_calls=compute.calls_per_actor),
        ),
        **actor_resources,
        # Merged by Ray with the job's own runtime_env (a ray job submit --working-dir stays in force).
        **({"runtime_env": {"env_vars": compute.actor_env}} if compute.actor_env else {}),
    )
    # The writer stage: rows are written where they are, as fragments; only metadata rows go on to the driver.
    return dataset.map_batches(
        write_fragments,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=WRITER_CPUS,
        fn_kwargs={"layout": layout},
    )


class RayFinalizer:
    """Runs :func:`pipeline.writer.finalize_shard` as Ray tasks, a bounded number at a time.

    ``num_cpus=0``: a finalize task reads and writes one shard (seconds of I/O), and reserving a CPU for it would
    let the decode tasks, which take every CPU they can, starve it. The cap on tasks in flight bounds what it costs;
    the task prefers the node that wrote the shard's last fragment (soft affinity: any node if that one is gone),
    which keeps it off a head node that runs no tasks.
    """

    def __init__(self, config: JobConfig, layout: OutputLayout, metadata: dict[str, str], schema: pa.Schema) -> None:
        import ray

        self._ray = ray
        self._config = config
        self._layout = layout
        self._metadata = ray.put(metadata)
        self._schema = schema
        self._remote = ray.remote(num_cpus=0, max_retries=3)(finalize_shard)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max(4, min(64, cpus))
        self._in_flight: dict[Any, str] = {}
        self.unreadable: dict[str, str] = {}  # shard id -> why none of its samples could be read (not committed)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, shard: CompleteShard) -> None:
        options: dict[str, Any] = {}
        if shard.node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(shard.node_id, soft=True)
        ref = self._remote.options(**options).remote(  # type: ignore[call-arg]  # ray.remote() hides the signature
            self._layout,
            shard.shard_id,
            shard.fragments,
            shard.rows,
            rows_per_file=self._config.rows_per_file,
            metadata=self._metadata,
            schema=self._schema,
        )
        self._in_flight[ref] = shard.shard_id

    def collect(self, *, block: bool) -> int:
        """Results of the finished tasks (waiting for at least one if ``block``); returns how many committed (an
        unreadable shard is recorded in :attr:`unreadable` instead)."""
        if not self._in_flight:
            return 0
        done, _ = self._ray.wait(
            list(self._in_flight), num_returns=1 if block else len(self._in_flight), timeout=None if block else 0
        )
        committed = 0
        for ref in done:
            shard_id = self._in_flight.pop(ref)
            try:
                result = self._ray.get(ref)
            except Exception as error:  # noqa: BLE001 - storage errors become a JobError, the rest re-raised
                cause = getattr(error, "cause", None)
                cause = cause if isinstance(cause, BaseException) else error
                if _is_storage_error(cause):
                    raise JobError(
                        f"cannot commit shard {shard_id} to {sanitize_uri(self._config.output)}: "
                        f"{_describe_storage_error(cause)}"
                    ) from error
                raise cause from error
            if UNREADABLE in result:
                self.unreadable[shard_id] = result[UNREADABLE]
            else:
                committed += 1
        return committed


def _track_and_finalize(config: JobConfig, dataset: Any, summary: JobSummary, finalizer: Any) -> None:
    """Pull fragment metadata, finalize each shard once all its rows are written, watch the error budget.

    The driver never holds rows: per open shard a bit per row and the fragment names. While ``finalizer`` is at its
    cap of tasks in flight, the loop waits for one to finish before pulling more, so Ray Data's backpressure holds
    the stages above. Samples and errors are counted by ordinal, so rows a retried task sent twice count once. When
    reading a shard fails for a storage reason, the shards already complete are still committed before the
    :class:`JobError` naming the shard is raised.
    """
    tracker = ShardTracker()
    failure: JobError | None = None
    try:
        for metadata in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for shard in tracker.add(metadata):
                while finalizer.in_flight >= finalizer.max_in_flight:
                    summary.shards_committed += finalizer.collect(block=True)
                finalizer.submit(shard)
            summary.samples = tracker.rows_accepted
            summary.errors = tracker.error_rows_accepted
            summary.rows_resent = tracker.rows_resent
            summary.shards_committed += finalizer.collect(block=False)
            if _error_budget_exceeded(summary, config.max_error_fraction):
                break
    except JobError:
        raise
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
    while finalizer.in_flight:
        summary.shards_committed += finalizer.collect(block=True)
    if failure is not None:
        raise failure from None
    if _error_budget_exceeded(summary, config.max_error_fraction, final=True):
        summary.status = "aborted"
        raise JobAborted(
            f"{summary.errors} of {summary.samples} samples failed to decode "
            f"(more than --max-error-fraction {config.max_error_fraction}); "
            f"{summary.shards_committed} finished shards were committed to {summary.output}. "
            "Check the input, or raise --max-error-fraction and run the same command again to resume."
        )
    if finalizer.unreadable:
        described = "; ".join(f"{shard_id}: {reason}" for shard_id, reason in sorted(finalizer.unreadable.items())[:3])
        raise UnreadableShardsError(
            f"{len(finalizer.unreadable)} shard(s) could not be read at all and were not committed ({described}); "
            f"{summary.shards_committed} other shards were committed to {summary.output}. Fix or replace those files "
            "and run the same command again to read them."
        )
    incomplete = tracker.pending_shards()
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


def _error_budget_exceeded(summary: JobSummary, max_error_fraction: float, *, final: bool = False) -> bool:
    """Mid-job, judge the error rate only once enough samples were seen for the fraction to mean something (so a bad
    first batch does not stop a big job). At the end (``final``) every job is judged, whatever its size, and a job
    where every sample failed is never a success, whatever ``max_error_fraction`` allows."""
    if summary.samples == 0:
        return False
    if final:
        return summary.errors == summary.samples or summary.errors / summary.samples > max_error_fraction
    if summary.samples < MIN_SAMPLES_FOR_ERROR_BUDGET:
        return False
    return summary.errors / summary.samples > max_error_fraction
