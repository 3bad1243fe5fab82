"""FAISS compute for building an index: train, add a part, merge parts, exact top-k, recall and nprobe tuning.

Pure functions of arrays and serialized indexes (``numpy.uint8`` buffers, which Ray ships without copying): no
storage, no Ray, so every step is tested on its own and the runner only decides where each one runs.

Cosine similarity is inner product on L2-normalised vectors: :func:`prepare` normalises for ``cosine`` (whatever
the job wrote), so scores are cosines in [-1, 1]; ``ip`` uses the vectors as they are; ``l2`` gives squared
Euclidean distances (smaller is closer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

from search.choice import IndexSpec

logger = logging.getLogger(__name__)

RECALL_K = 10
RECALL_TARGET = 0.95
# Refine indexes re-rank k_factor x k candidates from the coarse codes with the finer ones.
REFINE_K_FACTOR = 8
# The most memory an L2 residual-PQ index may spend on its precomputed lookup table (see deserialize).
PRECOMPUTED_TABLE_MAX_BYTES = 256 * 1024**2
# nprobe tuning stops after two doublings that raised recall by no more than this.
PLATEAU = 0.002


def faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def higher_is_closer(metric: str) -> bool:
    return metric != "l2"


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Contiguous float32, L2-normalised for cosine (zero vectors stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine" and len(vectors):
        vectors = vectors.copy()
        faiss.normalize_L2(vectors)
    return vectors


def serialize(index: faiss.Index) -> np.ndarray:
    return faiss.serialize_index(index)


def deserialize(buffer: np.ndarray | bytes) -> faiss.Index:
    """The index in ``buffer``, without an L2 residual-PQ lookup table larger than PRECOMPUTED_TABLE_MAX_BYTES.

    FAISS precomputes, when it reads an ``IVF...,PQ`` index with the L2 metric, a table of nlist x m x 256 floats
    unless it exceeds 2 GB: 1.5 GB for the 360-byte codes of a million vectors in 4,096 lists, four times the index,
    allocated again by every task that opens a copy to add its part. Past the cap the table is not built and each
    probed list computes its own (m x 256 x 2 multiply-adds: microseconds), at the same distances.
    """
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, bytes) else buffer, reader.data)
    index = faiss.read_index(reader, faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
    ivf = faiss.try_extract_index_ivf(index)
    residual_pq: Any = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(residual_pq, faiss.IndexIVFPQ) and residual_pq.by_residual and residual_pq.metric_type == faiss.METRIC_L2:
        if residual_pq.nlist * residual_pq.pq.M * residual_pq.pq.ksub * 4 <= PRECOMPUTED_TABLE_MAX_BYTES:
            residual_pq.precompute_table()
        else:
            residual_pq.use_precomputed_table = -1
    return index


def new_index(spec: IndexSpec) -> faiss.Index:
    """An empty index of ``spec``. A ``PCA...`` prefix gets balanced bins: FAISS's factory string cannot say so."""
    index = faiss.index_factory(spec.dim, spec.factory, faiss_metric(spec.metric))
    if spec.pca_dim:
        _rotation(index).balanced_bins = spec.pq_m
    return index


def _rotation(index: faiss.Index) -> Any:
    transformed: Any = faiss.downcast_index(index)
    return faiss.downcast_VectorTransform(transformed.chain.at(0))


