"""Which trials stop early (the pruners a study can name, the default successive halving) and the
sampler that suggests each trial's parameters."""

from __future__ import annotations

import os
import zlib

import optuna
from optuna.trial import TrialState

from harness.store.leases import host_key
from harness.store.optuna_compat import halving_settings, median_settings
from harness.store.schema import is_surplus
from harness.study import StudySpec


def asha_min_resource(epochs: int) -> int:
    """Epochs after which successive halving first judges a trial (it does so once the epoch after
    them is reported): a sixth of the budget, and never before the third epoch. On the quickstart
    pair (``benchmarks/test_search_efficiency.py``) rankings after one or two epochs said little
    about the final score, and judging one epoch earlier than this lost points."""
    return max(2, epochs // 6)


class Halving(optuna.pruners.BasePruner):
    """Successive halving in which a trial goes on from a rung only by comparison with others there.

    Optuna's asynchronous ``SuccessiveHalvingPruner`` promotes the first trial to reach a rung
    unconditionally (it is the top third of one), so in a search that runs its trials one after
    another the first trial, a random start-up one, always trains to the end, and so does the
    first to reach each later rung. Here that first arrival stops at the rung (Optuna's
    ``bootstrap_count=1``); its score stays there for the later trials to be compared with. A
    later trial goes on when its score is at least the k-th best of the n trials at the rung, itself
    included, with k = n // reduction_factor and at least 1 (so ties go on, and while n < 2 *
    reduction_factor only the best does). Two trials of parallel workers that reach a rung at the
    same moment may both count as its first arrival.

    Guards: while no trial has completed, the budget's last place is not pruned, so a search that
    runs its whole budget completes a trial unless that last trial fails (a search cut short by
    ``timeout_s`` or an interrupt may end with none); and no trial is judged at its last epoch,
    where stopping it saves nothing.
    """

    def __init__(self, min_resource: int, reduction_factor: int, budget: int, epochs: int) -> None:
        self.halving = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=reduction_factor, bootstrap_count=1
        )
        self.budget, self.epochs = budget, epochs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if (trial.last_step or 0) >= self.epochs - 1 or not self.halving.prune(study, trial):
            return False
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            return True
        return not is_surplus(study, trial.number, self.budget - 1)  # the last place trains on


def describe_pruner(pruner: optuna.pruners.BasePruner) -> str:
    """The pruner and its settings, as provenance records it."""
    if isinstance(pruner, Halving):
        min_resource, factor, bootstrap = halving_settings(pruner.halving)
        return (
            f"SuccessiveHalvingPruner(min_resource={min_resource}, reduction_factor={factor}, "
            f"bootstrap_count={bootstrap}); the last of {pruner.budget} trials is not pruned until one "
            f"completes; none is judged at its last epoch ({pruner.epochs})"
        )
    if isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner):
        min_resource, factor, _ = halving_settings(pruner)
        return f"SuccessiveHalvingPruner(min_resource={min_resource}, reduction_factor={factor})"
    if isinstance(pruner, optuna.pruners.MedianPruner):
        startup, warmup = median_settings(pruner)
        return f"MedianPruner(n_startup_trials={startup}, n_warmup_steps={warmup})"
    return type(pruner).__name__


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner the study names (``search.pruner``), set for its epochs and budget."""
    s, epochs = spec.search, spec.budget.max_epochs
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner == "asha":
        return Halving(asha_min_resource(epochs), 3, spec.budget.trials, epochs)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=epochs, reduction_factor=3
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=s.startup_trials, n_warmup_steps=max(1, epochs // 3)
    )


def make_sampler(
    spec: StudySpec, n_done: int, rank: int | None, on_server: bool, seed: int | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler of a search that has ``n_done`` trials behind it, for worker ``rank``.

    The seed moves with the number of finished trials so that a resumed run does not replay the
    same random start-up suggestions. Processes sharing a study must not draw the same
    suggestions: each worker's seed is offset by its rank, and a lone process on a database
    server (``on_server``) by its host and process. ``seed`` replaces the study's seed."""
    seed = (spec.seed if seed is None else seed) + n_done + 1009 * (rank or 0)
    if rank is None and on_server:
        seed += zlib.crc32(f"{host_key()}:{os.getpid()}".encode()) % 1_000_003
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE counts the finished trials itself when deciding whether start-up is over
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.search.startup_trials, multivariate=True
    )
