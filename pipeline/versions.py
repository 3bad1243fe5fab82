"""Start-up check that the driver and every Ray worker run compatible Ray, torch, pyarrow and Python versions.

Why: the head and the worker nodes of one cluster are installed separately (cluster.yaml's setup commands, a custom
AMI, an autoscaled node that booted a month later). A different Ray on one node fails in obscure ways or not at all;
a different torch minor changes the numbers an actor writes; a different pyarrow major changes how blocks and
Parquet files are encoded. ``requirements.lock`` pins one set of versions (README: "Reproducible installs"); this
module refuses to start a job on a cluster that does not run it, with one message naming the node, the package and
both versions, instead of a job that fails late or writes rows of two environments under one output.

What matters, decided by the pure :func:`compare_versions`:

=========  ====================================  ===========================================================
package    refused when                          only a warning when
=========  ====================================  ===========================================================
ray        any difference                        -- (Ray supports one version across a cluster)
python     major.minor differ                    patch differs (pickled code crosses minor versions badly)
torch      major.minor differ                    patch differs; a build tag (``+cpu``, ``+cu128``) never counts:
                                                 a CPU driver with CUDA actors is the normal set-up
pyarrow    major differs                         minor or patch differs
=========  ====================================  ===========================================================

Two call sites: :func:`check_cluster` on the driver before any work (one zero-CPU task per alive node, also
publishing the driver's versions in Ray's key-value store for the job), and :func:`check_this_worker` in each
inference actor, which covers nodes the autoscaler adds after start-up. Both raise :class:`VersionMismatchError`;
``jobs.cli`` exits with :data:`EXIT_VERSION_MISMATCH` (4).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

EXIT_VERSION_MISMATCH = 4
CHECKED_PACKAGES = ("ray", "torch", "pyarrow", "python")
# How many leading release components must agree for the job to run (None: all of them).
_MUST_MATCH: dict[str, int | None] = {"ray": None, "python": 2, "torch": 2, "pyarrow": 1}
_KV_KEY = b"vit-hybrid-batch/driver-versions"
_FIX = (
    "every node must run the versions in requirements.lock: on each node run "
    "`pip install -c requirements.lock -e .` (cluster.yaml's setup_commands do this) and restart Ray there "
    "(README: Reproducible installs)"
)


class VersionMismatchError(RuntimeError):
    """The driver and a worker run versions that would make the job fail or mix results; the message says which."""


@dataclass(frozen=True)
class Mismatch:
    """One package whose version differs between the driver and a worker."""

    package: str
    driver: str
    worker: str
    fatal: bool

    def describe(self) -> str:
        return f"{self.package} {self.driver} on the driver, {self.worker} on the worker"


def local_versions() -> dict[str, str]:
    """This process's versions of :data:`CHECKED_PACKAGES`, without importing what is not imported yet.

    A module already loaded reports its ``__version__`` (what this process really runs); otherwise the installed
    distribution's metadata says the same without the import: the check runs in a fresh zero-CPU worker on every
    node, and importing torch there would cost a second of CPU per node on the job's start-up path.
    """
    versions = {name: _installed_version(name) for name in ("ray", "torch", "pyarrow")}
    versions["python"] = platform.python_version()
    return {name: version for name, version in versions.items() if version is not None}


def _installed_version(package: str) -> str | None:
    """``package``'s version: the loaded module's, else the installed distribution's; None where it is absent."""
    module = sys.modules.get(package)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``2.13.0+cu128`` -> (2, 13, 0); ``2.60.0rc1`` -> (2, 60, 0): the numeric release, without any tag."""
    release = version.split("+", 1)[0]
    numbers = []
    for part in release.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match[0]))
    return tuple(numbers)


def compare_versions(driver: Mapping[str, str], worker: Mapping[str, str]) -> list[Mismatch]:
    """Every checked package whose version differs, each marked fatal or not (rules in the module docstring).

    A package missing on either side is not compared: the worker reports what it has, and a worker without torch
    would fail on its first import with a clearer message than ours.
    """
    mismatches = []
    for package in CHECKED_PACKAGES:
        if package not in driver or package not in worker:
            continue
        ours, theirs = driver[package], worker[package]
        if package == "ray":
            if ours != theirs:
                mismatches.append(Mismatch(package, ours, theirs, fatal=True))
            continue
        ours_release, theirs_release = _release(ours), _release(theirs)
        if ours_release == theirs_release:
            continue  # only a build tag differs (+cpu on the driver, +cu128 on the GPU nodes)
        depth = _MUST_MATCH[package]
        fatal = depth is None or ours_release[:depth] != theirs_release[:depth]
        mismatches.append(Mismatch(package, ours, theirs, fatal=fatal))
    return mismatches


def check_versions(driver: Mapping[str, str], worker: Mapping[str, str], where: str) -> None:
    """Raise :class:`VersionMismatchError` on a fatal mismatch, log a warning for the others.

    ``where`` names the worker for the message (a node's address and id, an actor).
    """
    mismatches = compare_versions(driver, worker)
    fatal = [mismatch for mismatch in mismatches if mismatch.fatal]
    if fatal:
        raise VersionMismatchError(
            f"version mismatch between the job's driver and {where}: "
            + "; ".join(mismatch.describe() for mismatch in fatal)
            + f". {_FIX}"
        )
    for mismatch in mismatches:
        logger.warning("version difference with %s (tolerated): %s", where, mismatch.describe())


def _node_label(node: Mapping[str, Any]) -> str:
    return f"the Ray node {node.get('NodeManagerAddress', '?')} (node id {str(node.get('NodeID', '?'))[:12]})"


def check_cluster(
    ray: Any, driver: Mapping[str, str] | None = None, timeout_s: float = 120.0, *, started_here: bool = False
) -> None:
    """Compare the driver's versions with those of every alive node of the connected cluster; raise on a mismatch.

    One zero-CPU task per node reports that node's versions (it runs even on a head with ``CPU: 0``). The driver's
    versions are also stored in Ray's key-value store under this job's id, for :func:`check_this_worker`. A node
    that does not answer within ``timeout_s`` (busy starting workers) is logged and skipped: its actors still check
    themselves. ``driver`` defaults to this process's versions.

    ``started_here``: this process started the Ray it runs on (:func:`pipeline.preflight.ray_started_here`). Its one
    node's workers run this interpreter with this process's packages, so their versions are the driver's by
    construction: the versions are published but no task is sent (the task waited 1.4 s for a worker process on a
    fresh 2-core node, on the job's start-up path).
    """
    from ray.experimental import internal_kv
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver = dict(driver or local_versions())
    internal_kv._internal_kv_put(_KV_KEY, json.dumps(driver).encode(), overwrite=True, namespace=_namespace(ray))
    if started_here:
        logger.info("versions: the Ray this process started runs its workers with this interpreter: %s", driver)
        return
    report = ray.remote(num_cpus=0, max_retries=1)(_report_versions)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    pending = {
        report.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(): node
        for node in nodes
    }
    ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in not_ready:
        logger.warning("%s did not report its versions within %.0f s; its actors check themselves",
                       _node_label(pending[ref]), timeout_s)
        ray.cancel(ref, force=True)
    for ref in ready:
        check_versions(driver, ray.get(ref), _node_label(pending[ref]))
    logger.info("versions checked on %d nodes: %s", len(ready), driver)


def check_this_worker(where: str = "an inference actor") -> None:
    """In a Ray worker: compare this process's versions with those the driver published; raise on a mismatch.

    Does nothing outside Ray or when the driver published nothing (an actor built directly, in a test or a
    benchmark).
    """
    try:
        import ray
    except ImportError:  # the job's stages run without Ray (the GPU check's in-process end to end): nothing to compare
        return
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return
    published = internal_kv._internal_kv_get(_KV_KEY, namespace=_namespace(ray))
    if not published:
        return
    node = ray.get_runtime_context().get_node_id()
    check_versions(json.loads(published), local_versions(), f"{where} on node {node[:12]}")


def _report_versions() -> dict[str, str]:
    """The task :func:`check_cluster` runs on every node (module level, so Ray imports it there by name)."""
    return local_versions()


def _namespace(ray: Any) -> str:
    """One key-value namespace per Ray job, so that two jobs on one cluster never read each other's versions."""
    return f"vit-hybrid-batch-{ray.get_runtime_context().get_job_id()}"
