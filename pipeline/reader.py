"""The read stage of the plan: one input row names one shard; its samples come out decoded, a few rows at a time.

Why a module of its own, apart from :mod:`pipeline.plan`: this is the function Ray runs in every decode worker, and
a worker imports the module that defines it. Kept to the light modules it needs (sources, decode, the processor's
CPU half), a fresh decode worker starts without importing torch or Ray Data's planning code, which on a 2-core node
took a second of CPU away from the inference actor every time Ray started a worker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from model.processing import ViTHybridImageProcessor
from pipeline import decode, sources
from pipeline.config import NO_ERROR, NOT_LAST_ROW, JobConfig
from pipeline.failpoints import failpoint, record_placement


def read_and_decode_shards(
    batch: dict[str, np.ndarray],
    *,
    config: JobConfig,
    processor: ViTHybridImageProcessor | None,
    rows_per_batch: int,
) -> Iterator[dict[str, Any]]:
    """Ray Data generator UDF: one input row names one shard; yield its samples decoded, a few rows at a time.

    Each yielded batch carries ``shard_id`` and ``shard_rows``: ``shard_rows`` is set on the shard's last row only
    (the total only becomes known at the end of a streamed tar), which is how the driver learns that a shard is
    complete. Holding back one batch is what lets us mark the last row without reading the shard twice.
    """
    record_placement("decode")
    for shard_json in batch["shard"]:
        shard = sources.Shard.from_dict(json.loads(shard_json))
        held: dict[str, Any] | None = None
        rows_seen = 0
        for table in sources.read_shard(
            shard,
            storage_options=config.storage_options,
            batch_rows=rows_per_batch,  # the columns frozen in the shard at planning are what it reads
        ):
            decoded = (
                _undecoded(table) if processor is None  # decode_location "actor": the actors decode
                else decode.decode_batch(
                    table,
                    processor=processor,
                    fast=config.fast_decode,
                    max_image_pixels=config.max_image_pixels,
                    exif_orientation=config.exif_orientation,
                )
            )
            rows_seen += len(decoded["key"])
            if held is not None:
                yield held
                failpoint("read.batch")  # mid-shard: a batch is out, the shard's last row is not
            held = _with_shard_columns(decoded, shard.shard_id, last_row_total=None)
        if held is None:
            raise RuntimeError(f"shard {shard.shard_id} produced no rows; sources must yield at least one row")
        yield _with_shard_columns(held, shard.shard_id, last_row_total=rows_seen)


def _undecoded(table: pa.Table) -> dict[str, Any]:
    """A read batch as it is (file bytes in ``data``), for ``--decode-location actor``: numpy columns as
    :func:`pipeline.decode.decode_batch` takes them, with an ``error`` column."""
    columns = {name: decode._arrow_to_numpy(table.column(name)) for name in table.column_names}
    if "error" not in columns:
        columns["error"] = np.full(table.num_rows, None, dtype=object)
    return columns


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
