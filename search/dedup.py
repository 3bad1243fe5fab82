"""Near-duplicate groups by range search: every indexed vector against the index, then exact verification.

1. Candidates: each file's vectors are range-searched against the index with a slightly relaxed threshold
   (compressed codes shift scores a little; the refined index's coarse stage more), so that no true pair is missed.
2. Verification: each candidate pair's score is recomputed exactly from the embeddings, and kept iff it passes the
   threshold (similarity >= T for cosine/ip, squared distance <= T for l2).
3. Groups, greedily in id order: the first vector not yet in a group becomes a representative, and its verified
   neighbours not yet in a group join it. Every member's score is its exact score against the representative, so a
   group never chains through intermediate images to something unlike its representative.

The result lists the members of groups of two or more (the representative first, with its score against itself):
``key, source, group, score``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from model.storage import StorageOptions
from search import build, embeddings
from search.query import vectors_for_ids
from search.store import StoredIndex

logger = logging.getLogger(__name__)

DUPLICATES_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("group", pa.int64()),
                               ("score", pa.float32())])
# Relaxation of the candidate threshold: cosine/ip similarities from compressed codes, and L2 factor.
SLACK_COMPRESSED = 0.05
SLACK_COARSE = 0.15
L2_FACTOR = 1.25


def passes(score: np.ndarray, threshold: float, metric: str) -> np.ndarray:
    return score >= threshold if build.higher_is_closer(metric) else score <= threshold


def exact_scores(left: np.ndarray, right: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise scores of prepared vectors, as the index defines them (inner product or squared L2)."""
    if metric == "l2":
        return np.sum((left - right) ** 2, axis=1)
    return np.sum(left * right, axis=1)


def _range_index(stored: StoredIndex) -> tuple[faiss.Index, float]:
    """The index to range-search and the slack for its scores (refined indexes: their coarse stage)."""
    index = faiss.downcast_index(stored.index)
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        return base, SLACK_COARSE
    exact = isinstance(index, faiss.IndexFlat) or "Flat" == stored.metadata["index"]["factory"].split(",")[-1]
    return index, 0.0 if exact else SLACK_COMPRESSED


def _file_vectors(stored: StoredIndex, storage_options: StorageOptions | None) -> Iterator[tuple[int, np.ndarray]]:
    """``(first id, prepared vectors)`` of each input file, in id order."""
    first_id = 0
    for uri in stored.metadata["input"]["files"]:
        batch = embeddings.read_embeddings(uri, storage_options)
        yield first_id, build.prepare(batch.vectors, stored.metric)
        first_id += len(batch)


def candidate_pairs(
    stored: StoredIndex, threshold: float, storage_options: StorageOptions | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """``(left ids, right ids, vectors by id)`` of pairs the range search proposes (left < right, no self pairs)."""
    index, slack = _range_index(stored)
    metric = stored.metric
    radius = threshold - slack if build.higher_is_closer(metric) else threshold * (L2_FACTOR if slack else 1.0)
    lefts, rights = [], []
    kept: dict[int, np.ndarray] = {}
    for first_id, vectors in _file_vectors(stored, storage_options):
        for start in range(0, len(vectors), 8192):
            chunk = vectors[start:start + 8192]
            limits, _, ids = index.range_search(chunk, float(radius))
            counts = np.diff(limits).astype(np.int64)
            query_ids = np.repeat(np.arange(len(chunk)) + first_id + start, counts)
            mask = ids != query_ids
            lefts.append(np.minimum(query_ids[mask], ids[mask]))
            rights.append(np.maximum(query_ids[mask], ids[mask]))
            for row in np.nonzero(counts > 1)[0]:
                kept[int(first_id + start + row)] = chunk[row]
    left = np.concatenate(lefts) if lefts else np.empty(0, np.int64)
    right = np.concatenate(rights) if rights else np.empty(0, np.int64)
    pairs = np.unique(np.stack([left, right], axis=1), axis=0) if len(left) else np.empty((0, 2), np.int64)
    return pairs[:, 0], pairs[:, 1], kept


def near_duplicate_groups(
    stored: StoredIndex, threshold: float, storage_options: StorageOptions | None = None
) -> pa.Table:
    """The near-duplicate groups of the indexed collection at ``threshold`` (see the module docstring)."""
    metric = stored.metric
    left, right, vectors = candidate_pairs(stored, threshold, storage_options)
    needed = sorted({int(i) for i in np.concatenate([left, right])} - set(vectors))
    if needed:  # the far end of a pair that the approximate search found from one side only
        for index_id, vector in zip(needed, build.prepare(vectors_for_ids(stored, needed, storage_options), metric)):
            vectors[index_id] = vector
    if len(left):
        scores = exact_scores(np.stack([vectors[int(i)] for i in left]), np.stack([vectors[int(i)] for i in right]), metric)
        keep = passes(scores, threshold, metric)
        left, right = left[keep], right[keep]
    logger.info("%d verified near-duplicate pairs at threshold %s", len(left), threshold)
    neighbours: dict[int, set[int]] = {}
    for a, b in zip(left.tolist(), right.tolist()):
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    assigned: set[int] = set()
    rows: dict[str, list[Any]] = {"id": [], "group": [], "score": []}
    group = 0
    for representative in sorted(neighbours):
        if representative in assigned:
            continue
        members = sorted(neighbours[representative] - assigned)
        if not members:
            continue
        own = float(exact_scores(vectors[representative][None], vectors[representative][None], metric)[0])
        member_scores = exact_scores(np.stack([vectors[m] for m in members]),
                                     np.repeat(vectors[representative][None], len(members), axis=0), metric)
        order = np.argsort(-member_scores if build.higher_is_closer(metric) else member_scores, kind="stable")
        rows["id"].append(representative)
        rows["group"].append(group)
        rows["score"].append(own)
        for position in order:
            rows["id"].append(members[position])
            rows["group"].append(group)
            rows["score"].append(float(member_scores[position]))
        assigned.update([representative, *members])
        group += 1
    ids = pa.array(rows["id"], pa.int64())
    return pa.Table.from_arrays(
        [stored.ids.column("key").take(ids), stored.ids.column("source").take(ids),
         pa.array(rows["group"], pa.int64()), pa.array(rows["score"], pa.float32())],
        schema=DUPLICATES_SCHEMA,
    )
