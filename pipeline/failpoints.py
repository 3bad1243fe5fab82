"""Named fault-injection points, for the tests that kill a job at a chosen moment; inert unless switched on.

The job calls :func:`failpoint` at a few named places (listed in :data:`POINTS`). Nothing happens unless the
environment variable ``VIT_HYBRID_FAILPOINTS`` names that point; the variable is read once per process, so with it
unset a call costs one dictionary lookup. Ray workers inherit the variable from the driver that started Ray; a driver
that joins a cluster hands it on in its job's ``runtime_env`` (:data:`pipeline.preflight.WORKER_SWITCHES`), so points
inside read tasks and inference actors are switched on the same way either way.

Syntax: comma-separated entries ``NAME[=N][:ACTION][@MARKER]``

* ``=N`` fires on the N-th time this process reaches the point (default: the first);
* ``ACTION`` is ``kill`` (default: SIGKILL this process, as the OOM killer or a node loss would), ``exit``
  (``os._exit(1)``, a worker crashing) or ``pause`` (block forever, so that a test can kill the driver from outside
  while this process is provably inside the point);
* ``@MARKER`` (a file path) makes the point fire once across all processes and retries: it fires only if ``MARKER``
  does not exist yet, and creates it (atomically) right before acting. Tests wait for the marker of a ``pause``.

Example (pause a finalize task between publishing a shard's data files and writing its commit record; a test then
kills the driver from outside)::

    VIT_HYBRID_FAILPOINTS=commit.before_record:pause@/tmp/marker python -m jobs.classify --input ... --output ...
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

ENVIRONMENT_VARIABLE = "VIT_HYBRID_FAILPOINTS"

#: The points the job reaches, and where.
POINTS = {
    "read.batch": "read/decode task, after yielding each batch of a shard except its last (mid-shard)",
    "infer.batch": "inference actor, before each batch is run through the model",
    "write.fragment": "writer stage, after a batch's fragments are written, before their metadata is passed on",
    "commit.before_record": "finalize task, after a shard's data files are published, before its commit record",
    "finalize.after_record": "finalize task, after the commit record, before the shard's fragments are deleted",
    "finish.before_success": "driver, after _manifest.json and _summary.json, before _SUCCESS",
}
ACTIONS = ("kill", "exit", "pause")


@dataclass(frozen=True)
class Failpoint:
    name: str
    hit: int = 1
    action: str = "kill"
    marker: str | None = None


def parse(spec: str) -> dict[str, Failpoint]:
    """``"commit.before_record=2,infer.batch:exit@/tmp/m"`` -> {name: Failpoint}; ValueError names a bad entry."""
    points: dict[str, Failpoint] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        rest, _, marker = entry.partition("@")
        rest, _, action = rest.partition(":")
        name, _, hit = rest.partition("=")
        if name not in POINTS or (action and action not in ACTIONS) or (hit and not hit.isdigit()) or hit == "0":
            raise ValueError(
                f"{ENVIRONMENT_VARIABLE}: cannot parse {entry!r}; expected NAME[=N][:ACTION][@MARKER] with NAME one "
                f"of {', '.join(POINTS)} and ACTION one of {', '.join(ACTIONS)}"
            )
        points[name] = Failpoint(name, int(hit or 1), action or "kill", marker or None)
    return points


_active: dict[str, Failpoint] | None = None
_hits: dict[str, int] = {}
_lock = threading.Lock()


def _points() -> dict[str, Failpoint]:
    global _active
    if _active is None:
        _active = parse(os.environ.get(ENVIRONMENT_VARIABLE, ""))
    return _active


def reset() -> None:
    """Forget the parsed variable and the hit counts (tests that change the variable within one process)."""
    global _active
    with _lock:
        _active = None
        _hits.clear()


def failpoint(name: str) -> None:
    """Act as ``VIT_HYBRID_FAILPOINTS`` says if it names ``name``; otherwise return at once."""
    points = _active if _active is not None else _points()
    if not points:
        return
    point = points.get(name)
    if point is None:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != point.hit:
            return
        if point.marker is not None:
            try:
                os.close(os.open(point.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return  # fired already, in this or another process
    if point.action == "pause":
        while True:
            time.sleep(3600)
    elif point.action == "exit":
        os._exit(1)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


#: Test instrumentation beside the failpoints, and like them inert unless switched on: with this variable naming a
#: folder, each read/decode task and each inference actor leaves an empty file ``<stage>.<node id>.<pid>`` there,
#: so a multi-node test can see where Ray placed the work without Ray's state API (which needs the dashboard).
PLACEMENT_VARIABLE = "VIT_HYBRID_PLACEMENT_LOG"


def record_placement(stage: str) -> None:
    """Leave ``<folder>/<stage>.<node id>.<pid>`` when ``VIT_HYBRID_PLACEMENT_LOG`` names a folder; else nothing."""
    folder = os.environ.get(PLACEMENT_VARIABLE)
    if not folder:
        return
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "no-ray"
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"{stage}.{node}.{os.getpid()}"), "a").close()  # noqa: SIM115 - touch

