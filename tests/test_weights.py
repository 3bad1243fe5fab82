"""model.weights: finding and reading checkpoint files safely, key layouts, and one clear error per bad checkpoint."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.modeling import ViTHybridForImageClassification
from model.weights import (
    CheckpointError,
    check_state_dict,
    checkpoint_fingerprint,
    detect_layout,
    find_weights_file,
    load_checkpoint,
    timm_to_hf,
    write_sha256_sidecar,
)
from tests.reference import (
    build_reference_model,
    hf_to_timm_state_dict,
    random_pixel_values,
    small_config_dict,
    write_reference_checkpoint,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def config_dict() -> dict:
    return small_config_dict("bottleneck")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, config_dict: dict) -> Path:
    return write_reference_checkpoint(tmp_path_factory.mktemp("ckpt"), config_dict, seed=1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reads_safetensors_folder_with_provenance(checkpoint: Path) -> None:
    state_dict, info = load_checkpoint(checkpoint)
    expected = load_file(str(checkpoint / "model.safetensors"))
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[name], expected[name]) for name in expected)
    assert info.uri == str(checkpoint)
    assert info.weights_file == str(checkpoint / "model.safetensors")
    assert info.sha256 == _sha256(checkpoint / "model.safetensors")
    assert (info.layout, info.format) == ("hf", "safetensors")
    assert info.config_uri == str(checkpoint / "config.json")


def test_prefers_safetensors_and_reads_bin(tmp_path: Path, config_dict: dict) -> None:
    folder = write_reference_checkpoint(tmp_path, config_dict, seed=1, safe_serialization=False)
    state_dict, info = load_checkpoint(folder)
    assert info.format == "pytorch" and info.weights_file.endswith("pytorch_model.bin")
    assert info.sha256 == _sha256(folder / "pytorch_model.bin")
    save_file({name: tensor.contiguous() for name, tensor in state_dict.items()}, str(folder / "model.safetensors"))
    assert load_checkpoint(folder)[1].format == "safetensors"


def test_weights_file_uri_is_accepted(checkpoint: Path) -> None:
    weights, config = find_weights_file(str(checkpoint / "model.safetensors"))
    assert weights == str(checkpoint / "model.safetensors") and config == str(checkpoint / "config.json")
    _, info = load_checkpoint(checkpoint / "model.safetensors")
    assert info.sha256 == _sha256(checkpoint / "model.safetensors")


def test_sharded_safetensors(tmp_path: Path, config_dict: dict, checkpoint: Path) -> None:
    reference = build_reference_model(config_dict, seed=1)
    reference.save_pretrained(str(tmp_path), max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded, info = load_checkpoint(tmp_path)
    whole, _ = load_checkpoint(checkpoint)
    assert sharded.keys() == whole.keys()
    assert all(torch.equal(sharded[name], whole[name]) for name in whole)
    assert info.weights_file.endswith("model.safetensors.index.json")


def test_reads_from_s3_with_the_same_digest(s3_bucket: str, checkpoint: Path) -> None:
    fsspec.filesystem("s3").put(str(checkpoint), f"{s3_bucket}/models/ckpt", recursive=True)
    state_dict, info = load_checkpoint(f"s3://{s3_bucket}/models/ckpt/")
    assert info.sha256 == _sha256(checkpoint / "model.safetensors")
    assert info.config_uri == f"s3://{s3_bucket}/models/ckpt/config.json"
    assert len(state_dict) == len(load_file(str(checkpoint / "model.safetensors")))


def test_transient_read_errors_are_retried(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Object-store reads (here fsspec's in-memory filesystem, read through ``cat_file`` like S3) are retried."""
    import model.storage as storage

    memory = fsspec.filesystem("memory")
    memory.put(str(checkpoint), "/flaky-ckpt", recursive=True)
    filesystem_class = type(memory)
    original = filesystem_class.cat_file
    failures = {"left": 2}

    def flaky(self: object, path: str, *args: object, **kwargs: object) -> bytes:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionResetError("connection reset by peer")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(filesystem_class, "cat_file", flaky)
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    try:
        _, info = load_checkpoint("memory://flaky-ckpt")
    finally:
        memory.rm("/flaky-ckpt", recursive=True)
    assert failures["left"] == 0 and info.sha256 == _sha256(checkpoint / "model.safetensors")


