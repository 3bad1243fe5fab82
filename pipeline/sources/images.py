"""Loose image files (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``): one sample per file, grouped into shards.

Grouping decides the size of the units of work and of the output files: a shard is read by one task and becomes one
Parquet file (split further by ``rows_per_file``). Files are taken in key order and a shard closes when it holds
``images_per_shard`` files or its files add up to ``bytes_per_shard`` (sizes come from the listing; a list file of
URIs has none, and then the count alone decides, so ten million URIs plan without touching the files).

Defaults: 10,000 images per shard makes an output file of about 30 MB with float32 embeddings (a row is ~3.1 kB:
768 x 4 bytes of embedding plus top-k and key; 15 MB with float16), the size Parquet readers and object stores
handle best; 100 million images make 10,000 shards and files, not the 400,000 of 256-image shards. The 4 GiB byte
cap bounds what one task downloads and decodes (about 1,000 twelve-megapixel photos: half a minute of one core),
so a retried or resumed shard redoes a bounded amount of work.

The key of an image is its path relative to the input prefix or glob base, or its URI for list files. A file that
cannot be read for a permanent reason (deleted since planning, access denied) is an error row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline.sources.base import (
    IMAGE_EXTENSIONS,
    Members,
    PlanSettings,
    ReadSettings,
    SampleRow,
    Shard,
    ShardFormat,
    batched,
    sanitize,
    short_hash,
    single_array,
)
from pipeline.sources.ranged import read_whole_file

logger = logging.getLogger(__name__)

DEFAULT_IMAGES_PER_SHARD = 10_000
DEFAULT_BYTES_PER_SHARD = 4 * 1024**3


class ImagesFormat(ShardFormat):
    name = "images"
    extensions = tuple(sorted(IMAGE_EXTENSIONS))

    def plan(self, base: str, files: pa.Table, settings: PlanSettings) -> list[Shard]:
        names = single_array(files.column("name"))
        sizes = single_array(files.column("size"))
        bounds = group_bounds(sizes, settings.images_per_shard, settings.bytes_per_shard)
        shards = []
        for index, (start, stop) in enumerate(bounds):
            chunk = names.slice(start, stop - start)
            # The id hashes the base and every member, so the same files always make the same shard.
            digest = short_hash("\n".join([base, *chunk.to_pylist()]))
            readable = sanitize(str(chunk[0].as_py()))[-60:].strip("._-")
            shard_id = f"images-{index:06d}-{readable}-{digest}" if readable else f"images-{index:06d}-{digest}"
            shard_sizes = sizes.slice(start, stop - start)
            total = None if shard_sizes.null_count else int(np.asarray(shard_sizes.to_numpy(zero_copy_only=False)).sum())
            shards.append(Shard(shard_id=shard_id, format=self.name, uri=base, members=Members(chunk), bytes=total))
        logger.info("planned %d images shards (%d images) under %s", len(shards), len(names), base or "a list file")
        return shards

    def read(self, shard: Shard, settings: ReadSettings) -> Iterator[pa.Table]:
        return batched(image_samples(shard, settings), settings.batch_rows)


FORMAT = ImagesFormat()


def group_bounds(sizes: pa.Array, images_per_shard: int, bytes_per_shard: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: consecutive runs of at most ``images_per_shard`` files and ``bytes_per_shard`` bytes.

    A single file larger than the byte cap is a shard of its own. Unknown sizes (nulls) count as zero bytes.
    """
    count = len(sizes)
    if count == 0:
        return []
    if sizes.null_count == count:
        return [(start, min(count, start + images_per_shard)) for start in range(0, count, images_per_shard)]
    ends = np.cumsum(np.asarray(sizes.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64))
    bounds = []
    start = 0
    while start < count:
        before = int(ends[start - 1]) if start else 0
        by_bytes = int(np.searchsorted(ends, before + bytes_per_shard, side="right"))
        stop = max(start + 1, min(count, start + images_per_shard, by_bytes))
        bounds.append((start, stop))
        start = stop
    return bounds


def image_samples(shard: Shard, settings: ReadSettings) -> Iterator[SampleRow]:
    def fetch(member: str) -> SampleRow:
        uri = shard.member_uri(member)
        data, reason = read_whole_file(uri, settings.storage_options)
        return SampleRow(member, uri, data, reason)

    members = shard.members
    with ThreadPoolExecutor(max_workers=max(1, settings.read_concurrency)) as pool:
        for start in range(0, len(members), settings.batch_rows):
            yield from pool.map(fetch, members[start : start + settings.batch_rows])
