"""Built-in semantic-segmentation datasets.

``seg-synthetic`` and ``seg-photo`` are two bundled, offline domains with the same five classes
(background, square, disc, triangle, bar): flat-coloured shapes on grey versus shapes cut out of
real photographs on a photo background, with noise and blur. Shape is the cue in both; colour and
texture are the domain gap. ``segfolder`` reads a user's own domains laid out as
``root/<domain>/images/<name>.<ext>`` with ``root/<domain>/masks/<name>.png``; ``gta5`` and
``cityscapes`` read those datasets' on-disk layouts and map them to the 19 Cityscapes train ids.
Masks are int64 ``(N, H, W)`` with 255 for ignored pixels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from harness import hookimpl
from harness.api import IGNORE_INDEX, DatasetError, DomainData
from harness.hookspecs import Register
from harness_plugins.datasets import (
    _DECODE_THREADS,
    _decode_failure,
    _image_files,
    _no_domain,
    _photo_crops,
    _subfolders,
    domain_folder,
    require_nonempty_splits,
)

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
]

SHAPE_CLASSES = ("background", "square", "disc", "triangle", "bar")
#: hue (0..1) of each shape class: square red, disc green, triangle blue, bar yellow
_SHAPE_HUES = (0.0, 1 / 3, 2 / 3, 1 / 6)
_MAX_OBJECTS = 4
_RENDER_CHUNK = 32

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
#: Cityscapes label id -> train id (the 19 evaluated classes); every other id is ignored (255)
LABEL_TO_TRAIN_ID: dict[int, int] = {
    label: train
    for train, label in enumerate(
        (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    )
}
_LUT = np.full(256, IGNORE_INDEX, dtype=np.int64)
for _label, _train in LABEL_TO_TRAIN_ID.items():
    _LUT[_label] = _train

_INDEX_MODES = frozenset({"L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N", "1"})
_PAIR_HINT = (
    "every image needs a mask of the same size named like it (a PNG of class indices, "
    "255 = ignored); fix, re-export or remove the files listed"
)


@hookimpl
def register_datasets(register: Register) -> None:
    """Register ``seg-synthetic``, ``seg-photo``, ``segfolder``, ``gta5`` and ``cityscapes``."""
    seg = ("segmentation",)
    register(
        "seg-synthetic",
        build_seg_synthetic,
        description="flat-coloured squares, discs, triangles and bars on grey, with masks",
        tasks=seg,
    )
    register(
        "seg-photo",
        build_seg_photo,
        description="the same shapes cut from real photos on a photo background, noisy and blurred",
        tasks=seg,
    )
    register(
        "segfolder",
        build_segfolder,
        description="your own domains laid out as root/<domain>/images and root/<domain>/masks",
        tasks=seg,
    )
    register(
        "gta5",
        build_gta5,
        description="GTA5 (root/images, root/labels) mapped to the 19 Cityscapes classes",
        tasks=seg,
    )
    register(
        "cityscapes",
        build_cityscapes,
        description="Cityscapes fine annotations (leftImg8bit, gtFine), 19 classes",
        tasks=seg,
        domains=("train", "val"),
    )


# --------------------------------------------------------------------------------------- shapes


def build_seg_synthetic(
    domain: str | None, *, image_size: int, seed: int, n: int = 400, scene_seed: int = 1001
) -> DomainData:
    """``n`` scenes of 1-4 flat-coloured shapes on a light-grey background.

    ``scene_seed`` fixes the scenes; ``seed`` only picks the train/val/test split.
    """
    return _shape_domain("seg-synthetic", "synthetic", domain, n, image_size, seed, scene_seed)


def build_seg_photo(
    domain: str | None, *, image_size: int, seed: int, n: int = 400, scene_seed: int = 2002
) -> DomainData:
    """``n`` scenes of 1-4 shapes filled with photo crops on a photo background, noisy, blurred.

    ``scene_seed`` fixes the scenes (other layouts than ``seg-synthetic``'s by default); ``seed``
    only picks the train/val/test split.
    """
    return _shape_domain("seg-photo", "photo", domain, n, image_size, seed, scene_seed)


def _shape_domain(
    name: str, style: str, domain: str | None, n: int, image_size: int, seed: int, scene_seed: int
) -> DomainData:
    _no_domain(name, domain)
    x, masks = _render_scenes(style, n, image_size, scene_seed)
    return DomainData.from_arrays(
        name,
        x,
        masks.long(),
        class_names=SHAPE_CLASSES,
        seed=seed,
        task="segmentation",
        meta={"hflip": True},
    )


@functools.lru_cache(maxsize=2)
def _render_scenes(style: str, n: int, image_size: int, scene_seed: int) -> tuple[Tensor, Tensor]:
    """Draw ``n`` scenes: uint8 images ``(n, 3, S, S)`` and uint8 masks ``(n, S, S)`` (cached)."""
    if image_size < 8:
        raise DatasetError(f"segmentation shapes need image_size >= 8, got {image_size}")
    if n < 5:
        raise DatasetError(f"need n >= 5 scenes to fill train/val/test, got n={n}")
    s = image_size
    g = torch.Generator().manual_seed(scene_seed)
    count = torch.randint(1, _MAX_OBJECTS + 1, (n,), generator=g)
    valid = torch.arange(_MAX_OBJECTS) < count[:, None]
    kind = torch.randint(1, len(SHAPE_CLASSES), (n, _MAX_OBJECTS), generator=g)
    centre = (0.12 + 0.76 * torch.rand(n, _MAX_OBJECTS, 2, generator=g)) * s
    radius = (0.12 + 0.14 * torch.rand(n, _MAX_OBJECTS, generator=g)) * s
    angle = torch.rand(n, _MAX_OBJECTS, generator=g) * (2 * math.pi)
    hues = (
        torch.tensor(_SHAPE_HUES)[kind - 1]
        + (torch.rand(n, _MAX_OBJECTS, generator=g) - 0.5) * 0.08
    )
    sat = 0.65 + 0.3 * torch.rand(n, _MAX_OBJECTS, generator=g)
    val = 0.55 + 0.4 * torch.rand(n, _MAX_OBJECTS, generator=g)
    colour = _hsv_to_rgb(hues % 1.0, sat, val)  # (n, K, 3) in 0..255
    grey = 150 + 65 * torch.rand(n, generator=g)
    slope = 10 * torch.rand(n, generator=g)
    tilt = torch.rand(n, generator=g) * (2 * math.pi)
    tint = 0.3 * torch.rand(n, _MAX_OBJECTS, generator=g)

    coords = (torch.arange(s, dtype=torch.float32) + 0.5).expand(s, s)
    xs, ys = coords, coords.T
    images = torch.empty((n, 3, s, s), dtype=torch.uint8)
    masks = torch.empty((n, s, s), dtype=torch.uint8)
    for start in range(0, n, _RENDER_CHUNK):
        part = slice(start, min(n, start + _RENDER_CHUNK))
        m = part.stop - part.start
        if style == "synthetic":
            xn, yn = xs / s * 2 - 1, ys / s * 2 - 1
            ramp = (
                torch.cos(tilt[part])[:, None, None] * xn
                + torch.sin(tilt[part])[:, None, None] * yn
            )
            canvas = (grey[part][:, None, None] + slope[part][:, None, None] * ramp)[
                :, None
            ].expand(m, 3, s, s)
            textures = colour[part][..., None, None].expand(m, _MAX_OBJECTS, 3, s, s)
        else:
            chunk_seed = int(np.random.SeedSequence([scene_seed, start]).generate_state(1)[0])
            crops = _photo_crops(m * (1 + _MAX_OBJECTS), s, chunk_seed).float()
            crops = crops.view(m, 1 + _MAX_OBJECTS, 3, s, s)
            canvas = crops[:, 0]
            a = tint[part][..., None, None, None]
            textures = (1 - a) * crops[:, 1:] + a * colour[part][..., None, None]
        canvas = canvas.clone()
        label = torch.zeros((m, s, s), dtype=torch.uint8)
        for j in range(_MAX_OBJECTS):
            inside = _shape_masks(
                kind[part, j], centre[part, j], radius[part, j], angle[part, j], xs, ys
            )
            inside &= valid[part, j][:, None, None]
            canvas = torch.where(inside[:, None], textures[:, j], canvas)
            label = torch.where(inside, kind[part, j].to(torch.uint8)[:, None, None], label)
        if style == "photo":
            canvas = _blur(canvas)
            noise_g = torch.Generator().manual_seed(scene_seed * 7919 + start)
            canvas = canvas + 6.0 * torch.randn(canvas.shape, generator=noise_g)
        images[part] = canvas.round().clamp(0, 255).to(torch.uint8)
        masks[part] = label
    return images, masks


def _shape_masks(
    kind: Tensor, centre: Tensor, radius: Tensor, angle: Tensor, xs: Tensor, ys: Tensor
) -> Tensor:
    """Boolean ``(m, S, S)``: which pixels fall inside each image's shape of the given kind."""
    dx = xs - centre[:, 0, None, None]
    dy = ys - centre[:, 1, None, None]
    c, s_ = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c * dx + s_ * dy, -s_ * dx + c * dy
    r = radius[:, None, None]
    square = torch.maximum(u.abs(), v.abs()) <= 0.85 * r
    disc = u * u + v * v <= r * r
    # equilateral triangle with circumradius 1.5 r: inside all three edges at distance 0.75 r
    half = math.sqrt(3) / 2
    triangle = (
        (v <= 0.75 * r) & (-half * u - 0.5 * v <= 0.75 * r) & (half * u - 0.5 * v <= 0.75 * r)
    )
    bar = (u.abs() <= 1.7 * r) & (v.abs() <= 0.4 * r)
    k = kind[:, None, None]
    return torch.where(
        k == 1, square, torch.where(k == 2, disc, torch.where(k == 3, triangle, bar))
    )


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV in [0, 1] to RGB in [0, 255], with a trailing channel dimension."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return (v[..., None] - v[..., None] * s[..., None] * ramp) * 255


def _blur(x: Tensor) -> Tensor:
    """A slight 3x3 Gaussian blur of float images ``(m, 3, S, S)``."""
    k1 = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


# --------------------------------------------------------------------------------------- files


@dataclass
class _Decoded:
    """One image/mask pair, resized: image ``(S, S, 3)`` uint8 and raw mask values ``(S, S)``."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    values: np.ndarray | None = None  # distinct raw mask values at full resolution
    problems: list[str] = field(default_factory=list)


def _decode_pair(pair: tuple[Path, Path], image_size: int) -> _Decoded:
    """Decode and resize one pair, recording what is wrong with it instead of raising."""
    image_path, mask_path = pair
    out = _Decoded()
    image_px: tuple[int, int] | None = None
    try:
        with Image.open(image_path) as im:
            im.load()
            rgb = im.convert("RGB")
        image_px = rgb.size
        out.image = np.asarray(_resize_center_crop(rgb, image_size, Image.Resampling.BILINEAR))
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the file unreadable
        out.problems.append(f"{image_path}: {_decode_failure(image_path, exc)}")
    try:
        with Image.open(mask_path) as im:
            im.load()
            mode, mask = im.mode, _index_image(im)
    except Exception as exc:  # noqa: BLE001
        out.problems.append(f"{mask_path}: {_decode_failure(mask_path, exc)}")
        return out
    if mask is None:
        out.problems.append(
            f"{mask_path}: mask must be single-channel class indices (mode L or P), got mode {mode}"
        )
        return out
    if image_px is not None and mask.size != image_px:
        out.problems.append(
            f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} px but its image "
            f"{image_path.name} is {image_px[0]}x{image_px[1]}"
        )
        return out
    out.values = np.unique(np.asarray(mask))
    resized = _resize_center_crop(mask, image_size, Image.Resampling.NEAREST)
    out.mask = np.asarray(resized).astype(np.int64)
    return out


def _index_image(im: Image.Image) -> Image.Image | None:
    """The mask as a single-channel index image (L, P or I), or None for colour masks."""
    if im.mode not in _INDEX_MODES:
        return None
    if im.mode == "1":
        return Image.fromarray(np.asarray(im).astype(np.uint8))
    if im.mode.startswith("I"):
        return im.convert("I") if im.mode != "I" else im.copy()
    return im.copy()


def _resize_center_crop(im: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side to ``size``, then crop the central square (same geometry for any
    ``resample``, so an image and its mask stay aligned)."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _decode_all(pairs: Sequence[tuple[Path, Path]], image_size: int) -> list[_Decoded]:
    """Decode pairs with a small thread pool, in order."""
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
        return list(pool.map(functools.partial(_decode_pair, image_size=image_size), pairs))


def _index_files(
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


def _pair_up(
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


def _out_of_range(mask_path: Path, values: np.ndarray, num_classes: int) -> str | None:
    bad = values[((values >= num_classes) | (values < 0)) & (values != IGNORE_INDEX)]
    if not len(bad):
        return None
    listed = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
    return (
        f"{mask_path}: class index {listed} out of range "
        f"({num_classes} classes: 0..{num_classes - 1}, {IGNORE_INDEX} = ignored)"
    )


def _raise_problems(where: Path, problems: list[str], hint: str = _PAIR_HINT) -> None:
    if not problems:
        return
    problems = sorted(problems)
    lines = [f"{len(problems)} problem(s) with the images and masks in {where}:"]
    lines += [f"  {p}" for p in problems]  # every one: a user fixes them all in one go
    raise DatasetError("\n".join(lines), hint=hint)


def _fractions(name: str, val_fraction: float, test_fraction: float) -> tuple[float, float, float]:
    train_fraction = 1.0 - val_fraction - test_fraction
    if val_fraction <= 0 or test_fraction <= 0 or train_fraction <= 0:
        raise DatasetError(
            f"{name} splits need 0 < val_fraction, test_fraction and val + test < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    return train_fraction, val_fraction, test_fraction


def _root(root: str, name: str, layout: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"{name} root not found: {path}", hint=f"set root to a folder laid out as {layout}"
        )
    return path


def _check_options(image_size: int, max_images: int | None = None) -> None:
    if image_size < 1:
        raise DatasetError(f"image_size must be positive, got {image_size}")
    if max_images is not None and max_images < 1:
        raise DatasetError(f"max_images must be positive, got {max_images}")


def _missing_dirs(dirs: Sequence[Path], layout: str) -> None:
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise DatasetError(
            f"folder(s) not found: {', '.join(missing)}", hint=f"lay the data out as {layout}"
        )


def _assemble(
    name: str,
    decoded: Sequence[_Decoded],
    masks: Sequence[np.ndarray],
    *,
    class_names: Sequence[str],
    seed: int,
    fractions: tuple[float, float, float],
    meta: dict[str, Any],
    where: Path,
) -> DomainData:
    if not decoded:
        raise DatasetError(f"no image/mask pairs found in {where}", hint=_PAIR_HINT)
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
) -> DomainData:
    """One domain of ``root/<domain>/images/<name>.<ext>`` + ``root/<domain>/masks/<name>.png``.

    Class names come from ``root/<domain>/classes.txt`` or ``root/classes.txt`` (one per line);
    otherwise they are ``"0".."K-1"`` with ``K = num_classes`` or 1 + the largest index found in
    this domain's masks (give ``classes.txt`` or ``num_classes`` so that domains agree).
    """
    _check_options(image_size)
    fractions = _fractions("segfolder", val_fraction, test_fraction)
    layout = "root/<domain>/images/<name>.<ext> and root/<domain>/masks/<name>.png"
    root_path = _root(root, "segfolder", layout)
    available = [d for d in _subfolders(root_path) if (root_path / d / "images").is_dir()]
    listing = ", ".join(available) if available else "none (no sub-folder holds an images folder)"
    domain_dir = domain_folder("segfolder", root_path, domain, listing)
    images_dir, masks_dir = domain_dir / "images", domain_dir / "masks"
    _missing_dirs((images_dir, masks_dir), layout)

    class_names = _read_class_names(domain_dir, root_path)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise DatasetError(
            f"num_classes={num_classes} but the class-name file lists {len(class_names)} classes",
            hint="drop num_classes or fix classes.txt",
        )
    if num_classes is not None and not 1 <= num_classes <= IGNORE_INDEX:
        raise DatasetError(f"num_classes must be 1..{IGNORE_INDEX}, got {num_classes}")

    images, problems = _index_files(_image_files(images_dir), lambda p: p.stem, "image")
    masks, more = _index_files(_files(masks_dir), _png_stem, "mask")
    problems += more
    _, pairs, more = _pair_up(images, masks, lambda k: masks_dir / f"{k}.png")
    problems += more
    decoded = _decode_all(pairs, image_size)
    for d in decoded:
        problems += d.problems

    if class_names is not None:
        k = len(class_names)
    elif num_classes is not None:
        k = num_classes
    else:
        found = [d.values[d.values != IGNORE_INDEX] for d in decoded if d.values is not None]
        k = 1 + max((int(v.max()) for v in found if len(v)), default=-1)
    for (_, mask_path), d in zip(pairs, decoded, strict=True):
        if d.values is not None and (msg := _out_of_range(mask_path, d.values, k)):
            problems.append(msg)
    _raise_problems(domain_dir, problems)
    if k == 0:
        raise DatasetError(
            f"the masks in {masks_dir} hold no class indices (every pixel is {IGNORE_INDEX})",
            hint="add root/classes.txt or set num_classes",
        )
    return _assemble(
        domain,
        decoded,
        [d.mask for d in decoded],  # type: ignore[misc]
        class_names=class_names or [str(i) for i in range(k)],
        seed=seed,
        fractions=fractions,
        meta={"hflip": True, "root": str(root_path)},
        where=domain_dir,
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _png_stem(path: Path) -> str | None:
    return path.stem if path.suffix.lower() == ".png" else None


def _read_class_names(domain_dir: Path, root: Path) -> list[str] | None:
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
) -> DomainData:
    """GTA5 as ``root/images/<id>.png`` + ``root/labels/<id>.png`` (Cityscapes label ids), mapped
    to the 19 train ids; ``max_images`` keeps the first N ids in sorted order."""
    _no_domain("gta5", domain)
    _check_options(image_size, max_images)
    fractions = _fractions("gta5", val_fraction, test_fraction)
    layout = "root/images/<id>.png and root/labels/<id>.png"
    root_path = _root(root, "gta5", layout)
    images_dir, labels_dir = root_path / "images", root_path / "labels"
    _missing_dirs((images_dir, labels_dir), layout)
    images, problems = _index_files(_image_files(images_dir), lambda p: p.stem, "image")
    labels, more = _index_files(_files(labels_dir), _png_stem, "label")
    problems += more
    _, pairs, more = _pair_up(images, labels, lambda k: labels_dir / f"{k}.png", max_images)
    problems += more
    decoded = _decode_all(pairs, image_size)
    for d in decoded:
        problems += d.problems
    _raise_problems(root_path, problems)
    return _assemble(
        "gta5",
        decoded,
        [_to_train_ids(d.mask) for d in decoded],  # type: ignore[arg-type]
        class_names=CITYSCAPES_CLASSES,
        seed=seed,
        fractions=fractions,
        meta={"hflip": True, "root": str(root_path)},
        where=root_path,
    )


def _to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map Cityscapes label ids to train ids (anything unknown -> 255)."""
    known = (label_ids >= 0) & (label_ids < len(_LUT))
    return np.where(known, _LUT[np.clip(label_ids, 0, len(_LUT) - 1)], IGNORE_INDEX)


# --------------------------------------------------------------------------------------- cityscapes

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
) -> DomainData:
    """Cityscapes ``root/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png`` (used as is) or
    ``..._gtFine_labelIds.png`` (mapped to the 19 train ids).

    ``domain`` names one split folder (``train``, ``val``); without it train and val are pooled.
    Either way the images are split again by ``seed`` and the fractions; ``max_images`` keeps the
    first N (split, city, stem) in sorted order.
    """
    _check_options(image_size, max_images)
    fractions = _fractions("cityscapes", val_fraction, test_fraction)
    layout = "root/leftImg8bit/<split>/<city>/*_leftImg8bit.png and root/gtFine/<split>/<city>/*_gtFine_labelIds.png"
    root_path = _root(root, "cityscapes", layout)
    img_root, gt_root = root_path / "leftImg8bit", root_path / "gtFine"
    _missing_dirs((img_root, gt_root), layout)
    available = _subfolders(img_root)
    if domain is None:
        splits = [s for s in ("train", "val") if s in available]
        if not splits:
            raise DatasetError(
                f"{img_root} has neither a train nor a val folder; found: {', '.join(available) or 'none'}",
                hint=f"lay the data out as {layout}",
            )
    elif domain in available:
        splits = [domain]
    else:
        raise DatasetError(
            f"cityscapes split folder not found: {img_root / domain}; available: "
            f"{', '.join(available) or 'none'}",
            hint="name a split folder (cityscapes/train, cityscapes/val) or none to pool train and val",
        )

    image_paths: list[Path] = []
    gt_paths: list[Path] = []
    for split in splits:
        for city_dir in _city_dirs(img_root / split):
            image_paths += [p for p in _files(city_dir) if p.name.endswith(_IMAGE_SUFFIX)]
        for city_dir in _city_dirs(gt_root / split):
            gt_paths += [p for p in _files(city_dir) if p.name.endswith((_LABEL_IDS, _TRAIN_IDS))]
    images, problems = _index_files(image_paths, _key(_IMAGE_SUFFIX), "image")
    # prefer labelTrainIds over labelIds where both exist
    train_ids, _ = _index_files(gt_paths, _key(_TRAIN_IDS), "label")
    label_ids, _ = _index_files(gt_paths, _key(_LABEL_IDS), "label")
    gts = {**label_ids, **train_ids}

    def expected(k: tuple[str, str, str]) -> Path:
        return gt_root / k[0] / k[1] / f"{k[2]}{_LABEL_IDS}"

    keys, pairs, more = _pair_up(images, gts, expected, max_images)
    problems += more
    decoded = _decode_all(pairs, image_size)
    masks: list[np.ndarray] = []
    for k, (_, gt_path), d in zip(keys, pairs, decoded, strict=True):
        problems += d.problems
        if d.mask is None or d.values is None:
            continue
        if k in train_ids:
            if msg := _out_of_range(gt_path, d.values, len(CITYSCAPES_CLASSES)):
                problems.append(msg)
            masks.append(d.mask)
        else:
            masks.append(_to_train_ids(d.mask))
    _raise_problems(root_path, problems)
    return _assemble(
        "cityscapes" if domain is None else f"cityscapes/{domain}",
        decoded,
        masks,
        class_names=CITYSCAPES_CLASSES,
        seed=seed,
        fractions=fractions,
        meta={"hflip": True, "root": str(root_path)},
        where=root_path,
    )


def _city_dirs(split_dir: Path) -> list[Path]:
    return [split_dir / c for c in _subfolders(split_dir)] if split_dir.is_dir() else []


def _key(suffix: str) -> Callable[[Path], tuple[str, str, str] | None]:
    """Key a Cityscapes file by (split, city, stem) when its name ends with ``suffix``."""

    def key(path: Path) -> tuple[str, str, str] | None:
        if not path.name.endswith(suffix):
            return None
        return path.parent.parent.name, path.parent.name, path.name[: -len(suffix)]

    return key
