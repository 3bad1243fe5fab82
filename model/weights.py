"""Checkpoint files and URIs: find the weights, read them safely, recognise and convert the key layout.

A checkpoint is a folder (local path or any fsspec URI such as ``s3://bucket/models/vit-hybrid/``) holding
``model.safetensors`` (preferred), a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``; or a
URI naming one such file. ``.bin`` files are read with ``torch.load(weights_only=True)``: a pickle that holds
anything but tensors and plain containers is refused, never executed.

Two key layouts are understood:

* ``hf``: transformers' own names (``vit.encoder.layer.0.attention.attention.query.weight``, ...), used as is;
* ``timm``: ``vit_base_r50_s16_384`` names (``patch_embed.backbone.stem.conv.weight``, ``blocks.0.attn.qkv.weight``,
  ...), renamed by the table of transformers' ``convert_vit_hybrid_timm_to_pytorch.py`` with the fused ``qkv``
  split into query, key and value.

>>> state_dict, info = load_checkpoint("s3://bucket/models/vit-hybrid-base-bit-384/")  # doctest: +SKIP
>>> info.sha256, info.layout  # doctest: +SKIP
('9f2c...', 'hf')
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from model.storage import (
    StorageOptions,
    filesystem_for,
    join_uri,
    protocol_of,
    read_bytes,
    with_retries,
    write_bytes,
)

# torch is imported only by the functions that read or write tensors: the job's driver imports this module for the
# checkpoint's fingerprint (header, size, version) and never needs torch, whose import costs it 1.7 s of CPU.
if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
# Looked for in this order in a checkpoint folder.
WEIGHTS_FILE_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME)
_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the URI and what is wrong."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Where the weights came from, for logs and for the provenance written next to every prediction.

    ``sha256`` is the digest of the weights file; for a sharded checkpoint, the digest of the index file's bytes
    followed by every shard's bytes in file-name order. None when the loader was asked not to hash
    (``digest=False``: the inference actors, whose job identifies the weights by :func:`checkpoint_fingerprint`).
    """

    uri: str
    weights_file: str
    sha256: str | None
    layout: str  # "hf" or "timm"
    format: str  # "safetensors" or "pytorch"
    config_uri: str | None = None


# --------------------------------------------------------------------------------------------------------------------
# Finding and reading files
# --------------------------------------------------------------------------------------------------------------------


def _list_names(uri: str, storage_options: StorageOptions | None) -> set[str]:
    filesystem, path = filesystem_for(uri, storage_options)

    def listing() -> list[str]:
        # Object stores cache listings per process; a checkpoint uploaded since would be missed.
        filesystem.invalidate_cache(path)
        return filesystem.ls(path, detail=False)

    try:
        entries = with_retries(listing, description=f"listing {uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint folder {uri} does not exist") from None
    return {entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries}


def _sha256(*payloads: bytes) -> str:
    digest = hashlib.sha256()
    for payload in payloads:
        digest.update(payload)
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_safetensors(source: bytes | str, uri: str) -> dict[str, Tensor]:
    """A safetensors file's tensors, each in memory of its own: ``source`` is the file's bytes, or a local path.

    A local path is memory-mapped, so each tensor is copied once (~0.15 s for 400 MB); bytes (object storage) are
    parsed into tensors that view the immutable, 16-byte-aligned Python bytes and are then copied. Either way the
    clones are what the model keeps: aligned, writable (the model may write in place), and not tied to the file or
    the bytes. Reading a local file as bytes instead, then parsing and cloning, was three passes (~0.7 s of an
    actor's start-up on a 2-core machine).
    """
    from safetensors.torch import load as safetensors_load
    from safetensors.torch import load_file as safetensors_load_file

    try:
        tensors = safetensors_load_file(source) if isinstance(source, str) else safetensors_load(source)
    except SafetensorError as error:
        raise CheckpointError(f"{uri} is not a readable safetensors file: {error}") from error
    return {name: tensor.clone() for name, tensor in tensors.items()}


