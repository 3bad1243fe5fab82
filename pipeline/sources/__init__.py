"""Input sources: find the input shards of a job, then read every sample out of them as Arrow rows.

A package in the shape of Ray Data's datasources: :mod:`.listing` turns the ``--input`` spec into candidate files,
:mod:`.ranged` reads stored objects in retried byte ranges, and one module per format (:mod:`.webdataset`,
:mod:`.parquet`, :mod:`.images`) implements :class:`~.base.ShardFormat`: the extensions it claims, how its files become
shards, how a shard is read. :mod:`.registry` finds the format modules; adding a format is adding one module.

Two halves, both pure Python and testable without Ray:

* :func:`plan_shards` turns the ``--input`` spec into a sorted, deterministic list of :class:`Shard` records (the
  units of work; the job records them so that a rerun resumes the same work).
* :func:`read_shard` streams one shard as Arrow tables of at most ``batch_rows`` rows with the columns of
  :data:`SAMPLE_SCHEMA`: ``key``, ``source``, ``ordinal``, ``data`` (image bytes) and ``error``.

Input spec
    * a prefix: a local directory or an object-store prefix, listed recursively (``s3://bucket/shards/``);
    * a glob: ``s3://bucket/shards/*.tar``, ``data/**/*.parquet``;
    * a list file (``.txt`` / ``.lst``): one URI per line, blank lines and ``#`` comments ignored; relative entries
      are resolved against the list file's own directory, and duplicate entries are read once;
    * a single shard or image file.

  Hidden files are skipped when a prefix or glob is listed, and counted and named in the log (see
  :mod:`.listing`: ``_DSC0001.JPG`` is not hidden).

Formats, detected from file names unless ``format`` is given. Files with other names are ignored, and counted and
named in the log (img2dataset writes ``_stats.json`` next to its shards). More than one recognised format under one
input is an error, because img2dataset folders hold both ``.tar`` shards and ``.parquet`` metadata: pass ``format``
to choose. A forced format takes the files named for it, plus, for inputs the user named one by one (a single file,
a glob, a list file), files whose name says nothing.

The contract of :func:`read_shard`: every input sample yields exactly one row, and a bad sample never raises. Each
format module says how it finds samples and keys. Zero-byte images are rows with ``data=b""`` and no error: turning
them into error rows is the decoder's job.

Shard-level failures
    A shard whose content is unreadable (not a tar archive, a truncated or corrupt tar, not a Parquet file, a
    corrupt Parquet page) yields the samples read before the damage and then exactly ONE row with key
    :data:`SHARD_ERROR_KEY` (``"<shard-error>"``), ``source`` = the shard URI, the next ordinal, ``data`` null and an
    error naming the URI and the cause (``"truncated tar: ..."``). A shard with no samples at all (an empty tar or
    Parquet file) yields one such row too ("empty shard"), so every shard yields at least one row. A shard whose
    only row is a shard-error row (nothing of it could be read) is a whole-shard failure
    (:func:`is_whole_shard_failure`): the job must not commit it as done.

    A shard that cannot be opened or read for a storage reason (object missing, access denied, transient errors
    that outlast the retries) raises :class:`ShardReadError`: that is not a property of the data, and the job
    should stop with a clear message rather than record a million error rows.

Storage access
    Every list, stat and read goes through :func:`model.storage.with_retries`; shards are read with ranged requests
    (:mod:`.ranged`), so memory stays bounded by one chunk plus one batch (plus one Parquet row group).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.storage import StorageOptions
from pipeline.sources.base import (
    DEFAULT_CHUNK_BYTES,
    SAMPLE_SCHEMA,
    SHARD_ERROR_KEY,
    InputError,
    Members,
    PlanSettings,
    ReadSettings,
    Shard,
    ShardFormat,
    ShardReadError,
    error_table,
    is_whole_shard_failure,
    single_array,
)
from pipeline.sources.images import DEFAULT_BYTES_PER_SHARD, DEFAULT_IMAGES_PER_SHARD
from pipeline.sources.listing import Listing, examples, list_input
from pipeline.sources.parquet import DEFAULT_ID_COLUMNS, DEFAULT_IMAGE_COLUMNS
from pipeline.sources.registry import format_names, format_of_name, formats, get_format

__all__ = [
    "DEFAULT_BYTES_PER_SHARD",
    "DEFAULT_ID_COLUMNS",
    "DEFAULT_IMAGES_PER_SHARD",
    "DEFAULT_IMAGE_COLUMNS",
    "SAMPLE_SCHEMA",
    "SHARD_ERROR_KEY",
    "InputError",
    "Members",
    "PlanSettings",
    "ReadSettings",
    "Shard",
    "ShardFormat",
    "ShardReadError",
    "format_names",
    "format_of_name",
    "formats",
    "is_whole_shard_failure",
    "plan_shards",
    "read_shard",
]

logger = logging.getLogger(__name__)


def plan_shards(
    input_spec: str,
    *,
    format: str | None = None,
    storage_options: StorageOptions | None = None,
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD,
    bytes_per_shard: int = DEFAULT_BYTES_PER_SHARD,
    id_column: str | None = None,
    image_column: str | None = None,
) -> list[Shard]:
    """Find the input files named by ``input_spec`` and group them into shards, sorted and deterministic.

    Each tar or Parquet file is one shard; plain images are grouped by count and bytes in key order (see
    :mod:`.images`). The format's cheap checks run now (for Parquet: the first file's columns, one footer read), so
    that a wrong column name fails here, before Ray starts, instead of turning the job's rows into errors. Raises
    :class:`InputError`, naming the URI, when the location does not exist, cannot be listed, holds nothing to read,
    or a named column is missing.

    >>> plan_shards("s3://bucket/shards/*.tar")  # doctest: +SKIP
    [Shard(shard_id='00000.tar-1f3a...', format='webdataset', uri='s3://bucket/shards/00000.tar', ...), ...]
    """
    if format is not None and format not in format_names():
        raise InputError(f"unknown input format {format!r}; expected one of {', '.join(format_names())}")
    if images_per_shard < 1:
        raise InputError(f"images_per_shard must be at least 1, got {images_per_shard}")
    if bytes_per_shard < 1:
        raise InputError(f"bytes_per_shard must be at least 1, got {bytes_per_shard}")
    input_spec = input_spec.strip()
    if not input_spec:
        raise InputError("the input spec is empty; pass a prefix, a glob or a list file")

    listing = list_input(input_spec, storage_options)
    chosen, selected = _select_files(input_spec, listing, format)
    settings = PlanSettings(
        images_per_shard=images_per_shard,
        bytes_per_shard=bytes_per_shard,
        id_column=id_column,
        image_column=image_column,
        storage_options=storage_options,
    )
    fmt = get_format(chosen)
    shards = fmt.plan(listing.base, selected, settings)
    fmt.check(shards, settings)
    logger.info("planned %d %s shards from %s", len(shards), chosen, input_spec)
    return shards


def _claimed(names: pa.Array, fmt: ShardFormat) -> pa.Array:
    """Which names end with one of the format's extensions, in any case: one regex pass over the names, which builds
    no lower-cased or sliced copy of ten million strings (those cost 180 MB at the planning peak)."""
    pattern = "(?:" + "|".join(re.escape(ext) for ext in fmt.extensions) + r")\z"
    return pc.match_substring_regex(names, pattern, ignore_case=True)


def _constant(length: int, value: bool) -> pa.Array:
    return pa.array(np.full(length, value, dtype=bool))


def _select_files(input_spec: str, listing: Listing, forced: str | None) -> tuple[str, pa.Table]:
    files = listing.files
    names = single_array(files.column("name"))
    claimed: dict[str, pa.Array] = {}
    unclaimed = _constant(len(names), True)
    for name, fmt in formats().items():
        mask = pc.and_(_claimed(names, fmt), unclaimed)  # the first format to claim a file keeps it
        if pc.any(mask).as_py():
            claimed[name] = mask
        unclaimed = pc.and_(unclaimed, pc.invert(mask))
    unknown = pc.filter(names, unclaimed)
    if forced is None:
        if len(claimed) > 1:
            counts = ", ".join(
                f"{pc.sum(mask).as_py()} {name} (e.g. {pc.filter(files.column('uri'), mask)[0].as_py()})"
                for name, mask in sorted(claimed.items())
            )
            raise InputError(f"input {input_spec} mixes formats: {counts}; pass format= to choose one")
        if not claimed:
            raise InputError(f"no input files found in {input_spec}{_ignored_note(files, unclaimed)}")
        chosen, mask = next(iter(claimed.items()))
    else:
        chosen = forced
        mask = claimed.get(forced, _constant(len(names), False))
        if listing.named_one_by_one:
            mask = pc.or_(mask, unclaimed)
            unknown = pa.array([], pa.string())
        if not pc.any(mask).as_py() if len(mask) else True:
            raise InputError(f"no {forced} files found in {input_spec}{_ignored_note(files, unclaimed)}")
    selected = files if pc.all(mask).as_py() else files.filter(mask)  # no copy in the usual, single-format case
    if forced is not None:
        selected = selected.take(pc.sort_indices(selected.column("uri")))
    ignored = len(files) - len(selected)
    if ignored:
        others = [name for name, other in claimed.items() if name != chosen]
        detail = f"; files with unrecognised names: {examples(unknown.to_pylist())}" if len(unknown) else ""
        if others:
            detail += f"; files of other formats ({', '.join(others)}) not read"
        logger.info(
            "input %s: reading %d %s files, ignoring %d others%s",
            input_spec, len(selected), chosen, ignored, detail,
        )
    return chosen, selected


def _ignored_note(files: pa.Table, unclaimed: pa.Array) -> str:
    unknown = pc.filter(files.column("uri"), unclaimed)
    if len(unknown) == 0:
        return " (it is empty)"
    return (
        f" ({len(unknown)} files with unrecognised names, e.g. {unknown[0].as_py()}; "
        f"pass format= to read them as one of {', '.join(format_names())})"
    )


def read_shard(
    shard: Shard,
    *,
    storage_options: StorageOptions | None = None,
    batch_rows: int = 256,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    read_concurrency: int = 8,
    id_column: str | None = None,
    image_column: str | None = None,
) -> Iterator[pa.Table]:
    """Yield the shard's samples as Arrow tables (:data:`SAMPLE_SCHEMA`) of at most ``batch_rows`` rows.

    Exactly one row per input sample, ordinals ``0..n-1`` in shard order; bad samples become error rows and a
    damaged shard ends with one :data:`SHARD_ERROR_KEY` row (see the module docstring). A shard that holds no
    sample at all yields one :data:`SHARD_ERROR_KEY` row saying so, so that every shard yields at least one row: the
    job learns that a shard is done from its last row. Raises :class:`ShardReadError` when storage refuses the shard.

    ``chunk_bytes`` is the size of each ranged read of a tar shard; ``read_concurrency`` is how many image files are
    fetched at once; ``id_column`` / ``image_column``, when given, override the columns frozen in the shard (the job
    passes none: the shard's frozen columns are what a resume must read).
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    if id_column is not None or image_column is not None:
        shard = replace(
            shard,
            id_column=id_column if id_column is not None else shard.id_column,
            image_column=image_column if image_column is not None else shard.image_column,
        )
    settings = ReadSettings(
        storage_options=storage_options,
        batch_rows=batch_rows,
        chunk_bytes=chunk_bytes,
        read_concurrency=read_concurrency,
    )
    empty = True
    for table in get_format(shard.format).read(shard, settings):
        empty = False
        yield table
    if empty:
        yield error_table(shard.uri, 0, "empty shard: it holds no samples")
