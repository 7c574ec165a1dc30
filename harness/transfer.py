"""Transferability scores: how well a backbone should transfer, from its features (and its source
classifier's outputs) on labelled images, before any fine-tuning; and how well such a score ranked
the backbones once the study has run (Kendall's tau against their fine-tuned test accuracy).

Every score is higher-is-better and is implemented here from its paper:

- LogME (You et al., ICML 2021): the log marginal evidence, per sample, of a Bayesian linear model
  from the features to each class's one-vs-rest target, with its prior precision alpha and noise
  precision beta set by fixed-point iteration; averaged over classes.
- LEEP (Nguyen et al., ICML 2020): the source classifier's softmax is a dummy label distribution
  over source classes z; the empirical P(y | z) turns it into a predictor of the target label y,
  whose mean log-likelihood is the score.
- NCE (Tran et al., ICCV 2019): the negative conditional entropy -H(Y | Z) of the target labels
  given the source classifier's hard labels.
- H-score (Bao et al., ICIP 2019): tr(cov(f)^-1 cov(E[f | y])), with a ridge proportional to the
  features' mean variance so that the score does not change when the features are scaled.

Only numpy and scipy: ``harness.publish`` imports this module too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: the scores in the order they are shown; "source head" marks those that need a source classifier
SCORES = ("logme", "leep", "nce", "hscore")
NEEDS_CLASSIFIER = frozenset({"leep", "nce"})
LABELS = {"logme": "LogME", "leep": "LEEP", "nce": "NCE", "hscore": "H-score"}
#: H-score's ridge, as a fraction of the features' mean variance
HSCORE_RIDGE = 1e-3


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} samples")
    return y


def _evidence(s2: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int) -> float:
    """The maximized log evidence per sample of one target ``y`` (LogME's inner loop), from the
    squared singular values ``s2`` of the features and ``z = U^T y`` (U the left singular vectors)."""
    alpha, beta = 1.0, 1.0
    z2 = z**2
    rest = max(y_norm2 - float(z2.sum()), 0.0)  # the part of y outside the features' span
    for _ in range(100):
        denom = alpha + beta * s2
        gamma = float((beta * s2 / denom).sum())
        m2 = float((beta**2 * s2 * z2 / denom**2).sum())  # ||m||^2, m the posterior mean
        res2 = float((alpha**2 * z2 / denom**2).sum()) + rest  # ||F m - y||^2
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / max(res2, 1e-300)
        done = abs(new_alpha - alpha) / alpha < 1e-6 and abs(new_beta - beta) / beta < 1e-6
        alpha, beta = new_alpha, new_beta
        if done:
            break
    denom = alpha + beta * s2
    m2 = float((beta**2 * s2 * z2 / denom**2).sum())
    res2 = float((alpha**2 * z2 / denom**2).sum()) + rest
    logdet = float(np.log(denom).sum()) + (d - len(s2)) * math.log(alpha)
    evidence = (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
    )
    return evidence / n


def logme(features: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """LogME: the mean over classes of the log evidence per sample of a Bayesian linear model from
    ``features`` (n, d) to the class's one-vs-rest indicator."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    y = _labels(labels, n)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    s2 = s**2
    keep = s2 > s2.max(initial=0.0) * 1e-12  # directions the features span
    u, s2 = u[:, keep], s2[keep]
    scores = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        scores.append(_evidence(s2, u.T @ target, float(target @ target), n, d))
    return float(np.mean(scores))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def leep(source_logits: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """LEEP from the source classifier's logits (n, source classes) and the target labels."""
    theta = _softmax(source_logits)
    n = len(theta)
    y = _labels(labels, n)
    classes = int(y.max()) + 1
    onehot = np.zeros((n, classes))
    onehot[np.arange(n), y] = 1.0
    joint = onehot.T @ theta / n  # P(y, z)
    p_z = joint.sum(axis=0, keepdims=True)
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)  # P(y | z)
    eep = (theta * cond[y]).sum(axis=1)  # sum_z P(y_i | z) theta_z(x_i)
    return float(np.log(np.maximum(eep, 1e-300)).mean())


def nce(source_labels: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """NCE: -H(Y | Z), Z the source classifier's hard labels, Y the target labels."""
    z = np.asarray(source_labels).astype(np.int64).reshape(-1)
    y = _labels(labels, len(z))
    joint = np.zeros((int(y.max()) + 1, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0)
    joint /= len(z)
    p_z = joint.sum(axis=0, keepdims=True)
    mask = joint > 0
    return float((joint[mask] * np.log((joint / np.where(p_z > 0, p_z, 1.0))[mask])).sum())


def hscore(features: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """H-score: tr(cov(f)^-1 cov(E[f | y])), cov(f) with a ridge of ``HSCORE_RIDGE`` times the
    features' mean variance (scale-free)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    y = _labels(labels, n)
    f = f - f.mean(axis=0, keepdims=True)
    cov = f.T @ f / n
    ridge = HSCORE_RIDGE * max(float(np.trace(cov)) / d, 1e-300)
    means = np.zeros_like(f)
    for c in np.unique(y):
        means[y == c] = f[y == c].mean(axis=0)
    between = means.T @ means / n
    return float(np.trace(np.linalg.solve(cov + ridge * np.eye(d), between)))


def kendall_tau(scores: Sequence[float], accuracies: Sequence[float]) -> float | None:
    """Kendall's tau-b between a score and the accuracies of the same backbones; ``None`` with
    fewer than 3 pairs of finite values, or where either side is constant."""
    from scipy.stats import kendalltau

    pairs = [
        (float(s), float(a))
        for s, a in zip(scores, accuracies, strict=True)
        if s is not None and a is not None and math.isfinite(s) and math.isfinite(a)
    ]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    tau = kendalltau([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(tau) if math.isfinite(tau) else None
