"""ViT Hybrid (BiT ResNet stem + ViT encoder) in plain PyTorch, numerically matching transformers 4.57.

Read top to bottom: activations; the BiT backbone (weight-standardised convs with TF "SAME" padding, GroupNorm,
bottleneck and pre-activation blocks, stages, the backbone); the ViT half (patch embeddings from the backbone's
feature map, CLS token and position embeddings, pre-norm encoder layers); and the two public models with
``from_pretrained``/``save_pretrained``.

Module names mirror transformers', so ``state_dict()`` keys are exactly those of a Hugging Face checkpoint
(``vit.embeddings.patch_embeddings.backbone.bit.embedder.convolution.weight``, ``classifier.weight``, ...).

What differs from the reference (fp32 logits and embeddings stay within 1e-4 of it; ~3e-5 on the full-size model
with random weights):

* Inference does not re-standardise the conv weights on every call: :class:`WeightStandardizedConv2d` caches the
  standardised weight while the module is in eval mode and its weight is unchanged (see its docstring).
* The backbone runs in channels-last memory format, which oneDNN's CPU convolutions prefer (2-3x faster for the
  early stages on AVX2), and the 1x1 patch projection runs as a matrix product on that layout, with no copy.
  Channels-last convolutions round differently; the reference fed a channels-last tensor moves by the same amount
  (up to ~1e-3 in the full-size patch embeddings on random weights), and agrees with this model then.
* Stages after the backbone's output stage are not run (transformers runs them and discards the result).
* Activations and residual additions write into freshly made tensors in place when no gradient is being recorded,
  which avoids allocating (and page-faulting) a tensor per op.
* When the caller needs only the CLS token (logits, :meth:`ViTHybridForImageClassification.embed`), the last
  encoder layer computes only the CLS row: keys and values still see every token, queries, the output projection
  and the MLP see one. That removes most of one layer of twelve.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.configuration import CONFIG_NAME, BitConfig, ViTHybridConfig, make_div, vit_base_r50_s16_384_config
from model.storage import StorageOptions, join_uri, write_bytes
from model.weights import (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    CheckpointInfo,
    adapt_prefix,
    check_state_dict,
    load_checkpoint,
    serialize_state_dict,
)

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound="ViTHybridPreTrainedModel")


# --------------------------------------------------------------------------------------------------------------------
# Activations (transformers' ACT2FN names)
# --------------------------------------------------------------------------------------------------------------------


def _gelu_tanh_python(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _relu_squared(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh_python,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_accurate": _gelu_tanh_python,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_python_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": _relu_squared,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}
# In-place twins, used only on tensors this module just made and no autograd graph will read.
_INPLACE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": torch.relu_,
    "relu6": lambda x: F.hardtanh(x, 0.0, 6.0, inplace=True),
    "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
}


def _no_grad_needed(tensor: Tensor) -> bool:
    """True when autograd will not look at ``tensor`` again, so overwriting it in place is safe."""
    return not (tensor.requires_grad and torch.is_grad_enabled())


class Activation(nn.Module):
    """A parameter-free activation by transformers name; ``inplace=True`` reuses the input's memory when safe."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported; allowed values: {', '.join(_ACTIVATIONS)}")
        # Only the name is stored (looked up per call), so the module pickles and deep-copies cleanly.
        self.name = name

    def forward(self, hidden_states: Tensor, inplace: bool = False) -> Tensor:
        if inplace and self.name in _INPLACE_ACTIVATIONS and _no_grad_needed(hidden_states):
            return _INPLACE_ACTIVATIONS[self.name](hidden_states)
        return _ACTIVATIONS[self.name](hidden_states)

    def extra_repr(self) -> str:
        return self.name


# --------------------------------------------------------------------------------------------------------------------
# BiT backbone
# --------------------------------------------------------------------------------------------------------------------


def get_padding_value(padding: str | None, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, bool]:
    """``(static padding, needs dynamic TF-'SAME' padding)`` for a conv, exactly as transformers' BiT decides it.

    None means PyTorch-style symmetric padding; "valid" none at all; "same" is static where stride 1 allows it and
    otherwise computed from the input size at run time (TensorFlow pads more on the bottom/right).
    """
    if padding is None:
        return ((stride - 1) + dilation * (kernel_size - 1)) // 2, False
    padding = padding.lower()
    if padding == "same":
        if stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0:
            return ((stride - 1) + dilation * (kernel_size - 1)) // 2, False
        return 0, True
    if padding == "valid":
        return 0, False
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2, False


