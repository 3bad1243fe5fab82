"""Benchmark stage ``inputs``: what the measuring stages share -- the photographs as JPEGs of each kind, the
processor, a random checkpoint (or ``--model``), and the storage the job reads from and writes to.

Hands on in ``context.shared``: ``processor`` (native), ``reference`` (transformers' processor or None), ``photos``,
``kinds`` (ImageNet-size, phone), ``image_sets`` ({kind: [EncodedImage]}), ``checkpoint`` (local folder),
``model_uri`` (where the job reads it: S3 or local), ``storage_base`` (where shards and predictions go).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import measures as benchmarking
from benchmarks.stages import BenchmarkContext

NEEDS: tuple[str, ...] = ()
FULL_IMAGE_SIZE = 384
QUICK_IMAGE_SIZE = 64


def checkpoint_processor(size: int) -> Any:
    """The 384 checkpoint's preprocessing at ``size``: shortest edge, bicubic, centre crop, mean = std = 0.5."""
    from model import ViTHybridImageProcessor

    return ViTHybridImageProcessor(
        size={"shortest_edge": size},
        resample=Image.Resampling.BICUBIC,
        crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def reference_processor(processor: Any) -> Any | None:
    """transformers' ``ViTHybridImageProcessor`` with exactly ``processor``'s settings; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    settings = {key: value for key, value in processor.to_dict().items() if key != "image_processor_type"}
    return transformers.ViTHybridImageProcessor(**settings)


def write_random_checkpoint(folder: Path, *, quick: bool, seed: int, calibration: np.ndarray | None = None) -> Path:
    """A google/vit-hybrid-base-bit-384-shaped checkpoint (or the tiny --quick one) with random weights.

    The weights are variance-preserving (``jobs.benchmark_model.randomize_weights``), not transformers' std-0.02
    init. Even so, a deep random network maps every photo to nearly the same embedding, and a random head then
    gives them all one class, which would make "top-1 agreement" trivially 100%. So when ``calibration`` crops
    (uint8 ``(N, H, W, 3)``) are given, the head is centred and scaled on their embeddings: the logits then follow
    what differs between photos, and different photos land in different classes. The backbone stays random.
    """
    from jobs.benchmark_model import benchmark_config, randomize_weights
    from model import ViTHybridForImageClassification

    size = QUICK_IMAGE_SIZE if quick else FULL_IMAGE_SIZE
    config = benchmark_config(size, quick=quick)
    config.id2label = {index: f"random-class-{index}" for index in range(config.num_labels)}
    config.label2id = {label: index for index, label in config.id2label.items()}
    model = ViTHybridForImageClassification(config).eval()
    randomize_weights(model, seed)
    processor = checkpoint_processor(size)
    if calibration is not None and len(calibration) > 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            with torch.inference_mode():
                embeddings = model.embed(processor.normalizer()(torch.from_numpy(calibration))).float()
                mean = embeddings.mean(dim=0)
                scale = (embeddings - mean).std().clamp_min(1e-6)
                head = model.classifier
                assert isinstance(head, torch.nn.Linear)  # the head of a checkpoint with labels
                weight = head.weight / scale
                head.bias.copy_(-(weight @ mean))
                head.weight.copy_(weight)
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(folder)
    processor.save_pretrained(str(folder))
    return folder


def run(context: BenchmarkContext) -> dict[str, Any]:
    from benchmarks.decode import decode_pixels

    settings, shared = context.settings, context.shared
    if settings.model:
        from model import ViTHybridImageProcessor

        processor = ViTHybridImageProcessor.from_pretrained(settings.model)
        size = processor.output_size[0]
    else:
        size = QUICK_IMAGE_SIZE if settings.quick else FULL_IMAGE_SIZE
        processor = checkpoint_processor(size)
    photos = benchmarking.sample_photographs()
    kinds = (
        [benchmarking.QUICK_IMAGENET, benchmarking.QUICK_PHONE] if settings.quick
        else [benchmarking.IMAGENET, benchmarking.PHONE]
    )
    imagenet_kind, phone_kind = kinds
    counts = {imagenet_kind.name: 4 if settings.quick else 2 * len(photos),
              phone_kind.name: 2 if settings.quick else len(photos)}
    image_sets = {
        kind.name: benchmarking.build_image_set(kind, photos, count=counts[kind.name], seed=settings.seed)
        for kind in kinds
    }
    # One exact crop per photograph: the head is calibrated on them (and the fidelity stage judges bf16 on them).
    photo_crops = np.stack(
        [decode_pixels(image.data, processor, fast=False) for image in image_sets[imagenet_kind.name][: len(photos)]]
    )
    if settings.model:
        checkpoint = Path(settings.model)
    else:
        checkpoint = write_random_checkpoint(
            context.workdir / "checkpoint", quick=settings.quick, seed=settings.seed, calibration=photo_crops
        )
    if settings.storage == "s3":
        import fsspec

        from fixtures.s3 import local_s3_server, upload_folder

        context.stack.enter_context(local_s3_server(BENCHMARK_S3_ENV))
        bucket = f"benchmark-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3").mkdir(bucket)
        base = f"s3://{bucket}"
        upload_folder(checkpoint, f"{base}/model")
        model_uri = f"{base}/model"
    else:
        base = str(context.workdir / "storage")
        model_uri = str(checkpoint)
    shared.update(
        processor=processor, reference=reference_processor(processor), photos=photos, kinds=kinds,
        image_sets=image_sets, photo_crops=photo_crops, checkpoint=checkpoint, model_uri=model_uri,
        storage_base=base,
    )
    model_config = (
        f"checkpoint {settings.model}" if settings.model
        else "tiny random (--quick)" if settings.quick else "full-size random (vit-hybrid-base-bit-384 shape)"
    )
    return {"image_size": size, "config": model_config, "storage": settings.storage, "photos": len(photos)}


BENCHMARK_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "benchmark-access-key",
    "AWS_SECRET_ACCESS_KEY": "benchmark-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
