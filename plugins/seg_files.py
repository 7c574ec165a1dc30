"""Image/mask pairs on disk for the segmentation datasets (``segfolder``, ``gta5``, ``cityscapes``,
``synthia``).

A factory lists the pairs (matched by a key: a stem, or Cityscapes' split, city and stem) and
stops on every problem it can see without pixels (a missing mask, a mask without an image, two
files with one name), all in one error. It returns :class:`harness.api.ImageFiles` whose
``decode`` (``decode_pair_file``) reads pair ``i`` when the harness fills its decoded-image cache:
the image and its mask turned upright, the mask's values made class indices (checked: a value out
of range raises :class:`MaskError` naming it and the mask), resized to the stored size; the
harness lists every pair that failed, with why.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.api import IGNORE_INDEX, DatasetError
from harness_plugins.images import (
    decode_failure,
    decode_in_order,
    image_files,
    open_index_image,
    orientation,
    to_rgb,
    to_square,
    upright,
    visible_files,
)
from harness_plugins.preset_lists import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_SUBSETS,
)

__all__ = [
    "PAIR_HINT",
    "DecodedPair",
    "MaskError",
    "checked_indices",
    "decode_pair",
    "decode_pair_file",
    "files_key",
    "index_mask",
    "label_id_table",
    "index_files",
    "largest_index",
    "mapped_ids",
    "out_of_range",
    "pair_up",
    "raise_problems",
    "read_class_names",
    "read_pair",
    "require_pairs",
    "stem_pairs",
    "street_classes",
]

PAIR_HINT = (
    "every image needs a mask of the same size named like it (a PNG of class indices, "
    "255 = ignored); fix, re-export or remove the files listed"
)

#: reads a mask file: the mask as class indices (a uint8 ``L`` image, 255 = void) and the
#: transpose its own EXIF orientation asks for (None: none)
MaskReader = Callable[[Path], tuple[Image.Image, Image.Transpose | None]]
#: turns a mask's raw values (at full resolution) into class indices, or raises MaskError
Convert = Callable[[np.ndarray, Path], np.ndarray]


class MaskError(DatasetError):
    """What is wrong with a pair's mask (its message names the mask file)."""


# --------------------------------------------------------------------------------------- decoding


def decode_pair_file(
    pairs: Sequence[tuple[Path, Path]],
    read_mask: MaskReader,
    resize: str,
    i: int,
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """``ImageFiles.decode`` of a segmentation dataset (bind the first three with
    ``functools.partial``): pair ``i`` at ``size = (height, width)``."""
    image_path, mask_path = pairs[i]
    return read_pair(image_path, mask_path, read_mask, size, resize)


def read_pair(
    image_path: Path, mask_path: Path, read_mask: MaskReader, size: tuple[int, int], resize: str
) -> tuple[np.ndarray, np.ndarray]:
    """The image ``(height, width, 3)`` uint8 (bilinear) and its mask ``(height, width)`` uint8
    (nearest, padded with 255) by ``resize``; raises on an unreadable image (the harness names
    it) and :class:`MaskError` on anything wrong with the mask.

    The image is turned upright by its EXIF orientation and converted to RGB; the mask gets the
    same transpose: its own EXIF orientation if it has one, else its image's when it has the
    image's stored size (it was drawn on the pixels as stored), else none (it has the upright
    size: it was drawn on the image as shown)."""
    with Image.open(image_path) as im:
        im.load()
        stored, method = im.copy(), orientation(im)
    try:
        mask, own = read_mask(mask_path)
    except MaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the mask unreadable
        raise MaskError(f"{mask_path}: {decode_failure(mask_path, exc)}") from None
    if own is None and mask.size == stored.size:
        own = method
    mask = upright(mask, own) if own is not None else mask
    rgb = to_rgb(upright(stored, method) if method is not None else stored)
    if mask.size != rgb.size:
        raise MaskError(
            f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} px but its image "
            f"{image_path.name} is {rgb.size[0]}x{rgb.size[1]}"
        )
    wh = (size[1], size[0])
    image = np.asarray(to_square(rgb, wh, Image.Resampling.BILINEAR, resize))
    resized = to_square(mask, wh, Image.Resampling.NEAREST, resize, IGNORE_INDEX)
    return image, np.asarray(resized)


def index_mask(convert: Convert, mask_path: Path) -> tuple[Image.Image, Image.Transpose | None]:
    """A :data:`MaskReader` of single-channel masks (mode L, P, I, 1) whose values ``convert``
    makes class indices."""
    mode, mask, own = open_index_image(mask_path)
    if mask is None:
        raise MaskError(
            f"{mask_path}: mask must be single-channel class indices (mode L or P), got mode {mode}"
        )
    return Image.fromarray(convert(np.asarray(mask), mask_path), mode="L"), own


