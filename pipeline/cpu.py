"""What a CPU node can do, and the two decisions that follow from it: the compute dtype and how its cores are shared.

Why this module exists: CPUs differ more than GPUs do for this model. Where the CPU computes bf16 natively
(AVX512-BF16 or AMX), bf16 matrix products run ~2.5x faster than fp32; where it does not (AVX2-only parts, and
AVX-512 parts without the BF16 extension), oneDNN emulates bf16 and it runs up to ~5x *slower*. So ``--dtype auto``
cannot be decided from "is there a GPU" alone, nor on the driver (which may be a different machine): it is decided
from the capabilities of a node that computes (:func:`probe_cpu_node` runs :func:`decide_on_this_node` there as a
small Ray task; :func:`decide_cpu_dtype` runs it in the driver when the driver's node is the only one) and then frozen
in the job's fingerprint, so a resume on other hardware is refused instead of mixing bf16 and fp32 rows
(see :mod:`pipeline.manifest`).

The second decision is how a CPU-only node's cores are split between the inference actor and the decode tasks
(:func:`size_cpu_node`): from the measured cost of each stage, not one thread per actor.

Everything here except :func:`decide_cpu_dtype`, :func:`probe_cpu_node` and :func:`measure_bf16_speedup` is pure and
tested without Ray.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

# /proc/cpuinfo flag names (Linux) of the extensions that compute bf16 natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuCapabilities:
    """The facts about one node's CPU that decide dtype and threads; recorded in logs and the benchmark's output.

    ``source`` says where the flags came from: ``torch`` (``torch.cpu.get_capabilities()``, the cpuinfo library torch
    itself dispatches with) or ``/proc/cpuinfo`` on torch builds without that call.
    """

    name: str
    logical_cpus: int  # CPUs this process may run on (affinity), not the whole machine's
    physical_cores: int | None
    isa: str  # torch's kernel dispatch level: "AVX512", "AVX2", "DEFAULT", ...
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx_bf16: bool
    source: str

    @property
    def native_bf16(self) -> bool:
        """True where bf16 matrix products run in hardware (AVX512-BF16 dot products or AMX tiles)."""
        return self.avx512_bf16 or self.amx_bf16

    def describe(self) -> str:
        """One line for logs and the benchmark table."""
        flags = [name for name in ("avx2", "avx512", "avx512_bf16", "amx_bf16") if getattr(self, name)]
        return (
            f"{self.name}, {self.logical_cpus} CPUs ({self.physical_cores or '?'} cores), torch ISA {self.isa}, "
            f"flags: {' '.join(flags) or 'none of avx2/avx512/avx512_bf16/amx_bf16'} (from {self.source})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "native_bf16": self.native_bf16}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CpuCapabilities:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """``(model name, flags)`` of the first processor in a ``/proc/cpuinfo`` text."""
    name, flags = "unknown CPU", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def capabilities_from_flags(
    flags: Iterable[str], *, name: str, logical_cpus: int, physical_cores: int | None, isa: str, source: str
) -> CpuCapabilities:
    """Capabilities from a set of flag names, in either spelling (cpuinfo ``avx512bw`` or torch ``avx512_bw``)."""
    normalised = {flag.lower().replace("_", "") for flag in flags}
    return CpuCapabilities(
        name=name,
        logical_cpus=logical_cpus,
        physical_cores=physical_cores,
        isa=isa,
        avx2="avx2" in normalised,
        avx512="avx512f" in normalised,
        avx512_bf16="avx512bf16" in normalised,
        amx_bf16="amxbf16" in normalised,
        source=source,
    )


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (a container's or Ray's limit), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def capabilities_from_proc_cpuinfo(path: str = "/proc/cpuinfo") -> CpuCapabilities | None:
    """This node's capabilities from the kernel's ``/proc/cpuinfo`` without importing torch; None where unreadable.

    Why besides :func:`detect_cpu_capabilities`: the probe runs on the job's critical path, and importing torch in a
    fresh worker costs seconds; the flags the kernel lists are the same cpuid bits torch reads.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            name, flags = parse_cpuinfo(handle.read())
    except OSError:
        return None
    if not flags:
        return None
    isa = "AVX512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else "AVX2" if "avx2" in flags else "DEFAULT"
    return capabilities_from_flags(
        flags, name=name, logical_cpus=usable_cpus(), physical_cores=None, isa=f"{isa} (from flags)",
        source="/proc/cpuinfo",
    )


