"""Batched, vectorized data augmentation on a whole ``(N, C, H, W)`` batch, on its own device.

Every random parameter is drawn per image, and nothing loops over samples in Python, so one call
costs a handful of kernels whatever the batch size. The pipeline, in this fixed order:

1. Geometry: rotation, translation, zoom, x-shear and horizontal flip are composed into one
   affine matrix per image and applied with a single ``affine_grid`` + ``grid_sample``
   (bilinear for the image, nearest for the mask). Pixels coming from outside the image are
   zeros in the image (``padding_mode="zeros"``, which keeps them consistent with the mask) and
   ``ignore_index`` in the mask. A policy whose only geometric op is the flip uses
   ``torch.flip`` instead, which is exact and cheaper.
2. Colour: brightness, contrast, saturation, hue (a rotation in YIQ space), grayscale and
   invert are all affine in the pixel values, so they are fused into one per-image colour
   matrix and offset, applied in a single pass. Unlike torchvision's ``ColorJitter`` there is
   no clamping between these ops, only once at the end.
3. Blur (3x3 gaussian, separable), gaussian noise, cutout (one zeroed square of a quarter of
   the image's side), then a clamp to ``[0, 1]``.

Only the geometric ops touch the mask. There are no host-device synchronisations, so on CUDA
the call stays asynchronous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.training.augment_kernels import RGB_TO_YIQ as _RGB_TO_YIQ
from harness.training.augment_kernels import YIQ_TO_RGB as _YIQ_TO_RGB
from harness.training.augment_kernels import affine_grid as _affine_grid  # noqa: F401 - tests
from harness.training.augment_kernels import constant as _constant
from harness.training.augment_kernels import sample_affine
from harness.training.augment_policies import (
    AUGMENT_OPS,
    MAX_MAGNITUDE,
    SearchedPolicy,
    apply_searched,
    check_ops,
    rand_policy,
    randaugment_policy,
    trivialaugment_policy,
)

__all__ = [
    "AUGMENT_OPS",
    "MAX_MAGNITUDE",
    "POLICIES",
    "Policy",
    "SearchedPolicy",
    "augment",
    "check_ops",
    "get_policy",
    "rand_policy",
    "randaugment_policy",
    "trivialaugment_policy",
]

_PROBABILITIES = ("hflip", "grayscale", "invert", "blur", "cutout")


@dataclass(frozen=True)
class Policy:
    """Augmentation magnitudes; ``0`` (or a ``(1, 1)`` scale) disables an op."""

    name: str
    rotate: float = 0.0  # max degrees, uniform in [-rotate, rotate]
    translate: float = 0.0  # max fraction of the size, per axis
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range, uniform
    shear: float = 0.0  # max degrees of x-shear
    hflip: float = 0.0  # probability, only when ``allow_flip=True``
    brightness: float = 0.0  # factor in [1 - b, 1 + b]
    contrast: float = 0.0  # factor in [1 - c, 1 + c]
    saturation: float = 0.0  # factor in [1 - s, 1 + s]
    hue: float = 0.0  # max fraction of a full turn
    grayscale: float = 0.0  # probability
    invert: float = 0.0  # probability
    noise: float = 0.0  # std of additive gaussian noise
    blur: float = 0.0  # probability of a 3x3 gaussian blur
    cutout: float = 0.0  # probability of zeroing one square of side 1/4 of the image

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "scale"):
                continue
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Policy {self.name!r}: {f.name} must be >= 0, got {value}")
            if f.name in _PROBABILITIES and value > 1:
                raise ValueError(f"Policy {self.name!r}: {f.name} is a probability, got {value}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(
                f"Policy {self.name!r}: scale must satisfy 0 < lo <= hi, got {self.scale}"
            )
        for f in ("brightness", "contrast", "saturation"):
            if getattr(self, f) > 1:
                raise ValueError(f"Policy {self.name!r}: {f} must be <= 1 to keep factors >= 0")

    @property
    def has_affine(self) -> bool:
        """Whether a geometric op other than the flip is enabled."""
        return bool(self.rotate or self.translate or self.shear or self.scale != (1.0, 1.0))

    @property
    def has_colour(self) -> bool:
        """Whether an op of the fused colour transform is enabled."""
        return bool(
            self.brightness
            or self.contrast
            or self.saturation
            or self.hue
            or self.grayscale
            or self.invert
        )

    @property
    def changes_beyond_flip(self) -> bool:
        """Whether an op other than the horizontal flip is enabled."""
        return bool(self.has_affine or self.has_colour or self.noise or self.blur or self.cutout)

    @property
    def is_identity(self) -> bool:
        """Whether the policy never changes anything."""
        return not (self.hflip or self.changes_beyond_flip)


POLICIES: dict[str, Policy] = {
    "none": Policy(name="none"),
    "light": Policy(
        name="light",
        rotate=10.0,
        translate=0.1,
        scale=(0.9, 1.1),
        hflip=0.5,
        brightness=0.2,
        contrast=0.2,
    ),
    "strong": Policy(
        name="strong",
        rotate=20.0,
        translate=0.15,
        scale=(0.75, 1.25),
        shear=10.0,
        hflip=0.5,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.05,
        grayscale=0.2,
        invert=0.2,
        noise=0.03,
        blur=0.2,
        cutout=0.3,
    ),
}


def get_policy(name: str) -> Policy | SearchedPolicy:
    """Return the preset called ``name``, or ``randaugment``/``trivialaugment`` with torchvision's
    defaults; ``ValueError`` names the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        if name in ("randaugment", "trivialaugment"):
            return rand_policy(name)
        known = ", ".join([*sorted(POLICIES), "randaugment", "trivialaugment"])
        raise ValueError(f"unknown augmentation policy {name!r}; known policies: {known}") from None


