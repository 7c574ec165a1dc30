"""Leave-one-source-out selection: each trial's parameters trained once more per source with that
source held out and scored on it; computed only when the study selects with it, on pairs of
several sources; refused where it cannot be honest."""

from __future__ import annotations

import pytest
import torch
from test_multi_source import study
from test_search import make_runner

from harness.data.pooled import SOURCE_DOMAIN, SOURCE_DOMAINS, leave_out
from harness.errors import StudySpecError
from harness.publish import leaderboard
from harness.store.schema import FINAL_PREFIX, HELD_OUT_METRICS, SCORES, TRAININGS
from harness.study import load_study

THREE = '[[pairs]]\nsource = ["digits", "m2", "digits-m"]\ntarget = "m3"\n\n[datasets.m3]\nplugin = "digits-m"\nphoto_seed = 11'
LOSO = '["leave-one-source-out", "source-val"]'


def test_leave_out_views_renumber_the_rest(tmp_path):
    spec = load_study(str(study(tmp_path, pairs=THREE, selection=LOSO)))
    runner = make_runner(tmp_path, spec)
    pooled = runner.domains.domain(0, "source")
    rest, held = leave_out(pooled, 1)
    assert rest.meta[SOURCE_DOMAINS] == ["digits", "digits-m"]
    assert held.name == "m2" and SOURCE_DOMAIN not in held.meta
    index = pooled.meta[SOURCE_DOMAIN]["val"]
    assert torch.equal(held.val.x, pooled.val.x[index == 1])
    assert torch.equal(rest.train.x, pooled.train.x[pooled.meta[SOURCE_DOMAIN]["train"] != 1])
    assert set(rest.meta[SOURCE_DOMAIN]["train"].tolist()) == {0, 1}
    assert len(rest.val) + len(held.val) == len(pooled.val)


@pytest.fixture(scope="module")
def loso_run(tmp_path_factory):
    """One study selected by leave-one-source-out, run once for the tests that read it."""
    tmp_path = tmp_path_factory.mktemp("loso")
    spec = load_study(str(study(tmp_path, pairs=THREE, selection=LOSO)))
    runner = make_runner(tmp_path, spec)
    runner.run()
    return spec, runner


def test_a_trial_trains_once_more_per_source_and_final_runs_reuse_it(loso_run):
    spec, runner = loso_run
    storage = runner.storage
    search = [s for s in storage.get_all_studies() if not s.study_name.endswith("final runs")]
    trial = storage.get_all_trials(search[0]._study_id)[0]
    values = trial.user_attrs[HELD_OUT_METRICS]
    assert len(values) == 3 and all(0 <= v <= 1 for v in values)
    assert trial.user_attrs[TRAININGS] == 4
    recorded = trial.user_attrs[SCORES]["leave-one-source-out"]
    assert recorded == pytest.approx(sum(values) / 3)
    finals = [
        v
        for s in storage.get_all_studies()
        for k, v in s.user_attrs.items()
        if k.startswith(FINAL_PREFIX)
    ]
    assert finals and all(f["scores"]["leave-one-source-out"] == recorded for f in finals)
    board, _, _ = leaderboard.collect(spec, runner.storage_url)
    assert set(board["selection"]) == {"leave-one-source-out", "source-val"}


def test_not_computed_unless_selected(tmp_path):
    spec = load_study(str(study(tmp_path, pairs=THREE, selection='"source-val"')))
    runner = make_runner(tmp_path, spec)
    runner.run()
    search = [s for s in runner.storage.get_all_studies() if not s.study_name.endswith("runs")]
    trial = runner.storage.get_all_trials(search[0]._study_id)[0]
    assert HELD_OUT_METRICS not in trial.user_attrs
    assert "leave-one-source-out" not in trial.user_attrs[SCORES]


def test_refused_on_a_single_source_pair(tmp_path):
    pairs = '[[pairs]]\nsource = "digits"\ntarget = "digits-m"'
    spec = load_study(str(study(tmp_path, pairs=pairs, selection=LOSO)))
    with pytest.raises(StudySpecError, match=r"selection.*has one source"):
        make_runner(tmp_path, spec).preflight()


def test_refused_with_source_pretrained_weights(tmp_path):
    path = study(tmp_path, pairs=THREE, selection=LOSO)
    path.write_text(
        path.read_text().replace(
            'strategy = "source-only"', 'strategy = "source-only"\nweights = "source"'
        )
    )
    spec = load_study(str(path))
    with pytest.raises(StudySpecError, match=r"methods\[0\]\.weights.*held-out one too"):
        make_runner(tmp_path, spec).preflight()


def test_label_free_rules_are_not_scored_for_a_method_that_sees_no_target(tmp_path):
    spec = load_study(
        str(study(tmp_path, pairs=THREE, strategies=("erm",), selection='"source-val"'))
    )
    runner = make_runner(tmp_path, spec)
    runner.run()
    search = [s for s in runner.storage.get_all_studies() if not s.study_name.endswith("runs")]
    scores = runner.storage.get_all_trials(search[0]._study_id)[0].user_attrs[SCORES]
    assert "source-val" in scores and "target-val" in scores
    assert not {"im", "entropy", "snd", "bnm", "dev"} & set(scores)


def test_the_board_says_how_many_trainings_the_trials_took(loso_run, tmp_path):
    spec, runner = loso_run
    board, trials, prov = leaderboard.collect(spec, runner.storage_url)
    method = next(iter(prov["trainings"]["digits+m2+digits-m->m3"]))
    assert prov["trainings"]["digits+m2+digits-m->m3"][method] == {
        "trials": 1,
        "trainings": 4,
        "per_trial": 4,
    }
    assert list(trials["trainings"]) == [4]
    out = tmp_path / "out"
    leaderboard.write(out, spec, board, trials, prov)
    assert "each trial here cost that many trainings" in (out / "leaderboard.md").read_text()


def test_source_val_of_pooled_sources_is_the_mean_over_domains(tmp_path):
    spec = load_study(str(study(tmp_path, pairs=THREE, selection='"source-val"')))
    runner = make_runner(tmp_path, spec)
    source, target = runner.domains.pair_data(0)
    index = source.meta[SOURCE_DOMAIN]["val"]
    # a fake output right on domain 0 only: the mean over domains is 1/3, not domain 0's share
    out = torch.full((len(source.val), target.num_classes), -1.0)
    right = index == 0
    out[right, source.val.y[right]] = 1.0
    out[~right, (source.val.y[~right] + 1) % target.num_classes] = 1.0
    assert runner.scorer.source_metric(out, source, target) == pytest.approx(1 / 3)


@pytest.mark.parametrize("extra", ["", "\n[search]\nbatch_size = [2, 8]"])
def test_a_step_smaller_than_the_sources_is_refused(tmp_path, extra):
    path = study(tmp_path, pairs=THREE, selection='"source-val"')
    text = path.read_text().replace(
        "batch_size = 32", "batch_size = 2" if not extra else "batch_size = 32"
    )
    if extra:
        text = text.replace("[search]\n", "[search]\nbatch_size = [2, 8]\n")
    path.write_text(text)
    key = "search.batch_size" if extra else "batch_size"
    with pytest.raises(
        StudySpecError, match=rf"{key}: a step of 2 images cannot draw from each of the 3 sources"
    ):
        load_study(str(path))
