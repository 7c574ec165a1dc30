"""Leave-one-source-out selection (DomainBed's leave-one-domain-out validation, within a pair's
sources): a trial's parameters trained once more per source, with that source held out, and
scored on its validation split. Only studies that select with such a rule pay for it, and only
on pairs of several sources (:func:`harness.rules.rules_for`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from harness import api
from harness.api.validation import HELD_OUT_SOURCES
from harness.data.pooled import leave_out, num_domains
from harness.search.models import ModelFactory
from harness.search.resolve import ResolvedMethod
from harness.search.space import train_config
from harness.store.schema import HELD_OUT_METRICS, TRAININGS
from harness.training.engine import Trainer, seed_everything


def held_out_metrics(
    models: ModelFactory,
    rm: ResolvedMethod,
    weights: str,
    data: tuple[api.DomainData, api.DomainData],
    params: dict[str, Any],
    seed: int,
    score: Callable[[Any, api.Split, api.DomainData], float],
) -> list[float]:
    """The primary validation metric of each source, held out of a training with ``params``
    and ``seed`` on the others (in the pair's source order). The held-out source plays the
    target of that training: an adaptation method adapts to it, unlabelled, as it would to the
    real target; a method that sees no target image never reads it."""
    source, target = data
    ctx = models.ctx
    values = []
    for k in range(num_domains(source)):
        rest, held = leave_out(source, k)
        seed_everything(seed)
        # built anew, not reset in place: the trial's own model is still being scored
        model = models.build_model(rm, weights, target.num_classes)
        cfg = train_config(ctx.spec, params, seed, ctx.device, models.precision_for(rm))
        trainer = Trainer(model, rm.new_strategy(), rest, held, cfg)
        trainer.fit()
        values.append(score(trainer.predict(held.val), held.val, held))
    return values


def held_out_provider(
    trial: optuna.Trial, compute: Callable[[], list[float]], sources: int
) -> dict[str, Callable[[], float]]:
    """The menu item ``held_out_source_metric`` for one trial: computed when a rule first reads
    it, recorded on the trial with the trainings it took (1 + one per source)."""

    def provide() -> float:
        values = compute()
        trial.set_user_attr(HELD_OUT_METRICS, values)
        trial.set_user_attr(TRAININGS, 1 + sources)
        return sum(values) / len(values)

    return {HELD_OUT_SOURCES: provide}


def recorded_provider(trial: optuna.trial.FrozenTrial) -> dict[str, Callable[[], float]]:
    """The menu item as the search recorded it for ``trial`` (final runs of its parameters are
    not held out again: the value belongs to the parameters, not to one seed's weights)."""
    values = trial.user_attrs.get(HELD_OUT_METRICS) or [float("nan")]
    return {HELD_OUT_SOURCES: lambda: sum(values) / len(values)}
