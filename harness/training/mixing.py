"""MixUp and CutMix for classification batches, with soft targets.

Per batch, with probability ``prob``, images are mixed with their partner in the reversed batch
(image ``i`` with image ``B - 1 - i``, as timm pairs them): MixUp blends whole images by
``lam ~ Beta(alpha, alpha)``; CutMix pastes a box of the partner covering about ``1 - lam`` of
the image and corrects ``lam`` to the share of pixels actually kept. With both alphas above zero
each batch picks one of the two with even odds (timm's switch). The few scalar draws come from a
CPU generator (Beta through numpy, seeded from it), so nothing waits on the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["mix", "soft_targets"]


def soft_targets(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot float targets ``(B, num_classes)`` with label smoothing spread over all classes."""
    # scatter rather than F.one_hot, which checks the label range on the host (a sync on CUDA)
    hot = torch.zeros(len(y), num_classes, device=y.device).scatter_(1, y.unsqueeze(1), 1.0)
    return hot * (1.0 - smoothing) + smoothing / num_classes if smoothing else hot


def _check(y: Tensor, num_classes: int, alphas: tuple[float, float], prob: float, smoothing: float):
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(
            f"MixUp/CutMix take integer class labels of shape (B,), got {y.dtype} "
            f"{tuple(y.shape)}: they are for classification only, not segmentation masks"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, alpha in zip(("mixup_alpha", "cutmix_alpha"), alphas, strict=True):
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {alpha}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator).item())


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    seed = int(torch.randint(0, 2**62, (), generator=generator).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    generator: torch.Generator | None,
    smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Mix the image batch ``x`` ``(B, C, H, W)`` with labels ``y`` ``(B,)``; return the images
    and float soft targets ``(B, num_classes)`` whose rows sum to 1. ``generator`` must be a CPU
    generator (``None``: torch's global one); ``prob = 0`` or both alphas 0 leave the batch as it
    is and draw nothing."""
    _check(y, num_classes, (mixup_alpha, cutmix_alpha), prob, smoothing)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("mix() draws its scalars on the CPU: pass a CPU torch.Generator")
    targets = soft_targets(y, num_classes, smoothing)
    if prob == 0 or not (mixup_alpha > 0 or cutmix_alpha > 0) or _uniform(generator) >= prob:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or _uniform(generator) < 0.5)
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, generator)
    partner = x.flip(0)
    if use_cutmix:
        x, lam = _cutmix(x, partner, lam, generator)
    else:
        x = torch.lerp(partner, x, lam)  # lam * x + (1 - lam) * partner
    return x, torch.lerp(targets.flip(0), targets, lam)


def _cutmix(
    x: Tensor, partner: Tensor, lam: float, generator: torch.Generator | None
) -> tuple[Tensor, float]:
    """Paste one box of ``partner`` into every image; return the images and the kept share."""
    h, w = x.shape[-2:]
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, (), generator=generator).item())
    cx = int(torch.randint(0, w, (), generator=generator).item())
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    out = x.clone()
    out[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return out, 1.0 - (bottom - top) * (right - left) / (h * w)
