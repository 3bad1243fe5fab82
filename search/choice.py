"""Which FAISS index for ``count`` vectors of width ``dim`` within a memory budget. Pure: no FAISS, no I/O.

The rule, from exact to most compressed (each step is taken only when the one before does not fit the budget):

1. ``Flat`` (exact search) for up to :data:`FLAT_MAX_VECTORS` vectors: a brute-force scan of 50,000 x 768 floats
   takes a few milliseconds per query on one core, and recall is 1.
2. ``IVF{nlist},Flat``: inverted lists of raw vectors; only the lists nearest the query are scanned, distances stay
   exact, and the recall lost is only the neighbours outside the probed lists.
3. ``IVF{nlist},SQ8``: the same lists with 1 byte per dimension (4x smaller; the quantisation error of 8-bit
   scalars is far below the distance gaps between neighbours of real embeddings).
4. ``PCA{2m},IVF{nlist},PQ{m}x8``: product quantisation of each vector's residual from its list's centroid, in 2-d
   sub-vectors of 8 bits (4 bits a dimension), in a principal-component basis, keeping the ``2m`` strongest directions
   that the budget pays for, with each code chosen under the error that the scores will see
   (:func:`search.build.train_weighted_residual_pq`): an inner-product score is off by ``<q, e>`` for a coding error
   ``e``, so the error in direction ``i`` is weighted by the queries' second moment there (to the power 0.75), and the
   directions are dealt to the sub-quantizers to even out their weighted variance (each in turn, strongest first, to
   the sub-quantizer with the least so far, which pairs the strongest with the weakest). For cosine and inner product,
   each vector's codes also cancel their error along the vector itself, the score error of the queries nearest it
   (:func:`search.build.anisotropic_codes`). Chosen while ``m`` is at least a quarter of ``dim`` (at least half the
   directions kept). Measured step by step (benchmarks/index.py, recall@10 against exact search at one eighth of the
   raw size): residual codes instead of whole-vector codes, the balanced principal basis and 2-d sub-quantizers raised
   recall from 0.80 (the re-ranked PQ of rule 5) to 0.94 on 100,000 clustered 768-d vectors, 0.90 on a million with
   4,096 lists; the weighted codes raise the million to 0.938, the codes cancelling their error along the vector to
   0.943, 2,048 lists, whose centroids leave the bytes for 732 directions instead of 720, to 0.947, and codebooks
   trained from a grid start instead of random points, with the weights flattened to the second moment's 0.75 power,
   to 0.952 (README, "From embeddings to search", for the steps and figures): the residual from the list's centroid
   carries only the spread within a cluster, and the weights spend the bits where scores are sensitive. What is left
   is shared between the codes and the directions dropped: exact search in the 720 kept directions alone reaches
   recall@10 0.973 on that million (the 48 weakest directions carry under 1 % of the variance, but neighbours' scores
   differ by about 0.0006 at rank 10). Keeping all 768 directions in zero-padded 3-d sub-quantizers (352 bytes, to
   stay within the budget) did worse on 200,000 vectors (0.956 against 0.960).
5. ``IVF{nlist},PQ{m}x{bits}``: for smaller budgets, product quantisation: ``m`` sub-vectors coded in 8 bits each
   (one byte), the largest ``m`` that divides ``dim`` and fits the budget, with a re-ranking stage (``Refine``) when
   the budget leaves room for one: the inverted lists find candidates with coarse codes and the finer codes re-rank
   them.

``nlist`` is about sqrt(count) rounded to a power of two (1,024 lists for a million vectors), with at least
:data:`MIN_TRAIN_PER_LIST` training points per list. FAISS's guideline for very large collections is 4-16 x sqrt(n);
at the sizes these jobs produce (up to tens of millions) fewer, larger lists reach a recall target with fewer probes,
and k-means training, which costs nlist x training points x dim, stays a small part of the build (training on
:data:`MAX_TRAIN_PER_LIST` points per list, as FAISS does by default with 256, would dominate it). Rule 4 is the
exception: its codes are residuals from the list's centroid, which finer lists shrink, so it takes 2 x sqrt(count)
lists (2,048 for a million) trained on :data:`RESIDUAL_TRAIN_PER_LIST` points each; on a million clustered vectors
with the same 360-byte codes, 2,048 lists reached recall@10 0.898 where 1,024 reached 0.869 and 4,096 0.899. More
lists than that cost codes: the centroids (kept x 4 bytes each) come out of the same budget, and 2,048 lists leave
room for 366-byte codes of 732 directions where 4,096 left 360 bytes of 720 (recall@10 0.947 against 0.943 in
benchmarks.index, with the weighted codes that cancel their error along the vector, before the grid start). ``nprobe``
is not chosen here: the build measures recall on the collection itself and raises ``nprobe`` until the recall target
is met.

Memory is estimated as the serialized index size: codes, 8-byte ids per vector (inverted lists store them), and the
coarse centroids, codebooks and rotation matrix.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

METRICS = ("cosine", "ip", "l2")
FLAT_MAX_VECTORS = 50_000
MIN_TRAIN_PER_LIST = 39  # FAISS warns below 39 training points per centroid
MAX_TRAIN_PER_LIST = 64  # more points per centroid barely moves the centroids and costs training time linearly
# Rule 4 codes residuals, which shrink as lists get finer, but its centroids are paid for with code bytes: 2 x sqrt(n)
# lists (see the module docstring), trained on fewer points per list than the other rules' lists.
RESIDUAL_LISTS_FACTOR = 2
RESIDUAL_TRAIN_PER_LIST = 48
ID_BYTES = 8
DEFAULT_MAX_INDEX_MEMORY = 4 * 1024**3
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


@dataclass(frozen=True)
class IndexSpec:
    """A chosen index: its FAISS factory string, metric and the parameters behind it, with the reasons."""

    factory: str
    metric: str
    dim: int
    count: int
    nlist: int = 0
    pq_m: int = 0
    refine_m: int = 0
    pca_dim: int = 0  # principal directions kept by a balanced PCA rotation before the lists (0: none)
    train_size: int = 0
    estimated_bytes: int = 0
    reason: str = ""

    @property
    def is_ivf(self) -> bool:
        return self.nlist > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_memory(text: str | int) -> int:
    """``"4GiB"`` -> 4294967296, ``"512MB"`` -> 512000000, ``"300000000"`` -> 300000000."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: write e.g. 4GiB, 512MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def choose_nlist(count: int) -> int:
    """About sqrt(count) as a power of two, with at least MIN_TRAIN_PER_LIST vectors per list."""
    target = math.sqrt(count)
    return min(_trainable_lists(count, 2 ** max(4, round(math.log2(max(target, 16))))), 65536)


