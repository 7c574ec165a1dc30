"""Built-in datasets: scikit-learn's digits, an MNIST-M style ``digits-m``, and image folders.

``digits`` and ``digits-m`` share images, labels and order, so for the same seed they split into
the same indices: a source/target pair with a large, real domain shift and no download.
``folder`` reads a user's own domains laid out as ``root/<domain>/<class>/<image>``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from harness import hookimpl
from harness.api import DatasetError, DomainData
from harness.hookspecs import Register

__all__ = ["build_digits", "build_digits_m", "build_folder", "register_datasets"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DIGIT_CLASSES = tuple(str(d) for d in range(10))
#: colour photographs bundled in scikit-image's data directory (read from disk, never fetched)
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
)
_DECODE_THREADS = 4


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``digits``, ``digits-m`` and ``folder``."""
    register(
        "digits",
        build_digits,
        description="scikit-learn's 1797 handwritten 8x8 digits, upsampled, white on black",
        tasks=("classification",),
    )
    register(
        "digits-m",
        build_digits_m,
        description="the same digits blended with crops of real photos (MNIST-M recipe)",
        tasks=("classification",),
    )
    register(
        "folder",
        build_folder,
        description="your own domains laid out as root/<domain>/<class>/<image>",
        tasks=("classification",),
    )


# --------------------------------------------------------------------------------------- digits


def build_digits(domain: str | None, *, image_size: int, seed: int) -> DomainData:
    """scikit-learn's digits as uint8 ``(1797, 3, image_size, image_size)`` images."""
    _no_domain("digits", domain)
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
    _no_domain("digits-m", domain)
    strokes = _digit_strokes(image_size)
    crops = _photo_crops(len(strokes), image_size, photo_seed)
    x = (crops.to(torch.int16) - strokes.to(torch.int16)).abs().to(torch.uint8)
    return DomainData.from_arrays(
        "digits-m", x, _digit_labels(), class_names=DIGIT_CLASSES, seed=seed, meta={"hflip": False}
    )


