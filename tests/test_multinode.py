"""The job on a real multi-node Ray cluster on this machine: a head that runs no tasks and two worker nodes, each its
own raylet (``ray.cluster_utils.Cluster``, as Ray's own node-failure tests do). The job joins it through
``RAY_ADDRESS`` as under ``ray job submit``, in a subprocess.

Shown here: decode tasks and inference actors run on both worker nodes and never on the head (placement files left
by :func:`pipeline.failpoints.record_placement`); the result rows are written by the workers (the driver's process
writes no data file: it only ever sees fragment metadata); and removing a worker node in the middle of a job leaves
an output identical to a clean run's, after at most one rerun of the same command.

The stand-in model (``VIT_HYBRID_STAND_IN_MODEL=0``) replaces the network: placement and recovery are the point here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.checkout import checkout_python_path
from tests.corpus import make_samples, write_webdataset
from tests.reliability import (
    PROJECT_ROOT,
    assert_same_output,
    classify_command,
    committed_shards,
    job_environment,
    make_checkpoint,
    short_tmpdir,
    wait_for,
)

SHARDS = 6
SAMPLES_PER_SHARD = 24


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs: runs no tasks) + two worker nodes of 3 logical CPUs each (an actor, a decode task and the writer
    stage fit on one), in a private temp dir."""
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = checkout_python_path()
    # Workers inherit the environment of the process that starts the raylets (this one), not the joining driver's.
    os.environ["VIT_HYBRID_STAND_IN_MODEL"] = "0"
    temp_dir = short_tmpdir()
    os.environ["VIT_HYBRID_PLACEMENT_LOG"] = os.path.join(temp_dir, "placements")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False},
        shutdown_at_exit=True,
    )
    workers = [cluster.add_node(num_cpus=3, object_store_memory=150 * 1024**2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers, temp_dir
    finally:
        cluster.shutdown()
        os.environ.pop("VIT_HYBRID_STAND_IN_MODEL", None)
        os.environ.pop("VIT_HYBRID_PLACEMENT_LOG", None)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("multinode")
    for index in range(SHARDS):
        samples = make_samples(SAMPLES_PER_SHARD, seed=300 + index, prefix=f"n{index}/img-", bad_every=7)
        write_webdataset(str(base / "shards" / f"part-{index:03d}.tar"), samples)
    return str(base / "shards"), make_checkpoint(base / "checkpoint")


def start(cluster, inputs: tuple[str, str], output: Path, log: Path) -> subprocess.Popen:
    shards, model = inputs
    args = ["--input", shards, "--output", str(output), "--model", model, "--batch-size", "8",
            "--rows-per-file", "10", "--min-actors", "2", "--max-actors", "2", "--device", "cpu"]  # fmt: skip
    env = job_environment(cluster[2], {"RAY_ADDRESS": cluster[0].address})
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(classify_command(*args), cwd=PROJECT_ROOT, env=env, stdout=handle, stderr=handle)


def nodes_of(placements: Path, stage: str) -> set[str]:
    return {path.name.split(".")[1] for path in placements.glob(f"{stage}.*")} if placements.exists() else set()


def test_work_spreads_over_the_worker_nodes_and_survives_losing_one(cluster, inputs, tmp_path: Path) -> None:
    ray_cluster, workers, _ = cluster
    head_id = ray_cluster.head_node.node_id
    worker_ids = {node.node_id for node in workers}

    placements = Path(os.environ["VIT_HYBRID_PLACEMENT_LOG"])
    clean = tmp_path / "clean"
    process = start(cluster, inputs, clean, tmp_path / "clean.log")
    assert process.wait(timeout=600) == 0, (tmp_path / "clean.log").read_text(errors="replace")[-5000:]
    for stage in ("decode", "actor"):
        nodes = nodes_of(placements, stage)
        assert head_id not in nodes, f"{stage} ran on the head, which has no CPUs for it"
        assert nodes == worker_ids, f"{stage} ran on {nodes}, not on both workers {worker_ids}"
    assert len(committed_shards(str(clean))) == SHARDS

    # The same job again, losing a worker node once the work is under way on both.
    shutil.rmtree(placements)  # each job's workers and actors are its own: what appears now is the second job's
    output = tmp_path / "lossy"
    process = start(cluster, inputs, output, tmp_path / "lossy.log")
    wait_for(
        lambda: len(nodes_of(placements, "actor")) == 2 and len(nodes_of(placements, "decode")) == 2,
        timeout_s=300,
        what="actors and decode tasks on both workers",
        process=process,
    )
    victim = workers[1]
    ray_cluster.remove_node(victim)
    first = process.wait(timeout=600)
    log = (tmp_path / "lossy.log").read_text(errors="replace")
    if first != 0:
        # At most one rerun of the same command, on the surviving node.
        rerun = start(cluster, inputs, output, tmp_path / "rerun.log")
        assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text(errors="replace")[-5000:]
    print(f"first attempt after losing a node exited {first}; last lines:\n{log[-1500:]}")
    assert_same_output(str(output), str(clean))
