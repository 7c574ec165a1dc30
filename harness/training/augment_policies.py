"""Searched augmentation policies: RandAugment and TrivialAugment, batched on the device.

Each image draws its own op in each of ``num_ops`` rounds, uniformly from the policy's op set,
with replacement across rounds (as torchvision's RandAugment). A magnitude in ``[0, 30]`` (the 31
bins of torchvision) maps linearly to each op's strength; signed ops take a random sign per image.
RandAugment uses one magnitude for every image and torchvision's RandAugment ranges;
TrivialAugment draws the magnitude per image, uniform in ``[0, magnitude]`` (30 unless narrowed;
torchvision draws one of the 31 bins), with the wider ranges of torchvision's TrivialAugmentWide.
Translations are shares of the image's size in both: RandAugment's 150/331 as torchvision's, and
for TrivialAugment 32/224, TrivialAugmentWide's 32 pixels at ImageNet's scale (32 absolute pixels
would move a 32 px image out of its frame). Ops torchvision lacks (zoom, hue, blur, noise,
cutout, ...) have ranges of their own, in ``_OPS``.

A round evaluates each *group* of ops once: the geometric ops as one affine per image (one
``grid_sample``, masks moved along, nearest, void where pixels come from outside), the colour ops
that are affine in the pixel values as one colour matrix per image, and every other op on its
own. On the CPU a group runs on the images that chose it; on other devices it runs on the whole
batch and ``torch.where`` keeps the chosen images, which costs more arithmetic but never asks the
device how many images chose it (no synchronisation). Only geometric ops touch masks.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from harness.training import augment_ops as ops_
from harness.training.augment_kernels import RGB_TO_YIQ, YIQ_TO_RGB, constant, sample_grid

__all__ = [
    "AUGMENT_OPS",
    "KINDS",
    "MAX_MAGNITUDE",
    "SearchedPolicy",
    "apply_searched",
    "check_ops",
    "rand_policy",
    "randaugment_policy",
    "trivialaugment_policy",
]

MAX_MAGNITUDE = 30
KINDS = ("randaugment", "trivialaugment")


class _Op(NamedTuple):
    group: str  # "geometric", "colour", "identity", or the op's own kernel
    signed: bool
    standard: float  # strength at magnitude 30, RandAugment
    wide: float  # strength at magnitude 30, TrivialAugment


_OPS: dict[str, _Op] = {
    "identity": _Op("identity", False, 0.0, 0.0),
    "rotate": _Op("geometric", True, 30.0, 135.0),  # degrees
    "shear_x": _Op("geometric", True, 0.3, 0.99),  # shear factor
    "shear_y": _Op("geometric", True, 0.3, 0.99),
    "translate_x": _Op("geometric", True, 150 / 331, 32 / 224),  # share of the size
    "translate_y": _Op("geometric", True, 150 / 331, 32 / 224),
    "zoom": _Op("geometric", True, 0.5, 1.0),  # factor (1 + s) ** (+-1)
    "hflip": _Op("geometric", False, 0.0, 0.0),
    "brightness": _Op("colour", True, 0.9, 0.99),  # factor 1 +- s
    "contrast": _Op("colour", True, 0.9, 0.99),
    "saturation": _Op("colour", True, 0.9, 0.99),  # torchvision's "Color"
    "hue": _Op("colour", True, 0.2, 0.5),  # share of a full turn
    "grayscale": _Op("colour", False, 0.0, 0.0),
    "invert": _Op("colour", False, 0.0, 0.0),
    "solarize": _Op("solarize", False, 1.0, 1.0),  # threshold 1 - s
    "posterize": _Op("posterize", False, 4.0, 6.0),  # bits dropped
    "autocontrast": _Op("autocontrast", False, 0.0, 0.0),
    "equalize": _Op("equalize", False, 0.0, 0.0),
    "sharpness": _Op("sharpness", True, 0.9, 0.99),  # factor 1 +- s
    "blur": _Op("blur", False, 1.0, 2.0),  # gaussian sigma, pixels
    "noise": _Op("noise", False, 0.1, 0.2),  # standard deviation
    "cutout": _Op("cutout", False, 0.5, 0.75),  # side, share of the size
}
#: every op a searched policy can draw, in a fixed order
AUGMENT_OPS: tuple[str, ...] = tuple(_OPS)


def check_ops(names: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the allowed ops (and the closest one) unless ``names`` is a
    non-empty list of distinct known op names."""
    allowed = ", ".join(AUGMENT_OPS)
    if isinstance(names, str):
        raise ValueError(f"ops must be a list of op names, got the string {names!r}")
    names = list(names)
    if not names:
        raise ValueError(f"ops must name at least one op; allowed: {allowed}")
    for name in names:
        if name not in _OPS:
            close = difflib.get_close_matches(str(name), AUGMENT_OPS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown augmentation op {name!r}{hint}; allowed: {allowed}")
        if names.count(name) > 1:
            raise ValueError(f"augmentation op {name!r} is listed twice")


@dataclass(frozen=True)
class SearchedPolicy:
    """A RandAugment or TrivialAugment policy over ``ops``; ``magnitude`` in ``[0, 30]`` is the
    one magnitude of RandAugment, or the top of TrivialAugment's per-image draw."""

    kind: str
    num_ops: int
    magnitude: float
    ops: tuple[str, ...] = AUGMENT_OPS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown policy kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        check_ops(self.ops)
        object.__setattr__(self, "ops", tuple(self.ops))
        top = len(self.ops) if self.kind == "randaugment" else 1
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int):
            raise ValueError(f"num_ops must be an integer in 1..{top}, got {self.num_ops!r}")
        if not 1 <= self.num_ops <= top:
            raise ValueError(f"num_ops must be in 1..{top} for {self.kind}, got {self.num_ops}")
        m = self.magnitude
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0 <= m <= MAX_MAGNITUDE:
            raise ValueError(f"magnitude must be a number in [0, {MAX_MAGNITUDE}], got {m!r}")

    @property
    def name(self) -> str:
        return self.kind

    @property
    def is_identity(self) -> bool:
        """Whether the policy never changes anything."""
        return all(op == "identity" for op in self.ops)


