"""Storage that fails: transient faults are retried to the clean output; permanent ones stop the job early with one
line naming the URI and the cause; credentials never reach any output, log or record.

The transient test runs the whole job, input AND output on S3, through :class:`tests.reliability.FaultyS3Proxy`,
which fails about 10% of requests (503 SlowDown, 500 InternalError, connection resets before and after the write
happened, bodies cut short), with botocore's own retries turned off (``max_attempts: 1``) so that only this
project's retries (model/storage.py) stand between the faults and the job. The job is a subprocess whose
environment points ``AWS_ENDPOINT_URL`` at the proxy, so its in-process Ray workers use the proxy too.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import boto3
import fsspec
import pytest
import torch

from model.storage import is_transient
from tests.reliability import (
    FaultyS3Proxy,
    all_names,
    assert_no_traceback,
    assert_same_output,
    error_line,
    run_job,
)

SECRET_CANARY = "SECRET-CANARY-123"
KEY_CANARY = "AKIAFAKEFAKE"
ENV_SECRET_CANARY = "ENV-SECRET-CANARY-456"


def test_transient_faults_on_every_request_kind_are_retried_and_no_secret_leaks(
    clean_run, s3_endpoint: str, ray_tmpdir: str, tmp_path: Path
) -> None:
    output = f"s3://{clean_run.bucket}/through-proxy/out"
    storage_options = {
        "key": KEY_CANARY,
        "secret": SECRET_CANARY,
        # botocore retries nothing: every fault reaches model.storage.with_retries.
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
    }
    with FaultyS3Proxy(s3_endpoint, failure_rate=0.1, seed=11) as proxy:
        finished = run_job(
            [*clean_run.args(output), "--storage-options", json.dumps(storage_options), "--log-level", "INFO"],
            ray_tmpdir=ray_tmpdir,
            env={
                "AWS_ENDPOINT_URL": proxy.url,
                "AWS_ACCESS_KEY_ID": "AKIAENVFAKE",
                "AWS_SECRET_ACCESS_KEY": ENV_SECRET_CANARY,
            },
        )
    assert finished.returncode == 0, finished.stderr[-5000:]
    print(f"proxy: {proxy.requests} requests {proxy.methods}, faults {proxy.faults}")
    assert proxy.fault_count >= 10 and all(count > 0 for count in proxy.faults.values()), proxy.faults
    assert proxy.methods.get("PUT", 0) > 0 and proxy.methods.get("GET", 0) > 0

    assert_same_output(output, clean_run.output)

    # No credential anywhere: not in the output's files (data, records, manifest, summary, Parquet metadata), not
    # in what the job printed, not in the logs of its Ray cluster (driver, workers, raylet, GCS).
    filesystem, root = fsspec.core.url_to_fs(output)
    stored = {path: filesystem.cat_file(path) for folder in (root, f"{root}.job") for path in filesystem.find(folder)}
    assert {"job.json", "plan.parquet", "manifest.json", "summary.json", "SUCCESS"} <= {
        p.rsplit("/", 1)[-1] for p in stored
    }
    ray_logs = {str(path): path.read_bytes() for path in Path(ray_tmpdir).rglob("*") if path.is_file()}
    assert any("worker" in name for name in ray_logs), "no Ray worker logs to check"
    texts = {"stdout": finished.stdout.encode(), "stderr": finished.stderr.encode(), **stored, **ray_logs}
    for canary in (SECRET_CANARY, KEY_CANARY, ENV_SECRET_CANARY):
        leaks = [name for name, data in texts.items() if canary.encode() in data]
        assert not leaks, f"{canary} found in {leaks}"
    job = json.loads(stored[f"{root}.job/job.json"])
    assert job["arguments"]["storage_options"]["secret"] == "***"


def test_s3_throttling_server_errors_and_resets_count_as_transient() -> None:
    """What s3fs makes of S3's error answers (as the proxy sends them), classified by model.storage."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    def s3_error(code: str, status: int, message: str) -> BaseException:
        response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return translate_boto_error(ClientError(response, "PutObject"))

    # S3's own messages: none of them names its code, so the errno s3fs picks is what tells them apart.
    for code, status, message in [
        ("SlowDown", 503, "Please reduce your request rate."),
        ("ServiceUnavailable", 503, "Service is unable to handle request."),
        ("InternalError", 500, "We encountered an internal error. Please try again."),
        ("RequestTimeout", 400, "Your socket connection to the server was not read from or written to in time."),
    ]:
        assert is_transient(s3_error(code, status, message)), code
    for code, status, message in [
        ("NoSuchBucket", 404, "The specified bucket does not exist"),
        ("NoSuchKey", 404, "The specified key does not exist."),
        ("AccessDenied", 403, "Access Denied"),
        ("InvalidBucketName", 400, "The specified bucket is not valid."),
    ]:
        assert not is_transient(s3_error(code, status, message)), code
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))
    # A connection dropped before the response: botocore names the URL, and s3fs passes the error on unchanged.
    from botocore.exceptions import EndpointConnectionError

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket/key.parquet"))


