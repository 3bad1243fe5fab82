"""The search package without Ray or a model: index choice, build, store, queries and dedup on synthetic vectors.

Input files are written with the sink's own table builder and the job's fingerprint metadata, so they are what the
embed job writes. The builds run their per-file tasks in a plain loop (``local_mapper``); the Ray path and the real
job's output are covered in test_search_jobs.py.
"""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.index import clustered_vectors
from search import build, dedup, query, store
from search.choice import FLAT_MAX_VECTORS, choose_index, largest_train_size, parse_memory
from search.errors import (
    EmbeddingInputError,
    FingerprintMismatchError,
    IndexStoreError,
    SearchError,
)
from search.runner import IndexJobConfig, build_index, local_mapper
from tests.search_helpers import fingerprint, write_job_file

DIM = 48


def write_collection(folder, vectors: np.ndarray, files: int = 3, error_every: int = 9) -> list[str]:
    """Split ``vectors`` over ``files`` job files with an error row every ``error_every`` rows; return the indexed
    keys in id order (file order, then row order, error rows left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    indexed = []
    for number, part in enumerate(np.array_split(np.arange(len(vectors)), files)):
        keys = [f"f{number}/k{row:05d}" for row in part]
        errors = ["decode error: truncated JPEG" if row % error_every == error_every - 1 else None for row in part]
        write_job_file(folder / f"part-{number:03d}-00000.parquet", vectors[part], keys, errors=errors,
                       source=f"s3://in/{number}.tar")
        indexed.extend(key for key, error in zip(keys, errors) if error is None)
    (folder / "_job.json").write_text("{}")  # bookkeeping beside the data: not Parquet, not read
    return indexed


def test_choice_goes_from_exact_to_compressed_as_the_budget_shrinks() -> None:
    small = choose_index(10_000, 768, 1 << 30)
    assert small.factory == "Flat" and small.estimated_bytes == 10_000 * 768 * 4
    raw = 1_000_000 * 768 * 4
    roomy = choose_index(1_000_000, 768, raw * 2)
    assert roomy.factory.startswith("IVF") and roomy.factory.endswith(",Flat")
    quarter = choose_index(1_000_000, 768, raw // 3)
    assert quarter.factory.endswith(",SQ8")
    eighth = choose_index(1_000_000, 768, raw // 8)
    assert "PQ" in eighth.factory and eighth.estimated_bytes <= raw // 8
    for spec in (roomy, quarter):
        assert 39 * spec.nlist <= spec.train_size <= max(64 * spec.nlist, 39 * 256) and spec.nlist == 1024
    assert eighth.nlist == 2048 and 39 * 2048 <= eighth.train_size <= largest_train_size(1_000_000)  # finer lists
    assert choose_index(FLAT_MAX_VECTORS + 1, 768, 1 << 40).factory != "Flat"  # exact only for small collections
    with pytest.raises(ValueError, match="at least"):
        choose_index(1_000_000, 768, 10_000_000)
    assert parse_memory("4GiB") == 4 * 1024**3 and parse_memory("512MB") == 512_000_000 and parse_memory("77") == 77
    with pytest.raises(ValueError, match="memory size"):
        parse_memory("lots")


def test_built_index_measures_recall_maps_ids_and_finds_each_vector_itself(tmp_path) -> None:
    vectors = clustered_vectors(6000, DIM, clusters=40, seed=1)
    indexed = write_collection(tmp_path / "emb", vectors)
    # A budget below the raw size forces a trained, compressed index (inverted lists of 8-bit codes).
    config = IndexJobConfig(input=str(tmp_path / "emb"), output=str(tmp_path / "index"),
                            max_index_memory=6000 * DIM * 3, recall_queries=200)
    record = build_index(config, mapper=local_mapper)

    assert record["index"]["factory"].endswith("SQ8") and record["index"]["nprobe"] >= 1
    assert record["input"]["vectors"] == len(indexed) and record["input"]["skipped_rows"] == 6000 - len(indexed)
    assert record["fingerprint"]["weights_sha256"] == "a" * 64
    assert record["recall"]["recall_at_k"] >= 0.95
    stored = store.load_index(str(tmp_path / "index"))
    assert stored.ids.column("key").to_pylist() == indexed
    _, ids = zip(*query.ids_for_keys(stored, indexed))
    assert list(ids) == list(range(len(indexed)))
    own = query.vectors_for_ids(stored, list(ids))
    scores, found = query.search_vectors(stored, own, 1)
    assert (found[:, 0] == np.arange(len(indexed))).mean() >= 0.999
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=0.05)  # a cosine through 8-bit codes
    # The recorded recall is the truth: recompute it with brute force over the whole collection.
    prepared = build.prepare(own, "cosine")
    queries = prepared[:100]
    exact = faiss.IndexFlatIP(DIM)
    exact.add(prepared)
    _, truth = exact.search(queries, 11)
    _, approx = stored.index.search(queries, 11)
    assert abs(build.recall_at_k(approx, truth, 10, np.arange(100)) - record["recall"]["recall_at_k"]) < 0.05


def test_partial_ground_truths_merge_into_the_exact_top_k() -> None:
    vectors = build.prepare(clustered_vectors(900, DIM, clusters=5, seed=2), "cosine")
    queries = vectors[:20]
    parts = [build.exact_top_k(queries, vectors[start:start + 300], start, 10, "cosine") for start in (0, 300, 600)]
    scores, ids = build.merge_top_k(parts, 10, "cosine")
    exact_scores, exact_ids = build.exact_top_k(queries, vectors, 0, 10, "cosine")
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-6)


def test_a_reader_never_sees_a_half_written_index(tmp_path, monkeypatch) -> None:
    first = tmp_path / "first"
    write_collection(first, clustered_vectors(300, DIM, seed=3), files=1)
    output = str(tmp_path / "index")
    with pytest.raises(IndexStoreError, match="no index at"):
        store.load_index(output)
    build_index(IndexJobConfig(input=str(first), output=output, recall_queries=20), mapper=local_mapper)
    before = store.load_index(output)

    second = tmp_path / "second"
    write_collection(second, clustered_vectors(500, DIM, seed=4), files=1)
    real_write = store.write_bytes

    def crash_on_id_map(uri: str, data: bytes, options=None) -> None:
        if uri.endswith(store.IDS_FILE):
            raise OSError("simulated crash while writing the id map")
        real_write(uri, data, options)

    monkeypatch.setattr(store, "write_bytes", crash_on_id_map)
    with pytest.raises(OSError, match="simulated"):
        build_index(IndexJobConfig(input=str(second), output=output, recall_queries=20), mapper=local_mapper)
    after_crash = store.load_index(output)
    assert after_crash.metadata["build"] == before.metadata["build"]
    assert after_crash.index.ntotal == before.index.ntotal == after_crash.ids.num_rows

    monkeypatch.setattr(store, "write_bytes", real_write)
    build_index(IndexJobConfig(input=str(second), output=output, recall_queries=20), mapper=local_mapper)
    rebuilt = store.load_index(output)
    assert rebuilt.index.ntotal == len(rebuilt.ids) and rebuilt.metadata["input"]["uri"] == str(second)
    builds = sorted(path.name for path in (tmp_path / "index").iterdir() if path.name.startswith("build-"))
    # The crashed build's folder is gone; the current one and the one before it remain.
    assert builds == sorted([rebuilt.metadata["build"], before.metadata["build"]])


def test_empty_or_all_error_input_is_refused_with_a_clear_message(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_text("")
    with pytest.raises(EmbeddingInputError, match="no Parquet data files under"):
        build_index(IndexJobConfig(input=str(empty), output=str(tmp_path / "i1")), mapper=local_mapper)

    failed = tmp_path / "failed"
    failed.mkdir()
    write_job_file(failed / "part-a-00000.parquet", np.zeros((4, DIM)), [f"k{i}" for i in range(4)],
                   errors=["decode error: not an image"] * 4)
    with pytest.raises(EmbeddingInputError, match="all 4 rows .* are error rows"):
        build_index(IndexJobConfig(input=str(failed), output=str(tmp_path / "i2")), mapper=local_mapper)

    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    write_job_file(no_rows / "part-a-00000.parquet", np.zeros((0, DIM)), [])
    with pytest.raises(EmbeddingInputError, match="has no rows"):
        build_index(IndexJobConfig(input=str(no_rows), output=str(tmp_path / "i3")), mapper=local_mapper)
    assert not (tmp_path / "i2").exists() and not (tmp_path / "i3").exists()


def test_files_of_different_models_are_not_mixed(tmp_path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_job_file(folder / "part-a-00000.parquet", np.ones((3, DIM)), ["a", "b", "c"])
    write_job_file(folder / "part-b-00000.parquet", np.ones((3, DIM)), ["d", "e", "f"], job=fingerprint(sha="b" * 64))
    with pytest.raises(EmbeddingInputError, match="weights_sha256"):
        build_index(IndexJobConfig(input=str(folder), output=str(tmp_path / "index")), mapper=local_mapper)


def test_queries_by_key_and_by_embeddings_file_and_mismatches(tmp_path) -> None:
    vectors = clustered_vectors(400, DIM, clusters=8, seed=5)
    indexed = write_collection(tmp_path / "emb", vectors, files=2)
    build_index(IndexJobConfig(input=str(tmp_path / "emb"), output=str(tmp_path / "index"), recall_queries=20),
                mapper=local_mapper)
    stored = store.load_index(str(tmp_path / "index"))

    with pytest.raises(SearchError, match="'nope'.* not in the index"):
        query.ids_for_keys(stored, [indexed[0], "nope"])

    # A Parquet of embeddings with the index's fingerprint: names from its key column, error rows skipped.
    queries_file = tmp_path / "queries.parquet"
    write_job_file(queries_file, vectors[:3], ["q0", "q1", "q2"], errors=[None, "bad", None])
    names, found_vectors = query.read_query_embeddings(str(queries_file), stored)
    assert names == ["q0", "q2"]
    scores, ids = query.search_vectors(stored, found_vectors, 5)
    table = query.results_table(names, scores, ids, stored)
    assert table.column_names == ["query", "rank", "key", "source", "score"]
    assert table.num_rows == 10 and table.column("rank").to_pylist()[:5] == [1, 2, 3, 4, 5]
    assert table.column("key").to_pylist()[0] == indexed[0] and table.column("key").to_pylist()[5] == indexed[2]
    assert "query: q0" in query.format_table(table)

    other = tmp_path / "other.parquet"
    write_job_file(other, vectors[:2], ["x", "y"], job=fingerprint(crop=96))
    with pytest.raises(FingerprintMismatchError, match="preprocessing"):
        query.read_query_embeddings(str(other), stored)
    with pytest.raises(FingerprintMismatchError, match="width"):
        query.search_vectors(stored, np.ones((1, DIM + 1), np.float32), 3)


@pytest.mark.parametrize(("budget", "recipe"), [(3000 * DIM * 3, ",SQ8"), (174_000, "PCA48,IVF64,PQ24x8")])
def test_dedup_groups_planted_near_duplicates_and_nothing_else(tmp_path, budget: int, recipe: str) -> None:
    rng = np.random.default_rng(6)
    base = clustered_vectors(3000, DIM, clusters=30, seed=6)
    planted = {10: [2500, 2501], 700: [2999], 1400: [1900]}
    for original, copies in planted.items():
        for copy in copies:
            noisy = base[original] + rng.normal(0, 0.01, DIM).astype(np.float32)
            base[copy] = noisy / np.linalg.norm(noisy)
    folder = tmp_path / "emb"
    folder.mkdir()
    write_job_file(folder / "part-a-00000.parquet", base, [f"k{i}" for i in range(len(base))])
    # A compressed index: candidates come from approximate scores, membership from exact ones.
    build_index(IndexJobConfig(input=str(folder), output=str(tmp_path / "index"), max_index_memory=budget,
                               recall_queries=50), mapper=local_mapper)
    stored = store.load_index(str(tmp_path / "index"))
    assert recipe in stored.metadata["index"]["factory"]  # 8-bit codes, or residual PQ codes behind a rotation
    table = dedup.near_duplicate_groups(stored, 0.97)
    groups: dict[int, list[str]] = {}
    for row in table.to_pylist():
        groups.setdefault(row["group"], []).append(row["key"])
        assert row["score"] >= 0.97
    assert sorted(sorted(keys) for keys in groups.values()) == sorted(
        sorted(f"k{i}" for i in [original, *copies]) for original, copies in planted.items()
    )
    first_rows = {row["group"]: row for row in reversed(table.to_pylist())}
    assert all(abs(row["score"] - 1.0) < 1e-5 for row in first_rows.values())  # the representative comes first
    target = store.parquet_target(str(tmp_path / "dups"), "duplicates.parquet")
    store.write_parquet(table, target)
    assert pq.read_table(target).column_names == ["key", "source", "group", "score"]
    assert json.loads((tmp_path / "index" / "_index.json").read_text())["index"]["metric"] == "cosine"


def test_a_refined_product_quantised_index_trains_merges_in_id_order_and_finds_indexed_vectors() -> None:
    """The recipe chosen at one eighth of the raw size: coarse PQ codes probed, finer PQ codes re-ranking. Its
    refining codebooks are trained per sub-quantizer (build.train_product_quantizer), and its two stages are merged
    separately; an indexed vector must come back as its own nearest neighbour with the right id."""
    from search.choice import IndexSpec

    vectors = build.prepare(clustered_vectors(3000, 64, clusters=20, seed=3), "cosine")
    spec = IndexSpec("IVF16,PQ8x8,Refine(PQ32x8)", "cosine", 64, len(vectors), nlist=16, pq_m=8, refine_m=32,
                     train_size=len(vectors))
    trained = build.train(spec, vectors, seed=5)
    assert trained.is_trained
    # No polysemous training (15 s here, for a codebook order that no search of ours uses).
    assert not faiss.downcast_index(faiss.extract_index_ivf(trained)).do_polysemous_training
    refine = faiss.downcast_index(faiss.downcast_index(trained).refine_index)
    codes = refine.pq.compute_codes(vectors[:200])
    error = float(((refine.pq.decode(codes) - vectors[:200]) ** 2).sum(axis=1).mean())
    assert error < 0.1, error  # trained codebooks: far below the squared norm (1) of an untrained reconstruction

    serialized = build.serialize(trained)
    index = build.merge(build.add_part(serialized, vectors[start:start + 1000], start) for start in (0, 1000, 2000))
    assert index.ntotal == len(vectors)
    build.set_search_params(index, nprobe=16, k_factor=8)
    queries = vectors[::97]
    _, found = index.search(queries, 10)  # k_factor x k coarse candidates are re-ranked: k = 10 as searches use
    # Refining codes stored out of id order would put unrelated vectors first: self-matches would fall to chance.
    assert (found[:, 0] == np.arange(0, len(vectors), 97)).mean() >= 0.9
    _, exact = build.exact_top_k(queries, vectors, 0, 3, "cosine")
    assert all(found[row, 0] in exact[row] for row in range(len(queries)))  # the rest: near-ties of compressed codes


def test_recall_counts_at_most_k_returned_ids() -> None:
    truth = np.array([[1, 2]])
    assert build.recall_at_k(np.array([[9, 1, 2]]), truth, k=2) == 0.5  # the third id is not a guess at k=2
    assert build.recall_at_k(np.array([[7, 1, 2]]), truth, k=2, exclude=np.array([7])) == 1.0


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_weighted_residual_pq_index_keeps_scores_finds_indexed_vectors_and_merges(metric: str) -> None:
    """The recipe chosen at one eighth of the raw size (search.choice rule 4): a principal rotation without bias,
    residual PQ codes of 2-d sub-vectors chosen under weighted error. Parts merge in any order with their ids into a
    plain FAISS index; an indexed vector comes back as its own nearest neighbour; scores approximate the exact ones
    (no mean shift from the rotation); range search and reconstruction, which dedup and key queries use, work
    through the rotation."""
    from search.choice import IndexSpec

    vectors = build.prepare(clustered_vectors(4000, 64, clusters=20, seed=3), metric)
    spec = IndexSpec("PCA56,IVF16,PQ28x8", metric, 64, len(vectors), nlist=16, pq_m=28, pca_dim=56,
                     train_size=len(vectors))
    trained = build.train(spec, vectors, seed=5)
    assert trained.is_trained
    scales = build._coding_scales(trained)
    assert scales is not None and scales.shape == (56,) and scales.min() > 0 and scales.max() > 2 * scales.min()
    rotation = faiss.downcast_VectorTransform(faiss.downcast_index(trained).chain.at(0))
    assert isinstance(rotation, faiss.LinearTransform) and not rotation.have_bias and rotation.is_orthonormal
    rotated = rotation.apply(vectors)
    assert np.var(rotated, axis=0).sum() > 0.97 * np.var(vectors, axis=0).sum()  # the strongest directions kept

    serialized = build.serialize(trained)
    index = build.merge(build.add_part(serialized, vectors[start:start + 1000], start) for start in (3000, 0, 2000, 1000))
    assert index.ntotal == len(vectors)
    assert faiss.downcast_index(index).chain.size() == 1 and build._coding_scales(index) is None  # finished: plain
    build.set_search_params(index, nprobe=16)
    queries = vectors[::97]
    scores, found = index.search(queries, 10)
    assert (found[:, 0] == np.arange(0, len(vectors), 97)).mean() >= 0.9
    exact_scores, exact = build.exact_top_k(queries, vectors, 0, 10, metric)
    assert build.recall_at_k(found, exact, 10) > 0.8
    assert np.abs(scores[:, 0] - exact_scores[:, 0]).max() < 0.05  # a pure projection: no per-vector offset
    lims, range_scores, range_ids = index.range_search(queries[:3], 0.9 if metric == "cosine" else 0.2)
    assert 0 in range_ids[lims[0]:lims[1]]
    reread = faiss.deserialize_index(build.serialize(index))  # stock FAISS reads it, with no help from build
    faiss.extract_index_ivf(reread).nprobe = 16
    np.testing.assert_array_equal(reread.search(queries, 10)[1], found)
    faiss.extract_index_ivf(index).make_direct_map()
    assert np.linalg.norm(index.reconstruct(5) - vectors[5]) < 0.3 * np.linalg.norm(vectors[5])


def _rule_4_trained(metric: str) -> tuple[np.ndarray, faiss.Index]:
    """3,000 clustered 32-d vectors (prepared for ``metric``) and a rule-4 index trained on them: all 32 directions
    kept in 16 sub-quantizers, 8 lists."""
    from search.choice import IndexSpec

    vectors = build.prepare(clustered_vectors(3000, 32, clusters=12, seed=6), metric)
    spec = IndexSpec("PCA32,IVF8,PQ16x8", metric, 32, len(vectors), nlist=8, pq_m=16, pca_dim=32,
                     train_size=len(vectors))
    return vectors, build.train(spec, vectors, seed=2)


def _rule_4_codes(metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small rule-4 index of 3,000 vectors: (rotated vectors, their stored codes' reconstructions,
    their residuals from their list's centroid, the error weights, the codebooks); residuals and reconstructions
    as rows x 16 sub-quantizers x 2, for the first 300 vectors."""
    vectors, trained = _rule_4_trained(metric)
    weights = build._coding_scales(trained) ** 2
    index = build.merge([build.add_part(build.serialize(trained), vectors, 0)])
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.make_direct_map()
    rotation = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    rotated = rotation.apply(vectors[:300])
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    lists = build._nearest_centroids(centroids, rotated, ivf.metric_type)
    residuals = (rotated - centroids[lists]).reshape(300, 16, 2)
    decoded = (np.stack([ivf.reconstruct(row) for row in range(300)]) - centroids[lists]).reshape(300, 16, 2)
    return rotated, decoded, residuals, weights, faiss.vector_to_array(ivf.pq.centroids).reshape(16, 256, 2)


