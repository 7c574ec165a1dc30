"""The Cityscapes reader: ``leftImg8bit`` images with ``gtFine`` label ids or train ids, its
official train and val splits kept for ``protocol = "standard"``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from harness.api import DatasetError, ImageFiles
from harness_plugins.images import (
    check_options,
    check_resize,
    dataset_root,
    require_dirs,
    split_fractions,
    subfolders,
    visible_files,
)
from harness_plugins.preset_lists import (
    CITYSCAPES_CLASSES,
)
from harness_plugins.seg_files import (
    checked_indices,
    decode_pair_file,
    files_key,
    index_files,
    index_mask,
    label_id_table,
    mapped_ids,
    pair_up,
    raise_problems,
    require_pairs,
    street_classes,
)

CITYSCAPES_LAYOUT = (
    "root/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
    "root/gtFine/<split>/<city>/*_gtFine_labelIds.png"
)

CITYSCAPES_LAYOUT = (
    "root/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
    "root/gtFine/<split>/<city>/*_gtFine_labelIds.png"
)

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_IDS = "_gtFine_labelIds.png"
_TRAIN_IDS = "_gtFine_labelTrainIds.png"


def build_cityscapes(
    domain: str | None,
    *,
    image_size: int,
    seed: int,
    root: str,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_images: int | None = None,
    classes: int = 19,
    resize: str = "center-crop",
) -> ImageFiles:
    """Cityscapes ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`` (train ids 0..18 and 255,
    checked) or ``..._gtFine_labelIds.png`` (mapped to the 19 train ids); with ``classes`` = 16
    / 13, SYNTHIA's shared subsets (indices in subset order, the other classes void).

    ``domain`` names one split folder (``train``, ``val``); without it train and val are pooled.
    Either way the images are split again by ``seed`` and the fractions; ``max_images`` keeps the
    first N (split, city, stem) in sorted order.
    """
    check_options(image_size, max_images)
    check_resize(resize)
    fractions = split_fractions("cityscapes", val_fraction, test_fraction)
    names, train_lut = street_classes(classes)
    root_path = dataset_root(root, "cityscapes", CITYSCAPES_LAYOUT)
    img_root, gt_root = root_path / "leftImg8bit", root_path / "gtFine"
    require_dirs((img_root, gt_root), CITYSCAPES_LAYOUT)
    image_paths, gt_paths = _cityscapes_files(
        img_root, gt_root, _cityscapes_splits(img_root, domain)
    )
    images, problems = index_files(image_paths, _key(_IMAGE_SUFFIX), "image")
    # prefer labelTrainIds over labelIds where both exist
    train_ids, _ = index_files(gt_paths, _key(_TRAIN_IDS), "label")
    label_ids, _ = index_files(gt_paths, _key(_LABEL_IDS), "label")

    def expected(k: tuple[str, str, str]) -> Path:
        return gt_root / k[0] / k[1] / f"{k[2]}{_LABEL_IDS}"

    _, pairs, more = pair_up(images, {**label_ids, **train_ids}, expected, max_images)
    raise_problems(root_path, problems + more)
    require_pairs(pairs, root_path)
    decode = functools.partial(_decode_cityscapes, pairs, label_id_table(train_lut), train_lut)
    meta = {"hflip": True, "root": str(root_path), "classes": classes}
    if domain is None:
        meta |= _official_lists(img_root, [image for image, _ in pairs])
    return ImageFiles(
        name="cityscapes" if domain is None else f"cityscapes/{domain}",
        class_names=names,
        paths=[image for image, _ in pairs],
        fractions=fractions,
        resize=resize,
        key=files_key(["cityscapes", classes], [m for _, m in pairs]),
        meta=meta,
        task="segmentation",
        decode=functools.partial(decode, resize),
    )


def _official_lists(img_root: Path, images: list[Path]) -> dict[str, dict[str, list[int]]]:
    """``{"lists": ...}``: the positions of the train and val images, which ``protocol =
    "standard"`` uses as the unlabelled training images and the test images; nothing without
    both splits."""
    folders = [image.relative_to(img_root).parts[0] for image in images]
    if not {"train", "val"} <= set(folders):
        return {}
    train = [i for i, f in enumerate(folders) if f == "train"]
    return {"lists": {"train": train, "test": [i for i, f in enumerate(folders) if f == "val"]}}


def _decode_cityscapes(
    pairs: list[tuple[Path, Path]],
    label_lut: np.ndarray,
    train_lut: np.ndarray,
    resize: str,
    i: int,
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Pair ``i`` at ``size``: a ``labelTrainIds`` mask checked (0..18, 255) and mapped by
    ``train_lut``, a ``labelIds`` mask mapped by ``label_lut``."""
    if pairs[i][1].name.endswith(_TRAIN_IDS):
        convert = functools.partial(checked_indices, len(CITYSCAPES_CLASSES), train_lut)
    else:
        convert = functools.partial(mapped_ids, label_lut)
    return decode_pair_file(pairs, functools.partial(index_mask, convert), resize, i, size)


def _cityscapes_splits(img_root: Path, domain: str | None) -> list[str]:
    """The split folders to read: ``domain``, or train and val (those there are) without one."""
    available = subfolders(img_root)
    if domain is None:
        splits = [s for s in ("train", "val") if s in available]
        if not splits:
            raise DatasetError(
                f"{img_root} has neither a train nor a val folder; found: {', '.join(available) or 'none'}",
                hint=f"lay the data out as {CITYSCAPES_LAYOUT}",
            )
        return splits
    if domain in available:
        return [domain]
    raise DatasetError(
        f"cityscapes split folder not found: {img_root / domain}; available: "
        f"{', '.join(available) or 'none'}",
        hint="name a split folder (cityscapes/train, cityscapes/val) or none to pool train and val",
    )


def _cityscapes_files(
    img_root: Path, gt_root: Path, splits: list[str]
) -> tuple[list[Path], list[Path]]:
    """The image files and the label files (either kind) of every city of ``splits``."""
    image_paths: list[Path] = []
    gt_paths: list[Path] = []
    for split in splits:
        for city_dir in _city_dirs(img_root / split):
            image_paths += [p for p in visible_files(city_dir) if p.name.endswith(_IMAGE_SUFFIX)]
        for city_dir in _city_dirs(gt_root / split):
            gt_paths += [
                p for p in visible_files(city_dir) if p.name.endswith((_LABEL_IDS, _TRAIN_IDS))
            ]
    return image_paths, gt_paths


def _city_dirs(split_dir: Path) -> list[Path]:
    return [split_dir / c for c in subfolders(split_dir)] if split_dir.is_dir() else []


def _key(suffix: str) -> Callable[[Path], tuple[str, str, str] | None]:
    """Key a Cityscapes file by (split, city, stem) when its name ends with ``suffix``."""

    def key(path: Path) -> tuple[str, str, str] | None:
        if not path.name.endswith(suffix):
            return None
        return path.parent.parent.name, path.parent.name, path.name[: -len(suffix)]

    return key
