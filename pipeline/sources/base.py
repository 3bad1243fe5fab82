"""What every input format shares: the shard record, the sample schema, the errors, and the format interface.

A format is one module of this package holding one :class:`ShardFormat` subclass instance named ``FORMAT`` (the
shape of Ray Data's ``FileBasedDatasource``: the file extensions it claims, a planning hook and a read hook).
:mod:`pipeline.sources.registry` finds those modules, so adding a format touches one file. This module holds only
what the formats have in common; it does no I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, overload

import pyarrow as pa
from fsspec.core import split_protocol

from model.storage import StorageOptions

SHARD_ERROR_KEY = "<shard-error>"

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("ordinal", pa.int64(), nullable=False),
        pa.field("data", pa.binary()),
        pa.field("error", pa.string()),
    ]
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class InputError(ValueError):
    """The input spec names nothing readable: no such location, nothing matched, mixed formats, bad columns."""


class ShardReadError(OSError):
    """A planned shard cannot be opened or read for a storage reason (missing object, access denied, outage)."""


class SampleRow(NamedTuple):
    """One sample as a format reader yields it, before batching into :data:`SAMPLE_SCHEMA` tables."""

    key: str
    source: str
    data: bytes | None
    error: str | None


class Members(Sequence[str]):
    """The image paths of an ``images`` shard, held as a slice of one Arrow string array.

    Planning ten million loose images must not build ten million Python strings (about 90 bytes each): a shard keeps
    a zero-copy slice of the listing's array and turns one member into ``str`` only when it is read. It compares
    equal to a tuple of the same strings, so code that built shards from tuples keeps working.
    """

    __slots__ = ("_array",)

    def __init__(self, values: pa.Array | Iterable[str]) -> None:
        if isinstance(values, pa.ChunkedArray):
            values = single_array(values)
        if not isinstance(values, pa.Array):
            values = pa.array(list(values), pa.string())
        self._array = values

    @property
    def arrow(self) -> pa.Array:
        """The members as an Arrow string array (for compact plan storage)."""
        return self._array

    def __len__(self) -> int:
        return len(self._array)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Members: ...
    def __getitem__(self, index: int | slice) -> str | Members:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._array))
            if step != 1:
                return Members(list(self)[index])
            return Members(self._array.slice(start, stop - start))
        if index < 0:
            index += len(self._array)
        if not 0 <= index < len(self._array):
            raise IndexError("member index out of range")
        return str(self._array[index].as_py())

    def __iter__(self) -> Iterator[str]:
        for value in self._array:
            yield value.as_py()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Members):
            return self._array.equals(other._array)
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        shown = ", ".join(repr(member) for member in list(self._array[:3].to_pylist()))
        return f"Members([{shown}{', ...' if len(self) > 3 else ''}], {len(self)} members)"


@dataclass(frozen=True)
class Shard:
    """One unit of work, recorded in the job's plan so that a resumed job reads exactly the same inputs.

    ``uri`` is the shard file for file formats; for ``images`` it is the base URI that ``members`` (the image files,
    which are also the keys) are relative to, or ``""`` when the members are full URIs (list files). ``name`` is the
    file's path relative to the input (parquet row keys are built from it). ``id_column`` / ``image_column`` are the
    Parquet columns the user named, frozen here so that a resume reads what the first run read. ``bytes`` is the
    planned size (sum of the member sizes for ``images``; None when the listing did not say).
    """

    shard_id: str
    format: str
    uri: str
    name: str = ""
    members: Sequence[str] = ()
    id_column: str | None = None
    image_column: str | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        from pipeline.sources.registry import format_names

        if self.format not in format_names():
            raise ValueError(
                f"shard {self.shard_id!r}: unknown format {self.format!r}; expected one of {format_names()}"
            )
        if not isinstance(self.members, (tuple, Members)):
            object.__setattr__(self, "members", tuple(self.members))

    def member_uri(self, member: str) -> str:
        """The URI of one image of an ``images`` shard."""
        if not self.uri:
            return member
        return f"{self.uri.rstrip('/')}/{member}"

    def file_uris(self) -> tuple[str, ...]:
        """Every file this shard reads: the shard file, or each image of an ``images`` shard."""
        if self.format == "images":
            return tuple(self.member_uri(member) for member in self.members)
        return (self.uri,)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (``members`` as a list; ``bytes`` only when known, so older plans read back equal)."""
        record: dict[str, Any] = {
            "shard_id": self.shard_id,
            "format": self.format,
            "uri": self.uri,
            "name": self.name,
            "members": list(self.members),
            "id_column": self.id_column,
            "image_column": self.image_column,
        }
        if self.bytes is not None:
            record["bytes"] = self.bytes
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Shard:
        """Inverse of :meth:`to_dict`."""
        size = record.get("bytes")
        return cls(
            shard_id=str(record["shard_id"]),
            format=str(record["format"]),
            uri=str(record["uri"]),
            name=str(record.get("name", "")),
            members=tuple(record.get("members", ())),
            id_column=record.get("id_column"),
            image_column=record.get("image_column"),
            bytes=None if size is None else int(size),
        )