def test_each_l2_code_minimises_the_weighted_error_of_its_sub_vector() -> None:
    """What rule 4's weighting changes: every stored code is the codebook entry nearest its residual sub-vector under
    the error weights (the scales squared), not under plain squared error, and the two choices differ often."""
    _, decoded, residuals, weights, codebooks = _rule_4_codes("l2")
    squared = (residuals[:, :, None, :] - codebooks[None]) ** 2  # (rows, sub-quantizer, entry, 2)
    chosen = np.argmin(np.abs(decoded[:, :, None, :] - codebooks[None]).sum(-1), axis=2)
    weighted = np.argmin((squared * weights.reshape(16, 1, 2)).sum(-1), axis=2)
    plain = np.argmin(squared.sum(-1), axis=2)
    np.testing.assert_array_equal(chosen, weighted)
    assert (chosen != plain).mean() > 0.05


def test_cosine_codes_cancel_their_error_along_their_own_vector() -> None:
    """For cosine (and ip) the codes also weigh the error along the vector itself, the score error of the queries
    closest to it: against each sub-vector's weighted-nearest code, |<x, e>| falls to under half (0.40 here, 0.31
    before the weights were flattened to the second moment's 0.75 power) while the weighted error grows little."""
    rotated, decoded, residuals, weights, codebooks = _rule_4_codes("cosine")
    squared = ((residuals[:, :, None, :] - codebooks[None]) ** 2 * weights.reshape(16, 1, 2)).sum(-1)
    nearest = codebooks[np.arange(16)[None, :], np.argmin(squared, axis=2)]  # (rows, sub-quantizer, 2)
    stored_error = (residuals - decoded).reshape(300, 32)
    nearest_error = (residuals - nearest).reshape(300, 32)
    along_stored = np.abs(np.einsum("rd,rd->r", rotated, stored_error)).mean()
    along_nearest = np.abs(np.einsum("rd,rd->r", rotated, nearest_error)).mean()
    assert along_stored < 0.5 * along_nearest
    weighted_stored = (stored_error ** 2 * weights).sum()
    weighted_nearest = (nearest_error ** 2 * weights).sum()
    assert weighted_nearest <= weighted_stored < 1.5 * weighted_nearest


