"""The driver's shard bookkeeping: which ordinals of each open shard arrived, in which fragments. Pure: no I/O, no Ray.

The writer stage (:mod:`pipeline.writer`) reports one small row per fragment it wrote; :class:`ShardTracker` turns
those rows into "shard X is complete: finalize it from these fragments". It holds, per open shard, a bit per row
and the fragment names, never the rows themselves, so the driver's memory depends on how many shards are open,
not on how many rows pass.

Re-sent rows: when a Ray task or actor dies after some of its output went downstream, Ray re-executes it from the
start, and rows may arrive twice (block cuts of the retry need not match the dead attempt's). A fragment whose
ordinals all arrived before is not used (its file stays an orphan, swept at the end); a fragment that brings at least
one new ordinal is used, and the finalize task drops the repeated ordinals, checking they hold the same sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.config import SHARD_ID_COLUMN, SHARD_ROWS_COLUMN

logger = logging.getLogger(__name__)

#: Columns of the writer stage's metadata rows (one per fragment).
FRAGMENT_COLUMN = "fragment"
ROWS_COLUMN = "rows"
RANGE_STARTS_COLUMN = "ordinal_starts"
RANGE_ENDS_COLUMN = "ordinal_ends"
ERROR_ORDINALS_COLUMN = "error_ordinals"
NODE_COLUMN = "node_id"
FRAGMENT_SCHEMA = pa.schema(
    [
        pa.field(SHARD_ID_COLUMN, pa.string()),
        pa.field(FRAGMENT_COLUMN, pa.string()),
        pa.field(ROWS_COLUMN, pa.int64()),
        pa.field(RANGE_STARTS_COLUMN, pa.list_(pa.int64())),
        pa.field(RANGE_ENDS_COLUMN, pa.list_(pa.int64())),
        pa.field(ERROR_ORDINALS_COLUMN, pa.list_(pa.int64())),
        pa.field(SHARD_ROWS_COLUMN, pa.int64()),  # -1 unless the shard's last row is in this fragment
        pa.field(NODE_COLUMN, pa.string()),
    ]
)


class ShardAssemblyError(ValueError):
    """Rows of a shard arrived out of range, with inconsistent totals, or as different samples under one ordinal:
    a bug upstream of the writer."""


@dataclass(frozen=True)
class CompleteShard:
    """A shard whose ordinals ``0..rows-1`` all arrived, and the fragments that hold them (with repeats)."""

    shard_id: str
    rows: int
    fragments: tuple[str, ...]
    node_id: str  # where the last fragment was written: the finalize task prefers that node


@dataclass
class _OpenShard:
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    fragments: list[str] = field(default_factory=list)
    received: int = 0
    expected: int | None = None


class ShardTracker:
    """Track fragments per shard; hand out each shard once when all its ordinals arrived.

    Example::

        tracker = ShardTracker()
        for metadata in fragment_batches:            # pyarrow tables of FRAGMENT_SCHEMA
            for shard in tracker.add(metadata):
                finalize(shard.shard_id, shard.fragments, shard.rows)
    """

    def __init__(self) -> None:
        self._open: dict[str, _OpenShard] = {}
        self._done: dict[str, int] = {}  # shard_id -> rows: only ids, for rows re-sent after completion
        #: Rows accepted (each input sample once), error rows among them, rows that arrived again and were dropped.
        self.rows_accepted = 0
        self.error_rows_accepted = 0
        self.rows_resent = 0
        self.fragments_unused = 0

    def pending_shards(self) -> dict[str, tuple[int, int | None]]:
        """``{shard_id: (rows received, rows expected or None)}`` for shards still incomplete."""
        return {shard_id: (shard.received, shard.expected) for shard_id, shard in self._open.items()}

    def add(self, metadata: pa.Table) -> list[CompleteShard]:
        """Take one batch of fragment rows; return the shards it completed."""
        missing = set(FRAGMENT_SCHEMA.names) - set(metadata.column_names)
        if missing:
            raise ValueError(f"fragment metadata lacks column(s) {sorted(missing)}; has {metadata.column_names}")
        completed = []
        for row in metadata.to_pylist():
            shard = self._add_fragment(row)
            if shard is not None:
                completed.append(shard)
        return completed

    def _add_fragment(self, row: dict) -> CompleteShard | None:
        shard_id = row[SHARD_ID_COLUMN]
        starts = np.asarray(row[RANGE_STARTS_COLUMN], dtype=np.int64)
        ends = np.asarray(row[RANGE_ENDS_COLUMN], dtype=np.int64)
        if starts.size == 0 or starts.shape != ends.shape or (ends <= starts).any() or starts.min() < 0:
            raise ShardAssemblyError(f"shard {shard_id!r}: fragment {row[FRAGMENT_COLUMN]} has bad ranges {starts}-{ends}")
        total = int(row[SHARD_ROWS_COLUMN])
        if shard_id in self._done:
            size = self._done[shard_id]
            if ends.max() > size or (total >= 0 and total != size):
                raise ShardAssemblyError(
                    f"shard {shard_id!r}: row(s) {starts[0]}..{ends[-1] - 1} arrived after the shard was complete with "
                    f"{size} rows and do not fit it; rows were produced differently upstream"
                )
            self.rows_resent += int(row[ROWS_COLUMN])
            self.fragments_unused += 1
            return None
        shard = self._open.setdefault(shard_id, _OpenShard())
        if total >= 0:
            if total < 1 or ends.max() != total or (shard.expected is not None and shard.expected != total):
                raise ShardAssemblyError(
                    f"shard {shard_id!r}: shard_rows={total} in a fragment ending at ordinal {ends.max() - 1} "
                    f"(recorded: {shard.expected}); it must come with the last row (ordinal n-1), n >= 1"
                )
            shard.expected = total
        needed = int(ends.max())
        if needed > shard.seen.size:
            grown = np.zeros(max(needed, 2 * shard.seen.size, shard.expected or 0), dtype=bool)
            grown[: shard.seen.size] = shard.seen
            shard.seen = grown
        ordinals = np.concatenate([np.arange(start, end) for start, end in zip(starts.tolist(), ends.tolist())])
        fresh = ordinals[~shard.seen[ordinals]]
        self.rows_resent += int(row[ROWS_COLUMN]) - len(fresh)  # repeats within the fragment count too
        if len(fresh) == 0:
            self.fragments_unused += 1
            logger.info("shard %s: fragment of %d re-sent row(s) not used", shard_id, len(ordinals))
            return None
        shard.seen[fresh] = True
        shard.received += len(fresh)
        shard.fragments.append(row[FRAGMENT_COLUMN])
        self.rows_accepted += len(fresh)
        errors = np.asarray(row[ERROR_ORDINALS_COLUMN] or [], dtype=np.int64)
        # An error ordinal counts if this fragment is the one that brought it.
        self.error_rows_accepted += int(np.isin(errors, fresh).sum())
        if shard.expected is None:
            return None
        if shard.seen.size > shard.expected and shard.seen[shard.expected :].any():
            raise ShardAssemblyError(
                f"shard {shard_id!r}: ordinal {int(np.flatnonzero(shard.seen)[-1])} is beyond the shard's "
                f"{shard.expected} rows"
            )
        if shard.received != shard.expected:
            return None
        del self._open[shard_id]
        self._done[shard_id] = shard.expected
        return CompleteShard(shard_id, shard.expected, tuple(shard.fragments), str(row[NODE_COLUMN] or ""))
