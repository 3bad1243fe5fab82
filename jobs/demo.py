"""The embedded default: classify a generated sample data set end to end on Ray started in-process.

``python -m jobs.demo`` writes a few WebDataset shards of real photographs (scikit-image's sample images, cropped,
flipped and resized into variety) under a work folder, runs the classification job on them with local storage, and
prints the summary and the first output rows as a table. With no ``--model`` it uses a randomly initialised
full-size ViT Hybrid checkpoint written once to a cache folder: the pipeline is real, the labels are meaningless.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# The demo's data and checkpoint come from the shared fixtures (the tests and the benchmark use the same ones); the
# names stay importable from here.
from fixtures.checkpoints import random_full_size_checkpoint
from fixtures.photos import SAMPLE_PHOTOS, photo_variants, sample_photographs
from fixtures.shards import write_photo_shards as write_sample_shards

__all__ = [
    "SAMPLE_PHOTOS", "main", "photo_variants", "random_full_size_checkpoint", "sample_photographs", "write_sample_shards",
]

logger = logging.getLogger("jobs.demo")

DEFAULT_WORKDIR = Path(os.environ.get("VIT_HYBRID_DEMO_DIR", "demo-output"))
DEFAULT_CACHE = Path(os.environ.get("VIT_HYBRID_CACHE", Path.home() / ".cache" / "vit-hybrid-batch"))


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
