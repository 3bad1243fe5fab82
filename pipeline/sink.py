"""The output side: the Parquet schema of predictions and embeddings, building result tables, committing shards.

A result table is built on the inference workers with :func:`build_output_table` (vectorised: NumPy buffers become
Arrow arrays without a Python loop over rows), written as fragments by the writer stage (:mod:`pipeline.writer`), and
committed by a finalize task with :func:`commit_shard` following the protocol described in :mod:`pipeline.manifest`:
files appear complete at deterministic names, error rows apart from predictions (:mod:`pipeline.layout`), the commit
record comes last.

Example::

    schema = output_schema("classify", hidden_size=768)
    writer = ParquetShardWriter("s3://bucket/out", rows_per_file=50_000, metadata=state.parquet_metadata,
                                schema=schema)
    record = writer.commit("shard-00017", table)   # table: output columns + ``ordinal``
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.storage import StorageOptions
from pipeline.config import EMBEDDING_DTYPES, ORDINAL_COLUMN, TASKS
from pipeline.failpoints import failpoint
from pipeline.layout import CommitRecord, OutputLayout, check_shard_id

__all__ = [
    "CommitRecord",
    "ParquetShardWriter",
    "build_output_table",
    "commit_shard",
    "output_schema",
]

logger = logging.getLogger(__name__)

EMBEDDING_TYPES = {name: pa.from_numpy_dtype(name) for name in EMBEDDING_DTYPES}

# zstd: on the string columns (keys, sources, labels) it compresses clearly better than snappy, decodes about as
# fast, and every current reader (pyarrow, DuckDB, Spark, Polars, BigQuery, Athena) reads it. Embedding floats are
# close to incompressible with either codec, so the choice is decided by the rest.
COMPRESSION = "zstd"
# Row groups of about 64 MiB uncompressed: large enough for efficient scans, small enough that a reader (or DuckDB's
# per-row-group parallelism) never needs a whole file in memory. With 768 float32 dims that is ~21k rows per group.
TARGET_ROW_GROUP_BYTES = 64 * 1024 * 1024
MIN_ROW_GROUP_ROWS = 1024
MAX_ROW_GROUP_ROWS = 128 * 1024


def _embedding_type(embedding_dtype: str) -> pa.DataType:
    try:
        return EMBEDDING_TYPES[embedding_dtype]
    except KeyError:
        raise ValueError(f"embedding_dtype must be one of {sorted(EMBEDDING_TYPES)}, not {embedding_dtype!r}") from None


def output_schema(task: str, hidden_size: int, embedding_dtype: str = "float32") -> pa.Schema:
    """The exact schema of the Parquet files (without the ``ordinal`` column used only for sorting).

    ``embedding`` is a fixed-size list so that readers get the dimension from the type (pyarrow restores it from the
    stored Arrow schema; DuckDB and pandas read it as a list of ``hidden_size`` floats).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be positive, not {hidden_size}")
    embedding = pa.field("embedding", pa.list_(_embedding_type(embedding_dtype), hidden_size))
    head = [pa.field("key", pa.string()), pa.field("source", pa.string())]
    if task == "embed":
        return pa.schema([*head, embedding, pa.field("error", pa.string())])
    return pa.schema(
        [
            *head,
            pa.field("label", pa.string()),
            pa.field("label_id", pa.int32()),
            pa.field("score", pa.float32()),
            pa.field("topk_ids", pa.list_(pa.int32())),
            pa.field("topk_labels", pa.list_(pa.string())),
            pa.field("topk_scores", pa.list_(pa.float32())),
            embedding,
            pa.field("error", pa.string()),
        ]
    )


def _validity(valid: np.ndarray) -> tuple[pa.Buffer | None, int]:
    """An Arrow validity bitmap (LSB first) and the null count; no bitmap when nothing is null."""
    null_count = int(valid.size - np.count_nonzero(valid))
    if null_count == 0:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), null_count