def checked_indices(
    num_classes: int, lut: np.ndarray | None, values: np.ndarray, mask_path: Path
) -> np.ndarray:
    """Class indices ``0..num_classes-1`` (and 255), as they are or mapped by ``lut``; any other
    value raises :class:`MaskError` naming it."""
    bad = (values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)
    if bad.any():
        raise MaskError(out_of_range(mask_path, np.unique(values[bad]), num_classes))
    values = values.astype(np.uint8)
    return values if lut is None else lut[values]


def mapped_ids(lut: np.ndarray, values: np.ndarray, mask_path: Path) -> np.ndarray:
    """Label ids mapped by ``lut`` (uint8, 255 = void); an id beyond the table is void."""
    if values.dtype == np.uint8 and len(lut) >= 256:
        return lut[values]
    known = (values >= 0) & (values < len(lut))
    return np.where(known, lut[np.clip(values, 0, len(lut) - 1)], IGNORE_INDEX).astype(np.uint8)


def files_key(what: Any, masks: Sequence[Path]) -> str:
    """``ImageFiles.key`` of a segmentation dataset: ``what`` decides the masks' values (the
    options), and the mask files' paths, sizes and modification times (the harness keys the
    images' own)."""
    h = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    for path in masks:
        try:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:24]


def largest_index(masks: Sequence[Path]) -> int:
    """The largest class index (not 255) in the masks, -1 if none; unreadable or colour masks are
    passed over (``decode`` reports them)."""

    def largest(path: Path) -> int:
        try:
            _, mask, _ = open_index_image(path)
        except Exception:  # noqa: BLE001 - reported when the pair is decoded
            return -1
        if mask is None:
            return -1
        values = np.asarray(mask)
        values = values[values != IGNORE_INDEX]
        return int(values.max()) if values.size else -1

    return max(decode_in_order(largest, masks), default=-1)


def street_classes(classes: int) -> tuple[list[str], np.ndarray]:
    """The class names of the 19-, 16- or 13-class benchmark (Cityscapes' names in train-id
    order) and the table train id -> class index (256 entries; 255 = void, as are the train ids
    the subset leaves out)."""
    if classes not in CITYSCAPES_SUBSETS:
        raise DatasetError(
            f"classes must be one of {', '.join(map(str, CITYSCAPES_SUBSETS))}, got {classes}"
        )
    kept = CITYSCAPES_SUBSETS[classes]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(kept)] = np.arange(len(kept), dtype=np.uint8)
    return [CITYSCAPES_CLASSES[t] for t in kept], lut


def label_id_table(train_lut: np.ndarray) -> np.ndarray:
    """The table Cityscapes label id -> class index through ``train_lut`` (256 entries)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(CITYSCAPES_LABEL_IDS)] = train_lut[: len(CITYSCAPES_LABEL_IDS)]
    return lut


@dataclass
class DecodedPair:
    """One image/mask pair decoded by :func:`decode_pair`: image ``(S, S, 3)`` uint8, mask
    ``(S, S)`` int64, or the problems that stopped it."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    problems: list[str] = field(default_factory=list)


def decode_pair(
    pair: tuple[Path, Path], image_size: int, resize: str = "center-crop"
) -> DecodedPair:
    """One pair of class-index masks (0..254) decoded as the datasets' ``decode`` does it, its
    problem recorded instead of raised."""
    image_path, mask_path = pair
    read_mask = functools.partial(
        index_mask, functools.partial(checked_indices, IGNORE_INDEX, None)
    )
    try:
        image, mask = read_pair(image_path, mask_path, read_mask, (image_size, image_size), resize)
    except MaskError as exc:
        return DecodedPair(problems=[str(exc)])
    except Exception as exc:  # noqa: BLE001
        return DecodedPair(problems=[f"{image_path}: {decode_failure(image_path, exc)}"])
    return DecodedPair(image, mask.astype(np.int64))


# --------------------------------------------------------------------------------------- listing
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


def require_pairs(pairs: Sequence[tuple[Path, Path]], where: Path) -> None:
    """Refuse a listing without a single image/mask pair."""
    if not pairs:
        raise DatasetError(f"no image/mask pairs found in {where}", hint=PAIR_HINT)


def stem_pairs(
    images_dir: Path, masks_dir: Path, what: str, max_images: int | None = None
) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``images_dir/<stem>.<ext>`` paired with ``masks_dir/<stem>.png`` (a mask is called
    ``what``), the first ``max_images`` stems in sorted order: the pairs and every problem."""
    images, problems = index_files(image_files(images_dir), lambda p: p.stem, "image")
    masks, more = index_files(visible_files(masks_dir), _png_stem, what)
    _, pairs, more2 = pair_up(images, masks, lambda k: masks_dir / f"{k}.png", max_images)
    return pairs, problems + more + more2


def _png_stem(path: Path) -> str | None:
    return path.stem if path.suffix.lower() == ".png" else None


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
