"""``harness export``: a kept model of a leaderboard row copied out with its card, the rows with kept
models listed when the selectors do not name one, and the ensemble of a row's seeds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import write_study
from test_predict import DIGITS, card_for, digits_m_test, reference_logits, run_cli, tiny_model

from harness import load_model
from harness.errors import WeightsError
from harness.models.card import models_root, read_card, row_folder, verify, write_model_folder

PAIR, BEST, OTHER = "digits->digits-m", "test_resnet(none)+linear+finetune", "test_resnet(none)+mlp+linear-probe"  # fmt: skip
SEEDS = (10000, 10001)


def study_with_kept_models(tmp_path):
    """A study file, and beside it results/tiny/ with a leaderboard whose best row kept 2 seeds."""
    path = write_study(tmp_path)
    results = tmp_path / "results" / "tiny"
    models, entries = {}, []
    for seed in SEEDS:
        folder = row_folder(models_root(results), PAIR, BEST, "target-val", seed)
        models[seed] = tiny_model("classification", "linear", 10, 16, seed)
        card = card_for("classification", "linear", DIGITS, 16, 16, seed=seed)
        write_model_folder(folder, models[seed].state_dict(), card)
        sha = read_card(folder)["files"]["model.safetensors"]
        entries.append({"seed": seed, "path": str(folder.relative_to(results)), "sha256": sha})
    rows = [
        {"pair": PAIR, "target": "digits-m", "method": BEST, "selection": "target-val", "rank": 1, "oracle": False, "models": entries},
        {"pair": PAIR, "target": "digits-m", "method": OTHER, "selection": "target-val", "rank": 2, "oracle": False},
    ]  # fmt: skip
    (results / "leaderboard.json").write_text(json.dumps({"study": "tiny", "rows": rows}))
    return path, models


def test_export_copies_the_kept_model_or_lists_the_rows_that_have_one(
    tmp_path, monkeypatch, capsys
):
    study, models = study_with_kept_models(tmp_path)
    out = tmp_path / "winner"
    code, _, err = run_cli(monkeypatch, capsys, "export", "--study", str(study), "--out", str(out))
    lines = err.splitlines()
    assert code == 2 and lines[0] == "error: 2 rows match; rows with kept models:"
    assert lines[1].strip() == (
        f"--pair {PAIR} --method {BEST} --rule target-val (rank 1): seeds 10000, 10001"
    )
    assert not out.exists()
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "-s", str(study), "--method", OTHER, "--out", str(out)
    )
    assert code == 2 and "no kept model" in err.splitlines()[0] and BEST in err.splitlines()[1]
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "export",
        "-s",
        str(study),
        "--method",
        "test_resnet",
        "--out",
        str(out),
    )
    assert code == 2 and err.startswith("error: unknown method 'test_resnet'; did you mean")
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "-s", str(study), "--rank", "1", "--seed", "10001",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    verify(out)
    assert read_card(out)["seed"] == 10001
    x = digits_m_test(32)
    assert torch.equal(load_model(out).predict(x).logits, reference_logits(models[10001], x))
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "-s", str(study), "--rank", "1", "--out", str(out)
    )
    assert code == 2 and "already exists" in err


def test_ensemble_averages_the_seeds_probabilities(tmp_path, monkeypatch, capsys):
    study, models = study_with_kept_models(tmp_path)
    out = tmp_path / "ensemble"
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "-s", str(study), "--rank", "1", "--ensemble",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (out / "members").iterdir()) == [f"seed-{s}" for s in SEEDS]
    card = read_card(out)
    assert card["ensemble"] == list(SEEDS) and card["test"] is None
    loaded = load_model(out)
    x = digits_m_test(32)
    want = sum(reference_logits(models[s], x).softmax(1) for s in SEEDS) / len(SEEDS)
    got = loaded.predict(x)
    assert torch.allclose(got.probabilities, want, atol=1e-6) and got.logits is None
    assert torch.equal(got.classes, want.argmax(1))
    # a member changed after the export: the ensemble is refused, one line
    weights = out / "members" / "seed-10000" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")
    with pytest.raises(WeightsError, match="seed-10000/model.safetensors: sha256 mismatch"):
        load_model(out)


E2E_STUDY = """
image_size = 16
batch_size = 64
final_seeds = 2
selection = ["target-val"]

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "finetune"

[budget]
trials = 1
max_epochs = 1
"""

FRESH_SCORE = """
import sys, torch
import harness
from harness.metrics import score
m = harness.load_model(sys.argv[1], device="cpu")
x, y = torch.load(sys.argv[2], weights_only=True)
logits = m.predict(x, batch_size=64 * 4).logits
print(repr(score("classification", logits, y, len(m.class_names))["accuracy"]))
"""


@pytest.mark.slow
def test_a_studys_kept_model_exported_scores_its_test_accuracy_in_a_fresh_process(
    tmp_path, monkeypatch, capsys
):
    from test_search import registry_with

    from harness.publish import leaderboard
    from harness.search import RunOptions, build_driver
    from harness.study import load_study

    path = write_study(tmp_path, "e2e", body=E2E_STUDY)
    spec = load_study(str(path))
    target_dir = tmp_path / "results" / "e2e"
    driver = build_driver(spec, registry_with(), RunOptions(target_dir, log=lambda m: None))
    driver.run()
    board, trials, prov = leaderboard.collect(spec, driver.storage_url)
    leaderboard.write(target_dir, spec, board, trials, prov)
    (row,) = json.loads((target_dir / "leaderboard.json").read_text())["rows"]
    test = driver.domains.pair_data(0)[1].test
    torch.save((test.range(0, len(test)), test.y), tmp_path / "test.pt")
    accuracies = []
    for m in row["models"]:
        out = tmp_path / f"export-{m['seed']}"
        code, _, err = run_cli(
            monkeypatch, capsys, "export", "-s", str(path), "--seed", str(m["seed"]), "-o", str(out)
        )
        assert code == 0, err
        fresh = subprocess.run(
            [sys.executable, "-c", FRESH_SCORE, str(out), str(tmp_path / "test.pt")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        accuracies.append(float(fresh.stdout))
        assert accuracies[-1] == read_card(out)["test"]["accuracy"]
    assert sum(accuracies) / len(accuracies) == pytest.approx(row["test_accuracy"], abs=1e-9)
