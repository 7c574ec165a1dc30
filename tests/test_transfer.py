"""Transferability scores (``harness.transfer``), their inputs (``harness.search.ranking``), the
``harness rank`` command and the leaderboard's Kendall tau section."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from harness import transfer
from harness.cli import app
from harness.errors import HarnessError
from harness.publish import transferability


def _classes(separated: bool, seed: int = 0, n: int = 240, d: int = 12, k: int = 4):
    """Features of ``k`` classes: far-apart class means (``separated``) or the same noise for all."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(0, 4, (k, d)) if separated else np.zeros((k, d))
    return centers[y] + rng.normal(0, 1, (n, d)), y


def _logits(features: np.ndarray, seed: int = 1, classes: int = 6) -> np.ndarray:
    return features @ np.random.default_rng(seed).normal(size=(features.shape[1], classes))


def test_every_score_prefers_separated_classes_to_noise_and_shuffled_labels():
    good, y = _classes(True)
    noise, _ = _classes(False)
    shuffled = np.random.default_rng(5).permutation(y)
    for name, score in {
        "logme": transfer.logme,
        "hscore": transfer.hscore,
        "leep": lambda f, y: transfer.leep(_logits(f), y),
        "nce": lambda f, y: transfer.nce(_logits(f).argmax(1), y),
    }.items():
        best = score(good, y)
        assert math.isfinite(best), name
        assert best > score(noise, y) + 0.1, name
        assert best > score(good, shuffled) + 0.1, name


def test_leep_and_nce_on_a_hand_computed_example():
    # source labels z = 0, 0, 0, 1 (one-hot dummy distributions), target labels y = 0, 0, 1, 1:
    # P(y=0|z=0) = 2/3, P(y=1|z=0) = 1/3, P(y=1|z=1) = 1
    hard = np.log(np.array([[1, 1e-30], [1, 1e-30], [1, 1e-30], [1e-30, 1]]))
    y = np.array([0, 0, 1, 1])
    expected = (2 * math.log(2 / 3) + math.log(1 / 3) + math.log(1)) / 4
    assert transfer.leep(hard, y) == pytest.approx(expected, abs=1e-9)
    assert transfer.nce(np.array([0, 0, 0, 1]), y) == pytest.approx(expected, abs=1e-12)
    # soft: theta = (0.5, 0.5) for every image: P(y|z) = 1/2 everywhere, LEEP = log 1/2
    assert transfer.leep(np.zeros((4, 2)), y) == pytest.approx(math.log(0.5), abs=1e-12)
    # soft and unequal: theta_1 = (0.8, 0.2), theta_2 = (0.2, 0.8), y = 0, 1
    theta = np.array([[0.8, 0.2], [0.2, 0.8]])
    joint = np.array([[0.4, 0.1], [0.1, 0.4]])  # P(y, z) = mean of theta over images of class y
    cond = joint / joint.sum(0)  # P(y | z)
    eep = [theta[0] @ cond[0], theta[1] @ cond[1]]
    assert transfer.leep(np.log(theta), np.array([0, 1])) == pytest.approx(np.log(eep).mean())
    # NCE with the target labels equal to the source labels is 0 (no uncertainty left)
    assert transfer.nce(np.array([2, 0, 1, 2]), np.array([1, 0, 2, 1])) == pytest.approx(0.0)


def test_hscore_does_not_change_when_features_are_scaled():
    f, y = _classes(True, d=40, n=30)  # fewer images than dimensions: the ridge matters
    for c in (1e-3, 7.0, 1e4):
        assert transfer.hscore(f * c, y) == pytest.approx(transfer.hscore(f, y), rel=1e-6)


def _direct_evidence(f: np.ndarray, t: np.ndarray, log_ab: np.ndarray) -> float:
    """The log evidence per sample of Bayesian linear regression, from the matrices themselves."""
    alpha, beta = np.exp(log_ab)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ t)
    r = f @ m - t
    value = (
        n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
        - beta / 2 * r @ r - alpha / 2 * m @ m - np.linalg.slogdet(a)[1] / 2
    )  # fmt: skip
    return float(value / n)


def test_logme_is_the_maximized_evidence():
    from scipy.optimize import minimize

    f, y = _classes(True, n=60, d=5, k=2)
    best = []
    for c in (0, 1):
        t = (y == c).astype(float)
        res = minimize(lambda p, t=t: -_direct_evidence(f, t, p), np.zeros(2), method="Nelder-Mead")
        best.append(-res.fun)
    assert transfer.logme(f, y) == pytest.approx(np.mean(best), abs=1e-4)


