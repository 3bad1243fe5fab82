"""Helpers for the end-to-end tests: a local Ray, a small checkpoint, and the row-by-row output check."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from PIL import Image

from fixtures.checkout import checkout_python_path
from model import ViTHybridForImageClassification, ViTHybridImageProcessor
from tests.corpus import Sample

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def start_local_ray() -> None:
    """A real local Ray (2 CPUs) started as a job starts its own, whose workers import this checkout and see the S3
    test variables."""
    import ray

    from pipeline.preflight import local_ray_options

    ray.init(
        address="local",  # a new local Ray even when someone has a cluster running on this machine
        num_cpus=2,
        runtime_env={"env_vars": {"PYTHONPATH": checkout_python_path()}},
        logging_level="WARNING",
        **local_ray_options(),  # as a job's own Ray: no dashboard, idle workers kept for the next task
    )


def read_output(uri: str) -> pa.Table:
    """Every row under an output folder, as a reader of the whole folder (pyarrow/pandas ``dataset(OUT)``, DuckDB
    ``OUT/**``) sees it: prediction files and the error-row files under ``errors/``."""
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(uri)
    files = sorted(filesystem.find(path.rstrip("/")))
    assert files, f"no files under {uri}"
    return pads.dataset(files, format="parquet", filesystem=filesystem).to_table()


# The dtype of jobs whose rows are compared with expected_predictions (float32 within 1e-4): "auto" would be bfloat16
# on a CPU with AVX512-BF16.
REFERENCE_DTYPE = "float32"


def expected_predictions(
    model_folder: str, samples: dict[str, Sample], *, fast: bool, top_k: int
) -> dict[str, dict[str, object]]:
    """What ``model/`` says for each good sample when used directly, one image at a time, in fp32."""
    model = ViTHybridForImageClassification.from_pretrained(model_folder)
    processor = ViTHybridImageProcessor.from_pretrained(model_folder)
    normalizer = processor.normalizer(device=torch.device("cpu"), dtype=torch.float32)
    expected = {}
    with torch.inference_mode():
        for key, sample in samples.items():
            if sample.bad:
                continue
            pixels = processor.to_uint8(Image.open(io.BytesIO(sample.data)), fast=fast, exif_orientation=True)
            output = model(normalizer(torch.from_numpy(pixels[None])))
            probabilities = torch.softmax(output.logits, dim=-1)[0]
            scores, ids = probabilities.topk(top_k)
            expected[key] = {
                "label_id": int(ids[0]),
                "label": model.config.id2label[int(ids[0])],
                "score": float(scores[0]),
                "topk_ids": ids.tolist(),
                "topk_scores": scores.numpy(),
                "embedding": output.embedding[0].numpy(),
            }
    return expected


def check_rows(
    table: pa.Table,
    samples: dict[tuple[str, str], Sample],
    expected: dict[tuple[str, str], dict[str, object]],
    *,
    task: str = "classify",
    atol: float = 1e-4,
) -> None:
    """Every input (source, key) exactly once; error rows exactly for planted bad samples; values as ``model/``."""
    rows = table.to_pylist()
    seen = [(row["source"], row["key"]) for row in rows]
    assert len(seen) == len(set(seen)), "duplicate output rows"
    assert set(seen) == set(samples), (
        f"missing {sorted(set(samples) - set(seen))[:5]}, unexpected {sorted(set(seen) - set(samples))[:5]}"
    )
    for row in rows:
        identity = (row["source"], row["key"])
        sample = samples[identity]
        if sample.bad:
            assert row["error"], f"{identity} was planted bad but has no error"
            assert row["embedding"] is None
            if task == "classify":
                assert row["label"] is None and row["score"] is None and row["topk_ids"] is None
            continue
        assert row["error"] is None, f"{identity}: unexpected error {row['error']}"
        want = expected[identity]
        np.testing.assert_allclose(np.asarray(row["embedding"]), want["embedding"], atol=atol, rtol=0)
        if task == "classify":
            assert row["label_id"] == want["label_id"], identity
            assert row["label"] == want["label"], identity
            assert abs(row["score"] - want["score"]) <= atol, identity
            assert row["topk_ids"] == want["topk_ids"], identity
            np.testing.assert_allclose(row["topk_scores"], want["topk_scores"], atol=atol, rtol=0)
