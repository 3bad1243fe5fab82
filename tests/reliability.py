"""Shared helpers for the reliability tests: jobs run as real subprocesses, a fault-injecting S3 proxy, and the checks
that an output equals a clean run's, file by file and row by row.

Jobs run as ``python -m jobs.classify`` in a subprocess, which starts its own Ray in-process, so that a SIGKILL is
real: the driver dies without cleaning up. Every subprocess gets

* ``PYTHONPATH`` = this checkout, so it works whether or not the project is pip-installed;
* ``RAY_TMPDIR`` = a short private folder, so its Ray never joins a cluster that someone else started on this machine
  (``ray.init()`` reads ``<tmp>/ray/ray_current_cluster``) and its processes can be found by their environment;
* ``RAY_ADDRESS=local``, for the same reason; or the address of a module's shared job cluster
  (:func:`running_job_cluster`) for the jobs whose own Ray is not the point.

The reference corpus (six small webdataset shards on the moto S3 server) and one clean run over it are made once
per test session and shared by the modules that compare against it (:func:`reference_job`).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fixtures.checkout import checkout_python_path
from tests.corpus import Sample, make_samples, write_webdataset
from tests.reference import small_config_dict, write_reference_checkpoint

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FLOAT_TOLERANCE = 1e-6
SORT_KEYS = [("source", "ascending"), ("key", "ascending")]


# --------------------------------------------------------------------------------------------------------------------
# Jobs as subprocesses
# --------------------------------------------------------------------------------------------------------------------


def job_environment(
    ray_tmpdir: str, extra: Mapping[str, str | None] | None = None, *, ray_address: str = "local"
) -> dict[str, str]:
    """The environment of a job subprocess: this process's (S3 test variables included) plus isolation for Ray: a Ray
    of its own (``ray_address="local"``) or the cluster at ``ray_address``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = checkout_python_path()
    env["RAY_TMPDIR"] = ray_tmpdir
    env["RAY_ADDRESS"] = ray_address
    env.pop("VIT_HYBRID_FAILPOINTS", None)
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def short_tmpdir() -> str:
    """A short folder for ``RAY_TMPDIR``: Ray's socket paths under it must stay below the 107-byte AF_UNIX limit."""
    return tempfile.mkdtemp(prefix="rt", dir="/tmp")


@contextlib.contextmanager
def running_job_cluster() -> Iterator[str]:
    """A one-node Ray cluster on this machine, started as a job starts its own (same ``ray.init()`` options: no
    dashboard, idle workers kept), for subprocess jobs to join through ``RAY_ADDRESS`` as under ``ray job submit``;
    yields its address. A job that joins is spared starting Ray and Ray Data's helper actors and stopping them again:
    a 32-image job took 27-28 s with its own Ray and 16-17 s joined on the 2-core test machine.

    Its workers inherit this process's environment (the S3 test variables; ``PYTHONPATH`` is set to this checkout
    while the node starts); a job's failpoints reach them through its runtime_env
    (:data:`pipeline.preflight.WORKER_SWITCHES`). Tests hold one per module, not per session: ``ray stop`` (the
    ``ray job submit`` test's teardown) ends every Ray on the machine.
    """
    from ray.cluster_utils import Cluster

    from pipeline.preflight import local_ray_options

    temp_dir = short_tmpdir()
    python_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = checkout_python_path()
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"temp_dir": temp_dir, **local_ray_options()})
        cluster.wait_for_nodes()
    finally:
        if python_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = python_path
    try:
        yield cluster.address
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def classify_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.classify", *args, "--log-level", "WARNING"]


