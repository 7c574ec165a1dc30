"""Domain-generalization datasets built from scikit-learn's digits: no download.

``rotated-digits`` follows DomainBed's RotatedMNIST recipe: the 1,797 digits are shuffled once
with a fixed seed and dealt into six disjoint parts, part ``i`` rotated by the ``i``-th of 0, 15,
30, 45, 60 and 75 degrees. Each digit is drawn in a central box (20/28 of the side, MNIST's
proportion) so that no rotation cuts it. The shift is small and purely geometric: DomainBed's
easiest benchmark, where ERM is known to be hard to beat.

``digit-styles`` has a larger shift, of appearance rather than geometry, dealt the same way into
four disjoint parts: ``plain`` (white strokes on black, as ``digits``), ``photo`` (blended with
crops of real photographs, as ``digits-m``), ``sketch`` (only the edges of the strokes) and
``inverted`` (black strokes on white). Each style changes one thing a network can latch onto
(texture and colour, filled strokes against outlines, polarity) while the shapes stay the same,
as PACS's photo, art, cartoon and sketch domains do for real objects; with leave-one-out, every
held-out style differs from the sources in a way they do not show, which is the question domain
generalization asks.

Both keep each part's images apart from the others' (a digit is in one domain only) and split
every domain into seeded, class-stratified train/val/test parts as ``digits`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from harness import hookimpl
from harness.api import DatasetError, DomainData, Option, Register
from harness_plugins.datasets import (
    DIGIT_CLASSES,
    _digit_labels,
    _digit_strokes,
    split_options,
)
from harness_plugins.images import split_fractions
from harness_plugins.photos import photo_crops

__all__ = [
    "ANGLES",
    "STYLES",
    "build_digit_styles",
    "build_rotated_digits",
    "domain_parts",
    "register_datasets",
]

#: DomainBed's RotatedMNIST angles, in degrees, as the domain names
ANGLES = ("0", "15", "30", "45", "60", "75")
#: the appearance domains of ``digit-styles``
STYLES = ("plain", "photo", "sketch", "inverted")
#: MNIST's digit box: 20 px of a 28 px image
DIGIT_BOX = 20 / 28


def _options() -> dict[str, Option]:
    return {
        "part_seed": Option(
            int, min=0, default=0, help="the shuffle that deals the digits into the domains"
        ),
        **split_options(),
    }


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``rotated-digits`` and ``digit-styles``."""
    register(
        "rotated-digits",
        build_rotated_digits,
        description="the digits dealt into 6 disjoint parts rotated by 0-75 degrees "
        "(DomainBed's RotatedMNIST recipe)",
        tasks=("classification",),
        domains=ANGLES,
        options=_options(),
    )
    register(
        "digit-styles",
        build_digit_styles,
        description="the digits dealt into 4 disjoint parts drawn plain, photo-blended, "
        "as edges (sketch) and inverted",
        tasks=("classification",),
        domains=STYLES,
        options={
            **_options(),
            "photo_seed": Option(int, min=0, default=1234, help="picks each digit's photo crop"),
        },
    )


def domain_parts(n: int, parts: int, part_seed: int) -> list[Tensor]:
    """``range(n)`` shuffled with ``part_seed`` and dealt into ``parts`` disjoint sorted index
    sets (DomainBed's ``images[i::parts]`` after one shuffle)."""
    order = torch.from_numpy(np.random.default_rng(part_seed).permutation(n))
    return [torch.sort(order[i::parts]).values for i in range(parts)]


def _which(dataset: str, domain: str | None, known: Sequence[str]) -> int:
    if domain not in known:
        got = "no domain" if domain is None else f"{dataset}/{domain}"
        raise DatasetError(
            f"{dataset} has domains {', '.join(known)}; got {got}",
            hint=f"name a domain as {dataset}/<domain>",
        )
    return list(known).index(domain)


