"""Job bookkeeping for the Parquet output: the job record, shard commits, resume state and the final manifest.

Where files live is :mod:`pipeline.layout` (``OUT`` holds only Parquet; the bookkeeping lives in ``OUT.job``
beside it). Who writes what is :mod:`pipeline.writer` (the writer stage and the finalize tasks, on the workers);
the driver's part is :mod:`pipeline.shards` (which rows of which shard arrived) and this module.

The output protocol
-------------------
1. At the first start, before any data, the driver writes the frozen plan (``OUT.job/plan.parquet``, one row per
   input shard with a stable ``shard_id``; :mod:`pipeline.planstore`) and then ``OUT.job/job.json``: the job
   fingerprint (task, model, weights sha256, preprocessing, dtype, top_k, embedding options, project version) and
   the job's arguments with credentials removed. ``job.json`` is written after the plan, so a job record always has
   its plan. On a later start the recorded fingerprint is compared with the new one: a difference in anything that
   changes results is refused (:class:`OutputConflictError`), because mixing two models' outputs under one prefix
   cannot be undone row by row. The recorded plan, not a fresh listing, decides which shards the job has: a resume
   reads the plan and lists ``commits/`` once, and never lists the input again.
2. Result rows never travel to the driver. A writer stage after the inference actors writes each batch's rows,
   grouped by shard, as fragment files ``OUT.job/fragments/<shard_id>/<unique>.parquet`` (a new name per write, so a
   retried task never overwrites a fragment that was already reported) and passes on one small metadata row per
   fragment: shard, fragment name, row count, the ordinals it holds (as ranges), its error ordinals, and the shard's
   row count when its last row is inside.
3. The driver (:class:`pipeline.shards.ShardTracker`) records which ordinals of each open shard arrived. A fragment
   whose ordinals all arrived before (a retried task re-sent them) is not used; once ordinals ``0..n-1`` are all
   present, a finalize task on a worker (:func:`pipeline.writer.finalize_shard`) reads exactly the listed fragments,
   drops repeated ordinals (checking that they hold the same sample), sorts, and commits the shard
   (:meth:`pipeline.sink.ParquetShardWriter.commit`):

   a. rows without error go to ``part-<shard_id>-00000.parquet``, ``-00001``, ... (at most ``rows_per_file``
      each), error rows to ``errors/part-<shard_id>.errors``: the names depend only on the shard and its rows;
   b. each file appears at its final name all at once (:meth:`pipeline.layout.StorageFolder.publish`): on local disk
      written and fsynced under ``OUT.job/staging/`` and renamed into place with ``os.replace``; on object stores
      PUT directly at the final name;
   c. files of this shard not in the new set (left by a crashed attempt with another split) are deleted;
   d. ``OUT.job/commits/<shard_id>.json`` is written LAST, itself all at once. A shard is committed if and only if
      its commit record exists. Then the task deletes its fragments.

   The driver keeps a bounded number of finalize tasks in flight and stops pulling from the dataset while at the
   cap, so Ray Data's backpressure holds the stages above.
4. When every shard of the plan is committed: ``manifest.json`` (per-shard rows/errors/files, totals, the
   fingerprint, timestamps, built from the commit records in storage), ``summary.json``, then ``staging/`` and
   ``fragments/`` are removed and ``SUCCESS`` written, last.

Why a reader never sees a partial file: a data file only appears at its final name complete (an atomic rename on
one filesystem; an object-store PUT, multipart included, is visible only once complete on S3, GCS and Azure Blob).
Files being written live in ``OUT.job``, never under ``OUT``.

Why a redo is exactly-once: on resume, committed shards are skipped, ``staging/`` and ``fragments/`` are deleted
(orphans of the dead run), and every uncommitted shard is redone from its first row. Its file names and its row
split are deterministic, so the redo overwrites whatever a crashed attempt left at the same names, and step 3c removes
names the redo no longer uses, before the commit record is written. A finalize task that dies is retried by Ray; it
reads the same listed fragments and writes the same names. Nothing is ever appended.

What readers should do: wait for ``OUT.job/SUCCESS`` (or read the files listed in ``manifest.json`` /
``commits/*.json``). While a job runs, or after a crash, a glob may show complete files of a shard whose commit
record is not written yet; the redo replaces them with the same rows. Credentials never reach any of these files:
arguments go through :func:`sanitize_arguments`, URIs in the plan through :func:`sanitize_uri`.

Only one job may write to an output at a time. ``--overwrite`` deletes ``OUT.job`` and, under ``OUT``, exactly the
names the layout writes (``part-*-NNNNN.parquet``, ``errors/``) and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from model.storage import StorageOptions, write_bytes
from pipeline.failpoints import failpoint
from pipeline.layout import (
    JOB_FILE,
    MANIFEST_FILE,
    SUCCESS_FILE,
    SUMMARY_FILE,
    CommitRecord,
    OutputLayout,
    check_shard_id,
    json_bytes,
)
from pipeline.redaction import sanitize_arguments, sanitize_uri, strip_uri_credentials

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: bookkeeping beside the output, plan as Parquet, error rows in their own files

__all__ = [
    "CommitRecord",
    "JobFingerprint",
    "OutputConflictError",
    "OutputLayout",
    "OutputState",
    "check_shard_id",
    "sanitize_arguments",
    "sanitize_uri",
    "strip_uri_credentials",
]


class OutputConflictError(RuntimeError):
    """The output prefix holds results of a different job; the message says what differs and how to start over."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical(value: Any) -> Any:
    """JSON round-trip, so that tuples and lists (or int and str keys) compare as they will once stored."""
    return json.loads(json.dumps(value, sort_keys=True))


