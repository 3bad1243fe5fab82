"""Output schema, result tables and shard commits (pipeline/sink.py): local disk and S3 (moto), no Ray."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.storage import filesystem_for
from pipeline import layout
from pipeline.manifest import JobFingerprint, OutputState
from pipeline.sink import ParquetShardWriter, build_output_table, commit_shard, output_schema

FAKE_SECRET = "FAKE-SECRET-7f3c9a1e-do-not-store"
HIDDEN = 8
ID2LABEL = {"0": "tench", "1": "goldfish", "2": "great white shark", "3": "tiger shark"}


def classify_table(
    rows: int,
    *,
    error_at: tuple[int, ...] = (),
    ordinals: np.ndarray | None = None,
    embedding_dtype: str = "float32",
    normalize: bool = False,
    seed: int = 0,
) -> pa.Table:
    """A result batch as the inference stage builds it; keys name the ordinal so order is easy to check."""
    rng = np.random.default_rng(seed)
    ordinals = np.arange(rows) if ordinals is None else ordinals
    topk_ids = np.stack([rng.permutation(4)[:3] for _ in range(rows)]) if rows else np.zeros((0, 3), int)
    topk_scores = np.sort(rng.random((rows, 3), dtype=np.float32), axis=1)[:, ::-1]
    return build_output_table(
        "classify",
        keys=[f"img-{o:05d}" for o in ordinals],
        sources=["s3://bucket/shard-0.tar"] * rows,
        ordinals=ordinals,
        errors=[f"cannot decode img-{o:05d}" if i in error_at else None for i, o in enumerate(ordinals)],
        embeddings=rng.standard_normal((rows, HIDDEN)).astype(np.float32),
        topk_ids=topk_ids,
        topk_scores=np.ascontiguousarray(topk_scores),
        id2label=ID2LABEL,
        hidden_size=HIDDEN,
        embedding_dtype=embedding_dtype,
        normalize_embeddings=normalize,
    )


def plan(*shard_ids: str) -> list[dict]:
    return [{"shard_id": shard_id, "format": "webdataset", "uri": f"s3://in/{shard_id}.tar"} for shard_id in shard_ids]


def fingerprint() -> JobFingerprint:
    return JobFingerprint(
        task="classify",
        model_uri="s3://models/vit-hybrid-base-bit-384",
        weights_sha256="ab" * 32,
        preprocessing={"size": 384, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resample": "bilinear"},
        dtype="bfloat16",
        top_k=3,
    )


def secret_arguments(output_uri: str) -> dict:
    return {
        "input_uri": f"s3://user:{FAKE_SECRET}@bucket/in",
        "output_uri": output_uri,
        "storage_options": {"key": "AKIAFAKE", "secret": FAKE_SECRET, "client_kwargs": {"region_name": "us-east-1"}},
        "rows_per_file": 4,
    }


# --------------------------------------------------------------------------------------------------------------------
# Schema and table building
# --------------------------------------------------------------------------------------------------------------------


def test_classify_schema_has_exact_types() -> None:
    schema = output_schema("classify", hidden_size=768)
    assert [(f.name, f.type) for f in schema] == [
        ("key", pa.string()),
        ("source", pa.string()),
        ("label", pa.string()),
        ("label_id", pa.int32()),
        ("score", pa.float32()),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_scores", pa.list_(pa.float32())),
        ("embedding", pa.list_(pa.float32(), 768)),
        ("error", pa.string()),
    ]


def test_embed_schema_has_exact_types_and_float16_option() -> None:
    schema = output_schema("embed", hidden_size=1024, embedding_dtype="float16")
    assert [(f.name, f.type) for f in schema] == [
        ("key", pa.string()),
        ("source", pa.string()),
        ("embedding", pa.list_(pa.float16(), 1024)),
        ("error", pa.string()),
    ]
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)


@pytest.mark.parametrize(
    ("task", "hidden", "dtype"), [("detect", 8, "float32"), ("embed", 0, "float32"), ("embed", 8, "bfloat16")]
)
def test_schema_rejects_bad_settings(task: str, hidden: int, dtype: str) -> None:
    with pytest.raises(ValueError):
        output_schema(task, hidden, dtype)


def test_build_output_table_puts_nulls_on_error_rows() -> None:
    table = classify_table(5, error_at=(1, 3))
    assert table.schema == output_schema("classify", HIDDEN).append(pa.field("ordinal", pa.int64()))
    rows = table.to_pylist()
    for index in (1, 3):
        row = rows[index]
        assert row["error"] == f"cannot decode img-{index:05d}"
        assert row["key"] == f"img-{index:05d}" and row["source"] == "s3://bucket/shard-0.tar"
        for column in ("label", "label_id", "score", "topk_ids", "topk_labels", "topk_scores", "embedding"):
            assert row[column] is None, column
    for index in (0, 2, 4):
        assert rows[index]["error"] is None
        assert len(rows[index]["embedding"]) == HIDDEN
    assert table.column("embedding").null_count == 2


def test_labels_follow_top1_and_id2label() -> None:
    table = build_output_table(
        "classify",
        keys=["a", "b"],
        sources=["x", "x"],
        ordinals=[0, 1],
        errors=[None, None],
        embeddings=None,
        topk_ids=np.array([[2, 0], [1, 3]]),
        topk_scores=np.array([[0.7, 0.2], [0.6, 0.3]], dtype=np.float32),
        id2label=ID2LABEL,
        hidden_size=HIDDEN,
    )
    assert table.column("label").to_pylist() == ["great white shark", "goldfish"]
    assert table.column("label_id").to_pylist() == [2, 1]
    assert table.column("topk_labels").to_pylist() == [["great white shark", "tench"], ["goldfish", "tiger shark"]]
    assert np.allclose(table.column("score").to_numpy(), [0.7, 0.6])
    # embeddings=None for classify: the column exists and is null.
    assert table.column("embedding").null_count == 2


def test_unknown_class_id_names_the_id() -> None:
    with pytest.raises(ValueError, match=r"class id\(s\) \[7\]"):
        build_output_table(
            "classify",
            keys=["a"],
            sources=["x"],
            ordinals=[0],
            errors=[None],
            embeddings=None,
            topk_ids=np.array([[7]]),
            topk_scores=np.array([[1.0]], dtype=np.float32),
            id2label=ID2LABEL,
            hidden_size=HIDDEN,
        )


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="embeddings have shape"):
        build_output_table(
            "embed", keys=["a"], sources=["x"], ordinals=[0], errors=[None],
            embeddings=np.zeros((2, HIDDEN), np.float32), hidden_size=HIDDEN,
        )  # fmt: skip
    with pytest.raises(ValueError, match="keys has 2 entries"):
        build_output_table(
            "embed", keys=["a", "b"], sources=["x"], ordinals=[0], errors=[None],
            embeddings=np.zeros((1, HIDDEN), np.float32), hidden_size=HIDDEN,
        )  # fmt: skip


def test_float16_embeddings_are_normalised_in_float32_and_zero_stays_zero() -> None:
    embeddings = np.random.default_rng(1).standard_normal((4, HIDDEN)).astype(np.float32) * 50
    embeddings[2] = 0.0
    embeddings[3] = np.nan  # an error row's placeholder must not leak anywhere
    table = build_output_table(
        "embed",
        keys=list("abcd"),
        sources=["x"] * 4,
        ordinals=range(4),
        errors=[None, None, None, "bad image"],
        embeddings=embeddings,
        hidden_size=HIDDEN,
        embedding_dtype="float16",
        normalize_embeddings=True,
    )
    column = table.column("embedding").combine_chunks()
    assert column.type == pa.list_(pa.float16(), HIDDEN)
    values = column.values.to_numpy(zero_copy_only=False).reshape(4, HIDDEN)
    expected = (embeddings[:2] / np.linalg.norm(embeddings[:2], axis=1, keepdims=True)).astype(np.float16)
    np.testing.assert_array_equal(values[:2], expected)
    np.testing.assert_allclose(np.linalg.norm(values[:2].astype(np.float32), axis=1), 1.0, atol=2e-3)
    np.testing.assert_array_equal(values[2], np.zeros(HIDDEN, np.float16))
    assert not np.isnan(values).any()
    assert table.column("embedding").to_pylist()[3] is None


def test_embeddings_are_kept_as_given_without_normalisation() -> None:
    embeddings = np.arange(2 * HIDDEN, dtype=np.float32).reshape(2, HIDDEN)
    table = build_output_table(
        "embed", keys=["a", "b"], sources=["x", "x"], ordinals=[0, 1], errors=[None, None],
        embeddings=embeddings, hidden_size=HIDDEN,
    )  # fmt: skip
    assert table.column("embedding").to_pylist() == embeddings.tolist()


# --------------------------------------------------------------------------------------------------------------------
# Writing and committing
# --------------------------------------------------------------------------------------------------------------------


def test_embedding_column_reads_back_in_pyarrow_and_pandas(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    schema = output_schema("classify", HIDDEN, "float16")
    table = classify_table(6, error_at=(2,), embedding_dtype="float16", normalize=True)
    record = commit_shard(out, "shard-0", table, rows_per_file=100, metadata={}, schema=schema)
    assert record.files == ["part-shard-0-00000.parquet", "errors/part-shard-0.errors"]
    read = pq.read_table(os.path.join(out, "part-shard-0-00000.parquet"))
    assert read.schema.remove_metadata() == schema
    assert read.column("embedding").type == pa.list_(pa.float16(), HIDDEN)
    assert read.column("embedding").null_count == 0  # error rows live apart: embedding readers can stack these
    expected = table.drop_columns(["ordinal"])
    assert read.equals(expected.filter(pa.array([i != 2 for i in range(6)])))
    errors = pq.read_table(os.path.join(out, "errors", "part-shard-0.errors"))
    assert errors.equals(expected.slice(2, 1))  # every value, nulls included, round-trips

    frame = pd.read_parquet(out).sort_values("key").reset_index(drop=True)  # the whole folder: every row once
    assert len(frame) == 6
    assert len(frame["embedding"][0]) == HIDDEN
    failed = frame[frame["error"].notna()]
    assert list(failed["key"]) == ["img-00002"] and failed["embedding"].iloc[0] is None
    assert pd.isna(failed["label"].iloc[0]) and failed["error"].iloc[0] == "cannot decode img-00002"


def test_duckdb_reads_the_output(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb is not installed (add it to the test extra)")
    out = str(tmp_path / "out")
    for dtype in ("float32", "float16"):
        commit_shard(
            f"{out}-{dtype}", "shard-0", classify_table(5, error_at=(1,), embedding_dtype=dtype),
            rows_per_file=2, metadata={}, schema=output_schema("classify", HIDDEN, dtype),
        )  # fmt: skip
        rows = duckdb.sql(
            f"SELECT key, len(embedding) AS dims, label, topk_labels[1] AS top1, error "
            f"FROM read_parquet('{out}-{dtype}/**') ORDER BY key"
        ).fetchall()
        assert [row[0] for row in rows] == [f"img-{i:05d}" for i in range(5)]
        assert [row[1] for row in rows] == [HIDDEN, None, HIDDEN, HIDDEN, HIDDEN]
        assert rows[1][2] is None and rows[1][4] == "cannot decode img-00001"
        assert all(row[2] == row[3] for row in rows if row[4] is None)


def test_parquet_metadata_records_the_job_and_no_secret(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    metadata = fingerprint().parquet_metadata(secret_arguments(out))
    record = commit_shard(out, "shard-0", classify_table(3), rows_per_file=10, metadata=metadata)
    stored = pq.read_metadata(os.path.join(out, record.files[0])).metadata
    assert stored[b"model_uri"] == b"s3://models/vit-hybrid-base-bit-384"
    assert stored[b"weights_sha256"] == b"ab" * 32
    assert json.loads(stored[b"preprocessing"])["size"] == 384
    assert stored[b"dtype"] == b"bfloat16"
    assert b"project_version" in stored
    arguments = json.loads(stored[b"job_arguments"])
    assert arguments["rows_per_file"] == 4 and arguments["storage_options"]["secret"] == "***"
    for path in glob.glob(f"{out}/**/*", recursive=True):
        if os.path.isfile(path):
            assert FAKE_SECRET.encode() not in Path(path).read_bytes(), path


def test_rows_are_sorted_by_ordinal_and_split_by_rows_per_file(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    shuffled = np.random.default_rng(3).permutation(10)
    record = commit_shard(out, "shard-7", classify_table(10, ordinals=shuffled), rows_per_file=4, metadata={})
    assert record.files == ["part-shard-7-00000.parquet", "part-shard-7-00001.parquet", "part-shard-7-00002.parquet"]
    assert [pq.read_metadata(os.path.join(out, name)).num_rows for name in record.files] == [4, 4, 2]
    keys = [key for name in record.files for key in pq.read_table(os.path.join(out, name)).column("key").to_pylist()]
    assert keys == [f"img-{i:05d}" for i in range(10)]
    assert "ordinal" not in pq.read_schema(os.path.join(out, record.files[0])).names
    assert json.loads(Path(f"{out}.job", "commits", "shard-7.json").read_text()) == {
        "shard_id": "shard-7",
        "files": record.files,
        "rows": 10,
        "error_rows": 0,
    }
    assert not [path for path in Path(f"{out}.job", "staging").rglob("*") if path.is_file()]


def test_writer_casts_to_the_documented_schema(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    table = classify_table(3)
    reordered = table.select(list(reversed(table.column_names)))
    schema = output_schema("classify", HIDDEN)
    record = ParquetShardWriter(out, rows_per_file=10, schema=schema).commit("s", reordered)
    assert pq.read_schema(os.path.join(out, record.files[0])).remove_metadata() == schema


@pytest.mark.parametrize("shard_id", ["", "../escape", "a/b", "_staging", "a*b", "x" * 201])
def test_unsafe_shard_ids_are_refused(tmp_path: Path, shard_id: str) -> None:
    with pytest.raises(ValueError, match="cannot name output files"):
        commit_shard(str(tmp_path), shard_id, classify_table(1), rows_per_file=1, metadata={})


class SimulatedCrash(BaseException):
    """Raised from inside the commit; a BaseException, like the SIGKILL it stands for, so nothing catches it."""


def test_a_reader_never_sees_partial_files_during_a_crash_between_staging_and_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), plan("shard-0"), {})
    table = classify_table(10)
    real_replace = os.replace
    seen_by_reader: list[list[str]] = []

    def replace_then_crash(source: str, target: str) -> None:
        # The moment a second file is staged (fully written, fsynced) but not yet in place: look as a reader would.
        visible = sorted(set(glob.glob(f"{out}/*.parquet") + glob.glob(f"{out}/**/*.parquet", recursive=True)))
        seen_by_reader.append(visible)
        for path in visible:
            assert pq.read_metadata(path).num_rows == 4  # complete files only
        if target.endswith("-00001.parquet"):
            assert os.path.getsize(source) > 0 and source.endswith(".parquet.pending")
            assert source.startswith(f"{out}.job/staging/")  # written beside the output, never inside it
            raise SimulatedCrash
        real_replace(source, target)

    monkeypatch.setattr(layout.os, "replace", replace_then_crash)
    with pytest.raises(SimulatedCrash):
        commit_shard(out, "shard-0", table, rows_per_file=4, metadata={})
    monkeypatch.setattr(layout.os, "replace", real_replace)

    assert seen_by_reader == [[], [f"{out}/part-shard-0-00000.parquet"]]
    assert not Path(f"{out}.job", "commits", "shard-0.json").exists()  # not committed
    assert glob.glob(f"{out}.job/staging/*.pending")  # the staged file is there, outside the output
    assert [p.name for p in Path(out).rglob("*")] == ["part-shard-0-00000.parquet"]  # only whole Parquet files
    assert pq.ParquetDataset(out).read().num_rows == 4

    # Resume: staging cleaned, the shard redone, same names, each row once.
    state = OutputState.open(out, fingerprint(), plan("shard-0"), {}, overwrite=False)
    assert state.resumed and state.committed_shard_ids == set()
    assert not Path(f"{out}.job", "staging").exists()
    record = commit_shard(out, "shard-0", table, rows_per_file=4, metadata={})
    assert record.rows == 10 and len(record.files) == 3
    assert sorted(os.path.basename(p) for p in glob.glob(f"{out}/**/*.parquet", recursive=True)) == record.files
    assert not [p for p in Path(f"{out}.job", "staging").rglob("*") if p.is_file()]
    assert pq.ParquetDataset(out).read().column("key").to_pylist() == [f"img-{i:05d}" for i in range(10)]


def test_commit_to_s3(s3_bucket: str) -> None:
    import boto3

    out = f"s3://{s3_bucket}/runs/out"
    schema = output_schema("classify", HIDDEN)
    state = OutputState.open(out, fingerprint(), plan("s0", "s1"), secret_arguments(out))
    for index, shard_id in enumerate(["s0", "s1"]):
        table = classify_table(5, error_at=(0,), ordinals=np.arange(5)[::-1], seed=index)
        commit_shard(out, shard_id, table, rows_per_file=2, metadata=state.parquet_metadata, schema=schema)
    state.finish({"samples": 10, "errors": 2, "seconds": 1.0, "images_per_s": 10.0})

    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/out")["Contents"]
    keys = sorted(item["Key"].removeprefix("runs/out") for item in listing)
    assert keys == sorted(
        [f".job/{name}" for name in ("job.json", "plan.parquet", "manifest.json", "summary.json", "SUCCESS")]
        + [".job/commits/s0.json", ".job/commits/s1.json"]
        + [f"/part-{s}-{i:05d}.parquet" for s in ("s0", "s1") for i in range(2)]
        + ["/errors/part-s0.errors", "/errors/part-s1.errors"]
    )
    filesystem, path = filesystem_for(out)
    data = pq.ParquetDataset(f"{path}/", filesystem=filesystem).read()
    assert data.num_rows == 10 and data.column("error").null_count == 8  # error rows under errors/ included
    assert data.schema.field("embedding").type == pa.list_(pa.float32(), HIDDEN)
    first = pq.read_table(f"{path}/part-s0-00000.parquet", filesystem=filesystem)
    assert first.column("key").to_pylist() == ["img-00000", "img-00001"]  # img-00004 is the error row
    for item in listing:
        body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=item["Key"])["Body"].read()
        assert FAKE_SECRET.encode() not in body, item["Key"]
