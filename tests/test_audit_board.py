"""The audit's findings on the published board: best_params.json keyed by selection rule with the
standard error; rows picked label-free from a search that target labels drove are flagged; per-seed
test values and a bootstrap interval over test images and seeds are published, with n/a for
storages without per-image outcomes."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import BUILTIN_PLUGINS

from harness.metrics import segmentation_metrics
from harness.publish import leaderboard, uncertainty
from harness.publish.bundle import export_bundle
from harness.publish.results import read_results
from harness.registry import Registry
from harness.search import RunOptions, build_driver
from harness.store import per_image
from harness.store.backends import make_storage
from harness.store.schema import PER_IMAGE_PREFIX
from harness.study import load_study

STUDY = """
image_size = 16
batch_size = 64
seed = 0
final_seeds = 2
selection = {selection}

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "source-only"

[budget]
trials = 3
max_epochs = 1

[search]
startup_trials = 1
pruner = "none"
augment = "none"
"""


def _run(tmp, name: str, selection: str):
    (tmp / "benchmarks").mkdir(exist_ok=True)
    path = tmp / "benchmarks" / f"{name}.toml"
    path.write_text(textwrap.dedent(STUDY.format(selection=selection)))
    spec = load_study(str(path))
    registry = Registry()
    registry.load_entry_points(only=BUILTIN_PLUGINS.split(","))
    results_dir = tmp / "results" / spec.name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        driver = build_driver(spec, registry, RunOptions(results_dir=results_dir, log=print))
        driver.run()
    finally:
        torch.set_num_threads(threads)
    results = read_results(spec, driver.storage_url)
    board, trials, provenance = leaderboard.tables(results)
    leaderboard.write(results_dir, spec, board, trials, provenance)
    export_bundle(results_dir, results, board)
    return spec, driver.storage_url, results_dir


@pytest.fixture(scope="module")
def labels_first(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("audit"), "labels_first", '["target-val", "im"]')


@pytest.fixture(scope="module")
def im_first(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("audit"), "im_first", '["im", "target-val"]')


NAME = "digits->digits-m | test_resnet(none)+linear+source-only"


def _rows(results_dir):
    return json.loads((results_dir / "leaderboard.json").read_text())["rows"]


def test_best_params_has_one_entry_per_rule_with_se(labels_first):
    _, _, out = labels_first
    best = json.loads((out / "bundle" / "best_params.json").read_text())
    (rules,) = best["pairs"]["digits->digits-m"].values()
    assert set(rules) == {"target-val", "im"}
    by_rule = {r["selection"]: r for r in _rows(out)}
    for rule, entry in rules.items():
        assert entry["selection"] == rule
        assert entry["best_trial"] == by_rule[rule]["best_trial"]
        assert entry["params"] == by_rule[rule]["best_params"]
        assert entry["test_accuracy_se"] == pytest.approx(by_rule[rule]["test_accuracy_se"])
        assert entry["test_accuracy_se"] > 0
    assert "test_accuracy_se" in (out / "bundle" / "README.txt").read_text()


def test_label_free_rows_of_a_search_driven_by_target_labels_are_flagged(labels_first, im_first):
    flagged = {r["selection"]: r["search_saw_target_labels"] for r in _rows(labels_first[2])}
    assert flagged == {"target-val": True, "im": True}
    md = (labels_first[2] / "leaderboard.md").read_text()
    assert "| im †" in md and "target labels drove this row's search" in md
    assert "target-val **oracle** †" not in md  # a target-val row reads them itself
    honest = {r["selection"]: r["search_saw_target_labels"] for r in _rows(im_first[2])}
    assert honest == {"im": False, "target-val": False}
    md = (im_first[2] / "leaderboard.md").read_text()
    assert "†" not in md
    csv = (labels_first[2] / "leaderboard.csv").read_text()
    assert "search_saw_target_labels" in csv.splitlines()[0]


def test_per_seed_values_and_interval(labels_first):
    spec, _, out = labels_first
    for row in _rows(out):
        per_seed = row["test_per_seed"]
        assert sorted(int(s) for s in per_seed) == row["seeds"]
        assert np.mean(list(per_seed.values())) == pytest.approx(row["test_accuracy"])
        low, high = row["test_accuracy_ci_low"], row["test_accuracy_ci_high"]
        assert low <= row["test_accuracy"] <= high and high - low > 0
    md = (out / "leaderboard.md").read_text()
    assert "95% CI (images+seeds) %" in md and "standard error over the final seeds" in md
    trials = pd.read_csv(out / "trials.csv").set_index("trial")
    for row in _rows(out):
        for seed, value in row["test_per_seed"].items():
            assert trials.loc[row["best_trial"], f"final_test_accuracy:{seed}"] == pytest.approx(
                value
            )
    others = trials.drop(index=[r["best_trial"] for r in _rows(out)])
    assert others.filter(like="final_test_accuracy:").isna().all().all()


def test_per_image_outcomes_match_the_stored_test_accuracy(labels_first):
    spec, url, _ = labels_first
    storage = make_storage(url)
    study = optuna.load_study(study_name=NAME, storage=storage)
    attrs = study.user_attrs
    keys = [k for k in attrs if k.startswith(PER_IMAGE_PREFIX)]
    assert keys
    for key in keys:
        correct = per_image.decode(attrs[key])
        record = attrs["final:" + key.removeprefix(PER_IMAGE_PREFIX)]
        assert correct.mean() == pytest.approx(record["test"]["accuracy"], abs=1e-6)


def test_rows_without_per_image_outcomes_say_na(im_first, tmp_path):
    spec, url, _ = im_first
    storage = make_storage(url)
    study = optuna.load_study(study_name=NAME, storage=storage)
    for key in [k for k in study.user_attrs if k.startswith(PER_IMAGE_PREFIX)]:
        study.set_user_attr(key, None)  # as a storage written before they were kept
    results = read_results(spec, url)
    board, trials, provenance = leaderboard.tables(results)
    leaderboard.write(tmp_path, spec, board, trials, provenance)
    rows = _rows(tmp_path)
    assert all(r["test_accuracy_ci_low"] is None and r["test_per_seed"] for r in rows)
    assert "| n/a" in (tmp_path / "leaderboard.md").read_text()


def test_segmentation_counts_give_the_split_miou_and_an_interval():
    gen = torch.Generator().manual_seed(0)
    c = 4
    truth = torch.randint(0, c, (12, 8, 8), generator=gen)
    truth[0, :2] = 255  # void pixels are left out
    seeds = []
    for _ in range(3):
        preds = torch.where(
            torch.rand(truth.shape, generator=gen) < 0.7, truth, torch.randint(0, c, truth.shape)
        ).clamp_max(c - 1)
        record = per_image.segmentation_outcomes(preds.to(torch.uint8), truth, c)
        counts = per_image.decode(record)
        assert counts.shape == (12, 2, c)
        expected = segmentation_metrics(preds, truth, c)["miou"]
        assert uncertainty._miou(counts[None])[0] == pytest.approx(expected)
        seeds.append(record)
    low, high = uncertainty.interval("segmentation", seeds)
    assert 0 < low < high < 1
    assert np.isnan(uncertainty.interval("segmentation", [*seeds[:2], None])[0])
    assert per_image.decode({"format": "unknown", "n": 1, "data": ""}) is None
