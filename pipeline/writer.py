"""Writes on the cluster: the writer stage after the inference actors, and the finalize task that commits a shard.

Why two steps: rows of one shard reach the writer stage spread over many batches, in any order, possibly twice (a
retried task re-sends rows), and the final files must hold each row once, sorted, at deterministic names. So the
writer stage only writes what it got, grouped by shard, as fragment files under ``OUT.job/fragments/`` and reports
one small row per fragment (:data:`pipeline.shards.FRAGMENT_SCHEMA`); the driver learns from those rows when a
shard is complete and starts :func:`finalize_shard` on a worker, which reads exactly the listed fragments and
commits the shard. Rows never travel to the driver; it sees about 100 bytes per fragment.

Both functions are plain functions of tables and a layout (tested without Ray); :mod:`pipeline.plan` runs the
first as a Ray Data ``map_batches`` stage and the second as a Ray task.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ORDINAL_COLUMN, SHARD_ID_COLUMN, SHARD_ROWS_COLUMN
from pipeline.failpoints import failpoint
from pipeline.layout import CommitRecord, OutputLayout
from pipeline.shards import (
    ERROR_ORDINALS_COLUMN,
    FRAGMENT_COLUMN,
    FRAGMENT_SCHEMA,
    NODE_COLUMN,
    RANGE_ENDS_COLUMN,
    RANGE_STARTS_COLUMN,
    ROWS_COLUMN,
    ShardAssemblyError,
)
from pipeline.sink import ParquetShardWriter
from pipeline.sources import is_whole_shard_failure

logger = logging.getLogger(__name__)

#: The key of ``finalize_shard``'s result for a shard that could not be read at all.
UNREADABLE = "unreadable"

# Fragments live minutes and are read once: lz4 costs little CPU and still halves the string columns.
FRAGMENT_COMPRESSION = "lz4"


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - the node id is a scheduling hint, never worth failing a write for
        return ""


def _ranges(ordinals: np.ndarray) -> tuple[list[int], list[int]]:
    """Sorted unique ordinals -> ``[start, end)`` runs: a batch's rows of one shard are usually one run."""
    breaks = np.flatnonzero(np.diff(ordinals) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(ordinals)]])
    return ordinals[starts].tolist(), (ordinals[ends - 1] + 1).tolist()


def write_fragments(batch: pa.Table, *, layout: OutputLayout) -> pa.Table:
    """Ray Data UDF: write one batch's rows, grouped by shard, as fragment files; return one metadata row each.

    ``batch`` is the inference stage's output (output columns, ``ordinal``, ``shard_id``, ``shard_rows``). Each call
    writes fragments under fresh names, so a retried task never touches a fragment already reported.
    """
    if batch.num_rows == 0:
        return FRAGMENT_SCHEMA.empty_table()
    node = _node_id()
    shard_ids = batch.column(SHARD_ID_COLUMN).combine_chunks()
    if not pa.types.is_dictionary(shard_ids.type):
        shard_ids = shard_ids.dictionary_encode()
    codes = shard_ids.indices.to_numpy(zero_copy_only=False)
    names = shard_ids.dictionary.to_pylist()
    totals = batch.column(SHARD_ROWS_COLUMN).fill_null(-1).to_numpy().astype(np.int64)
    failed = batch.column("error").is_valid().to_numpy(zero_copy_only=False)
    ordinal_values = batch.column(ORDINAL_COLUMN).to_numpy().astype(np.int64)
    rows = []
    for code in np.unique(codes).tolist():
        positions = np.flatnonzero(codes == code)
        shard_id = names[code]
        part = batch.take(pa.array(positions)).drop_columns([SHARD_ID_COLUMN, SHARD_ROWS_COLUMN])
        ordinals = ordinal_values[positions]
        order = np.argsort(ordinals, kind="stable")
        unique = np.unique(ordinals)
        starts, ends = _ranges(unique)
        name = layout.fragment_name(shard_id)
        sink = io.BytesIO()
        pq.write_table(part.take(pa.array(order)), sink, compression=FRAGMENT_COMPRESSION)
        layout.book.write(name, sink.getvalue())
        total = totals[positions]
        rows.append(
            {
                SHARD_ID_COLUMN: shard_id,
                FRAGMENT_COLUMN: name,
                ROWS_COLUMN: len(positions),
                RANGE_STARTS_COLUMN: starts,
                RANGE_ENDS_COLUMN: ends,
                ERROR_ORDINALS_COLUMN: np.unique(ordinals[failed[positions]]).tolist(),
                SHARD_ROWS_COLUMN: int(total.max()),
                NODE_COLUMN: node,
            }
        )
    failpoint("write.fragment")  # fragments written, their metadata not yet passed on
    return pa.Table.from_pylist(rows, schema=FRAGMENT_SCHEMA)