def _no_domain(name: str, domain: str | None) -> None:
    if domain is not None:
        raise DatasetError(
            f"dataset {name!r} has no sub-domains, got {name}/{domain}",
            hint=f"name it as plain {name!r}",
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


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[Tensor, ...]:
    """Real colour photographs shipped by scikit-learn and scikit-image, as uint8 ``(3, H, W)``."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [
        torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        for img in load_sample_images().images
        if img.ndim == 3 and img.shape[2] == 3
    ]
    data_dir = Path(os.path.dirname(skimage.data.__file__))
    for name in SKIMAGE_PHOTOS:
        path = data_dir / name
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                if im.mode != "RGB":
                    continue
                arr = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError):
            continue
        photos.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
    if not photos:
        raise DatasetError("digits-m found no bundled colour photographs to blend with")
    return tuple(photos)


def _photo_crops(n: int, image_size: int, photo_seed: int) -> Tensor:
    """``n`` seeded random square crops of the photos, resized to ``image_size``: uint8 (n,3,S,S)."""
    photos = _photos()
    rng = np.random.default_rng(photo_seed)
    which = rng.integers(0, len(photos), size=n)
    sizes = rng.integers(image_size, 4 * image_size + 1, size=n)
    tops, lefts = rng.random(n), rng.random(n)
    out = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    for i in range(n):
        photo = photos[which[i]]
        h, w = photo.shape[1:]
        c = int(min(sizes[i], h, w))
        top, left = int(tops[i] * (h - c + 1)), int(lefts[i] * (w - c + 1))
        crop = photo[:, top : top + c, left : left + c].unsqueeze(0).float()
        if c != image_size:
            crop = F.interpolate(
                crop,
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        out[i] = crop[0].round().clamp(0, 255).to(torch.uint8)
    return out


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
) -> DomainData:
    """One domain of ``root/<domain>/<class>/<image>``, resized and center-cropped to a square.

    An unreadable image stops the run before training, every bad file listed, unless
    ``skip_bad_files`` is set: then they are listed in a warning and left out. A file in a class
    folder without an image extension (notes, an image in a format PIL is not asked to read) is
    left out and named in a warning, so that no file is dropped unseen; hidden files are skipped."""
    if image_size < 1:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    train_fraction = 1.0 - val_fraction - test_fraction
    if val_fraction <= 0 or test_fraction <= 0 or train_fraction <= 0:
        raise DatasetError(
            f"folder splits need 0 < val_fraction, test_fraction and val + test < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(
            f"dataset root not found: {root_path}",
            hint="set root to a folder laid out as root/<domain>/<class>/<image>",
        )
    available = _subfolders(root_path)
    listing = ", ".join(available) if available else "none (root has no sub-folders)"
    domain_dir = domain_folder("folder", root_path, domain, listing)
    class_names = _subfolders(domain_dir)
    if not class_names:
        raise DatasetError(
            f"domain folder {domain_dir} has no class folders",
            hint="lay images out as root/<domain>/<class>/<image>",
        )

    paths: list[Path] = []
    labels: list[int] = []
    left_out: list[Path] = []
    for label, cls in enumerate(class_names):
        files, others = _class_files(domain_dir / cls)
        left_out += others
        if not files:
            raise DatasetError(
                f"class folder {domain_dir / cls} holds no images "
                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
                hint="remove the empty class folder or add images to it",
            )
        paths += files
        labels += [label] * len(files)

    if left_out:
        warnings.warn(_left_out_message(domain_dir, left_out), stacklevel=2)
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
        decoded = list(pool.map(functools.partial(_read_image, image_size=image_size), paths))
    bad = [(p, err) for p, (_, err) in zip(paths, decoded, strict=True) if err is not None]
    if bad and not skip_bad_files:
        raise DatasetError(_bad_files_message(domain_dir, bad), hint=_BAD_FILES_HINT)
    if bad:
        warnings.warn(
            _bad_files_message(domain_dir, bad) + "\n(skipped: skip_bad_files = true)", stacklevel=2
        )
        keep = [k for k, (_, err) in enumerate(decoded) if err is None]
        decoded, labels = [decoded[k] for k in keep], [labels[k] for k in keep]
        if not decoded:
            raise DatasetError(
                f"domain folder {domain_dir}: no readable image left", hint=_BAD_FILES_HINT
            )

    x = torch.from_numpy(np.stack([arr for arr, _ in decoded])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels, dtype=torch.int64)
    data = DomainData.from_arrays(
        domain,
        x,
        y,
        class_names=class_names,
        seed=seed,
        fractions=(train_fraction, val_fraction, test_fraction),
        meta={"hflip": True, "root": str(root_path)},
    )
    return require_nonempty_splits(data, f"domain folder {domain_dir}", len(y))


def require_nonempty_splits(data: DomainData, where: str, n_images: int) -> DomainData:
    """``data`` itself, or a DatasetError when the fractions leave a split without images."""
    for split_name in ("train", "val", "test"):
        if len(getattr(data, split_name)) == 0:
            raise DatasetError(
                f"{where}: {n_images} images leave the {split_name} split empty",
                hint="add images, or change val_fraction / test_fraction",
            )
    return data


_BAD_FILES_HINT = (
    "delete or re-export these files, or set skip_bad_files = true in the dataset to leave them out"
)


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible files of a class folder: those with an image extension, and the others."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def _image_files(folder: Path) -> list[Path]:
    return _class_files(folder)[0]


def _read_image(path: Path, *, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """Fully decode one image to uint8 ``(S, S, 3)``, or return why it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the file unreadable
        return None, _decode_failure(path, exc)
    return np.asarray(_resize_center_crop(rgb, image_size)), None


def _decode_failure(path: Path, exc: Exception) -> str:
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


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bilinear), then crop the central square."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _bad_files_message(domain_dir: Path, bad: Sequence[tuple[Path, str]]) -> str:
    """Every bad file, one per line with why it cannot be read."""
    lines = [f"{len(bad)} unreadable image file(s) in domain folder {domain_dir}:"]
    lines += [f"  {path}: {reason}" for path, reason in bad]
    return "\n".join(lines)


def _left_out_message(domain_dir: Path, files: Sequence[Path]) -> str:
    lines = [
        f"{len(files)} file(s) without an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
        f"left out of domain folder {domain_dir}:"
    ]
    lines += [f"  {path}" for path in files]
    return "\n".join(lines)


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
