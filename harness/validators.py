"""Label-free validators: score a model from its predictions on unlabelled target images.

Each takes logits of shape (N, C) (one row per image, or per sampled pixel for segmentation) and
returns a float where **higher means a better model is expected**:

- ``entropy``: minus the mean prediction entropy (confident predictions score higher).
- ``im``: information maximization, entropy of the mean prediction minus the mean entropy:
  confident *and* diverse predictions score higher (Shi & Sha, 2012).
- ``snd``: soft neighbourhood density, the mean entropy of each prediction's softmax-weighted
  similarity to the others, at temperature 0.05 (Saito et al., 2021).
- ``bnm``: the nuclear norm of the softmax matrix over the number of rows (Cui et al., 2020).

None of them reads a label. How well each ranked a study's trials against their target accuracy
is reported after the search (``rank_agreement``); it is never used to select.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.metrics import is_finite_number

#: at most this many rows enter the quadratic SND similarity matrix (a seeded subsample)
SND_MAX_ROWS = 2048
SND_TEMPERATURE = 0.05


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


VALIDATORS: dict[str, Callable[[Tensor], float]] = {
    "entropy": neg_entropy,
    "im": information_maximization,
    "snd": soft_neighborhood_density,
    "bnm": batch_nuclear_norm,
}

DESCRIPTIONS = {
    "entropy": "minus the mean entropy of target predictions",
    "im": "information maximization: entropy of the mean prediction minus the mean entropy",
    "snd": "soft neighbourhood density of target predictions",
    "bnm": "batch nuclear norm of the target softmax matrix",
}


def validate(logits: Tensor) -> dict[str, float]:
    """Every validator's score for one set of unlabelled target logits."""
    return {name: fn(logits) for name, fn in VALIDATORS.items()}


def rank_agreement(scores: list[float], truth: list[float]) -> float | None:
    """Spearman rank correlation between a validator's scores and the true accuracies of the same
    trials (ties get average ranks); ``None`` with fewer than three finite pairs or no spread."""
    import pandas as pd

    pairs = [
        (s, t)
        for s, t in zip(scores, truth, strict=True)
        if is_finite_number(s) and is_finite_number(t)
    ]
    if len(pairs) < 3:
        return None
    frame = pd.DataFrame(pairs, columns=["score", "truth"]).rank()
    if frame["score"].nunique() < 2 or frame["truth"].nunique() < 2:
        return None
    return float(frame["score"].corr(frame["truth"]))
