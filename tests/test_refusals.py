"""What the harness refuses rather than changes without a word: a search setting past a backbone's
stages, a pair of one domain (unless the study says so, and its rows then say so), and a run in
which every trial of a method failed (exit 1, which method and why)."""

from __future__ import annotations

import signal
import sys

import optuna
import pytest
import torch
from conftest import write_study
from optuna.trial import TrialState, create_trial
from test_search import Explodes, make_runner, registry_with

from harness.errors import SearchFailedError, StudySpecError
from harness.publish import leaderboard
from harness.publish.markdown import to_markdown
from harness.publish.results import read_results
from harness.search.outcome import all_failed, check_outcome, failed_studies
from harness.search.preflight import check_drop_path, check_search_space
from harness.search.resolve import resolve_methods
from harness.search.space import suggest
from harness.store.backends import embedded_storage, make_storage
from harness.store.schema import optuna_study_name
from harness.study import load_study
from harness_plugins.strategies import FineTune

# ------------------------------------------------------------------ search settings and stages


def _depth_study(tmp_path, depth: str, name: str = "depth"):
    return load_study(
        str(write_study(tmp_path, name, extra_top="")), {"search.freeze_depth": depth}
    )


@pytest.mark.parametrize(("depth", "shown"), [(99, "99"), ([0, 42], "[0, 42]"), (6, "6")])
def test_a_freeze_depth_past_the_backbone_is_refused_before_anything_trains(tmp_path, depth, shown):
    spec = _depth_study(tmp_path, depth)
    runner = make_runner(tmp_path, spec)
    with pytest.raises(StudySpecError) as err:
        runner.preflight()  # also what run() and the parent of workers call first
    message = str(err.value)
    assert message == (
        f"{spec.path}: search.freeze_depth: {shown} is past test_resnet's 5 stages "
        "(0..5 allowed; methods[0] searches it)"
    )
    assert not runner.started and not runner.models.resets  # no weights, no model, no data
    assert not optuna.get_all_study_summaries(runner.storage)  # no trial


@pytest.mark.parametrize("depth", ["auto", 5, [0, 5], [0, 2], 0])
def test_freeze_depths_within_the_stages_pass_and_leave_the_generators_alone(tmp_path, depth):
    spec = _depth_study(tmp_path, depth)
    methods = resolve_methods(spec, registry_with())
    state = torch.get_rng_state()
    check_search_space(spec, methods)
    assert torch.equal(state, torch.get_rng_state())


def test_a_strategy_that_fixes_its_depth_is_not_checked(tmp_path):
    spec = _depth_study(tmp_path, 99)
    spec = spec.model_copy(update={"methods": spec.methods[2:]})  # linear-probe: depth "all"
    check_search_space(spec, resolve_methods(spec, registry_with()))


def test_the_search_space_never_trains_with_fewer_frozen_stages_than_asked(tmp_path):
    strategy = FineTune()
    spec = _depth_study(tmp_path, [0, 2])
    trial = optuna.trial.FixedTrial(
        {
            "backbone.freeze_depth": 2,
            "backbone.lr": 1e-3,
            "head.lr": 1e-3,
            "optimizer.weight_decay": 1e-4,
            "augment.policy": "none",
        }
    )
    assert suggest(spec, trial, strategy, 5)["backbone.freeze_depth"] == 2
    assert (
        suggest(_depth_study(tmp_path, 3, "three"), trial, strategy, 5)["backbone.freeze_depth"]
        == 3
    )
    with pytest.raises(StudySpecError, match=r"\[0, 2\] is past the backbone's 1 stages"):
        suggest(spec, trial, strategy, 1)  # no preflight (a plugin's own loop): still refused


# ------------------------------------------------------------------ pairs of one domain


def test_an_in_domain_pair_is_labelled_in_the_board_and_its_heading(tmp_path):
    path = write_study(tmp_path)
    spec = load_study(
        str(path), {"pairs[0].target": "digits", "pairs[0].in_domain": True, "final_seeds": 1}
    )
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(storage=url, study_name="unrelated")
    board, _, prov = leaderboard.tables(read_results(spec, url))
    assert list(board["in_domain"]) == [True] * 3
    assert "## digits->digits (in-domain)\n" in to_markdown(spec, board, prov)
    from harness.publish.html import _pair_section

    section = "".join(_pair_section("digits->digits", board, {}, "classification", ["accuracy"]))
    assert ">digits-&gt;digits (in-domain)</h2>" in section
    # a study without it: no column, the heading as before
    plain = load_study(str(path))
    board, _, prov = leaderboard.tables(read_results(plain, url))
    assert "in_domain" not in board
    assert "## digits->digits-m\n" in to_markdown(plain, board, prov)


# ------------------------------------------------------------------ every trial failed


def _trials(*specs: tuple[TrialState, str, str]) -> list:
    study = optuna.create_study()
    for state, reason, error in specs:
        attrs = {"fail_reason": reason, "error": error} if state == TrialState.FAIL else {}
        value = 0.5 if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, value=value, user_attrs=attrs))
    return study.get_trials()