# ---- permanent errors ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anonymous_bucket(s3_endpoint: str) -> str:
    """A bucket anyone may list, holding one public and one private shard (as a misconfigured share would)."""
    from tests.corpus import make_samples, write_webdataset

    name = f"anon-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name, ACL="public-read")
    client.put_object(Bucket=name, Key="denied/out.job/job.json", Body=b"{}", ACL="private")
    for index, acl in enumerate(("public-read", "private")):
        key = f"shards/{index:03d}-{acl}.tar"
        write_webdataset(f"s3://{name}/{key}", make_samples(4, seed=index, prefix=f"{acl}-"))
        client.put_object_acl(Bucket=name, Key=key, ACL=acl)
    return name


def cases(clean_run, anonymous_bucket: str, tmp_path: Path) -> dict[str, tuple[dict[str, str], dict, str]]:
    """name -> (argument changes, environment changes, the URI the message must name)."""
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    anonymous = json.dumps({"anon": True})
    no_credentials = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return {
        "input bucket missing": ({"--input": f"s3://{missing}/shards"}, {}, f"s3://{missing}/shards"),
        "model missing": ({"--model": f"s3://{missing}/model"}, {}, f"s3://{missing}/model"),
        "no credentials": ({}, no_credentials, clean_run.input),
        "output bucket missing": ({"--output": f"s3://{missing}/out"}, {}, f"s3://{missing}/out"),
        # moto lets anonymous requests write anywhere, but not read private objects: the output's private job record
        # cannot be read, as with credentials that lack s3:GetObject on the output bucket.
        "output access denied": (
            {"--input": f"s3://{anonymous_bucket}/shards/000-public-read.tar", "--storage-options": anonymous,
             "--output": f"s3://{anonymous_bucket}/denied/out"},
            {},
            f"s3://{anonymous_bucket}/denied/out",
        ),
    }


CAUSES = {
    "input bucket missing": "does not exist",
    "model missing": "no config.json",
    "no credentials": "Unable to locate credentials",
    "output bucket missing": "bucket does not exist",
    "output access denied": "PermissionError",  # moto answers 403 Forbidden where S3 says Access Denied
}


@pytest.mark.parametrize("case", list(CAUSES))
def test_a_storage_error_that_does_not_go_away_stops_the_job_early(
    case: str, clean_run, anonymous_bucket: str, ray_tmpdir: str, tmp_path: Path
) -> None:
    changes, env, named = cases(clean_run, anonymous_bucket, tmp_path)[case]
    args = clean_run.args(str(tmp_path / "out"))
    for flag, value in changes.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    # --device cpu: the compute dtype is known without the cluster, so every check here runs before Ray starts.
    finished = run_job([*args, "--device", "cpu"], ray_tmpdir=ray_tmpdir, env=env, timeout_s=120)
    assert finished.returncode == 2, (case, finished.stdout[-2000:], finished.stderr[-3000:])
    assert_no_traceback(finished.stderr)
    message = error_line(finished.stderr)
    assert named in message and CAUSES[case].lower() in message.lower(), (case, message)
    assert not (Path(ray_tmpdir) / "ray").exists(), "Ray was started: the error should stop the job before it"


def test_a_shard_that_cannot_be_read_stops_the_job_naming_it(
    anonymous_bucket: str, clean_run, ray_tmpdir: str, tmp_path: Path
) -> None:
    """Access denied on input: moto, like a bucket that allows anonymous listing, lets the plan list the shards, and
    refuses the private one when a read task opens it. The job stops on that, not on a Ray stack trace."""
    output = tmp_path / "out"
    args = clean_run.args(str(output))
    args[args.index("--input") + 1] = f"s3://{anonymous_bucket}/shards"
    finished = run_job([*args, "--storage-options", json.dumps({"anon": True})], ray_tmpdir=ray_tmpdir)
    assert finished.returncode == 2, finished.stderr[-5000:]
    message = error_line(finished.stderr)
    assert f"s3://{anonymous_bucket}/shards/001-private.tar" in message and "access denied" in message, message
    assert "run the same command again to resume" in message
    assert_no_traceback(finished.stderr)
    assert ".job/SUCCESS" not in all_names(str(output))
    assert all_names(str(output)), "the job wrote nothing: the check above would pass vacuously"


class WritesAFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what an attacker's pickle does
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_pickles_code_is_refused_without_running_it(
    clean_run, ray_tmpdir: str, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(Path(clean_run.model) / name, model / name)
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "payload": WritesAFileWhenUnpickled(marker)}, model / "pytorch_model.bin")
    args = clean_run.args(str(tmp_path / "out"))
    args[args.index("--model") + 1] = str(model)
    finished = run_job([*args, "--device", "cpu"], ray_tmpdir=ray_tmpdir, timeout_s=120)
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert "refusing to load" in error_line(finished.stderr) and "pytorch_model.bin" in error_line(finished.stderr)
    assert not marker.exists()
