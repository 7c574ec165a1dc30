"""Reading image files for the dataset plugins: listing, decoding, resizing and the messages.

One module owns how a file on disk becomes a uint8 array, so that the classification folders and
the segmentation readers decode, resize and report bad files the same way, and check their
options (root, domain, fractions, image size) with the same words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.api import DatasetError, DomainData

__all__ = [
    "BAD_FILES_HINT",
    "IMAGE_EXTENSIONS",
    "bad_files_message",
    "check_options",
    "class_files",
    "dataset_root",
    "decode_failure",
    "decode_in_order",
    "domain_folder",
    "image_files",
    "left_out_message",
    "no_domain",
    "open_index_image",
    "open_rgb",
    "read_image",
    "require_dirs",
    "require_nonempty_splits",
    "resize_center_crop",
    "split_fractions",
    "subfolders",
    "visible_files",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
#: PIL modes read as class indices (a mask); any other mode is a colour image
INDEX_MODES = frozenset({"L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "1"})
DECODE_THREADS = 4
BAD_FILES_HINT = (
    "delete or re-export these files, or set skip_bad_files = true in the dataset to leave them out"
)

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------------------- listing


def subfolders(path: Path) -> list[str]:
    """The names of the visible sub-folders of ``path``, sorted."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def visible_files(folder: Path) -> list[Path]:
    """The files of ``folder``, sorted, hidden ones (``.DS_Store``) skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible files of a class folder: those with an image extension, and the others."""
    files = visible_files(folder)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def image_files(folder: Path) -> list[Path]:
    """The visible files of ``folder`` with an image extension, sorted."""
    return class_files(folder)[0]


# --------------------------------------------------------------------------------------- decoding


def open_rgb(path: Path) -> Image.Image:
    """Fully decode ``path`` and convert it to RGB; raises whatever PIL raises."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def open_index_image(path: Path) -> tuple[str, Image.Image | None]:
    """Fully decode a mask: its PIL mode, and the mask as an index image (None if colour)."""
    with Image.open(path) as im:
        im.load()
        return im.mode, _index_image(im)


def _index_image(im: Image.Image) -> Image.Image | None:
    """The mask as a single-channel index image (L, P or I), or None for colour masks."""
    if im.mode not in INDEX_MODES:
        return None
    if im.mode == "1":
        return Image.fromarray(np.asarray(im).astype(np.uint8))
    if im.mode.startswith("I"):
        return im.convert("I") if im.mode != "I" else im.copy()
    return im.copy()


def read_image(path: Path, *, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """Fully decode one image to uint8 ``(S, S, 3)``, or return why it cannot be read."""
    try:
        rgb = open_rgb(path)
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the file unreadable
        return None, decode_failure(path, exc)
    return np.asarray(resize_center_crop(rgb, image_size, Image.Resampling.BILINEAR)), None


def decode_failure(path: Path, exc: Exception) -> str:
    """A short reason for a file that failed to decode, without repeating its path."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        pass
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (unknown or corrupt format)"
    text = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip()
    text = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resize_center_crop(im: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to ``size``, then crop the central square (same geometry for any
    ``resample``, so an image and its mask stay aligned)."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


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


def dataset_root(root: str, what: str, layout: str) -> Path:
    """``root`` as a folder (``~`` expanded), or a DatasetError that shows the ``layout``."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
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
