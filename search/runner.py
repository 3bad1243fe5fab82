"""The index build job: Ray tasks over the embedding job's Parquet files, then train, merge, measure and write.

Steps (the driver holds only samples, one part at a time and the id map; the vectors stay in the tasks):

1. list the data files and read their footers: row counts, embedding width, and the model fingerprint, which must
   agree across files (:func:`search.embeddings.check_comparable`);
2. one task per file reads its embeddings (error rows skipped) and returns its vector count and a uniform sample;
3. the driver chooses the index from the vector count and the memory budget (:mod:`search.choice`) and trains it
   on the sample (k-means and codebooks need a sample, not the collection);
4. one task per file adds its vectors to a copy of the trained index under global ids (file order, row order) and
   computes the exact top-k of the recall queries among its own vectors; the driver merges the parts in id order and
   the partial top-k lists into the exact ground truth;
5. ``nprobe`` is raised until recall@10 on the recall queries (vectors of the collection, each query's own id
   excluded) reaches the target; the recall measured is recorded in the metadata;
6. index, id map and metadata are written atomically (:mod:`search.store`).

The runner receives a ``mapper`` (Ray tasks by default, a plain loop in unit tests), so compute, I/O and
distribution are each testable alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.storage import StorageOptions
from pipeline.manifest import sanitize_uri
from search import build, embeddings, store
from search.choice import DEFAULT_MAX_INDEX_MEMORY, choose_index, largest_train_size
from search.errors import EmbeddingInputError, SearchError

logger = logging.getLogger(__name__)

Mapper = Callable[[Callable[..., Any], Sequence[tuple[Any, ...]]], Iterator[Any]]


@dataclass
class IndexJobConfig:
    """Settings of one index build, built once from the command line (``jobs.index``) and passed down whole."""

    input: str
    output: str
    max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY
    metric: str = "cosine"
    storage_options: dict[str, Any] = field(default_factory=dict)
    recall_queries: int = 500
    recall_target: float = build.RECALL_TARGET
    seed: int = 0
    task_cpus: float = 1.0


@dataclass(frozen=True)
class _FileSample:
    count: int
    rows: int
    positions: np.ndarray  # positions of the sampled vectors among the file's valid rows
    vectors: np.ndarray


@dataclass(frozen=True)
class _FilePart:
    part: np.ndarray  # serialized index part
    keys: list[str]
    sources: list[str]
    truth_scores: np.ndarray
    truth_ids: np.ndarray


def sample_file(uri: str, storage_options: StorageOptions, fraction: float, seed: int, metric: str) -> _FileSample:
    """Task: count a file's vectors and draw a uniform sample of them (prepared for ``metric``)."""
    batch = embeddings.read_embeddings(uri, storage_options)
    count = len(batch)
    take = 0 if count == 0 else min(count, max(1, round(count * fraction)))
    positions = np.sort(np.random.default_rng(seed).choice(count, size=take, replace=False)) if take else np.empty(0, np.int64)
    vectors = build.prepare(batch.vectors[positions], metric) if take else np.empty((0, batch.vectors.shape[1]), np.float32)
    return _FileSample(count=count, rows=batch.rows_read, positions=positions, vectors=vectors)


def add_file(
    uri: str,
    storage_options: StorageOptions,
    trained: np.ndarray,
    first_id: int,
    queries: np.ndarray,
    k: int,
    metric: str,
) -> _FilePart:
    """Task: add a file's vectors to a copy of the trained index, and the exact top-k of the queries among them."""
    import faiss

    faiss.omp_set_num_threads(1)  # one task per CPU: FAISS's own threads would oversubscribe the node
    batch = embeddings.read_embeddings(uri, storage_options)
    vectors = build.prepare(batch.vectors, metric)
    part = build.add_part(trained, vectors, first_id)
    scores, ids = build.exact_top_k(queries, vectors, first_id, k, metric)
    return _FilePart(part=part, keys=batch.keys, sources=batch.sources, truth_scores=scores, truth_ids=ids)


