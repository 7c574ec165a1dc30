"""Rendering of the ``seg-synthetic`` and ``seg-photo`` scenes: 1-4 shapes per image, with masks.

Both styles draw the same kinds of scene (background, square, disc, triangle, bar) from a seeded
generator; ``synthetic`` paints flat colours on a grey ramp, ``photo`` cuts the shapes and the
background out of real photographs, then blurs and adds noise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harness.api import DatasetError, DomainData
from harness_plugins.images import no_domain
from harness_plugins.photos import photo_crops

__all__ = ["SHAPE_CLASSES", "render_scenes", "shape_domain"]

SHAPE_CLASSES = ("background", "square", "disc", "triangle", "bar")
#: hue (0..1) of each shape class: square red, disc green, triangle blue, bar yellow
_SHAPE_HUES = (0.0, 1 / 3, 2 / 3, 1 / 6)
_MAX_OBJECTS = 4
_RENDER_CHUNK = 32


def shape_domain(
    name: str, style: str, domain: str | None, n: int, image_size: int, seed: int, scene_seed: int
) -> DomainData:
    """``n`` scenes of the given ``style`` as a segmentation domain split by ``seed``."""
    no_domain(name, domain)
    x, masks = render_scenes(style, n, image_size, scene_seed)
    return DomainData.from_arrays(
        name,
        x,
        masks.long(),
        class_names=SHAPE_CLASSES,
        seed=seed,
        task="segmentation",
        meta={"hflip": True},
    )


@dataclass(frozen=True)
class _Scenes:
    """The drawn parameters of ``n`` scenes of up to ``_MAX_OBJECTS`` shapes each."""

    valid: Tensor  # (n, K) bool: which of the K shape slots are drawn
    kind: Tensor  # (n, K) class index 1..4
    centre: Tensor  # (n, K, 2) pixels
    radius: Tensor  # (n, K) pixels
    angle: Tensor  # (n, K) radians
    colour: Tensor  # (n, K, 3) in 0..255
    grey: Tensor  # (n,) background level (synthetic)
    slope: Tensor  # (n,) background ramp strength (synthetic)
    tilt: Tensor  # (n,) background ramp direction (synthetic)
    tint: Tensor  # (n, K) how much of its colour a photo-filled shape takes


def _draw_scenes(n: int, s: int, scene_seed: int) -> _Scenes:
    """Draw every scene's parameters from one generator, in a fixed order."""
    g = torch.Generator().manual_seed(scene_seed)
    count = torch.randint(1, _MAX_OBJECTS + 1, (n,), generator=g)
    valid = torch.arange(_MAX_OBJECTS) < count[:, None]
    kind = torch.randint(1, len(SHAPE_CLASSES), (n, _MAX_OBJECTS), generator=g)
    centre = (0.12 + 0.76 * torch.rand(n, _MAX_OBJECTS, 2, generator=g)) * s
    radius = (0.12 + 0.14 * torch.rand(n, _MAX_OBJECTS, generator=g)) * s
    angle = torch.rand(n, _MAX_OBJECTS, generator=g) * (2 * math.pi)
    hues = (
        torch.tensor(_SHAPE_HUES)[kind - 1]
        + (torch.rand(n, _MAX_OBJECTS, generator=g) - 0.5) * 0.08
    )
    sat = 0.65 + 0.3 * torch.rand(n, _MAX_OBJECTS, generator=g)
    val = 0.55 + 0.4 * torch.rand(n, _MAX_OBJECTS, generator=g)
    colour = _hsv_to_rgb(hues % 1.0, sat, val)  # (n, K, 3) in 0..255
    grey = 150 + 65 * torch.rand(n, generator=g)
    slope = 10 * torch.rand(n, generator=g)
    tilt = torch.rand(n, generator=g) * (2 * math.pi)
    tint = 0.3 * torch.rand(n, _MAX_OBJECTS, generator=g)
    return _Scenes(valid, kind, centre, radius, angle, colour, grey, slope, tilt, tint)


@functools.lru_cache(maxsize=2)
def render_scenes(style: str, n: int, image_size: int, scene_seed: int) -> tuple[Tensor, Tensor]:
    """Draw ``n`` scenes: uint8 images ``(n, 3, S, S)`` and uint8 masks ``(n, S, S)`` (cached)."""
    if image_size < 8:
        raise DatasetError(f"segmentation shapes need image_size >= 8, got {image_size}")
    if n < 5:
        raise DatasetError(f"need n >= 5 scenes to fill train/val/test, got n={n}")
    s = image_size
    scenes = _draw_scenes(n, s, scene_seed)
    coords = (torch.arange(s, dtype=torch.float32) + 0.5).expand(s, s)
    xs, ys = coords, coords.T
    images = torch.empty((n, 3, s, s), dtype=torch.uint8)
    masks = torch.empty((n, s, s), dtype=torch.uint8)
    for start in range(0, n, _RENDER_CHUNK):
        part = slice(start, min(n, start + _RENDER_CHUNK))
        images[part], masks[part] = _render_chunk(style, scenes, part, scene_seed, xs, ys)
    return images, masks


