"""Job bookkeeping (pipeline/manifest.py): job record, resume, overwrite, commits, manifest, assembler, secrets."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.layout import StorageFolder
from pipeline.manifest import (
    JobFingerprint,
    OutputConflictError,
    OutputLayout,
    OutputState,
)
from pipeline.sink import ParquetShardWriter, build_output_table, commit_shard

FAKE_SECRET = "FAKE-SECRET-7f3c9a1e-do-not-store"
HIDDEN = 4
PLAN = [
    {"shard_id": "s0", "format": "webdataset", "uri": "s3://in/a.tar"},
    {"shard_id": "s1", "format": "webdataset", "uri": "s3://in/b.tar"},
]


def plan_dicts(state: OutputState) -> list[dict]:
    """The stored plan as the dicts it was made from (unset optional fields dropped)."""
    return [{k: v for k, v in row.items() if v not in (None, "", [])} for row in state.plan.to_pylist()]


def book(out: str) -> Path:
    return Path(f"{out}.job")


def fingerprint(**changes: object) -> JobFingerprint:
    base = JobFingerprint(
        task="embed",
        model_uri="s3://models/vit-hybrid",
        weights_sha256="cd" * 32,
        preprocessing={"size": 384, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        dtype="float16",
        embedding_dtype="float32",
        normalize_embeddings=True,
        project_version="0.1.0",
    )
    return dataclasses.replace(base, **changes)


def embed_table(rows: int | list[int], *, shard_id: str = "s0") -> pa.Table:
    """Embed results of one shard: ``rows`` rows with ordinals 0..rows-1, or the given ordinals."""
    ordinals = np.arange(rows) if isinstance(rows, int) else np.asarray(rows)
    return build_output_table(
        "embed",
        keys=[f"{shard_id}/{o}" for o in ordinals],
        sources=["s3://in/a.tar"] * len(ordinals),
        ordinals=ordinals,
        errors=[None] * len(ordinals),
        embeddings=np.full((len(ordinals), HIDDEN), 1.0, np.float32),
        hidden_size=HIDDEN,
    )


def files_under(root: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------------------------
# Fingerprint and job record
# --------------------------------------------------------------------------------------------------------------------


def test_fingerprint_round_trips_and_diff_names_result_fields() -> None:
    original = fingerprint()
    restored = JobFingerprint.from_dict(json.loads(json.dumps(original.to_dict())))
    assert restored.diff(original) == []  # tuples became lists on the way; still the same settings
    changed = fingerprint(dtype="float32", preprocessing={"size": 224}, model_uri="/elsewhere", project_version="0.2")
    differences = original.diff(changed)
    assert [line.split(":")[0] for line in differences] == ["preprocessing", "dtype"]
    assert "dtype: 'float16' -> 'float32'" in differences


def test_first_open_records_fingerprint_plan_and_sanitised_arguments(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    arguments = {"output_uri": out, "storage_options": {"secret": FAKE_SECRET}, "batch_size": 64}
    state = OutputState.open(out, fingerprint(), PLAN, arguments)
    assert not state.resumed and state.committed_shard_ids == set()
    assert plan_dicts(state) == PLAN and state.pending_plan().num_rows == 2
    job = json.loads(book(out).joinpath("job.json").read_text())
    assert job["fingerprint"] == fingerprint().to_dict()
    assert job["shards"] == 2 and "shard_plan" not in job  # the plan is data, beside it
    assert pq.read_table(book(out) / "plan.parquet").column("uri").to_pylist() == ["s3://in/a.tar", "s3://in/b.tar"]
    assert not Path(out).exists() or not list(Path(out).iterdir())  # nothing but Parquet data ever goes under OUT
    assert job["arguments"] == {"output_uri": out, "storage_options": {"secret": "***"}, "batch_size": 64}


def test_resume_uses_the_recorded_plan_not_a_new_listing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), PLAN, {})

    def listing() -> list[dict]:
        raise AssertionError("a resume must not list the input again")

    with caplog.at_level(logging.WARNING):
        state = OutputState.open(out, fingerprint(model_uri="/copy/of/the/same/weights"), listing, {})
    assert state.resumed and plan_dicts(state) == PLAN
    assert "model_uri changed" in caplog.text


def test_a_different_job_is_refused_with_every_differing_field(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), PLAN, {})
    new = fingerprint(weights_sha256="ef" * 32, normalize_embeddings=False, embedding_dtype="float16")
    with pytest.raises(OutputConflictError) as raised:
        OutputState.open(out, new, PLAN, {})
    message = str(raised.value)
    assert out in message and "--overwrite" in message
    assert f"weights_sha256: '{'cd' * 32}' -> '{'ef' * 32}'" in message
    assert "embedding_dtype: 'float32' -> 'float16'" in message
    assert "normalize_embeddings: True -> False" in message
    assert "dtype: 'float16'" not in message.replace("embedding_dtype", "")  # dtype itself did not change


def test_job_files_without_a_job_record_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-s0-00000.parquet").write_bytes(b"not ours to judge")
    with pytest.raises(OutputConflictError, match="no job.json"):
        OutputState.open(str(out), fingerprint(), PLAN, {})


def test_overwrite_deletes_only_what_the_job_owns(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    state = OutputState.open(out, fingerprint(), PLAN, {})
    for shard in PLAN:
        commit_shard(out, shard["shard_id"], embed_table(3), rows_per_file=2, metadata={})
    state.finish({"samples": 6})
    book(out).joinpath("staging").mkdir(parents=True)
    book(out).joinpath("staging", "x-part-s9-00000.parquet.pending").write_bytes(b"half")
    Path(out, "errors").mkdir()
    Path(out, "errors", "part-s9.errors").write_bytes(b"left by a crashed attempt")
    user_files = {
        "notes.txt": b"keep me",
        "mine.parquet": b"user data",
        "part-of-my-thesis.parquet": b"user data",
        "nested/part-s0-00000.parquet": b"user data",
    }
    for name, data in user_files.items():
        Path(out, name).parent.mkdir(parents=True, exist_ok=True)
        Path(out, name).write_bytes(data)

    with pytest.raises(OutputConflictError):
        OutputState.open(out, fingerprint(dtype="float32"), PLAN, {})
    state = OutputState.open(out, fingerprint(dtype="float32"), PLAN, {}, overwrite=True)

    assert not state.resumed
    assert files_under(out) == sorted(user_files)
    assert files_under(str(book(out))) == ["job.json", "plan.parquet"]
    for name, data in user_files.items():
        assert Path(out, name).read_bytes() == data


def test_committed_shards_are_skipped_and_staging_leftovers_cleaned(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), PLAN, {})
    commit_shard(out, "s0", embed_table(3), rows_per_file=10, metadata={})
    leftovers = [book(out) / "staging/x-part-s1-00000.parquet.pending", book(out) / "fragments/s1/0a.parquet"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")

    state = OutputState.open(out, fingerprint(), PLAN, {})
    assert state.committed_shard_ids == {"s0"}
    assert state.pending_plan().column("shard_id").to_pylist() == ["s1"]
    assert not any(path.exists() for path in leftovers)


def test_stale_extra_part_files_are_deleted_before_the_commit_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), [{**PLAN[0], "shard_id": "a"}, {**PLAN[0], "shard_id": "a-1"}], {})
    neighbour = commit_shard(out, "a-1", embed_table(3), rows_per_file=1, metadata={})  # part-a-1-0000N: not a's
    # A crashed attempt at shard "a" with rows_per_file=2 left three files and no commit record.
    commit_shard(out, "a", embed_table(5), rows_per_file=2, metadata={})
    book(out).joinpath("commits", "a.json").unlink()

    present_at_commit: list[list[str]] = []
    real_write_commit = OutputLayout.write_commit

    def spy(layout: OutputLayout, record: object) -> None:
        present_at_commit.append(sorted(name for name in os.listdir(out) if name.startswith("part-a-0")))
        real_write_commit(layout, record)

    monkeypatch.setattr(OutputLayout, "write_commit", spy)
    state = OutputState.open(out, fingerprint(), [], {})
    assert state.committed_shard_ids == {"a-1"} and state.resumed
    record = commit_shard(out, "a", embed_table(5), rows_per_file=10, metadata={})

    assert record.files == ["part-a-00000.parquet"]
    assert present_at_commit == [["part-a-00000.parquet"]]
    assert sorted(name for name in os.listdir(out) if name.endswith(".parquet")) == sorted(
        [*record.files, *neighbour.files]
    )


def test_manifest_summary_and_success_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    state = OutputState.open(out, fingerprint(), PLAN, {})
    commit_shard(out, "s0", embed_table(3), rows_per_file=2, metadata={})
    with pytest.raises(RuntimeError, match=r"1 shard\(s\) not committed"):
        state.write_manifest()
    table = embed_table(4)
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array([None, "bad", None, None]))
    commit_shard(out, "s1", table, rows_per_file=2, metadata={})
    assert not state.is_complete

    written: list[str] = []
    real_publish = StorageFolder.publish
    monkeypatch.setattr(
        StorageFolder, "publish", lambda self, name, *a, **k: (written.append(name), real_publish(self, name, *a, **k))
    )
    manifest = state.finish({"samples": 7, "errors": 1, "seconds": 2.0, "images_per_s": 3.5})

    assert state.is_complete and written == ["manifest.json", "summary.json"]
    assert book(out).joinpath("SUCCESS").stat().st_mtime_ns >= book(out).joinpath("summary.json").stat().st_mtime_ns
    assert manifest == json.loads(book(out).joinpath("manifest.json").read_text())
    assert manifest["totals"] == {"shards": 2, "rows": 7, "error_rows": 1, "files": 5}
    assert [shard["input"] for shard in manifest["shards"]] == [
        {"uri": shard["uri"], "name": "", "format": "webdataset"} for shard in PLAN
    ]
    assert manifest["files"] == [
        "part-s0-00000.parquet", "part-s0-00001.parquet", "part-s1-00000.parquet", "part-s1-00001.parquet",
        "errors/part-s1.errors",
    ]  # fmt: skip
    assert manifest["fingerprint"]["weights_sha256"] == "cd" * 32
    assert {"created_at", "started_at", "finished_at"} <= set(manifest)
    assert json.loads(book(out).joinpath("summary.json").read_text())["images_per_s"] == 3.5
    assert not book(out).joinpath("staging").exists() and not book(out).joinpath("fragments").exists()
    assert {path.suffix for path in Path(out).rglob("*") if path.is_file()} == {".parquet", ".errors"}


def test_resume_and_overwrite_on_s3(s3_bucket: str) -> None:
    import boto3

    client = boto3.client("s3")
    out = f"s3://{s3_bucket}/out"
    OutputState.open(out, fingerprint(), PLAN, {})
    commit_shard(out, "s0", embed_table(3), rows_per_file=1, metadata={})
    client.put_object(Bucket=s3_bucket, Key="out/notes.txt", Body=b"keep me")
    client.put_object(Bucket=s3_bucket, Key="out/part-s1-00004.parquet", Body=b"left by a crashed attempt")

    state = OutputState.open(out, fingerprint(), PLAN, {})
    assert state.committed_shard_ids == {"s0"}
    record = commit_shard(out, "s1", embed_table(2), rows_per_file=5, metadata={})
    assert record.files == ["part-s1-00000.parquet"]
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket, Prefix="out")["Contents"]}
    assert "out/part-s1-00004.parquet" not in keys and "out.job/commits/s1.json" in keys

    OutputState.open(out, fingerprint(dtype="float32"), PLAN, {}, overwrite=True)
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket, Prefix="out")["Contents"])
    assert keys == ["out.job/job.json", "out.job/plan.parquet", "out/notes.txt"]


# --------------------------------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------------------------------


def test_no_secret_reaches_job_files_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = str(tmp_path / "out")
    arguments = {"input_uri": f"s3://user:{FAKE_SECRET}@b/in", "storage_options": {"secret": FAKE_SECRET}}
    plan = [{"shard_id": "s0", "format": "webdataset", "uri": f"s3://user:{FAKE_SECRET}@b/in/a.tar"}]
    with caplog.at_level(logging.DEBUG):
        state = OutputState.open(out, fingerprint(), plan, arguments)
        commit_shard(out, "s0", embed_table(2), rows_per_file=1, metadata=state.parquet_metadata)
        state.finish({"samples": 2, "storage_options": {"secret": FAKE_SECRET}})
        OutputState.open(out, fingerprint(), plan, arguments)
    assert FAKE_SECRET not in caplog.text
    for root in (out, str(book(out))):
        for name in files_under(root):
            assert FAKE_SECRET.encode() not in Path(root, name).read_bytes(), name


def test_shard_plan_keeps_paths_and_loses_only_uri_credentials(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    plan = [
        {
            "shard_id": "images-000000-abc",
            "format": "images",
            "uri": f"https://reader:{FAKE_SECRET}@images.example.com/base",
            "members": ["cats/session=3/token_cat.jpg", "key=value.png", f"s3://u:{FAKE_SECRET}@b/x.jpg?a=1"],
            "id_column": None,
        }
    ]
    OutputState.open(out, fingerprint(), plan, {})
    state = OutputState.open(out, fingerprint(), plan, {})
    members = ["cats/session=3/token_cat.jpg", "key=value.png", "s3://b/x.jpg?a=1"]
    expected = {"shard_id": "images-000000-abc", "format": "images", "uri": "https://images.example.com/base"}
    assert plan_dicts(state) == [{**expected, "members": members}]
    for name in ("job.json", "plan.parquet"):
        assert FAKE_SECRET.encode() not in book(out).joinpath(name).read_bytes()


def test_reprs_never_show_storage_options(tmp_path: Path) -> None:
    options = {"secret": FAKE_SECRET}
    out = str(tmp_path / "out")
    state = OutputState.open(out, fingerprint(), PLAN, {"storage_options": options}, storage_options=options)
    writer_repr = repr(ParquetShardWriter(str(tmp_path), rows_per_file=1, storage_options=options))
    assert FAKE_SECRET not in repr(state) and FAKE_SECRET not in writer_repr


def test_a_bucket_root_is_refused_as_output() -> None:
    with pytest.raises(OutputConflictError, match="bucket root"):
        OutputState.open("s3://some-bucket/", fingerprint(), PLAN, {})
