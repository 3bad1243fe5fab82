"""Image processor for ViT Hybrid: the Hugging Face ``ViTHybridImageProcessor`` without transformers, split in two.

The work is split where the data is smallest, so that each half runs where it is cheap:

* **CPU half** -- :meth:`ViTHybridImageProcessor.to_uint8`: decode, optional EXIF orientation, RGB conversion, resize
  and centre crop with Pillow, ending in a ``(crop_h, crop_w, 3)`` ``uint8`` array. A uint8 crop is a quarter of the bytes
  of the float tensor the model eats, which is what Ray Data should move between processes and onto the GPU.
* **Device half** -- :class:`model.normalization.PixelNormalizer` (``processor.normalizer(device)``): rescale and
  normalise a stacked ``(N, H, W, 3)`` uint8 batch on the accelerator into ``(N, 3, H, W)`` floats in channels-last
  memory. It is the only part that needs torch, imported when a normalizer or a ``"pt"`` tensor is asked for, so
  that the decode workers that run the CPU half never import torch.

:meth:`ViTHybridImageProcessor.preprocess` (and ``__call__``) joins the two halves for code written against
``transformers``; its ``pixel_values`` are bit-identical to ``transformers.ViTHybridImageProcessor`` configured the
same way. Example::

    processor = ViTHybridImageProcessor.from_pretrained("s3://bucket/models/vit-hybrid-base-bit-384/")
    inputs = processor(image, return_tensors="pt")          # {"pixel_values": (1, 3, 384, 384) float32}

    crop = processor.to_uint8(image, exif_orientation=True) # (384, 384, 3) uint8 upright, on a CPU worker
    normalizer = processor.normalizer(device="cuda", dtype=torch.bfloat16)
    pixel_values = normalizer(torch.from_numpy(np.stack(crops)).cuda())

Exactness. With ``fast=False`` every step is the reference's own arithmetic: the same Pillow calls on the same
pixels, then a 256-entry table per channel computed with exactly the reference's numpy arithmetic
(``float32(float64(x) * rescale_factor)``, then float32 ``(x - mean) / std``). A pixel can only take 256 values, so
looking the result up is the reference's arithmetic, not an approximation of it. EXIF orientation is ignored, as the
reference ignores it, so ``processor(images=photo)`` equals the reference on every photo; the batch pipeline turns
photos upright in its decode stage instead (``to_uint8(image, exif_orientation=True)``, on by default there, see
:mod:`pipeline.decode`), because a phone photo taken upright would otherwise reach the model lying on its side. One
deliberate difference:

* Images whose resize output would exceed :data:`MAX_RESIZED_PIXELS` (absurd aspect ratios such as 1x100000, which
  the reference would blow up into tens of gigabytes) raise :class:`ResizeTooLargeError` instead.

``fast=True`` trades bit-exactness for speed on big JPEGs only: when libjpeg can decode at 1/2, 1/4 or 1/8 scale
(DCT-domain ``draft``) while keeping at least :data:`FAST_DRAFT_MARGIN` (2) times the resize target, it does, and the
exact resize then runs on that smaller image. Everything else (PNG, WebP, JPEGs under 4x the target: 1536 px short
side for 384) takes the exact path, bit for bit.
``python -m benchmarks.fastpath`` measures the deviation on real photos.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import ExifTags, Image

if TYPE_CHECKING:  # torch is imported where a tensor is made: a decode worker never needs it
    import torch

    from model.normalization import PixelNormalizer

logger = logging.getLogger(__name__)

CONFIG_NAME = "preprocessor_config.json"

# The reference class's defaults (transformers ViTHybridImageProcessor), so that code moving over behaves the same.
# The 384 checkpoint's preprocessor_config.json overrides them (384 px, mean = std = 0.5).
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_DEFAULT_SIZE = {"shortest_edge": 224}
_DEFAULT_CROP_SIZE = {"height": 224, "width": 224}

# Refuse resizes whose full output (what the reference would allocate before cropping) exceeds this many pixels.
# Only images with absurd aspect ratios get there: a 10000x10 banner becomes 384000x384 = 1.5e8 (allowed, and
# computed window by window, see _resize_window_exact); a 1x100000 line would become 384x38400000 = 1.5e10.
MAX_RESIZED_PIXELS = 1 << 28
# Up to this many output pixels (or the source's own pixel count, whichever is larger) the exact path resizes the
# whole image like the reference; beyond, it computes only the crop window. 4 Mpx of RGBX is 16 MiB.
FULL_RESIZE_PIXELS = 1 << 22
# Pixels per vertical strip in the windowed exact resize: bounds its memory to ~16 MiB whatever the aspect ratio.
_STRIP_PIXELS = 1 << 22
# Fast mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale while the decoded short side stays >= this many times the
# resize target; the exact resize then does the rest. Measured by ``python -m benchmarks.fastpath`` (README,
# Performance): with 1, a 1000x872 JPEG drafted to 1/2 deviates by up to 36 grey levels; with 2 only JPEGs at least
# 4x the target are touched, by at most 3 levels (p99 1), and 12-megapixel photos still decode 3.7x faster.
FAST_DRAFT_MARGIN = 2

# Errors Pillow's EXIF (TIFF directory) parser raises on a malformed block. A broken EXIF block must not lose an
# otherwise good photo: we then apply no rotation, like the reference. (For JPEG, Pillow already parses EXIF at open;
# 20000 random byte flips inside an EXIF block raised nothing from getexif() after a successful load.)
_EXIF_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, struct.error)

# ImageOps.exif_transpose's mapping from the EXIF Orientation tag to the transposition that makes the image upright.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}

_FIELDS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)
# Keys Hugging Face writes next to the settings; they describe the file, not the processing.
_METADATA_KEYS = frozenset({"image_processor_type", "feature_extractor_type", "processor_class", "auto_map"})


class ResizeTooLargeError(ValueError):
    """The resize output would exceed :data:`MAX_RESIZED_PIXELS` (an image with an absurd aspect ratio)."""


# --------------------------------------------------------------------------------------------------------------------
# Settings: parsed and validated once, in the reference's vocabulary.


def _require_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _require_positive_int(name: str, value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0:
        return int(value)
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _parse_size(value: Any) -> dict[str, int]:
    """``size`` like the reference's ``get_size_dict(size, default_to_square=False)``, limited to what it resizes by.

    An int means the shortest edge, a ``(height, width)`` pair an exact size. The reference resize ignores
    ``longest_edge``; we refuse it rather than silently ignore a setting.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return {"shortest_edge": _require_positive_int("size", value)}
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"height": _require_positive_int("size[0]", value[0]), "width": _require_positive_int("size[1]", value[1])}
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"shortest_edge"}:
            return {"shortest_edge": _require_positive_int("size['shortest_edge']", value["shortest_edge"])}
        if keys == {"height", "width"}:
            return {
                "height": _require_positive_int("size['height']", value["height"]),
                "width": _require_positive_int("size['width']", value["width"]),
            }
        raise ValueError(
            f"size must be {{'shortest_edge': int}} or {{'height': int, 'width': int}}, got keys {sorted(keys)}"
        )
    raise ValueError(f"size must be an int, a (height, width) pair or a dict, got {value!r}")


