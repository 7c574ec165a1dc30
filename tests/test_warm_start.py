"""``[search] warm_start``: each (pair, method) search begins with the best configurations of the
same method on the pairs already searched ("pairs") or in a bundle's best_params.json of a study
with the same search space; a configuration outside this search's space is skipped with a line in
the log, a file from another space is refused before training, and the boards say what was seeded."""

from __future__ import annotations

import json
from html import escape

import optuna
import pandas as pd
import pytest
from conftest import write_study
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from test_cli import harness
from test_search import make_runner

from harness.errors import StudySpecError
from harness.publish import leaderboard
from harness.publish.bundle import _best_params_json
from harness.publish.html import _html
from harness.search.space import suggest
from harness.search.warm import fit
from harness.store.schema import (
    CONFIG,
    SEEDED_FROM,
    WARM_START,
    best_trial,
    optuna_study_name,
    trial_params,
)
from harness.study import load_study

STUDY = """
description = "warm start"
image_size = 16
batch_size = 64
seed = 0
final_seeds = 1

[datasets.m2]
plugin = "digits-m"
photo_seed = 7

{pairs}

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "finetune"

[budget]
trials = {trials}
max_epochs = 1

[search]
startup_trials = 1
pruner = "none"
{search}
"""


#: two pairs with one target each that the other pair never saw (a warm start may use either)
PAIRS = """
[[pairs]]
source = "digits"
target = "digits-m"

[[pairs]]
source = "digits"
target = "m2"
"""


def _spec(directory, name="warm", trials=4, search='warm_start = "pairs"', pairs=PAIRS):
    body = STUDY.format(trials=trials, search=search, pairs=pairs)
    return load_study(str(write_study(directory, name, body=body)))


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    """A two-pair study run once with ``warm_start = "pairs"``, its log and its published files."""
    tmp = tmp_path_factory.mktemp("warm")
    spec = _spec(tmp)
    log: list[str] = []
    runner = make_runner(tmp, spec, log=log.append)
    runner.run()
    board, trials, prov = leaderboard.collect(spec, runner.storage_url)
    leaderboard.write(tmp / "out", spec, board, trials, prov)
    return tmp, spec, runner, log, (board, trials, prov)


def _study(runner, spec, i):
    name = optuna_study_name(spec.pairs[i], spec.methods[0])
    return optuna.load_study(study_name=name, storage=runner.storage)


def test_the_second_pair_starts_from_the_first_pairs_best_configuration(warm_run):
    _, spec, runner, log, _ = warm_run
    first, second = _study(runner, spec, 0), _study(runner, spec, 1)
    # nothing had finished when the first pair began: it started cold, and says so
    assert first.user_attrs[WARM_START] == {"setting": "pairs", "seeded": [], "skipped": []}
    assert not any(SEEDED_FROM in t.user_attrs for t in first.get_trials())
    best = best_trial(first.get_trials(), "target-val")
    origin = f"pair digits->digits-m trial {best.number}"
    assert second.user_attrs[WARM_START]["seeded"] == [origin]
    seeded = [t for t in second.get_trials() if SEEDED_FROM in t.user_attrs]
    assert [t.number for t in seeded] == [0]  # queued first, and one: one pair had finished
    assert seeded[0].user_attrs[SEEDED_FROM] == origin
    assert seeded[0].params == best.params and seeded[0].state == TrialState.COMPLETE
    assert trial_params(seeded[0]) == trial_params(best)
    assert f"{second.study_name}: warm start queued 1: {origin}" in log
    assert len(second.get_trials()) == spec.budget.trials  # seeds take places of the budget


def test_the_boards_and_the_provenance_disclose_the_seeded_trials(warm_run):
    tmp, spec, runner, _, (board, trials, prov) = warm_run
    best = best_trial(_study(runner, spec, 0).get_trials(), "target-val")
    origin = f"pair digits->digits-m trial {best.number}"
    csv = pd.read_csv(tmp / "out" / "trials.csv")
    seeded = csv[csv["seeded_from"].notna()]
    assert list(zip(seeded["pair"], seeded["trial"], seeded["seeded_from"], strict=True)) == [
        ("digits->m2", 0, origin)
    ]
    md = (tmp / "out" / "leaderboard.md").read_text()
    method = spec.methods[0].key
    assert f"Warm start (pairs): {method}: 1 of 4 trials seeded (trial 0 from {origin})." in md
    assert f"Warm start (pairs): {method}: 0 of 4 trials seeded." in md  # the first pair
    warm = prov["warm_start"]
    assert warm["setting"] == "pairs"
    assert warm["studies"]["digits->m2"][method]["seeded"] == {"0": origin}
    page = _html(tmp / "out", spec, board, prov, [p.key for p in spec.pairs], {})
    assert escape(f"1 of 4 trials seeded (trial 0 from {origin})") in page
    assert json.loads((tmp / "out" / "leaderboard.json").read_text())["provenance"]["warm_start"]


