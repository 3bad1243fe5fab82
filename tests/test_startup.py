"""Start-up (issue 11): the driver identifies the checkpoint without reading its weights or importing torch, the job
still runs and records that identity, and every inference actor is warmed up once when it is built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import make_samples, write_webdataset
from tests.reference import small_config_dict, write_reference_checkpoint
from tests.reliability import PROJECT_ROOT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("checkpoint")
    return str(write_reference_checkpoint(folder, small_config_dict(num_labels=12, image_size=64), seed=5))


def test_actor_is_warmed_up_when_built(checkpoint: str) -> None:
    """After construction the conv weights are standardised and cached: a forward pass has already run."""
    from model.modeling import WeightStandardizedConv2d
    from pipeline.actor import InferenceSettings
    from pipeline.infer import BatchInference

    actor = BatchInference(InferenceSettings(model_uri=checkpoint, task="classify", device="cpu", dtype="float32"))
    convolutions = [module for module in actor.model.modules() if isinstance(module, WeightStandardizedConv2d)]
    assert convolutions and all(module.cached_weight is not None for module in convolutions)


# Runs ``python -m jobs.embed ARGS`` with full weight reads forbidden in the driver process, and reports at exit
# whether the driver imported torch.
DRIVER_WRAPPER = """
import atexit, sys, runpy
from model import weights

def forbidden(*args, **kwargs):
    raise AssertionError("the driver read the whole weights file")

weights._read_weights_file = forbidden
atexit.register(lambda: print("driver imported torch:", "torch" in sys.modules, file=sys.stderr))
sys.argv = ["jobs.embed", *sys.argv[1:]]
runpy.run_module("jobs.embed", run_name="__main__")
"""


@pytest.mark.slow
def test_the_driver_never_reads_the_weights_nor_imports_torch(checkpoint: str, tmp_path: Path, ray_tmpdir: str) -> None:
    """A whole job (``python -m jobs.embed``, its own Ray) with full weight reads forbidden in the driver process
    (the actors, other processes, still load the model): it succeeds without the driver importing torch, and
    out.job/job.json records the header-based fingerprint and the dtype this node's CPU decided."""
    from model import weights
    from pipeline import cpu
    from tests.reliability import job_environment

    write_webdataset(str(tmp_path / "in" / "part-000.tar"), make_samples(6, seed=1, prefix="s"))
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", checkpoint, "--device", "cpu"]
    finished = subprocess.run([sys.executable, "-c", DRIVER_WRAPPER, *args], cwd=PROJECT_ROOT,
                              env=job_environment(ray_tmpdir), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "driver imported torch: False" in finished.stderr
    fingerprint = json.loads((tmp_path / "out.job" / "job.json").read_text())["fingerprint"]
    assert fingerprint["weights_sha256"] == weights.checkpoint_fingerprint(checkpoint).digest
    assert fingerprint["dtype"] == cpu.CpuDtypeDecision.from_dict(cpu.decide_on_this_node()).dtype
    totals = json.loads((tmp_path / "out.job" / "manifest.json").read_text())["totals"]
    assert totals["rows"] == 6 and totals["error_rows"] == 0
