"""The embedded default: classify a generated sample data set end to end on Ray started in-process.

``python -m jobs.demo`` writes a few WebDataset shards of real photographs (scikit-image's sample images, cropped,
flipped and resized into variety) under a work folder, runs the classification job on them with local storage, and
prints the summary and the first output rows as a table. With no ``--model`` it uses a randomly initialised
full-size ViT Hybrid checkpoint written once to a cache folder: the pipeline is real, the labels are meaningless.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("jobs.demo")

DEFAULT_WORKDIR = Path(os.environ.get("VIT_HYBRID_DEMO_DIR", "demo-output"))
DEFAULT_CACHE = Path(os.environ.get("VIT_HYBRID_CACHE", Path.home() / ".cache" / "vit-hybrid-batch"))
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "cat", "hubble_deep_field")


def sample_photographs() -> Iterator[tuple[str, np.ndarray]]:
    """Real photographs shipped with scikit-image (no download), as (name, uint8 HxWx3 or HxW)."""
    from skimage import data

    for name in SAMPLE_PHOTOS:
        loader = getattr(data, name, None)
        if loader is not None:
            yield name, np.asarray(loader())


def photo_variants(photo: np.ndarray, count: int, rng: np.random.Generator) -> Iterator[Image.Image]:
    """Crops, flips and rescales of one photo, so that a handful of photos make a data set of varied sizes."""
    image = Image.fromarray(photo)
    for _ in range(count):
        width, height = image.size
        crop_w, crop_h = int(width * rng.uniform(0.5, 1.0)), int(height * rng.uniform(0.5, 1.0))
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        variant = image.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            variant = variant.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.uniform(0.6, 1.6)
        variant = variant.resize((max(16, int(crop_w * scale)), max(16, int(crop_h * scale))), Image.Resampling.BILINEAR)
        yield variant


def write_sample_shards(folder: Path, *, shards: int = 2, images_per_shard: int = 16, seed: int = 0) -> list[Path]:
    """Write WebDataset tar shards of JPEGs as img2dataset lays them out: ``<key>.jpg`` + ``<key>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = list(sample_photographs())
    paths = []
    index = 0
    for shard_index in range(shards):
        path = folder / f"shard-{shard_index:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(images_per_shard):
                name, photo = photos[index % len(photos)]
                image = next(photo_variants(photo, 1, rng))
                key = f"{shard_index:05d}{index:04d}"
                _add_member(tar, f"{key}.jpg", _encode(image, "JPEG"))
                _add_member(tar, f"{key}.json", f'{{"key": "{key}", "photo": "{name}"}}'.encode())
                index += 1
        paths.append(path)
    return paths


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, quality=90)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def random_full_size_checkpoint(cache: Path) -> Path:
    """A randomly initialised google/vit-hybrid-base-bit-384-shaped checkpoint, written once to ``cache``."""
    import torch

    from model import ViTHybridConfig, ViTHybridForImageClassification, ViTHybridImageProcessor

    folder = cache / "random-vit-hybrid-base-bit-384"
    if (folder / "model.safetensors").exists() and (folder / "preprocessor_config.json").exists():
        return folder
    logger.warning("writing a randomly initialised full-size checkpoint to %s (once)", folder)
    torch.manual_seed(0)
    config = ViTHybridConfig(
        image_size=384,
        id2label={index: f"random-class-{index}" for index in range(1000)},
    )
    ViTHybridForImageClassification(config).save_pretrained(folder)
    ViTHybridImageProcessor(
        size={"shortest_edge": 384},
        crop_size={"height": 384, "width": 384},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or URI; default: a random full-size checkpoint")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where sample shards and output go")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random checkpoint is cached")
    parser.add_argument("--shards", type=int, default=2, help="sample shards to write")
    parser.add_argument("--images-per-shard", type=int, default=16, help="images per sample shard")
    parser.add_argument("--rows", type=int, default=10, help="output rows to print")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    model_uri = args.model
    if model_uri is None:
        model_uri = str(random_full_size_checkpoint(args.cache))
        logger.warning("no --model given: using RANDOM weights from %s; labels and scores are meaningless", model_uri)
    shards = write_sample_shards(args.workdir / "shards", shards=args.shards, images_per_shard=args.images_per_shard)
    output = args.workdir / "predictions"

    import ray
    import pyarrow.dataset as pads

    from pipeline.config import JobConfig
    from pipeline.plan import run_job

    ray.init()
    config = JobConfig(task="classify", input=str(shards[0].parent), output=str(output), model=model_uri, overwrite=True)
    summary = run_job(config)
    table = pads.dataset(str(output), format="parquet").to_table(columns=["key", "label", "score", "error"])
    frame = table.to_pandas().sort_values("key").head(args.rows).fillna({"error": ""})
    print(summary.line())
    print(frame.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
