"""Job bookkeeping for the Parquet output: the job record, shard commits, resume state and the final manifest.

The output protocol
-------------------
Everything a job writes lives under its output prefix ``OUT``, and only the driver writes it::

    OUT/_job.json                           job fingerprint + frozen shard plan + sanitised arguments
    OUT/part-<shard_id>-<NNNNN>.parquet     data: one shard's rows sorted by ordinal, at most rows_per_file each
    OUT/_commits/<shard_id>.json            commit record {shard_id, files, rows, error_rows}
    OUT/_staging/...                        local disk only: files being written (names end in ``.pending``)
    OUT/_manifest.json, OUT/_summary.json   at the end
    OUT/_SUCCESS                            written last

Who writes what, in which order:

1. At the first start, before any data, the driver writes ``_job.json``: the job fingerprint (task, model, weights
   sha256, preprocessing, dtype, top_k, embedding options, project version), the shard plan (the list of input
   shards, each with a stable ``shard_id``) and the job's arguments with credentials removed. On a later start the
   recorded fingerprint is compared with the new one: a difference in anything that changes results is refused
   (:class:`OutputConflictError`), because mixing two models' outputs under one prefix cannot be undone row by row.
   The recorded plan, not a fresh listing, decides which shards the job has, so a resume never changes the input set.
2. Rows of many shards arrive at the driver mixed and in any order; :class:`ShardAssembler` buffers them per shard and
   hands out a shard once every ordinal ``0..n-1`` has arrived. A row that arrives again (a Ray task that died and
   was re-executed may send rows twice) is recognised by its ordinal, key and source and dropped, so the shard
   holds each row once.
3. For each complete shard, :func:`pipeline.sink.commit_shard`:

   a. sorts the rows by ordinal and cuts them into files of at most ``rows_per_file`` rows, named
      ``part-<shard_id>-00000.parquet``, ``-00001``, ...: the names depend only on the shard and the row count;
   b. makes each file appear at its final name all at once (:meth:`OutputLayout.publish`): on local disk it is
      written and fsynced under ``_staging/<shard_id>/<name>.pending`` and then renamed into place with
      ``os.replace``; on object stores it is PUT directly at the final name;
   c. deletes part files of this shard beyond the new file count, left by a crashed attempt that cut the shard
      into more files (another ``rows_per_file``);
   d. writes ``_commits/<shard_id>.json`` LAST, itself all at once. A shard is committed if and only if its commit
      record exists.

   Different shards may be committed concurrently (the driver uses a thread pool): they share no file name and
   no staging folder.
4. When every shard of the plan is committed: ``_manifest.json`` (inputs, per-shard rows/errors/files, totals, the
   fingerprint, timestamps, built from the commit records in storage), ``_summary.json`` (samples, errors, seconds,
   images/s), then ``_staging/`` is removed and ``_SUCCESS`` written, last.

Why a reader never sees a partial file: a data file only ever appears at its ``.parquet`` name complete. A rename
within one filesystem is atomic (``os.replace``), and an object-store PUT (multipart uploads included) makes an
object visible only once the upload has completed (S3, GCS and Azure Blob all guarantee this, with strong
read-after-write consistency), so the direct PUT is as atomic as a copy-then-delete from a staging key and costs one
request instead of three, without copying the data a second time. Files still being written locally end in ``.pending`` under
``_staging/``, so a glob of ``*.parquet`` or ``**/*.parquet`` never matches them. The JSON records follow the same
rule, so ``_job.json`` and commit records are never half written either.

Why a redo is exactly-once: on resume, committed shards are skipped, leftovers under ``_staging/`` are deleted, and
every uncommitted shard is redone from its first row. Its file names and its row split are deterministic, so the redo
overwrites whatever a crashed attempt left at the same names, and step 3c removes names the redo no longer uses,
before the commit record is written. When the commit record appears, the shard's part files are exactly the ones it
lists, each holding the shard's rows once. Nothing is ever appended, so nothing can be counted twice.

What readers should do: wait for ``_SUCCESS`` (or read the files listed in ``_manifest.json`` /
``_commits/*.json``). While a job runs, or after a crash, a glob may show complete files of a shard whose commit
record is not written yet; the redo replaces them with the same rows (same keys; values equal up to the
device's numerics). Credentials never reach any of these files:
arguments go through :func:`pipeline.redaction.sanitize_arguments`, URIs in the plan through
:func:`pipeline.redaction.sanitize_uri`.

Only one job may write to an output prefix at a time. ``--overwrite`` deletes exactly what this layout names
(``part-*-NNNNN.parquet``, ``_commits/``, ``_staging/``, ``_job.json``, ``_manifest.json``, ``_summary.json``,
``_SUCCESS``) and nothing else under the prefix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ORDINAL_COLUMN, SHARD_ID_COLUMN, SHARD_ROWS_COLUMN
from pipeline.failpoints import failpoint
from pipeline.redaction import sanitize_arguments, sanitize_uri, strip_uri_credentials
from model.storage import (
    StorageOptions,
    filesystem_for,
    join_uri,
    protocol_of,
    with_retries,
    write_bytes,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"
COMMITS_DIR = "_commits"
STAGING_DIR = "_staging"
_OWNED_FILES = (JOB_FILE, MANIFEST_FILE, SUMMARY_FILE, SUCCESS_FILE)
_OWNED_DIRS = (COMMITS_DIR, STAGING_DIR)

# Shard ids become parts of file names and of glob patterns, so they are restricted to characters that are safe in
# both; they start with an alphanumeric so that they never collide with ``_staging/_tmp`` or hidden files.
_SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# The index is the last ``-<digits>`` group, so ``part-a-00001-00000.parquet`` belongs to shard ``a-00001``.
_PART_NAME = re.compile(r"part-(?P<shard_id>[A-Za-z0-9][A-Za-z0-9._-]*)-(?P<index>\d{5,})\.parquet")


class OutputConflictError(RuntimeError):
    """The output prefix holds results of a different job; the message says what differs and how to start over."""


class ShardAssemblyError(ValueError):
    """Rows of a shard arrived twice, out of range, or with inconsistent totals: a bug upstream of the sink."""


def check_shard_id(shard_id: str) -> str:
    """Return ``shard_id`` if it is safe inside file names and glob patterns, else raise ``ValueError``."""
    if not isinstance(shard_id, str) or not _SHARD_ID.fullmatch(shard_id):
        raise ValueError(
            f"shard id {shard_id!r} cannot name output files: use 1-200 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return shard_id


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _canonical(value: Any) -> Any:
    """JSON round-trip, so that tuples and lists (or int and str keys) compare as they will once stored."""
    return json.loads(json.dumps(value, sort_keys=True))


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode()


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
# Layout and atomic I/O
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitRecord:
    """``_commits/<shard_id>.json``: its existence is what makes a shard committed; ``files`` are relative names."""

    shard_id: str
    files: list[str]
    rows: int
    error_rows: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CommitRecord:
        return cls(
            shard_id=str(values["shard_id"]),
            files=[str(name) for name in values["files"]],
            rows=int(values["rows"]),
            error_rows=int(values["error_rows"]),
        )


@dataclass(frozen=True)
class OutputLayout:
    """Names of everything a job writes under its output prefix, and the few storage operations on them.

    Every operation goes through :func:`model.storage.with_retries`; names are relative to ``output_uri``.
    """

    output_uri: str
    storage_options: StorageOptions | None = field(default=None, repr=False)  # may hold credentials

    def uri(self, name: str = "") -> str:
        return join_uri(self.output_uri, name) if name else self.output_uri.rstrip("/")

    @property
    def is_local(self) -> bool:
        return protocol_of(self.output_uri) == "file"

    @staticmethod
    def part_name(shard_id: str, index: int) -> str:
        return f"part-{check_shard_id(shard_id)}-{index:05d}.parquet"

    @staticmethod
    def commit_name(shard_id: str) -> str:
        return f"{COMMITS_DIR}/{check_shard_id(shard_id)}.json"

    @staticmethod
    def pending_name(shard_id: str, final_name: str) -> str:
        return f"{STAGING_DIR}/{check_shard_id(shard_id)}/{final_name}.pending"

    @staticmethod
    def is_owned_top_level_name(name: str) -> bool:
        """True for top-level names this layout writes (``--overwrite`` deletes exactly these)."""
        return name in _OWNED_FILES or name in _OWNED_DIRS or _PART_NAME.fullmatch(name) is not None

    def _filesystem(self) -> tuple[Any, str]:
        filesystem, root = filesystem_for(self.output_uri, self.storage_options)
        return filesystem, root.rstrip("/")

    def publish(self, name: str, data: bytes | pa.Buffer, *, pending_name: str | None = None) -> None:
        """Make ``data`` appear at ``name`` complete or not at all.

        Local disk: write and fsync ``pending_name`` (under ``_staging/``, ending in ``.pending``), then
        ``os.replace`` onto the final name; fsync first so that a power cut cannot leave a committed shard whose data
        file is empty. Object stores: one PUT at the final name, which the store makes visible only when complete.
        """
        uri = self.uri(name)
        if not self.is_local:
            payload = data.to_pybytes() if isinstance(data, pa.Buffer) else data
            write_bytes(uri, payload, self.storage_options)
            return
        _, root = self._filesystem()
        if pending_name is None:
            # Unique, so that two records written at once never share a temporary; under _staging/ so leftovers of
            # a crash are owned and cleaned like any other staging file.
            pending_name = f"{STAGING_DIR}/_tmp/{uuid.uuid4().hex}-{name.replace('/', '_')}.pending"
        pending = f"{root}/{pending_name}"
        final = f"{root}/{name}"

        def write_then_rename() -> None:
            os.makedirs(os.path.dirname(pending), exist_ok=True)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            with open(pending, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(pending, final)

        with_retries(write_then_rename, description=f"writing {uri}")

    def read_json(self, name: str) -> Any | None:
        """The parsed JSON document at ``name``, or ``None`` if there is none."""
        filesystem, root = self._filesystem()
        try:
            data = with_retries(lambda: filesystem.cat_file(f"{root}/{name}"), description=f"reading {self.uri(name)}")
        except FileNotFoundError:
            return None
        return json.loads(data)

    def read_json_many(self, names: Sequence[str]) -> dict[str, Any]:
        """Read many small JSON documents in one batch (s3fs fetches them concurrently)."""
        if not names:
            return {}
        filesystem, root = self._filesystem()
        paths = [f"{root}/{name}" for name in names]
        contents = with_retries(
            lambda: filesystem.cat(paths, on_error="raise"),
            description=f"reading {len(paths)} records under {self.uri()}",
        )
        by_path = {path.rstrip("/"): data for path, data in contents.items()}
        return {name: json.loads(by_path[path]) for name, path in zip(names, paths)}

    def exists(self, name: str) -> bool:
        filesystem, root = self._filesystem()
        filesystem.invalidate_cache(root)
        return with_retries(lambda: filesystem.exists(f"{root}/{name}"), description=f"checking {self.uri(name)}")

    def list_names(self, directory: str = "", *, prefix: str = "") -> list[str]:
        """Names (relative to ``directory``) of entries directly under it, optionally starting with ``prefix``.

        The prefix is sent to the store (s3fs lists only matching keys), so finding one shard's part files stays one
        request however many shards the output holds. Caches are dropped first: another process may have written.
        """
        filesystem, root = self._filesystem()
        base = f"{root}/{directory}".rstrip("/")
        filesystem.invalidate_cache(base)
        try:
            found = with_retries(
                lambda: filesystem.find(base, maxdepth=1, withdirs=True, prefix=prefix),
                description=f"listing {self.uri(directory)}",
            )
        except FileNotFoundError:
            return []
        names = [path.rstrip("/").rsplit("/", 1)[-1] for path in found if path.rstrip("/") != base]
        return sorted(name for name in names if name.startswith(prefix))

    def delete(self, names: Sequence[str], *, recursive: bool = False) -> None:
        """Delete entries (missing ones are fine: a crash may have removed them already)."""
        if not names:
            return
        filesystem, root = self._filesystem()
        paths = [f"{root}/{name}" for name in names]

        def remove() -> None:
            try:
                filesystem.rm(paths, recursive=recursive)  # s3fs deletes up to 1000 keys per request
            except FileNotFoundError:
                for path in paths:
                    if filesystem.exists(path):
                        filesystem.rm(path, recursive=recursive)

        with_retries(remove, description=f"deleting {len(paths)} entries under {self.uri()}")
        filesystem.invalidate_cache(root)

    def part_files_of(self, shard_id: str) -> list[str]:
        """The part files of one shard now present (exact match: ``a`` does not claim ``part-a-1-00000.parquet``)."""
        prefix = f"part-{check_shard_id(shard_id)}-"
        names = self.list_names(prefix=prefix)
        return [name for name in names if (match := _PART_NAME.fullmatch(name)) and match["shard_id"] == shard_id]

    def remove_stale_parts(self, shard_id: str, keep: Sequence[str]) -> list[str]:
        """Delete this shard's part files that are not in ``keep``; returns what was deleted."""
        stale = sorted(set(self.part_files_of(shard_id)) - set(keep))
        if stale:
            logger.info("shard %s: deleting %d part file(s) left by an earlier attempt", shard_id, len(stale))
            self.delete(stale)
        return stale

    def write_commit(self, record: CommitRecord) -> None:
        # Staged in the shard's own staging folder, which the writer removes right after.
        pending = f"{STAGING_DIR}/{record.shard_id}/_commit.json.pending"
        self.publish(self.commit_name(record.shard_id), _json_bytes(record.to_dict()), pending_name=pending)

    def committed_shard_ids(self) -> set[str]:
        return {name[: -len(".json")] for name in self.list_names(COMMITS_DIR) if name.endswith(".json")}

    def clean_staging(self, shard_id: str | None = None) -> None:
        """Delete ``_staging/`` (or one shard's part of it).

        At start-up everything there is a leftover of a run that died; after a local commit the shard's staging
        folder is empty and only clutters the output. Object-store runs never stage, so there is nothing to list.
        """
        if shard_id is not None and not self.is_local:
            return
        self.delete([STAGING_DIR if shard_id is None else f"{STAGING_DIR}/{check_shard_id(shard_id)}"], recursive=True)

    def delete_owned(self) -> list[str]:
        """``--overwrite``: delete everything this layout names under the prefix, and nothing else."""
        owned = [name for name in self.list_names() if self.is_owned_top_level_name(name)]
        self.delete(owned, recursive=True)
        return owned