def test_without_warm_start_nothing_is_recorded(tmp_path):
    spec = _spec(tmp_path, search="")
    assert "warm_start" not in spec.search.config()  # the stored configuration reads as before
    seeded = _spec(tmp_path, "seeded")
    assert seeded.search.config()["warm_start"] == "pairs"  # a set one is part of it


def _finished_pair(runner, spec, params, distributions):
    """Pair 0's study as a finished search whose best trial has ``params``."""
    study = optuna.create_study(
        study_name=optuna_study_name(spec.pairs[0], spec.methods[0]),
        storage=runner.storage,
        direction="maximize",
    )
    study.set_user_attr(CONFIG, {"selection_rules": [{"rule": "target-val", "oracle": False}]})
    for k, value in enumerate((0.9, 0.5)):
        study.add_trial(
            create_trial(
                params=params,
                distributions=distributions,
                value=value - k * 0.1,
                user_attrs={"scores": {"target-val": value}},
            )
        )
    return optuna.create_study(
        study_name=optuna_study_name(spec.pairs[1], spec.methods[0]),
        storage=runner.storage,
        direction="maximize",
    )


def test_a_configuration_outside_this_space_is_skipped_with_a_line(tmp_path):
    spec = _spec(tmp_path, trials=2)
    log: list[str] = []
    runner = make_runner(tmp_path, spec, log=log.append)
    params = {
        "backbone.freeze_depth": 1,
        "backbone.lr": 1e-3,
        "head.lr": 0.5,  # the space is [1e-4, 3e-2]
        "optimizer.weight_decay": 1e-4,
        "augment.policy": "light",
    }
    distributions = {
        "backbone.freeze_depth": IntDistribution(0, 5),
        "backbone.lr": FloatDistribution(1e-4, 3e-2, log=True),
        "head.lr": FloatDistribution(1e-4, 1.0, log=True),
        "optimizer.weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        "augment.policy": CategoricalDistribution(["none", "light", "strong"]),
    }
    study = _finished_pair(runner, spec, params, distributions)
    runner.warm.seed(study, runner.storage, 1, runner.methods[0])
    assert study.get_trials() == []  # nothing queued
    assert log == [
        f"{study.study_name}: warm start skips pair digits->digits-m trial 0: "
        "head.lr=0.5 is outside [0.0001, 0.03]"
    ]
    assert study.user_attrs[WARM_START]["skipped"][0]["from"] == "pair digits->digits-m trial 0"


GOOD = {
    "backbone.freeze_depth": 1,
    "backbone.lr": 1e-3,
    "head.lr": 1e-2,
    "optimizer.weight_decay": 1e-4,
    "augment.policy": "light",
}
GOOD_SPACE = {
    "backbone.freeze_depth": IntDistribution(0, 5),
    "backbone.lr": FloatDistribution(1e-4, 3e-2, log=True),
    "head.lr": FloatDistribution(1e-4, 3e-2, log=True),
    "optimizer.weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "augment.policy": CategoricalDistribution(["none", "light", "strong"]),
}
SAW_TARGET = {
    "reversed": (
        '[[pairs]]\nsource = "digits"\ntarget = "digits-m"\n\n'
        '[[pairs]]\nsource = "digits-m"\ntarget = "digits"',
        "pair digits->digits-m: it saw this pair's target 'digits'",
    ),
    "reversed through an alias": (
        '[datasets.dig]\nplugin = "digits"\n\n'
        '[[pairs]]\nsource = "dig"\ntarget = "digits-m"\n\n'
        '[[pairs]]\nsource = "digits-m"\ntarget = "digits"',
        "pair dig->digits-m: it saw this pair's target 'digits' (as 'dig')",
    ),
    "the same target": (
        '[[pairs]]\nsource = "digits"\ntarget = "m2"\n\n'
        '[[pairs]]\nsource = "digits-m"\ntarget = "m2"',
        "pair digits->m2: it saw this pair's target 'm2'",
    ),
    "leave one out": (
        '[[pairs]]\nleave_one_out = ["digits", "digits-m", "m2"]',
        "pair digits-m+m2->digits: it saw this pair's target 'digits-m'",
    ),
}


