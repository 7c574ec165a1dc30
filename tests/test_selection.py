"""Selection rules: label-free validators and oracle flags, and the test split read only by final runs."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from conftest import write_study
from optuna.trial import TrialState
from test_search import guarded_runner, make_runner

from harness.errors import StudySpecError
from harness.publish import leaderboard
from harness.publish.agreement import POOLED
from harness.rules import decode_probabilities
from harness.store.schema import optuna_study_name
from harness.study import load_study

UDA_STUDY = """
image_size = 16
batch_size = 64
seed = 0
final_seeds = 1
selection = ["snd", "target-val", "source-val"]

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "source-only"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "dann"

[budget]
trials = 3
max_epochs = 1

[search]
startup_trials = 1
pruner = "none"
"""


@pytest.fixture(scope="module")
def uda_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selection")
    spec = load_study(str(write_study(tmp, "uda", body=UDA_STUDY)))
    runner, reads = guarded_runner(tmp, spec)
    runner.run()
    return spec, runner, reads


def studies(spec, runner):
    return [
        optuna.load_study(study_name=optuna_study_name(spec.pairs[0], m), storage=runner.storage)
        for m in spec.methods
    ]


def test_search_and_selection_never_read_the_test_split(uda_run):
    spec, runner, reads = uda_run
    for study in studies(spec, runner):
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [
            t.user_attrs.get("error") for t in trials
        ]
    # one read per final run; rules that pick the same trial share its runs
    finals = sum(1 for s in studies(spec, runner) for k in s.user_attrs if k.startswith("final:"))
    assert reads["finals"] == finals >= 2 and reads["outside"] == 0


def test_every_trial_records_every_rule_and_the_first_rule_drives_the_search(uda_run):
    spec, runner, _ = uda_run
    for study in studies(spec, runner):
        for t in study.get_trials():
            scores = t.user_attrs["scores"]
            assert set(scores) == {"target-val", "source-val", "entropy", "im", "snd", "bnm", "dev"}
            assert t.value == pytest.approx(scores["snd"])
            # what the pooled rule (EnsV) scores after the search: one row per target val image
            kept = decode_probabilities(t.user_attrs["target_predictions"])
            assert kept.shape[0] == runner.domains.pair_data(0)[1].val.x.shape[0]
            assert torch.allclose(kept.sum(1), torch.ones(len(kept)), atol=1e-2)


def test_each_rule_gets_its_row_and_target_labels_flag_oracle(uda_run):
    spec, runner, _ = uda_run
    board, _, prov = leaderboard.collect(spec, runner.storage_url)
    assert len(board) == 6 and set(board["status"]) == {"final"}
    oracle = {(r["strategy"], r["selection"]): r["oracle"] for r in board.to_dict("records")}
    assert oracle == {
        ("source-only", "snd"): False,
        ("source-only", "target-val"): True,
        ("source-only", "source-val"): False,
        ("dann", "snd"): False,
        ("dann", "target-val"): True,
        ("dann", "source-val"): False,
    }
    for study, method in zip(studies(spec, runner), spec.methods, strict=True):
        trials = study.get_trials()
        for rule in ("snd", "target-val", "source-val"):
            row = board[(board["method"] == method.key) & (board["selection"] == rule)].iloc[0]
            expected = max(trials, key=lambda t: (t.user_attrs["scores"][rule], -t.number))
            assert row["best_trial"] == expected.number
            assert row["val_score"] == pytest.approx(expected.user_attrs["scores"][rule])
    # oracle rows are ranked among themselves
    assert sorted(board.loc[board["oracle"], "rank"].tolist()) == [1, 2]
    assert sorted(board.loc[~board["oracle"], "rank"].tolist())[0] == 1


def test_validator_agreement_is_reported_in_json_and_markdown(uda_run, tmp_path):
    spec, runner, _ = uda_run
    board, trials, prov = leaderboard.collect(spec, runner.storage_url)
    agreement = prov["validator_agreement"]
    assert [a["method"] for a in agreement] == [POOLED, *(m.key for m in spec.methods)]
    for a in agreement:
        assert a["trials"] == (6 if a["scope"] == "pooled" else 3) and set(a) >= {
            "entropy",
            "im",
            "snd",
            "bnm",
            "source-val",
        }
        assert all(a[r] is None or -1.0 <= a[r] <= 1.0 for r in ("entropy", "im", "snd", "bnm"))
    leaderboard.write(tmp_path, spec, board, trials, prov)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "How well label-free rules ranked the trials" in md and "| snd" in md.replace(
        "|   snd", "| snd"
    )
    assert "score:snd" in (tmp_path / "trials.csv").read_text()


def _hand_made_storage(tmp_path, spec, trials_per_method):
    """An Optuna storage whose studies hold completed trials with the given per-rule scores."""
    url = f"sqlite:///{tmp_path / 'hand.db'}"
    for method, trials in zip(spec.methods, trials_per_method, strict=True):
        study = optuna.create_study(
            study_name=optuna_study_name(spec.pairs[0], method), storage=url, direction="maximize"
        )
        for scores in trials:
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.COMPLETE, value=scores["im"], user_attrs={"scores": scores}
                )
            )
    return url


def test_validator_agreement_pools_the_pair_and_says_when_too_few_trials(tmp_path):
    """Known correlations: im orders the trials as their target accuracy does (+1), snd reverses it
    (-1), entropy is tied everywhere, bnm was never scored; the second method has two trials only."""
    spec = load_study(str(write_study(tmp_path, "uda", body=UDA_STUDY)))

    def trial(acc, im, snd, src):
        return {"target-val": acc, "im": im, "snd": snd, "entropy": 0.5, "source-val": src}

    first = [trial(0.1, 1.0, 3.0, 0.1), trial(0.2, 2.0, 2.0, 0.2), trial(0.3, 3.0, 1.0, 0.3)]
    second = [trial(0.4, 4.0, -1.0, 0.5), trial(0.5, 5.0, -2.0, 0.4)]
    url = _hand_made_storage(tmp_path, spec, [first, second])
    board, trials, prov = leaderboard.collect(spec, url)
    pooled, one, two = prov["validator_agreement"]

    assert (pooled["method"], pooled["scope"], pooled["trials"]) == (
        POOLED,
        "pooled",
        5,
    )
    assert pooled["im"] == pytest.approx(1.0) and pooled["snd"] == pytest.approx(-1.0)
    assert pooled["source-val"] == pytest.approx(0.9)  # one swap among five: 1 - 6 * 2 / (5 * 24)
    assert pooled["entropy"] is None and pooled["bnm"] is None
    n = {"source-val": 5, "entropy": 5, "im": 5, "snd": 5, "bnm": 0, "dev": 0, "ensv": 0}
    assert pooled["n"] == n
    assert "no correlation for entropy" in pooled["note"]

    assert (one["method"], one["scope"], one["trials"]) == (spec.methods[0].key, "method", 3)
    assert (
        one["im"] == pytest.approx(1.0)
        and one["snd"] == pytest.approx(-1.0)
        and one["source-val"] == pytest.approx(1.0)
    )

    assert (two["method"], two["trials"]) == (spec.methods[1].key, 2)
    assert all(two[r] is None for r in ("im", "snd", "source-val", "entropy", "bnm"))
    assert "too few completed trials" in two["note"] and "(2;" in two["note"]

    leaderboard.write(tmp_path / "out", spec, board, trials, prov)
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    section = md.split("## How well label-free rules ranked the trials")[1].split("## Provenance")[
        0
    ]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|")
    ]
    header, body = rows[0], rows[2:]
    assert header[:3] == ["pair", "method", "trials"] and header[-1] == "note"
    cell = {(r[1], h): v for r in body for h, v in zip(header, r, strict=True)}
    assert [r[1] for r in body] == [POOLED, spec.methods[0].key, spec.methods[1].key]
    assert cell[(POOLED, "trials")] == "5" and cell[(POOLED, "im")] == "+1.00"
    assert cell[(POOLED, "snd")] == "-1.00" and cell[(POOLED, "entropy")] == "- (tied)"
    assert cell[(POOLED, "bnm")] == "- (n=0)"
    assert cell[(spec.methods[1].key, "trials")] == "2" and cell[(spec.methods[1].key, "im")] == "-"
    assert "too few completed trials" in cell[(spec.methods[1].key, "note")]
    json_prov = json.loads((tmp_path / "out" / "leaderboard.json").read_text())["provenance"]
    assert json_prov["validator_agreement"][0]["im"] == pytest.approx(1.0)


def test_a_classification_only_strategy_is_refused_for_segmentation(tmp_path):
    body = UDA_STUDY.replace('task = "classification"', "").replace(
        'strategy = "dann"', 'strategy = "mcc"'
    )
    body = 'task = "segmentation"\n' + body.replace(
        'source = "digits"', 'source = "seg-synthetic"'
    ).replace('target = "digits-m"', 'target = "seg-photo"').replace(
        'head = "linear"', 'head = "unet"'
    )
    spec = load_study(str(write_study(tmp_path, "seg", body=body)))
    with pytest.raises(
        StudySpecError,
        match=r"methods\[1\]\.strategy.*'mcc' supports classification, not segmentation",
    ):
        make_runner(tmp_path, spec)


def test_unknown_selection_rule_names_the_allowed_ones(tmp_path):
    path = write_study(tmp_path, "bad", body=UDA_STUDY.replace('"snd", ', '"snd", "oracle", '))
    runner = make_runner(tmp_path, load_study(str(path)))  # any name could be a plugin's rule
    with pytest.raises(
        StudySpecError,
        match=r"selection.*'oracle'.*allowed: auto, target-val, source-val, leave-one-source-out, entropy, im, snd, bnm, "
        r"dev, ensv",
    ):
        runner.preflight()


def test_all_scores_in_one_go_equal_each_rule_scored_alone(uda_run):
    """all_scores shares forward passes between rules; every value must be what the rule gives alone."""
    spec, runner, _ = uda_run
    source, target = runner.domains.pair_data(0)
    rm = runner.methods[0]
    model = runner.models.build_model(rm, "none", target.num_classes).to(runner.device)
    together = runner.scorer.all_scores(model, source, target, runner.precision)
    assert set(together) == {"target-val", "source-val", "entropy", "im", "snd", "bnm", "dev"}
    for rule, value in together.items():
        assert value == pytest.approx(
            runner.scorer.rule_score(rule, model, source, target, runner.precision),
            rel=1e-5,
            abs=1e-6,
        )


ENSV_STUDY = UDA_STUDY.replace(
    'selection = ["snd", "target-val", "source-val"]', 'selection = ["im", "ensv", "dev"]'
).replace(
    """[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "dann"
""",
    "",
)


def test_pooled_ensv_selects_after_the_search_from_stored_predictions(tmp_path):
    """EnsV scores every completed trial against the ensemble of all of them: its row picks the
    trial that agrees most with that ensemble, computed here by hand from the stored predictions;
    DEV (a risk, stored negated) gets its own row; trials.csv and the agreement report both."""
    from harness_plugins.validators import ensemble_agreement

    spec = load_study(str(write_study(tmp_path, "ensv", body=ENSV_STUDY)))
    runner = make_runner(tmp_path, spec)
    runner.run()
    board, trials, prov = leaderboard.collect(spec, runner.storage_url)
    study = studies(spec, runner)[0]
    done = study.get_trials()
    by_hand = ensemble_agreement(
        [decode_probabilities(t.user_attrs["target_predictions"]) for t in done]
    )
    expected = max(zip(by_hand, done, strict=True), key=lambda vt: (vt[0], -vt[1].number))[1]
    row = board[board["selection"] == "ensv"].iloc[0]
    assert row["best_trial"] == expected.number and not row["oracle"]
    assert list(trials["score:ensv"]) == pytest.approx(by_hand)
    dev_row = board[board["selection"] == "dev"].iloc[0]
    best_dev = max(done, key=lambda t: (t.user_attrs["scores"]["dev"], -t.number))
    assert dev_row["best_trial"] == best_dev.number
    assert all(t.user_attrs["scores"]["dev"] <= 0 for t in done)  # minus a mean loss
    pooled = prov["validator_agreement"][0]
    assert pooled["n"]["ensv"] == pooled["n"]["dev"] == 3


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ('["ensv", "im"]', "'ensv' scores every trial against the others after the search"),
        ('["imm"]', "unknown validator 'imm'"),
    ],
)
def test_selection_refusals_name_the_key_before_training(tmp_path, selection, message):
    body = UDA_STUDY.replace('["snd", "target-val", "source-val"]', selection)
    spec = load_study(str(write_study(tmp_path, "bad", body=body)))
    runner = make_runner(tmp_path, spec)
    with pytest.raises(StudySpecError) as err:
        runner.preflight()
    assert message in str(err.value) and "selection" in str(err.value)
    if "imm" in selection:
        assert "'im'" in str(err.value)


def test_a_plugins_rule_selects_and_one_reading_target_labels_is_oracle(tmp_path):
    """Two rules from a plugin: a label-free one (the search's driver) and one that reads the
    target labels, which is flagged oracle for a method that claims to need none."""
    import types

    from test_search import BUILTIN_PLUGINS

    import harness
    from harness.api import Validator
    from harness.registry import PluginInfo, Registry

    class Confident(Validator):
        reads = ("target_logits",)

        def score(self, inputs):
            return float(inputs["target_logits"].softmax(1).amax(1).mean())

    class Peek(Validator):
        reads = ("target_logits", "target_labels")
        higher_is_better = False  # an error rate: stored negated

        def score(self, inputs):
            wrong = inputs["target_logits"].argmax(1) != inputs["target_labels"]
            return float(wrong.float().mean())

    @harness.hookimpl
    def register_validators(register):
        register("confident", Confident)
        register("peek", Peek)

    registry = Registry()
    registry.load_entry_points(only=BUILTIN_PLUGINS.split(","))
    registry.add_plugin(
        types.SimpleNamespace(register_validators=register_validators),
        PluginInfo("mine", "my-rules", "0", "tests"),
    )
    body = ENSV_STUDY.replace('["im", "ensv", "dev"]', '["confident", "peek"]').replace(
        "trials = 3", "trials = 2"
    )
    spec = load_study(str(write_study(tmp_path, "mine", body=body)))
    runner = make_runner(tmp_path, spec, registry=registry)
    runner.run()
    board, trials, _ = leaderboard.collect(spec, runner.storage_url)
    flags = {r["selection"]: r["oracle"] for r in board.to_dict("records")}
    assert flags == {"confident": False, "peek": True}
    for t in studies(spec, runner)[0].get_trials():
        scores = t.user_attrs["scores"]
        assert t.value == pytest.approx(scores["confident"])
        assert scores["peek"] == pytest.approx(scores["target-val"] - 1.0, abs=1e-6)


def test_without_the_builtin_rules_and_metrics_a_study_is_refused_before_training(tmp_path):
    """HARNESS_PLUGINS can leave the built-in validators or metrics out: a study whose rules
    ("auto" as each method resolves it) or metrics are then missing stops in preflight, naming
    the plugin to load, instead of failing inside a trial."""
    from test_search import BUILTIN_PLUGINS

    from harness.registry import Registry

    spec = load_study(str(write_study(tmp_path, "auto", body=UDA_STUDY.replace(
        'selection = ["snd", "target-val", "source-val"]', 'selection = "auto"'
    ))))  # fmt: skip
    for left_out, message in (
        ("validators", "unknown validator 'source-val'"),
        ("metrics", "unknown metric 'accuracy'"),
    ):
        registry = Registry()
        registry.load_entry_points(only=[p for p in BUILTIN_PLUGINS.split(",") if p != left_out])
        with pytest.raises(StudySpecError) as err:
            make_runner(tmp_path, spec, registry=registry).preflight()
        assert message in str(err.value) and f"the {left_out!r} plugin" in str(err.value)
