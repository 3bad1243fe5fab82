"""FLOPs per image of ViT Hybrid, counted as a GPU executes them: analytically, and measured with torch's counter.

Why two counts. MFU is only as honest as its FLOP count, and torch's ``FlopCounterMode`` counts what the dispatcher
shows it: on a CPU, ``F.scaled_dot_product_attention`` runs a fused kernel (``_scaled_dot_product_flash_attention_for_cpu``)
that the counter has no formula for, so the attention products (QK^T and AV, about 11 GFLOP of ~126 at 384 px)
silently drop out; on CUDA the flash / memory-efficient / cuDNN kernels are counted. So:

* :func:`analytic_flops` counts the network from its config alone: the stem convolution, every BiT bottleneck
  convolution up to the output stage, the patch projection, the encoder's Q/K/V and output projections, the
  attention products, the MLPs, and the head -- with the last encoder layer computing only the CLS row, as
  :mod:`model.modeling` does for logits and embeddings. Multiply-add = 2 FLOPs; biases, norms, activations, softmax
  and pooling are not counted (torch's counter does not count them either, and they are < 1 % here).
* :func:`measured_flops` runs a forward under ``FlopCounterMode``; on a CPU it selects the math attention backend,
  which decomposes attention into matrix products that the counter sees, so the CPU count includes attention too.

``tests/test_flops.py`` holds the two within 2 % of each other; ``jobs.gpu_check`` compares them on CUDA.

Example::

    config = vit_base_r50_s16_384_config()
    analytic_flops(config).total / 1e9       # ~126.5 GFLOP per image at 384 x 384
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from model.configuration import ViTHybridConfig, make_div
from model.modeling import get_padding_value


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs per image by part of the network (multiply-add = 2)."""

    stem: float  # the 7x7/2 standardised convolution
    backbone_stages: tuple[float, ...]  # the BiT stages that run (up to the backbone's output stage)
    patch_projection: float
    attention_projections: float  # Q, K, V and the output projection, all layers
    attention_products: float  # QK^T and (softmax) V, all layers
    mlp: float
    head: float

    @property
    def total(self) -> float:
        return (
            self.stem + sum(self.backbone_stages) + self.patch_projection + self.attention_projections
            + self.attention_products + self.mlp + self.head
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "backbone_stages": list(self.backbone_stages), "total": self.total}


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, padding: str | None) -> int:
    """Spatial output size of a BiT convolution (or the stem's pool) under the model's padding rules."""
    static, dynamic = get_padding_value(padding, kernel, stride=stride, dilation=dilation)
    if dynamic:  # TF "SAME": ceil(size / stride) outputs whatever the kernel
        return math.ceil(size / stride)
    return (size + 2 * static - dilation * (kernel - 1) - 1) // stride + 1


def _conv(in_channels: int, out_channels: int, kernel: int, out_h: int, out_w: int) -> float:
    return 2.0 * in_channels * kernel * kernel * out_channels * out_h * out_w