# --------------------------------------------------------------------------------------------------------------------
# The job fingerprint
# --------------------------------------------------------------------------------------------------------------------


def project_version() -> str:
    """This project's version (one source of truth: ``pipeline.__version__``, which pyproject.toml reads too)."""
    from pipeline import __version__

    return __version__


@dataclass(frozen=True)
class JobFingerprint:
    """Everything that decides the values in the output; two runs may share an output prefix only if these agree.

    ``model_uri`` and ``project_version`` are recorded but do not block a resume: the same weights (same sha256)
    copied elsewhere give the same results, and a patch release must be able to finish a job its predecessor started.
    """

    task: str
    model_uri: str
    weights_sha256: str
    preprocessing: Mapping[str, Any]
    dtype: str
    top_k: int | None = None
    embedding_dtype: str = "float32"
    normalize_embeddings: bool = False
    numerics: Mapping[str, Any] = field(default_factory=dict)  # model.numerics.NumericsPolicy.to_dict()
    project_version: str = field(default_factory=project_version)

    #: Fields whose difference means the outputs differ.
    RESULT_FIELDS = (
        "task",
        "weights_sha256",
        "preprocessing",
        "dtype",
        "top_k",
        "embedding_dtype",
        "normalize_embeddings",
        "numerics",
    )

    def __post_init__(self) -> None:
        if self.task not in ("classify", "embed"):
            raise ValueError(f"task must be 'classify' or 'embed', not {self.task!r}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["model_uri"] = sanitize_uri(self.model_uri)
        values["preprocessing"] = _canonical(dict(self.preprocessing))
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> JobFingerprint:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})

    def diff(self, other: JobFingerprint) -> list[str]:
        """``["dtype: 'float32' -> 'bfloat16'", ...]`` for each result-deciding field that differs (self = old)."""
        differences = []
        for name in self.RESULT_FIELDS:
            old, new = _canonical(getattr(self, name)), _canonical(getattr(other, name))
            if old != new:
                differences.append(f"{name}: {old!r} -> {new!r}")
        return differences

    def parquet_metadata(self, arguments: Any = None) -> dict[str, str]:
        """Key-value metadata for every Parquet file, so that a file alone says which model and settings made it."""
        values = self.to_dict()
        metadata = {
            name: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for name, value in values.items()
        }
        metadata["job_arguments"] = json.dumps(sanitize_arguments(arguments), sort_keys=True)
        return metadata



# --------------------------------------------------------------------------------------------------------------------
# Job state: create or resume, then the manifest
# --------------------------------------------------------------------------------------------------------------------

PlanSource = Callable[[], Sequence[Any]]