def _read_torch_pickle(payload: bytes, uri: str) -> dict[str, Tensor]:
    """``torch.load`` restricted to tensors and plain containers; unwraps ``{"state_dict": ...}`` training files."""
    import torch

    try:
        loaded = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {uri}: it pickles objects other than tensors, and only weights_only=True loading is "
            f"allowed (convert it to safetensors from a trusted environment). Detail: {error}"
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise CheckpointError(f"{uri} does not hold a state dict (a mapping from names to tensors)")
    return {str(name): tensor for name, tensor in loaded.items()}


def _read_weights_file(
    uri: str, storage_options: StorageOptions | None, digest: bool = True
) -> tuple[dict[str, Tensor], str | None, str]:
    """``(state_dict, sha256 or None, format)`` of one weights file or of a sharded safetensors index."""
    if uri.endswith(".safetensors") and protocol_of(uri) == "file":
        _, path = filesystem_for(uri, storage_options)
        state_dict = with_retries(lambda: _read_safetensors(path, uri), description=f"reading {uri}")
        return state_dict, _file_sha256(path) if digest else None, "safetensors"
    payload = read_bytes(uri, storage_options)
    if uri.endswith(".index.json"):
        try:
            weight_map = json.loads(payload)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{uri} is not a safetensors index (no 'weight_map'): {error}") from error
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        state_dict = {}
        payloads = [payload]
        for shard in sorted(set(weight_map.values())):
            shard_uri = join_uri(base, shard)
            shard_payload = read_bytes(shard_uri, storage_options)
            payloads.append(shard_payload)
            state_dict.update(_read_safetensors(shard_payload, shard_uri))
        return state_dict, _sha256(*payloads) if digest else None, "safetensors"
    sha256 = _sha256(payload) if digest else None
    if uri.endswith(".safetensors"):
        return _read_safetensors(payload, uri), sha256, "safetensors"
    return _read_torch_pickle(payload, uri), sha256, "pytorch"


def find_weights_file(path_or_uri: str, storage_options: StorageOptions | None = None) -> tuple[str, str | None]:
    """``(weights file URI, config.json URI or None)`` for a checkpoint folder or a weights-file URI."""
    uri = os.fspath(path_or_uri).rstrip("/")
    if uri.endswith(_WEIGHTS_SUFFIXES):
        folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
        names = _list_names(folder, storage_options)
        if uri.rsplit("/", 1)[-1] not in names:
            raise FileNotFoundError(f"weights file {uri} does not exist")
        return uri, join_uri(folder, CONFIG_NAME) if CONFIG_NAME in names else None
    names = _list_names(uri, storage_options)
    for name in WEIGHTS_FILE_NAMES:
        if name in names:
            return join_uri(uri, name), join_uri(uri, CONFIG_NAME) if CONFIG_NAME in names else None
    raise FileNotFoundError(
        f"no weights in {uri}: expected one of {', '.join(WEIGHTS_FILE_NAMES)}; found {sorted(names) or 'nothing'}"
    )


def load_checkpoint(
    path_or_uri: str | os.PathLike[str], storage_options: StorageOptions | None = None, *, digest: bool = True
) -> tuple[dict[str, Tensor], CheckpointInfo]:
    """Read a checkpoint's weights into CPU tensors, converted to transformers' key layout.

    Returns the state dict and a :class:`CheckpointInfo` (source URI, weights file, sha256, original layout).
    ``digest=False`` skips the sha256 (a quarter of a second per 400 MB) where nothing reads it.
    Transient storage errors are retried; a missing folder or file raises ``FileNotFoundError``; an unreadable or
    unsafe file raises :class:`CheckpointError`.
    """
    uri = os.fspath(path_or_uri)
    weights_uri, config_uri = find_weights_file(uri, storage_options)
    state_dict, sha256, file_format = _read_weights_file(weights_uri, storage_options, digest)
    state_dict = _strip_wrapper_prefix(state_dict)
    layout = detect_layout(state_dict, weights_uri)
    if layout == "timm":
        state_dict = timm_to_hf(state_dict)
    logger.info("read %d tensors from %s (%s layout, sha256 %s)", len(state_dict), weights_uri, layout,
                sha256[:12] if sha256 else "not computed")
    return state_dict, CheckpointInfo(uri, weights_uri, sha256, layout, file_format, config_uri)