def detect_cpu_capabilities() -> CpuCapabilities:
    """This node's capabilities, from what torch reports (falling back to ``/proc/cpuinfo``).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not used: it answers True on any AVX-512 part, including
    those that only emulate bf16 (this project's AVX-512-without-BF16 machines), which is the mistake to avoid.
    """
    import torch

    isa = str(torch.backends.cpu.get_cpu_capability())
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        reported = get_capabilities()
        flags = [key for key, value in reported.items() if value is True]
        return capabilities_from_flags(
            flags,
            name=str(reported.get("cpu_name") or "unknown CPU"),
            logical_cpus=usable_cpus(),
            physical_cores=reported.get("num_physical_cores"),
            isa=isa,
            source="torch",
        )
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name, flags_set = parse_cpuinfo(handle.read())
    except OSError:
        name, flags_set = "unknown CPU", set()
    return capabilities_from_flags(
        flags_set, name=name, logical_cpus=usable_cpus(), physical_cores=None, isa=isa, source="/proc/cpuinfo"
    )


# --------------------------------------------------------------------------------------------------------------------
# The dtype
# --------------------------------------------------------------------------------------------------------------------

# Below this measured bf16/fp32 speed ratio a CPU that claims native bf16 is treated as not having it (a hypervisor
# that passes the flag through but traps the instructions, say): bf16 then costs fidelity and gains nothing.
MIN_CONFIRMED_BF16_SPEEDUP = 1.2


@dataclass(frozen=True)
class CpuDtypeDecision:
    """The compute dtype ``auto`` resolves to on a CPU node, and why."""

    dtype: str  # "bfloat16" or "float32"
    reason: str
    capabilities: CpuCapabilities
    measured_bf16_speedup: float | None = None  # bf16 / fp32 matmul throughput, when measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "reason": self.reason,
            "capabilities": self.capabilities.to_dict(),
            "measured_bf16_speedup": self.measured_bf16_speedup,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CpuDtypeDecision:
        return cls(
            dtype=data["dtype"],
            reason=data["reason"],
            capabilities=CpuCapabilities.from_dict(data["capabilities"]),
            measured_bf16_speedup=data.get("measured_bf16_speedup"),
        )


def choose_cpu_dtype(capabilities: CpuCapabilities, measured_bf16_speedup: float | None = None) -> CpuDtypeDecision:
    """bf16 where the CPU computes it natively (and a measurement, when given, confirms it pays); fp32 elsewhere."""
    if not capabilities.native_bf16:
        return CpuDtypeDecision(
            "float32", "no AVX512-BF16 or AMX: bf16 would be emulated, slower than fp32", capabilities,
            measured_bf16_speedup,
        )
    native = "AMX" if capabilities.amx_bf16 else "AVX512-BF16"
    if measured_bf16_speedup is not None and measured_bf16_speedup < MIN_CONFIRMED_BF16_SPEEDUP:
        return CpuDtypeDecision(
            "float32",
            f"{native} reported, but bf16 measured only {measured_bf16_speedup:.2f}x fp32 "
            f"(< {MIN_CONFIRMED_BF16_SPEEDUP}x): not worth its rounding",
            capabilities,
            measured_bf16_speedup,
        )
    confirmed = f", measured {measured_bf16_speedup:.2f}x fp32" if measured_bf16_speedup is not None else ""
    return CpuDtypeDecision("bfloat16", f"{native}: native bf16{confirmed}", capabilities, measured_bf16_speedup)


