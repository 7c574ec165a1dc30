"""Reading image files for the dataset plugins: listing, decoding, resizing and the messages.

How a file on disk becomes a uint8 array is ``harness.api.images``' (re-exported here), so
that the classification folders and the segmentation readers decode, resize and report bad files
the same way, and check their options (root, domain, fractions, image size, resize) with the same
words.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from harness.api import DataNotFoundError, DatasetError, DomainData
from harness.api.images import (
    BACKGROUND,
    IMAGE_EXTENSIONS,
    INDEX_MODES,
    PAD_COLOUR,
    RESIZE_MODES,
    SIXTEEN_BIT_MODES,
    composite,
    decode_failure,
    open_index_image,
    open_rgb,
    orientation,
    read_image,
    resize_center_crop,
    resize_pad,
    scale_to_uint8,
    to_rgb,
    to_square,
    upright,
)

__all__ = [
    "INDEX_MODES",
    "BACKGROUND",
    "BAD_FILES_HINT",
    "IMAGE_EXTENSIONS",
    "PAD_COLOUR",
    "RESIZE_MODES",
    "SIXTEEN_BIT_MODES",
    "bad_files_message",
    "check_options",
    "check_resize",
    "class_files",
    "composite",
    "dataset_root",
    "decode_failure",
    "decode_in_order",
    "domain_folder",
    "image_files",
    "left_out_message",
    "loose_files_message",
    "no_domain",
    "open_index_image",
    "open_rgb",
    "orientation",
    "read_image",
    "require_dirs",
    "require_nonempty_splits",
    "resize_center_crop",
    "resize_pad",
    "scale_to_uint8",
    "split_fractions",
    "subfolders",
    "to_rgb",
    "to_square",
    "upright",
    "visible_files",
]

DECODE_THREADS = 4
BAD_FILES_HINT = (
    "delete or re-export these files, or set skip_bad_files = true in the dataset to leave them out"
)

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------------------- listing


def subfolders(path: Path) -> list[str]:
    """The names of the visible sub-folders of ``path``, sorted."""
    return _scan(path)[1]


def visible_files(folder: Path) -> list[Path]:
    """The files of ``folder``, sorted, hidden ones (``.DS_Store``) skipped."""
    return _scan(folder)[0]


def _scan(folder: Path) -> tuple[list[Path], list[str]]:
    """The visible files (sorted paths) and sub-folders (sorted names) of ``folder``, from one
    read of the directory (what ``os.scandir`` knows without a ``stat`` per entry where it can:
    a folder of 100,000 images is listed in a fraction of a second)."""
    files: list[str] = []
    dirs: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
    return [folder / name for name in sorted(files)], sorted(dirs)


def class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible files of a class folder and of its sub-folders (recursively: a user's own
    grouping inside a class is still that class), sorted: those with an image extension, and
    the others. A folder reached again through a link is read once."""
    files = _walk(folder, set())
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def _walk(folder: Path, seen: set[str]) -> list[Path]:
    """The visible files under ``folder`` in ``Path`` order (a sub-folder's files where its name
    sorts among the files), built in order instead of sorted afterwards."""
    real = os.path.realpath(folder)
    if real in seen:
        return []
    seen.add(real)
    files, dirs = _scan(folder)
    entries = sorted([(p.name, p) for p in files] + [(name, None) for name in dirs])
    found: list[Path] = []
    for name, path in entries:
        found += [path] if path is not None else _walk(folder / name, seen)
    return found