# --------------------------------------------------------------------------------------------------------------------
# Job state: create or resume, then the manifest
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OutputState:
    """The job's view of its output prefix: what was planned, what is committed, and the end-of-job records.

    Build it with :meth:`open`; the driver skips ``committed_shard_ids``, commits the rest with
    :func:`pipeline.sink.commit_shard`, then calls :meth:`finish`.
    """

    layout: OutputLayout
    fingerprint: JobFingerprint
    shard_plan: list[dict[str, Any]]
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
        shard_plan: Sequence[Mapping[str, Any]],
        arguments: Any,
        *,
        overwrite: bool = False,
        storage_options: StorageOptions | None = None,
    ) -> OutputState:
        """Create the job record at ``output_uri`` or resume the job recorded there.

        On resume the plan recorded at the first start is returned (``shard_plan`` only matters the first time), so
        inputs added since then are not silently mixed in. Raises :class:`OutputConflictError` when the prefix holds
        another job's results.
        """
        layout = OutputLayout(output_uri, storage_options)
        shown_uri = sanitize_uri(output_uri)
        arguments = sanitize_arguments(arguments)  # the state keeps only this copy, so its repr is safe to log
        if overwrite:
            deleted = layout.delete_owned()
            logger.info("--overwrite: deleted %d job entries under %s", len(deleted), shown_uri)
        try:
            record = layout.read_json(JOB_FILE)
        except json.JSONDecodeError as error:
            raise OutputConflictError(
                f"{layout.uri(JOB_FILE)} is not valid JSON ({error}); pass --overwrite to start {shown_uri} over"
            ) from error
        if record is None:
            return cls._create(layout, fingerprint, shard_plan, arguments)
        return cls._resume(layout, fingerprint, shard_plan, arguments, record)

    @classmethod
    def _create(
        cls,
        layout: OutputLayout,
        fingerprint: JobFingerprint,
        shard_plan: Sequence[Mapping[str, Any]],
        arguments: Any,
    ) -> OutputState:
        shown_uri = sanitize_uri(layout.output_uri)
        leftovers = [name for name in layout.list_names() if layout.is_owned_top_level_name(name)]
        if leftovers:
            # Without _job.json nobody can tell which model made these files; refuse rather than mix.
            raise OutputConflictError(
                f"{shown_uri} holds job files ({', '.join(leftovers[:5])}{', ...' if len(leftovers) > 5 else ''}) "
                "but no _job.json, so their model and settings are unknown; pass --overwrite to start over or choose "
                "another output"
            )
        plan = strip_uri_credentials([dict(shard) for shard in shard_plan])
        shard_ids = [check_shard_id(shard.get("shard_id")) for shard in plan]
        if len(set(shard_ids)) != len(shard_ids):
            raise ValueError(f"the shard plan for {shown_uri} repeats shard ids; every shard needs its own id")
        created_at = _utc_now()
        job = {
            "format_version": FORMAT_VERSION,
            "created_at": created_at,
            "fingerprint": fingerprint.to_dict(),
            "arguments": arguments,
            "shard_plan": plan,
        }
        layout.publish(JOB_FILE, _json_bytes(job))
        logger.info("started job at %s: %d shards", shown_uri, len(plan))
        return cls(layout, fingerprint, plan, set(), arguments, created_at=created_at)

    @classmethod
    def _resume(
        cls,
        layout: OutputLayout,
        fingerprint: JobFingerprint,
        shard_plan: Sequence[Mapping[str, Any]],
        arguments: Any,
        record: Mapping[str, Any],
    ) -> OutputState:
        shown_uri = sanitize_uri(layout.output_uri)
        recorded = JobFingerprint.from_dict(record["fingerprint"])
        differences = recorded.diff(fingerprint)
        if differences:
            lines = "\n".join(f"  - {line}" for line in differences)
            raise OutputConflictError(
                f"{shown_uri} holds results of a different job (recorded in {JOB_FILE}); differing settings, "
                f"recorded -> now:\n{lines}\n"
                f"Pass --overwrite to delete that job's files under {shown_uri} and start over, "
                "or choose another output."
            )
        for name in ("model_uri", "project_version"):
            old, new = sanitize_uri(str(getattr(recorded, name))), sanitize_uri(str(getattr(fingerprint, name)))
            if old != new:
                logger.warning("resuming %s: %s changed from %r to %r (same results)", shown_uri, name, old, new)
        plan = [dict(shard) for shard in record["shard_plan"]]
        planned = {shard["shard_id"] for shard in plan}
        listed = {shard.get("shard_id") for shard in shard_plan}
        if listed and listed != planned:
            logger.warning(
                "resuming %s: the input listing now has %d shard(s) not in the recorded plan and lacks %d; using the "
                "plan recorded at %s (%d shards); pass --overwrite to plan again",
                shown_uri,
                len(listed - planned),
                len(planned - listed),
                record.get("created_at"),
                len(plan),
            )
        layout.clean_staging()
        committed = layout.committed_shard_ids()
        unknown = committed - planned
        if unknown:
            logger.warning("ignoring %d commit record(s) under %s for shards not in the plan", len(unknown), shown_uri)
        committed &= planned
        logger.info("resuming %s: %d of %d shards already committed", shown_uri, len(committed), len(plan))
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
    def pending_shards(self) -> list[dict[str, Any]]:
        """Shards of the plan still to do, in plan order."""
        return [shard for shard in self.shard_plan if shard["shard_id"] not in self.committed_shard_ids]

    @property
    def parquet_metadata(self) -> dict[str, str]:
        return self.fingerprint.parquet_metadata(self.arguments)

    @property
    def is_complete(self) -> bool:
        """True when ``_SUCCESS`` exists: the whole plan is committed and the manifest written."""
        return self.layout.exists(SUCCESS_FILE)

    def mark_committed(self, record: CommitRecord) -> None:
        self.committed_shard_ids.add(record.shard_id)

    def write_manifest(self) -> dict[str, Any]:
        """Write ``_manifest.json`` from the commit records in storage (the truth, whichever run wrote them)."""
        shown_uri = sanitize_uri(self.output_uri)
        shard_ids = [shard["shard_id"] for shard in self.shard_plan]
        committed = self.layout.committed_shard_ids()
        missing = [shard_id for shard_id in shard_ids if shard_id not in committed]
        if missing:
            raise RuntimeError(
                f"cannot write the manifest of {shown_uri}: {len(missing)} shard(s) not committed "
                f"(first: {missing[:3]}); run the job again to finish them"
            )
        records = self.layout.read_json_many([OutputLayout.commit_name(shard_id) for shard_id in shard_ids])
        shards = []
        files: list[str] = []
        for shard in self.shard_plan:
            commit = CommitRecord.from_dict(records[OutputLayout.commit_name(shard["shard_id"])])
            shards.append(
                {
                    "shard_id": commit.shard_id,
                    "input": shard,
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
        self.layout.publish(MANIFEST_FILE, _json_bytes(manifest))
        return manifest

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``_summary.json``: this run's figures (samples, errors, seconds, images_per_s)."""
        self.layout.publish(SUMMARY_FILE, _json_bytes(sanitize_arguments(dict(summary))))

    def write_success(self) -> None:
        """``_SUCCESS``, last of all: its presence promises that every listed file is complete and committed.

        ``_staging/`` is removed first, so a finished output holds no scratch folder; the marker is written directly,
        not through staging, because an empty file has no partial state (and staging would bring the folder back).
        """
        self.layout.clean_staging()
        write_bytes(self.layout.uri(SUCCESS_FILE), b"", self.layout.storage_options)

    def finish(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Manifest, summary, then ``_SUCCESS``, in that order; returns the manifest."""
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


# --------------------------------------------------------------------------------------------------------------------
# Reassembling shards from result batches
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _ShardBuffer:
    tables: list[pa.Table] = field(default_factory=list)
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    received: int = 0
    expected: int | None = None
    nbytes: int = 0


class ShardAssembler:
    """Buffer result rows per shard and release each shard once all its rows have arrived. Pure: no I/O, no Ray.

    Result tables carry ``shard_id`` (string), ``ordinal`` (int64, the row's position in its shard) and
    ``shard_rows`` (int64, null except on the shard's last row, where it holds the shard's row count). A shard is
    complete when ``shard_rows`` is known and ordinals ``0..n-1`` have all arrived. Every shard has at least one
    row (a shard that yields no images produces an error row upstream), because a shard with no rows would have no
    row to carry its count and could never complete.

    Re-sent rows are dropped, not refused. When a Ray task or actor dies after some of its output reached the next
    stage, Ray re-executes it from the start; Ray core drops the retry's outputs whose index was already delivered,
    which is exactly-once only as long as the retry cuts its output into the same blocks. Block cuts depend on
    sizes and timing inside Ray Data, so a row may arrive twice. A row whose ordinal already arrived with the same
    ``key`` and ``source`` is that row again: it is dropped (keeping the first copy) and counted in
    :attr:`rows_resent`; a later row of a shard already handed out is dropped the same way. A second row that claims
    an ordinal with a different key or source, an ordinal beyond the shard's size, or a different ``shard_rows`` is
    a bug upstream and raises :class:`ShardAssemblyError`.

    Example::

        assembler = ShardAssembler()
        for batch in result_batches:
            for shard_id, table in assembler.add(batch):
                commit_shard(output_uri, shard_id, table, ...)
    """

    def __init__(self) -> None:
        self._buffers: dict[str, _ShardBuffer] = {}
        self._completed: dict[str, int] = {}  # shard_id -> its row count, for rows re-sent after completion
        #: Rows accepted (each input sample once), error rows among them, and duplicate rows dropped.
        self.rows_accepted = 0
        self.error_rows_accepted = 0
        self.rows_resent = 0

    @property
    def buffered_rows(self) -> int:
        return sum(buffer.received for buffer in self._buffers.values())

    @property
    def buffered_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers.values())

    def pending_shards(self) -> dict[str, tuple[int, int | None]]:
        """``{shard_id: (rows received, rows expected or None)}`` for shards still incomplete."""
        return {shard_id: (buffer.received, buffer.expected) for shard_id, buffer in self._buffers.items()}

    def add(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """Take one result batch; return ``(shard_id, rows)`` for each shard it completed.

        Returned tables keep ``ordinal`` (the writer sorts by it) and drop ``shard_id``/``shard_rows``; the assembler
        keeps no reference to them, so their memory goes when the caller drops them.
        """
        missing = {SHARD_ID_COLUMN, ORDINAL_COLUMN, SHARD_ROWS_COLUMN} - set(table.column_names)
        if missing:
            raise ValueError(f"result batch lacks bookkeeping column(s) {sorted(missing)}; has {table.column_names}")
        if table.num_rows == 0:
            return []
        shard_codes, shard_names = self._shard_codes(table)
        ordinals = self._int_column(table, ORDINAL_COLUMN)
        shard_rows_column = table.column(SHARD_ROWS_COLUMN)
        has_total = shard_rows_column.is_valid().to_numpy(zero_copy_only=False)
        totals = shard_rows_column.fill_null(0).to_numpy().astype(np.int64, copy=False)

        order = np.argsort(shard_codes, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_codes[order])) + 1
        completed = []
        for rows in np.split(order, bounds):
            shard_id = shard_names[shard_codes[rows[0]]]
            part = table if len(rows) == table.num_rows else table.take(pa.array(rows))
            if self._add_rows(shard_id, part, ordinals[rows], totals[rows], has_total[rows]):
                buffer = self._buffers.pop(shard_id)
                self._completed[shard_id] = int(buffer.expected or 0)
                shard = pa.concat_tables(buffer.tables).drop_columns([SHARD_ID_COLUMN, SHARD_ROWS_COLUMN])
                completed.append((shard_id, shard))
        return completed

    @staticmethod
    def _shard_codes(table: pa.Table) -> tuple[np.ndarray, list[str]]:
        column = table.column(SHARD_ID_COLUMN)
        if column.null_count:
            raise ShardAssemblyError(f"{column.null_count} result row(s) have no shard_id")
        encoded = column.combine_chunks()
        if not pa.types.is_dictionary(encoded.type):
            encoded = encoded.dictionary_encode()
        return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()

    @staticmethod
    def _int_column(table: pa.Table, name: str) -> np.ndarray:
        column = table.column(name)
        if column.null_count:
            raise ShardAssemblyError(f"{column.null_count} result row(s) have a null {name}")
        return column.to_numpy().astype(np.int64, copy=False)

    def _add_rows(
        self, shard_id: str, part: pa.Table, ordinals: np.ndarray, totals: np.ndarray, has_total: np.ndarray
    ) -> bool:
        """Record one shard's rows from a batch (``totals`` counts only where ``has_total``); True once complete."""
        if ordinals.min() < 0:
            raise ShardAssemblyError(f"shard {shard_id!r}: negative ordinal {int(ordinals.min())}")
        if shard_id in self._completed:
            size = self._completed[shard_id]
            if ordinals.max() >= size or (has_total.any() and (totals[has_total] != size).any()):
                raise ShardAssemblyError(
                    f"shard {shard_id!r}: row(s) with ordinals {ordinals[:5].tolist()} arrived after the shard was "
                    f"complete with {size} rows, and do not fit it; rows were produced differently upstream"
                )
            # The buffer is gone, so keys cannot be compared; in range, these can only be copies of delivered rows.
            self.rows_resent += len(ordinals)
            logger.info("shard %s: dropped %d row(s) re-sent after the shard was complete", shard_id, len(ordinals))
            return False
        buffer = self._buffers.setdefault(shard_id, _ShardBuffer())
        for total, ordinal in zip(totals[has_total].tolist(), ordinals[has_total].tolist()):
            if total < 1 or ordinal != total - 1 or (buffer.expected is not None and buffer.expected != total):
                raise ShardAssemblyError(
                    f"shard {shard_id!r}: shard_rows={total} on the row with ordinal {ordinal} (recorded: "
                    f"{buffer.expected}); it must be set only on the last row (ordinal n-1) with n >= 1"
                )
            buffer.expected = total
        needed = int(ordinals.max()) + 1
        if needed > buffer.seen.size:
            grown = np.zeros(max(needed, 2 * buffer.seen.size, buffer.expected or 0), dtype=bool)
            grown[: buffer.seen.size] = buffer.seen
            buffer.seen = grown
        # Fresh rows: the first copy of each ordinal within this batch, and not delivered by an earlier batch.
        _, first_positions = np.unique(ordinals, return_index=True)
        fresh = np.zeros(len(ordinals), dtype=bool)
        fresh[first_positions] = True
        fresh &= ~buffer.seen[ordinals]
        if not fresh.all():
            self._check_resent(shard_id, buffer, part, fresh)
            self.rows_resent += int(np.count_nonzero(~fresh))
            part = part.filter(pa.array(fresh))
            ordinals = ordinals[fresh]
        if len(ordinals):
            buffer.seen[ordinals] = True
            buffer.tables.append(part)
            buffer.received += len(ordinals)
            buffer.nbytes += part.nbytes
            self.rows_accepted += len(ordinals)
            if "error" in part.column_names:
                self.error_rows_accepted += part.num_rows - part.column("error").null_count
        if buffer.expected is None:
            return False
        if buffer.seen.size > buffer.expected and buffer.seen[buffer.expected :].any():
            raise ShardAssemblyError(
                f"shard {shard_id!r}: ordinal {int(np.flatnonzero(buffer.seen)[-1])} is beyond the shard's "
                f"{buffer.expected} rows"
            )
        return buffer.received == buffer.expected

    @staticmethod
    def _check_resent(shard_id: str, buffer: _ShardBuffer, part: pa.Table, fresh: np.ndarray) -> None:
        """Raise unless every non-fresh row of ``part`` has the key and source of the row that holds its ordinal."""
        identity = [ORDINAL_COLUMN, "key", "source"]
        if not set(identity) <= set(part.column_names):
            raise ShardAssemblyError(
                f"shard {shard_id!r}: ordinal(s) arrived twice and the rows carry no key/source to compare"
            )
        repeats = part.filter(pa.array(~fresh)).select(identity)
        earlier = [table.select(identity) for table in buffer.tables]
        known = pa.concat_tables([*earlier, part.filter(pa.array(fresh)).select(identity)])
        wanted = repeats.column(ORDINAL_COLUMN).combine_chunks()
        known = known.filter(pc.is_in(known.column(ORDINAL_COLUMN), value_set=wanted))
        first = {row[ORDINAL_COLUMN]: (row["key"], row["source"]) for row in known.to_pylist()}
        for row in repeats.to_pylist():
            original = first.get(row[ORDINAL_COLUMN])
            if original != (row["key"], row["source"]):
                raise ShardAssemblyError(
                    f"shard {shard_id!r}: ordinal {row[ORDINAL_COLUMN]} arrived twice with different samples "
                    f"({original} and {(row['key'], row['source'])}); rows were produced differently upstream"
                )
        logger.info("shard %s: dropped %d re-sent row(s) (a retried task sent them again)", shard_id, len(repeats))
