"""The output folder read as it is by the tools users point at it (issue 10, items 1 and 10).

A finished output is built with the real commit path (:func:`pipeline.sink.commit_shard` and
:meth:`pipeline.manifest.OutputState.finish`, so its bookkeeping exists beside it) holding prediction rows and error
rows, then read with DuckDB, pandas, pyarrow, Hugging Face ``datasets``, embedding-reader and FAISS. Readers of the
whole folder must see every input sample exactly once; embedding readers must see exactly the rows with an
embedding, and must not trip on the error rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.manifest import JobFingerprint, OutputState
from pipeline.sink import build_output_table, commit_shard, output_schema

HIDDEN = 8
ID2LABEL = {0: "cat", 1: "dog", 2: "fox"}
SHARDS = {"s0": (7, {2, 5}), "s1": (5, set()), "s2": (3, {0, 1, 2})}  # rows, error ordinals (s2: all failed)


def shard_table(shard_id: str, rows: int, errors: set[int]) -> pa.Table:
    rng = np.random.default_rng(len(shard_id) + rows)
    return build_output_table(
        "classify",
        keys=[f"{shard_id}/{o}" for o in range(rows)],
        sources=[f"s3://in/{shard_id}.tar"] * rows,
        ordinals=np.arange(rows),
        errors=[f"cannot decode {shard_id}/{o}" if o in errors else None for o in range(rows)],
        embeddings=rng.standard_normal((rows, HIDDEN)).astype(np.float32),
        topk_ids=np.tile(np.array([[1, 0, 2]]), (rows, 1)),
        topk_scores=np.tile(np.array([[0.6, 0.3, 0.1]], np.float32), (rows, 1)),
        id2label=ID2LABEL,
        hidden_size=HIDDEN,
    )


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("readers") / "predictions")
    fingerprint = JobFingerprint(
        task="classify", model_uri="/m", weights_sha256="ab" * 32, preprocessing={"size": 384}, dtype="float32"
    )
    plan = [{"shard_id": shard_id, "format": "webdataset", "uri": f"s3://in/{shard_id}.tar"} for shard_id in SHARDS]
    state = OutputState.open(out, fingerprint, plan, {})
    schema = output_schema("classify", HIDDEN)
    for shard_id, (rows, errors) in SHARDS.items():
        commit_shard(out, shard_id, shard_table(shard_id, rows, errors), rows_per_file=4, metadata={}, schema=schema)
    state.finish({"samples": 15})
    assert Path(f"{out}.job", "SUCCESS").exists()
    return out


ALL_KEYS = sorted(f"{shard_id}/{o}" for shard_id, (rows, _) in SHARDS.items() for o in range(rows))
GOOD_KEYS = sorted(
    f"{shard_id}/{o}" for shard_id, (rows, errors) in SHARDS.items() for o in range(rows) if o not in errors
)
ERROR_KEYS = sorted(set(ALL_KEYS) - set(GOOD_KEYS))


def test_the_output_holds_only_parquet(output: str) -> None:
    import pyarrow.parquet as pq

    files = [path for path in Path(output).rglob("*") if path.is_file()]
    assert files
    for path in files:
        pq.read_metadata(path)  # every file under OUT is Parquet, whatever its name


def test_duckdb_reads_every_row_once_from_the_whole_folder(output: str) -> None:
    import duckdb

    rows = duckdb.sql(f"SELECT key, error, embedding IS NULL FROM read_parquet('{output}/**') ORDER BY key").fetchall()
    assert [row[0] for row in rows] == ALL_KEYS
    assert sorted(row[0] for row in rows if row[1] is not None) == ERROR_KEYS
    assert all(row[2] == (row[1] is not None) for row in rows)
    # The documented way to get predictions only: the top-level *.parquet files.
    good = duckdb.sql(f"SELECT key FROM read_parquet('{output}/*.parquet') ORDER BY key").fetchall()
    assert [row[0] for row in good] == GOOD_KEYS


def test_pandas_and_pyarrow_read_every_row_once(output: str) -> None:
    import pandas as pd
    import pyarrow.dataset as ds

    frame = pd.read_parquet(output)
    assert sorted(frame["key"]) == ALL_KEYS
    assert sorted(frame.loc[frame["error"].notna(), "key"]) == ERROR_KEYS
    assert sorted(ds.dataset(output).to_table().column("key").to_pylist()) == ALL_KEYS


def test_hugging_face_datasets_read_the_folder(output: str, tmp_path: Path) -> None:
    import datasets

    cache = str(tmp_path / "hf-cache")
    everything = datasets.load_dataset("parquet", data_dir=output, split="train", cache_dir=cache)
    assert sorted(everything["key"]) == ALL_KEYS
    # Without a builder, datasets infers it from the extensions: Parquet, and the rows with an embedding.
    inferred = datasets.load_dataset(output, split="train", cache_dir=cache)
    assert sorted(inferred["key"]) == GOOD_KEYS


def test_embedding_reader_and_faiss_get_exactly_the_embeddings(output: str) -> None:
    import faiss
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(output, file_format="parquet", embedding_column="embedding", meta_columns=["key"])
    assert reader.count == len(GOOD_KEYS)
    vectors, keys = [], []
    for embeddings, metadata in reader(batch_size=100, start=0, end=reader.count, show_progress=False):
        vectors.append(embeddings)
        keys.extend(metadata["key"])
    matrix = np.concatenate(vectors).astype(np.float32)
    assert sorted(keys) == GOOD_KEYS and matrix.shape == (len(GOOD_KEYS), HIDDEN)
    index = faiss.IndexFlatL2(HIDDEN)
    index.add(matrix)
    _, nearest = index.search(matrix[:1], 1)
    assert nearest[0, 0] == 0
