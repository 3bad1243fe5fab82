"""The modules Ray imports in decode, writer and finalize workers stay free of torch, and so does the job's driver.

Why it matters: Ray starts a fresh worker process for many of these tasks (an idle worker beyond the node's CPU count
is reaped within a second), and each import of torch costs about a second of CPU. On a 2-core CPU node that second
was taken from the inference actor once per shard: 4 s of CPU per write task, the job's steady state 10% slower.
The driver names the inference actor's class and fingerprints the weights but never computes: torch's import was
1.7 s of CPU on its start-up path, before it even checked its arguments.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The modules that define what the read, write and finalize tasks run, and what the version probe runs.
WORKER_MODULES = ("pipeline.reader", "pipeline.writer", "pipeline.versions", "pipeline.cpu", "model.processing")


@pytest.mark.parametrize("module", WORKER_MODULES)
def test_worker_module_does_not_import_torch(module: str) -> None:
    script = f"import json, sys, {module}; print(json.dumps(sorted(name for name in ('torch', 'ray.data') if name in sys.modules)))"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert json.loads(output) == []


# What ``python -m jobs.classify`` / ``jobs.embed`` import, up to building the Ray Data plan.
DRIVER_MODULES = ("jobs.classify", "jobs.embed", "pipeline.plan", "pipeline.actor", "model.weights")


@pytest.mark.parametrize("module", DRIVER_MODULES)
def test_driver_module_does_not_import_torch(module: str) -> None:
    script = f"import sys, {module}; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"


def test_processor_still_makes_tensors_on_request() -> None:
    """The lazy import is invisible to users: ``return_tensors="pt"`` and the normalizer work as before."""
    import numpy as np
    import torch
    from PIL import Image

    from model import ViTHybridImageProcessor

    processor = ViTHybridImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    crop = processor.to_uint8(Image.fromarray(image))
    normalized = processor.normalizer()(torch.from_numpy(crop[None]))
    assert isinstance(pixel_values, torch.Tensor) and pixel_values.dtype == torch.float32
    assert torch.equal(normalized.contiguous(), pixel_values)
