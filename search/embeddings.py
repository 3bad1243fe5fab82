"""Reading a classify/embed job's Parquet output: its data files, the ``embedding`` column and the model fingerprint.

What this module assumes about the job's output, and nothing more (the output layout of the job may change):

* the data files are the ``*.parquet`` files directly under the output prefix (bookkeeping files start with ``_``
  and are not Parquet, error rows may or may not live there);
* each data file has ``key``, ``source`` and ``embedding`` (``fixed_size_list<float32|float16>[D]``) columns; rows
  whose embedding is null (error rows) are skipped;
* each data file's key-value metadata carries the job's fingerprint
  (:meth:`pipeline.manifest.JobFingerprint.parquet_metadata`): model URI, weights sha256, preprocessing, dtype.

:func:`read_fingerprint` is the one place that knows where the fingerprint lives; adapt it if that moves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.storage import StorageOptions, filesystem_for, to_uri, with_retries
from pipeline.manifest import JobFingerprint
from search.errors import EmbeddingInputError

logger = logging.getLogger(__name__)

EMBEDDING_COLUMN = "embedding"
KEY_COLUMN = "key"
SOURCE_COLUMN = "source"
# Fingerprint fields whose difference means two files' embeddings are not comparable (top_k and task are not among
# them: a classify job and an embed job with the same model give the same embedding).
COMPARABLE_FIELDS = ("weights_sha256", "preprocessing", "dtype", "embedding_dtype", "normalize_embeddings")
# Fields stored as JSON in the Parquet metadata (parquet_metadata writes non-strings with json.dumps).
_JSON_FIELDS = ("preprocessing", "top_k", "normalize_embeddings")


@dataclass(frozen=True)
class EmbeddingBatch:
    """The usable rows of one data file: float32 vectors ``(n, dim)`` with their keys and sources."""

    keys: list[str]
    sources: list[str]
    vectors: np.ndarray
    rows_read: int  # all rows of the file, error rows included

    def __len__(self) -> int:
        return len(self.keys)


def list_data_files(uri: str, storage_options: StorageOptions | None = None) -> list[str]:
    """The ``*.parquet`` files directly under ``uri`` (or ``uri`` itself when it names one file, or a glob), sorted.

    Raises :class:`EmbeddingInputError` when there are none, naming the URI.
    """
    filesystem, path = filesystem_for(uri, storage_options)
    if any(char in path for char in "*?[") or path.endswith(".parquet"):
        pattern = path
    else:
        pattern = f"{path.rstrip('/')}/*.parquet"

    def listing() -> list[str]:
        filesystem.invalidate_cache()
        return sorted(filesystem.glob(pattern))

    try:
        found = with_retries(listing, description=f"listing {uri}")
    except FileNotFoundError:
        found = []
    if not found:
        raise EmbeddingInputError(
            f"no Parquet data files under {uri}: give the --output prefix of a finished classify or embed job "
            "(its data files are <prefix>/*.parquet)"
        )
    return [to_uri(filesystem, name) for name in found]


def fingerprint_from_metadata(metadata: Mapping[bytes, bytes] | Mapping[str, str] | None) -> JobFingerprint | None:
    """The job fingerprint a data file's key-value metadata records, or None when it records none."""
    if not metadata:
        return None
    values: dict[str, Any] = {}
    for name, value in metadata.items():
        key = name.decode() if isinstance(name, bytes) else name
        text = value.decode() if isinstance(value, bytes) else value
        values[key] = json.loads(text) if key in _JSON_FIELDS else text
    if "weights_sha256" not in values or "task" not in values:
        return None
    return JobFingerprint.from_dict(values)


def read_fingerprint(file_uri: str, storage_options: StorageOptions | None = None) -> tuple[JobFingerprint, int, int]:
    """``(fingerprint, rows, embedding width)`` of one data file, from its footer only (no data is read).

    This is the one function that knows where the embedding job's fingerprint is stored: today in every data file's
    Parquet key-value metadata (not ``_job.json``, whose place in the output layout may change).
    """
    filesystem, path = filesystem_for(file_uri, storage_options)

    def footer() -> pq.FileMetaData:
        with filesystem.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata

    try:
        metadata = with_retries(footer, description=f"reading the Parquet footer of {file_uri}")
    except (pa.ArrowInvalid, OSError) as error:
        raise EmbeddingInputError(f"{file_uri} is not a readable Parquet file: {error}") from error
    schema = metadata.schema.to_arrow_schema()
    dim = embedding_width(schema, file_uri)
    fingerprint = fingerprint_from_metadata(schema.metadata)
    if fingerprint is None:
        raise EmbeddingInputError(
            f"{file_uri} records no model fingerprint in its Parquet metadata: index only the output of this "
            "project's classify or embed jobs (or write the file with JobFingerprint.parquet_metadata)"
        )
    return fingerprint, metadata.num_rows, dim


