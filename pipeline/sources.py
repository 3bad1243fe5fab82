"""Input sources: find the input shards of a job, then read every sample out of them as Arrow rows.

Two halves, both pure Python and testable without Ray:

* :func:`plan_shards` turns the ``--input`` spec into a sorted, deterministic list of :class:`Shard` records (the
  units of work; the job records them as JSON to resume).
* :func:`read_shard` streams one shard as Arrow tables of at most ``batch_rows`` rows with the columns of
  :data:`SAMPLE_SCHEMA`: ``key``, ``source``, ``ordinal``, ``data`` (image bytes) and ``error``.

Input spec
    * a prefix: a local directory or an object-store prefix, listed recursively (``s3://bucket/shards/``);
    * a glob: ``s3://bucket/shards/*.tar``, ``data/**/*.parquet``;
    * a list file (``.txt`` / ``.lst``): one URI per line, blank lines and ``#`` comments ignored; relative entries
      are resolved against the list file's own directory (as playlists do), so a list stays valid wherever the job
      runs, and duplicate entries are read once;
    * a single shard or image file.

  Files and folders whose name starts with ``.`` or ``_`` (``_SUCCESS``, ``.DS_Store``, macOS ``._x.jpg``,
  Spark's ``_temporary/``) are skipped when a prefix or glob is listed, as pyarrow datasets do.

Formats, detected from file names unless ``format`` is given
    * ``webdataset``: ``.tar``, ``.tar.gz``, ``.tgz`` shards as img2dataset / webdataset write them;
    * ``parquet``: ``.parquet`` files with image bytes in a binary column or a Hugging Face image struct;
    * ``images``: plain image files (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``).

  Files with other names are ignored (img2dataset writes ``_stats.json`` next to its shards). More than one
  recognised format under one input is an error, because img2dataset folders hold both ``.tar`` shards and
  ``.parquet`` metadata: pass ``format`` to choose. A forced format takes the files named for it, plus, for
  inputs the user named one by one (a single file, a glob, a list file), files whose name says nothing.

The contract of :func:`read_shard`: every input sample yields exactly one row, and a bad sample never raises
    * webdataset: members are grouped into samples by key = member name minus its LAST extension
      (``a/b/img.v2.jpg`` -> ``a/b/img.v2``), consecutive members with the same key forming one sample. A sample's
      ``data`` is its first image member; sidecars (``.json``, ``.txt``, ``.cls``, ...) are not read. A sample with
      no image member is an error row ("no image member"). Keys are kept verbatim, also ``../../etc/passwd`` or
      ``/abs/x``: nothing is ever extracted to disk, so such names are only text. A repeated key is its own row
      each time: a sample ends when the key changes or when a member name repeats within it; non-consecutive
      duplicates are not merged. Directory members are skipped; links are not followed (no image member).
    * parquet: one row per Parquet row; key from ``id_column``, else ``f"{shard.name}#{row_index}"`` (unique
      in the job, since ``name`` is the file's path relative to the input); a null image is an error row
      ("null image bytes"); a null id falls back to the row-index key.
    * images: one row per file, key = path relative to the prefix or glob base, or the URI itself for list files;
      a file that cannot be read for a permanent reason (deleted since planning, access denied) is an error row.
    * zero-byte images are rows with ``data=b""`` and no error: turning them into error rows is the decoder's job.

Shard-level failures
    A shard whose content is unreadable (not a tar archive, a truncated or corrupt tar, not a Parquet file, a
    corrupt Parquet page) yields the samples read before the damage and then exactly ONE row with key
    :data:`SHARD_ERROR_KEY` (``"<shard-error>"``), ``source`` = the shard URI, the next ordinal, ``data`` null and an
    error naming the URI and the cause (``"truncated tar: ..."``). How many samples the unreadable tail held cannot
    be known, so that one row stands for all of them; a sample that was being read when the damage began is
    emitted normally if its image member was complete, otherwise it is part of the tail and its key is named in
    the error. A tar that ends without its end-of-archive marker is treated as truncated: its samples are kept,
    plus the error row. A shard with no samples at all (an empty tar or Parquet file) yields one such row too
    ("empty shard"), so every shard yields at least one row. One bad file never stops a job of millions of images.

    A shard that cannot be opened or read for a storage reason (object missing, access denied, transient errors
    that outlast the retries) raises :class:`ShardReadError`: that is not a property of the data, and the job
    should stop with a clear message rather than record a million error rows.

Storage access
    Every list, stat and read goes through :func:`model.storage.with_retries`. Shards are read with ranged
    requests (at most ``chunk_bytes`` per request, each retried on its own), so an endpoint that fails a fraction
    of requests or cuts responses short (checked against the requested length) cannot corrupt or stop a read, and
    memory stays bounded by one chunk plus one batch (plus one Parquet row group) whatever the shard size.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NoReturn, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.asyn import AsyncFileSystem
from fsspec.core import split_protocol
from fsspec.utils import glob_translate

from model.storage import StorageOptions, filesystem_for, is_transient, protocol_of, to_uri, with_retries
from pipeline.config import FORMATS

__all__ = [
    "DEFAULT_ID_COLUMNS",
    "DEFAULT_IMAGE_COLUMNS",
    "FORMATS",
    "SAMPLE_SCHEMA",
    "SHARD_ERROR_KEY",
    "InputError",
    "Shard",
    "ShardReadError",
    "format_of_name",
    "plan_shards",
    "read_shard",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
WEBDATASET_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTENSIONS = (".parquet",)
LIST_FILE_EXTENSIONS = (".txt", ".lst")

# Tried in order when the caller names no column; the first present with a usable type wins. Ids: img2dataset and
# webdataset keys first, then common id / file-name columns. Images: the Hugging Face ``image`` feature first, then
# img2dataset's ``jpg`` and other usual names.
DEFAULT_ID_COLUMNS = ("key", "__key__", "id", "image_id", "uid", "file_name", "filename", "path")
DEFAULT_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes", "data", "content")

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

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
_PARQUET_BUFFER_BYTES = 1024 * 1024
_MAX_REQUEST_BYTES = 64 * 1024 * 1024
_DRAIN_BYTES = 1024 * 1024
_GLOB_MAGIC = re.compile(r"[*?\[]")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

# What a damaged tar / gzip stream raises. Storage failures are told apart through _RangeReader.failure.
_TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class InputError(ValueError):
    """The input spec names nothing readable: no such location, nothing matched, mixed formats, bad columns."""


class ShardReadError(OSError):
    """A planned shard cannot be opened or read for a storage reason (missing object, access denied, outage)."""


def _retrying(operation: Callable[[], T], *, description: str) -> T:
    return with_retries(operation, description=description)


@dataclass(frozen=True)
class Shard:
    """One unit of work, recorded as JSON in the job's plan so that a resumed job reads exactly the same inputs.

    ``uri`` is the shard file for ``webdataset`` / ``parquet``; for ``images`` it is the base URI that ``members``
    (the image files, which are also the keys) are relative to, or ``""`` when the members are full URIs (list
    files). ``name`` is the file's path relative to the input (parquet row keys are built from it).
    """

    shard_id: str
    format: str
    uri: str
    name: str = ""
    members: tuple[str, ...] = ()
    id_column: str | None = None
    image_column: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"shard {self.shard_id!r}: unknown format {self.format!r}; expected one of {FORMATS}")

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
        """Plain JSON types only (``members`` as a list)."""
        record = asdict(self)
        record["members"] = list(self.members)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Shard:
        """Inverse of :meth:`to_dict`."""
        return cls(
            shard_id=str(record["shard_id"]),
            format=str(record["format"]),
            uri=str(record["uri"]),
            name=str(record.get("name", "")),
            members=tuple(record.get("members", ())),
            id_column=record.get("id_column"),
            image_column=record.get("image_column"),
        )


def format_of_name(name: str) -> str | None:
    """The format a file name implies (``"webdataset"``, ``"parquet"``, ``"images"``), or None."""
    lowered = name.lower()
    if lowered.endswith(WEBDATASET_EXTENSIONS):
        return "webdataset"
    if lowered.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if _extension(lowered) in IMAGE_EXTENSIONS:
        return "images"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    uri: str
    name: str  # relative to the input base; the URI itself for list-file entries


@dataclass
class _Listing:
    kind: str  # "prefix", "glob", "list" or "file"
    base: str  # URI the names are relative to; "" for list files
    candidates: list[_Candidate] = field(default_factory=list)

    @property
    def named_one_by_one(self) -> bool:
        return self.kind in ("glob", "list", "file")


def plan_shards(
    input_spec: str,
    *,
    format: str | None = None,  # noqa: A002 - the command line's word for it
    storage_options: StorageOptions | None = None,
    images_per_shard: int = 256,
    id_column: str | None = None,
    image_column: str | None = None,
) -> list[Shard]:
    """Find the input files named by ``input_spec`` and group them into shards, sorted and deterministic.

    Each tar or Parquet file is one shard; plain images are grouped ``images_per_shard`` at a time in key order.
    For Parquet, the first file's schema is checked now (one footer read), so that a wrong column name fails here
    with a clear message instead of turning every row of the job into an error. Raises :class:`InputError`, naming
    the URI, when the location does not exist, cannot be listed, or holds nothing to read.

    >>> plan_shards("s3://bucket/shards/*.tar")  # doctest: +SKIP
    [Shard(shard_id='00000.tar-1f3a...', format='webdataset', uri='s3://bucket/shards/00000.tar', ...), ...]
    """
    if format is not None and format not in FORMATS:
        raise InputError(f"unknown input format {format!r}; expected one of {', '.join(FORMATS)}")
    if images_per_shard < 1:
        raise InputError(f"images_per_shard must be at least 1, got {images_per_shard}")
    input_spec = input_spec.strip()
    if not input_spec:
        raise InputError("the input spec is empty; pass a prefix, a glob or a list file")

    listing = _list_input(input_spec, storage_options)
    chosen, selected = _select_files(input_spec, listing, format)
    if chosen == "images":
        return _image_shards(listing.base, selected, images_per_shard)
    shards = [
        Shard(
            shard_id=_shard_id(candidate.name, candidate.uri),
            format=chosen,
            uri=candidate.uri,
            name=candidate.name,
            id_column=id_column if chosen == "parquet" else None,
            image_column=image_column if chosen == "parquet" else None,
        )
        for candidate in selected
    ]
    if chosen == "parquet":
        _check_parquet_columns(shards[0], storage_options)
    logger.info("planned %d %s shards from %s", len(shards), chosen, input_spec)
    return shards


def _list_input(input_spec: str, storage_options: StorageOptions | None) -> _Listing:
    filesystem, path = filesystem_for(input_spec, storage_options)
    if _GLOB_MAGIC.search(path):
        return _list_glob(input_spec, filesystem, path)
    info = _stat_input(input_spec, filesystem, path)
    if info.get("type") == "directory":
        return _list_prefix(input_spec, filesystem, path)
    if path.lower().endswith(LIST_FILE_EXTENSIONS):
        return _list_file(input_spec, filesystem, path)
    parent, _, name = path.rstrip("/").rpartition("/")
    return _Listing("file", to_uri(filesystem, parent), [_Candidate(to_uri(filesystem, path), name)])


def _stat_input(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    # Forget cached listings: a plan must see the store as it is now, not as this process last listed it.
    filesystem.invalidate_cache(path)
    try:
        return _retrying(lambda: filesystem.info(path), description=f"looking up input {input_spec}")
    except FileNotFoundError as error:
        raise InputError(
            f"input {input_spec} does not exist (no such file, prefix or bucket: {error}); check the URI"
        ) from error
    except OSError as error:
        _raise_listing_error(input_spec, error)


def _raise_listing_error(input_spec: str, error: OSError) -> NoReturn:
    if is_transient(error):
        # The retries ran out: the store is unwell, the input may be fine; with_retries logged what it tried.
        raise error
    if isinstance(error, PermissionError):
        raise InputError(
            f"access denied listing input {input_spec}: {error}; check credentials or storage_options"
        ) from error
    raise InputError(f"cannot list input {input_spec}: {type(error).__name__}: {error}") from error


def _walk(input_spec: str, operation: Callable[[], Any]) -> Any:
    try:
        return _retrying(operation, description=f"listing input {input_spec}")
    except OSError as error:
        _raise_listing_error(input_spec, error)


def _list_prefix(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> _Listing:
    base = path.rstrip("/")
    found = _walk(input_spec, lambda: _find_files(filesystem, base))
    listing = _Listing("prefix", to_uri(filesystem, base))
    listing.candidates = _candidates(filesystem, base, found, lambda found_path: True)
    return listing


def _list_glob(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> _Listing:
    base = _glob_base(path)
    if not base:
        raise InputError(f"glob {input_spec} has no folder before its first wildcard; name at least the bucket")
    try:
        _stat_input(to_uri(filesystem, base), filesystem, base)
    except InputError as error:
        raise InputError(f"glob {input_spec} matches nothing: {error}") from error.__cause__
    # List the fixed folder and match here rather than calling filesystem.glob: fsspec's glob walks folder by folder
    # for patterns without "**", and its walk drops a folder whose listing fails, which would lose inputs silently.
    pattern = re.compile(glob_translate(path))
    found = _walk(input_spec, lambda: _find_files(filesystem, base))
    listing = _Listing("glob", to_uri(filesystem, base))
    listing.candidates = _candidates(filesystem, base, found, lambda found_path: bool(pattern.match(found_path)))
    return listing


def _find_files(filesystem: fsspec.AbstractFileSystem, base: str) -> dict[str, dict[str, Any]]:
    """Every file under ``base`` with its info. Raises on any listing failure, so that retries can see it."""
    walks = (
        type(filesystem)._find is AsyncFileSystem._find
        if isinstance(filesystem, AsyncFileSystem)
        else type(filesystem).find is fsspec.AbstractFileSystem.find
    )
    if walks:
        # The generic find walks folder by folder and by default skips folders it fails to list.
        return filesystem.find(base, detail=True, on_error="raise")
    # Object stores (s3fs, gcsfs, adlfs) list a prefix flatly and raise on failure; they also reject on_error.
    return filesystem.find(base, detail=True)


def _candidates(
    filesystem: fsspec.AbstractFileSystem,
    base: str,
    found: Mapping[str, Mapping[str, Any]],
    wanted: Callable[[str], bool],
) -> list[_Candidate]:
    candidates = []
    for found_path, info in sorted(found.items()):
        name = found_path[len(base) :].lstrip("/")
        if info.get("type") != "file" or not name or found_path.endswith("/") or _is_hidden(name):
            continue
        if wanted(found_path):
            candidates.append(_Candidate(to_uri(filesystem, found_path), name))
    return candidates


def _glob_base(path: str) -> str:
    """The folder part of a glob before its first magic component: ``b/shards/*/x*.tar`` -> ``b/shards``."""
    parts = path.split("/")
    fixed: list[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def _list_file(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> _Listing:
    try:
        raw = _retrying(lambda: filesystem.cat_file(path), description=f"reading list file {input_spec}")
    except OSError as error:
        _raise_listing_error(input_spec, error)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"list file {input_spec} is not UTF-8 text: {error}") from error
    list_dir = input_spec.rstrip("/").rpartition("/")[0] if "/" in input_spec else "."
    listing = _Listing("list", "")
    seen: set[str] = set()
    for line_number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        uri = _resolve_entry(entry, list_dir)
        if uri in seen:
            logger.warning("list file %s line %d repeats %s; reading it once", input_spec, line_number, uri)
            continue
        seen.add(uri)
        listing.candidates.append(_Candidate(uri, uri))
    listing.candidates.sort(key=lambda candidate: candidate.uri)
    return listing


def _resolve_entry(entry: str, list_dir: str) -> str:
    protocol, _ = split_protocol(entry)
    if protocol or entry.startswith("/"):
        uri = entry
    else:
        # Object stores have no "..", but a list that says "../shards/x.tar" means the folder above.
        list_protocol, list_path = split_protocol(list_dir)
        joined = posixpath.normpath(f"{list_path.rstrip('/')}/{entry}")
        uri = f"{list_protocol}://{joined}" if list_protocol else joined
    if protocol_of(uri) == "file":
        # Absolute and normalised, so that Ray workers with another working directory find the same file.
        filesystem, path = filesystem_for(uri)
        return to_uri(filesystem, path)
    return uri


def _select_files(input_spec: str, listing: _Listing, forced: str | None) -> tuple[str, list[_Candidate]]:
    by_format: dict[str | None, list[_Candidate]] = {}
    for candidate in listing.candidates:
        by_format.setdefault(format_of_name(candidate.name), []).append(candidate)
    unknown = by_format.pop(None, [])
    if forced is None:
        if len(by_format) > 1:
            counts = ", ".join(f"{len(files)} {fmt} (e.g. {files[0].uri})" for fmt, files in sorted(by_format.items()))
            raise InputError(f"input {input_spec} mixes formats: {counts}; pass format= to choose one")
        if not by_format:
            raise InputError(f"no input files found in {input_spec}{_ignored_note(unknown)}")
        chosen, selected = next(iter(by_format.items()))
    else:
        chosen = forced
        selected = list(by_format.pop(forced, []))
        if listing.named_one_by_one:
            selected.extend(unknown)
            unknown = []
        if not selected:
            raise InputError(f"no {forced} files found in {input_spec}{_ignored_note(unknown)}")
        selected.sort(key=lambda candidate: candidate.uri)
    ignored = len(listing.candidates) - len(selected)
    if ignored:
        logger.info("input %s: reading %d %s files, ignoring %d others", input_spec, len(selected), chosen, ignored)
    return chosen, selected


def _ignored_note(unknown: Sequence[_Candidate]) -> str:
    if not unknown:
        return " (it is empty)"
    return (
        f" ({len(unknown)} files with unrecognised names, e.g. {unknown[0].uri}; "
        f"pass format= to read them as one of {', '.join(FORMATS)})"
    )


def _image_shards(base: str, selected: Sequence[_Candidate], images_per_shard: int) -> list[Shard]:
    members = sorted(candidate.name for candidate in selected)
    shards = []
    for index, start in enumerate(range(0, len(members), images_per_shard)):
        chunk = tuple(members[start : start + images_per_shard])
        digest = _short_hash("\n".join((base, *chunk)))
        readable = _sanitize(chunk[0])[-60:].strip("._-")
        shard_id = f"images-{index:06d}-{readable}-{digest}" if readable else f"images-{index:06d}-{digest}"
        shards.append(Shard(shard_id=shard_id, format="images", uri=base, members=chunk))
    logger.info("planned %d images shards (%d images) under %s", len(shards), len(members), base or "a list file")
    return shards


def _shard_id(name: str, uri: str) -> str:
    # The tail of the path is what tells shards apart; the hash of the full URI makes the id unique.
    readable = _sanitize(name)[-80:].strip("._-")
    return f"{readable}-{_short_hash(uri)}" if readable else _short_hash(uri)


def _sanitize(text: str) -> str:
    return _UNSAFE_ID_CHARS.sub("_", split_protocol(text)[1]).strip("._-")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def _is_hidden(relative_name: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative_name.split("/") if part)


def _extension(name: str) -> str:
    """``".jpg"`` for ``"a/b.v2.JPG"`` (lower-cased), ``""`` when the last path component has no dot."""
    basename = name.rsplit("/", 1)[-1]
    dot = basename.rfind(".")
    return basename[dot:].lower() if dot >= 0 else ""


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


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
    sample at all (an empty tar or Parquet file) yields one :data:`SHARD_ERROR_KEY` row saying so, so that every
    shard yields at least one row: the job learns that a shard is done from its last row. Raises
    :class:`ShardReadError` when storage refuses the shard.

    ``chunk_bytes`` is the size of each ranged read of a tar shard; ``read_concurrency`` is how many image files of
    an ``images`` shard are fetched at once; ``id_column`` / ``image_column``, when given, override the shard's
    Parquet columns.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    if shard.format == "parquet":
        if id_column is not None or image_column is not None:
            shard = replace(
                shard,
                id_column=id_column if id_column is not None else shard.id_column,
                image_column=image_column if image_column is not None else shard.image_column,
            )
        tables: Iterator[pa.Table] = _read_parquet(shard, storage_options, batch_rows)
    elif shard.format == "webdataset":
        tables = _batched(_tar_samples(shard, storage_options, chunk_bytes), batch_rows)
    else:
        tables = _batched(_image_samples(shard, storage_options, batch_rows, read_concurrency), batch_rows)
    empty = True
    for table in tables:
        empty = False
        yield table
    if empty:
        yield _error_table(shard.uri, 0, "empty shard: it holds no samples")


def _batched(samples: Iterable[tuple[str, str, bytes | None, str | None]], batch_rows: int) -> Iterator[pa.Table]:
    columns: tuple[list[Any], ...] = ([], [], [], [], [])
    ordinal = 0
    for key, source, data, error in samples:
        for column, value in zip(columns, (key, source, ordinal, data, error)):
            column.append(value)
        ordinal += 1
        if len(columns[0]) == batch_rows:
            yield _table(*columns)
            columns = ([], [], [], [], [])
    if columns[0]:
        yield _table(*columns)


def _table(keys: list[str], sources: list[str], ordinals: list[int], data: list[Any], errors: list[Any]) -> pa.Table:
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


class _RangeReader(io.RawIOBase):
    """A seekable, read-only view of one stored object, read with ranged requests that are each retried.

    A response shorter than requested counts as a transient failure and is retried, so a connection cut mid-body
    can never pass for the end of the object. The first storage error that outlasts the retries is kept in
    ``failure``: libraries in between (tarfile, pyarrow) may re-wrap it as a data error, and the caller must not
    mistake an outage for a corrupt shard.
    """

    def __init__(self, filesystem: fsspec.AbstractFileSystem, path: str, uri: str, size: int) -> None:
        super().__init__()
        self._filesystem = filesystem
        self._path = path
        self._uri = uri
        self._size = size
        self._position = 0
        self.failure: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, origin + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        start = self._position
        end = min(start + len(buffer), self._size, start + _MAX_REQUEST_BYTES)
        if end <= start:
            return 0
        try:
            data = _retrying(
                lambda: _fetch_range(self._filesystem, self._path, start, end),
                description=f"reading {self._uri} [{start}:{end}]",
            )
        except Exception as error:  # noqa: BLE001 - recorded (see the class docstring), then re-raised
            if isinstance(error, OSError) or is_transient(error):
                self.failure = ShardReadError(f"cannot read {self._uri} (bytes {start}-{end}): {error}")
                raise self.failure from error
            self.failure = error  # not a storage error: a bug, raised unchanged
            raise
        memoryview(buffer).cast("B")[: len(data)] = data
        self._position = end
        return len(data)

    def raise_if_failed(self) -> None:
        """Re-raise the storage failure behind a data error, if there was one."""
        if self.failure is not None:
            if isinstance(self.failure, ShardReadError):
                raise self.failure
            raise ShardReadError(f"cannot read {self._uri}: {self.failure}") from self.failure


def _fetch_range(filesystem: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of an object; a shorter answer raises a transient error, to be retried."""
    data = filesystem.cat_file(path, start=start, end=end)
    if len(data) != end - start:
        raise ConnectionError(f"short read: got {len(data)} of {end - start} bytes (connection cut?)")
    return data


def _open_object(uri: str, storage_options: StorageOptions | None) -> _RangeReader:
    filesystem, path = filesystem_for(uri, storage_options)
    filesystem.invalidate_cache(path)  # the size must be the object's now, not a listing's from earlier
    try:
        info = _retrying(lambda: filesystem.info(path), description=f"opening shard {uri}")
    except FileNotFoundError as error:
        raise ShardReadError(f"shard {uri} does not exist (deleted since planning?): {error}") from error
    except PermissionError as error:
        raise ShardReadError(f"access denied opening shard {uri}: {error}") from error
    except OSError as error:
        raise ShardReadError(f"cannot open shard {uri}: {type(error).__name__}: {error}") from error
    if info.get("type") != "file":
        raise ShardReadError(f"shard {uri} is not a file (type {info.get('type')!r})")
    return _RangeReader(filesystem, path, uri, int(info.get("size") or 0))


def _shard_error(uri: str, problem: str) -> tuple[str, str, None, str]:
    logger.warning("shard %s: %s", uri, problem)
    return (SHARD_ERROR_KEY, uri, None, f"{problem} [{uri}]")


# ---- webdataset ----------------------------------------------------------------------------------------------------


class _ReadRecorder:
    """File-like pass-through that remembers the last small read, so the block that ended a tar can be checked.

    tarfile stops quietly at a truncated or corrupt header after the first member; the last 512-byte read tells
    whether it stopped at a real end-of-archive marker. Keeping it here avoids seeking back, which on a gzip
    stream would mean decompressing the shard again from the start.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.last_read: tuple[int, bytes] | None = None

    def read(self, size: int = -1) -> bytes:
        start = self._stream.tell()
        data = self._stream.read(size)
        if 0 <= size <= tarfile.BLOCKSIZE:
            self.last_read = (start, data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def block_at(self, offset: int) -> bytes:
        if self.last_read is not None and self.last_read[0] == offset:
            return self.last_read[1]
        self.seek(offset)
        return self.read(tarfile.BLOCKSIZE)


@dataclass
class _Sample:
    key: str
    member_names: list[str] = field(default_factory=list)
    image: bytes | None = None


def _member_key(name: str) -> str:
    """The key of a tar member: its name minus the last extension (``a/b/img.v2.jpg`` -> ``a/b/img.v2``)."""
    slash = name.rfind("/")
    dot = name.rfind(".")
    return name[:dot] if dot > slash else name


def _tar_samples(
    shard: Shard, storage_options: StorageOptions | None, chunk_bytes: int
) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    uri = shard.uri
    raw = _open_object(uri, storage_options)
    buffered = io.BufferedReader(raw, buffer_size=chunk_bytes)
    compressed = buffered.peek(2)[:2] == b"\x1f\x8b"  # gzip magic: trust the bytes, not the file name
    stream: Any = gzip.GzipFile(fileobj=buffered, mode="rb") if compressed else buffered
    recorder = _ReadRecorder(stream)

    def finish(sample: _Sample) -> tuple[str, str, bytes | None, str | None]:
        if sample.image is None:
            members = ", ".join(sample.member_names)
            return (sample.key, uri, None, f"no image member for key {sample.key!r} in {uri} (members: {members})")
        return (sample.key, uri, sample.image, None)

    try:
        # Names are UTF-8 whatever the worker's locale; undecodable bytes survive as surrogates (see _printable).
        archive = tarfile.TarFile(
            fileobj=recorder, mode="r", encoding="utf-8", errors="surrogateescape"  # type: ignore[arg-type]
        )
    except _TAR_DATA_ERRORS as error:
        raw.raise_if_failed()
        yield _shard_error(uri, f"not a readable tar archive: {type(error).__name__}: {error}")
        return

    current: _Sample | None = None
    count = 0
    problem: str | None = None
    try:
        while True:
            member = archive.next()
            # tarfile keeps every header it has seen; a shard may hold 100k members and we never look back.
            archive.members.clear()
            if member is None:
                break
            if member.isdir():
                continue
            name = _printable(member.name)
            key = _member_key(name)
            if current is not None and (key != current.key or name in current.member_names):
                yield finish(current)
                count += 1
                current = None
            if current is None:
                current = _Sample(key)
            current.member_names.append(name)
            if member.isfile() and _extension(name) in IMAGE_EXTENSIONS:
                if current.image is None:
                    current.image = _read_member(archive, recorder, member)
                else:
                    logger.debug("%s: key %r has a second image member %s; using the first", uri, key, name)
        end_block = recorder.block_at(archive.offset)
        if len(end_block) == 0:
            problem = f"truncated tar: the archive ends at byte {archive.offset} without an end-of-archive marker"
        elif len(end_block) < tarfile.BLOCKSIZE or end_block.count(0) != tarfile.BLOCKSIZE:
            problem = f"truncated tar: unreadable member header at byte {archive.offset}"
        elif compressed:
            # Read the gzip stream to its end so that its CRC and length trailer are checked: deflate data has no
            # checksum of its own, and what follows the end marker is at most a record of zero padding.
            while stream.read(_DRAIN_BYTES):
                pass
    except _TAR_DATA_ERRORS as error:
        raw.raise_if_failed()
        problem = f"truncated tar: {type(error).__name__}: {error}"
    if current is not None:
        if problem is None or current.image is not None:
            yield finish(current)
            count += 1
        else:
            problem += f" (sample {current.key!r} was cut short and is lost with the rest)"
    if problem is not None:
        yield _shard_error(uri, f"{problem}; {count} samples were read before it")


def _printable(name: str) -> str:
    """A member name as valid UTF-8: tarfile keeps undecodable bytes as surrogates, which Arrow refuses."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def _read_member(archive: tarfile.TarFile, recorder: _ReadRecorder, member: tarfile.TarInfo) -> bytes:
    if member.issparse():
        extracted = archive.extractfile(member)
        assert extracted is not None  # a regular file always has data
        return extracted.read()
    # Straight from the stream: one read per member instead of tarfile's 8 KiB steps.
    recorder.seek(member.offset_data)
    data = recorder.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of data in member {member.name!r}")
    return data


# ---- parquet -------------------------------------------------------------------------------------------------------


def _read_parquet(shard: Shard, storage_options: StorageOptions | None, batch_rows: int) -> Iterator[pa.Table]:
    uri = shard.uri
    raw = _open_object(uri, storage_options)
    ordinal = 0
    try:
        parquet_file = pq.ParquetFile(io.BufferedReader(raw, buffer_size=_PARQUET_BUFFER_BYTES))
    except (pa.ArrowException, OSError) as error:
        raw.raise_if_failed()
        yield _error_table(uri, ordinal, f"not a readable Parquet file: {type(error).__name__}: {error}")
        return
    try:
        id_column, image_column = _parquet_columns(parquet_file.schema_arrow, shard, uri)
    except InputError as error:
        yield _error_table(uri, ordinal, str(error))
        return
    columns = [image_column] if id_column is None else [id_column, image_column]
    try:
        for batch in parquet_file.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            if batch.num_rows == 0:
                continue
            yield _parquet_rows(batch, shard, id_column, image_column, ordinal)
            ordinal += batch.num_rows
    except (pa.ArrowException, OSError) as error:
        raw.raise_if_failed()
        problem = f"corrupt Parquet data: {type(error).__name__}: {error}; {ordinal} rows were read before it"
        yield _error_table(uri, ordinal, problem)


def _parquet_rows(
    batch: pa.RecordBatch, shard: Shard, id_column: str | None, image_column: str, first_ordinal: int
) -> pa.Table:
    count = batch.num_rows
    row_numbers = range(first_ordinal, first_ordinal + count)
    images = batch.column(image_column)
    if pa.types.is_struct(images.type):
        images = pc.struct_field(images, "bytes")
    data = images.cast(pa.binary())
    fallback_keys = pa.array([f"{shard.name}#{row}" for row in row_numbers], pa.string())
    if id_column is None:
        keys = fallback_keys
    else:
        keys = pc.coalesce(batch.column(id_column).cast(pa.string()), fallback_keys)
    null_message = f"null image bytes in column {image_column!r} [{shard.uri}]"
    errors = pa.array([null_message if missing else None for missing in data.is_null().to_pylist()], pa.string())
    return pa.Table.from_arrays(
        [keys, pa.array([shard.uri] * count, pa.string()), pa.array(row_numbers, pa.int64()), data, errors],
        schema=SAMPLE_SCHEMA,
    )


def _error_table(uri: str, ordinal: int, problem: str) -> pa.Table:
    key, source, data, error = _shard_error(uri, problem)
    return _table([key], [source], [ordinal], [data], [error])


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


def _check_parquet_columns(shard: Shard, storage_options: StorageOptions | None) -> None:
    raw = _open_object(shard.uri, storage_options)
    try:
        schema = pq.read_schema(io.BufferedReader(raw, buffer_size=_PARQUET_BUFFER_BYTES))
    except (pa.ArrowException, OSError) as error:
        raw.raise_if_failed()
        # A corrupt first file is one error row at read time; do not let it block the plan of the others.
        logger.warning("cannot read the schema of %s to check columns: %s", shard.uri, error)
        return
    _parquet_columns(schema, shard, shard.uri)


# ---- images --------------------------------------------------------------------------------------------------------


def _image_samples(
    shard: Shard, storage_options: StorageOptions | None, batch_rows: int, read_concurrency: int
) -> Iterator[tuple[str, str, bytes | None, str | None]]:
    def fetch(member: str) -> tuple[str, str, bytes | None, str | None]:
        uri = shard.member_uri(member)
        filesystem, path = filesystem_for(uri, storage_options)
        try:
            # The size first, so that a response cut short is caught and retried like any other transient failure.
            info = _retrying(lambda: filesystem.info(path), description=f"looking up image {uri}")
            if info.get("type") != "file":
                return (member, uri, None, f"cannot read image {uri}: not a file (type {info.get('type')!r})")
            size = int(info.get("size") or 0)
            data = (
                _retrying(lambda: _fetch_range(filesystem, path, 0, size), description=f"reading image {uri}")
                if size
                else b""
            )
        except OSError as error:
            if is_transient(error):
                raise ShardReadError(f"cannot read image {uri}: retries exhausted: {error}") from error
            return (member, uri, None, f"cannot read image {uri}: {type(error).__name__}: {error}")
        except Exception as error:  # noqa: BLE001 - client errors that are not OSError (aiohttp's); others re-raised
            if not is_transient(error):
                raise
            raise ShardReadError(f"cannot read image {uri}: retries exhausted: {error}") from error
        return (member, uri, data, None)

    with ThreadPoolExecutor(max_workers=max(1, read_concurrency)) as pool:
        for start in range(0, len(shard.members), batch_rows):
            yield from pool.map(fetch, shard.members[start : start + batch_rows])
