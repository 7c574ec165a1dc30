"""Metrics as plugins: what the harness feeds a metric, and what it returns.

A metric is built once per scoring (``factory(num_classes=K)``), fed the outputs of a whole split
in one or more ``update`` calls, and asked for its value with ``compute``:

- classification: ``update(logits, labels)``, float logits ``(N, K)`` and int64 labels ``(N,)``;
- segmentation: ``update(predicted, masks)``, int64 predicted classes and true classes
  ``(B, H, W)``, a few images at a time; true pixels equal to ``IGNORE_INDEX`` (255) are void.

``compute`` returns a float (a fraction, shown in %), or a list of floats (one per class, NaN
for a class absent from the split). The object has the shape of a torchmetrics ``Metric``, so
one of those can be registered through a small factory.
"""

from __future__ import annotations

from torch import Tensor


class Metric:
    """Base class of a metric; subclass it and implement ``update`` and ``compute``."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def update(self, outputs: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float | list[float]:
        raise NotImplementedError