def measure_bf16_speedup(size: int = 512, min_seconds: float = 0.15) -> float:
    """bf16 over fp32 throughput of a ``size`` x ``size`` matrix product on this node's threads (~0.5 s).

    The confirmation for CPUs that claim native bf16: the model's time is ~all matrix products and convolutions
    through oneDNN, and a square matmul is the quickest probe of the same kernels.
    """
    import torch

    def rate(dtype: torch.dtype) -> float:
        generator = torch.Generator().manual_seed(0)
        left = torch.randn(size, size, generator=generator).to(dtype)
        right = torch.randn(size, size, generator=generator).to(dtype)
        torch.mm(left, right)  # first call creates the kernel
        count, started = 0, time.perf_counter()
        while True:
            torch.mm(left, right)
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                return count / elapsed

    return rate(torch.bfloat16) / rate(torch.float32)


def decide_on_this_node(confirm: bool = True) -> dict[str, Any]:
    """Detect this node's capabilities and choose its CPU dtype; a measurement confirms a claimed native bf16.

    Returns :meth:`CpuDtypeDecision.to_dict` (plain data, so that it crosses a Ray task boundary as it is).
    """
    # The kernel's flags first (no torch import: fast); where they claim native bf16, or cannot be read, what torch
    # reports decides, confirmed by a measurement.
    capabilities = capabilities_from_proc_cpuinfo()
    if capabilities is None or capabilities.native_bf16:
        capabilities = detect_cpu_capabilities()
    measured = measure_bf16_speedup() if confirm and capabilities.native_bf16 else None
    return choose_cpu_dtype(capabilities, measured).to_dict()


def decide_cpu_dtype(ray: Any) -> CpuDtypeDecision:
    """The dtype ``auto`` of the CPU nodes that compute: :func:`probe_cpu_node`, or the same answer without a task.

    When the driver's node is the only alive node with CPUs (a Ray the job started in-process, or a one-node
    cluster), the probe task could only run on this very node, and where the kernel's flags rule native bf16 out
    (AVX2-only CPUs) :func:`decide_on_this_node` needs neither torch nor a measurement: the driver decides itself,
    instead of waiting for a worker process to start for the task (1.4 s of a local job's start-up on a 2-core node,
    3.6 s while Ray Data's service actors were taking the first workers). Where the flags claim native bf16, the
    measurement that confirms it imports torch, which the driver does not: the probe task runs it as before.
    """
    if _only_cpu_node_is_this_one(ray):
        local = capabilities_from_proc_cpuinfo()
        if local is not None and not local.native_bf16:
            decision = choose_cpu_dtype(local, None)  # what decide_on_this_node() concludes from these flags
            _log_decision(decision, where="the driver's node, the only one with CPUs")
            return decision
    return probe_cpu_node(ray)


def _only_cpu_node_is_this_one(ray: Any) -> bool:
    """Whether the only alive node with CPUs is the one this process runs on."""
    with_cpus = [node for node in ray.nodes() if node.get("Alive", True) and node.get("Resources", {}).get("CPU", 0) > 0]
    return len(with_cpus) == 1 and with_cpus[0].get("NodeID") == ray.get_runtime_context().get_node_id()


def _log_decision(decision: CpuDtypeDecision, *, where: str) -> None:
    logger.info("CPU node (%s): %s -> dtype auto = %s (%s)", where, decision.capabilities.describe(), decision.dtype,
                decision.reason)


def probe_cpu_node(ray: Any, timeout_s: float = 300.0) -> CpuDtypeDecision:
    """Run :func:`decide_on_this_node` as a one-CPU Ray task, i.e. on a node that computes, not on the driver.

    On a CPU-only cluster every node with CPUs may host an inference actor; the probe lands on one of them (the
    head's zero-CPU configuration keeps it off the head). Nodes of one cluster normally share an instance type;
    the decision is frozen in the fingerprint either way, so actors on a node of another kind compute in the same
    dtype rather than mixing two in one output.
    """
    task = ray.remote(num_cpus=1, max_retries=2)(decide_on_this_node)
    decision = CpuDtypeDecision.from_dict(ray.get(task.remote(), timeout=timeout_s))
    _log_decision(decision, where="probed by a task")
    return decision


# --------------------------------------------------------------------------------------------------------------------
# Sharing a CPU-only node's cores
# --------------------------------------------------------------------------------------------------------------------

