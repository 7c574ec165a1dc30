"""Metrics as plugins: the built-ins' known answers, a study reporting chosen metrics, and the
one-line refusals of an unknown or wrong-task metric."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_study
from test_search import make_runner

from harness.errors import StudySpecError
from harness.metrics import reported_metrics, score
from harness.publish import leaderboard
from harness.study import load_study

STUDY = """
image_size = 16
batch_size = 64
seed = 0
final_seeds = 2
metrics = ["balanced_accuracy", "top5"]

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "source-only"

[budget]
trials = 1
max_epochs = 1
"""


def test_balanced_accuracy_and_top5_known_answers():
    # class 0: 3 of 4 right; class 1: 0 of 1 right; accuracy 3/5, balanced (0.75 + 0) / 2
    logits = torch.tensor([[2.0, 0, 1], [2, 0, 1], [2, 0, 1], [0, 2, 1], [2, 1, 0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    m = score("classification", logits, labels, 3, ["accuracy", "balanced_accuracy", "top5"])
    assert m["accuracy"] == pytest.approx(0.6)
    # torchmetrics' macro average leaves out classes absent from both truth and prediction
    assert m["balanced_accuracy"] == pytest.approx(0.375)
    assert m["top5"] == 1.0  # three classes: every true class is among the top five


def test_dice_and_miou_known_answers():
    pred = torch.tensor([[[0, 0], [1, 1]]])
    truth = torch.tensor([[[0, 1], [1, 255]]])  # one void pixel
    m = score("segmentation", pred, truth, 2, ["miou", "dice", "pixel_accuracy"])
    # class 0: tp 1, pred 2, truth 1 -> IoU 1/2, Dice 2/3; class 1: tp 1, pred 1, truth 2 -> 1/2, 2/3
    assert m["miou"] == pytest.approx(0.5) and m["dice"] == pytest.approx(2 / 3)
    assert m["pixel_accuracy"] == pytest.approx(2 / 3)


def test_defaults_are_unchanged_and_the_primary_metric_leads():
    assert reported_metrics("classification") == ["accuracy", "macro_f1", "precision", "recall"]
    assert reported_metrics("segmentation") == ["miou", "pixel_accuracy", "per_class_iou"]
    assert reported_metrics("classification", ["top5", "accuracy"]) == ["accuracy", "top5"]


def test_a_study_reports_the_metrics_it_names(tmp_path):
    spec = load_study(str(write_study(tmp_path, "m", body=STUDY)))
    runner = make_runner(tmp_path, spec)
    runner.run()
    board, _, prov = leaderboard.collect(spec, runner.storage_url)
    row = board.iloc[0]
    for name in ("accuracy", "balanced_accuracy", "top5"):
        assert 0 <= row[f"test_{name}"] <= 1 and math.isfinite(row[f"test_{name}_se"])
    assert "test_macro_f1" not in board  # only what the study names, behind the primary
    leaderboard.write(tmp_path / "out", spec, board, _, prov)
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "test balanced acc %" in md and "test top-5 acc %" in md


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ('["top-5"]', "unknown metric 'top-5'; did you mean 'top5'"),
        ('["miou"]', "metric 'miou' serves segmentation, not classification"),
    ],
)
def test_a_bad_metric_is_refused_before_training(tmp_path, metrics, message):
    body = STUDY.replace('["balanced_accuracy", "top5"]', metrics)
    spec = load_study(str(write_study(tmp_path, "bad", body=body)))
    with pytest.raises(StudySpecError) as err:
        make_runner(tmp_path, spec).preflight()
    assert message in str(err.value) and "metrics" in str(err.value)
