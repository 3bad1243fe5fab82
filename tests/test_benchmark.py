"""The benchmark's arithmetic: the JPEG mix, the bounds and ratios, and one --quick run checked figure by figure.

Speed is not tested (CI machines vary); what is tested is that every reported ratio is computed from the reported
figures as documented, so the table can be trusted when it is run on real hardware.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from benchmarks import measures as benchmarking
from benchmarks.measures import ImageKind

# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers.


def test_mix_kinds_puts_one_phone_photo_in_every_n() -> None:
    kinds = benchmarking.mix_kinds(25, phone_every=10)
    assert len(kinds) == 25
    assert [index for index, kind in enumerate(kinds) if kind == "phone"] == [9, 19]
    assert benchmarking.mix_kinds(5, phone_every=0) == ["imagenet"] * 5
    assert benchmarking.mix_fractions(kinds) == {"imagenet": 23 / 25, "phone": 2 / 25}


def test_mix_rate_adds_up_time_per_image() -> None:
    # 9 images at 100/s (0.09 s) + 1 at 10/s (0.1 s): 10 images in 0.19 s.
    rate = benchmarking.mix_rate({"imagenet": 100.0, "phone": 10.0}, {"imagenet": 0.9, "phone": 0.1})
    assert rate == pytest.approx(10 / 0.19)
    assert benchmarking.mix_rate({"imagenet": 50.0}, {"imagenet": 1.0}) == pytest.approx(50.0)
    with pytest.raises(KeyError, match="phone"):
        benchmarking.mix_rate({"imagenet": 50.0}, {"imagenet": 0.5, "phone": 0.5})


@pytest.mark.parametrize(
    ("model", "actors", "decode", "cpus", "bottleneck", "bound"),
    [(0.6, 1, 150.0, 1, "model", 0.6), (1000.0, 2, 120.0, 15, "decode", 1800.0)],
)
def test_pipeline_bounds(model: float, actors: int, decode: float, cpus: float, bottleneck: str, bound: float) -> None:
    bounds = benchmarking.pipeline_bounds(
        model_images_per_s=model, actors=actors, decode_images_per_s_per_core=decode, decode_cpus=cpus,
        end_to_end_images_per_s=0.9 * bound,
    )
    assert bounds.model_pool_images_per_s == pytest.approx(model * actors)
    assert bounds.decode_capacity_images_per_s == pytest.approx(decode * cpus)
    assert bounds.bound_images_per_s == pytest.approx(bound)
    assert bounds.bottleneck == bottleneck
    assert bounds.efficiency == pytest.approx(0.9)
    with pytest.raises(ValueError):
        benchmarking.pipeline_bounds(model_images_per_s=0, actors=1, decode_images_per_s_per_core=1, decode_cpus=1,
                                     end_to_end_images_per_s=1)


def test_two_point_rate_splits_fixed_and_marginal_time() -> None:
    # 10 s fixed + 1 image/s: 32 images in 42 s, 64 in 74 s.
    fit = benchmarking.two_point_rate(small_images=32, small_runs=[42.0], images=64, runs=[74.0], bound_images_per_s=1.25)
    assert fit.marginal_images_per_s == pytest.approx(1.0)
    assert fit.fixed_s == pytest.approx(10.0) and fit.fixed_s_per_pair == pytest.approx((10.0,))
    assert fit.marginal_efficiency == pytest.approx(0.8)
    # Repeated runs: the fit goes through the means; each pair's own fit shows how far one slow round moved it.
    repeated = benchmarking.two_point_rate(small_images=32, small_runs=[46.0, 38.0], images=64, runs=[74.0, 74.0],
                                           bound_images_per_s=1.25)
    assert repeated.small_seconds == pytest.approx(42.0) and repeated.fixed_s == pytest.approx(10.0)
    assert repeated.fixed_s_per_pair == pytest.approx((18.0, 2.0))
    with pytest.raises(ValueError, match="not slower"):
        benchmarking.two_point_rate(small_images=32, small_runs=[42.0], images=64, runs=[41.0], bound_images_per_s=1)
    with pytest.raises(ValueError, match="larger"):
        benchmarking.two_point_rate(small_images=64, small_runs=[42.0], images=64, runs=[50.0], bound_images_per_s=1)
    with pytest.raises(ValueError, match="as many runs"):
        benchmarking.two_point_rate(small_images=32, small_runs=[42.0], images=64, runs=[74.0, 75.0], bound_images_per_s=1)


def test_peak_and_flop_utilisation() -> None:
    assert benchmarking.peak_tflops_for("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert benchmarking.peak_tflops_for("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert benchmarking.peak_tflops_for("NVIDIA H200", "float32") == 67.0
    assert benchmarking.peak_tflops_for("Some Future GPU", "bfloat16") is None
    assert benchmarking.peak_tflops_for(None, "bfloat16") is None
    # 100 GFLOPs per image at 1000 images/s = 100 TFLOP/s = 10% of 1000 TFLOP/s.
    assert benchmarking.model_flop_utilisation(100e9, 1000.0, 1000.0) == pytest.approx(0.1)
    assert benchmarking.model_flop_utilisation(100e9, 1000.0, None) is None


def test_build_image_set_alternates_orientation_and_encodes_jpeg() -> None:
    photos = benchmarking.sample_photographs()[:2]
    kind = ImageKind("phone", 160, 120, grain=3.0)
    images = benchmarking.build_image_set(kind, photos, count=3)
    assert [(image.width, image.height) for image in images] == [(160, 120), (120, 160), (160, 120)]
    assert [image.photo for image in images] == [photos[0][0], photos[1][0], photos[0][0]]
    for image in images:
        with Image.open(io.BytesIO(image.data)) as decoded:
            assert decoded.format == "JPEG"
            assert decoded.size == (image.width, image.height)


# ---------------------------------------------------------------------------------------------------------------------
# One --quick run, end to end.


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One ``python -m jobs.benchmark --quick`` run as a user starts it (so re-executed with the CPU actors'
    allocator), without GLIBC_TUNABLES of its own: its JSON and its printed output."""
    import os
    import subprocess
    import sys

    path = tmp_path_factory.mktemp("benchmark") / "quick.json"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.benchmark", "--quick", "--device", "cpu", "--json", str(path)],
        env={key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"},
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(path.read_text(encoding="utf-8")), done.stdout


@pytest.mark.slow
def test_the_command_line_measures_the_model_with_the_actors_allocator(quick_results: tuple[dict, str]) -> None:
    """``python -m jobs.benchmark`` re-executes itself with the CPU actors' GLIBC_TUNABLES, so that the model-only
    stage (in this process) runs as the job's actors do, and records them."""
    from pipeline.cpu import cpu_actor_environment

    results, _ = quick_results
    assert results["model"]["allocator"] == cpu_actor_environment()["GLIBC_TUNABLES"]


@pytest.mark.slow
def test_quick_run_model_and_decode_arithmetic(quick_results: tuple[dict, str]) -> None:
    results, _ = quick_results
    settings, model, decode = results["settings"], results["model"], results["decode"]
    # On a CPU the model runs in the dtype auto picks on this machine (float32 unless it has AVX512-BF16 or AMX).
    assert settings["quick"] and model["device"] == "cpu" and model["dtype"] == results["machine"]["auto_dtype"]
    assert len(model["batch_seconds"]) == model["timed_batches"] == settings["timed_batches"] > 0
    assert model["images_per_s"] == pytest.approx(
        settings["batch_size"] * len(model["batch_seconds"]) / sum(model["batch_seconds"])
    )
    assert model["flops_per_image"] > 0 and model["actor_startup_s"] > 0

    assert decode["kinds"] == ["imagenet", "phone"]
    for kind in decode["kinds"]:
        row = decode["per_kind"][kind]
        assert row["fast"] > 0 and row["exact"] > 0 and row["avg_kb"] > 0
        assert row["fast_over_exact"] == pytest.approx(row["fast"] / row["exact"])
        if row["reference"] is not None:
            assert row["fast_over_reference"] == pytest.approx(row["fast"] / row["reference"])
        assert 0 <= row["max_abs_pixel_diff"] <= 255
        agreement = row["top1_agreement"]
        assert 0 <= agreement["identical_pixels"] <= agreement["agree"] <= agreement["images"]
    # The phone photo is a >4x downscale: the fast path (JPEG draft, reducing gap) does change pixels there.
    assert decode["per_kind"]["phone"]["max_abs_pixel_diff"] > 0

    mix = decode["mix"]
    fractions = mix["fractions"]
    assert sum(fractions.values()) == pytest.approx(1.0)
    for path in ("fast", "exact"):
        expected = 1 / sum(fraction / decode["per_kind"][kind][path] for kind, fraction in fractions.items())
        assert mix[path] == pytest.approx(expected)
    assert mix["fast_over_exact"] == pytest.approx(mix["fast"] / mix["exact"])
    total = decode["top1_agreement"]
    assert total["images"] == sum(decode["per_kind"][kind]["top1_agreement"]["images"] for kind in decode["kinds"])
    assert total["agree"] == sum(decode["per_kind"][kind]["top1_agreement"]["agree"] for kind in decode["kinds"])
    # The model runs (fast, exact and the +-1 noise control) only on images whose two crops differ.
    assert total["control_images"] == total["images"] - total["identical_pixels"] > 0
    assert 0 <= total["control_agree"] <= total["control_images"]
    assert total["embedding_shift_over_between_photos"] > 0 and total["control_shift_over_between_photos"] > 0


@pytest.mark.slow
def test_quick_run_end_to_end_and_bounds(quick_results: tuple[dict, str]) -> None:
    results, _ = quick_results
    settings, e2e, bounds = results["settings"], results["end_to_end"], results["bounds"]
    assert e2e["status"] == "succeeded"
    assert e2e["samples"] == e2e["images"] == settings["images"] > 0
    assert e2e["errors"] == 0
    assert e2e["shards"] == math.ceil(settings["images"] / settings["images_per_shard"]) == e2e["shards_committed"]
    assert e2e["phone_images"] == settings["images"] // settings["phone_every"]
    assert e2e["seconds"] > 0 and e2e["ray_init_s"] > 0  # ray.init() is timed apart: the job joined a started Ray
    assert e2e["images_per_s"] == pytest.approx(e2e["samples"] / e2e["seconds"])
    assert e2e["summary_images_per_s"] == pytest.approx(e2e["images_per_s"], abs=1e-3)  # the summary rounds

    # On a CPU the job runs one actor computing a single-threaded batch per core at once; that actor is timed, and
    # so are the same cores as one process each; the bound is the fastest of those and one call on every thread.
    pool, separate = results["model"]["pool"], results["model"]["processes"]
    lanes = results["model"]["job_sizing"]["calls_per_actor"]
    assert pool is not None and (pool["processes"], pool["lanes"]) == (1, lanes) and lanes == e2e["calls_per_actor"] >= 2
    assert separate is not None and (separate["processes"], separate["lanes"]) == (lanes, 1)
    assert e2e["actors"] == 1
    for layout in (pool, separate):
        assert len(layout["batch_seconds"]) == lanes and layout["images_per_s"] > 0 and layout["torch_threads"] == 1
    model_pool = max(results["model"]["images_per_s"] * settings["actors"], pool["images_per_s"], separate["images_per_s"])
    decode_capacity = results["decode"]["mix"]["fast"] * e2e["decode_cpus"]
    assert bounds["model_pool_images_per_s"] == pytest.approx(model_pool)
    assert bounds["decode_capacity_images_per_s"] == pytest.approx(decode_capacity)
    assert bounds["bound_images_per_s"] == pytest.approx(min(model_pool, decode_capacity))
    assert bounds["bottleneck"] == ("model" if model_pool <= decode_capacity else "decode")
    assert bounds["efficiency"] == pytest.approx(e2e["images_per_s"] / min(model_pool, decode_capacity))

    assert results["two_point"] is None  # not asked for
    assert results["mfu"]["model_only"] is None  # no peak known for a CPU without --peak-tflops


@pytest.mark.slow
def test_quick_run_table_shows_the_figures(quick_results: tuple[dict, str]) -> None:
    results, printed = quick_results
    table = benchmarking.format_report(results)
    assert table in printed  # what the command printed is the table of the figures it wrote
    for heading in ("1. model only", "2. decode + preprocess", "3. end to end", "4. bounds", "pipeline efficiency"):
        assert heading in table
    assert f"{results['bounds']['efficiency']:.3f}" in table
    # With --two-point: the fit, and the ray.init() a job starting its own Ray pays before the fit's fixed part.
    fit = benchmarking.two_point_rate(small_images=32, small_runs=[42.0], images=64, runs=[74.0], bound_images_per_s=1)
    table = benchmarking.format_report({**results, "two_point": {**fit.to_dict(), "ray_init_s": 5.5}})
    assert re.search(r"two-point fit +10\.0 s fixed", table) and re.search(r"\+ ray\.init\(\) +5\.5 s", table)
    assert "per pair" not in table  # one pair: nothing to compare
    fit = benchmarking.two_point_rate(small_images=32, small_runs=[46.0, 38.0], images=64, runs=[74.0, 74.0],
                                      bound_images_per_s=1)
    table = benchmarking.format_report({**results, "two_point": fit.to_dict()})
    assert "42.0 s (mean of 46.0, 38.0)" in table and re.search(r"fixed, per pair +18\.0, 2\.0 s", table)


# ---------------------------------------------------------------------------------------------------------------------
# Stages: the registry, prerequisites, and a run of one stage alone.


def test_stages_resolve_with_their_prerequisites_in_registry_order() -> None:
    from benchmarks.stages import STAGES, resolve_stages

    assert resolve_stages(["bounds"]) == ["inputs", "decode", "model", "end_to_end", "bounds"]
    assert resolve_stages(["fidelity"]) == ["inputs", "fidelity"]
    assert resolve_stages(["machine"]) == ["machine"]
    assert resolve_stages(STAGES) == list(STAGES)
    with pytest.raises(ValueError, match="unknown benchmark stage 'nope'"):
        resolve_stages(["nope"])


def test_stages_flag_parses_and_refuses_unknown_names() -> None:
    from jobs.benchmark import build_parser

    parser = build_parser()
    assert parser.parse_args(["--stages", "machine,fidelity"]).stages == ("machine", "fidelity")
    assert parser.parse_args([]).stages == parser.parse_args(["--stages", "all"]).stages
    with pytest.raises(SystemExit):
        parser.parse_args(["--stages", "machine,nope"])


def test_machine_stage_alone_reports_this_cpu(capsys: pytest.CaptureFixture, tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    from jobs.benchmark import main
    from pipeline import cpu

    path = Path(str(tmp_path)) / "machine.json"
    results = main(["--stages", "machine", "--device", "cpu", "--quick", "--json", str(path)])
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(results))  # the JSON is what it returns
    assert results["stages"] == ["machine"]
    machine = results["machine"]
    detected = cpu.detect_cpu_capabilities()
    assert machine["capabilities"]["avx512_bf16"] == detected.avx512_bf16
    assert machine["auto_dtype"] == cpu.choose_cpu_dtype(detected, machine["measured_bf16_speedup"]).dtype
    assert machine["sizing"] == cpu.size_cpu_node(cpu.usable_cpus()).to_dict()
    assert results["settings"]["dtype"] == machine["auto_dtype"]  # the model stage would run in the job's dtype
    printed = capsys.readouterr().out
    assert "dtype auto on CPU" in printed and machine["described"] in printed


@pytest.mark.parametrize("users_own", ["", "glibc.malloc.tcache_count=8"])
def test_the_reexecuted_benchmark_gives_its_children_the_users_allocator_back(
    monkeypatch: pytest.MonkeyPatch, users_own: str
) -> None:
    """In the re-executed process the actors' tunables stay this process's own: Ray and its decode and writer workers,
    started from here, see what the user had (nothing, or the user's own GLIBC_TUNABLES)."""
    import os

    from jobs import benchmark
    from pipeline.cpu import cpu_actor_environment

    tuned = cpu_actor_environment()["GLIBC_TUNABLES"]
    monkeypatch.setenv("GLIBC_TUNABLES", tuned)
    monkeypatch.setenv(benchmark._REEXECUTED, users_own)
    monkeypatch.setenv(benchmark.MEASURED_ALLOCATOR, "stale")  # overwritten; and put back after the test
    benchmark.with_actor_allocator("cpu")  # the re-executed branch: returns instead of exec'ing
    assert os.environ.get("GLIBC_TUNABLES") == (users_own or None)
    assert os.environ[benchmark.MEASURED_ALLOCATOR] == tuned
    assert benchmark._REEXECUTED not in os.environ


def test_a_gpu_run_of_the_benchmark_keeps_the_nodes_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU actors keep the node's allocator, so a GPU run is not re-executed (here it would replace pytest itself)."""
    import os

    from jobs import benchmark

    monkeypatch.delenv(benchmark._REEXECUTED, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    benchmark.with_actor_allocator("cuda")
    assert "GLIBC_TUNABLES" not in os.environ and benchmark.MEASURED_ALLOCATOR not in os.environ



def test_two_point_runs_the_two_sizes_alternately_on_fresh_rays_and_reports_the_first_full_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The orchestration of ``--two-point`` without Ray: small and full jobs alternate ``--two-point-repeats`` times
    (a slow minute of the machine then weighs on both sizes), and section 3 shows the first full-size run."""
    import contextlib

    from benchmarks import end_to_end
    from benchmarks.stages import BenchmarkContext
    from jobs.benchmark import build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args(
        ["--quick", "--two-point", "--two-point-repeats", "3", "--device", "cpu", "--images", "24"]))
    ran: list[str] = []

    def fake_job(settings: object, model_uri: str, input_uri: str, output_uri: str) -> dict[str, object]:
        ran.append(input_uri.rsplit("/", 1)[-1])
        return {"samples": 12 if input_uri.endswith("-small") else 24, "seconds": float(len(ran)), "ray_init_s": 5.0}

    monkeypatch.setattr(end_to_end, "run_end_to_end", fake_job)
    monkeypatch.setattr(end_to_end, "write_mixed_shards",
                        lambda *args, **kwargs: {"shards": 3, "input_bytes": 1000, "per_kind": {}, "fractions": {}})
    context = BenchmarkContext(settings=settings, workdir=tmp_path, stack=contextlib.ExitStack(), shared={
        "storage_base": str(tmp_path), "model_uri": "unused", "image_sets": {}, "kinds": [None, SimpleNamespace(name="phone")],
    })
    figures = end_to_end.run(context)
    assert ran == ["shards-small", "shards"] * 3
    assert [job["seconds"] for job in context.shared["small_jobs"]] == [1.0, 3.0, 5.0]
    assert [job["seconds"] for job in context.shared["large_jobs"]] == [2.0, 4.0, 6.0]
    assert figures["seconds"] == 2.0 and figures["images"] == 24