def rand_policy(
    kind: str,
    num_ops: int | None = None,
    magnitude: float | None = None,
    ops: Iterable[str] | None = None,
) -> SearchedPolicy:
    """The policy of ``kind``; unset arguments take torchvision's defaults (RandAugment: 2 ops
    at magnitude 9; TrivialAugment: 1 op, magnitude drawn in [0, 30])."""
    wide = kind == "trivialaugment"
    return SearchedPolicy(
        kind=kind,
        num_ops=(1 if wide else 2) if num_ops is None else num_ops,
        magnitude=(MAX_MAGNITUDE if wide else 9.0) if magnitude is None else magnitude,
        ops=AUGMENT_OPS if ops is None else tuple(ops),
    )


def randaugment_policy(
    num_ops: int = 2, magnitude: float = 9.0, ops: Iterable[str] | None = None
) -> SearchedPolicy:
    """RandAugment: ``num_ops`` rounds, one op each per image, all at ``magnitude``."""
    return rand_policy("randaugment", num_ops, magnitude, ops)


def trivialaugment_policy(
    ops: Iterable[str] | None = None, magnitude: float = MAX_MAGNITUDE
) -> SearchedPolicy:
    """TrivialAugment: one op per image at a magnitude drawn per image in ``[0, magnitude]``."""
    return rand_policy("trivialaugment", 1, magnitude, ops)


class _Draws(NamedTuple):
    """One round's per-image draws as columns of one ``(N, 4)`` tensor, so that sorting and
    slicing them is one op: op index, signed strength of that op, cutout centre (y, x)."""

    data: Tensor

    @property
    def choice(self) -> Tensor:
        return self.data[:, 0].long()

    @property
    def strength(self) -> Tensor:
        return self.data[:, 1]

    @property
    def centre(self) -> Tensor:
        return self.data[:, 2:]

    def take(self, idx: Tensor | slice) -> _Draws:
        return _Draws(self.data[idx] if isinstance(idx, slice) else self.data.index_select(0, idx))


@dataclass(frozen=True)
class _Round:
    ops: tuple[str, ...]
    wide: bool
    generator: torch.Generator | None
    ignore_index: int

    def rows(self, table: str, d: _Draws) -> Tensor:
        """Each image's row of the per-op lookup ``table`` ("geometric", "colour"), ``(N, K)``."""
        return constant(_table(self.ops, table), d.choice.device, torch.float32)[d.choice]


