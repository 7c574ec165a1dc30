"""Tests of the one image reader (``harness_plugins.images``): every PIL mode against a reference
conversion computed here with numpy, EXIF orientation, and the two ways to a square."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from harness_plugins import images as im
from harness_plugins.seg_files import decode_pair

WHITE = np.array(im.BACKGROUND, dtype=np.float64)


def _reopen(image: Image.Image, fmt: str = "PNG", **save: object) -> Image.Image:
    """``image`` written to ``fmt`` and read back, as a file on disk would be."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(im.to_rgb(image)).astype(np.int64)


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.int64)[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------------------- modes


def test_sixteen_bit_png_uses_the_whole_range() -> None:
    values = np.array([[0, 1, 257, 32768, 65534, 65535]], dtype=np.uint16)
    image = _reopen(Image.fromarray(values))
    assert image.mode == "I;16"
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5)
    assert expected.tolist() == [[0, 0, 1, 128, 255, 255]]
    assert np.array_equal(_rgb(image), _gray(expected))


@pytest.mark.parametrize(("mode", "dtype"), [("I;16", "=u2"), ("I;16B", ">u2"), ("I;16L", "<u2")])
def test_sixteen_bit_byte_orders(mode: str, dtype: str) -> None:
    values = np.array([[0, 32768, 65535, 1000]], dtype=dtype)
    image = Image.frombytes(mode, (4, 1), values.tobytes())
    assert np.array_equal(_rgb(image), _gray(np.array([[0, 128, 255, 4]])))


def test_mode_i_in_sixteen_bit_range_and_beyond() -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.int32)
    assert np.array_equal(_rgb(Image.fromarray(values, mode="I")), _gray(np.array([[0, 128, 255]])))
    wide = np.array([[-100, 0, 100_000]], dtype=np.int32)  # beyond 16 bits: min..max stretched
    expected = np.floor((wide - wide.min()) * 255 / (wide.max() - wide.min()) + 0.5)
    assert np.array_equal(_rgb(Image.fromarray(wide, mode="I")), _gray(expected))


def test_mode_f_unit_range_and_beyond() -> None:
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    expected = np.floor(unit.astype(np.float64) * 255 + 0.5)
    assert np.array_equal(_rgb(Image.fromarray(unit, mode="F")), _gray(expected))
    wide = np.array([[-1.0, 1.0, 3.0, np.nan]], dtype=np.float32)  # NaN reads 0, then stretched
    assert np.array_equal(
        _rgb(Image.fromarray(wide, mode="F")), _gray(np.array([[0, 128, 255, 64]]))
    )


def test_alpha_is_composited_on_the_background() -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], dtype=np.uint8)
    a = rgba[:, :, 3:].astype(np.float64)
    expected = np.rint((rgba[:, :, :3] * a + WHITE * (255 - a)) / 255)
    assert expected[0, 0].tolist() == list(im.BACKGROUND)  # alpha 0: the background
    assert np.array_equal(_rgb(_reopen(Image.fromarray(rgba, mode="RGBA"))), expected)
    la = np.array([[[40, 0], [40, 255], [40, 64]]], dtype=np.uint8)
    a = la[:, :, 1:].astype(np.float64)
    gray = np.rint((la[:, :, :1] * a + 255 * (255 - a)) / 255)
    assert np.array_equal(_rgb(_reopen(Image.fromarray(la, mode="LA"))), _gray(gray[:, :, 0]))


def test_premultiplied_alpha_modes() -> None:
    rgba = Image.fromarray(np.array([[[200, 100, 0, 128]]], dtype=np.uint8), mode="RGBA")
    assert np.array_equal(_rgb(rgba.convert("RGBa")), _rgb(rgba.convert("RGBa").convert("RGBA")))
    la = Image.new("La", (1, 1), (100, 128))
    assert np.array_equal(_rgb(la), _rgb(la.convert("LA")))


def test_palette_reads_its_colours_and_transparency() -> None:
    palette = [255, 0, 0, 0, 128, 0, 1, 2, 3] + [0] * (256 * 3 - 9)
    indices = np.array([[0, 1, 2, 1]], dtype=np.uint8)
    p = Image.fromarray(indices, mode="P")
    p.putpalette(palette)
    colours = np.array(palette, dtype=np.int64).reshape(-1, 3)[indices]
    assert np.array_equal(_rgb(_reopen(p)), colours)
    transparent = _reopen(p, transparency=2)  # index 2 transparent: the background
    colours[0, 2] = im.BACKGROUND
    assert np.array_equal(_rgb(transparent), colours)
    pa = Image.fromarray(indices, mode="P")
    pa.putpalette(palette)
    pa = pa.convert("PA")
    assert pa.mode == "PA"
    assert np.array_equal(_rgb(pa), np.array(palette, dtype=np.int64).reshape(-1, 3)[indices])