def read_fragments(layout: OutputLayout, shard_id: str, fragments: Sequence[str], rows: int) -> pa.Table:
    """The shard's rows from its fragments, each ordinal once (checked to be the same sample), sorted by ordinal.

    Raises :class:`ShardAssemblyError` unless exactly the ordinals ``0..rows-1`` are present.
    """
    tables = [pq.read_table(io.BytesIO(layout.book.read_bytes(name))) for name in fragments]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    ordinals = table.column(ORDINAL_COLUMN).to_numpy().astype(np.int64)
    order = np.argsort(ordinals, kind="stable")
    sorted_ordinals = ordinals[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_ordinals[1:] != sorted_ordinals[:-1]
    if not first.all():
        keys = table.column("key").take(pa.array(order)).to_pylist()
        sources = table.column("source").take(pa.array(order)).to_pylist()
        for position in np.flatnonzero(~first).tolist():
            if (keys[position], sources[position]) != (keys[position - 1], sources[position - 1]):
                raise ShardAssemblyError(
                    f"shard {shard_id!r}: ordinal {int(sorted_ordinals[position])} arrived twice with different "
                    f"samples ({keys[position - 1]!r} and {keys[position]!r}); rows were produced differently upstream"
                )
        logger.info("shard %s: dropped %d re-sent row(s) while finalizing", shard_id, int((~first).sum()))
    kept = order[first]
    if len(kept) != rows or sorted_ordinals[first][-1] != rows - 1 or sorted_ordinals[0] != 0:
        raise ShardAssemblyError(
            f"shard {shard_id!r}: its fragments hold {len(kept)} distinct ordinals, expected 0..{rows - 1}"
        )
    return table.take(pa.array(kept))


def finalize_shard(
    layout: OutputLayout,
    shard_id: str,
    fragments: Sequence[str],
    rows: int,
    *,
    rows_per_file: int,
    metadata: Mapping[str, str],
    schema: pa.Schema,
) -> dict:
    """Commit one complete shard from its fragments (see :mod:`pipeline.manifest`, step 3); returns its commit record,
    or ``{UNREADABLE: reason}`` for a shard none of whose samples could be read (not committed).

    Safe to run twice (a retried task): it reads the same fragments and writes the same names; an attempt that finds
    the commit record already written only removes the fragments.
    """
    existing = layout.book.read_json(layout.commit_name(shard_id))
    if existing is not None:
        # An earlier attempt of this task got as far as the record: the shard is committed (the record comes last),
        # whatever became of the fragments afterwards.
        layout.delete_fragments(fragments)
        return CommitRecord.from_dict(existing).to_dict()
    table = read_fragments(layout, shard_id, fragments, rows)
    if is_whole_shard_failure(table):
        # Nothing of the shard was read (not a tar, not Parquet, a column the file lacks): committing it would make a
        # rerun skip it after the cause is fixed. Its fragments go; the driver reports it and exits 5.
        layout.delete_fragments(fragments)
        return {UNREADABLE: str(table.column("error")[0].as_py())}
    writer = ParquetShardWriter(
        layout.output_uri,
        rows_per_file=rows_per_file,
        metadata=metadata,
        storage_options=layout.storage_options,
        schema=schema,
    )
    record = writer.commit(shard_id, table)
    failpoint("finalize.after_record")  # committed, fragments not deleted yet
    layout.delete_fragments(fragments)
    return record.to_dict()