def embedding_width(schema: pa.Schema, uri: str) -> int:
    """The fixed length of the ``embedding`` column; raises :class:`EmbeddingInputError` when it has none."""
    if EMBEDDING_COLUMN not in schema.names:
        raise EmbeddingInputError(
            f"{uri} has no {EMBEDDING_COLUMN!r} column (columns: {', '.join(schema.names)}): index the output of a "
            "classify or embed job"
        )
    field_type = schema.field(EMBEDDING_COLUMN).type
    if not pa.types.is_fixed_size_list(field_type) or not pa.types.is_floating(field_type.value_type):
        raise EmbeddingInputError(
            f"{uri}: column {EMBEDDING_COLUMN!r} is {field_type}, expected fixed_size_list<float32|float16>[D]"
        )
    return int(field_type.list_size)


def check_comparable(fingerprints: Mapping[str, JobFingerprint]) -> JobFingerprint:
    """The common fingerprint of several files; raises when two disagree in a field that changes the embedding."""
    if not fingerprints:
        raise EmbeddingInputError("no data files to read a fingerprint from")
    items = list(fingerprints.items())
    first_uri, first = items[0]
    for uri, other in items[1:]:
        differences = [
            f"{name}: {getattr(first, name)!r} in {first_uri} vs {getattr(other, name)!r} in {uri}"
            for name in COMPARABLE_FIELDS
            if json.dumps(getattr(first, name), sort_keys=True) != json.dumps(getattr(other, name), sort_keys=True)
        ]
        if differences:
            raise EmbeddingInputError(
                "the input mixes embeddings of different models or settings, which cannot share an index: "
                + "; ".join(differences) + ". Index each job's output separately."
            )
    return first


def vectors_from_column(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 (n_valid, dim) vectors, boolean mask of valid rows)`` from a fixed-size-list column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    present = column.filter(pa.array(valid)) if not valid.all() else column
    values = present.flatten().to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(values.reshape(-1, dim), dtype=np.float32)
    return vectors, valid


def _read_table(file_uri: str, storage_options: StorageOptions | None, required: Sequence[str],
                optional: Sequence[str] = ()) -> pa.Table:
    filesystem, path = filesystem_for(file_uri, storage_options)

    def read() -> pa.Table:
        with filesystem.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            missing = [name for name in required if name not in names]
            if missing:
                raise EmbeddingInputError(
                    f"{file_uri} lacks column(s) {missing} (columns: {', '.join(names)}): "
                    "use the output of a classify or embed job"
                )
            return parquet.read(columns=[*required, *(name for name in optional if name in names)])

    try:
        return with_retries(read, description=f"reading {file_uri}")
    except pa.ArrowInvalid as error:
        raise EmbeddingInputError(f"{file_uri} is not a readable Parquet file: {error}") from error


def read_embeddings(file_uri: str, storage_options: StorageOptions | None = None) -> EmbeddingBatch:
    """Read one data file's ``key``, ``source`` and ``embedding`` columns; rows with a null embedding are skipped."""
    table = _read_table(file_uri, storage_options, [KEY_COLUMN, SOURCE_COLUMN, EMBEDDING_COLUMN])
    dim = embedding_width(table.schema, file_uri)
    vectors, valid = vectors_from_column(table.column(EMBEDDING_COLUMN), dim)
    keys = np.asarray(table.column(KEY_COLUMN).to_pylist(), dtype=object)[valid].tolist()
    sources = np.asarray(table.column(SOURCE_COLUMN).to_pylist(), dtype=object)[valid].tolist()
    return EmbeddingBatch(keys=keys, sources=sources, vectors=vectors, rows_read=table.num_rows)


def read_table_for_queries(file_uri: str, storage_options: StorageOptions | None = None) -> pa.Table:
    """A query file's ``embedding`` column, with ``key`` when it has one (any Parquet of embeddings will do)."""
    return _read_table(file_uri, storage_options, [EMBEDDING_COLUMN], [KEY_COLUMN])


def describe_files(files: Sequence[str]) -> str:
    """``3 files (a.parquet, b.parquet, ...)`` for messages."""
    names = ", ".join(uri.rsplit("/", 1)[-1] for uri in files[:3])
    return f"{len(files)} file(s) ({names}{', ...' if len(files) > 3 else ''})"
