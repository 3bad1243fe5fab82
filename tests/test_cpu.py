"""pipeline.cpu: CPU capabilities, the CPU dtype decision and its freezing in the fingerprint, and CPU-node sizing."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from model.processing import ViTHybridImageProcessor
from pipeline import cpu
from pipeline.config import JobConfig
from pipeline.cpu import CpuCapabilities, CpuDtypeDecision
from pipeline.manifest import OutputConflictError, OutputState
from pipeline.plan import build_fingerprint

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: ignored second entry
flags\t\t: fpu
"""


def caps(**flags: bool) -> CpuCapabilities:
    values = {"avx2": True, "avx512": False, "avx512_bf16": False, "amx_bf16": False, **flags}
    return CpuCapabilities(name="test CPU", logical_cpus=4, physical_cores=2, isa="AVX2", source="test", **values)


def test_parse_cpuinfo_reads_the_first_processor() -> None:
    name, flags = cpu.parse_cpuinfo(CPUINFO)
    assert name == "Intel(R) Xeon(R) Platinum 8488C"
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= flags and "fpu" in flags
    capabilities = cpu.capabilities_from_flags(
        flags, name=name, logical_cpus=8, physical_cores=4, isa="AVX512", source="/proc/cpuinfo"
    )
    assert capabilities.avx512 and capabilities.avx512_bf16 and capabilities.amx_bf16 and capabilities.native_bf16


def test_flags_in_torch_spelling_are_understood() -> None:
    torch_style = ["avx2", "avx512_f", "avx512_bw", "avx512_vnni"]  # torch.cpu.get_capabilities() names
    capabilities = cpu.capabilities_from_flags(
        torch_style, name="x", logical_cpus=2, physical_cores=2, isa="AVX512", source="torch"
    )
    assert capabilities.avx512 and not capabilities.avx512_bf16 and not capabilities.native_bf16
    assert cpu.capabilities_from_flags(["amx_bf16"], name="x", logical_cpus=2, physical_cores=None, isa="AVX512",
                                       source="torch").native_bf16


def test_detected_capabilities_agree_with_proc_cpuinfo() -> None:
    detected = cpu.detect_cpu_capabilities()
    _, flags = cpu.parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    assert detected.avx2 == ("avx2" in flags)
    assert detected.avx512 == ("avx512f" in flags)
    assert detected.avx512_bf16 == ("avx512_bf16" in flags)
    assert detected.amx_bf16 == ("amx_bf16" in flags)
    assert detected.logical_cpus == cpu.usable_cpus() >= 1
    assert CpuCapabilities.from_dict(detected.to_dict()) == detected
    assert detected.name in detected.describe()


def test_proc_cpuinfo_capabilities_match_torchs(tmp_path: Path) -> None:
    from_kernel = cpu.capabilities_from_proc_cpuinfo()
    from_torch = cpu.detect_cpu_capabilities()
    assert from_kernel is not None
    for flag in ("avx2", "avx512", "avx512_bf16", "amx_bf16"):
        assert getattr(from_kernel, flag) == getattr(from_torch, flag), flag
    written = tmp_path / "cpuinfo"
    written.write_text(CPUINFO, encoding="utf-8")
    parsed = cpu.capabilities_from_proc_cpuinfo(str(written))
    assert parsed is not None and parsed.native_bf16 and parsed.amx_bf16 and parsed.isa.startswith("AVX512")
    assert cpu.capabilities_from_proc_cpuinfo(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("flags", "measured", "expected"),
    [
        ({}, None, "float32"),  # AVX2 only: bf16 emulated
        ({"avx512": True}, None, "float32"),  # AVX-512 without the BF16 extension (this project's Xeon)
        ({"avx512": True}, 3.0, "float32"),  # a measurement never turns emulated bf16 on
        ({"avx512": True, "avx512_bf16": True}, None, "bfloat16"),
        ({"avx512": True, "avx512_bf16": True}, 2.5, "bfloat16"),
        ({"avx512": True, "amx_bf16": True}, 8.0, "bfloat16"),
        ({"avx512": True, "avx512_bf16": True}, 0.9, "float32"),  # flag passed through, no speed behind it
    ],
)
def test_choose_cpu_dtype(flags: dict[str, bool], measured: float | None, expected: str) -> None:
    decision = cpu.choose_cpu_dtype(caps(**flags), measured)
    assert decision.dtype == expected
    assert decision.reason
    assert CpuDtypeDecision.from_dict(decision.to_dict()) == decision


