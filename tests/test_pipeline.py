"""The main job end to end on a real local Ray: every input format, from S3 (moto) and from local paths.

Each run is checked row by row against ``model/`` used directly: every input key exactly once, error rows exactly
for the planted bad samples, and labels, scores and embeddings equal to the direct computation (fp32, 1e-4).
"""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from pipeline.config import JobConfig
from pipeline.plan import JobError, run_job
from tests.corpus import Sample, make_samples, write_image_files, write_parquet, write_webdataset
from tests.pipeline_helpers import REFERENCE_DTYPE, check_rows, expected_predictions, read_output, start_local_ray
from tests.reference import small_config_dict, write_reference_checkpoint

TOP_K = 3


@pytest.fixture(scope="module")
def local_ray(s3_endpoint: str):
    """A real local Ray for this module; S3 variables are set before it starts, so its workers inherit them."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("checkpoint")
    return str(write_reference_checkpoint(folder, small_config_dict(num_labels=12, image_size=64), seed=3))


def write_inputs(base: str, input_format: str) -> tuple[str, dict[tuple[str, str], Sample]]:
    """Write a few shards of one format under ``base``; return the --input value and the expected (source, key)s."""
    samples: dict[tuple[str, str], Sample] = {}
    if input_format == "webdataset":
        for index in range(3):
            uri = f"{base}/shards/part-{index:03d}.tar"
            shard = make_samples(40, seed=index, prefix=f"w{index}.v1/img-", bad_every=9)  # folders may hold dots; keys end at the name's first dot
            write_webdataset(uri, shard)
            samples.update({(uri, sample.key): sample for sample in shard})
        return f"{base}/shards", samples
    if input_format == "parquet":
        for index in range(2):
            uri = f"{base}/tables/part-{index:03d}.parquet"
            shard = make_samples(40, seed=10 + index, prefix=f"p{index}-", bad_every=7)
            write_parquet(uri, shard, hf_struct=index == 1)
            samples.update({(uri, sample.key): sample for sample in shard})
        return f"{base}/tables/*.parquet", samples
    written = write_image_files(f"{base}/images", make_samples(30, seed=20, prefix="img", bad_every=8))
    return f"{base}/images", {(f"{base}/images/{key}", key): sample for key, sample in written.items()}


@pytest.mark.parametrize("input_format", ["webdataset", "parquet", "images"])
@pytest.mark.parametrize("storage", ["s3", "local"])
def test_classify_row_by_row(
    local_ray: None, checkpoint: str, s3_bucket: str, tmp_path, storage: str, input_format: str
) -> None:
    base = f"s3://{s3_bucket}" if storage == "s3" else str(tmp_path)
    input_spec, samples = write_inputs(base, input_format)
    output = f"{base}/predictions"
    config = JobConfig(task="classify", input=input_spec, output=output, model=checkpoint, top_k=TOP_K,
                       batch_size=8, images_per_shard=12, dtype=REFERENCE_DTYPE)

    summary = run_job(config)

    assert summary.samples == len(samples)
    assert summary.errors == sum(sample.bad for sample in samples.values())
    by_key = {key: sample for (_, key), sample in samples.items()}
    expected_by_key = expected_predictions(checkpoint, by_key, fast=config.fast_decode, top_k=TOP_K)
    expected = {(source, key): expected_by_key[key] for (source, key) in samples if key in expected_by_key}
    check_rows(read_output(output), samples, expected)


def test_embed_job_writes_embeddings_only(local_ray: None, checkpoint: str, tmp_path) -> None:
    input_spec, samples = write_inputs(str(tmp_path), "webdataset")
    output = str(tmp_path / "embeddings")
    run_job(JobConfig(task="embed", input=input_spec, output=output, model=checkpoint, batch_size=8,
                      dtype=REFERENCE_DTYPE))

    table = read_output(output)
    assert table.column_names == ["key", "source", "embedding", "error"]
    by_key = {key: sample for (_, key), sample in samples.items()}
    expected_by_key = expected_predictions(checkpoint, by_key, fast=True, top_k=1)
    expected = {(source, key): expected_by_key[key] for (source, key) in samples if key in expected_by_key}
    check_rows(table, samples, expected, task="embed")


def test_output_records_provenance_and_summary(local_ray: None, checkpoint: str, tmp_path) -> None:
    input_spec, samples = write_inputs(str(tmp_path), "parquet")
    output = tmp_path / "out"
    summary = run_job(JobConfig(task="classify", input=input_spec, output=str(output), model=checkpoint,
                                embedding_dtype="float16", normalize_embeddings=True))

    book = tmp_path / "out.job"  # the bookkeeping lives beside the output, which holds only Parquet
    written = json.loads((book / "summary.json").read_text())
    assert written["samples"] == summary.samples == len(samples)
    assert (book / "SUCCESS").exists() and (book / "manifest.json").exists()
    assert {path.suffix for path in output.rglob("*") if path.is_file()} <= {".parquet", ".errors"}
    parquet_file = sorted(output.glob("*.parquet"))[0]
    metadata = {key.decode(): value.decode() for key, value in pq.read_schema(parquet_file).metadata.items()}
    assert metadata["model_uri"] == checkpoint
    assert len(metadata["weights_sha256"]) == 64
    assert json.loads(metadata["preprocessing"])["crop_size"] == {"height": 64, "width": 64}
    table = pq.read_table(parquet_file)
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[32]"
    import numpy as np

    norms = [np.linalg.norm(np.asarray(row, dtype=np.float32)) for row in table["embedding"].to_pylist() if row]
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_the_demo_classifies_its_sample_photos_and_ends_with_a_similarity_lookup(
    local_ray: None, checkpoint: str, tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m jobs.demo``, the README's first command, on this module's Ray with the small checkpoint (the
    default, a random full-size one, costs minutes on two cores): the shards of real photographs plus the planted
    broken JPEG give one row each, and the report shows the layout, top-3 rows, the error row and a lookup."""
    import logging

    import ray.data

    from jobs import demo

    # The demo quiets Ray and this project's loggers for its own output: none of that may outlive the test.
    context = ray.data.DataContext.get_current()
    for name in ("enable_progress_bars", "print_on_execution_start"):
        monkeypatch.setattr(context, name, getattr(context, name))
    monkeypatch.delenv("RAY_BACKEND_LOG_LEVEL", raising=False)
    quieted = ("ray", "ray.data", "ray.data._internal", "pipeline", "model")
    levels = {name: logging.getLogger(name).level for name in quieted}
    try:
        assert demo.main(["--model", checkpoint, "--workdir", str(tmp_path), "--shards", "1",
                          "--images-per-shard", "6", "--rows", "4"]) == 0
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)

    report = capsys.readouterr().out
    assert "Classifying 2 WebDataset shards" in report and "RANDOM WEIGHTS" not in report
    assert "succeeded: 7 samples, 1 errors" in report  # six photos and the planted broken download
    assert "predictions/" in report and "predictions.job/" in report and "(error rows, Parquet)" in report
    assert "Top-3 predictions (first 4 of 7 rows):" in report
    assert "Error rows (1; planted: 'broken-download'" in report and "  broken-download    error: " in report
    lookup = report[report.index("Images most similar to"):].splitlines()
    assert len(lookup) == 4 and all(" cosine " in line for line in lookup[1:]), lookup
    assert read_output(str(tmp_path / "predictions")).num_rows == 7


