"""Test data built in the tests: image samples in every input format, with planted bad samples.

Every writer returns the samples it wrote, keyed the way the pipeline must key them, so a test can check the output
row by row: every key exactly once, error rows exactly where a bad sample was planted.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass(frozen=True)
class Sample:
    """One planted input sample: its bytes and whether the pipeline must turn it into an error row."""

    key: str
    data: bytes
    bad: bool
    extension: str = "jpg"


def _gradient_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields plus noise: compresses like a photo and gives the model varied inputs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.2), rng.uniform(0, 6.28)
        channels.append(127 + 100 * np.sin(fx * x + fy * y + phase))
    image = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


GOOD_VARIANTS = (
    ("RGB", "JPEG", "jpg"),
    ("L", "PNG", "png"),
    ("RGBA", "PNG", "png"),
    ("P", "PNG", "png"),
    ("CMYK", "JPEG", "jpg"),
    ("RGB", "WEBP", "webp"),
    ("LA", "PNG", "png"),
)


def make_samples(count: int, *, seed: int, prefix: str, bad_every: int = 0) -> list[Sample]:
    """``count`` samples of mixed sizes (wider and taller than the model input, and smaller), modes and formats.

    With ``bad_every`` > 0, every ``bad_every``-th sample is bad, cycling through: a truncated JPEG, zero bytes,
    and bytes that are not an image at all.
    """
    rng = np.random.default_rng(seed)
    samples = []
    bad_kinds = ("truncated", "empty", "garbage")
    bad_index = 0
    for index in range(count):
        key = f"{prefix}{index:05d}"
        width, height = int(rng.integers(24, 160)), int(rng.integers(24, 160))
        if bad_every and index % bad_every == bad_every - 1:
            kind = bad_kinds[bad_index % len(bad_kinds)]
            bad_index += 1
            if kind == "truncated":
                full = encode(Image.fromarray(_gradient_photo(rng, width, height)), "JPEG")
                samples.append(Sample(key, full[: len(full) // 2], bad=True))
            elif kind == "empty":
                samples.append(Sample(key, b"", bad=True))
            else:
                samples.append(Sample(key, b"this is not an image" * 10, bad=True, extension="png"))
            continue
        mode, image_format, extension = GOOD_VARIANTS[index % len(GOOD_VARIANTS)]
        image = Image.fromarray(_gradient_photo(rng, width, height))
        if mode == "P":
            image = image.quantize(colors=64)
        elif mode != "RGB":
            image = image.convert(mode)
        samples.append(Sample(key, encode(image, image_format), bad=False, extension=extension))
    return samples


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_webdataset(uri: str, samples: list[Sample]) -> None:
    """One tar shard as img2dataset writes it: ``<key>.<ext>`` then ``<key>.json`` and ``<key>.txt``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            _add_member(tar, f"{sample.key}.{sample.extension}", sample.data)
            _add_member(tar, f"{sample.key}.json", b'{"caption": "x"}')
            _add_member(tar, f"{sample.key}.txt", b"a caption")
    _put(uri, buffer.getvalue())


def write_parquet(uri: str, samples: list[Sample], *, hf_struct: bool) -> None:
    """A Parquet shard with a ``key`` column and images either as raw binary or as HF's {bytes, path} struct."""
    keys = [sample.key for sample in samples]
    if hf_struct:
        images = pa.array(
            [{"bytes": sample.data, "path": f"{sample.key}.{sample.extension}"} for sample in samples],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        images = pa.array([sample.data for sample in samples], type=pa.binary())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "image": images}), buffer, row_group_size=16)
    _put(uri, buffer.getvalue())


def write_image_files(prefix: str, samples: list[Sample]) -> dict[str, Sample]:
    """Plain files under ``prefix``; returns them keyed by relative path, which is the pipeline's key."""
    written = {}
    for sample in samples:
        relative = f"{sample.key[:3]}/{sample.key}.{sample.extension}"
        _put(f"{prefix.rstrip('/')}/{relative}", sample.data)
        written[relative] = sample
    return written


def _put(uri: str, data: bytes) -> None:
    filesystem, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if filesystem.protocol in ("file", ("file", "local")) or "file" in filesystem.protocol:
        filesystem.makedirs(parent, exist_ok=True)
    filesystem.pipe_file(path, data)
