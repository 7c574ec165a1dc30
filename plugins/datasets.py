"""Built-in datasets: scikit-learn's digits, an MNIST-M style ``digits-m``, and image folders.

``digits`` and ``digits-m`` share images, labels and order, so for the same seed they split into
the same indices: a source/target pair with a large, real domain shift and no download.
``folder`` reads a user's own domains laid out as ``root/<domain>/<class>/<image>`` (images in
sub-folders of a class folder are of that class), every file accounted for.
"""

from __future__ import annotations

import functools
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harness import hookimpl
from harness.api import DatasetError, DomainData, ImageFiles, Option, Register
from harness_plugins.images import (
    IMAGE_EXTENSIONS,
    RESIZE_MODES,
    check_options,
    check_resize,
    class_files,
    dataset_root,
    domain_folder,
    left_out_message,
    loose_files_message,
    no_domain,
    split_fractions,
    subfolders,
    visible_files,
)
from harness_plugins.photos import photo_crops

__all__ = [
    "FOLDER_OPTIONS",
    "RESIZE_OPTION",
    "build_digits",
    "build_digits_m",
    "build_folder",
    "register_datasets",
    "root_option",
    "split_options",
]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
FOLDER_LAYOUT = "root/<domain>/<class>/<image>"
#: how an image becomes a square (``images.RESIZE_MODES``), for ``folder`` and ``segfolder``
RESIZE_OPTION = Option(
    choices=RESIZE_MODES,
    default="center-crop",
    help="center-crop keeps the central square, pad the whole image on a padded square",
)


def root_option(layout: str) -> Option:
    """The required ``root`` of a dataset read from disk, laid out as ``layout``."""
    return Option(str, help=f"the folder laid out as {layout}")


def split_options() -> dict[str, Option]:
    """``val_fraction`` and ``test_fraction``: each in (0, 1), their sum too (checked when built)."""
    return {
        f"{split}_fraction": Option(
            float, gt=0, lt=1, default=0.2, help=f"share of the images for {split} (val + test < 1)"
        )
        for split in ("val", "test")
    }


FOLDER_OPTIONS = {
    "root": root_option(FOLDER_LAYOUT),
    **split_options(),
    "skip_bad_files": Option(
        bool, default=False, help="leave unreadable images out with a warning instead of stopping"
    ),
    "resize": RESIZE_OPTION,
}


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``digits``, ``digits-m`` and ``folder``."""
    register(
        "digits",
        build_digits,
        description="scikit-learn's 1797 handwritten 8x8 digits, upsampled, white on black",
        tasks=("classification",),
        options={},
    )
    register(
        "digits-m",
        build_digits_m,
        description="the same digits blended with crops of real photos (MNIST-M recipe)",
        tasks=("classification",),
        options={
            "photo_seed": Option(int, min=0, default=1234, help="picks each digit's photo crop")
        },
    )
    register(
        "folder",
        build_folder,
        description="your own domains laid out as root/<domain>/<class>/<image>",
        tasks=("classification",),
        options=FOLDER_OPTIONS,
    )


# --------------------------------------------------------------------------------------- digits


def build_digits(domain: str | None, *, image_size: int, seed: int) -> DomainData:
    """scikit-learn's digits as uint8 ``(1797, 3, image_size, image_size)`` images."""
    no_domain("digits", domain)
    x = _digit_strokes(image_size).repeat(1, 3, 1, 1)
    return DomainData.from_arrays(
        "digits", x, _digit_labels(), class_names=DIGIT_CLASSES, seed=seed, meta={"hflip": False}
    )


def build_digits_m(
    domain: str | None, *, image_size: int, seed: int, photo_seed: int = 1234
) -> DomainData:
    """The digits blended with random crops of real photographs: ``|crop - stroke|``.

    ``photo_seed`` picks the photo and crop of every digit; ``seed`` only picks the splits, which
    are the same as those of ``digits`` for the same seed.
    """
    no_domain("digits-m", domain)
    strokes = _digit_strokes(image_size)
    crops = photo_crops(len(strokes), image_size, photo_seed)
    x = (crops.to(torch.int16) - strokes.to(torch.int16)).abs().to(torch.uint8)
    return DomainData.from_arrays(
        "digits-m", x, _digit_labels(), class_names=DIGIT_CLASSES, seed=seed, meta={"hflip": False}
    )


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def _digit_labels() -> Tensor:
    return torch.from_numpy(_digits_raw()[1].copy())


