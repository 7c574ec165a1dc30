"""Image/mask pairs on disk for the segmentation datasets (``segfolder``, ``gta5``, ``cityscapes``).

Files are matched by a key (a stem, or Cityscapes' split, city and stem), decoded in a small thread
pool, and every problem with them (a missing mask, a colour mask, a size mismatch, a class index
out of range, an unreadable file) is collected so that one error lists them all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness.api import IGNORE_INDEX, DatasetError, DomainData
from harness_plugins.images import (
    decode_failure,
    decode_in_order,
    image_files,
    open_index_image,
    orientation,
    require_nonempty_splits,
    to_rgb,
    to_square,
    upright,
    visible_files,
)

__all__ = [
    "PAIR_HINT",
    "DecodedPair",
    "assemble",
    "decode_pairs",
    "decode_stem_pairs",
    "index_files",
    "out_of_range",
    "pair_up",
    "raise_problems",
    "read_class_names",
]

PAIR_HINT = (
    "every image needs a mask of the same size named like it (a PNG of class indices, "
    "255 = ignored); fix, re-export or remove the files listed"
)


@dataclass
class DecodedPair:
    """One image/mask pair, resized: image ``(S, S, 3)`` uint8 and raw mask values ``(S, S)``."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    values: np.ndarray | None = None  # distinct raw mask values at full resolution
    problems: list[str] = field(default_factory=list)


def decode_pair(
    pair: tuple[Path, Path], image_size: int, resize: str = "center-crop"
) -> DecodedPair:
    """Decode and resize one pair, recording what is wrong with it instead of raising.

    The image is turned upright by its EXIF orientation and converted to RGB; the mask keeps its
    class indices exactly and gets the same transpose: its own EXIF orientation if it has one,
    else its image's when it has the image's stored size (it was drawn on the pixels as stored),
    else none (it has the upright size: it was drawn on the image as shown)."""
    image_path, mask_path = pair
    out = DecodedPair()
    try:
        stored, method = _open_image(image_path)
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the file unreadable
        out.problems.append(f"{image_path}: {decode_failure(image_path, exc)}")
        stored, method = None, None
    try:
        mode, mask, own = open_index_image(mask_path)
    except Exception as exc:  # noqa: BLE001
        out.problems.append(f"{mask_path}: {decode_failure(mask_path, exc)}")
        return out
    if mask is None:
        out.problems.append(
            f"{mask_path}: mask must be single-channel class indices (mode L or P), got mode {mode}"
        )
        return out
    if own is None and stored is not None and mask.size == stored.size:
        own = method
    mask = upright(mask, own) if own is not None else mask
    rgb = None if stored is None else to_rgb(upright(stored, method) if method else stored)
    if rgb is not None and mask.size != rgb.size:
        out.problems.append(
            f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} px but its image "
            f"{image_path.name} is {rgb.size[0]}x{rgb.size[1]}"
        )
        return out
    if rgb is not None:
        out.image = np.asarray(to_square(rgb, image_size, Image.Resampling.BILINEAR, resize))
    out.values = np.unique(np.asarray(mask))
    resized = to_square(mask, image_size, Image.Resampling.NEAREST, resize, IGNORE_INDEX)
    out.mask = np.asarray(resized).astype(np.int64)
    return out


def _open_image(path: Path) -> tuple[Image.Image, Image.Transpose | None]:
    """The image as stored (fully decoded) and the transpose its EXIF orientation asks for."""
    with Image.open(path) as im:
        im.load()
        return im.copy(), orientation(im)


def decode_pairs(
    pairs: Sequence[tuple[Path, Path]], image_size: int, resize: str = "center-crop"
) -> list[DecodedPair]:
    """Decode pairs with a small thread pool, in order."""
    decode = functools.partial(decode_pair, image_size=image_size, resize=resize)
    return decode_in_order(decode, pairs)


def decode_stem_pairs(
    images_dir: Path,
    masks_dir: Path,
    what: str,
    image_size: int,
    max_images: int | None = None,
    resize: str = "center-crop",
) -> tuple[list[tuple[Path, Path]], list[DecodedPair], list[str]]:
    """Pair ``images_dir/<stem>.<ext>`` with ``masks_dir/<stem>.png`` (a mask is called ``what``)
    and decode the pairs: the pairs, their decoding, and every problem found so far."""
    images, problems = index_files(image_files(images_dir), lambda p: p.stem, "image")
    masks, more = index_files(visible_files(masks_dir), _png_stem, what)
    problems += more
    _, pairs, more = pair_up(images, masks, lambda k: masks_dir / f"{k}.png", max_images)
    problems += more
    decoded = decode_pairs(pairs, image_size, resize)
    for d in decoded:
        problems += d.problems
    return pairs, decoded, problems


