"""The stand-in model: full-width outputs that depend on the pixels, the latency it promises, and the actor seam."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from model.configuration import ViTHybridConfig
from pipeline.standin import ENVIRONMENT_VARIABLE, StandInModel, stand_in_latency_s


def test_latency_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    assert stand_in_latency_s() is None
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "100")
    assert stand_in_latency_s() == pytest.approx(0.1)
    for bad in ("fast", "-1"):
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, bad)
        with pytest.raises(ValueError, match=ENVIRONMENT_VARIABLE):
            stand_in_latency_s()


def test_outputs_are_full_width_depend_on_pixels_and_take_the_latency() -> None:
    config = ViTHybridConfig(hidden_size=768, num_labels=1000)
    model = StandInModel(config, latency_s=0.05)
    pixels = torch.rand(4, 3, 384, 384)
    started = time.perf_counter()
    output = model(pixels)
    assert time.perf_counter() - started >= 0.05
    assert output.logits.shape == (4, 1000) and output.embedding.shape == (4, 768)
    assert not torch.allclose(output.embedding[0], output.embedding[1])
    np.testing.assert_array_equal(model.embed(pixels).numpy(), output.embedding.numpy())


def test_actor_uses_the_stand_in_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from pipeline.actor import InferenceSettings
    from pipeline.infer import BatchInference
    from tests.reference import small_config_dict, write_reference_checkpoint

    folder = write_reference_checkpoint(tmp_path / "model", small_config_dict())
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    actor = BatchInference(InferenceSettings(model_uri=str(folder), task="classify"))
    assert isinstance(actor.model, StandInModel)