# Measured by ``python -m jobs.benchmark`` (full-size model at 384 px, fp32, one thread; fast decode path on the
# default mix of ImageNet-size JPEGs with one 12-megapixel phone photo in ten): the model costs ~1.9 core-seconds per
# image and decoding ~0.007, a ratio of ~280. What matters below is the ratio, which is about the model's FLOPs
# (115 GFLOPs per image) against a JPEG decode; it moves little between CPUs.
MODEL_CORE_SECONDS_PER_IMAGE = 1.9
DECODE_CORE_SECONDS_PER_IMAGE = 1 / 150
# Decoding gets this multiple of the share its cost asks for, so that it never becomes the bound when images are
# larger than the benchmark's mix; and at least this much of a CPU, so that a decode task is always schedulable.
DECODE_HEADROOM = 4.0
MIN_DECODE_CPUS = 0.25

# An inference actor's memory, measured (peak RSS, full-size model, fp32, 1 thread, glibc settings below): 1.42 GiB
# at batch 4 and 1.85 GiB at batch 16 in a bare process, 2.0 GiB at batch 16 as a Ray Data actor (Ray's own report).
# Its parts: the process with torch, Ray and Ray Data imported, two copies of the weights while they load (the
# file's tensors, then the model's), and the activations of one batch, ~36 MiB per 384x384 image in fp32, which grow
# with the pixels and the element size.
ACTOR_PROCESS_BYTES = 768 * 1024**2
WEIGHT_COPIES_AT_LOAD = 2
ACTIVATION_BYTES_PER_IMAGE = 36 * 1024**2
ACTIVATION_IMAGE_SIZE = 384
# The share of a node's Ray ``memory`` resource its inference actor may reserve; the rest is for decode tasks
# (each reserves ``--decode-memory-mb``), writers and finalize tasks.
ACTOR_MEMORY_SHARE = 0.75


def actor_memory_bytes(
    parameters: int, *, batch_size: int, image_size: int, element_bytes: int = 4, calls: int = 1
) -> int:
    """What one CPU inference actor needs at its peak (see :data:`ACTIVATION_BYTES_PER_IMAGE`) with ``calls`` batches
    in its model at once: the actor reserves this as Ray ``memory``, so a node never hosts more than it can hold."""
    activations = ACTIVATION_BYTES_PER_IMAGE * (image_size / ACTIVATION_IMAGE_SIZE) ** 2 * element_bytes / 4
    return int(ACTOR_PROCESS_BYTES + WEIGHT_COPIES_AT_LOAD * parameters * element_bytes + calls * batch_size * activations)


