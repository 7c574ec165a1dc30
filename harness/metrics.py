"""Scores per task through the registered metrics (``register_metrics``; the built-ins are in
``plugins/metrics.py``). The first metric of a task ranks rows and selects trials."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from harness.api import IGNORE_INDEX, Split
from harness.errors import NonFiniteLossError

METRICS = {
    "classification": ("accuracy", "macro_f1", "precision", "recall"),
    "segmentation": ("miou", "pixel_accuracy"),
}
LABELS = {
    "accuracy": "acc",
    "macro_f1": "macro-F1",
    "precision": "precision",
    "recall": "recall",
    "miou": "mIoU",
    "pixel_accuracy": "pixel acc",
}


def primary_metric(task: str) -> str:
    return METRICS[task][0]


def default_metrics(task: str) -> tuple[str, ...]:
    """What a study reports without ``metrics`` (segmentation: with the IoU of each class)."""
    return METRICS[task] + (("per_class_iou",) if task == "segmentation" else ())


def reported_metrics(task: str, names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The metrics a study reports: its ``metrics`` behind the task's primary one, or the
    defaults; the primary always comes first (rows are ranked by it)."""
    if not names:
        return list(default_metrics(task))
    primary = primary_metric(task)
    return [primary, *(n for n in dict.fromkeys(names) if n != primary)]


def metric_label(name: str) -> str:
    """A metric's short name in tables: its registered ``label``, else its name."""
    if name in LABELS:
        return LABELS[name]
    from harness.registry import get_registry

    entry = get_registry().entries["metric"].get(name)
    return str(entry.meta.get("label", name)) if entry is not None else name


def score(
    task: str,
    outputs: Tensor,
    y: Tensor | Split,
    num_classes: int,
    names: list[str] | tuple[str, ...] = (),
) -> dict[str, float | list[float]]:
    """The registered metrics ``names`` (default: the task's) of ``outputs``: logits ``(N, C)``
    for classification, predicted labels ``(N, H, W)`` for segmentation; ``y`` the labels, or
    the split that holds them (masks are then read a few at a time)."""
    from harness.registry import get_registry

    names = list(names or default_metrics(task))
    entries = get_registry().entries["metric"]
    metrics = {n: entries[n].factory(num_classes=num_classes) for n in names}
    if task == "segmentation":
        for truth, pred in _chunks(outputs, y):
            for m in metrics.values():
                m.update(pred, truth)
    else:
        if not torch.isfinite(outputs).all():
            raise NonFiniteLossError("non-finite model outputs while scoring")
        labels = (y.y if isinstance(y, Split) else y).cpu()
        for m in metrics.values():
            m.update(outputs, labels)
    return {n: m.compute() for n, m in metrics.items()}


def _chunks(preds: Tensor, y: Tensor | Split, chunk: int = 16) -> Iterator[tuple[Tensor, Tensor]]:
    """(true, predicted) masks as int64, a few images at a time (whole-image masks at 1024x512
    and more would not fit as one int64 index)."""
    for start in range(0, len(y), chunk):
        stop = start + chunk
        truth = y.labels_range(start, stop) if isinstance(y, Split) else y[start:stop]
        yield truth.cpu().long(), preds[start:stop].cpu().long()


def classification_metrics(logits: Tensor, y: Tensor, num_classes: int) -> dict[str, Any]:
    """The default classification metrics (accuracy, macro F1, precision and recall)."""
    return score("classification", logits, y, num_classes)


def segmentation_metrics(preds: Tensor, y: Tensor | Split, num_classes: int) -> dict[str, Any]:
    """The default segmentation metrics (mIoU, pixel accuracy, the IoU of each class)."""
    return score("segmentation", preds, y, num_classes)


def confusion_matrix(preds: Tensor, y: Tensor | Split, num_classes: int, chunk: int = 16) -> Tensor:
    """Pixel counts ``[truth, prediction]`` over masks ``(N, H, W)`` (a tensor, or a split's,
    read a chunk at a time), void truth left out, accumulated a few images at a time (whole-image
    masks at 1024x512 and more would not fit as one int64 index)."""
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for truth, pred in _chunks(preds, y, chunk):
        t, p = truth.flatten(), pred.flatten()
        keep = t != IGNORE_INDEX
        cm += torch.bincount(t[keep] * num_classes + p[keep], minlength=num_classes * num_classes)
    return cm.view(num_classes, num_classes)


def is_finite_number(x: object) -> bool:
    """Whether ``x`` is a finite int or float: what a stored score or metric must be."""
    return isinstance(x, int | float) and math.isfinite(x)
