"""Built-in semantic-segmentation datasets.

``seg-synthetic`` and ``seg-photo`` are two bundled, offline domains with the same five classes
(background, square, disc, triangle, bar): flat-coloured shapes on grey versus shapes cut out of
real photographs on a photo background, with noise and blur. Shape is the cue in both; colour and
texture are the domain gap. ``segfolder`` reads a user's own domains laid out as
``root/<domain>/images/<name>.<ext>`` with ``root/<domain>/masks/<name>.png``; ``gta5`` and
``cityscapes`` read those datasets' on-disk layouts and map them to the 19 Cityscapes train ids
(or SYNTHIA's 16 / 13 of them). Those three return :class:`harness.api.ImageFiles` that the harness
decodes once into its cache (``seg_files`` reads a pair); the shapes are generated in memory.
Masks are ``(N, H, W)`` class indices with 255 for ignored pixels.
"""

from __future__ import annotations

import functools
from pathlib import Path

from harness import hookimpl
from harness.api import IGNORE_INDEX, DatasetError, DomainData, ImageFiles, Option, Register
from harness_plugins.cityscapes import CITYSCAPES_LAYOUT, build_cityscapes
from harness_plugins.datasets import RESIZE_OPTION, root_option, split_options
from harness_plugins.images import (
    check_options,
    check_resize,
    dataset_root,
    domain_folder,
    no_domain,
    require_dirs,
    split_fractions,
    subfolders,
)
from harness_plugins.preset_lists import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_SUBSETS,
)
from harness_plugins.seg_files import (
    checked_indices,
    decode_pair_file,
    files_key,
    index_mask,
    label_id_table,
    largest_index,
    mapped_ids,
    raise_problems,
    read_class_names,
    require_pairs,
    stem_pairs,
    street_classes,
)
from harness_plugins.shapes import SHAPE_CLASSES, shape_domain

__all__ = [
    "CITYSCAPES_CLASSES",
    "LABEL_TO_TRAIN_ID",
    "SHAPE_CLASSES",
    "build_cityscapes",
    "build_gta5",
    "build_seg_photo",
    "build_seg_synthetic",
    "build_segfolder",
    "register_datasets",
    "street_classes",
]

#: Cityscapes label id -> train id (the 19 evaluated classes); every other id is ignored (255)
LABEL_TO_TRAIN_ID: dict[int, int] = {label: t for t, label in enumerate(CITYSCAPES_LABEL_IDS)}

_SEGFOLDER_LAYOUT = "root/<domain>/images/<name>.<ext> and root/<domain>/masks/<name>.png"
_GTA5_LAYOUT = "root/images/<id>.png and root/labels/<id>.png"


def _shape_options(scene_seed: int) -> dict[str, Option]:
    """``n`` and ``scene_seed`` of a shapes domain whose scenes default to ``scene_seed``."""
    return {
        "n": Option(int, min=5, default=400, help="number of scenes (train/val/test need 5)"),
        "scene_seed": Option(int, default=scene_seed, help="fixes the scenes"),
    }


_SEGFOLDER_OPTIONS = {
    "root": root_option(_SEGFOLDER_LAYOUT),
    **split_options(),
    "num_classes": Option(
        int, min=1, max=IGNORE_INDEX, default=None, help="classes if no classes.txt names them"
    ),
    "resize": RESIZE_OPTION,
}


