"""Test data built in the tests: the planted samples and shard writers now live in :mod:`fixtures.shards` (shared
with the demo and the benchmark); this module keeps the names tests import."""

from __future__ import annotations

from fixtures.shards import (
    GOOD_VARIANTS,
    Sample,
    encode,
    make_samples,
    write_image_files,
    write_parquet,
    write_webdataset,
)
from fixtures.shards import put as _put

__all__ = [
    "GOOD_VARIANTS",
    "Sample",
    "_put",
    "encode",
    "make_samples",
    "write_image_files",
    "write_parquet",
    "write_webdataset",
]
