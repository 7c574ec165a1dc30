"""The built-in selection rules, registered as any plugin registers its own.

Labelled rules: ``target-val`` and ``source-val``, the task's primary metric on a labelled
validation split (``target-val`` is oracle for methods that claim to need no target labels).

Label-free rules, higher meaning a better model is expected:

- ``entropy``: minus the mean entropy of target predictions.
- ``im``: information maximization, entropy of the mean prediction minus the mean entropy
  (Shi & Sha, 2012).
- ``snd``: soft neighbourhood density at temperature 0.05 (Saito et al., 2021).
- ``bnm``: the nuclear norm of the target softmax matrix over its rows (Cui et al., 2020).
- ``dev``: Deep Embedded Validation (You et al., 2019), the source validation loss weighted by
  the density ratio target/source of each image's features, from a domain classifier, with the
  control variate that lowers its variance. A risk: stored negated.
- ``ensv``: EnsV (Hu et al., 2023), each trial's agreement with the ensemble of every completed
  trial of the method (pooled: scored after the search).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harness import hookimpl
from harness.api import Validator

#: at most this many rows enter the quadratic SND similarity matrix (a seeded subsample)
SND_MAX_ROWS = 2048
SND_TEMPERATURE = 0.05
#: DEV's domain classifier is fitted on one half of the rows and weighs the other (twice)
DEV_FOLDS = 2


def _entropy_rows(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1)


def neg_entropy(logits: Tensor) -> float:
    p = F.softmax(logits.float(), dim=1)
    return float(-_entropy_rows(p).mean())


def information_maximization(logits: Tensor) -> float:
    p = F.softmax(logits.float(), dim=1)
    return float(_entropy_rows(p.mean(0, keepdim=True))[0] - _entropy_rows(p).mean())


def soft_neighborhood_density(
    logits: Tensor, temperature: float = SND_TEMPERATURE, seed: int = 0
) -> float:
    p = F.softmax(logits.float(), dim=1)
    if p.shape[0] > SND_MAX_ROWS:
        g = torch.Generator().manual_seed(seed)
        p = p[torch.randperm(p.shape[0], generator=g)[:SND_MAX_ROWS].to(p.device)]
    if p.shape[0] < 2:
        return 0.0
    q = F.normalize(p, dim=1)
    sim = q @ q.T
    sim.fill_diagonal_(-math.inf)  # a prediction is not its own neighbour
    return float(_entropy_rows(F.softmax(sim / temperature, dim=1)).mean())


def batch_nuclear_norm(logits: Tensor) -> float:
    p = F.softmax(logits.float(), dim=1)
    return float(torch.linalg.svdvals(p).sum() / p.shape[0])


def density_ratios(source: np.ndarray, target: np.ndarray, seed: int = 0) -> np.ndarray:
    """p_target(x) / p_source(x) at each source row, from a logistic domain classifier on
    standardized features, cross-fitted: each half of the rows is weighed by a classifier that
    did not see it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    s_fold = rng.permutation(len(source)) % DEV_FOLDS
    t_fold = rng.permutation(len(target)) % DEV_FOLDS
    weights = np.ones(len(source))
    for k in range(DEV_FOLDS):
        xs, xt = source[s_fold != k], target[t_fold != k]
        if len(xs) == 0 or len(xt) == 0 or not (s_fold == k).any():
            continue
        scaler = StandardScaler().fit(np.concatenate([xs, xt]))
        x = scaler.transform(np.concatenate([xs, xt]))
        y = np.r_[np.zeros(len(xs)), np.ones(len(xt))]
        clf = LogisticRegression(max_iter=1000).fit(x, y)
        p = np.clip(clf.predict_proba(scaler.transform(source[s_fold == k]))[:, 1], 1e-6, 1 - 1e-6)
        weights[s_fold == k] = p / (1 - p) * len(xs) / len(xt)
    return weights


def dev_risk(losses: np.ndarray, weights: np.ndarray) -> float:
    """The importance-weighted mean loss with DEV's control variate: the weights' mean is 1 in
    expectation, so their deviation from it corrects the weighted loss."""
    weighted = losses * weights
    var = float(np.var(weights, ddof=1)) if len(weights) > 1 else 0.0
    eta = -float(np.cov(weighted, weights, ddof=1)[0, 1]) / var if var > 0 else 0.0
    return float(weighted.mean() + eta * weights.mean() - eta)


def ensemble_agreement(candidates: Sequence[Tensor]) -> list[float]:
    """Each candidate's accuracy against the ensemble's labels (the argmax of the mean of every
    candidate's probabilities)."""
    probs = torch.stack([c.float() for c in candidates])
    ensemble = probs.mean(0).argmax(1)
    return [float((p.argmax(1) == ensemble).float().mean()) for p in probs]


class Labelled(Validator):
    """The task's primary metric on a labelled validation split."""

    def score(self, inputs: Mapping[str, Any]) -> float:
        return float(inputs[self.reads[0]])


class TargetVal(Labelled):
    reads = ("target_metric",)


class SourceVal(Labelled):
    reads = ("source_metric",)


class LeaveOneSourceOut(Labelled):
    reads = ("held_out_source_metric",)


class OnTargetLogits(Validator):
    fn: Any = None

    def score(self, inputs: Mapping[str, Any]) -> float:
        return type(self).fn(inputs["target_logits"])


class Entropy(OnTargetLogits):
    fn = staticmethod(neg_entropy)


class InformationMaximization(OnTargetLogits):
    fn = staticmethod(information_maximization)


class SoftNeighborhoodDensity(OnTargetLogits):
    fn = staticmethod(soft_neighborhood_density)


class BatchNuclearNorm(OnTargetLogits):
    fn = staticmethod(batch_nuclear_norm)


class DeepEmbeddedValidation(Validator):
    reads = ("source_features", "target_features", "source_logits", "source_labels")
    higher_is_better = False

    def score(self, inputs: Mapping[str, Any]) -> float:
        weights = density_ratios(
            inputs["source_features"].float().numpy(), inputs["target_features"].float().numpy()
        )
        losses = F.cross_entropy(
            inputs["source_logits"].float(), inputs["source_labels"].long(), reduction="none"
        )
        return dev_risk(losses.numpy().astype(np.float64), weights)


class EnsembleValidation(Validator):
    reads = ("candidates",)
    pooled = True

    def score_candidates(self, candidates: Sequence[Tensor]) -> list[float]:
        return ensemble_agreement(candidates)


@hookimpl
def register_validators(register: Any) -> None:
    register("target-val", TargetVal, "primary metric on the labelled target validation split")
    register("source-val", SourceVal, "primary metric on the labelled source validation split")
    register(
        "leave-one-source-out",
        LeaveOneSourceOut,
        "several sources: mean primary metric on each source's validation split of a model "
        "trained without it (one more training per source)",
    )
    register("entropy", Entropy, "minus the mean entropy of target predictions")
    register(
        "im",
        InformationMaximization,
        "information maximization: entropy of the mean prediction minus the mean entropy",
    )
    register("snd", SoftNeighborhoodDensity, "soft neighbourhood density of target predictions")
    register("bnm", BatchNuclearNorm, "batch nuclear norm of the target softmax matrix")
    register(
        "dev",
        DeepEmbeddedValidation,
        "deep embedded validation: density-ratio weighted source validation loss (negated)",
        tasks=("classification",),
    )
    register(
        "ensv",
        EnsembleValidation,
        "EnsV: agreement with the ensemble of every trial's target predictions (pooled)",
    )