# --------------------------------------------------------------------------------------------------------------------
# Identity without reading the weights
# --------------------------------------------------------------------------------------------------------------------

SHA256_SIDECAR_SUFFIX = ".sha256"
# A safetensors header is a few hundred kB for this model; a larger one means the file is not safetensors.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointFingerprint:
    """Who a checkpoint is, known without reading its weights: what a job's fingerprint records about the model.

    ``digest`` is a sha256 over what identifies the weights file(s):

    * with a sidecar (``model.safetensors.sha256``, as ``sha256sum`` writes it): the weights' own sha256 from it and
      the file's size; a copy of the checkpoint to another place keeps its identity;
    * otherwise the safetensors header (every tensor's name, dtype, shape and byte range), the file's size and its
      version as storage reports it (the object's ETag or version id on S3, the modification time on a local disk):
      rewriting the file, even with same-shaped tensors, changes the version.

    Why not the sha256 of the bytes: on the driver that is a full read of a 400 MB file (seconds, and again for every
    job) before any work starts; the actors read the weights anyway. ``basis`` says which of the two was used.
    """

    uri: str
    weights_file: str
    digest: str
    basis: str  # "sidecar" or "header+size+version" (or "size+version" for a pickled .bin)
    layout: str | None  # from the safetensors header's tensor names; None for a pickled .bin
    format: str  # "safetensors" or "pytorch"
    config_uri: str | None = None
    parameters: int | None = None  # elements of all weights, from the safetensors headers' shapes; None for a pickle


def _read_range(uri: str, start: int, end: int, storage_options: StorageOptions | None) -> bytes:
    filesystem, path = filesystem_for(uri, storage_options)
    return with_retries(lambda: filesystem.cat_file(path, start=start, end=end), description=f"reading {uri}")


def _file_identity(uri: str, storage_options: StorageOptions | None) -> dict[str, object]:
    """Size and version of one file as storage reports them (no read of its content)."""
    filesystem, path = filesystem_for(uri, storage_options)

    def info() -> dict:
        filesystem.invalidate_cache(path)  # s3fs caches listings: a checkpoint replaced since would look unchanged
        return filesystem.info(path)

    details = with_retries(info, description=f"inspecting {uri}")
    version = {
        key: str(details[key])
        for key in ("ETag", "VersionId", "mtime", "LastModified", "last_modified", "etag", "generation", "md5Hash")
        if details.get(key) not in (None, "")
    }
    return {"size": int(details.get("size") or 0), "version": version}


