"""FAISS compute for building an index: train, add a part, merge parts, exact top-k, recall and nprobe tuning.

Pure functions of arrays and serialized indexes (``numpy.uint8`` buffers, which Ray ships without copying): no
storage, no Ray, so every step is tested on its own and the runner only decides where each one runs.

Cosine similarity is inner product on L2-normalised vectors: :func:`prepare` normalises for ``cosine`` (whatever
the job wrote), so scores are cosines in [-1, 1]; ``ip`` uses the vectors as they are; ``l2`` gives squared
Euclidean distances (smaller is closer).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from statistics import NormalDist
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
# The smallest error weight of rule 4 (relative to the mean): see _error_weights.
WEIGHT_FLOOR = 1e-6
# Rule 4, cosine and ip: the error weights are the queries' second moment to this power (train_weighted_residual_pq).
SECOND_MOMENT_POWER = 0.75
# nprobe tuning stops after two doublings that raised recall by no more than this.
PLATEAU = 0.002
# Rule 4, cosine and ip: the weight of a code's error along its own vector (the score error of a query close to it)
# beside the error's expected square over all queries, both for a query of unit norm (see anisotropic_codes).
PARALLEL_ERROR_WEIGHT = 0.14
# The codewords a sub-vector's code may move to (its nearest's nearest neighbours, itself included), and the passes
# over the sub-quantizers, when anisotropic_codes chooses codes.
CODE_CANDIDATES = 8
CODE_SWEEPS = 2
# Rows coded at a time by anisotropic_codes: each of its arrays holds M x rows x CODE_CANDIDATES values (24 MB at 2,048).
CODE_BLOCK_ROWS = 2048
# k-means iterations of rule 4's codebooks from grid_codebook's start: 10 come within 2 % of 25's error (see grid_codebook).
GRID_START_ITERATIONS = 10


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
    if ivf is not None:
        _lookup_table(faiss.downcast_index(ivf))
    return index


def _lookup_table(index: Any) -> None:
    """(Re)build an L2 residual-PQ index's precomputed table when it fits PRECOMPUTED_TABLE_MAX_BYTES, else turn it off."""
    ivf: Any = index
    if isinstance(index, faiss.IndexIVFPQ) and ivf.by_residual and ivf.metric_type == faiss.METRIC_L2:
        if ivf.nlist * ivf.pq.M * ivf.pq.ksub * 4 <= PRECOMPUTED_TABLE_MAX_BYTES:
            ivf.precompute_table()
        else:
            ivf.precomputed_table.clear()
            ivf.use_precomputed_table = -1


def new_index(spec: IndexSpec) -> faiss.Index:
    """An empty index of ``spec`` from FAISS's factory (rule 4's ``PCA...`` recipe is assembled by its own training),
    without polysemous training.

    The factory turns polysemous training on for IVF-PQ codes: a simulated annealing that reorders each codebook so
    that Hamming distances between codes mimic true ones. Only a polysemous search (``polysemous_ht > 0``, never set
    here) uses that order; the scores do not depend on it. It took 15 s of the 15.3 s that training IVF16,PQ8x8 on
    3,000 vectors took on the 2-core test machine.
    """
    index = faiss.index_factory(spec.dim, spec.factory, faiss_metric(spec.metric))
    lists = faiss.try_extract_index_ivf(index)
    product_codes: Any = None if lists is None else faiss.downcast_index(lists)
    if hasattr(product_codes, "do_polysemous_training"):  # IndexIVFPQ and its subclasses
        product_codes.do_polysemous_training = False
    return index


