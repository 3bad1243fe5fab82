"""Where a job's files live, and the few storage operations on them (atomic publish, list, delete).

Split out of :mod:`pipeline.manifest` because two kinds of file now live in two places, and readers care which:

``OUT`` (``--output``) holds **only Parquet**, so that every reader pointed at the folder reads it as it is::

    OUT/part-<shard_id>-<NNNNN>.parquet   prediction rows of one input shard (error column null), in input order,
                                          at most rows_per_file each
    OUT/errors/part-<shard_id>.errors     that shard's error rows (same schema; prediction and embedding columns
                                          null), only when it has any; Parquet content, named so ``*.parquet`` skips it

Measured with the real tools (``tests/test_readers.py``): DuckDB ``read_parquet('OUT/**')``, pandas / pyarrow
``dataset(OUT)`` and ``datasets.load_dataset("parquet", data_dir=OUT)`` read every row, error rows included
(each input sample exactly once); embedding-reader and FAISS pipelines (``OUT/**/*.parquet``) and
``datasets.load_dataset(OUT)`` read only rows with an embedding, because a null embedding cannot be stacked. DuckDB
reads every file under a ``**`` glob, dot-files included, so no JSON or marker file may live under ``OUT``.

``OUT.job`` (beside ``OUT``: the same URI with ``.job`` appended) holds the bookkeeping::

    OUT.job/job.json                 job fingerprint, arguments (credentials removed), shard count
    OUT.job/plan.parquet             the frozen shard plan, one row per shard
    OUT.job/commits/<shard_id>.json  a shard is committed iff this exists; lists its files
    OUT.job/fragments/<shard_id>/    rows written by the writer stage, waiting for their shard's finalize task
    OUT.job/staging/                 local disk only: files being written (names end in ``.pending``)
    OUT.job/manifest.json, summary.json, SUCCESS   at the end, SUCCESS last

An output cannot be a bucket's root (``s3://bucket/``): its bookkeeping would have no place beside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from model.storage import (
    StorageOptions,
    filesystem_for,
    join_uri,
    protocol_of,
    with_retries,
    write_bytes,
)

logger = logging.getLogger(__name__)

BOOKKEEPING_SUFFIX = ".job"
JOB_FILE = "job.json"
PLAN_FILE = "plan.parquet"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"
SUCCESS_FILE = "SUCCESS"
COMMITS_DIR = "commits"
FRAGMENTS_DIR = "fragments"
STAGING_DIR = "staging"
ERRORS_DIR = "errors"
ERRORS_SUFFIX = ".errors"

# Shard ids become parts of file names and of glob patterns, so they are restricted to characters that are safe in
# both; they start with an alphanumeric so that they never collide with hidden files.
_SHARD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# The index is the last ``-<digits>`` group, so ``part-a-00001-00000.parquet`` belongs to shard ``a-00001``.
_PART_NAME = re.compile(r"part-(?P<shard_id>[A-Za-z0-9][A-Za-z0-9._-]*)-(?P<index>\d{5,})\.parquet")
_ERRORS_NAME = re.compile(r"part-(?P<shard_id>[A-Za-z0-9][A-Za-z0-9._-]*)\.errors")


def check_shard_id(shard_id: str) -> str:
    """Return ``shard_id`` if it is safe inside file names and glob patterns, else raise ``ValueError``."""
    if not isinstance(shard_id, str) or not _SHARD_ID.fullmatch(shard_id):
        raise ValueError(
            f"shard id {shard_id!r} cannot name output files: use 1-200 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return shard_id


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode()


def bookkeeping_uri(output_uri: str) -> str:
    """``s3://b/preds/`` -> ``s3://b/preds.job``; refuses a bucket root, which has no place beside it."""
    stripped = output_uri.rstrip("/")
    _, _, path = stripped.partition("://") if "://" in stripped else ("", "", stripped)
    if "://" in stripped and "/" not in path:
        raise ValueError(
            f"output {output_uri} is a bucket root; write to a folder inside it (s3://bucket/predictions/) so that "
            "the job's bookkeeping can live beside it"
        )
    return stripped + BOOKKEEPING_SUFFIX


@dataclass(frozen=True)
class CommitRecord:
    """``commits/<shard_id>.json``: its existence makes a shard committed; ``files`` are names relative to OUT."""

    shard_id: str
    files: list[str]
    rows: int
    error_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CommitRecord:
        return cls(
            shard_id=str(values["shard_id"]),
            files=[str(name) for name in values["files"]],
            rows=int(values["rows"]),
            error_rows=int(values["error_rows"]),
        )


