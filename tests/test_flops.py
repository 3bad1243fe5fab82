"""FLOPs per image counted as a GPU executes them (benchmarks.flops), and MFU per GPU (benchmarks.measures)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import analytic_flops, conv_output_size, model_flops_per_image
from benchmarks.measures import model_flop_utilisation
from model.configuration import ViTHybridConfig, vit_base_r50_s16_384_config
from model.modeling import ViTHybridForImageClassification
from tests.reference import random_pixel_values, small_config_dict

CASES = {
    "bottleneck-same-dynamic": {"layer_type": "bottleneck"},
    "bottleneck-none-dynamic": {"layer_type": "bottleneck", "global_padding": None, "embedding_dynamic_padding": True},
    "preact-none-static": {"layer_type": "preactivation", "global_padding": None, "embedding_dynamic_padding": False},
    "preact-same-static": {"layer_type": "preactivation", "global_padding": "same", "embedding_dynamic_padding": False},
    "bottleneck-odd-size-patch2": {"layer_type": "bottleneck", "image_size": 70, "patch_size": 2},
    "bottleneck-stage2-output": {"layer_type": "bottleneck", "out_features": ("stage2",)},
}


def _model(config_dict: dict) -> ViTHybridForImageClassification:
    return ViTHybridForImageClassification(ViTHybridConfig.from_dict(copy.deepcopy(config_dict))).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_analytic_count_matches_the_measured_one_on_small_configs(case: str) -> None:
    config_dict = small_config_dict(**CASES[case])
    model = _model(config_dict)
    pixel_values = random_pixel_values(2, config_dict["image_size"], seed=1)
    analytic = analytic_flops(model.config).total
    measured = model_flops_per_image(model, pixel_values)
    assert measured == pytest.approx(analytic, rel=0.02)


def test_dilated_backbone_is_counted() -> None:
    config_dict = small_config_dict(depths=(1, 1, 1))
    config_dict["backbone_config"]["output_stride"] = 8
    config_dict["backbone_featmap_shape"] = [1, 128, 8, 8]  # output stride 8 at 64 px: the third stage dilates
    model = _model(config_dict)
    pixel_values = random_pixel_values(1, 64, seed=2)
    assert model_flops_per_image(model, pixel_values) == pytest.approx(analytic_flops(model.config).total, rel=0.02)


def test_full_size_count_includes_attention_that_the_plain_cpu_counter_misses() -> None:
    """google/vit-hybrid-base-bit-384 at 384 px: ~126.5 GFLOP with attention; torch's counter on a CPU sees ~115."""
    model = ViTHybridForImageClassification(vit_base_r50_s16_384_config()).eval()
    pixel_values = random_pixel_values(1, 384, seed=3)
    analytic = analytic_flops(model.config)
    measured = model_flops_per_image(model, pixel_values)
    plain = FlopCounterMode(display=False)
    with torch.inference_mode(), plain:
        model(pixel_values)
    assert measured == pytest.approx(analytic.total, rel=0.02)
    # What the fused CPU attention kernel hides from the counter is exactly the attention products.
    assert measured - plain.get_total_flops() == pytest.approx(analytic.attention_products, rel=0.02)
    assert analytic.attention_products > 0.05 * analytic.total


def test_last_layer_computes_only_the_cls_row() -> None:
    config = vit_base_r50_s16_384_config()
    cls_only, every_token = analytic_flops(config), analytic_flops(config, only_cls_token=False)
    per_layer_mlp = every_token.mlp / config.num_hidden_layers
    # The last layer's MLP runs on 1 token instead of 577.
    assert every_token.mlp - cls_only.mlp == pytest.approx(per_layer_mlp * (1 - 1 / 577))


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "expected"),
    [(384, 7, 2, "SAME", 192), (97, 3, 2, "SAME", 49), (64, 3, 1, "SAME", 64), (64, 7, 2, None, 32), (32, 3, 2, "valid", 15)],
)
def test_conv_output_size(size: int, kernel: int, stride: int, padding: str | None, expected: int) -> None:
    reference = torch.nn.functional.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, kernel, kernel), stride=stride,
                                           padding=(kernel // 2) if padding is None else 0)
    if padding in (None, "valid"):
        assert reference.shape[-1] == expected
    assert conv_output_size(size, kernel, stride, 1, padding) == expected


def test_mfu_is_per_gpu() -> None:
    flops_per_image = 126.5e9
    # One H100-class GPU (989 TFLOP/s bf16) at 3000 images/s: 38.4 %.
    one = model_flop_utilisation(flops_per_image, 3000.0, 989.0, gpus=1)
    assert one == pytest.approx(126.5e9 * 3000 / 989e12)
    # Eight such GPUs together at 8 x 3000 images/s are as utilised as one, not 8x.
    eight = model_flop_utilisation(flops_per_image, 8 * 3000.0, 989.0, gpus=8)
    assert eight == pytest.approx(one)
    assert model_flop_utilisation(flops_per_image, 8 * 3000.0, 989.0) == pytest.approx(8 * one)
    assert model_flop_utilisation(flops_per_image, 3000.0, None, gpus=8) is None
    with pytest.raises(ValueError, match="gpus"):
        model_flop_utilisation(flops_per_image, 3000.0, 989.0, gpus=0)
