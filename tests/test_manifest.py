"""Job bookkeeping (pipeline/manifest.py): job record, resume, overwrite, commits, manifest, assembler, secrets."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.manifest import (
    JobFingerprint,
    OutputConflictError,
    OutputLayout,
    OutputState,
    ShardAssembler,
    ShardAssemblyError,
)
from pipeline.sink import ParquetShardWriter, build_output_table, commit_shard

FAKE_SECRET = "FAKE-SECRET-7f3c9a1e-do-not-store"
HIDDEN = 4
PLAN = [{"shard_id": "s0", "source": "s3://in/a.tar"}, {"shard_id": "s1", "source": "s3://in/b.tar"}]


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


def with_bookkeeping(table: pa.Table, shard_id: str, shard_rows: int) -> pa.Table:
    """Add the columns the driver receives: ``shard_id`` on every row, ``shard_rows`` on the shard's last row."""
    ordinals = table.column("ordinal").to_numpy()
    totals = pa.array([shard_rows if o == shard_rows - 1 else None for o in ordinals], pa.int64())
    return table.append_column("shard_id", pa.array([shard_id] * table.num_rows)).append_column("shard_rows", totals)


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
    assert state.pending_shards == PLAN
    job = json.loads(Path(out, "_job.json").read_text())
    assert job["fingerprint"] == fingerprint().to_dict()
    assert job["shard_plan"] == PLAN
    assert job["arguments"] == {"output_uri": out, "storage_options": {"secret": "***"}, "batch_size": 64}


def test_resume_uses_the_recorded_plan_not_a_new_listing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), PLAN, {})
    grown = [*PLAN, {"shard_id": "s2", "source": "s3://in/c.tar"}]
    with caplog.at_level(logging.WARNING):
        state = OutputState.open(out, fingerprint(model_uri="/copy/of/the/same/weights"), grown, {})
    assert state.resumed and state.shard_plan == PLAN
    assert "1 shard(s) not in the recorded plan" in caplog.text
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
    with pytest.raises(OutputConflictError, match="no _job.json"):
        OutputState.open(str(out), fingerprint(), PLAN, {})


def test_overwrite_deletes_only_what_the_job_owns(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    state = OutputState.open(out, fingerprint(), PLAN, {})
    for shard in PLAN:
        commit_shard(out, shard["shard_id"], embed_table(3), rows_per_file=2, metadata={})
    state.finish({"samples": 6})
    Path(out, "_staging", "s9").mkdir(parents=True)
    Path(out, "_staging", "s9", "part-s9-00000.parquet.pending").write_bytes(b"half")
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
    assert files_under(out) == sorted(["_job.json", *user_files])
    for name, data in user_files.items():
        assert Path(out, name).read_bytes() == data


def test_committed_shards_are_skipped_and_staging_leftovers_cleaned(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), PLAN, {})
    commit_shard(out, "s0", embed_table(3), rows_per_file=10, metadata={})
    leftovers = [Path(out, "_staging/s1/part-s1-00000.parquet.pending"), Path(out, "_staging/_tmp/x.pending")]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")

    state = OutputState.open(out, fingerprint(), PLAN, {})
    assert state.committed_shard_ids == {"s0"}
    assert [shard["shard_id"] for shard in state.pending_shards] == ["s1"]
    assert not any(path.exists() for path in leftovers)


def test_stale_extra_part_files_are_deleted_before_the_commit_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "out")
    OutputState.open(out, fingerprint(), [{"shard_id": "a"}, {"shard_id": "a-1"}], {})
    neighbour = commit_shard(out, "a-1", embed_table(3), rows_per_file=1, metadata={})  # part-a-1-0000N: not a's
    # A crashed attempt at shard "a" with rows_per_file=2 left three files and no commit record.
    commit_shard(out, "a", embed_table(5), rows_per_file=2, metadata={})
    Path(out, "_commits", "a.json").unlink()

    present_at_commit: list[list[str]] = []
    real_write_commit = OutputLayout.write_commit

    def spy(layout: OutputLayout, record: object) -> None:
        present_at_commit.append(sorted(name for name in os.listdir(out) if name.startswith("part-a-0")))
        real_write_commit(layout, record)

    monkeypatch.setattr(OutputLayout, "write_commit", spy)
    state = OutputState.open(out, fingerprint(), [], {})
    assert state.committed_shard_ids == {"a-1"}
    record = commit_shard(out, "a", embed_table(5), rows_per_file=10, metadata={})

    assert record.files == ["part-a-00000.parquet"]
    assert present_at_commit == [["part-a-00000.parquet"]]
    assert sorted(name for name in os.listdir(out) if name.endswith(".parquet")) == sorted(
        [*record.files, *neighbour.files]
    )


