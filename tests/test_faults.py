"""Workers that die mid-work: the job retries them and ends with exactly the clean run's output.

End to end, an inference actor and a read/decode task each die once (``os._exit`` at a failpoint that fires only
the first time, across processes, thanks to its marker file); Ray restarts the actor, re-executes the read task from
the start of its shard, and the output must equal the clean run's, row for row.

The subtle part is what the dead attempt already sent. Ray re-executes a streaming task from its start and drops
the outputs whose index the dead attempt had already delivered; that is exactly-once only if the retry cuts its
output into the same blocks. When it does not, rows of a shard reach the driver twice (or, with coarser blocks,
some are lost). The unit tests below replay those orders through the real writer stage, the driver's
:class:`pipeline.shards.ShardTracker` and the finalize step: re-sent rows are dropped, each shard is committed with
each row once, and a shard whose rows never all arrive is reported instead of being committed short. The driver's
loop is tested the same way on a stand-in dataset, with finalize tasks run in-process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import failpoints
from pipeline.config import JobConfig
from pipeline.layout import OutputLayout
from pipeline.plan import IncompleteShardsError, JobError, JobSummary, _track_and_finalize
from pipeline.shards import CompleteShard, ShardAssemblyError, ShardTracker
from pipeline.sink import build_output_table, output_schema
from pipeline.sources import ShardReadError
from pipeline.writer import UNREADABLE, finalize_shard, read_fragments, write_fragments
from tests.reliability import assert_same_output, run_job


def test_a_dying_actor_and_a_dying_read_task_are_retried_to_the_clean_output(
    clean_run, ray_tmpdir: str, job_cluster: str, tmp_path: Path
) -> None:
    # On a cluster the job joined: its failpoints reach the workers through its runtime_env.
    read_marker, actor_marker = tmp_path / "read-died", tmp_path / "actor-died"
    output = str(tmp_path / "out")
    finished = run_job(
        clean_run.args(output),
        ray_tmpdir=ray_tmpdir,
        env={"VIT_HYBRID_FAILPOINTS": f"read.batch:exit@{read_marker},infer.batch=3:exit@{actor_marker}"},
        ray_address=job_cluster,
    )
    assert finished.returncode == 0, finished.stderr[-5000:]
    assert read_marker.exists() and actor_marker.exists(), "a failpoint did not fire"
    assert_same_output(output, clean_run.output)
    summary = json.loads(Path(f"{output}.job", "summary.json").read_text())
    assert summary["samples"] == len(clean_run.samples)  # counted once each, re-sent rows or not
    print(f"rows re-sent by retried tasks and dropped by the assembler: {summary['rows_resent']}")


# ---- re-sent rows at the assembler -----------------------------------------------------------------------------------


def shard_rows(shard_id: str, ordinals: list[int], total: int) -> pa.Table:
    """Result rows of one shard as the inference stage emits them (values depend only on the ordinal)."""
    ordinals_array = np.asarray(ordinals, dtype=np.int64)
    table = build_output_table(
        "embed",
        keys=[f"{shard_id}/key-{o}" for o in ordinals],
        sources=[f"s3://in/{shard_id}.tar"] * len(ordinals),
        ordinals=ordinals_array,
        errors=["bad" if o % 4 == 3 else None for o in ordinals],
        embeddings=np.repeat(ordinals_array[:, None].astype(np.float32), 4, axis=1),
        hidden_size=4,
    )
    last = pa.array([total if o == total - 1 else None for o in ordinals], pa.int64())
    return table.append_column("shard_id", pa.array([shard_id] * len(ordinals))).append_column("shard_rows", last)


class Pipeline:
    """The writer stage and the driver's tracker, in-process: batches in, complete shards' rows out."""

    def __init__(self, tmp_path: Path) -> None:
        self.layout = OutputLayout(str(tmp_path / "out"))
        self.tracker = ShardTracker()

    def feed(self, batches: list[pa.Table]) -> dict[str, pa.Table]:
        completed: dict[str, pa.Table] = {}
        for batch in batches:
            for shard in self.tracker.add(write_fragments(batch, layout=self.layout)):
                assert shard.shard_id not in completed, f"{shard.shard_id} handed out twice"
                completed[shard.shard_id] = read_fragments(self.layout, shard.shard_id, shard.fragments, shard.rows)
        return completed


def test_rows_re_sent_by_a_retry_with_other_block_cuts_are_dropped(tmp_path: Path) -> None:
    # The dead attempt delivered rows 0-5 of shard "a" in two blocks; the retry cut the shard differently and Ray
    # passed on its blocks from index 1: rows 3-7 (3-5 again) and 8-9. Shard "b" is interleaved throughout.
    batches = [
        shard_rows("a", [0, 1, 2], 10),
        shard_rows("b", [0, 1], 4),
        shard_rows("a", [3, 4, 5], 10),
        pa.concat_tables([shard_rows("a", [3, 4, 5, 6, 7], 10), shard_rows("b", [2, 3], 4)]),
        shard_rows("b", [3], 4),  # after "b" was complete
        shard_rows("a", [8, 9, 9], 10),  # twice within one batch, the last row (with the total) included
    ]
    pipeline = Pipeline(tmp_path)
    completed = pipeline.feed(batches)
    assert set(completed) == {"a", "b"}
    for shard_id, size in (("a", 10), ("b", 4)):
        assert completed[shard_id].column("ordinal").to_pylist() == list(range(size)), shard_id
        clean = shard_rows(shard_id, list(range(size)), size).drop_columns(["shard_id", "shard_rows"])
        assert completed[shard_id].equals(clean), shard_id
    tracker = pipeline.tracker
    assert tracker.rows_accepted == 14 and tracker.rows_resent == 5
    assert tracker.error_rows_accepted == 3  # ordinals 3 and 7 of "a", 3 of "b": each counted once
    assert tracker.pending_shards() == {}


def test_a_re_sent_ordinal_with_another_sample_is_refused(tmp_path: Path) -> None:
    impostor = shard_rows("a", [1, 2], 3).set_column(0, "key", pa.array(["a/other", "a/key-2"]))
    with pytest.raises(ShardAssemblyError, match="ordinal 1 arrived twice with different samples"):
        Pipeline(tmp_path).feed([shard_rows("a", [0, 1], 3), impostor])


def test_a_shard_whose_rows_never_all_arrive_stays_pending(tmp_path: Path) -> None:
    # Coarser cuts in the retry lose rows instead: the dead attempt delivered rows 0-1 as block 0, the retry's block
    # 0 (rows 0-3) was dropped as already delivered, and its block 1 holds rows 4-5. Rows 2-3 never arrive; the job
    # must not commit the shard (pipeline.plan raises IncompleteShardsError at the end of the stream).
    pipeline = Pipeline(tmp_path)
    completed = pipeline.feed([shard_rows("a", [0, 1], 6), shard_rows("a", [4, 5], 6)])
    assert completed == {} and pipeline.tracker.pending_shards() == {"a": (4, 6)}


def test_failpoint_syntax_and_a_marker_fires_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert failpoints.parse("") == {}
    parsed = failpoints.parse(f"commit.before_record=2, infer.batch:pause@{tmp_path / 'm'}")
    assert parsed["commit.before_record"] == failpoints.Failpoint("commit.before_record", 2, "kill", None)
    assert parsed["infer.batch"] == failpoints.Failpoint("infer.batch", 1, "pause", str(tmp_path / "m"))
    for bad in ("nope", "read.batch=0", "read.batch=x", "read.batch:explode"):
        with pytest.raises(ValueError, match="VIT_HYBRID_FAILPOINTS"):
            failpoints.parse(bad)

    exits: list[int] = []
    monkeypatch.setattr(failpoints.os, "_exit", exits.append)
    monkeypatch.setenv(failpoints.ENVIRONMENT_VARIABLE, f"read.batch=2:exit@{tmp_path / 'fired'}")
    failpoints.reset()
    try:
        failpoints.failpoint("infer.batch")  # not named: nothing happens
        failpoints.failpoint("read.batch")  # first hit: not yet
        assert exits == [] and not (tmp_path / "fired").exists()
        failpoints.failpoint("read.batch")  # second hit: fires and leaves its marker
        assert exits == [1] and (tmp_path / "fired").exists()
        failpoints.reset()
        failpoints.failpoint("read.batch")
        failpoints.failpoint("read.batch")  # the marker exists: a retry does not fire again
        assert exits == [1]
    finally:
        monkeypatch.delenv(failpoints.ENVIRONMENT_VARIABLE)
        failpoints.reset()


# ---- the driver's consume-and-commit loop, without Ray ----------------------------------------------------------------


class FakeDataset:
    """Stands in for the Ray dataset: yields the given result batches, then raises ``error`` if one is given."""

    def __init__(self, batches: list[pa.Table], error: BaseException | None = None) -> None:
        self.batches, self.error = batches, error

    def iter_batches(self, **_: object) -> Iterator[pa.Table]:
        yield from self.batches
        if self.error is not None:
            raise self.error


class InProcessFinalizer:
    """Runs finalize tasks at once, in this process (the Ray version runs them on workers, a bounded number at once)."""

    max_in_flight = 2

    def __init__(self, config: JobConfig, layout: OutputLayout) -> None:
        self.config, self.layout, self.done, self.in_flight = config, layout, 0, 0
        self.unreadable: dict[str, str] = {}

    def submit(self, shard: CompleteShard) -> None:
        schema = output_schema("embed", 4)
        result = finalize_shard(
            self.layout, shard.shard_id, shard.fragments, shard.rows,
            rows_per_file=self.config.rows_per_file, metadata={}, schema=schema,
        )  # fmt: skip
        if UNREADABLE in result:
            self.unreadable[shard.shard_id] = result[UNREADABLE]
        else:
            self.done += 1

    def collect(self, *, block: bool) -> int:
        done, self.done = self.done, 0
        return done


def consume(tmp_path: Path, dataset: FakeDataset) -> tuple[JobSummary, Path]:
    output = tmp_path / "out"
    config = JobConfig(task="embed", input="unused", output=str(output), model="unused", rows_per_file=4)
    summary = JobSummary(output=str(output))
    layout = OutputLayout(str(output))
    written = FakeDataset([write_fragments(batch, layout=layout) for batch in dataset.batches], dataset.error)
    _track_and_finalize(config, written, summary, InProcessFinalizer(config, layout))
    return summary, output


def test_the_driver_commits_each_shard_once_when_rows_arrive_twice(tmp_path: Path) -> None:
    batches = [shard_rows("a", [0, 1, 2], 5), shard_rows("a", [2, 3, 4], 5), shard_rows("a", [4], 5)]
    summary, output = consume(tmp_path, FakeDataset(batches))
    assert (summary.samples, summary.rows_resent, summary.shards_committed) == (5, 2, 1)
    record = json.loads(Path(f"{output}.job", "commits", "a.json").read_text())
    assert record["rows"] == 5 and record["error_rows"] == 1
    assert record["files"] == ["part-a-00000.parquet", "errors/part-a.errors"]
    table = pa.concat_tables([pq.read_table(output / name) for name in record["files"]])
    assert sorted(table.column("key").to_pylist()) == [f"a/key-{o}" for o in range(5)]
    # The finalize step deleted the fragments it used; the one holding only re-sent rows waits for the end-of-job sweep.
    assert len(list(Path(f"{output}.job", "fragments", "a").iterdir())) == 1


def test_a_shard_missing_rows_at_the_end_is_reported_and_not_committed(tmp_path: Path) -> None:
    batches = [shard_rows("a", [0, 1], 2), shard_rows("b", [0, 1], 6), shard_rows("b", [4, 5], 6)]
    with pytest.raises(IncompleteShardsError, match=r"1 shard\(s\) still missing rows: b \(4 of 6 rows\)"):
        consume(tmp_path, FakeDataset(batches))
    assert sorted(path.name for path in (tmp_path / "out.job" / "commits").iterdir()) == ["a.json"]


def test_a_shard_read_error_inside_ray_becomes_one_clear_job_error(tmp_path: Path) -> None:
    from ray.exceptions import RayTaskError

    original = ShardReadError("access denied opening shard s3://bucket/x.tar: Forbidden")
    remote = RayTaskError("MapBatches(read_and_decode_shards)", "Traceback (most recent call last): ...", original)
    wrapped = RuntimeError("Failed to apply UDF transform")  # as Ray Data re-raises it, with the task's error as cause
    wrapped.__cause__ = remote.as_instanceof_cause()
    wrapped.__cause__.args = (f"{wrapped.__cause__.args[0]}\nFailed to apply UDF transform after 1/1 attempts",)
    with pytest.raises(JobError) as raised:
        consume(tmp_path, FakeDataset([shard_rows("a", [0, 1], 2)], error=wrapped))
    message = str(raised.value)
    assert message.startswith("cannot read input: access denied opening shard s3://bucket/x.tar: Forbidden. ")
    assert "Traceback" not in message and "UDF" not in message and "run the same command again" in message
    assert (tmp_path / "out.job" / "commits" / "a.json").exists()  # the complete shard was committed first


def test_a_retried_finalize_task_after_its_record_changes_nothing(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    (shard,) = ShardTracker().add(write_fragments(shard_rows("a", [0, 1, 2], 3), layout=layout))
    schema = output_schema("embed", 4)
    first = finalize_shard(layout, "a", shard.fragments, 3, rows_per_file=2, metadata={}, schema=schema)
    stamps = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in first["files"]}
    again = finalize_shard(layout, "a", shard.fragments, 3, rows_per_file=2, metadata={}, schema=schema)
    assert again == first and {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in first["files"]} == stamps