def residual_lists(count: int) -> int:
    """Lists for rule 4: RESIDUAL_LISTS_FACTOR x :func:`choose_nlist`, fewer while a list would get fewer than
    MIN_TRAIN_PER_LIST vectors."""
    return _trainable_lists(count, choose_nlist(count) * RESIDUAL_LISTS_FACTOR)


def _trainable_lists(count: int, nlist: int) -> int:
    """``nlist`` halved (down to 16) until ``count`` vectors give each list MIN_TRAIN_PER_LIST to train on."""
    while nlist > 16 and count < MIN_TRAIN_PER_LIST * nlist:
        nlist //= 2
    return nlist


def largest_train_size(count: int) -> int:
    """The most training vectors any rule asks for ``count`` vectors: what a build must sample before choosing."""
    return min(count, max(MAX_TRAIN_PER_LIST * choose_nlist(count), RESIDUAL_TRAIN_PER_LIST * residual_lists(count),
                          MIN_TRAIN_PER_LIST * 256))


def _pq_sizes(dim: int) -> list[int]:
    """Sub-quantizer counts FAISS supports for ``dim``: divisors of ``dim`` with at least 2 dimensions each."""
    return [m for m in range(1, dim // 2 + 1) if dim % m == 0]


def choose_index(count: int, dim: int, max_memory_bytes: int = DEFAULT_MAX_INDEX_MEMORY, metric: str = "cosine") -> IndexSpec:
    """The most exact index of ``count`` x ``dim`` vectors whose estimated size fits ``max_memory_bytes``.

    Raises ValueError when even the smallest product-quantised index does not fit, naming the minimum budget.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if count < 1 or dim < 1:
        raise ValueError(f"cannot build an index of {count} vectors of width {dim}")
    raw = count * dim * 4
    if count <= FLAT_MAX_VECTORS and raw <= max_memory_bytes:
        return IndexSpec("Flat", metric, dim, count, estimated_bytes=raw,
                         reason=f"{count} <= {FLAT_MAX_VECTORS} vectors fit raw in the budget: exact search")
    if count < MIN_TRAIN_PER_LIST * 16:
        raise ValueError(
            f"{count} vectors x {dim} floats ({raw} bytes) exceed --max-index-memory {max_memory_bytes}, and too few "
            f"vectors to train a compressed index: raise --max-index-memory to at least {raw}"
        )
    nlist = choose_nlist(count)
    # Product-quantiser codebooks have 256 centroids per sub-quantizer and want 39 points each, whatever nlist is.
    train_size = min(count, max(MAX_TRAIN_PER_LIST * nlist, MIN_TRAIN_PER_LIST * 256))
    fixed = nlist * dim * 4  # coarse centroids
    per_vector = (max_memory_bytes - fixed) / count - ID_BYTES

    def spec(factory: str, code_bytes: float, reason: str, **extra: int) -> IndexSpec:
        estimate = int(fixed + count * (code_bytes + ID_BYTES) + extra.pop("codebooks", 0))
        return IndexSpec(factory, metric, dim, count, nlist=nlist, train_size=train_size,
                         estimated_bytes=estimate, reason=reason, **extra)

    if per_vector >= dim * 4:
        return spec(f"IVF{nlist},Flat", dim * 4, "raw vectors fit the budget: inverted lists with exact distances")
    if per_vector >= dim:
        return spec(f"IVF{nlist},SQ8", dim, "8-bit scalar codes (1/4 of raw) fit the budget")
    # Residual PQ of 2-d sub-vectors in a balanced principal basis: m bytes of codes keep 2m directions.
    residual_nlist = residual_lists(count)
    balanced_m = min(dim // 2, math.floor(max_memory_bytes / count - ID_BYTES))
    while balanced_m >= max(1, dim // 4):
        kept = 2 * balanced_m
        # The coarse centroids (kept wide), the rotation (kept x dim, with its mean and eigenvalues), the codebooks
        # (256 x kept), list sizes.
        extras = residual_nlist * kept * 4 + kept * dim * 4 + 2 * dim * 4 + kept * 256 * 4 + residual_nlist * 16
        estimate = count * (balanced_m + ID_BYTES) + extras
        if estimate <= max_memory_bytes:
            return IndexSpec(
                f"PCA{kept},IVF{residual_nlist},PQ{balanced_m}x8", metric, dim, count, nlist=residual_nlist,
                pq_m=balanced_m, pca_dim=kept, estimated_bytes=estimate,
                train_size=min(count, max(RESIDUAL_TRAIN_PER_LIST * residual_nlist, MIN_TRAIN_PER_LIST * 256)),
                reason=(
                    f"residual product quantisation: {balanced_m}-byte codes of the {kept} strongest principal "
                    f"directions ({'all' if kept == dim else f'of {dim}'}), chosen under the error the scores see"
                    + ("" if metric == "l2" else ", cancelling each vector's error along itself")
                ),
            )
        balanced_m -= 1
    # Product quantisation. With room for two codes, a coarse PQ finds candidates in the inverted lists and a finer
    # PQ of the whole vector (m2 bytes) re-ranks them; the coarse code takes about a quarter of the bytes.
    sizes = _pq_sizes(dim)
    codebooks = dim * 256 * 4  # float32 centroids: 256 per sub-quantiser, dim floats in all, whatever m is
    for refine_m in reversed(sizes):
        coarse = [m for m in sizes if m <= refine_m // 3]
        if not coarse or refine_m < 64:
            continue
        pq_m = coarse[-1]
        if pq_m + refine_m + 2 * dim * 256 * 4 / count <= per_vector:
            return spec(f"IVF{nlist},PQ{pq_m}x8,Refine(PQ{refine_m}x8)", pq_m + refine_m,
                        f"product quantisation: {pq_m}-byte codes probed, re-ranked by {refine_m}-byte codes",
                        pq_m=pq_m, refine_m=refine_m, codebooks=2 * codebooks)
    for pq_m in reversed(sizes):
        if pq_m + dim * 256 * 4 / count <= per_vector:
            return spec(f"IVF{nlist},PQ{pq_m}x8", pq_m, f"product quantisation: {pq_m}-byte codes",
                        pq_m=pq_m, codebooks=codebooks)
    smallest = int(fixed + count * (sizes[0] + ID_BYTES) + dim * 256 * 4) + 1
    raise ValueError(
        f"--max-index-memory {max_memory_bytes} bytes cannot hold {count} vectors of width {dim} even as "
        f"{sizes[0]}-byte product-quantised codes: raise it to at least {smallest} bytes"
    )
