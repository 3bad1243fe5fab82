"""Inputs as the tools users really have write them: webdataset's TarWriter, Hugging Face ``datasets``' to_parquet,
folders straight off a camera, and list files of millions of URIs. No Ray: the sources package alone.

Each test would fail on the defect it covers (issue 10): sidecars such as ``sample1.meta.json`` split into a sample of
their own, ``{bytes: null, path}`` image structs read as null images, ``_DSC0001.JPG`` skipped silently.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from pipeline.sources import Members, Shard, plan_shards, read_shard
from pipeline.sources.images import group_bounds


def image_bytes(seed: int, image_format: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, image_format)
    return buffer.getvalue()


def read_rows(shard: Shard, **kwargs) -> list[dict]:
    return pa.concat_tables(list(read_shard(shard, **kwargs))).to_pylist()


# ---- webdataset ----------------------------------------------------------------------------------------------------


def test_tarwriter_shards_group_exactly_as_the_webdataset_library_groups(tmp_path: Path) -> None:
    path = tmp_path / "shard-000000.tar"
    written = [
        {"__key__": "sample1", "jpg": image_bytes(1), "meta.json": b'{"a": 1}', "txt": b"caption"},
        {"__key__": "release.v2/sample2", "jpg": image_bytes(2), "seg.png": image_bytes(3, "PNG")},
        {"__key__": "sample3", "png": image_bytes(4, "PNG"), "cls": b"7"},
        {"__key__": "sample4", "json": b"{}"},  # no image: an error row here, a sample without image there
    ]
    with webdataset.TarWriter(str(path)) as sink:
        for sample in written:
            sink.write(sample)

    library = list(webdataset.WebDataset(str(path), shardshuffle=False))
    ours = read_rows(plan_shards(str(path))[0])

    assert [row["key"] for row in ours] == [sample["__key__"] for sample in library]
    assert [row["key"] for row in ours] == ["sample1", "release.v2/sample2", "sample3", "sample4"]
    by_key = {sample["__key__"]: sample for sample in library}
    assert ours[0]["data"] == by_key["sample1"]["jpg"] and ours[0]["error"] is None
    assert ours[1]["data"] == by_key["release.v2/sample2"]["jpg"]  # the photo, not the mask beside it
    assert ours[2]["data"] == by_key["sample3"]["png"]
    assert ours[3]["data"] is None and "no image member" in ours[3]["error"]


# ---- Hugging Face datasets -----------------------------------------------------------------------------------------


def test_datasets_parquet_with_path_only_image_structs_reads_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "hf"
    (folder / "imgs").mkdir(parents=True)
    contents = {f"imgs/{index}.png": image_bytes(index, "PNG") for index in range(3)}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(image_bytes(9))
    # datasets keeps the path as given; built from the Parquet file's folder, relative paths are relative to it.
    monkeypatch.chdir(folder)
    (folder / "imgs" / "missing.png").write_bytes(b"deleted after the data set was written")
    paths = [*contents, str(outside), "imgs/missing.png"]
    dataset = datasets.Dataset.from_dict({"image": paths, "id": ["a", "b", "c", "d", "e"]})
    dataset = dataset.cast_column("image", datasets.Image())
    dataset.to_parquet(str(folder / "train.parquet"))
    stored = pq.read_table(folder / "train.parquet").column("image").to_pylist()
    assert all(item["bytes"] is None and item["path"] for item in stored), "datasets wrote bytes after all"
    (folder / "imgs" / "missing.png").unlink()
    monkeypatch.chdir(tmp_path)

    rows = read_rows(plan_shards(str(folder / "train.parquet"))[0], batch_rows=2)
    assert [row["key"] for row in rows] == ["a", "b", "c", "d", "e"]
    assert [row["data"] for row in rows[:4]] == [*contents.values(), outside.read_bytes()]
    assert all(row["error"] is None for row in rows[:4])
    assert rows[4]["data"] is None and "imgs/missing.png" in rows[4]["error"] and "train.parquet" in rows[4]["error"]


# ---- camera folders ------------------------------------------------------------------------------------------------


def test_camera_file_names_are_read_and_skipped_files_are_named(tmp_path: Path, caplog) -> None:
    root = tmp_path / "DCIM"
    files = {
        "100NIKON/_DSC0001.JPG": image_bytes(1),  # Nikon's Adobe-RGB prefix: an image, not a hidden file
        "100NIKON/DSC_0002.JPG": image_bytes(2),
        "100NIKON/_DSC0003.NEF.jpg": image_bytes(3),
        "_SUCCESS": b"",
        "notes.md": b"# trip",
        ".DS_Store": b"\0",
        "100NIKON/._DSC0001.JPG": b"AppleDouble",
        "_temporary/0/x.jpg": image_bytes(4),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    with caplog.at_level(logging.INFO, logger="pipeline.sources"):
        shards = plan_shards(str(root))
    keys = [member for shard in shards for member in shard.members]
    assert keys == ["100NIKON/DSC_0002.JPG", "100NIKON/_DSC0001.JPG", "100NIKON/_DSC0003.NEF.jpg"]
    assert "ignoring 2 others" in caplog.text and "_SUCCESS" in caplog.text and "notes.md" in caplog.text
    assert "skipped 3 hidden" in caplog.text
    for hidden in (".DS_Store", "100NIKON/._DSC0001.JPG", "_temporary/0/x.jpg"):
        assert hidden in caplog.text
    rows = read_rows(shards[0])
    assert {row["key"]: row["data"] for row in rows}["100NIKON/_DSC0001.JPG"] == files["100NIKON/_DSC0001.JPG"]


# ---- grouping and list files ---------------------------------------------------------------------------------------


def test_loose_images_are_grouped_by_count_and_by_bytes(tmp_path: Path) -> None:
    sizes = pa.array([10, 10, 10, 50, 10, 200, 10, 10], pa.int64())
    assert group_bounds(sizes, images_per_shard=3, bytes_per_shard=60) == [(0, 3), (3, 5), (5, 6), (6, 8)]
    assert group_bounds(pa.nulls(7, pa.int64()), images_per_shard=3, bytes_per_shard=1) == [(0, 3), (3, 6), (6, 7)]

    root = tmp_path / "photos"
    root.mkdir()
    payloads = [image_bytes(seed, size=(24 + 40 * (seed % 3), 16)) for seed in range(9)]
    for seed, data in enumerate(payloads):
        (root / f"{seed:02d}.jpg").write_bytes(data)
    cap = sum(sorted(len(data) for data in payloads)[-2:])  # fits any two files, not every three
    shards = plan_shards(str(root), images_per_shard=3, bytes_per_shard=cap)
    assert [member for shard in shards for member in shard.members] == [f"{seed:02d}.jpg" for seed in range(9)]
    assert all(len(shard.members) <= 3 and shard.bytes <= cap for shard in shards)
    assert sum(shard.bytes for shard in shards) == sum(len(data) for data in payloads)
    assert len(shards) > 3  # bytes, not only count, closed some shards
    assert plan_shards(str(root), images_per_shard=3, bytes_per_shard=cap) == shards  # deterministic


def test_list_file_entries_are_parsed_resolved_and_deduplicated(tmp_path: Path, caplog) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    text = "\ufeff# photos to classify\r\n\r\n  b.jpg  \r\n../other/c.jpg\r\ns3://bucket/x/1.jpg\r\nb.jpg\r\n/abs/d.png\r\n"
    (lists / "input.txt").write_text(text, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        (shard,) = plan_shards(str(lists / "input.txt"), format="images")
    assert list(shard.members) == sorted(
        ["/abs/d.png", str(lists / "b.jpg"), str(tmp_path / "other" / "c.jpg"), "s3://bucket/x/1.jpg"]
    )
    assert "repeats 1" in caplog.text and "b.jpg" in caplog.text
    assert shard.bytes is None and shard.uri == ""


def test_members_behave_as_the_tuple_they_replace() -> None:
    members = Members(pa.array(["a.jpg", "b.jpg", "c.jpg"]))
    assert members == ("a.jpg", "b.jpg", "c.jpg") and len(members) == 3 and members[-1] == "c.jpg"
    assert members[1:] == ("b.jpg", "c.jpg") and list(members[0:2]) == ["a.jpg", "b.jpg"]
    shard = Shard(shard_id="s", format="images", uri="/base", members=members)
    assert Shard.from_dict(shard.to_dict()) == shard
    assert shard.file_uris() == ("/base/a.jpg", "/base/b.jpg", "/base/c.jpg")
    assert os.fspath(Path("/base") / members[0]) == "/base/a.jpg"


# ---- the format registry -------------------------------------------------------------------------------------------


def test_one_format_registry_feeds_planning_the_cli_and_the_job_config(tmp_path: Path) -> None:
    from jobs.cli import build_parser
    from pipeline import config
    from pipeline.config import JobConfig
    from pipeline.sources import format_names, format_of_name, formats

    assert set(format_names()) == {"images", "parquet", "webdataset"}
    assert config.FORMATS == format_names()
    (choices,) = [action.choices for action in build_parser("classify")._actions if "--format" in action.option_strings]
    assert tuple(choices) == format_names()
    with pytest.raises(ValueError, match="format 'zip' is not one of"):
        JobConfig(task="embed", input="a", output="b", model="c", format="zip")
    for name, fmt in formats().items():
        for extension in fmt.extensions:
            assert format_of_name(f"dir.v1/file{extension.upper()}") == name
