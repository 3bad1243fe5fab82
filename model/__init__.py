"""ViT Hybrid (BiT-R50 stem + ViT-Base encoder) in plain PyTorch, with the Hugging Face public names.

Code written against ``transformers.ViTHybrid*`` moves over by changing one import::

    from model import ViTHybridForImageClassification, ViTHybridImageProcessor

    processor = ViTHybridImageProcessor.from_pretrained("s3://bucket/models/vit-hybrid-base-bit-384/")
    model = ViTHybridForImageClassification.from_pretrained("s3://bucket/models/vit-hybrid-base-bit-384/")
    logits = model(**processor(image, return_tensors="pt")).logits
"""

from model.configuration import BitConfig, ViTHybridConfig
from model.modeling import ViTHybridForImageClassification, ViTHybridModel
from model.processing import ViTHybridImageProcessor

__all__ = [
    "BitConfig",
    "ViTHybridConfig",
    "ViTHybridForImageClassification",
    "ViTHybridImageProcessor",
    "ViTHybridModel",
]