def test_manifest_summary_and_success_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    state = OutputState.open(out, fingerprint(), PLAN, {})
    record = commit_shard(out, "s0", embed_table(3), rows_per_file=2, metadata={})
    state.mark_committed(record)
    with pytest.raises(RuntimeError, match=r"1 shard\(s\) not committed"):
        state.write_manifest()
    table = embed_table(4)
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array([None, "bad", None, None]))
    commit_shard(out, "s1", table, rows_per_file=2, metadata={})
    assert not state.is_complete

    written: list[str] = []
    real_publish = OutputLayout.publish
    monkeypatch.setattr(
        OutputLayout, "publish", lambda self, name, *a, **k: (written.append(name), real_publish(self, name, *a, **k))
    )
    manifest = state.finish({"samples": 7, "errors": 1, "seconds": 2.0, "images_per_s": 3.5})

    assert state.is_complete and written == ["_manifest.json", "_summary.json"]
    assert Path(out, "_SUCCESS").stat().st_mtime_ns >= Path(out, "_summary.json").stat().st_mtime_ns
    assert manifest == json.loads(Path(out, "_manifest.json").read_text())
    assert manifest["totals"] == {"shards": 2, "rows": 7, "error_rows": 1, "files": 4}
    assert [shard["input"] for shard in manifest["shards"]] == PLAN
    assert manifest["files"] == [
        "part-s0-00000.parquet", "part-s0-00001.parquet", "part-s1-00000.parquet", "part-s1-00001.parquet"
    ]  # fmt: skip
    assert manifest["fingerprint"]["weights_sha256"] == "cd" * 32
    assert {"created_at", "started_at", "finished_at"} <= set(manifest)
    assert json.loads(Path(out, "_summary.json").read_text())["images_per_s"] == 3.5
    assert not Path(out, "_staging").exists()


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
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]}
    assert "out/part-s1-00004.parquet" not in keys and "out/_commits/s1.json" in keys

    OutputState.open(out, fingerprint(dtype="float32"), PLAN, {}, overwrite=True)
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"])
    assert keys == ["out/_job.json", "out/notes.txt"]


# --------------------------------------------------------------------------------------------------------------------
# Shard assembly
# --------------------------------------------------------------------------------------------------------------------


def result_rows(sizes: dict[str, int]) -> pa.Table:
    """All result rows of several shards, as the inference stage would emit them."""
    return pa.concat_tables(
        [with_bookkeeping(embed_table(rows, shard_id=shard_id), shard_id, rows) for shard_id, rows in sizes.items()]
    )


@pytest.mark.parametrize("seed", range(5))
def test_assembler_completes_each_shard_once_in_any_arrival_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = {"s0": 1, "s1": 7, "s2": 30, "s3": 12}
    rows = result_rows(sizes)
    rows = rows.take(pa.array(rng.permutation(rows.num_rows)))
    cuts = np.sort(rng.choice(np.arange(1, rows.num_rows), size=8, replace=False))
    assembler = ShardAssembler()
    completed: dict[str, pa.Table] = {}
    for start, stop in zip([0, *cuts], [*cuts, rows.num_rows]):
        for shard_id, table in assembler.add(rows.slice(start, stop - start)):
            assert shard_id not in completed
            completed[shard_id] = table
    assert {shard_id: table.num_rows for shard_id, table in completed.items()} == sizes
    for shard_id, table in completed.items():
        assert "shard_id" not in table.column_names and "shard_rows" not in table.column_names
        assert sorted(table.column("ordinal").to_pylist()) == list(range(sizes[shard_id]))
        assert all(key.startswith(f"{shard_id}/") for key in table.column("key").to_pylist())
    assert assembler.buffered_rows == 0 and assembler.pending_shards() == {}


def test_assembler_reports_pending_shards_and_buffered_rows() -> None:
    rows = result_rows({"s0": 4, "s1": 3})
    assembler = ShardAssembler()
    assert assembler.add(rows.slice(0, 2)) == []
    assert assembler.add(rows.slice(4, 2)) == []  # s1 ordinals 0, 1: its total is still unknown
    assert assembler.pending_shards() == {"s0": (2, None), "s1": (2, None)}
    assert assembler.buffered_rows == 4 and assembler.buffered_bytes > 0
    assert [shard_id for shard_id, _ in assembler.add(rows.slice(6, 1))] == ["s1"]
    assert assembler.pending_shards() == {"s0": (2, None)}