@functools.lru_cache(maxsize=4)
def _digit_strokes(image_size: int) -> Tensor:
    """Digit intensities 0..255 as uint8 ``(N, 1, S, S)``, upsampled bilinearly (cached)."""
    if image_size < 8:
        raise DatasetError(f"digits need image_size >= 8, got {image_size}")
    images = torch.from_numpy(_digits_raw()[0]).unsqueeze(1) * (255.0 / 16.0)
    up = F.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    )
    return up.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------- folder


def build_folder(
    domain: str | None,
    *,
    image_size: int,
    seed: int,
    root: str,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    skip_bad_files: bool = False,
    resize: str = "center-crop",
) -> ImageFiles:
    """One domain of ``root/<domain>/<class>/<image>``, as files for the harness to decode once
    into its decoded-image cache (at the study's stored size) and map.

    Every file under the domain is accounted for. An image in a class folder, or in any folder
    below it, is of that class; class names are compared in Unicode NFC form (macOS writes NFD).
    Files at the domain's top level (in no class folder) and files without an image extension
    are left out and named, each kind in one warning; hidden files (``.DS_Store``) are skipped.
    An unreadable image stops the run before training, every bad file listed, unless
    ``skip_bad_files`` is set: then they are listed in a warning and left out.

    Each image is turned upright by its EXIF orientation and converted to RGB
    (``harness.data.decode.to_rgb``), then ``resize = "center-crop"`` resizes its shorter side and
    keeps the central square, ``"pad"`` resizes the whole image to fit and pads it to a square."""
    check_options(image_size)
    check_resize(resize)
    fractions = split_fractions("folder", val_fraction, test_fraction)
    root_path = dataset_root(root, "dataset", FOLDER_LAYOUT)
    available = subfolders(root_path)
    listing = ", ".join(available) if available else "none (root has no sub-folders)"
    domain_dir = domain_folder("folder", root_path, domain, listing)
    class_names, paths, labels, left_out = _folder_images(domain_dir)
    if loose := visible_files(domain_dir):
        warnings.warn(loose_files_message(domain_dir, loose), stacklevel=2)
    if left_out:
        warnings.warn(left_out_message(domain_dir, left_out), stacklevel=2)
    return ImageFiles(
        name=str(domain),
        class_names=class_names,
        paths=paths,
        labels=labels,
        fractions=fractions,
        resize=resize,
        skip_bad_files=skip_bad_files,
        meta={"hflip": True, "root": str(root_path)},
    )


def _folder_images(domain_dir: Path) -> tuple[list[str], list[Path], list[int], list[Path]]:
    """The class names of a domain folder (NFC), its image paths with their labels, and the files
    left out for want of an image extension; a DatasetError if a class folder holds no image."""
    folders = _class_folders(domain_dir)
    if not folders:
        raise DatasetError(
            f"domain folder {domain_dir} has no class folders",
            hint="lay images out as root/<domain>/<class>/<image>",
        )
    paths: list[Path] = []
    labels: list[int] = []
    left_out: list[Path] = []
    for label, folder in enumerate(folders.values()):
        files, others = class_files(domain_dir / folder)
        left_out += others
        if not files:
            raise DatasetError(
                f"class folder {domain_dir / folder} holds no images "
                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
                hint="remove the empty class folder or add images to it",
            )
        paths += files
        labels += [label] * len(files)
    return list(folders), paths, labels, left_out


def _class_folders(domain_dir: Path) -> dict[str, str]:
    """Each class name (the folder's name in Unicode NFC form), sorted, with its folder's name; a
    DatasetError if two folders are one name written two ways."""
    folders: dict[str, list[str]] = {}
    for name in subfolders(domain_dir):
        folders.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    twice = [names for names in folders.values() if len(names) > 1]
    if twice:
        raise DatasetError(
            f"domain folder {domain_dir}: class folders {', '.join(map(repr, twice[0]))} are one "
            "name written in two Unicode forms",
            hint="merge them into one folder",
        )
    return {cls: folders[cls][0] for cls in sorted(folders)}
