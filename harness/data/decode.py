"""How an image file becomes uint8 pixels: EXIF orientation first, every PIL mode converted to RGB
faithfully (``to_rgb``), then a size by ``to_square`` (or kept whole).

The one reader of image files: the dataset plugins, the decoded-image cache
(``harness.data.cache``) and anything that later reads a user's images use it, so they all see the
same pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

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
    path: Path, *, image_size: int | tuple[int, int], resize: str = "center-crop"
) -> tuple[np.ndarray | None, str | None]:
    """Fully decode one image to uint8 ``(S, S, 3)`` (``(H, W, 3)`` for ``image_size`` =
    ``(W, H)``), or return why it cannot be read."""
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


Size = int | tuple[int, int]


def _wh(size: Size) -> tuple[int, int]:
    """``(width, height)`` of a square side or a ``(width, height)`` pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def to_square(
    im: Image.Image, size: Size, resample: Image.Resampling, resize: str, fill: Any = PAD_COLOUR
) -> Image.Image:
    """``im`` as ``size x size`` (or ``(width, height)``) by ``resize`` (one of
    ``RESIZE_MODES``); the same geometry for any ``resample``, so an image and its mask stay
    aligned (a mask is padded with ``fill`` = 255)."""
    if resize == "pad":
        return resize_pad(im, size, resample, fill)
    return resize_center_crop(im, size, resample)


def resize_center_crop(im: Image.Image, size: Size, resample: Image.Resampling) -> Image.Image:
    """Resize to cover ``size`` (a square's side, or ``(width, height)``), aspect ratio kept,
    then crop the centre (same geometry for any ``resample``, so an image and its mask stay
    aligned)."""
    (w, h), (sw, sh) = im.size, _wh(size)
    scale = max(sw / w, sh / h)
    nw, nh = max(sw, round(w * scale)), max(sh, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    left, top = (nw - sw) // 2, (nh - sh) // 2
    return im.crop((left, top, left + sw, top + sh))


def resize_pad(im: Image.Image, size: Size, resample: Image.Resampling, fill: Any) -> Image.Image:
    """Resize to fit in ``size`` (the whole image kept, aspect ratio too), then centre it on a
    canvas of ``size`` filled with ``fill``."""
    (w, h), (sw, sh) = im.size, _wh(size)
    scale = min(sw / w, sh / h)
    nw, nh = min(sw, max(1, round(w * scale))), min(sh, max(1, round(h * scale)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample)
    if (nw, nh) == (sw, sh):
        return im
    canvas = Image.new(im.mode, (sw, sh), fill)
    canvas.paste(im, ((sw - nw) // 2, (sh - nh) // 2))
    return canvas
