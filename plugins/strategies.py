"""Strategies for a labelled source and a target: the baseline and the supervised fine-tuning family.

The same code serves classification and segmentation: cross-entropy ignores void pixels (255).
"""

from __future__ import annotations

import torch.nn.functional as F

from harness import hookimpl
from harness.api import IGNORE_INDEX, Batch, StepContext, Strategy


class SourceOnly(Strategy):
    """Train on source labels only; the target is seen only when scoring. The baseline."""

    uses_source = True
    uses_target = False
    target_labels = "none"
    description = "train on source labels, evaluate on the target (baseline)"

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        return F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)


class FineTune(Strategy):
    """Start from the backbone's weights and train on target labels (all, or ``shots`` per class)."""

    uses_source = False
    uses_target = True
    description = "train on target labels from the pretrained/source weights"

    def __init__(self, shots: int | None = None) -> None:
        super().__init__()
        if shots is not None and (not isinstance(shots, int) or shots < 1):
            raise ValueError(f"shots must be a positive integer, got {shots!r}")
        self._shots = shots

    @property
    def shots(self) -> int | None:
        return self._shots

    @property
    def target_labels(self) -> str:  # type: ignore[override]
        return "few" if self._shots else "all"

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.target
        return F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)


class LinearProbe(FineTune):
    """Freeze the whole backbone and train only the head on target labels."""

    fixed = {"freeze_depth": "all"}
    description = "backbone frozen, head trained on target labels"


@hookimpl
def register_strategies(register):
    register("source-only", SourceOnly, description=SourceOnly.description)
    register("finetune", FineTune, description=FineTune.description)
    register("linear-probe", LinearProbe, description=LinearProbe.description)
