"""Parquet files: one sample per row, image bytes in a binary column or a Hugging Face ``Image`` struct.

The ``Image`` feature of Hugging Face ``datasets`` is stored as a struct ``{bytes, path}``. A data set built from
file paths is written with ``bytes`` null and ``path`` set (``datasets`` reads it back by opening the path), so a
null ``bytes`` with a ``path`` is read from that path: relative paths are relative to the Parquet file's folder,
absolute paths and URIs are used as they are. A row whose image cannot be found is an error row naming the path.

Keys come from ``id_column`` (given, or the first usable of :data:`DEFAULT_ID_COLUMNS`), else
``f"{shard.name}#{row_index}"``. The columns the user named are checked on the first file before Ray starts
(:meth:`ParquetFormat.check`); a later file that lacks them yields one error row per row it holds (the count comes
from its footer), so every sample is accounted for.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import split_protocol

from model.storage import StorageOptions
from pipeline.sources.base import (
    SAMPLE_SCHEMA,
    InputError,
    PlanSettings,
    ReadSettings,
    Shard,
    ShardFormat,
    error_table,
    shard_id_for,
    table,
)
from pipeline.sources.ranged import open_object, read_whole_file

logger = logging.getLogger(__name__)

# Tried in order when the caller names no column; the first present with a usable type wins. Ids: img2dataset and
# webdataset keys first, then common id / file-name columns. Images: the Hugging Face ``image`` feature first, then
# img2dataset's ``jpg`` and other usual names.
DEFAULT_ID_COLUMNS = ("key", "__key__", "id", "image_id", "uid", "file_name", "filename", "path")
DEFAULT_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes", "data", "content")

PARQUET_BUFFER_BYTES = 1024 * 1024


class ParquetFormat(ShardFormat):
    name = "parquet"
    extensions = (".parquet",)

    def plan(self, base: str, files: pa.Table, settings: PlanSettings) -> list[Shard]:
        return [
            Shard(
                shard_id=shard_id_for(name, uri),
                format=self.name,
                uri=uri,
                name=name,
                id_column=settings.id_column,
                image_column=settings.image_column,
            )
            for uri, name in zip(files.column("uri").to_pylist(), files.column("name").to_pylist())
        ]

    def check(self, shards: Sequence[Shard], settings: PlanSettings) -> None:
        # One footer read: a wrong column name fails the plan, before Ray starts, naming the file and its columns.
        check_parquet_columns(shards[0], settings.storage_options)

    def read(self, shard: Shard, settings: ReadSettings) -> Iterator[pa.Table]:
        return read_parquet(shard, settings)


FORMAT = ParquetFormat()


def _struct_bytes(images: pa.Array, shard: Shard, settings: ReadSettings) -> tuple[pa.Array, dict[int, str]]:
    """The ``bytes`` of an image struct column, filled from ``path`` where ``bytes`` is null; errors by row index."""
    data = pc.struct_field(images, "bytes").cast(pa.binary())
    if images.type.get_field_index("path") < 0:
        return data, {}
    paths = pc.struct_field(images, "path").to_pylist()
    missing = [
        row for row, (value, path) in enumerate(zip(data.to_pylist(), paths)) if value is None and path
    ]
    if not missing:
        return data, {}
    folder = shard.uri.rsplit("/", 1)[0] if "/" in shard.uri else "."
    uris = {row: resolve_image_path(str(paths[row]), folder) for row in missing}
    with ThreadPoolExecutor(max_workers=max(1, settings.read_concurrency)) as pool:
        fetched = dict(zip(missing, pool.map(lambda row: read_whole_file(uris[row], settings.storage_options), missing)))
    values = data.to_pylist()
    errors: dict[int, str] = {}
    for row, (content, reason) in fetched.items():
        if content is None:
            errors[row] = f"image path {paths[row]!r} of row {row} in {shard.uri}: {reason}"
        else:
            values[row] = content
    return pa.array(values, pa.binary()), errors


def resolve_image_path(path: str, parquet_folder: str) -> str:
    """A struct's ``path`` as a URI: URIs and absolute paths as they are, others relative to the Parquet folder."""
    protocol, _ = split_protocol(path)
    if protocol or path.startswith("/"):
        return path
    folder_protocol, folder_path = split_protocol(parquet_folder)
    joined = posixpath.normpath(f"{folder_path.rstrip('/')}/{path}")
    return f"{folder_protocol}://{joined}" if folder_protocol else joined