class DynamicPad2d(nn.Module):
    """TensorFlow 'SAME' padding computed from the input size: ``ceil(size / stride)`` outputs, extra pad at the end."""

    def __init__(self, kernel_size: int, stride: int, dilation: int, value: float = 0.0) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.value = value

    def _amount(self, size: int) -> int:
        return max((math.ceil(size / self.stride) - 1) * self.stride + (self.kernel_size - 1) * self.dilation + 1 - size, 0)

    def forward(self, hidden_states: Tensor) -> Tensor:
        pad_h = self._amount(hidden_states.shape[-2])
        pad_w = self._amount(hidden_states.shape[-1])
        if pad_h > 0 or pad_w > 0:
            hidden_states = F.pad(
                hidden_states, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=self.value
            )
        return hidden_states


def standardize_weight(weight: Tensor, eps: float) -> Tensor:
    """Weight standardisation: zero mean, unit (biased) variance per output channel, as BiT trains it.

    Computed in float32 for reduced-precision weights (the variance of a bf16 kernel in bf16 is poor), then cast
    back. For float32 weights this is the reference's own ``batch_norm`` call, so results match bit for bit.
    """
    compute = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    standardized = F.batch_norm(
        compute.reshape(1, weight.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps
    ).reshape(weight.shape)
    return standardized.to(weight.dtype)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d on the standardised weight, with TF-compatible 'SAME' padding (BiT's ``StdConv2dSame``).

    The parameter keeps the raw weight, so checkpoints round-trip unchanged. In eval mode, when no gradient for the
    weight is wanted, the standardised weight is computed once and reused: the cache is keyed on the weight's
    storage, version counter (bumped by every in-place write, ``load_state_dict`` included), dtype and device, so
    ``model.to(...)``, ``load_state_dict`` or ``weight.mul_(...)`` all trigger a recompute; ``train()`` drops it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: str | None = "SAME",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        static_padding, is_dynamic = get_padding_value(padding, kernel_size, stride=stride, dilation=dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=static_padding, dilation=dilation,
            groups=groups, bias=bias,
        )
        self.pad = DynamicPad2d(kernel_size, stride, dilation) if is_dynamic else None
        self.eps = eps
        # (key of the weight it was computed from, standardised weight); one attribute, so readers never pair a
        # key with another weight's result.
        self._weight_cache: tuple[tuple[Any, ...], Tensor] | None = None

    def train(self, mode: bool = True) -> WeightStandardizedConv2d:
        if mode:
            self.clear_weight_cache()
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> WeightStandardizedConv2d:
        """``model.to(torch.bfloat16)`` and the like: standardise the float32 weight first, then cast the result.

        Standardising after the cast would compute mean and variance from weights already rounded to 8 bits of
        mantissa (the numerics policy, :mod:`model.numerics`, says float32 first). The result is put in the cache
        under the converted weight's key, so eval-mode forwards use it until the weight changes (then the cache is
        recomputed from the weight as it is, the only thing left).
        """
        weight = self.weight
        precomputed = None
        if weight.is_floating_point() and not weight.is_meta:
            with torch.inference_mode(False), torch.no_grad():
                target = fn(weight.new_empty(0))
                if weight.dtype == torch.float32 and target.is_floating_point() and target.dtype != torch.float32:
                    precomputed = fn(standardize_weight(weight.detach(), self.eps))
                elif (
                    target.dtype == weight.dtype
                    and self._weight_cache is not None
                    and self._weight_cache[0] == self._weight_key()
                ):
                    # A move or a layout change (channels_last): carry the cached result along with the weight.
                    precomputed = fn(self._weight_cache[1])
        super()._apply(fn, recurse)
        if (
            precomputed is not None
            and not self.weight.is_meta
            and (precomputed.dtype, precomputed.device) == (self.weight.dtype, self.weight.device)
        ):
            self._weight_cache = (self._weight_key(), precomputed)
        return self

    def clear_weight_cache(self) -> None:
        self._weight_cache = None

    @property
    def cached_weight(self) -> Tensor | None:
        """The cached standardised weight, if any (for tests and debugging)."""
        return None if self._weight_cache is None else self._weight_cache[1]

    def _weight_key(self) -> tuple[Any, ...]:
        weight = self.weight
        # Inference tensors have no version counter; they cannot be changed outside inference mode anyway.
        version = -1 if weight.is_inference() else weight._version
        return (weight.data_ptr(), version, weight.dtype, weight.device, weight.shape)

    def standardized_weight(self) -> Tensor:
        """The weight the convolution uses; cached in eval mode (see the class docstring)."""
        if self.training or (self.weight.requires_grad and torch.is_grad_enabled()):
            return standardize_weight(self.weight, self.eps)
        if torch.compiler.is_compiling():
            # torch.compile cannot trace the cache key (data_ptr, version counter, is_inference: one graph break per
            # conv). Compiled inference uses the cache as it stands (made by the cast to bf16, or by an eager call),
            # and computes the weight in the graph when there is none.
            cache = self._weight_cache
            return cache[1] if cache is not None else standardize_weight(self.weight, self.eps)
        key = self._weight_key()
        cache = self._weight_cache
        if cache is None or cache[0] != key:
            # A normal (not inference-mode) tensor, so later calls with autograd on may still use it.
            with torch.inference_mode(False), torch.no_grad():
                cache = (key, standardize_weight(self.weight, self.eps))
            self._weight_cache = cache
        return cache[1]

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.pad is not None:
            hidden_states = self.pad(hidden_states)
        return F.conv2d(
            hidden_states, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def _is_channels_last(tensor: Tensor) -> bool:
    """A 4-d tensor laid out NHWC (and not also NCHW, as 1x1 maps or single channels are)."""
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


class BitGroupNormActivation(nn.GroupNorm):
    """GroupNorm followed by the backbone's activation (or none); a channels-last input gives a channels-last output."""

    # Class-wide switch, for measuring what keeping channels-last costs or saves on a GPU (jobs.gpu_check); leave on.
    keep_channels_last: bool = True

    def __init__(self, config: BitConfig, num_channels: int, eps: float = 1e-5, apply_activation: bool = True) -> None:
        super().__init__(config.num_groups, num_channels, eps=eps, affine=True)
        self.activation = Activation(config.hidden_act) if apply_activation else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        channels_last = self.keep_channels_last and _is_channels_last(hidden_states)
        hidden_states = F.group_norm(hidden_states, self.num_groups, self.weight, self.bias, self.eps)
        if channels_last and not hidden_states.is_contiguous(memory_format=torch.channels_last):
            # CUDA's GroupNorm returns NCHW whatever its input; without this every later conv of the backbone would
            # run NCHW (tensor-core convolutions want NHWC). The CPU kernel keeps channels-last, so no copy there.
            hidden_states = hidden_states.contiguous(memory_format=torch.channels_last)
        if self.activation is not None:
            hidden_states = self.activation(hidden_states, inplace=True)
        return hidden_states


class BitMaxPool2d(nn.MaxPool2d):
    """3x3/2 max pool of the stem; with dynamic padding it pads like TF 'SAME', with zeros as the reference does."""

    def __init__(self, kernel_size: int, stride: int, use_dynamic_padding: bool = True) -> None:
        super().__init__(kernel_size, stride)
        self.pad = DynamicPad2d(kernel_size, stride, 1, value=0.0) if use_dynamic_padding else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.pad is not None:
            hidden_states = self.pad(hidden_states)
        return F.max_pool2d(hidden_states, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


class BitEmbeddings(nn.Module):
    """The stem: a 7x7/2 standardised conv, (GroupNorm + activation for the non-pre-activation net), 3x3/2 max pool."""

    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.convolution = WeightStandardizedConv2d(
            config.num_channels, config.embedding_size, kernel_size=7, stride=2, eps=1e-8, padding=config.global_padding
        )
        self.pooler = BitMaxPool2d(kernel_size=3, stride=2, use_dynamic_padding=config.embedding_dynamic_padding)
        # Without global SAME padding the reference pads the conv output by one pixel before pooling.
        self.pad = None if config.global_padding == "SAME" else nn.ConstantPad2d(padding=(1, 1, 1, 1), value=0.0)
        if config.layer_type != "preactivation":
            self.norm = BitGroupNormActivation(config, num_channels=config.embedding_size)
        else:
            self.norm = None
        self.num_channels = config.num_channels

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model was configured for {self.num_channels}"
            )
        embedding = self.convolution(pixel_values)
        if self.pad is not None:
            embedding = self.pad(embedding)
        if self.norm is not None:
            embedding = self.norm(embedding)
        return self.pooler(embedding)


def drop_path(hidden_states: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth per sample (training only)."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
    random_tensor.floor_()
    return hidden_states.div(keep_prob) * random_tensor


class BitDropPath(nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: Tensor) -> Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)


class BitDownsampleConv(nn.Module):
    """Shortcut projection of a stage's first block: 1x1 standardised conv, plus GroupNorm outside pre-activation."""

    def __init__(self, config: BitConfig, in_channels: int, out_channels: int, stride: int = 1, preact: bool = True) -> None:
        super().__init__()
        self.conv = WeightStandardizedConv2d(
            in_channels, out_channels, 1, stride=stride, eps=1e-8, padding=config.global_padding
        )
        self.norm = None if preact else BitGroupNormActivation(config, num_channels=out_channels, apply_activation=False)

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states = self.conv(hidden_states)
        return hidden_states if self.norm is None else self.norm(hidden_states)


class BitPreActivationBottleneckLayer(nn.Module):
    """Pre-activation (ResNet v2) bottleneck: norm-act before each conv, stride on the 3x3.

    As in the reference, the 3x3 conv of this block ignores the stage's dilation.
    """

    def __init__(
        self,
        config: BitConfig,
        in_channels: int,
        out_channels: int,
        bottle_ratio: float = 0.25,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        drop_path_rate: float = 0.0,
        is_first_layer: bool = False,
    ) -> None:
        super().__init__()
        mid_channels = make_div(out_channels * bottle_ratio)
        padding = config.global_padding
        self.downsample = (
            BitDownsampleConv(config, in_channels, out_channels, stride=stride, preact=True) if is_first_layer else None
        )
        self.norm1 = BitGroupNormActivation(config, in_channels)
        self.conv1 = WeightStandardizedConv2d(in_channels, mid_channels, 1, eps=1e-8, padding=padding)
        self.norm2 = BitGroupNormActivation(config, num_channels=mid_channels)
        self.conv2 = WeightStandardizedConv2d(mid_channels, mid_channels, 3, stride=stride, eps=1e-8, padding=padding)
        self.norm3 = BitGroupNormActivation(config, mid_channels)
        self.conv3 = WeightStandardizedConv2d(mid_channels, out_channels, 1, eps=1e-8, padding=padding)
        self.drop_path = BitDropPath(drop_path_rate) if drop_path_rate > 0 else None

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden_states_preact = self.norm1(hidden_states)
        shortcut = hidden_states if self.downsample is None else self.downsample(hidden_states_preact)
        hidden_states = self.conv1(hidden_states_preact)
        hidden_states = self.conv2(self.norm2(hidden_states))
        hidden_states = self.conv3(self.norm3(hidden_states))
        if self.drop_path is not None:
            hidden_states = self.drop_path(hidden_states)
        # The conv output is fresh and convolution's backward does not read it: adding in place is safe.
        return hidden_states.add_(shortcut)


class BitBottleneckLayer(nn.Module):
    """Non-pre-activation bottleneck (ResNet v1.5 order: conv-norm-act, residual, act), used by ViT Hybrid."""

    def __init__(
        self,
        config: BitConfig,
        in_channels: int,
        out_channels: int,
        bottle_ratio: float = 0.25,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
        drop_path_rate: float = 0.0,
        is_first_layer: bool = False,
    ) -> None:
        super().__init__()
        first_dilation = first_dilation or dilation
        mid_channels = make_div(out_channels * bottle_ratio)
        padding = config.global_padding
        self.downsample = (
            BitDownsampleConv(config, in_channels, out_channels, stride=stride, preact=False) if is_first_layer else None
        )
        self.conv1 = WeightStandardizedConv2d(in_channels, mid_channels, 1, eps=1e-8, padding=padding)
        self.norm1 = BitGroupNormActivation(config, num_channels=mid_channels)
        self.conv2 = WeightStandardizedConv2d(
            mid_channels, mid_channels, 3, stride=stride, dilation=first_dilation, eps=1e-8, padding=padding
        )
        self.norm2 = BitGroupNormActivation(config, num_channels=mid_channels)
        self.conv3 = WeightStandardizedConv2d(mid_channels, out_channels, 1, eps=1e-8, padding=padding)
        self.norm3 = BitGroupNormActivation(config, num_channels=out_channels, apply_activation=False)
        self.drop_path = BitDropPath(drop_path_rate) if drop_path_rate > 0 else None
        self.activation = Activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        shortcut = hidden_states if self.downsample is None else self.downsample(hidden_states)
        hidden_states = self.norm1(self.conv1(hidden_states))
        hidden_states = self.norm2(self.conv2(hidden_states))
        hidden_states = self.norm3(self.conv3(hidden_states))
        if self.drop_path is not None:
            hidden_states = self.drop_path(hidden_states)
        # Fresh tensor whose producer's backward does not read it: in-place add, then in-place activation if allowed.
        return self.activation(hidden_states.add_(shortcut), inplace=True)


class BitStage(nn.Module):
    """A stage of ``depth`` blocks; the first one changes width and stride (and carries the shortcut projection)."""

    def __init__(
        self,
        config: BitConfig,
        in_channels: int,
        out_channels: int,
        stride: int,
        dilation: int,
        depth: int,
        bottle_ratio: float = 0.25,
        layer_dropout: list[float] | None = None,
    ) -> None:
        super().__init__()
        first_dilation = 1 if dilation in (1, 2) else 2
        layer_class = BitBottleneckLayer if config.layer_type == "bottleneck" else BitPreActivationBottleneckLayer
        previous_channels = in_channels
        self.layers = nn.Sequential()
        for layer_index in range(depth):
            self.layers.add_module(
                str(layer_index),
                layer_class(
                    config,
                    previous_channels,
                    out_channels,
                    stride=stride if layer_index == 0 else 1,
                    dilation=dilation,
                    bottle_ratio=bottle_ratio,
                    first_dilation=first_dilation,
                    drop_path_rate=layer_dropout[layer_index] if layer_dropout else 0.0,
                    is_first_layer=layer_index == 0,
                ),
            )
            previous_channels = out_channels
            first_dilation = dilation

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.layers(hidden_states)


class BitEncoder(nn.Module):
    """The stages; strides 1, 2, 2, ... after the stride-4 stem, turned into dilation beyond ``output_stride``."""

    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        previous_channels = config.embedding_size
        current_stride = 4
        dilation = 1
        total_depth = sum(config.depths)
        rates = [config.drop_path_rate * index / max(total_depth - 1, 1) for index in range(total_depth)]
        offsets = [sum(config.depths[:index]) for index in range(len(config.depths))]
        for stage_index, (depth, hidden_size) in enumerate(zip(config.depths, config.hidden_sizes)):
            out_channels = make_div(hidden_size * config.width_factor)
            stride = 1 if stage_index == 0 else 2
            if current_stride >= config.output_stride:
                dilation *= stride
                stride = 1
            self.stages.append(
                BitStage(
                    config,
                    previous_channels,
                    out_channels,
                    stride=stride,
                    dilation=dilation,
                    depth=depth,
                    layer_dropout=rates[offsets[stage_index] : offsets[stage_index] + depth],
                )
            )
            previous_channels = out_channels
            current_stride *= stride


class BitModel(nn.Module):
    """Stem + stages (+ the pre-activation net's final norm, kept for the checkpoint but unused by the ViT)."""

    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.embedder = BitEmbeddings(config)
        self.encoder = BitEncoder(config)
        self.norm = (
            BitGroupNormActivation(config, num_channels=config.hidden_sizes[-1])
            if config.layer_type == "preactivation"
            else None
        )


class BitBackbone(nn.Module):
    """Runs BiT up to its output stage and returns that stage's (channels-last) feature map.

    transformers' backbone returns the pre-norm output of ``out_features[-1]``, computing every stage; here the
    stages after it are skipped.
    """

    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.bit = BitModel(config)
        self.out_stage_index = config.out_stage_index

    def forward(self, pixel_values: Tensor) -> Tensor:
        hidden_states = self.bit.embedder(pixel_values.contiguous(memory_format=torch.channels_last))
        for stage in self.bit.encoder.stages[: self.out_stage_index]:
            hidden_states = stage(hidden_states)
        return hidden_states


# --------------------------------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------------------------------


class ViTHybridPatchEmbeddings(nn.Module):
    """Backbone feature map -> patch tokens ``(batch, grid_h * grid_w, hidden_size)`` and the grid."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.image_size = config.image_size_hw
        self.patch_size = config.patch_size_hw
        self.num_channels = config.num_channels
        self.grid_size = config.grid_size
        self.num_patches = config.num_patches
        self.backbone = BitBackbone(config.backbone_config)
        self.projection = nn.Conv2d(
            config.backbone_featmap_shape[1], config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> tuple[Tensor, tuple[int, int]]:
        _, num_channels, height, width = pixel_values.shape
        if num_channels != self.num_channels:
            raise ValueError(f"pixel_values has {num_channels} channels but the model was configured for {self.num_channels}")
        if not interpolate_pos_encoding and (height, width) != self.image_size:
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({self.image_size[0]}*{self.image_size[1]}); "
                "resize the images or pass interpolate_pos_encoding=True"
            )
        features = self.backbone(pixel_values)
        if self.patch_size == (1, 1):
            # A 1x1 conv is a matrix product over channels; on the channels-last map the NHWC view needs no copy.
            weight = self.projection.weight.reshape(self.projection.out_channels, -1)
            embeddings = F.linear(features.permute(0, 2, 3, 1), weight, self.projection.bias)
            grid = (embeddings.shape[1], embeddings.shape[2])
            return embeddings.flatten(1, 2), grid
        projected = self.projection(features)
        return projected.flatten(2).transpose(1, 2), (projected.shape[2], projected.shape[3])


class ViTHybridEmbeddings(nn.Module):
    """[CLS] + patch tokens, plus (optionally resampled) position embeddings."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = ViTHybridPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.patch_embeddings.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.grid_size = config.grid_size

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings for a ``grid`` of patches: bicubic resampling of the trained grid (no-op when equal).

        transformers 4.57 resamples to ``pixel size // patch_size`` (pixels, not backbone features), which fails for
        any size but the trained one; this resamples to the feature grid the backbone actually produced.
        """
        if tuple(grid) == tuple(self.grid_size):
            return self.position_embeddings
        dim = self.position_embeddings.shape[-1]
        class_position = self.position_embeddings[:, :1]
        patch_position = self.position_embeddings[:, 1:].reshape(1, *self.grid_size, dim).permute(0, 3, 1, 2)
        patch_position = F.interpolate(patch_position.float(), size=grid, mode="bicubic", align_corners=False)
        patch_position = patch_position.to(class_position.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_position, patch_position), dim=1)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        patches, grid = self.patch_embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if interpolate_pos_encoding:
            position_embeddings = self.interpolate_pos_encoding(grid)
        elif tuple(grid) != tuple(self.grid_size):
            raise ValueError(
                f"the backbone produced a {grid[0]}x{grid[1]} feature grid but the position embeddings are for "
                f"{self.grid_size[0]}x{self.grid_size[1]} (backbone_featmap_shape); pass interpolate_pos_encoding=True"
            )
        else:
            position_embeddings = self.position_embeddings
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)
        embeddings = torch.cat((cls_tokens, patches), dim=1)
        # cat's output is fresh and cat's backward does not read it.
        return self.dropout(embeddings.add_(position_embeddings))


class ViTHybridSelfAttention(nn.Module):
    """Multi-head self-attention; fused SDPA kernel unless the attention probabilities are asked for."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, hidden_states: Tensor) -> Tensor:
        batch, tokens, _ = hidden_states.shape
        return hidden_states.view(batch, tokens, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(
        self, hidden_states: Tensor, output_attentions: bool = False, only_cls_token: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``only_cls_token``: queries (and so the output) for the first token only; keys/values for all tokens."""
        queries = hidden_states[:, :1] if only_cls_token else hidden_states
        query = self._heads(self.query(queries))
        key = self._heads(self.key(hidden_states))
        value = self._heads(self.value(hidden_states))
        probabilities = None
        if output_attentions:
            scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            probabilities = F.softmax(scores, dim=-1)
            context = torch.matmul(self.dropout(probabilities), value)
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, dropout_p=self.dropout_prob if self.training else 0.0
            )
        batch, _, tokens, _ = context.shape
        # SDPA on CPU and CUDA lays its output out as (batch, tokens, heads, dim): this reshape is a view.
        return context.transpose(1, 2).reshape(batch, tokens, self.all_head_size), probabilities


class ViTHybridSelfOutput(nn.Module):
    """Output projection of the attention (the residual is added by the layer)."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dropout(self.dense(hidden_states))


class ViTHybridAttention(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.attention = ViTHybridSelfAttention(config)
        self.output = ViTHybridSelfOutput(config)

    def forward(
        self, hidden_states: Tensor, output_attentions: bool = False, only_cls_token: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        context, probabilities = self.attention(hidden_states, output_attentions, only_cls_token)
        return self.output(context), probabilities


class ViTHybridIntermediate(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = Activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        # The (tokens x intermediate_size) product is the biggest tensor of the layer: activate it in place.
        return self.intermediate_act_fn(self.dense(hidden_states), inplace=True)


class ViTHybridOutput(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return _add_residual(self.dropout(self.dense(hidden_states)), input_tensor)


def _add_residual(branch: Tensor, residual: Tensor) -> Tensor:
    """``branch + residual``, in place on ``branch``: a fresh Linear (or Dropout) output that no backward reads."""
    return branch.add_(residual)


class ViTHybridLayer(nn.Module):
    """Pre-norm transformer block (timm ``Block``): x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.attention = ViTHybridAttention(config)
        self.intermediate = ViTHybridIntermediate(config)
        self.output = ViTHybridOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: Tensor, output_attentions: bool = False, only_cls_token: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        attention_output, probabilities = self.attention(
            self.layernorm_before(hidden_states), output_attentions, only_cls_token
        )
        residual = hidden_states[:, :1] if only_cls_token else hidden_states
        hidden_states = _add_residual(attention_output, residual)
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return layer_output, probabilities


class ViTHybridEncoder(nn.Module):
    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([ViTHybridLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        only_cls_token: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
        """``only_cls_token`` (ignored when hidden states or attentions are requested): the last layer returns the
        CLS row only, ``(batch, 1, hidden_size)``."""
        all_hidden_states: tuple[Tensor, ...] | None = () if output_hidden_states else None
        all_attentions: tuple[Tensor, ...] | None = () if output_attentions else None
        cls_only_last = only_cls_token and not (output_attentions or output_hidden_states)
        for index, layer in enumerate(self.layer):
            if all_hidden_states is not None:
                all_hidden_states = all_hidden_states + (hidden_states,)
            last = index == len(self.layer) - 1
            hidden_states, probabilities = layer(hidden_states, output_attentions, cls_only_last and last)
            if all_attentions is not None:
                all_attentions = all_attentions + (probabilities,)  # type: ignore[operator]
        if all_hidden_states is not None:
            all_hidden_states = all_hidden_states + (hidden_states,)
        return hidden_states, all_hidden_states, all_attentions


class ViTHybridPooler(nn.Module):
    """Dense + tanh on the CLS token (the pre-logits of the ImageNet-21k checkpoints)."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    """A small stand-in for transformers' ``ModelOutput``: ``out.x``, ``out["x"]``, ``out[0]``, ``to_tuple()``.

    Like transformers, the tuple view leaves out fields that are None.
    """

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value for _, value in self.items())

    def keys(self) -> list[str]:
        return [name for name, _ in self.items()]

    def items(self) -> list[tuple[str, Any]]:
        return [(field.name, getattr(self, field.name)) for field in fields(self) if getattr(self, field.name) is not None]

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Tensor
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    """transformers' fields (``logits``, ``hidden_states``, ``attentions``) plus ``embedding``, the final-LayerNorm
    CLS vector the classifier reads (last in the tuple view, so ``out[0]`` is the logits as in transformers)."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    embedding: Tensor | None = None


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class ViTHybridPreTrainedModel(nn.Module):
    """Weight init, loading and saving shared by the two public models."""

    base_model_prefix = "vit"

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_info: CheckpointInfo | None = None  # set by from_pretrained

    # -- initialisation (transformers' scheme, so a fresh model behaves like a fresh reference model) --

    def init_weights(self) -> None:
        for module in self.modules():
            self._init_module(module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ViTHybridEmbeddings):
            nn.init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            nn.init.trunc_normal_(module.cls_token, mean=0.0, std=std)

    # -- properties --

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        return (
            self.config.output_attentions if output_attentions is None else output_attentions,
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            self.config.use_return_dict if return_dict is None else return_dict,
        )

    # -- checkpoints --

    @classmethod
    def from_pretrained(
        cls: type[ModelT],
        path_or_uri: str | os.PathLike[str],
        *,
        storage_options: StorageOptions | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        config: ViTHybridConfig | None = None,
        digest: bool = True,
        **model_kwargs: Any,
    ) -> ModelT:
        """Load a checkpoint folder (local or fsspec URI) in Hugging Face or timm layout; returns the model in eval mode.

        ``config`` overrides the folder's ``config.json``; a timm-layout checkpoint without one gets the
        ``vit_base_r50_s16_384`` architecture. ``dtype`` defaults to float32 whatever the file stores, as in
        transformers. ``model_kwargs`` go to the constructor (``add_pooling_layer=False``). The checkpoint's origin
        and sha256 end up in ``model.checkpoint_info`` (``digest=False``: no sha256, a quarter of a second less per
        400 MB, for callers that identify the weights otherwise).
        """
        state_dict, info = load_checkpoint(path_or_uri, storage_options, digest=digest)
        if config is None:
            config = _config_for_checkpoint(info, storage_options)
        # Built on the meta device: no memory and no random init for weights that the checkpoint replaces.
        with torch.device("meta"):
            model = cls(config, **model_kwargs)
        model._load_checkpoint_state(state_dict, info)
        model.to(device=device, dtype=dtype or torch.float32)
        model.checkpoint_info = info
        return model.eval()

    def _load_checkpoint_state(self, state_dict: dict[str, Tensor], info: CheckpointInfo) -> None:
        """Fit the checkpoint to this class (prefix ``vit.`` or not), check every key and shape, then assign."""
        base_model = isinstance(self, ViTHybridModel)
        has_pooler = base_model and self.pooler is not None  # type: ignore[attr-defined]
        state_dict, notes = adapt_prefix(state_dict, base_model=base_model, has_pooler=has_pooler)
        for note in notes:
            logger.info("%s: %s", info.uri, note)
        expected = {name: tuple(tensor.shape) for name, tensor in self.state_dict().items()}
        # transformers' behaviour for a classification checkpoint loaded as the bare model: fresh pooler, a warning.
        fresh = [name for name in expected if name.startswith("pooler.") and name not in state_dict] if has_pooler else []
        check_state_dict({name: shape for name, shape in expected.items() if name not in fresh}, state_dict, info.uri)
        self.load_state_dict(state_dict, strict=False, assign=True)
        if fresh:
            logger.warning(
                "%s has no pooler weights (%s): they are initialised at random; pooler_output is meaningless until trained",
                info.uri, ", ".join(fresh),
            )
            pooler = self.pooler  # type: ignore[attr-defined]
            pooler.to_empty(device="cpu")
            self._init_module(pooler.dense)
        still_meta = [name for name, tensor in self.state_dict().items() if tensor.is_meta]
        if still_meta:
            raise AssertionError(f"parameters left unloaded: {still_meta}")

    def save_pretrained(self, folder: str | os.PathLike[str], safe_serialization: bool = True) -> str:
        """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) in transformers' layout.

        ``folder`` may be a local path or an fsspec URI; returns the weights file's URI.
        """
        uri = os.fspath(folder)
        config_dict = self.config.to_dict()
        config_dict["architectures"] = [type(self).__name__]
        config_dict.pop("torch_dtype", None)  # transformers 4.57 writes the newer name
        config_dict["dtype"] = str(self.dtype).removeprefix("torch.")
        write_bytes(join_uri(uri, CONFIG_NAME), (ViTHybridConfig.from_dict(config_dict).to_json_string()).encode("utf-8"))
        name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
        weights_uri = join_uri(uri, name)
        write_bytes(weights_uri, serialize_state_dict(self.state_dict(), safe_serialization=safe_serialization))
        return weights_uri


def _config_for_checkpoint(info: CheckpointInfo, storage_options: StorageOptions | None) -> ViTHybridConfig:
    if info.config_uri is not None:
        return ViTHybridConfig.from_pretrained(info.config_uri, storage_options)
    if info.layout == "timm":
        logger.info("%s has no %s: using the vit_base_r50_s16_384 architecture", info.uri, CONFIG_NAME)
        return vit_base_r50_s16_384_config()
    raise FileNotFoundError(
        f"{info.uri} has weights but no {CONFIG_NAME}; add one or pass config=ViTHybridConfig(...) to from_pretrained"
    )


class ViTHybridModel(ViTHybridPreTrainedModel):
    """The bare encoder: ``last_hidden_state`` (after the final LayerNorm) and ``pooler_output`` (dense + tanh on CLS)."""

    base_model_prefix = ""

    def __init__(self, config: ViTHybridConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = ViTHybridEmbeddings(config)
        self.encoder = ViTHybridEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTHybridPooler(config) if add_pooling_layer else None
        self.init_weights()

    def encode(
        self,
        pixel_values: Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        only_cls_token: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
        """Embeddings + encoder + final LayerNorm; with ``only_cls_token`` the sequence output is ``(batch, 1, dim)``."""
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        embedding_output = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, output_attentions, output_hidden_states, only_cls_token=only_cls_token
        )
        if only_cls_token:
            sequence_output = sequence_output[:, :1]
        return self.layernorm(sequence_output), hidden_states, attentions

    def forward(
        self,
        pixel_values: Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple[Tensor, ...]:
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        sequence_output, hidden_states, attentions = self.encode(
            pixel_values, output_attentions, output_hidden_states, bool(interpolate_pos_encoding)
        )
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(sequence_output, pooled_output, hidden_states, attentions)
        return output if return_dict else output.to_tuple()


class ViTHybridForImageClassification(ViTHybridPreTrainedModel):
    """ViT Hybrid with a linear head on the final-LayerNorm CLS token (ImageNet-1k for the released checkpoint)."""

    def __init__(self, config: ViTHybridConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTHybridModel(config, add_pooling_layer=False)
        self.classifier: nn.Module = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self._init_module(self.classifier)

    @torch.no_grad()
    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """The ``(batch, hidden_size)`` CLS embedding the classifier would read, without running the head."""
        sequence_output, _, _ = self.vit.encode(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, only_cls_token=True
        )
        return sequence_output[:, 0]

    def forward(
        self,
        pixel_values: Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput | tuple[Tensor, ...]:
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        sequence_output, hidden_states, attentions = self.vit.encode(
            pixel_values, output_attentions, output_hidden_states, bool(interpolate_pos_encoding), only_cls_token=True
        )
        embedding = sequence_output[:, 0]
        logits = self.classifier(embedding)
        output = ImageClassifierOutput(logits, hidden_states, attentions, embedding)
        if return_dict:
            return output
        # transformers' tuple: (logits, hidden_states?, attentions?), without our extra embedding.
        return tuple(value for value in (logits, hidden_states, attentions) if value is not None)
