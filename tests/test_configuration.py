"""model.configuration: transformers-compatible defaults, JSON round trips both ways, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from model.configuration import (
    SUPPORTED_ACTIVATIONS,
    BitConfig,
    ViTHybridConfig,
    vit_base_r50_s16_384_config,
)
from tests.reference import full_config_dict, small_config_dict

transformers = pytest.importorskip("transformers")

# Keys transformers writes that describe the network; both libraries must agree on all of them.
MODEL_KEYS = [
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "image_size",
    "patch_size", "num_channels", "backbone_featmap_shape", "qkv_bias", "id2label", "label2id",
]
BACKBONE_KEYS = [
    "num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type", "hidden_act", "global_padding",
    "num_groups", "drop_path_rate", "embedding_dynamic_padding", "output_stride", "width_factor", "out_features",
    "out_indices", "stage_names",
]


def _model_view(config_dict: dict) -> dict:
    """The network-defining part of a config dict, JSON-normalised (tuples to lists, int keys to strings)."""
    view = {key: config_dict[key] for key in MODEL_KEYS}
    view["backbone_config"] = {key: config_dict["backbone_config"][key] for key in BACKBONE_KEYS}
    return json.loads(json.dumps(view))


def test_defaults_match_transformers() -> None:
    ours = ViTHybridConfig()
    reference = transformers.ViTHybridConfig()
    assert _model_view(ours.to_dict()) == _model_view(reference.to_dict())
    assert ours.num_labels == reference.num_labels == 2
    assert _model_view_bit(BitConfig()) == _model_view_bit(transformers.BitConfig())


def _model_view_bit(config: object) -> dict:
    return json.loads(json.dumps({key: config.to_dict()[key] for key in BACKBONE_KEYS}))  # type: ignore[attr-defined]


@pytest.mark.parametrize("config_dict", [full_config_dict(), small_config_dict("preactivation", global_padding=None)])
def test_transformers_json_round_trip_both_ways(tmp_path: Path, config_dict: dict) -> None:
    reference = transformers.ViTHybridConfig(**config_dict)
    reference.save_pretrained(tmp_path / "from_transformers")
    ours = ViTHybridConfig.from_pretrained(tmp_path / "from_transformers")
    assert _model_view(ours.to_dict()) == _model_view(reference.to_dict())
    assert all(isinstance(key, int) for key in ours.id2label)

    ours.save_pretrained(tmp_path / "from_native")
    back = transformers.ViTHybridConfig.from_pretrained(tmp_path / "from_native")
    assert _model_view(back.to_dict()) == _model_view(reference.to_dict())
    assert ViTHybridConfig.from_pretrained(tmp_path / "from_native") == ours


def test_generic_transformers_keys_are_kept(tmp_path: Path) -> None:
    config_dict = {
        **full_config_dict(num_labels=3),
        "architectures": ["ViTHybridForImageClassification"],
        "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0",
        "problem_type": "single_label_classification",
        "chunk_size_feed_forward": 0,
        "_name_or_path": "google/vit-hybrid-base-bit-384",
    }
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    config = ViTHybridConfig.from_pretrained(tmp_path)
    assert config.architectures == ["ViTHybridForImageClassification"]
    written = json.loads(config.to_json_string())
    for key in ("torch_dtype", "transformers_version", "problem_type", "chunk_size_feed_forward", "_name_or_path"):
        assert written[key] == config_dict[key]
    assert config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert config.label2id == {"class_0": 0, "class_1": 1, "class_2": 2}


def test_json_file_helpers(tmp_path: Path) -> None:
    config = vit_base_r50_s16_384_config()
    path = tmp_path / "c.json"
    path.write_text(config.to_json_string())
    assert ViTHybridConfig.from_json_file(path) == config
    assert ViTHybridConfig.from_pretrained(path) == config  # a .json URI is read as is
    assert ViTHybridConfig.from_dict(config.to_dict()) == config


def test_released_architecture_numbers() -> None:
    config = vit_base_r50_s16_384_config()
    assert config.image_size_hw == (384, 384)
    assert config.grid_size == (24, 24) and config.num_patches == 576
    assert config.num_labels == 1000
    assert config.backbone_config.out_channels == 1024
    assert config.backbone_config.global_padding == "SAME"


def test_labels() -> None:
    assert ViTHybridConfig(num_labels=5).num_labels == 5
    assert ViTHybridConfig(num_labels=0).id2label == {}
    config = ViTHybridConfig(id2label={"0": "cat", "1": "dog"})
    assert config.id2label == {0: "cat", 1: "dog"} and config.label2id == {"cat": 0, "dog": 1}
    config.num_labels = 3
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(ValueError, match="id2label"):
        ViTHybridConfig(id2label={"0": "cat", "2": "dog"})


def test_bit_padding_is_case_insensitive_and_out_stage_alignment() -> None:
    assert BitConfig(global_padding="same").global_padding == "SAME"
    assert BitConfig(global_padding="Valid").global_padding == "VALID"
    assert BitConfig(global_padding=None).global_padding is None
    bit = BitConfig(depths=[3, 4, 9], out_indices=[2])
    assert bit.out_features == ["stage2"] and bit.out_stage_index == 2
    assert BitConfig(depths=[3, 4, 9], out_indices=[-1]).out_features == ["stage3"]
    assert BitConfig(depths=[3, 4, 9], out_features=["stem"]).out_indices == [0]
    assert BitConfig(depths=[3, 4, 9]).out_features == ["stage3"]
    with pytest.raises(ValueError, match="out_features"):
        BitConfig(depths=[3, 4, 9], out_features=["stage2"], out_indices=[3])
    with pytest.raises(ValueError, match="out_features"):
        BitConfig(depths=[3, 4, 9], out_features=["stage7"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backbone_config": {"layer_type": "resnet"}}, "layer_type"),
        ({"backbone_config": {"global_padding": "reflect", "depths": [3, 4, 9]}}, "global_padding"),
        ({"backbone_config": {"hidden_act": "prelu", "layer_type": "bottleneck"}}, "hidden_act"),
        ({"backbone_config": {"model_type": "resnet"}}, "model_type"),
        ({"backbone_config": {"depths": [3, 4, 9], "num_groups": 24}}, "num_groups"),
        ({"hidden_act": "xielu"}, "hidden_act"),
        ({"backbone": "resnet50", "backbone_config": None}, "backbone"),
        ({"use_timm_backbone": True}, "use_timm_backbone"),
        ({"use_pretrained_backbone": True}, "use_pretrained_backbone"),
        ({"backbone_kwargs": {"out_indices": [1]}}, "backbone_kwargs"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        ({"backbone_featmap_shape": [1, 512, 24, 24]}, "backbone_featmap_shape"),
        ({"num_channels": 1}, "num_channels"),
        ({"pruned_heads": {0: [1]}}, "pruned_heads"),
        ({"model_type": "vit"}, "model_type"),
    ],
)
def test_unsupported_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ViTHybridConfig(**kwargs)


def test_unsupported_value_lists_allowed_values() -> None:
    with pytest.raises(ValueError) as error:
        ViTHybridConfig(backbone_config={"layer_type": "resnet"})
    assert "'bottleneck'" in str(error.value) and "'preactivation'" in str(error.value)


def test_every_supported_activation_matches_transformers() -> None:
    import torch

    from model.modeling import Activation

    values = torch.linspace(-6, 6, 241)
    for name in SUPPORTED_ACTIVATIONS:
        expected = transformers.activations.ACT2FN[name](values.clone())
        torch.testing.assert_close(Activation(name)(values.clone()), expected, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(Activation(name)(values.clone(), inplace=True), expected, rtol=0, atol=1e-6, msg=name)


def test_from_pretrained_reads_s3(s3_bucket: str, tmp_path: Path) -> None:
    config = vit_base_r50_s16_384_config()
    config.save_pretrained(tmp_path)
    fsspec.filesystem("s3").put(str(tmp_path / "config.json"), f"{s3_bucket}/models/ckpt/config.json")
    assert ViTHybridConfig.from_pretrained(f"s3://{s3_bucket}/models/ckpt") == config
    with pytest.raises(FileNotFoundError, match="config.json"):
        ViTHybridConfig.from_pretrained(f"s3://{s3_bucket}/models/missing")