def train(spec: IndexSpec, sample: np.ndarray, *, seed: int = 1234) -> faiss.Index:
    """An empty index of ``spec``, trained on ``sample`` (already prepared). Flat indexes need no training."""
    index = new_index(spec)
    if not index.is_trained:
        if len(sample) < max(spec.nlist, 1):
            raise ValueError(f"{len(sample)} training vectors cannot train {spec.nlist} inverted lists")
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = max(1, -(-len(sample) // max(spec.nlist, 1)))
        with _blas_distances():
            refined = faiss.downcast_index(index)
            if spec.pca_dim:
                train_balanced_residual_pq(index, sample, seed=seed)
            elif isinstance(refined, faiss.IndexRefine) and isinstance(faiss.downcast_index(refined.refine_index),
                                                                     faiss.IndexPQ):
                faiss.downcast_index(refined.base_index).train(sample)
                train_product_quantizer(faiss.downcast_index(refined.refine_index), sample, seed=seed)
                refined.is_trained = True
            else:
                index.train(sample)
    return index


def train_balanced_residual_pq(index: faiss.Index, sample: np.ndarray, *, seed: int) -> None:
    """Train ``PCA{d},IVF{nlist},PQ{m}x8`` (see search.choice, rule 4): the rotation, the lists, then the codebooks of
    the residuals from the lists' centroids.

    The rotation keeps no bias (FAISS's PCA subtracts the mean): a pure projection preserves inner products, so
    cosine and inner-product scores stay what they are; the mean only moves every score of a query by the same
    amount in the dropped directions. The codebooks are trained by :func:`train_product_quantizer`, as for
    refined indexes, on the same residuals FAISS's own ``train`` would use.
    """
    rotation = _rotation(index)
    rotation.train(sample)
    faiss.copy_array_to_vector(np.zeros(rotation.d_out, dtype=np.float32), rotation.b)
    rotation.PCAMat.clear()  # the full dim x dim eigenbasis, needed only to train: 2.4 MB of the budget at 768-d
    rotated = rotation.apply(sample)
    transformed: Any = faiss.downcast_index(index)
    ivf: Any = faiss.downcast_index(transformed.index)
    ivf.train_q1(len(rotated), faiss.swig_ptr(rotated), False, ivf.metric_type)
    _, lists = ivf.quantizer.search(rotated, 1)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    train_product_quantizer(ivf, np.ascontiguousarray(rotated - centroids[lists[:, 0]]), seed=seed)
    index.is_trained = True


def train_product_quantizer(index: Any, sample: np.ndarray, *, seed: int) -> None:
    """Train a PQ index's codebooks one sub-quantizer at a time with :class:`faiss.Kmeans`.

    The same k-means (25 iterations, 256 points per centroid at most) that ``ProductQuantizer.train`` runs, but
    FAISS's own loop took 85-110 s for 192-256 sub-quantizers of 3-4 dimensions on 16,384 vectors here (with or
    without BLAS distances), against 11 s for this one under :func:`_blas_distances` (reconstruction error 0.037 on
    unit vectors; the two codebooks' quality was not compared).
    """
    quantizer = index.pq
    width = quantizer.dsub
    centroids: list[np.ndarray] = []
    for part in range(quantizer.M):
        kmeans = faiss.Kmeans(width, quantizer.ksub, niter=25, seed=seed + part, max_points_per_centroid=256)
        kmeans.train(np.ascontiguousarray(sample[:, part * width:(part + 1) * width]))
        assert kmeans.centroids is not None  # set by train()
        centroids.append(kmeans.centroids)
    faiss.copy_array_to_vector(np.concatenate(centroids).ravel(), quantizer.centroids)
    index.is_trained = True


@contextmanager
def _blas_distances() -> Iterator[None]:
    """Exact distances through BLAS while training, whatever the batch shape.

    k-means of a product quantiser's sub-vectors (3-4 dimensions for the 256-byte refining codes of 768-d vectors)
    otherwise takes FAISS's fused small-dimension kernel, measured 12x slower here (0.45 s against 0.038 s for 256
    centroids of 16,384 4-d points), which :func:`train_product_quantizer` runs once per sub-quantizer. The
    threshold is global to FAISS, so it is put back afterwards: single queries are faster without BLAS.
    """
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def add_part(trained: np.ndarray | bytes, vectors: np.ndarray, first_id: int) -> np.ndarray:
    """A copy of the trained (empty) index holding ``vectors`` with ids ``first_id, first_id + 1, ...``; serialized.

    Flat indexes number vectors by insertion order, so their parts must be merged in id order (:func:`merge`).
    """
    index = deserialize(trained)
    if len(vectors):
        ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
        if isinstance(index, faiss.IndexRefine):
            # Refine takes no ids: the coarse stage (IVF) gets the global ids, the refining codes are stored in
            # insertion order, which is id order once the parts are merged in id order (ids are contiguous).
            stages: Any = index
            faiss.downcast_index(stages.base_index).add_with_ids(vectors, ids)
            faiss.downcast_index(stages.refine_index).add(vectors)
            stages.ntotal = stages.base_index.ntotal
        elif isinstance(index, faiss.IndexFlat) or not _takes_ids(index):
            index.add(vectors)
        else:
            index.add_with_ids(vectors, ids)
    return serialize(index)


def _takes_ids(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def merge(parts: Iterable[np.ndarray | bytes]) -> faiss.Index:
    """Merge serialized parts (in id order) into one index; each part is freed once merged."""
    merged: faiss.Index | None = None
    for part in parts:
        index = deserialize(part)
        if merged is None:
            merged = index
            continue
        if isinstance(merged, faiss.IndexRefine):  # FAISS cannot merge these whole: merge both stages
            refined: Any = merged
            part_stages: Any = index
            faiss.downcast_index(refined.base_index).merge_from(faiss.downcast_index(part_stages.base_index), 0)
            faiss.downcast_index(refined.refine_index).merge_from(faiss.downcast_index(part_stages.refine_index), 0)
            refined.ntotal = refined.base_index.ntotal
        else:
            merged.merge_from(index, 0)  # ids travel with the vectors (IVF) or follow the merge order (flat)
    if merged is None:
        raise ValueError("no parts to merge")
    return merged


def exact_top_k(
    queries: np.ndarray, vectors: np.ndarray, first_id: int, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` of ``queries`` among ``vectors`` (ids from ``first_id``): the ground truth of one part."""
    if len(vectors) == 0 or len(queries) == 0:
        empty = np.full((len(queries), k), -1, dtype=np.int64)
        return np.full((len(queries), k), np.nan, dtype=np.float32), empty
    flat = faiss.IndexFlat(vectors.shape[1], faiss_metric(metric))
    flat.add(vectors)
    scores, ids = flat.search(queries, min(k, len(vectors)))
    ids = np.where(ids >= 0, ids + first_id, -1)
    if ids.shape[1] < k:  # pad so that every part returns (n, k)
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
    return scores, ids


def merge_top_k(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-part top-k lists into the global top-k (ties broken by smaller id, as a flat scan would)."""
    scores = np.concatenate([part[0] for part in parts], axis=1)
    ids = np.concatenate([part[1] for part in parts], axis=1)
    missing = ids < 0
    order_scores = -scores if higher_is_closer(metric) else scores
    order_scores = np.where(missing, np.inf, order_scores)
    order = np.lexsort((ids, order_scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = RECALL_K, exclude: np.ndarray | None = None) -> float:
    """Mean fraction of each query's true top-k found in its returned top-k (``exclude``: an id per query to drop
    from both lists, the query itself when queries are drawn from the indexed vectors)."""
    hits = 0.0
    for row in range(len(truth)):
        true_ids = [i for i in truth[row] if i >= 0 and (exclude is None or i != exclude[row])][:k]
        # At most k returned ids count: a caller that asked for k + 1 to drop the query itself gets no extra guess.
        got = set([i for i in found[row] if i >= 0 and (exclude is None or i != exclude[row])][:k])
        if true_ids:
            hits += len(got.intersection(true_ids)) / len(true_ids)
    return hits / max(1, len(truth))


def set_search_params(index: faiss.Index, *, nprobe: int | None = None, k_factor: int | None = None) -> None:
    """Set query-time parameters that are stored with the index (nprobe of IVF, k_factor of Refine)."""
    if nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    if k_factor is not None and isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        refined: Any = faiss.downcast_index(index)
        refined.k_factor = k_factor


def tune_nprobe(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    query_ids: np.ndarray,
    *,
    k: int = RECALL_K,
    target: float = RECALL_TARGET,
) -> tuple[int, float]:
    """Smallest power-of-two ``nprobe`` whose recall@k on ``queries`` reaches ``target`` (or the best found before
    recall stopped rising: probing all 4,096 lists of a million vectors costs minutes and cannot beat the codes).

    Sets it on the index and returns ``(nprobe, recall)``. Non-IVF indexes: ``(0, measured recall)``.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        set_search_params(index, k_factor=REFINE_K_FACTOR)
    if ivf is None:
        _, found = index.search(queries, k + 1)
        return 0, recall_at_k(found, truth, k, query_ids)
    best = (1, -1.0)
    gained = (1, -1.0)  # the last nprobe that raised recall by more than PLATEAU
    nprobe = 1
    while nprobe <= ivf.nlist:
        ivf.nprobe = nprobe
        _, found = index.search(queries, k + 1)
        recall = recall_at_k(found, truth, k, query_ids)
        logger.info("nprobe %d: recall@%d %.4f", nprobe, k, recall)
        if recall > best[1] + 1e-9:
            best = (nprobe, recall)
        if recall > gained[1] + PLATEAU:
            gained = (nprobe, recall)
        if recall >= target or nprobe >= 4 * gained[0]:
            break  # the target, or two doublings without gain: the codes, not the lists probed, limit recall
        nprobe *= 2
    ivf.nprobe = best[0]
    return best
