"""From a real embed job to search, end to end on a real local Ray: jobs.index, jobs.search and jobs.dedup.

One embed job (small random checkpoint, 64 x 64 input) runs over real photographs (scikit-image's samples) with
planted near-duplicates (the same photo re-encoded at low JPEG quality, resized) and two bad files, reading and
writing on the S3 test server. The index is built from that output on S3 and, from a local copy, on local disk.
"""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from jobs import dedup as dedup_cli
from jobs import index as index_cli
from jobs import search as search_cli
from pipeline.config import JobConfig
from pipeline.plan import run_job
from search import query, store
from tests.corpus import Sample, write_webdataset
from tests.pipeline_helpers import start_local_ray
from tests.reference import small_config_dict, write_reference_checkpoint

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "hubble_deep_field", "coins",
          "moon", "page", "retina", "colorwheel", "brick", "grass", "gravel", "logo", "clock", "horse", "text")
# Planted near-duplicates: (key, original, how).
DUPLICATES = (("astronaut_q40", "astronaut", "re-encoded at JPEG quality 40"),
              ("coffee_half", "coffee", "resized to half"),
              ("rocket_small_q60", "rocket", "resized to 2/3 and re-encoded at quality 60"))
BAD = ("truncated", "garbage")
# A random checkpoint is a poor feature extractor: deep random backbones amplify one grey level of JPEG noise into
# large embedding changes. This shallow one (measured once over these photos) puts the planted pairs at cosine
# >= 0.994 and every pair of distinct photos at <= 0.975, so a threshold between them is a fair test of dedup.
def model_config() -> dict:
    return small_config_dict(image_size=64, hidden_size=64, num_hidden_layers=1, depths=(1, 1))


