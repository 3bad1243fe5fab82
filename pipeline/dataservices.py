"""Start Ray Data's own service actors as soon as the job has Ray, instead of when the dataset starts executing.

Why: Ray Data runs three small detached actors per cluster (the stats actor, the actor-location tracker of actor
pools and the autoscaling coordinator) and creates each one the first time the executor needs it, waiting for it:
each is a new worker process that imports Ray Data (1.2-2.7 s on a busy 2-core node). On a fresh Ray, the executor
created them one after another while no decode task or inference actor had started: measured with ``ray.timeline()``
on a 32-image job on a 2-core machine, the first decode task began 3.8-5.8 s after the job started, of which the
driver's own work was 0.5 s. Created here, right after Ray is joined, the three processes start together and beside
the driver's planning; when the executor asks for them it gets the running actors (they are named, ``get_if_exists``).

Asking is not free: creating a named actor waits for the GCS to register it, 1.3 s for the three on a fresh 2-core
node, so the job asks from a background thread (:func:`request_data_services`) while the driver goes on planning.
On a long-lived cluster they exist after the first job and this costs three name lookups. The functions called are
Ray Data's own (``ray.data._internal``), so the actors are created with exactly Ray Data's options; they are
internal, so a Ray that renames them only loses the head start (logged at debug level), never the job.
"""

from __future__ import annotations

import importlib
import logging
import threading

logger = logging.getLogger(__name__)

# This process's latest request, until settled (see :func:`settle_data_service_requests`); one runs at a time.
_request: threading.Thread | None = None

# (module, function) of Ray Data 2.60's get-or-create functions for its service actors.
SERVICE_FACTORIES: tuple[tuple[str, str], ...] = (
    ("ray.data._internal.execution.node_trackers.actor_location", "get_or_create_actor_location_tracker"),
    ("ray.data._internal.stats", "get_or_create_stats_actor"),
    ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator", "get_or_create_autoscaling_coordinator"),
)


def start_data_services() -> list[str]:
    """Ask Ray for Ray Data's service actors without waiting for them; return the names of those requested.

    Never raises: a factory that is missing or fails is skipped. Stops once Ray is no longer initialised: called on
    an uninitialised Ray, a factory would start a new local Ray (Ray's auto-init) in this thread.
    """
    import ray

    requested = []
    for module_name, function_name in SERVICE_FACTORIES:
        if not ray.is_initialized():
            break
        try:
            factory = getattr(importlib.import_module(module_name), function_name)
            factory()
        except Exception as error:  # noqa: BLE001 - an optimisation only: Ray Data creates them itself when needed
            logger.debug("not starting %s.%s early: %s: %s", module_name, function_name, type(error).__name__, error)
            continue
        requested.append(function_name)
    return requested


def request_data_services() -> threading.Thread:
    """:func:`start_data_services` in a daemon thread (started, not waited for): the driver's planning goes on
    meanwhile, and the executor, if it gets there first, finds or creates the same named actors itself. While an
    earlier request is still running, that one is returned instead of starting another."""
    global _request
    if _request is not None and _request.is_alive():
        return _request

    def request() -> None:
        logger.debug("Ray Data services requested early: %s", ", ".join(start_data_services()) or "none")

    _request = threading.Thread(target=request, name="ray-data-services", daemon=True)
    _request.start()
    return _request


def settle_data_service_requests(timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) for this process's request to end; a job calls it before it returns.

    Why: a job that fails right after joining Ray, in a process that goes on (tests, a notebook) and shuts Ray down,
    must not leave a thread calling Ray behind: on the shut-down Ray it would start a new local one (Ray's auto-init)
    that the process's next ``ray.init()`` then trips over (seen in the test suite: "Failed to connect to GCS within
    60 seconds"). A request takes seconds at most, and on a job that ran it ended long before.
    """
    global _request
    if _request is not None:
        _request.join(timeout_s)
        _request = None
