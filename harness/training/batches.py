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


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches :meth:`Batches.epoch` gives for ``n`` images (without drawing them)."""
    size = min(batch_size, n)
    steps = -(-n // size)
    if steps > 1 and n - (steps - 1) * size < 2:  # the batch of one it drops
        steps -= 1
    return steps


def domain_shares(batch_size: int, domains: int) -> list[int]:
    """``batch_size`` split evenly over ``domains``, the remainder to the first ones."""
    base, extra = divmod(batch_size, domains)
    return [base + (k < extra) for k in range(domains)]


class DomainBatches:
    """Batches over a pooled split (:mod:`harness.data.pooled`) that draw every source domain in
    equal shares per step (DomainBed's practice): each domain walks its own seeded permutation,
    reshuffled when spent, and an epoch has as many steps as the pooled split gives at
    ``batch_size``. A batch's indices are positions in the pooled split, domain by domain."""

    def __init__(self, domains: Tensor, batch_size: int, generator: torch.Generator) -> None:
        domains = domains.cpu()
        self.count = int(domains.max()) + 1 if len(domains) else 0
        self.positions = [torch.nonzero(domains == k).flatten() for k in range(self.count)]
        if any(len(p) == 0 for p in self.positions):
            raise ValueError("a source domain has no training images")
        shares = domain_shares(min(batch_size, len(domains)), self.count)
        self.walks = [
            Batches(len(p), share, generator) if share else None
            for p, share in zip(self.positions, shares, strict=True)
        ]
        self.steps = steps_per_epoch(len(domains), batch_size)

    def epoch(self) -> list[Tensor]:
        return [self.next() for _ in range(self.steps)]

    def next(self) -> Tensor:
        return torch.cat(
            [p[w.next()] for p, w in zip(self.positions, self.walks, strict=True) if w is not None]
        )


def batch_order(
    n: int, batch_size: int, generator: torch.Generator, domains: Tensor | None = None
) -> Batches | DomainBatches:
    """The batch order of a split of ``n`` images: :class:`Batches` (a one-domain split, drawn
    as it always was), or :class:`DomainBatches` given each image's ``domains`` index."""
    if domains is None:
        return Batches(n, batch_size, generator)
    return DomainBatches(domains, batch_size, generator)