def _domain(
    dataset: str,
    domain: str | None,
    known: Sequence[str],
    render: Callable[[Tensor, int], Tensor],
    *,
    seed: int,
    part_seed: int,
    val_fraction: float,
    test_fraction: float,
) -> DomainData:
    """Domain ``domain`` of ``dataset``: its part of the digits, drawn by ``render(indices, i)``
    as uint8 ``(n, 3, S, S)``, split seeded and stratified."""
    i = _which(dataset, domain, known)
    fractions = split_fractions(dataset, val_fraction, test_fraction)
    labels = _digit_labels()
    index = domain_parts(len(labels), len(known), part_seed)[i]
    return DomainData.from_arrays(
        f"{dataset}/{domain}",
        render(index, i),
        labels[index],
        class_names=DIGIT_CLASSES,
        seed=seed,
        fractions=fractions,
        meta={"hflip": False, "part_seed": part_seed},
    )


# --------------------------------------------------------------------------------------- rotated


def build_rotated_digits(
    domain: str | None,
    *,
    image_size: int,
    seed: int,
    part_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> DomainData:
    """One angle of ``rotated-digits``: its sixth of the digits, rotated by the angle."""

    def render(index: Tensor, i: int) -> Tensor:
        return rotated(boxed_strokes(image_size)[index], float(ANGLES[i])).repeat(1, 3, 1, 1)

    return _domain(
        "rotated-digits", domain, ANGLES, render, seed=seed, part_seed=part_seed,
        val_fraction=val_fraction, test_fraction=test_fraction,
    )  # fmt: skip


@functools.lru_cache(maxsize=2)
def boxed_strokes(image_size: int) -> Tensor:
    """Every digit as uint8 ``(N, 1, S, S)`` drawn in a central box of ``DIGIT_BOX`` of the side,
    black around it, so that a rotation keeps the whole digit."""
    inner = max(8, round(image_size * DIGIT_BOX))
    if inner > image_size:
        raise DatasetError(f"rotated-digits need image_size >= 8, got {image_size}")
    before = (image_size - inner) // 2
    after = image_size - inner - before
    return F.pad(_digit_strokes(inner), (before, after, before, after))


def rotated(images: Tensor, angle: float) -> Tensor:
    """``images`` rotated counter-clockwise by ``angle`` degrees about their centre (bilinear,
    black fill: torchvision's rotate, as DomainBed does)."""
    if angle == 0:
        return images.clone()
    return TF.rotate(images, angle, interpolation=InterpolationMode.BILINEAR, fill=0)


# --------------------------------------------------------------------------------------- styles


def build_digit_styles(
    domain: str | None,
    *,
    image_size: int,
    seed: int,
    part_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    photo_seed: int = 1234,
) -> DomainData:
    """One style of ``digit-styles``: its quarter of the digits, drawn in that style."""

    def render(index: Tensor, i: int) -> Tensor:
        return styled(STYLES[i], image_size, photo_seed)[index]

    return _domain(
        "digit-styles", domain, STYLES, render, seed=seed, part_seed=part_seed,
        val_fraction=val_fraction, test_fraction=test_fraction,
    )  # fmt: skip


def styled(style: str, image_size: int, photo_seed: int = 1234) -> Tensor:
    """Every digit drawn in ``style`` as uint8 ``(N, 3, S, S)``."""
    strokes = _digit_strokes(image_size)
    if style == "plain":
        return strokes.repeat(1, 3, 1, 1)
    if style == "inverted":
        return (255 - strokes).repeat(1, 3, 1, 1)
    if style == "sketch":
        return edges(strokes).repeat(1, 3, 1, 1)
    if style == "photo":  # digits-m's blend: |crop - stroke|
        crops = photo_crops(len(strokes), image_size, photo_seed)
        return (crops.to(torch.int16) - strokes.to(torch.int16)).abs().to(torch.uint8)
    raise DatasetError(f"digit-styles has styles {', '.join(STYLES)}; got {style!r}")


def edges(strokes: Tensor) -> Tensor:
    """The outlines of uint8 ``(N, 1, S, S)`` strokes: their Sobel gradient magnitude, each image
    scaled so that its strongest edge is white."""
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernels = torch.stack([sobel, sobel.T]).unsqueeze(1)
    grad = F.conv2d(strokes.float(), kernels, padding=1)
    magnitude = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    peak = magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return (255 * magnitude / peak).round().clamp(0, 255).to(torch.uint8)
