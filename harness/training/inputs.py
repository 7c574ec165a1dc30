"""The one step from stored images to model input: uint8 -> float in [0, 1] -> the backbone's
normalization -> the memory format of the precision.

Every path that feeds a model (training batches, evaluation, cached features, ``Strategy.adapt``)
goes through here, so they all see bit-identical inputs. Augmentation, when there is any, runs
between ``unit_pixels`` and ``normalized``, on pixels in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
    """uint8 images as ``model`` takes them, without augmentation."""
    return normalized(unit_pixels(x_uint8, device), model, channels_last)