@dataclass(frozen=True)
class StorageFolder:
    """One folder (local or object store) with retried operations; names are relative to ``uri_root``.

    ``staging`` is the local folder where files are written before their rename (on the same filesystem, so that
    ``os.replace`` is atomic); object stores PUT at the final name, which they make visible only when complete.
    """

    uri_root: str
    staging: str
    storage_options: StorageOptions | None = field(default=None, repr=False)  # may hold credentials

    def uri(self, name: str = "") -> str:
        return join_uri(self.uri_root, name) if name else self.uri_root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return protocol_of(self.uri_root) == "file"

    def filesystem(self) -> tuple[Any, str]:
        filesystem, root = filesystem_for(self.uri_root, self.storage_options)
        return filesystem, root.rstrip("/")

    def publish(self, name: str, data: bytes | pa.Buffer) -> None:
        """Make ``data`` appear at ``name`` complete or not at all.

        Local disk: write and fsync under ``staging`` (name ends in ``.pending``), then ``os.replace`` onto the final
        name; fsync first so that a power cut cannot leave a committed shard whose data file is empty. Object
        stores: one PUT at the final name.
        """
        uri = self.uri(name)
        if not self.is_local:
            payload = data.to_pybytes() if isinstance(data, pa.Buffer) else data
            write_bytes(uri, payload, self.storage_options)
            return
        _, root = self.filesystem()
        _, staging = filesystem_for(self.staging, self.storage_options)
        pending = f"{staging.rstrip('/')}/{uuid.uuid4().hex}-{name.replace('/', '_')}.pending"
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

    def write(self, name: str, data: bytes | pa.Buffer) -> None:
        """A plain write, for files nobody reads until they are listed in a record (fragments)."""
        payload = data.to_pybytes() if isinstance(data, pa.Buffer) else data
        write_bytes(self.uri(name), payload, self.storage_options)

    def read_bytes(self, name: str) -> bytes:
        filesystem, root = self.filesystem()
        return with_retries(lambda: filesystem.cat_file(f"{root}/{name}"), description=f"reading {self.uri(name)}")

    def read_json(self, name: str) -> Any | None:
        """The parsed JSON document at ``name``, or ``None`` if there is none."""
        try:
            data = self.read_bytes(name)
        except FileNotFoundError:
            return None
        return json.loads(data)

    def read_json_many(self, names: Sequence[str]) -> dict[str, Any]:
        """Read many small JSON documents in one batch (s3fs fetches them concurrently)."""
        if not names:
            return {}
        filesystem, root = self.filesystem()
        paths = [f"{root}/{name}" for name in names]
        contents = with_retries(
            lambda: filesystem.cat(paths, on_error="raise"),
            description=f"reading {len(paths)} records under {self.uri()}",
        )
        by_path = {path.rstrip("/"): data for path, data in contents.items()}
        return {name: json.loads(by_path[path]) for name, path in zip(names, paths)}

    def exists(self, name: str) -> bool:
        filesystem, root = self.filesystem()
        filesystem.invalidate_cache(root)
        return with_retries(lambda: filesystem.exists(f"{root}/{name}"), description=f"checking {self.uri(name)}")

    def list_names(self, directory: str = "", *, prefix: str = "") -> list[str]:
        """Names (relative to ``directory``) of entries directly under it, optionally starting with ``prefix``.

        The prefix is sent to the store (s3fs lists only matching keys), so finding one shard's part files stays one
        request however many shards the output holds. Caches are dropped first: another process may have written.
        """
        filesystem, root = self.filesystem()
        base = f"{root}/{directory}".rstrip("/")
        filesystem.invalidate_cache(base)
        try:
            found = with_retries(
                lambda: filesystem.find(base, maxdepth=1, withdirs=True, prefix=prefix),
                description=f"listing {self.uri(directory)}",
            )
        except FileNotFoundError:
            return []
        finally:
            # s3fs caches a prefix-filtered listing as if it were the whole folder; later isfile/exists calls on
            # the same (shared, cached) filesystem object would then miss files outside the prefix.
            filesystem.invalidate_cache(base)
        names = [path.rstrip("/").rsplit("/", 1)[-1] for path in found if path.rstrip("/") != base]
        return sorted(name for name in names if name.startswith(prefix))

    def delete(self, names: Sequence[str], *, recursive: bool = False) -> None:
        """Delete entries (missing ones are fine: a crash may have removed them already)."""
        if not names:
            return
        filesystem, root = self.filesystem()
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