def local_mapper(function: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
    """Run the tasks here, one after another (unit tests, tiny inputs)."""
    for arguments in calls:
        yield function(*arguments)


def ray_mapper(num_cpus: float = 1.0) -> Mapper:
    """Run each call as a Ray task (``ray.init()`` first unless connected) and yield the results in call order."""

    def mapper(function: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        import ray

        if not ray.is_initialized():
            ray.init()
        remote = ray.remote(num_cpus=num_cpus, max_retries=3)(function)
        # Large shared arguments (the trained index, the queries) go to the object store once, not once per task.
        shared: dict[int, Any] = {}

        def stored(value: Any) -> Any:
            if isinstance(value, np.ndarray) and value.nbytes > 100_000:
                if id(value) not in shared:
                    shared[id(value)] = ray.put(value)
                return shared[id(value)]
            return value

        refs = [remote.remote(*[stored(value) for value in arguments]) for arguments in calls]
        for ref in refs:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                # A task's user-facing error (bad file, storage refusal) surfaces as itself, without Ray's wrapping
                # traceback, so that the command line prints its one-line message.
                if isinstance(error.cause, (SearchError, OSError)):
                    raise error.cause from None
                raise

    return mapper


def _read_footers(files: Sequence[str], storage_options: StorageOptions) -> tuple[Any, list[int], int]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = list(pool.map(lambda uri: embeddings.read_fingerprint(uri, storage_options), files))
    fingerprint = embeddings.check_comparable({uri: footer[0] for uri, footer in zip(files, footers)})
    widths = {footer[2] for footer in footers}
    if len(widths) != 1:
        raise EmbeddingInputError(f"embedding widths differ between data files ({sorted(widths)}): one index needs one width")
    return fingerprint, [footer[1] for footer in footers], widths.pop()


def build_index(config: IndexJobConfig, mapper: Mapper | None = None) -> dict[str, Any]:
    """Build the index of ``config.input`` and write it under ``config.output``; returns the metadata record."""
    started = time.monotonic()
    mapper = mapper or ray_mapper(config.task_cpus)
    options = dict(config.storage_options)
    files = embeddings.list_data_files(config.input, options)
    fingerprint, rows_per_file, dim = _read_footers(files, options)
    total_rows = sum(rows_per_file)
    if total_rows == 0:
        raise EmbeddingInputError(
            f"the input {config.input} has no rows ({embeddings.describe_files(files)}): nothing to index"
        )

    # Sample enough to train the inverted lists this row count could need (error rows are not counted yet, so this
    # errs on the generous side), plus the recall queries.
    wanted = largest_train_size(total_rows) + config.recall_queries
    fraction = min(1.0, 1.2 * wanted / total_rows)
    samples: list[_FileSample] = list(
        mapper(sample_file, [(uri, options, fraction, config.seed + number, config.metric) for number, uri in enumerate(files)])
    )
    counts = np.array([sample.count for sample in samples], dtype=np.int64)
    count = int(counts.sum())
    if count == 0:
        raise EmbeddingInputError(
            f"the input {config.input} has no embeddings: all {total_rows} rows of {embeddings.describe_files(files)} "
            "are error rows (null embedding). Check the job's error column; nothing to index"
        )
    first_ids = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    spec = choose_index(count, dim, config.max_index_memory, config.metric)
    logger.info("%d vectors of width %d in %d files: %s (%s)", count, dim, len(files), spec.factory, spec.reason)

    pooled = np.concatenate([sample.vectors for sample in samples])
    pooled_ids = np.concatenate([first + sample.positions for first, sample in zip(first_ids, samples)])
    rng = np.random.default_rng(config.seed)
    query_rows = rng.choice(len(pooled), size=min(config.recall_queries, len(pooled)), replace=False)
    queries, query_ids = pooled[query_rows], pooled_ids[query_rows]
    train_rows = rng.permutation(len(pooled))[: max(spec.train_size, 1)]
    trained_at = time.monotonic()
    trained = build.serialize(build.train(spec, pooled[train_rows], seed=config.seed + 1234))
    train_seconds = time.monotonic() - trained_at
    del pooled, samples

    k = build.RECALL_K + 1  # + the query itself, excluded when recall is measured
    parts = mapper(add_file, [(uri, options, trained, int(first), queries, k, config.metric)
                              for uri, first in zip(files, first_ids)])
    keys: list[str] = []
    sources: list[str] = []
    file_numbers: list[np.ndarray] = []
    truths: list[tuple[np.ndarray, np.ndarray]] = []

    def collected() -> Iterator[np.ndarray]:
        for number, part in enumerate(parts):
            keys.extend(part.keys)
            sources.extend(part.sources)
            file_numbers.append(np.full(len(part.keys), number, dtype=np.int32))
            truths.append((part.truth_scores, part.truth_ids))
            yield part.part

    index = build.merge(collected())
    if index.ntotal != count:
        raise RuntimeError(f"merged index holds {index.ntotal} vectors, the files {count}: a file changed during the build")
    _, truth = build.merge_top_k(truths, k, config.metric)
    nprobe, recall = build.tune_nprobe(index, queries, truth, query_ids, target=config.recall_target)
    seconds = time.monotonic() - started
    metadata = {
        "index": {**spec.to_dict(), "nprobe": nprobe,
                  "k_factor": build.REFINE_K_FACTOR if spec.refine_m else None},
        "recall": {"k": build.RECALL_K, "recall_at_k": round(recall, 4), "queries": len(queries),
                   "target": config.recall_target,
                   "how": "queries drawn from the indexed vectors, each query's own id excluded, against exact search"},
        "fingerprint": fingerprint.to_dict(),
        "input": {"uri": sanitize_uri(config.input), "files": [sanitize_uri(uri) for uri in files], "rows": total_rows, "vectors": count,
                  "skipped_rows": total_rows - count},
        "build_seconds": round(seconds, 2),
        "train_seconds": round(train_seconds, 2),
    }
    ids = store.id_map_table(keys, sources, np.concatenate(file_numbers) if file_numbers else np.empty(0, np.int32))
    record = store.write_index(config.output, index, ids, metadata, options)
    logger.info("indexed %d vectors (%d error rows skipped) in %.1f s: recall@%d %.3f at nprobe %d",
                count, total_rows - count, seconds, build.RECALL_K, recall, nprobe)
    return record

