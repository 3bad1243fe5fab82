"""Start-up version check (pipeline/versions.py): the pure rules, then the refusal on a real local Ray."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import versions
from pipeline.versions import (
    EXIT_VERSION_MISMATCH,
    VersionMismatchError,
    check_versions,
    compare_versions,
    local_versions,
)

DRIVER = {"ray": "2.60.0", "torch": "2.13.0+cpu", "pyarrow": "26.0.1", "python": "3.11.7"}


@pytest.mark.parametrize(
    ("worker", "expected"),
    [
        ({}, []),
        ({"torch": "2.13.0+cu128"}, []),  # CPU driver, CUDA actors: the normal set-up
        ({"torch": "2.13.0"}, []),
        ({"torch": "2.13.0.dev20260101"}, []),  # a nightly of the same release: the numeric part is equal
        ({"ray": "2.60.1"}, [("ray", True)]),
        ({"ray": "2.59.0"}, [("ray", True)]),
        ({"torch": "2.13.1+cu128"}, [("torch", False)]),
        ({"torch": "2.12.0"}, [("torch", True)]),
        ({"torch": "3.0.0"}, [("torch", True)]),
        ({"pyarrow": "26.1.0"}, [("pyarrow", False)]),
        ({"pyarrow": "25.0.0"}, [("pyarrow", True)]),
        ({"python": "3.11.9"}, [("python", False)]),
        ({"python": "3.12.1"}, [("python", True)]),
        (
            {"ray": "2.59.0", "pyarrow": "25.0.0", "torch": "2.13.1"},
            [("ray", True), ("torch", False), ("pyarrow", True)],
        ),
    ],
)
def test_which_differences_matter(worker: dict[str, str], expected: list[tuple[str, bool]]) -> None:
    found = compare_versions(DRIVER, {**DRIVER, **worker})
    assert [(mismatch.package, mismatch.fatal) for mismatch in found] == expected
    for mismatch in found:
        assert mismatch.driver == DRIVER[mismatch.package] and mismatch.worker == worker[mismatch.package]


def test_a_package_one_side_lacks_is_not_compared() -> None:
    assert compare_versions(DRIVER, {"ray": "2.60.0"}) == []
    assert compare_versions({"ray": "2.60.0"}, DRIVER) == []


def test_refusal_names_the_worker_the_package_both_versions_and_the_fix() -> None:
    with pytest.raises(VersionMismatchError) as refused:
        check_versions(DRIVER, {**DRIVER, "pyarrow": "25.0.0", "torch": "2.13.1"}, "the Ray node 10.0.0.7")
    message = str(refused.value)
    assert "the Ray node 10.0.0.7" in message
    assert "pyarrow 26.0.1 on the driver, 25.0.0 on the worker" in message
    assert "torch" not in message  # a patch difference is tolerated, not reported as the cause
    assert "requirements.lock" in message
    with pytest.raises(VersionMismatchError) as two:
        check_versions(DRIVER, {**DRIVER, "ray": "2.59.0", "python": "3.12.0"}, "an actor")
    assert "ray 2.60.0 on the driver, 2.59.0 on the worker; python 3.11.7 on the driver, 3.12.0 on the worker." in str(
        two.value
    )


def test_tolerated_difference_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    check_versions(DRIVER, {**DRIVER, "torch": "2.13.1"}, "an actor on node 7")
    expected = "version difference with an actor on node 7 (tolerated): torch 2.13.0+cpu on the driver, 2.13.1"
    assert expected in caplog.text


def test_local_versions_are_this_process() -> None:
    import platform

    import pyarrow
    import ray
    import torch

    assert local_versions() == {
        "ray": ray.__version__,
        "torch": str(torch.__version__),
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }


def test_local_versions_do_not_import_torch() -> None:
    """A fresh worker reports torch's version from the installed metadata, the same string, without the import."""
    import subprocess
    import sys

    import torch

    script = (
        "import json, sys; from pipeline.versions import local_versions; "
        "print(json.dumps([local_versions()['torch'], 'torch' in sys.modules]))"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert json.loads(output) == [str(torch.__version__), False]


# --------------------------------------------------------------------------------------------------------------------
# On a real local Ray: the driver pretends to run another Ray; the workers report what they really run.
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from tests.pipeline_helpers import start_local_ray

    start_local_ray()
    yield ray
    ray.shutdown()


def _other_ray() -> dict[str, str]:
    return {**local_versions(), "ray": "2.0.0"}


@pytest.mark.slow
def test_cluster_check_passes_on_one_environment_and_refuses_another(local_ray) -> None:
    versions.check_cluster(local_ray)  # the same environment everywhere: no error
    with pytest.raises(VersionMismatchError, match=r"ray 2\.0\.0 on the driver, .* on the worker") as refused:
        versions.check_cluster(local_ray, driver=_other_ray())
    assert "the Ray node" in str(refused.value)


@pytest.mark.slow
def test_an_actor_refuses_versions_the_driver_published(local_ray) -> None:
    """What an autoscaled node's inference actor does: it compares itself with what the driver published."""
    with pytest.raises(VersionMismatchError):
        versions.check_cluster(local_ray, driver=_other_ray())  # publishes the driver's (pretended) versions

    @local_ray.remote(num_cpus=0)
    class Probe:
        def __init__(self) -> None:
            versions.check_this_worker("a test actor")

        def ready(self) -> bool:
            return True

    with pytest.raises(Exception, match=r"ray 2\.0\.0 on the driver") as refused:
        local_ray.get(Probe.remote().ready.remote(), timeout=120)
    assert "a test actor" in str(refused.value)
    versions.check_cluster(local_ray)  # publish the true versions again for the tests after this one


@pytest.mark.slow
def test_a_ray_started_here_publishes_the_versions_without_a_task_per_node(
    local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its workers run this interpreter: the per-node task is skipped, the versions still published for the actors."""
    import json

    from ray.experimental import internal_kv

    from pipeline.preflight import ray_started_here

    assert ray_started_here()  # start_local_ray(): ray.init(address="local") started a node here
    monkeypatch.setattr(local_ray, "remote", lambda *args, **kwargs: pytest.fail("a task was sent"))
    versions.check_cluster(local_ray, driver=_other_ray(), started_here=True)  # no task: nothing to refuse
    published = internal_kv._internal_kv_get(versions._KV_KEY, namespace=versions._namespace(local_ray))
    assert json.loads(published)["ray"] == "2.0.0"
    monkeypatch.undo()
    versions.check_cluster(local_ray)  # publish the true versions again for the tests after this one


def _write_shard(path: Path, count: int) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(count):
            image = io.BytesIO()
            Image.fromarray(np.full((40, 48, 3), index * 20, dtype=np.uint8)).save(image, "PNG")
            info = tarfile.TarInfo(f"s{index:03d}.png")
            info.size = image.tell()
            image.seek(0)
            tar.addfile(info, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


@pytest.mark.slow
def test_the_job_refuses_a_mismatched_cluster_with_exit_code_4(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.cli import main
    from tests.reference import small_config_dict, write_reference_checkpoint

    checkpoint = write_reference_checkpoint(tmp_path / "model", small_config_dict(num_labels=4, image_size=32), seed=1)
    _write_shard(tmp_path / "in" / "a.tar", 3)
    monkeypatch.setattr(versions, "local_versions", _other_ray)  # the driver only: workers import the real one
    # A mismatch needs a cluster the driver joined (a Ray it started runs its own interpreter): pretend it joined.
    monkeypatch.setattr("pipeline.plan.ray_started_here", lambda: False)
    code = main("embed", ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                          "--model", str(checkpoint), "--device", "cpu"])
    assert code == EXIT_VERSION_MISMATCH == 4
    error = capsys.readouterr().err
    assert "error: version mismatch between the job's driver and the Ray node" in error
    assert "ray 2.0.0 on the driver" in error
    assert not list((tmp_path / "out").glob("*.parquet"))  # refused before any work
