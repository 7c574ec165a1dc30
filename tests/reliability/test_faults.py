"""Faults inside a trial and around it: non-finite numbers, out of memory, a changed study,
a crash while writing results. In-process runs of a one-method study."""

from __future__ import annotations

import gc
import json
import math
import weakref

import optuna
import pandas as pd
import pytest
import torch
from conftest import write_study
from optuna.trial import TrialState

# in-process driver helpers shared with the search tests
from test_search import make_runner, registry_with  # noqa: E402

from harness.errors import StudySpecError
from harness.publish import leaderboard
from harness.search import Driver, Objective, RunOptions, Scorer, build_driver
from harness.store.backends import make_storage
from harness.store.leases import Looks, reap
from harness.store.schema import count_budget, optuna_study_name
from harness.study import load_study
from harness_plugins.strategies import FineTune


def _spec(tmp_path, strategy: str, trials: int = 2):
    body = (
        write_study(tmp_path, trials=trials)
        .read_text()
        .replace('strategy = "finetune"', f'strategy = "{strategy}"')
    )
    path = tmp_path / f"{strategy}.toml"
    path.write_text(body.replace("max_epochs = 2", "max_epochs = 1"))
    spec = load_study(str(path))
    return spec.model_copy(update={"methods": spec.methods[1:2], "final_seeds": 1})


def _trials(runner: Driver, spec) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(
        study_name=optuna_study_name(spec.pairs[0], spec.methods[0]), storage=runner.storage
    ).get_trials()


def _no_non_finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_no_non_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_no_non_finite(v) for v in obj)
    return True


_metric_breaks = {"on": False}


class NanLoss(FineTune):
    def training_step(self, model, batch, ctx):
        _metric_breaks["on"] = False
        return super().training_step(model, batch, ctx) * float("nan")


class InfiniteMetric(FineTune):
    def training_step(self, model, batch, ctx):
        _metric_breaks["on"] = True
        return super().training_step(model, batch, ctx)


class BreakableScorer(Scorer):
    """Scores infinity while an ``InfiniteMetric`` trial trains: a metric that overflows."""

    def split_score(self, out, split, target):
        return math.inf if _metric_breaks["on"] else super().split_score(out, split, target)


class Plain(FineTune):
    def training_step(self, model, batch, ctx):
        _metric_breaks["on"] = False
        return super().training_step(model, batch, ctx)


def test_non_finite_loss_or_metric_fails_the_trial_and_never_reaches_a_leaderboard(tmp_path):
    spec = _spec(tmp_path, "nan-loss", trials=1)
    spec = spec.model_copy(update={"methods": [
        spec.methods[0], spec.methods[0].model_copy(update={"strategy": "inf-metric"}), spec.methods[0].model_copy(update={"strategy": "plain"}),
    ]})  # fmt: skip
    runner = make_runner(
        tmp_path,
        spec,
        registry_with(("nan-loss", NanLoss), ("inf-metric", InfiniteMetric), ("plain", Plain)),
        scorer=BreakableScorer,
    )
    runner.run()
    for method, state in zip(
        spec.methods, (TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE), strict=True
    ):
        trials = optuna.load_study(
            study_name=optuna_study_name(spec.pairs[0], method), storage=runner.storage
        ).get_trials()
        assert [t.state for t in trials] == [state], method.strategy  # the search goes on
        if state == TrialState.FAIL:
            assert {t.user_attrs["fail_reason"] for t in trials} == {"nonfinite"}
    board, trials_df, prov = leaderboard.collect(spec, runner.storage_url)
    assert list(board["status"]) == ["final", "no completed trial", "no completed trial"]
    paths = leaderboard.write(tmp_path / "out", spec, board, trials_df, prov)
    assert _no_non_finite(json.loads((tmp_path / "out" / "leaderboard.json").read_text()))
    for p in paths:
        if p.name.startswith("leaderboard"):
            words = p.read_text().lower().replace(",", " ").replace("|", " ").split()
            assert not {"nan", "inf", "-inf", "infinity"} & set(words), p.name


class OutOfMemoryOnce(FineTune):
    models: list[weakref.ref] = []

    def training_step(self, model, batch, ctx):
        if not self.models:
            self.models.append(weakref.ref(model))
            ballast = torch.empty(
                64, 1024, 1024, dtype=torch.uint8
            )  # 64 MiB held by the failing frame
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (simulated on CPU, {ballast.numel()} bytes held)"
            )
        return super().training_step(model, batch, ctx)


def test_out_of_memory_fails_the_trial_frees_its_memory_and_the_next_trial_runs(tmp_path):
    spec = _spec(tmp_path, "oom-once", trials=2)
    OutOfMemoryOnce.models = []
    freed = []

    def told(info):  # called once each trial is told and its memory released
        if OutOfMemoryOnce.models:
            freed.append(OutOfMemoryOnce.models[0]() is None)

    runner = build_driver(
        spec,
        registry_with(("oom-once", OutOfMemoryOnce)),
        RunOptions(results_dir=tmp_path / "results" / spec.name, log=lambda m: None, progress=told),
    )
    runner.search(0, runner.methods[0])  # the search is what this is about: no final runs
    trials = _trials(runner, spec)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["fail_reason"] == "oom"
    assert trials[1].state == TrialState.COMPLETE
    assert freed[0]  # the failed trial's model was collected once the trial was told
    gc.collect()
    assert OutOfMemoryOnce.models[0]() is None


