"""ViT Hybrid (BiT-R50 stem + ViT-Base encoder) in plain PyTorch, with the Hugging Face public names.

Code written against ``transformers.ViTHybrid*`` moves over by changing one import::

    from model import ViTHybridForImageClassification, ViTHybridImageProcessor

    processor = ViTHybridImageProcessor.from_pretrained("s3://bucket/models/vit-hybrid-base-bit-384/")
    model = ViTHybridForImageClassification.from_pretrained("s3://bucket/models/vit-hybrid-base-bit-384/")
    logits = model(**processor(image, return_tensors="pt")).logits

The names are loaded on first use (PEP 562): importing a torch-free submodule such as :mod:`model.storage` or
:mod:`model.processing` does not import torch, which a fresh Ray worker that only reads, decodes or writes would
otherwise pay for (about a second of CPU per worker process).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.configuration import BitConfig, ViTHybridConfig
    from model.modeling import ViTHybridForImageClassification, ViTHybridModel
    from model.processing import ViTHybridImageProcessor

_HOMES = {
    "BitConfig": "model.configuration",
    "ViTHybridConfig": "model.configuration",
    "ViTHybridForImageClassification": "model.modeling",
    "ViTHybridModel": "model.modeling",
    "ViTHybridImageProcessor": "model.processing",
}

__all__ = [
    "BitConfig",
    "ViTHybridConfig",
    "ViTHybridForImageClassification",
    "ViTHybridImageProcessor",
    "ViTHybridModel",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