def analytic_flops(
    config: ViTHybridConfig, *, image_size: tuple[int, int] | None = None, only_cls_token: bool = True
) -> FlopBreakdown:
    """FLOPs per image of ``ViTHybridForImageClassification`` (logits and embedding), from the config alone.

    ``only_cls_token`` (the model's behaviour for logits/embeddings) makes the last encoder layer compute queries,
    the output projection and the MLP for the CLS row only; keys and values still cover every token.
    """
    backbone = config.backbone_config
    height, width = image_size or config.image_size_hw
    padding = backbone.global_padding

    # Stem: standardised 7x7/2 conv; without global SAME padding a 1-pixel pad before the 3x3/2 max pool.
    height = conv_output_size(height, 7, 2, 1, padding)
    width = conv_output_size(width, 7, 2, 1, padding)
    stem = _conv(backbone.num_channels, backbone.embedding_size, 7, height, width)
    if backbone.global_padding != "SAME":
        height, width = height + 2, width + 2
    pool_padding = "SAME" if backbone.embedding_dynamic_padding else "valid"
    height = conv_output_size(height, 3, 2, 1, pool_padding)
    width = conv_output_size(width, 3, 2, 1, pool_padding)

    # Stages, as model.modeling.BitEncoder builds them; only those up to the output stage run.
    stages: list[float] = []
    in_channels = backbone.embedding_size
    current_stride, dilation = 4, 1
    preactivation = backbone.layer_type == "preactivation"
    for stage_index, (depth, hidden_size) in enumerate(zip(backbone.depths, backbone.hidden_sizes)):
        if stage_index >= backbone.out_stage_index:
            break
        out_channels = make_div(hidden_size * backbone.width_factor)
        mid_channels = make_div(out_channels * 0.25)
        stride = 1 if stage_index == 0 else 2
        if current_stride >= backbone.output_stride:
            dilation *= stride
            stride = 1
        first_dilation = 1 if dilation in (1, 2) else 2
        flops = 0.0
        for layer_index in range(depth):
            layer_stride = stride if layer_index == 0 else 1
            conv2_dilation = 1 if preactivation else (first_dilation if layer_index == 0 else dilation)
            out_h = conv_output_size(height, 3, layer_stride, conv2_dilation, padding)
            out_w = conv_output_size(width, 3, layer_stride, conv2_dilation, padding)
            if layer_index == 0:  # the shortcut projection: 1x1 with the block's stride
                short_h = conv_output_size(height, 1, layer_stride, 1, padding)
                short_w = conv_output_size(width, 1, layer_stride, 1, padding)
                flops += _conv(in_channels, out_channels, 1, short_h, short_w)
            flops += _conv(in_channels, mid_channels, 1, height, width)  # conv1 (stride 1)
            flops += _conv(mid_channels, mid_channels, 3, out_h, out_w)  # conv2 (the stride)
            flops += _conv(mid_channels, out_channels, 1, out_h, out_w)  # conv3
            height, width, in_channels = out_h, out_w, out_channels
        stages.append(flops)
        current_stride *= stride

    # Patch projection: a (patch x patch) conv with stride patch over the feature map.
    patch_h, patch_w = config.patch_size_hw
    grid_h, grid_w = height // patch_h, width // patch_w
    dim, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    patch_projection = 2.0 * in_channels * patch_h * patch_w * dim * grid_h * grid_w

    tokens = grid_h * grid_w + 1
    projections = products = mlp = 0.0
    for layer_index in range(layers):
        queries = 1 if only_cls_token and layer_index == layers - 1 else tokens
        projections += 2.0 * dim * dim * (queries + 2 * tokens + queries)  # Q, K, V, output projection
        products += 2.0 * 2.0 * queries * tokens * dim  # QK^T and AV over all heads (heads x head_dim = dim)
        mlp += 2.0 * 2.0 * queries * dim * intermediate
    head = 2.0 * dim * config.num_labels
    return FlopBreakdown(
        stem=stem,
        backbone_stages=tuple(stages),
        patch_projection=patch_projection,
        attention_projections=projections,
        attention_products=products,
        mlp=mlp,
        head=head,
    )


@contextlib.contextmanager
def countable_attention(device_type: str) -> Iterator[str]:
    """Make attention visible to ``FlopCounterMode``; yields the attention path used.

    On CUDA the fused kernels have counter formulas, so nothing changes (``"fused"``). On a CPU the fused kernel has
    none: the math backend (matrix products + softmax, numerically the same attention) is selected instead.
    """
    if device_type == "cuda":
        yield "fused"
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield "math"


def measured_flops(run: Callable[[], Any], *, images: int, device_type: str) -> float:
    """FLOPs per image of ``run()`` (a forward over ``images`` images on ``device_type``), attention included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    counter = FlopCounterMode(display=False)
    with countable_attention(device_type), torch.inference_mode(), counter:
        run()
    return counter.get_total_flops() / images


def model_flops_per_image(model: Any, pixel_values: Any) -> float:
    """Measured FLOPs per image of ``model(pixel_values)`` (logits + embedding) on the tensors' device."""
    return measured_flops(
        lambda: model(pixel_values), images=int(pixel_values.shape[0]), device_type=pixel_values.device.type
    )
