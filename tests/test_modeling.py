"""Parity of the native model with transformers 4.57 on random weights, plus its own inference machinery.

Every comparison loads the reference's weights through files written by transformers' ``save_pretrained`` (or
by timm's layout), so loading is tested along with the arithmetic. fp32 tolerances are what the model achieves on
this suite's inputs, with margin (measured figures beside the constants below).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model.configuration import ViTHybridConfig
from model.modeling import (
    ImageClassifierOutput,
    ViTHybridForImageClassification,
    ViTHybridModel,
    WeightStandardizedConv2d,
    standardize_weight,
)
from tests.reference import (
    build_reference_model,
    full_config_dict,
    hf_to_timm_state_dict,
    load_reference_model,
    random_pixel_values,
    small_config_dict,
    write_reference_checkpoint,
)

pytest.importorskip("transformers")

# Max |ours - reference| in fp32 on a 2-core AVX2 CPU (measured at a487fd4 over every comparison in this file):
#   small configs, outputs (logits, embeddings, pooler, attentions, gradients): at most 1.3e-5 (logits 8.6e-6)
#   small configs, hidden states (values up to ~30, so a few float32 ulps):    at most 9.8e-5
#   full size 384x384 (24 backbone blocks, 12 layers): logits 3.4e-5, embedding 2.8e-5, hidden states 1.8e-5
# The output tolerance was 1e-4 (7x what the model achieves), so a wrong epsilon failed it by only 1.2x; hidden
# states stay at 1e-4, which a GroupNorm epsilon of 1e-6 instead of 1e-5 already exceeds 2.9x.
ATOL = 3e-5  # small-config outputs: 2.3x the largest measured difference
HIDDEN_STATE_ATOL = 1e-4  # hidden states of any size and last_hidden_state
# Full-size logits and embedding: 3.4e-5 measured alone, but 9.4e-5 when the test ran late in the full suite (torch's
# thread count and kernel choice left by earlier tests change the summation order through 12 layers). The project's
# standard, 1e-4, is the bound; the small configurations above keep the tight 3e-5 that catches a wrong epsilon.
FULL_SIZE_ATOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", atol: float | None = None) -> None:
    """Max abs difference within ``atol``: by default :data:`ATOL`, or :data:`HIDDEN_STATE_ATOL` for hidden states."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if atol is None:
        atol = HIDDEN_STATE_ATOL if "hidden_state" in what else ATOL
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= atol, f"{what}: max abs difference {difference:.3g} > {atol}"


