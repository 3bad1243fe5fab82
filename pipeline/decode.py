"""Bytes -> upright, resized, centre-cropped uint8 image, or an error row. Pure functions: no Ray, no storage.

One bad file among millions must cost one row, never the job: every failure a hostile or broken file can cause
becomes a :class:`DecodeError` with a short reason, and :func:`decode_batch` emits exactly one output row per input
row. The checks run in the order that keeps memory bounded:

1. empty / missing bytes are refused without touching Pillow;
2. ``Image.open`` reads the header only; the pixel count is checked against ``max_image_pixels`` *before* any pixel
   is decoded (a 20000x20000 PNG is refused after reading a few dozen bytes);
3. :meth:`~model.processing.ViTHybridImageProcessor.to_uint8` decodes (in fast mode big JPEGs at 1/2..1/8 scale in
   libjpeg), turns the image upright by its EXIF orientation (``exif_orientation``, on by default here: this is the
   pipeline's stage for it, the processor alone ignores EXIF like the reference), resizes and crops. Its resize
   never builds more than the crop window for extreme aspect ratios, and refuses outputs beyond :data:`~model.processing.MAX_RESIZED_PIXELS`.

So the peak memory per image is the decoded source (at most ``max_image_pixels`` x 4 bytes, less for drafted JPEGs)
plus a few MiB. Truncated files are errors: we never set ``ImageFile.LOAD_TRUNCATED_IMAGES`` (which would turn a cut
download into a grey-bottomed photo and a confident wrong prediction); if other code in the process sets it,
Pillow fills the missing part and this module cannot tell. Animated GIF/WebP/APNG use their first frame, multi-page
TIFF its first page.

Example::

    processor = ViTHybridImageProcessor.from_pretrained(checkpoint)
    decoded = dataset.map_batches(
        decode_batch, fn_kwargs={"processor": processor, "fast": True, "max_image_pixels": 178_956_970},
        batch_format="numpy",
    )
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from model.processing import ResizeTooLargeError, ViTHybridImageProcessor
from model.processing import exif_orientation as read_exif_orientation

logger = logging.getLogger(__name__)

# Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS (= 178956970 by default) at open; we refuse at the same size
# by default, but from our own header check so the reason names the dimensions.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

# What Pillow raises on corrupt, truncated or hostile input: the exceptions its own fuzzing suite
# (Tests/test_fuzzers.py) accepts as "known exceptions from Pillow", plus EOFError and struct.error, which format
# plugins raise when a header or chunk ends early. UnidentifiedImageError is an OSError; our ResizeTooLargeError a
# ValueError. MemoryError is here because Pillow raises it for allocations a forged header asks for, not because the
# process ran out of memory. Anything else is a bug (ours or Pillow's) and is left to surface.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    NotImplementedError,
    OverflowError,
    MemoryError,
    Image.DecompressionBombError,
)

_MAX_REASON_CHARS = 300
_PILLOW_BOMB = re.compile(r"\((?P<pixels>\d+) pixels\) exceeds limit of (?P<limit>\d+) pixels")
_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A decoded sample: ``pixels`` is the processor's ``(crop_h, crop_w, 3)`` uint8 crop.

    ``width``/``height`` are the source image's upright size (after EXIF orientation), ``format`` what Pillow
    recognised (``"JPEG"``, ``"PNG"``, ...) and ``mode`` its pixel mode before RGB conversion.
    """

    pixels: np.ndarray
    width: int
    height: int
    format: str | None
    mode: str


@dataclass(frozen=True, slots=True)
class DecodeError:
    """Why a sample could not be decoded: a short, human-readable reason that goes into the ``error`` column."""

    reason: str


def _short(message: str) -> str:
    return message if len(message) <= _MAX_REASON_CHARS else message[: _MAX_REASON_CHARS - 3] + "..."


def _describe(error: BaseException, image_format: str | None) -> str:
    """A one-line reason: what failed and Pillow's own words, e.g. ``decode error: truncated JPEG (image file is ...)``."""
    message = str(error).strip() or type(error).__name__
    kind = image_format or "image"
    if isinstance(error, ResizeTooLargeError):
        return _short(f"image too large to resize: {message}")
    if isinstance(error, Image.DecompressionBombError):
        # Pillow refuses inside Image.open, before the size is ours to read; its message has the pixel count.
        match = _PILLOW_BOMB.search(message)
        if match:
            return f"image too large: {match['pixels']} pixels > limit {match['limit']} (Pillow's Image.MAX_IMAGE_PIXELS)"
        return _short(f"image too large: {message}")
    if isinstance(error, OSError) and "truncated" in message.lower():
        return _short(f"decode error: truncated {kind} ({message})")
    if isinstance(error, OSError):
        return _short(f"decode error: {kind} ({message})")
    return _short(f"decode error: {kind} ({type(error).__name__}: {message})")