def test_cmyk_through_pillow_and_simple_modes() -> None:
    rng = np.random.default_rng(0)
    cmyk = Image.fromarray(rng.integers(0, 256, (3, 4, 4), dtype=np.uint8), mode="CMYK")
    reference = np.asarray(cmyk.convert("RGB")).astype(np.int64)
    assert np.array_equal(_rgb(_reopen(cmyk, "TIFF")), reference)
    c, m, y, k = (np.asarray(cmyk).astype(np.int64)[:, :, i] for i in range(4))
    # Pillow's own (naive, profile-free) conversion: each channel (255 - ink) * (255 - black) / 255
    for channel, ink in enumerate((c, m, y)):
        naive = np.rint((255 - ink) * (255 - k) / 255)
        assert np.array_equal(reference[:, :, channel], naive)
    gray = rng.integers(0, 256, (3, 4), dtype=np.uint8)
    assert np.array_equal(_rgb(_reopen(Image.fromarray(gray))), _gray(gray))
    bits = np.array([[True, False]])
    assert np.array_equal(_rgb(_reopen(Image.fromarray(bits))), _gray(np.array([[255, 0]])))
    rgb = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert np.array_equal(_rgb(_reopen(Image.fromarray(rgb))), rgb)


# --------------------------------------------------------------------------------------- EXIF


def _with_orientation(image: Image.Image, tag: int, fmt: str = "JPEG") -> Image.Image:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = tag
    return _reopen(image, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :16] = 255  # left half white, as stored
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(path, quality=100, exif=exif.tobytes())
    shown = np.asarray(im.open_rgb(path)).astype(np.int64)
    stored = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    assert shown.shape == (32, 16, 3)
    assert np.array_equal(shown, np.rot90(stored, k=-1))  # numpy: clockwise
    assert shown[:16].mean() > 250 and shown[16:].mean() < 5  # the white half is now on top


@pytest.mark.parametrize("tag", range(1, 9))
def test_orientation_table_matches_pillow(tag: int) -> None:
    image = _with_orientation(
        Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6)), tag, "PNG"
    )
    ours = np.asarray(im.upright(image))
    assert np.array_equal(ours, np.asarray(ImageOps.exif_transpose(image)))


def test_segmentation_mask_turns_with_its_image(tmp_path: Path) -> None:
    arr = np.zeros((8, 12, 3), dtype=np.uint8)
    mask = np.zeros((8, 12), dtype=np.uint8)
    arr[:, :4], mask[:, :4] = 255, 3  # left third white, class 3
    mask[0, 11] = 255  # one void pixel in the top-right corner
    image_path, mask_path = tmp_path / "a.jpg", tmp_path / "a.png"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(arr).save(image_path, quality=100, exif=exif.tobytes())
    Image.fromarray(mask).save(mask_path)  # drawn on the stored pixels, no EXIF of its own
    out = decode_pair((image_path, mask_path), image_size=12, resize="pad")
    assert not out.problems
    turned = np.rot90(mask, k=-1)  # (12, 8), padded to 12 x 12 with void columns
    expected = np.full((12, 12), 255)
    expected[:, 2:10] = turned
    assert np.array_equal(out.mask, expected)
    white = out.image[:, 2:10].mean(axis=2) > 128
    assert np.array_equal(white, turned == 3)
    # a mask drawn on the image as shown (already upright) is left as it is
    Image.fromarray(np.ascontiguousarray(turned)).save(mask_path)
    out = decode_pair((image_path, mask_path), image_size=12, resize="pad")
    assert not out.problems and np.array_equal(out.mask, expected)


# --------------------------------------------------------------------------------------- squares


def test_pad_keeps_the_whole_image() -> None:
    arr = np.zeros((10, 40, 3), dtype=np.uint8)
    arr[:, :] = (0, 255, 0)
    arr[:, :4] = (255, 0, 0)  # a red strip at the left edge, lost by a center crop
    square = np.asarray(im.to_square(Image.fromarray(arr), 8, Image.Resampling.NEAREST, "pad"))
    assert square.shape == (8, 8, 3)
    assert (square[:3] == im.PAD_COLOUR).all() and (square[5:] == im.PAD_COLOUR).all()
    assert square[3:5, 0].tolist() == [[255, 0, 0]] * 2 and (square[3:5, 1:, 1] == 255).all()
    cropped = np.asarray(
        im.to_square(Image.fromarray(arr), 8, Image.Resampling.NEAREST, "center-crop")
    )
    assert (cropped[:, :, 0] == 0).all()
    mask = Image.fromarray(np.ones((10, 40), dtype=np.uint8))
    padded = np.asarray(im.to_square(mask, 8, Image.Resampling.NEAREST, "pad", 255))
    assert set(np.unique(padded[:3]).tolist()) == {255} and (padded[3:5] == 1).all()


def test_resize_option_is_checked() -> None:
    assert im.check_resize("pad") == "pad"
    with pytest.raises(im.DatasetError, match="center-crop.*pad"):
        im.check_resize("stretch")
