"""The way users run it on a cluster: ``ray start --head``, ``ray job submit --working-dir .``, output on S3.

Starts a real local Ray cluster on 127.0.0.1, submits the classification job against moto's S3 server, waits for it
to succeed, checks the output row by row, and stops the cluster with ``ray stop``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from tests.corpus import make_samples, write_webdataset
from tests.pipeline_helpers import PROJECT_ROOT, REFERENCE_DTYPE, check_rows, expected_predictions, read_output
from tests.reference import small_config_dict, write_reference_checkpoint

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_env() -> dict[str, str]:
    """The test's environment with this interpreter's bin first (the job's ``python`` is the cluster's)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # `ray start` turns token auth on when this file exists
    return env


@pytest.fixture()
def ray_cluster(s3_endpoint: str):
    """A real local cluster started the way an operator starts one; yields the job server's address."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = _cluster_env()
    dashboard_port = _free_port()
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        subprocess.run([RAY, "stop"], env=env, capture_output=True, timeout=120)


def submit_when_ready(command: list[str], timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    """``ray job submit``, retried while the freshly started head's job agent is not up yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        submitted = subprocess.run(
            command, cwd=PROJECT_ROOT, env=_cluster_env(), capture_output=True, text=True, timeout=600
        )
        if "No available agent to submit job" not in submitted.stderr + submitted.stdout:
            return submitted
        if time.monotonic() > deadline:
            return submitted
        time.sleep(2)


def test_ray_job_submit_classifies_images_on_s3(ray_cluster: str, s3_bucket: str, tmp_path: Path) -> None:
    checkpoint = write_reference_checkpoint(tmp_path / "checkpoint", small_config_dict(num_labels=12, image_size=64))
    model_uri = f"s3://{s3_bucket}/models/small"
    fsspec.filesystem("s3").put(f"{checkpoint}/", f"{s3_bucket}/models/small/", recursive=True)
    samples = {}
    for index in range(2):
        uri = f"s3://{s3_bucket}/shards/part-{index:03d}.tar"
        shard = make_samples(24, seed=40 + index, prefix=f"s{index}-", bad_every=10)
        write_webdataset(uri, shard)
        samples.update({(uri, sample.key): sample for sample in shard})
    output = f"s3://{s3_bucket}/predictions"

    aws_variables = {name: os.environ[name] for name in os.environ if name.startswith("AWS_")}
    submitted = submit_when_ready(
        [RAY, "job", "submit", f"--address={ray_cluster}", "--working-dir", ".",
         "--runtime-env-json", json.dumps({"env_vars": aws_variables}),
         "--", "python", "-m", "jobs.classify", "--input", f"s3://{s3_bucket}/shards", "--output", output,
         "--model", model_uri, "--top-k", "3", "--batch-size", "8", "--dtype", REFERENCE_DTYPE],
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    assert "succeeded" in submitted.stdout, submitted.stdout[-4000:]
    assert f"{len(samples)} samples" in submitted.stdout

    by_key = {key: sample for (_, key), sample in samples.items()}
    expected_by_key = expected_predictions(str(checkpoint), by_key, fast=True, top_k=3)
    expected = {(source, key): expected_by_key[key] for (source, key) in samples if key in expected_by_key}
    check_rows(read_output(output), samples, expected)
    assert fsspec.filesystem("s3").exists(f"{s3_bucket}/predictions.job/SUCCESS")
