"""The numerics policy (model/numerics.py), bf16 weight standardisation from fp32, and channels-last through BiT."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model.configuration import ViTHybridConfig
from model.modeling import (
    BitGroupNormActivation,
    ViTHybridForImageClassification,
    WeightStandardizedConv2d,
    standardize_weight,
)
from model.numerics import NumericsPolicy, current_backend_flags, numerics_policy
from tests.reference import random_pixel_values, small_config_dict


@pytest.fixture()
def restore_backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.fixture(scope="module")
def model() -> ViTHybridForImageClassification:
    from jobs.benchmark_model import randomize_weights

    config = ViTHybridConfig.from_dict(small_config_dict(depths=(2, 1, 2)))
    model = ViTHybridForImageClassification(config)
    randomize_weights(model, seed=5)
    return model.eval()


@pytest.mark.parametrize("tf32", [False, True])
def test_policy_sets_tf32_for_convolutions_and_matmuls_alike(tf32: bool, restore_backend_flags: None) -> None:
    # Start from torch's own inconsistent default: cuDNN TF32 on, cuBLAS off.
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    numerics_policy("float32", allow_tf32=tf32).apply()
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cudnn.benchmark is True
    flags = current_backend_flags()
    assert flags["cuda_matmul_allow_tf32"] is tf32 and flags["cudnn_allow_tf32"] is tf32
    assert flags["float32_matmul_precision"] == ("high" if tf32 else "highest")


def test_policy_record_for_the_fingerprint() -> None:
    policy = numerics_policy("bfloat16")
    assert policy.to_dict() == {
        "dtype": "bfloat16", "allow_tf32": False, "weight_standardization": "float32", "cudnn_benchmark": True,
    }
    assert NumericsPolicy(**policy.to_dict()) == policy
    assert numerics_policy("float32", allow_tf32=True).to_dict() != numerics_policy("float32").to_dict()


def _convs(model: torch.nn.Module) -> list[WeightStandardizedConv2d]:
    return [module for module in model.modules() if isinstance(module, WeightStandardizedConv2d)]


def test_bf16_weights_are_standardised_in_fp32_before_the_cast(model: ViTHybridForImageClassification) -> None:
    fp32_weights = [conv.weight.detach().clone() for conv in _convs(model)]
    converted = copy.deepcopy(model).to(torch.bfloat16)
    differs = 0
    for conv, fp32_weight in zip(_convs(converted), fp32_weights, strict=True):
        expected = standardize_weight(fp32_weight, conv.eps).to(torch.bfloat16)
        assert conv.cached_weight is not None and torch.equal(conv.cached_weight, expected)
        after_cast = standardize_weight(conv.weight, conv.eps)  # the old rule: from weights already in bf16
        differs += int(not torch.equal(after_cast, expected))
    assert differs > 0  # the two rules are distinguishable, so the check above means something
    # A forward in eval mode uses the fp32-first weights, and a later layout change carries them along.
    pixel_values = random_pixel_values(2, 64, seed=6).to(torch.bfloat16)
    with torch.inference_mode():
        converted(pixel_values)
    conv = _convs(converted)[0]
    kept = conv.cached_weight
    converted.to(memory_format=torch.channels_last)
    assert torch.equal(conv.cached_weight, kept)
    assert conv.cached_weight.is_contiguous(memory_format=torch.channels_last) or conv.cached_weight.shape[-1] == 1


def _stage_layouts(model: ViTHybridForImageClassification, pixel_values: torch.Tensor) -> dict[str, bool]:
    from jobs.gpu_check import stage_layouts

    return {name: entry["channels_last"] for name, entry in stage_layouts(model, pixel_values).items()}


def test_channels_last_is_kept_stage_by_stage(model: ViTHybridForImageClassification) -> None:
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layouts = _stage_layouts(channels_last, random_pixel_values(2, 64, seed=7))
    assert list(layouts) == ["stem", "stage1", "stage2", "stage3"]
    assert all(layouts.values()), layouts


def test_channels_last_survives_a_group_norm_that_returns_nchw(
    model: ViTHybridForImageClassification, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA's GroupNorm returns NCHW whatever it is given; emulate that on the CPU and check the layout holds."""
    real_group_norm = F.group_norm

    def cuda_like_group_norm(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return real_group_norm(input.contiguous(), *args, **kwargs)

    monkeypatch.setattr(F, "group_norm", cuda_like_group_norm)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    pixel_values = random_pixel_values(2, 64, seed=8)
    with torch.inference_mode():
        expected = model(pixel_values).logits
        fixed_logits = channels_last(pixel_values).logits
    assert all(_stage_layouts(channels_last, pixel_values).values())
    torch.testing.assert_close(fixed_logits, expected, rtol=0, atol=1e-4)
    monkeypatch.setattr(BitGroupNormActivation, "keep_channels_last", False)
    assert not all(_stage_layouts(channels_last, pixel_values).values())  # without the fix the layout is lost
