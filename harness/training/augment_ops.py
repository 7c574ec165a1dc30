"""Per-image pixel kernels of the searched augmentation policies
(:mod:`harness.training.augment_policies`).

Each takes a float batch ``(N, C, H, W)`` in ``[0, 1]`` and per-image strengths of shape ``(N,)``,
returns a new batch in ``[0, 1]``, loops over nothing in Python and never synchronises with the
device. Strengths are already mapped from the policy's magnitude.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.training.augment_kernels import constant

__all__ = [
    "autocontrast",
    "blur",
    "cutout",
    "equalize",
    "noise",
    "posterize",
    "sharpness",
    "solarize",
]


def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert every value at or above the image's threshold."""
    return torch.where(x >= _per_image(threshold), 1.0 - x, x)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` bits of each 8-bit value, as a uint8 image would."""
    step = _per_image(torch.pow(2.0, 8.0 - bits.to(x.dtype)))
    return torch.floor(torch.round(x * 255.0) / step).mul_(step).div_(255.0)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image to span ``[0, 1]``; a flat channel stays as it was."""
    lo, hi = torch.aminmax(x.flatten(2), dim=-1)
    spread = hi > lo
    scale = torch.where(spread, 1.0 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
    lo = torch.where(spread, lo, torch.zeros_like(lo))
    return ((x - lo[..., None, None]) * scale[..., None, None]).clamp_(0.0, 1.0)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalization of each channel of each image over 256 levels: a level maps to the
    share of the channel's pixels at or below it, counted from the lowest level present. A channel
    with a single level stays as it was."""
    n, c, h, w = x.shape
    levels = torch.round(x.reshape(n * c, h * w) * 255.0).clamp_(0, 255).long()
    ones = torch.ones((), device=x.device, dtype=torch.float32).expand(levels.shape)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.float32)
    hist.scatter_add_(1, levels, ones)
    cdf = hist.cumsum(1)
    first = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(1, keepdim=True)
    span = h * w - first
    lut = ((cdf - first) / span.clamp_min(1.0)).clamp_(0.0, 1.0)
    out = torch.where(span > 0, lut.gather(1, levels), x.reshape(n * c, h * w).float())
    return out.to(x.dtype).view_as(x)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with a smoothed copy (3x3 kernel, centre weight 5 of 13, borders kept): a factor
    above 1 sharpens, below 1 softens, as PIL's ``ImageEnhance.Sharpness``."""
    if min(x.shape[-2:]) < 3:
        return x.clone()
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4).div_(13.0)
    return torch.lerp(smooth, x, _per_image(factor).to(x.dtype)).clamp_(0.0, 1.0)


def blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable 3x3 gaussian blur with a per-image ``sigma`` (0 leaves the image as it is);
    replicate padding keeps the borders from darkening."""
    side = _per_image(torch.exp(-0.5 / sigma.square())).to(x.dtype)  # sigma 0: exp(-inf) = 0
    norm = 1.0 / (1.0 + 2.0 * side)
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = torch.addcmul(p[..., 1:-1, :], side, p[..., :-2, :] + p[..., 2:, :]).mul_(norm)
    out = torch.addcmul(rows[..., 1:-1], side, rows[..., :-2] + rows[..., 2:]).mul_(norm)
    return out.clamp_(0.0, 1.0)


def noise(x: Tensor, std: Tensor, generator: torch.Generator | None) -> Tensor:
    """Add gaussian noise of a per-image standard deviation."""
    draw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.addcmul(x, draw, _per_image(std).to(x.dtype)).clamp_(0.0, 1.0)


def cutout(x: Tensor, side: Tensor, centre: Tensor) -> Tensor:
    """Zero one square per image, of ``side`` times the image's size per axis, centred at
    ``centre`` (``(N, 2)`` fractions of the height and width) and clipped at the borders."""
    h, w = x.shape[-2:]
    rows = constant(tuple(i + 0.5 for i in range(h)), x.device, torch.float32).view(1, h, 1)
    cols = constant(tuple(i + 0.5 for i in range(w)), x.device, torch.float32).view(1, 1, w)
    cy, cx = (centre[:, 0] * h).view(-1, 1, 1), (centre[:, 1] * w).view(-1, 1, 1)
    half_h, half_w = (side * h / 2).view(-1, 1, 1), (side * w / 2).view(-1, 1, 1)
    hole = ((rows - cy).abs_() < half_h) & ((cols - cx).abs_() < half_w)
    return x.masked_fill(hole.unsqueeze(1), 0.0)
