"""The device half of the image processor: rescale and normalise stacked uint8 crops into the model's input.

Why a module of its own: it is the only part of preprocessing that needs torch. :mod:`model.processing` (the CPU
half) stays importable without torch, so a decode or writer worker, which never touches a tensor, does not pay
torch's second of import in every fresh Ray worker process.
"""

from __future__ import annotations

import numpy as np
import torch


class PixelNormalizer(torch.nn.Module):
    """Rescale + normalise a uint8 ``(N, H, W, 3)`` batch into ``(N, 3, H, W)`` floats in channels-last memory.

    The work is one gather from a ``3 x 256`` table (see :meth:`model.processing._Settings.lookup_table`): bit-identical to the
    reference in float32 and a single memory-bound kernel on the GPU. The result is a ``permute`` of the gathered
    ``(N, H, W, 3)`` tensor, which is exactly channels-last memory, so no copy is made for the conv stem.
    Other dtypes (bfloat16, float16) are the float32 values rounded once.
    """

    table: torch.Tensor
    channel_offsets: torch.Tensor
    index_elements = 1 << 24  # subpixels indexed per step: bounds the int64 index buffer to 128 MiB

    def __init__(
        self, table: np.ndarray, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if table.shape != (3, 256):
            raise ValueError(f"table must have shape (3, 256), got {table.shape}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        flat = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32).reshape(-1))
        self.register_buffer("table", flat.to(device=device, dtype=dtype), persistent=False)
        offsets = torch.tensor([0, 256, 512], dtype=torch.int64, device=device)
        self.register_buffer("channel_offsets", offsets, persistent=False)

    def forward(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                f"expected a uint8 batch of shape (N, H, W, 3) as stacked from to_uint8, got {pixels.dtype} "
                f"{tuple(pixels.shape)}"
            )
        table = self.table.to(pixels.device)
        offsets = self.channel_offsets.to(pixels.device)
        values = torch.empty(pixels.shape, dtype=table.dtype, device=pixels.device)
        flat_values = values.view(pixels.shape[0], -1)
        # int64 indices are 8 bytes per subpixel (0.9 GB for 256 images of 384x384): build them a slice at a time.
        step = max(1, self.index_elements // max(1, pixels[0].numel()))
        for start in range(0, pixels.shape[0], step):
            index = pixels[start : start + step].to(torch.int64)  # the index type every backend gathers with
            index += offsets
            torch.index_select(table, 0, index.view(-1), out=flat_values[start : start + step].view(-1))
        return values.permute(0, 3, 1, 2)
