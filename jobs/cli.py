"""The command line shared by ``jobs.classify`` and ``jobs.embed``: flags -> JobConfig -> run, one summary line.

``run_job`` first runs the checks that need no Ray (output writable, model files, input plan, weights; see
:mod:`pipeline.preflight`), then calls ``ray.init()`` with no address: it joins the cluster named by ``RAY_ADDRESS``
(set by ``ray job submit``) or starts Ray in-process, so the same command runs on a laptop and on a cluster.

Exit codes (every failure is one line on stderr, naming the URI and the cause, no traceback):

* 0 done (also when a rerun finds the job already complete);
* 2 the job cannot run as asked: a flag, the model, the input or the output is wrong or refused by storage, or reading
  a shard failed for a storage reason;
* 3 too many failed samples: more than ``--max-error-fraction`` (judged at the end for jobs of any size, and mid-job
  once 100 samples are in), or every sample failed; finished shards are committed;
* 4 the cluster cannot run the job: Ray could not be started, the cluster at ``RAY_ADDRESS`` could not be joined,
  or a node runs other Ray, torch, pyarrow or Python versions than the driver (:mod:`pipeline.versions`);
* 5 some shards could not be read at all (not a tar, not Parquet): they are not committed, the others are.

After 2-5, fix the cause and run the same command again: committed shards are kept and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from model.weights import CheckpointError
from pipeline.config import DECODE_LOCATIONS, DEVICES, DTYPE_CHOICES, EMBEDDING_DTYPES, JobConfig
from pipeline.manifest import OutputConflictError
from pipeline.plan import JobAborted, JobError, UnreadableShardsError, run_job
from pipeline.preflight import ClusterStartError
from pipeline.sources import InputError
from pipeline.sources.registry import format_names
from pipeline.versions import EXIT_VERSION_MISMATCH, VersionMismatchError

EXIT_ERROR = 2
EXIT_ABORTED = 3
EXIT_CLUSTER = 4
EXIT_UNREADABLE_SHARDS = 5

# What the user can fix: each message names the URI (model, input, output) and the cause. Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (
    JobError, InputError, OutputConflictError, CheckpointError, FileNotFoundError, PermissionError, NotADirectoryError
)
# The exit code of each failure the user can fix, most specific first (UnreadableShardsError is a JobError).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ClusterStartError, EXIT_CLUSTER),
    (VersionMismatchError, EXIT_VERSION_MISMATCH),
    (UnreadableShardsError, EXIT_UNREADABLE_SHARDS),
    *((kind, EXIT_ERROR) for kind in USER_ERRORS),
)
# Their DEBUG records carry request headers (Authorization, x-amz-security-token) or call arguments (SSE keys).
CREDENTIAL_LOGGERS = ("botocore", "aiobotocore", "s3fs", "urllib3")

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
    io.add_argument("--format", choices=format_names(), default=None,
                    help="input format; detected from file names when not given")
    io.add_argument("--storage-options", type=json.loads, default={},
                    help='fsspec options as JSON, e.g. \'{"anon": true}\'; credentials normally come from AWS_* variables')
    io.add_argument("--id-column", default=None, help="Parquet input: column holding the sample id (auto-detected)")
    io.add_argument("--image-column", default=None, help="Parquet input: column holding image bytes (auto-detected)")
    io.add_argument("--images-per-shard", type=int, default=defaults.images_per_shard,
                    help="plain image files: at most this many files per unit of work and output file "
                         "(10,000 rows make ~30 MB of Parquet with float32 embeddings)")
    io.add_argument("--bytes-per-shard", type=int, default=defaults.bytes_per_shard,
                    help="plain image files: at most this many input bytes per unit of work (bounds one task's "
                         "download and the work a retry redoes; a larger single file is a shard of its own)")
    io.add_argument("--rows-per-file", type=int, default=defaults.rows_per_file, help="maximum rows per Parquet file")
    io.add_argument("--overwrite", action="store_true",
                    help="delete this job's earlier output under --output and start over instead of resuming")

    model = parser.add_argument_group("model")
    if task == "classify":
        model.add_argument("--top-k", type=int, default=defaults.top_k, help="classes kept per image")
    model.add_argument("--dtype", default=defaults.dtype, choices=DTYPE_CHOICES,
                       help="compute dtype; auto = bfloat16 on GPU; on CPU bfloat16 where the node's CPU has "
                            "AVX512-BF16 or AMX, else float32")
    model.add_argument("--device", default=defaults.device, choices=DEVICES,
                       help="auto = GPU actors when the cluster has GPUs, else CPU actors")
    model.add_argument("--embedding-dtype", default=defaults.embedding_dtype, choices=EMBEDDING_DTYPES,
                       help="storage type of the embedding column")
    model.add_argument("--normalize-embeddings", action="store_true", help="L2-normalise embeddings before writing")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--batch-size", type=int, default=None, help="images per inference batch (default 256 on GPU, 16 on CPU)")
    compute.add_argument("--min-actors", type=int, default=defaults.min_actors, help="minimum inference actors")
    compute.add_argument("--max-actors", type=int, default=None,
                         help="maximum inference actors (default: one per GPU the cluster can reach, or one per CPU-only node)")
    compute.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per inference actor (default 1)")
    compute.add_argument("--cpus-per-actor", type=float, default=None,
                         help="CPUs per inference actor (default 1 on GPU; on CPU-only nodes all but the decode share; "
                              "torch threads on CPU)")
    compute.add_argument("--decode-cpus", type=float, default=defaults.decode_cpus,
                         help="CPUs reserved per decode task (default 1 on GPU clusters; on CPU-only ones sized from "
                              "the node, see README 'Every core busy')")
    compute.add_argument("--decode-memory-mb", type=int, default=defaults.decode_memory_mb,
                         help="memory reserved per decode task (bounds concurrent decodes of large photos)")
    compute.add_argument("--fast-decode", dest="fast_decode", action="store_true", default=defaults.fast_decode,
                         help="decode JPEGs at least twice the input size at 1/2..1/8 scale in libjpeg (faster, "
                              "not bit-exact: see the README's Performance section); every other image is exact")
    compute.add_argument("--exact-decode", dest="fast_decode", action="store_false",
                         help="bit-exact preprocessing everywhere (turns --fast-decode off)")
    compute.add_argument("--exif-orientation", action=argparse.BooleanOptionalAction, default=defaults.exif_orientation,
                         help="turn photos upright by their EXIF Orientation tag before resizing (transformers' "
                              "processor ignores the tag; --no-exif-orientation does the same)")
    compute.add_argument("--decode-location", default=defaults.decode_location, choices=DECODE_LOCATIONS,
                         help="decode on CPU workers and ship uint8 crops (workers), or inside the inference actors "
                              "on the GPU nodes, shipping file bytes (actor: for small JPEGs and GPU nodes with spare "
                              "cores; set --cpus-per-actor to the decode threads)")
    compute.add_argument("--compile", action="store_true",
                         help="torch.compile the model in each actor (batches padded to one shape; first batch slow)")
    compute.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                         help="images with more pixels become error rows (decompression-bomb guard)")
    compute.add_argument("--max-error-fraction", type=float, default=defaults.max_error_fraction,
                         help="abort (after committing finished shards) when more than this fraction of samples fail")
    parser.add_argument("--log-level", default="INFO",
                        help="logging level (botocore, aiobotocore, s3fs and urllib3 stay at INFO or above: their debug "
                             "logs show request headers and call arguments, which can hold credentials)")
    return parser


def config_from_args(task: str, args: argparse.Namespace) -> JobConfig:
    values = vars(args).copy()
    values.pop("log_level")
    return JobConfig(task=task, **values)


class _WithoutTraceback(logging.Formatter):
    """Formats a record without its traceback (the record itself is left intact for the other handlers)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _keep_ray_data_tracebacks_off_the_console() -> None:
    """When a task fails, Ray Data logs the whole traceback (Ray's frames and the worker's) on the console before the
    exception reaches us. Keep its one-line message there, and the traceback in Ray Data's log file, whose path it
    prints when the dataset starts: the command line ends with its own ``error:`` line naming the URI and cause."""
    import ray.data  # noqa: F401 - importing it configures its loggers

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console" and handler.formatter is not None:
            handler.setFormatter(_WithoutTraceback(handler.formatter._fmt, handler.formatter.datefmt))


def main(task: str, argv: Sequence[str] | None = None) -> int:
    parser = build_parser(task)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in CREDENTIAL_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.INFO, logger.getEffectiveLevel()))
    _keep_ray_data_tracebacks_off_the_console()
    try:
        config = config_from_args(task, args)
    except ValueError as error:
        parser.error(str(error))  # exits with code 2 and the usage line
    try:
        summary = run_job(config)
    except JobAborted as aborted:
        print(f"aborted: {aborted}", file=sys.stderr)
        return EXIT_ABORTED
    except tuple(kind for kind, _ in EXIT_CODES) as error:
        print(f"error: {error}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(error, kind))
    print(summary.line())
    return 0
