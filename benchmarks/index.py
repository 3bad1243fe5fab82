"""`python -m benchmarks.index`: the vector index on 1,000,000 synthetic clustered vectors and on real embeddings.

Measures, for the index ``jobs.index`` chooses under a memory budget (default: 1/8 of the raw float32 size):
recall@10 against exact brute-force search, build time (train + add + merge), peak memory of the process, index
size, single-query latency (p50, p99) and batch throughput. The CPU's capabilities are printed beside the figures.

Synthetic data (why not uniform random vectors: real embeddings are clustered and have a fast-decaying spectrum; on
uniform vectors in 768 dimensions every point is about equally far from every other and no index can be both small
and accurate, which says nothing about embeddings): ``clusters`` centres, each vector a centre plus noise, both
drawn with per-direction standard deviations decaying as 1/sqrt(i) in a random orthonormal basis, then L2-normalised.
Queries are drawn from the same distribution and are NOT in the index.

    python -m benchmarks.index --vectors 100000             # iterate
    python -m benchmarks.index --vectors 1000000 --json out.json
    python -m benchmarks.index --embeddings <embed job output> # the pipeline's own embeddings (queries held out)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from typing import Any

import numpy as np

logger = logging.getLogger("benchmarks.index")


def clustered_vectors(
    count: int, dim: int = 768, *, clusters: int = 1000, spread: float = 0.6, seed: int = 0, basis_seed: int = 0
) -> np.ndarray:
    """``count`` L2-normalised float32 vectors from a clustered, anisotropic distribution (see the module docstring).

    ``basis_seed`` fixes the distribution (centres and basis); ``seed`` the draw, so base vectors and held-out
    queries come from one distribution with different seeds.
    """
    structure = np.random.default_rng(basis_seed)
    spectrum = (np.arange(1, dim + 1, dtype=np.float32) ** -0.5).astype(np.float32)
    basis = np.linalg.qr(structure.normal(size=(dim, dim)))[0].astype(np.float32)
    centres = structure.normal(size=(clusters, dim)).astype(np.float32) * spectrum
    draw = np.random.default_rng(seed + 1)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 65536):
        size = min(65536, count - start)
        members = draw.integers(0, clusters, size)
        block = centres[members] + spread * draw.normal(size=(size, dim)).astype(np.float32) * spectrum
        block = block @ basis
        out[start:start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out