def run_job(
    args: Sequence[str],
    *,
    ray_tmpdir: str,
    env: Mapping[str, str | None] | None = None,
    timeout_s: float = 300,
    ray_address: str = "local",
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m jobs.classify ARGS`` to its end, in its own Ray or joining the cluster at ``ray_address``;
    returns the finished process with stdout and stderr."""
    return subprocess.run(
        classify_command(*args),
        cwd=PROJECT_ROOT,
        env=job_environment(ray_tmpdir, env, ray_address=ray_address),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def start_job(
    args: Sequence[str],
    *,
    ray_tmpdir: str,
    env: Mapping[str, str | None] | None = None,
    log: Path,
    ray_address: str = "local",
) -> subprocess.Popen[bytes]:
    """Start the job (in its own Ray or joining ``ray_address``) and return at once; stdout and stderr go to ``log``
    (a pipe nobody reads could block it)."""
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it; closed when the child ends
    environment = job_environment(ray_tmpdir, env, ray_address=ray_address)
    return subprocess.Popen(classify_command(*args), cwd=PROJECT_ROOT, env=environment, stdout=handle, stderr=handle)


def wait_for(
    condition: Callable[[], bool], *, timeout_s: float, what: str, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the job ended (exit {process.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def kill_hard(process: subprocess.Popen) -> None:
    """SIGKILL the driver (only it: its in-process Ray is left to die on its own, as after a real crash)."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def processes_with_environment(name: str, value: str) -> list[int]:
    """Pids of processes whose environment holds ``name=value`` (read from /proc; nothing is signalled)."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if wanted in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue  # gone, or not ours to read
    return found


class OrphanWatch:
    """Watches, from a background thread, the Ray processes that killed drivers leave behind (found by the
    ``RAY_TMPDIR`` in their environment) and records how long each group lived on after its driver died."""

    def __init__(self) -> None:
        self.lifetimes: dict[str, float | None] = {}  # RAY_TMPDIR -> seconds until all gone (None: still running)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._watched: dict[str, float] = {}
        self._thread.start()

    def watch(self, ray_tmpdir: str) -> None:
        with self._lock:
            self._watched[ray_tmpdir] = time.monotonic()
            self.lifetimes[ray_tmpdir] = None

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                watched = dict(self._watched)
            for folder, since in watched.items():
                if not processes_with_environment("RAY_TMPDIR", folder):
                    with self._lock:
                        self.lifetimes[folder] = round(time.monotonic() - since, 1)
                        del self._watched[folder]

    def still_running(self) -> dict[str, list[int]]:
        with self._lock:
            watched = list(self._watched)
        return {folder: pids for folder in watched if (pids := processes_with_environment("RAY_TMPDIR", folder))}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "aborted:"))]
    assert lines, f"no 'error:' line in stderr:\n{stderr[-3000:]}"
    return lines[-1]


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback (most recent call last)" not in stderr, stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------------------------------------------------


def _filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    filesystem, path = fsspec.core.url_to_fs(uri)
    filesystem.invalidate_cache()
    return filesystem, path.rstrip("/")


#: Names starting with this live in the bookkeeping folder beside the output (``OUT.job/``), not under ``OUT``.
BOOK = ".job/"


def _join(root: str, name: str) -> str:
    """``OUT`` + ``.job/commits/a.json`` -> ``OUT.job/commits/a.json``; any other name is under ``OUT``."""
    return root + name if name.startswith(BOOK) else f"{root}/{name}"


def parquet_names(uri: str) -> list[str]:
    """Names of the data files a reader globbing ``*.parquet`` at the output's top level sees."""
    filesystem, root = _filesystem(uri)
    return sorted(path.rsplit("/", 1)[-1] for path in filesystem.glob(f"{root}/*.parquet"))


def data_names(uri: str) -> list[str]:
    """Every file under the output itself (what DuckDB's ``OUT/**`` reads), relative to it."""
    filesystem, root = _filesystem(uri)
    if not filesystem.exists(root):
        return []
    return sorted(path[len(root) + 1 :] for path in filesystem.find(root))


def all_names(uri: str) -> list[str]:
    """Every file the job wrote: under the output, and under its bookkeeping folder (prefixed ``.job/``)."""
    filesystem, root = _filesystem(uri)
    book = root + BOOK.rstrip("/")
    names = data_names(uri)
    if filesystem.exists(book):
        names += sorted(BOOK + path[len(book) + 1 :] for path in filesystem.find(book))
    return names


def read_table(uri: str, name: str) -> pa.Table:
    filesystem, root = _filesystem(uri)
    with filesystem.open(_join(root, name), "rb") as handle:
        return pq.read_table(io.BytesIO(handle.read()))


def read_json(uri: str, name: str) -> Any:
    filesystem, root = _filesystem(uri)
    return json.loads(filesystem.cat_file(_join(root, name)))


def modification_times(uri: str, names: Sequence[str]) -> dict[str, Any]:
    filesystem, root = _filesystem(uri)
    return {name: filesystem.modified(_join(root, name)) for name in names}


def committed_shards(uri: str) -> list[str]:
    filesystem, root = _filesystem(uri)
    commits = _join(root, f"{BOOK}commits")
    if not filesystem.exists(commits):
        return []
    return sorted(path.rsplit("/", 1)[-1][: -len(".json")] for path in filesystem.glob(f"{commits}/*.json"))


def assert_tables_equal(actual: pa.Table, expected: pa.Table, *, context: str) -> None:
    """Same schema and rows (sorted by source, key); float columns equal within FLOAT_TOLERANCE."""
    assert actual.schema.remove_metadata() == expected.schema.remove_metadata(), context
    assert actual.num_rows == expected.num_rows, (context, actual.num_rows, expected.num_rows)
    actual = actual.sort_by(SORT_KEYS)
    expected = expected.sort_by(SORT_KEYS)
    for name in expected.column_names:
        want, got = expected.column(name), actual.column(name)
        value_type = want.type.value_type if hasattr(want.type, "value_type") else want.type
        if pa.types.is_floating(value_type):
            assert got.is_null().to_pylist() == want.is_null().to_pylist(), (context, name)
            flat_want = _flat_floats(want)
            flat_got = _flat_floats(got)
            assert flat_got.shape == flat_want.shape, (context, name)
            np.testing.assert_allclose(flat_got, flat_want, atol=FLOAT_TOLERANCE, rtol=0, err_msg=f"{context}: {name}")
        else:
            assert got.to_pylist() == want.to_pylist(), (context, name)


def _flat_floats(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    while hasattr(array, "flatten") and not pa.types.is_floating(array.type):
        array = array.flatten()
    return np.asarray(array.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.float64)


def assert_visible_files_match(actual_uri: str, reference_uri: str) -> None:
    """Every file a reader can see under the output now is complete: readable Parquet, and equal to the clean run's
    file of that name. Files still being written live beside the output (``OUT.job/staging/``), never under it."""
    names = data_names(actual_uri)
    assert all(name.endswith((".parquet", ".errors")) for name in names), f"non-Parquet files under the output: {names}"
    expected = set(data_names(reference_uri))
    assert set(names) <= expected, f"unexpected data files {sorted(set(names) - expected)}"
    for name in names:
        assert_tables_equal(read_table(actual_uri, name), read_table(reference_uri, name), context=name)


def assert_same_output(actual_uri: str, reference_uri: str) -> None:
    """The finished output equals the clean run's: same data files with the same rows, same commit records and
    manifest totals, ``SUCCESS`` present, no scratch files left; the Parquet metadata too, less the job arguments (another ``--output``)."""
    assert data_names(actual_uri) == data_names(reference_uri)
    for name in data_names(reference_uri):
        actual, expected = read_table(actual_uri, name), read_table(reference_uri, name)
        assert_tables_equal(actual, expected, context=name)
        metadata = dict(actual.schema.metadata or {})
        expected_metadata = dict(expected.schema.metadata or {})
        assert json.loads(metadata.pop(b"job_arguments"))["output"] == actual_uri
        expected_metadata.pop(b"job_arguments")
        assert metadata == expected_metadata, name
    assert committed_shards(actual_uri) == committed_shards(reference_uri)
    for shard_id in committed_shards(reference_uri):
        name = f"{BOOK}commits/{shard_id}.json"
        assert read_json(actual_uri, name) == read_json(reference_uri, name)
    names = all_names(actual_uri)
    assert f"{BOOK}SUCCESS" in names and f"{BOOK}manifest.json" in names
    assert not any(n.startswith((f"{BOOK}staging", f"{BOOK}fragments")) for n in names), names
    manifest = read_json(actual_uri, f"{BOOK}manifest.json")
    expected_manifest = read_json(reference_uri, f"{BOOK}manifest.json")
    assert manifest["totals"] == expected_manifest["totals"]
    assert manifest["files"] == expected_manifest["files"]
    assert manifest["fingerprint"] == expected_manifest["fingerprint"]


# --------------------------------------------------------------------------------------------------------------------
# The shared corpus and its clean run
# --------------------------------------------------------------------------------------------------------------------

SHARDS = 6
SAMPLES_PER_SHARD = 8
# Small batches and files, so that a few dozen samples still make several batches per shard and files per shard.
# float32 pinned: "auto" is bfloat16 on a CPU with AVX512-BF16, and these jobs' outputs are compared exactly.
JOB_FLAGS = ("--batch-size", "4", "--rows-per-file", "3", "--top-k", "3", "--dtype", "float32")


@dataclass(frozen=True)
class ReferenceJob:
    bucket: str
    input: str
    model: str
    output: str  # the clean run's output (local)
    samples: dict[tuple[str, str], Sample]  # (source, key) -> sample
    seconds: float

    def args(self, output: str, *extra: str) -> list[str]:
        return ["--input", self.input, "--output", output, "--model", self.model, *JOB_FLAGS, *extra]




def make_checkpoint(folder: Path, seed: int = 5) -> str:
    return str(write_reference_checkpoint(folder, small_config_dict(num_labels=12, image_size=64), seed=seed))


def reference_job(tmp_path_factory: Any, s3_endpoint: str) -> ReferenceJob:
    """The corpus on S3 and one clean, uninterrupted run over it (the session fixture ``clean_run`` shares it)."""
    import boto3

    bucket = f"reliability-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    samples: dict[tuple[str, str], Sample] = {}
    for index in range(SHARDS):
        uri = f"s3://{bucket}/shards/part-{index:03d}.tar"
        shard = make_samples(SAMPLES_PER_SHARD, seed=100 + index, prefix=f"s{index}/img-", bad_every=5)
        write_webdataset(uri, shard)
        samples.update({(uri, sample.key): sample for sample in shard})
    base = tmp_path_factory.mktemp("reliability-reference")
    model = make_checkpoint(base / "checkpoint")
    output = str(base / "clean")
    job = ReferenceJob(bucket, f"s3://{bucket}/shards", model, output, samples, 0.0)
    ray_tmpdir = short_tmpdir()
    try:
        started = time.monotonic()
        finished = run_job(job.args(output), ray_tmpdir=ray_tmpdir)
        assert finished.returncode == 0, finished.stderr[-5000:]
        job = ReferenceJob(bucket, job.input, model, output, samples, time.monotonic() - started)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    rows = sum(read_table(output, name).num_rows for name in data_names(output))
    assert rows == len(samples)
    return job


# --------------------------------------------------------------------------------------------------------------------
# A fault-injecting S3 proxy
# --------------------------------------------------------------------------------------------------------------------

_SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
_INTERNAL = (
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>"
)
FAULTS = ("503 SlowDown", "500 InternalError", "reset before forwarding", "reset after forwarding", "body cut short")


class FaultyS3Proxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that fails a fraction of requests, mixing:

    * ``503 SlowDown`` and ``500 InternalError`` answers with S3's XML bodies, the request not forwarded;
    * a connection reset (RST) before forwarding, and, for writes, after forwarding: the object was stored but the
      client saw an error, so its retry repeats a write that already happened;
    * a GET answer whose body is cut short (the declared length is not delivered).

    Point ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in storage options) at :attr:`url`. Thread-safe counters tell
    what happened. Use it as a context manager.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, *, failure_rate: float, seed: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _FaultyS3Handler)
        self.upstream = upstream.removeprefix("http://")
        self.failure_rate = failure_rate
        self.chance = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.faults: dict[str, int] = {fault: 0 for fault in FAULTS}
        self.methods: dict[str, int] = {}
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def fault_count(self) -> int:
        return sum(self.faults.values())

    def draw(self, method: str) -> str | None:
        """The fault for this request, or None to forward it untouched."""
        with self.lock:
            self.requests += 1
            self.methods[method] = self.methods.get(method, 0) + 1
            # Requests arrive from many threads in varying order, so a seeded draw alone does not make the mix
            # repeatable: the third GET and the third PUT always get their method's own fault, and every drawn
            # fault is the least used kind so far, so a run with a few faults covers every kind.
            if self.methods[method] == 3 and method in ("GET", "PUT"):
                fault = "body cut short" if method == "GET" else "reset after forwarding"
            elif self.chance.random() >= self.failure_rate:
                return None
            else:
                candidates = list(FAULTS[:3])
                if method in ("PUT", "POST", "DELETE"):
                    candidates.append("reset after forwarding")
                if method == "GET":
                    candidates.append("body cut short")
                fault = min(candidates, key=lambda kind: self.faults[kind])
            self.faults[fault] += 1
            return fault

    def __enter__(self) -> FaultyS3Proxy:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()


class _FaultyS3Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyS3Proxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST: the client sees "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _forward(self) -> None:
        body = self._read_body()
        fault = self.server.draw(self.command)
        if fault == "503 SlowDown":
            return self._answer(503, _SLOW_DOWN)
        if fault == "500 InternalError":
            return self._answer(500, _INTERNAL)
        if fault == "reset before forwarding":
            return self._reset()
        connection = http.client.HTTPConnection(self.server.upstream, timeout=60)
        skipped = {"connection", "transfer-encoding", "content-length", "keep-alive"}
        headers = {name: value for name, value in self.headers.items() if name.lower() not in skipped}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        content = response.read()
        connection.close()
        if fault == "reset after forwarding":
            return self._reset()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        if self.command == "HEAD":  # no body, but the object's length
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
            self.end_headers()
            return None
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if fault == "body cut short" and len(content) > 1:
            self.wfile.write(content[: len(content) // 2])
            return self._reset()
        self.wfile.write(content)
        return None

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward
