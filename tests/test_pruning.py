"""The pruners a study can name, and the default: successive halving from a sixth of the epochs,
where a trial goes on from a rung only by out-scoring others there."""

from __future__ import annotations

import optuna

from harness.search import asha_min_resource, describe_pruner, make_pruner
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


def _pruner(epochs: int, trials: int = 20) -> optuna.pruners.BasePruner:
    budget = type("B", (), {"max_epochs": epochs, "trials": trials})()
    # make_pruner reads the study's search space and budget only
    return make_pruner(type("Spec", (), {"search": SearchSpace(), "budget": budget})())


def test_successive_halving_keeps_the_top_third_at_each_rung():
    epochs = 24
    study = optuna.create_study(direction="maximize", pruner=_pruner(epochs))
    good = [min(0.9, 0.1 + 0.05 * k) for k in range(epochs)]

    def poor(k: int) -> list[float]:  # each one worse than the one before
        return [v / 2 - 0.01 * k for v in good]

    first = asha_min_resource(epochs) + 1  # judged once the epoch after min_resource is reported
    results = [_run(study, c) for c in (poor(0), poor(1), good, poor(2), good, poor(3), good)]
    assert results[0] == (
        True,
        first,
    )  # the first trial at a rung has nothing to beat there: it stops
    assert results[1] == (True, first)  # below the only other value there
    # best at the first rung, but the first to reach the second (after epoch 13 of 24)
    assert results[2] == (True, 3 * (first - 1) + 1)
    assert results[3] == (True, first)
    # a good trial again: at its rungs it ties the best (kept); the poorest one is judged out
    assert results[4] == (False, epochs) and results[5] == (True, first)
    assert results[6] == (False, epochs)
    rungs = sorted(k for k in study.trials[4].system_attrs if k.startswith("completed_rung_"))
    assert rungs == ["completed_rung_0", "completed_rung_1"]  # after epochs 5 and 13 of 24
    # the pruned first arrivals stay at their rungs as what later trials are compared with
    assert (
        "completed_rung_0" in study.trials[0].system_attrs
        and "completed_rung_1" in study.trials[2].system_attrs
    )


def test_short_trials_are_judged_from_the_third_epoch_only():
    study = optuna.create_study(direction="maximize", pruner=_pruner(6, trials=4))
    results = [_run(study, [0.5 + 0.1 * k] * 6) for k in (0, 1, -1)]
    assert results == [(True, 3), (False, 6), (True, 3)]


def test_the_last_trial_of_the_budget_completes_when_no_other_has():
    # every trial worse than the first: without the guard, none would complete
    study = optuna.create_study(direction="maximize", pruner=_pruner(24, trials=4))
    results = [_run(study, [0.9 - 0.1 * k] * 24) for k in range(4)]
    assert results == [(True, 5), (True, 5), (True, 5), (False, 24)]
    # trial 1 beats trial 0 at the first rung, is the first at the second and stops there; trial 2
    # (the last place) beats both at both rungs and completes on its own merits
    study = optuna.create_study(direction="maximize", pruner=_pruner(24, trials=3))
    assert [_run(study, [v] * 24) for v in (0.5, 0.9, 0.95)] == [(True, 5), (True, 13), (False, 24)]
    # once a trial has completed, the last place is judged like any other
    study = optuna.create_study(direction="maximize", pruner=_pruner(24, trials=4))
    assert [_run(study, [v] * 24) for v in (0.5, 0.9, 0.95, 0.1)] == [
        (True, 5),
        (True, 13),
        (False, 24),
        (True, 5),
    ]
    study = optuna.create_study(direction="maximize", pruner=_pruner(24, trials=1))
    assert _run(study, [0.1] * 24) == (False, 24)  # a budget of one trial completes it


def test_the_kept_last_place_is_still_recorded_and_judged_at_later_rungs():
    study = optuna.create_study(direction="maximize", pruner=_pruner(24, trials=2))
    assert _run(study, [0.9] * 24) == (True, 5)
    assert _run(study, [0.1] * 24) == (
        False,
        24,
    )  # below trial 0 at both rungs, kept as the last place
    assert {"completed_rung_0", "completed_rung_1"} <= set(study.trials[1].system_attrs)


def test_the_last_place_counts_the_trials_that_take_places():
    # an interrupted trial takes no place (it is run again), so the place after it is not the last
    study = optuna.create_study(direction="maximize", pruner=_pruner(24, trials=3))
    assert _run(study, [0.9] * 24) == (True, 5)
    interrupted = study.ask()
    interrupted.set_user_attr("fail_reason", "interrupted")
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    assert _run(study, [0.1] * 24) == (True, 5)  # the 2nd place of 3
    assert _run(study, [0.1] * 24) == (False, 24)  # the 3rd and last


def test_no_trial_is_judged_after_its_last_epoch():
    # 3 epochs: the first rung (after the 3rd epoch) would be the end; stopping there saves nothing
    study = optuna.create_study(direction="maximize", pruner=_pruner(3, trials=3))
    assert [_run(study, [v] * 3) for v in (0.5, 0.1, 0.9)] == [(False, 3)] * 3
    # 7 epochs: judged after the 3rd, and the second rung (after the 7th) is the end
    study = optuna.create_study(direction="maximize", pruner=_pruner(7, trials=3))
    assert [_run(study, [v] * 7) for v in (0.5, 0.9, 0.1)] == [(True, 3), (False, 7), (True, 3)]


def test_pruner_settings_are_recorded_as_provenance():
    assert describe_pruner(_pruner(24)) == (
        "SuccessiveHalvingPruner(min_resource=4, reduction_factor=3, bootstrap_count=1); "
        "the last of 20 trials is not pruned until one completes; none is judged at its last epoch (24)"
    )
    plain = optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    assert describe_pruner(plain) == "SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)"
    assert describe_pruner(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)) == (
        "MedianPruner(n_startup_trials=3, n_warmup_steps=2)"
    )
    assert describe_pruner(optuna.pruners.NopPruner()) == "NopPruner"