@lru_cache(maxsize=32)
def _table(ops: tuple[str, ...], table: str) -> tuple[tuple[float, ...], ...]:
    if table == "geometric":  # which geometric op each op is (one-hot), hflip last
        return tuple(tuple(float(op == name) for name in _GEOMETRIC) for op in ops)
    return tuple(tuple(float(v) for v in _COLOUR.get(op, (0,) * 7)) for op in ops)


def apply_searched(
    x: Tensor,
    policy: SearchedPolicy,
    *,
    generator: torch.Generator | None,
    mask: Tensor | None,
    allow_flip: bool,
    ignore_index: int,
) -> tuple[Tensor, Tensor | None]:
    """Augment the float batch ``x`` (values in [0, 1]) and its optional ``(N, H, W)`` mask."""
    ops = policy.ops if allow_flip else tuple(op for op in policy.ops if op != "hflip")
    if all(op == "identity" for op in ops) or not len(x):
        return x, mask
    ctx = _Round(ops, policy.kind == "trivialaugment", generator, ignore_index)
    # per op: strength at magnitude 30, and -2 where signed (a coin then flips the sign)
    spec = tuple(
        (_OPS[op].wide if ctx.wide else _OPS[op].standard, -2.0 * _OPS[op].signed) for op in ops
    )
    scale = policy.magnitude / MAX_MAGNITUDE
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n, dev, rounds = x.shape[0], x.device, policy.num_ops
    # every round's draws at once: the op, then magnitude share (TrivialAugment), sign coin and
    # cutout centre per image
    choice = torch.randint(0, len(ops), (rounds, n), generator=generator, device=dev)
    u = torch.rand(rounds, n, 4, generator=generator, device=dev)
    top, flips = constant(spec, dev, torch.float32)[choice].unbind(-1)
    sign = torch.addcmul(torch.ones_like(top), flips, u[..., 1] < 0.5)
    strength = top * sign * (u[..., 0] * scale if ctx.wide else scale)
    draws = torch.stack([choice.float(), strength, u[..., 2], u[..., 3]], dim=-1)
    run = _round_sorted if _sparse(x) else _round_masked
    for r in range(rounds):
        work, mask = run(work, mask, _Draws(draws[r]), ctx)
    return work.to(x.dtype), mask


def _sparse(x: Tensor) -> bool:
    """Whether to run each group on the images that chose it: on the CPU, where there is no
    device to wait for."""
    return x.device.type == "cpu"


@lru_cache(maxsize=32)
def _groups(ops: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The op indices of each group, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        groups.setdefault(_OPS[op].group, []).append(i)
    return {group: tuple(members) for group, members in groups.items()}


@lru_cache(maxsize=32)
def _group_of(ops: tuple[str, ...]) -> tuple[int, ...]:
    """The index in ``_groups(ops)`` of each op's group."""
    names = list(_groups(ops))
    return tuple(names.index(_OPS[op].group) for op in ops)


def _round_sorted(
    x: Tensor, mask: Tensor | None, d: _Draws, ctx: _Round
) -> tuple[Tensor, Tensor | None]:
    """One round on the CPU: images sorted by group, each group run on its own slice."""
    groups = _groups(ctx.ops)
    gid = constant(_group_of(ctx.ops), x.device, torch.long)[d.choice]
    order = torch.argsort(gid, stable=True)
    counts = torch.bincount(gid, minlength=len(groups)).tolist()
    xs, ds = x.index_select(0, order), d.take(order)
    ms = None if mask is None else mask.index_select(0, order)
    pieces, mask_pieces, start = [], [], 0
    for group, count in zip(groups, counts, strict=True):
        span = slice(start, start + count)
        start += count
        if not count:
            continue
        m = None if ms is None else ms[span]
        if group == "identity":
            res, res_mask = xs[span], m
        else:
            res, res_mask = _GROUPS[group](xs[span], m, ds.take(span), ctx)
        pieces.append(res)
        mask_pieces.append(m if res_mask is None else res_mask)
    back = torch.argsort(order)  # where each image went; gathering beats index_copy_ on the CPU
    out = torch.cat(pieces).index_select(0, back)
    if mask is not None:
        mask = torch.cat(mask_pieces).index_select(0, back)
    return out, mask


def _round_masked(
    x: Tensor, mask: Tensor | None, d: _Draws, ctx: _Round
) -> tuple[Tensor, Tensor | None]:
    """One round without asking the device anything: every group on the whole batch, each
    image keeping its own group's result."""
    out, new_mask = x, mask
    for group, members in _groups(ctx.ops).items():
        if group == "identity":
            continue
        chosen = (d.choice.unsqueeze(1) == constant(members, x.device, torch.long)).any(1)
        res, res_mask = _GROUPS[group](x, mask, d, ctx)
        out = torch.where(chosen.view(-1, 1, 1, 1), res, out)
        if res_mask is not None:
            new_mask = torch.where(chosen.view(-1, 1, 1), res_mask, new_mask)
    return out, new_mask


_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "zoom", "hflip")