def test_ray_data_services_are_started_early_as_ray_data_names_them(local_ray: None) -> None:
    """pipeline.dataservices asks for the very actors Ray Data's executor looks up (same names and namespaces)."""
    import ray
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    from pipeline.dataservices import SERVICE_FACTORIES, request_data_services, start_data_services

    requesting = request_data_services()  # what a job does: asked for in a thread the driver does not wait for
    requesting.join(timeout=60)
    assert not requesting.is_alive()
    assert start_data_services() == [function for _, function in SERVICE_FACTORIES]  # each factory found and called
    for name, namespace in (("ActorLocationTracker", "ActorLocationTracker"), (STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE),
                            ("AutoscalingCoordinator", "AutoscalingCoordinator")):
        assert ray.get_actor(name, namespace=namespace) is not None
    assert start_data_services() == [function for _, function in SERVICE_FACTORIES]  # again: found, not duplicated


def test_a_missing_or_failing_ray_data_service_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import dataservices

    monkeypatch.setattr(dataservices, "SERVICE_FACTORIES", (("no.such.module", "factory"), ("json", "no_such_function"),
                                                             ("json", "loads")))
    assert dataservices.start_data_services() == []  # json.loads() without arguments raises TypeError: skipped too


def test_a_request_never_calls_a_ray_that_is_gone_and_a_job_settles_its_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Called on a shut-down Ray, a factory would start a new one in the requesting thread (Ray's auto-init), which
    the process's next ray.init() trips over: the request stops instead, and a job waits for its requests before it
    returns, so none outlives it."""
    import sys
    import types

    import ray

    from pipeline import dataservices

    calls: list[str] = []

    def recording_factory() -> None:  # a stand-in service factory that takes a moment
        time.sleep(0.3)
        calls.append("called")

    services = types.ModuleType("stand_in_services")
    services.recording_factory = recording_factory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "stand_in_services", services)
    monkeypatch.setattr(dataservices, "SERVICE_FACTORIES", (("stand_in_services", "recording_factory"),))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert dataservices.start_data_services() == [] and calls == []

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    first = dataservices.request_data_services()
    assert dataservices.request_data_services() is first  # one request at a time, not one per connect
    dataservices.settle_data_service_requests()
    assert not first.is_alive() and calls == ["called"]
    second = dataservices.request_data_services()  # the first has ended: a new request
    assert second is not first
    dataservices.settle_data_service_requests()
    assert not second.is_alive() and calls == ["called", "called"]

    # A job that fails right after joining Ray (here: at once) has ended its request when run_job raises.
    from pipeline import plan

    def fail_after_joining(config: JobConfig) -> None:
        dataservices.request_data_services()
        raise JobError("refused")

    monkeypatch.setattr(plan, "_run_job", fail_after_joining)
    with pytest.raises(JobError):
        plan.run_job(JobConfig(task="classify", input="in", output="out", model="model"))
    assert calls == ["called"] * 3
