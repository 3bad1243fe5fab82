"""Writers of embedding-job output files for the search tests: the sink's own table builder and the job's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.manifest import JobFingerprint
from pipeline.sink import build_output_table


def fingerprint(sha: str = "a" * 64, crop: int = 64, dtype: str = "float32") -> JobFingerprint:
    return JobFingerprint(task="embed", model_uri="/models/test", weights_sha256=sha,
                          preprocessing={"crop_size": {"height": crop, "width": crop}, "fast_decode": True}, dtype=dtype)


def write_job_file(path: str | Path, vectors: np.ndarray, keys: list[str], *, errors: list[str | None] | None = None,
                   source: str = "s3://bucket/shard.tar", job: JobFingerprint | None = None,
                   embedding_dtype: str = "float32") -> None:
    """One data file as the embed job writes it: key, source, embedding (null on error rows), error + metadata."""
    errors = errors if errors is not None else [None] * len(keys)
    table = build_output_table("embed", keys=keys, sources=[source] * len(keys), ordinals=np.arange(len(keys)),
                               errors=errors, embeddings=np.asarray(vectors, np.float32), hidden_size=vectors.shape[1],
                               embedding_dtype=embedding_dtype)
    table = table.drop_columns(["ordinal"]).replace_schema_metadata((job or fingerprint()).parquet_metadata({}))
    pq.write_table(table, str(path))
