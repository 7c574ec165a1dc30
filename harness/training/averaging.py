"""Averages of a model's weights, evaluated instead of the weights being trained: an exponential
moving average updated after every step (``ema.decay``), or SWA's uniform average of the weights
at the end of each epoch of the second half of training (a strategy's
``weight_average = "swa"``).

The EMA's decay warms up as timm's and TensorFlow's do, ``min(decay, (1 + n) / (10 + n))`` after
``n`` updates, so that a run of a few hundred steps is not scored with weights still close to
their initialization; its buffers (normalization statistics) are averaged with the weights. SWA's
batch-norm statistics are recomputed for the averaged weights in one pass over the training
images (as ``torch.optim.swa_utils.update_bn``): an average of each epoch's statistics describes
none of the averaged networks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from harness.training.evaluate import forward
from harness.training.model import TransferModel


class WeightAverage:
    """A running average of ``model``'s parameters and buffers (a copy of the model's tensors)."""

    def __init__(self, model: nn.Module, ema_decay: float | None) -> None:
        #: average after every optimizer step (EMA) rather than at the end of an epoch (SWA)
        self.per_step = ema_decay is not None
        self.ema_decay = ema_decay
        avg = self._ema_update if ema_decay is not None else None
        self.averaged = AveragedModel(model, multi_avg_fn=avg, use_buffers=True)

    def _ema_update(self, averaged: list[Tensor], current: list[Tensor], counted: Tensor) -> None:
        """``AveragedModel``'s ``multi_avg_fn``: one EMA step at the warmed-up decay. The count is
        read from the CPU counter, not the device copy handed in, so that no step waits on the
        device."""
        assert self.ema_decay is not None
        decay = warmed_up_decay(self.ema_decay, self.count)
        get_ema_multi_avg_fn(decay)(averaged, current, counted)

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


def warmed_up_decay(decay: float, updates: int) -> float:
    """The EMA's decay after ``updates`` states have been averaged: ``(1 + n) / (10 + n)`` until it
    reaches ``decay`` (about 0.18 at the first step, 0.9 after 80, 0.99 after 890)."""
    return min(decay, (1 + updates) / (10 + updates))


def _tracks_statistics(m: nn.Module) -> bool:
    """A normalization layer that keeps running statistics (batch norm and its subclasses)."""
    return bool(getattr(m, "track_running_stats", False)) and hasattr(m, "reset_running_stats")


@torch.no_grad()
def recompute_norms(
    model: nn.Module, batches: Iterable[Tensor], call: Callable[[Tensor], object] | None = None
) -> int:
    """Recompute the running statistics of ``model``'s batch norms that train (frozen ones, in
    eval mode, keep theirs) as their plain mean over ``batches`` (momentum ``None``), one pass in
    train mode, each batch through ``call`` (default: the model); the random generators stay as
    they were (drop path draws in train mode); a batch of one image (a split's remainder) is
    left out. Returns how many layers were recomputed."""
    was_training = model.training
    model.train()
    norms = [m for m in model.modules() if _tracks_statistics(m) and m.training]
    momenta = [m.momentum for m in norms]
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        if norms:
            with torch.random.fork_rng(devices=cuda):
                for x in batches:
                    if len(x) > 1:  # a last batch of one image has no batch statistics
                        (call or model)(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


@contextmanager
def scored(
    average: WeightAverage | None,
    model: TransferModel,
    epoch: int,
    epochs: int,
    images: Iterable[Tensor],
    autocast: AbstractContextManager[object] | None = None,
) -> Iterator[None]:
    """The weights an epoch is scored with, for the block: the average's when there is one (kept
    in ``model`` after the last epoch), after folding in this epoch's weights (SWA). SWA's batch
    norms are recomputed on ``images`` (normalized, unaugmented training batches, read only
    then) under ``autocast``; the raw statistics come back with the raw weights."""
    if average is None:
        yield
        return
    average.epoch_ended(model, epoch, epochs)
    with average.applied(model, keep=epoch == epochs - 1):
        if not average.per_step and average.count > 0:
            with autocast or nullcontext():
                recompute_norms(model, images, lambda x: forward(model, x))
        yield


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