def _parse_crop_size(value: Any) -> dict[str, int]:
    """``crop_size`` like ``get_size_dict(crop_size, default_to_square=True)``: an int means a square."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        side = _require_positive_int("crop_size", value)
        return {"height": side, "width": side}
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {
            "height": _require_positive_int("crop_size[0]", value[0]),
            "width": _require_positive_int("crop_size[1]", value[1]),
        }
    if isinstance(value, Mapping):
        if set(value) != {"height", "width"}:
            raise ValueError(f"crop_size must be {{'height': int, 'width': int}}, got keys {sorted(value)}")
        return {
            "height": _require_positive_int("crop_size['height']", value["height"]),
            "width": _require_positive_int("crop_size['width']", value["width"]),
        }
    raise ValueError(f"crop_size must be an int, a (height, width) pair or a dict, got {value!r}")


def _parse_resample(value: Any) -> Image.Resampling:
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError):
        names = ", ".join(f"{member.value} ({member.name})" for member in Image.Resampling)
        raise ValueError(f"resample must be one of {names}; got {value!r}") from None


def _parse_real(name: str, value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    raise ValueError(f"{name} must be a finite number, got {value!r}")


def _parse_channels(name: str, value: Any) -> tuple[float, float, float]:
    """A per-channel statistic: one number for all three channels, or exactly three."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = _parse_real(name, value)
        return (number, number, number)
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)) and len(value) == 3:
        first, second, third = (_parse_real(f"{name}[{index}]", item) for index, item in enumerate(value))
        return (first, second, third)
    raise ValueError(f"{name} must be a number or a list of 3 numbers (one per RGB channel), got {value!r}")


