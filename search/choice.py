"""Which FAISS index for ``count`` vectors of width ``dim`` within a memory budget. Pure: no FAISS, no I/O.

The rule, from exact to most compressed (each step is taken only when the one before does not fit the budget):

1. ``Flat`` (exact search) for up to :data:`FLAT_MAX_VECTORS` vectors: a brute-force scan of 50,000 x 768 floats
   takes a few milliseconds per query on one core, and recall is 1.
2. ``IVF{nlist},Flat``: inverted lists of raw vectors; only the lists nearest the query are scanned, distances stay
   exact, and the recall lost is only the neighbours outside the probed lists.
3. ``IVF{nlist},SQ8``: the same lists with 1 byte per dimension (4x smaller; the quantisation error of 8-bit
   scalars is far below the distance gaps between neighbours of real embeddings).
4. ``IVF{nlist},PQ{m}x{bits}``: product quantisation, ``m`` sub-vectors coded in 8 bits each (one byte), the largest
   ``m`` that divides ``dim`` and fits the budget, with a re-ranking stage (``Refine``) when the budget leaves
   room for one: the inverted lists find candidates with coarse codes and the finer codes re-rank them, which is
   what brings recall@10 from about 0.8 to above 0.95 at one eighth of the raw size (see benchmarks/index.py).

``nlist`` is about sqrt(count) rounded to a power of two (1,024 lists for a million vectors), with at least
:data:`MIN_TRAIN_PER_LIST` training points per list. FAISS's guideline for very large collections is 4-16 x sqrt(n);
at the sizes these jobs produce (up to tens of millions) fewer, larger lists reach a recall target with fewer probes,
and k-means training, which costs nlist x training points x dim, stays a small part of the build (training on
:data:`MAX_TRAIN_PER_LIST` points per list, as FAISS does by default with 256, would dominate it). ``nprobe`` is not chosen here: the build
measures recall on the collection itself and raises ``nprobe`` until the recall target is met.

Memory is estimated as the serialized index size: codes, 8-byte ids per vector (inverted lists store them), and the
coarse centroids and codebooks.
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
    nlist = 2 ** max(4, round(math.log2(max(target, 16))))
    while nlist > 16 and count < MIN_TRAIN_PER_LIST * nlist:
        nlist //= 2
    return min(nlist, 65536)


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
