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
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# The demo's data and checkpoint come from the shared fixtures (the tests and the benchmark use the same ones); the
# names stay importable from here.
from fixtures.checkpoints import random_full_size_checkpoint
from fixtures.photos import SAMPLE_PHOTOS, photo_variants, sample_photographs
from fixtures.shards import write_photo_shards as write_sample_shards
from jobs.shutdown import exit_after

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
    parser.add_argument("--rows", type=int, default=6, help="output rows to print")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the job's progress logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    random_weights = args.model is None
    model_uri = args.model
    if model_uri is None:
        print("No --model given: writing/using a RANDOMLY initialised full-size checkpoint (labels are meaningless).")
        model_uri = str(random_full_size_checkpoint(args.cache))
    shards = write_sample_shards(args.workdir / "shards", shards=args.shards, images_per_shard=args.images_per_shard)
    bad_key = _plant_bad_image(shards[0].parent)
    output = args.workdir / "predictions"

    from pipeline.config import JobConfig
    from pipeline.plan import run_job

    _start_quiet_ray(verbose=args.verbose)
    print(f"Classifying {len(shards) + 1} WebDataset shards under {shards[0].parent} (Ray in-process) ...")
    config = JobConfig(task="classify", input=str(shards[0].parent), output=str(output), model=model_uri,
                       overwrite=True, top_k=3)
    summary = run_job(config)
    print(_report(summary.line(), output, _photo_names(shards), bad_key, rows=args.rows, random_weights=random_weights))
    return 0


def _plant_bad_image(folder: Path) -> str:
    """One more shard holding a JPEG cut in half, so the demo shows an error row and why; returns its key."""
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(good, "JPEG")
    data = good.getvalue()[: len(good.getvalue()) // 2]
    key = "broken-download"
    with tarfile.open(folder / "shard-bad.tar", "w") as tar:
        info = tarfile.TarInfo(f"{key}.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return key


def _start_quiet_ray(*, verbose: bool) -> None:
    """Ray in-process, with its progress bars and worker logs off the demo's output unless --verbose."""
    import ray.data

    from pipeline.preflight import connect_ray

    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ core logs to stderr below this
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        for name in ("ray", "ray.data", "ray.data._internal", "pipeline", "model"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # Started as a job starts its own Ray (pipeline.preflight.local_ray_options), or joined under RAY_ADDRESS.
    connect_ray(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR,
                configure_logging=verbose)


def _photo_names(shards: Sequence[Path]) -> dict[str, str]:
    """key -> scikit-image photo the sample was cut from (from the shards' JSON sidecars)."""
    import json

    names = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    names[record["key"]] = record["photo"]
    return names


def _report(summary_line: str, output: Path, photos: dict[str, str], bad_key: str, *, rows: int,
            random_weights: bool) -> str:
    """What the job produced, readable in a few seconds: layout, top-k, an error row, embeddings, a similarity lookup."""
    import pyarrow.dataset as pads

    # Predictions in OUT/*.parquet, error rows in OUT/errors/*.errors (same schema): together, one row per input.
    files = sorted(str(path) for path in [*output.glob("*.parquet"), *output.glob("errors/*.errors")])
    table = pads.dataset(files, format="parquet").to_table().sort_by("key")
    lines = ["", summary_line, ""]
    if random_weights:
        lines += ["!! RANDOM WEIGHTS: the labels and scores below are meaningless; the pipeline around them is real.",
                  "!! Pass --model /path/to/vit-hybrid-base-bit-384 for real predictions.", ""]

    bookkeeping = output.with_name(output.name + ".job")
    lines.append(f"Output layout: {output}/ holds only Parquet (what readers point at); the job's records are beside it")
    for folder in (output, bookkeeping):
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                relative = path.relative_to(folder.parent)
                notes = {".parquet": " (predictions)", ".errors": " (error rows, Parquet)"} if folder == output else {}
                note = notes.get(path.suffix, "")
                lines.append(f"  {relative!s:<50} {path.stat().st_size:>9,} bytes{note}")
    lines.append("")

    good = table.filter(pads.field("error").is_null())
    lines.append(f"Top-3 predictions (first {min(rows, good.num_rows)} of {table.num_rows} rows):")
    for row in good.slice(0, rows).to_pylist():
        top = ", ".join(f"{label} {score:.3f}" for label, score in zip(row["topk_labels"], row["topk_scores"]))
        lines.append(f"  {row['key']:<12} {photos.get(row['key'], ''):<21} {top}")
    lines.append("")

    errors = table.filter(pads.field("error").is_valid()).to_pylist()
    lines.append(f"Error rows ({len(errors)}; planted: {bad_key!r}, a JPEG cut in half). Every input has a row:")
    for row in errors:
        lines.append(f"  {row['key']:<18} error: {row['error']}")
    lines.append("")

    embeddings = np.asarray(good.column("embedding").to_pylist(), dtype=np.float32)
    keys = good.column("key").to_pylist()
    norms = np.linalg.norm(embeddings, axis=1)
    lines.append(f"Embeddings: {embeddings.shape[0]} x {embeddings.shape[1]} {good.schema.field('embedding').type}; "
                 f"L2 norm of {keys[0]}: {norms[0]:.2f} (all: {norms.min():.2f}..{norms.max():.2f})")
    unit = embeddings / norms[:, None]
    query = 0
    similarity = unit @ unit[query]
    order = [index for index in np.argsort(-similarity) if index != query][:3]
    lines.append(f"Images most similar to {keys[query]} ({photos.get(keys[query], '?')}), cosine over embeddings:")
    for index in order:
        lines.append(f"  {keys[index]:<12} {photos.get(keys[index], ''):<21} cosine {similarity[index]:.3f}")
    if random_weights:
        lines += ["", "!! RANDOM WEIGHTS: labels, scores and similarities above are meaningless."]
    return "\n".join(lines)


if __name__ == "__main__":
    exit_after(main())
