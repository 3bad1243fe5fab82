"""The command line shared by ``jobs.classify`` and ``jobs.embed``: flags -> JobConfig -> run, one summary line.

``ray.init()`` with no address joins the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``) or starts Ray
in-process, so the same command runs on a laptop and on a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pipeline.plan import JobAborted, JobConfig, run_job

DESCRIPTIONS = {
    "classify": "Classify images with ViT Hybrid: top-k labels, scores and embeddings to Parquet.",
    "embed": "Extract ViT Hybrid embeddings (final-LayerNorm CLS vector) to Parquet, skipping the classifier head.",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where there is none to show (required values, on/off switches, computed defaults)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.required or isinstance(action.const, bool):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(task: str) -> argparse.ArgumentParser:
    """Every option with its default in --help; defaults come from JobConfig so they cannot drift."""
    defaults = JobConfig(task=task, input="", output="", model="")
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{task}",
        description=DESCRIPTIONS[task],
        formatter_class=_HelpFormatter,
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, help="prefix, glob, or .txt file listing URIs (local path, s3://, any fsspec URL)")
    io.add_argument("--output", required=True, help="output prefix for Parquet files (local path or s3://...)")
    io.add_argument("--model", required=True, help="Hugging Face checkpoint folder (local or s3://...)")
    io.add_argument("--format", choices=["webdataset", "parquet", "images"], default=None,
                    help="input format; detected from file names when not given")
    io.add_argument("--storage-options", type=json.loads, default={},
                    help='fsspec options as JSON, e.g. \'{"anon": true}\'; credentials normally come from AWS_* variables')
    io.add_argument("--id-column", default=None, help="Parquet input: column holding the sample id (auto-detected)")
    io.add_argument("--image-column", default=None, help="Parquet input: column holding image bytes (auto-detected)")
    io.add_argument("--images-per-shard", type=int, default=defaults.images_per_shard,
                    help="plain image files: files grouped into one unit of work and commit")
    io.add_argument("--rows-per-file", type=int, default=defaults.rows_per_file, help="maximum rows per Parquet file")
    io.add_argument("--overwrite", action="store_true",
                    help="delete this job's earlier output under --output and start over instead of resuming")

    model = parser.add_argument_group("model")
    if task == "classify":
        model.add_argument("--top-k", type=int, default=defaults.top_k, help="classes kept per image")
    model.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                       help="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    model.add_argument("--device", default=defaults.device, choices=["auto", "cuda", "cpu"],
                       help="auto = GPU actors when the cluster has GPUs, else CPU actors")
    model.add_argument("--embedding-dtype", default=defaults.embedding_dtype, choices=["float32", "float16"],
                       help="storage type of the embedding column")
    model.add_argument("--normalize-embeddings", action="store_true", help="L2-normalise embeddings before writing")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--batch-size", type=int, default=None, help="images per inference batch (default 256 on GPU, 16 on CPU)")
    compute.add_argument("--min-actors", type=int, default=defaults.min_actors, help="minimum inference actors")
    compute.add_argument("--max-actors", type=int, default=None, help="maximum inference actors (default: one per GPU, or 1 on CPU)")
    compute.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per inference actor (default 1)")
    compute.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs per inference actor (default 1; torch threads on CPU)")
    compute.add_argument("--decode-cpus", type=float, default=defaults.decode_cpus, help="CPUs reserved per decode task")
    compute.add_argument("--decode-memory-mb", type=int, default=defaults.decode_memory_mb,
                         help="memory reserved per decode task (bounds concurrent decodes of large photos)")
    compute.add_argument("--exact-decode", dest="fast_decode", action="store_false",
                         help="bit-exact preprocessing: turn off the fast path (JPEG draft-mode decoding of large photos), on by default")
    compute.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                         help="images with more pixels become error rows (decompression-bomb guard)")
    compute.add_argument("--max-error-fraction", type=float, default=defaults.max_error_fraction,
                         help="abort (after committing finished shards) when more than this fraction of samples fail")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def config_from_args(task: str, args: argparse.Namespace) -> JobConfig:
    values = vars(args).copy()
    values.pop("log_level")
    return JobConfig(task=task, **values)


def main(task: str, argv: Sequence[str] | None = None) -> int:
    args = build_parser(task).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(task, args)

    import ray

    ray.init()
    try:
        summary = run_job(config)
    except JobAborted as aborted:
        print(f"aborted: {aborted}", file=sys.stderr)
        return 3
    print(summary.line())
    return 0
