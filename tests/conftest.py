"""Shared pytest fixtures: a real S3 endpoint (moto's server on 127.0.0.1, from :mod:`fixtures.s3`), a bucket per
test, the reliability reference run and a short Ray temp folder.

The S3 server runs as a separate process so that Ray workers (other processes) reach it over HTTP exactly as
they would reach real object storage; s3fs and boto3 find it through ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest

from fixtures.s3 import S3_TEST_ENV, local_s3_server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port for the whole session; yield its URL.

    The standard AWS variables are set in ``os.environ`` for the session, so s3fs/boto3 in this process and in
    any child process (Ray workers, ``ray job submit``) use the fake endpoint and fake credentials.
    """
    with local_s3_server(S3_TEST_ENV) as endpoint:
        yield endpoint


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


@pytest.fixture(scope="module")
def job_cluster(s3_endpoint: str) -> Iterator[str]:
    """The address of a Ray cluster that this module's subprocess jobs may join instead of starting their own
    (:func:`tests.reliability.running_job_cluster`); its workers see the S3 test server."""
    from tests.reliability import running_job_cluster

    with running_job_cluster() as address:
        yield address