@dataclass
class OutputState:
    """The job's view of its output: what was planned, what is committed, and the end-of-job records.

    Build it with :meth:`open`; the driver skips ``committed_shard_ids``, has the rest committed by finalize tasks,
    then calls :meth:`finish`. ``plan`` is the frozen plan as an Arrow table (:mod:`pipeline.planstore`).
    """

    layout: OutputLayout
    fingerprint: JobFingerprint
    plan: pa.Table
    committed_shard_ids: set[str]
    arguments: Any
    created_at: str
    started_at: str = field(default_factory=_utc_now)
    resumed: bool = False

    @classmethod
    def open(
        cls,
        output_uri: str,
        fingerprint: JobFingerprint,
        shard_plan: PlanSource | Sequence[Any],
        arguments: Any,
        *,
        overwrite: bool = False,
        storage_options: StorageOptions | None = None,
    ) -> OutputState:
        """Create the job record at ``output_uri`` or resume the job recorded there.

        ``shard_plan`` may be a callable that lists the input: it is called only when the job is new, so a resume
        never lists the input (the plan recorded at the first start is the job; inputs added since are not mixed
        in). Raises :class:`OutputConflictError` when the output holds another job's results.
        """
        layout = OutputLayout(output_uri, storage_options)
        shown_uri = sanitize_uri(output_uri)
        try:
            layout.bookkeeping_uri  # noqa: B018 - refuses a bucket root, which has no place beside it
        except ValueError as error:
            raise OutputConflictError(sanitize_uri(str(error))) from None
        arguments = sanitize_arguments(arguments)  # the state keeps only this copy, so its repr is safe to log
        if overwrite:
            deleted = layout.delete_owned()
            logger.info("--overwrite: deleted %d job entries of %s", len(deleted), shown_uri)
        try:
            record = layout.book.read_json(JOB_FILE)
        except json.JSONDecodeError as error:
            raise OutputConflictError(
                f"{layout.book.uri(JOB_FILE)} is not valid JSON ({error}); pass --overwrite to start {shown_uri} over"
            ) from error
        if record is None:
            planned = shard_plan() if callable(shard_plan) else shard_plan
            return cls._create(layout, fingerprint, planned, arguments)
        return cls._resume(layout, fingerprint, arguments, record)

    @classmethod
    def _create(
        cls, layout: OutputLayout, fingerprint: JobFingerprint, shard_plan: Sequence[Any], arguments: Any
    ) -> OutputState:
        from pipeline import planstore

        shown_uri = sanitize_uri(layout.output_uri)
        leftovers = [name for name in layout.data.list_names() if layout.is_owned_data_name(name)]
        leftovers += [f"{layout.bookkeeping_uri}/{name}" for name in layout.book.list_names()]
        if leftovers:
            # Without a job record nobody can tell which model made these files; refuse rather than mix.
            raise OutputConflictError(
                f"{shown_uri} holds job files ({', '.join(leftovers[:5])}{', ...' if len(leftovers) > 5 else ''}) "
                f"but no {JOB_FILE} beside it, so their model and settings are unknown; pass --overwrite to start "
                "over or choose another output"
            )
        try:
            plan = planstore.plan_table(shard_plan)
        except ValueError as error:
            raise ValueError(f"the shard plan for {shown_uri}: {error}") from None
        planstore.write_plan(layout.book, plan)  # before job.json: a job record always has its plan
        created_at = _utc_now()
        job = {
            "format_version": FORMAT_VERSION,
            "created_at": created_at,
            "fingerprint": fingerprint.to_dict(),
            "arguments": arguments,
            "shards": plan.num_rows,
        }
        layout.book.publish(JOB_FILE, json_bytes(job))
        logger.info("started job at %s: %d shards", shown_uri, plan.num_rows)
        return cls(layout, fingerprint, plan, set(), arguments, created_at=created_at)

    @classmethod
    def _resume(
        cls, layout: OutputLayout, fingerprint: JobFingerprint, arguments: Any, record: Mapping[str, Any]
    ) -> OutputState:
        from pipeline import planstore

        shown_uri = sanitize_uri(layout.output_uri)
        recorded = JobFingerprint.from_dict(record["fingerprint"])
        differences = recorded.diff(fingerprint)
        if differences:
            lines = "\n".join(f"  - {line}" for line in differences)
            raise OutputConflictError(
                f"{shown_uri} holds results of a different job (recorded in {layout.book.uri(JOB_FILE)}); differing "
                f"settings, recorded -> now:\n{lines}\n"
                f"Pass --overwrite to delete that job's files under {shown_uri} and start over, "
                "or choose another output."
            )
        for name in ("model_uri", "project_version"):
            old, new = sanitize_uri(str(getattr(recorded, name))), sanitize_uri(str(getattr(fingerprint, name)))
            if old != new:
                logger.warning("resuming %s: %s changed from %r to %r (same results)", shown_uri, name, old, new)
        plan = planstore.read_plan(layout.book)
        planned = set(plan.column("shard_id").to_pylist())
        layout.clean_scratch()
        committed = layout.committed_shard_ids()
        unknown = committed - planned
        if unknown:
            logger.warning("ignoring %d commit record(s) under %s for shards not in the plan", len(unknown), shown_uri)
        committed &= planned
        logger.info("resuming %s: %d of %d shards already committed", shown_uri, len(committed), plan.num_rows)
        return cls(
            layout,
            fingerprint,
            plan,
            committed,
            arguments,
            created_at=str(record.get("created_at", "")),
            resumed=True,
        )

    @property
    def output_uri(self) -> str:
        return self.layout.output_uri

    @property
    def shard_ids(self) -> list[str]:
        return self.plan.column("shard_id").to_pylist()

    def pending_plan(self) -> pa.Table:
        """Rows of the plan still to do, in plan order."""
        import pyarrow.compute as pc

        if not self.committed_shard_ids:
            return self.plan
        done = pc.is_in(self.plan.column("shard_id"), value_set=pa.array(sorted(self.committed_shard_ids)))
        return self.plan.filter(pc.invert(done))

    @property
    def parquet_metadata(self) -> dict[str, str]:
        return self.fingerprint.parquet_metadata(self.arguments)

    @property
    def is_complete(self) -> bool:
        """True when ``SUCCESS`` exists: the whole plan is committed and the manifest written."""
        return self.layout.book.exists(SUCCESS_FILE)

    def write_manifest(self) -> dict[str, Any]:
        """Write ``manifest.json`` from the commit records in storage (the truth, whichever run wrote them)."""
        shown_uri = sanitize_uri(self.output_uri)
        shard_ids = self.shard_ids
        committed = self.layout.committed_shard_ids()
        missing = [shard_id for shard_id in shard_ids if shard_id not in committed]
        if missing:
            raise RuntimeError(
                f"cannot write the manifest of {shown_uri}: {len(missing)} shard(s) not committed "
                f"(first: {missing[:3]}); run the job again to finish them"
            )
        names = [OutputLayout.commit_name(shard_id) for shard_id in shard_ids]
        records = self.layout.book.read_json_many(names)
        inputs = self.plan.select(["uri", "name", "format"]).to_pylist()
        member_counts = self.plan.column("members").combine_chunks().value_lengths().fill_null(0).to_pylist()
        shards = []
        files: list[str] = []
        for name, shard_input, members in zip(names, inputs, member_counts):
            commit = CommitRecord.from_dict(records[name])
            shards.append(
                {
                    "shard_id": commit.shard_id,
                    "input": {**shard_input, "images": members} if members else shard_input,
                    "rows": commit.rows,
                    "error_rows": commit.error_rows,
                    "files": commit.files,
                }
            )
            files.extend(commit.files)
        manifest = {
            "format_version": FORMAT_VERSION,
            "output_uri": shown_uri,
            "fingerprint": self.fingerprint.to_dict(),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": _utc_now(),
            "totals": {
                "shards": len(shards),
                "rows": sum(shard["rows"] for shard in shards),
                "error_rows": sum(shard["error_rows"] for shard in shards),
                "files": len(files),
            },
            "files": files,
            "shards": shards,
        }
        self.layout.book.publish(MANIFEST_FILE, json_bytes(manifest))
        return manifest

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json``: this run's figures (samples, errors, seconds, images_per_s)."""
        self.layout.book.publish(SUMMARY_FILE, json_bytes(sanitize_arguments(dict(summary))))

    def write_success(self) -> None:
        """``SUCCESS``, last of all: its presence promises that every listed file is complete and committed.

        ``staging/`` and ``fragments/`` are removed first, so a finished job leaves no scratch files.
        """
        self.layout.clean_scratch()
        write_bytes(self.layout.book.uri(SUCCESS_FILE), b"", self.layout.storage_options)

    def finish(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Manifest, summary, then ``SUCCESS``, in that order; returns the manifest."""
        manifest = self.write_manifest()
        self.write_summary(summary)
        failpoint("finish.before_success")
        self.write_success()
        logger.info(
            "finished %s: %d rows (%d errors) in %d files",
            manifest["output_uri"],
            manifest["totals"]["rows"],
            manifest["totals"]["error_rows"],
            manifest["totals"]["files"],
        )
        return manifest