def augment(
    x: Tensor,
    policy: Policy | SearchedPolicy | str,
    *,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    allow_flip: bool = True,
    ignore_index: int = 255,
) -> Tensor | tuple[Tensor, Tensor]:
    """Augment a batch ``x`` of shape ``(N, C, H, W)`` with values in ``[0, 1]``.

    ``generator`` must live on ``x.device`` (``None`` uses torch's global generator). ``mask`` is
    an optional ``(N, H, W)`` integer mask moved jointly with the image; when it is given,
    ``(x, mask)`` is returned. An identity policy returns the inputs themselves. A
    :class:`SearchedPolicy` (RandAugment, TrivialAugment) runs in ``augment_policies``.
    """
    if isinstance(policy, str):
        policy = get_policy(policy)
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    if mask is not None and (mask.dim() != 3 or mask.shape != (x.shape[0], *x.shape[2:])):
        raise ValueError(
            f"mask must have shape (N, H, W) = {(x.shape[0], *x.shape[2:])}, got {tuple(mask.shape)}"
        )
    if isinstance(policy, SearchedPolicy):
        out, mask = apply_searched(
            x,
            policy,
            generator=generator,
            mask=mask,
            allow_flip=allow_flip,
            ignore_index=ignore_index,
        )
        return out if mask is None else (out, mask)
    flip_p = policy.hflip if allow_flip else 0.0
    if not (flip_p or policy.changes_beyond_flip):
        return x if mask is None else (x, mask)

    out = x
    if policy.has_affine:
        out, mask = _affine(out, mask, policy, flip_p, generator, ignore_index)
    elif flip_p:
        out, mask = _flip(out, mask, flip_p, generator)
    if policy.has_colour:
        out = _colour(out, policy, generator)
    if policy.blur:
        out = _blur(out, policy.blur, generator)
    if policy.noise:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out = (
            out.add_(noise, alpha=policy.noise)
            if out is not x
            else torch.add(out, noise, alpha=policy.noise)
        )
    if policy.cutout:
        out = _cutout(out, policy.cutout, generator)
    out = out.clamp(0.0, 1.0) if out is x else out.clamp_(0.0, 1.0)
    return out if mask is None else (out, mask)


