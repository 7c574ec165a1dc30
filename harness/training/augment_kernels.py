"""Kernels shared by the preset augmentation (:mod:`harness.training.augment`) and the searched
policies (:mod:`harness.training.augment_policies`): colour-space constants, cached device
constants, and the affine resampling of a batch with its masks."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RGB_TO_YIQ", "YIQ_TO_RGB", "affine_grid", "constant", "sample_affine", "sample_grid"]

# Luma row of RGB -> YIQ; the I and Q rows each sum to zero, so a grey pixel has I = Q = 0.
RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)
# Inverted once on the CPU: linalg.inv on CUDA would synchronise to check for singularity.
YIQ_TO_RGB = tuple(
    tuple(row) for row in torch.linalg.inv(torch.tensor(RGB_TO_YIQ, dtype=torch.float64)).tolist()
)


@lru_cache(maxsize=64)
def constant(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A cached constant: a blocking host-to-device copy on every call would stall CUDA."""
    return torch.tensor(values, device=device, dtype=dtype)


def affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """``F.affine_grid(theta, (N, C, H, W), align_corners=False)`` written as two broadcast
    multiply-adds per output coordinate. Torch's version multiplies an ``(N, H*W, 3)`` base grid
    by ``theta`` in a batched matmul whose inner size of 3 runs about 4x slower on the CPU. The sums
    run in the same order, so the coordinates are the same floats (``tests/test_augment.py``)."""
    n = theta.shape[0]

    def steps(k: int) -> Tensor:  # pixel centres in normalized units, as torch's base grid has them
        return torch.linspace(-1, 1, k, device=theta.device, dtype=theta.dtype) * (k - 1) / k

    xs, ys = steps(width).view(1, 1, width), steps(height).view(1, height, 1)
    t = theta.reshape(n, 6, 1, 1)
    grid = torch.empty(n, height, width, 2, device=theta.device, dtype=theta.dtype)
    # x = (t00 x + t01 y) + t02, y = (t10 x + t11 y) + t12, summed in torch's order
    for k in (0, 1):
        torch.add(t[:, 3 * k] * xs, t[:, 3 * k + 1] * ys, out=grid[..., k]).add_(t[:, 3 * k + 2])
    return grid


def sample_affine(
    x: Tensor, mask: Tensor | None, theta: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor | None]:
    """Resample ``x`` (bilinear, zeros outside) and ``mask`` (nearest, ``ignore_index`` outside)
    through the per-image ``(N, 2, 3)`` output-to-input matrices ``theta``."""
    h, w = x.shape[-2:]
    return sample_grid(x, mask, affine_grid(theta, h, w), ignore_index)


def sample_grid(
    x: Tensor, mask: Tensor | None, grid: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor | None]:
    """:func:`sample_affine` through a sampling ``grid`` ``(N, H, W, 2)`` already computed."""
    # Half-precision grids quantize coordinates, and the CPU bf16/fp16 kernel of grid_sample
    # returns NaN/inf for some pixels (seen with torch 2.14), so those dtypes sample in float32.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = F.grid_sample(
        work, grid.to(work.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    out = out.to(x.dtype)
    if mask is not None:
        # Shift by one so that zero padding marks pixels that came from outside the image.
        shifted = (mask + 1).to(torch.float32).unsqueeze(1)
        sampled = F.grid_sample(
            shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        sampled = sampled.squeeze(1).to(mask.dtype) - 1
        mask = torch.where(sampled < 0, torch.full_like(sampled, ignore_index), sampled)
    return out, mask