def read_parquet(shard: Shard, settings: ReadSettings) -> Iterator[pa.Table]:
    storage_options, batch_rows = settings.storage_options, settings.batch_rows
    uri = shard.uri
    raw = open_object(uri, storage_options)
    ordinal = 0
    try:
        parquet_file = pq.ParquetFile(io.BufferedReader(raw, buffer_size=PARQUET_BUFFER_BYTES))
    except (pa.ArrowException, OSError) as error:
        raw.raise_if_failed()
        yield error_table(uri, ordinal, f"not a readable Parquet file: {type(error).__name__}: {error}")
        return
    try:
        id_column, image_column = _parquet_columns(parquet_file.schema_arrow, shard, uri)
    except InputError as error:
        # The rows are there, only the column is not: account for each of them (the count is in the footer), so that
        # the error budget sees the real number of failed samples and not one row standing in for a whole file.
        rows = parquet_file.metadata.num_rows
        if rows == 0:
            yield error_table(uri, ordinal, str(error))
            return
        for start in range(0, rows, batch_rows):
            stop = min(rows, start + batch_rows)
            yield table(
                [f"{shard.name}#{row}" for row in range(start, stop)],
                [uri] * (stop - start),
                list(range(start, stop)),
                [None] * (stop - start),
                [str(error)] * (stop - start),
            )
        return
    columns = [image_column] if id_column is None else [id_column, image_column]
    try:
        for batch in parquet_file.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            if batch.num_rows == 0:
                continue
            yield _parquet_rows(batch, shard, id_column, image_column, ordinal, settings)
            ordinal += batch.num_rows
    except (pa.ArrowException, OSError) as error:
        raw.raise_if_failed()
        problem = f"corrupt Parquet data: {type(error).__name__}: {error}; {ordinal} rows were read before it"
        yield error_table(uri, ordinal, problem)


def _parquet_rows(
    batch: pa.RecordBatch,
    shard: Shard,
    id_column: str | None,
    image_column: str,
    first_ordinal: int,
    settings: ReadSettings,
) -> pa.Table:
    count = batch.num_rows
    row_numbers = range(first_ordinal, first_ordinal + count)
    images = batch.column(image_column)
    fetch_errors: dict[int, str] = {}
    if pa.types.is_struct(images.type):
        data, fetch_errors = _struct_bytes(images, shard, settings)
    else:
        data = images.cast(pa.binary())
    fallback_keys = pa.array([f"{shard.name}#{row}" for row in row_numbers], pa.string())
    if id_column is None:
        keys = fallback_keys
    else:
        keys = pc.coalesce(batch.column(id_column).cast(pa.string()), fallback_keys)
    null_message = f"null image bytes in column {image_column!r} [{shard.uri}]"
    errors = pa.array(
        [
            fetch_errors.get(row, null_message) if missing else None
            for row, missing in enumerate(data.is_null().to_pylist())
        ],
        pa.string(),
    )
    return pa.Table.from_arrays(
        [keys, pa.array([shard.uri] * count, pa.string()), pa.array(row_numbers, pa.int64()), data, errors],
        schema=SAMPLE_SCHEMA,
    )


def _is_image_type(data_type: pa.DataType) -> bool:
    if pa.types.is_struct(data_type):
        index = data_type.get_field_index("bytes")
        return index >= 0 and _is_image_type(data_type.field(index).type)
    return _type_is(data_type, "is_binary", "is_large_binary", "is_binary_view", "is_fixed_size_binary")


def _is_id_type(data_type: pa.DataType) -> bool:
    return _type_is(data_type, "is_string", "is_large_string", "is_string_view", "is_integer")


def _type_is(data_type: pa.DataType, *predicates: str) -> bool:
    # getattr: the view types only exist in pyarrow >= 16, and the project supports older releases.
    return any(getattr(pa.types, predicate, lambda _: False)(data_type) for predicate in predicates)


def _parquet_columns(schema: pa.Schema, shard: Shard, uri: str) -> tuple[str | None, str]:
    """Resolve ``(id_column, image_column)`` for one file; InputError names the file and its columns."""
    available = ", ".join(f"{name}: {schema.field(name).type}" for name in schema.names)
    if shard.image_column is not None:
        if shard.image_column not in schema.names:
            raise InputError(f"image column {shard.image_column!r} not in {uri} (columns: {available})")
        if not _is_image_type(schema.field(shard.image_column).type):
            raise InputError(
                f"image column {shard.image_column!r} in {uri} is {schema.field(shard.image_column).type}; "
                "expected binary or a struct with a binary 'bytes' field"
            )
        image_column = shard.image_column
    else:
        usable = [
            name for name in DEFAULT_IMAGE_COLUMNS if name in schema.names and _is_image_type(schema.field(name).type)
        ]
        if not usable:
            raise InputError(
                f"no image column in {uri}: none of {', '.join(DEFAULT_IMAGE_COLUMNS)} is binary or an image struct "
                f"(columns: {available}); pass image_column="
            )
        image_column = usable[0]
    if shard.id_column is not None:
        if shard.id_column not in schema.names:
            raise InputError(f"id column {shard.id_column!r} not in {uri} (columns: {available})")
        return shard.id_column, image_column
    ids = [
        name
        for name in DEFAULT_ID_COLUMNS
        if name in schema.names and name != image_column and _is_id_type(schema.field(name).type)
    ]
    return (ids[0] if ids else None), image_column


def check_parquet_columns(shard: Shard, storage_options: StorageOptions | None) -> None:
    raw = open_object(shard.uri, storage_options)
    try:
        schema = pq.read_schema(io.BufferedReader(raw, buffer_size=PARQUET_BUFFER_BYTES))
    except (pa.ArrowException, OSError) as error:
        raw.raise_if_failed()
        # A corrupt first file is one error row at read time; do not let it block the plan of the others.
        logger.warning("cannot read the schema of %s to check columns: %s", shard.uri, error)
        return
    _parquet_columns(schema, shard, shard.uri)