def test_anisotropic_codes_start_from_the_nearest_and_never_raise_the_loss() -> None:
    rng = np.random.default_rng(4)
    codebooks = rng.normal(size=(6, 256, 2)).astype(np.float32)
    residuals = rng.normal(size=(500, 12)).astype(np.float32)
    along = rng.normal(size=(500, 12)).astype(np.float32)
    nearest = np.stack([np.argmin(((residuals[:, None, 2 * part:2 * part + 2] - codebooks[part][None]) ** 2).sum(-1),
                                  axis=1) for part in range(6)], axis=1).astype(np.uint8)
    neighbours = build.nearest_codewords(codebooks, 8)
    assert (neighbours[:, :, 0] == np.arange(256)).all()

    def loss(codes: np.ndarray, weight: float) -> np.ndarray:
        error = residuals - codebooks[np.arange(6)[None, :], codes.astype(np.int64)].reshape(500, 12)
        return (error ** 2).sum(1) + weight * np.einsum("rd,rd->r", along, error) ** 2

    np.testing.assert_array_equal(build.anisotropic_codes(codebooks, residuals, along, nearest, neighbours, 0.0),
                                  nearest)
    chosen = build.anisotropic_codes(codebooks, residuals, along, nearest, neighbours, 10.0)
    assert (loss(chosen, 10.0) <= loss(nearest, 10.0) + 1e-4).all()
    assert loss(chosen, 10.0).mean() < 0.5 * loss(nearest, 10.0).mean()