def _geometric(
    x: Tensor, mask: Tensor | None, d: _Draws, ctx: _Round
) -> tuple[Tensor, Tensor | None]:
    """Rotation, shears, translations, zoom and flip as one affine per image. At most one of them
    is active per image and round, so the inverse map grid_sample needs is the identity plus that
    op's own term: ``theta = identity + features @ basis``, a handful of kernels."""
    h, w = x.shape[-2:]
    ind = ctx.rows("geometric", d)
    amount = ind * d.strength.unsqueeze(1)
    angle = amount[:, 0] * (math.pi / 180)
    top = _OPS["zoom"].wide if ctx.wide else _OPS["zoom"].standard
    shrink = torch.pow(1.0 + top, amount[:, 5] * (-1.0 / top)) - 1.0  # 1 / zoom - 1
    features = torch.stack(
        [torch.cos(angle) - 1.0, torch.sin(angle), *amount[:, 1:5].unbind(1), shrink, ind[:, 6]],
        dim=1,
    )
    basis = constant(_geometric_basis(h, w), x.device, torch.float32)
    identity = constant((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), x.device, torch.float32)
    theta = torch.addmm(identity, features, basis)
    # the sampling grid from pixel centres held as constants: fewer kernels than affine_grid
    xs = constant(_centres(w), x.device, torch.float32)
    ys = constant(_centres(h), x.device, torch.float32).view(h, 1)
    t = theta.view(-1, 6, 1, 1)
    grid = torch.empty(len(x), h, w, 2, device=x.device)
    for k in (0, 1):  # x = t00 x + t01 y + t02, y = t10 x + t11 y + t12
        base = torch.addcmul(t[:, 3 * k + 2], t[:, 3 * k + 1], ys)
        torch.addcmul(base, t[:, 3 * k], xs, out=grid[..., k])
    return sample_grid(x, mask, grid, ctx.ignore_index)


@lru_cache(maxsize=16)
def _centres(k: int) -> tuple[float, ...]:
    """Pixel centres of a side of ``k`` pixels in grid_sample's normalized units."""
    return tuple((2 * i + 1) / k - 1 for i in range(k))


def _geometric_basis(h: int, w: int) -> tuple[tuple[float, ...], ...]:
    """Rows: what each feature adds to (t00, t01, t02, t10, t11, t12), the inverse map in
    normalized units (off-diagonal terms rescaled so rotations stay rigid on non-square images).
    Features: cos - 1, sin, shear x, shear y, translate x, translate y, 1 / zoom - 1, flip."""
    return (
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # inverse rotation [[c, s], [-s, c]]
        (0.0, h / w, 0.0, -w / h, 0.0, 0.0),
        (0.0, -h / w, 0.0, 0.0, 0.0, 0.0),  # inverse shear [[1, -s], [0, 1]]
        (0.0, 0.0, 0.0, -w / h, 0.0, 0.0),
        (0.0, 0.0, -2.0, 0.0, 0.0, 0.0),  # output = input shifted by t (shares of the size)
        (0.0, 0.0, 0.0, 0.0, 0.0, -2.0),
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # inverse zoom
        (-2.0, 0.0, 0.0, 0.0, 0.0, 0.0),  # flip x
    )


# per colour op, columns (a_k, b_k, a_0, b_0, offset, is contrast, is hue): the matrix is
# a * I + b * gray (+ the hue rotation), a = a_k * k + a_0, b = b_k * k + b_0, k = 1 +- strength
_COLOUR = {
    "brightness": (1, 0, 0, 0, 0, 0, 0),
    "contrast": (1, 0, 0, 0, 0, 1, 0),
    "saturation": (1, -1, 0, 1, 0, 0, 0),
    "grayscale": (0, 0, 0, 1, 0, 0, 0),
    "invert": (0, 0, -1, 0, 1, 0, 0),
    "hue": (0, 0, 0, 0, 0, 0, 1),
}


