"""Listing: turn an ``--input`` spec (prefix, glob, list file, single file) into a table of candidate files.

The result is an Arrow table (``uri``, ``name`` relative to the input, ``size`` or null), never a Python object
per file: a list file of ten million URIs stays a few hundred MB of Arrow buffers, parsed, resolved, sorted and
de-duplicated by Arrow's compute kernels.

What is skipped, and said: when a prefix or glob is listed, files inside folders whose name starts with ``.`` or
``_`` (``.git/``, Spark's ``_temporary/``) and files whose own name starts with ``.`` (``.DS_Store``, macOS
``._photo.jpg`` resource forks) are skipped, as pyarrow datasets do, and their count and first names are logged.
Files whose name starts with ``_`` are NOT skipped for that: ``_DSC0001.JPG`` is what cameras write, and
``_SUCCESS`` or ``_stats.json`` are dropped anyway by the format check (and named in the log as ignored).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io
import logging
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from fsspec.asyn import AsyncFileSystem
from fsspec.core import split_protocol
from fsspec.utils import glob_translate

from model.storage import (
    StorageOptions,
    filesystem_for,
    is_transient,
    protocol_of,
    to_uri,
)
from pipeline.sources.base import InputError, ShardReadError
from pipeline.sources.ranged import RangeReader, retrying

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Hand the pages that freed buffers left behind back to the system: Arrow's pool, and the C heap.

    Why: reading a list file streams it through Python bytes and Arrow blocks of 8-16 MB; once freed, glibc keeps
    such buffers in its heap (its mmap threshold rises to their size), where they fragment and count in the RSS.
    Measured on a 10,000,000-URI list: the parse peaked at 1,007 MiB, of which ~420 MiB were the URIs themselves;
    releasing after each block it peaked at 644 MiB, and the sort of a permuted list that follows peaked at 1,015 MiB
    instead of 1,258.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


LIST_FILE_EXTENSIONS = (".txt", ".lst")
GLOB_MAGIC = re.compile(r"[*?\[]")
FILES_SCHEMA = pa.schema([("uri", pa.string()), ("name", pa.string()), ("size", pa.int64())])
_EXAMPLES = 5


@dataclass
class Listing:
    kind: str  # "prefix", "glob", "list" or "file"
    base: str  # URI the names are relative to; "" for list files
    files: pa.Table  # FILES_SCHEMA, sorted by name

    @property
    def named_one_by_one(self) -> bool:
        return self.kind in ("glob", "list", "file")


def list_input(input_spec: str, storage_options: StorageOptions | None) -> Listing:
    filesystem, path = filesystem_for(input_spec, storage_options)
    if GLOB_MAGIC.search(path):
        return _list_glob(input_spec, filesystem, path)
    info = _stat_input(input_spec, filesystem, path)
    if info.get("type") == "directory":
        return _list_prefix(input_spec, filesystem, path)
    if path.lower().endswith(LIST_FILE_EXTENSIONS):
        return _list_file(input_spec, filesystem, path)
    parent, _, name = path.rstrip("/").rpartition("/")
    size = info.get("size")
    files = pa.Table.from_pylist(
        [{"uri": to_uri(filesystem, path), "name": name, "size": None if size is None else int(size)}],
        schema=FILES_SCHEMA,
    )
    return Listing("file", to_uri(filesystem, parent), files)


def _stat_input(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    # Forget cached listings: a plan must see the store as it is now, not as this process last listed it.
    filesystem.invalidate_cache(path)
    try:
        return retrying(lambda: filesystem.info(path), description=f"looking up input {input_spec}")
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
        return retrying(operation, description=f"listing input {input_spec}")
    except OSError as error:
        _raise_listing_error(input_spec, error)


def _list_prefix(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> Listing:
    base = path.rstrip("/")
    found = _walk(input_spec, lambda: _find_files(filesystem, base))
    return Listing("prefix", to_uri(filesystem, base), _files(input_spec, filesystem, base, found, lambda _: True))


def _list_glob(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> Listing:
    base = glob_base(path)
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
    files = _files(input_spec, filesystem, base, found, lambda found_path: bool(pattern.match(found_path)))
    return Listing("glob", to_uri(filesystem, base), files)


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


def _files(
    input_spec: str,
    filesystem: fsspec.AbstractFileSystem,
    base: str,
    found: Mapping[str, Mapping[str, Any]],
    wanted: Callable[[str], bool],
) -> pa.Table:
    uris: list[str] = []
    names: list[str] = []
    sizes: list[int | None] = []
    hidden: list[str] = []
    for found_path, info in sorted(found.items()):
        name = found_path[len(base) :].lstrip("/")
        if info.get("type") != "file" or not name or found_path.endswith("/") or not wanted(found_path):
            continue
        if is_hidden(name):
            hidden.append(name)
            continue
        size = info.get("size")
        uris.append(to_uri(filesystem, found_path))
        names.append(name)
        sizes.append(None if size is None else int(size))
    if hidden:
        logger.info(
            "input %s: skipped %d hidden file(s) (a name or folder starting with '.', or a folder starting with '_'): %s",
            input_spec, len(hidden), examples(hidden),
        )
    return pa.Table.from_arrays(
        [pa.array(uris, pa.string()), pa.array(names, pa.string()), pa.array(sizes, pa.int64())], schema=FILES_SCHEMA
    )


def is_hidden(relative_name: str) -> bool:
    """Hidden: inside a ``.``/``_`` folder, or a file named ``.x``. ``_DSC0001.JPG`` is not hidden."""
    *folders, file_name = [part for part in relative_name.split("/") if part]
    return file_name.startswith(".") or any(part.startswith((".", "_")) for part in folders)


def examples(names: Iterable[str]) -> str:
    shown: list[str] = []
    total = 0
    for name in names:
        total += 1
        if len(shown) < _EXAMPLES:
            shown.append(name)
    return ", ".join(shown) + (f", ... ({total - _EXAMPLES} more)" if total > _EXAMPLES else "")


def glob_base(path: str) -> str:
    """The folder part of a glob before its first magic component: ``b/shards/*/x*.tar`` -> ``b/shards``."""
    parts = path.split("/")
    fixed: list[str] = []
    for part in parts[:-1]:
        if GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return "/".join(fixed)


# ---- list files ----------------------------------------------------------------------------------------------------


def _list_file(input_spec: str, filesystem: fsspec.AbstractFileSystem, path: str) -> Listing:
    """One URI per line; blank lines and ``#`` comments ignored; relative entries resolved against the list's folder
    (as playlists do); duplicates read once. Streamed through Arrow's CSV reader as a one-column file (ranged, retried
    reads; no copy of the whole file in memory), so that ten million lines never become ten million Python strings:
    10,000,000 URIs plan in about a GiB of memory (README, Performance)."""
    try:
        info = retrying(lambda: filesystem.info(path), description=f"reading list file {input_spec}")
    except OSError as error:
        _raise_listing_error(input_spec, error)
    reader = RangeReader(filesystem, path, input_spec, int(info.get("size") or 0))
    stream = io.BufferedReader(reader, buffer_size=8 * 1024 * 1024)
    if stream.peek(3)[:3] == b"\xef\xbb\xbf":
        stream.read(3)
    entries = _parse_lines(input_spec, stream, reader, int(info.get("size") or 0))
    list_dir = input_spec.rstrip("/").rpartition("/")[0] if "/" in input_spec else "."
    uris = _resolve_entries(entries, list_dir)
    del entries
    uris = _sorted(uris)
    # Drop adjacent repeats: comparing neighbours is a cheap vectorised pass, a hash table is not.
    if len(uris) > 1:
        repeated = pc.equal(uris.slice(1), uris.slice(0, len(uris) - 1))
        duplicates = pc.sum(repeated).as_py() or 0
        if duplicates:
            shown = pc.filter(uris.slice(1), repeated).slice(0, 50).to_pylist()
            logger.warning(
                "list file %s repeats %d entr(ies), each read once: %s", input_spec, duplicates, examples(dict.fromkeys(shown))
            )
            uris = pc.filter(uris, pa.concat_arrays([pa.array([True]), pc.invert(repeated)]))
    unique = uris
    files = pa.Table.from_arrays([unique, unique, pa.nulls(len(unique), pa.int64())], schema=FILES_SCHEMA)
    return Listing("list", "", files)


def _sorted(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``uris`` sorted, as one array, holding at most two copies of the strings at any time.

    The parsed list arrives in chunks; Arrow's ``take`` on chunked values concatenates them first, a third copy
    (10,000,000 URIs: 1.28 GB of Arrow memory at the peak instead of 0.88). So the chunks are combined first, the
    pool's freed pages handed back, and a list that is already sorted (as listings written by tools usually are) is
    not copied at all.
    """
    if isinstance(uris, pa.ChunkedArray):
        uris = uris.combine_chunks()
    _release_free_memory()
    if len(uris) < 2 or not pc.any(pc.less(uris.slice(1), uris.slice(0, len(uris) - 1))).as_py():
        return uris
    order = pc.sort_indices(uris)
    if len(uris) <= np.iinfo(np.uint32).max:  # half the index memory while both copies of the strings are held
        order = order.cast(pa.uint32())
        _release_free_memory()  # the 64-bit indices' pages, before the copy
    uris = pc.take(uris, order)
    del order
    _release_free_memory()
    return uris


def _parse_lines(input_spec: str, stream: Any, reader: RangeReader, size_hint: int = 0) -> pa.Array:
    """The list's entries (trimmed; blank lines and ``#`` comments dropped) as ONE string array.

    Arrow's CSV reader streams the file in 16 MB blocks; each block's strings are appended to one buffer sized from
    the file (the entries cannot hold more bytes than the file), so the peak is that buffer plus one block. Reading
    the whole file into chunks and then combining them held two copies: 10,000,000 URIs peaked at 0.8 GB of Arrow
    memory instead of 0.45.
    """
    try:
        batches = pacsv.open_csv(
            stream,
            # One block at a time: a threaded reader parses several 16 MB blocks ahead, ~100 MB more at the peak.
            read_options=pacsv.ReadOptions(column_names=["line"], block_size=16 * 1024 * 1024, use_threads=False),
            # A delimiter no URI holds, no quoting: every line is one value, verbatim.
            parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
        )
        return _concatenate_lines((_clean_lines(batch.column(0)) for batch in batches), size_hint)
    except pa.ArrowInvalid as error:
        reader.raise_if_failed()
        if "Empty CSV file" in str(error):
            return pa.array([], pa.string())
        raise InputError(f"list file {input_spec} is not UTF-8 text with one URI per line: {error}") from error
    except ShardReadError as error:
        raise InputError(f"cannot read list file {input_spec}: {error}") from error


def _clean_lines(lines: pa.Array) -> pa.Array:
    padded = [pc.any(check(lines, space)).as_py() for check in (pc.starts_with, pc.ends_with) for space in (" ", "\t")]
    if any(padded):  # copy only when some line needs it
        lines = pc.ascii_trim_whitespace(lines)
    keep = pc.and_(pc.greater(pc.binary_length(lines), 0), pc.invert(pc.starts_with(lines, "#")))
    return lines if pc.all(keep).as_py() else pc.filter(lines, keep)


def _concatenate_lines(pieces: Iterable[pa.Array], size_hint: int) -> pa.Array:
    """One string array of ``pieces`` in order, built in a single growing buffer (see :func:`_parse_lines`)."""
    # Both buffers are sized for the most the file can hold (an entry and its newline take at least two bytes) and
    # left untouched until written: the kernel maps only the pages used, so the unused reserve costs no memory.
    data = np.empty(max(size_hint, 1024), dtype=np.uint8)
    offsets = np.empty(max(size_hint, 1024) // 2 + 2, dtype=np.int32)
    offsets[0] = 0
    used = count = 0
    for piece in pieces:
        _release_free_memory()  # what the previous block's reading left (see the function)
        if not len(piece):
            continue
        piece_offsets = np.frombuffer(piece.buffers()[1], dtype=np.int32, count=len(piece) + 1, offset=piece.offset * 4)
        first, last = int(piece_offsets[0]), int(piece_offsets[-1])
        if used + last - first > np.iinfo(np.int32).max:
            raise InputError("the list file holds more than 2 GiB of URIs, more than one list can; split it in parts")
        if used + last - first > len(data):
            data = np.resize(data, max(2 * len(data), used + last - first))
        if count + len(piece) + 1 > len(offsets):
            offsets = np.resize(offsets, max(2 * len(offsets), count + len(piece) + 1))
        data[used : used + last - first] = np.frombuffer(piece.buffers()[2], dtype=np.uint8)[first:last]
        target = offsets[count + 1 : count + 1 + len(piece)]
        np.subtract(piece_offsets[1:], np.int32(first), out=target)
        target += np.int32(used)
        used += last - first
        count += len(piece)
    return pa.Array.from_buffers(pa.string(), count, [None, pa.py_buffer(offsets[: count + 1]), pa.py_buffer(data)])


def _resolve_entries(entries: pa.Array, list_dir: str) -> pa.Array:
    """Absolute URIs as they are; relative ones joined to the list's folder. Local paths made absolute and normal."""
    has_protocol = pc.match_substring_regex(entries, r"^[A-Za-z][A-Za-z0-9+.-]*://")
    absolute = pc.or_(has_protocol, pc.starts_with(entries, "/"))
    if pc.all(absolute).as_py():
        joined = entries
    else:
        list_protocol, list_path = split_protocol(list_dir)
        local_list = protocol_of(list_dir) == "file"
        if local_list:
            list_path = filesystem_for(list_dir)[1]  # absolute, so Ray workers elsewhere find the same files
        remote = list_protocol and not local_list
        prefix = f"{list_protocol}://{list_path.rstrip('/')}/" if remote else f"{list_path.rstrip('/')}/"
        joined = pc.if_else(absolute, entries, pc.binary_join_element_wise(prefix, entries, ""))
    # Only entries with "." or ".." segments or "file://" URIs need Python's path handling (a superset is harmless).
    needs_python = pc.or_(
        pc.or_(pc.match_substring(joined, "/."), pc.starts_with(joined, ".")),
        pc.or_(pc.starts_with(joined, "file:"), pc.starts_with(joined, "local:")),
    )
    if not pc.any(needs_python).as_py():
        return joined
    values = joined.to_pylist()
    flags = needs_python.to_pylist()
    for index, flag in enumerate(flags):
        if flag:
            values[index] = _normalise(values[index])
    return pa.array(values, pa.string())


def _normalise(uri: str) -> str:
    protocol, path = split_protocol(uri)
    if protocol and protocol not in ("file", "local"):
        return f"{protocol}://{posixpath.normpath(path)}"
    filesystem, local_path = filesystem_for(uri)
    return to_uri(filesystem, posixpath.normpath(local_path))
