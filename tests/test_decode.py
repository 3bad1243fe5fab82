"""pipeline.decode: every hostile input becomes exactly one row, with the right reason or a valid image.

Inputs are built here from skimage's photographs; a "valid" outcome is checked against the processor's own
``to_uint8`` on the same image, so these tests are about robustness and row bookkeeping, not resampling (that is
tests/test_processing.py).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
from PIL import Image, ImageFile, ImageOps

from model.processing import ViTHybridImageProcessor
from pipeline.decode import DEFAULT_MAX_IMAGE_PIXELS, DecodedImage, DecodeError, decode_batch, decode_sample

SETTINGS = {
    "size": {"shortest_edge": 384},
    "crop_size": {"height": 384, "width": 384},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


@pytest.fixture(scope="module")
def processor() -> ViTHybridImageProcessor:
    return ViTHybridImageProcessor(**SETTINGS)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def photo(name: str = "astronaut") -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but whose pixel data is 100 bytes: only a header check passes it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo().crop((0, 0, 512, 300)), "JPEG", quality=90, exif=exif.tobytes())


JPEG = encode(photo(), "JPEG", quality=90)
PNG = encode(photo("coffee"), "PNG")

# name -> (bytes, expected error prefix or None for a valid image)
CASES: dict[str, tuple[bytes | None, str | None]] = {
    "missing": (None, "no data (missing bytes and no upstream error)"),
    "empty": (b"", "empty file (0 bytes)"),
    "text": (b"this is not an image\n" * 20, "not an image: cannot identify image file"),
    "JPEG magic, then garbage": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not an image: cannot identify image file"),
    "truncated JPEG (half)": (JPEG[: len(JPEG) // 2], "decode error: truncated JPEG (image file is truncated"),
    "truncated JPEG (no EOI)": (JPEG[:-2], "decode error: truncated JPEG (image file is truncated"),
    "truncated JPEG (in header)": (JPEG[:300], "decode error: truncated"),
    "truncated PNG": (PNG[: len(PNG) // 3], "decode error: truncated PNG (image file is truncated"),
    "bomb (Pillow's limit)": (png_header_only(20000, 20000), "image too large: 400000000 pixels > limit 178956970"),
    "16-bit grayscale PNG": (encode(Image.fromarray(np.asarray(photo("camera")).astype(np.uint16) * 200), "PNG"), None),
    "CMYK JPEG": (encode(photo().convert("CMYK"), "JPEG"), None),
    "palette + transparency PNG": (encode(photo().convert("P"), "PNG", transparency=3), None),
    "LA PNG": (encode(photo().convert("LA"), "PNG"), None),
    "RGBA PNG": (encode(photo().convert("RGBA"), "PNG"), None),
    "grayscale JPEG": (encode(photo("camera"), "JPEG"), None),
    "progressive JPEG": (encode(photo("rocket"), "JPEG", progressive=True), None),
    "1x1": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), None),
    "10000x10": (encode(photo().resize((10000, 10)), "PNG"), None),
    "10x3000": (encode(photo().resize((10, 3000)), "PNG"), None),
    "animated GIF": (encode(photo().convert("P"), "GIF", save_all=True, append_images=[photo("coffee").convert("P")]), None),
    "animated WebP": (encode(photo(), "WEBP", save_all=True, append_images=[photo("coffee").resize((512, 512))]), None),
    "multi-page TIFF": (encode(photo(), "TIFF", save_all=True, append_images=[photo("coffee")]), None),
    "BMP": (encode(photo(), "BMP"), None),
    "EXIF-rotated JPEG": (exif_rotated_jpeg(6), None),
}


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_input_gives_one_result(processor, name: str, fast: bool) -> None:
    data, expected_error = CASES[name]
    result = decode_sample(data, processor=processor, fast=fast, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    if expected_error is not None:
        assert isinstance(result, DecodeError), name
        assert result.reason.startswith(expected_error), result.reason
        assert len(result.reason) <= 300
    else:
        assert isinstance(result, DecodedImage), getattr(result, "reason", None)
        assert result.pixels.shape == (384, 384, 3) and result.pixels.dtype == np.uint8
        assert result.pixels.any(), "a decoded photo is not black"
        # The same bytes through the processor directly (first frame, header size): decode adds nothing else.
        expected = processor.to_uint8(Image.open(io.BytesIO(data)), fast=fast, exif_orientation=True)
        assert np.array_equal(result.pixels, expected)


def test_our_pixel_limit_is_checked_on_the_header_before_decoding(processor, monkeypatch) -> None:
    def must_not_decode(*args, **kwargs):
        raise AssertionError("pixels decoded although the header is over the limit")

    monkeypatch.setattr(processor, "to_uint8", must_not_decode)
    result = decode_sample(encode(photo(), "PNG"), processor=processor, fast=False, max_image_pixels=10_000)
    assert result == DecodeError("image too large: 512x512 = 262144 pixels > limit 10000")
    # A header claiming 30000x5000 with 100 bytes of data: refused as too large, never read as truncated.
    result = decode_sample(png_header_only(30000, 5000), processor=processor, fast=True, max_image_pixels=100_000_000)
    assert result == DecodeError("image too large: 30000x5000 = 150000000 pixels > limit 100000000")


def test_exif_rotated_photo_is_rotated(processor) -> None:
    data = exif_rotated_jpeg(6)
    result = decode_sample(data, processor=processor, fast=False)
    assert isinstance(result, DecodedImage)
    assert (result.width, result.height) == (300, 512)  # upright: stored 512x300, turned a quarter
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert np.array_equal(result.pixels, processor.to_uint8(upright))
    unrotated = processor.to_uint8(Image.open(io.BytesIO(encode(photo().crop((0, 0, 512, 300)), "JPEG", quality=90))))
    assert not np.array_equal(result.pixels, unrotated)


def test_animated_gif_uses_the_first_frame(processor) -> None:
    data = CASES["animated GIF"][0]
    result = decode_sample(data, processor=processor, fast=False)
    assert isinstance(result, DecodedImage)
    first = processor.to_uint8(photo().convert("P"))
    second = processor.to_uint8(photo("coffee").convert("P"))
    assert np.array_equal(result.pixels, first) and not np.array_equal(result.pixels, second)


def test_mutated_files_never_raise(processor) -> None:
    """Random byte flips and cuts of files in eight formats: each gives an image or a DecodeError, never an exception.

    (A 12000-sample run of this while developing raised nothing outside DECODE_ERRORS.)
    """
    small = ViTHybridImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    base = photo().resize((96, 96))
    exif = Image.Exif()
    exif[0x0112] = 8  # so that flips can also land in the EXIF block
    seeds = [
        encode(base, "JPEG", exif=exif.tobytes()),
        encode(base, "JPEG", progressive=True),
        encode(base, "PNG"),
        encode(base.convert("P"), "GIF", save_all=True, append_images=[base.convert("P")]),
        encode(base, "WEBP"),
        encode(base, "TIFF"),
        encode(base, "BMP"),
        encode(base, "ICO"),
    ]
    rng = np.random.default_rng(7)
    outcomes = {DecodedImage: 0, DecodeError: 0}
    for trial in range(400):
        data = bytearray(seeds[trial % len(seeds)])
        if trial % 2:
            for _ in range(int(rng.integers(1, 12))):
                data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        else:
            data = data[: int(rng.integers(0, len(data)))]
        result = decode_sample(bytes(data), processor=small, fast=bool(trial % 3 == 0))
        outcomes[type(result)] += 1
    assert outcomes[DecodedImage] > 0 and outcomes[DecodeError] > 0


def test_truncated_images_stay_errors() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # decoding never turns it on


# ---------------------------------------------------------------------------------------------------- decode_batch


def sample_batch() -> dict[str, np.ndarray]:
    keys = ["good-jpeg", "bad", "read-failed", "read-failed-with-bytes", "good-png", "empty"]
    datas = [JPEG, b"garbage", None, JPEG, PNG, b""]
    errors = [None, None, "read error: NoSuchKey", "read error: checksum mismatch", None, None]

    def objects(values: list) -> np.ndarray:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array

    return {
        "key": objects(keys),
        "source": objects([f"s3://bucket/shard-0.tar#{key}" for key in keys]),
        "data": objects(datas),
        "error": objects(errors),
        "ordinal": np.arange(len(keys), dtype=np.int64),
        "caption": objects(["a", None, "c", "d", "e", "f"]),
    }


def check_decoded(output: dict, batch: dict, processor: ViTHybridImageProcessor) -> None:
    assert list(output) == ["key", "source", "pixels", "error", "ordinal", "caption"]  # data dropped
    assert list(output["key"]) == list(batch["key"]) and list(output["source"]) == list(batch["source"])
    assert output["pixels"].shape == (6, 384, 384, 3) and output["pixels"].dtype == np.uint8
    errors = list(output["error"])
    assert errors[0] is None and errors[4] is None
    assert errors[1] == "not an image: cannot identify image file"
    assert errors[2] == "read error: NoSuchKey"  # upstream errors pass through untouched ...
    assert errors[3] == "read error: checksum mismatch"  # ... and their bytes are not decoded
    assert errors[5] == "empty file (0 bytes)"
    assert np.array_equal(output["pixels"][0], processor.to_uint8(Image.open(io.BytesIO(JPEG))))
    assert np.array_equal(output["pixels"][4], processor.to_uint8(Image.open(io.BytesIO(PNG))))
    assert not output["pixels"][[1, 2, 3, 5]].any()  # error rows are zeros
    assert list(output["ordinal"]) == list(range(6)) and list(output["caption"]) == ["a", None, "c", "d", "e", "f"]


def test_decode_batch_one_row_per_input_row(processor) -> None:
    batch = sample_batch()
    output = decode_batch(batch, processor=processor, fast=True, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    check_decoded(output, batch, processor)
    assert output["ordinal"] is batch["ordinal"]  # extra columns are passed through, not copied


def test_decode_batch_accepts_arrow_tables_and_lists(processor) -> None:
    batch = sample_batch()
    table = pa.table(
        {
            "key": pa.array(list(batch["key"]), pa.string()),
            "source": pa.array(list(batch["source"]), pa.string()),
            "data": pa.array(list(batch["data"]), pa.binary()),
            "error": pa.array(list(batch["error"]), pa.string()),
            "ordinal": pa.array(batch["ordinal"]),
            "caption": pa.array(list(batch["caption"]), pa.string()),
        }
    )
    check_decoded(decode_batch(table, processor=processor, fast=False), batch, processor)
    as_lists = {name: list(column) for name, column in batch.items()}
    check_decoded(decode_batch(as_lists, processor=processor, fast=False), batch, processor)


def test_decode_batch_output_is_a_ray_block(processor) -> None:
    """What Ray Data does with a numpy batch: an Arrow table with a tensor column and nullable strings."""
    from ray.data.block import BlockAccessor

    block = BlockAccessor.batch_to_block(decode_batch(sample_batch(), processor=processor, fast=True))
    assert block.num_rows == 6
    assert block.column("error").null_count == 2 and pa.types.is_string(block.column("error").type)
    pixels = BlockAccessor.for_block(block).to_batch_format("numpy")["pixels"]
    assert pixels.shape == (6, 384, 384, 3) and pixels.dtype == np.uint8


def test_decode_batch_edges(processor) -> None:
    empty = decode_batch({"key": [], "source": [], "data": []}, processor=processor, fast=True)
    assert empty["pixels"].shape == (0, 384, 384, 3) and len(empty["error"]) == 0
    no_error_column = decode_batch({"key": ["k"], "source": ["s"], "data": [JPEG]}, processor=processor, fast=True)
    assert no_error_column["error"][0] is None
    with pytest.raises(KeyError, match="'data'"):
        decode_batch({"key": ["k"], "source": ["s"]}, processor=processor)
    with pytest.raises(ValueError, match="rows"):
        decode_batch({"key": ["k"], "source": ["s", "t"], "data": [JPEG]}, processor=processor)
    with pytest.raises(ValueError, match="depends on each image"):
        decode_batch(sample_batch(), processor=ViTHybridImageProcessor(do_center_crop=False))
