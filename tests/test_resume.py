"""Kill the job (SIGKILL, as an OOM kill or a lost node would) at each stage, rerun the same command, and get exactly
the clean run's output: the same files with the same rows, every committed shard left untouched.

The job runs as ``python -m jobs.classify`` in a subprocess (tests/reliability.py), at alternate stages with its own
in-process Ray, which the SIGKILL takes down with the driver through Ray's fate sharing, and joined to a cluster that
outlives the driver and ends the dead job's workers (as under ``ray job submit``). The stages are
hit deterministically with :mod:`pipeline.failpoints`: a read task, an inference actor or a finalize task (between
publishing a shard's data files and writing its commit record) pauses at a named point (the test waits for its
marker file, then kills the driver from outside), or the driver kills itself between the manifest and ``SUCCESS``.
Each
rerun resumes the previous one, so the last run finishes a job that was killed four times.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.reliability import (
    BOOK,
    OrphanWatch,
    all_names,
    assert_no_traceback,
    assert_same_output,
    assert_visible_files_match,
    committed_shards,
    error_line,
    kill_hard,
    make_checkpoint,
    modification_times,
    read_json,
    run_job,
    short_tmpdir,
    start_job,
    wait_for,
)

# After a SIGKILL of the driver, Ray's own processes end without help: GCS, raylet, dashboard and monitors die with
# the driver (the kernel signals them: Ray starts them with PR_SET_PDEATHSIG), workers and actors exit within seconds
# of losing their raylet. Only the raylet's two agents (DashboardAgent, RuntimeEnvAgent) notice at once but then
# spend about a minute trying to report the raylet's death to the dead GCS before they exit. They hold no job state;
# the one visible effect is that the dashboard agent's HTTP port (52365) stays taken meanwhile, so a rerun within
# that minute runs with its agent's HTTP service disabled (logged by Ray; the job itself is unaffected).
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_titles(pids: list[int]) -> list[str]:
    titles = []
    for pid in pids:
        try:
            titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
        except OSError:
            continue
    return titles


@pytest.fixture()
def orphans():
    """Watches the Ray processes of killed drivers (nothing here signals them). At the end, all but the two agents
    must be gone; the agents are left to exit on their own, which they do about a minute after the kill."""
    watch = OrphanWatch()
    folders: list[str] = []
    yield watch, folders

    def non_agents() -> dict[str, list[str]]:
        running = {folder: process_titles(pids) for folder, pids in watch.still_running().items()}
        return {folder: [t for t in titles if t not in AGENTS] for folder, titles in running.items() if titles}

    deadline = time.monotonic() + 30
    while any(non_agents().values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    leftovers = {folder: titles for folder, titles in non_agents().items() if titles}
    watch.stop()
    print(f"seconds until each killed driver's Ray processes were gone (None: agents still exiting): {watch.lifetimes}")
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    assert not leftovers, f"Ray processes of killed drivers still running: {leftovers}"


def files_of_committed_shards(output: str) -> list[str]:
    names = []
    for shard_id in committed_shards(output):
        names.append(f"{BOOK}commits/{shard_id}.json")
        names.extend(read_json(output, f"{BOOK}commits/{shard_id}.json")["files"])
    return names


# (stage, failpoints, how the driver dies, where the job runs): "pause" points are waited for and the driver killed
# from outside; the others make the driver SIGKILL itself. "own": the job's own in-process Ray, which dies with the
# driver; "cluster": the module's job cluster, which outlives the driver and ends its job's workers, as a cluster
# under `ray job submit` does.
STAGES = [
    ("reading", "read.batch=1:pause@{marker}", "external", "own"),
    ("inference", "infer.batch=5:pause@{marker}", "external", "cluster"),
    ("writing", "commit.before_record:pause@{marker}", "external", "own"),
    ("finishing", "finish.before_success", "self", "cluster"),
]


def test_killed_at_every_stage_then_resumed_gives_the_clean_output(
    clean_run, orphans, job_cluster: str, tmp_path: Path
) -> None:
    watch, folders = orphans

    def ray_tmpdir() -> str:
        folders.append(short_tmpdir())
        return folders[-1]

    output = str(tmp_path / "out")
    args = clean_run.args(output)
    for stage, failpoints, death, where in STAGES:
        before = files_of_committed_shards(output) if Path(output).exists() else []
        stamps = modification_times(output, before)
        marker = tmp_path / f"{stage}.marker"
        process = start_job(
            args,
            ray_tmpdir=ray_tmpdir(),
            env={"VIT_HYBRID_FAILPOINTS": failpoints.format(marker=marker)},
            log=tmp_path / f"{stage}.log",
            ray_address=job_cluster if where == "cluster" else "local",
        )
        if death == "external":
            wait_for(marker.exists, timeout_s=180, what=f"the {stage} failpoint", process=process)
            kill_hard(process)
        else:
            process.wait(timeout=300)
        watch.watch(folders[-1])
        log = (tmp_path / f"{stage}.log").read_text(errors="replace")
        assert process.returncode == -9, f"{stage}: exit {process.returncode}\n{log[-3000:]}"

        # What a reader sees right after the kill: only complete files, each equal to the clean run's.
        names = all_names(output)
        assert f"{BOOK}job.json" in names and f"{BOOK}SUCCESS" not in names, (stage, names)
        assert_visible_files_match(output, clean_run.output)
        for shard_id in committed_shards(output):
            name = f"{BOOK}commits/{shard_id}.json"
            assert read_json(output, name) == read_json(clean_run.output, name), (stage, shard_id)
        # Shards committed by earlier runs were not redone: their records and files were not written again.
        assert modification_times(output, before) == stamps, stage
        if stage == "writing":
            uncommitted = {name for name in names if not name.startswith(BOOK)} - set(files_of_committed_shards(output))
            assert uncommitted, "the kill between data files and commit record left no uncommitted data file"
        if stage == "finishing":
            assert len(committed_shards(output)) == len(committed_shards(clean_run.output))
            assert f"{BOOK}manifest.json" in names

    before = files_of_committed_shards(output)
    stamps = modification_times(output, before)
    # At once: the last killed run's job may still be ending on the cluster.
    finished = run_job(args, ray_tmpdir=ray_tmpdir(), ray_address=job_cluster)
    assert finished.returncode == 0, finished.stderr[-5000:]
    assert modification_times(output, before) == stamps
    assert_same_output(output, clean_run.output)
    summary = read_json(output, f"{BOOK}summary.json")
    assert summary["shards_skipped"] == len(committed_shards(clean_run.output))  # everything was committed already
    assert summary["samples"] == 0 and summary["status"] == "succeeded"

    # A rerun of the finished job changes nothing (--device cpu: known without starting Ray; JOB_FLAGS pin float32).
    # A rerun with another model, preprocessing or dtype is refused before any work.
    stamps = modification_times(output, all_names(output))
    again = run_job([*args, "--device", "cpu"], ray_tmpdir=ray_tmpdir())
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-3000:]
    other_model = make_checkpoint(tmp_path / "other-model", seed=6)
    changed = [*args, "--device", "cpu", "--model", other_model, "--exact-decode", "--dtype", "bfloat16"]
    refused = run_job(changed, ray_tmpdir=ray_tmpdir())  # the last --model wins
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert_no_traceback(refused.stderr)
    assert output in error_line(refused.stderr) and "holds results of a different job" in refused.stderr
    differences = ("weights_sha256: '", "preprocessing: {", "'fast_decode': True", "dtype: 'float32' -> 'bfloat16'")
    for difference in differences:
        assert difference in refused.stderr, (difference, refused.stderr[-3000:])
    assert "--overwrite" in refused.stderr
    assert modification_times(output, all_names(output)) == stamps