@dataclass(frozen=True)
class OutputLayout:
    """Names of everything a job writes (data under ``output_uri``, bookkeeping beside it) and operations on them.

    Small and picklable: the writer stage and the finalize tasks get one and rebuild filesystems where they run.
    """

    output_uri: str
    storage_options: StorageOptions | None = field(default=None, repr=False)  # may hold credentials

    @property
    def bookkeeping_uri(self) -> str:
        return bookkeeping_uri(self.output_uri)

    @property
    def data(self) -> StorageFolder:
        """``OUT``: Parquet only."""
        return StorageFolder(self.output_uri, join_uri(self.bookkeeping_uri, STAGING_DIR), self.storage_options)

    @property
    def book(self) -> StorageFolder:
        """``OUT.job``: the bookkeeping."""
        return StorageFolder(self.bookkeeping_uri, join_uri(self.bookkeeping_uri, STAGING_DIR), self.storage_options)

    # ---- names -------------------------------------------------------------------------------------------------

    @staticmethod
    def part_name(shard_id: str, index: int) -> str:
        return f"part-{check_shard_id(shard_id)}-{index:05d}.parquet"

    @staticmethod
    def errors_name(shard_id: str) -> str:
        return f"{ERRORS_DIR}/part-{check_shard_id(shard_id)}{ERRORS_SUFFIX}"

    @staticmethod
    def commit_name(shard_id: str) -> str:
        return f"{COMMITS_DIR}/{check_shard_id(shard_id)}.json"

    @staticmethod
    def fragment_name(shard_id: str) -> str:
        """A fresh name per call: a retried writer never overwrites a fragment the driver may have listed."""
        return f"{FRAGMENTS_DIR}/{check_shard_id(shard_id)}/{uuid.uuid4().hex}.parquet"

    @staticmethod
    def is_owned_data_name(name: str) -> bool:
        """True for top-level names under OUT that this layout writes (``--overwrite`` deletes exactly these)."""
        return name == ERRORS_DIR or _PART_NAME.fullmatch(name) is not None

    # ---- shards ------------------------------------------------------------------------------------------------

    def part_files_of(self, shard_id: str) -> list[str]:
        """This shard's data and errors files now present (exact: ``a`` does not claim ``part-a-1-00000.parquet``)."""
        prefix = f"part-{check_shard_id(shard_id)}"
        names = [
            name
            for name in self.data.list_names(prefix=prefix + "-")
            if (match := _PART_NAME.fullmatch(name)) and match["shard_id"] == shard_id
        ]
        names += [
            f"{ERRORS_DIR}/{name}"
            for name in self.data.list_names(ERRORS_DIR, prefix=prefix + ".")
            if (match := _ERRORS_NAME.fullmatch(name)) and match["shard_id"] == shard_id
        ]
        return sorted(names)

    def remove_stale_parts(self, shard_id: str, keep: Sequence[str]) -> list[str]:
        """Delete this shard's files that are not in ``keep``; returns what was deleted."""
        stale = sorted(set(self.part_files_of(shard_id)) - set(keep))
        if stale:
            logger.info("shard %s: deleting %d file(s) left by an earlier attempt", shard_id, len(stale))
            self.data.delete(stale)
        return stale

    def write_commit(self, record: CommitRecord) -> None:
        self.book.publish(self.commit_name(record.shard_id), json_bytes(record.to_dict()))

    def committed_shard_ids(self) -> set[str]:
        """One listing of ``commits/``: the names say which shards are done, nothing needs reading."""
        return {name[: -len(".json")] for name in self.book.list_names(COMMITS_DIR) if name.endswith(".json")}

    def delete_fragments(self, names: Sequence[str]) -> None:
        self.book.delete(list(names))

    def clean_scratch(self) -> None:
        """Delete ``staging/`` and ``fragments/``: at start-up and at the end they only hold leftovers of attempts
        whose rows were redone or already committed."""
        self.book.delete([STAGING_DIR, FRAGMENTS_DIR], recursive=True)

    def delete_owned(self) -> list[str]:
        """``--overwrite``: the bookkeeping folder and the data names this layout writes, and nothing else."""
        owned = [name for name in self.data.list_names() if self.is_owned_data_name(name)]
        self.data.delete(owned, recursive=True)
        book_names = self.book.list_names()
        self.book.delete(book_names, recursive=True)
        owned.extend(f"{self.bookkeeping_uri}/{name}" for name in book_names)
        return owned
