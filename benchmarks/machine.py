"""Benchmark stage ``machine``: the CPU's capabilities as detected, the dtype ``auto`` picks on it, and how a
CPU-only node of this size is shared (:mod:`pipeline.cpu`). Printed first, so every figure below reads against it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.stages import BenchmarkContext

NEEDS: tuple[str, ...] = ()


def run(context: BenchmarkContext) -> dict[str, Any]:
    from pipeline import cpu

    decision = cpu.CpuDtypeDecision.from_dict(cpu.decide_on_this_node())
    settings = context.settings
    return {
        "capabilities": decision.capabilities.to_dict(),
        "described": decision.capabilities.describe(),
        "auto_dtype": decision.dtype,
        "reason": decision.reason,
        "measured_bf16_speedup": decision.measured_bf16_speedup,
        # Cores only: the job's own sizing also weighs the model's memory against the node's (stage "model").
        "sizing": cpu.size_cpu_node(settings.ray_cpus).to_dict() if settings.device == "cpu" else None,
    }


def report_lines(results: Mapping[str, Any]) -> list[str]:
    machine = results["machine"]
    lines = [
        "0. machine (pipeline.cpu, as the job's probe task sees it)",
        f"   CPU                {machine['described']}",
        f"   dtype auto on CPU  {machine['auto_dtype']}   ({machine['reason']})",
    ]
    sizing = machine.get("sizing")
    if sizing:
        lines.append(
            f"   CPU-node sizing    {sizing['node_cpus']:g} CPUs: 1 inference actor x {sizing['cpus_per_actor']:g} CPUs, decode "
            f"{sizing['decode_tasks']} task(s) x {sizing['decode_cpus_per_task']:g} CPU (model share of the work "
            f"{sizing['model_share']:.1%}); how many batches the actor computes at once is set by the model's memory "
            "too: stage 1's job sizing"
        )
    return lines