@dataclass(frozen=True)
class PlanSettings:
    """What planning needs besides the file list: how loose images are grouped and which Parquet columns to read."""

    images_per_shard: int = 10_000
    bytes_per_shard: int = 256 * 1024 * 1024
    id_column: str | None = None
    image_column: str | None = None
    storage_options: StorageOptions | None = None


@dataclass(frozen=True)
class ReadSettings:
    """How a shard is read: rows per yielded table, bytes per ranged request, concurrent image fetches."""

    storage_options: StorageOptions | None = None
    batch_rows: int = 256
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    read_concurrency: int = 8


class ShardFormat:
    """One input format: the file names it claims, how its files become shards, and how a shard is read.

    Subclasses set ``name`` and ``extensions`` and implement :meth:`read`; the default :meth:`plan` makes one shard
    per file, which suits container formats (a tar, a Parquet file).
    """

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]

    def claims(self, file_name: str) -> bool:
        """Whether a file with this name is of this format (case-insensitive extension match)."""
        return file_name.lower().endswith(self.extensions)

    def plan(self, base: str, files: pa.Table, settings: PlanSettings) -> list[Shard]:
        """``files`` has columns ``uri``, ``name`` (relative to the input) and ``size`` (int64, may be null), sorted."""
        return [
            Shard(shard_id=shard_id_for(name, uri), format=self.name, uri=uri, name=name)
            for uri, name in zip(files.column("uri").to_pylist(), files.column("name").to_pylist())
        ]

    def check(self, shards: Sequence[Shard], settings: PlanSettings) -> None:
        """Cheap checks at planning time (before Ray starts); raise :class:`InputError` naming the URI."""

    def read(self, shard: Shard, settings: ReadSettings) -> Iterator[pa.Table]:
        """Yield the shard's rows as :data:`SAMPLE_SCHEMA` tables of at most ``settings.batch_rows`` rows."""
        raise NotImplementedError


# ---- helpers shared by the formats ---------------------------------------------------------------------------------


def single_array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is, else the chunks combined.

    ``combine_chunks`` copies even a single chunk; on a listing of ten million URIs that is 400 MB more per call,
    and a shard's members would then keep the copy alive beside the listing's own array.
    """
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def extension(name: str) -> str:
    """``".jpg"`` for ``"a/b.v2.JPG"`` (lower-cased), ``""`` when the last path component has no dot."""
    basename = name.rsplit("/", 1)[-1]
    dot = basename.rfind(".")
    return basename[dot:].lower() if dot >= 0 else ""


def shard_id_for(name: str, uri: str) -> str:
    # The tail of the path is what tells shards apart; the hash of the full URI makes the id unique.
    readable = sanitize(name)[-80:].strip("._-")
    return f"{readable}-{short_hash(uri)}" if readable else short_hash(uri)


def sanitize(text: str) -> str:
    return _UNSAFE_ID_CHARS.sub("_", split_protocol(text)[1]).strip("._-")


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def shard_error(uri: str, problem: str) -> SampleRow:
    """The one row that stands for a shard's unreadable tail (see the package docstring)."""
    import logging

    logging.getLogger("pipeline.sources").warning("shard %s: %s", uri, problem)
    return SampleRow(SHARD_ERROR_KEY, uri, None, f"{problem} [{uri}]")


def error_table(uri: str, ordinal: int, problem: str) -> pa.Table:
    row = shard_error(uri, problem)
    return table([row.key], [row.source], [ordinal], [row.data], [row.error])


def batched(samples: Iterable[SampleRow | tuple[str, str, bytes | None, str | None]], batch_rows: int) -> Iterator[pa.Table]:
    """Number the samples ``0..n-1`` and pack them into tables of at most ``batch_rows`` rows."""
    columns: tuple[list[Any], ...] = ([], [], [], [], [])
    ordinal = 0
    for key, source, data, error in samples:
        for column, value in zip(columns, (key, source, ordinal, data, error)):
            column.append(value)
        ordinal += 1
        if len(columns[0]) == batch_rows:
            yield table(*columns)
            columns = ([], [], [], [], [])
    if columns[0]:
        yield table(*columns)


def table(keys: list[str], sources: list[str], ordinals: list[int], data: list[Any], errors: list[Any]) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array(sources, pa.string()),
            pa.array(ordinals, pa.int64()),
            pa.array(data, pa.binary()),
            pa.array(errors, pa.string()),
        ],
        schema=SAMPLE_SCHEMA,
    )


def is_whole_shard_failure(rows: pa.Table) -> bool:
    """True when a shard's complete output is one shard-error row and nothing else: no sample of it was read.

    Such a shard (not a tar, not Parquet, a column the file lacks) must not be committed as done: a rerun after the
    cause is fixed has to read it again. A shard with samples and a trailing shard-error row (a truncated tar) is
    committed: its samples are real and the damage is in the data.
    """
    if rows.num_rows != 1:
        return False
    return rows.column("key")[0].as_py() == SHARD_ERROR_KEY and not str(rows.column("error")[0].as_py()).startswith(
        "empty shard"
    )