def image_files(folder: Path) -> list[Path]:
    """The visible files of ``folder`` itself with an image extension, sorted."""
    return [p for p in visible_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


# --------------------------------------------------------------------------------------- decoding


def decode_in_order(decode: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``decode`` over ``items`` with a small thread pool (PIL releases the GIL), in order."""
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
        return list(pool.map(decode, items))


# --------------------------------------------------------------------------------------- messages


def bad_files_message(domain_dir: Path, bad: Sequence[tuple[Path, str]]) -> str:
    """Every bad file, one per line with why it cannot be read."""
    lines = [f"{len(bad)} unreadable image file(s) in domain folder {domain_dir}:"]
    lines += [f"  {path}: {reason}" for path, reason in bad]
    return "\n".join(lines)


def left_out_message(domain_dir: Path, files: Sequence[Path]) -> str:
    """Every file left out for want of an image extension, one per line."""
    lines = [
        f"{len(files)} file(s) without an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
        f"left out of domain folder {domain_dir}:"
    ]
    lines += [f"  {path}" for path in files]
    return "\n".join(lines)


def loose_files_message(domain_dir: Path, files: Sequence[Path]) -> str:
    """Every file at a domain folder's top level (in no class folder), one per line."""
    lines = [
        f"{len(files)} file(s) in domain folder {domain_dir} but in no class folder left out "
        "(an image's class is the name of the folder under the domain that holds it):"
    ]
    lines += [f"  {path}" for path in files]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- options


def no_domain(name: str, domain: str | None) -> None:
    """Refuse ``name/<domain>`` for a dataset that has no sub-domains."""
    if domain is not None:
        raise DatasetError(
            f"dataset {name!r} has no sub-domains, got {name}/{domain}",
            hint=f"name it as plain {name!r}",
        )


def check_options(image_size: int, max_images: int | None = None) -> None:
    """Refuse a non-positive ``image_size`` or ``max_images``."""
    if image_size < 1:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    if max_images is not None and max_images < 1:
        raise DatasetError(f"max_images must be positive, got {max_images}")


def check_resize(resize: str) -> str:
    """``resize`` itself, or a DatasetError naming the allowed values."""
    if resize not in RESIZE_MODES:
        raise DatasetError(
            f"resize must be one of {', '.join(map(repr, RESIZE_MODES))}, got {resize!r}",
            hint='"center-crop" keeps the central square, "pad" the whole image on a padded square',
        )
    return resize


def split_fractions(
    name: str, val_fraction: float, test_fraction: float
) -> tuple[float, float, float]:
    """The train, val and test fractions, or a DatasetError unless all three are positive."""
    train_fraction = 1.0 - val_fraction - test_fraction
    if val_fraction <= 0 or test_fraction <= 0 or train_fraction <= 0:
        raise DatasetError(
            f"{name} splits need 0 < val_fraction, test_fraction and val + test < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    return train_fraction, val_fraction, test_fraction


def dataset_root(root: str, what: str, layout: str, option: str = "root") -> Path:
    """``root`` as a folder, ``$VAR``/``${VAR}`` and ``~`` expanded (``$HARNESS_DATA/office31``),
    or a DatasetError: an unset variable is named with the ``option`` that used it, a missing
    folder is shown with the ``layout`` expected there."""
    unset = [m.group(1) or m.group(2) for m in re.finditer(r"\$(?:\{(\w+)\}|(\w+))", root)]
    unset = [name for name in unset if name not in os.environ]
    if unset:
        raise DataNotFoundError(
            f"{what} option {option} = {root!r}: environment variable ${unset[0]} is not set",
            hint=f"export {unset[0]}=<folder>, or set {option} to the folder itself",
        )
    path = Path(os.path.expandvars(root)).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(
            f"{what} root not found: {path}", hint=f"set root to a folder laid out as {layout}"
        )
    return path


def require_dirs(dirs: Sequence[Path], layout: str) -> None:
    """Refuse, naming every missing one, unless all of ``dirs`` are folders."""
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise DatasetError(
            f"folder(s) not found: {', '.join(missing)}", hint=f"lay the data out as {layout}"
        )


def domain_folder(dataset: str, root_path: Path, domain: str | None, listing: str) -> Path:
    """``root/<domain>``, or a DatasetError that lists the domains there are."""
    if domain is None:
        raise DatasetError(
            f"dataset {dataset!r} needs a domain (a sub-folder of {root_path}); available: {listing}",
            hint=f"name the domain as {dataset}/<domain> or via a dataset alias",
        )
    domain_dir = root_path / domain
    if domain in ("", ".", "..") or not domain_dir.is_dir():
        raise DatasetError(
            f"domain folder not found: {domain_dir}; available domains: {listing}",
            hint="the domain is the name of a sub-folder of root",
        )
    return domain_dir


def require_nonempty_splits(data: DomainData, where: str | Path, n_images: int) -> DomainData:
    """``data`` itself, or a DatasetError when the fractions leave a split without images."""
    for split_name in ("train", "val", "test"):
        if len(getattr(data, split_name)) == 0:
            raise DatasetError(
                f"{where}: {n_images} images leave the {split_name} split empty",
                hint="add images, or change val_fraction / test_fraction",
            )
    return data