def reference_outputs(reference: torch.nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    with torch.no_grad():
        return reference(pixel_values, **kwargs)


# Small configurations: both BiT layer types, every padding mode that runs, strides, dilation, patching.
SMALL_CASES = {
    "bottleneck-same-dynamic": dict(layer_type="bottleneck"),
    "bottleneck-none-dynamic": dict(layer_type="bottleneck", global_padding=None, embedding_dynamic_padding=True),
    "preact-none-static": dict(layer_type="preactivation", global_padding=None, embedding_dynamic_padding=False),
    "preact-same-dynamic": dict(layer_type="preactivation", global_padding="same", embedding_dynamic_padding=True),
    "preact-same-static": dict(layer_type="preactivation", global_padding="same", embedding_dynamic_padding=False),
    "bottleneck-odd-size-patch2": dict(layer_type="bottleneck", image_size=70, patch_size=2),
    "bottleneck-stage2-output": dict(layer_type="bottleneck", out_features=("stage2",)),
    "bottleneck-quick-gelu": dict(layer_type="bottleneck", hidden_act="gelu_new", backbone_hidden_act="silu"),
}


def _small_dict(name: str) -> dict:
    return small_config_dict(**SMALL_CASES[name])


@pytest.fixture(scope="module")
def dilated_config_dict() -> dict:
    """output_stride 8: the third stage keeps stride 1 and dilates its 3x3 convs instead."""
    config = small_config_dict("bottleneck")
    config["backbone_config"]["output_stride"] = 8
    from tests.reference import feature_map_shape

    config["backbone_featmap_shape"] = feature_map_shape(config)
    return config


# --------------------------------------------------------------------------------------------------------------------
# Full size: the released architecture at 384x384
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    config_dict = full_config_dict()
    reference = build_reference_model(config_dict, seed=7)
    folder = tmp_path_factory.mktemp("full") / "hf"
    reference.save_pretrained(str(folder))
    return {"config_dict": config_dict, "reference": reference, "folder": folder}


def test_full_size_parity_384(full_size: dict[str, Any]) -> None:
    """Logits and embedding within 1e-4 of the reference; hidden states within 1e-4 of the reference run on the
    same memory format.

    The native backbone runs channels-last, and oneDNN's channels-last convolutions round differently from its
    NCHW ones. Sixteen GroupNorm'd residual blocks on random weights amplify that to ~1e-3 in the patch
    embeddings: the reference itself moves that much when handed a channels-last tensor. Given one, its hidden
    states agree with ours within 1e-4; the head sees through it either way.
    """
    reference = full_size["reference"]
    model = ViTHybridForImageClassification.from_pretrained(full_size["folder"])
    pixel_values = random_pixel_values(1, 384, seed=11)
    expected = reference_outputs(reference, pixel_values)
    expected_embedding = reference_outputs(reference.vit, pixel_values).last_hidden_state[:, 0]
    channels_last = pixel_values.contiguous(memory_format=torch.channels_last)
    expected_same_layout = reference_outputs(reference, channels_last, output_hidden_states=True)
    with torch.inference_mode():
        fast = model(pixel_values)  # the CLS-only inference path
        full = model(pixel_values, output_hidden_states=True)
    assert_close(fast.logits, expected.logits, "logits", atol=FULL_SIZE_ATOL)
    assert_close(fast.embedding, expected_embedding, "embedding", atol=FULL_SIZE_ATOL)
    assert_close(full.logits, expected.logits, "logits with hidden states", atol=FULL_SIZE_ATOL)
    assert len(full.hidden_states) == 13
    for index, (ours, theirs) in enumerate(zip(full.hidden_states, expected_same_layout.hidden_states)):
        assert_close(ours, theirs, f"hidden_states[{index}]")


def test_full_size_timm_layout_without_config(full_size: dict[str, Any], tmp_path: Path) -> None:
    """A timm vit_base_r50_s16_384 state dict alone in a folder loads with the default architecture."""
    reference = full_size["reference"]
    timm_state = hf_to_timm_state_dict(reference.state_dict(), full_size["config_dict"])
    save_file({name: tensor.contiguous() for name, tensor in timm_state.items()}, str(tmp_path / "model.safetensors"))
    model = ViTHybridForImageClassification.from_pretrained(tmp_path)
    assert model.checkpoint_info.layout == "timm"
    assert model.config.num_labels == 1000 and model.config.image_size_hw == (384, 384)
    pixel_values = random_pixel_values(1, 384, seed=12)
    with torch.inference_mode():
        logits = model(pixel_values).logits
    assert_close(logits, reference_outputs(reference, pixel_values).logits, "timm-layout logits", atol=FULL_SIZE_ATOL)


# --------------------------------------------------------------------------------------------------------------------
# Small configurations
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_small_classifier_parity(case: str, safe_serialization: bool, tmp_path: Path) -> None:
    config_dict = _small_dict(case)
    folder = write_reference_checkpoint(tmp_path, config_dict, seed=3, safe_serialization=safe_serialization)
    reference = load_reference_model(folder)
    model = ViTHybridForImageClassification.from_pretrained(folder)
    assert model.checkpoint_info.format == ("safetensors" if safe_serialization else "pytorch")
    pixel_values = random_pixel_values(4, config_dict["image_size"], seed=5)
    expected = reference_outputs(reference, pixel_values, output_hidden_states=True)
    expected_embedding = reference_outputs(reference.vit, pixel_values).last_hidden_state[:, 0]
    with torch.inference_mode():
        fast = model(pixel_values)
        full = model(pixel_values, output_hidden_states=True)
        embedded = model.embed(pixel_values)
    assert_close(fast.logits, expected.logits, "logits")
    assert_close(fast.embedding, expected_embedding, "embedding")
    assert_close(embedded, expected_embedding, "embed()")
    for index, (ours, theirs) in enumerate(zip(full.hidden_states, expected.hidden_states, strict=True)):
        assert_close(ours, theirs, f"hidden_states[{index}]")
    assert_close(full.embedding, expected_embedding, "embedding with hidden states")


def test_random_weights_are_not_degenerate() -> None:
    """Parity on near-constant outputs would prove little: logits must vary per image, top-1 too."""
    config_dict = small_config_dict("bottleneck")
    reference = build_reference_model(config_dict, seed=3)
    logits = reference_outputs(reference, random_pixel_values(16, 64, seed=5)).logits
    assert logits.std(dim=0).mean() > 0.1
    assert len(set(logits.argmax(-1).tolist())) >= 2


def test_dilated_backbone_parity(dilated_config_dict: dict, tmp_path: Path) -> None:
    folder = write_reference_checkpoint(tmp_path, dilated_config_dict, seed=4)
    reference = load_reference_model(folder)
    model = ViTHybridForImageClassification.from_pretrained(folder)
    pixel_values = random_pixel_values(2, 64, seed=6)
    with torch.inference_mode():
        logits = model(pixel_values).logits
    assert_close(logits, reference_outputs(reference, pixel_values).logits, "dilated logits")


def test_base_model_parity_with_pooler(tmp_path: Path) -> None:
    config_dict = _small_dict("preact-none-static")
    folder = write_reference_checkpoint(tmp_path, config_dict, seed=8, base_model=True)
    reference = load_reference_model(folder, base_model=True)
    model = ViTHybridModel.from_pretrained(folder)
    pixel_values = random_pixel_values(3, 64, seed=9)
    expected = reference_outputs(reference, pixel_values, output_hidden_states=True)
    with torch.inference_mode():
        ours = model(pixel_values, output_hidden_states=True)
        as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
    assert_close(ours.last_hidden_state, expected.last_hidden_state, "last_hidden_state")
    assert_close(ours.pooler_output, expected.pooler_output, "pooler_output")
    for index, (mine, theirs) in enumerate(zip(ours.hidden_states, expected.hidden_states, strict=True)):
        assert_close(mine, theirs, f"hidden_states[{index}]")
    expected_tuple = reference_outputs(reference, pixel_values, output_hidden_states=True, return_dict=False)
    assert len(as_tuple) == len(expected_tuple) == 3
    assert_close(as_tuple[1], expected_tuple[1], "tuple pooler_output")


def test_attentions_match_eager_reference(tmp_path: Path) -> None:
    config_dict = _small_dict("bottleneck-same-dynamic")
    folder = write_reference_checkpoint(tmp_path, config_dict, seed=10)
    reference = load_reference_model(folder, attn_implementation="eager")
    model = ViTHybridForImageClassification.from_pretrained(folder)
    pixel_values = random_pixel_values(2, 64, seed=2)
    expected = reference_outputs(reference, pixel_values, output_attentions=True)
    with torch.inference_mode():
        ours = model(pixel_values, output_attentions=True)
    assert_close(ours.logits, expected.logits, "logits with attentions")
    assert len(ours.attentions) == len(expected.attentions) == config_dict["num_hidden_layers"]
    for index, (mine, theirs) in enumerate(zip(ours.attentions, expected.attentions)):
        assert_close(mine, theirs, f"attentions[{index}]")
        torch.testing.assert_close(mine.sum(-1), torch.ones_like(mine.sum(-1)))


def test_classification_checkpoint_into_base_model_warns_about_pooler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_dict = _small_dict("bottleneck-same-dynamic")
    folder = write_reference_checkpoint(tmp_path, config_dict, seed=12)
    reference = load_reference_model(folder)
    with caplog.at_level(logging.WARNING, logger="model.modeling"):
        model = ViTHybridModel.from_pretrained(folder)
    assert any("pooler" in record.getMessage() for record in caplog.records)
    pixel_values = random_pixel_values(2, 64, seed=3)
    with torch.inference_mode():
        ours = model(pixel_values)
    assert_close(ours.last_hidden_state, reference_outputs(reference.vit, pixel_values).last_hidden_state, "bare model")
    assert ours.pooler_output.shape == (2, config_dict["hidden_size"])
    without_pooler = ViTHybridModel.from_pretrained(folder, add_pooling_layer=False)
    with torch.inference_mode():
        bare = without_pooler(pixel_values)
    assert bare.pooler_output is None
    assert torch.equal(bare.last_hidden_state, ours.last_hidden_state)


def test_timm_layout_small_with_config_override(tmp_path: Path) -> None:
    config_dict = _small_dict("bottleneck-same-dynamic")
    reference = build_reference_model(config_dict, seed=13)
    timm_state = hf_to_timm_state_dict(reference.state_dict(), config_dict)
    save_file({name: tensor.contiguous() for name, tensor in timm_state.items()}, str(tmp_path / "model.safetensors"))
    model = ViTHybridForImageClassification.from_pretrained(tmp_path, config=ViTHybridConfig.from_dict(config_dict))
    pixel_values = random_pixel_values(3, 64, seed=1)
    with torch.inference_mode():
        logits = model(pixel_values).logits
    assert_close(logits, reference_outputs(reference, pixel_values).logits, "timm logits")


# --------------------------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_native_save_loads_in_transformers_and_back(tmp_path: Path, safe_serialization: bool) -> None:
    config_dict = _small_dict("preact-same-dynamic")
    source = write_reference_checkpoint(tmp_path / "source", config_dict, seed=14)
    model = ViTHybridForImageClassification.from_pretrained(source)
    model.save_pretrained(tmp_path / "native", safe_serialization=safe_serialization)

    reference = load_reference_model(tmp_path / "native")  # raises on any missing/unexpected key
    reloaded = ViTHybridForImageClassification.from_pretrained(tmp_path / "native")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    pixel_values = random_pixel_values(3, 64, seed=15)
    with torch.inference_mode():
        ours = model(pixel_values).logits
        again = reloaded(pixel_values).logits
    assert torch.equal(ours, again)
    assert_close(ours, reference_outputs(reference, pixel_values).logits, "transformers on native save")


def test_fresh_native_model_saves_for_transformers(tmp_path: Path) -> None:
    """A model built from a config (our init, not a checkpoint) is a valid transformers checkpoint too."""
    config = ViTHybridConfig.from_dict(_small_dict("bottleneck-same-dynamic"))
    model = ViTHybridForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    reference = load_reference_model(tmp_path)
    pixel_values = random_pixel_values(2, 64, seed=16)
    with torch.inference_mode():
        ours = model(pixel_values).logits
    assert_close(ours, reference_outputs(reference, pixel_values).logits, "fresh model")


def test_loads_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    config_dict = _small_dict("bottleneck-same-dynamic")
    folder = write_reference_checkpoint(tmp_path / "ckpt", config_dict, seed=17)
    fsspec.filesystem("s3").put(str(folder), f"{s3_bucket}/models/ckpt", recursive=True)
    remote = ViTHybridForImageClassification.from_pretrained(f"s3://{s3_bucket}/models/ckpt")
    local = ViTHybridForImageClassification.from_pretrained(folder)
    assert remote.checkpoint_info.sha256 == local.checkpoint_info.sha256
    assert remote.checkpoint_info.weights_file == f"s3://{s3_bucket}/models/ckpt/model.safetensors"
    pixel_values = random_pixel_values(2, 64, seed=18)
    with torch.inference_mode():
        assert torch.equal(remote(pixel_values).logits, local(pixel_values).logits)


# --------------------------------------------------------------------------------------------------------------------
# Outputs, inputs, position embeddings
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pair() -> tuple[torch.nn.Module, ViTHybridForImageClassification, dict]:
    config_dict = _small_dict("bottleneck-same-dynamic")
    reference = build_reference_model(config_dict, seed=21)
    model = ViTHybridForImageClassification(ViTHybridConfig.from_dict(config_dict))
    model.load_state_dict(reference.state_dict())
    return reference, model.eval(), config_dict


def test_output_access_like_transformers(small_pair: tuple) -> None:
    reference, model, _ = small_pair
    pixel_values = random_pixel_values(2, 64, seed=22)
    with torch.inference_mode():
        output = model(pixel_values, output_hidden_states=True)
        as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
    expected = reference_outputs(reference, pixel_values, output_hidden_states=True, return_dict=False)
    assert isinstance(output, ImageClassifierOutput)
    assert output["logits"] is output.logits and output[0] is output.logits
    assert output.to_tuple()[-1] is output.embedding
    assert "embedding" in output and list(output.keys()) == ["logits", "hidden_states", "embedding"]
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected) == 2  # (logits, hidden_states)
    assert_close(as_tuple[0], expected[0], "tuple logits")


