"""Device, dtype and inference pool decided for the cluster the job will have, not the one it has at submit time.

On an autoscaling cluster the GPU workers may not be running when the job starts (``min_workers: 0``, or one of
eight). Deciding from ``ray.cluster_resources()`` alone would run such a job on CPUs in float32 (and freeze float32
in its fingerprint), or cap the pool at the one GPU present so that the autoscaler is never asked for the other
seven. So the decision reads two figures:

* ``gpus_now``: GPUs in the cluster now (``ray.cluster_resources()``);
* ``gpus_reachable``: GPUs the cluster can scale to, from the autoscaler's node types (resources x max workers).
  Ray publishes them as the cluster config of autoscaler v2 and KubeRay
  (``ray._private.state.state.get_max_resources_from_cluster_config()``, what Ray Data and Ray Train read); the v1
  autoscaler that ``ray up`` starts does not, so its config file on the head node (``~/ray_bootstrap_config.yaml``,
  where ``ray up`` puts it and where ``ray job submit`` runs the driver) is read instead. The variable
  ``VIT_HYBRID_AUTOSCALING_CONFIG`` names another file.

:func:`decide_compute` is pure (tested without Ray); :func:`observe_cluster` and :func:`request_gpus` are the thin Ray
edges. With GPUs reachable, the pool's maximum is the GPUs reachable divided by ``--gpus-per-actor`` (capped by
``--max-actors``), and :func:`request_gpus` asks the autoscaler for that many GPU bundles at once, instead of
waiting for Ray Data to discover pending actors one scale-up step at a time.

Without GPUs, the CPU nodes decide: ``auto`` is the dtype a CPU node computes natively (:mod:`pipeline.cpu`, probed on
such a node), and each node's CPUs are split between one inference actor, running as many single-threaded model calls
at once as the node has cores for and its memory holds, and the decode tasks, by the measured cost of each stage
(:func:`pipeline.cpu.size_cpu_node`), so that every core is busy.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig, canonical_dtype
from pipeline.cpu import (
    count_cpu_nodes,
    cpu_actor_environment,
    size_cpu_node,
    smallest_cpu_node,
    smallest_cpu_node_memory,
)

logger = logging.getLogger(__name__)

AUTOSCALING_CONFIG_VARIABLE = "VIT_HYBRID_AUTOSCALING_CONFIG"
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` leaves the cluster config on the head node

GPU_BATCH_SIZE = 256  # bf16 on an 80 GB GPU; see README "Sizing"
CPU_BATCH_SIZE = 16


class ComputeError(RuntimeError):
    """The job asks for a device the cluster cannot provide (``--device cuda`` and no GPU now or ever)."""


@dataclass(frozen=True)
class ClusterView:
    """What the driver knows about the cluster's GPUs: now, and at most after scaling up."""

    gpus_now: float
    gpus_reachable: float  # >= gpus_now; equal when nothing says the cluster can grow
    source: str = "running"  # where gpus_reachable came from: "running", "cluster config", or a file path
    cpu_nodes: int = 1  # alive nodes with CPUs and no GPU: one inference actor each when the job runs on CPUs
    smallest_cpu_node_cpus: float = 1.0  # sizing for the smallest keeps the actor schedulable on every node
    smallest_cpu_node_memory: float | None = None  # its Ray ``memory`` resource in bytes; None: not reported
    cpu_dtype: str | None = None  # "auto" as decided on a CPU node (pipeline.cpu.probe_cpu_node); None: not probed


@dataclass(frozen=True)
class ComputePlan:
    """How the inference stage runs; derived from :class:`JobConfig` and the cluster by :func:`decide_compute`."""

    use_gpu: bool
    device: str  # "cuda" or "cpu"
    dtype: str  # torch dtype name the actors compute in; recorded in the job's fingerprint
    batch_size: int
    min_actors: int
    max_actors: int
    actor_resources: dict[str, float] = field(default_factory=dict)  # num_gpus / num_cpus per actor
    torch_threads: int | None = None  # CPU actors only: intra-op threads of each model call
    calls_per_actor: int = 1  # CPU actors: model calls an actor runs at once (GPU actors: one; see pipeline.actor)
    actor_env: dict[str, str] = field(default_factory=dict)  # environment of each actor process (CPU: the allocator)
    decode_cpus: float = 1.0  # CPUs reserved per decode task
    pad_to_batch: bool = False
    gpus_to_request: int = 0  # GPU bundles to ask the autoscaler for (beyond what runs now), 0 for none

    def describe(self) -> str:
        """One line for the job's log: how the inference stage will run (what the defaults chose, in words)."""
        resources = self.actor_resources
        pool = f"{self.min_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        if self.use_gpu:
            actors = f"{pool} actor(s) x {resources.get('num_gpus', 1):g} GPU + {resources.get('num_cpus', 1):g} CPU"
        else:
            lanes = f"{self.calls_per_actor} batch{'es' if self.calls_per_actor > 1 else ''} at once"
            actors = (f"{pool} actor(s) x {resources.get('num_cpus', 1):g} CPUs, {lanes} on {self.torch_threads} torch "
                      f"thread(s) each")
            if resources.get("memory"):
                actors += f", {resources['memory'] / 1024**3:.2f} GiB reserved"
        return (f"inference on {self.device}: {actors}, {self.dtype}, batch {self.batch_size}; decode tasks of "
                f"{self.decode_cpus:g} CPU")


