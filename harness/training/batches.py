"""Which images a training step reads: seeded batch orders over a split, and k-shot subsets."""

from __future__ import annotations

import torch
from torch import Tensor


def few_shot_indices(y: Tensor, shots: int, seed: int) -> Tensor:
    """``shots`` seeded indices per class (all of a class when it has fewer)."""
    if y.ndim != 1:
        raise ValueError("k-shot subsets are defined for class labels, not segmentation masks")
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    picks = []
    for label in torch.unique(y).tolist():
        idx = torch.nonzero(y == label).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.sort(torch.cat(picks)).values


class Batches:
    """Seeded random batches of indices into a split, reshuffled each pass."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.g = n, min(batch_size, n), generator
        self._perm: Tensor | None = None
        self._pos = 0

    def epoch(self) -> list[Tensor]:
        perm = torch.randperm(self.n, generator=self.g)
        batches = list(perm.split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:  # a batch of one breaks BatchNorm
            batches.pop()
        return batches

    def next(self) -> Tensor:
        if self._perm is None or self._pos + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=self.g)
            self._pos = 0
        out = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return out
