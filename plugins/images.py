"""Reading image files for the dataset plugins: listing, decoding, resizing and the messages.

One module owns how a file on disk becomes a uint8 array (EXIF orientation first, every PIL mode
converted to RGB by ``to_rgb``, then a square by ``to_square``), so that the classification
folders and the segmentation readers decode, resize and report bad files the same way, and check
their options (root, domain, fractions, image size, resize) with the same words.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from harness.api import DatasetError, DomainData

__all__ = [
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

#: the colour transparent pixels are composited on (white, as image viewers show them)
BACKGROUND = (255, 255, 255)
#: the colour around an image resized whole (``resize = "pad"``); masks are padded with 255 (void)
PAD_COLOUR = (0, 0, 0)
#: how an image becomes ``image_size x image_size``: the central square of the image with its
#: shorter side resized (the default), or the whole image resized and padded to a square
RESIZE_MODES = ("center-crop", "pad")
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
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
    """The visible files of a class folder and of its sub-folders (recursively: a user's own
    grouping inside a class is still that class), sorted: those with an image extension, and
    the others. A folder reached again through a link is read once."""
    files = sorted(_walk(folder, set()))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def _walk(folder: Path, seen: set[str]) -> list[Path]:
    real = os.path.realpath(folder)
    if real in seen:
        return []
    seen.add(real)
    found = visible_files(folder)
    for name in subfolders(folder):
        found += _walk(folder / name, seen)
    return found


def image_files(folder: Path) -> list[Path]:
    """The visible files of ``folder`` itself with an image extension, sorted."""
    return [p for p in visible_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


# --------------------------------------------------------------------------------------- decoding


def open_rgb(path: Path) -> Image.Image:
    """Fully decode ``path``, turn it upright and convert it to RGB; raises whatever PIL raises."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(upright(im))


def orientation(im: Image.Image) -> Image.Transpose | None:
    """The transpose that EXIF orientation asks of ``im`` (None: none, or unreadable EXIF).

    The table is ``ImageOps.exif_transpose``'s; it is kept here so that a mask can be given its
    image's transpose (``seg_files``)."""
    try:
        tag = im.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - broken EXIF: the pixels are still the image, as stored
        return None
    return _EXIF_TRANSPOSE.get(tag) if isinstance(tag, int) else None


def upright(im: Image.Image, method: Image.Transpose | None = None) -> Image.Image:
    """``im`` with ``method`` (by default its own EXIF orientation) applied, before anything else."""
    method = orientation(im) if method is None else method
    return im if method is None else im.transpose(method)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode PIL opens as an RGB image, faithfully.

    - ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit grayscale): ``v * 255 / 65535`` rounded
      half up, so 0, 32768, 65535 read 0, 128, 255; the whole range, nothing clipped.
    - ``I`` (32-bit integers): the same 16-bit scale when every value is in 0..65535 (what a
      16-bit file decoded as ``I`` holds); otherwise the image's own minimum..maximum stretched to
      0..255 (there is no standard range beyond 16 bits).
    - ``F`` (float): values in 0..1 times 255, rounded half up; otherwise stretched like ``I``;
      NaN and infinities read 0.
    - ``P``, ``PA``: the palette's colours; a palette entry marked transparent, like any alpha,
      is composited on ``BACKGROUND``.
    - ``LA``, ``La``, ``RGBA``, ``RGBa`` and any image with a ``transparency`` entry: alpha
      composited on ``BACKGROUND`` (white, as viewers show transparent pixels):
      ``(c * a + bg * (255 - a)) / 255`` rounded.
    - ``1``, ``L``, ``RGB``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``: Pillow's own conversion.
    """
    if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        gray = scale_to_uint8(np.asarray(im), im.mode)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if im.mode in _PREMULTIPLIED:
        im = im.convert(_PREMULTIPLIED[im.mode])
    if im.mode in ("LA", "PA", "RGBA") or "transparency" in im.info:
        return Image.fromarray(composite(np.asarray(im.convert("RGBA"))))
    return im.convert("RGB")


def scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """A one-channel ``I;16*``, ``I`` or ``F`` array as uint8, as ``to_rgb`` documents."""
    if mode != "F":
        v = values.astype(np.int64)
        if mode in SIXTEEN_BIT_MODES or (v.size and v.min() >= 0 and v.max() <= 65535):
            return ((v * 255 + 32767) // 65535).astype(np.uint8)
        return _stretch(v.astype(np.float64))
    v = np.where(np.isfinite(values), values, 0.0).astype(np.float64)
    if v.size and v.min() >= 0.0 and v.max() <= 1.0:
        return np.floor(v * 255.0 + 0.5).astype(np.uint8)
    return _stretch(v)


def _stretch(v: np.ndarray) -> np.ndarray:
    """The array's minimum..maximum mapped to 0..255, rounded half up (a flat image reads 0)."""
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.uint8)
    return np.floor((v - lo) * (255.0 / (hi - lo)) + 0.5).clip(0, 255).astype(np.uint8)


def composite(rgba: np.ndarray) -> np.ndarray:
    """An ``(H, W, 4)`` uint8 RGBA array over ``BACKGROUND``: ``(H, W, 3)`` uint8, rounded."""
    c = rgba[:, :, :3].astype(np.int64)
    a = rgba[:, :, 3:].astype(np.int64)
    bg = np.asarray(BACKGROUND, dtype=np.int64)
    return ((c * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def open_index_image(path: Path) -> tuple[str, Image.Image | None, Image.Transpose | None]:
    """Fully decode a mask: its PIL mode, the mask as an index image (None if colour), and the
    transpose its own EXIF orientation asks for (applied by the caller, see ``seg_files``)."""
    with Image.open(path) as im:
        im.load()
        return im.mode, _index_image(im), orientation(im)


def _index_image(im: Image.Image) -> Image.Image | None:
    """The mask as a single-channel index image (L, P or I), or None for colour masks."""
    if im.mode not in INDEX_MODES:
        return None
    if im.mode == "1":
        return Image.fromarray(np.asarray(im).astype(np.uint8))
    if im.mode.startswith("I"):
        return im.convert("I") if im.mode != "I" else im.copy()
    return im.copy()


def read_image(
    path: Path, *, image_size: int, resize: str = "center-crop"
) -> tuple[np.ndarray | None, str | None]:
    """Fully decode one image to uint8 ``(S, S, 3)``, or return why it cannot be read."""
    try:
        rgb = open_rgb(path)
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the file unreadable
        return None, decode_failure(path, exc)
    return np.asarray(to_square(rgb, image_size, Image.Resampling.BILINEAR, resize)), None


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


def to_square(
    im: Image.Image, size: int, resample: Image.Resampling, resize: str, fill: Any = PAD_COLOUR
) -> Image.Image:
    """``im`` as ``size x size`` by ``resize`` (one of ``RESIZE_MODES``); the same geometry for any
    ``resample``, so an image and its mask stay aligned (a mask is padded with ``fill`` = 255)."""
    if resize == "pad":
        return resize_pad(im, size, resample, fill)
    return resize_center_crop(im, size, resample)


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


def resize_pad(im: Image.Image, size: int, resample: Image.Resampling, fill: Any) -> Image.Image:
    """Resize the longer side to ``size`` (the whole image kept, aspect ratio too), then centre it
    on a ``size x size`` square of ``fill``."""
    w, h = im.size
    scale = size / max(w, h)
    nw, nh = min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    if (nw, nh) == (size, size):
        return im
    square = Image.new(im.mode, (size, size), fill)
    square.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return square


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
