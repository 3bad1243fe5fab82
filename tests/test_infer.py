"""pipeline/infer.py without Ray: error rows, top-k, embeddings, padding, copies and the overlap of concurrent calls."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from model import ViTHybridForImageClassification
from model.modeling import ImageClassifierOutput
from model.processing import ViTHybridImageProcessor
from pipeline.actor import CONCURRENT_CALLS, InferenceActor, InferenceSettings, actor_pool_arguments
from pipeline.config import NO_ERROR, NOT_LAST_ROW
from pipeline.infer import (
    CPU_WARM_UP_SIDE,
    GPU_ON_CPU_VARIABLE,
    BatchInference,
    predict,
    resolve_device,
    resolve_dtype,
)
from pipeline.standin import ENVIRONMENT_VARIABLE as STAND_IN_VARIABLE
from tests.reference import small_config_dict, write_reference_checkpoint

IMAGE_SIZE = 64
NUM_LABELS = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reference_checkpoint(
        tmp_path_factory.mktemp("infer") / "model", small_config_dict(num_labels=NUM_LABELS, image_size=IMAGE_SIZE)
    )


def make_batch(count: int, *, bad: tuple[int, ...] = (), seed: int = 0, prefix: str = "k") -> dict[str, np.ndarray]:
    """A batch as the decode stage hands it over: uint8 crops, "" for no error, bookkeeping columns."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    errors = np.array([f"decode error: row {row}" if row in bad else NO_ERROR for row in range(count)], dtype=object)
    for row in bad:
        pixels[row] = 0  # what decode_batch leaves in a failed row
    shard_rows = np.full(count, NOT_LAST_ROW, dtype=np.int64)
    shard_rows[-1] = count
    return {
        "key": np.array([f"{prefix}{row}" for row in range(count)], dtype=object),
        "source": np.array(["s3://bucket/shard.tar"] * count, dtype=object),
        "ordinal": np.arange(count, dtype=np.int64),
        "pixels": pixels,
        "error": errors,
        "shard_id": np.array(["shard-0"] * count, dtype=object),
        "shard_rows": shard_rows,
    }


def real_actor(checkpoint: Path, **overrides: object) -> BatchInference:
    settings: dict[str, object] = {"model_uri": str(checkpoint), "task": "classify", "top_k": 3, "device": "cpu",
                                   "torch_threads": 1}
    settings.update(overrides)
    return BatchInference(InferenceSettings(**settings))  # type: ignore[arg-type]


class RecordingModel(torch.nn.Module):
    """Logits that are a known function of each row's pixels; records the batches it is called with."""

    def __init__(self, hidden_size: int = 16, num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden_size, id2label={i: f"label{i}" for i in range(num_labels)})
        self.calls: list[torch.Tensor] = []
        self.num_labels = num_labels
        self.hidden_size = hidden_size

    def forward(self, pixel_values: torch.Tensor, **_: object) -> ImageClassifierOutput:
        self.calls.append(pixel_values.clone())
        means = pixel_values.float().mean(dim=(1, 2, 3))
        logits = torch.stack([torch.sin(means * (label + 1)) * 3 for label in range(self.num_labels)], dim=1)
        embedding = torch.stack([torch.cos(means * (unit + 1)) for unit in range(self.hidden_size)], dim=1)
        return ImageClassifierOutput(logits=logits, embedding=embedding)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self(pixel_values).embedding


def actor_with(
    checkpoint: Path, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, **overrides: object
) -> BatchInference:
    """A real actor (built from the stand-in, which loads no weights) whose model is replaced by ``model``."""
    monkeypatch.setenv(STAND_IN_VARIABLE, "0")
    actor = real_actor(checkpoint, **overrides)
    actor.model = model
    actor.normalizer = torch.nn.Identity()
    actor.hidden_size = model.config.hidden_size
    actor.id2label = model.config.id2label
    return actor


def rows_of(table: pa.Table) -> dict[str, dict]:
    return {row["key"]: row for row in table.to_pylist()}


# ---------------------------------------------------------------------------------------------------------- pieces


def test_device_and_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv(GPU_ON_CPU_VARIABLE, "1")
    assert resolve_device("cuda") == torch.device("cpu")