def _uniform(
    n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _factor(
    n: int, amount: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Per-image factors uniform in ``[1 - amount, 1 + amount]``; no draw when ``amount`` is 0."""
    if not amount:
        return torch.ones(n, device=device)
    return _uniform(n, 1 - amount, 1 + amount, generator, device)


def _coin(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _affine_theta(
    policy: Policy,
    flip_p: float,
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Per-image ``(N, 2, 3)`` float32 matrices mapping output to input normalized coordinates."""
    angle = torch.deg2rad(_uniform(n, -policy.rotate, policy.rotate, generator, device))
    tx = _uniform(n, -policy.translate, policy.translate, generator, device)
    ty = _uniform(n, -policy.translate, policy.translate, generator, device)
    zoom = _uniform(n, *policy.scale, generator, device)
    shear = torch.tan(torch.deg2rad(_uniform(n, -policy.shear, policy.shear, generator, device)))
    sign = 1.0 - 2.0 * _coin(n, flip_p, generator, device).float()

    # Forward map (pixel units, centred): A = rotate @ shear @ zoom @ flip; grid_sample needs
    # its inverse flip @ zoom^-1 @ shear^-1 @ rotate^-1, written out rather than inverted.
    cos, sin = torch.cos(angle), torch.sin(angle)
    m00 = sign * (cos + shear * sin) / zoom
    m01 = sign * (sin - shear * cos) / zoom
    m10 = -sin / zoom
    m11 = cos / zoom
    # Pixel -> normalized units is diag(2/W, 2/H); conjugating rescales the off-diagonal terms so
    # rotations stay rigid on non-square images.
    linear = torch.stack(
        [
            torch.stack([m00, m01 * height / width], -1),
            torch.stack([m10 * width / height, m11], -1),
        ],
        dim=-2,
    )
    shift = torch.stack([2.0 * tx, 2.0 * ty], dim=-1)  # a fraction f of the size is 2f normalized
    offset = -(linear @ shift.unsqueeze(-1))
    return torch.cat([linear, offset], dim=-1)


def _affine(
    x: Tensor,
    mask: Tensor | None,
    policy: Policy,
    flip_p: float,
    generator: torch.Generator | None,
    ignore_index: int,
) -> tuple[Tensor, Tensor | None]:
    n, c, h, w = x.shape
    theta = _affine_theta(policy, flip_p, n, h, w, generator, x.device)
    return sample_affine(x, mask, theta, ignore_index)


def _flip(
    x: Tensor, mask: Tensor | None, p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor | None]:
    flip = _coin(x.shape[0], p, generator, x.device)
    out = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if mask is not None:
        mask = torch.where(flip.view(-1, 1, 1), mask.flip(-1), mask)
    return out, mask


def _colour(x: Tensor, policy: Policy, generator: torch.Generator | None) -> Tensor:
    """Brightness, contrast, saturation, hue, grayscale and invert as one affine map per image."""
    n, c = x.shape[:2]
    dev = x.device
    bright = _factor(n, policy.brightness, generator, dev)
    contrast = _factor(n, policy.contrast, generator, dev)
    mixes = c == 3 and bool(policy.saturation or policy.hue or policy.grayscale)

    # Contrast blends towards the mean luma of the brightened image, i.e. bright * mean luma.
    offset = torch.zeros(n, device=dev)
    if policy.contrast:
        if c == 3:
            luma = _constant(_RGB_TO_YIQ[0], dev, x.dtype).view(1, 3, 1, 1)
            mean = (x * luma).sum(1).mean((-2, -1), dtype=torch.float32)
        else:
            mean = x.mean((1, 2, 3), dtype=torch.float32)
        offset = (1 - contrast) * bright * mean
    gain = contrast * bright

    matrix = _mixing_matrix(n, policy, gain, generator, dev) if mixes else None
    if policy.invert:
        invert = _coin(n, policy.invert, generator, dev)
        sign = 1.0 - 2.0 * invert.float()
        gain = gain * sign
        offset = offset * sign + invert.float()
        if matrix is not None:
            matrix = matrix * sign.view(-1, 1, 1)

    if matrix is None:
        return torch.addcmul(
            offset.to(x.dtype).view(-1, 1, 1, 1), x, gain.to(x.dtype).view(-1, 1, 1, 1)
        )
    flat = x.reshape(n, c, -1)
    out = torch.baddbmm(offset.to(x.dtype).view(-1, 1, 1), matrix.to(x.dtype), flat)
    return out.view_as(x)


def _mixing_matrix(
    n: int, policy: Policy, gain: Tensor, generator: torch.Generator | None, dev: torch.device
) -> Tensor:
    """Per-image 3x3 colour matrices: saturation and hue in YIQ space, then grayscale, times
    ``gain``."""
    ones = torch.ones(n, device=dev)
    # Saturation scales (I, Q) and hue rotates them; both keep grey (Y, 0, 0) fixed, so the
    # contrast offset, which is grey, passes through unchanged.
    to_yiq = _constant(_RGB_TO_YIQ, dev, torch.float32)
    from_yiq = _constant(_YIQ_TO_RGB, dev, torch.float32)
    sat = _factor(n, policy.saturation, generator, dev)
    zero = torch.zeros(n, device=dev)
    turn = (
        _uniform(n, -policy.hue, policy.hue, generator, dev) * (2 * math.pi) if policy.hue else zero
    )
    cos, sin = sat * torch.cos(turn), sat * torch.sin(turn)
    yiq = torch.stack(
        [
            torch.stack([ones, zero, zero], -1),
            torch.stack([zero, cos, -sin], -1),
            torch.stack([zero, sin, cos], -1),
        ],
        dim=-2,
    )
    matrix = from_yiq @ yiq @ to_yiq
    if policy.grayscale:
        gray = _coin(n, policy.grayscale, generator, dev).view(-1, 1, 1)
        to_gray = _constant(_RGB_TO_YIQ[0], dev, torch.float32).expand(3, 3)
        matrix = torch.where(gray, to_gray @ matrix, matrix)
    matrix = matrix * gain.view(-1, 1, 1)
    return matrix


def _blur(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    # The 3x3 gaussian is separable, [1, 2, 1] / 4 per axis; shifted adds beat a depthwise
    # conv2d by several times on the CPU and cost a few elementwise kernels on the GPU.
    # Replicate padding keeps the borders from darkening.
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = torch.add(padded[..., :-2, :], padded[..., 2:, :]).add_(padded[..., 1:-1, :], alpha=2)
    blurred = torch.add(rows[..., :-2], rows[..., 2:]).add_(rows[..., 1:-1], alpha=2).mul_(1 / 16)
    chosen = _coin(x.shape[0], p, generator, x.device).view(-1, 1, 1, 1)
    return torch.where(chosen, blurred, x)


def _cutout(x: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    n, _, h, w = x.shape
    side_h, side_w = max(1, h // 4), max(1, w // 4)
    dev = x.device
    # The square lies fully inside the image, so every chosen image loses the same area.
    top = torch.randint(0, h - side_h + 1, (n, 1, 1), generator=generator, device=dev)
    left = torch.randint(0, w - side_w + 1, (n, 1, 1), generator=generator, device=dev)
    chosen = _coin(n, p, generator, dev).view(-1, 1, 1)
    rows = torch.arange(h, device=dev).view(1, -1, 1)
    cols = torch.arange(w, device=dev).view(1, 1, -1)
    hole = chosen & (rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w)
    return x.masked_fill(hole.unsqueeze(1), 0.0)