def train(spec: IndexSpec, sample: np.ndarray, *, seed: int = 1234) -> faiss.Index:
    """An empty index of ``spec``, trained on ``sample`` (already prepared). Flat indexes need no training."""
    if spec.pca_dim:
        _check_training_size(spec, sample)
        with _blas_distances():
            return train_weighted_residual_pq(spec, sample, seed=seed)
    index = new_index(spec)
    if not index.is_trained:
        _check_training_size(spec, sample)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = max(1, -(-len(sample) // max(spec.nlist, 1)))
        with _blas_distances():
            refined = faiss.downcast_index(index)
            if isinstance(refined, faiss.IndexRefine) and isinstance(faiss.downcast_index(refined.refine_index),
                                                                   faiss.IndexPQ):
                faiss.downcast_index(refined.base_index).train(sample)
                train_product_quantizer(faiss.downcast_index(refined.refine_index), sample, seed=seed)
                refined.is_trained = True
            else:
                index.train(sample)
    return index


def _check_training_size(spec: IndexSpec, sample: np.ndarray) -> None:
    if len(sample) < max(spec.nlist, 1):
        raise ValueError(f"{len(sample)} training vectors cannot train {spec.nlist} inverted lists")


def train_weighted_residual_pq(spec: IndexSpec, sample: np.ndarray, *, seed: int) -> faiss.Index:
    """Train ``PCA{d},IVF{nlist},PQ{m}x8`` (search.choice, rule 4) with codes chosen for the scores they will give.

    1. **Rotation**: the sample's ``pca_dim`` strongest principal directions, as a linear map without bias (FAISS's
       PCA subtracts the mean; a pure projection keeps inner products, so cosine and inner-product scores stay what
       they are, and the mean would only move every score of a query by the same amount).
    2. **Lists**: k-means in the rotated space. What the codes carry is each vector's residual from its list's
       centroid.
    3. **Weights**: k-means codebooks minimise the squared coding error ``e`` equally in every direction, but a score
       does not weigh it equally. An inner-product score is off by ``<q, e>``, whose variance over queries is
       ``sum_i E[q_i^2] e_i^2``; an L2 distance by ``2<q - x, e> + |e|^2``, where ``q - x`` of neighbours sharing a
       list is a difference of residuals. So direction ``i`` weighs its residual variance (l2) or, for cosine and
       ip, the queries' second moment ``E[q_i^2]`` (the sample's, queries being drawn like the vectors) to the power
       :data:`SECOND_MOMENT_POWER`, 0.75, over its mean. The codebooks are trained, and every vector's code chosen,
       on residuals scaled by ``sqrt(w_i)``. Why not the full second moment: the codes of step 5 cancel each
       vector's error along itself, which lies mostly in the strongest directions, so those carry less of the
       error that reaches the scores of the vector's nearest queries than their expected share. Measured (recall@10
       at 1/8 of raw, 1,000,000 clustered 768-d vectors, 2,048 lists, steps 5 and 6 in place): power 1 / 0.75 /
       0.5: 0.948 / 0.952 / 0.951; with FAISS's random codebook start instead of step 6, 0.75 gave 0.946 against
       0.947 at power 1 (earlier, without step 5: 0.901 at power 0, 0.938 at 0.75, 0.940 at 1 with 4,096 lists).
    4. **Bins**: each principal direction in turn, strongest first, goes to the 2-d sub-quantizer whose scaled
       residual variance is smallest so far (FAISS's ``balanced_bins`` rule, on the scaled variances): every
       sub-quantizer's 8 bits then cover the same weighted error, a strong direction paired with a weak one.
    5. **Codes along the vector** (cosine, ip): when vectors are added, each one's codes also cancel its error along
       itself (:func:`anisotropic_codes`): 0.938 -> 0.943 recall@10 on the million vectors above (4,096 lists).
    6. **Codebooks**: k-means of each sub-quantizer's scaled residuals from :func:`grid_codebook`'s start, not from
       random sample points: a strong direction paired with a weak one leaves the codewords nearly on a line, where
       k-means from a random start converges slowly (0.947 -> 0.948 recall@10 alone, 0.952 with step 3's power).

    Only the codes' choice is weighted: lists are assigned and searched in the plain rotated space, and
    :func:`merge` divides the scales back out of the codebooks, so the finished index is a plain FAISS
    ``IndexPreTransform(LinearTransform, IndexIVFPQ)`` whose scores are ordinary inner products or distances. Until
    then the trained index carries the scales as a second, diagonal transform, so that every :func:`add_part`
    codes its vectors as the training did (:func:`_add_weighted`).
    """
    dim, kept, pq_m = spec.dim, spec.pca_dim, spec.pq_m
    metric = faiss_metric(spec.metric)
    principal = faiss.PCAMatrix(dim, kept, 0, False)
    principal.train(sample)
    directions = faiss.vector_to_array(principal.A).reshape(kept, dim)  # strongest first
    rotated = np.ascontiguousarray(sample @ directions.T, dtype=np.float32)
    quantizer = faiss.IndexFlat(kept, metric)
    ivf: Any = faiss.IndexIVFPQ(quantizer, kept, spec.nlist, pq_m, 8, metric)
    ivf.cp.seed = seed
    ivf.cp.max_points_per_centroid = max(1, -(-len(sample) // spec.nlist))
    ivf.train_q1(len(rotated), faiss.swig_ptr(rotated), False, metric)  # FAISS's own k-means of the lists
    _, lists = quantizer.search(rotated, 1)
    centroids = quantizer.reconstruct_n(0, spec.nlist)
    # The sample's arrays are the training's memory (288 MB each for 98,304 x 732): moments without squared copies,
    # residuals in place of the rotated vectors, a block of rows at a time.
    second_moment = np.einsum("ij,ij->j", rotated, rotated) / len(rotated)
    residuals = rotated
    for start in range(0, len(residuals), 65536):
        residuals[start:start + 65536] -= centroids[lists[start:start + 65536, 0]]
    residual_variance = np.einsum("ij,ij->j", residuals, residuals) / len(residuals)
    if metric == faiss.METRIC_INNER_PRODUCT:
        weights = _error_weights(second_moment**SECOND_MOMENT_POWER)
    else:
        weights = _error_weights(residual_variance)
    order = balanced_bins(residual_variance * weights, pq_m)
    scales = np.sqrt(weights[order]).astype(np.float32)

    rotation = faiss.LinearTransform(dim, kept, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(directions[order], dtype=np.float32).ravel(), rotation.A)
    rotation.is_trained = True
    rotation.set_is_orthonormal()  # rows of an orthonormal basis: reconstruction reverses it with the transpose
    scaling = faiss.LinearTransform(kept, kept, False)
    faiss.copy_array_to_vector(np.diag(scales).astype(np.float32).ravel(), scaling.A)
    scaling.is_trained = True
    quantizer.reset()
    quantizer.add(np.ascontiguousarray(centroids[:, order] * scales, dtype=np.float32))
    coded = residuals[:, order]
    del residuals, rotated
    coded *= scales
    train_product_quantizer(ivf, coded, seed=seed, grid_start=True)
    index = faiss.IndexPreTransform(ivf)
    index.prepend_transform(scaling)
    index.prepend_transform(rotation)
    index.is_trained = True
    return deserialize(serialize(index))  # one object owning its parts, as every later step holds it


def _error_weights(moments: np.ndarray) -> np.ndarray:
    """``moments`` over their mean, floored at 1e-6: a direction the sample never moves in (vectors of lower rank
    than the directions kept) keeps a positive scale, which :func:`_finish_weighted` divides by."""
    mean = float(moments.mean())
    if not np.isfinite(mean) or mean <= 0:
        return np.ones_like(moments)
    return np.maximum(moments / mean, WEIGHT_FLOOR)


def balanced_bins(variances: np.ndarray, bins: int) -> np.ndarray:
    """An order of the directions in which bin ``b`` holds positions ``b * width ... (b + 1) * width - 1``: each
    direction, largest variance first, goes to the open bin whose total is smallest so far."""
    width = len(variances) // bins
    totals = np.zeros(bins)
    members: list[list[int]] = [[] for _ in range(bins)]
    for direction in np.argsort(-variances, kind="stable"):
        open_bins = np.flatnonzero([len(held) < width for held in members])
        chosen = open_bins[np.argmin(totals[open_bins])]
        members[chosen].append(int(direction))
        totals[chosen] += variances[direction]
    return np.array([direction for held in members for direction in held], dtype=np.int64)


def _nearest_centroids(centroids: np.ndarray, vectors: np.ndarray, metric: int) -> np.ndarray:
    """The list each vector belongs to: the nearest centroid (L2) or the highest inner product (cosine, ip)."""
    flat = faiss.IndexFlat(centroids.shape[1], metric)
    flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, lists = flat.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return lists[:, 0]


def _coding_scales(index: faiss.Index) -> np.ndarray | None:
    """The per-direction scales of a trained rule-4 index not yet finished by :func:`merge`; None for any other."""
    transformed = faiss.downcast_index(index)
    chain: Any = getattr(transformed, "chain", None)
    if not isinstance(transformed, faiss.IndexPreTransform) or chain.size() != 2:
        return None
    scaling = faiss.downcast_VectorTransform(chain.at(1))
    if not isinstance(scaling, faiss.LinearTransform) or scaling.d_in != scaling.d_out:
        return None
    return np.diag(faiss.vector_to_array(scaling.A).reshape(scaling.d_out, scaling.d_in)).copy()


def _add_weighted(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, scales: np.ndarray) -> None:
    """Add to a trained rule-4 index: lists assigned in the plain rotated space, codes chosen on scaled residuals
    (for cosine and ip also under the error along each vector: :func:`anisotropic_codes`)."""
    transformed: Any = faiss.downcast_index(index)
    rotated = faiss.downcast_VectorTransform(transformed.chain.at(0)).apply(vectors)
    ivf: Any = faiss.downcast_index(transformed.index)
    scaled_centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    lists = np.ascontiguousarray(_nearest_centroids(scaled_centroids / scales, rotated, ivf.metric_type), dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        rotated *= scales  # in place: a part's rotated vectors are the largest array here (360 MB for 125,000 x 720)
        ivf.add_core(len(rotated), faiss.swig_ptr(rotated), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    else:
        product = ivf.pq
        codebooks = faiss.vector_to_array(product.centroids).reshape(product.M, product.ksub, product.dsub)
        neighbours = nearest_codewords(codebooks, CODE_CANDIDATES)
        weight = PARALLEL_ERROR_WEIGHT * rotated.shape[1]
        list_bytes = lists.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :ivf.coarse_code_size()]
        for start in range(0, len(rotated), CODE_BLOCK_ROWS):
            block = slice(start, start + CODE_BLOCK_ROWS)
            along = rotated[block] / scales  # <along, scaled error> = <vector, error>
            residuals = np.ascontiguousarray(rotated[block] * scales - scaled_centroids[lists[block]])
            codes = anisotropic_codes(codebooks, residuals, along, product.compute_codes(residuals), neighbours, weight)
            entries = np.ascontiguousarray(np.concatenate([list_bytes[block], codes], axis=1))
            ivf.add_sa_codes(entries, ids[block])
    transformed.ntotal = ivf.ntotal


def nearest_codewords(codebooks: np.ndarray, count: int) -> np.ndarray:
    """``M x ksub x count``: each codeword's ``count`` nearest codewords in its own sub-quantizer, itself first."""
    table = np.empty((codebooks.shape[0], codebooks.shape[1], count), dtype=np.int32)
    for part, book in enumerate(codebooks):
        lengths = np.einsum("kj,kj->k", book, book)
        distances = lengths[:, None] + lengths[None, :] - 2 * book @ book.T
        np.fill_diagonal(distances, -np.inf)  # itself first, even beside a duplicate codeword
        table[part] = np.argsort(distances, axis=1, kind="stable")[:, :count]
    return table


def anisotropic_codes(codebooks: np.ndarray, residuals: np.ndarray, along: np.ndarray, codes: np.ndarray,
                      neighbours: np.ndarray, weight: float, sweeps: int = CODE_SWEEPS) -> np.ndarray:
    """Codes of ``residuals`` (rows x M*dsub) that lower ``|e|^2 + weight * <along, e>^2``, ``e`` the coding error,
    starting from ``codes`` (the nearest codeword of each sub-vector, which minimise ``|e|^2`` alone).

    Why: rule 4's scaled error ``|e|^2`` is a score's expected squared error over all queries, but what decides
    recall is the score of a vector against the queries whose neighbour it is, and those lie close to the vector
    itself: their score error is mostly ``<x, e>``, the error along the vector (``along`` is the vector divided by
    the scales, so that ``<along, e>`` is ``<x, e>`` unscaled). The 2-d sub-vectors' errors add up along ``x``, so
    moving a few codes to a neighbouring codeword can cancel most of it at a small cost in ``|e|^2`` (the
    anisotropic loss of ScaNN, Guo et al. 2020, ICML). Coordinate descent: ``sweeps`` passes over the
    sub-quantizers, each sub-vector moving to the best of its nearest codeword's ``neighbours`` given the others'
    errors, so the loss never rises. ``weight`` is :data:`PARALLEL_ERROR_WEIGHT` times the dimension, the scaled
    error being the dimension times the expected squared error for a query of unit norm.
    """
    parts, size, width = codebooks.shape
    count = len(residuals)
    first = np.arange(parts, dtype=np.int32)[:, None] * size  # each sub-quantizer's first row in the flat tables
    candidates = np.take(neighbours.reshape(parts * size, -1), codes.T + first, axis=0)  # parts x rows x candidates
    flat = candidates + first[:, :, None]
    squared = np.zeros(candidates.shape, dtype=np.float32)
    parallel = np.zeros(candidates.shape, dtype=np.float32)  # each candidate's share of <along, e>
    for axis in range(width):
        errors = residuals[:, axis::width].T[:, :, None] - np.take(codebooks[:, :, axis].ravel(), flat)
        squared += errors * errors
        errors *= along[:, axis::width].T[:, :, None]
        parallel += errors
    del errors, flat
    chosen = np.zeros((parts, count, 1), dtype=np.int64)
    shares = parallel[:, :, 0].copy()
    total = shares.sum(axis=0)
    cost = np.empty(candidates.shape[1:], dtype=np.float32)
    for _ in range(sweeps):
        for part in range(parts):
            others = total - shares[part]
            np.add(parallel[part], others[:, None], out=cost)
            np.square(cost, out=cost)
            cost *= weight
            cost += squared[part]
            chosen[part, :, 0] = cost.argmin(axis=1)
            shares[part] = np.take_along_axis(parallel[part], chosen[part], axis=1)[:, 0]
            total = others + shares[part]
    picked = np.take_along_axis(candidates, chosen, axis=2)[:, :, 0]
    return np.ascontiguousarray(picked.T, dtype=np.uint8)


def _finish_weighted(index: faiss.Index, scales: np.ndarray) -> faiss.Index:
    """The same codes scored as plain inner products or distances in the rotated space: the scales divided out of
    the centroids and codebooks, and an index of the rotation and the lists alone (the scaling is left out).

    The returned index uses ``index``'s rotation and lists without copying them, and holds ``index`` (which owns
    them) for as long as it lives.
    """
    transformed: Any = faiss.downcast_index(index)
    ivf: Any = faiss.downcast_index(transformed.index)
    quantizer: Any = faiss.downcast_index(ivf.quantizer)
    centroids = quantizer.reconstruct_n(0, ivf.nlist) / scales
    quantizer.reset()
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    product = ivf.pq
    codebooks = faiss.vector_to_array(product.centroids).reshape(product.M, product.ksub, product.dsub)
    codebooks = codebooks / scales.reshape(product.M, 1, product.dsub)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, dtype=np.float32).ravel(), product.centroids)
    product.transposed_centroids.clear()  # caches of the scaled codebooks, used only to encode
    product.centroids_sq_lengths.clear()
    _lookup_table(ivf)
    finished: Any = faiss.IndexPreTransform(faiss.downcast_VectorTransform(transformed.chain.at(0)), ivf)
    finished.referenced_objects.append(index)  # FAISS's own way to keep a part's owner alive
    return finished


def train_product_quantizer(index: Any, sample: np.ndarray, *, seed: int, grid_start: bool = False) -> None:
    """Train a PQ index's codebooks one sub-quantizer at a time with :class:`faiss.Kmeans`.

    The same k-means (25 iterations, 256 points per centroid at most) that ``ProductQuantizer.train`` runs, but
    FAISS's own loop took 85-110 s for 192-256 sub-quantizers of 3-4 dimensions on 16,384 vectors here (with or
    without BLAS distances), against 11 s for this one under :func:`_blas_distances` (reconstruction error 0.037 on
    unit vectors; the two codebooks' quality was not compared). With ``grid_start`` (rule 4), k-means starts from
    :func:`grid_codebook` and runs :data:`GRID_START_ITERATIONS` iterations on every sample point.
    """
    quantizer = index.pq
    width = quantizer.dsub
    centroids: list[np.ndarray] = []
    for part in range(quantizer.M):
        points = np.ascontiguousarray(sample[:, part * width:(part + 1) * width])
        if grid_start:
            kmeans = faiss.Kmeans(width, quantizer.ksub, niter=GRID_START_ITERATIONS, seed=seed + part,
                                  max_points_per_centroid=-(-len(points) // quantizer.ksub))
            kmeans.train(points, init_centroids=grid_codebook(points, quantizer.ksub))
        else:
            kmeans = faiss.Kmeans(width, quantizer.ksub, niter=25, seed=seed + part, max_points_per_centroid=256)
            kmeans.train(points)
        assert kmeans.centroids is not None  # set by train()
        centroids.append(kmeans.centroids)
    faiss.copy_array_to_vector(np.concatenate(centroids).ravel(), quantizer.centroids)
    index.is_trained = True


def grid_codebook(points: np.ndarray, size: int) -> np.ndarray:
    """``size`` (a power of two) codewords for ``points`` (rows x width) to start k-means from: the product of each
    dimension's levels, the bits dealt one at a time to the dimension with the largest spread per level, each
    dimension's levels at the quantiles of a Gaussian of its mean and sqrt(3) x its standard deviation.

    Why: FAISS's k-means starts from sample points drawn at random, as dense as the data, and the optimum of a
    Gaussian is sparser, its density the cube root of the data's (hence a sqrt(3)-wider Gaussian's quantiles).
    A rule-4 sub-quantizer pairs a strong direction with a weak one, so its 256 codewords lie almost on a line,
    along which Lloyd's iterations move them out to the tails by small steps: on the held-out residuals of a
    million clustered vectors (2,048 lists, 732 directions), the random start's squared error was 0.00240 after
    25 iterations and still 0.00171 after 300 (548 s for the 366 sub-quantizers); this start's was 0.00063 after
    10 (21 s) and 0.00062 after 25 (README, "From embeddings to search").
    """
    if size < 1 or size & (size - 1):
        raise ValueError(f"a grid of {size} codewords: the size must be a power of two (2 ** bits)")
    width = points.shape[1]
    means, spreads = points.mean(axis=0), points.std(axis=0)
    levels = np.ones(width, dtype=np.int64)
    for _ in range(int(round(math.log2(size)))):
        levels[int(np.argmax(spreads / levels))] *= 2
    gaussian = NormalDist()
    axes = [means[axis] + math.sqrt(3) * spreads[axis] * np.array([gaussian.inv_cdf((level + 0.5) / levels[axis])
                                                                    for level in range(levels[axis])])
            for axis in range(width)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.ascontiguousarray(np.stack([coordinate.ravel() for coordinate in grid], axis=1), dtype=np.float32)


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
        scales = _coding_scales(index)
        if scales is not None:
            _add_weighted(index, vectors, ids, scales)
        elif isinstance(index, faiss.IndexRefine):
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
    """Merge serialized parts (in id order) into the finished index; each part is freed once merged.

    A rule-4 index is finished here: the scales its codes were chosen with come out of its codebooks
    (:func:`train_weighted_residual_pq`), so the result searches as a plain FAISS index and takes no more parts.
    """
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
    scales = _coding_scales(merged)
    return merged if scales is None else _finish_weighted(merged, scales)


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
