"""The frozen shard plan as data: one Parquet file beside the output, one row per shard.

Why not JSON inside ``job.json`` (as before): a plan of a billion loose images listed every path in one JSON
document, tens of GB built in driver memory and parsed again on every resume. As Parquet the member lists are a
``list<string>`` column (dictionary/zstd-compressed, about 10 bytes per URI of a typical list file), written and read
column-wise by Arrow without a Python object per image until a shard is actually read.

A resume reads this file and the names of the commit records; it never lists the input again, so inputs added or
removed since the first start change nothing (the first start's plan is the job).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import sources
from pipeline.layout import PLAN_FILE, StorageFolder, check_shard_id

PLAN_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("members", pa.list_(pa.string())),
        pa.field("id_column", pa.string()),
        pa.field("image_column", pa.string()),
    ]
)


def _strip_credentials(column: pa.Array) -> pa.Array:
    """Apply :func:`pipeline.redaction.sanitize_uri` to the values that can hold a credential (``user@`` or a query).

    Vectorised pre-filter: of ten million plain URIs none holds ``@`` or ``?``, and none is touched by Python.
    """
    from pipeline.redaction import sanitize_uri

    suspicious = pc.fill_null(pc.match_substring_regex(column, r"://[^/]*@|\?"), False)
    if not pc.any(suspicious).as_py():
        return column
    values = column.to_pylist()
    for index in np.flatnonzero(suspicious.to_numpy(zero_copy_only=False)).tolist():
        values[index] = sanitize_uri(values[index])
    return pa.array(values, pa.string())


def plan_table(shards: Sequence[sources.Shard | Mapping[str, Any]]) -> pa.Table:
    """Shards (objects or their dicts) -> the plan table; shard ids checked and unique, URI credentials removed."""
    # Read attributes directly: ``Shard.to_dict`` (dataclasses.asdict) copies every member string one by one, which
    # at ten million images costs more than the rest of the freezing together.
    records = [
        shard
        if isinstance(shard, Mapping)
        else {"shard_id": shard.shard_id, "format": shard.format, "uri": shard.uri, "name": shard.name,
              "members": shard.members, "id_column": shard.id_column, "image_column": shard.image_column}
        for shard in shards
    ]  # fmt: skip
    ids = [check_shard_id(str(record.get("shard_id"))) for record in records]
    if len(set(ids)) != len(ids):
        raise ValueError("the shard plan repeats shard ids; every shard needs its own id")
    lengths = np.fromiter((len(record.get("members") or ()) for record in records), dtype=np.int32, count=len(records))
    offsets = np.zeros(len(records) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    members = pa.ListArray.from_arrays(pa.array(offsets), _strip_credentials(_flat_members(records)))
    return pa.table(
        {
            "shard_id": pa.array(ids, pa.string()),
            "format": pa.array([record["format"] for record in records], pa.string()),
            "uri": _strip_credentials(pa.array([record["uri"] for record in records], pa.string())),
            "name": pa.array([record.get("name", "") for record in records], pa.string()),
            "members": members,
            "id_column": pa.array([record.get("id_column") for record in records], pa.string()),
            "image_column": pa.array([record.get("image_column") for record in records], pa.string()),
        },
        schema=PLAN_SCHEMA,
    )


def _flat_members(records: Sequence[Mapping[str, Any]]) -> pa.Array:
    """Every record's members, in order, as one Arrow string array, without a Python string per member.

    Loose-image shards hold :class:`pipeline.sources.Members`, consecutive slices of the one sorted listing array:
    then the result is that array's span, zero-copy (ten million URIs would otherwise be copied once more, or
    turned into ten million Python strings). Other members (tuples, lists, slices of different arrays) are
    concatenated.
    """
    parts = [
        members.arrow if isinstance(members, sources.Members) else pa.array(list(members), pa.string())
        for members in (record.get("members") or () for record in records)
        if len(members)
    ]
    if not parts:
        return pa.array([], pa.string())
    first = parts[0]
    buffers = [buffer.address if buffer is not None else None for buffer in first.buffers()]
    expected_offset = first.offset
    contiguous = True
    for part in parts:
        same_buffers = [buffer.address if buffer is not None else None for buffer in part.buffers()] == buffers
        if part.type != pa.string() or not same_buffers or part.offset != expected_offset:
            contiguous = False
            break
        expected_offset += len(part)
    if contiguous:
        return pa.Array.from_buffers(pa.string(), expected_offset - first.offset, first.buffers(), offset=first.offset)
    return pa.concat_arrays([part.cast(pa.string()) for part in parts])


def write_plan(book: StorageFolder, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    book.publish(PLAN_FILE, sink.getvalue())


def read_plan(book: StorageFolder) -> pa.Table:
    """The stored plan; ``FileNotFoundError`` when there is none."""
    return pq.read_table(io.BytesIO(book.read_bytes(PLAN_FILE))).cast(PLAN_SCHEMA)


def shards_of(table: pa.Table) -> list[sources.Shard]:
    return [sources.Shard.from_dict({**row, "members": tuple(row["members"] or ())}) for row in table.to_pylist()]
