"""jobs.benchmark_model --quick: runs end to end, and its numbers add up."""

from __future__ import annotations

import statistics

import pytest

pytest.importorskip("transformers")

from jobs import benchmark_model  # noqa: E402


def test_quick_benchmark_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    results = benchmark_model.main(["--quick", "--batch-size", "2", "--threads", "1"])
    printed = capsys.readouterr().out

    variants = results["variants"]
    assert set(variants) == {"native fp32", "reference fp32", "native bf16", "reference bf16"}
    reference_rate = variants["reference fp32"]["images_per_s"]
    for name, result in variants.items():
        assert len(result["seconds"]) == 1
        assert result["median_s"] == statistics.median(result["seconds"])
        assert result["images_per_s"] == pytest.approx(2 / result["median_s"])
        assert result["ratio_vs_reference_fp32"] == pytest.approx(result["images_per_s"] / reference_rate)
        assert name in printed
    assert variants["reference fp32"]["ratio_vs_reference_fp32"] == pytest.approx(1.0)

    for dtype_name, speedup in results["paired_speedup"].items():
        native_time = variants[f"native {dtype_name}"]["seconds"][0]
        reference_time = variants[f"reference {dtype_name}"]["seconds"][0]
        assert speedup == pytest.approx(reference_time / native_time)  # one round: the ratio of the two runs

    flops = results["flops_per_image"]
    assert flops["native"] > 0 and flops["reference"] > 0
    assert flops["native"] <= flops["reference"]  # the CLS-only last layer does less work, never more

    native = results["accuracy"]["native fp32"]
    assert native["max_abs_logit_diff_vs_reference_fp32"] < 1e-4
    assert native["top1_agreement_vs_reference_fp32"] == 1.0
    assert "top-1 agreement" in printed and "GFLOPs per image" in printed


def test_settings_validation() -> None:
    with pytest.raises(SystemExit):
        benchmark_model.parse_settings(["--dtypes", "fp8"])
    settings = benchmark_model.parse_settings(["--batch-size", "8", "--threads", "2", "--iterations", "5"])
    assert (settings.batch_size, settings.threads, settings.iterations, settings.quick) == (8, 2, 5, False)


def test_benchmark_config_grid() -> None:
    config = benchmark_model.benchmark_config(384)
    assert config.backbone_featmap_shape == [1, 1024, 24, 24] and config.num_labels == 1000
    assert benchmark_model.benchmark_config(224).backbone_featmap_shape == [1, 1024, 14, 14]


def test_device_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark_model.parse_settings(["--quick"]).device == "cpu"  # auto without a GPU
    assert benchmark_model.parse_settings(["--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        benchmark_model.parse_settings(["--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert benchmark_model.parse_settings(["--batch-size", "4"]).device == "cuda"  # auto with a GPU