def _fixed_size_lists(values: np.ndarray, value_type: pa.DataType, valid: np.ndarray) -> pa.Array:
    """(N, D) array -> fixed_size_list<value_type>[D] over the same flat buffer, null where ``valid`` is False."""
    rows, width = values.shape
    bitmap, null_count = _validity(valid)
    child = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.Array.from_buffers(pa.list_(value_type, width), rows, [bitmap], null_count=null_count, children=[child])


def _lists(child: pa.Array, width: int, valid: np.ndarray) -> pa.Array:
    """A flat child of N*width values -> list<...> of ``width`` values per row, null where ``valid`` is False."""
    rows = valid.size
    bitmap, null_count = _validity(valid)
    offsets = pa.py_buffer(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.Array.from_buffers(pa.list_(child.type), rows, [bitmap, offsets], null_count=null_count, children=[child])


def _label_lookup(id2label: Mapping[int | str, str]) -> pa.Array:
    """Dense ``label_id -> label`` array (``config.json`` stores ids as strings, so both key kinds are accepted)."""
    labels = {int(label_id): str(label) for label_id, label in id2label.items()}
    if not labels:
        raise ValueError("id2label is empty: a classifier needs its label names")
    if min(labels) < 0:
        raise ValueError(f"id2label has a negative id {min(labels)}")
    return pa.array([labels.get(index) for index in range(max(labels) + 1)], pa.string())


def _check_label_ids(used_ids: np.ndarray, lookup: pa.Array) -> None:
    """Raise if a predicted id has no label: a checkpoint and config.json with different class counts."""
    known = lookup.is_valid().to_numpy(zero_copy_only=False)
    in_range = (used_ids >= 0) & (used_ids < known.size)
    has_label = np.zeros(used_ids.shape, dtype=bool)
    has_label[in_range] = known[used_ids[in_range]]
    if not has_label.all():
        raise ValueError(
            f"predicted class id(s) {used_ids[~has_label][:5].tolist()} have no name in id2label "
            f"({known.size} ids); the checkpoint and its config.json disagree"
        )


def _normalized(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float32; all-zero rows stay zero instead of becoming NaN."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.divide(embeddings, norms, out=np.zeros_like(embeddings), where=norms > 0)


def _string_array(values: Sequence[str | None] | np.ndarray | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(values if isinstance(values, np.ndarray) else list(values), type=pa.string())


def _embedding_column(
    embeddings: np.ndarray, valid: np.ndarray, value_type: pa.DataType, *, normalize: bool
) -> pa.Array:
    # Error rows hold placeholders (zeros, NaN): zero them so they cannot disturb normalisation or leak out.
    values = np.where(valid[:, None], embeddings.astype(np.float32, copy=False), np.float32(0))
    if normalize:
        values = _normalized(values)
    return _fixed_size_lists(values.astype(value_type.to_pandas_dtype(), copy=False), value_type, valid)


def _prediction_columns(
    topk_ids: np.ndarray, topk_scores: np.ndarray, id2label: Mapping[int | str, str], valid: np.ndarray
) -> dict[str, pa.Array]:
    rows = valid.size
    if topk_ids.ndim != 2 or topk_ids.shape[0] != rows or topk_ids.shape[1] < 1 or topk_scores.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids {topk_ids.shape} and topk_scores {topk_scores.shape} must both be ({rows}, k) with k >= 1"
        )
    k = topk_ids.shape[1]
    # As for embeddings: zero the placeholders of error rows so that they cannot fail the label lookup.
    ids = np.where(valid[:, None], topk_ids, 0).astype(np.int32)
    scores = np.where(valid[:, None], topk_scores, 0).astype(np.float32)
    lookup = _label_lookup(id2label)
    _check_label_ids(np.unique(ids[valid]), lookup)
    flat_ids = pa.array(ids.reshape(-1), pa.int32())
    label_ids = pa.array(ids[:, 0], pa.int32(), mask=~valid)
    return {
        "label": pc.take(lookup, label_ids),  # a null index gives a null label
        "label_id": label_ids,
        "score": pa.array(scores[:, 0], pa.float32(), mask=~valid),
        "topk_ids": _lists(flat_ids, k, valid),
        "topk_labels": _lists(pc.take(lookup, flat_ids), k, valid),
        "topk_scores": _lists(pa.array(scores.reshape(-1), pa.float32()), k, valid),
    }


def build_output_table(
    task: str,
    *,
    keys: Sequence[str] | np.ndarray | pa.Array,
    sources: Sequence[str] | np.ndarray | pa.Array,
    ordinals: Sequence[int] | np.ndarray,
    errors: Sequence[str | None] | np.ndarray | pa.Array,
    embeddings: np.ndarray | None,
    topk_ids: np.ndarray | None = None,
    topk_scores: np.ndarray | None = None,
    id2label: Mapping[int | str, str] | None = None,
    hidden_size: int,
    embedding_dtype: str = "float32",
    normalize_embeddings: bool = False,
) -> pa.Table:
    """Assemble one batch of results into a table of :func:`output_schema` plus an ``ordinal`` int64 column.

    Rows whose ``errors[i]`` is not None get nulls in every prediction and embedding column, whatever the arrays
    hold at that row (decode failures reach the model as placeholder images). Normalisation happens in float32
    before any cast to float16, so half-precision outputs are the rounded unit vectors. ``embeddings`` may be None
    for ``classify`` (the column is then all null); ``topk_*`` and ``id2label`` are required for it and ignored for
    ``embed``. Label names come from ``id2label`` (int or str keys, as ``config.json`` stores them).

    Example::

        table = build_output_table("embed", keys=["a"], sources=["s3://b/x.tar"], ordinals=[0], errors=[None],
                                   embeddings=np.ones((1, 768), np.float32), hidden_size=768)
    """
    schema = output_schema(task, hidden_size, embedding_dtype)
    error_array = _string_array(errors)
    rows = len(error_array)
    valid = error_array.is_null().to_numpy(zero_copy_only=False)
    columns: dict[str, pa.Array] = {"key": _string_array(keys), "source": _string_array(sources)}
    ordinal_array = pa.array(np.asarray(ordinals, dtype=np.int64), pa.int64())
    for name, values in (("keys", columns["key"]), ("sources", columns["source"]), ("ordinals", ordinal_array)):
        if len(values) != rows:
            raise ValueError(f"{name} has {len(values)} entries but errors has {rows}; every column needs one per row")

    if embeddings is None:
        if task == "embed":
            raise ValueError("task 'embed' needs embeddings")
        columns["embedding"] = pa.nulls(rows, schema.field("embedding").type)
    elif embeddings.shape != (rows, hidden_size):
        raise ValueError(f"embeddings have shape {embeddings.shape}, expected ({rows}, {hidden_size})")
    else:
        value_type = _embedding_type(embedding_dtype)
        columns["embedding"] = _embedding_column(embeddings, valid, value_type, normalize=normalize_embeddings)

    if task == "classify":
        if topk_ids is None or topk_scores is None or id2label is None:
            raise ValueError("task 'classify' needs topk_ids, topk_scores and id2label")
        columns.update(_prediction_columns(topk_ids, topk_scores, id2label, valid))
    columns["error"] = error_array
    arrays = [columns[name] for name in schema.names] + [ordinal_array]
    return pa.Table.from_arrays(arrays, schema=schema.append(pa.field(ORDINAL_COLUMN, pa.int64())))


def _row_group_rows(table: pa.Table) -> int:
    bytes_per_row = max(1.0, table.nbytes / max(1, table.num_rows))
    return int(np.clip(TARGET_ROW_GROUP_BYTES / bytes_per_row, MIN_ROW_GROUP_ROWS, MAX_ROW_GROUP_ROWS))


def _sorted_without_ordinal(table: pa.Table) -> pa.Table:
    if ORDINAL_COLUMN not in table.column_names:
        raise ValueError(f"a shard table needs the {ORDINAL_COLUMN!r} column to order its rows: {table.column_names}")
    ordinals = table.column(ORDINAL_COLUMN).to_numpy()
    if ordinals.size > 1 and not (np.diff(ordinals) > 0).all():
        table = table.take(pa.array(np.argsort(ordinals, kind="stable")))
    return table.drop_columns([ORDINAL_COLUMN])


@dataclass(frozen=True)
class ParquetShardWriter:
    """Writes whole shards to ``output_uri`` under the commit protocol of :mod:`pipeline.manifest`.

    ``metadata`` goes into every file's Parquet key-value metadata (use
    :meth:`pipeline.manifest.JobFingerprint.parquet_metadata`, which removes credentials: this writer cannot tell a
    secret inside an opaque string). With ``schema`` set, each table is cast to it, so every file has exactly the
    documented column order and types whatever route the rows took through Ray.
    """

    output_uri: str
    rows_per_file: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    storage_options: StorageOptions | None = field(default=None, repr=False)  # may hold credentials
    schema: pa.Schema | None = None
    compression: str = COMPRESSION

    def __post_init__(self) -> None:
        if self.rows_per_file < 1:
            raise ValueError(f"rows_per_file must be at least 1, not {self.rows_per_file}")

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.output_uri, self.storage_options)

    def _serialize(self, table: pa.Table) -> pa.Buffer:
        # Dictionary encoding pays off for repeated strings (sources, labels); on embedding floats it is pure cost.
        dictionary_columns = [name for name in table.column_names if name != "embedding"]
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            compression=self.compression,
            row_group_size=_row_group_rows(table),
            use_dictionary=dictionary_columns,
        )
        return sink.getvalue()

    def commit(self, shard_id: str, table: pa.Table) -> CommitRecord:
        """Write all of one shard's rows, remove what a crashed attempt left beyond them, then the commit record.

        Re-committing a shard (a resume after a crash) writes the same names and leaves exactly one copy of each row.
        """
        check_shard_id(shard_id)
        layout = self.layout
        table = _sorted_without_ordinal(table)
        if self.schema is not None:
            table = table.select(self.schema.names).cast(self.schema)
        stored_metadata = dict(table.schema.metadata or {})
        stored_metadata.update({name.encode(): value.encode() for name, value in self.metadata.items()})
        table = table.replace_schema_metadata(stored_metadata)

        # Rows with an embedding and error rows go to different files: embedding readers (embedding-reader, FAISS
        # pipelines) cannot stack a null embedding, and every reader of the whole folder still sees both.
        failed = table.column("error").is_valid()
        good, bad = table.filter(pc.invert(failed)), table.filter(failed)
        files = []
        for index, start in enumerate(range(0, good.num_rows, self.rows_per_file)):
            name = layout.part_name(shard_id, index)
            layout.data.publish(name, self._serialize(good.slice(start, self.rows_per_file)))
            files.append(name)
        if bad.num_rows:
            name = layout.errors_name(shard_id)
            layout.data.publish(name, self._serialize(bad))
            files.append(name)
        layout.remove_stale_parts(shard_id, keep=files)
        failpoint("commit.before_record")  # data files published, shard not committed yet
        record = CommitRecord(shard_id=shard_id, files=files, rows=table.num_rows, error_rows=bad.num_rows)
        layout.write_commit(record)
        logger.debug("committed shard %s: %d rows in %d file(s)", shard_id, record.rows, len(files))
        return record


def commit_shard(
    output_uri: str,
    shard_id: str,
    table: pa.Table,
    *,
    rows_per_file: int,
    metadata: Mapping[str, str],
    storage_options: StorageOptions | None = None,
    schema: pa.Schema | None = None,
) -> CommitRecord:
    """Commit one complete shard (see :class:`ParquetShardWriter`); returns its commit record."""
    writer = ParquetShardWriter(
        output_uri, rows_per_file=rows_per_file, metadata=metadata, storage_options=storage_options, schema=schema
    )
    return writer.commit(shard_id, table)