def test_input_checks(small_pair: tuple) -> None:
    _, model, _ = small_pair
    with pytest.raises(ValueError, match="doesn't match"):
        model(random_pixel_values(1, 96, seed=0))
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 1, 64, 64))


def test_interpolate_pos_encoding(small_pair: tuple) -> None:
    _, model, config_dict = small_pair
    native = random_pixel_values(2, 64, seed=23)
    with torch.inference_mode():
        plain = model(native).logits
        flagged = model(native, interpolate_pos_encoding=True).logits
    assert torch.equal(plain, flagged)  # same grid: no resampling at all

    larger = random_pixel_values(2, 96, seed=24)
    with torch.inference_mode():
        output = model(larger, interpolate_pos_encoding=True, output_hidden_states=True)
        embeddings = model.vit.embeddings
        patches, grid = embeddings.patch_embeddings(larger, interpolate_pos_encoding=True)
    assert grid == (6, 6)  # 96 px / 16 with TF 'SAME' rounding; transformers 4.57 would wrongly aim for 96x96
    assert output.hidden_states[0].shape == (2, 1 + 36, config_dict["hidden_size"])
    # Manual computation: bicubic, align_corners=False, from the trained 4x4 grid to the 6x6 feature grid.
    position = embeddings.position_embeddings.detach()
    dim = position.shape[-1]
    patch_position = position[:, 1:].reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
    patch_position = F.interpolate(patch_position, size=(6, 6), mode="bicubic", align_corners=False)
    manual_position = torch.cat([position[:, :1], patch_position.permute(0, 2, 3, 1).reshape(1, 36, dim)], dim=1)
    manual = torch.cat([embeddings.cls_token.detach().expand(2, -1, -1), patches], dim=1) + manual_position
    torch.testing.assert_close(output.hidden_states[0], manual, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Inference machinery: weight-standardisation cache, memory format, dtypes, autograd
# --------------------------------------------------------------------------------------------------------------------


def _convs(model: torch.nn.Module) -> list[WeightStandardizedConv2d]:
    return [module for module in model.modules() if isinstance(module, WeightStandardizedConv2d)]


def test_weight_standardisation_cache(small_pair: tuple) -> None:
    _, model, _ = small_pair
    model = copy.deepcopy(model).eval()
    pixel_values = random_pixel_values(2, 64, seed=25)
    conv = _convs(model)[0]
    with torch.no_grad():
        cached = model(pixel_values).logits
        assert conv.cached_weight is not None
        assert torch.equal(conv.cached_weight, standardize_weight(conv.weight, conv.eps))
        again = model(pixel_values).logits
        model.train()  # dropout and drop-path are 0: train mode differs only by standardising every call
        assert all(module.cached_weight is None for module in _convs(model))
        uncached = model(pixel_values).logits
        model.eval()
    assert torch.equal(cached, again) and torch.equal(cached, uncached)

    # An in-place write to a weight (what load_state_dict does) must invalidate that conv's cache.
    with torch.no_grad():
        conv.weight.mul_(-1.0).add_(0.01)
        changed = model(pixel_values).logits
        model.train()
        changed_uncached = model(pixel_values).logits
        model.eval()
    assert not torch.equal(changed, cached)
    assert torch.equal(changed, changed_uncached)

    state = {name: tensor.clone() for name, tensor in small_pair[1].state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, cached)


def test_cache_is_bypassed_when_weights_need_gradients(small_pair: tuple) -> None:
    _, model, _ = small_pair
    model = copy.deepcopy(model).eval()
    conv = _convs(model)[0]
    pixel_values = random_pixel_values(1, 64, seed=26)
    with torch.no_grad():
        model(pixel_values)  # fills the cache
    model(pixel_values).logits.sum().backward()
    eval_gradient = conv.weight.grad.clone()
    assert eval_gradient.abs().sum() > 0  # the cached (constant) weight would give no gradient at all
    model.zero_grad()
    model.train()
    model(pixel_values).logits.sum().backward()
    torch.testing.assert_close(eval_gradient, conv.weight.grad, rtol=0, atol=0)


def test_channels_last_model_and_dtype_changes(small_pair: tuple) -> None:
    _, model, _ = small_pair
    pixel_values = random_pixel_values(4, 64, seed=27)
    with torch.inference_mode():
        expected = model(pixel_values).logits
        converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
        assert_close(converted(pixel_values).logits, expected, "channels_last model")
        conv = _convs(converted)[0]
        converted.to(torch.bfloat16)
        bf16 = converted(pixel_values).logits
        assert conv.cached_weight.dtype == torch.bfloat16  # recomputed for the new weight tensor
        converted.to(torch.float32)
        converted(pixel_values)
        assert conv.cached_weight.dtype == torch.float32
        assert torch.equal(conv.cached_weight, standardize_weight(conv.weight, conv.eps))
    assert bf16.dtype == torch.bfloat16


def test_bf16_agrees_with_fp32_on_top1(small_pair: tuple) -> None:
    _, model, _ = small_pair
    pixel_values = random_pixel_values(16, 64, seed=28)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.inference_mode():
        fp32_logits = model(pixel_values).logits
        bf16_logits = bf16(pixel_values).logits
        bf16_embedding = bf16.embed(pixel_values)
    assert bf16_logits.dtype == torch.bfloat16 and bf16_embedding.dtype == torch.bfloat16
    agreement = (bf16_logits.float().argmax(-1) == fp32_logits.argmax(-1)).float().mean().item()
    assert agreement >= 0.75, f"bf16 top-1 agrees with fp32 on only {agreement:.0%}"
    assert (bf16_logits.float() - fp32_logits).abs().max() < 0.25


def test_from_pretrained_dtype_and_eval(tmp_path: Path) -> None:
    folder = write_reference_checkpoint(tmp_path, _small_dict("bottleneck-same-dynamic"), seed=29)
    model = ViTHybridForImageClassification.from_pretrained(folder, dtype=torch.bfloat16, device="cpu")
    assert not model.training
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.bfloat16}
    assert all(not tensor.is_meta for tensor in model.state_dict().values())


def test_training_gradients_match_reference(small_pair: tuple) -> None:
    """In-place activations and adds must not disturb autograd: compare gradients in train mode."""
    reference, model, _ = small_pair
    reference = copy.deepcopy(reference).train()
    model = copy.deepcopy(model).train()
    pixel_values = random_pixel_values(2, 64, seed=30)
    reference(pixel_values).logits.square().sum().backward()
    model(pixel_values).logits.square().sum().backward()
    ours = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        scale = parameter.grad.abs().max().item() + 1e-6
        difference = (ours[name].grad - parameter.grad).abs().max().item()
        assert difference <= 1e-3 * scale + 1e-5, f"{name}: gradient differs by {difference:.3g} (scale {scale:.3g})"


def test_input_gradients_in_eval_mode(small_pair: tuple) -> None:
    reference, model, _ = small_pair
    pixel_values = random_pixel_values(1, 64, seed=31)
    ours_input = pixel_values.clone().requires_grad_()
    theirs_input = pixel_values.clone().requires_grad_()
    model(ours_input).logits.max().backward()
    reference(theirs_input).logits.max().backward()
    assert_close(ours_input.grad, theirs_input.grad, "input gradients")
