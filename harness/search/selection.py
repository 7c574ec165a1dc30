"""Selection rules (which validation data picks a method's trial) and the :class:`Scorer` that
scores a model under them; the target test split is read by :meth:`Scorer.evaluate_test` only."""

from __future__ import annotations

from typing import Any

import torch

from harness import api
from harness.metrics import primary_metric, score
from harness.search.context import Context
from harness.study import StudySpec
from harness.training.engine import Precision, Trainer, TransferModel, predict, unlabelled_logits
from harness.validators import VALIDATORS, validate


def resolve_rule(rule: str, strategy: api.Strategy) -> tuple[str, bool]:
    """A study's selection rule for one method, and whether that is oracle selection (target
    labels used by a method that claims not to need them)."""
    if rule == "auto":
        rule = "target-val" if strategy.target_labels != "none" else "source-val"
    # "few" counts too: its trials would be chosen with far more target labels than k per class
    oracle = rule == "target-val" and strategy.target_labels in ("none", "few")
    return rule, oracle


def selection_rules(spec: StudySpec, strategy: api.Strategy) -> list[tuple[str, bool]]:
    """Every rule the study selects with, resolved for ``strategy``; the first drives the search."""
    out: list[tuple[str, bool]] = []
    for rule in spec.selection_rules:
        resolved = resolve_rule(rule, strategy)
        if resolved not in out:
            out.append(resolved)
    return out


def selection_rule(spec: StudySpec, strategy: api.Strategy) -> tuple[str, bool]:
    """The rule that drives the search (the sampler and pruner see its scores)."""
    return selection_rules(spec, strategy)[0]


class Scorer:
    """Scores a model under the study's selection rules, and (final runs only) on the test split."""

    def __init__(self, ctx: Context) -> None:
        self.spec, self.device = ctx.spec, ctx.device

    def rule_score(
        self,
        rule: str,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
    ) -> float:
        """``model``'s score under a selection rule: accuracy (mIoU) on a labelled validation split,
        or a label-free validator on the unlabelled target validation images."""
        if rule in ("target-val", "source-val"):
            split = target.val if rule == "target-val" else source.val
            return self.split_score(
                predict(model, split, self.spec.batch_size * 4, self.device, precision),
                split,
                target,
            )
        return VALIDATORS[rule](self.validator_logits(model, target, precision))

    def all_scores(
        self,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
    ) -> dict[str, float]:
        """Every rule's score, recorded with each trial: the study's rules select from them, and the
        label-free validators are later compared with target-val (never used by the search).

        Two passes over validation images for classification (the target's logits serve both its
        accuracy and the validators), three for segmentation (whose predictions are labels)."""
        batch = self.spec.batch_size * 4
        target_out = predict(model, target.val, batch, self.device, precision)
        scores = {
            "target-val": self.split_score(target_out, target.val, target),
            "source-val": self.split_score(
                predict(model, source.val, batch, self.device, precision), source.val, target
            ),
        }
        logits = (
            target_out
            if self.spec.task == "classification"
            else self.validator_logits(model, target, precision)
        )
        return scores | validate(logits)

    def split_score(self, out: torch.Tensor, split: api.Split, target: api.DomainData) -> float:
        """The primary metric of outputs ``out`` on a labelled ``split``."""
        return float(
            score(self.spec.task, out, split, target.num_classes)[primary_metric(self.spec.task)]
        )

    def validator_logits(
        self, model: TransferModel, target: api.DomainData, precision: Precision
    ) -> torch.Tensor:
        """What label-free validators read: the target validation images' logits (through the
        frozen-feature cache where it applies), seeded pixels of them for segmentation."""
        batch = self.spec.batch_size * 4
        if self.spec.task == "classification":
            return predict(model, target.val, batch, self.device, precision)
        return unlabelled_logits(
            model, target.val, batch, self.device, precision, seed=self.spec.seed
        )

    def evaluate_test(self, trainer: Trainer, target: api.DomainData) -> dict[str, Any]:
        """The only place the target test split is read."""
        return score(self.spec.task, trainer.predict(target.test), target.test, target.num_classes)
