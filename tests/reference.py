"""transformers 4.57 reference models on random weights, and small checkpoints in the real Hugging Face layout.

Test-only (transformers is a test dependency). Other test modules use it to make checkpoints without downloading::

    from tests.reference import small_config_dict, write_reference_checkpoint

    folder = write_reference_checkpoint(tmp_path / "ckpt", small_config_dict(num_labels=10, image_size=64))
    # folder holds config.json, model.safetensors and preprocessor_config.json (64x64, mean/std 0.5)

Random weights are drawn so that every parameter matters: norm weights are not all one, biases not all zero,
and linear layers preserve variance, so logits differ from image to image and the top-1 class varies. A parity test
on transformers' own init (LayerNorm 1/0, zero biases, std 0.02) would not notice a dropped bias.

Two quirks of transformers 4.57 are worked around here, never in the product: building a fresh
``ViTHybridForImageClassification`` fails in ``_init_weights`` (it zeroes ``mask_token``, which is None), and
``AutoConfig`` does not know ``vit-hybrid`` (so ``transformers.ViTHybridConfig`` is used directly).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fixtures.checkpoints import write_preprocessor_config

__all__ = [
    "build_reference_model",
    "feature_map_shape",
    "full_config_dict",
    "hf_to_timm_state_dict",
    "load_reference_model",
    "random_pixel_values",
    "randomize_",
    "reference_config",
    "small_config_dict",
    "write_preprocessor_config",
    "write_reference_checkpoint",
]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the test extra installs it
        raise ImportError("tests.reference needs transformers==4.57.6 (pip install -e '.[test]')") from error
    return transformers


# --------------------------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------------------------


def full_config_dict(num_labels: int = 1000) -> dict[str, Any]:
    """google/vit-hybrid-base-bit-384: BiT-R50 (3 stages) + ViT-B/16 at 384x384."""
    return {
        "backbone_config": {
            "global_padding": "same",
            "layer_type": "bottleneck",
            "depths": [3, 4, 9],
            "out_features": ["stage3"],
            "embedding_dynamic_padding": True,
        },
        "image_size": 384,
        "backbone_featmap_shape": [1, 1024, 24, 24],
        "id2label": {str(index): f"class_{index}" for index in range(num_labels)},
        "label2id": {f"class_{index}": index for index in range(num_labels)},
    }


def small_config_dict(
    layer_type: str = "bottleneck",
    num_labels: int = 10,
    image_size: int = 64,
    *,
    global_padding: str | None = "same",
    embedding_dynamic_padding: bool = True,
    depths: tuple[int, ...] = (2, 1, 2),
    out_features: tuple[str, ...] | None = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    patch_size: int = 1,
    hidden_act: str = "gelu",
    backbone_hidden_act: str = "relu",
) -> dict[str, Any]:
    """A tiny ViT Hybrid config dict (transformers' layout), fast enough for many parity cases.

    ``backbone_featmap_shape`` is computed by running transformers' BiT on a blank image, so the config is valid
    for every padding mode.
    """
    backbone = {
        "layer_type": layer_type,
        "global_padding": global_padding,
        "embedding_dynamic_padding": embedding_dynamic_padding,
        "embedding_size": 16,
        "hidden_sizes": [32, 64, 128][: len(depths)] + [128] * max(0, len(depths) - 3),
        "depths": list(depths),
        "num_groups": 4,
        "hidden_act": backbone_hidden_act,
        "out_features": list(out_features) if out_features else [f"stage{len(depths)}"],
    }
    config: dict[str, Any] = {
        "backbone_config": backbone,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": hidden_size * 4,
        "hidden_act": hidden_act,
        "image_size": image_size,
        "patch_size": patch_size,
        "id2label": {str(index): f"class_{index}" for index in range(num_labels)},
        "label2id": {f"class_{index}": index for index in range(num_labels)},
    }
    config["backbone_featmap_shape"] = feature_map_shape(config)
    return config


def reference_config(config_dict: Mapping[str, Any]) -> Any:
    """``transformers.ViTHybridConfig`` for a config dict (AutoConfig does not know ``vit-hybrid`` in 4.57)."""
    return _transformers().ViTHybridConfig(**copy.deepcopy(dict(config_dict)))


def feature_map_shape(config_dict: Mapping[str, Any]) -> list[int]:
    """``[1, channels, height, width]`` of transformers' BiT output for this config at its image size."""
    transformers = _transformers()
    backbone_config = transformers.BitConfig(**copy.deepcopy(config_dict["backbone_config"]))
    backbone = transformers.BitBackbone(backbone_config).eval()
    size = config_dict["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        features = backbone(torch.zeros(1, backbone_config.num_channels, height, width)).feature_maps[-1]
    return [1, *features.shape[1:]]


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _mask_token_init_fix() -> Iterator[None]:
    """transformers 4.57's ``_init_weights`` zeroes ``mask_token`` even when the model has none; skip that step."""
    modeling = _transformers().models.deprecated.vit_hybrid.modeling_vit_hybrid
    original = modeling.ViTHybridPreTrainedModel._init_weights

    def init_weights(self: Any, module: nn.Module) -> None:
        if isinstance(module, modeling.ViTHybridEmbeddings) and module.mask_token is None:
            std = self.config.initializer_range
            nn.init.trunc_normal_(module.position_embeddings.data, mean=0.0, std=std)
            nn.init.trunc_normal_(module.cls_token.data, mean=0.0, std=std)
            return
        original(self, module)

    modeling.ViTHybridPreTrainedModel._init_weights = init_weights
    try:
        yield
    finally:
        modeling.ViTHybridPreTrainedModel._init_weights = original


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a seeded, non-trivial random value (see the module docstring); returns the model.

    Works on transformers' and on the native model alike (same module types, same order of names).
    """
    generator = torch.Generator().manual_seed(seed)
    untouched = {name for name, _ in model.named_parameters()}

    def normal(tensor: Tensor, std: float, mean: float = 0.0) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + mean)
        untouched.difference_update(name for name, parameter in model.named_parameters() if parameter is tensor)

    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            normal(module.weight, 0.2, mean=1.0)
            normal(module.bias, 0.2)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            normal(module.weight, 1.0 / math.sqrt(fan_in))
            if module.bias is not None:
                normal(module.bias, 0.1)
        for parameter_name in ("cls_token", "position_embeddings"):
            parameter = getattr(module, parameter_name, None)
            if isinstance(parameter, nn.Parameter) and name.endswith("embeddings"):
                normal(parameter, 0.1)
    if untouched:
        raise AssertionError(f"randomize_ does not know how to set {sorted(untouched)}")
    return model


def build_reference_model(
    config_dict: Mapping[str, Any],
    *,
    seed: int = 0,
    base_model: bool = False,
    add_pooling_layer: bool = True,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """transformers' ``ViTHybridForImageClassification`` (or ``ViTHybridModel``) with :func:`randomize_` weights.

    ``attn_implementation="eager"`` is needed to get attention probabilities back (sdpa returns None for them).
    """
    transformers = _transformers()
    from transformers.modeling_utils import no_init_weights

    config = reference_config(config_dict)
    if attn_implementation != "sdpa":
        # Left unset, transformers picks sdpa for the ViT (its default) and eager for the BiT backbone.
        config._attn_implementation = attn_implementation
    # randomize_ sets every parameter, so transformers' own (slow, and in 4.57 failing) init is skipped.
    with no_init_weights():
        if base_model:
            model = transformers.ViTHybridModel(config, add_pooling_layer=add_pooling_layer)
        else:
            model = transformers.ViTHybridForImageClassification(config)
    return randomize_(model, seed).eval()


def load_reference_model(folder: str | Path, *, base_model: bool = False, attn_implementation: str = "sdpa") -> nn.Module:
    """transformers' ``from_pretrained`` for a folder; raises if any weight was missing, unexpected or mis-shaped."""
    transformers = _transformers()
    model_class = transformers.ViTHybridModel if base_model else transformers.ViTHybridForImageClassification
    # Only "eager" is passed on: an explicit "sdpa" would reach the BiT backbone, which rejects it.
    kwargs = {} if attn_implementation == "sdpa" else {"attn_implementation": attn_implementation}
    with _mask_token_init_fix():
        model, info = model_class.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise AssertionError(f"transformers could not load {folder} cleanly: {problems}")
    return model.eval()


def write_reference_checkpoint(
    folder: str | Path,
    config_dict: Mapping[str, Any],
    seed: int = 0,
    safe_serialization: bool = True,
    *,
    base_model: bool = False,
) -> Path:
    """Save a randomly initialised reference model with transformers' ``save_pretrained`` (+ preprocessor config).

    Returns the folder: ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``), ``preprocessor_config.json``.
    """
    folder = Path(folder)
    model = build_reference_model(config_dict, seed=seed, base_model=base_model)
    model.save_pretrained(str(folder), safe_serialization=safe_serialization)
    size = config_dict.get("image_size", 224)
    write_preprocessor_config(folder, size if isinstance(size, int) else size[0])
    return folder


def random_pixel_values(batch: int, image_size: int | tuple[int, int], seed: int = 0) -> Tensor:
    """Normalised pixels in [-1, 1] (what mean/std 0.5 makes of uint8 images): a colour cast, blobs and noise.

    Pure noise averages out over the patch grid, leaving every image with nearly the same CLS token; a per-image
    colour cast and smooth structure make images differ at the scales the model keeps.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    generator = torch.Generator().manual_seed(seed)
    cast = torch.rand(batch, 3, 1, 1, generator=generator)
    coarse = torch.rand(batch, 3, max(height // 16, 2), max(width // 16, 2), generator=generator)
    smooth = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.rand(batch, 3, height, width, generator=generator)
    return (0.4 * cast + 0.4 * smooth + 0.2 * noise) * 2.0 - 1.0


# --------------------------------------------------------------------------------------------------------------------
# timm layout
# --------------------------------------------------------------------------------------------------------------------


def _timm_rename_pairs(depths: list[int], num_hidden_layers: int) -> list[tuple[str, str]]:
    """(timm name, transformers name) pairs, as listed by transformers' convert_vit_hybrid_timm_to_pytorch.py."""
    backbone = "vit.embeddings.patch_embeddings.backbone.bit."
    pairs = [
        ("cls_token", "vit.embeddings.cls_token"),
        ("pos_embed", "vit.embeddings.position_embeddings"),
        ("patch_embed.proj.weight", "vit.embeddings.patch_embeddings.projection.weight"),
        ("patch_embed.proj.bias", "vit.embeddings.patch_embeddings.projection.bias"),
        ("patch_embed.backbone.stem.conv.weight", backbone + "embedder.convolution.weight"),
        ("patch_embed.backbone.stem.norm.weight", backbone + "embedder.norm.weight"),
        ("patch_embed.backbone.stem.norm.bias", backbone + "embedder.norm.bias"),
    ]
    for stage in range(len(depths)):
        for layer in range(depths[stage]):
            for part in ("conv1.weight", "norm1.weight", "norm1.bias", "conv2.weight", "norm2.weight", "norm2.bias",
                         "conv3.weight", "norm3.weight", "norm3.bias"):
                pairs.append((
                    f"patch_embed.backbone.stages.{stage}.blocks.{layer}.{part}",
                    f"{backbone}encoder.stages.{stage}.layers.{layer}.{part}",
                ))
        for part in ("downsample.conv.weight", "downsample.norm.weight", "downsample.norm.bias"):
            pairs.append((
                f"patch_embed.backbone.stages.{stage}.blocks.0.{part}",
                f"{backbone}encoder.stages.{stage}.layers.0.{part}",
            ))
    for index in range(num_hidden_layers):
        layer = f"vit.encoder.layer.{index}."
        for timm_part, hf_part in (
            ("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"), ("norm2", "layernorm_after"),
            ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
        ):
            for kind in ("weight", "bias"):
                pairs.append((f"blocks.{index}.{timm_part}.{kind}", f"{layer}{hf_part}.{kind}"))
    pairs += [
        ("norm.weight", "vit.layernorm.weight"),
        ("norm.bias", "vit.layernorm.bias"),
        ("head.weight", "classifier.weight"),
        ("head.bias", "classifier.bias"),
    ]
    return pairs


def hf_to_timm_state_dict(state_dict: Mapping[str, Tensor], config_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Invert the published timm -> transformers conversion (bottleneck BiT): what timm's state_dict() would hold."""
    depths = list(config_dict["backbone_config"]["depths"])
    num_layers = int(config_dict.get("num_hidden_layers", 12))
    remaining = dict(state_dict)
    timm: dict[str, Tensor] = {}
    for timm_name, hf_name in _timm_rename_pairs(depths, num_layers):
        timm[timm_name] = remaining.pop(hf_name).clone()
    for index in range(num_layers):
        prefix = f"vit.encoder.layer.{index}.attention.attention."
        for kind in ("weight", "bias"):
            parts = [remaining.pop(f"{prefix}{part}.{kind}") for part in ("query", "key", "value")]
            timm[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0).clone()
    if remaining:
        raise AssertionError(f"no timm name for: {sorted(remaining)}")
    return timm