def test_local_safetensors_are_mapped_then_owned(tmp_path: Path, checkpoint: Path) -> None:
    """The local fast path (file mapped, each tensor cloned) gives what the bytes path gives, in memory of its own:
    rewriting the file afterwards changes nothing, and the tensors are writable. ``digest=False`` skips the hash."""
    folder = tmp_path / "ckpt"
    fsspec.filesystem("file").put(str(checkpoint), str(folder), recursive=True)
    state_dict, info = load_checkpoint(folder, digest=False)
    assert info.sha256 is None and info.format == "safetensors"
    expected = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(state_dict[name], expected[name]) for name in expected)
    save_file({name: torch.zeros_like(tensor) for name, tensor in expected.items()}, str(folder / "model.safetensors"))
    assert all(torch.equal(state_dict[name], expected[name]) for name in expected)
    name = next(iter(state_dict))
    state_dict[name].add_(1)  # owned, writable storage
    assert load_checkpoint(folder)[1].sha256 == _sha256(folder / "model.safetensors")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(folder, digest=False)


def test_missing_things_name_the_uri(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors") as error:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(error.value)


class NotATensor:
    """A picklable object that weights_only loading must refuse to construct."""

    def __init__(self) -> None:
        self.payload = "anything"


def test_bin_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(2), "extra": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load") as error:
        load_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(error.value)


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path: Path, checkpoint: Path) -> None:
    state_dict = load_file(str(checkpoint / "model.safetensors"))
    wrapped = {"state_dict": {f"module.{name}": tensor for name, tensor in state_dict.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "pytorch_model.bin")
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.keys() == state_dict.keys()


def test_timm_layout_round_trip(config_dict: dict) -> None:
    reference_state = build_reference_model(config_dict, seed=2).state_dict()
    timm_state = hf_to_timm_state_dict(reference_state, config_dict)
    assert "blocks.0.attn.qkv.weight" in timm_state and "patch_embed.backbone.stem.conv.weight" in timm_state
    assert detect_layout(timm_state) == "timm" and detect_layout(reference_state) == "hf"
    converted = timm_to_hf(timm_state)
    assert converted.keys() == reference_state.keys()
    assert all(torch.equal(converted[name], reference_state[name]) for name in reference_state)


def test_unknown_layout_is_reported() -> None:
    with pytest.raises(CheckpointError, match="unknown key layout"):
        detect_layout({"resnet.conv1.weight": torch.zeros(1)}, "s3://b/x")


def test_one_error_lists_missing_unexpected_and_misshaped_keys(tmp_path: Path, checkpoint: Path) -> None:
    state_dict = load_file(str(checkpoint / "model.safetensors"))
    del state_dict["vit.layernorm.bias"]
    state_dict["vit.encoder.layer.9.attention.attention.query.weight"] = torch.zeros(2, 2)
    state_dict["classifier.weight"] = torch.zeros(7, 32)
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError) as error:
        ViTHybridForImageClassification.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "missing keys (1): vit.layernorm.bias" in message
    assert "unexpected keys (1): vit.encoder.layer.9.attention.attention.query.weight" in message
    assert "classifier.weight: expected (10, 32), found (7, 32)" in message


def test_check_state_dict_passes_on_a_match() -> None:
    check_state_dict({"a": (2,)}, {"a": torch.zeros(2)}, "mem://x")