def dtype_without_cluster(config: JobConfig) -> str | None:
    """The compute dtype when it does not depend on the cluster (a named one), else None: ``auto`` is bfloat16 on
    GPUs and, on CPU nodes, what their CPU computes natively, which only a node of the cluster can tell."""
    return None if config.dtype == "auto" else canonical_dtype(config.dtype)


def uses_gpu(config: JobConfig, cluster: ClusterView) -> bool:
    """GPU actors unless ``--device cpu``, whenever the cluster has or can reach a GPU."""
    return config.device != "cpu" and max(cluster.gpus_now, cluster.gpus_reachable) > 0


def decide_compute(
    config: JobConfig, cluster: ClusterView, actor_memory: Callable[[str, int, int], int] | None = None
) -> ComputePlan:
    """The device, dtype, batch and pool for ``config`` on ``cluster``. Pure.

    ``auto`` uses GPUs when the cluster has or can reach any; the pool may grow to the GPUs reachable (one actor per
    ``gpus_per_actor``), never beyond ``--max-actors``. Raises :class:`ComputeError` for ``--device cuda`` on a
    cluster that has no GPU and cannot get one.

    On CPU-only clusters each node gets one actor running as many single-threaded model calls at once as its cores
    and memory allow (:func:`pipeline.cpu.size_cpu_node`); ``actor_memory(dtype, batch_size, calls)`` says what the
    actor needs in bytes (:func:`pipeline.cpu.actor_memory_bytes` for the job's model), and it reserves that. The
    pool is fixed at one actor per node: the cores are there from the start, and growing the pool under load would
    only delay using them. ``--cpus-per-actor`` and ``--compile`` run one call at a time on all the actor's threads
    (a compiled graph is not called from several threads at once).
    """
    reachable = max(cluster.gpus_now, cluster.gpus_reachable)
    if config.device == "cuda" and reachable <= 0:
        raise ComputeError(
            "--device cuda was asked for, but the Ray cluster has no GPUs and its autoscaler config "
            f"({cluster.source}) has no node type with GPUs; add a GPU node type, or use --device auto or cpu"
        )
    use_gpu = uses_gpu(config, cluster)
    dtype = dtype_without_cluster(config) or ("bfloat16" if use_gpu else cluster.cpu_dtype or "float32")
    batch_size = config.batch_size or (GPU_BATCH_SIZE if use_gpu else CPU_BATCH_SIZE)
    if use_gpu:
        gpus_per_actor = config.gpus_per_actor or 1.0
        pool_limit = max(1, math.floor(reachable / gpus_per_actor + 1e-9))
        max_actors = min(config.max_actors, pool_limit) if config.max_actors else pool_limit
        resources = {"num_gpus": gpus_per_actor, "num_cpus": config.cpus_per_actor or 1.0}
        wanted_gpus = math.ceil(max_actors * gpus_per_actor - 1e-9)
        return ComputePlan(
            use_gpu=True, device="cuda", dtype=dtype, batch_size=batch_size,
            min_actors=max(1, min(config.min_actors, max_actors)), max_actors=max_actors,
            actor_resources=resources, torch_threads=None, decode_cpus=config.decode_cpus or 1.0,
            # Fixed shapes keep cuDNN's tuned kernels and a compiled graph valid for every call.
            pad_to_batch=True,
            gpus_to_request=wanted_gpus if wanted_gpus > cluster.gpus_now else 0,
        )
    # CPU-only: every core busy, each node split between its actor and decoding by each stage's cost.
    sizing = size_cpu_node(
        cluster.smallest_cpu_node_cpus, node_memory_bytes=cluster.smallest_cpu_node_memory,
        actor_memory=None if actor_memory is None else lambda calls: actor_memory(dtype, batch_size, calls),
    )
    max_actors = config.max_actors or max(1, cluster.cpu_nodes)  # one actor per CPU node
    cpus = config.cpus_per_actor or sizing.cpus_per_actor
    cpu_resources: dict[str, float] = {"num_cpus": cpus}
    if sizing.actor_memory_bytes:
        cpu_resources["memory"] = float(sizing.actor_memory_bytes)
    if config.cpus_per_actor:
        calls, threads = 1, math.ceil(config.cpus_per_actor)
    elif config.compile:
        calls, threads = 1, sizing.torch_threads * sizing.calls_per_actor
    else:
        calls, threads = sizing.calls_per_actor, sizing.torch_threads
    return ComputePlan(
        use_gpu=False, device="cpu", dtype=dtype, batch_size=batch_size,
        min_actors=max_actors if config.min_actors <= 1 else min(config.min_actors, max_actors), max_actors=max_actors,
        actor_resources=cpu_resources, torch_threads=threads, calls_per_actor=calls,
        actor_env=cpu_actor_environment(),
        decode_cpus=config.decode_cpus or sizing.decode_cpus_per_task,
        pad_to_batch=config.compile,  # a compiled CPU model also wants one shape
    )