@pytest.mark.parametrize("field", ["metric", "direction", "data"])
def test_resuming_a_changed_study_is_refused_naming_what_changed(tmp_path, field):
    spec = _spec(tmp_path, "finetune")
    runner = make_runner(tmp_path, spec)
    name = optuna_study_name(spec.pairs[0], spec.methods[0])
    if field == "direction":
        optuna.create_study(storage=runner.storage, study_name=name, direction="minimize")
    study = runner.open_study(0, runner.methods[0]) if field != "direction" else None
    if study is not None:
        config = dict(study.user_attrs["config"])
        config[field] = "miou" if field == "metric" else {"source": "0" * 16, "target": "1" * 16}
        study.set_user_attr("config", config)
    with pytest.raises(StudySpecError) as err:
        make_runner(tmp_path, spec).open_study(0, runner.methods[0])
    msg = str(err.value)
    assert f"{field} changed" in msg and "cannot resume" in msg
    expected = {
        "metric": '"miou", now "accuracy"',
        "direction": '"minimize", now "maximize"',
        "data": '"source": "0000',
    }[field]
    assert expected in msg


def test_a_crash_while_writing_results_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    spec = _spec(tmp_path, "finetune", trials=1)
    board = pd.DataFrame(
        [{"pair": "a->b", "method": "m", "strategy": "s", "status": "final", "test_accuracy": 0.5}]
    )
    trials = pd.DataFrame([{"trial": 0, "value": 0.5}])
    prov = {"harness_version": "x", "packages": {}, "final_runs_git_commits": [], "git_commit": None, "python": "", "device": [], "precision": [], "seeds": {"study": 0, "final": []}, "sampler": [], "pruner": [], "data_fingerprints": {}, "study_file": "", "study_file_sha256": "", "trial_counts": {}, "compute_seconds": 0, "wall_seconds": 0, "generated_at": ""}  # fmt: skip
    out = tmp_path / "out"
    leaderboard.write(out, spec, board, trials, prov)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = pd.DataFrame.to_csv

    def to_csv(self, path, *a, **k):
        with open(path, "w") as fh:
            fh.write("pair,method\na->b,")  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    with pytest.raises(KeyboardInterrupt):
        leaderboard.write(out, spec, board.assign(test_accuracy=0.9), trials, prov)
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    assert {
        p.name: p.read_bytes() for p in out.iterdir()
    } == before  # no partial file, no temporary left


class ReapedWhileTraining(FineTune):
    """Calls ``during`` (set by the test) at the first training step of each trial."""

    during = None

    def training_step(self, model, batch, ctx):
        if ReapedWhileTraining.during is not None:
            ReapedWhileTraining.during, during = None, ReapedWhileTraining.during
            during()
        return super().training_step(model, batch, ctx)


class AllStale(Looks):
    """How another process that judges every running trial's holder gone looks at the leases."""

    def is_stale(self, t, now=None, here=None):
        return True


def test_a_trial_reaped_by_another_process_while_it_runs_is_dropped_and_the_search_goes_on(
    tmp_path,
):
    spec = _spec(tmp_path, "reaped", trials=2)
    logged: list[str] = []
    name = optuna_study_name(spec.pairs[0], spec.methods[0])
    attempts: list[int] = []

    def reap_elsewhere() -> None:
        """What another process does when it judges this one's lease stale: the real reap()."""
        other = optuna.load_study(study_name=name, storage=make_storage(runner.storage_url))
        assert len(reap(other, looks=AllStale())) == 1

    class Watched(Objective):
        def __call__(self, trial):
            attempts.append(trial.number)
            if len(attempts) == 1:  # reaped mid-training: report() and set_user_attr() are refused
                ReapedWhileTraining.during = reap_elsewhere
            value = super().__call__(trial)
            if len(attempts) == 3:  # reaped after its last epoch, between the look and the tell
                reap_elsewhere()
            return value

    runner = make_runner(
        tmp_path, spec, registry_with(("reaped", ReapedWhileTraining)), logged.append,
        objective=Watched,
    )  # fmt: skip
    runner.run()
    trials = _trials(runner, spec)
    assert attempts == [0, 1, 2, 3]  # trial 1 is trial 0's retry, trial 3 trial 2's
    assert [t.state for t in trials] == [
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    assert [t.user_attrs.get("fail_reason") for t in trials[::2]] == ["lost", "lost"]
    assert "error" not in trials[0].user_attrs  # the refused writes left nothing misleading behind
    assert [t.user_attrs.get("retry_of") for t in trials[1::2]] == [0, 2]
    assert trials[1].params == trials[0].params and trials[3].params == trials[2].params
    assert count_budget(trials) == 2
    dropped = [m for m in logged if "its result is dropped" in m]
    assert len(dropped) == 2 and "trial 0 " in dropped[0] and "trial 2 " in dropped[1]
    assert not [m for m in logged if " failed" in m]
    board, trials_df, _ = leaderboard.collect(spec, runner.storage_url)
    assert list(board["status"]) == ["final"]
    assert list(trials_df["counted"]) == [False, True, False, True]
    assert list(trials_df["fail_reason"])[::2] == ["lost", "lost"]
