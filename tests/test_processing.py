"""model.processing against transformers' ViTHybridImageProcessor: identical pixel values, config round trips, fast path.

Parity is exact equality (``torch.equal``), on real photographs from ``skimage.data``, in every image mode the
pipeline meets, smaller and larger than the crop, tall and wide. The reference is given the EXIF-transposed image
where orientation matters, because that is the one intentional difference.

Sizes with a height of 1 or 3 pixels are avoided in parity tests: the reference infers channels-first from a leading
axis of 1 or 3 and mangles such images (ours handle them; tests/test_decode.py decodes a 1x1 image).
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pytest
import skimage.data
import torch
import transformers
from PIL import Image, ImageOps

from model import processing
from model.normalization import PixelNormalizer
from model.processing import (
    ResizeTooLargeError,
    ViTHybridImageProcessor,
)

# google/vit-hybrid-base-bit-384's preprocessor_config.json.
CHECKPOINT_CONFIG = {
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTHybridImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 384},
    "crop_size": {"height": 384, "width": 384},
}
SETTINGS = {key: value for key, value in CHECKPOINT_CONFIG.items() if key != "image_processor_type"}

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]  # camera is grayscale
MODES = ["RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16"]
# (width, height): smaller and larger than 384, wide and tall, exactly 384, and an odd size off by one.
SIZES = [(200, 130), (130, 250), (1000, 620), (390, 1500), (384, 384), (385, 383)]


@pytest.fixture(scope="module")
def reference() -> transformers.ViTHybridImageProcessor:
    return transformers.ViTHybridImageProcessor(**SETTINGS)


@pytest.fixture(scope="module")
def processor() -> ViTHybridImageProcessor:
    return ViTHybridImageProcessor(**SETTINGS)


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(getattr(skimage.data, name)())
    return image if size is None else image.resize(size, Image.Resampling.BILINEAR)


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """The photo in ``mode``; I;16 spreads the 8-bit gray over 16 bits as a 16-bit PNG would."""
    if mode == "I;16":
        gray = np.asarray(image.convert("L")).astype(np.uint16)
        converted = Image.fromarray(gray * 257 // 2)
        assert converted.mode == "I;16"
        return converted
    return image.convert(mode)


def jpeg_bytes(image: Image.Image, quality: int = 90, exif: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **({"exif": exif} if exif else {}))
    return buffer.getvalue()


def split_path(processor: ViTHybridImageProcessor, image: Image.Image, *, fast: bool = False) -> torch.Tensor:
    """The pipeline's form: CPU half per image, device half on the stacked batch."""
    crop = processor.to_uint8(image, fast=fast)
    return processor.normalizer()(torch.from_numpy(crop)[None])


# ---------------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket", "camera"])
def test_identical_to_reference_in_every_mode_and_size(reference, processor, name: str, mode: str) -> None:
    for size in [None, *SIZES]:
        image = in_mode(photo(name, size), mode)
        expected = reference(image, return_tensors="pt")["pixel_values"]
        assert expected.shape == (1, 3, 384, 384)
        got = processor(image, return_tensors="pt")["pixel_values"]
        assert got.dtype == torch.float32 and torch.equal(got, expected), f"preprocess {name} {size} {mode}"
        split = split_path(processor, image)
        assert torch.equal(split, expected), f"to_uint8 + normalizer {name} {size} {mode}"


@pytest.mark.parametrize("mode", ["1", "PA", "I", "F", "YCbCr", "RGBX", "LAB", "HSV"])
def test_identical_to_reference_in_rarer_modes(reference, processor, mode: str) -> None:
    image = in_mode(photo("chelsea"), mode)
    assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], reference(image, return_tensors="pt")["pixel_values"])


