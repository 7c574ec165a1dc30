"""The registered selection rules of a study's task, what they read, and the pooled rules' scores.

Every trial records every per-trial rule's score (stored so that higher is better: a rule that
declares ``higher_is_better = False`` is stored negated) and, when a pooled rule is registered,
its target validation probabilities in a compact form. Pooled rules (EnsV) are scored from those
after the search, by :func:`pooled_scores`, wherever a trial is selected or judged.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from optuna.trial import FrozenTrial, TrialState

from harness.api.validation import (
    HELD_OUT_SOURCES,
    SEGMENTATION_INPUTS,
    Validator,
    declaration_problem,
)
from harness.errors import PluginContractError
from harness.registry import Registry
from harness.store.schema import PREDICTIONS, trial_scores

#: rows and classes kept per trial for pooled rules: a seeded subsample of rows, top-k classes
MAX_ROWS = 4096
TOP_K = 10


@dataclass(frozen=True)
class RuleSet:
    """The validators that serve one task, in registration order."""

    validators: dict[str, Validator]

    @property
    def per_trial(self) -> dict[str, Validator]:
        return {n: v for n, v in self.validators.items() if not v.pooled}

    @property
    def pooled(self) -> dict[str, Validator]:
        return {n: v for n, v in self.validators.items() if v.pooled}


#: validator inputs made of target images (their labels aside)
TARGET_IMAGE_INPUTS = ("target_logits", "target_features", "candidates")


def reads_unlabelled_target(validator: type[Validator] | Validator) -> bool:
    """Whether a rule reads target images without their labels (a label-free rule): what a
    strategy that sees no target image (``target_images = "none"``) cannot be selected by."""
    reads = validator.reads
    return any(r in TARGET_IMAGE_INPUTS for r in reads) and not validator.uses_target_labels()


def rules_for(
    rules: RuleSet, selection: list[str], sees_target: bool, several_sources: bool
) -> RuleSet:
    """The rules a method's trials are scored under: every registered rule, less the label-free
    ones for a method that sees no target image, and less the rules that train once more per
    source (leave-one-source-out) unless the study selects with them on a pair of several
    sources."""

    def kept(name: str, v: Validator) -> bool:
        if not sees_target and reads_unlabelled_target(v):
            return False
        return HELD_OUT_SOURCES not in v.reads or (several_sources and name in selection)

    return RuleSet({n: v for n, v in rules.validators.items() if kept(n, v)})


def rule_set(registry: Registry, task: str) -> RuleSet:
    """Build every registered validator of ``task`` once; one that breaks the contract is named
    with its plugin."""
    out: dict[str, Validator] = {}
    for name, entry in registry.entries["validator"].items():
        if task not in entry.tasks:
            continue
        validator = entry.factory()
        problem = declaration_problem(validator)
        if problem is None and task == "segmentation" and not validator.pooled:
            missing = [r for r in validator.reads if r not in SEGMENTATION_INPUTS]
            if missing:
                problem = f"serves segmentation but reads {missing[0]!r}, which it does not provide"
        if problem:
            raise PluginContractError(
                f"validator {name!r} of plugin {entry.plugin!r} ({entry.dist}): {problem}"
            )
        out[name] = validator
    return RuleSet(out)


def uses_target_labels(rule: str, registry: Registry | None = None) -> bool:
    """Whether the rule ``rule``, registered in ``registry`` (default: the process's), reads
    target labels (``target-val`` always does)."""
    if rule == "target-val":
        return True
    from harness.registry import get_registry

    entry = (registry or get_registry()).entries["validator"].get(rule)
    return entry is not None and entry.factory().uses_target_labels()


def stored(validator: Validator, value: float) -> float:
    """A rule's value as stored and ranked: higher is better."""
    return float(value) if validator.higher_is_better else -float(value)


class RuleInputs:
    """The menu of ``harness.api.VALIDATOR_INPUTS`` for one model, each item computed when a
    rule first reads it."""

    def __init__(self, providers: Mapping[str, Callable[[], Any]]) -> None:
        self._providers, self._values = providers, {}

    def get(self, item: str) -> Any:
        if item not in self._values:
            self._values[item] = self._providers[item]()
        return self._values[item]

    def for_rule(self, validator: Validator) -> dict[str, Any]:
        return {item: self.get(item) for item in validator.reads}


def score_all(rules: RuleSet, inputs: RuleInputs) -> dict[str, float]:
    """Every per-trial rule's stored score."""
    return {name: stored(v, v.score(inputs.for_rule(v))) for name, v in rules.per_trial.items()}


def encode_probabilities(logits: torch.Tensor) -> dict[str, Any]:
    """Softmax of ``logits`` as top-k float16 values and their classes, on a seeded subsample of
    at most ``MAX_ROWS`` rows (the same rows for every trial of a split)."""
    p = torch.softmax(logits.float(), dim=1)
    rows, classes = p.shape
    if rows > MAX_ROWS:
        keep = np.sort(np.random.default_rng(0).choice(rows, MAX_ROWS, replace=False))
        p = p[torch.from_numpy(keep)]
    k = min(TOP_K, classes)
    values, index = p.topk(k, dim=1)
    return {
        "classes": classes,
        "rows": int(p.shape[0]),
        "values": base64.b64encode(values.half().numpy().tobytes()).decode(),
        "index": base64.b64encode(index.to(torch.int32).numpy().tobytes()).decode(),
    }


def decode_probabilities(stored_: Mapping[str, Any]) -> torch.Tensor:
    """The dense (rows, classes) probabilities ``encode_probabilities`` kept (zero elsewhere)."""
    rows, classes = int(stored_["rows"]), int(stored_["classes"])
    values = np.frombuffer(base64.b64decode(stored_["values"]), np.float16).reshape(rows, -1)
    index = np.frombuffer(base64.b64decode(stored_["index"]), np.int32).reshape(rows, -1)
    dense = torch.zeros(rows, classes)
    dense.scatter_(
        1, torch.from_numpy(index.astype(np.int64)), torch.from_numpy(values.copy()).float()
    )
    return dense


def pooled_scores(trials: list[FrozenTrial], rules: RuleSet) -> dict[int, dict[str, float]]:
    """Each pooled rule's score of every completed trial that stored its predictions, by trial
    number, scored together (a trial without them, or of another row count, is left out)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and PREDICTIONS in t.user_attrs]
    out: dict[int, dict[str, float]] = {t.number: {} for t in done}
    if not rules.pooled or not done:
        return out
    probs = {t.number: decode_probabilities(t.user_attrs[PREDICTIONS]) for t in done}
    shape = max(
        {p.shape for p in probs.values()}, key=lambda s: sum(p.shape == s for p in probs.values())
    )
    numbers = [n for n, p in probs.items() if p.shape == shape]
    for name, validator in rules.pooled.items():
        values = validator.score_candidates([probs[n] for n in numbers])
        for n, v in zip(numbers, values, strict=True):
            out[n][name] = stored(validator, v)
    return out


def scores_with_pooled(
    trials: list[FrozenTrial], rules: RuleSet | None
) -> dict[int, dict[str, float]]:
    """Every trial's stored scores, with the pooled rules' scores added where they apply."""
    pooled = pooled_scores(trials, rules) if rules is not None else {}
    return {t.number: trial_scores(t) | pooled.get(t.number, {}) for t in trials}