def read_safetensors_header(uri: str, storage_options: StorageOptions | None = None) -> dict[str, object]:
    """The JSON header of a safetensors file (two ranged reads: its length, then it); raises CheckpointError."""
    prefix = _read_range(uri, 0, 8, storage_options)
    if len(prefix) < 8:
        raise CheckpointError(f"{uri} is not a readable safetensors file: shorter than its 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if not 2 <= length <= _MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"{uri} is not a readable safetensors file: header length {length} is implausible")
    raw = _read_range(uri, 8, 8 + length, storage_options)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{uri} is not a readable safetensors file: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{uri} is not a readable safetensors file: its header is not a JSON object")
    return header


def _read_sidecar(uri: str, storage_options: StorageOptions | None) -> str | None:
    sidecar = uri + SHA256_SIDECAR_SUFFIX
    filesystem, path = filesystem_for(sidecar, storage_options)
    try:
        text = with_retries(lambda: filesystem.cat_file(path), description=f"reading {sidecar}").decode().strip()
    except FileNotFoundError:
        return None
    digest = text.split()[0].lower() if text else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CheckpointError(f"{sidecar} does not start with a sha256 hex digest; rewrite it with `sha256sum`")
    return digest


def _describe_file(uri: str, storage_options: StorageOptions | None) -> tuple[dict[str, object], str | None, int | None]:
    """What identifies one weights file, the key layout its header shows and the elements of its tensors (both None
    for a pickle)."""
    identity = _file_identity(uri, storage_options)
    sidecar = _read_sidecar(uri, storage_options)
    layout = parameters = None
    if uri.endswith(".safetensors"):
        header = read_safetensors_header(uri, storage_options)
        names = {name: None for name in header if name != "__metadata__"}
        layout = detect_layout(_strip_wrapper_prefix(names), uri)  # type: ignore[arg-type]
        parameters = _header_elements(header, uri)
        if sidecar is None:
            identity["header_sha256"] = _sha256(json.dumps(header, sort_keys=True).encode())
    if sidecar is not None:
        return {"sha256": sidecar, "size": identity["size"]}, layout, parameters
    return identity, layout, parameters


def _header_elements(header: Mapping[str, object], uri: str) -> int:
    """The number of elements of every tensor a safetensors header lists (what the driver sizes actors by)."""
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, Mapping) else None
        if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
            raise CheckpointError(f"{uri} is not a readable safetensors file: tensor {name!r} has no valid shape")
        total += math.prod(shape)
    return total


def checkpoint_fingerprint(
    path_or_uri: str | os.PathLike[str], storage_options: StorageOptions | None = None
) -> CheckpointFingerprint:
    """Identify a checkpoint from its metadata (see :class:`CheckpointFingerprint`), reading no weights.

    Fails like :func:`load_checkpoint` would on what it can see without the weights: a missing folder or file
    (``FileNotFoundError``), a file that is not safetensors or whose tensor names are neither layout
    (:class:`CheckpointError`). Shapes are checked by the actors, which read the weights.
    """
    uri = os.fspath(path_or_uri)
    weights_uri, config_uri = find_weights_file(uri, storage_options)
    files: dict[str, object] = {}
    layouts: set[str] = set()
    parameters: int | None = 0
    if weights_uri.endswith(".index.json"):
        payload = read_bytes(weights_uri, storage_options)
        try:
            weight_map = json.loads(payload)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{weights_uri} is not a safetensors index (no 'weight_map'): {error}") from error
        files["index_sha256"] = _sha256(payload)
        base = weights_uri.rsplit("/", 1)[0] if "/" in weights_uri else "."
        for shard in sorted(set(weight_map.values())):
            files[shard], layout, elements = _describe_file(join_uri(base, shard), storage_options)
            layouts.update([layout] if layout else [])
            parameters = None if parameters is None or elements is None else parameters + elements
    else:
        files[weights_uri.rsplit("/", 1)[-1]], layout, parameters = _describe_file(weights_uri, storage_options)
        layouts.update([layout] if layout else [])
    file_format = "pytorch" if weights_uri.endswith((".bin", ".pt", ".pth")) else "safetensors"
    sidecars = all(isinstance(item, dict) and "sha256" in item for key, item in files.items() if key != "index_sha256")
    basis = "sidecar" if sidecars else "header+size+version" if file_format == "safetensors" else "size+version"
    digest = _sha256(json.dumps(files, sort_keys=True).encode())
    logger.info("fingerprint of %s from %s: %s", weights_uri, basis, digest[:12])
    return CheckpointFingerprint(
        uri, weights_uri, digest, basis, layouts.pop() if len(layouts) == 1 else None, file_format, config_uri,
        parameters,
    )