def test_this_machines_decision_follows_its_flags() -> None:
    decision = CpuDtypeDecision.from_dict(cpu.decide_on_this_node())
    native = decision.capabilities.native_bf16
    assert decision.dtype == ("bfloat16" if native and (decision.measured_bf16_speedup or 2) >= 1.2 else "float32")
    assert (decision.measured_bf16_speedup is not None) == native  # measured only to confirm a claim


def test_a_resume_on_other_hardware_is_refused_not_mixed(tmp_path: Path) -> None:
    """Started where the CPU has AVX512-BF16 (bf16 frozen), resumed on an AVX2 node (fp32): refused, naming dtype."""
    config = JobConfig(task="classify", input="unused", output=str(tmp_path / "out"), model="unused")
    processor = ViTHybridImageProcessor()
    plan = [{"shard_id": "s0", "format": "webdataset", "uri": "file:///in/a.tar"}]
    first = cpu.choose_cpu_dtype(caps(avx512=True, avx512_bf16=True)).dtype
    OutputState.open(config.output, build_fingerprint(config, "ab" * 32, processor, first), plan, {})
    second = cpu.choose_cpu_dtype(caps()).dtype
    assert (first, second) == ("bfloat16", "float32")
    with pytest.raises(OutputConflictError, match="dtype: 'bfloat16' -> 'float32'"):
        OutputState.open(config.output, build_fingerprint(config, "ab" * 32, processor, second), plan, {})
    # The same hardware resumes.
    again = OutputState.open(config.output, build_fingerprint(config, "ab" * 32, processor, first), plan, {})
    assert again.resumed


# --------------------------------------------------------------------------------------------------------------------
# Sizing


@pytest.mark.parametrize("node_cpus", [1, 2, 4, 16, 64, 192])
def test_every_core_is_reserved_and_the_model_gets_nearly_all(node_cpus: int) -> None:
    plan = cpu.size_cpu_node(node_cpus)
    reserved = plan.cpus_per_actor + plan.decode_cpus_per_task * plan.decode_tasks
    assert reserved == pytest.approx(node_cpus, abs=0.011)  # every CPU reserved (rounding to 0.01)
    assert plan.calls_per_actor == 1 and 0 < plan.decode_cpus_per_task <= 1  # no memory figures: one call
    # Decoding gets its share times the headroom, at least a quarter CPU; the model the rest, one thread per CPU.
    decode_total = plan.decode_cpus_per_task * plan.decode_tasks
    needed = node_cpus * (1 - plan.model_share)
    assert decode_total >= min(needed * cpu.DECODE_HEADROOM, max(node_cpus - 1, cpu.MIN_DECODE_CPUS)) - 0.011
    assert decode_total >= cpu.MIN_DECODE_CPUS - 0.011
    assert plan.torch_threads == math.ceil(plan.cpus_per_actor - 1e-9)
    if node_cpus >= 2 and decode_total < 1:
        assert plan.torch_threads == node_cpus  # the decode share is a sliver: not one thread less for the model


def test_sizing_follows_the_measured_cost_ratio() -> None:
    # Equal costs: decoding needs half the node; it is capped at all but one CPU.
    plan = cpu.size_cpu_node(8, model_core_s=1.0, decode_core_s=1.0)
    assert plan.model_share == pytest.approx(0.5)
    assert plan.decode_cpus_per_task * plan.decode_tasks == pytest.approx(7)
    assert plan.cpus_per_actor == pytest.approx(1) and plan.torch_threads == 1
    # A model ten times as costly as decoding on 64 CPUs: 64/11 x 4 = 23.3 CPUs for decoding, in one-CPU tasks.
    plan = cpu.size_cpu_node(64, model_core_s=10.0, decode_core_s=1.0)
    assert plan.decode_tasks == 24 and plan.decode_cpus_per_task * 24 == pytest.approx(23.27, abs=0.03)
    assert plan.torch_threads == math.ceil(plan.cpus_per_actor)


