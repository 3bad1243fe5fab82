"""Configuration records for ViT Hybrid and its BiT backbone, read from and written to Hugging Face ``config.json``.

The two classes accept the same keyword arguments and defaults as ``transformers.ViTHybridConfig`` and
``transformers.BitConfig`` (4.57), so a ``config.json`` written by either library loads in the other. Settings that
the native model cannot honour (a timm or hub backbone by name, an unknown activation, a padding mode other than
SAME/VALID/None, ...) fail here with a ``ValueError`` that names the field and the allowed values, instead of
surfacing later as a shape error deep inside the forward pass.

Generic Hugging Face keys that do not change this network (``architectures``, ``torch_dtype``,
``transformers_version``, ``problem_type``, ...) are accepted and written back unchanged::

    config = ViTHybridConfig.from_pretrained("s3://bucket/models/vit-hybrid-base-bit-384/")
    config.num_labels            # 1000
    config.save_pretrained("/tmp/copy")  # transformers.ViTHybridConfig.from_pretrained reads it back
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from model.storage import StorageOptions, join_uri, read_bytes, write_bytes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"

ConfigT = TypeVar("ConfigT", bound="_JsonConfig")

# Activation names the native model implements (a subset of transformers' ACT2FN without learnable activations).
SUPPORTED_ACTIVATIONS: tuple[str, ...] = (
    "gelu",
    "gelu_python",
    "gelu_new",
    "gelu_fast",
    "gelu_accurate",
    "gelu_pytorch_tanh",
    "gelu_python_tanh",
    "quick_gelu",
    "relu",
    "relu2",
    "relu6",
    "leaky_relu",
    "silu",
    "swish",
    "mish",
    "sigmoid",
    "tanh",
    "linear",
)
BIT_LAYER_TYPES: tuple[str, ...] = ("preactivation", "bottleneck")
BIT_PADDINGS: tuple[str, ...] = ("SAME", "VALID")

# Keys every transformers config carries that this model reads with a meaning of its own.
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "return_dict")


def make_div(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` the way BiT (timm ``make_div``) does."""
    min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _allowed(field: str, value: Any, allowed: Sequence[Any], owner: str) -> ValueError:
    choices = ", ".join(repr(choice) for choice in allowed)
    return ValueError(f"{owner}.{field}={value!r} is not supported; allowed values: {choices}")