FAIL = TrialState.FAIL


def test_all_failed_names_the_most_common_reason_and_one_error():
    trials = _trials(
        (FAIL, "oom", "OutOfMemoryError: CUDA out of memory"),
        (FAIL, "error", "RuntimeError: first\nshape mismatch in layer2"),
        (FAIL, "interrupted", "KeyboardInterrupt: "),  # not counted: not part of the budget
        (FAIL, "error", "RuntimeError: second"),
    )
    failed = all_failed("a->b | m", trials, budget=3)
    assert str(failed) == (
        "a->b | m: all 3 trials failed; most common: error (2 of 3): shape mismatch in layer2"
    )


@pytest.mark.parametrize(
    "states",
    [
        [(FAIL, "error", "E: x"), (TrialState.COMPLETE, "", "")],
        [(FAIL, "error", "E: x"), (TrialState.PRUNED, "", "")],
        [(FAIL, "interrupted", "")],  # nothing budgeted
        [],
    ],
)
def test_a_study_with_a_trained_or_no_budgeted_trial_has_not_all_failed(states):
    assert all_failed("s", _trials(*states), budget=4) is None


def test_only_the_budgeted_trials_are_judged():
    trials = _trials(
        (FAIL, "nonfinite", ""), (FAIL, "nonfinite", ""), (TrialState.COMPLETE, "", "")
    )
    failed = all_failed("s", trials, budget=2)  # the third came past the budget
    assert str(failed) == "s: all 2 trials failed; most common: nonfinite (2 of 2)"


ALL_FAIL_STUDY = """
image_size = 16
batch_size = 64
final_seeds = 1

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
strategy = "explodes"

[budget]
trials = 2
max_epochs = 1
"""


def test_cli_run_whose_every_trial_fails_publishes_then_exits_1(tmp_path, monkeypatch, capsys):
    from harness import cli, registry

    path = write_study(tmp_path, "explodes", body=ALL_FAIL_STUDY)
    monkeypatch.setattr(registry, "get_registry", lambda: registry_with(("explodes", Explodes)))
    monkeypatch.setattr(
        sys, "argv", ["harness", "run", "--study", str(path), "--results-dir", str(tmp_path / "r")]
    )
    sigterm = signal.getsignal(signal.SIGTERM)  # run installs its pre-emption handler
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert line == (
        "error: digits->digits-m | test_resnet(none)+linear+explodes: all 2 trials failed; "
        "most common: error (2 of 2): RuntimeError: boom in step"
    )
    assert "trials.csv" in err and "Traceback" not in err
    out = tmp_path / "r" / "explodes"
    assert (out / "leaderboard.json").is_file() and (out / "trials.csv").is_file()
    # the same verdict from the storage alone, as a function of the stored trials
    spec = load_study(str(path))
    storage = make_storage(embedded_storage(out))
    assert [f.study for f in failed_studies(spec, storage)] == [
        optuna_study_name(spec.pairs[0], spec.methods[0])
    ]
    with pytest.raises(SearchFailedError):
        check_outcome(spec, storage, out / "trials.csv")


# ------------------------------------------------------------------ the training recipe

RECIPE_REFUSALS = [
    (
        {"search.augment": "randaugment", "search.augment_ops": ["rotate", "spin"]},
        "search.augment_ops: unknown augmentation op 'spin'; allowed: identity, rotate,",
    ),
    (
        {"search.augment_ops": ["rotate"]},
        "search.augment_ops: applies only when search.augment has randaugment or trivialaugment",
    ),
    (
        {"search.augment": "randaugment", "search.magnitude": 31},
        "search.magnitude: expected a number or [low, high] in [0, 30], got 31.0",
    ),
    (
        {"search.augment": "randaugment", "search.augment_ops": ["rotate"], "search.num_ops": 2},
        "search.num_ops: expected an integer or [low, high] within 1..1 (the operations searched)",
    ),
    (
        {"task": "segmentation", "search.mixup_alpha": 0.2},
        "search.mixup_alpha: MixUp/CutMix mix class labels, for classification only; "
        "this study's task is segmentation (leave mixup_alpha out)",
    ),
    (
        {"task": "segmentation", "search.cutmix_alpha": [0, 1.0]},
        "search.cutmix_alpha: MixUp/CutMix mix class labels, for classification only;",
    ),
    ({"search.mixup_alpha": -1}, "search.mixup_alpha: expected a number >= 0 or [low, high]"),
    ({"search.mix_prob": 0.5}, "search.mix_prob: applies only when search.mixup_alpha has"),
    (
        {"search.ema": True, "search.ema_decay": 1.0},
        "search.ema_decay: expected a number or [low, high] in (0, 1), got 1.0",
    ),
    (
        {"search.ema": [False, True], "search.ema_decay": [0.0, 0.9]},
        "search.ema_decay: expected a number or [low, high] in (0, 1), got [0.0, 0.9]",
    ),
    ({"search.ema_decay": 0.99}, "search.ema_decay: applies only when search.ema has true"),
    (
        {"search.optimizer": "adam"},
        "search.optimizer: unknown optimizer 'adam'; allowed: adamw, sgd",
    ),
    (
        {"search.schedule": ["cosine", "linear"]},
        "search.schedule: unknown schedule 'linear'; allowed: cosine, constant, step",
    ),
    (
        {"search.warmup": 0.5},
        "search.warmup: expected a number or [low, high] in [0, 0.5), got 0.5",
    ),
    (
        {"search.label_smoothing": [0, 0.6]},
        "search.label_smoothing: expected a number or [low, high] in [0, 0.5)",
    ),
    ({"search.drop_path": -0.1}, "search.drop_path: expected a number or [low, high] in [0, 0.5)"),
    (
        {"search.batch_size": [1, 8]},
        "search.batch_size: expected batch sizes of at least 2, got [1, 8]",
    ),
    ({"search.augment": ["none", "autoaugment"]}, "search.augment: unknown policy 'autoaugment'"),
]


