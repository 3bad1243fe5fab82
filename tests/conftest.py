"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1) and small random checkpoints.

The S3 server runs as a separate process so that Ray workers (other processes) reach it over HTTP exactly as
they would reach real object storage; s3fs and boto3 find it through ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited early with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server at {url} did not answer within {timeout_s}s")


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port for the whole session; yield its URL.

    The standard AWS variables are set in ``os.environ`` for the session, so s3fs/boto3 in this process and in
    any child process (Ray workers, ``ray job submit``) use the fake endpoint and fake credentials.
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {name: os.environ.get(name) for name in [*S3_TEST_ENV, "AWS_ENDPOINT_URL"]}
    try:
        _wait_until_serving(endpoint + "/moto-api/", process)
        os.environ.update(S3_TEST_ENV)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket per test; yields its name (use ``f"s3://{s3_bucket}/..."``)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str):
    """The reliability corpus on S3 and one clean, uninterrupted job over it, shared by every reliability test."""
    from tests.reliability import reference_job

    return reference_job(tmp_path_factory, s3_endpoint)


@pytest.fixture()
def ray_tmpdir() -> Iterator[str]:
    """A short temporary folder for a job's own Ray (Ray's socket paths must stay under 107 bytes)."""
    from tests.reliability import short_tmpdir

    folder = short_tmpdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