THRESHOLD = "0.985"


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo_samples() -> dict[str, bytes]:
    """Real photographs as JPEG bytes, the planted near-duplicates, and two files that are not images."""
    images = {}
    for name in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        images[name] = Image.fromarray(pixels)
    data = {name: _jpeg(image) for name, image in images.items()}
    data["astronaut_q40"] = _jpeg(Image.open(io.BytesIO(data["astronaut"])), quality=40)
    coffee = images["coffee"]
    data["coffee_half"] = _jpeg(coffee.resize((coffee.width // 2, coffee.height // 2), Image.Resampling.BILINEAR))
    rocket = images["rocket"]
    data["rocket_small_q60"] = _jpeg(rocket.resize((rocket.width * 2 // 3, rocket.height * 2 // 3)), quality=60)
    data["truncated"] = data["chelsea"][: len(data["chelsea"]) // 3]
    data["garbage"] = b"not an image at all" * 20
    return data


@pytest.fixture(scope="module")
def local_ray(s3_endpoint: str):
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("checkpoint")
    return str(write_reference_checkpoint(folder, model_config(), seed=3))


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"search-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return photo_samples()


@pytest.fixture(scope="module")
def embed_output(local_ray: None, checkpoint: str, bucket: str, photos: dict[str, bytes]) -> str:
    """The embed job's output on S3, from two WebDataset shards of the photos."""
    names = list(photos)
    for number, part in enumerate((names[::2], names[1::2])):
        samples = [Sample(name, photos[name], bad=name in BAD) for name in part]
        write_webdataset(f"s3://{bucket}/photos/part-{number:03d}.tar", samples)
    output = f"s3://{bucket}/embeddings"
    run_job(JobConfig(task="embed", input=f"s3://{bucket}/photos", output=output, model=checkpoint, batch_size=8))
    return output


@pytest.fixture(scope="module")
def s3_index(embed_output: str, bucket: str) -> str:
    uri = f"s3://{bucket}/index"
    assert index_cli.main(["--input", embed_output, "--output", uri]) == 0
    return uri


@pytest.fixture(scope="module")
def local_index(embed_output: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same output copied to local disk, indexed there."""
    folder = tmp_path_factory.mktemp("local")
    filesystem, path = fsspec.core.url_to_fs(embed_output)
    for name in filesystem.glob(f"{path}/*.parquet"):
        filesystem.get(name, str(folder / "embeddings" / Path(name).name))
    assert index_cli.main(["--input", str(folder / "embeddings"), "--output", str(folder / "index")]) == 0
    return str(folder / "index")


def test_index_of_a_real_job_finds_every_image_as_its_own_nearest_neighbour(s3_index: str, checkpoint: str,
                                                                            photos: dict[str, bytes],
                                                                            embed_output: str) -> None:
    stored = store.load_index(s3_index)
    good = sorted(name for name in photos if name not in BAD)
    assert sorted(stored.ids.column("key").to_pylist()) == good
    # The job keeps its error rows out of OUT/*.parquet (they live in OUT/errors/*.errors), so the index reads none.
    assert stored.metadata["input"]["skipped_rows"] == 0
    filesystem, path = fsspec.core.url_to_fs(embed_output)
    error_keys = set()
    for name in filesystem.glob(f"{path}/errors/*.errors"):
        with filesystem.open(name, "rb") as handle:
            error_keys.update(pq.read_table(handle).column("key").to_pylist())
    assert error_keys == set(BAD)
    assert stored.metadata["index"]["factory"] == "Flat" and stored.metadata["recall"]["recall_at_k"] == 1.0
    assert stored.metadata["fingerprint"]["model_uri"] == checkpoint
    assert len(stored.metadata["fingerprint"]["weights_sha256"]) == 64
    _, ids = zip(*query.ids_for_keys(stored, good))
    scores, found = query.search_vectors(stored, query.vectors_for_ids(stored, list(ids)), 2)
    assert found[:, 0].tolist() == list(ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (scores[:, 1] < scores[:, 0]).all()


def test_search_by_image_by_key_and_by_embeddings_parquet(local_index: str, embed_output: str, photos: dict[str, bytes],
                                                          tmp_path, capsys) -> None:
    image = tmp_path / "coins.jpg"
    image.write_bytes(photos["coins"])
    assert search_cli.main(["--index", local_index, "--query", str(image), "-k", "3"]) == 0
    printed = capsys.readouterr().out
    first_hit = printed.splitlines()[2].split()
    assert printed.startswith(f"query: {image}") and first_hit[0] == "1" and first_hit[2] == "coins"
    assert abs(float(first_hit[1]) - 1.0) < 1e-3  # the same bytes, model and preprocessing as the job

    results = tmp_path / "by-key.parquet"
    assert search_cli.main(["--index", local_index, "--key", "astronaut", "coffee", "-k", "2",
                            "--output", str(results)]) == 0
    table = pq.read_table(results).to_pylist()
    assert [(row["query"], row["rank"], row["key"]) for row in table] == [
        ("astronaut", 1, "astronaut"), ("astronaut", 2, "astronaut_q40"), ("coffee", 1, "coffee"),
        ("coffee", 2, "coffee_half")]
    assert all(row["source"].startswith("s3://") and row["source"].endswith(".tar") for row in table)

    filesystem, path = fsspec.core.url_to_fs(embed_output)
    job_file = "s3://" + min(filesystem.glob(f"{path}/*.parquet"))
    out = tmp_path / "batch"
    assert search_cli.main(["--index", local_index, "--query-embeddings", job_file, "-k", "1", "--output", str(out)]) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    queried = [row["key"] for row in pq.read_table(job_file).to_pylist() if row["embedding"] is not None]
    assert [row["query"] for row in rows] == queried and all(row["key"] == row["query"] for row in rows)


def test_dedup_finds_the_planted_duplicates_and_nothing_else(s3_index: str, bucket: str) -> None:
    output = f"s3://{bucket}/duplicates.parquet"
    assert dedup_cli.main(["--index", s3_index, "--threshold", THRESHOLD, "--output", output]) == 0
    filesystem, path = fsspec.core.url_to_fs(output)
    with filesystem.open(path, "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    groups: dict[int, set[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(row["key"])
        assert row["score"] >= float(THRESHOLD)
    assert sorted(map(sorted, groups.values())) == sorted(sorted([key, original]) for key, original, _ in DUPLICATES)


def test_a_mismatched_model_or_preprocessing_is_refused(local_index: str, checkpoint: str, photos: dict[str, bytes],
                                                        tmp_path, capsys) -> None:
    image = tmp_path / "moon.jpg"
    image.write_bytes(photos["moon"])
    other_weights = write_reference_checkpoint(tmp_path / "other", model_config(), seed=4)
    assert search_cli.main(["--index", local_index, "--query", str(image), "--model", str(other_weights)]) == 2
    error = capsys.readouterr().err
    assert "does not match the index" in error and "weights_sha256" in error and "preprocessing" not in error

    other_preprocessing = tmp_path / "same-weights-other-preprocessing"
    shutil.copytree(checkpoint, other_preprocessing)
    config_path = other_preprocessing / "preprocessor_config.json"
    settings = json.loads(config_path.read_text())
    settings["resample"] = 2 if settings.get("resample") != 2 else 3
    config_path.write_text(json.dumps(settings))
    assert search_cli.main(["--index", local_index, "--query", str(image), "--model", str(other_preprocessing)]) == 2
    error = capsys.readouterr().err
    assert "preprocessing" in error and "weights_sha256" not in error


def test_index_of_an_empty_output_exits_with_a_clear_error(local_ray: None, tmp_path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_SUCCESS").write_text("")
    assert index_cli.main(["--input", str(tmp_path / "out"), "--output", str(tmp_path / "index")]) == 2
    assert "no Parquet data files under" in capsys.readouterr().err
