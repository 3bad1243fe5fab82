"""Reproducible installs: requirements.lock pins everything pyproject.toml asks for, and every installer uses it."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from the test extra
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# What the job's correctness and the driver/worker check depend on: the environment running the tests must be the
# locked one for these (the rest of the lock is exercised by installing it: scripts/setup.sh runs `pip check`).
MUST_MATCH_LOCK = ("ray", "torch", "pyarrow", "numpy", "pandas", "pillow", "safetensors", "transformers")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _applies(requirement: str) -> bool:
    marker = Requirement(requirement).marker
    return marker is None or marker.evaluate()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.!+_-]+)", line.strip())
        assert match, f"requirements.lock line {line!r} is not an exact pin"
        pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def test_lock_pins_every_requirement_of_the_project_and_its_extras(pyproject: dict, lock: dict[str, str]) -> None:
    project = pyproject["project"]
    required = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        required += extra
    # Requirements of other Pythons (tomli on 3.10) are not in a lock made on this one.
    applicable = [requirement for requirement in required if _applies(requirement)]
    missing = sorted({_name(requirement) for requirement in applicable} - set(lock))
    assert not missing, f"not in requirements.lock: {missing}; run scripts/lock.sh"
    assert "+" not in lock["torch"], "torch is locked without a build tag, so the CUDA build matches on GPU nodes"


def test_the_real_clients_and_the_quality_tools_are_test_requirements(pyproject: dict) -> None:
    test_extra = {_name(requirement) for requirement in pyproject["project"]["optional-dependencies"]["test"]}
    expected = {"webdataset", "embedding-reader", "datasets", "huggingface-hub", "ruff", "mypy", "duckdb"}
    assert expected <= test_extra
    # FAISS is what jobs.index / jobs.search / jobs.dedup run on: a runtime dependency, so the tests have it too.
    assert "faiss-cpu" in {_name(requirement) for requirement in pyproject["project"]["dependencies"]}


def test_ranges_have_upper_bounds_where_a_major_breaks(pyproject: dict) -> None:
    bounded = {
        _name(requirement): requirement for requirement in pyproject["project"]["dependencies"] if "<" in requirement
    }
    assert {"ray", "torch", "pyarrow", "pandas", "numpy"} <= set(bounded)
    assert pyproject["project"]["license"] == "Apache-2.0", "the SPDX string form (the table form is deprecated)"


def test_this_environment_runs_the_locked_versions(lock: dict[str, str]) -> None:
    for package in MUST_MATCH_LOCK:
        try:
            installed = version(package)
        except PackageNotFoundError:
            pytest.fail(f"{package} is locked but not installed; run scripts/setup.sh")
        assert installed.split("+", 1)[0] == lock[package], f"{package} {installed} != locked {lock[package]}"


def test_every_installer_uses_the_lock() -> None:
    assert "-c \"$LOCK\"" in (ROOT / "scripts" / "setup.sh").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("scripts/setup.sh") < ci.index("scripts/lint.sh") < ci.index("scripts/test.sh")
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (remote,) = [path for path, local in cluster["file_mounts"].items() if local == "."]
    commands = cluster["setup_commands"]
    assert any(f"-c {remote}/requirements.lock" in command and "pip install" in command for command in commands)
