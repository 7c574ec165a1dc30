"""Tests for the batched crops in ``harness.training.crops``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from harness.api import IGNORE_INDEX
from harness.training.crops import (
    _box_grid,
    center_crop,
    random_crop,
    random_resized_crop,
    resized_crop,
    sample_resized_boxes,
    sliding_window,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, c: int = 3, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


def _pattern_mask(n: int, h: int, w: int) -> torch.Tensor:
    """Classes that differ at every pixel (``row * w + col``, mod 250, plus a per-image shift)."""
    base = torch.arange(h * w).view(h, w)
    return torch.stack([(base + 7 * i) % 250 for i in range(n)])


def _as_image(mask: torch.Tensor) -> torch.Tensor:
    """The mask as a one-channel image, exactly representable: class k is k / 256."""
    return mask.unsqueeze(1).float() / 256


# --- random_resized_crop ---------------------------------------------------------------------


def test_random_resized_crop_shapes_and_dtypes() -> None:
    x, mask = _images(5, h=40, w=60), _pattern_mask(5, 40, 60)
    out, m = random_resized_crop(x, 24, generator=_gen(), mask=mask)
    assert out.shape == (5, 3, 24, 24) and out.dtype == x.dtype
    assert m.shape == (5, 24, 24) and m.dtype == torch.int64
    assert random_resized_crop(x, (16, 20), generator=_gen()).shape == (5, 3, 16, 20)


def test_random_resized_crop_is_deterministic_and_varies_per_image() -> None:
    x = _images(8)
    a = random_resized_crop(x, 16, generator=_gen(3))
    b = random_resized_crop(x, 16, generator=_gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, random_resized_crop(x, 16, generator=_gen(4)))
    boxes = sample_resized_boxes(64, 32, 32, generator=_gen(5))
    assert len({tuple(b) for b in boxes.tolist()}) > 32


def test_boxes_follow_the_rule() -> None:
    height, width = 48, 80
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_resized_boxes(2000, height, width, scale, ratio, generator=_gen(6))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # rounding of the sides moves area and ratio a little past their ranges
    area = (h * w).float() / (height * width)
    assert area.min() > 0.06 and area.max() <= 1.0
    aspect = w.float() / h.float()
    assert aspect.min() > 0.6 and aspect.max() < 1.6
    # positions are spread over the free range
    assert top.float().std() > 3 and left.float().std() > 5


def test_fallback_is_the_clamped_central_crop() -> None:
    # A 10 x 100 image cannot hold a box of ratio in [1, 1] with area >= 0.9: every attempt fails.
    boxes = sample_resized_boxes(6, 10, 100, (0.9, 1.0), (1.0, 1.0), generator=_gen())
    assert boxes.tolist() == [[0, 45, 10, 10]] * 6
    # A wide image with a ratio range that cannot be met falls back to the whole height.
    boxes = sample_resized_boxes(3, 100, 10, (0.9, 1.0), (2.0, 2.0), generator=_gen())
    assert boxes.tolist() == [[47, 0, 5, 10]] * 3


def test_identity_box_reproduces_the_image() -> None:
    x, mask = _images(3, h=24, w=24), _pattern_mask(3, 24, 24)
    out, m = random_resized_crop(x, 24, (1.0, 1.0), (1.0, 1.0), generator=_gen(), mask=mask)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    assert torch.equal(m, mask)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40)])
def test_box_of_output_size_is_the_image_slice(height: int, width: int) -> None:
    # scale 1/4 and ratio W/H give an exact half-size box; resized to its own size it is a copy.
    x, mask = _images(6, h=height, w=width), _pattern_mask(6, height, width)
    kwargs = dict(scale=(0.25, 0.25), ratio=(width / height,) * 2)
    boxes = sample_resized_boxes(6, height, width, **kwargs, generator=_gen(2))
    out, m = random_resized_crop(
        x, (height // 2, width // 2), **kwargs, generator=_gen(2), mask=mask
    )
    assert len({tuple(b[:2]) for b in boxes.tolist()}) > 1
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        assert (h, w) == (height // 2, width // 2)
        torch.testing.assert_close(
            out[i], x[i, :, top : top + h, left : left + w], atol=1e-5, rtol=0
        )
        assert torch.equal(m[i], mask[i, top : top + h, left : left + w])


def test_grid_equals_affine_grid() -> None:
    boxes = torch.tensor([[3, 5, 10, 20], [0, 0, 32, 40], [7, 1, 13, 9]])
    height, width, out_h, out_w = 32, 40, 12, 18
    b = boxes.float()
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0] = b[:, 3] / width
    theta[:, 0, 2] = (2 * b[:, 1] + b[:, 3]) / width - 1
    theta[:, 1, 1] = b[:, 2] / height
    theta[:, 1, 2] = (2 * b[:, 0] + b[:, 2]) / height - 1
    expected = F.affine_grid(theta, [3, 1, out_h, out_w], align_corners=False)
    torch.testing.assert_close(_box_grid(boxes, height, width, out_h, out_w), expected)


def test_mask_moves_with_the_image_when_resized() -> None:
    # Upsampling a box by 3: the mask, nearest-sampled, holds the class of the input pixel whose
    # centre is closest, i.e. the one carrying most of the bilinear weight of the image.
    n, height, width = 4, 20, 20
    mask = _pattern_mask(n, height, width)
    x = _as_image(mask)
    boxes = torch.tensor([[0, 0, 8, 8], [5, 3, 8, 8], [12, 12, 8, 8], [2, 9, 8, 8]])
    out, m = resized_crop(x, boxes, 24, mask=mask)
    grid = _box_grid(boxes, height, width, 24, 24)
    nearest = F.grid_sample(x, grid, mode="nearest", align_corners=False)
    assert torch.equal(m, (nearest.squeeze(1) * 256).round().long())
    # Every third output pixel from the second falls on an input pixel's centre: exact.
    centres = out[:, 0, 1::3, 1::3]
    torch.testing.assert_close(centres * 256, m[:, 1::3, 1::3].float(), atol=1e-3, rtol=0)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        assert torch.equal(m[i, 1::3, 1::3], mask[i, top : top + h, left : left + w])


def test_random_resized_crop_keeps_mask_aligned() -> None:
    # Class ``64 row + col`` at each pixel, and the image's two channels hold row and column. Both
    # resamplings read at the same point: nearest takes the closest pixel, bilinear lies between
    # the two around it, so they differ by at most half a pixel per axis. A shift of one would not.
    n, size = 8, 64
    rows = torch.arange(size).view(size, 1).expand(size, size)
    cols = rows.T
    mask = (rows * 64 + cols).expand(n, size, size)
    x = torch.stack([rows, cols]).float().div(64).expand(n, 2, size, size)
    out, m = random_resized_crop(x, 32, generator=_gen(9), mask=mask)
    assert ((out[:, 0] * 64 - m.div(64, rounding_mode="floor")).abs() <= 0.5 + 1e-3).all()
    assert ((out[:, 1] * 64 - m % 64).abs() <= 0.5 + 1e-3).all()


def test_resized_crop_in_half_precision() -> None:
    x = _images(2, h=16, w=16)
    boxes = torch.tensor([[0, 0, 16, 16], [4, 4, 8, 8]])
    out = resized_crop(x.half(), boxes, 16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out[0].float(), x[0], atol=1e-3, rtol=0)


# --- random_crop -----------------------------------------------------------------------------


def test_random_crop_is_an_exact_slice() -> None:
    x, mask = _images(8, h=40, w=30), _pattern_mask(8, 40, 30)
    out, m = random_crop(x, (24, 16), generator=_gen(4), mask=mask)
    assert out.shape == (8, 3, 24, 16) and m.shape == (8, 24, 16)
    origins = set()
    for i in range(8):
        hits = [
            (t, lf)
            for t in range(40 - 24 + 1)
            for lf in range(30 - 16 + 1)
            if torch.equal(out[i], x[i, :, t : t + 24, lf : lf + 16])
        ]
        assert len(hits) == 1
        t, lf = hits[0]
        assert torch.equal(m[i], mask[i, t : t + 24, lf : lf + 16])
        origins.add(hits[0])
    assert len(origins) > 4
    again = random_crop(x, (24, 16), generator=_gen(4), mask=mask)
    assert torch.equal(again[0], out) and torch.equal(again[1], m)


def test_random_crop_pads_images_with_zero_and_masks_with_void() -> None:
    # 1 + x keeps every real pixel positive, so zeros mark padding.
    x = 0.5 + 0.5 * _images(16, c=2, h=6, w=20)
    mask = _pattern_mask(16, 6, 20)
    out, m = random_crop(x, (10, 8), generator=_gen(1), mask=mask)
    assert out.shape == (16, 2, 10, 8)
    pad = out[:, 0] == 0
    assert torch.equal(pad, out[:, 1] == 0)
    assert torch.equal(pad, m == IGNORE_INDEX)
    # exactly 4 padded rows per image, whole rows, and the image rows in between are a slice
    assert torch.equal(pad.sum((1, 2)), torch.full((16,), 4 * 8))
    offsets = set()
    for i in range(16):
        rows = (~pad[i]).all(1).nonzero().flatten()
        assert len(rows) == 6 and torch.equal(rows, rows[0] + torch.arange(6))
        real = out[i, :, rows]
        hits = [lf for lf in range(13) if torch.equal(real, x[i, :, :, lf : lf + 8])]
        assert len(hits) == 1
        assert torch.equal(m[i, rows], mask[i, :, hits[0] : hits[0] + 8])
        offsets.add(rows[0].item())
    assert offsets <= set(range(5)) and len(offsets) > 1


def test_crop_positions_reach_every_offset() -> None:
    # Every start from the first to the last (inclusive) occurs, padding offsets included.
    index = (torch.arange(7).float().view(1, 1, 1, 7).expand(300, 1, 1, 7) + 1) / 8  # zero: pad
    starts = random_crop(index, (1, 4), generator=_gen(2))[:, 0, 0, 0] * 8 - 1
    assert set(starts.long().tolist()) == {0, 1, 2, 3}
    padded = random_crop(index, (1, 10), generator=_gen(2))
    assert set((padded[:, 0, 0] == 0).long().argmin(1).tolist()) == {0, 1, 2, 3}
    boxes = sample_resized_boxes(300, 8, 8, (0.25, 0.25), (1.0, 1.0), generator=_gen(2))
    assert set(boxes[:, 0].tolist()) == set(boxes[:, 1].tolist()) == set(range(5))


def test_random_crop_of_full_size_is_the_image() -> None:
    x, mask = _images(3, h=12, w=12), _pattern_mask(3, 12, 12)
    out, m = random_crop(x, 12, generator=_gen(), mask=mask)
    assert torch.equal(out, x) and torch.equal(m, mask)


# --- center_crop -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [
        (32, 32, 24),  # even differences
        (33, 32, (24, 25)),  # odd: 9 / 2 and 7 / 2 round half to even differently
        (31, 29, (26, 26)),  # 5 / 2 and 3 / 2
        (20, 30, (25, 16)),  # pad the height (odd shortfall), crop the width
        (7, 8, (10, 11)),  # pad both
    ],
)
def test_center_crop_matches_torchvision(height: int, width: int, size: int | tuple) -> None:
    x = _images(2, h=height, w=width)
    mask = _pattern_mask(2, height, width)
    out, m = center_crop(x, size, mask=mask)
    torch.testing.assert_close(
        out, TF.center_crop(x, list(size) if isinstance(size, tuple) else size)
    )
    # the mask is cropped identically; torchvision pads it with 0 where we pad with void
    reference = TF.center_crop(mask + 1, list(size) if isinstance(size, tuple) else [size])
    assert torch.equal(m, torch.where(reference == 0, IGNORE_INDEX, reference - 1))


def test_center_crop_without_mask_returns_a_view() -> None:
    x = _images(1, h=10, w=10)
    out = center_crop(x, 6)
    assert out.data_ptr() == x[..., 2:, 2:].data_ptr()


# --- sliding_window --------------------------------------------------------------------------


def _conv1x1(classes: int = 5, channels: int = 3) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(channels, classes, 1)


@pytest.mark.parametrize(
    ("height", "width", "window", "stride"),
    [
        (40, 56, 16, 12),  # overlapping windows, last one flush with the edge
        (32, 48, 16, 16),  # tiling without overlap
        (30, 50, (16, 24), (16, 24)),  # non-overlapping strides, plus an edge window
        (12, 50, 16, 10),  # shorter than the window in height: one row of windows
        (16, 16, 32, 8),  # smaller than the window: one call
    ],
)
def test_sliding_window_of_a_pointwise_model_is_the_model(
    height: int, width: int, window: int | tuple, stride: int | tuple
) -> None:
    model = _conv1x1()
    x = _images(2, h=height, w=width)
    calls: list[tuple[int, int]] = []

    def model_fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape[-2:]))
        return model(t)

    with torch.no_grad():
        out = sliding_window(model_fn, x, window, stride, num_classes=5)
        expected = model(x)
    assert out.shape == (2, 5, height, width)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if height <= 16 and width <= 16:
        assert calls == [(height, width)]


def test_sliding_window_averages_overlaps() -> None:
    # A model returning ones counts windows: the average of ones is one, and the window grid is
    # the one expected: rows at 0, 8, 14 and columns at 0, 8, 16, 20 for 24 x 30 and 10 x 10.
    seen: list[tuple[int, int]] = []
    x = torch.zeros(1, 1, 24, 30)

    def model_fn(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape[-2:]))
        return torch.ones(1, 2, *t.shape[-2:])

    out = sliding_window(model_fn, x, 10, 8, num_classes=2)
    assert torch.equal(out, torch.ones(1, 2, 24, 30))
    assert seen == [(10, 10)] * 12


def test_sliding_window_rejects_bad_arguments() -> None:
    x = _images(1, h=20, w=20)
    with pytest.raises(ValueError, match="stride"):
        sliding_window(lambda t: t, x, 8, 10, num_classes=3)
    with pytest.raises(ValueError, match="model_fn returned"):
        sliding_window(lambda t: t[:, :1], x, 8, 8, num_classes=3)
