"""Queries given as images: decode and embed them exactly as the embedding job did, or refuse.

The index records the embedding job's fingerprint (model URI, weights sha256, preprocessing, dtype). An image query
is embedded with that model (or the one ``--model`` names, for a checkpoint that moved), and refused when the
weights' sha256 or the preprocessing settings differ: distances between embeddings of two models mean nothing.
Decoding uses the job's own path (:func:`pipeline.decode.decode_sample`, with the job's fast-decode setting), and
the model runs in the job's compute dtype, so a query image that is also in the index finds itself with the
similarity the job's numerics allow (1.0 within float rounding on the same device).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from model import ViTHybridForImageClassification, ViTHybridImageProcessor
from model.storage import StorageOptions, read_bytes
from model.weights import checkpoint_fingerprint
from pipeline.decode import DecodeError, decode_sample
from pipeline.infer import DTYPES, resolve_device
from pipeline.manifest import JobFingerprint
from search.errors import FingerprintMismatchError, SearchError
from search.query import fingerprint_differences

logger = logging.getLogger(__name__)


class ImageEmbedder:
    """The index's model and preprocessing, loaded once; ``embed(uris)`` -> float32 ``(n, hidden)`` vectors."""

    def __init__(
        self,
        fingerprint: Mapping[str, Any],
        *,
        model_uri: str | None = None,
        storage_options: StorageOptions | None = None,
        batch_size: int = 16,
    ) -> None:
        self.fingerprint = dict(fingerprint)
        self.model_uri = model_uri or str(fingerprint["model_uri"])
        self.storage_options = dict(storage_options or {})
        self.batch_size = batch_size
        self.device = resolve_device("auto")
        self.dtype = DTYPES.get(str(fingerprint.get("dtype")), torch.float32)
        # The job's decode settings (fast path, EXIF orientation, its input columns) are adopted as they are: the
        # query is decoded the way the indexed images were. What can differ is the model: weights and processor.
        self.job_settings = {
            name: value for name, value in dict(fingerprint.get("preprocessing") or {}).items()
            if name in ("fast_decode", "exif_orientation", "id_column", "image_column")
        }
        self.fast_decode = bool(self.job_settings.get("fast_decode", True))
        self.exif_orientation = bool(self.job_settings.get("exif_orientation", True))
        self.processor = ViTHybridImageProcessor.from_pretrained(self.model_uri, storage_options=self.storage_options)
        self.model = ViTHybridForImageClassification.from_pretrained(
            self.model_uri, storage_options=self.storage_options, dtype=self.dtype, device=self.device, digest=False
        )
        self._check_matches_index()
        self.normalizer = self.processor.normalizer(device=self.device, dtype=self.dtype)

    def _check_matches_index(self) -> None:
        """Refuse a model whose weights or preprocessing differ from what the index's embeddings were made with."""
        # The same identity the job records (model.weights.checkpoint_fingerprint: header, size, version or sidecar).
        identity = checkpoint_fingerprint(self.model_uri, storage_options=self.storage_options)
        mine = JobFingerprint(
            task="embed",
            model_uri=self.model_uri,
            weights_sha256=identity.digest,
            preprocessing={**self.processor.to_dict(), **self.job_settings},
            dtype=str(self.fingerprint.get("dtype")),
        )
        differences = fingerprint_differences(self.fingerprint, mine)
        if differences:
            raise FingerprintMismatchError(
                f"model {self.model_uri} does not match the index, whose embeddings were made with "
                f"{self.fingerprint.get('model_uri')}: {'; '.join(differences)}. Pass --model with the checkpoint "
                "(weights and preprocessor_config.json) the embedding job used"
            )

    def embed(self, uris: Sequence[str]) -> np.ndarray:
        """Embed image files or URIs; an unreadable or undecodable image raises :class:`SearchError` naming it."""
        pixels = []
        for uri in uris:
            try:
                data = read_bytes(uri, self.storage_options)
            except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
                raise SearchError(f"cannot read query image {uri}: {error}") from error
            decoded = decode_sample(
                data, processor=self.processor, fast=self.fast_decode, exif_orientation=self.exif_orientation
            )
            if isinstance(decoded, DecodeError):
                raise SearchError(f"cannot use query image {uri}: {decoded.reason}")
            pixels.append(decoded.pixels)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                batch = torch.from_numpy(np.stack(pixels[start:start + self.batch_size])).to(self.device)
                outputs.append(self.model.embed(self.normalizer(batch)).float().cpu().numpy())
        vectors = np.concatenate(outputs) if outputs else np.empty((0, self.model.config.hidden_size), np.float32)
        if self.fingerprint.get("normalize_embeddings"):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if self.fingerprint.get("embedding_dtype") == "float16":  # as stored by the job
            vectors = vectors.astype(np.float16).astype(np.float32)
        return vectors