def test_numpy_arrays_tensors_and_batches(reference, processor) -> None:
    hwc = np.asarray(photo("coffee"))
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    expected = reference(hwc, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(processor(hwc, return_tensors="np")["pixel_values"], expected)
    np.testing.assert_array_equal(processor(chw, return_tensors="np")["pixel_values"], reference(chw, return_tensors="np")["pixel_values"])
    tensor = torch.from_numpy(hwc.copy())
    assert torch.equal(processor(tensor, return_tensors="pt")["pixel_values"], reference(tensor, return_tensors="pt")["pixel_values"])

    images = [photo("astronaut"), photo("rocket"), hwc]
    batch = processor(images, return_tensors="pt")
    assert batch.pixel_values.shape == (3, 3, 384, 384)
    assert torch.equal(batch["pixel_values"], reference(images, return_tensors="pt")["pixel_values"])
    unstacked = processor(images)["pixel_values"]  # like the reference: a list of (3, H, W) arrays
    assert isinstance(unstacked, list) and all(np.array_equal(a, b) for a, b in zip(unstacked, reference(images)["pixel_values"]))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the reference class's own defaults: 224 px, CLIP mean/std
        {"size": {"height": 300, "width": 200}, "crop_size": 160},
        {"size": 256, "crop_size": (200, 300), "resample": Image.Resampling.BILINEAR},
        {"resample": Image.Resampling.LANCZOS, "image_mean": 0.4, "image_std": 0.2},
        {"resample": Image.Resampling.NEAREST, "do_center_crop": False, "size": {"height": 100, "width": 120}},
        {"do_resize": False, "crop_size": {"height": 601, "width": 201}},  # crop taller than the image: odd padding
        {"size": 200, "crop_size": 255},  # crop wider than the resized image: zero padding, then normalised
        {"do_rescale": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},  # the reference then returns uint8
        {"rescale_factor": 1 / 127.5, "image_mean": [1.0, 0.9, 1.1], "image_std": [1.0, 2.0, 0.5]},
    ],
)
def test_other_settings_identical_to_reference(overrides: dict) -> None:
    ours = ViTHybridImageProcessor(**overrides)
    ref = transformers.ViTHybridImageProcessor(**overrides)
    for image in [photo("astronaut", (333, 500)), in_mode(photo("chelsea"), "P")]:
        expected = ref(image, return_tensors="pt")["pixel_values"]
        got = ours(image, return_tensors="pt")["pixel_values"]
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        if expected.dtype == torch.float32:
            assert torch.equal(split_path(ours, image), expected)


def test_preprocess_overrides_match_the_reference(reference, processor) -> None:
    image = photo("rocket")
    got = processor(image, return_tensors="np", size={"shortest_edge": 200}, crop_size=200)["pixel_values"]
    expected = reference(image, return_tensors="np", size={"shortest_edge": 200}, crop_size=200)["pixel_values"]
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="crop_pct"):
        processor(image, crop_pct=0.9)


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_processor_equals_the_reference_on_photos_with_every_exif_orientation(reference, processor, name) -> None:
    """The drop-in API ignores EXIF orientation exactly as transformers' processor does: bit for bit, tags 1-8."""
    exif = Image.Exif()
    base = photo(name, (600, 400))
    for orientation in range(1, 9):
        exif[ExifOrientation] = orientation
        data = jpeg_bytes(base, exif=exif.tobytes())
        assert Image.open(io.BytesIO(data)).getexif()[ExifOrientation] == orientation
        expected = reference(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
        got = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
        assert torch.equal(got, expected), orientation
        assert torch.equal(split_path(processor, Image.open(io.BytesIO(data))), expected), orientation


def test_to_uint8_with_exif_orientation_equals_the_reference_on_the_upright_photo(reference, processor) -> None:
    """The pipeline's form turns photos upright first: the reference fed ImageOps.exif_transpose's output."""
    exif = Image.Exif()
    base = photo("astronaut", (600, 400))
    for orientation in range(1, 9):
        exif[ExifOrientation] = orientation
        data = jpeg_bytes(base, exif=exif.tobytes())
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        expected = reference(upright, return_tensors="pt")["pixel_values"]
        crop = processor.to_uint8(Image.open(io.BytesIO(data)), exif_orientation=True)
        assert torch.equal(processor.normalizer()(torch.from_numpy(crop)[None]), expected), orientation
        if orientation != 1:
            plain = processor.to_uint8(Image.open(io.BytesIO(data)))
            assert not np.array_equal(crop, plain), orientation


ExifOrientation = 0x0112


@pytest.mark.parametrize("size", [(3000, 7), (7, 2500)])
def test_extreme_aspect_ratios_identical_without_the_full_resize(reference, processor, size) -> None:
    """3000x7 resizes to 164571x384 in the reference; we compute only the crop window, with the same bytes."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert torch.equal(split_path(processor, image), reference(image, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS])
def test_windowed_exact_resize_is_bit_identical(monkeypatch, resample) -> None:
    """Force the windowed exact path (narrow strips) on ordinary upscales and compare with the reference."""
    monkeypatch.setattr(processing, "FULL_RESIZE_PIXELS", 0)
    monkeypatch.setattr(processing, "_STRIP_PIXELS", 3000)
    ours = ViTHybridImageProcessor(**{**SETTINGS, "resample": resample})
    ref = transformers.ViTHybridImageProcessor(**{**SETTINGS, "resample": resample})
    for size in [(200, 130), (130, 250), (300, 383), (383, 50), (31, 377)]:
        image = photo("coffee", size)
        assert torch.equal(split_path(ours, image), ref(image, return_tensors="pt")["pixel_values"]), size


def test_absurd_aspect_ratio_is_refused(processor) -> None:
    line = Image.new("RGB", (1, 200_000))
    with pytest.raises(ResizeTooLargeError, match="1x200000 would resize to 384x76800000"):
        processor.to_uint8(line)
    with pytest.raises(ResizeTooLargeError):
        processor.to_uint8(line, fast=True)


def test_to_uint8_output_contract(processor) -> None:
    for image in [photo("chelsea"), photo("camera", (100, 60))]:
        for fast in (False, True):
            crop = processor.to_uint8(image.copy(), fast=fast)
            assert crop.shape == (384, 384, 3) and crop.dtype == np.uint8
            assert crop.flags.c_contiguous and crop.flags.writeable
    assert processor.output_size == (384, 384)
    with pytest.raises(ValueError, match="depends on each image"):
        _ = ViTHybridImageProcessor(do_center_crop=False).output_size
    assert ViTHybridImageProcessor(do_center_crop=False, size=(200, 100)).output_size == (200, 100)


# ----------------------------------------------------------------------------------------------------- normaliser


def test_normalizer_dtypes_layout_and_errors(reference, processor) -> None:
    images = [photo(name) for name in ("astronaut", "coffee", "rocket")]
    batch = np.stack([processor.to_uint8(image) for image in images])
    expected = reference(images, return_tensors="pt")["pixel_values"]

    values = processor.normalizer()(torch.from_numpy(batch))
    assert values.shape == (3, 3, 384, 384) and values.dtype == torch.float32
    assert values.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(values, expected)
    assert torch.equal(processor.normalizer()(batch), expected)  # numpy accepted too

    bf16 = processor.normalizer(dtype=torch.bfloat16)(torch.from_numpy(batch))
    assert bf16.dtype == torch.bfloat16 and bf16.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bf16, expected.to(torch.bfloat16))  # the float32 values, rounded once

    chunked = processor.normalizer()
    chunked.index_elements = 1000  # a slice of one image per step: same values
    assert torch.equal(chunked(torch.from_numpy(batch)), expected)

    normalizer = processor.normalizer(device="cpu")
    assert isinstance(normalizer, PixelNormalizer) and normalizer.table.device.type == "cpu"
    with pytest.raises(ValueError, match="uint8"):
        normalizer(torch.from_numpy(batch).float())
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        normalizer(torch.from_numpy(batch[0]))


def test_lookup_table_is_the_reference_arithmetic_for_every_value() -> None:
    """All 256 values x 3 channels through the reference's rescale + normalize: the table is exhaustive proof."""
    from transformers.image_transforms import normalize, rescale

    settings = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    every_value = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3) HWC
    expected = normalize(rescale(every_value, 1 / 255), mean=settings["image_mean"], std=settings["image_std"])
    table = ViTHybridImageProcessor(**settings).normalizer().table.view(3, 256)
    np.testing.assert_array_equal(table.numpy().T, expected[:, 0, :])