def gpus_in_node_types(
    node_types: Mapping[str, Any], *, head_node_type: str | None = None, max_workers: int | None = None
) -> float:
    """GPUs an autoscaler config's ``available_node_types`` can reach: each worker type's GPUs x its
    ``max_workers``, plus the head's own GPUs, with the workers capped by the cluster-wide ``max_workers``."""
    head_gpus = 0.0
    worker_gpus = 0.0
    most_per_node = 0.0
    for name, node_type in node_types.items():
        gpus = float((node_type.get("resources") or {}).get("GPU", 0) or 0)
        if gpus <= 0:
            continue
        if name == head_node_type:
            head_gpus = gpus
            continue
        worker_gpus += gpus * int(node_type.get("max_workers", node_type.get("min_workers", 0)) or 0)
        most_per_node = max(most_per_node, gpus)
    if max_workers is not None:
        worker_gpus = min(worker_gpus, most_per_node * int(max_workers))
    return head_gpus + worker_gpus


def gpus_in_autoscaling_config(path: str | os.PathLike[str]) -> float | None:
    """GPUs reachable according to an autoscaler config file (``ray up``'s YAML, or JSON); None if unreadable."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        import yaml  # Ray depends on PyYAML

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
    if not isinstance(document, dict) or not isinstance(document.get("available_node_types"), dict):
        return None
    limit = document.get("max_workers")
    return gpus_in_node_types(
        document["available_node_types"], head_node_type=document.get("head_node_type"),
        max_workers=None if limit is None else int(limit),
    )


# --------------------------------------------------------------------------------------------------- Ray edges


def observe_cluster(ray: Any) -> ClusterView:
    """GPUs now (``ray.cluster_resources()``) and reachable (autoscaler config), for :func:`decide_compute`."""
    gpus_now = float(ray.cluster_resources().get("GPU", 0) or 0)
    reachable, source = gpus_now, "running"
    try:
        from ray._private.state import state

        maximum = state.get_max_resources_from_cluster_config()
    except Exception as error:  # noqa: BLE001 - a private API that may change; the file below is the fallback
        logger.debug("no cluster config from Ray: %s", error)
        maximum = None
    if maximum and maximum.get("GPU"):
        reachable, source = max(reachable, float(maximum["GPU"])), "cluster config"
    else:
        path = os.environ.get(AUTOSCALING_CONFIG_VARIABLE) or str(BOOTSTRAP_CONFIG)
        from_file = gpus_in_autoscaling_config(path)
        if from_file:
            reachable, source = max(reachable, from_file), path
    nodes = ray.nodes()
    view = ClusterView(
        gpus_now=gpus_now, gpus_reachable=reachable, source=source,
        cpu_nodes=count_cpu_nodes(nodes), smallest_cpu_node_cpus=smallest_cpu_node(nodes) or 1.0,
        smallest_cpu_node_memory=smallest_cpu_node_memory(nodes),
    )
    logger.info("cluster GPUs: %g now, %g reachable (%s); %d CPU-only nodes", view.gpus_now, view.gpus_reachable,
                view.source, view.cpu_nodes)
    return view


def request_gpus(plan: ComputePlan) -> None:
    """Ask the autoscaler for the pool's GPUs now (one bundle per actor), so they start while decoding begins.

    ``request_resources`` is a standing request: it replaces any earlier one and holds until the next call, which is
    what a job wants for its lifetime. Only called when the plan wants more GPUs than are running.
    """
    if not plan.gpus_to_request:
        return
    from ray.autoscaler.sdk import request_resources

    bundle = {"GPU": plan.actor_resources["num_gpus"], "CPU": plan.actor_resources.get("num_cpus", 1.0)}
    logger.info("asking the autoscaler for %d GPU bundles %s", plan.max_actors, bundle)
    request_resources(bundles=[dict(bundle) for _ in range(plan.max_actors)])