def _colour(x: Tensor, mask: Tensor | None, d: _Draws, ctx: _Round) -> tuple[Tensor, None]:
    """Brightness, contrast, saturation, hue, grayscale and invert as one colour matrix and
    offset per image, each blending as torchvision's op does. The matrix is linear in a few
    per-image features: ``features @ basis`` (identity, gray, and the three terms of a hue
    rotation)."""
    n, c = x.shape[:2]
    k = (1.0 + d.strength).unsqueeze(1)  # the factor of brightness, contrast or saturation
    coef = ctx.rows("colour", d)
    features = coef[:, 0:2] * k + coef[:, 2:4]
    offset, is_contrast, is_hue = coef[:, 4:].unbind(1)
    hue = "hue" in ctx.ops
    if hue:
        turn = d.strength * (2 * math.pi)
        turns = torch.stack([is_hue, is_hue * torch.cos(turn), is_hue * torch.sin(turn)], 1)
        features = torch.cat([features, turns], 1)
    basis = constant(_colour_basis(c)[: 5 if hue else 2], x.device, torch.float32)
    matrix = (features @ basis).view(n, c, c)
    if "contrast" in ctx.ops:
        luma = constant(RGB_TO_YIQ[0], x.device, x.dtype).view(1, 3, 1, 1)
        mean = ((x * luma).sum(1) if c == 3 else x.mean(1)).mean((-2, -1))
        offset = offset + is_contrast * (1.0 - k.squeeze(1)) * mean
    flat = x.reshape(n, c, -1)
    out = torch.baddbmm(offset.to(x.dtype).view(-1, 1, 1), matrix.to(x.dtype), flat)
    return out.view_as(x).clamp_(0.0, 1.0), None


@lru_cache(maxsize=4)
def _colour_basis(c: int) -> tuple[tuple[float, ...], ...]:
    """Flattened ``c x c`` matrices: identity, gray (every row the luma weights) and a hue
    rotation by t, ``from_yiq @ rot(t) @ to_yiq = P0 + cos t * P1 + sin t * P2``."""
    if c != 3:
        return ((1.0,), (1.0,), (1.0,), (0.0,), (0.0,))
    to, back = RGB_TO_YIQ, YIQ_TO_RGB

    def outer(i: int, j: int) -> list[float]:  # back[:, i] outer to[j, :]
        return [back[r][i] * to[j][q] for r in range(3) for q in range(3)]

    eye = tuple(float(r == q) for r in range(3) for q in range(3))
    gray = tuple(to[0][q] for _ in range(3) for q in range(3))
    p1 = tuple(a + b for a, b in zip(outer(1, 1), outer(2, 2), strict=True))
    p2 = tuple(a - b for a, b in zip(outer(2, 1), outer(1, 2), strict=True))
    return (eye, gray, tuple(outer(0, 0)), p1, p2)


def _pixel(kernel: Callable[[Tensor, _Draws, _Round], Tensor]):
    """A group of one op that reads each image's strength (the op's own when it chose it)."""

    def run(x: Tensor, mask: Tensor | None, d: _Draws, ctx: _Round) -> tuple[Tensor, None]:
        return kernel(x, d, ctx), None

    return run


_GROUPS = {
    "geometric": _geometric,
    "colour": _colour,
    "solarize": _pixel(lambda x, d, c: ops_.solarize(x, 1.0 - d.strength)),
    "posterize": _pixel(lambda x, d, c: ops_.posterize(x, 8.0 - torch.round(d.strength))),
    "autocontrast": _pixel(lambda x, d, c: ops_.autocontrast(x)),
    "equalize": _pixel(lambda x, d, c: ops_.equalize(x)),
    "sharpness": _pixel(lambda x, d, c: ops_.sharpness(x, 1.0 + d.strength)),
    "blur": _pixel(lambda x, d, c: ops_.blur(x, d.strength)),
    "noise": _pixel(lambda x, d, c: ops_.noise(x, d.strength, c.generator)),
    "cutout": _pixel(lambda x, d, c: ops_.cutout(x, d.strength, d.centre)),
}
