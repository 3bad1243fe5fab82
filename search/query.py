"""Queries against a stored index: by vectors, by keys already in the index, by a Parquet of embeddings.

Every query path ends in the same table, ``query, rank, key, source, score`` (rank 1 = nearest; score = cosine
similarity or inner product, higher is closer; for ``l2`` the squared Euclidean distance, lower is closer).
Queries made of embeddings must come from the same model and preprocessing as the index: a Parquet that records a
different fingerprint, or vectors of another width, are refused (:class:`FingerprintMismatchError`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.storage import StorageOptions
from pipeline.manifest import JobFingerprint
from search import build, embeddings
from search.errors import FingerprintMismatchError, SearchError
from search.store import StoredIndex

logger = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([
    ("query", pa.string()), ("rank", pa.int32()), ("key", pa.string()), ("source", pa.string()), ("score", pa.float32()),
])
# What must agree between the index's embeddings and a query's for their distances to mean anything.
QUERY_FIELDS = ("weights_sha256", "preprocessing")


def fingerprint_differences(index_fingerprint: Mapping[str, Any], query: JobFingerprint) -> list[str]:
    """``["weights_sha256: index 'ab..' vs query 'cd..'", ...]`` for each field in QUERY_FIELDS that differs."""
    differences = []
    for name in QUERY_FIELDS:
        recorded, given = index_fingerprint.get(name), getattr(query, name)
        if json.dumps(recorded, sort_keys=True) != json.dumps(given, sort_keys=True):
            differences.append(f"{name}: index {_short(recorded)} vs query {_short(given)}")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def search_vectors(stored: StoredIndex, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the ``k`` nearest indexed vectors of each query (ids -1 where fewer exist)."""
    if vectors.ndim != 2 or vectors.shape[1] != stored.dim:
        raise FingerprintMismatchError(
            f"query vectors have width {vectors.shape[-1] if vectors.ndim else 0}, the index at {stored.uri} "
            f"{stored.dim}: query with embeddings of the model the index was built from"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return stored.index.search(build.prepare(vectors, stored.metric), k)


def results_table(names: Sequence[str], scores: np.ndarray, ids: np.ndarray, stored: StoredIndex) -> pa.Table:
    """One row per (query, hit): ``query, rank, key, source, score``; missing hits (id -1) are left out."""
    valid = ids >= 0
    query_index, rank_index = np.nonzero(valid)
    hit_ids = ids[valid]
    names_array = pa.array(list(names), pa.string())
    return pa.Table.from_arrays(
        [
            names_array.take(pa.array(query_index)),
            pa.array(rank_index + 1, pa.int32()),
            stored.ids.column("key").take(pa.array(hit_ids)),
            stored.ids.column("source").take(pa.array(hit_ids)),
            pa.array(scores[valid], pa.float32()),
        ],
        schema=RESULT_SCHEMA,
    )


def ids_for_keys(stored: StoredIndex, keys: Sequence[str]) -> list[tuple[str, int]]:
    """``(query name, index id)`` for each key; a key held by several sources gives one query per source.

    Raises :class:`SearchError` naming the keys that are not in the index.
    """
    key_column = stored.ids.column("key")
    found: list[tuple[str, int]] = []
    missing = []
    for key in keys:
        matches = np.nonzero(pc.equal(key_column, key).to_numpy(zero_copy_only=False))[0]
        if len(matches) == 0:
            missing.append(key)
        elif len(matches) == 1:
            found.append((key, int(matches[0])))
        else:
            found.extend((f"{key} ({stored.ids.column('source')[int(m)].as_py()})", int(m)) for m in matches)
    if missing:
        raise SearchError(
            f"key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} not in the index at {stored.uri} "
            f"({stored.index.ntotal} vectors; error rows of the embedding job are not indexed)"
        )
    return found


def vectors_for_ids(stored: StoredIndex, ids: Sequence[int], storage_options: StorageOptions | None = None) -> np.ndarray:
    """The embeddings of indexed ids, read exactly from the input files the index records.

    The index itself may hold only compressed codes, so querying with a reconstruction would query with a
    different vector. When an input file is no longer readable, the index's reconstruction is used (exact for flat
    indexes), with a warning.
    """
    files = stored.metadata["input"]["files"]
    out = np.zeros((len(ids), stored.dim), dtype=np.float32)
    file_column = stored.ids.column("file").to_numpy()
    by_file: dict[int, list[int]] = {}
    for position, index_id in enumerate(ids):
        by_file.setdefault(int(file_column[index_id]), []).append(position)
    for file_number, positions in by_file.items():
        uri = files[file_number]
        try:
            batch = embeddings.read_embeddings(uri, storage_options)
        except (OSError, SearchError) as error:
            logger.warning("cannot read %s (%s): using the index's reconstruction of its vectors", uri, error)
            for position in positions:
                out[position] = _reconstruct(stored, int(ids[position]))
            continue
        # Within a file, ids follow the file's valid rows in order.
        first_id = int(np.searchsorted(file_column, file_number, side="left"))
        for position in positions:
            row = int(ids[position]) - first_id
            expected = (stored.ids.column("key")[int(ids[position])].as_py(), stored.ids.column("source")[int(ids[position])].as_py())
            if row >= len(batch) or (batch.keys[row], batch.sources[row]) != expected:
                raise SearchError(f"{uri} changed since the index at {stored.uri} was built: rebuild the index")
            out[position] = batch.vectors[row]
    return out


def _reconstruct(stored: StoredIndex, index_id: int) -> np.ndarray:
    import faiss

    ivf = faiss.try_extract_index_ivf(stored.index)
    if ivf is not None:
        ivf.make_direct_map()
    return np.asarray(stored.index.reconstruct(index_id), dtype=np.float32)


def read_query_embeddings(
    uri: str, stored: StoredIndex, storage_options: StorageOptions | None = None
) -> tuple[list[str], np.ndarray]:
    """``(query names, vectors)`` from a Parquet file or prefix with an ``embedding`` column (error rows skipped).

    Names come from ``key`` (``file#row`` where there is no key column). A file that records the model fingerprint
    (every output file of this project's jobs does) must agree with the index on weights and preprocessing.
    """
    names: list[str] = []
    vectors: list[np.ndarray] = []
    for file_uri in embeddings.list_data_files(uri, storage_options):
        fingerprint = _fingerprint_or_none(file_uri, storage_options)
        if fingerprint is not None:
            differences = fingerprint_differences(stored.metadata["fingerprint"], fingerprint)
            if differences:
                raise FingerprintMismatchError(
                    f"query embeddings {file_uri} were made with another model or preprocessing than the index at "
                    f"{stored.uri}: {'; '.join(differences)}. Embed the queries with the index's model"
                )
        else:
            logger.warning("%s records no model fingerprint: cannot check it matches the index's model", file_uri)
        table = embeddings.read_table_for_queries(file_uri, storage_options)
        dim = embeddings.embedding_width(table.schema, file_uri)
        file_vectors, valid = embeddings.vectors_from_column(table.column(embeddings.EMBEDDING_COLUMN), dim)
        if "key" in table.column_names:
            file_names = [str(name) for name, ok in zip(table.column("key").to_pylist(), valid) if ok]
        else:
            file_names = [f"{file_uri}#{row}" for row in np.nonzero(valid)[0]]
        names.extend(file_names)
        vectors.append(file_vectors)
    stacked = np.concatenate(vectors) if vectors else np.empty((0, stored.dim), np.float32)
    if len(stacked) == 0:
        raise SearchError(f"no query embeddings in {uri}: every row's embedding is null")
    return names, stacked


def _fingerprint_or_none(file_uri: str, storage_options: StorageOptions | None) -> JobFingerprint | None:
    try:
        return embeddings.read_fingerprint(file_uri, storage_options)[0]
    except embeddings.EmbeddingInputError as error:
        if "no model fingerprint" in str(error):
            return None
        raise


def format_table(table: pa.Table) -> str:
    """Results as a readable text table, one block per query."""
    lines = []
    current = None
    rows = table.to_pylist()
    width = max([len(row["key"]) for row in rows] + [3])
    for row in rows:
        if row["query"] != current:
            current = row["query"]
            lines.append(f"query: {current}")
            lines.append(f"  {'rank':>4}  {'score':>8}  {'key':<{width}}  source")
        lines.append(f"  {row['rank']:>4}  {row['score']:>8.4f}  {row['key']:<{width}}  {row['source']}")
    return "\n".join(lines) if lines else "(no results)"
