"""Per-image test outcomes of a final run, stored compactly beside its record so that the published
uncertainty can resample test images (:mod:`harness.publish.uncertainty`).

Two formats, each a small JSON object with the image count ``n`` and base64 ``data``:

- ``correct-bits`` (classification): one bit per test image, 1 where the prediction is right,
  packed eight to a byte (``numpy.packbits``, big-endian bit order);
- ``iou-counts`` (segmentation): per test image and class, the intersection and the union pixel
  counts (void pixels left out), as little-endian uint32 of shape ``(n, 2, classes)``, zlib-packed.
  Summed over images they give the split's intersections and unions, hence its mIoU.

Computing them reads only outputs already made for the test metrics (and, for segmentation, the
test masks again); they use no random numbers, so the trained numbers do not change.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.api import IGNORE_INDEX, Split

BITS = "correct-bits"
IOU_COUNTS = "iou-counts"


def classification_outcomes(logits: Tensor, y: Tensor) -> dict[str, Any]:
    """Whether each test image's top prediction is its label, as a ``correct-bits`` record."""
    correct = (logits.argmax(1).cpu() == y.cpu()).numpy().astype(bool)
    data = base64.b64encode(np.packbits(correct).tobytes()).decode("ascii")
    return {"format": BITS, "n": int(correct.size), "data": data}


def segmentation_outcomes(
    preds: Tensor, y: Tensor | Split, num_classes: int, chunk: int = 4
) -> dict[str, Any]:
    """Per-image intersection and union pixel counts per class (``iou-counts``), masks read a
    few at a time (fewer than :func:`harness.metrics.confusion_matrix` reads: the image index
    of every pixel is one more tensor of their size)."""
    c = num_classes
    counts = np.zeros((len(y), 2, c), dtype="<u4")
    for start in range(0, len(y), chunk):
        stop = min(start + chunk, len(y))
        truth = y.labels_range(start, stop) if isinstance(y, Split) else y[start:stop]
        t = truth.cpu().long().flatten(1)
        p = preds[start:stop].cpu().long().flatten(1)
        image = torch.arange(stop - start).unsqueeze(1).expand_as(t)
        keep = t != IGNORE_INDEX
        cm = torch.bincount(
            (image[keep] * c + t[keep]) * c + p[keep], minlength=(stop - start) * c * c
        ).view(stop - start, c, c)
        inter = cm.diagonal(dim1=1, dim2=2)
        union = cm.sum(1) + cm.sum(2) - inter
        counts[start:stop, 0] = inter.numpy()
        counts[start:stop, 1] = union.numpy()
    data = base64.b64encode(zlib.compress(counts.tobytes(), 6)).decode("ascii")
    return {"format": IOU_COUNTS, "n": len(y), "classes": c, "data": data}


def outcomes(task: str, outputs: Tensor, split: Split, num_classes: int) -> dict[str, Any]:
    """The per-image record of a task's test ``outputs`` (logits, or per-pixel labels)."""
    if task == "segmentation":
        return segmentation_outcomes(outputs, split, num_classes)
    return classification_outcomes(outputs, split.y)


def decode(record: Any) -> np.ndarray | None:
    """A stored record as an array: bool ``(n,)`` for ``correct-bits``, int64 ``(n, 2, classes)``
    for ``iou-counts``; None for anything else (a storage written before they were kept)."""
    if not isinstance(record, dict) or not isinstance(record.get("data"), str):
        return None
    try:
        n, raw = int(record["n"]), base64.b64decode(record["data"])
        if record.get("format") == BITS:
            return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).astype(bool)
        if record.get("format") == IOU_COUNTS:
            c = int(record["classes"])
            flat = np.frombuffer(zlib.decompress(raw), dtype="<u4")
            return flat.reshape(n, 2, c).astype(np.int64)
    except (KeyError, TypeError, ValueError, zlib.error):
        return None
    return None
