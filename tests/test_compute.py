"""pipeline/compute.py: device, dtype and pool for the cluster a job will have; and a job on an autoscaling cluster.

The pure decision is tested without Ray. The end-to-end test starts Ray's fake multi-node autoscaler (the provider
``ray.cluster_utils.AutoscalingCluster`` drives) with a GPU node type and no GPU worker running, and checks that
the job runs on "GPUs" in bfloat16 and grows its pool to the node type's maximum. ``AutoscalingCluster`` itself is
not used: its ``start()`` and ``shutdown()`` run ``ray stop --force``, which would kill every Ray process on the
machine (other test sessions' too), it binds the default port, and its ``example.yaml`` is not in Ray's wheel. The
fixture below starts the same thing on a free port and a private temp dir and stops only the processes it started.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.compute import (
    AUTOSCALING_CONFIG_VARIABLE,
    ClusterView,
    ComputeError,
    decide_compute,
    dtype_without_cluster,
    gpus_in_autoscaling_config,
    gpus_in_node_types,
    observe_cluster,
)
from pipeline.config import JobConfig
from pipeline.cpu import cpu_actor_environment, size_cpu_node


def job(**overrides: object) -> JobConfig:
    settings: dict[str, object] = {"task": "classify", "input": "in", "output": "out", "model": "m"}
    settings.update(overrides)
    return JobConfig(**settings)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- decisions


def test_auto_uses_gpus_the_cluster_can_reach_although_none_runs_yet() -> None:
    plan = decide_compute(job(), ClusterView(gpus_now=0, gpus_reachable=8, source="cluster.yaml"))
    assert plan.use_gpu and plan.device == "cuda" and plan.dtype == "bfloat16"
    assert plan.max_actors == 8 and plan.min_actors == 1 and plan.gpus_to_request == 8
    assert plan.actor_resources == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert plan.batch_size == 256 and plan.pad_to_batch and plan.torch_threads is None
    assert plan.actor_env == {}  # GPU actors keep the node's allocator


def test_pool_grows_past_the_gpus_present_and_honours_max_actors() -> None:
    one_of_eight = ClusterView(gpus_now=1, gpus_reachable=8)
    assert decide_compute(job(), one_of_eight).max_actors == 8
    capped = decide_compute(job(max_actors=3), one_of_eight)
    assert capped.max_actors == 3 and capped.gpus_to_request == 3
    assert decide_compute(job(max_actors=1), one_of_eight).gpus_to_request == 0  # the running GPU is enough
    halves = decide_compute(job(gpus_per_actor=0.5), ClusterView(gpus_now=0, gpus_reachable=2))
    assert halves.max_actors == 4 and halves.gpus_to_request == 2
    assert decide_compute(job(min_actors=5, max_actors=2), one_of_eight).min_actors == 2


def test_cpu_only_clusters_and_explicit_choices() -> None:
    none = ClusterView(gpus_now=0, gpus_reachable=0)
    cpu = decide_compute(job(cpus_per_actor=4), none)
    assert not cpu.use_gpu and cpu.dtype == "float32" and cpu.max_actors == 1 and cpu.torch_threads == 4
    assert cpu.calls_per_actor == 1  # --cpus-per-actor: one batch at a time on all of its threads
    assert cpu.batch_size == 16 and not cpu.pad_to_batch and cpu.gpus_to_request == 0
    assert decide_compute(job(compile=True), none).pad_to_batch  # a compiled model wants one shape on CPUs too
    assert not decide_compute(job(device="cpu"), ClusterView(gpus_now=4, gpus_reachable=4)).use_gpu
    assert decide_compute(job(dtype="fp32"), ClusterView(gpus_now=0, gpus_reachable=2)).dtype == "float32"
    with pytest.raises(ComputeError, match="--device cuda"):
        decide_compute(job(device="cuda"), none)
    assert decide_compute(job(device="cuda"), ClusterView(gpus_now=0, gpus_reachable=1)).use_gpu


def test_cpu_only_clusters_use_the_node_decided_dtype_and_every_core() -> None:
    three_nodes = ClusterView(gpus_now=0, gpus_reachable=0, cpu_nodes=3, smallest_cpu_node_cpus=16,
                              cpu_dtype="bfloat16")
    plan = decide_compute(job(), three_nodes)
    assert plan.dtype == "bfloat16"  # what the CPU node computes natively, probed there
    assert plan.max_actors == 3  # one actor per CPU node
    sizing = size_cpu_node(16)
    assert plan.actor_resources == {"num_cpus": sizing.cpus_per_actor} and plan.torch_threads == sizing.torch_threads
    assert plan.decode_cpus == sizing.decode_cpus_per_task
    assert plan.actor_resources["num_cpus"] + sizing.decode_tasks * plan.decode_cpus == pytest.approx(16)
    assert decide_compute(job(dtype="fp32"), three_nodes).dtype == "float32"  # a named dtype wins
    assert decide_compute(job(), ClusterView(gpus_now=0, gpus_reachable=0)).dtype == "float32"  # not probed
    assert decide_compute(job(decode_cpus=2.0), three_nodes).decode_cpus == 2.0
    assert plan.actor_env == cpu_actor_environment()  # the allocator that reuses freed activations
    assert decide_compute(job(), ClusterView(gpus_now=1, gpus_reachable=1, cpu_dtype="float32")).decode_cpus == 1.0


def test_cpu_only_pools_hold_one_actor_per_node_with_a_single_threaded_call_per_core_that_memory_allows() -> None:
    asked: list[tuple[str, int, int]] = []
    gib = 1024**3

    def actor_memory(dtype: str, batch_size: int, calls: int) -> int:
        asked.append((dtype, batch_size, calls))
        return int(1.5 * gib + calls * 0.5 * gib)

    two_nodes = ClusterView(gpus_now=0, gpus_reachable=0, cpu_nodes=2, smallest_cpu_node_cpus=4,
                            smallest_cpu_node_memory=32 * gib, cpu_dtype="bfloat16")
    plan = decide_compute(job(), two_nodes, actor_memory)
    assert {(dtype, batch) for dtype, batch, _ in asked} == {("bfloat16", 16)}  # the dtype and batch the actors run
    # One actor per node (a fixed pool), each computing 4 single-threaded batches at once.
    assert (plan.max_actors, plan.min_actors, plan.calls_per_actor, plan.torch_threads) == (2, 2, 4, 1)
    assert plan.actor_resources["memory"] == actor_memory("bfloat16", 16, 4)  # reserved, so Ray packs by it
    assert plan.actor_resources["num_cpus"] + plan.decode_cpus == pytest.approx(4, abs=0.011)
    # A node with memory for one batch at a time: one call with every thread.
    small = dataclasses.replace(two_nodes, smallest_cpu_node_memory=3 * gib)
    narrow = decide_compute(job(), small, actor_memory)
    assert (narrow.max_actors, narrow.calls_per_actor, narrow.torch_threads) == (2, 1, 4)
    # --compile: one compiled graph, called by one thread at a time, on every thread.
    compiled = decide_compute(job(compile=True), two_nodes, actor_memory)
    assert (compiled.calls_per_actor, compiled.torch_threads) == (1, 4)
    # --cpus-per-actor / --max-actors are the user's: one actor of that size per node; the cap holds.
    sized = decide_compute(job(cpus_per_actor=2), two_nodes, actor_memory)
    assert (sized.max_actors, sized.calls_per_actor, sized.torch_threads) == (2, 1, 2)
    assert decide_compute(job(max_actors=3), two_nodes, actor_memory).max_actors == 3
    assert decide_compute(job(min_actors=2), two_nodes, actor_memory).min_actors == 2
    # No memory estimate: one actor per node, one call at a time, no memory reservation.
    unknown = decide_compute(job(), two_nodes)
    assert "memory" not in unknown.actor_resources and unknown.calls_per_actor == 1
    # What the job logs of it.
    assert plan.describe() == ("inference on cpu: 2 actor(s) x 3.75 CPUs, 4 batches at once on 1 torch thread(s) each, "
                               "3.50 GiB reserved, bfloat16, batch 16; decode tasks of 0.25 CPU")
    gpus = decide_compute(job(), ClusterView(gpus_now=1, gpus_reachable=8))
    assert gpus.describe() == "inference on cuda: 1-8 actor(s) x 1 GPU + 1 CPU, bfloat16, batch 256; decode tasks of 1 CPU"


def test_dtype_without_cluster() -> None:
    assert dtype_without_cluster(job()) is None  # auto on auto: depends on the GPUs
    assert dtype_without_cluster(job(device="cpu")) is None  # auto on CPU nodes: depends on their CPU
    assert dtype_without_cluster(job(dtype="bf16")) == "bfloat16"


def test_gpus_in_node_types_counts_max_workers_and_the_head() -> None:
    node_types = {
        "head": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 32}, "max_workers": 10},
        "gpu_worker": {"resources": {"CPU": 16, "GPU": 1}, "min_workers": 1, "max_workers": 8},
        "gpu_x4": {"resources": {"GPU": 4}, "min_workers": 0, "max_workers": 2},
    }
    assert gpus_in_node_types(node_types, head_node_type="head") == 1 + 8 + 8
    assert gpus_in_node_types(node_types, head_node_type="head", max_workers=3) == 1 + 3 * 4


def test_gpus_in_the_shipped_cluster_yaml() -> None:
    """The file `ray up` leaves on the head as ~/ray_bootstrap_config.yaml: its GPU worker type must be counted."""
    import yaml

    shipped = Path(__file__).resolve().parent.parent / "cluster.yaml"
    document = yaml.safe_load(shipped.read_text())
    workers = [node for name, node in document["available_node_types"].items() if name != document["head_node_type"]]
    per_type = [float(node.get("resources", {}).get("GPU", 0)) * int(node.get("max_workers", 0)) for node in workers]
    most_per_node = max(float(node.get("resources", {}).get("GPU", 0)) for node in workers)
    expected = min(sum(per_type), most_per_node * int(document.get("max_workers", 10**9)))
    assert expected > 0  # the shipped config has a GPU worker type
    assert gpus_in_autoscaling_config(shipped) == expected
    assert gpus_in_autoscaling_config(shipped.parent / "no-such-file.yaml") is None


def test_observe_cluster_prefers_rays_cluster_config_then_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ray._private import state as ray_state

    fake_ray = SimpleNamespace(
        cluster_resources=lambda: {"CPU": 4.0, "GPU": 1.0},
        nodes=lambda: [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 8.0}}],
    )
    monkeypatch.setattr(ray_state.state, "get_max_resources_from_cluster_config", lambda: {"GPU": 6, "CPU": 100})
    view = observe_cluster(fake_ray)
    assert (view.gpus_now, view.gpus_reachable, view.source) == (1.0, 6.0, "cluster config")
    assert (view.cpu_nodes, view.smallest_cpu_node_cpus) == (1, 8.0)  # the GPU node is not a CPU node

    monkeypatch.setattr(ray_state.state, "get_max_resources_from_cluster_config", lambda: None)
    config = tmp_path / "autoscaler.json"
    config.write_text(json.dumps({"available_node_types": {"g": {"resources": {"GPU": 2}, "max_workers": 3}}}))
    monkeypatch.setenv(AUTOSCALING_CONFIG_VARIABLE, str(config))
    view = observe_cluster(fake_ray)
    assert (view.gpus_now, view.gpus_reachable, view.source) == (1.0, 6.0, str(config))

    monkeypatch.setenv(AUTOSCALING_CONFIG_VARIABLE, str(tmp_path / "missing.yaml"))
    assert observe_cluster(fake_ray).gpus_reachable == 1.0  # nothing says it can grow: what runs
