"""The driver's shard bookkeeping (:class:`pipeline.shards.ShardTracker`) on fragment metadata alone: no I/O, no Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.shards import FRAGMENT_SCHEMA, ShardAssemblyError, ShardTracker


def fragment(shard_id: str, ordinals: list[int], total: int, *, errors: tuple[int, ...] = (), name: str = "") -> dict:
    """One writer-stage metadata row, as :func:`pipeline.writer.write_fragments` builds it."""
    unique = np.unique(ordinals)
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    runs = np.split(unique, breaks)
    return {
        "shard_id": shard_id,
        "fragment": name or f"fragments/{shard_id}/{min(ordinals)}-{len(ordinals)}.parquet",
        "rows": len(ordinals),
        "ordinal_starts": [int(run[0]) for run in runs],
        "ordinal_ends": [int(run[-1]) + 1 for run in runs],
        "error_ordinals": [o for o in unique.tolist() if o in errors],
        "shard_rows": total if total - 1 in ordinals else -1,
        "node_id": "node-a",
    }


def table(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=FRAGMENT_SCHEMA)


@pytest.mark.parametrize("seed", range(4))
def test_each_shard_completes_once_with_the_fragments_that_brought_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = {"a": 1, "b": 9, "c": 20}
    rows = []
    for shard_id, size in sizes.items():
        cuts = sorted(rng.choice(np.arange(1, size), size=min(3, size - 1), replace=False).tolist()) if size > 1 else []
        for start, stop in zip([0, *cuts], [*cuts, size]):
            rows.append(fragment(shard_id, list(range(start, stop)), size, errors=(0,)))
    order = rng.permutation(len(rows))
    tracker = ShardTracker()
    completed = {}
    for index in order:
        for shard in tracker.add(table(rows[index])):
            assert shard.shard_id not in completed
            completed[shard.shard_id] = shard
    assert {shard_id: shard.rows for shard_id, shard in completed.items()} == sizes
    assert sum(len(shard.fragments) for shard in completed.values()) == len(rows)
    assert tracker.rows_accepted == sum(sizes.values()) and tracker.error_rows_accepted == 3
    assert tracker.pending_shards() == {}


def test_fragments_of_re_sent_rows_are_not_used_and_counted() -> None:
    tracker = ShardTracker()
    assert tracker.add(table(fragment("a", [0, 1, 2], 5, errors=(1,), name="first"))) == []
    assert tracker.add(table(fragment("a", [1, 2], 5, errors=(1,), name="again"))) == []  # nothing new: unused
    (shard,) = tracker.add(table(fragment("a", [2, 3, 4], 5, name="last")))  # one old, two new: used
    assert shard.fragments == ("first", "last") and shard.node_id == "node-a"
    assert tracker.add(table(fragment("a", [4], 5, name="late"))) == []  # after completion
    assert (tracker.rows_accepted, tracker.rows_resent, tracker.fragments_unused) == (5, 4, 2)
    assert tracker.error_rows_accepted == 1


def test_a_shard_missing_rows_stays_pending() -> None:
    tracker = ShardTracker()
    tracker.add(table(fragment("a", [0, 1], 6), fragment("a", [4, 5], 6), fragment("b", [0], 3)))
    assert tracker.pending_shards() == {"a": (4, 6), "b": (1, None)}


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([fragment("a", [0, 1], 2), {**fragment("a", [3], 4), "ordinal_starts": [3], "ordinal_ends": [4]}],
         "do not fit"),
        ([{**fragment("a", [0, 1], 2), "shard_rows": 3}], "shard_rows=3"),
        ([fragment("a", [5], -1), fragment("a", [0, 1], 2)], "beyond the shard's 2 rows"),
        ([{**fragment("a", [0], 1), "ordinal_starts": [1], "ordinal_ends": [1]}], "bad ranges"),
    ],
)
def test_inconsistent_fragments_are_refused(rows: list[dict], match: str) -> None:
    tracker = ShardTracker()
    with pytest.raises(ShardAssemblyError, match=match):
        for row in rows:
            tracker.add(table(row))


def test_metadata_without_its_columns_is_refused() -> None:
    with pytest.raises(ValueError, match="lacks column"):
        ShardTracker().add(pa.table({"shard_id": ["a"]}))