def test_timm_folder_with_config_json(tmp_path: Path, config_dict: dict) -> None:
    """A timm state dict next to a transformers config.json: the config describes the architecture."""
    reference = build_reference_model(config_dict, seed=3)
    timm_state = hf_to_timm_state_dict(reference.state_dict(), config_dict)
    save_file({name: tensor.contiguous() for name, tensor in timm_state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    model = ViTHybridForImageClassification.from_pretrained(tmp_path)
    pixel_values = random_pixel_values(2, 64, seed=4)
    with torch.inference_mode():
        ours = model(pixel_values).logits
        theirs = reference(pixel_values).logits
    assert (ours - theirs).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint's identity without reading its weights (issue 11: no full read on the driver).


def _same_shapes_other_values(folder: Path) -> None:
    """Rewrite model.safetensors with every tensor changed but every name, dtype and shape kept (same header)."""
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({name: tensor + 1 for name, tensor in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def _copy_checkpoint(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_fingerprint_reads_only_the_header_and_detects_a_rewritten_file(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model import weights

    folder = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    size = (folder / "model.safetensors").stat().st_size
    reads: list[tuple[int | None, int | None]] = []
    original = weights._read_range

    def counting(uri: str, start: int, end: int, storage_options: object) -> bytes:
        reads.append((start, end))
        return original(uri, start, end, storage_options)

    monkeypatch.setattr(weights, "_read_range", counting)
    first = checkpoint_fingerprint(folder)
    assert (first.basis, first.layout, first.format) == ("header+size+version", "hf", "safetensors")
    assert first.weights_file.endswith("model.safetensors") and first.config_uri.endswith("config.json")
    assert sum(end - start for start, end in reads) < size / 10  # the header, not the weights
    assert checkpoint_fingerprint(folder).digest == first.digest  # stable while nothing changes

    time.sleep(0.05)  # a new modification time even on coarse-grained clocks
    _same_shapes_other_values(folder)
    assert (folder / "model.safetensors").stat().st_size == size
    assert checkpoint_fingerprint(folder).digest != first.digest


def test_fingerprint_with_a_sidecar_is_the_weights_sha256_and_survives_a_copy(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    digest = write_sha256_sidecar(str(folder / "model.safetensors"))
    assert digest == _sha256(folder / "model.safetensors")
    assert (folder / "model.safetensors.sha256").read_text().split() == [digest, "model.safetensors"]
    with_sidecar = checkpoint_fingerprint(folder)
    assert with_sidecar.basis == "sidecar"
    time.sleep(0.05)
    copy = _copy_checkpoint(folder, tmp_path / "copy")  # new mtimes, same bytes
    assert checkpoint_fingerprint(copy).digest == with_sidecar.digest
    _same_shapes_other_values(copy)
    write_sha256_sidecar(str(copy / "model.safetensors"))
    assert checkpoint_fingerprint(copy).digest != with_sidecar.digest
    (copy / "model.safetensors.sha256").write_text("not a digest\n")
    with pytest.raises(CheckpointError, match="sha256sum"):
        checkpoint_fingerprint(copy)


def test_fingerprint_refuses_what_is_not_safetensors(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint_fingerprint(tmp_path)
    with pytest.raises(FileNotFoundError):
        checkpoint_fingerprint(tmp_path / "nowhere")


def test_fingerprint_on_s3_detects_a_replaced_object(s3_bucket: str, checkpoint: Path, tmp_path: Path) -> None:
    s3 = fsspec.filesystem("s3")
    uri = f"s3://{s3_bucket}/models/ckpt"
    s3.put(str(checkpoint), f"{s3_bucket}/models/ckpt", recursive=True)
    first = checkpoint_fingerprint(uri)
    assert (first.basis, first.layout) == ("header+size+version", "hf")
    assert checkpoint_fingerprint(uri).digest == first.digest
    changed = _copy_checkpoint(checkpoint, tmp_path / "changed")
    _same_shapes_other_values(changed)
    s3.put(str(changed / "model.safetensors"), f"{s3_bucket}/models/ckpt/model.safetensors")
    assert checkpoint_fingerprint(uri).digest != first.digest  # same header and size, new ETag
