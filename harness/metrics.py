"""Scores per task, computed with torchmetrics. The first metric of a task selects trials."""

from __future__ import annotations

import math

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


def score(
    task: str, outputs: Tensor, y: Tensor | Split, num_classes: int
) -> dict[str, float | list[float]]:
    """``outputs``: logits ``(N, C)`` for classification, predicted labels ``(N, H, W)`` for
    segmentation; ``y`` the labels, or the split that holds them (masks are then read a few at
    a time)."""
    if task == "segmentation":
        return segmentation_metrics(outputs, y, num_classes)
    return classification_metrics(outputs, y.y if isinstance(y, Split) else y, num_classes)


def classification_metrics(logits: Tensor, y: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy (micro) and macro F1, precision and recall."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    if not torch.isfinite(logits).all():
        raise NonFiniteLossError("non-finite model outputs while scoring")
    preds, y = logits.argmax(1), y.cpu()
    kw = {"num_classes": num_classes}
    return {
        "accuracy": float(multiclass_accuracy(preds, y, average="micro", **kw)),
        "macro_f1": float(multiclass_f1_score(preds, y, average="macro", **kw)),
        "precision": float(multiclass_precision(preds, y, average="macro", **kw)),
        "recall": float(multiclass_recall(preds, y, average="macro", **kw)),
    }


def segmentation_metrics(
    preds: Tensor, y: Tensor | Split, num_classes: int
) -> dict[str, float | list[float]]:
    """Mean IoU over the classes that occur in prediction or truth (void pixels ignored), pixel
    accuracy, and the IoU of every class (NaN for a class absent from both)."""
    cm = confusion_matrix(preds, y, num_classes).double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    return {
        "miou": float(iou.nanmean()) if (union > 0).any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_iou": [float(v) for v in iou],
    }


def confusion_matrix(preds: Tensor, y: Tensor | Split, num_classes: int, chunk: int = 16) -> Tensor:
    """Pixel counts ``[truth, prediction]`` over masks ``(N, H, W)`` (a tensor, or a split's,
    read a chunk at a time), void truth left out, accumulated a few images at a time (whole-image
    masks at 1024x512 and more would not fit as one int64 index)."""
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for start in range(0, len(y), chunk):
        stop = start + chunk
        truth = y.labels_range(start, stop) if isinstance(y, Split) else y[start:stop]
        t = truth.cpu().long().flatten()
        p = preds[start : start + chunk].cpu().long().flatten()
        keep = t != IGNORE_INDEX
        cm += torch.bincount(t[keep] * num_classes + p[keep], minlength=num_classes * num_classes)
    return cm.view(num_classes, num_classes)


def is_finite_number(x: object) -> bool:
    """Whether ``x`` is a finite int or float: what a stored score or metric must be."""
    return isinstance(x, int | float) and math.isfinite(x)