def _street_options(layout: str) -> dict[str, Option]:
    """The options of ``gta5`` and ``cityscapes``: root, split fractions, ``max_images``, the
    class set and ``resize``."""
    return {
        "root": root_option(layout),
        **split_options(),
        "max_images": Option(
            int, min=1, default=None, help="keep the first N images in sorted order (default: all)"
        ),
        "classes": Option(
            int,
            choices=tuple(CITYSCAPES_SUBSETS),
            default=19,
            help="19 Cityscapes classes, or the 16 / 13 that SYNTHIA shares (others void)",
        ),
        "resize": RESIZE_OPTION,
    }


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``seg-synthetic``, ``seg-photo``, ``segfolder``, ``gta5`` and ``cityscapes``."""
    seg = ("segmentation",)
    register(
        "seg-synthetic",
        build_seg_synthetic,
        description="flat-coloured squares, discs, triangles and bars on grey, with masks",
        tasks=seg,
        options=_shape_options(1001),
    )
    register(
        "seg-photo",
        build_seg_photo,
        description="the same shapes cut from real photos on a photo background, noisy and blurred",
        tasks=seg,
        options=_shape_options(2002),
    )
    register(
        "segfolder",
        build_segfolder,
        description="your own domains laid out as root/<domain>/images and root/<domain>/masks",
        tasks=seg,
        options=_SEGFOLDER_OPTIONS,
    )
    register(
        "gta5",
        build_gta5,
        description="GTA5 (root/images, root/labels) mapped to the 19 (16, 13) Cityscapes classes",
        tasks=seg,
        options=_street_options(_GTA5_LAYOUT),
    )
    register(
        "cityscapes",
        build_cityscapes,
        description="Cityscapes fine annotations (leftImg8bit, gtFine), 19 (16, 13) classes",
        tasks=seg,
        domains=("train", "val"),
        options=_street_options(CITYSCAPES_LAYOUT),
    )


# --------------------------------------------------------------------------------------- shapes


def build_seg_synthetic(
    domain: str | None, *, image_size: int, seed: int, n: int = 400, scene_seed: int = 1001
) -> DomainData:
    """``n`` scenes of 1-4 flat-coloured shapes on a light-grey background.

    ``scene_seed`` fixes the scenes; ``seed`` only picks the train/val/test split.
    """
    return shape_domain("seg-synthetic", "synthetic", domain, n, image_size, seed, scene_seed)


def build_seg_photo(
    domain: str | None, *, image_size: int, seed: int, n: int = 400, scene_seed: int = 2002
) -> DomainData:
    """``n`` scenes of 1-4 shapes filled with photo crops on a photo background, noisy, blurred.

    ``scene_seed`` fixes the scenes (other layouts than ``seg-synthetic``'s by default); ``seed``
    only picks the train/val/test split.
    """
    return shape_domain("seg-photo", "photo", domain, n, image_size, seed, scene_seed)


# --------------------------------------------------------------------------------------- segfolder


def build_segfolder(
    domain: str | None,
    *,
    image_size: int,
    seed: int,
    root: str,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    num_classes: int | None = None,
    resize: str = "center-crop",
) -> ImageFiles:
    """One domain of ``root/<domain>/images/<name>.<ext>`` + ``root/<domain>/masks/<name>.png``,
    as files for the harness to decode once into its cache (see ``seg_files``).

    ``resize`` is how an image and its mask become the stored size (``"center-crop"`` or
    ``"pad"``, the mask padded with 255), as for ``folder``; it is recorded as ``meta["resize"]``.

    Class names come from ``root/<domain>/classes.txt`` or ``root/classes.txt`` (one per line);
    otherwise they are ``"0".."K-1"`` with ``K = num_classes`` or 1 + the largest index found in
    this domain's masks (read here for it: give ``classes.txt`` or ``num_classes`` so that domains
    agree and the masks are read once). A mask value outside ``0..K-1`` (and 255) stops the run
    with the mask named.
    """
    check_options(image_size)
    check_resize(resize)
    fractions = split_fractions("segfolder", val_fraction, test_fraction)
    root_path = dataset_root(root, "segfolder", _SEGFOLDER_LAYOUT)
    available = [d for d in subfolders(root_path) if (root_path / d / "images").is_dir()]
    listing = ", ".join(available) if available else "none (no sub-folder holds an images folder)"
    domain_dir = domain_folder("segfolder", root_path, domain, listing)
    images_dir, masks_dir = domain_dir / "images", domain_dir / "masks"
    require_dirs((images_dir, masks_dir), _SEGFOLDER_LAYOUT)
    class_names = _segfolder_class_names(domain_dir, root_path, num_classes)
    pairs, problems = stem_pairs(images_dir, masks_dir, "mask")
    raise_problems(domain_dir, problems)
    require_pairs(pairs, domain_dir)
    k = _class_count(class_names, num_classes, [m for _, m in pairs])
    if k == 0:
        raise DatasetError(
            f"the masks in {masks_dir} hold no class indices (every pixel is {IGNORE_INDEX})",
            hint="add root/classes.txt or set num_classes",
        )
    read_mask = functools.partial(index_mask, functools.partial(checked_indices, k, None))
    return ImageFiles(
        name=str(domain),
        class_names=class_names or [str(i) for i in range(k)],
        paths=[image for image, _ in pairs],
        fractions=fractions,
        resize=resize,
        key=files_key(["segfolder", k], [m for _, m in pairs]),
        meta={"hflip": True, "root": str(root_path)},
        task="segmentation",
        decode=functools.partial(decode_pair_file, pairs, read_mask, resize),
    )


def _segfolder_class_names(
    domain_dir: Path, root_path: Path, num_classes: int | None
) -> list[str] | None:
    """The names in a ``classes.txt``, if any, checked against ``num_classes``."""
    class_names = read_class_names(domain_dir, root_path)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise DatasetError(
            f"num_classes={num_classes} but the class-name file lists {len(class_names)} classes",
            hint="drop num_classes or fix classes.txt",
        )
    if num_classes is not None and not 1 <= num_classes <= IGNORE_INDEX:
        raise DatasetError(f"num_classes must be 1..{IGNORE_INDEX}, got {num_classes}")
    return class_names


def _class_count(class_names: list[str] | None, num_classes: int | None, masks: list[Path]) -> int:
    """The number of classes: named, given, or 1 + the largest index in the masks."""
    if class_names is not None:
        return len(class_names)
    if num_classes is not None:
        return num_classes
    return 1 + largest_index(masks)


# --------------------------------------------------------------------------------------- gta5


def build_gta5(
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
    """GTA5 as ``root/images/<id>.png`` + ``root/labels/<id>.png`` (Cityscapes label ids), mapped
    to the 19 train ids, or with ``classes`` = 16 / 13 to SYNTHIA's shared subsets (indices in
    subset order, the other classes void); ``max_images`` keeps the first N ids in sorted order.
    Papers store GTA5 at ``(1280, 720)``: ``[data] stored_size`` decides."""
    no_domain("gta5", domain)
    check_options(image_size, max_images)
    check_resize(resize)
    fractions = split_fractions("gta5", val_fraction, test_fraction)
    names, train_lut = street_classes(classes)
    root_path = dataset_root(root, "gta5", _GTA5_LAYOUT)
    images_dir, labels_dir = root_path / "images", root_path / "labels"
    require_dirs((images_dir, labels_dir), _GTA5_LAYOUT)
    pairs, problems = stem_pairs(images_dir, labels_dir, "label", max_images)
    raise_problems(root_path, problems)
    require_pairs(pairs, root_path)
    read_mask = functools.partial(
        index_mask, functools.partial(mapped_ids, label_id_table(train_lut))
    )
    return ImageFiles(
        name="gta5",
        class_names=names,
        paths=[image for image, _ in pairs],
        fractions=fractions,
        resize=resize,
        key=files_key(["gta5", classes], [m for _, m in pairs]),
        meta={"hflip": True, "root": str(root_path), "classes": classes},
        task="segmentation",
        decode=functools.partial(decode_pair_file, pairs, read_mask, resize),
    )


# --------------------------------------------------------------------------------------- cityscapes
