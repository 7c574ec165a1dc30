"""Same study, same seed, run twice on CPU: identical numbers."""

from __future__ import annotations

import optuna
from conftest import write_study
from test_search import registry_with

from harness.publish import leaderboard
from harness.search import RunOptions, build_driver
from harness.store.schema import optuna_study_name
from harness.study import load_study


def test_same_study_same_seed_same_numbers_whatever_ran_before(tmp_path):
    import torch

    spec = load_study(str(write_study(tmp_path, trials=2)))
    spec = spec.model_copy(update={"methods": spec.methods[1:2], "final_seeds": 1})
    values = []
    for k, noise in enumerate((1, 999)):
        torch.manual_seed(noise)  # leftover global random state must not leak into a run
        runner = build_driver(
            spec, registry_with(), RunOptions(results_dir=tmp_path / f"r{k}", log=lambda m: None)
        )
        runner.run()
        board = leaderboard.collect(spec, runner.storage_url)[0]
        trials = optuna.load_study(
            study_name=optuna_study_name(spec.pairs[0], spec.methods[0]), storage=runner.storage
        ).get_trials()
        values.append(([t.value for t in trials], board["test_accuracy"].tolist()))
    assert values[0] == values[1]