def test_assembler_releases_memory_after_completion() -> None:
    gc.collect()
    before = pa.total_allocated_bytes()
    rows = result_rows({"big": 5000})
    assembler = ShardAssembler()
    # Independent copies, as batches arriving from Ray are: none shares a buffer with another.
    parts = [rows.slice(start, 1000).take(pa.array(np.arange(1000))) for start in range(0, 5000, 1000)]
    del rows
    done = [assembler.add(part) for part in parts[::-1]]
    del parts
    assert [len(batch) for batch in done] == [0, 0, 0, 0, 1]
    assert assembler.buffered_rows == 0
    while_held = pa.total_allocated_bytes()
    assert while_held - before > 5000 * HIDDEN * 4
    del done
    gc.collect()
    assert pa.total_allocated_bytes() - before < 64 * 1024


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        # (ordinals, key prefix): a re-sent ordinal with another sample's key is a bug upstream, not a retry.
        ([([0], "s0"), ([0], "other")], r"ordinal 0 arrived twice with different samples"),
        ([([0, 1], "s0"), ([1, 2], "other")], r"ordinal 1 arrived twice with different samples"),
        ([([0, 1, 2], "s0"), ([3], "s0")], "arrived after the shard was complete with 3 rows"),
        ([([0, 1, 2, 5], "s0")], "beyond the shard's 3 rows"),
    ],
)
def test_assembler_refuses_conflicting_and_out_of_range_rows(batches: list[tuple[list[int], str]], match: str) -> None:
    # Identical re-sent rows are dropped instead (tests/test_faults.py); see ShardAssembler's docstring.
    assembler = ShardAssembler()
    with pytest.raises(ShardAssemblyError, match=match):
        for ordinals, key_prefix in batches:
            assembler.add(with_bookkeeping(embed_table(ordinals, shard_id=key_prefix), "s0", 3))


def test_assembler_refuses_a_shard_row_count_below_one() -> None:
    # A shard always has at least one row (an empty input yields an error row upstream); 0 is a bug upstream.
    table = embed_table(1)
    table = table.append_column("shard_id", pa.array(["s0"])).append_column("shard_rows", pa.array([0], pa.int64()))
    with pytest.raises(ShardAssemblyError, match="shard_rows=0"):
        ShardAssembler().add(table)


def test_assembler_requires_bookkeeping_columns() -> None:
    with pytest.raises(ValueError, match="lacks bookkeeping column"):
        ShardAssembler().add(embed_table(2))


# --------------------------------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------------------------------


def test_no_secret_reaches_job_files_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = str(tmp_path / "out")
    arguments = {"input_uri": f"s3://user:{FAKE_SECRET}@b/in", "storage_options": {"secret": FAKE_SECRET}}
    plan = [{"shard_id": "s0", "source": f"s3://user:{FAKE_SECRET}@b/in/a.tar"}]
    with caplog.at_level(logging.DEBUG):
        state = OutputState.open(out, fingerprint(), plan, arguments)
        commit_shard(out, "s0", embed_table(2), rows_per_file=1, metadata=state.parquet_metadata)
        state.finish({"samples": 2, "storage_options": {"secret": FAKE_SECRET}})
        OutputState.open(out, fingerprint(), plan, arguments)
    assert FAKE_SECRET not in caplog.text
    for name in files_under(out):
        assert FAKE_SECRET.encode() not in Path(out, name).read_bytes(), name


def test_shard_plan_keeps_paths_and_loses_only_uri_credentials(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    plan = [
        {
            "shard_id": "images-000000-abc",
            "uri": f"https://reader:{FAKE_SECRET}@images.example.com/base",
            "members": ["cats/session=3/token_cat.jpg", "key=value.png"],
            "id_column": None,
        }
    ]
    OutputState.open(out, fingerprint(), plan, {})
    state = OutputState.open(out, fingerprint(), plan, {})
    assert state.shard_plan == [{**plan[0], "uri": "https://images.example.com/base"}]
    assert FAKE_SECRET not in Path(out, "_job.json").read_text()


def test_reprs_never_show_storage_options(tmp_path: Path) -> None:
    options = {"secret": FAKE_SECRET}
    state = OutputState.open(str(tmp_path), fingerprint(), PLAN, {"storage_options": options}, storage_options=options)
    writer_repr = repr(ParquetShardWriter(str(tmp_path), rows_per_file=1, storage_options=options))
    assert FAKE_SECRET not in repr(state) and FAKE_SECRET not in writer_repr