@pytest.mark.parametrize("case", sorted(SAW_TARGET))
def test_a_pair_that_saw_this_pairs_target_never_seeds_it(tmp_path, case):
    """Its trials were trained or selected with this pair's target (its labels, or its images):
    a seed from it would carry them into this pair's search."""
    pairs, says = SAW_TARGET[case]
    spec = _spec(tmp_path, trials=2, pairs=pairs)
    log: list[str] = []
    runner = make_runner(tmp_path, spec, log=log.append)
    study = _finished_pair(runner, spec, GOOD, GOOD_SPACE)
    runner.warm.seed(study, runner.storage, 1, runner.methods[0])
    assert study.get_trials() == []  # the configuration fits: only the leak keeps it out
    assert log == [f"{study.study_name}: warm start never uses {says}"]
    assert study.user_attrs[WARM_START]["seeded"] == []


def test_a_pair_that_never_saw_this_pairs_target_seeds_it(tmp_path):
    spec = _spec(tmp_path, trials=2)
    log: list[str] = []
    runner = make_runner(tmp_path, spec, log=log.append)
    study = _finished_pair(runner, spec, GOOD, GOOD_SPACE)
    runner.warm.seed(study, runner.storage, 1, runner.methods[0])
    (queued,) = study.get_trials()
    assert queued.state == TrialState.WAITING
    assert log == [f"{study.study_name}: warm start queued 1: pair digits->digits-m trial 0"]


def test_recorded_params_seed_a_search_that_chooses_whether_to_average(tmp_path):
    """``ema = [false, true]``: the sampler chooses ``ema.on``, which recorded parameters lack
    (they hold ``ema.decay`` when EMA was on): it is read from them."""
    spec = _spec(tmp_path, search="ema = [false, true]")
    rm = make_runner(tmp_path, spec).methods[0]
    assert fit(spec, rm, 5, {**GOOD, "ema.decay": 0.999}) == ({**GOOD, "ema.on": True}, [])
    assert fit(spec, rm, 5, GOOD) == ({**GOOD, "ema.on": False}, [])
    searched = _spec(tmp_path, "decay", search="ema = [false, true]\nema_decay = [0.9, 0.999]")
    with_decay = {**GOOD, "ema.decay": 0.99}
    assert fit(searched, rm, 5, with_decay) == ({**with_decay, "ema.on": True}, [])
    # end to end: a bundle's best_params.json seeds the search with the EMA its trial had
    _bundle_file(tmp_path, spec, {**GOOD, "ema.decay": 0.999})
    seeded = _spec(
        tmp_path, "seeded", search='ema = [false, true]\nwarm_start = "best_params.json"'
    )
    runner = make_runner(tmp_path, seeded)
    study = optuna.create_study(
        study_name=optuna_study_name(seeded.pairs[0], seeded.methods[0]),
        storage=runner.storage,
        direction="maximize",
    )
    runner.warm.seed(study, runner.storage, 0, runner.methods[0])
    (queued,) = study.get_trials()
    trial = study.ask()
    suggest(seeded, trial, runner.methods[0].new_strategy(), 5)
    assert trial.params == {**GOOD, "ema.on": True} and trial_params(trial)["ema.decay"] == 0.999


def test_a_file_without_the_method_starts_cold_with_a_line(tmp_path):
    _bundle_file(tmp_path, _spec(tmp_path, "source", search=""), GOOD, method="someone-else")
    spec = _spec(tmp_path, "seeded", search='warm_start = "best_params.json"')
    log: list[str] = []
    runner = make_runner(tmp_path, spec, log=log.append)
    study = optuna.create_study(
        study_name=optuna_study_name(spec.pairs[0], spec.methods[0]),
        storage=runner.storage,
        direction="maximize",
    )
    runner.warm.seed(study, runner.storage, 0, runner.methods[0])
    assert study.get_trials() == []
    assert log == [
        f"{study.study_name}: warm start: best_params.json holds no configuration of method "
        f"{spec.methods[0].key}; this search starts cold"
    ]


