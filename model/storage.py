"""Object-storage access for the model (checkpoints on S3) and every pipeline stage: URIs -> fsspec, one retry policy.

Local paths, ``s3://`` and any other fsspec protocol go through :func:`filesystem_for`. Credentials and the endpoint
come from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...), which s3fs
and botocore read themselves; ``storage_options`` adds explicit fsspec options (for example ``{"anon": true}`` for
public buckets). Nothing here logs or stores option values, because they may hold secrets.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.core import split_protocol

logger = logging.getLogger(__name__)

T = TypeVar("T")

StorageOptions = Mapping[str, Any]


def protocol_of(uri: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for a local path."""
    protocol, _ = split_protocol(uri)
    return protocol or "file"


def filesystem_for(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri``; ``path`` is what the filesystem's methods take.

    fsspec caches filesystem instances per options, so calling this per file is cheap.
    """
    protocol = protocol_of(uri)
    filesystem = fsspec.filesystem(protocol, **dict(storage_options or {}))
    return filesystem, filesystem._strip_protocol(uri)


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a URI with ``/``, keeping the protocol: ``join_uri("s3://b/out", "x.parquet")``."""
    joined = os.fspath(base).rstrip("/")
    for part in parts:
        joined = f"{joined}/{part.strip('/')}"
    return joined


def to_uri(filesystem: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a path as a filesystem lists it back into a URI (``bucket/key`` -> ``s3://bucket/key``).

    Local paths stay plain paths, so that outputs and error messages show what the user typed.
    """
    protocols = filesystem.protocol if isinstance(filesystem.protocol, (tuple, list)) else (filesystem.protocol,)
    if "file" in protocols or "local" in protocols:
        return path
    return filesystem.unstrip_protocol(path)


# Errors that a later attempt may not see: throttling, server errors, dropped connections, timeouts.
_TRANSIENT_MARKERS = (
    "slowdown",
    "slow down",
    "503",
    "500",
    "502",
    "504",
    "internalerror",
    "service unavailable",
    "serviceunavailable",
    "requesttimeout",
    "connection reset",
    "connection aborted",
    "connection refused",
    "could not connect",  # botocore EndpointConnectionError (connection dropped or refused mid-request)
    "connectionclosederror",
    "server disconnected",
    "timed out",
    "timeout",
    "broken pipe",
    "incomplete read",
    "payload",
    "throttl",
    "reduce your request rate",
)


_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}
)


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying (throttling, 5xx, resets); False for missing objects, auth, bad input."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    # s3fs reports S3 throttling (503 SlowDown) as OSError(EBUSY, "Please reduce your request rate.") and a 500
    # InternalError as OSError(EREMOTEIO, "We encountered an internal error. Please try again.").
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def with_retries(
    operation: Callable[[], T],
    *,
    description: str,
    attempts: int = 8,
    base_delay_s: float = 0.2,
    max_delay_s: float = 20.0,
    is_retryable: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Run ``operation``; on a transient error retry with exponential backoff and full jitter.

    ``description`` names what is being done and to which URI, so the final error says where it failed.
    Non-transient errors (missing object, access denied) propagate at once: retrying them only delays the message.
    """
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - classified right below, re-raised unless transient
            if attempt == attempts or not is_retryable(error):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logger.warning(
                "%s failed (attempt %d/%d: %s); retrying in %.2fs", description, attempt, attempts, error, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    """Read a whole object, retrying transient errors."""
    filesystem, path = filesystem_for(uri, storage_options)
    return with_retries(lambda: filesystem.cat_file(path), description=f"reading {uri}")


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write a whole object atomically (readers see all or nothing), retrying transient errors.

    On object stores a PUT is atomic by itself; on local disk we write a temporary name and rename it.
    """
    filesystem, path = filesystem_for(uri, storage_options)

    def put() -> None:
        if protocol_of(uri) != "file":
            filesystem.pipe_file(path, data)
            return
        # Local disk: write a temporary name and rename, so a reader never sees a half-written file.
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        temporary = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    with_retries(put, description=f"writing {uri}")