@pytest.mark.parametrize(("overrides", "expected"), RECIPE_REFUSALS)
def test_a_bad_recipe_setting_is_one_line_naming_the_file_and_key(tmp_path, overrides, expected):
    path = write_study(tmp_path)
    with pytest.raises(StudySpecError) as err:
        load_study(str(path), overrides)
    message = str(err.value)
    assert message.startswith(f"{path}: {expected}") and "\n" not in message


def test_cli_refuses_mixup_for_segmentation_with_exit_2_before_training(
    tmp_path, monkeypatch, capsys
):
    from harness import cli

    path = write_study(tmp_path, "seg", extra_top='task = "segmentation"')
    path.write_text(path.read_text().replace("[search]\n", "[search]\nmixup_alpha = 0.2\n"))
    results = tmp_path / "r"
    monkeypatch.setattr(
        sys, "argv", ["harness", "run", "--study", str(path), "--results-dir", str(results)]
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert lines == [
        f"error: {path}: search.mixup_alpha: MixUp/CutMix mix class labels, for classification "
        "only; this study's task is segmentation (leave mixup_alpha out)"
    ]
    assert not results.exists() or not any(results.rglob("*.db"))  # nothing trained or stored


# ------------------------------------------------------------------ drop path without modules

#: a small timm model without DropPath modules (its blocks have no residual drop path)
NO_DROP_PATH = "ghostnet_050"


def _drop_path_study(tmp_path, rate: str):
    """The tiny study with its second method (finetune) on a backbone without drop path."""
    path = write_study(tmp_path, "dp")
    first, second, rest = path.read_text().split('backbone = "test_resnet"', 2)
    text = f'{first}backbone = "test_resnet"{second}backbone = "{NO_DROP_PATH}"{rest}'
    path.write_text(text.replace("[search]\n", f"[search]\ndrop_path = {rate}\n"))
    return path


@pytest.mark.parametrize(("rate", "shown"), [("[0, 0.2]", "[0.0, 0.2]"), ("0.1", "0.1")])
def test_drop_path_for_a_backbone_without_it_is_refused_before_anything_trains(
    tmp_path, rate, shown
):
    spec = load_study(str(_drop_path_study(tmp_path, rate)))
    runner = make_runner(tmp_path, spec)
    with pytest.raises(StudySpecError) as err:
        runner.preflight()
    assert str(err.value) == (
        f"{spec.path}: search.drop_path: {shown} for "
        f"methods[1] ({NO_DROP_PATH}, finetune): the backbone has no timm DropPath modules "
        "(timm models with residual blocks have them); leave drop_path unset or 0 for a study "
        "of this backbone"
    )
    assert not runner.started and not runner.models.resets
    assert not optuna.get_all_study_summaries(runner.storage)


def test_drop_path_zero_or_on_backbones_that_have_it_passes(tmp_path):
    methods = lambda s: resolve_methods(s, registry_with())  # noqa: E731
    spec = load_study(str(_drop_path_study(tmp_path, "0")))
    check_drop_path(spec, methods(spec))  # 0: nothing to set, nothing refused
    spec = load_study(str(write_study(tmp_path)), {"search.drop_path": [0, 0.3]})
    state = torch.get_rng_state()
    check_drop_path(spec, methods(spec))  # test_resnet has DropPath modules
    assert torch.equal(state, torch.get_rng_state())


def test_cli_validate_refuses_drop_path_without_modules_with_exit_2(tmp_path, monkeypatch, capsys):
    from harness import cli

    path = _drop_path_study(tmp_path, "[0, 0.2]")
    monkeypatch.setattr(sys, "argv", ["harness", "validate", "--study", str(path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: search.drop_path: [0.0, 0.2]")
    assert "ghostnet_050, finetune" in lines[0] and "no timm DropPath modules" in lines[0]
