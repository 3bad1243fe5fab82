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
import itertools
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
        block = centres[members] + spread * draw.standard_normal(size=(size, dim), dtype=np.float32) * spectrum
        block = block @ basis
        out[start:start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def cpu_capabilities() -> dict[str, Any]:
    """What decides FAISS's speed here: CPU model, cores usable, SIMD levels, FAISS's build, and the load the machine
    was under (figures taken on a shared machine are only comparable within one run)."""
    import faiss

    model, flags = platform.machine(), set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": [name for name in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_vpopcntdq") if name in flags],
        "faiss": f"{faiss.__version__} ({faiss.get_compile_options().strip()})",
        "faiss_threads": faiss.omp_get_max_threads(),
        "load_average": [round(value, 1) for value in os.getloadavg()],
    }


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Brute-force top-k ids (the ground truth), in blocks of the base so memory stays at one block's distances."""
    from search import build

    parts = [build.exact_top_k(queries, base[start:start + 200_000], start, k, metric)
             for start in range(0, len(base), 200_000)]
    return build.merge_top_k(parts, k, metric)[1]


def measure(base: np.ndarray, queries: np.ndarray, *, max_index_memory: int, metric: str = "cosine", parts: int = 8,
            tune_queries: int = 200, single_queries: int = 500, k: int = 10, seed: int = 0) -> dict[str, Any]:
    """Build the index ``jobs.index`` would build for ``base`` (same choice, training, per-part adds and merge), tune
    nprobe on the first ``tune_queries`` queries, then measure on the others: recall@k against exact search, size,
    single-query latency and batch throughput."""
    from search import build
    from search.choice import choose_index

    if metric == "cosine":  # in place: a normalised copy of a million vectors would cost another 3 GB
        import faiss

        faiss.normalize_L2(base)
        faiss.normalize_L2(queries)
    spec = choose_index(len(base), base.shape[1], max_index_memory, metric)
    logger.info("index: %s (%s)", spec.factory, spec.reason)
    rss_before = _peak_rss_bytes()
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = base[np.sort(rng.choice(len(base), size=max(spec.train_size, 1), replace=False))] if spec.train_size else base[:0]
    trained = build.serialize(build.train(spec, sample, seed=seed))
    train_s = time.perf_counter() - started
    bounds = np.linspace(0, len(base), parts + 1).astype(int)
    index = build.merge(build.add_part(trained, base[start:end], int(start)) for start, end in itertools.pairwise(bounds))
    build_s = time.perf_counter() - started
    build_peak = _peak_rss_bytes()

    truth = exact_neighbours(base, queries, k, metric)
    tune, test = slice(0, tune_queries), slice(tune_queries, len(queries))
    no_self = np.full(tune_queries, -1)
    nprobe, tuned_recall = build.tune_nprobe(index, queries[tune], truth[tune], no_self, k=k)
    _, found = index.search(queries[test], k)
    recall = build.recall_at_k(found, truth[test], k)

    latencies = []
    for row in queries[test][:single_queries]:
        began = time.perf_counter()
        index.search(row[None], k)
        latencies.append(time.perf_counter() - began)
    began = time.perf_counter()
    index.search(queries[test], k)
    batch_s = time.perf_counter() - began
    size = int(build.serialize(index).nbytes)
    raw = base.nbytes
    return {
        "vectors": len(base), "dim": base.shape[1], "factory": spec.factory, "nprobe": nprobe,
        "reason": spec.reason, "recall_at_10": round(recall, 4), "recall_at_10_tuning_queries": round(tuned_recall, 4),
        "test_queries": len(queries[test]), "train_s": round(train_s, 2), "build_s": round(build_s, 2),
        "peak_rss_bytes": build_peak, "peak_rss_before_build_bytes": rss_before,
        "index_bytes": size, "raw_float32_bytes": raw, "index_fraction_of_raw": round(size / raw, 4),
        "single_query_ms_p50": round(float(np.percentile(latencies, 50)) * 1000, 3),
        "single_query_ms_p99": round(float(np.percentile(latencies, 99)) * 1000, 3),
        "batch_queries_per_s": round(len(queries[test]) / batch_s, 1),
    }


