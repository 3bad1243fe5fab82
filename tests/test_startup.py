"""Start-up (issue 11): the driver identifies the checkpoint without reading its weights, the job still runs and
records that identity, and every inference actor is warmed up once when it is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.corpus import make_samples, write_webdataset
from tests.reference import small_config_dict, write_reference_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("checkpoint")
    return str(write_reference_checkpoint(folder, small_config_dict(num_labels=12, image_size=64), seed=5))


def test_actor_is_warmed_up_when_built(checkpoint: str) -> None:
    """After construction the conv weights are standardised and cached: a forward pass has already run."""
    from model.modeling import WeightStandardizedConv2d
    from pipeline.infer import InferenceActor, InferenceSettings

    actor = InferenceActor(InferenceSettings(model_uri=checkpoint, task="classify", device="cpu", dtype="float32"))
    convolutions = [module for module in actor.model.modules() if isinstance(module, WeightStandardizedConv2d)]
    assert convolutions and all(module.cached_weight is not None for module in convolutions)


@pytest.mark.slow
def test_the_driver_never_reads_the_weights(checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole job on a local Ray with full weight reads forbidden in the driver process (the actors, other
    processes, still load the model): it succeeds, and out.job/job.json records the header-based fingerprint and the dtype
    this node's CPU decided."""
    import ray

    from model import weights
    from pipeline import cpu
    from pipeline.config import JobConfig
    from pipeline.plan import run_job
    from tests.pipeline_helpers import start_local_ray

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the driver read the whole weights file")

    monkeypatch.setattr(weights, "_read_weights_file", forbidden)
    write_webdataset(str(tmp_path / "in" / "part-000.tar"), make_samples(6, seed=1, prefix="s"))
    config = JobConfig(task="embed", input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=checkpoint,
                       device="cpu")
    start_local_ray()
    try:
        summary = run_job(config)
    finally:
        ray.shutdown()
    assert summary.status == "succeeded" and summary.samples == 6
    fingerprint = json.loads((tmp_path / "out.job" / "job.json").read_text())["fingerprint"]
    assert fingerprint["weights_sha256"] == weights.checkpoint_fingerprint(checkpoint).digest
    assert fingerprint["dtype"] == cpu.CpuDtypeDecision.from_dict(cpu.decide_on_this_node()).dtype
