"""The benchmark's stages and their registry: what ``python -m jobs.benchmark --stages ...`` can run.

Why: the benchmark was one 200-line function; several people add measurements to it at once (driver planning, the
actor pool, FLOPs, index building). A stage is a module with one ``run`` function, wired in by one line in
:data:`STAGES`.

The interface (a module named in :data:`STAGES`)::

    NEEDS: tuple[str, ...] = ("inputs",)     # stages that must run first (added automatically, in registry order)

    def run(context: BenchmarkContext) -> dict[str, Any] | None:
        '''Measure; return JSON-ready figures, stored as results[<stage name>] (None: nothing to store).'''

    def report_lines(results: Mapping[str, Any]) -> list[str]:   # optional
        '''Lines for the printed table from the whole results dict (only called when the stage ran).'''

``context.settings`` is the run's :class:`BenchmarkSettings`; ``context.results`` holds the figures of the stages that
ran before (by stage name); ``context.shared`` holds objects an earlier stage hands on that are not figures
(``processor``, ``image_sets``, ``model_uri``, ``storage_base``, ``photos``, ... -- see :mod:`benchmarks.inputs`);
``context.stack`` is an ``ExitStack`` closed after the last stage (servers, temporary folders); ``context.workdir`` a
temporary folder for the run.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

#: Stage name -> module. Order is run order. One line wires a stage in.
STAGES: dict[str, str] = {
    "machine": "benchmarks.machine",  # CPU capabilities, the dtype auto picks, CPU-node sizing
    "inputs": "benchmarks.inputs",  # photos, processor, random checkpoint, storage (moto S3 or local)
    "decode": "benchmarks.decode",  # decode + preprocess images/s per core: fast / exact / reference
    "model": "benchmarks.model_only",  # the job's actor alone: images/s, FLOPs, fast-vs-exact agreement
    "fidelity": "benchmarks.fidelity",  # bf16 vs fp32 on real photographs: embedding cosine, top-1 agreement
    "end_to_end": "benchmarks.end_to_end",  # the classify job with default flags (and two job sizes)
    "bounds": "benchmarks.bounds",  # efficiency against min(model pool, decode capacity); MFU
}
#: What ``--stages all`` (the default) runs: every registered stage.
DEFAULT_STAGES: tuple[str, ...] = tuple(STAGES)


@dataclass(frozen=True)
class BenchmarkSettings:
    """One run's settings, resolved from the command line (``device`` is ``cpu`` or ``cuda`` by now).

    ``dtype`` is concrete by now: ``auto`` was resolved as the job resolves it (on a CPU, from this node's
    capabilities: :mod:`pipeline.cpu`). ``cpus_per_actor`` / ``decode_cpus`` None mean the job's defaults (on a
    CPU-only node: sized by :func:`pipeline.cpu.size_cpu_node`); ``torch_threads`` is what the actor then runs.
    """

    quick: bool
    device: str
    dtype: str
    batch_size: int
    images: int
    decode_cpus: float | None
    actors: int
    cpus_per_actor: float | None
    torch_threads: int
    ray_cpus: int
    images_per_shard: int
    phone_every: int
    warmup_batches: int
    timed_batches: int
    decode_seconds: float
    storage: str
    peak_tflops: float | None
    json_path: str | None
    two_point: bool = False
    two_point_repeats: int = 2  # runs of each job size, alternating
    model: str | None = None
    seed: int = 0
    stages: tuple[str, ...] = DEFAULT_STAGES
    dtype_requested: str = "auto"


@dataclass
class BenchmarkContext:
    """What stages share within one run (see the module docstring)."""

    settings: BenchmarkSettings
    workdir: Path
    stack: contextlib.ExitStack
    results: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)


def load_stage(name: str) -> ModuleType:
    """The module of a registered stage; ValueError naming the known ones otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown benchmark stage {name!r}; known: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])


def resolve_stages(requested: Iterable[str]) -> list[str]:
    """The requested stages plus everything they need, in registry order."""
    wanted: set[str] = set()
    pending = list(requested)
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        module = load_stage(name)
        wanted.add(name)
        pending.extend(getattr(module, "NEEDS", ()))
    return [name for name in STAGES if name in wanted]


def run_stages(
    settings: BenchmarkSettings, names: Sequence[str], workdir: Path, initial: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run ``names`` (already resolved) in order; returns ``initial`` plus ``{stage name: figures}``."""
    with contextlib.ExitStack() as stack:
        context = BenchmarkContext(settings=settings, workdir=workdir, stack=stack, results=dict(initial or {}))
        for name in names:
            figures = load_stage(name).run(context)
            if figures is not None:
                context.results[name] = figures
        return context.results


def report_lines(results: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Every stage's own report lines, in run order."""
    lines: list[str] = []
    for name in names:
        module = load_stage(name)
        if hasattr(module, "report_lines"):
            lines.extend(module.report_lines(results))
    return lines
