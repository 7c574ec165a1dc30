"""The one step from stored images to model input: uint8 -> float in [0, 1] -> the backbone's
normalization -> the memory format of the precision.

Every path that feeds a model (training batches, evaluation, cached features, ``Strategy.adapt``)
goes through here, so they all see bit-identical inputs. Augmentation, when there is any, runs
between ``unit_pixels`` and ``normalized``, on pixels in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from harness.api.data import Split
from harness.training import crops


def unit_pixels(x_uint8: Tensor, device: torch.device | None = None) -> Tensor:
    """uint8 images as float32 in [0, 1], moved to ``device`` first when given (a uint8 copy is
    a quarter of a float one)."""
    if device is not None:
        x_uint8 = x_uint8.to(device, non_blocking=True)
    return x_uint8.float().div_(255.0)


def normalized(x: Tensor, model: Any, channels_last: bool) -> Tensor:
    """Pixels in [0, 1] normalized for ``model`` (its ``normalize``), in channels_last memory
    format when the precision asks for it."""
    x = model.normalize(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def model_input(
    x_uint8: Tensor, model: Any, channels_last: bool, device: torch.device | None = None
) -> Tensor:
    """uint8 images as ``model`` takes them, without augmentation: the center crop of its input
    size where they are stored larger."""
    return normalized(centered(unit_pixels(x_uint8, device), model), model, channels_last)


def centered(x: Tensor, model: Any) -> Tensor:
    """For a classifier, the center crop of ``model.input_size`` of images stored larger (else
    ``x`` itself: segmentation scores whole images)."""
    size = getattr(model, "input_size", None)
    if size is None or x.shape[-2:] == (size, size) or model.task != "classification":
        return x
    return crops.center_crop(x, size)


def training_crop(
    x: Tensor,
    y: Tensor | None,
    model: Any,
    augment: str,
    crop_scale: float | None,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor | None]:
    """A training batch (pixels in [0, 1]) cropped to ``model.input_size``; a mask moves with its
    image. Stored larger: for a classifier the center crop without augmentation (so frozen
    features stay cacheable), else a random crop, or a random resized crop when the trial has
    ``augment.crop_scale``; for segmentation a random crop with its mask (void where the image is
    smaller). Stored at the input size: unchanged, except a classifier's random resized crop of
    the whole image back to its size when the trial has ``augment.crop_scale`` and augments."""
    size = getattr(model, "input_size", None)
    mask = y if y is not None and y.ndim == 3 else None
    if size is None:
        return x, y
    if x.shape[-2:] == (size, size):
        if crop_scale is None or augment == "none" or mask is not None:
            return x, y
        scale = (float(crop_scale), 1.0)
        return crops.random_resized_crop(x, size, scale, generator=generator), y
    if mask is not None:
        return crops.random_crop(x, size, generator=generator, mask=mask)
    if augment == "none":
        out = crops.center_crop(x, size)
    elif crop_scale is not None:
        out = crops.random_resized_crop(x, size, (float(crop_scale), 1.0), generator=generator)
    else:
        out = crops.random_crop(x, size, generator=generator)
    return out, y  # type: ignore[return-value]


def image_batches(images: Tensor | Split, batch_size: int) -> Iterator[Tensor]:
    """Consecutive batches of uint8 images, in order: slices of a tensor, gathers from a split
    (a view of a mapped store is read one batch at a time)."""
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        yield images[start:stop] if isinstance(images, Tensor) else images.range(start, stop)
