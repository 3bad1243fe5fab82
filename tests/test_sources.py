"""Input sources: planning shards from prefixes, globs and list files; reading webdataset, Parquet and image files.

Everything runs without Ray. Data is built here (tiny PNGs, tar shards, Parquet files), on the local disk and on the
moto S3 server of ``conftest.py``; one test reads through an HTTP proxy that fails or cuts short a fifth of the
requests, with s3fs' and botocore's own retries turned off, so only this project's retries can save the read.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import io
import json
import random
import re
import tarfile
import threading
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from model import storage
from model.storage import write_bytes
from pipeline.sources import (
    SAMPLE_SCHEMA,
    SHARD_ERROR_KEY,
    InputError,
    Shard,
    ShardReadError,
    format_of_name,
    plan_shards,
    read_shard,
)

# ---- helpers -------------------------------------------------------------------------------------------------------


@functools.cache
def png(seed: int) -> bytes:
    """A distinct tiny PNG per seed."""
    image = Image.new("RGB", (2, 2), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.putpixel((0, 0), (seed % 256, seed // 256 % 256, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 10, 20)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_tar(members: list[tuple[str, bytes]], *, compress: bool = False) -> bytes:
    """A tar archive with the members exactly as named (no normalisation, so traversal names survive)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def webdataset_members(keys: list[str]) -> list[tuple[str, bytes]]:
    members = []
    for index, key in enumerate(keys):
        members.append((f"{key}.jpg", png(index)))
        members.append((f"{key}.json", json.dumps({"key": key}).encode()))
        members.append((f"{key}.txt", b"a caption"))
    return members


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def read_all(shard: Shard, **kwargs: Any) -> list[dict[str, Any]]:
    tables = list(read_shard(shard, **kwargs))
    for table in tables:
        assert table.schema == SAMPLE_SCHEMA
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    assert [row["ordinal"] for row in rows] == list(range(len(rows))), "ordinals must be 0..n-1 in order"
    return rows


def read_plan(shards: list[Shard], **kwargs: Any) -> list[dict[str, Any]]:
    return [row for shard in shards for row in read_all(shard, **kwargs)]


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


# ---- format detection and the Shard record ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("s3://b/00001.tar", "webdataset"),
        ("x/00001.TAR.GZ", "webdataset"),
        ("x.tgz", "webdataset"),
        ("train-0000.parquet", "parquet"),
        ("a/b/img.v2.JPG", "images"),
        ("a.webp", "images"),
        ("a.tiff", "images"),
        ("00000_stats.json", None),
        ("_SUCCESS", None),
        ("list.txt", None),
    ],
)
def test_format_of_name(name: str, expected: str | None) -> None:
    assert format_of_name(name) == expected


def test_shard_round_trips_through_json() -> None:
    shard = Shard("images-000000-a.jpg-0123456789", "images", "s3://b/imgs", members=("a.jpg", "b/c.png"))
    again = Shard.from_dict(json.loads(json.dumps(shard.to_dict())))
    assert again == shard
    assert again.file_uris() == ("s3://b/imgs/a.jpg", "s3://b/imgs/b/c.png")
    parquet = Shard("x-1", "parquet", "/d/x.parquet", name="x.parquet", id_column="id", image_column="img")
    assert Shard.from_dict(json.loads(json.dumps(parquet.to_dict()))) == parquet
    assert parquet.file_uris() == ("/d/x.parquet",)
    with pytest.raises(ValueError, match="unknown format"):
        Shard("x", "zip", "/d/x.zip")


# ---- webdataset ----------------------------------------------------------------------------------------------------


def test_webdataset_prefix_local(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    keys_per_shard = {f"{n:05d}.tar": [f"{n:05d}{i:04d}" for i in range(4)] for n in range(3)}
    for name, keys in keys_per_shard.items():
        write_bytes(str(root / name), make_tar(webdataset_members(keys)))
    write_bytes(str(root / "00000_stats.json"), b"{}")  # img2dataset writes these next to the shards
    write_bytes(str(root / "_SUCCESS"), b"")

    shards = plan_shards(str(root))
    assert [shard.name for shard in shards] == sorted(keys_per_shard)
    assert {shard.format for shard in shards} == {"webdataset"}
    for shard in shards:
        rows = read_all(shard)
        assert [row["key"] for row in rows] == keys_per_shard[shard.name]
        assert {row["source"] for row in rows} == {str(root / shard.name)}
        assert [row["data"] for row in rows] == [png(i) for i in range(4)]
        assert all(row["error"] is None for row in rows)


def test_webdataset_keys_end_at_the_first_dot_of_the_file_name_and_sidecar_only_samples(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = str(tmp_path / "a.tar")
    write_bytes(
        uri,
        make_tar(
            [
                ("a.v1/b/img.v2.jpg", png(1)),  # folders may hold dots; the key ends at the file name's first dot
                ("a.v1/b/img.v2.json", b"{}"),
                ("a.v1/b/img.meta.json", b"{}"),  # another sidecar of the same sample
                ("only-meta.json", b"{}"),  # a sample without an image member
                ("only-meta.txt", b"caption"),
                ("c.PNG", png(2)),
                ("c.cls", b"3"),
                ("noext", b"?"),  # no key.suffix form: skipped, as the webdataset library does, and logged
            ]
        ),
    )
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        rows = read_all(plan_shards(uri)[0])
    assert [row["key"] for row in rows] == ["a.v1/b/img", "only-meta", "c"]
    assert rows[0]["data"] == png(1) and rows[0]["error"] is None
    assert rows[1]["data"] is None and "no image member" in rows[1]["error"] and uri in rows[1]["error"]
    assert rows[2]["data"] == png(2)
    assert "skipped 1 member" in caplog.text and "noext" in caplog.text


def test_webdataset_duplicate_keys_are_separate_rows(tmp_path: Path) -> None:
    uri = str(tmp_path / "dups.tar")
    write_bytes(
        uri,
        make_tar(
            [
                ("x.jpg", png(1)),
                ("y.jpg", png(2)),
                ("x.jpg", png(3)),  # the same key again, not consecutive
                ("z.jpg", png(4)),
                ("z.jpg", png(5)),  # the same member name twice in a row
                ("w.jpg", png(6)),
                ("w.png", png(7)),  # one sample with two images: the first is used
            ]
        ),
    )
    rows = read_all(plan_shards(uri)[0])
    assert [(row["key"], row["data"]) for row in rows] == [
        ("x", png(1)),
        ("y", png(2)),
        ("x", png(3)),
        ("z", png(4)),
        ("z", png(5)),
        ("w", png(6)),
    ]


def test_webdataset_traversal_names_are_kept_as_text_and_never_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path / "evil.tar")
    write_bytes(
        uri, make_tar([("../../etc/passwd.jpg", png(1)), ("/abs/evil.jpg", png(2)), ("./dot/ok.jpg", png(3))])
    )
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rows = read_all(plan_shards(uri)[0])
    assert [row["key"] for row in rows] == ["../../etc/passwd", "/abs/evil", "./dot/ok"]
    assert [row["data"] for row in rows] == [png(1), png(2), png(3)]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not any(workdir.iterdir())


def test_webdataset_non_utf8_member_names_become_escaped_keys(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as archive:
        info = tarfile.TarInfo("caf\xe9.jpg")  # written as the single byte 0xE9, not valid UTF-8
        info.size = len(png(1))
        archive.addfile(info, io.BytesIO(png(1)))
    uri = str(tmp_path / "latin.tar")
    write_bytes(uri, buffer.getvalue())
    rows = read_all(plan_shards(uri)[0])
    assert [row["key"] for row in rows] == ["caf\\xe9"]
    assert rows[0]["data"] == png(1)


def test_webdataset_zero_byte_image_is_a_row_with_empty_data(tmp_path: Path) -> None:
    uri = str(tmp_path / "z.tar")
    write_bytes(uri, make_tar([("empty.jpg", b""), ("full.jpg", png(1))]))
    rows = read_all(plan_shards(uri)[0])
    assert [(row["key"], row["data"], row["error"]) for row in rows] == [("empty", b"", None), ("full", png(1), None)]


def test_webdataset_gzip_shards_and_batches(tmp_path: Path) -> None:
    keys = [f"k{i:03d}" for i in range(10)]
    write_bytes(str(tmp_path / "a.tar.gz"), make_tar(webdataset_members(keys), compress=True))
    write_bytes(str(tmp_path / "b.tgz"), make_tar(webdataset_members(keys[:2]), compress=True))
    # gzip is recognised by its magic bytes, so a compressed shard named .tar reads too
    write_bytes(str(tmp_path / "c.tar"), make_tar(webdataset_members(keys[:3]), compress=True))
    shards = plan_shards(str(tmp_path))
    assert [shard.name for shard in shards] == ["a.tar.gz", "b.tgz", "c.tar"]
    tables = list(read_shard(shards[0], batch_rows=3))
    assert [table.num_rows for table in tables] == [3, 3, 3, 1]
    assert pa.concat_tables(tables).column("key").to_pylist() == keys
    assert [row["key"] for row in read_all(shards[1])] == keys[:2]
    assert [row["key"] for row in read_all(shards[2])] == keys[:3]


def _image_data_ends(tar: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return [m.offset_data + m.size for m in archive.getmembers() if m.name.endswith(".jpg")]


def _end_marker_offset(tar: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        last = archive.getmembers()[-1]
        return last.offset_data + -(-last.size // 512) * 512


def test_webdataset_truncated_at_every_point_yields_read_samples_plus_one_error_row(tmp_path: Path) -> None:
    keys = [f"s{i}" for i in range(5)]
    full = make_tar(webdataset_members(keys))
    image_ends = _image_data_ends(full)
    clean_from = _end_marker_offset(full) + 512  # the first zero block is all a reader needs
    uri = str(tmp_path / "cut.tar")
    for cut in [*range(0, len(full), 61), clean_from - 1, clean_from, len(full)]:
        write_bytes(uri, full[:cut])
        rows = read_all(Shard("cut", "webdataset", uri, name="cut.tar"))
        readable = sum(1 for end in image_ends if end <= cut)
        good = [row for row in rows if row["key"] != SHARD_ERROR_KEY]
        assert [row["key"] for row in good] == keys[:readable], cut
        assert [row["data"] for row in good] == [png(i) for i in range(readable)], cut
        assert all(row["error"] is None for row in good), cut
        if cut >= clean_from:
            assert len(rows) == len(good), cut
            continue
        assert len(rows) == len(good) + 1, cut  # exactly ONE error row stands for the unreadable tail
        tail = rows[-1]
        assert tail["key"] == SHARD_ERROR_KEY and tail["source"] == uri and tail["data"] is None
        assert uri in tail["error"]
        assert ("truncated tar" in tail["error"]) or ("not a readable tar archive" in tail["error"]), tail["error"]


def test_webdataset_sample_cut_before_its_image_is_named_in_the_error_row(tmp_path: Path) -> None:
    full = make_tar([("a.json", b"{}"), ("a.jpg", png(1)), ("b.jpg", png(2))])
    cut = _image_data_ends(full)[0] - 10
    uri = str(tmp_path / "t.tar")
    write_bytes(uri, full[:cut])
    rows = read_all(plan_shards(uri)[0])
    assert [row["key"] for row in rows] == [SHARD_ERROR_KEY]
    assert "'a'" in rows[0]["error"] and "truncated tar" in rows[0]["error"]


def test_webdataset_truncated_gzip_shard(tmp_path: Path) -> None:
    keys = [f"g{i}" for i in range(6)]
    full = make_tar(webdataset_members(keys), compress=True)
    uri = str(tmp_path / "g.tar.gz")
    for cut in (len(full) // 3, len(full) // 2, len(full) - 5):
        write_bytes(uri, full[:cut])
        rows = read_all(plan_shards(uri)[0])
        good = [row for row in rows if row["key"] != SHARD_ERROR_KEY]
        assert [row["key"] for row in good] == keys[: len(good)]
        assert len(rows) == len(good) + 1 and rows[-1]["key"] == SHARD_ERROR_KEY
        assert uri in rows[-1]["error"] and "truncated tar" in rows[-1]["error"]


def test_webdataset_tar_without_end_marker_is_flagged(tmp_path: Path) -> None:
    full = make_tar([("a.jpg", png(1)), ("b.jpg", png(2))])
    uri = str(tmp_path / "noend.tar")
    write_bytes(uri, full[: _end_marker_offset(full)])
    rows = read_all(plan_shards(uri)[0])
    assert [row["key"] for row in rows] == ["a", "b", SHARD_ERROR_KEY]
    assert "without an end-of-archive marker" in rows[-1]["error"]


@pytest.mark.parametrize("content", [b"", b"this is not a tar file at all" * 40, jpeg(1)])
def test_webdataset_corrupt_shard_is_one_error_row(tmp_path: Path, content: bytes) -> None:
    uri = str(tmp_path / "bad.tar")
    write_bytes(uri, content)
    rows = read_all(plan_shards(uri)[0])
    assert len(rows) == 1
    assert rows[0]["key"] == SHARD_ERROR_KEY and rows[0]["source"] == uri and uri in rows[0]["error"]


def test_empty_shards_yield_one_error_row(tmp_path: Path) -> None:
    """The job learns that a shard is complete from its last row, so even a shard without samples yields one."""
    write_bytes(str(tmp_path / "empty.tar"), make_tar([]))
    write_bytes(str(tmp_path / "empty.parquet"), parquet_bytes(pa.table({"jpg": pa.array([], pa.binary())})))
    for spec in (str(tmp_path / "empty.tar"), str(tmp_path / "empty.parquet")):
        rows = read_all(plan_shards(spec)[0])
        assert [(row["key"], row["ordinal"], row["source"]) for row in rows] == [(SHARD_ERROR_KEY, 0, spec)]
        assert "empty shard" in rows[0]["error"] and spec in rows[0]["error"]


def test_webdataset_shard_missing_at_read_time_raises_naming_the_uri(tmp_path: Path) -> None:
    uri = str(tmp_path / "gone.tar")
    write_bytes(uri, make_tar([("a.jpg", png(1))]))
    shard = plan_shards(uri)[0]
    Path(uri).unlink()
    with pytest.raises(ShardReadError, match=re.escape(uri)):
        read_all(shard)


# ---- parquet -------------------------------------------------------------------------------------------------------


def test_parquet_binary_column_with_key_column_in_bounded_batches(tmp_path: Path) -> None:
    keys = [f"{i:09d}" for i in range(10)]
    table = pa.table({"key": keys, "url": ["http://x"] * 10, "jpg": [png(i) for i in range(10)]})
    uri = str(tmp_path / "part-0.parquet")
    write_bytes(uri, parquet_bytes(table, row_group_size=4))
    shards = plan_shards(str(tmp_path))
    assert [(shard.format, shard.uri) for shard in shards] == [("parquet", uri)]
    tables = list(read_shard(shards[0], batch_rows=3))
    assert len(tables) >= 4 and all(t.num_rows <= 3 for t in tables)
    rows = read_all(shards[0], batch_rows=3)
    assert [row["key"] for row in rows] == keys
    assert [row["data"] for row in rows] == [png(i) for i in range(10)]
    assert {row["source"] for row in rows} == {uri}
    assert all(row["error"] is None for row in rows)


def test_parquet_hugging_face_image_struct_without_id_column(tmp_path: Path) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array(
        [
            {"bytes": png(0), "path": "a.png"},
            None,  # a null image
            {"bytes": None, "path": "lost.png"},  # null bytes
            {"bytes": b"", "path": "empty.png"},  # zero bytes: the decoder's business
            {"bytes": png(4), "path": None},
        ],
        image_type,
    )
    table = pa.table({"image": images, "label": pa.array([0, 1, 2, 3, 4], pa.int64())})
    uri = str(tmp_path / "sub" / "train-00000-of-00001.parquet")
    write_bytes(uri, parquet_bytes(table))
    rows = read_all(plan_shards(str(tmp_path))[0], batch_rows=2)
    assert [row["key"] for row in rows] == [f"sub/train-00000-of-00001.parquet#{i}" for i in range(5)]
    assert [row["data"] for row in rows] == [png(0), None, None, b"", png(4)]
    assert [row["error"] is None for row in rows] == [True, False, False, True, True]
    assert "null image bytes" in rows[1]["error"] and uri in rows[1]["error"]


def test_parquet_explicit_columns_integer_ids_and_null_ids(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image_id": pa.array([7, None, 9], pa.int64()),
            "pixels": pa.array([png(1), png(2), png(3)], pa.large_binary()),
            "image": pa.array(["not", "bytes", "here"]),  # a string column named image is not an image column
        }
    )
    uri = str(tmp_path / "x.parquet")
    write_bytes(uri, parquet_bytes(table))
    with pytest.raises(InputError, match="no image column"):
        plan_shards(uri)
    shards = plan_shards(uri, image_column="pixels")
    rows = read_all(shards[0])
    assert [row["key"] for row in rows] == ["7", "x.parquet#1", "9"]  # default id column image_id; null falls back
    assert [row["data"] for row in rows] == [png(1), png(2), png(3)]
    # columns given at read time override the planned ones
    planned_by_default = Shard("x", "parquet", uri, name="x.parquet")
    rows = read_all(planned_by_default, image_column="pixels", id_column="image")
    assert [(row["key"], row["data"]) for row in rows] == [("not", png(1)), ("bytes", png(2)), ("here", png(3))]
    with pytest.raises(InputError, match=re.escape(uri)):
        plan_shards(uri, image_column="pixels", id_column="nope")
    with pytest.raises(InputError, match="expected binary"):
        plan_shards(uri, image_column="image")


def test_parquet_corrupt_file_is_one_error_row(tmp_path: Path) -> None:
    good = str(tmp_path / "a.parquet")
    bad = str(tmp_path / "b.parquet")
    write_bytes(good, parquet_bytes(pa.table({"jpg": [png(1)]})))
    write_bytes(bad, b"PAR1 garbage, not a parquet file")
    shards = plan_shards(str(tmp_path))
    rows = read_all(shards[1])
    assert [row["key"] for row in rows] == [SHARD_ERROR_KEY]
    assert bad in rows[0]["error"] and rows[0]["source"] == bad
    assert [row["data"] for row in read_all(shards[0])] == [png(1)]


def test_parquet_file_without_the_column_reads_as_one_error_row_per_sample(tmp_path: Path) -> None:
    write_bytes(str(tmp_path / "a.parquet"), parquet_bytes(pa.table({"jpg": [png(1)]})))
    write_bytes(str(tmp_path / "b.parquet"), parquet_bytes(pa.table({"other": [1, 2, 3]})))
    shards = plan_shards(str(tmp_path))  # only the first file's schema is checked when planning
    rows = read_all(shards[1], batch_rows=2)
    # Each of the file's three samples is accounted for (the count comes from its footer), not one row for all.
    assert [row["key"] for row in rows] == ["b.parquet#0", "b.parquet#1", "b.parquet#2"]
    assert all("no image column" in row["error"] and row["data"] is None for row in rows)


def test_named_columns_are_checked_when_planning_and_frozen_in_the_shards(tmp_path: Path) -> None:
    write_bytes(str(tmp_path / "a.parquet"), parquet_bytes(pa.table({"name": ["x"], "pixels": [png(1)]})))
    with pytest.raises(InputError, match="image column 'photo' not in .*a.parquet.*pixels"):
        plan_shards(str(tmp_path), image_column="photo")
    with pytest.raises(InputError, match="id column 'ident' not in"):
        plan_shards(str(tmp_path), image_column="pixels", id_column="ident")
    (shard,) = plan_shards(str(tmp_path), image_column="pixels", id_column="name")
    assert (shard.image_column, shard.id_column) == ("pixels", "name")
    restored = Shard.from_dict(json.loads(json.dumps(shard.to_dict())))
    assert [(row["key"], row["data"]) for row in read_all(restored)] == [("x", png(1))]


# ---- images --------------------------------------------------------------------------------------------------------


def _write_images(root: Path, names: list[str]) -> None:
    for index, name in enumerate(names):
        write_bytes(str(root / name), png(index))


def test_images_prefix_groups_sorted_files_into_shards(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    names = ["b/2.png", "a/1.jpg", "c.webp", "a/0.png", "d/e/f.gif", "z.bmp", "y.tif"]
    _write_images(root, names)
    write_bytes(str(root / "notes.txt"), b"ignored")
    write_bytes(str(root / ".hidden" / "x.png"), png(99))
    write_bytes(str(root / "._mac.png"), b"resource fork")
    shards = plan_shards(str(root) + "/", images_per_shard=3)
    assert [len(shard.members) for shard in shards] == [3, 3, 1]
    rows = read_plan(shards)
    assert [row["key"] for row in rows] == sorted(names)
    by_key = {row["key"]: row for row in rows}
    for index, name in enumerate(names):
        assert by_key[name]["data"] == png(index)
        assert by_key[name]["source"] == str(root / name)
    assert all(row["ordinal"] < 3 for row in rows)


def test_images_unreadable_files_are_error_rows_naming_the_uri(tmp_path: Path) -> None:
    _write_images(tmp_path, ["a.png", "b.png", "c.png"])
    write_bytes(str(tmp_path / "zero.png"), b"")
    shards = plan_shards(str(tmp_path))
    (tmp_path / "b.png").unlink()  # deleted between listing and reading
    rows = read_all(shards[0], batch_rows=2, read_concurrency=3)
    assert [row["key"] for row in rows] == ["a.png", "b.png", "c.png", "zero.png"]
    assert rows[1]["data"] is None and str(tmp_path / "b.png") in rows[1]["error"]
    assert rows[3]["data"] == b"" and rows[3]["error"] is None
    assert rows[0]["data"] == png(0) and rows[2]["data"] == png(2)
    assert [table.num_rows for table in read_shard(shards[0], batch_rows=3)] == [3, 1]


def test_images_glob_keys_are_relative_to_the_glob_base(tmp_path: Path) -> None:
    _write_images(tmp_path / "data", ["x/1.png", "x/2.png", "y/3.png", "y/skip.jpg"])
    shards = plan_shards(str(tmp_path / "data" / "**" / "*.png"))
    assert [row["key"] for row in read_plan(shards)] == ["x/1.png", "x/2.png", "y/3.png"]
    shards = plan_shards(str(tmp_path / "data" / "x" / "*.png"))
    assert [row["key"] for row in read_plan(shards)] == ["1.png", "2.png"]


def test_list_file_of_images_local_and_s3(tmp_path: Path, s3_bucket: str) -> None:
    _write_images(tmp_path / "pics", ["a.png", "b.png"])
    write_bytes(s3_uri(s3_bucket, "remote/c.png"), png(5))
    listing = tmp_path / "inputs.lst"
    listing.write_text(
        "# images to classify\n"
        "\n"
        f"{tmp_path / 'pics' / 'b.png'}\n"
        "pics/a.png\n"  # relative to the list file
        f"   {s3_uri(s3_bucket, 'remote/c.png')}  \n"
        f"{tmp_path / 'pics' / 'b.png'}\n"  # repeated: read once
    )
    shards = plan_shards(str(listing))
    rows = read_plan(shards)
    remote = s3_uri(s3_bucket, "remote/c.png")
    expected = sorted([str(tmp_path / "pics" / "a.png"), str(tmp_path / "pics" / "b.png"), remote])
    assert [row["key"] for row in rows] == expected
    assert [row["source"] for row in rows] == expected
    assert {row["key"]: row["data"] for row in rows}[remote] == png(5)


def test_list_file_of_shards_on_s3(s3_bucket: str) -> None:
    write_bytes(s3_uri(s3_bucket, "shards/0.tar"), make_tar(webdataset_members(["a", "b"])))
    write_bytes(s3_uri(s3_bucket, "shards/1.tar"), make_tar(webdataset_members(["c"])))
    write_bytes(s3_uri(s3_bucket, "lists/train.txt"), b"../shards/1.tar\ns3://%s/shards/0.tar\n" % s3_bucket.encode())
    shards = plan_shards(s3_uri(s3_bucket, "lists/train.txt"))
    # a relative entry is resolved against the list's folder
    assert [shard.uri for shard in shards] == [s3_uri(s3_bucket, "shards/0.tar"), s3_uri(s3_bucket, "shards/1.tar")]
    assert [row["key"] for row in read_plan(shards)] == ["a", "b", "c"]


# ---- detection, forcing, ids, errors -------------------------------------------------------------------------------


def test_mixed_formats_need_format_and_forcing_picks_files(tmp_path: Path) -> None:
    write_bytes(str(tmp_path / "00000.tar"), make_tar(webdataset_members(["k"])))
    write_bytes(str(tmp_path / "00000.parquet"), parquet_bytes(pa.table({"key": ["k"], "url": ["u"]})))
    with pytest.raises(InputError, match="mixes formats") as raised:
        plan_shards(str(tmp_path))
    assert "webdataset" in str(raised.value) and "parquet" in str(raised.value) and str(tmp_path) in str(raised.value)
    shards = plan_shards(str(tmp_path), format="webdataset")
    assert [(shard.format, shard.name) for shard in shards] == [("webdataset", "00000.tar")]


def test_forced_format_reads_files_named_one_by_one(tmp_path: Path) -> None:
    write_bytes(str(tmp_path / "part-0"), parquet_bytes(pa.table({"jpg": [png(1), png(2)]})))
    write_bytes(str(tmp_path / "part-1"), parquet_bytes(pa.table({"jpg": [png(3)]})))
    with pytest.raises(InputError, match="unrecognised names"):
        plan_shards(str(tmp_path / "part-*"))
    with pytest.raises(InputError, match="no parquet files"):
        plan_shards(str(tmp_path), format="parquet")  # a prefix listing takes only .parquet names
    shards = plan_shards(str(tmp_path / "part-*"), format="parquet")
    assert [row["data"] for row in read_plan(shards)] == [png(1), png(2), png(3)]
    with pytest.raises(InputError, match="unknown input format"):
        plan_shards(str(tmp_path), format="zip")


def test_shard_ids_are_stable_unique_and_filesystem_safe(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        for n in range(3):
            write_bytes(str(tmp_path / "wds" / sub / f"{n:05d}.tar"), make_tar([("x.jpg", png(n))]))
    _write_images(tmp_path / "imgs", [f"d ir/im g{i}.png" for i in range(5)])
    for spec, kwargs in [(str(tmp_path / "wds"), {}), (str(tmp_path / "imgs"), {"images_per_shard": 2})]:
        first = plan_shards(spec, **kwargs)
        assert plan_shards(spec, **kwargs) == first
        ids = [shard.shard_id for shard in first]
        assert len(set(ids)) == len(ids)
        # pipeline/manifest.py builds file names from shard ids and accepts exactly this shape
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", shard_id) for shard_id in ids), ids
        assert [Shard.from_dict(json.loads(json.dumps(s.to_dict()))) for s in first] == first


def test_input_errors_name_the_uri(tmp_path: Path, s3_bucket: str) -> None:
    cases = [
        str(tmp_path / "nope"),
        str(tmp_path / "nope" / "*.tar"),
        str(tmp_path / "missing-list.txt"),
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/shards/",
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/shards/*.tar",
        s3_uri(s3_bucket, "empty/prefix/"),
    ]
    for spec in cases:
        with pytest.raises(InputError) as raised:
            plan_shards(spec)
        assert spec.rstrip("/") in str(raised.value), (spec, str(raised.value))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no input files found.*empty"):
        plan_shards(str(tmp_path / "empty"))
    write_bytes(s3_uri(s3_bucket, "shards/0.tar"), make_tar([("a.jpg", png(1))]))
    with pytest.raises(InputError, match=re.escape(s3_uri(s3_bucket, "shards/*.parquet"))):
        plan_shards(s3_uri(s3_bucket, "shards/*.parquet"))


# ---- object storage ------------------------------------------------------------------------------------------------


def test_all_formats_on_s3(s3_bucket: str) -> None:
    write_bytes(s3_uri(s3_bucket, "wds/00000.tar"), make_tar(webdataset_members(["a", "b", "c"])))
    write_bytes(s3_uri(s3_bucket, "wds/00001.tar.gz"), make_tar(webdataset_members(["d"]), compress=True))
    write_bytes(s3_uri(s3_bucket, "wds-other/00000.tar"), make_tar(webdataset_members(["zz"])))  # not under wds/
    shards = plan_shards(s3_uri(s3_bucket, "wds"))
    assert [shard.uri for shard in shards] == [
        s3_uri(s3_bucket, "wds/00000.tar"),
        s3_uri(s3_bucket, "wds/00001.tar.gz"),
    ]
    rows = read_plan(shards, chunk_bytes=1024)  # many ranged requests per shard
    assert [(row["key"], row["source"].rsplit("/", 1)[-1]) for row in rows] == [
        ("a", "00000.tar"),
        ("b", "00000.tar"),
        ("c", "00000.tar"),
        ("d", "00001.tar.gz"),
    ]
    assert plan_shards(s3_uri(s3_bucket, "wds/*.tar")) == shards[:1]

    table = pa.table({"id": ["p", "q"], "image": [png(1), png(2)]})
    write_bytes(s3_uri(s3_bucket, "pq/0.parquet"), parquet_bytes(table))
    rows = read_plan(plan_shards(s3_uri(s3_bucket, "pq/")))
    assert [(row["key"], row["data"]) for row in rows] == [("p", png(1)), ("q", png(2))]

    for name in ("x/1.png", "x/2.jpg", "3.png"):
        write_bytes(s3_uri(s3_bucket, f"imgs/{name}"), png(len(name)))
    rows = read_plan(plan_shards(s3_uri(s3_bucket, "imgs"), images_per_shard=2))
    assert [row["key"] for row in rows] == ["3.png", "x/1.png", "x/2.jpg"]
    assert rows[1]["source"] == s3_uri(s3_bucket, "imgs/x/1.png")

    shard = plan_shards(s3_uri(s3_bucket, "wds/00000.tar"))[0]
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key="wds/00000.tar")
    with pytest.raises(ShardReadError, match=re.escape(shard.uri)):
        read_all(shard)


def test_anonymous_access_through_storage_options(s3_bucket: str) -> None:
    """moto grants anonymous reads of public-read objects and refuses private ones, as S3 does."""
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="pub/0.tar", Body=make_tar([("a.jpg", png(1))]), ACL="public-read")
    client.put_object(Bucket=s3_bucket, Key="priv/0.tar", Body=make_tar([("a.jpg", png(1))]))
    client.put_object(Bucket=s3_bucket, Key="imgs/a.png", Body=png(1), ACL="public-read")
    client.put_object(Bucket=s3_bucket, Key="imgs/b.png", Body=png(2))
    anonymous = {"anon": True}
    shards = plan_shards(s3_uri(s3_bucket, "pub/"), storage_options=anonymous)
    assert [row["data"] for row in read_plan(shards, storage_options=anonymous)] == [png(1)]
    shard = plan_shards(s3_uri(s3_bucket, "priv/0.tar"))[0]
    with pytest.raises(ShardReadError, match="access denied") as raised:
        read_all(shard, storage_options=anonymous)
    assert shard.uri in str(raised.value)
    rows = read_plan(plan_shards(s3_uri(s3_bucket, "imgs/")), storage_options=anonymous)
    assert rows[0]["data"] == png(1)
    assert rows[1]["data"] is None and s3_uri(s3_bucket, "imgs/b.png") in rows[1]["error"]


# ---- transient faults ----------------------------------------------------------------------------------------------


@pytest.fixture()
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without the waiting, so fault tests stay fast."""
    monkeypatch.setattr(storage, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def test_local_reads_survive_failing_and_short_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_backoff: None
) -> None:
    write_bytes(str(tmp_path / "w" / "0.tar"), make_tar(webdataset_members([f"k{i}" for i in range(20)])))
    write_bytes(str(tmp_path / "w" / "1.tar.gz"), make_tar(webdataset_members(["g"]), compress=True))
    write_bytes(str(tmp_path / "p" / "0.parquet"), parquet_bytes(pa.table({"jpg": [png(i) for i in range(9)]}), 2))
    _write_images(tmp_path / "i", ["a.png", "b.png", "c.png"])
    specs = [str(tmp_path / "w"), str(tmp_path / "p"), str(tmp_path / "i")]
    expected = [read_plan(plan_shards(spec), chunk_bytes=700) for spec in specs]

    chance = random.Random(1234)
    real_cat_file, real_info, real_ls = LocalFileSystem.cat_file, LocalFileSystem.info, LocalFileSystem.ls
    failures = {"count": 0}

    def flaky(real: Any) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if chance.random() < 0.25:
                failures["count"] += 1
                raise ConnectionResetError("connection reset by peer (injected)")
            result = real(self, *args, **kwargs)
            if real is real_cat_file and len(result) > 1 and chance.random() < 0.15:
                failures["count"] += 1
                return result[: len(result) // 2]  # a response cut short without an error
            return result

        return call

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky(real_cat_file))
    monkeypatch.setattr(LocalFileSystem, "info", flaky(real_info))
    monkeypatch.setattr(LocalFileSystem, "ls", flaky(real_ls))  # what find walks with
    actual = [read_plan(plan_shards(spec), chunk_bytes=700) for spec in specs]
    assert actual == expected
    assert failures["count"] > 20


class _FaultyProxy(http.server.ThreadingHTTPServer):
    """Forwards HTTP to the moto server; answers 503 SlowDown to some requests and cuts some response bodies short."""

    daemon_threads = True

    def __init__(self, upstream: str, failure_rate: float, seed: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.removeprefix("http://")
        self.failure_rate = failure_rate
        self.chance = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = 0
        self.faults = 0

    def draw(self) -> float:
        with self.lock:
            self.requests += 1
            return self.chance.random()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FaultyProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        draw = self.server.draw()
        if draw < self.server.failure_rate / 2:
            with self.server.lock:
                self.server.faults += 1
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        connection = http.client.HTTPConnection(self.server.upstream, timeout=30)
        headers = {name: value for name, value in self.headers.items() if name.lower() != "connection"}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        content = response.read()
        connection.close()
        cut = self.command == "GET" and len(content) > 1 and draw < self.server.failure_rate
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        # A HEAD answer has no body but must keep the object's length.
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut:
            with self.server.lock:
                self.server.faults += 1
            self.wfile.write(content[: len(content) // 2])
            self.close_connection = True
            return
        self.wfile.write(content)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture()
def faulty_proxy(s3_endpoint: str) -> Iterator[_FaultyProxy]:
    proxy = _FaultyProxy(s3_endpoint, failure_rate=0.2, seed=7)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_s3_reads_survive_a_proxy_failing_a_fifth_of_requests(
    s3_bucket: str, faulty_proxy: _FaultyProxy, monkeypatch: pytest.MonkeyPatch, no_backoff: None
) -> None:
    write_bytes(s3_uri(s3_bucket, "wds/0.tar"), make_tar(webdataset_members([f"k{i}" for i in range(12)])))
    write_bytes(s3_uri(s3_bucket, "wds/1.tar.gz"), make_tar(webdataset_members(["g0", "g1"]), compress=True))
    write_bytes(s3_uri(s3_bucket, "pq/0.parquet"), parquet_bytes(pa.table({"jpg": [png(i) for i in range(8)]}), 3))
    for name in ("a.png", "b/c.png", "d.jpg"):
        write_bytes(s3_uri(s3_bucket, f"imgs/{name}"), png(len(name)))
    specs = [s3_uri(s3_bucket, "wds/"), s3_uri(s3_bucket, "pq/*.parquet"), s3_uri(s3_bucket, "imgs")]
    expected = [read_plan(plan_shards(spec), chunk_bytes=2048) for spec in specs]

    # Only this project's retries stand between the faults and the reader: s3fs and botocore retry nothing here.
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    options = {
        "endpoint_url": f"http://127.0.0.1:{faulty_proxy.server_address[1]}",
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
    }
    actual = [
        read_plan(plan_shards(spec, storage_options=options), storage_options=options, chunk_bytes=2048)
        for spec in specs
    ]
    assert actual == expected
    assert faulty_proxy.faults >= 5, (faulty_proxy.faults, faulty_proxy.requests)


# ---- planning memory: one copy of the URIs where one suffices -------------------------------------------------------


def test_list_lines_are_concatenated_into_one_array_across_blocks_and_growth() -> None:
    from pipeline.sources.listing import _concatenate_lines

    first = pa.array(["s3://b/a.jpg", "s3://b/bb.jpg", "s3://b/c.jpg"]).slice(1)  # a slice: offsets do not start at 0
    pieces = [first, pa.array([], pa.string()), pa.array(["s3://b/ddd.png"] * 50)]
    joined = _concatenate_lines(iter(pieces), size_hint=10)  # far too small a hint: the buffer grows
    assert joined.type == pa.string() and joined.to_pylist() == ["s3://b/bb.jpg", "s3://b/c.jpg"] + ["s3://b/ddd.png"] * 50
    assert _concatenate_lines(iter([]), size_hint=0).to_pylist() == []
    many = [pa.array([f"{index}" for index in range(start, start + 700)]) for start in range(0, 2100, 700)]
    assert _concatenate_lines(iter(many), size_hint=0).to_pylist() == [f"{index}" for index in range(2100)]  # grows


def test_a_sorted_list_is_not_copied_and_an_unsorted_one_is_sorted() -> None:
    from pipeline.sources.listing import _sorted

    ordered = pa.array(["a", "b", "b", "c"])
    assert _sorted(ordered) is ordered  # already in order: no copy
    assert _sorted(pa.chunked_array([["c", "a"], ["b"]])).to_pylist() == ["a", "b", "c"]
    assert _sorted(pa.array(["x"])).to_pylist() == ["x"]


def test_a_list_file_in_any_order_plans_sorted_unique_shards(tmp_path: Path) -> None:
    names = [f"s3://bucket/p/{index:04d}.JPG" for index in range(30)]
    shuffled = names[7:] + names[:7] + names[3:5]  # out of order, with repeats
    (tmp_path / "inputs.txt").write_text("\n".join(["# photos", "", *shuffled]) + "\n")
    shards = plan_shards(str(tmp_path / "inputs.txt"), images_per_shard=8)
    assert [member for shard in shards for member in shard.members] == names  # upper-case extensions claimed too
    assert [len(shard.members) for shard in shards] == [8, 8, 8, 6]


def test_the_plan_tables_members_share_the_listings_buffer() -> None:
    from pipeline import planstore
    from pipeline.sources.base import Members

    listing = pa.array([f"s3://b/{index:03d}.jpg" for index in range(20)])
    shards = [
        Shard(shard_id=f"images-{index}", format="images", uri="", members=Members(listing.slice(start, 8)))
        for index, start in enumerate(range(0, 20, 8))
    ]
    table = planstore.plan_table(shards)
    assert table.column("members").to_pylist() == [listing.to_pylist()[start : start + 8] for start in range(0, 20, 8)]
    flat = table.column("members").chunk(0).values
    assert flat.buffers()[2].address == listing.buffers()[2].address  # zero-copy: the listing's own string data
    # Members from different arrays (or tuples) are concatenated instead.
    mixed = planstore.plan_table([*shards[:1], Shard(shard_id="images-x", format="images", uri="", members=("z.jpg",))])
    assert mixed.column("members").to_pylist()[1] == ["z.jpg"]


def test_a_permuted_list_is_sorted_with_32_bit_indices_and_freed_memory_handed_back() -> None:
    """listing._sorted on a permuted array (and on chunks) gives Python's order; the C heap's trim is found on glibc,
    so the pages that reading a list leaves behind really go back to the system."""
    import platform

    from pipeline.sources import listing

    values = [f"s3://bucket/photos/{number % 997:05d}/{number:09d}.jpg" for number in range(20_000)]
    random.Random(7).shuffle(values)
    assert listing._sorted(pa.array(values)).to_pylist() == sorted(values)
    chunked = pa.chunked_array([pa.array(values[:7_000]), pa.array(values[7_000:])])
    assert listing._sorted(chunked).to_pylist() == sorted(values)
    in_order = pa.array(sorted(values))
    assert listing._sorted(in_order) is in_order  # already sorted: no copy
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert listing._malloc_trim() is not None
    listing._release_free_memory()