def _pair(value: int | Sequence[int], field: str, owner: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(item, int) for item in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{owner}.{field}={value!r} must be an int or a pair of ints")
    if min(pair) <= 0:
        raise ValueError(f"{owner}.{field}={value!r} must be positive")
    return pair


class _JsonConfig:
    """What both records share: dict/JSON round trips and reading/writing ``config.json`` at any fsspec URI."""

    model_type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[ConfigT], config_dict: Mapping[str, Any]) -> ConfigT:
        """Build from a dict as ``config.json`` holds it (the dict is not modified)."""
        return cls(**copy.deepcopy(dict(config_dict)))

    def to_json_string(self) -> str:
        """The JSON text of :meth:`to_dict`, sorted and indented like transformers writes it."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls: type[ConfigT], path: str | os.PathLike[str]) -> ConfigT:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    @classmethod
    def from_pretrained(
        cls: type[ConfigT], path_or_uri: str | os.PathLike[str], storage_options: StorageOptions | None = None
    ) -> ConfigT:
        """Read ``config.json`` from a checkpoint folder (local or any fsspec URI) or from a ``.json`` file URI."""
        uri = os.fspath(path_or_uri)
        config_uri = uri if uri.endswith(".json") else join_uri(uri, CONFIG_NAME)
        try:
            payload = read_bytes(config_uri, storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no {CONFIG_NAME} at {config_uri}: pass the folder of a Hugging Face checkpoint "
                "(the one holding config.json and model.safetensors)"
            ) from None
        try:
            config_dict = json.loads(payload)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_uri} is not valid JSON: {error}") from error
        return cls.from_dict(config_dict)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> str:
        """Write ``config.json`` into ``folder`` (local or fsspec URI); returns the file's URI."""
        uri = join_uri(os.fspath(folder), CONFIG_NAME)
        write_bytes(uri, self.to_json_string().encode("utf-8"))
        return uri

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _JsonConfig) and type(other) is type(self) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class BitConfig(_JsonConfig):
    """The BiT (ResNet v2 with weight standardisation) backbone, as ``transformers.BitConfig`` describes it.

    ``out_features``/``out_indices`` pick the stage whose feature map feeds the ViT (``"stem"`` is index 0); when
    several are given, the last one is used, as in transformers. Stages after it are built (their weights are part
    of the checkpoint) but never run.
    """

    model_type = "bit"

    def __init__(
        self,
        num_channels: int = 3,
        embedding_size: int = 64,
        hidden_sizes: Sequence[int] = (256, 512, 1024, 2048),
        depths: Sequence[int] = (3, 4, 6, 3),
        layer_type: str = "preactivation",
        hidden_act: str = "relu",
        global_padding: str | None = None,
        num_groups: int = 32,
        drop_path_rate: float = 0.0,
        embedding_dynamic_padding: bool = False,
        output_stride: int = 32,
        width_factor: int = 1,
        out_features: Sequence[str] | None = None,
        out_indices: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise _allowed("model_type", model_type, [self.model_type], "BitConfig")
        kwargs.pop("stage_names", None)  # derived from depths; transformers writes it, we recompute it

        if layer_type not in BIT_LAYER_TYPES:
            raise _allowed("layer_type", layer_type, BIT_LAYER_TYPES, "BitConfig")
        if global_padding is not None:
            if not isinstance(global_padding, str) or global_padding.upper() not in BIT_PADDINGS:
                raise _allowed("global_padding", global_padding, [*BIT_PADDINGS, None], "BitConfig")
            global_padding = global_padding.upper()
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise _allowed("hidden_act", hidden_act, SUPPORTED_ACTIVATIONS, "BitConfig")
        if not depths or any(int(depth) < 1 for depth in depths):
            raise ValueError(f"BitConfig.depths={list(depths)!r} must be a non-empty list of positive ints")
        if len(hidden_sizes) < len(depths):
            raise ValueError(
                f"BitConfig.hidden_sizes={list(hidden_sizes)!r} needs one entry per stage "
                f"(depths={list(depths)!r} has {len(depths)} stages)"
            )
        if output_stride < 4:
            raise ValueError(f"BitConfig.output_stride={output_stride!r} must be at least 4 (the stem's stride)")

        self.num_channels = int(num_channels)
        self.embedding_size = int(embedding_size)
        self.hidden_sizes = [int(size) for size in hidden_sizes]
        self.depths = [int(depth) for depth in depths]
        self.layer_type = layer_type
        self.hidden_act = hidden_act
        self.global_padding = global_padding
        self.num_groups = int(num_groups)
        self.drop_path_rate = float(drop_path_rate)
        self.embedding_dynamic_padding = bool(embedding_dynamic_padding)
        self.output_stride = int(output_stride)
        self.width_factor = int(width_factor)
        self.out_features, self.out_indices = _aligned_out_features(out_features, out_indices, self.stage_names)
        self._check_group_norms()
        # Generic transformers keys (id2label, return_dict, ...) of a standalone BiT config: kept for the round trip.
        self.extra: dict[str, Any] = kwargs

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{index}" for index in range(1, len(self.depths) + 1)]

    @property
    def out_stage_index(self) -> int:
        """Index into :attr:`stage_names` of the feature map the backbone hands on (0 is the stem)."""
        return self.out_indices[-1]

    @property
    def stage_channels(self) -> list[int]:
        """Output channels of the stem and of every stage, as the network builds them."""
        stages = self.hidden_sizes[: len(self.depths)]
        return [self.embedding_size] + [make_div(size * self.width_factor) for size in stages]

    @property
    def out_channels(self) -> int:
        return self.stage_channels[self.out_stage_index]

    def _check_group_norms(self) -> None:
        """GroupNorm needs channels divisible by num_groups; say which setting breaks that, before building."""
        # Stage outputs, bottleneck widths, the stem (its norm, or the first pre-activation norm), and the final
        # pre-activation norm, which transformers sizes from hidden_sizes[-1] without the width factor.
        channels = set(self.stage_channels) | {make_div(size * 0.25) for size in self.stage_channels[1:]}
        if self.layer_type == "preactivation":
            channels.add(self.hidden_sizes[-1])
        bad = sorted(count for count in channels if count % self.num_groups)
        if self.num_groups < 1 or bad:
            raise ValueError(
                f"BitConfig.num_groups={self.num_groups} must divide every normalised channel count; "
                f"it does not divide {bad} (from embedding_size, hidden_sizes and width_factor)"
            )

    def to_dict(self) -> dict[str, Any]:
        output = dict(self.extra)
        output.update(
            model_type=self.model_type,
            num_channels=self.num_channels,
            embedding_size=self.embedding_size,
            hidden_sizes=list(self.hidden_sizes),
            depths=list(self.depths),
            layer_type=self.layer_type,
            hidden_act=self.hidden_act,
            global_padding=self.global_padding,
            num_groups=self.num_groups,
            drop_path_rate=self.drop_path_rate,
            embedding_dynamic_padding=self.embedding_dynamic_padding,
            output_stride=self.output_stride,
            width_factor=self.width_factor,
            out_features=list(self.out_features),
            out_indices=list(self.out_indices),
            stage_names=self.stage_names,
        )
        return output


def _aligned_out_features(
    out_features: Sequence[str] | None, out_indices: Sequence[int] | None, stage_names: list[str]
) -> tuple[list[str], list[int]]:
    """transformers' ``get_aligned_output_features_output_indices``: fill in one from the other, check they agree."""
    names = f"stage names {stage_names}"
    if out_features is not None:
        out_features = list(out_features)
        unknown = [name for name in out_features if name not in stage_names]
        if unknown:
            raise ValueError(f"BitConfig.out_features={out_features!r}: {unknown} are not among the {names}")
        if out_features != [name for name in stage_names if name in out_features]:
            raise ValueError(f"BitConfig.out_features={out_features!r} must be unique and in the order of the {names}")
    if out_indices is not None:
        positive = [index % len(stage_names) if -len(stage_names) <= index < 0 else index for index in out_indices]
        if any(not 0 <= index < len(stage_names) for index in positive):
            raise ValueError(f"BitConfig.out_indices={list(out_indices)!r} must index the {names}")
        if positive != sorted(set(positive)):
            raise ValueError(f"BitConfig.out_indices={list(out_indices)!r} must be unique and increasing")
        out_indices = positive
    if out_features is None:
        if out_indices is None:
            return [stage_names[-1]], [len(stage_names) - 1]
        return [stage_names[index] for index in out_indices], list(out_indices)
    if out_indices is None:
        return out_features, [stage_names.index(name) for name in out_features]
    if out_features != [stage_names[index] for index in out_indices]:
        raise ValueError(
            f"BitConfig.out_features={out_features!r} and out_indices={list(out_indices)!r} name different stages"
        )
    return out_features, list(out_indices)


def _default_backbone_config() -> dict[str, Any]:
    """The BiT-R50 (3 stages) that transformers' ViTHybridConfig builds when given no backbone."""
    return {
        "global_padding": "same",
        "layer_type": "bottleneck",
        "depths": [3, 4, 9],
        "out_features": ["stage3"],
        "embedding_dynamic_padding": True,
    }


class ViTHybridConfig(_JsonConfig):
    """ViT Hybrid: a BiT backbone whose feature map is cut into patches for a pre-norm ViT encoder.

    The defaults are those of ``transformers.ViTHybridConfig`` (image_size 224, two labels); the released
    ``google/vit-hybrid-base-bit-384`` checkpoint sets ``image_size=384`` and 1000 labels, see
    :func:`vit_base_r50_s16_384_config`.

    >>> config = ViTHybridConfig(image_size=384, num_labels=1000)
    >>> config.num_patches, config.backbone_config.out_channels
    (576, 1024)
    """

    model_type = "vit-hybrid"

    def __init__(
        self,
        backbone_config: Mapping[str, Any] | BitConfig | Any | None = None,
        backbone: str | None = None,
        use_pretrained_backbone: bool = False,
        use_timm_backbone: bool = False,
        backbone_kwargs: Mapping[str, Any] | None = None,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        image_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 1,
        num_channels: int = 3,
        backbone_featmap_shape: Sequence[int] = (1, 1024, 24, 24),
        qkv_bias: bool = True,
        id2label: Mapping[int | str, str] | None = None,
        label2id: Mapping[str, int] | None = None,
        num_labels: int | None = None,
        architectures: Sequence[str] | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> None:
        owner = "ViTHybridConfig"
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise _allowed("model_type", model_type, [self.model_type], owner)
        if backbone is not None:
            raise ValueError(
                f"{owner}.backbone={backbone!r} is not supported: the native model builds only BiT backbones; "
                "allowed values: None (describe the backbone in backbone_config)"
            )
        if use_pretrained_backbone:
            raise _allowed("use_pretrained_backbone", use_pretrained_backbone, [False], owner)
        if use_timm_backbone:
            raise _allowed("use_timm_backbone", use_timm_backbone, [False], owner)
        if backbone_kwargs:
            raise _allowed("backbone_kwargs", dict(backbone_kwargs), [None, {}], owner)
        if kwargs.get("pruned_heads"):
            raise _allowed("pruned_heads", kwargs["pruned_heads"], [{}], owner)
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise _allowed("hidden_act", hidden_act, SUPPORTED_ACTIVATIONS, owner)
        if hidden_size <= 0 or num_attention_heads <= 0 or hidden_size % num_attention_heads:
            raise ValueError(
                f"{owner}.hidden_size={hidden_size} must be a positive multiple of "
                f"num_attention_heads={num_attention_heads}"
            )
        if num_hidden_layers < 0 or intermediate_size <= 0:
            raise ValueError(
                f"{owner}: num_hidden_layers={num_hidden_layers} and intermediate_size={intermediate_size} "
                "must be non-negative and positive"
            )
        if layer_norm_eps <= 0:
            raise ValueError(f"{owner}.layer_norm_eps={layer_norm_eps!r} must be positive")

        self.backbone_config = _as_bit_config(backbone_config)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.intermediate_size = int(intermediate_size)
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.initializer_range = float(initializer_range)
        self.layer_norm_eps = float(layer_norm_eps)
        self.image_size = image_size if isinstance(image_size, int) else list(image_size)
        self.patch_size = patch_size if isinstance(patch_size, int) else list(patch_size)
        self.num_channels = int(num_channels)
        self.backbone_featmap_shape = [int(size) for size in backbone_featmap_shape]
        self.qkv_bias = bool(qkv_bias)
        self.architectures = list(architectures) if architectures is not None else None
        self.output_attentions = bool(output_attentions)
        self.output_hidden_states = bool(output_hidden_states)
        self.return_dict = bool(return_dict)
        self.id2label, self.label2id = _label_maps(id2label, label2id, num_labels)
        # Generic transformers keys (torch_dtype, transformers_version, problem_type, ...): written back unchanged.
        self.extra: dict[str, Any] = kwargs
        self._check_shapes()

    def _check_shapes(self) -> None:
        owner = "ViTHybridConfig"
        _pair(self.image_size, "image_size", owner)
        patch = _pair(self.patch_size, "patch_size", owner)
        featmap = self.backbone_featmap_shape
        if len(featmap) != 4 or min(featmap[1:]) <= 0:
            raise ValueError(f"{owner}.backbone_featmap_shape={featmap!r} must be [batch, channels, height, width]")
        if featmap[2] < patch[0] or featmap[3] < patch[1]:
            raise ValueError(f"{owner}.patch_size={self.patch_size!r} is larger than the feature map {featmap[2:]}")
        channels = self.backbone_config.out_channels
        if featmap[1] != channels:
            raise ValueError(
                f"{owner}.backbone_featmap_shape={featmap!r} says {featmap[1]} channels but the backbone's output "
                f"stage {self.backbone_config.out_features[-1]!r} has {channels}; "
                f"allowed value for the channels: {channels}"
            )
        if self.num_channels != self.backbone_config.num_channels:
            raise ValueError(
                f"{owner}.num_channels={self.num_channels} differs from backbone_config.num_channels="
                f"{self.backbone_config.num_channels}; allowed value: {self.backbone_config.num_channels}"
            )

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, count: int) -> None:
        if count != self.num_labels:
            self.id2label, self.label2id = _label_maps(None, None, count)

    @property
    def image_size_hw(self) -> tuple[int, int]:
        return _pair(self.image_size, "image_size", "ViTHybridConfig")

    @property
    def patch_size_hw(self) -> tuple[int, int]:
        return _pair(self.patch_size, "patch_size", "ViTHybridConfig")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid the position embeddings were trained for: the backbone feature map cut into patches."""
        patch_h, patch_w = self.patch_size_hw
        return self.backbone_featmap_shape[2] // patch_h, self.backbone_featmap_shape[3] // patch_w

    @property
    def num_patches(self) -> int:
        grid_h, grid_w = self.grid_size
        return grid_h * grid_w

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict and not self.extra.get("torchscript", False)

    def to_dict(self) -> dict[str, Any]:
        output = dict(self.extra)
        output.update(
            model_type=self.model_type,
            backbone_config=self.backbone_config.to_dict(),
            backbone=None,
            use_pretrained_backbone=False,
            use_timm_backbone=False,
            backbone_kwargs=None,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            initializer_range=self.initializer_range,
            layer_norm_eps=self.layer_norm_eps,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            backbone_featmap_shape=list(self.backbone_featmap_shape),
            qkv_bias=self.qkv_bias,
            # JSON object keys are strings; from_dict turns them back into ints.
            id2label={str(index): label for index, label in self.id2label.items()},
            label2id=dict(self.label2id),
            output_attentions=self.output_attentions,
            output_hidden_states=self.output_hidden_states,
            return_dict=self.return_dict,
        )
        if self.architectures is not None:
            output["architectures"] = list(self.architectures)
        return output


def _as_bit_config(backbone_config: Mapping[str, Any] | BitConfig | Any | None) -> BitConfig:
    """Accept a dict (from JSON), our BitConfig, or any object with ``to_dict()`` (e.g. a transformers BitConfig)."""
    if backbone_config is None:
        logger.debug("no backbone_config: using the BiT-R50 (3 stages) default of transformers")
        return BitConfig(**_default_backbone_config())
    if isinstance(backbone_config, BitConfig):
        return copy.deepcopy(backbone_config)
    values: Mapping[str, Any]
    if isinstance(backbone_config, Mapping):
        values = backbone_config
    else:
        to_dict = getattr(backbone_config, "to_dict", None)
        if to_dict is None:
            raise ValueError(
                "ViTHybridConfig.backbone_config must be a dict or a BitConfig, "
                f"got {type(backbone_config).__name__}"
            )
        values = to_dict()
    model_type = values.get("model_type", BitConfig.model_type)
    if model_type != BitConfig.model_type:
        raise ValueError(
            f"ViTHybridConfig.backbone_config.model_type={model_type!r} is not supported; allowed values: 'bit'"
        )
    return BitConfig.from_dict(values)


def _label_maps(
    id2label: Mapping[int | str, str] | None, label2id: Mapping[str, int] | None, num_labels: int | None
) -> tuple[dict[int, str], dict[str, int]]:
    """transformers' rules: id2label wins over num_labels (with a warning); default two labels LABEL_0, LABEL_1."""
    if id2label is None:
        count = 2 if num_labels is None else int(num_labels)
        if count < 0:
            raise ValueError(f"ViTHybridConfig.num_labels={count} must not be negative")
        defaults = {index: f"LABEL_{index}" for index in range(count)}
        return defaults, {label: index for index, label in defaults.items()}
    if num_labels is not None and num_labels != len(id2label):
        logger.warning("num_labels=%d disagrees with id2label (%d entries); using id2label", num_labels, len(id2label))
    try:
        labels = {int(index): str(label) for index, label in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError("ViTHybridConfig.id2label keys must be class indices (ints or digit strings)") from None
    if sorted(labels) != list(range(len(labels))):
        raise ValueError(f"ViTHybridConfig.id2label must have the keys 0..{len(labels) - 1}, one per class")
    ids = {str(label): int(index) for label, index in label2id.items()} if label2id else {
        label: index for index, label in labels.items()
    }
    return dict(sorted(labels.items())), ids


def vit_base_r50_s16_384_config(**overrides: Any) -> ViTHybridConfig:
    """The architecture of timm ``vit_base_r50_s16_384`` / ``google/vit-hybrid-base-bit-384`` (1000 classes).

    Used for timm-layout checkpoints that come without a ``config.json``.
    """
    settings: dict[str, Any] = {
        "backbone_config": _default_backbone_config(),
        "image_size": 384,
        "backbone_featmap_shape": [1, 1024, 24, 24],
        "num_labels": 1000,
    }
    settings.update(overrides)
    return ViTHybridConfig(**settings)
