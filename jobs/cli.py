"""The command line shared by ``jobs.classify`` and ``jobs.embed``: flags -> JobConfig -> run, one summary line.

``run_job`` calls ``ray.init()`` with no address once the model and the input are checked: it joins the cluster named
by ``RAY_ADDRESS`` (set by ``ray job submit``) or starts Ray in-process, so the same command runs on a laptop and on a
cluster.

Exit codes: 0 done (also when a rerun finds the job already complete); 2 the job cannot run as asked: a flag, the
model, the input or the output is wrong or refused by storage (``error: ...`` on stderr, naming the URI and the cause,
no traceback); 3 aborted past ``--max-error-fraction`` after committing the finished shards; 4 a Ray node runs other
Ray, torch, pyarrow or Python versions than the driver (:mod:`pipeline.versions`). After 2, 3 or 4, fix the cause and
run the same command again: committed shards are kept and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from model.weights import CheckpointError
from pipeline.manifest import OutputConflictError
from pipeline.config import DEVICES, DTYPE_CHOICES, EMBEDDING_DTYPES, FORMATS, JobConfig
from pipeline.plan import JobAborted, JobError, run_job
from pipeline.sources import InputError
from pipeline.versions import EXIT_VERSION_MISMATCH, VersionMismatchError

EXIT_ERROR = 2
EXIT_ABORTED = 3

# What the user can fix: each message names the URI (model, input, output) and the cause. Anything else is a bug and
# keeps its traceback.
USER_ERRORS = (JobError, InputError, OutputConflictError, CheckpointError, FileNotFoundError, PermissionError)
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
    io.add_argument("--format", choices=FORMATS, default=None,
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
    model.add_argument("--dtype", default=defaults.dtype, choices=DTYPE_CHOICES,
                       help="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    model.add_argument("--device", default=defaults.device, choices=DEVICES,
                       help="auto = GPU actors when the cluster has GPUs, else CPU actors")
    model.add_argument("--embedding-dtype", default=defaults.embedding_dtype, choices=EMBEDDING_DTYPES,
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
    except VersionMismatchError as mismatch:
        print(f"error: {mismatch}", file=sys.stderr)
        return EXIT_VERSION_MISMATCH
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(summary.line())
    return 0