def write_sha256_sidecar(weights_uri: str, storage_options: StorageOptions | None = None) -> str:
    """Hash a weights file once and write ``<file>.sha256`` beside it (``sha256sum`` format); returns the digest.

    With the sidecar, a job's fingerprint of the checkpoint is the weights' real sha256, kept when the checkpoint is
    copied elsewhere. Write it again whenever the weights change: a stale sidecar is trusted.
    """
    digest = _sha256(read_bytes(weights_uri, storage_options))
    name = weights_uri.rsplit("/", 1)[-1]
    write_bytes(weights_uri + SHA256_SIDECAR_SUFFIX, f"{digest}  {name}\n".encode(), storage_options)
    return digest


def serialize_state_dict(state_dict: Mapping[str, Tensor], safe_serialization: bool = True) -> bytes:
    """The bytes of ``model.safetensors`` (with transformers' ``format: pt`` metadata) or ``pytorch_model.bin``."""
    import torch
    from safetensors.torch import save as safetensors_save

    # Contiguous, unshared CPU copies: safetensors refuses strided (channels-last) and aliased tensors.
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}
    if safe_serialization:
        return safetensors_save(tensors, metadata={"format": "pt"})
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------------------------------------

_TIMM_MARKERS = ("patch_embed.", "blocks.", "pos_embed", "cls_token")
_HF_MARKERS = ("vit.", "embeddings.", "encoder.", "classifier.", "layernorm.", "pooler.")


def _strip_wrapper_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoints saved from ``DistributedDataParallel`` prefix every key with ``module.``."""
    if state_dict and all(name.startswith("module.") for name in state_dict):
        return {name[len("module.") :]: tensor for name, tensor in state_dict.items()}
    return state_dict


def detect_layout(state_dict: Mapping[str, Tensor], uri: str = "<state dict>") -> str:
    """``"hf"`` or ``"timm"``, from the key names."""
    names = list(state_dict)
    if any(name.startswith(_HF_MARKERS) for name in names):
        return "hf"
    if any(name.startswith(_TIMM_MARKERS) for name in names):
        return "timm"
    raise CheckpointError(
        f"{uri}: unknown key layout (neither transformers' ViTHybrid nor timm's vit_base_r50_s16_384); "
        f"first keys: {names[:5]}"
    )


_BACKBONE = "vit.embeddings.patch_embeddings.backbone.bit."
# (timm pattern, transformers replacement): the table of convert_vit_hybrid_timm_to_pytorch.py, written as rules,
# extended to the pre-activation net's final norm and to the pre-logits layer of the ImageNet-21k checkpoints.
_TIMM_TO_HF_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^cls_token$", "vit.embeddings.cls_token"),
        (r"^pos_embed$", "vit.embeddings.position_embeddings"),
        (r"^patch_embed\.proj\.(weight|bias)$", r"vit.embeddings.patch_embeddings.projection.\1"),
        (r"^patch_embed\.backbone\.stem\.conv\.weight$", _BACKBONE + "embedder.convolution.weight"),
        (r"^patch_embed\.backbone\.stem\.norm\.(weight|bias)$", _BACKBONE + r"embedder.norm.\1"),
        (
            r"^patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.((?:downsample\.)?(?:conv|norm)\d?\.(?:weight|bias))$",
            _BACKBONE + r"encoder.stages.\1.layers.\2.\3",
        ),
        (r"^patch_embed\.backbone\.norm\.(weight|bias)$", _BACKBONE + r"norm.\1"),
        (r"^blocks\.(\d+)\.norm1\.(weight|bias)$", r"vit.encoder.layer.\1.layernorm_before.\2"),
        (r"^blocks\.(\d+)\.norm2\.(weight|bias)$", r"vit.encoder.layer.\1.layernorm_after.\2"),
        (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"vit.encoder.layer.\1.attention.output.dense.\2"),
        (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"vit.encoder.layer.\1.intermediate.dense.\2"),
        (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"vit.encoder.layer.\1.output.dense.\2"),
        (r"^norm\.(weight|bias)$", r"vit.layernorm.\1"),
        (r"^head\.(weight|bias)$", r"classifier.\1"),
        (r"^pre_logits\.fc\.(weight|bias)$", r"vit.pooler.dense.\1"),
    )
)
_TIMM_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def timm_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm ``vit_base_r50_s16_384`` state dict to transformers' ``ViTHybridForImageClassification`` keys.

    Keys no rule knows are kept under their timm name, so that the load check reports them as unexpected.
    """
    converted: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        qkv = _TIMM_QKV.match(name)
        if qkv:
            layer, kind = qkv.groups()
            if tensor.shape[0] % 3:
                raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}: its first dimension is not 3 x hidden")
            prefix = f"vit.encoder.layer.{layer}.attention.attention."
            for part, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                converted[f"{prefix}{part}.{kind}"] = chunk.clone()
            continue
        for pattern, replacement in _TIMM_TO_HF_RULES:
            if pattern.match(name):
                converted[pattern.sub(replacement, name)] = tensor
                break
        else:
            converted[name] = tensor
    return converted


