"""Start-up checks and exit codes through the real command line (``python -m jobs.classify`` in a subprocess).

Checks that need no Ray run before Ray starts, cheapest first: these tests point ``RAY_ADDRESS`` at an address Ray
cannot parse, so a check that ran after ``ray.init()`` would end with exit code 4 instead of the expected 2. The two
runs that reach Ray (joining the module's job cluster, as under ``ray job submit``) check that the exit code tells the
truth for a tiny job where every sample fails, and that a shard that cannot be read at all is never committed as done.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.reliability import (
    assert_no_traceback,
    committed_shards,
    error_line,
    make_checkpoint,
    run_job,
)

NO_RAY = {"RAY_ADDRESS": "localhost:notaport"}  # ray.init() fails at once on this address: exit code 4


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (seed * 50 % 256, 90, 20)).save(buffer, "JPEG")
    return buffer.getvalue()


def tar_shard(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("model"))


def test_failing_to_start_or_join_ray_is_exit_code_4_with_one_line(tmp_path: Path, model: str, ray_tmpdir: str) -> None:
    (tmp_path / "in").mkdir()
    tar_shard(tmp_path / "in" / "a.tar", {"x.jpg": jpeg(1)})
    result = run_job(
        ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", model],
        ray_tmpdir=ray_tmpdir,
        env=NO_RAY,
    )
    assert result.returncode == 4, result.stderr[-2000:]
    assert error_line(result.stderr).startswith("error: cannot join the Ray cluster at RAY_ADDRESS=localhost:notaport")
    assert_no_traceback(result.stderr)


def test_wrong_image_column_fails_before_ray_and_nothing_is_committed(tmp_path: Path, model: str, ray_tmpdir: str) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"key": ["a"], "jpg": [jpeg(1)]}), tmp_path / "in" / "part-0.parquet")
    output = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(output), "--model", model, "--image-column", "image"]
    result = run_job(args, ray_tmpdir=ray_tmpdir, env=NO_RAY)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "image column 'image' not in" in error_line(result.stderr) and "jpg: binary" in error_line(result.stderr)
    assert_no_traceback(result.stderr)
    assert committed_shards(str(output)) == [] and not Path(f"{output}.job", "job.json").exists()


def test_output_is_checked_before_the_model_and_the_input_before_the_weights(
    tmp_path: Path, model: str, ray_tmpdir: str
) -> None:
    (tmp_path / "in").mkdir()
    tar_shard(tmp_path / "in" / "a.tar", {"x.jpg": jpeg(1)})
    (tmp_path / "a-file").write_text("not a folder")
    # Output inside a file AND a model that does not exist: the cheaper output check speaks first.
    result = run_job(
        ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "a-file" / "out"), "--model", str(tmp_path / "nope")],
        ray_tmpdir=ray_tmpdir,
        env=NO_RAY,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_line(result.stderr).startswith(f"error: cannot write output {tmp_path / 'a-file' / 'out'}")
    assert "inside a file" in error_line(result.stderr)

    # A missing input AND weights that cannot be read: the input (before the weights are hashed) speaks first.
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (broken / name).write_bytes((Path(model) / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    result = run_job(
        ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), "--model", str(broken)],
        ray_tmpdir=ray_tmpdir,
        env=NO_RAY,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not exist" in error_line(result.stderr) and str(tmp_path / "missing") in error_line(result.stderr)
    assert_no_traceback(result.stderr)


@pytest.mark.slow
def test_exit_codes_tell_the_truth_for_tiny_jobs_and_unreadable_shards(
    tmp_path: Path, model: str, ray_tmpdir: str, job_cluster: str
) -> None:
    # The jobs join a cluster (as under `ray job submit`): what is tested is the exit code, not starting Ray.
    # Every sample fails, in a job far below 100 samples: not a success.
    bad = tmp_path / "bad"
    bad.mkdir()
    tar_shard(bad / "a.tar", {f"k{index}.jpg": b"not a jpeg" for index in range(3)})
    result = run_job(
        ["--input", str(bad), "--output", str(tmp_path / "out-bad"), "--model", model, "--max-error-fraction", "1.0"],
        ray_tmpdir=ray_tmpdir,
        ray_address=job_cluster,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert error_line(result.stderr).startswith("aborted: 3 of 3 samples failed")

    # One shard is not a tar at all: the good one is committed, the unreadable one is not, and the exit code says so.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    tar_shard(mixed / "good.tar", {f"g{index}.jpg": jpeg(index) for index in range(4)})
    (mixed / "broken.tar").write_bytes(b"this was never a tar archive" * 40)
    output = tmp_path / "out-mixed"
    args = ["--input", str(mixed), "--output", str(output), "--model", model]
    result = run_job(args, ray_tmpdir=ray_tmpdir, ray_address=job_cluster)
    assert result.returncode == 5, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert "1 shard(s) could not be read at all" in line and "broken.tar" in line and "not a readable tar" in line
    (committed,) = committed_shards(str(output))
    assert committed.startswith("good.tar")

    # Once the file is fixed, the same command reads it: it was never recorded as done.
    tar_shard(mixed / "broken.tar", {"b0.jpg": jpeg(7)})
    result = run_job(args, ray_tmpdir=ray_tmpdir, ray_address=job_cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(committed_shards(str(output))) == 2 and Path(f"{output}.job", "SUCCESS").exists()


class RecordedRayInit:
    """``ray.init()`` replaced by a recorder of its keyword arguments; while ``joining``, it refuses a
    ``_system_config`` as Ray does when it finds a cluster to join."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import ray

        self.calls: list[dict] = []
        self.joining = False
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", self)

    def __call__(self, **kwargs: object) -> None:
        self.calls.append(kwargs)
        if kwargs.get("_system_config") and self.joining:
            raise ValueError("When connecting to an existing cluster, _system_config must not be provided.")