def test_a_grid_start_codes_a_strong_direction_paired_with_a_weak_one_more_finely_than_a_random_start() -> None:
    """Rule 4's sub-quantizers pair a strong direction with a weak one. Its k-means starts from a grid whose bits go
    to the dimension with the largest spread per level, levels at the quantiles of a sqrt(3)-wider Gaussian: after
    its 10 iterations the codebook's error on held-out points is well under that of FAISS's random start after 25."""
    rng = np.random.default_rng(0)
    points = (rng.standard_normal((40_000, 2)) * [30.0, 1.0] + [0.5, -0.2]).astype(np.float32)
    start = build.grid_codebook(points, 256)
    assert start.shape == (256, 2)
    with pytest.raises(ValueError, match="power of two"):
        build.grid_codebook(points, 48)
    assert [len(np.unique(start[:, axis])) for axis in range(2)] == [64, 4]
    np.testing.assert_allclose(start.mean(axis=0), points.mean(axis=0), atol=1e-4)  # levels symmetric about the mean
    widest = points[:, 0].mean() + math.sqrt(3) * points[:, 0].std() * NormalDist().inv_cdf(63.5 / 64)
    assert start[:, 0].max() == pytest.approx(widest, rel=1e-5)
    training, held_out = points[:20_000], points[20_000:]
    errors = {}
    for grid_start in (False, True):
        product = faiss.IndexPQ(2, 1, 8)
        build.train_product_quantizer(product, training, seed=0, grid_start=grid_start)
        errors[grid_start] = ((held_out - product.sa_decode(product.sa_encode(held_out))) ** 2).sum(axis=1).mean()
    assert errors[True] < 0.8 * errors[False]


def test_cosine_rule_4_weighs_the_second_moment_to_its_power_and_starts_every_codebook_from_the_grid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starts: list[tuple[int, ...]] = []
    grid_codebook = build.grid_codebook

    def recording_grid_codebook(points: np.ndarray, size: int) -> np.ndarray:
        starts.append(points.shape)
        return grid_codebook(points, size)

    monkeypatch.setattr(build, "grid_codebook", recording_grid_codebook)
    vectors, trained = _rule_4_trained("cosine")
    assert starts == [(3000, 2)] * 16
    rotated = faiss.downcast_VectorTransform(faiss.downcast_index(trained).chain.at(0)).apply(vectors)
    moment = (rotated ** 2).mean(axis=0) ** build.SECOND_MOMENT_POWER
    np.testing.assert_allclose(build._coding_scales(trained) ** 2, moment / moment.mean(), rtol=1e-3)


def test_balanced_bins_pair_the_strongest_direction_with_the_weakest() -> None:
    order = build.balanced_bins(np.array([1.0, 8.0, 2.0, 4.0, 0.5, 16.0]), 3)
    assert [sorted(order[bin_ * 2:bin_ * 2 + 2].tolist()) for bin_ in range(3)] == [[4, 5], [0, 1], [2, 3]]


def test_one_eighth_of_a_million_vectors_chooses_balanced_residual_pq_within_the_budget() -> None:
    raw = 1_000_000 * 768 * 4
    spec = choose_index(1_000_000, 768, raw // 8)
    assert spec.factory == f"PCA{spec.pca_dim},IVF{spec.nlist},PQ{spec.pq_m}x8" and spec.pca_dim == 2 * spec.pq_m
    assert spec.pca_dim >= 700 and spec.estimated_bytes <= raw // 8
    assert choose_index(1_000_000, 768, raw // 20).pca_dim == 0  # too few bytes to keep half the directions


def test_a_chosen_rule_4_index_is_no_larger_than_its_estimate() -> None:
    """The estimate decides how many directions fit the budget, so the index written must not exceed it."""
    vectors = build.prepare(clustered_vectors(8000, 64, clusters=20, seed=4), "cosine")
    budget = vectors.nbytes // 8
    spec = choose_index(len(vectors), 64, budget)
    assert spec.pca_dim
    trained = build.serialize(build.train(spec, vectors[:spec.train_size], seed=1))
    index = build.merge([build.add_part(trained, vectors, 0)])
    assert build.serialize(index).nbytes <= spec.estimated_bytes <= budget


def test_nprobe_tuning_stops_once_recall_stops_rising(caplog: pytest.LogCaptureFixture) -> None:
    """Codes too coarse for the target: recall plateaus after a few probes, and the tuning stops two doublings later
    instead of probing every list (minutes at a million vectors), keeping the smallest nprobe of the best recall."""
    vectors = build.prepare(clustered_vectors(6000, 64, clusters=8, seed=4), "cosine")
    index = faiss.index_factory(64, "IVF128,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    queries = vectors[:200]
    _, truth = build.exact_top_k(queries, vectors, 0, 11, "cosine")
    with caplog.at_level("INFO", logger="search.build"):
        nprobe, recall = build.tune_nprobe(index, queries, truth, np.arange(200))
    probed = [int(record.getMessage().split()[1].rstrip(":")) for record in caplog.records
              if record.getMessage().startswith("nprobe ")]
    assert recall < build.RECALL_TARGET and probed[-1] < 128 and probed == [2**i for i in range(len(probed))]
    assert faiss.extract_index_ivf(index).nprobe == nprobe and nprobe in probed


def test_an_l2_residual_pq_index_is_read_without_a_lookup_table_over_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAISS would precompute nlist x m x ksub floats when it reads an L2 IVF-PQ index (1.5 GB for a million vectors
    at one eighth of raw): past the cap the table is skipped, and the results are the same."""
    vectors = clustered_vectors(4000, 32, clusters=10, seed=8)
    index = faiss.index_factory(32, "IVF16,PQ4x4", faiss.METRIC_L2)  # 16 centroids a sub-quantizer: fast to train
    index.train(vectors)
    index.add(vectors)
    serialized = build.serialize(index)

    loaded = build.deserialize(serialized)  # held: the extracted stage below does not own its memory
    with_table = faiss.downcast_index(faiss.extract_index_ivf(loaded))
    assert with_table.precomputed_table.size() == 16 * 4 * 16  # 4 KB: under the cap, kept for speed
    monkeypatch.setattr(build, "PRECOMPUTED_TABLE_MAX_BYTES", 1000)
    loaded_capped = build.deserialize(serialized)
    without = faiss.downcast_index(faiss.extract_index_ivf(loaded_capped))
    assert without.precomputed_table.size() == 0 and without.use_precomputed_table == -1
    with_table.nprobe = without.nprobe = 4
    expected_scores, expected_ids = with_table.search(vectors[:50], 5)
    scores, ids = without.search(vectors[:50], 5)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)


def test_vectors_of_lower_rank_than_the_directions_kept_give_finite_scores() -> None:
    """Directions the sample never moves in get the floor weight, not zero: dividing the scales back out of the
    codebooks must not turn them into NaN or infinity."""
    from search.choice import IndexSpec

    low_rank = np.zeros((3000, 64), dtype=np.float32)  # 24 coordinates always zero: 16 kept directions never move
    low_rank[:, :40] = clustered_vectors(3000, 40, clusters=10, seed=9)
    vectors = build.prepare(low_rank, "cosine")
    spec = IndexSpec("PCA56,IVF16,PQ28x8", "cosine", 64, len(vectors), nlist=16, pq_m=28, pca_dim=56,
                     train_size=len(vectors))
    trained = build.train(spec, vectors, seed=3)
    assert build._coding_scales(trained).min() > 0
    index = build.merge([build.add_part(build.serialize(trained), vectors, 0)])
    build.set_search_params(index, nprobe=16)
    scores, found = index.search(vectors[:50], 5)
    assert np.isfinite(scores).all() and (found[:, 0] == np.arange(50)).mean() >= 0.9