def test_kendall_tau():
    assert transfer.kendall_tau([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)
    assert transfer.kendall_tau([4, 3, 2, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(-1.0)
    assert transfer.kendall_tau([1, 2], [0.1, 0.2]) is None  # too few backbones
    assert transfer.kendall_tau([1, 2, float("nan"), 3], [0.1, 0.2, 0.3, 0.3]) == pytest.approx(1)
    assert transfer.kendall_tau([1, 1, 1], [0.1, 0.2, 0.3]) is None


def test_publish_section_reports_tau_against_the_best_final_row(tmp_path):
    rows_json = {
        "rows": [
            {"pair": "a->b", "backbone": n, "weights": "source", "label": f"{n}(source)",
             "scores": {"logme": {"value": v}, "leep": {"value": -v}, "nce": {"value": None},
                        "hscore": {"value": v}}}
            for n, v in (("r1", 1.0), ("r2", 2.0), ("r3", 3.0))
        ]
    }  # fmt: skip
    (tmp_path / transferability.FILE).write_text(json.dumps(rows_json))
    board = [
        {"pair": "a->b", "backbone": "r1", "weights": "source", "status": "final", "test_accuracy": 0.5},
        {"pair": "a->b", "backbone": "r1", "weights": "source", "status": "final", "test_accuracy": 0.9, "oracle": True},
        {"pair": "a->b", "backbone": "r2", "weights": "source", "status": "final", "test_accuracy": 0.6},
        {"pair": "a->b", "backbone": "r3", "weights": "source", "status": "final", "test_accuracy": 0.7},
        {"pair": "a->b", "backbone": "r3", "weights": "source", "status": "1/3 seeds", "test_accuracy": 0.1},
    ]  # fmt: skip
    markdown, data = transferability.section(tmp_path, board)
    tau = data["kendall_tau"][0]["tau"]
    # r1's oracle row is ignored (it has an honest one): accuracies 0.5 < 0.6 < 0.7
    assert tau["logme"] == pytest.approx(1.0) and tau["hscore"] == pytest.approx(1.0)
    assert tau["leep"] == pytest.approx(-1.0) and tau["nce"] is None
    assert (
        "| a->b | r1(source), r2(source), r3(source) | +1.00 (n=3) | -1.00 (n=3) | - (n=0) |"
        in markdown
    )
    assert transferability.section(tmp_path / "none", board) is None


def test_timm_classifier_is_used_only_where_it_reproduces_the_logits(monkeypatch):
    import timm
    import torch

    from harness.search import ranking
    from harness_plugins.timm_backbones import build_timm_backbone

    full = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    backbone = build_timm_backbone("test_resnet", weights="none")
    missing = backbone.module.load_state_dict(
        {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}, strict=False
    )
    assert not missing.missing_keys
    other = build_timm_backbone("test_efficientnet", weights="none")
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: full)
    classifier, what = ranking.timm_classifier("test_resnet", backbone)
    assert classifier is full.fc and "7 classes" in what
    with torch.no_grad():
        for p in backbone.module.parameters():  # features no longer the pretrained model's
            p.add_(0.5)
    assert ranking.timm_classifier("test_resnet", backbone)[0] is None
    assert ranking.timm_classifier("test_resnet", other)[0] is None  # features of another size


STUDY = """
description = "tiny rank study"
image_size = 16
batch_size = 256
seed = 0
precision = "fp32"
device = "cpu"

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
weights = "source"
strategy = "finetune"

[[methods]]
backbone = "test_resnet"
weights = "source"
head = "mlp"
strategy = "linear-probe"

[[methods]]
backbone = "{second}"
weights = "none"
strategy = "finetune"

[budget]
trials = 1
max_epochs = 1

[pretrain]
epochs = 1
"""


def _write(tmp_path: Path, name: str, second: str = "test_efficientnet") -> None:
    (tmp_path / "benchmarks").mkdir(exist_ok=True)
    (tmp_path / "benchmarks" / f"{name}.toml").write_text(
        textwrap.dedent(STUDY.format(second=second))
    )


def test_rank_command_scores_every_backbone_and_writes_the_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "tiny")
    board = tmp_path / "results" / "tiny" / "leaderboard.json"  # as after a run: tau is printed
    board.parent.mkdir(parents=True)
    rows = [{"pair": "digits->digits-m", "backbone": "test_resnet", "weights": "source",
             "status": "final", "test_accuracy": 0.5}]  # fmt: skip
    board.write_text(json.dumps({"rows": rows}))
    result = CliRunner().invoke(app, ["rank", "--study", "tiny"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results" / "tiny" / "transferability.json").read_text())
    rows = data["rows"]
    # two distinct backbones (test_resnet twice with the same weights counts once), one pair
    assert [r["label"] for r in rows] == ["test_resnet(source)", "test_efficientnet(none)"]
    for r in rows:
        assert r["pair"] == "digits->digits-m" and r["images"] > 500
        assert set(r["scores"]) == set(transfer.SCORES)
        for name, s in r["scores"].items():
            if s["value"] is None:
                assert s["not_available"], (r["label"], name)
            else:
                assert math.isfinite(s["value"]) and s["seconds"] >= 0, (r["label"], name)
    resnet, effnet = rows
    # the source-pretrained head gives LEEP and NCE; a random backbone has no classifier
    assert all(resnet["scores"][s]["value"] is not None for s in transfer.SCORES)
    assert resnet["source_classifier"] == "the source-pretrained linear head"
    assert effnet["scores"]["leep"]["value"] is None
    assert "random backbone" in effnet["scores"]["nce"]["not_available"]
    assert effnet["scores"]["logme"]["value"] is not None
    assert data["provenance"]["study_file_sha256"] and "timm" in data["provenance"]["packages"]
    assert "LogME" in result.output and "test_efficientnet(none)" in result.output
    assert "digits->digits-m: Kendall tau with fine-tuned test accuracy: LogME -" in result.output


def test_rank_refuses_a_backbone_that_cannot_be_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "bad", second="test_resnett")
    result = CliRunner().invoke(app, ["rank", "--study", "bad"])
    assert isinstance(result.exception, HarnessError) and result.exception.exit_code == 2
    assert str(result.exception).startswith("benchmarks/bad.toml: methods[2].backbone: unknown")
    assert not (tmp_path / "results").exists()


def test_rank_of_an_unknown_study_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "rank", "--study", "nowhere"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "nowhere" in result.stderr.splitlines()[0]
