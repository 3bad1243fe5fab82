"""Planning and resuming at scale: a 10,000,000-URI list file planned and frozen, and a resume over 10,000 commits.

    python -m benchmarks.planning                       # 10M URIs, 10k commit records
    python -m benchmarks.planning --uris 1000000 --commits 2000 --json planning.json

Each measurement runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own. Figures:

* ``plan``, ``plan_shuffled``: ``pipeline.sources.plan_shards`` on a local list file of N URIs, in order and
  permuted (a sorted list is planned without a sorted copy; a permuted one needs one), (the files need not exist; listing a
  list file reads only the list), then the plan frozen as Parquet the way a job's first start does it
  (:func:`pipeline.planstore.plan_table` + :func:`pipeline.planstore.write_plan`). Seconds of each step, peak RSS of
  the process, bytes of ``plan.parquet``. The listing is helper "clients"' code; the freezing is this project's
  plan store. Target (issue 9): at most 60 s and 1 GiB.
* ``resume``: an output whose plan has ``commits`` shards, all but one committed (one record each, as finalize tasks
  write them); the time until :meth:`pipeline.manifest.OutputState.open` returns the pending work (what a rerun does
  before starting Ray work), and until the dataset's items are built. Target: within 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _list_order(start: int, stop: int, shuffled: bool) -> list[int]:
    """Entry numbers of one block of the list file: in order, or permuted (a fixed stride modulo a prime)."""
    numbers = list(range(start, stop))
    return sorted(numbers, key=lambda number: (number * 7919) % 100_003) if shuffled else numbers


def measure_plan(folder: str, uris: int, images_per_shard: int, shuffled: bool = False) -> dict[str, Any]:
    from pipeline import planstore, sources
    from pipeline.layout import OutputLayout

    list_file = Path(folder, "inputs.txt")
    with open(list_file, "w", encoding="utf-8") as handle:
        for start in range(0, uris, 100_000):
            block = _list_order(start, min(uris, start + 100_000), shuffled)
            handle.write("".join(f"s3://bucket/photos/{i // 1000:05d}/{i:09d}.jpg\n" for i in block))
    baseline = _peak_rss_mib()
    started = time.perf_counter()
    shards = sources.plan_shards(str(list_file), images_per_shard=images_per_shard)
    listed = time.perf_counter()
    layout = OutputLayout(str(Path(folder, "out")))
    table = planstore.plan_table(shards)
    planstore.write_plan(layout.book, table)
    frozen = time.perf_counter()
    return {
        "uris": uris,
        "list_order": "shuffled" if shuffled else "sorted",
        "shards": len(shards),
        "list_s": round(listed - started, 2),
        "freeze_s": round(frozen - listed, 2),
        "total_s": round(frozen - started, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "rss_before_mib": round(baseline, 1),
        "plan_parquet_bytes": Path(folder, "out.job", "plan.parquet").stat().st_size,
    }


def measure_resume(folder: str, commits: int) -> dict[str, Any]:
    from pipeline import planstore
    from pipeline.layout import CommitRecord, OutputLayout
    from pipeline.manifest import JobFingerprint, OutputState

    out = str(Path(folder, "out"))
    fingerprint = JobFingerprint(
        task="classify", model_uri="/m", weights_sha256="ab" * 32, preprocessing={"size": 384}, dtype="bfloat16"
    )
    plan = [{"shard_id": f"s{i:06d}", "format": "webdataset", "uri": f"s3://b/in/{i:06d}.tar"} for i in range(commits)]
    OutputState.open(out, fingerprint, plan, {})
    layout = OutputLayout(out)
    commits_dir = Path(f"{out}.job", "commits")
    commits_dir.mkdir(parents=True, exist_ok=True)
    for shard in plan[:-1]:  # written directly: the set-up is not what is measured
        record = CommitRecord(shard["shard_id"], [layout.part_name(shard["shard_id"], 0)], 10_000, 3)
        (commits_dir / f"{shard['shard_id']}.json").write_text(json.dumps(record.to_dict()))
    started = time.perf_counter()
    state = OutputState.open(out, fingerprint, lambda: (_ for _ in ()).throw(AssertionError("relisted")), {})
    pending = state.pending_plan()
    opened = time.perf_counter()
    items = [json.dumps(shard.to_dict()) for shard in planstore.shards_of(pending)]
    ready = time.perf_counter()
    return {
        "commit_records": commits - 1,
        "pending_shards": len(items),
        "open_s": round(opened - started, 3),
        "ready_s": round(ready - started, 3),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }


def _run_child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="planning-") as folder:
        command = [sys.executable, "-m", "benchmarks.planning", "--child", kind.removesuffix("-shuffled"), "--folder", folder,
                   *(["--shuffled"] if kind.endswith("-shuffled") else []),
                   "--uris", str(args.uris), "--commits", str(args.commits),
                   "--images-per-shard", str(args.images_per_shard)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} measurement failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uris", type=int, default=10_000_000)
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--images-per-shard", type=int, default=256)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", choices=["plan", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--shuffled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "plan":
        print(json.dumps(measure_plan(args.folder, args.uris, args.images_per_shard, args.shuffled)))
        return {}
    if args.child == "resume":
        print(json.dumps(measure_resume(args.folder, args.commits)))
        return {}

    from benchmarks.measures import hardware_summary

    report = {"hardware": hardware_summary(), "resume": _run_child("resume", args), "plan": _run_child("plan", args),
              "plan_shuffled": _run_child("plan-shuffled", args)}
    hardware = report["hardware"]
    print(f"CPU: {hardware['cpu_model']} ({hardware['cpu_cores_usable']} usable of {hardware['cpu_cores']} cores)")
    resume = report["resume"]
    print(
        f"resume over {resume['commit_records']} commit records: state open in {resume['open_s']} s, work ready in "
        f"{resume['ready_s']} s (target <= 30 s), peak RSS {resume['peak_rss_mib']} MiB"
    )
    for plan in (report["plan"], report["plan_shuffled"]):
        print(
            f"plan {plan['uris']} {plan['list_order']} URIs -> {plan['shards']} shards: listing {plan['list_s']} s + "
            f"freezing {plan['freeze_s']} s = {plan['total_s']} s (target <= 60 s), peak RSS {plan['peak_rss_mib']} MiB "
            f"(target <= 1024), plan.parquet {plan['plan_parquet_bytes'] / 1e6:.1f} MB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
