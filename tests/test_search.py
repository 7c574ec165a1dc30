from __future__ import annotations

import json
import types

import optuna
import pytest
import torch.nn.functional as F
from conftest import BUILTIN_PLUGINS, write_study
from optuna.trial import TrialState

from harness import hookimpl
from harness.api import Strategy
from harness.errors import StudySpecError
from harness.publish import leaderboard, markdown
from harness.registry import PluginInfo, Registry
from harness.search import DomainCache, Driver, RunOptions, Scorer, build_driver
from harness.store.schema import FINALS_SUFFIX, optuna_study_name, trial_params
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


def make_runner(tmp_path, spec, registry=None, log=None, **collaborators) -> Driver:
    """A driver of ``spec`` under ``tmp_path/results``; ``collaborators`` replace the default
    model factory, domain cache or scorer (factories called with the run's context)."""
    options = RunOptions(results_dir=tmp_path / "results" / spec.name, log=log or (lambda m: None))
    return build_driver(spec, registry or registry_with(), options, **collaborators)


class _Poison:
    """Stands in for the target test split outside the final runs: any use is counted and fails."""

    def __init__(self, reads: dict[str, int]) -> None:
        object.__setattr__(self, "reads", reads)

    def __getattr__(self, name):
        self.reads["outside"] += 1
        raise AssertionError(f"the target test split was read outside a final run (.{name})")

    def __len__(self):
        self.reads["outside"] += 1
        raise AssertionError("the target test split was read outside a final run (len)")


def guarded_runner(tmp_path, spec, registry=None) -> tuple[Driver, dict[str, int]]:
    """A driver whose targets hold a :class:`_Poison` in place of their test split: only the
    scorer's ``evaluate_test`` (the final runs) puts the real one back, for its one read.
    Returns the driver and its read counts: ``finals`` (evaluate_test) and ``outside`` (any
    other use of the split, which also fails what used it)."""
    reads = {"finals": 0, "outside": 0}
    real: dict[int, object] = {}

    class Guarded(DomainCache):
        def domain(self, i, side):
            data = super().domain(i, side)
            if side == "target" and id(data) not in real:
                real[id(data)] = data.test
                data.test = _Poison(reads)
            return data

    class TestReads(Scorer):
        def evaluate_test(self, trainer, target):
            poison, target.test = target.test, real[id(target)]
            try:
                reads["finals"] += 1
                return super().evaluate_test(trainer, target)
            finally:
                target.test = poison

    return make_runner(tmp_path, spec, registry, domains=Guarded, scorer=TestReads), reads


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny study, run once, shared by the read-only checks below."""
    tmp = tmp_path_factory.mktemp("search")
    (tmp / "benchmarks").mkdir()
    spec = load_study(str(write_study(tmp / "benchmarks", trials=2)))
    runner, reads = guarded_runner(tmp, spec)
    runner.run()
    return tmp, spec, runner, reads


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
    _, spec, _, reads = finished
    assert reads["outside"] == 0
    assert reads["finals"] + reads["outside"] == spec.final_seeds * len(spec.methods)


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
    # the run's verdict: exactly the two methods that never trained, each with its reason
    from harness.search.outcome import failed_studies

    failed = [str(f) for f in failed_studies(spec, runner.storage)]
    names = [optuna_study_name(spec.pairs[0], m) for m in spec.methods[1:]]
    assert failed[0].startswith(
        f"{names[0]}: all 2 trials failed; most common: nonfinite (2 of 2): NonFiniteLossError: "
    )
    assert failed[1:] == [
        f"{names[1]}: all 2 trials failed; most common: error (2 of 2): RuntimeError: boom in step"
    ]
    # provenance: a third-party plugin with its version, a built-in exactly as published before
    config = study.user_attrs["config"]
    assert config["plugins"]["strategy"] == "testing (tests 0)"
    assert config["plugins"]["source"] == "datasets (transfer-harness)"


def test_plugin_labels_give_third_party_versions_and_leave_built_ins_alone():
    import dataclasses

    from harness.search.resolve import plugin_label
    from harness.versions import package_version

    reg = registry_with(("nan-loss", NanLoss))
    assert plugin_label(reg.get("strategy", "finetune"), reg) == "strategies (transfer-harness)"
    assert plugin_label(reg.get("strategy", "nan-loss"), reg) == "testing (tests 0)"
    installed = dataclasses.replace(reg.get("strategy", "nan-loss"), dist="pluggy")
    assert plugin_label(installed) == f"testing (pluggy {package_version('pluggy')})"
    unknown = dataclasses.replace(installed, dist="not-installed-anywhere")
    assert plugin_label(unknown) == "testing (not-installed-anywhere)"


def test_oracle_selection_is_flagged(tmp_path):
    spec = load_study(str(write_study(tmp_path, trials=1, extra_top='selection = "target-val"')))
    spec = spec.model_copy(update={"methods": spec.methods[:1], "final_seeds": 1})
    runner = make_runner(tmp_path, spec)
    runner.run()
    board, _, prov = leaderboard.collect(spec, runner.storage_url)
    assert board.loc[0, "oracle"] and board.loc[0, "selection"] == "target-val"
    md = markdown.to_markdown(spec, board, prov)
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
    from harness.store.schema import count_budget

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