def test_an_in_process_ray_has_no_dashboard_and_keeps_idle_workers_and_a_joined_cluster_keeps_its_own_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline import preflight

    init = RecordedRayInit(monkeypatch)
    calls = init.calls
    preflight.connect_ray()
    started = {"include_dashboard": False, "_system_config": preflight.LOCAL_RAY_SYSTEM_CONFIG}
    assert calls == [started]
    assert preflight.LOCAL_RAY_SYSTEM_CONFIG["idle_worker_killing_time_threshold_ms"] >= 30_000
    calls.clear()
    init.joining = True
    preflight.connect_ray()
    assert calls == [started, {}]  # joined with the cluster's own config and dashboard
    calls.clear()
    preflight.connect_ray(log_to_driver=False)  # the demo's logging options go to either call
    assert calls == [{**started, "log_to_driver": False}, {"log_to_driver": False}]
    init.joining = False
    calls.clear()
    preflight.connect_ray()
    assert calls == [started] and calls[0]["_system_config"] is not preflight.LOCAL_RAY_SYSTEM_CONFIG  # a copy


def test_a_driver_that_joins_a_cluster_hands_its_worker_switches_to_its_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline import preflight

    init = RecordedRayInit(monkeypatch)
    init.joining = True
    calls = init.calls
    for name in preflight.WORKER_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VIT_HYBRID_FAILPOINTS", "read.batch:exit@/tmp/marker")
    monkeypatch.setenv("VIT_HYBRID_STAND_IN_MODEL", "0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-switch")  # only the project's switches travel
    preflight.connect_ray(log_to_driver=False)
    switches = {"VIT_HYBRID_FAILPOINTS": "read.batch:exit@/tmp/marker", "VIT_HYBRID_STAND_IN_MODEL": "0"}
    assert calls[1] == {"log_to_driver": False, "runtime_env": {"env_vars": switches}}

    # Under `ray job submit` the submitted runtime_env already reaches every worker (and Ray refuses a second one
    # naming the same variables); with no switch set a job gets no runtime_env at all.
    calls.clear()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    preflight.connect_ray()
    assert calls[1] == {}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    for name in preflight.WORKER_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    calls.clear()
    preflight.connect_ray()
    assert calls[1] == {}


def test_every_worker_side_variable_of_the_pipeline_is_a_worker_switch() -> None:
    """A variable read inside workers that a joining driver did not hand on would be silently inert on a cluster."""
    import re

    from pipeline import compute, failpoints, infer, preflight, standin

    worker_side = {failpoints.ENVIRONMENT_VARIABLE, failpoints.PLACEMENT_VARIABLE, standin.ENVIRONMENT_VARIABLE,
                   infer.GPU_ON_CPU_VARIABLE}  # fmt: skip
    assert set(preflight.WORKER_SWITCHES) == worker_side
    driver_only = {compute.AUTOSCALING_CONFIG_VARIABLE}  # read by the driver when it sizes the pools
    package = Path(preflight.__file__).parent
    named = {name for path in package.rglob("*.py") for name in re.findall(r"VIT_HYBRID_[A-Z_]+", path.read_text())}
    assert named == worker_side | driver_only, named ^ (worker_side | driver_only)
