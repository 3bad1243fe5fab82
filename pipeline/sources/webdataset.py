"""WebDataset shards: ``.tar`` / ``.tar.gz`` files as the ``webdataset`` library, img2dataset and TarWriter write them.

Members are grouped into samples exactly as the ``webdataset`` library groups them: the key is the member name up to
the first dot of its file name (``a.b/img.meta.json`` -> key ``a.b/img``, suffix ``meta.json``); consecutive members
with the same key form one sample, and a repeated suffix starts a new sample (the library raises there; here the
second one is its own row, so every sample is accounted for). Names the library skips (no dot in the file name, or a
file name starting with a dot) are skipped too, and counted and named in the log. A sample's ``data`` is its image
member (a bare image suffix such as ``jpg`` wins over compound ones such as ``seg.png``); sidecars are not read. A
sample with no image member is an error row. Keys are kept verbatim, also ``../../etc/passwd``: nothing is ever
extracted to disk. The tar is streamed through ranged reads; damage ends the shard with one shard-error row (see the
package docstring).
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from model.storage import StorageOptions
from pipeline.sources.base import (
    IMAGE_EXTENSIONS,
    ReadSettings,
    SampleRow,
    Shard,
    ShardFormat,
    batched,
    extension,
    shard_error,
)
from pipeline.sources.ranged import open_object

logger = logging.getLogger(__name__)

# What a damaged tar / gzip stream raises. Storage failures are told apart through RangeReader.failure.
TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
DRAIN_BYTES = 1024 * 1024


class WebDatasetFormat(ShardFormat):
    name = "webdataset"
    extensions = (".tar", ".tar.gz", ".tgz")

    def read(self, shard: Shard, settings: ReadSettings) -> Iterator[pa.Table]:
        return batched(tar_samples(shard, settings.storage_options, settings.chunk_bytes), settings.batch_rows)


FORMAT = WebDatasetFormat()


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
    suffixes: set[str] = field(default_factory=set)
    image: bytes | None = None
    image_is_plain: bool = False  # the image member's suffix is a bare image extension ("jpg", not "seg.png")


# The webdataset library's own rule (webdataset.tariterators.base_plus_ext): the key is the member name up to the first
# dot of its FILE name (folders may hold dots); the rest is the suffix. Producers (TarWriter, img2dataset) rely on it.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, suffix)`` as webdataset splits a member name: ``a.b/img.meta.json`` -> ``("a.b/img", "meta.json")``.

    None for names webdataset skips (no dot in the file name, or a file name starting with a dot).
    """
    match = _KEY_AND_SUFFIX.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def tar_samples(shard: Shard, storage_options: StorageOptions | None, chunk_bytes: int) -> Iterator[SampleRow]:
    uri = shard.uri
    raw = open_object(uri, storage_options)
    buffered = io.BufferedReader(raw, buffer_size=chunk_bytes)
    compressed = buffered.peek(2)[:2] == b"\x1f\x8b"  # gzip magic: trust the bytes, not the file name
    stream: Any = gzip.GzipFile(fileobj=buffered, mode="rb") if compressed else buffered
    recorder = _ReadRecorder(stream)

    def finish(sample: _Sample) -> SampleRow:
        if sample.image is None:
            members = ", ".join(sample.member_names)
            return SampleRow(sample.key, uri, None, f"no image member for key {sample.key!r} in {uri} (members: {members})")
        return SampleRow(sample.key, uri, sample.image, None)

    try:
        # Names are UTF-8 whatever the worker's locale; undecodable bytes survive as surrogates (see _printable).
        archive = tarfile.TarFile(
            fileobj=recorder, mode="r", encoding="utf-8", errors="surrogateescape"  # type: ignore[arg-type]
        )
    except TAR_DATA_ERRORS as error:
        raw.raise_if_failed()
        yield shard_error(uri, f"not a readable tar archive: {type(error).__name__}: {error}")
        return

    current: _Sample | None = None
    count = 0
    skipped: list[str] = []
    problem: str | None = None
    try:
        while True:
            member = archive.next()
            # tarfile keeps every header it has seen; a shard may hold 100k members and we never look back.
            archive.members.clear()  # type: ignore[attr-defined]  # the list tarfile fills as it reads
            if member is None:
                break
            if member.isdir():
                continue
            name = _printable(member.name)
            split = member_key(name)
            if split is None:
                skipped.append(name)
                continue
            key, suffix = split
            if current is not None and (key != current.key or suffix in current.suffixes):
                yield finish(current)
                count += 1
                current = None
            if current is None:
                current = _Sample(key)
            current.member_names.append(name)
            current.suffixes.add(suffix)
            if member.isfile() and extension(name) in IMAGE_EXTENSIONS:
                # The sample's image: a member whose whole suffix is an image extension ("jpg") wins over compound
                # ones ("seg.png", a mask beside the photo); otherwise the first image member.
                plain = "." + suffix in IMAGE_EXTENSIONS
                if current.image is None or (plain and not current.image_is_plain):
                    current.image = _read_member(archive, recorder, member)
                    current.image_is_plain = plain
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
            while stream.read(DRAIN_BYTES):
                pass
    except TAR_DATA_ERRORS as error:
        raw.raise_if_failed()
        problem = f"truncated tar: {type(error).__name__}: {error}"
    if current is not None:
        if problem is None or current.image is not None:
            yield finish(current)
            count += 1
        else:
            problem += f" (sample {current.key!r} was cut short and is lost with the rest)"
    if skipped:
        # webdataset drops these too; say so, naming them, rather than let them vanish.
        logger.warning(
            "%s: skipped %d member(s) whose file name has no key.suffix form (as the webdataset library does): %s",
            uri, len(skipped), ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else ""),
        )
    if problem is not None:
        yield shard_error(uri, f"{problem}; {count} samples were read before it")


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