def test_pool_arguments_are_accepted_by_ray_data() -> None:
    from ray.data import ActorPoolStrategy

    strategy = ActorPoolStrategy(min_size=1, max_size=2, **actor_pool_arguments(use_gpu=True))
    assert strategy.max_concurrent_calls_per_actor == CONCURRENT_CALLS >= 2
    assert strategy.enable_true_multi_threading is True
    # CPU actors: as many batches as they compute at once (their lanes), none queued behind them (another actor may
    # be free for it); lanes compute truly at once, in the actor's threads.
    cpu = ActorPoolStrategy(min_size=2, max_size=2, **actor_pool_arguments(use_gpu=False))
    assert cpu.max_concurrent_calls_per_actor == 1 and cpu.max_tasks_in_flight_per_actor == 1
    lanes = ActorPoolStrategy(min_size=1, max_size=1, **actor_pool_arguments(use_gpu=False, cpu_calls=3))
    assert lanes.max_concurrent_calls_per_actor == 3 and lanes.max_tasks_in_flight_per_actor == 3
    assert lanes.enable_true_multi_threading is True


def test_padding_needs_a_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        InferenceSettings(model_uri="x", task="classify", pad_to_batch=True)


# -------------------------------------------------------------------------------------------------------- results


def test_embeddings_and_topk_equal_the_model_used_directly(checkpoint: Path) -> None:
    actor = real_actor(checkpoint, top_k=4)
    batch = make_batch(5, seed=1)
    table = actor(batch)

    model = ViTHybridForImageClassification.from_pretrained(str(checkpoint)).eval()
    normalizer = ViTHybridImageProcessor.from_pretrained(str(checkpoint)).normalizer()
    with torch.inference_mode():
        output = model(normalizer(torch.from_numpy(batch["pixels"])))
    probabilities = torch.softmax(output.logits, dim=-1)
    scores, ids = probabilities.topk(4, dim=-1)

    assert table.column("key").to_pylist() == list(batch["key"])
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), output.embedding.numpy(), atol=1e-5)
    assert table.column("topk_ids").to_pylist() == ids.tolist()
    np.testing.assert_allclose(np.array(table.column("topk_scores").to_pylist()), scores.numpy(), atol=1e-6)
    assert table.column("label").to_pylist() == [model.config.id2label[int(i)] for i in ids[:, 0]]
    assert table.column("error").null_count == 5
    assert table.column("shard_rows").to_pylist() == [None] * 4 + [5]


def test_the_actor_ray_data_runs_builds_the_model_in_its_process_and_hands_it_every_batch(checkpoint: Path) -> None:
    settings = InferenceSettings(model_uri=str(checkpoint), task="classify", top_k=3, device="cpu", torch_threads=1)
    actor = InferenceActor(settings)
    assert isinstance(actor.inference, BatchInference) and actor.inference.settings is settings
    batch = make_batch(4, bad=(1,), seed=2)
    assert actor(batch).equals(real_actor(checkpoint)(batch))


def test_embed_task_has_no_topk(checkpoint: Path) -> None:
    actor = real_actor(checkpoint, task="embed")
    table = actor(make_batch(3))
    assert "topk_ids" not in table.column_names and "label" not in table.column_names
    assert table.column("embedding").null_count == 0


