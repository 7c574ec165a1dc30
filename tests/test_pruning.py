"""The pruners a study can name, and the default: successive halving from a sixth of the epochs."""

from __future__ import annotations

import optuna

from harness.search import Runner, asha_min_resource, describe_pruner
from harness.study import SearchSpace


def test_default_pruner_is_successive_halving_judged_from_a_sixth_of_the_epochs():
    assert SearchSpace().pruner == "asha"
    assert [asha_min_resource(e) for e in (1, 6, 12, 24, 60)] == [2, 2, 2, 4, 10]


def _run(study: optuna.Study, curve: list[float]) -> tuple[bool, int]:
    """One trial reporting ``curve`` epoch by epoch; (pruned?, epochs trained)."""
    trial = study.ask()
    for step, value in enumerate(curve):
        trial.report(value, step)
        if trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return True, step + 1
    study.tell(trial, curve[-1])
    return False, len(curve)


def _pruner(epochs: int) -> optuna.pruners.BasePruner:
    runner = Runner.__new__(Runner)  # _pruner reads the study spec only
    runner.spec = type("Spec", (), {"search": SearchSpace(), "budget": type("B", (), {"max_epochs": epochs})()})()
    return runner._pruner()


def test_successive_halving_keeps_the_top_third_at_each_rung():
    epochs = 24
    study = optuna.create_study(direction="maximize", pruner=_pruner(epochs))
    good = [min(0.9, 0.1 + 0.05 * k) for k in range(epochs)]

    def poor(k: int) -> list[float]:  # each one worse than the one before
        return [v / 2 - 0.01 * k for v in good]

    first = asha_min_resource(epochs) + 1  # judged once the epoch after min_resource is reported
    results = [_run(study, c) for c in (poor(0), poor(1), good, poor(2), good, poor(3))]
    assert results[0] == (False, epochs)  # the first trial at a rung is its best so far
    assert results[1] == (True, first)  # below the only other value there
    assert results[2] == (False, epochs)  # best at every rung
    assert results[3] == (True, first)
    # a good trial again: at its rungs it ties the best (kept); the poorest one is judged out
    assert results[4] == (False, epochs) and results[5] == (True, first)
    rungs = sorted(k for k in study.trials[0].system_attrs if k.startswith("completed_rung_"))
    assert rungs == ["completed_rung_0", "completed_rung_1"]  # after epochs 5 and 13 of 24


def test_short_trials_are_judged_from_the_third_epoch_only():
    study = optuna.create_study(direction="maximize", pruner=_pruner(6))
    results = [_run(study, [0.5 - 0.1 * k] * 6) for k in range(3)]
    assert results == [(False, 6), (True, 3), (True, 3)]


def test_pruner_settings_are_recorded_as_provenance():
    assert describe_pruner(_pruner(24)) == "SuccessiveHalvingPruner(min_resource=4, reduction_factor=3)"
    assert describe_pruner(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)) == (
        "MedianPruner(n_startup_trials=3, n_warmup_steps=2)"
    )
    assert describe_pruner(optuna.pruners.NopPruner()) == "NopPruner"
