"""One home for a job's settings and for the names the whole project shares.

:class:`JobConfig` is built once from the command line (``jobs.cli``) and passed down whole: the runner, the stages
and the fingerprint read their settings from it (or from an object one function derives from it), never from copies
of its fields. Task, format, dtype, device and column names are defined here once; the CLI's choices, the output
schema and the checks read them from here, so a new value is added in one place.

This module imports neither Ray nor torch: it is read by the driver before anything heavy starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------------

TASKS = ("classify", "embed")
# Input format names are not listed here: ``pipeline.sources.registry`` holds the one table of formats (one module
# per format), and ``FORMATS`` below is read from it on first use, so that adding a format touches one file.
DEVICES = ("auto", "cuda", "cpu")
# Compute dtypes by their torch names; the short aliases are accepted on the command line.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of each compute dtype
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", **{name: name for name in COMPUTE_DTYPES}}
DTYPE_CHOICES = ("auto", *COMPUTE_DTYPES, "fp32", "bf16", "fp16")
EMBEDDING_DTYPES = ("float32", "float16")
# Where images are decoded: by CPU tasks anywhere in the cluster, shipping uint8 crops to the inference actors
# ("workers"), or inside each inference actor, on the GPU node, shipping the file bytes ("actor").
DECODE_LOCATIONS = ("workers", "actor")

# Bookkeeping columns that travel with result rows between stages (never written to the output files).
SHARD_ID_COLUMN = "shard_id"
ORDINAL_COLUMN = "ordinal"
SHARD_ROWS_COLUMN = "shard_rows"
# Between stages, "no error" and "not the shard's last row" travel as these values rather than as nulls: Ray turns
# an all-null column into float NaN on its way through NumPy batches.
NO_ERROR = ""
NOT_LAST_ROW = -1


def __getattr__(name: str) -> Any:
    # ``from pipeline.config import FORMATS``: the format registry's names, resolved lazily so that importing this
    # module stays cheap (the registry imports the format readers).
    if name == "FORMATS":
        from pipeline.sources.registry import format_names

        return format_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def canonical_dtype(requested: str) -> str:
    """``fp32`` -> ``float32`` and so on; ``auto`` stays ``auto``. Raises ValueError for anything else."""
    if requested == "auto":
        return requested
    try:
        return DTYPE_ALIASES[requested]
    except KeyError:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPE_CHOICES)}") from None


# --------------------------------------------------------------------------------------------------------------------
# The job's settings
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class JobConfig:
    """Every setting of a job, built once from the command line and passed down whole."""

    task: str
    input: str
    output: str
    model: str
    format: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    id_column: str | None = None
    image_column: str | None = None
    images_per_shard: int = 10_000
    bytes_per_shard: int = 4 * 1024**3
    batch_size: int | None = None
    top_k: int = 5
    dtype: str = "auto"
    device: str = "auto"
    embedding_dtype: str = "float32"
    normalize_embeddings: bool = False
    rows_per_file: int = 100_000
    min_actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float | None = None  # None: 1 per task on GPU clusters, sized from the node on CPU-only ones
    decode_memory_mb: int = 512
    fast_decode: bool = True
    exif_orientation: bool = True
    max_image_pixels: int = 89_478_485
    max_error_fraction: float = 0.5
    overwrite: bool = False
    compile: bool = False  # torch.compile the model in each actor (batch shapes fixed by padding)
    decode_location: str = "workers"  # see DECODE_LOCATIONS and README "Bytes on the wire"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.format is not None:
            from pipeline.sources.registry import format_names

            if self.format not in format_names():
                raise ValueError(f"format {self.format!r} is not one of {', '.join(format_names())}")
        if self.images_per_shard < 1 or self.bytes_per_shard < 1:
            raise ValueError("images_per_shard and bytes_per_shard must be at least 1")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        canonical_dtype(self.dtype)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be within [0, 1], got {self.max_error_fraction}")
        if self.decode_location not in DECODE_LOCATIONS:
            raise ValueError(f"decode_location must be one of {', '.join(DECODE_LOCATIONS)}, got {self.decode_location!r}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {self.embedding_dtype!r}")