def test_cores_go_to_single_threaded_calls_of_one_actor_as_far_as_memory_allows() -> None:
    gib = 1024**3

    def actor_memory(calls: int) -> int:  # the process and its weights, then one batch's activations per call
        return int(1.5 * gib + calls * 0.5 * gib)

    # A 2-CPU node with room: one actor computing two single-threaded batches at once; every CPU reserved.
    plan = cpu.size_cpu_node(2, node_memory_bytes=16 * gib, actor_memory=actor_memory)
    assert (plan.calls_per_actor, plan.torch_threads, plan.limited_by) == (2, 1, "cores")
    assert plan.cpus_per_actor + plan.decode_cpus_per_task * plan.decode_tasks == pytest.approx(2, abs=0.011)
    assert plan.actor_memory_bytes == actor_memory(2)  # what it needs with both batches in flight
    # 8 CPUs, memory for three calls (0.75 x 4 GiB = 3 GiB >= 1.5 + 3 x 0.5): three calls of two threads each.
    plan = cpu.size_cpu_node(8, node_memory_bytes=4 * gib, actor_memory=actor_memory)
    assert (plan.calls_per_actor, plan.torch_threads, plan.limited_by) == (3, 2, "memory")
    assert plan.calls_per_actor * plan.torch_threads <= 8 and plan.actor_memory_bytes == actor_memory(3)
    assert plan.cpus_per_actor + plan.decode_cpus_per_task * plan.decode_tasks == pytest.approx(8, abs=0.011)
    # Memory for less than one call: still one, with every thread, and no reservation the node could never grant.
    plan = cpu.size_cpu_node(8, node_memory_bytes=1 * gib, actor_memory=actor_memory)
    assert (plan.calls_per_actor, plan.torch_threads, plan.actor_memory_bytes) == (1, 8, None)
    # SMT: threads are capped by physical cores first, then shared out.
    plan = cpu.size_cpu_node(64, physical_cores=32, node_memory_bytes=512 * gib, actor_memory=actor_memory)
    assert (plan.calls_per_actor, plan.torch_threads) == (32, 1)
    # No memory figures: one call with every thread.
    unknown = cpu.size_cpu_node(16)
    assert (unknown.calls_per_actor, unknown.torch_threads, unknown.limited_by) == (1, 16, "memory unknown")


def test_actor_memory_estimate_matches_the_measured_actor() -> None:
    # Measured: peak RSS 2.0 GiB for a Ray Data actor of the full-size model (98,950,952 parameters) at batch 16,
    # fp32, 384 px.
    full = cpu.actor_memory_bytes(98_950_952, batch_size=16, image_size=384)
    assert full == pytest.approx(2.0 * 1024**3, rel=0.05)
    # Half the element size halves weights and activations; activations grow with the pixels and the batch.
    assert cpu.actor_memory_bytes(98_950_952, batch_size=16, image_size=384, element_bytes=2) < full
    assert cpu.actor_memory_bytes(98_950_952, batch_size=16, image_size=768) - full == pytest.approx(
        16 * 3 * cpu.ACTIVATION_BYTES_PER_IMAGE, rel=1e-6
    )
    assert cpu.actor_memory_bytes(98_950_952, batch_size=32, image_size=384) > full
    # Each further batch in flight adds one batch's activations, not another process or copy of the weights.
    assert cpu.actor_memory_bytes(98_950_952, batch_size=16, image_size=384, calls=3) - full == pytest.approx(
        2 * 16 * cpu.ACTIVATION_BYTES_PER_IMAGE, rel=1e-6
    )


def test_threads_never_exceed_physical_cores_and_bad_inputs_are_refused() -> None:
    assert cpu.size_cpu_node(32, physical_cores=16).torch_threads == 16
    with pytest.raises(ValueError, match="at least 1 CPU"):
        cpu.size_cpu_node(0.5)
    with pytest.raises(ValueError, match="positive"):
        cpu.size_cpu_node(4, decode_core_s=0)


def _flags(flags: set[str], name: str) -> CpuCapabilities:
    return cpu.capabilities_from_flags(flags, name=name, logical_cpus=2, physical_cores=1, isa="AVX2", source="test")


class _FakeRay:
    """What :func:`pipeline.cpu.decide_cpu_dtype` asks of Ray: the nodes, this process's node, and remote tasks."""

    def __init__(self, nodes: list[dict], this_node: str = "driver-node") -> None:
        self._nodes, self.this_node, self.tasks = nodes, this_node, 0

    def nodes(self) -> list[dict]:
        return self._nodes

    def get_runtime_context(self) -> Any:
        return SimpleNamespace(get_node_id=lambda: self.this_node)

    def remote(self, **options: object) -> Any:
        def wrap(function: Any) -> Any:
            return SimpleNamespace(remote=lambda: function)

        return wrap

    def get(self, task: Any, timeout: float) -> dict:
        self.tasks += 1
        # What a probe on a worker with native bf16 brings back.
        return CpuDtypeDecision("bfloat16", "probed", _flags({"avx512_bf16", "avx512f"}, "worker")).to_dict()


