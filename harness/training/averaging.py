"""Averages of a model's weights, evaluated instead of the weights being trained: an exponential
moving average updated after every step (``ema.decay``), or SWA's uniform average of the weights
at the end of each epoch of the second half of training (a strategy's
``weight_average = "swa"``). Buffers (normalization statistics) are averaged with the weights."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """A running average of ``model``'s parameters and buffers (a copy of the model's tensors)."""

    def __init__(self, model: nn.Module, ema_decay: float | None) -> None:
        #: average after every optimizer step (EMA) rather than at the end of an epoch (SWA)
        self.per_step = ema_decay is not None
        avg = get_ema_multi_avg_fn(ema_decay) if ema_decay is not None else None
        self.averaged = AveragedModel(model, multi_avg_fn=avg, use_buffers=True)

    @property
    def count(self) -> int:
        """How many states of the weights have been averaged."""
        return int(self.averaged.n_averaged)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def epoch_ended(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """SWA: fold in the weights at the end of each epoch of the second half."""
        if not self.per_step and epoch >= epochs // 2:
            self.update(model)

    def _pairs(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        own = itertools.chain(model.parameters(), model.buffers())
        avg = itertools.chain(self.averaged.module.parameters(), self.averaged.module.buffers())
        return list(zip(own, avg, strict=True))

    @contextmanager
    def applied(self, model: nn.Module, keep: bool = False) -> Iterator[None]:
        """The averaged weights in ``model`` for the block (the trained ones back afterwards,
        unless ``keep``); nothing changes while nothing has been averaged."""
        if self.count == 0:
            yield
            return
        pairs = self._pairs(model)
        with torch.no_grad():
            raw = None if keep else [t.detach().clone() for t, _ in pairs]
            for t, a in pairs:
                t.copy_(a)
        try:
            yield
        finally:
            if raw is not None:
                with torch.no_grad():
                    for (t, _), r in zip(pairs, raw, strict=True):
                        t.copy_(r)


def weight_average(
    model: nn.Module, ema_decay: float | None, strategy_average: str | None
) -> WeightAverage | None:
    """The run's weight average: EMA when the recipe has a decay, SWA when the strategy declares
    ``weight_average = "swa"``, None otherwise."""
    if strategy_average not in (None, "swa"):
        raise ValueError(f"unknown weight_average {strategy_average!r}; allowed: None, 'swa'")
    if ema_decay is None and strategy_average is None:
        return None
    return WeightAverage(model, ema_decay)
