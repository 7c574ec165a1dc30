from __future__ import annotations

import json
import types

import optuna
import pytest
import torch.nn.functional as F
from conftest import BUILTIN_PLUGINS, write_study
from optuna.trial import TrialState

import harness.search
import harness.training.engine
from harness import hookimpl
from harness.api import Strategy
from harness.errors import StudySpecError
from harness.publish import leaderboard
from harness.registry import PluginInfo, Registry
from harness.search import FINALS_SUFFIX, Runner, RunOptions, optuna_study_name, trial_params
from harness.study import load_study


def registry_with(*strategies: tuple[str, type]) -> Registry:
    reg = Registry()
    reg.load_entry_points(only=BUILTIN_PLUGINS.split(","))
    if strategies:

        @hookimpl
        def register_strategies(register):
            for name, cls in strategies:
                register(name, cls)

        reg.add_plugin(
            types.SimpleNamespace(register_strategies=register_strategies),
            PluginInfo("testing", "tests", "0", "tests"),
        )
    return reg


def make_runner(tmp_path, spec, registry=None) -> Runner:
    return Runner(
        spec,
        registry or registry_with(),
        RunOptions(results_dir=tmp_path / "results" / spec.name, log=lambda m: None),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny study, run once, shared by the read-only checks below."""
    tmp = tmp_path_factory.mktemp("search")
    (tmp / "benchmarks").mkdir()
    spec = load_study(str(write_study(tmp / "benchmarks", trials=2)))
    calls = {"test_reads": 0, "test_reads_outside_finals": 0}
    in_final = {"on": False}
    real_eval = Runner.evaluate_test
    real_predict = harness.training.engine.predict

    def evaluate_test(self, trainer, target):
        in_final["on"] = True
        try:
            return real_eval(self, trainer, target)
        finally:
            in_final["on"] = False

    def predict(model, split, *a, **k):
        if split is runner.pair_data(0)[1].test:
            calls["test_reads"] += 1
            if not in_final["on"]:
                calls["test_reads_outside_finals"] += 1
        return real_predict(model, split, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(Runner, "evaluate_test", evaluate_test)
    mp.setattr(harness.training.engine, "predict", predict)
    mp.setattr(harness.search, "predict", predict)
    runner = make_runner(tmp, spec)
    try:
        runner.run()
    finally:
        mp.undo()
    return tmp, spec, runner, calls


def test_one_optuna_study_per_pair_and_method_with_budget(finished):
    tmp, spec, runner, _ = finished
    all_names = {s.study_name for s in optuna.get_all_study_summaries(runner.storage)}
    names = {optuna_study_name(spec.pairs[0], m) for m in spec.methods}
    assert all_names == names | {n + FINALS_SUFFIX for n in names}  # and their final runs' claims
    for name in names:
        study = optuna.load_study(study_name=name, storage=runner.storage)
        trials = study.get_trials()
        assert len(trials) == 2
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert all(len(t.intermediate_values) == 2 for t in complete)  # one report per epoch
        assert all(0.0 <= t.value <= 1.0 for t in complete)
        assert {
            "backbone.freeze_depth",
            "head.lr",
            "optimizer.weight_decay",
            "augment.policy",
        } <= set(trial_params(trials[0]))
        assert study.user_attrs["config"]["data"]["source"]


def test_test_split_is_read_only_by_the_final_runs(finished):
    _, spec, _, calls = finished
    assert calls["test_reads_outside_finals"] == 0
    assert calls["test_reads"] == spec.final_seeds * len(spec.methods)


def test_linear_probe_searches_no_backbone_learning_rate(finished):
    _, spec, runner, _ = finished
    study = optuna.load_study(
        study_name=optuna_study_name(spec.pairs[0], spec.methods[2]), storage=runner.storage
    )
    for t in study.get_trials():
        assert "backbone.lr" not in t.params and "backbone.freeze_depth" not in t.params
        assert trial_params(t)["backbone.freeze_depth"] == 5


def test_leaderboard_rows_and_provenance(finished):
    tmp, spec, runner, _ = finished
    board, trials, prov = leaderboard.collect(spec, runner.storage_url)
    assert len(board) == 3 and set(board["status"]) == {"final"}
    assert (board["n_seeds"] == spec.final_seeds).all()
    assert board["test_accuracy"].between(0, 1).all() and board["test_macro_f1"].between(0, 1).all()
    rules = dict(zip(board["strategy"], board["selection"], strict=True))
    assert rules == {
        "source-only": "source-val",
        "finetune": "target-val",
        "linear-probe": "target-val",
    }
    assert not board["oracle"].any()
    assert len(trials) == 6 and {"state", "value", "head.lr", "fail_reason"} <= set(trials.columns)
    for key in ("harness_version", "packages", "device", "seeds", "sampler", "pruner", "selection_rule",
                "data_fingerprints", "study_file_sha256", "trial_counts", "wall_seconds", "git_commit"):  # fmt: skip
        assert key in prov, key
    assert prov["device"] == ["cpu"] and prov["packages"]["torch"]
    # the processor model: float results differ between the kernels that processors pick
    assert len(prov["device_names"]) == 1 and prov["device_names"][0].endswith("threads")
    assert prov["trial_counts"]["COMPLETE"] + prov["trial_counts"].get("PRUNED", 0) == 6
    paths = leaderboard.write(tmp / "out", spec, board, trials, prov)
    assert {p.name for p in paths} == {
        "leaderboard.csv",
        "leaderboard.md",
        "leaderboard.json",
        "trials.csv",
    }
    data = json.loads((tmp / "out" / "leaderboard.json").read_text())
    assert data["provenance"]["study_file_sha256"] == spec.file_hash and len(data["rows"]) == 3
    md = (tmp / "out" / "leaderboard.md").read_text()
    assert "± " in md and "## Provenance" in md and "source-val" in md


def test_rerun_resumes_and_tops_up_the_budget(finished, tmp_path):
    tmp, spec, runner, _ = finished
    before = {
        s.study_name: [
            (t.number, t.value)
            for t in optuna.load_study(study_name=s.study_name, storage=runner.storage).get_trials()
        ]
        for s in optuna.get_all_study_summaries(runner.storage)
        if not s.study_name.endswith(FINALS_SUFFIX)
    }
    finals = leaderboard.collect(spec, runner.storage_url)[0]["test_accuracy"].tolist()
    make_runner(tmp, spec).run()  # same budget: nothing new
    bigger = spec.model_copy(update={"budget": spec.budget.model_copy(update={"trials": 3})})
    make_runner(tmp, bigger).run()
    for name, old in before.items():
        trials = optuna.load_study(study_name=name, storage=runner.storage).get_trials()
        assert len(trials) == 3
        assert [(t.number, t.value) for t in trials[:2]] == old  # completed trials untouched
    again = leaderboard.collect(spec, runner.storage_url)[0]["test_accuracy"].tolist()
    assert len(again) == len(finals)


def test_changed_search_space_is_refused_on_resume(finished):
    tmp, spec, _, _ = finished
    changed = spec.model_copy(
        update={"search": spec.search.model_copy(update={"head_lr": [1e-3, 1e-2]})}
    )
    with pytest.raises(StudySpecError, match="search changed"):
        make_runner(tmp, changed).run()


class NanLoss(Strategy):
    def training_step(self, model, batch, ctx):
        return F.cross_entropy(model(batch.source[0]), batch.source[1]) * float("nan")


class Explodes(Strategy):
    def training_step(self, model, batch, ctx):
        raise RuntimeError("boom in step")


def test_failed_trials_are_recorded_with_reason_and_search_goes_on(tmp_path):
    body = write_study(tmp_path, trials=2).read_text()
    body = body.replace('strategy = "finetune"', 'strategy = "nan-loss"').replace(
        'strategy = "linear-probe"', 'strategy = "explodes"'
    )
    path = tmp_path / "fails.toml"
    path.write_text(body)
    spec = load_study(str(path))
    runner = make_runner(
        tmp_path, spec, registry_with(("nan-loss", NanLoss), ("explodes", Explodes))
    )
    runner.run()
    board = leaderboard.collect(spec, runner.storage_url)[0].set_index("strategy")
    assert board.loc["source-only", "status"] == "final"
    assert board.loc["nan-loss", "status"] == "no completed trial"
    assert board.loc["nan-loss", "trials_failed"] == 2
    reasons = {}
    for m in spec.methods[1:]:
        study = optuna.load_study(
            study_name=optuna_study_name(spec.pairs[0], m), storage=runner.storage
        )
        reasons[m.strategy] = {t.user_attrs.get("fail_reason") for t in study.get_trials()}
    assert reasons == {"nan-loss": {"nonfinite"}, "explodes": {"error"}}


def test_oracle_selection_is_flagged(tmp_path):
    spec = load_study(str(write_study(tmp_path, trials=1, extra_top='selection = "target-val"')))
    spec = spec.model_copy(update={"methods": spec.methods[:1], "final_seeds": 1})
    runner = make_runner(tmp_path, spec)
    runner.run()
    board, _, prov = leaderboard.collect(spec, runner.storage_url)
    assert board.loc[0, "oracle"] and board.loc[0, "selection"] == "target-val"
    md = leaderboard.to_markdown(spec, board, prov)
    assert "target-val **oracle**" in md


def test_declared_sub_domains_are_checked_before_training(tmp_path):
    from harness.search import resolve_domain

    @hookimpl
    def register_datasets(register):
        register("cities", lambda domain, **kw: None, domains=["paris", "rome"])

    reg = registry_with()
    reg.add_plugin(
        types.SimpleNamespace(register_datasets=register_datasets),
        PluginInfo("cities", "cities-dist", "0", "x"),
    )
    spec = load_study(str(write_study(tmp_path)))
    assert resolve_domain(spec, reg, "cities/rome", "pairs[0].target").sub == "rome"
    with pytest.raises(StudySpecError) as err:
        resolve_domain(spec, reg, "cities/roma", "pairs[0].target")
    assert "pairs[0].target" in str(err.value) and "'rome'" in str(err.value)


def test_few_shot_methods_selected_on_target_labels_are_oracle(tmp_path):
    from harness.search import selection_rule
    from harness_plugins.strategies import FineTune, SourceOnly

    spec = load_study(str(write_study(tmp_path)))
    assert selection_rule(spec, FineTune()) == ("target-val", False)
    assert selection_rule(spec, FineTune(shots=5)) == ("target-val", True)
    assert selection_rule(spec, SourceOnly()) == ("source-val", False)
    oracle = spec.model_copy(update={"selection": "target-val"})
    assert selection_rule(oracle, SourceOnly()) == ("target-val", True)


def test_interrupted_trials_do_not_use_up_the_budget():
    from harness.search import count_budget

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5))
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "interrupted"})
    )
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "nonfinite"})
    )
    assert count_budget(study) == 2


def test_shots_are_refused_for_segmentation(tmp_path):
    from harness.training.engine import few_shot_indices

    body = (
        write_study(tmp_path)
        .read_text()
        .replace('strategy = "finetune"', 'strategy = "finetune"\nstrategy_options = {shots = 2}')
    )
    path = tmp_path / "seg.toml"
    path.write_text(
        'task = "segmentation"\n'
        + body.replace('head = "linear"', 'head = "unet"')
        .replace('head = "mlp"', 'head = "fpn"')
        .replace("digits-m", "seg-photo")
        .replace('"digits"', '"seg-synthetic"')
    )
    with pytest.raises(StudySpecError, match="shots .* classification only"):
        make_runner(tmp_path, load_study(str(path)))
    with pytest.raises(ValueError, match="segmentation masks"):
        import torch

        few_shot_indices(torch.zeros(4, 5, 5, dtype=torch.long), 2, 0)


def test_mlflow_tracking_through_optunas_callback(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv(
        "MLFLOW_ALLOW_FILE_STORE", "true"
    )  # the file store starts in a second; sqlite migrates first
    uri = f"file://{tmp_path / 'mlruns'}"
    spec = load_study(str(write_study(tmp_path, trials=2)), {"tracking.mlflow_uri": uri})
    spec = spec.model_copy(update={"methods": spec.methods[:1], "final_seeds": 1})
    runner = make_runner(tmp_path, spec)
    runner.run()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[optuna_study_name(spec.pairs[0], spec.methods[0])])
    assert len(runs) == 2
    assert "metrics.accuracy" in runs and runs["metrics.accuracy"].between(0, 1).all()
    assert "params.head.lr" in runs