def test_fit_names_each_way_a_configuration_leaves_the_space(tmp_path):
    spec = _spec(tmp_path)
    rm = make_runner(tmp_path, spec).methods[0]
    good = {
        "backbone.freeze_depth": 1,
        "backbone.lr": 1e-3,
        "head.lr": 1e-2,
        "optimizer.weight_decay": 1e-4,
        "augment.policy": "light",
    }
    assert fit(spec, rm, 5, good) == (good, [])
    bad = {**good, "augment.policy": "wild", "strategy.nope": 1}
    del bad["head.lr"]
    _, problems = fit(spec, rm, 5, bad)
    assert problems == [
        "head.lr is missing (searched here)",
        "augment.policy='wild' is not offered here (choices: none, light, strong)",
        "strategy.nope is not a parameter here",
    ]
    # a whole frozen backbone has no backbone learning rate: one left over is refused
    _, problems = fit(spec, rm, 5, {**good, "backbone.freeze_depth": 5})
    assert problems == ["backbone.lr is not a parameter here"]
    # a pinned value is no parameter of the sampler's: the same one passes, another does not
    pinned = load_study(str(spec.path), {"search.head_lr": 1e-2})
    assert fit(pinned, rm, 5, good)[0] == {k: v for k, v in good.items() if k != "head.lr"}
    assert fit(pinned, rm, 5, {**good, "head.lr": 2e-2})[1] == ["head.lr=0.02, fixed here at 0.01"]


def _bundle_file(directory, spec, params, name="best_params.json", method=None):
    board = pd.DataFrame(
        [{"pair": "digits->digits-m", "method": method or spec.methods[0].key,
          "selection": "target-val", "best_trial": 3, "best_params": params}]
    )  # fmt: skip
    path = directory / name
    path.write_text(json.dumps(_best_params_json(spec, board)))
    return path


def test_a_bundles_best_params_seed_each_pair_same_pair_first(tmp_path):
    params = {
        "backbone.freeze_depth": 2,
        "backbone.lr": 2e-3,
        "head.lr": 5e-3,
        "optimizer.weight_decay": 1e-5,
        "augment.policy": "strong",
    }
    source = _spec(tmp_path, "source", search="")
    _bundle_file(tmp_path, source, params)
    spec = _spec(tmp_path, "seeded", search='warm_start = "best_params.json"')
    runner = make_runner(tmp_path, spec)
    runner.warm.check()
    for i in (0, 1):
        study = optuna.create_study(
            study_name=optuna_study_name(spec.pairs[i], spec.methods[0]),
            storage=runner.storage,
            direction="maximize",
        )
        runner.warm.seed(study, runner.storage, i, runner.methods[0])
        (queued,) = study.get_trials()
        assert queued.state == TrialState.WAITING
        rule = f"digits->digits-m/{spec.methods[0].key}/target-val"
        assert queued.user_attrs[SEEDED_FROM] == f"file best_params.json:{rule}"
        trial = study.ask()  # the queued trial: what the search's first trial is given
        assert trial.number == queued.number
        suggest(spec, trial, runner.methods[0].new_strategy(), 5)
        assert trial.params == params  # what the sampler would have chosen: the file's


def test_a_file_from_another_search_space_is_refused_before_training(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    other = _spec(tmp_path, "other", search='head_lr = [1e-3, 1e-2]\naugment = "light"')
    _bundle_file(tmp_path / "benchmarks", other, {"head.lr": 5e-3})
    _spec(tmp_path / "benchmarks", "seeded", search='warm_start = "best_params.json"')
    result = harness("run", "--study", "seeded", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (first,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    path = "benchmarks/best_params.json"  # beside the study file, as the run shows it
    assert first == (
        f"error: benchmarks/seeded.toml: search.warm_start: {path} comes from a study with "
        "another search space (head_lr is [0.001, 0.01] there, [0.0001, 0.03] here; augment is "
        '"light" there, ["none", "light", "strong"] here); allowed: a best_params.json of a '
        "study whose [search] space is this one's"
    )
    assert not (tmp_path / "results" / "seeded" / "trials.csv").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('{"pairs": []}', "not a best_params.json"),
        ('{"pairs": {}}', "records no search space"),
    ],
)
def test_a_missing_or_malformed_file_is_one_line_naming_it(tmp_path, content, says):
    path = tmp_path / "best.json"
    if content is not None:
        path.write_text(content)
    spec = _spec(tmp_path, search='warm_start = "best.json"')
    runner = make_runner(tmp_path, spec)
    with pytest.raises(StudySpecError) as err:
        runner.preflight()
    assert str(err.value).startswith(f"{spec.path}: search.warm_start: {path}: {says}")
    assert "\n" not in str(err.value) and not runner.started