def test_the_driver_decides_the_dtype_itself_only_on_the_only_cpu_node_and_without_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu, "capabilities_from_proc_cpuinfo", lambda: _flags({"avx2", "fma"}, "driver"))
    alone = [{"NodeID": "driver-node", "Alive": True, "Resources": {"CPU": 2.0}},
             {"NodeID": "gone", "Alive": False, "Resources": {"CPU": 8.0}},
             {"NodeID": "zero-cpu", "Alive": True, "Resources": {"CPU": 0.0}}]
    ray = _FakeRay(alone)
    assert cpu.decide_cpu_dtype(ray).dtype == "float32" and ray.tasks == 0  # decided here: no task

    # Another node with CPUs could host actors, or the driver's node has none: a task probes a computing node.
    for nodes in ([*alone, {"NodeID": "worker", "Alive": True, "Resources": {"CPU": 4.0}}],
                  [{"NodeID": "driver-node", "Alive": True, "Resources": {"CPU": 0.0}},
                   {"NodeID": "worker", "Alive": True, "Resources": {"CPU": 4.0}}]):
        ray = _FakeRay(nodes)
        assert cpu.decide_cpu_dtype(ray).dtype == "bfloat16" and ray.tasks == 1

    # Flags that claim native bf16 need torch's measurement, which the driver never imports: the task runs it.
    monkeypatch.setattr(cpu, "capabilities_from_proc_cpuinfo", lambda: _flags({"avx512_bf16", "avx512f"}, "driver"))
    ray = _FakeRay(alone)
    assert cpu.decide_cpu_dtype(ray).dtype == "bfloat16" and ray.tasks == 1


def test_cpu_nodes_from_ray_nodes() -> None:
    nodes = [
        {"Alive": True, "Resources": {"CPU": 0.0}},  # a head kept free of work
        {"Alive": True, "Resources": {"CPU": 16.0, "memory": 64e9}},
        {"Alive": True, "Resources": {"CPU": 8.0, "memory": 30e9}},
        {"Alive": False, "Resources": {"CPU": 2.0, "memory": 1e9}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 2e9}},
    ]
    assert cpu.smallest_cpu_node(nodes) == 8.0
    assert cpu.smallest_cpu_node_memory(nodes) == 30e9  # alive CPU-only nodes only
    assert cpu.count_cpu_nodes(nodes) == 2
    assert cpu.smallest_cpu_node([]) is None and cpu.smallest_cpu_node_memory([]) is None


# ---------------------------------------------------------------------------------------------------- the allocator

_FAULTS_SCRIPT = """
import json, resource
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(200_000_000)  # 200 MB, as one activation of a CPU batch: far above glibc's mmap threshold
    block[::4096] = bytes(len(block[::4096]))  # touch every page (plain malloc: no huge-page advice, as numpy gives)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _page_faults_of_repeated_allocations(environment: dict[str, str]) -> list[int]:
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    output = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env={**env, **environment},
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output)


def test_actor_allocator_reuses_freed_blocks_instead_of_faulting_them_in_again() -> None:
    """With glibc's defaults every 200 MB block is a fresh mmap: ~49,000 page faults each time. With the CPU actors'
    tunables the second and later blocks reuse the heap: (almost) no faults."""
    from pipeline.cpu import cpu_actor_environment

    defaults = _page_faults_of_repeated_allocations({})
    tuned = _page_faults_of_repeated_allocations(cpu_actor_environment())
    assert min(defaults[1:]) > 40_000
    assert max(tuned[1:]) < 1_000
    assert cpu_actor_environment()["GLIBC_TUNABLES"].startswith("glibc.malloc.arena_max=1:")


def test_the_jobs_actor_memory_estimate_counts_the_models_parameters(tmp_path) -> None:
    import torch

    from model import ViTHybridConfig, ViTHybridForImageClassification, ViTHybridImageProcessor
    from model.weights import checkpoint_fingerprint
    from pipeline.plan import actor_memory_estimate
    from tests.reference import small_config_dict, write_reference_checkpoint

    config = ViTHybridConfig(**small_config_dict())
    processor = ViTHybridImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    parameters = sum(parameter.numel() for parameter in ViTHybridForImageClassification(config).parameters())
    # The driver's count: the shapes in the checkpoint's safetensors header, read by the preflight without torch.
    fingerprint = checkpoint_fingerprint(write_reference_checkpoint(tmp_path / "model", small_config_dict()))
    assert fingerprint.parameters == parameters
    for counted in (fingerprint.parameters, None):  # None: a pickled checkpoint, counted on torch's meta device
        estimate = actor_memory_estimate(config, processor, counted)
        assert estimate("float32", 8, 1) == cpu.actor_memory_bytes(parameters, batch_size=8, image_size=64)
        assert estimate("bfloat16", 8, 2) == cpu.actor_memory_bytes(parameters, batch_size=8, image_size=64, element_bytes=2,
                                                                    calls=2)
    assert torch.get_default_device().type == "cpu"  # the meta-device count leaves torch's default alone
