"""The built-in metrics, registered as any plugin registers its own.

Classification (from the logits of a whole split, with torchmetrics): ``accuracy`` (micro),
``macro_f1``, ``precision`` and ``recall`` (macro), ``balanced_accuracy`` (the mean of the
per-class recalls: VisDA-2017's mean class accuracy), ``top5`` (the true class among the five
highest logits; all classes when there are fewer).

Segmentation (from pixel counts ``[truth, prediction]`` accumulated a few images at a time, void
pixels left out): ``miou`` (mean IoU over the classes present in prediction or truth),
``pixel_accuracy``, ``dice`` (mean Dice over the same classes), ``per_class_iou`` (a list, NaN
for a class absent from both).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from harness import hookimpl
from harness.api import IGNORE_INDEX
from harness.api.metric import Metric


class _Logits(Metric):
    """Keeps every row of logits and labels; scores them once at the end."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.logits: list[Tensor] = []
        self.labels: list[Tensor] = []

    def update(self, outputs: Tensor, target: Tensor) -> None:
        self.logits.append(outputs)
        self.labels.append(target)

    def compute(self) -> float:
        preds = torch.cat(self.logits).argmax(1)
        return float(self.score(preds, torch.cat(self.labels).cpu()))

    def score(self, preds: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError


def _classification(fn_name: str, average: str) -> type[_Logits]:
    """A metric of torchmetrics' functional ``fn_name`` over argmax predictions."""

    class _One(_Logits):
        def score(self, preds: Tensor, labels: Tensor) -> Tensor:
            from torchmetrics.functional import classification

            fn = getattr(classification, fn_name)
            return fn(preds, labels, num_classes=self.num_classes, average=average)

    _One.__name__ = f"{fn_name}_{average}"
    return _One


class TopK(_Logits):
    k = 5

    def compute(self) -> float:
        logits, labels = torch.cat(self.logits), torch.cat(self.labels).cpu()
        top = logits.topk(min(self.k, logits.shape[1]), dim=1).indices.cpu()
        return float((top == labels[:, None]).any(1).float().mean())


class _Counts(Metric):
    """Accumulates the pixel confusion matrix ``[truth, prediction]``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.cm = torch.zeros(num_classes * num_classes, dtype=torch.int64)

    def update(self, outputs: Tensor, target: Tensor) -> None:
        t, p = target.cpu().long().flatten(), outputs.cpu().long().flatten()
        keep = t != IGNORE_INDEX
        k = self.num_classes
        self.cm += torch.bincount(t[keep] * k + p[keep], minlength=k * k)

    def parts(self) -> tuple[Tensor, Tensor, Tensor]:
        cm = self.cm.view(self.num_classes, self.num_classes).double()
        tp = cm.diagonal()
        return cm, tp, cm.sum(0) + cm.sum(1) - tp

    def per_class_iou(self) -> Tensor:
        _, tp, union = self.parts()
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


class MeanIoU(_Counts):
    def compute(self) -> float:
        iou = self.per_class_iou()
        return float(iou.nanmean()) if not torch.isnan(iou).all() else 0.0


class PixelAccuracy(_Counts):
    def compute(self) -> float:
        cm, tp, _ = self.parts()
        total = cm.sum()
        return float(tp.sum() / total) if total > 0 else 0.0


class Dice(_Counts):
    def compute(self) -> float:
        cm, tp, union = self.parts()
        sizes = cm.sum(0) + cm.sum(1)  # |prediction| + |truth| per class
        present = union > 0
        return float((2 * tp[present] / sizes[present]).mean()) if present.any() else 0.0


class PerClassIoU(_Counts):
    def compute(self) -> list[float]:
        return [float(v) for v in self.per_class_iou()]


SEG = ("segmentation",)


@hookimpl
def register_metrics(register: Any) -> None:
    cls = _classification
    register("accuracy", cls("multiclass_accuracy", "micro"), "accuracy (micro)", label="acc")
    register("macro_f1", cls("multiclass_f1_score", "macro"), "macro F1", label="macro-F1")
    register(
        "precision", cls("multiclass_precision", "macro"), "macro precision", label="precision"
    )
    register("recall", cls("multiclass_recall", "macro"), "macro recall", label="recall")
    register(
        "balanced_accuracy",
        cls("multiclass_accuracy", "macro"),
        "mean of the per-class recalls (VisDA-2017's mean class accuracy)",
        label="balanced acc",
    )
    register("top5", TopK, "true class among the five highest logits", label="top-5 acc")
    register("miou", MeanIoU, "mean IoU over classes present", tasks=SEG, label="mIoU")
    register("pixel_accuracy", PixelAccuracy, "pixel accuracy", tasks=SEG, label="pixel acc")
    register("dice", Dice, "mean Dice over classes present", tasks=SEG, label="Dice")
    register("per_class_iou", PerClassIoU, "IoU of each class", tasks=SEG, label="IoU per class")
