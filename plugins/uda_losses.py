"""The losses and schedules of the domain adaptation strategies in ``uda``, as plain functions of
tensors (no model, no plugin): each can be tested and reused on its own."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def ramp(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule ``2 / (1 + exp(-gamma * progress)) - 1``: 0 at the start of training,
    rising smoothly towards 1, the faster the larger ``gamma`` (10 in Ganin et al., 2016)."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


#: adversarial weight schedules: ``ramp`` (DANN's) or ``constant`` (the full weight from step one)
SCHEDULES = ("ramp", "constant")


def adversarial_coefficient(params: dict[str, Any], progress: float) -> float:
    """The gradient-reversal coefficient at ``progress`` (0..1) of training: ``strategy.weight``
    times the schedule named by ``strategy.schedule`` (``ramp`` with ``strategy.gamma``)."""
    weight = float(params.get("strategy.weight", 1.0))
    schedule = params.get("strategy.schedule", "ramp")
    if schedule == "constant":
        return weight
    if schedule == "ramp":
        return weight * ramp(progress, float(params.get("strategy.gamma", 10.0)))
    raise ValueError(f"strategy.schedule must be one of {SCHEDULES}, got {schedule!r}")


def sample_locations(fmap: Tensor, per_image: int) -> Tensor:
    """Feature vectors ``(B, k, C)`` at ``k = min(per_image, h * w)`` distinct random locations of
    each image's map ``(B, C, h, w)`` (all of them, in order, when there are no more than that)."""
    b, c, h, w = fmap.shape
    flat = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
    if h * w <= per_image:
        return flat
    idx = torch.rand(b, h * w, device=fmap.device).argsort(1)[:, :per_image]
    return torch.gather(flat, 1, idx[..., None].expand(-1, -1, c))


def entropy(logits: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) along ``dim``, per element of the other dims."""
    logp = F.log_softmax(logits.float(), dim=dim)
    return -(logp.exp() * logp).sum(dim)


def coral_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """Squared Frobenius distance of the feature covariances, over 4 d^2 (Deep CORAL)."""
    fs, ft = fs.float(), ft.float()
    d = fs.shape[1]

    def cov(f: Tensor) -> Tensor:
        f = f - f.mean(0, keepdim=True)
        return f.T @ f / max(1, f.shape[0] - 1)

    return (cov(fs) - cov(ft)).pow(2).sum() / (4 * d * d)


def mmd_loss(
    fs: Tensor, ft: Tensor, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
) -> Tensor:
    """Biased squared MMD with a sum of Gaussian kernels whose bandwidths are multiples of the
    mean pairwise squared distance (measured on the batch, not differentiated)."""
    f = torch.cat([fs, ft]).float()
    d2 = torch.cdist(f, f).pow(2)
    base = d2.detach().sum() / max(1, f.shape[0] * (f.shape[0] - 1))
    k = sum(torch.exp(-d2 / (base * s + 1e-8)) for s in scales)
    n = fs.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def class_confusion_loss(logits: Tensor, temperature: float) -> Tensor:
    """Minimum class confusion: off-diagonal mass of the entropy-weighted class correlation of
    target predictions, normalized per class."""
    p = F.softmax(logits.float() / temperature, dim=1)
    h = -(p * torch.log(p + 1e-8)).sum(1).detach()
    w = 1.0 + torch.exp(-h)
    w = w * p.shape[0] / w.sum()
    corr = (p * w[:, None]).T @ p
    corr = corr / corr.sum(1, keepdim=True).clamp_min(1e-8)
    c = p.shape[1]
    return (corr.sum() - corr.trace()) / c


def low_frequency_swap(source: Tensor, target: Tensor, beta: float) -> Tensor:
    """Fourier domain adaptation: give ``source`` images (B, C, H, W) the amplitude spectrum of
    ``target`` images in the centred square of half-width ``floor(beta * min(H, W))`` around the
    zero frequency, keeping the source phase everywhere."""
    h, w = source.shape[-2:]
    half = int(math.floor(beta * min(h, w)))
    fs = torch.fft.fftshift(torch.fft.fft2(source.float()), dim=(-2, -1))
    if half < 1:
        return source.float().clone()
    ft = torch.fft.fftshift(torch.fft.fft2(target.float()), dim=(-2, -1))
    amp, phase = fs.abs(), fs.angle()
    cy, cx = h // 2, w // 2
    window = (
        slice(None),
        slice(None),
        slice(cy - half, cy + half + 1),
        slice(cx - half, cx + half + 1),
    )
    amp = amp.clone()
    amp[window] = ft.abs()[window]
    mixed = torch.fft.ifftshift(torch.polar(amp, phase), dim=(-2, -1))
    return torch.fft.ifft2(mixed).real