def _png_stem(path: Path) -> str | None:
    return path.stem if path.suffix.lower() == ".png" else None


def index_files(
    paths: Sequence[Path], key: Callable[[Path], Hashable | None], what: str
) -> tuple[dict[Any, Path], list[str]]:
    """Map files by ``key`` (None skips a file); two files with one key are a problem."""
    found: dict[Any, Path] = {}
    problems: list[str] = []
    for path in paths:
        k = key(path)
        if k is None:
            continue
        if k in found:
            problems.append(f"{path}: another {what} has the same name ({found[k].name})")
        else:
            found[k] = path
    return found, problems


def pair_up(
    images: dict[Any, Path],
    masks: dict[Any, Path],
    expected_mask: Callable[[Any], Path],
    max_images: int | None = None,
) -> tuple[list[Any], list[tuple[Path, Path]], list[str]]:
    """Match images and masks by key (the first ``max_images`` sorted keys): keys, pairs, problems."""
    keys = sorted(set(images) | set(masks))
    if max_images is not None:
        keys = keys[:max_images]
    paired, pairs, problems = [], [], []
    for k in keys:
        if k not in masks:
            problems.append(f"{images[k]}: image without a mask (expected {expected_mask(k)})")
        elif k not in images:
            problems.append(f"{masks[k]}: mask without an image")
        else:
            paired.append(k)
            pairs.append((images[k], masks[k]))
    return paired, pairs, problems


def out_of_range(mask_path: Path, values: np.ndarray, num_classes: int) -> str | None:
    """The problem with a mask holding class indices outside ``0..num_classes-1`` (and 255)."""
    bad = values[((values >= num_classes) | (values < 0)) & (values != IGNORE_INDEX)]
    if not len(bad):
        return None
    listed = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return (
        f"{mask_path}: class index {listed} out of range "
        f"({num_classes} classes: 0..{num_classes - 1}, {IGNORE_INDEX} = ignored)"
    )


def raise_problems(where: Path, problems: list[str]) -> None:
    """A DatasetError listing every problem, sorted, if there is any."""
    if not problems:
        return
    problems = sorted(problems)
    lines = [f"{len(problems)} problem(s) with the images and masks in {where}:"]
    lines += [f"  {p}" for p in problems]  # every one: a user fixes them all in one go
    raise DatasetError("\n".join(lines), hint=PAIR_HINT)


def assemble(
    name: str,
    decoded: Sequence[DecodedPair],
    masks: Sequence[np.ndarray],
    *,
    class_names: Sequence[str],
    seed: int,
    fractions: tuple[float, float, float],
    meta: dict[str, Any],
    where: Path,
) -> DomainData:
    """The decoded pairs as a segmentation domain, or a DatasetError if there are none."""
    if not decoded:
        raise DatasetError(f"no image/mask pairs found in {where}", hint=PAIR_HINT)
    x = torch.from_numpy(np.stack([d.image for d in decoded])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack(masks)).to(torch.int64)
    data = DomainData.from_arrays(
        name,
        x,
        y,
        class_names=class_names,
        seed=seed,
        fractions=fractions,
        task="segmentation",
        meta=meta,
    )
    return require_nonempty_splits(data, where, len(x))


def read_class_names(domain_dir: Path, root: Path) -> list[str] | None:
    """Class names from ``<domain>/classes.txt`` or ``root/classes.txt``, if either exists."""
    for path in (domain_dir / "classes.txt", root / "classes.txt"):
        if not path.is_file():
            continue
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read class names from {path}: {exc}") from None
        while lines and not lines[-1]:
            lines.pop()
        empty = [i + 1 for i, line in enumerate(lines) if not line]
        if not lines or empty:
            raise DatasetError(
                f"{path}: empty class name on line(s) {', '.join(map(str, empty)) or '1'}",
                hint="write one class name per line, the name of index 0 first",
            )
        dupes = sorted({n for n in lines if lines.count(n) > 1})
        if dupes:
            raise DatasetError(f"{path}: duplicate class name(s) {', '.join(dupes)}")
        if len(lines) > IGNORE_INDEX:
            raise DatasetError(f"{path}: at most {IGNORE_INDEX} classes, got {len(lines)}")
        return lines
    return None