def decode_sample(
    data: bytes | bytearray | memoryview | None,
    *,
    processor: ViTHybridImageProcessor,
    fast: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    exif_orientation: bool = True,
) -> DecodedImage | DecodeError:
    """Decode one file's bytes into the processor's uint8 crop, or say why not. Never raises for bad data.

    ``fast`` selects the processor's approximate fast path (see ``to_uint8``); ``max_image_pixels`` caps
    width x height, checked on the header before decoding. Pillow's own refusal above 2 x ``Image.MAX_IMAGE_PIXELS``
    (178956970 by default) happens inside ``Image.open`` and still applies to larger limits. ``exif_orientation``
    turns photos upright by their EXIF Orientation tag first (``width``/``height`` are then the upright size).
    """
    if data is None:
        return DecodeError("no data (missing bytes and no upstream error)")
    if len(data) == 0:
        return DecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Our header check below replaces Pillow's warning-level check (its error-level check stays), and Pillow's
        # UserWarnings about a damaged file ("Corrupt EXIF data", "Truncated File Read" in a tag...) would repeat
        # for every such file among millions; the row's outcome is what matters and it is in the output.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            image = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError:
            return DecodeError("not an image: cannot identify image file")
        except DECODE_ERRORS as error:
            return DecodeError(_describe(error, None))
        with image:
            width, height = image.size
            if width <= 0 or height <= 0:
                return DecodeError(f"empty image ({width}x{height} pixels)")
            if width * height > max_image_pixels:
                return DecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels > limit {max_image_pixels}"
                )
            image_format, mode = image.format, image.mode
            try:
                pixels = processor.to_uint8(image, fast=fast, exif_orientation=exif_orientation)
            except DECODE_ERRORS as error:
                return DecodeError(_describe(error, image_format))
            if exif_orientation and read_exif_orientation(image) in _QUARTER_TURNS:  # cached by to_uint8; the upright image is turned
                width, height = height, width
    return DecodedImage(pixels=pixels, width=width, height=height, format=image_format, mode=mode)


def _column(columns: Mapping[str, Any], name: str, length: int) -> Sequence[Any]:
    if name not in columns:
        raise KeyError(f"decode_batch needs a {name!r} column; got columns {sorted(columns)}")
    column = columns[name]
    if len(column) != length:
        raise ValueError(f"column {name!r} has {len(column)} rows, column 'key' has {length}")
    return column


def _arrow_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """An Arrow column as Ray's numpy batches hold it: typed arrays for null-free numbers, object arrays otherwise.

    Object arrays keep ``None`` as ``None`` (``to_numpy`` would turn a null int into NaN, changing the type).
    """
    if column.null_count == 0 and (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        return column.to_numpy()
    array = np.empty(len(column), dtype=object)
    array[:] = column.to_pylist()
    return array


def decode_batch(
    batch: pa.Table | Mapping[str, np.ndarray | list[Any]],
    *,
    processor: ViTHybridImageProcessor,
    fast: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    exif_orientation: bool = True,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function (``batch_format="numpy"``): bytes rows in, pixel rows out, one for one.

    Input columns: ``key`` (str), ``source`` (str), ``data`` (bytes or None) and optionally ``error`` (str or None,
    a read error attached upstream). The batch may be a dict of arrays/lists (Ray's numpy format) or a
    ``pyarrow.Table`` (as ``pipeline.sources.read_shard`` yields). Output, always a dict of numpy arrays: ``key``,
    ``source``, ``pixels`` (uint8 ``(N, H, W, 3)``; zeros on error rows), ``error`` (None, or the reason), then every
    other input column unchanged. ``data`` is dropped: the bytes are no longer needed and are the bulk of the batch.

    A row that arrives with an ``error`` keeps it untouched and is not decoded. The output is numpy (not pyarrow)
    because the pixels are a fixed-shape tensor column, which Ray builds from one ndarray without per-row work.
    Raises (before decoding anything) only for a malformed batch or a processor whose output size varies.
    """
    if isinstance(batch, pa.Table):
        columns: Mapping[str, Any] = {name: _arrow_to_numpy(batch.column(name)) for name in batch.column_names}
    else:
        columns = batch
    if "key" not in columns:
        raise KeyError(f"decode_batch needs a 'key' column; got columns {sorted(columns)}")
    keys = columns["key"]
    count = len(keys)
    sources = _column(columns, "source", count)
    datas = _column(columns, "data", count)
    upstream = _column(columns, "error", count) if "error" in columns else [None] * count

    height, width = processor.output_size
    pixels = np.zeros((count, height, width, 3), dtype=np.uint8)
    errors = np.empty(count, dtype=object)
    failures = 0
    for row in range(count):
        prior = upstream[row]
        if prior is not None and prior != "":
            errors[row] = prior
            continue
        result = decode_sample(
            datas[row], processor=processor, fast=fast, max_image_pixels=max_image_pixels, exif_orientation=exif_orientation
        )
        if isinstance(result, DecodeError):
            errors[row] = result.reason
            failures += 1
            logger.debug("could not decode %s (%s): %s", keys[row], sources[row], result.reason)
        else:
            pixels[row] = result.pixels
    if failures:
        logger.debug("decode_batch: %d of %d rows failed to decode", failures, count)

    output: dict[str, Any] = {"key": _as_array(keys), "source": _as_array(sources), "pixels": pixels, "error": errors}
    for name, column in columns.items():
        if name not in ("key", "source", "data", "error", "pixels"):
            output[name] = column
    return output


def _as_array(column: np.ndarray | Sequence[Any]) -> np.ndarray:
    """Columns as they came when already arrays (Ray numpy batches); lists become object arrays."""
    if isinstance(column, np.ndarray):
        return column
    array = np.empty(len(column), dtype=object)
    array[:] = list(column)
    return array
