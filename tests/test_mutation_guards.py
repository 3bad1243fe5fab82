"""Tests written to kill mutations that survived the suite (issue 13's audit), each through the path users take.

* ``--max-image-pixels`` must reach the decoder: a whole job, from the command line to the output rows, because a
  test of the decode function alone passes when the flag is dropped on the way (the CLI, ``JobConfig``, the plan's
  arguments to the read/decode tasks).
* An extensionless tar member inside a dotted folder (``d.v2/a`` beside ``d.v2/b.jpg``) is its own sample: read
  through :func:`pipeline.sources.read_shard`, whatever rule groups members into samples (this project's, or the
  webdataset library's: the key is the name up to the first dot of its last path component).

Passwords with ``@`` (and any character) in URIs are covered in tests/test_redaction.py.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from pipeline.sources import Shard, read_shard


def _png(width: int, height: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Tar members inside dotted folders
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extensionless_first", [True, False])
def test_extensionless_member_in_a_dotted_folder_stays_its_own_sample(
    tmp_path: Path, extensionless_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """``d.v2/a`` has no ``key.suffix`` form, so the webdataset library skips it: it must neither merge into
    ``d.v2/b`` nor cut keys at the folder's dot, and it is named in the log as skipped (not silently dropped)."""
    image = _png(24, 16, 90)
    members = [("d.v2/a", b"no extension: not an image"), ("d.v2/b.jpg", image)]
    if not extensionless_first:
        members.reverse()
    shard_path = tmp_path / "shard.tar"
    shard_path.write_bytes(_tar([*members, ("e.v3/c.png", image), ("e.v3/c.json", b"{}")]))
    shard = Shard(shard_id="s0", format="webdataset", uri=str(shard_path))

    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        rows = [row for table in read_shard(shard) for row in table.to_pylist()]

    by_key = {row["key"]: row for row in rows}
    assert len(by_key) == len(rows), f"a key appears twice: {[row['key'] for row in rows]}"
    assert set(by_key) == {"d.v2/b", "e.v3/c"}, "samples merged or keys cut at the folder's dot"
    assert by_key["d.v2/b"]["data"] == image and by_key["d.v2/b"]["error"] is None
    assert by_key["e.v3/c"]["data"] == image and by_key["e.v3/c"]["error"] is None
    assert sorted(row["ordinal"] for row in rows) == [0, 1]
    assert "d.v2/a" in caplog.text and "skipped 1 member" in caplog.text  # named, as the library's rule skips it


# --------------------------------------------------------------------------------------------------------------------
# --max-image-pixels reaches the decoder through the job
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_max_image_pixels_flag_reaches_the_decoder_through_the_job(tmp_path: Path) -> None:
    import ray

    from jobs.cli import main
    from tests.pipeline_helpers import start_local_ray
    from tests.reference import small_config_dict, write_reference_checkpoint

    checkpoint = write_reference_checkpoint(tmp_path / "model", small_config_dict(num_labels=4, image_size=32), seed=2)
    # 48 x 40 = 1920 pixels is over the limit below; 30 x 30 = 900 is under it. Pillow's own limit is ~89 million.
    sizes = {"big0": (48, 40), "small0": (30, 30), "big1": (40, 48), "small1": (25, 36)}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(
        _tar([(f"{key}.png", _png(width, height, 60)) for key, (width, height) in sizes.items()])
    )
    start_local_ray()
    try:
        code = main("embed", ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                              "--model", str(checkpoint), "--device", "cpu", "--max-image-pixels", "1000"])
    finally:
        ray.shutdown()
    assert code == 0
    rows = {row["key"]: row for row in pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()}
    assert set(rows) == set(sizes)
    for key in ("big0", "big1"):
        assert rows[key]["embedding"] is None
        assert rows[key]["error"] == "image too large: 48x40 = 1920 pixels > limit 1000".replace(
            "48x40", "x".join(map(str, sizes[key]))
        )
    for key in ("small0", "small1"):
        assert rows[key]["error"] is None and rows[key]["embedding"] is not None
