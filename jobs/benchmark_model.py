"""Time the native ViT Hybrid against transformers' reference, on the same random weights, batch and threads.

    python -m jobs.benchmark_model --batch-size 8 --threads 2 --iterations 3
    python -m jobs.benchmark_model --quick          # tiny config, one iteration: a smoke test for CI
    python -m jobs.benchmark_model --device cuda --batch-size 128 --iterations 20 --bf16-iterations 20 --bf16-warmup 3

One run builds the google/vit-hybrid-base-bit-384 architecture from its config (nothing is downloaded), draws
random weights once, copies them into transformers' model, and then times four variants: native and reference, in
float32 and bfloat16. Iterations are interleaved (native, reference, native, ...) so that a noisy machine slows all
variants alike; each variant reports the median. It also reports FLOPs per image (``FlopCounterMode``) and how
far the native logits are from the reference's (max absolute difference, top-1 agreement).

``--device`` (default: cuda when torch sees a GPU, else cpu) runs both models there; on a GPU each timed run is
measured with CUDA events, float32 runs without TF32 (the project's numerics policy, ``model.numerics``), and the
FLOP count is the one the GPU executes (attention included, ``benchmarks.flops``).

transformers is needed only here and in the tests (``pip install -e '.[test]'``).

bfloat16 on a CPU without AVX512-BF16/AMX runs through slow fallback kernels (5-10x slower than float32 here),
so bfloat16 variants get ``--bf16-iterations`` (default 1) timed runs and no warm-up unless asked for.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from model.configuration import ViTHybridConfig, vit_base_r50_s16_384_config
from model.modeling import ViTHybridForImageClassification

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchmarkSettings:
    """What one benchmark run measures; built once from the command line."""

    batch_size: int = 8
    threads: int | None = None
    iterations: int = 3
    warmup: int = 1
    bf16_iterations: int = 1
    bf16_warmup: int = 0
    image_size: int = 384
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    quick: bool = False
    seed: int = 0
    device: str = "cpu"


@dataclass
class VariantResult:
    name: str
    implementation: str  # "native" or "reference"
    dtype: str
    seconds: list[float]
    median_s: float
    images_per_s: float  # batch_size / median_s
    best_s: float  # the fastest run: on a shared machine, the least disturbed one
    ratio_vs_reference_fp32: float | None = None


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise SystemExit(
            "jobs.benchmark_model compares against transformers' ViTHybridForImageClassification, which is a test "
            "dependency: pip install 'transformers==4.57.6' (or pip install -e '.[test]')"
        ) from error
    return transformers


def _same_padding_grid(image_size: int, stride_two_ops: int) -> int:
    """Feature-grid side after ``stride_two_ops`` stride-2 ops with TF "SAME" padding (each gives ceil(x / 2))."""
    for _ in range(stride_two_ops):
        image_size = math.ceil(image_size / 2)
    return image_size


def benchmark_config(image_size: int = 384, quick: bool = False) -> ViTHybridConfig:
    """google/vit-hybrid-base-bit-384's architecture at ``image_size`` (or, with ``quick``, a tiny one).

    The feature grid follows the image size (stem conv, max pool and two strided stages: /16), so both
    implementations run at their native size; no position-embedding interpolation is involved.
    """
    if not quick:
        grid = _same_padding_grid(image_size, 4)
        return vit_base_r50_s16_384_config(image_size=image_size, backbone_featmap_shape=[1, 1024, grid, grid])
    grid = _same_padding_grid(image_size, 3)
    backbone = {
        "layer_type": "bottleneck",
        "global_padding": "same",
        "embedding_dynamic_padding": True,
        "embedding_size": 16,
        "hidden_sizes": [32, 64],
        "depths": [1, 1],
        "num_groups": 4,
        "out_features": ["stage2"],
    }
    return ViTHybridConfig(
        backbone_config=backbone, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=image_size, backbone_featmap_shape=[1, 64, grid, grid], num_labels=10,
    )


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int) -> None:
    """Variance-preserving random weights, norms and biases not at 1/0: logits then differ per image, so top-1
    agreement means something (with transformers' std-0.02 init every image gets the same class)."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=generator))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            std = 1.0 / math.sqrt(module.weight[0].numel())
            module.weight.copy_(std * torch.randn(module.weight.shape, generator=generator))
            if module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        if name.endswith("embeddings") and hasattr(module, "cls_token"):
            module.cls_token.copy_(0.1 * torch.randn(module.cls_token.shape, generator=generator))
            module.position_embeddings.copy_(0.1 * torch.randn(module.position_embeddings.shape, generator=generator))


def random_pixel_values(batch: int, image_size: int, seed: int) -> Tensor:
    """Normalised pixels in [-1, 1]: a per-image colour cast, smooth blobs and noise."""
    generator = torch.Generator().manual_seed(seed)
    cast = torch.rand(batch, 3, 1, 1, generator=generator)
    coarse = torch.rand(batch, 3, max(image_size // 16, 2), max(image_size // 16, 2), generator=generator)
    smooth = nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    noise = torch.rand(batch, 3, image_size, image_size, generator=generator)
    return (0.4 * cast + 0.4 * smooth + 0.2 * noise) * 2.0 - 1.0


def build_reference(config: ViTHybridConfig, state_dict: dict[str, Tensor]) -> nn.Module:
    """transformers' model with our weights. ``no_init_weights`` skips its random init, which in 4.57 also fails
    (it zeroes a ``mask_token`` the classification model does not have)."""
    transformers = _import_transformers()
    from transformers.modeling_utils import no_init_weights

    reference_config = transformers.ViTHybridConfig(**config.to_dict())
    with no_init_weights():
        model = transformers.ViTHybridForImageClassification(reference_config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def flops_per_image(model: nn.Module, pixel_values: Tensor) -> float:
    """FLOPs of one forward (convolutions, matrix products, attention included on any device) per image."""
    from benchmarks.flops import model_flops_per_image

    return model_flops_per_image(model, pixel_values)


def _timed(run: Callable[[], Tensor], device: torch.device) -> tuple[float, Tensor]:
    """Seconds of one call of ``run`` and its output: CUDA events on a GPU (the call is asynchronous there)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        output = run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, output
    started = time.perf_counter()
    output = run()
    return time.perf_counter() - started, output


def run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
    """Run the benchmark; returns settings, per-variant timings, FLOPs and the accuracy comparison as a dict.

    ``settings.threads`` applies for the duration of the run only.
    """
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_benchmark(settings)
    finally:
        torch.set_num_threads(previous_threads)


def _run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
    from model.numerics import numerics_policy

    device = torch.device(settings.device)
    numerics_policy("float32").apply()  # no TF32: float32 on a GPU means float32, as on a CPU
    config = benchmark_config(settings.image_size, settings.quick)
    native = ViTHybridForImageClassification(config)
    randomize_weights(native, settings.seed)
    native.eval()
    reference = build_reference(config, native.state_dict()).to(device)
    native.to(device)
    pixel_values = random_pixel_values(settings.batch_size, settings.image_size, settings.seed + 1).to(device)

    models: dict[str, tuple[str, str, nn.Module]] = {}
    for dtype_name in settings.dtypes:
        dtype = DTYPES[dtype_name]
        for implementation, model in (("native", native), ("reference", reference)):
            variant = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            models[f"{implementation} {dtype_name}"] = (implementation, dtype_name, variant)

    def forward(model: nn.Module) -> Callable[[], Tensor]:
        inputs = pixel_values.to(next(model.parameters()).dtype)
        return lambda: model(inputs).logits

    timings: dict[str, list[float]] = {name: [] for name in models}
    logits: dict[str, Tensor] = {}  # from each variant's last timed run
    with torch.inference_mode():
        for _name, (_, dtype_name, model) in models.items():
            for _ in range(settings.bf16_warmup if dtype_name == "bf16" else settings.warmup):
                forward(model)()
        rounds = max(settings.iterations, settings.bf16_iterations)
        for round_index in range(rounds):
            for name, (_, dtype_name, model) in models.items():
                wanted = settings.bf16_iterations if dtype_name == "bf16" else settings.iterations
                if round_index >= wanted:
                    continue
                seconds, output = _timed(forward(model), device)
                timings[name].append(seconds)
                logits[name] = output.float()
                logger.info("%s round %d: %.3fs", name, round_index + 1, timings[name][-1])

    variants: dict[str, VariantResult] = {}
    for name, (implementation, dtype_name, _) in models.items():
        median = statistics.median(timings[name])
        variants[name] = VariantResult(
            name, implementation, dtype_name, timings[name], median, settings.batch_size / median, min(timings[name])
        )
    if "reference fp32" in variants:
        base = variants["reference fp32"].images_per_s
        for result in variants.values():
            result.ratio_vs_reference_fp32 = result.images_per_s / base

    # Native and reference run back to back in every round: the median of their per-round speed ratios is the
    # figure least disturbed by other work on a shared machine.
    paired_speedup: dict[str, float] = {}
    for dtype_name in settings.dtypes:
        native_times, reference_times = timings[f"native {dtype_name}"], timings[f"reference {dtype_name}"]
        paired_speedup[dtype_name] = statistics.median(
            reference_time / native_time for native_time, reference_time in zip(native_times, reference_times)
        )

    reference_logits = logits.get("reference fp32")
    accuracy: dict[str, dict[str, float]] = {}
    if reference_logits is not None:
        for name, values in logits.items():
            if name == "reference fp32":
                continue
            accuracy[name] = {
                "max_abs_logit_diff_vs_reference_fp32": (values - reference_logits).abs().max().item(),
                "top1_agreement_vs_reference_fp32": (values.argmax(-1) == reference_logits.argmax(-1)).float().mean().item(),
            }
    flops = {
        "native": flops_per_image(native, pixel_values[:1]),
        "reference": flops_per_image(reference, pixel_values[:1]),
    }
    return {
        "settings": asdict(settings),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "variants": {name: asdict(result) for name, result in variants.items()},
        "paired_speedup": paired_speedup,
        "flops_per_image": flops,
        "accuracy": accuracy,
    }


def format_table(results: dict[str, Any]) -> str:
    """The printed report: one row per variant, then FLOPs and accuracy."""
    settings = results["settings"]
    lines = [
        (
            f"{results['device_name']}: batch {settings['batch_size']}, threads {results['torch_threads']}, "
            f"image {settings['image_size']}{' (quick config)' if settings['quick'] else ''}"
        ),
        f"{'variant':<16} {'runs':>4} {'median s':>9} {'best s':>8} {'images/s':>9} {'vs ref fp32':>11}",
    ]
    for name, result in results["variants"].items():
        ratio = result["ratio_vs_reference_fp32"]
        lines.append(
            f"{name:<16} {len(result['seconds']):>4} {result['median_s']:>9.3f} {result['best_s']:>8.3f} "
            f"{result['images_per_s']:>9.3f} "
            f"{(f'{ratio:.3f}x' if ratio is not None else '-'):>11}"
        )
    lines.append(
        "native vs reference, median of per-round speed ratios: "
        + ", ".join(f"{name} {ratio:.3f}x" for name, ratio in results["paired_speedup"].items())
    )
    flops = results["flops_per_image"]
    lines.append(
        f"GFLOPs per image: native {flops['native'] / 1e9:.4g}, reference {flops['reference'] / 1e9:.4g}"
    )
    for name, numbers in results["accuracy"].items():
        lines.append(
            f"{name} vs reference fp32: max |logit diff| {numbers['max_abs_logit_diff_vs_reference_fp32']:.3g}, "
            f"top-1 agreement {numbers['top1_agreement_vs_reference_fp32']:.1%}"
        )
    return "\n".join(lines)


def parse_settings(argv: Sequence[str] | None = None) -> BenchmarkSettings:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark_model", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads; unset: torch's choice")
    parser.add_argument("--iterations", type=int, default=3, help="timed runs per float32 variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per float32 variant first")
    parser.add_argument("--bf16-iterations", type=int, default=1, help="timed runs per bfloat16 variant")
    parser.add_argument("--bf16-warmup", type=int, default=0, help="untimed runs per bfloat16 variant first")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--quick", action="store_true", help="tiny config, one warm-up and one timed run (CI smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where both models run; auto: cuda when torch sees a GPU, else cpu")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    dtypes = tuple(name.strip() for name in args.dtypes.split(",") if name.strip())
    unknown = [name for name in dtypes if name not in DTYPES]
    if unknown or not dtypes:
        parser.error(f"--dtypes: {unknown or 'nothing'} not among {', '.join(DTYPES)}")
    if args.batch_size < 1 or args.iterations < 1:
        parser.error("--batch-size and --iterations must be at least 1")
    if args.quick:
        return BenchmarkSettings(batch_size=min(args.batch_size, 2), threads=args.threads, iterations=1, warmup=1,
                                 bf16_iterations=1, bf16_warmup=1, image_size=min(args.image_size, 32), dtypes=dtypes, quick=True,
                                 seed=args.seed, device=device)
    return BenchmarkSettings(args.batch_size, args.threads, args.iterations, args.warmup, args.bf16_iterations,
                             args.bf16_warmup, args.image_size, dtypes, False, args.seed, device)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; prints the table and returns the results dict (tests read the numbers)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run_benchmark(parse_settings(argv))
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