def test_error_rows_bypass_the_model_and_keep_their_reason(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = RecordingModel()
    actor = actor_with(checkpoint, model, monkeypatch)
    batch = make_batch(6, bad=(1, 4), seed=2)
    table = actor(batch)

    # Only the four good rows reach the model: on a CPU, each run of good rows in place (rows 0, 2-3, 5).
    assert [call.shape[0] for call in model.calls] == [1, 2, 1]
    np.testing.assert_array_equal(torch.cat(model.calls).numpy(), batch["pixels"][[0, 2, 3, 5]])
    rows = rows_of(table)
    assert table.column("key").to_pylist() == list(batch["key"])  # every row, in input order
    for row in (1, 4):
        assert rows[f"k{row}"]["error"] == f"decode error: row {row}"
        assert rows[f"k{row}"]["embedding"] is None and rows[f"k{row}"]["topk_ids"] is None
    expected = model(torch.from_numpy(batch["pixels"][[0, 2, 3, 5]]))
    got = np.array([rows[f"k{row}"]["embedding"] for row in (0, 2, 3, 5)])
    np.testing.assert_allclose(got, expected.embedding.numpy(), atol=1e-6)
    top = torch.softmax(expected.logits, -1).topk(3, -1).indices.tolist()
    assert [rows[f"k{row}"]["topk_ids"] for row in (0, 2, 3, 5)] == top


def test_a_batch_of_only_failed_rows_never_calls_the_model(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = RecordingModel()
    actor = actor_with(checkpoint, model, monkeypatch)
    table = actor(make_batch(3, bad=(0, 1, 2)))
    assert model.calls == []
    assert table.column("error").null_count == 0 and table.column("embedding").null_count == 3


def test_topk_is_the_softmax_topk_in_float32() -> None:
    model = RecordingModel()
    pixels = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    result = predict(model, torch.nn.Identity(), pixels, top_k=3)
    logits = model(pixels).logits
    scores, ids = torch.softmax(logits, -1).topk(3, -1)
    np.testing.assert_array_equal(result.topk_ids, ids.numpy())
    np.testing.assert_allclose(result.topk_scores, scores.numpy())
    assert result.topk_ids.dtype == np.int32 and result.topk_scores.dtype == np.float32
    assert predict(model, torch.nn.Identity(), pixels, top_k=3, rows=2).embeddings.shape == (2, model.hidden_size)


# -------------------------------------------------------------------------------------------------------- padding


def test_padding_gives_every_call_the_batch_size_and_drops_the_padding(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = RecordingModel()
    actor = actor_with(checkpoint, model, monkeypatch, batch_size=4, pad_to_batch=True)
    plain = actor_with(checkpoint, RecordingModel(), monkeypatch)
    batch = make_batch(11, bad=(3,), seed=3)  # 10 good rows: pieces of 4, 4 and 2 padded to 4
    padded_table, plain_table = actor(batch), plain(batch)
    assert [call.shape[0] for call in model.calls] == [4, 4, 4]
    assert padded_table.to_pylist() == plain_table.to_pylist()


def test_padding_does_not_change_the_real_network_results(checkpoint: Path) -> None:
    padded = real_actor(checkpoint, batch_size=8, pad_to_batch=True)
    plain = real_actor(checkpoint)
    batch = make_batch(5, bad=(2,), seed=4)
    first, second = padded(batch), plain(batch)
    # A tail batch after a full one: the padding rows now hold earlier crops, not zeros.
    padded(make_batch(8, seed=5))
    third = padded(batch)
    for table in (first, third):
        assert table.column("topk_ids").to_pylist() == second.column("topk_ids").to_pylist()
        np.testing.assert_allclose(
            np.array([v or [0.0] * 32 for v in table.column("embedding").to_pylist()], dtype=np.float32),
            np.array([v or [0.0] * 32 for v in second.column("embedding").to_pylist()], dtype=np.float32),
            atol=1e-5,
        )


# --------------------------------------------------------------------------------------------------------- copies


def test_a_cpu_batch_reaches_the_model_without_a_copy(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    actor = actor_with(checkpoint, RecordingModel(), monkeypatch)
    batch = make_batch(4)
    batch["pixels"].setflags(write=False)  # as Ray hands over Arrow buffers
    prepared = actor.prepare(batch["pixels"], np.ones(4, dtype=bool))
    assert prepared.pixels.data_ptr() == batch["pixels"].ctypes.data and prepared.staging is None

    # With a failed row, still no copy on a CPU: the good rows are run in place, run by run.
    good = np.array([True, False, True, True])
    skipping = actor.prepare(batch["pixels"], good)
    assert skipping.pixels.data_ptr() == batch["pixels"].ctypes.data and skipping.staging is None
    assert skipping.runs == [(0, 1), (2, 4)] and skipping.rows == 3

    # Fixed shapes (GPUs, --compile): one gather into a reused buffer; the second batch gets the first one's buffer.
    padded = actor_with(checkpoint, RecordingModel(), monkeypatch, pad_to_batch=True, batch_size=4)
    first = padded.prepare(batch["pixels"], good)
    np.testing.assert_array_equal(first.pixels.numpy()[:3], batch["pixels"][good])
    padded._staging.give_back(first.staging)
    second = padded.prepare(batch["pixels"], good)
    assert second.staging is first.staging


# -------------------------------------------------------------------------------------------------------- overlap


class InsideCountingModel(RecordingModel):
    """Counts the calls inside it at once (``most_inside``); each call waits in :meth:`hold` while it is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0
        self.inside = 0
        self.most_inside = 0
        self._condition = threading.Condition()

    def forward(self, pixel_values: torch.Tensor, **kwargs: object) -> ImageClassifierOutput:
        with self._condition:
            self.started += 1
            ordinal = self.started
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self._condition.notify_all()
        try:
            self.hold(ordinal)
            return super().forward(pixel_values, **kwargs)
        finally:
            with self._condition:
                self.inside -= 1

    def hold(self, ordinal: int) -> None:
        """What the ``ordinal``-th call (from 1) does inside the model before computing."""


class GatedModel(InsideCountingModel):
    """Blocks in its first call until told to go on; counts calls inside it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def hold(self, ordinal: int) -> None:
        self.entered.set()
        self.release.wait(timeout=30)


def test_concurrent_calls_prepare_while_another_computes_and_keep_row_order(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = GatedModel()
    actor = actor_with(checkpoint, model, monkeypatch)
    prepared_during_compute = threading.Event()
    original_prepare = actor.prepare

    def prepare(pixels: np.ndarray, good: np.ndarray):  # type: ignore[no-untyped-def]
        prepared = original_prepare(pixels, good)
        if model.inside:  # another call is inside the model right now
            prepared_during_compute.set()
            model.release.set()
        return prepared

    actor.prepare = prepare  # type: ignore[method-assign]
    batches = [make_batch(5, bad=(index % 5,), seed=10 + index, prefix=f"b{index}-") for index in range(4)]
    results: dict[int, pa.Table] = {}

    def call(index: int) -> None:
        results[index] = actor(batches[index])

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert model.entered.wait(timeout=30)
    others = [threading.Thread(target=call, args=(index,)) for index in (1, 2, 3)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(timeout=60)
    assert prepared_during_compute.is_set(), "a call could not prepare its batch while another one computed"
    assert model.most_inside == 1, "two calls were inside the model at once"
    reference = actor_with(checkpoint, RecordingModel(), monkeypatch)
    for index, batch in enumerate(batches):
        assert results[index].column("key").to_pylist() == list(batch["key"])
        assert results[index].to_pylist() == reference(batch).to_pylist()


class RendezvousModel(InsideCountingModel):
    """Its first ``lanes`` calls wait (up to 10 s) until all of them are inside at once, then stay a moment longer, so
    that a call beyond the lanes would be seen inside too; records the most calls inside at once."""

    def __init__(self, lanes: int) -> None:
        super().__init__()
        self.lanes = lanes

    def hold(self, ordinal: int) -> None:
        if ordinal > self.lanes:
            return
        with self._condition:
            self._condition.wait_for(lambda: self.inside >= self.lanes, timeout=10)
        threading.Event().wait(0.2)  # the other callers, blocked at the actor's lanes, would enter now


def test_a_cpu_actor_computes_as_many_batches_at_once_as_it_has_lanes_and_no_more(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = RendezvousModel(lanes=2)
    actor = actor_with(checkpoint, model, monkeypatch, compute_lanes=2)
    batches = [make_batch(4, bad=(index % 4,), seed=20 + index, prefix=f"l{index}-") for index in range(4)]
    results: dict[int, pa.Table] = {}
    threads = [threading.Thread(target=lambda index=index: results.__setitem__(index, actor(batches[index])))
               for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert model.most_inside == 2, f"{model.most_inside} calls were inside the model at once, the actor has 2 lanes"
    reference = actor_with(checkpoint, RecordingModel(), monkeypatch)
    for index, batch in enumerate(batches):
        assert results[index].to_pylist() == reference(batch).to_pylist()


def test_the_real_model_in_concurrent_lanes_gives_the_rows_of_one_call_at_a_time(checkpoint: Path) -> None:
    """Lanes share one model: inference only reads it, and its lazily built state exists before the first batch."""
    actor = real_actor(checkpoint, compute_lanes=3)
    batches = [make_batch(3, bad=(index % 3,), seed=30 + index, prefix=f"r{index}-") for index in range(6)]
    results: dict[int, pa.Table] = {}
    threads = [threading.Thread(target=lambda index=index: results.__setitem__(index, actor(batches[index])))
               for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    one_at_a_time = real_actor(checkpoint)
    for index, batch in enumerate(batches):
        for got, want in zip(results[index].to_pylist(), one_at_a_time(batch).to_pylist(), strict=True):
            numbers = [(got.pop(name), want.pop(name)) for name in ("embedding", "topk_scores")]
            assert got == want  # key, order, labels, top-k ids, errors
            for got_values, want_values in numbers:
                assert (got_values is None) == (want_values is None)
                if want_values is not None:
                    np.testing.assert_allclose(got_values, want_values, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ compile


def test_compiled_actor_matches_eager(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Inductor's C++ build takes minutes on a small CPU; the actor's wiring (one static-shape graph, padded calls,
    # same results) is what is tested here, with torch.compile's own tracing. benchmarks/actor.py --compile times
    # the real backend.
    compiled_with: list[dict[str, object]] = []
    original = torch.compile

    def compile_with_aot_eager(model: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        compiled_with.append(kwargs)
        return original(model, **{**kwargs, "backend": "aot_eager"})  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    compiled = real_actor(checkpoint, batch_size=4, pad_to_batch=True, compile=True)
    assert compiled_with == [{"dynamic": False}]
    eager = real_actor(checkpoint)
    batch = make_batch(3, seed=7)
    got, expected = compiled(batch), eager(batch)
    assert got.column("topk_ids").to_pylist() == expected.column("topk_ids").to_pylist()
    np.testing.assert_allclose(
        np.array(got.column("embedding").to_pylist()), np.array(expected.column("embedding").to_pylist()), atol=1e-4
    )


# ------------------------------------------------------------------------------------------- decode in the actor


def test_decoding_in_the_actor_gives_the_rows_of_decoding_upstream(checkpoint: Path) -> None:
    """--decode-location actor: the batch carries file bytes; threads decode them beside the model, same rows."""
    from pipeline.decode import decode_batch
    from tests.corpus import make_samples

    samples = make_samples(9, seed=8, prefix="img-", bad_every=4)
    count = len(samples)
    shard_rows = np.full(count, NOT_LAST_ROW, dtype=np.int64)
    shard_rows[-1] = count
    raw = {
        "key": np.array([sample.key for sample in samples], dtype=object),
        "source": np.array(["s3://bucket/shard.tar"] * count, dtype=object),
        "ordinal": np.arange(count, dtype=np.int64),
        "data": np.array([sample.data for sample in samples], dtype=object),
        "error": np.array([NO_ERROR] * count, dtype=object),
        "shard_id": np.array(["shard-0"] * count, dtype=object),
        "shard_rows": shard_rows,
    }
    processor = ViTHybridImageProcessor.from_pretrained(str(checkpoint))
    upstream = real_actor(checkpoint)(decode_batch(raw, processor=processor, fast=True))
    beside = real_actor(checkpoint, decode_in_actor=True, decode_threads=3)(raw)
    assert beside.to_pylist() == upstream.to_pylist()
    assert sum(row["error"] is not None for row in beside.to_pylist()) == sum(sample.bad for sample in samples) > 0


def test_cpu_warm_up_runs_one_small_image_and_padded_warm_up_a_full_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unpadded (CPU) actors warm up on one CPU_WARM_UP_SIDE-pixel image through every layer (position embeddings
    resampled), for either task; padded actors on a full batch at the input size, the one shape later calls have."""
    size = 2 * CPU_WARM_UP_SIDE
    checkpoint = write_reference_checkpoint(tmp_path / "model", small_config_dict(num_labels=NUM_LABELS, image_size=size))
    calls: list[tuple[str, tuple[int, ...], object]] = []
    forward, embed = ViTHybridForImageClassification.forward, ViTHybridForImageClassification.embed

    def recording_forward(self: ViTHybridForImageClassification, pixel_values: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(("forward", tuple(pixel_values.shape), kwargs.get("interpolate_pos_encoding")))
        return forward(self, pixel_values, *args, **kwargs)  # type: ignore[arg-type]

    def recording_embed(self: ViTHybridForImageClassification, pixel_values: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append(("embed", tuple(pixel_values.shape), kwargs.get("interpolate_pos_encoding")))
        return embed(self, pixel_values, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ViTHybridForImageClassification, "forward", recording_forward)
    monkeypatch.setattr(ViTHybridForImageClassification, "embed", recording_embed)
    classify = real_actor(checkpoint)
    real_actor(checkpoint, task="embed")  # its warm-up is the second call recorded
    padded = real_actor(checkpoint, batch_size=3, pad_to_batch=True)
    small = (1, 3, CPU_WARM_UP_SIDE, CPU_WARM_UP_SIDE)
    assert calls == [("forward", small, True), ("embed", small, True), ("forward", (3, 3, size, size), None)]
    # The warmed-up actor still gives the model's own full-size results.
    batch = make_batch(2)
    batch["pixels"] = np.random.default_rng(1).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    warmed, reference = classify(batch), padded(batch)
    assert warmed.column("error").to_pylist() == [None, None]
    assert warmed.column("topk_ids").to_pylist() == reference.column("topk_ids").to_pylist()
    np.testing.assert_allclose(
        np.array(warmed.column("embedding").to_pylist(), dtype=np.float32),
        np.array(reference.column("embedding").to_pylist(), dtype=np.float32),
        atol=1e-5,
    )