# ------------------------------------------------------------------------------------------------------ fast path


def test_fast_path_deviation_on_12_megapixel_jpegs(processor) -> None:
    """fast=True on 4000x3000 JPEGs (upscaled skimage photos, quality 90) against the exact path.

    Measured on this code (Pillow 13, libjpeg-turbo), in uint8 pixel units (divide by 127.5 for pixel_values):
    4000x3000 and 3000x4000 JPEGs of astronaut, coffee, chelsea, rocket, hubble_deep_field, camera:
    max |diff| 3..8, mean |diff| 0.18..0.37, 99th percentile <= 2. (1200x900 images, drafted 2x then resized by
    only 1.17x, deviate more: max up to 29, mean up to 1.0.) Bounds below leave a little headroom.
    """
    for name, size, orientation in [("astronaut", (4000, 3000), 1), ("coffee", (3000, 4000), 1), ("chelsea", (4000, 3000), 6)]:
        exif = Image.Exif()
        exif[ExifOrientation] = orientation
        data = jpeg_bytes(photo(name, size), exif=exif.tobytes())
        exact = processor.to_uint8(Image.open(io.BytesIO(data)), exif_orientation=True)
        fast = processor.to_uint8(Image.open(io.BytesIO(data)), fast=True, exif_orientation=True)
        difference = np.abs(exact.astype(np.int16) - fast)
        assert difference.max() <= 10, (name, difference.max())
        assert difference.mean() <= 0.5, (name, difference.mean())
        assert np.percentile(difference, 99) <= 3, name


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_fast_path_is_bit_exact_where_draft_decoding_does_not_apply(processor, image_format) -> None:
    """Non-JPEG files of any size, and JPEGs less than twice the input size, take the exact path: identical bytes."""
    # JPEGs with a short side under twice the 384 target are not drafted; PNG and WebP never are.
    sizes = [(500, 375), (767, 1000), (1000, 700)] + ([(2000, 1600), (1000, 872)] if image_format != "JPEG" else [])
    for name in ("coffee", "rocket"):
        for size in sizes:
            buffer = io.BytesIO()
            photo(name, size).save(buffer, image_format, **({"quality": 90} if image_format != "PNG" else {}))
            exact = processor.to_uint8(Image.open(io.BytesIO(buffer.getvalue())))
            fast = processor.to_uint8(Image.open(io.BytesIO(buffer.getvalue())), fast=True)
            assert np.array_equal(exact, fast), (name, size, image_format)