def report(title: str, result: dict[str, Any]) -> str:
    gib = 1024**3
    return "\n".join([
        title,
        f"  index              {result['factory']}  nprobe {result['nprobe']}  ({result['reason']})",
        (f"  recall@10          {result['recall_at_10']:.4f} on {result['test_queries']} held-out queries vs exact search"
        f" (target >= 0.95)"),
        (f"  index size         {result['index_bytes'] / 1e6:.1f} MB = {result['index_fraction_of_raw']:.4f} of raw"
        f" float32 ({result['raw_float32_bytes'] / 1e6:.0f} MB; target <= 0.125)"),
        f"  build              {result['build_s']:.1f} s (train {result['train_s']:.1f} s)",
        (f"  peak memory        {result['peak_rss_bytes'] / gib:.2f} GiB process RSS"
        f" ({result['peak_rss_before_build_bytes'] / gib:.2f} GiB before the build: the raw vectors)"),
        (f"  single query       p50 {result['single_query_ms_p50']:.2f} ms, p99 {result['single_query_ms_p99']:.2f} ms"
        f" (target p50 < 5 ms)"),
        f"  batch              {result['batch_queries_per_s']:.0f} queries/s",
    ])


def pipeline_embeddings(uri: str) -> np.ndarray:
    """Every embedding of an embed/classify job's output (error rows skipped)."""
    from search import embeddings

    return np.concatenate([embeddings.read_embeddings(file).vectors for file in embeddings.list_data_files(uri)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000, help="synthetic vectors (0: skip)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1200, help="held-out queries (the first 200 tune nprobe)")
    parser.add_argument("--memory-fraction", type=float, default=0.125,
                        help="--max-index-memory as a fraction of the raw float32 size")
    parser.add_argument("--embeddings", default=None, help="output URI of an embed job: measure on its embeddings too")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results: dict[str, Any] = {"cpu": cpu_capabilities()}
    print("CPU:", json.dumps(results["cpu"]))
    if args.vectors:
        started = time.perf_counter()
        base = clustered_vectors(args.vectors, args.dim, seed=0)
        queries = clustered_vectors(args.queries, args.dim, seed=1)
        logger.info("generated %d + %d vectors in %.1f s", len(base), len(queries), time.perf_counter() - started)
        budget = int(base.nbytes * args.memory_fraction)
        results["synthetic"] = measure(base, queries, max_index_memory=budget)
        print(report(f"{args.vectors} synthetic clustered {args.dim}-d vectors, --max-index-memory {budget}",
                     results["synthetic"]))
        del base, queries
    if args.embeddings:
        vectors = pipeline_embeddings(args.embeddings)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(vectors))
        held_out = max(10, len(vectors) // 10)
        queries, base = vectors[order[:held_out]], vectors[order[held_out:]]
        budget = int(base.nbytes * args.memory_fraction)
        tune = min(200, held_out // 2)
        title = (f"{len(base)} pipeline embeddings of width {base.shape[1]} from {args.embeddings}, {held_out} held out "
                 f"as queries, --max-index-memory {budget}")
        from search.choice import choose_index

        try:  # the choice measure() makes, asked first: a budget no index fits is a finding, not a failed run
            choose_index(len(base), base.shape[1], budget, "cosine")
        except ValueError as error:  # e.g. a few thousand vectors: the PQ codebooks alone exceed 1/8 of raw
            results["pipeline"] = {"vectors": len(base), "max_index_memory": budget, "error": str(error)}
            print(f"{title}\n  no index: {error}")
        else:
            results["pipeline"] = measure(base, queries, max_index_memory=budget, tune_queries=tune)
            print(report(title, results["pipeline"]))
    results["cpu_after"] = {"load_average": [round(value, 1) for value in os.getloadavg()]}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