def adapt_prefix(
    state_dict: Mapping[str, Tensor], *, base_model: bool, has_pooler: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Fit a transformers-layout state dict to the model class, as transformers does across head/no-head classes.

    ``base_model`` (``ViTHybridModel``): drop a ``vit.`` prefix and the classification head. Otherwise
    (``ViTHybridForImageClassification``): add the ``vit.`` prefix a bare-model checkpoint lacks. Pooler weights
    are dropped when the model has no pooler. Returns the new dict and notes on what was dropped.
    """
    notes: list[str] = []
    names = list(state_dict)
    prefixed = any(name.startswith("vit.") for name in names)
    adapted: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        if base_model:
            if name.startswith("classifier."):
                continue
            name = name[len("vit.") :] if prefixed and name.startswith("vit.") else name
        elif not prefixed and not name.startswith("classifier."):
            name = "vit." + name
        adapted[name] = tensor
    dropped_head = [name for name in names if base_model and name.startswith("classifier.")]
    if dropped_head:
        notes.append(f"classification head not used by the bare model: {', '.join(dropped_head)}")
    pooler_prefix = "pooler." if base_model else "vit.pooler."
    if not has_pooler:
        pooler = [name for name in adapted if name.startswith(pooler_prefix)]
        for name in pooler:
            del adapted[name]
        if pooler:
            notes.append(f"pooler not used by this model: {', '.join(pooler)}")
    return adapted, notes


def check_state_dict(expected: Mapping[str, Iterable[int]], state_dict: Mapping[str, Tensor], uri: str) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected and mis-shaped key, or return."""
    missing = sorted(name for name in expected if name not in state_dict)
    unexpected = sorted(name for name in state_dict if name not in expected)
    mis_shaped = sorted(
        (name, tuple(shape), tuple(state_dict[name].shape))
        for name, shape in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != tuple(shape)
    )
    if not (missing or unexpected or mis_shaped):
        return
    lines = [f"checkpoint {uri} does not fit the model (is config.json the checkpoint's own?):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mis_shaped:
        lines.append(f"  mis-shaped keys ({len(mis_shaped)}):")
        lines.extend(f"    {name}: expected {shape}, found {found}" for name, shape, found in mis_shaped)
    raise CheckpointError("\n".join(lines))


__all__ = [
    "CONFIG_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "CheckpointFingerprint",
    "CheckpointInfo",
    "adapt_prefix",
    "check_state_dict",
    "checkpoint_fingerprint",
    "detect_layout",
    "find_weights_file",
    "load_checkpoint",
    "read_safetensors_header",
    "serialize_state_dict",
    "timm_to_hf",
    "write_sha256_sidecar",
]