def test_fast_path_orientation_keeps_geometry(processor) -> None:
    """A drafted JPEG rotated by EXIF must land where the exact path puts it (the valid box is transposed too).

    3073 = 8 * 384 + 1: the 1/8 draft rounds each side up by 7/8 of a pixel, i.e. 7 source pixels of partial block.
    Measured: mean |diff| 0.71..0.72 for all eight orientations; ignoring the valid box gives 4.6, not transposing
    it 5.3..8.4.
    """
    base = photo("astronaut", (3073, 3081))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ExifOrientation] = orientation
        data = jpeg_bytes(base, exif=exif.tobytes())
        exact = processor.to_uint8(Image.open(io.BytesIO(data)), exif_orientation=True)
        fast = processor.to_uint8(Image.open(io.BytesIO(data)), fast=True, exif_orientation=True)
        assert np.abs(exact.astype(np.int16) - fast).mean() <= 1.2, orientation


# ---------------------------------------------------------------------------------------------------------- config


def test_class_defaults_equal_the_reference_class() -> None:
    ours, ref = ViTHybridImageProcessor(), transformers.ViTHybridImageProcessor()
    for field in processing._FIELDS:
        assert getattr(ours, field) == getattr(ref, field), field


def test_save_and_load_round_trip(tmp_path) -> None:
    original = ViTHybridImageProcessor.from_dict(CHECKPOINT_CONFIG)
    uri = original.save_pretrained(str(tmp_path / "checkpoint"))
    assert json.loads((tmp_path / "checkpoint" / "preprocessor_config.json").read_text()) == CHECKPOINT_CONFIG
    loaded = ViTHybridImageProcessor.from_pretrained(str(tmp_path / "checkpoint"))
    assert loaded.to_dict() == original.to_dict()
    assert ViTHybridImageProcessor.from_pretrained(uri).to_dict() == original.to_dict()  # the file itself
    # transformers reads what we write, and we read what transformers writes.
    ref = transformers.ViTHybridImageProcessor.from_pretrained(str(tmp_path / "checkpoint"))
    assert all(getattr(ref, field) == value for field, value in SETTINGS.items())
    ref.save_pretrained(str(tmp_path / "from_transformers"))
    assert ViTHybridImageProcessor.from_pretrained(str(tmp_path / "from_transformers")).to_dict() == original.to_dict()
    assert ViTHybridImageProcessor.from_pretrained(str(tmp_path / "checkpoint"), crop_size=224).crop_size == {"height": 224, "width": 224}


def test_from_pretrained_reads_s3(s3_bucket) -> None:
    data = json.dumps(CHECKPOINT_CONFIG).encode()
    fsspec.filesystem("s3").pipe(f"{s3_bucket}/p/preprocessor_config.json", data)
    loaded = ViTHybridImageProcessor.from_pretrained(f"s3://{s3_bucket}/p/")
    assert loaded.to_dict() == CHECKPOINT_CONFIG
    uri = loaded.save_pretrained(f"s3://{s3_bucket}/copy")
    assert uri == f"s3://{s3_bucket}/copy/preprocessor_config.json"
    assert ViTHybridImageProcessor.from_pretrained(f"s3://{s3_bucket}/copy").to_dict() == CHECKPOINT_CONFIG
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/missing/preprocessor_config.json"):
        ViTHybridImageProcessor.from_pretrained(f"s3://{s3_bucket}/missing")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"size": {"longest_edge": 500}}, "size"),
        ({"size": {"shortest_edge": 0}}, "size"),
        ({"size": "big"}, "size"),
        ({"crop_size": {"height": 384}}, "crop_size"),
        ({"crop_size": -1}, "crop_size"),
        ({"resample": 99}, "resample"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"rescale_factor": "1/255"}, "rescale_factor"),
        ({"do_resize": "yes"}, "do_resize"),
        ({"crop_pct": 0.875}, "crop_pct"),
    ],
)
def test_bad_settings_raise_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ViTHybridImageProcessor.from_dict({**CHECKPOINT_CONFIG, **change})


def test_bad_inputs_raise() -> None:
    processor = ViTHybridImageProcessor()
    with pytest.raises(ValueError, match="uint8"):
        processor(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        processor(np.zeros((10, 10, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="do_convert_rgb"):
        processor(photo("camera"), do_convert_rgb=False)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(photo("camera"), return_tensors="tf")