@dataclass(frozen=True)
class CpuNodePlan:
    """How one CPU-only node's cores are shared: one inference actor in (nearly) all of them, decode tasks in the rest.
    ``cpus_per_actor`` and ``decode_cpus_per_task`` are Ray reservations; the actor runs ``calls_per_actor`` model
    calls at once, each on ``torch_threads`` intra-op threads; ``actor_memory_bytes`` (None when unknown) is what it
    reserves."""

    node_cpus: float
    cpus_per_actor: float
    calls_per_actor: int
    torch_threads: int
    decode_cpus_per_task: float
    decode_tasks: int
    model_share: float  # fraction of the node's core-seconds the model needs per image (the rest: decoding)
    actor_memory_bytes: int | None = None
    limited_by: str = "memory unknown"  # what set the calls at once: "cores", "memory" or "memory unknown"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_cpu_node(
    node_cpus: float,
    *,
    physical_cores: int | None = None,
    node_memory_bytes: float | None = None,
    actor_memory: Callable[[int], int] | None = None,
    model_core_s: float = MODEL_CORE_SECONDS_PER_IMAGE,
    decode_core_s: float = DECODE_CORE_SECONDS_PER_IMAGE,
) -> CpuNodePlan:
    """Split ``node_cpus`` between one inference actor and the decode tasks, from each stage's cost per image.

    Decoding: per image the model needs ``model_core_s`` core-seconds and decoding ``decode_core_s``; both run at
    the same images/s, so decoding needs the fraction ``d / (m + d)`` of the node (0.35 % with the default costs).
    Decoding is reserved ``DECODE_HEADROOM`` times that (at least ``MIN_DECODE_CPUS``, at most all but one CPU), in
    tasks of at most one CPU each.

    Inference: the rest of the node runs one torch thread per reserved CPU, rounded up (a decode task then borrows a
    sliver of an intra-op thread's core, as the cost ratio says it can), never more threads than physical cores (SMT
    siblings share the FMA units a matrix product saturates). One actor holds them all, as concurrent single-threaded
    model calls (``calls_per_actor``, one batch each, in the actor's threads), as many as the node's memory holds
    (``ACTOR_MEMORY_SHARE`` of ``node_memory_bytes``; ``actor_memory(calls)`` is what the actor needs with that many
    batches in flight); the threads are divided evenly among the calls. Why not one call on every thread: the
    threads of one intra-op pool meet at a barrier in every layer, so whenever anything else on the node (Ray's own
    processes, a decode task) takes one of their cores, the others wait; single-threaded calls do not wait for each
    other. Measured on a 2-core node (full-size model, fp32, batch 16): two one-thread processes side by side 1.52
    images/s against 1.47 for one two-thread process, and inside a job one two-thread actor reached 0.80 of its
    model-only rate. Why calls in one actor rather than one single-threaded actor per core, as before: every actor
    is a process that imports torch and Ray Data and loads the weights (~6 CPU-seconds of a 2-core node's start-up
    each, and a copy of the weights), while concurrent calls in one process share all of that; torch releases the
    GIL in its kernels, so the calls compute side by side. Without memory figures, one call on every thread.
    """
    if node_cpus < 1:
        raise ValueError(f"a CPU node needs at least 1 CPU to host an inference actor, got {node_cpus}")
    if model_core_s <= 0 or decode_core_s <= 0:
        raise ValueError(f"stage costs must be positive, got model {model_core_s}, decode {decode_core_s}")
    model_share = model_core_s / (model_core_s + decode_core_s)
    decode_needed = node_cpus * (1 - model_share) * DECODE_HEADROOM
    decode_total = min(max(decode_needed, MIN_DECODE_CPUS), max(node_cpus - 1, MIN_DECODE_CPUS))
    decode_total = round(decode_total, 2)
    decode_tasks = max(1, math.ceil(decode_total))
    decode_per_task = round(decode_total / decode_tasks, 2)
    inference_cpus = round(node_cpus - decode_per_task * decode_tasks, 2)
    if inference_cpus <= 0:  # a 1-CPU node: the actor shares the one CPU (decode needs a quarter of it at most)
        inference_cpus = round(node_cpus - decode_per_task, 2)
    threads = max(1, math.ceil(inference_cpus - 1e-9))
    if physical_cores:
        threads = min(threads, physical_cores)
    calls, limited_by, reserved = 1, "memory unknown", None
    if node_memory_bytes and actor_memory is not None:
        budget = node_memory_bytes * ACTOR_MEMORY_SHARE
        fits = max((count for count in range(1, threads + 1) if actor_memory(count) <= budget), default=0)
        calls = max(1, fits)
        limited_by = "memory" if fits < threads else "cores"
        if fits >= 1:
            reserved = actor_memory(calls)
        else:  # reserving it could leave the actor (or the decode tasks beside it) unschedulable: run it unreserved
            logger.warning(
                "an inference actor needs ~%.1f GiB but the CPU node offers Ray %.1f GiB: one batch at a time, "
                "no reservation", actor_memory(1) / 1024**3, node_memory_bytes / 1024**3,
            )
    return CpuNodePlan(
        node_cpus=node_cpus,
        cpus_per_actor=inference_cpus,
        calls_per_actor=calls,
        torch_threads=max(1, threads // calls),
        decode_cpus_per_task=decode_per_task,
        decode_tasks=decode_tasks,
        model_share=model_share,
        actor_memory_bytes=reserved,
        limited_by=limited_by,
    )


def _cpu_only_nodes(nodes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The resources of alive nodes with at least one CPU and no GPU, from ``ray.nodes()``."""
    return [
        node.get("Resources", {})
        for node in nodes
        if node.get("Alive", True) and node.get("Resources", {}).get("CPU", 0) >= 1
        and not node.get("Resources", {}).get("GPU", 0)
    ]


def smallest_cpu_node(nodes: Iterable[Mapping[str, Any]]) -> float | None:
    """CPUs of the smallest alive node that has CPUs and no GPU, from ``ray.nodes()``; None if there is none.

    Sizing for the smallest keeps the actor schedulable on every node; nodes of one type are equal anyway.
    """
    sizes = [float(resources["CPU"]) for resources in _cpu_only_nodes(nodes)]
    return min(sizes) if sizes else None


def smallest_cpu_node_memory(nodes: Iterable[Mapping[str, Any]]) -> float | None:
    """The least Ray ``memory`` resource (bytes) of an alive CPU-only node, from ``ray.nodes()``; None if none says."""
    sizes = [float(resources["memory"]) for resources in _cpu_only_nodes(nodes) if resources.get("memory")]
    return min(sizes) if sizes else None


def count_cpu_nodes(nodes: Iterable[Mapping[str, Any]]) -> int:
    """Alive nodes with at least one CPU and no GPU: each hosts its own inference actor on a CPU-only cluster."""
    return len(_cpu_only_nodes(nodes))


# --------------------------------------------------------------------------------------------------------------------
# The inference actor's memory allocator
# --------------------------------------------------------------------------------------------------------------------

# glibc malloc settings for CPU inference actors, passed as GLIBC_TUNABLES (read once, when the process starts).
#
# Why: a forward pass of the full-size model allocates and frees gigabytes of activations per batch, in blocks far
# above glibc's mmap threshold (32 MiB at most). By default each such block is a fresh mmap that the kernel must
# fault in and zero page by page, then munmap'ed on free; and a Ray actor computes in a pool thread, whose malloc
# arena cannot hold blocks over 64 MiB at all. Measured on a 2-core AVX-512 node (batch 16 at 384 px, fp32, the call
# made from a pool thread as in the actor): 1.5 million page faults and ~0.26 s of kernel time per second of
# compute, 12.5-13.7 s a batch; with these settings no faults after the first batch, 0.02 s of kernel time, and
# 9.6-12.2 s a batch. The settings: one arena (every thread allocates from the main heap), no mmap for large blocks
# (they come from the heap and go back to it), and no trimming of the heap's top, so freed activations are reused by
# the next batch instead of returned to the kernel. The price is that the actor keeps its peak memory (the weights
# plus one batch's activations) for its lifetime, which a long-lived inference actor reaches anyway.
# Ignored where the C library is not glibc.
CPU_ACTOR_MALLOC_TUNABLES: tuple[tuple[str, str], ...] = (
    ("glibc.malloc.arena_max", "1"),
    ("glibc.malloc.mmap_max", "0"),
    ("glibc.malloc.trim_threshold", str(1 << 40)),
)


def cpu_actor_environment() -> dict[str, str]:
    """Environment variables for a CPU inference actor's process: :data:`CPU_ACTOR_MALLOC_TUNABLES` as
    ``GLIBC_TUNABLES`` (Ray's ``runtime_env`` sets them for that process only; other workers keep the node's)."""
    return {"GLIBC_TUNABLES": ":".join(f"{name}={value}" for name, value in CPU_ACTOR_MALLOC_TUNABLES)}


__all__ = [
    "CPU_ACTOR_MALLOC_TUNABLES",
    "actor_memory_bytes",
    "CpuCapabilities",
    "CpuDtypeDecision",
    "CpuNodePlan",
    "capabilities_from_flags",
    "capabilities_from_proc_cpuinfo",
    "choose_cpu_dtype",
    "count_cpu_nodes",
    "cpu_actor_environment",
    "decide_on_this_node",
    "detect_cpu_capabilities",
    "measure_bf16_speedup",
    "parse_cpuinfo",
    "decide_cpu_dtype",
    "probe_cpu_node",
    "size_cpu_node",
    "smallest_cpu_node",
    "smallest_cpu_node_memory",
]