@dataclass(frozen=True)
class _Settings:
    """The processor's settings, validated, in the form the code uses."""

    do_resize: bool
    shortest_edge: int | None  # resize so that the short side is this long, keeping the aspect ratio ...
    resize_hw: tuple[int, int] | None  # ... or to exactly (height, width)
    resample: Image.Resampling
    do_center_crop: bool
    crop_hw: tuple[int, int]
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_convert_rgb: bool

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> _Settings:
        size = _parse_size(values["size"])
        crop = _parse_crop_size(values["crop_size"])
        image_std = _parse_channels("image_std", values["image_std"])
        if any(value == 0.0 for value in image_std):
            raise ValueError(f"image_std must not contain 0 (it divides), got {values['image_std']!r}")
        return cls(
            do_resize=_require_bool("do_resize", values["do_resize"]),
            shortest_edge=size.get("shortest_edge"),
            resize_hw=(size["height"], size["width"]) if "height" in size else None,
            resample=_parse_resample(values["resample"]),
            do_center_crop=_require_bool("do_center_crop", values["do_center_crop"]),
            crop_hw=(crop["height"], crop["width"]),
            do_rescale=_require_bool("do_rescale", values["do_rescale"]),
            rescale_factor=_parse_real("rescale_factor", values["rescale_factor"]),
            do_normalize=_require_bool("do_normalize", values["do_normalize"]),
            image_mean=_parse_channels("image_mean", values["image_mean"]),
            image_std=image_std,
            do_convert_rgb=_require_bool("do_convert_rgb", values["do_convert_rgb"]),
        )

    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after resizing, exactly as ``transformers.image_transforms.get_resize_output_image_size``.

        Note the reference's rounding: the long side is ``int(shortest_edge * long / short)`` (truncated, float
        division), so a 500x375 image becomes 512x384, not 512x384.0 rounded.
        """
        if not self.do_resize:
            return height, width
        if self.resize_hw is not None:
            return self.resize_hw
        assert self.shortest_edge is not None
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def lookup_table(self) -> np.ndarray | None:
        """``(3, 256)`` float32: the reference's rescale + normalise output for every uint8 value, per channel.

        Computed with the reference's own numpy arithmetic (``transformers.image_transforms.rescale`` then
        ``normalize``), so indexing it reproduces the reference bit for bit. ``None`` when neither step is on (the
        reference then leaves the pixels uint8).
        """
        if not (self.do_rescale or self.do_normalize):
            return None
        values = np.arange(256, dtype=np.uint8)
        if self.do_rescale:
            scaled = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            scaled = values.astype(np.float32)
        table = np.broadcast_to(scaled, (3, 256))
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            table = (table - mean) / std
        return np.ascontiguousarray(table, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Geometry helpers.


@dataclass(frozen=True)
class _Window:
    """Which part of the resized image lands where in the output (the reference's centre crop, zero padding included).

    ``x0:x1, y0:y1`` index the resized image; ``dx, dy`` is where that block goes in the ``out_w x out_h`` output,
    whose other pixels are zero (the reference pads small images with zeros before rescaling).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    dx: int
    dy: int
    out_w: int
    out_h: int

    @property
    def padded(self) -> bool:
        return (self.x1 - self.x0, self.y1 - self.y0) != (self.out_w, self.out_h)


def _crop_axis(length: int, crop: int) -> tuple[int, int, int]:
    """One axis of ``transformers.image_transforms.center_crop``: ``(start, stop, offset)``.

    Larger than the crop: take the middle, rounding the start down. Smaller: keep all of it, placed at
    ``ceil((crop - length) / 2)`` in a zero canvas -- the reference's padding, worked out per axis.
    """
    if length >= crop:
        start = (length - crop) // 2
        return start, start + crop, 0
    return 0, length, (crop - length + 1) // 2


def _window(settings: _Settings, height: int, width: int) -> _Window:
    if not settings.do_center_crop:
        return _Window(0, 0, width, height, 0, 0, width, height)
    crop_h, crop_w = settings.crop_hw
    y0, y1, dy = _crop_axis(height, crop_h)
    x0, x1, dx = _crop_axis(width, crop_w)
    return _Window(x0, y0, x1, y1, dx, dy, crop_w, crop_h)


def _transpose_box(
    box: tuple[float, float, float, float], method: Image.Transpose, size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Where the rectangle ``box`` of an image of ``size`` (before ``method``) lies after ``image.transpose(method)``."""
    x0, y0, x1, y1 = box
    w, h = size
    if method == Image.Transpose.FLIP_LEFT_RIGHT:
        return (w - x1, y0, w - x0, y1)
    if method == Image.Transpose.FLIP_TOP_BOTTOM:
        return (x0, h - y1, x1, h - y0)
    if method == Image.Transpose.ROTATE_180:
        return (w - x1, h - y1, w - x0, h - y0)
    if method == Image.Transpose.TRANSPOSE:
        return (y0, x0, y1, x1)
    if method == Image.Transpose.ROTATE_90:  # counter-clockwise: (x, y) -> (y, w - x)
        return (y0, w - x1, y1, w - x0)
    if method == Image.Transpose.ROTATE_270:  # clockwise: (x, y) -> (h - y, x)
        return (h - y1, x0, h - y0, x1)
    if method == Image.Transpose.TRANSVERSE:  # (x, y) -> (h - y, w - x)
        return (h - y1, w - x1, h - y0, w - x0)
    raise ValueError(f"unknown transpose {method!r}")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1..8) of ``image``; 1 (upright) when absent, out of range or unreadable.

    Reads the header only for JPEG; a corrupt EXIF block is logged and treated as "no rotation", like the reference.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _EXIF_ERRORS as error:
        logger.debug("ignoring unreadable EXIF block (%s: %s)", type(error).__name__, error)
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _resize_window_exact(
    image: Image.Image, size: tuple[int, int], window: _Window, resample: Image.Resampling
) -> Image.Image:
    """The ``window`` of ``image.resize(size, resample)``, bit-identical, without building the whole resized image.

    Pillow resamples in two separable passes. When the height is not scaled down it runs the horizontal pass first
    (since Pillow 13 it may run the vertical pass first when the height shrinks much more than the width, so the
    caller only comes here when it does not). Each output column of the vertical pass depends on its own column of
    the horizontal pass only, so running the horizontal pass alone, cutting the window's columns, and running the
    vertical pass on strips of them gives the same bytes with memory bounded by ``_STRIP_PIXELS``: a 10000x10
    banner (384000x384 when resized) costs a 384-column crop, not a 590 MB image. Tested against the reference in
    ``tests/test_processing.py``.
    """
    new_w, new_h = size
    width, height = image.size
    rows = image.resize((new_w, height), resample) if new_w != width else image  # horizontal pass only
    columns = rows.crop((window.x0, 0, window.x1, height))
    out_w = window.x1 - window.x0
    if new_h == height:
        return columns.crop((0, window.y0, out_w, window.y1))
    strip = max(1, _STRIP_PIXELS // new_h)
    result = Image.new(image.mode, (out_w, window.y1 - window.y0))
    for start in range(0, out_w, strip):
        stop = min(out_w, start + strip)
        piece = columns.crop((start, 0, stop, height)).resize((stop - start, new_h), resample)  # vertical pass only
        result.paste(piece.crop((0, window.y0, stop - start, window.y1)), (start, 0))
    return result


# --------------------------------------------------------------------------------------------------------------------
# Results.


class BatchFeature(dict):
    """``{"pixel_values": ...}`` with attribute access and ``.to(device)``, like transformers' ``BatchFeature``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move/cast the tensors (``.to("cuda")``, ``.to(torch.bfloat16)``); numpy values stay as they are."""
        return BatchFeature(
            {key: value.to(*args, **kwargs) if _is_tensor(value) else value for key, value in self.items()}
        )


# --------------------------------------------------------------------------------------------------------------------
# The processor.


class ViTHybridImageProcessor:
    """Drop-in for ``transformers.ViTHybridImageProcessor`` (same arguments, defaults and ``pixel_values``).

    Defaults are the reference *class's* (224 px, CLIP mean/std), so that code constructing the class by hand
    behaves the same; ``from_pretrained`` reads the checkpoint's ``preprocessor_config.json`` (384 px, mean = std =
    0.5 for ``google/vit-hybrid-base-bit-384``).

    Args:
        do_resize: resize before cropping.
        size: ``{"shortest_edge": n}`` (keep aspect ratio) or ``{"height": h, "width": w}``; an int means the
            shortest edge, a pair ``(h, w)``.
        resample: Pillow filter (``PIL.Image.Resampling`` or its int; 3 = bicubic).
        do_center_crop: centre-crop to ``crop_size``, padding with zeros when the image is smaller.
        crop_size: ``{"height": h, "width": w}``, or an int for a square.
        do_rescale, rescale_factor: multiply by ``rescale_factor`` (in float64, then cast to float32).
        do_normalize, image_mean, image_std: ``(x - mean) / std`` in float32, per RGB channel.
        do_convert_rgb: convert non-RGB images with ``image.convert("RGB")`` (alpha dropped, palette expanded).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: Mapping[str, int] | int | Sequence[int] | None = None,
        resample: int | Image.Resampling = Image.Resampling.BICUBIC,
        do_center_crop: bool = True,
        crop_size: Mapping[str, int] | int | Sequence[int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
    ) -> None:
        self.do_resize = do_resize
        self.size = _parse_size(dict(_DEFAULT_SIZE) if size is None else size)
        self.resample = int(_parse_resample(resample))
        self.do_center_crop = do_center_crop
        self.crop_size = _parse_crop_size(dict(_DEFAULT_CROP_SIZE) if crop_size is None else crop_size)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(OPENAI_CLIP_MEAN) if image_mean is None else image_mean
        self.image_std = list(OPENAI_CLIP_STD) if image_std is None else image_std
        self.do_convert_rgb = do_convert_rgb
        self._cache: tuple[str, _Settings] | None = None
        self._settings()  # validate now, so a bad config fails where it is loaded, not on the first image

    # ----------------------------------------------------------------------------------------------- configuration

    def _settings(self, **overrides: Any) -> _Settings:
        """Validated settings from the public attributes (which callers may change, as with transformers)."""
        values = {name: getattr(self, name) for name in _FIELDS}
        unknown = set(overrides) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown preprocessing argument(s) {sorted(unknown)}; expected some of {list(_FIELDS)}")
        values.update({name: value for name, value in overrides.items() if value is not None})
        key = repr(sorted(values.items()))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        settings = _Settings.parse(values)
        if not overrides:
            self._cache = (key, settings)
        return settings

    def to_dict(self) -> dict[str, Any]:
        """The settings as ``preprocessor_config.json`` holds them (readable by transformers too)."""
        settings = self._settings()
        output: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        output["size"] = dict(self.size)
        output["crop_size"] = dict(self.crop_size)
        output["resample"] = int(settings.resample)
        output["do_resize"], output["do_center_crop"] = settings.do_resize, settings.do_center_crop
        output["do_rescale"], output["do_normalize"] = settings.do_rescale, settings.do_normalize
        output["do_convert_rgb"] = settings.do_convert_rgb
        output["rescale_factor"] = settings.rescale_factor
        output["image_mean"] = _json_channels(self.image_mean)
        output["image_std"] = _json_channels(self.image_std)
        output["image_processor_type"] = type(self).__name__
        return output

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> ViTHybridImageProcessor:
        """Build from a ``preprocessor_config.json`` dict; ``overrides`` replace single settings.

        Unknown keys raise ``ValueError`` naming them, so that a setting we would not apply is never ignored.
        """
        values = {key: value for key, value in config.items() if key not in _METADATA_KEYS}
        values.update(overrides)
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise ValueError(
                f"unsupported image processor setting(s) {sorted(unknown)}; ViTHybridImageProcessor takes {list(_FIELDS)}"
            )
        processor_type = config.get("image_processor_type")
        if processor_type not in (None, cls.__name__):
            logger.warning("config is for %s, loading it as %s", processor_type, cls.__name__)
        return cls(**values)

    @classmethod
    def from_pretrained(
        cls, path_or_uri: str, storage_options: Mapping[str, Any] | None = None, **overrides: Any
    ) -> ViTHybridImageProcessor:
        """Read ``preprocessor_config.json`` from a local folder or any fsspec URI (``s3://bucket/models/x/``).

        ``path_or_uri`` may also name the JSON file itself. ``storage_options`` go to fsspec (e.g. ``{"anon": True}``).
        """
        from model.storage import join_uri, read_bytes  # storage is an edge concern; keep `model` import-light

        uri = path_or_uri if path_or_uri.endswith(".json") else join_uri(path_or_uri, CONFIG_NAME)
        try:
            data = read_bytes(uri, storage_options)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"no image processor config at {uri}: pass the checkpoint folder that holds {CONFIG_NAME}"
            ) from error
        try:
            config = json.loads(data)
        except json.JSONDecodeError as error:
            raise ValueError(f"{uri} is not valid JSON: {error}") from error
        if not isinstance(config, dict):
            raise ValueError(f"{uri} must hold a JSON object, got {type(config).__name__}")
        return cls.from_dict(config, **overrides)

    def save_pretrained(self, folder: str, storage_options: Mapping[str, Any] | None = None) -> str:
        """Write ``preprocessor_config.json`` into ``folder`` (local or URI); return the file's URI."""
        from model.storage import join_uri, write_bytes

        uri = join_uri(folder, CONFIG_NAME)
        write_bytes(uri, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode(), storage_options)
        return uri

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of every :meth:`to_uint8` output; ``ValueError`` if it depends on the image."""
        settings = self._settings()
        if settings.do_center_crop:
            return settings.crop_hw
        if settings.do_resize and settings.resize_hw is not None:
            return settings.resize_hw
        raise ValueError(
            "the output size depends on each image's aspect ratio (do_center_crop is off and size is not "
            "{'height', 'width'}); batches need one size: turn do_center_crop on or give size as height and width"
        )

    # ------------------------------------------------------------------------------------------------ the CPU half

    def to_uint8(self, image: Image.Image, *, fast: bool = False, exif_orientation: bool = False) -> np.ndarray:
        """Convert, resize and crop one image into a C-contiguous ``(crop_h, crop_w, 3)`` uint8 array.

        ``exif_orientation=True`` first turns the image upright by its EXIF Orientation tag (the pipeline's decode
        stage does; the reference does not, hence the default). ``fast=False`` is bit-identical to the reference's
        resize + centre crop (of the upright image when ``exif_orientation``). ``fast=True`` may call ``image.draft``
        (so pass a freshly opened, not yet loaded image to profit) to let libjpeg decode big JPEGs at 1/2, 1/4 or 1/8
        scale while keeping :data:`FAST_DRAFT_MARGIN` (2) times the resize target, so only JPEGs at least 4x the
        target are affected; every other image is processed exactly as with ``fast=False``.

        Raises whatever Pillow raises on corrupt data (``OSError`` for truncated files, ...), ``ValueError`` for an
        image that cannot be made RGB, and :class:`ResizeTooLargeError` for absurd aspect ratios.
        """
        return self._to_uint8(image, self._settings(), fast=fast, exif_orientation=exif_orientation)

    def _to_uint8(
        self, image: Image.Image, settings: _Settings, *, fast: bool, exif_orientation: bool = False
    ) -> np.ndarray:
        width, height = image.size
        # Refuse from the header, before decoding: a quarter turn does not change the resized pixel count.
        new_h, new_w = settings.resize_output_size(height, width)
        if settings.do_resize and new_h * new_w > MAX_RESIZED_PIXELS:
            raise ResizeTooLargeError(
                f"{width}x{height} would resize to {new_w}x{new_h} = {new_w * new_h} pixels > limit {MAX_RESIZED_PIXELS}"
            )
        valid_box: tuple[float, float, float, float] | None = None
        if fast and settings.do_resize:
            # Any scale keeps both sides >= target, so the short side stays >= the shortest edge after rotation.
            target = (settings.shortest_edge or max(settings.resize_hw or (1, 1))) * FAST_DRAFT_MARGIN
            drafted = image.draft("RGB", (target, target))  # None unless a not-yet-loaded JPEG
            if drafted is not None and image.size != (width, height):
                valid_box = drafted[1]  # the part of the scaled image that maps onto the original (no edge padding)
        image.load()
        orientation = _exif_orientation(image) if exif_orientation else 1
        if orientation != 1:
            method = _ORIENTATION_TRANSPOSE[orientation]
            if valid_box is not None:
                valid_box = _transpose_box(valid_box, method, image.size)
            image = image.transpose(method)
            if method in _SWAPS_AXES:
                width, height = height, width

        if image.mode != "RGB":
            if not settings.do_convert_rgb:
                raise ValueError(f"do_convert_rgb is off but the image is {image.mode}, not RGB")
            image = image.convert("RGB")

        new_h, new_w = settings.resize_output_size(height, width)  # upright size now
        window = _window(settings, new_h, new_w)
        full = (window.x0, window.y0, window.x1, window.y1) == (0, 0, new_w, new_h)
        if not settings.do_resize:
            region = image if full else image.crop((window.x0, window.y0, window.x1, window.y1))
        elif valid_box is not None:
            # A drafted JPEG: the exact resize, from the DCT-downscaled pixels, mapped onto the original's geometry.
            region = image.resize((new_w, new_h), settings.resample, box=valid_box)
            if not full:
                region = region.crop((window.x0, window.y0, window.x1, window.y1))
        elif (
            not full
            and settings.resample != Image.Resampling.NEAREST
            and new_h >= image.height
            and new_h * new_w > max(FULL_RESIZE_PIXELS, image.width * image.height)
        ):
            region = _resize_window_exact(image, (new_w, new_h), window, settings.resample)
        else:
            region = image.resize((new_w, new_h), settings.resample)
            if not full:
                region = region.crop((window.x0, window.y0, window.x1, window.y1))

        pixels = np.asarray(region)
        if not window.padded:
            return np.array(pixels, dtype=np.uint8, order="C")  # own, writable copy (asarray is a read-only view)
        canvas = np.zeros((window.out_h, window.out_w, 3), dtype=np.uint8)
        canvas[window.dy : window.dy + pixels.shape[0], window.dx : window.dx + pixels.shape[1]] = pixels
        return canvas

    # --------------------------------------------------------------------------------------------- the device half

    def normalizer(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PixelNormalizer:
        """The device half: a module turning stacked :meth:`to_uint8` outputs into ``pixel_values`` (float32 unless
        ``dtype`` says otherwise)."""
        import torch

        from model.normalization import PixelNormalizer

        table = self._settings().lookup_table()
        if table is None:  # neither rescale nor normalise: the values themselves, as floats
            table = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256))
        return PixelNormalizer(table, device=device, dtype=dtype or torch.float32)

    # ---------------------------------------------------------------------------------------- the transformers API

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = None,
        data_format: str | None = "channels_first",
        input_data_format: str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """``{"pixel_values": ...}`` for one image or a list: PIL images (any mode) or uint8 arrays/tensors.

        Values are identical to ``transformers.ViTHybridImageProcessor.preprocess`` with the same settings
        (``overrides`` take the same names: ``size=``, ``do_center_crop=``, ...), EXIF or not: like the reference, it
        ignores EXIF orientation. ``return_tensors``: ``None`` -> list of ``(3, H, W)`` arrays, ``"np"`` or ``"pt"`` -> one
        ``(N, 3, H, W)`` batch. Arrays may be ``(H, W, 3)`` or ``(3, H, W)``; like the reference, a leading axis of
        3 is read as channels unless ``input_data_format="channels_last"``.
        """
        settings = self._settings(**overrides)
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        if input_data_format not in (None, "channels_first", "channels_last"):
            raise ValueError(f"input_data_format must be None, 'channels_first' or 'channels_last', got {input_data_format!r}")
        table = settings.lookup_table()
        outputs = []
        for image in _flatten_images(images):
            pixels = self._to_uint8(_as_pil(image, input_data_format), settings, fast=False)
            if table is None:
                values = pixels.transpose(2, 0, 1)
            else:
                values = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
                for channel in range(3):
                    np.take(table[channel], pixels[..., channel], out=values[channel])
            outputs.append(values if data_format == "channels_first" else values.transpose(1, 2, 0))
        if return_tensors is None:
            return BatchFeature(pixel_values=outputs)
        if len({output.shape for output in outputs}) > 1:
            raise ValueError(
                "images resize to different shapes and cannot be stacked into one tensor; "
                "turn do_center_crop on or use return_tensors=None"
            )
        batch = np.stack(outputs)
        if return_tensors == "pt":
            import torch

            return BatchFeature(pixel_values=torch.from_numpy(batch))
        return BatchFeature(pixel_values=batch)

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        """Same as :meth:`preprocess`."""
        return self.preprocess(images, **kwargs)


def _json_channels(value: Any) -> float | list[float]:
    """A mean/std as given (one number or one per channel), as plain JSON numbers."""
    if isinstance(value, numbers.Real):
        return float(value)
    return [float(item) for item in value]


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch: where torch was never imported, nothing is one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _flatten_images(images: Any) -> list[Any]:
    """One image, a list (possibly nested) of images, or a 4-D batch array -> flat list, like the reference."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if (isinstance(images, np.ndarray) or _is_tensor(images)) and images.ndim == 4:
        return list(images)
    return [images]


def _as_pil(image: Any, input_data_format: str | None) -> Image.Image:
    """A PIL image as is; a uint8 (H, W, 3) or (3, H, W) array/tensor as an RGB image (what the reference resizes)."""
    if isinstance(image, Image.Image):
        return image
    if _is_tensor(image):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"arrays must be uint8 with values 0..255, got {image.dtype}")
    if image.ndim != 3:
        raise ValueError(f"arrays must be (H, W, 3) or (3, H, W), got shape {image.shape}")
    channels_first = input_data_format == "channels_first" or (input_data_format is None and image.shape[0] == 3)
    if channels_first:
        image = image.transpose(1, 2, 0)
    if image.shape[-1] != 3:
        raise ValueError(f"arrays must have 3 (RGB) channels, got shape {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image))  # uint8 (H, W, 3) -> mode "RGB"


_exif_orientation = exif_orientation  # the module function, under a name the to_uint8 argument does not shadow
