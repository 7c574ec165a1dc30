"""Batched crops on a whole ``(N, C, H, W)`` batch, on its own device, for training and evaluating
at real resolution (classification crops of 224 out of 256, segmentation crops of 512 x 512 out
of 1280 x 720, and sliding-window inference over whole images).

As in :mod:`harness.training.augment`, every random parameter is drawn per image with the
caller's ``torch.Generator`` (which lives on the images' device), the number of draws does not
depend on the outcome, and nothing loops over samples in Python:

- :func:`random_resized_crop` draws torchvision's ``RandomResizedCrop`` boxes
  (:func:`sample_resized_boxes`) and resamples them all with one ``grid_sample``
  (:func:`resized_crop`): bilinear for images, nearest for masks.
- :func:`random_crop` and :func:`center_crop` copy pixels exactly; where the image is smaller
  than the crop they pad images with 0 and masks with ``IGNORE_INDEX``.
- :func:`sliding_window` averages a segmentation model's logits over overlapping windows.

Functions given a ``mask`` (``(N, H, W)``, integer) return ``(images, mask)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.api import IGNORE_INDEX

__all__ = [
    "center_crop",
    "random_crop",
    "random_resized_crop",
    "resized_crop",
    "sample_resized_boxes",
    "sliding_window",
]

_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def _check(x: Tensor, mask: Tensor | None) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    if mask is not None and (
        mask.dim() != 3 or mask.shape != (x.shape[0], *x.shape[2:]) or mask.is_floating_point()
    ):
        raise ValueError(
            f"mask must be an integer tensor of shape (N, H, W) = {(x.shape[0], *x.shape[2:])}, "
            f"got {tuple(mask.shape)} {mask.dtype}"
        )


def _range(pair: tuple[float, float], name: str) -> tuple[float, float]:
    lo, hi = float(pair[0]), float(pair[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {tuple(pair)}")
    return lo, hi


def sample_resized_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(n, 4)`` int64 boxes ``(top, left, height, width)`` by torchvision's RandomResizedCrop rule.

    Per image, 10 candidates of area fraction uniform in ``scale`` and aspect ratio ``w / h``
    log-uniform in ``ratio`` are drawn at once and the first one that fits is kept, at a uniform
    position; an image with none gets torchvision's fallback, the central crop clamped to
    ``ratio``. The draws are the same whatever the outcome, so the generator always advances by
    the same amount. The random stream differs from torchvision's, the distribution does not.
    """
    scale, ratio = _range(scale, "scale"), _range(ratio, "ratio")
    area = float(height * width)
    fraction = scale[0] + (scale[1] - scale[0]) * torch.rand(
        n, _ATTEMPTS, generator=generator, device=device
    )
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(
        lo + (hi - lo) * torch.rand(n, _ATTEMPTS, generator=generator, device=device)
    )
    target = area * fraction
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fit, 0 if none
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    fb_h, fb_w = _fallback(height, width, ratio)
    found = fits.any(dim=1)
    h = torch.where(found, h, torch.full_like(h, fb_h))
    w = torch.where(found, w, torch.full_like(w, fb_w))
    # A uniform integer in [0, size - crop] per image; the clamp guards against float rounding of
    # rand * (span + 1) up to span + 1.
    pos = torch.rand(n, 2, generator=generator, device=device)
    top = torch.minimum((pos[:, 0] * (height - h + 1)).long(), height - h)
    left = torch.minimum((pos[:, 1] * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback box size: the whole image, clamped to the aspect ratio range."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return int(round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, int(round(height * ratio[1]))
    return height, width


def resized_crop(
    x: Tensor,
    boxes: Tensor,
    size: int | tuple[int, int],
    *,
    mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Crop box ``boxes[i] = (top, left, height, width)`` of image ``i`` and resize it to ``size``.

    One ``grid_sample`` for the batch, bilinear for the image and nearest for the mask, with
    ``align_corners=False``: the box's outer pixel edges map onto the output's outer pixel edges,
    so a box of the output's size is an exact copy. Boxes must lie inside the image.
    """
    _check(x, mask)
    out_h, out_w = _pair(size, "size")
    n, _, height, width = x.shape
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must have shape (N, 4) = {(n, 4)}, got {tuple(boxes.shape)}")
    grid = _box_grid(boxes.to(x.device), height, width, out_h, out_w)
    # As in augment: the CPU half-precision grid_sample kernel is unreliable, so sample in float32.
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = F.grid_sample(
        work, grid.to(work.dtype), mode="bilinear", padding_mode="border", align_corners=False
    ).to(x.dtype)
    if mask is None:
        return out
    sampled = F.grid_sample(
        mask.unsqueeze(1).float(), grid, mode="nearest", padding_mode="border", align_corners=False
    )
    return out, sampled.squeeze(1).to(mask.dtype)


def _box_grid(boxes: Tensor, height: int, width: int, out_h: int, out_w: int) -> Tensor:
    """The sampling grid of ``affine_grid`` for the per-image diagonal matrices
    ``[[w / W, 0, (2 left + w) / W - 1], [0, h / H, (2 top + h) / H - 1]]``, built by broadcasting
    since each coordinate depends on one axis only (same floats as ``affine_grid``)."""
    b = boxes.float()
    top, left, h, w = b[:, 0:1], b[:, 1:2], b[:, 2:3], b[:, 3:4]

    def steps(k: int) -> Tensor:  # output pixel centres in normalized units, as affine_grid's
        return torch.linspace(-1, 1, k, device=boxes.device) * (k - 1) / k

    xs = (w / width) * steps(out_w) + ((2 * left + w) / width - 1)  # (N, out_w)
    ys = (h / height) * steps(out_h) + ((2 * top + h) / height - 1)  # (N, out_h)
    n = boxes.shape[0]
    return torch.stack(
        [
            xs.view(n, 1, out_w).expand(n, out_h, out_w),
            ys.view(n, out_h, 1).expand(n, out_h, out_w),
        ],
        dim=-1,
    )


def random_resized_crop(
    x: Tensor,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None,
    mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """torchvision's ``RandomResizedCrop`` on a batch, a box per image (:func:`sample_resized_boxes`)
    resized to ``size`` (:func:`resized_crop`). ``generator`` lives on ``x.device``."""
    _check(x, mask)
    n, _, height, width = x.shape
    boxes = sample_resized_boxes(
        n, height, width, scale, ratio, generator=generator, device=x.device
    )
    return resized_crop(x, boxes, size, mask=mask)


def random_crop(
    x: Tensor,
    size: int | tuple[int, int],
    *,
    generator: torch.Generator | None,
    mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor | tuple[Tensor, Tensor]:
    """A ``size`` crop at a uniform random position per image, copied exactly (no resampling).

    On a side where the image is shorter than the crop, the image lands at a uniform position
    inside the crop and the rest is padding: 0 in images, ``ignore_index`` in masks (as
    torchvision's ``RandomCrop(pad_if_needed=True)``, which pads both sides by the shortfall).
    """
    _check(x, mask)
    crop_h, crop_w = _pair(size, "size")
    n, _, height, width = x.shape
    # Crop starts in [min(0, H - h), max(0, H - h)]: negative when the crop overhangs the image.
    tops = _starts(n, height, crop_h, generator, x.device)
    lefts = _starts(n, width, crop_w, generator, x.device)
    return _gather_crop(x, mask, tops, lefts, crop_h, crop_w, ignore_index)


def _starts(
    n: int, length: int, crop: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    lo, hi = min(0, length - crop), max(0, length - crop)
    return torch.randint(lo, hi + 1, (n,), generator=generator, device=device)


def _gather_crop(
    x: Tensor,
    mask: Tensor | None,
    tops: Tensor,
    lefts: Tensor,
    crop_h: int,
    crop_w: int,
    ignore_index: int,
) -> Tensor | tuple[Tensor, Tensor]:
    """Rows ``tops[i] + arange(crop_h)`` and columns ``lefts[i] + arange(crop_w)`` of image ``i``
    by two gathers; indices outside the image read as padding."""
    n, c, height, width = x.shape
    rows = tops.view(n, 1) + torch.arange(crop_h, device=x.device)  # (N, crop_h)
    cols = lefts.view(n, 1) + torch.arange(crop_w, device=x.device)  # (N, crop_w)
    outside = ((rows < 0) | (rows >= height)).view(n, crop_h, 1) | (
        (cols < 0) | (cols >= width)
    ).view(n, 1, crop_w)
    rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)

    def take(t: Tensor) -> Tensor:  # (N, K, H, W) -> (N, K, crop_h, crop_w)
        k = t.shape[1]
        t = t.gather(2, rows.view(n, 1, crop_h, 1).expand(n, k, crop_h, width))
        return t.gather(3, cols.view(n, 1, 1, crop_w).expand(n, k, crop_h, crop_w))

    pads = bool(crop_h > height or crop_w > width)  # static: no device sync to decide
    out = take(x)
    if pads:
        out = out.masked_fill(outside.unsqueeze(1), 0.0)
    if mask is None:
        return out
    cropped = take(mask.unsqueeze(1)).squeeze(1)
    if pads:
        cropped = cropped.masked_fill(outside, ignore_index)
    return out, cropped


def center_crop(
    x: Tensor,
    size: int | tuple[int, int],
    *,
    mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor | tuple[Tensor, Tensor]:
    """The central ``size`` crop, placed exactly as torchvision's ``center_crop`` places it (top =
    ``round((H - h) / 2)`` with Python's round half to even), for evaluation. A side shorter than
    the crop is padded as torchvision does, ``(h - H) // 2`` before: 0 in images, ``ignore_index``
    in masks. Returns views of the inputs when nothing is padded."""
    _check(x, mask)
    crop_h, crop_w = _pair(size, "size")
    height, width = x.shape[-2:]
    top, bottom = _centre(height, crop_h)
    left, right = _centre(width, crop_w)
    if min(top, bottom, left, right) >= 0:  # the crop lies inside: views, no copy
        out = x[..., top : top + crop_h, left : left + crop_w]
        return out if mask is None else (out, mask[..., top : top + crop_h, left : left + crop_w])
    # F.pad crops where the amounts are negative, so one call pads and crops each side.
    pad = (-left, -right, -top, -bottom)
    out = F.pad(x, pad, value=0.0)
    return out if mask is None else (out, F.pad(mask, pad, value=ignore_index))


def _centre(length: int, crop: int) -> tuple[int, int]:
    """Start and the amount cut off past the end, both negative where padding is needed."""
    # torchvision pads a short side by (crop - length) // 2 before; else starts at round(d / 2)
    before = -((crop - length) // 2) if crop > length else round((length - crop) / 2)
    return before, length - crop - before


def sliding_window(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
    num_classes: int | None = None,
) -> Tensor:
    """Per-pixel logits ``(N, num_classes, H, W)`` (float32) of a segmentation model over whole
    images larger than its input window.

    Windows of ``window`` at ``stride`` cover each side, the last one aligned to the image's
    edge; each pixel's logits are summed over the windows that cover it and divided by their
    count. On a side not longer than the window, the window is the whole side (the model then
    sees a smaller input, without padding), so an image that fits is one call. ``model_fn`` maps
    ``(N, C, h, w)`` to ``(N, num_classes, h, w)`` (``None``: as many as the first window
    gives); call this under ``torch.no_grad()``.
    """
    _check(x, None)
    win_h, win_w = _pair(window, "window")
    step_h, step_w = _pair(stride, "stride")
    if step_h > win_h or step_w > win_w:
        raise ValueError(f"stride {(step_h, step_w)} must not exceed window {(win_h, win_w)}")
    n, _, height, width = x.shape
    win_h, win_w = min(win_h, height), min(win_w, width)
    total: Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=x.device, dtype=torch.float32)
    for top in _window_starts(height, win_h, step_h):
        for left in _window_starts(width, win_w, step_w):
            logits = model_fn(x[..., top : top + win_h, left : left + win_w])
            if num_classes is None and logits.dim() == 4:
                num_classes = logits.shape[1]
            if total is None:
                total = x.new_zeros((n, num_classes, height, width), dtype=torch.float32)
            if logits.shape != (n, num_classes, win_h, win_w):
                raise ValueError(
                    f"model_fn returned {tuple(logits.shape)} for a window of {(win_h, win_w)}, "
                    f"expected {(n, num_classes, win_h, win_w)}"
                )
            total[..., top : top + win_h, left : left + win_w] += logits.float()
            count[..., top : top + win_h, left : left + win_w] += 1
    assert total is not None  # _window_starts gives at least one window per side
    return total.div_(count)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts every ``stride``, plus a last one flush with the end if the strides miss it."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts
