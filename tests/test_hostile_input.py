"""Hostile input through the whole job: every sample gives exactly one row (an error row with its reason where it
cannot be decoded), the job never crashes, memory stays bounded, and a job whose input is mostly garbage stops
past ``--max-error-fraction`` (exit code 3) after committing what it finished, then resumes with a higher one.
The jobs join the module's job cluster (``tests.reliability.running_job_cluster``), as under ``ray job submit``.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import tarfile
import tracemalloc
import uuid
import zlib
from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.processing import ViTHybridImageProcessor
from pipeline.decode import DecodeError, decode_sample
from pipeline.sources import SHARD_ERROR_KEY
from tests.corpus import _put
from tests.reliability import (
    assert_no_traceback,
    committed_shards,
    data_names,
    error_line,
    make_checkpoint,
    read_table,
    run_job,
)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def photo(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    channels = [127 + 100 * np.sin(rng.uniform(0.02, 0.2) * x + rng.uniform(0.02, 0.2) * y) for _ in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels and whose data is 100 bytes: a decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def exif_rotated_jpeg(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(seed, (160, 90)), "JPEG", exif=exif.tobytes())


JPEG = encode(photo(1), "JPEG")
PNG_16_BIT = encode(Image.fromarray((np.arange(6400).reshape(80, 80) * 9).astype(np.uint16)), "PNG")
# key -> (member name, bytes, expected error prefix or None when the image must decode)
HOSTILE: dict[str, tuple[str, bytes, str | None]] = {
    "truncated-jpeg": ("truncated-jpeg.jpg", JPEG[: len(JPEG) // 2], "decode error: truncated"),
    "corrupt-jpeg": ("corrupt-jpeg.jpg", JPEG[:20] + bytes(range(256)) * 8, ""),  # any reason
    "zero-bytes": ("zero-bytes.jpg", b"", "empty file (0 bytes)"),
    "not-an-image": ("not-an-image.png", b"<html>not an image</html>" * 20, "not an image"),
    "bomb-50000x50000": ("bomb-50000x50000.png", png_header_only(50000, 50000), "image too large"),
    "png-16-bit": ("png-16-bit.png", PNG_16_BIT, None),
    "cmyk-jpeg": ("cmyk-jpeg.jpg", encode(photo(2).convert("CMYK"), "JPEG"), None),
    "palette-transparency": ("palette-transparency.png", encode(photo(3).convert("P"), "PNG", transparency=3), None),
    "animated-gif": (
        "animated-gif.gif",
        encode(photo(4).convert("P"), "GIF", save_all=True, append_images=[photo(5).convert("P")]),
        None,
    ),
    "animated-webp": ("animated-webp.webp", encode(photo(6), "WEBP", save_all=True, append_images=[photo(7)]), None),
    "exif-rotated": ("exif-rotated.jpg", exif_rotated_jpeg(8), None),
    "one-pixel": ("one-pixel.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), None),
    "10000x10": ("10000x10.png", encode(photo(9, (10000, 10)), "PNG"), None),
    # Names are only text: nothing is ever extracted, so a traversal name is a key like any other.
    "../../etc/passwd": ("../../etc/passwd.jpg", encode(photo(10), "JPEG"), None),
    "/abs/path": ("/abs/path.jpg", encode(photo(11), "JPEG"), None),
    "dup": ("dup.jpg", encode(photo(12), "JPEG"), None),
    "between": ("between.jpg", encode(photo(13), "JPEG"), None),
}
# "dup" comes again after "between": a repeated key is its own row each time.
MEMBER_ORDER = [*HOSTILE, "dup"]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("hostile-checkpoint"))


def test_a_decompression_bomb_is_refused_from_its_header_with_little_memory() -> None:
    processor = ViTHybridImageProcessor(size={"shortest_edge": 64}, crop_size=64)
    bomb = png_header_only(50000, 50000)  # 2.5 gigapixels: 7.5 GB as RGB
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the process's peak so far
    tracemalloc.start()
    try:
        for limit in (89_478_485, 10**10):  # our header check, then Pillow's own refusal beyond its limit
            result = decode_sample(bomb, processor=processor, fast=True, max_image_pixels=limit)
            assert isinstance(result, DecodeError) and result.reason.startswith("image too large"), result
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"decoding the bomb's header allocated {peak} bytes"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024, "the peak RSS grew by > 64 MiB"


def test_hostile_shards_give_one_row_each_and_garbage_aborts_then_resumes(
    model: str, s3_endpoint: str, ray_tmpdir: str, job_cluster: str, tmp_path: Path
) -> None:
    bucket = f"hostile-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    base = f"s3://{bucket}/shards"
    # Garbage first (shards run roughly in name order), so that the error budget trips with shards still to do.
    garbage_keys = {}
    for index in range(4):
        keys = [f"garbage-{index}-{row:02d}" for row in range(25)]
        _put(f"{base}/a-garbage-{index}.tar", tar_bytes([(f"{key}.jpg", b"\x00garbage" * 30) for key in keys]))
        garbage_keys[f"{base}/a-garbage-{index}.tar"] = keys
    hostile_uri = f"{base}/b-hostile.tar"
    _put(hostile_uri, tar_bytes([(HOSTILE[key][0], HOSTILE[key][1]) for key in MEMBER_ORDER]))
    good = tar_bytes([(f"good-{row}.jpg", encode(photo(20 + row), "JPEG")) for row in range(8)])
    truncated_uri = f"{base}/c-truncated.tar"
    _put(truncated_uri, good[: good.find(b"good-5.jpg") + 700])  # cut inside good-5's image data
    survivors = [f"good-{row}" for row in range(5)]
    # Good shards last, so that some are certainly still to do when the budget trips (six shards could all commit
    # before the abort took effect on a fast worker).
    good_uris = [f"{base}/d-good-{index}.tar" for index in range(4)]
    for index, uri in enumerate(good_uris):
        _put(uri, tar_bytes([(f"fine-{index}-{row}.jpg", encode(photo(40 + 3 * index + row), "JPEG"))
                             for row in range(3)]))
    shard_count = len(garbage_keys) + 2 + len(good_uris)  # garbage, hostile and truncated, good

    output = tmp_path / "out"
    args = ["--input", base, "--output", str(output), "--model", model, "--batch-size", "8", "--top-k", "3"]
    aborted = run_job(args, ray_tmpdir=ray_tmpdir, ray_address=job_cluster)
    assert aborted.returncode == 3, aborted.stderr[-5000:]
    assert_no_traceback(aborted.stderr)
    message = error_line(aborted.stderr)
    assert message.startswith("aborted:") and "--max-error-fraction 0.5" in message and str(output) in message
    committed_at_abort = committed_shards(str(output))
    assert committed_at_abort and len(committed_at_abort) < shard_count, committed_at_abort
    book = output.parent / f"{output.name}.job"  # the bookkeeping lives beside the output
    assert not (book / "SUCCESS").exists()
    assert json.loads((book / "summary.json").read_text())["status"] == "aborted"
    stamps = {shard: (book / "commits" / f"{shard}.json").stat().st_mtime_ns for shard in committed_at_abort}

    resumed = run_job([*args, "--max-error-fraction", "1.0"], ray_tmpdir=ray_tmpdir, ray_address=job_cluster)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert (book / "SUCCESS").exists()
    assert {s: (book / "commits" / f"{s}.json").stat().st_mtime_ns for s in committed_at_abort} == stamps
    summary = json.loads((book / "summary.json").read_text())
    assert summary["shards_skipped"] == len(committed_at_abort)

    table = pa.concat_tables([read_table(str(output), name) for name in data_names(str(output))])
    rows = table.select(["source", "key", "error", "label"]).to_pylist()
    # The truncated shard: the samples read before the cut, then one row standing for the unreadable rest.
    truncated_rows = len(survivors) + 1
    assert len(rows) == 4 * 25 + len(MEMBER_ORDER) + truncated_rows + 3 * len(good_uris)
    by_source = Counter(row["source"] for row in rows)
    expected_counts = {uri: 25 for uri in garbage_keys}
    expected_counts.update({hostile_uri: len(MEMBER_ORDER), truncated_uri: truncated_rows})
    expected_counts.update({uri: 3 for uri in good_uris})
    assert by_source == Counter(expected_counts)
    for uri, keys in garbage_keys.items():
        garbage = [row for row in rows if row["source"] == uri]
        assert sorted(row["key"] for row in garbage) == keys
        assert all(row["error"] == "not an image: cannot identify image file" for row in garbage)

    hostile = [row for row in rows if row["source"] == hostile_uri]
    assert Counter(row["key"] for row in hostile) == Counter(MEMBER_ORDER)
    for row in hostile:
        expected = HOSTILE[row["key"]][2]
        if expected is None:
            assert row["error"] is None and row["label"] is not None, row
        else:
            assert row["error"] is not None and row["error"].startswith(expected) and row["label"] is None, row

    truncated = sorted((row for row in rows if row["source"] == truncated_uri), key=lambda row: row["key"])
    assert [row["key"] for row in truncated] == [SHARD_ERROR_KEY, *survivors]
    assert truncated[0]["error"].startswith("truncated tar") and truncated_uri in truncated[0]["error"]
    assert all(row["error"] is None for row in truncated[1:])
    fine = [row for row in rows if row["source"] in good_uris]
    assert all(row["error"] is None and row["label"] is not None for row in fine)


def test_hostile_parquet_rows_give_one_row_each(model: str, ray_tmpdir: str, job_cluster: str, tmp_path: Path) -> None:
    images = {
        "good": encode(photo(30), "JPEG"),
        "null": None,
        "empty": b"",
        "garbage": b"\xff\xd8\xff" + bytes(range(200)),
        "truncated": JPEG[:300],
        "bomb": png_header_only(50000, 50000),
        "same-id": encode(photo(31), "PNG"),
    }
    keys = [*images, "same-id"]  # a repeated id is its own row each time
    data = [*images.values(), encode(photo(32), "JPEG")]
    source = tmp_path / "in" / "part-0.parquet"
    source.parent.mkdir()
    pq.write_table(pa.table({"key": keys, "image": pa.array(data, pa.binary())}), source, row_group_size=3)
    output = tmp_path / "out"
    finished = run_job(
        # 5 of these 8 rows fail on purpose: above the default error budget, which now judges jobs of any size.
        ["--input", str(source.parent), "--output", str(output), "--model", model, "--batch-size", "4",
         "--max-error-fraction", "1.0"],
        ray_tmpdir=ray_tmpdir,
        ray_address=job_cluster,
    )
    assert finished.returncode == 0, finished.stderr[-5000:]
    table = pa.concat_tables([read_table(str(output), name) for name in data_names(str(output))])
    rows = sorted(table.select(["key", "error"]).to_pylist(), key=lambda row: (row["key"], row["error"] or ""))
    errors = {row["key"]: row["error"] for row in rows}
    assert Counter(row["key"] for row in rows) == Counter(keys)
    assert errors["good"] is None and [row["error"] for row in rows if row["key"] == "same-id"] == [None, None]
    assert errors["null"].startswith("null image bytes in column 'image'")
    assert errors["empty"] == "empty file (0 bytes)"
    assert errors["garbage"].startswith(("not an image", "decode error"))
    assert errors["truncated"].startswith("decode error")
    assert errors["bomb"].startswith("image too large")
