"""scripts/gpu_check.sh cannot rot: its dry run (tiny config, CPU, no Ray) runs every section here, as on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs import gpu_check

REPO_ROOT = Path(__file__).resolve().parents[1]

# The GPU machine has none of these: hide them from the dry run, so that an import of one at module level anywhere on
# the script's path fails here, in CI, and not there.
ABSENT_ON_THE_GPU_MACHINE = ("ray", "transformers", "s3fs", "moto", "webdataset")
HIDE_PACKAGES = f"""
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden: the GPU machine does not have it)")
        return None

sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("gpu-check")
    out = folder / "gpu_check.json"
    (folder / "site").mkdir()
    (folder / "site" / "sitecustomize.py").write_text(HIDE_PACKAGES)
    environment = {
        **os.environ, "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT_S": "400", "PYTHONPATH": str(folder / "site"),
    }
    completed = subprocess.run(
        [str(REPO_ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=450, check=False,
    )
    assert out.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    data = json.loads(out.read_text())
    data["_exit_code"] = completed.returncode
    data["_stdout"] = completed.stdout
    return data


def test_dry_run_runs_every_section(dry_run: dict) -> None:
    sections = dry_run["sections"]
    assert list(sections) == ["environment", "model", "flops", "layout", "parity", "throughput", "end_to_end", "compiled"]
    failed = {name: section.get("error") for name, section in sections.items() if section["status"] != "ok"}
    assert not failed
    assert dry_run["_exit_code"] == 0
    assert "sections failed: none" in dry_run["_stdout"]


def test_dry_run_figures(dry_run: dict) -> None:
    sections = dry_run["sections"]
    assert sections["environment"]["torch"]
    assert sections["environment"]["ray"] is False  # hidden, as on the GPU machine
    flops = sections["flops"]
    assert flops["cpu_over_analytic"] == pytest.approx(1.0, abs=0.02)
    assert sections["layout"]["channels_last_through_backbone"] is True
    parity = sections["parity"]["bfloat16"]
    assert 0.99 < parity["embedding_cosine_mean"] <= 1.0 + 1e-6 and 0 <= parity["top1_agreement"] <= 1
    assert sections["parity"]["images"] == 8
    for name in ("throughput", "compiled"):
        batches = sections[name]["batches"]
        assert sorted(batches, key=int) == ["2", "4"]
        assert all(row["images_per_s"] > 0 for row in batches.values())
    assert sections["compiled"]["timed_out"] is False


def test_dry_run_end_to_end_accounts_for_every_sample(dry_run: dict) -> None:
    e2e = dry_run["sections"]["end_to_end"]
    # The GPU machine has no Ray: the dry run takes the same in-process path.
    assert e2e["ray"] is False and e2e["mode"] == "inprocess"
    assert e2e["samples"] == e2e["output_rows"] == 24
    assert e2e["errors"] == e2e["output_error_rows"] == 0
    assert e2e["shards_committed"] == e2e["input"]["shards"] == 3


def test_a_failing_section_is_recorded_and_the_next_one_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    report = gpu_check.Report(str(out), gpu_check.dry_run_settings(str(out)))

    def broken() -> dict:
        raise RuntimeError("no GPU here")

    report.section("first", broken)
    saved = json.loads(out.read_text())  # written after the failing section already
    assert saved["sections"]["first"]["status"] == "error"
    assert "RuntimeError: no GPU here" in saved["sections"]["first"]["error"]
    report.section("second", lambda: {"value": 1})
    saved = json.loads(out.read_text())
    assert saved["sections"]["second"] == {"status": "ok", "value": 1, "seconds": saved["sections"]["second"]["seconds"]}


def test_a_time_cap_is_recorded_in_the_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.json"
    report = gpu_check.Report(str(out), gpu_check.dry_run_settings(str(out)))
    report.section("done", lambda: {"value": 1})

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(gpu_check.os, "_exit", exit_now)

    def cut_short() -> dict:
        report.on_terminate(15, None)  # what SIGTERM from the wrapper's `timeout` does mid-section
        return {}

    with pytest.raises(SystemExit) as exited:
        report.section("slow", cut_short)
    assert exited.value.code == 143
    saved = json.loads(out.read_text())
    assert saved["terminated"] is True and saved["sections"]["done"]["status"] == "ok"
    assert saved["sections"]["slow"]["status"] == "error" and "signal 15" in saved["sections"]["slow"]["error"]


def test_batches_are_cut_to_a_fixed_size() -> None:
    parts = [{"key": np.arange(start, start + size)} for start, size in ((0, 3), (3, 5), (8, 2))]
    taken, rest, remaining = gpu_check._take(parts, 4)
    assert np.concatenate([part["key"] for part in taken]).tolist() == [0, 1, 2, 3]
    assert remaining == 6
    assert np.concatenate([part["key"] for part in rest]).tolist() == [4, 5, 6, 7, 8, 9]


def test_summary_of_a_gpu_report() -> None:
    """The summary lines for the keys only a GPU run produces (the dry run cannot produce them)."""
    parity_row = {"max_abs_logit_diff": 0.05, "embedding_cosine_min": 0.9991, "embedding_cosine_mean": 0.9996,
                  "top1_agreement": 0.9375}
    batch_row = {"images_per_s": 3000.0, "mfu": 0.3837}
    data = {"sections": {
        "environment": {"status": "ok", "device_name": "NVIDIA H200", "sm_count": 132, "memory_gib": 139.8,
                        "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cudnn": 91000, "ray": False,
                        "peak_tflops": {"bfloat16": 989.0, "float32": 67.0}, "matmul_bf16_tflops_measured": 790.0},
        "flops": {"status": "ok", "analytic_gflops": 126.5, "measured_cpu_math_attention_gflops": 126.5,
                  "measured_cuda_gflops": 126.5},
        "layout": {"status": "ok", "channels_last_through_backbone": True},
        "parity": {"status": "ok", **{name: parity_row for name in
                   ("bfloat16", "bfloat16_standardized_after_cast", "float32_tf32", "cpu_float32")}},
        "throughput": {"status": "ok", "flops_per_image": 126.5e9, "batches": {"64": batch_row, "256": batch_row},
                       "without_channels_last_fix": {"batch": 256, **batch_row}, "channels_last_fix_speedup": 1.1},
        "end_to_end": {"status": "ok", "mode": "inprocess", "images_per_s": 2000.0, "samples": 8192, "errors": 0,
                       "actor_busy_fraction": 0.8},
        "compiled": {"status": "error", "timed_out": True, "budget_s": 200.0,
                     "batches": {"256": {**batch_row, "compile_s": 95.0}}},
    }}
    lines = gpu_check.summarize(data)
    text = "\n".join(lines)
    assert "NVIDIA H200 (SMs 132, 139.8 GiB)" in text
    assert "GFLOPs/image: analytic 126.5, CPU counter (math attention) 126.5, CUDA counter 126.5" in text
    assert "throughput bf16 batch 256: 3000.0 images/s, MFU 38.4% (48.0% of the measured matmul)" in text
    assert "compiled bf16 batch 256: 3000.0 images/s" in text and "compile 95.0 s" in text
    assert "torch.compile stopped at its budget (200.0 s)" in text
    assert "parity cpu_float32 vs fp32" in text and "channels-last GroupNorm fix at batch 256: 1.100x" in text
    assert lines[-1] == "sections failed: compiled"
