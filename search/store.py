"""The index as stored under its output URI, written so that a reader never sees a half-written index.

Layout::

    OUT/_index.json               the metadata record, written LAST: it names the build folder below
    OUT/build-<id>/index.faiss    the FAISS index (faiss.serialize_index)
    OUT/build-<id>/ids.parquet    the id map: row i = index id i -> key, source, file (number in metadata's files)

Why this is atomic: a build writes its files into a fresh ``build-<id>/`` folder that no reader knows about, and
only then replaces ``_index.json`` (itself written all at once: an object-store PUT, or write-then-rename on local
disk, see :func:`model.storage.write_bytes`). A reader starts from ``_index.json``, so it sees either the previous
complete build or the new complete one. A crash before the switch leaves an unreferenced folder that the next
successful build removes; the build before the current one is kept too, so that a reader that read the old
``_index.json`` a moment before the switch can still open its files.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.storage import (
    StorageOptions,
    filesystem_for,
    join_uri,
    read_bytes,
    with_retries,
    write_bytes,
)
from search import build
from search.errors import IndexStoreError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "_index.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
BUILD_PREFIX = "build-"


@dataclass
class StoredIndex:
    """An index loaded for querying: the FAISS index, the id map (row i = id i) and the metadata record."""

    uri: str
    index: faiss.Index
    ids: pa.Table  # key, source, file
    metadata: dict[str, Any]

    @property
    def metric(self) -> str:
        return str(self.metadata["index"]["metric"])

    @property
    def dim(self) -> int:
        return int(self.metadata["index"]["dim"])


def new_build_id() -> str:
    return f"{BUILD_PREFIX}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def id_map_table(keys: list[str], sources: list[str], files: np.ndarray) -> pa.Table:
    return pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(sources, pa.string()),
                     "file": pa.array(files, pa.int32())})


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def read_metadata(uri: str, storage_options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The current metadata record under ``uri``, or None when there is none."""
    try:
        payload = read_bytes(join_uri(uri, METADATA_FILE), storage_options)
    except FileNotFoundError:
        return None
    try:
        return json.loads(payload)
    except json.JSONDecodeError as error:
        raise IndexStoreError(f"{join_uri(uri, METADATA_FILE)} is not valid JSON ({error}): rebuild the index") from error


def write_index(
    uri: str,
    index: faiss.Index,
    ids: pa.Table,
    metadata: dict[str, Any],
    storage_options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Write a new build under ``uri`` and switch ``_index.json`` to it; returns the metadata as written."""
    if ids.num_rows != index.ntotal:
        raise ValueError(f"id map has {ids.num_rows} rows but the index holds {index.ntotal} vectors")
    previous = read_metadata(uri, storage_options)
    build_id = new_build_id()
    payload = build.serialize(index)
    write_bytes(join_uri(uri, build_id, INDEX_FILE), payload.tobytes(), storage_options)
    write_bytes(join_uri(uri, build_id, IDS_FILE), _parquet_bytes(ids), storage_options)
    record = {
        "format_version": FORMAT_VERSION,
        "build": build_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "index_bytes": int(payload.nbytes),
        **metadata,
    }
    write_bytes(join_uri(uri, METADATA_FILE), (json.dumps(record, indent=2) + "\n").encode(), storage_options)
    keep = {build_id, (previous or {}).get("build")}
    _remove_other_builds(uri, keep, storage_options)
    logger.info("index written: %s (%s, %d vectors, %d bytes)", join_uri(uri, build_id), metadata["index"]["factory"],
                index.ntotal, payload.nbytes)
    return record


def _remove_other_builds(uri: str, keep: set[Any], storage_options: StorageOptions | None) -> None:
    """Remove build folders that no reader can reach any more (older than the previous build, or never switched to)."""
    filesystem, path = filesystem_for(uri, storage_options)
    try:
        filesystem.invalidate_cache(path)
        names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in filesystem.ls(path, detail=False)]
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(BUILD_PREFIX) and name not in keep:
            target = f"{path.rstrip('/')}/{name}"

            def remove(target: str = target) -> None:
                filesystem.rm(target, recursive=True)

            try:
                with_retries(remove, description=f"removing {uri}/{name}")
            except OSError as error:  # a leftover folder costs space, not correctness
                logger.warning("could not remove old index build %s/%s: %s", uri, name, error)


def load_index(uri: str, storage_options: StorageOptions | None = None) -> StoredIndex:
    """Load the build ``_index.json`` names; raises :class:`IndexStoreError` when there is no complete index."""
    metadata = read_metadata(uri, storage_options)
    if metadata is None:
        raise IndexStoreError(
            f"no index at {uri}: {METADATA_FILE} is missing (build one with python -m jobs.index --input <embeddings> "
            f"--output {uri})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise IndexStoreError(
            f"index at {uri} has format version {metadata.get('format_version')!r}, this code reads {FORMAT_VERSION}: "
            "rebuild it with this version's python -m jobs.index"
        )
    folder = join_uri(uri, metadata["build"])
    try:
        index = build.deserialize(read_bytes(join_uri(folder, INDEX_FILE), storage_options))
        ids = pq.read_table(io.BytesIO(read_bytes(join_uri(folder, IDS_FILE), storage_options)))
    except FileNotFoundError as error:
        raise IndexStoreError(
            f"index at {uri} names build {metadata['build']}, whose files are gone ({error}): a newer build replaced "
            "it while this one was being opened, retry; or rebuild the index"
        ) from error
    if ids.num_rows != index.ntotal:
        raise IndexStoreError(f"index at {folder} holds {index.ntotal} vectors but its id map {ids.num_rows}: rebuild it")
    return StoredIndex(uri=uri, index=index, ids=ids, metadata=metadata)


def parquet_target(uri: str, default_name: str) -> str:
    """``uri`` itself when it names a ``.parquet`` file, else ``uri/default_name``."""
    return uri if uri.endswith(".parquet") else f"{uri.rstrip('/')}/{default_name}"


def write_parquet(table: pa.Table, uri: str, storage_options: StorageOptions | None = None) -> None:
    """Write a result table at once (a reader sees the whole file or none)."""
    write_bytes(uri, _parquet_bytes(table), storage_options)
