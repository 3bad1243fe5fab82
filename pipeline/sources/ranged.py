"""Ranged reads of one stored object, each request retried on its own; the only way formats open shard files.

Reading in bounded ranges (at most ``chunk_bytes`` per request) keeps memory at one chunk whatever the shard size,
and makes a connection cut mid-body a retried request instead of a corrupt shard: a response shorter than asked for
is a transient failure. Storage errors that outlast the retries are kept in :attr:`RangeReader.failure`, so that a
caller can tell an outage (re-wrapped by tarfile or pyarrow as a data error) from damaged data.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from model.storage import StorageOptions, filesystem_for, is_transient, with_retries
from pipeline.sources.base import ShardReadError

T = TypeVar("T")

MAX_REQUEST_BYTES = 64 * 1024 * 1024


def retrying(operation: Callable[[], T], *, description: str) -> T:
    return with_retries(operation, description=description)


class RangeReader(io.RawIOBase):
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
        end = min(start + len(buffer), self._size, start + MAX_REQUEST_BYTES)
        if end <= start:
            return 0
        try:
            data = retrying(
                lambda: fetch_range(self._filesystem, self._path, start, end),
                description=f"reading {self._uri} [{start}:{end}]",
            )
        except Exception as error:
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


def fetch_range(filesystem: fsspec.AbstractFileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of an object; a shorter answer raises a transient error, to be retried."""
    data = filesystem.cat_file(path, start=start, end=end)
    if len(data) != end - start:
        raise ConnectionError(f"short read: got {len(data)} of {end - start} bytes (connection cut?)")
    return data


def open_object(uri: str, storage_options: StorageOptions | None) -> RangeReader:
    filesystem, path = filesystem_for(uri, storage_options)
    filesystem.invalidate_cache(path)  # the size must be the object's now, not a listing's from earlier
    try:
        info = retrying(lambda: filesystem.info(path), description=f"opening shard {uri}")
    except FileNotFoundError as error:
        raise ShardReadError(f"shard {uri} does not exist (deleted since planning?): {error}") from error
    except PermissionError as error:
        raise ShardReadError(f"access denied opening shard {uri}: {error}") from error
    except OSError as error:
        raise ShardReadError(f"cannot open shard {uri}: {type(error).__name__}: {error}") from error
    if info.get("type") != "file":
        raise ShardReadError(f"shard {uri} is not a file (type {info.get('type')!r})")
    return RangeReader(filesystem, path, uri, int(info.get("size") or 0))




def read_whole_file(uri: str, storage_options: StorageOptions | None) -> tuple[bytes | None, str | None]:
    """One small file (a loose image, a file a Parquet row points to): ``(data, None)``, or ``(None, reason)`` when it
    cannot be read for a permanent reason (missing, access denied, a folder). Raises :class:`ShardReadError` when
    transient errors outlast the retries: that is an outage, not a property of the sample."""
    filesystem, path = filesystem_for(uri, storage_options)
    try:
        # The size first, so that a response cut short is caught and retried like any other transient failure.
        info = retrying(lambda: filesystem.info(path), description=f"looking up image {uri}")
        if info.get("type") != "file":
            return None, f"cannot read image {uri}: not a file (type {info.get('type')!r})"
        size = int(info.get("size") or 0)
        data = retrying(lambda: fetch_range(filesystem, path, 0, size), description=f"reading image {uri}") if size else b""
    except OSError as error:
        if is_transient(error):
            raise ShardReadError(f"cannot read image {uri}: retries exhausted: {error}") from error
        return None, f"cannot read image {uri}: {type(error).__name__}: {error}"
    except Exception as error:
        if not is_transient(error):
            raise
        raise ShardReadError(f"cannot read image {uri}: retries exhausted: {error}") from error
    return data, None