def _render_chunk(
    style: str, sc: _Scenes, part: slice, scene_seed: int, xs: Tensor, ys: Tensor
) -> tuple[Tensor, Tensor]:
    """The scenes ``part`` of ``sc``: uint8 images ``(m, 3, S, S)`` and masks ``(m, S, S)``."""
    canvas, textures = _backdrop(style, sc, part, scene_seed, xs, ys)
    canvas = canvas.clone()
    m, s = part.stop - part.start, xs.shape[0]
    label = torch.zeros((m, s, s), dtype=torch.uint8)
    kind, valid = sc.kind[part], sc.valid[part]
    centre, radius, angle = sc.centre[part], sc.radius[part], sc.angle[part]
    for j in range(_MAX_OBJECTS):
        inside = _shape_masks(kind[:, j], centre[:, j], radius[:, j], angle[:, j], xs, ys)
        inside &= valid[:, j][:, None, None]
        canvas = torch.where(inside[:, None], textures[:, j], canvas)
        label = torch.where(inside, kind[:, j].to(torch.uint8)[:, None, None], label)
    if style == "photo":
        canvas = _blur(canvas)
        noise_g = torch.Generator().manual_seed(scene_seed * 7919 + part.start)
        canvas = canvas + 6.0 * torch.randn(canvas.shape, generator=noise_g)
    return canvas.round().clamp(0, 255).to(torch.uint8), label


def _backdrop(
    style: str, sc: _Scenes, part: slice, scene_seed: int, xs: Tensor, ys: Tensor
) -> tuple[Tensor, Tensor]:
    """The background ``(m, 3, S, S)`` and the shape fills ``(m, K, 3, S, S)`` of a chunk."""
    m, s = part.stop - part.start, xs.shape[0]
    if style == "synthetic":
        xn, yn = xs / s * 2 - 1, ys / s * 2 - 1
        tilt = sc.tilt[part]
        ramp = torch.cos(tilt)[:, None, None] * xn + torch.sin(tilt)[:, None, None] * yn
        canvas = (sc.grey[part][:, None, None] + sc.slope[part][:, None, None] * ramp)[
            :, None
        ].expand(m, 3, s, s)
        return canvas, sc.colour[part][..., None, None].expand(m, _MAX_OBJECTS, 3, s, s)
    chunk_seed = int(np.random.SeedSequence([scene_seed, part.start]).generate_state(1)[0])
    crops = photo_crops(m * (1 + _MAX_OBJECTS), s, chunk_seed).float()
    crops = crops.view(m, 1 + _MAX_OBJECTS, 3, s, s)
    a = sc.tint[part][..., None, None, None]
    return crops[:, 0], (1 - a) * crops[:, 1:] + a * sc.colour[part][..., None, None]


def _shape_masks(
    kind: Tensor, centre: Tensor, radius: Tensor, angle: Tensor, xs: Tensor, ys: Tensor
) -> Tensor:
    """Boolean ``(m, S, S)``: which pixels fall inside each image's shape of the given kind."""
    dx = xs - centre[:, 0, None, None]
    dy = ys - centre[:, 1, None, None]
    c, s_ = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c * dx + s_ * dy, -s_ * dx + c * dy
    r = radius[:, None, None]
    square = torch.maximum(u.abs(), v.abs()) <= 0.85 * r
    disc = u * u + v * v <= r * r
    # equilateral triangle with circumradius 1.5 r: inside all three edges at distance 0.75 r
    half = math.sqrt(3) / 2
    triangle = (
        (v <= 0.75 * r) & (-half * u - 0.5 * v <= 0.75 * r) & (half * u - 0.5 * v <= 0.75 * r)
    )
    bar = (u.abs() <= 1.7 * r) & (v.abs() <= 0.4 * r)
    k = kind[:, None, None]
    return torch.where(
        k == 1, square, torch.where(k == 2, disc, torch.where(k == 3, triangle, bar))
    )


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV in [0, 1] to RGB in [0, 255], with a trailing channel dimension."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return (v[..., None] - v[..., None] * s[..., None] * ramp) * 255


def _blur(x: Tensor) -> Tensor:
    """A slight 3x3 Gaussian blur of float images ``(m, 3, S, S)``."""
    k1 = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
