"""Selection rules (which validation data picks a method's trial) and the :class:`Scorer` that
scores a model under them; the target test split is read by :meth:`Scorer.evaluate_test` only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from harness import api
from harness.data.pooled import num_domains, source_domain
from harness.metrics import primary_metric, reported_metrics, score
from harness.registry import Registry
from harness.rules import (
    RuleInputs,
    RuleSet,
    encode_probabilities,
    rule_set,
    rules_for,
    score_all,
    stored,
    uses_target_labels,
)
from harness.search.context import Context
from harness.store import per_image
from harness.study import StudySpec
from harness.training.engine import Precision, Trainer, TransferModel, predict, unlabelled_logits
from harness.training.features import compute_features


def resolve_rule(
    rule: str, strategy: api.Strategy, registry: Registry | None = None
) -> tuple[str, bool]:
    """A study's selection rule for one method, and whether that is oracle selection (target
    labels used by a method that claims not to need them)."""
    if rule == "auto":
        rule = "target-val" if strategy.target_labels != "none" else "source-val"
    # "few" counts too: its trials would be chosen with far more target labels than k per class
    oracle = uses_target_labels(rule, registry) and strategy.target_labels in ("none", "few")
    return rule, oracle


def selection_rules(
    spec: StudySpec, strategy: api.Strategy, registry: Registry | None = None
) -> list[tuple[str, bool]]:
    """Every rule the study selects with, resolved for ``strategy`` (rules looked up in
    ``registry``, default the process's); the first drives the search."""
    out: list[tuple[str, bool]] = []
    for rule in spec.selection_rules:
        resolved = resolve_rule(rule, strategy, registry)
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
        self.rules = rule_set(ctx.registry, ctx.spec.task)

    def method_rules(self, strategy: api.Strategy, source: api.DomainData) -> RuleSet:
        """The rules ``strategy``'s models are scored under on a pair with ``source``
        (:func:`harness.rules.rules_for`)."""
        return rules_for(
            self.rules,
            self.spec.selection_rules,
            strategy.target_images != "none",
            num_domains(source) > 1,
        )

    def rule_score(
        self,
        rule: str,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
    ) -> float:
        """``model``'s stored score under one per-trial rule (higher is better)."""
        validator = self.rules.per_trial[rule]
        inputs = self.inputs(model, source, target, precision)
        return stored(validator, validator.score(inputs.for_rule(validator)))

    def all_scores(
        self,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
        rules: RuleSet | None = None,
        extra: Mapping[str, Callable[[], Any]] | None = None,
    ) -> dict[str, float]:
        """Every rule's score (of ``rules``, default every registered one but those that train
        once more per source), recorded with each
        trial: the study's rules select from them, and the label-free ones are later compared
        with target-val (never used by the search)."""
        return self.scores_and_predictions(model, source, target, precision, rules, extra)[0]

    def scores_and_predictions(
        self,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
        rules: RuleSet | None = None,
        extra: Mapping[str, Callable[[], Any]] | None = None,
    ) -> tuple[dict[str, float], dict[str, Any] | None]:
        """:meth:`all_scores`, and the compact target probabilities pooled rules read (None when
        no pooled rule is scored). Each validation split is predicted once; ``extra`` adds
        items of the menu only the caller can compute (``held_out_source_metric``)."""
        rules = rules_for(self.rules, [], True, False) if rules is None else rules
        inputs = self.inputs(model, source, target, precision, extra)
        scores = score_all(rules, inputs)
        kept = encode_probabilities(inputs.get("target_logits")) if rules.pooled else None
        return scores, kept

    def inputs(
        self,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
        extra: Mapping[str, Callable[[], Any]] | None = None,
    ) -> RuleInputs:
        """The validators' menu for ``model``, each item computed on first use."""
        batch, device, seg = (
            self.spec.batch_size * 4,
            self.device,
            self.spec.task != "classification",
        )
        inputs: RuleInputs

        def out(split: api.Split) -> torch.Tensor:
            return predict(model, split, batch, device, precision)

        def features(split: api.Split) -> torch.Tensor:
            with torch.no_grad():
                return compute_features(model, split, precision, device, batch).float().cpu()

        providers = {
            "target_out": lambda: out(target.val),
            "source_out": lambda: out(source.val),
            "target_metric": lambda: self.split_score(inputs.get("target_out"), target.val, target),
            "source_metric": lambda: self.source_metric(inputs.get("source_out"), source, target),
            "target_logits": lambda: (
                self.validator_logits(model, target, precision) if seg else inputs.get("target_out")
            ),
            "target_labels": lambda: target.val.y,
            "source_logits": lambda: inputs.get("source_out"),
            "source_labels": lambda: source.val.y,
            "target_features": lambda: features(target.val),
            "source_features": lambda: features(source.val),
        }
        inputs = RuleInputs({**providers, **(extra or {})})
        return inputs

    def source_metric(
        self, out: torch.Tensor, source: api.DomainData, target: api.DomainData
    ) -> float:
        """The primary metric on the source validation split; for pooled sources the mean of
        each source domain's (DomainBed's training-domain validation), so that a larger domain
        does not outweigh the others."""
        domains = source_domain(source, "val")
        if domains is None:
            return self.split_score(out, source.val, target)
        values = []
        for k in range(num_domains(source)):
            rows = torch.nonzero(domains == k).flatten()
            values.append(
                self.split_score(out[rows.to(out.device)], source.val.subset(rows), target)
            )
        return sum(values) / len(values)

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

    def evaluate_test(
        self, trainer: Trainer, target: api.DomainData
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The only place the target test split is read: the test metrics, and the per-image
        outcomes they are made of (:mod:`harness.store.per_image`) for the published intervals."""
        test, out = target.test, trainer.predict(target.test)
        names = reported_metrics(self.spec.task, self.spec.metrics)
        if self.spec.task == "segmentation" and "per_class_iou" not in names:
            names.append("per_class_iou")  # the board's per-class IoU row
        metrics = score(self.spec.task, out, test, target.num_classes, names)
        return metrics, per_image.outcomes(self.spec.task, out, test, target.num_classes)
