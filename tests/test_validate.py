"""``harness validate`` is ``harness run``'s preflight: over the same broken studies both refuse
(exit 2, an error naming the study file) or both pass, and a refused run leaves no storage behind."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app

GOOD = """
description = "validate vs run"
image_size = 16
batch_size = 32
seed = 0
final_seeds = 1
reuse_backbone = false
precision = "fp32"
{top}

[[pairs]]
source = "{source}"
target = "{target}"

[[methods]]
backbone = "test_resnet"
weights = "{weights}"
head = "linear"
strategy = "finetune"
{method}

[budget]
trials = 1
max_epochs = 1

[search]
startup_trials = 1
pruner = "none"
freeze_depth = {depth}
{folder}
"""

FOLDER = """
[datasets.mine]
plugin = "folder"
root = "{root}"
"""


class _Payload:
    """A pickled object whose loading would write ``sentinel``: it must never be unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def _folder(root: Path, bad: bool = False) -> Path:
    """Two domains of two classes of small images; ``bad`` adds an unreadable one to ``a``."""
    rng = np.random.default_rng(0)
    for domain in ("a", "b"):
        for cls in ("cat", "dog"):
            d = root / domain / cls
            d.mkdir(parents=True)
            for k in range(6):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{k}.png")
    if bad:
        (root / "a" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def _study(tmp_path: Path, case: str) -> Path:
    """The study file of ``case``: one mistake each, or ``good``."""
    fields = {
        "top": "",
        "source": "digits",
        "target": "digits-m",
        "weights": "none",
        "method": "",
        "depth": "[0, 2]",
        "folder": "",
    }
    if case == "unknown_head_option":
        fields["method"] = "head_options = {hiden = 8}"
    elif case == "freeze_depth_past_stages":
        fields["depth"] = "99"
    elif case in ("good", "missing_root", "unreadable_image"):  # a folder dataset: small, fast
        root = tmp_path / "data"
        if case != "missing_root":
            _folder(root, bad=case == "unreadable_image")
        fields |= {"source": "mine/a", "target": "mine/b", "folder": FOLDER.format(root=root)}
    elif case == "missing_weights":
        fields["weights"] = str(tmp_path / "nowhere.safetensors")
    elif case == "pickle_weights":
        path = tmp_path / "evil.pth"
        torch.save({"w": torch.zeros(1), "x": _Payload(tmp_path / "pwned")}, path)
        fields["weights"] = str(path)
    elif case == "cuda_without_gpu":
        fields["top"] = 'device = "cuda"'
    elif case == "same_domain_pair":
        fields["target"] = "digits"
    path = tmp_path / f"{case}.toml"
    path.write_text(textwrap.dedent(GOOD.format(**fields)))
    return path


BROKEN = [
    "unknown_head_option",
    "freeze_depth_past_stages",
    "missing_root",
    "unreadable_image",
    "missing_weights",
    "pickle_weights",
    "same_domain_pair",
]
if not torch.cuda.is_available():
    BROKEN.append("cuda_without_gpu")


def _harness(*args: str):
    """The command in this process, as ``main`` runs it (a HarnessError is one line, exit 2)."""
    return CliRunner().invoke(app, list(args))


def _refusal(result, path: Path) -> str:
    """A refusal: the error, its first line naming the study file (bad image files follow it, one
    per line)."""
    from harness.errors import HarnessError

    assert isinstance(result.exception, HarnessError), result.output
    assert result.exception.exit_code == 2
    message = str(result.exception)
    assert path.name in message.splitlines()[0], message
    return message


@pytest.mark.parametrize("case", BROKEN)
def test_validate_and_run_refuse_the_same_broken_studies(tmp_path, case):
    path = _study(tmp_path, case)
    results = tmp_path / "results"
    checked = _harness("validate", "--study", str(path))
    ran = _harness("run", "--study", str(path), "--results-dir", str(results), "--no-report")
    assert _refusal(checked, path) == _refusal(ran, path)  # the same check, the same words
    assert not results.exists()  # no storage, no results folder: `harness ls` lists nothing
    assert not (tmp_path / "pwned").exists()  # the pickle was never executed


def test_validate_and_run_pass_the_same_good_study(tmp_path):
    path = _study(tmp_path, "good")
    checked = _harness("validate", "--study", str(path))
    assert checked.exit_code == 0, checked.output
    assert "ok (1 pair(s), 1 method(s))" in checked.output
    assert not (tmp_path / "results").exists()  # validate writes nothing
    results = tmp_path / "out"
    ran = _harness("run", "--study", str(path), "--results-dir", str(results), "--no-report")
    assert ran.exit_code == 0, ran.output
    assert (results / "good" / "optuna.journal").is_file()
    # how the folder's files were made square, and at what stored size, is in the provenance
    board = json.loads((results / "good" / "leaderboard.json").read_text())
    pair = board["rows"][0]["pair"]
    resize = {"source": "center-crop", "target": "center-crop"}
    stored = {"source": 18, "target": 18}  # 8/7 of image_size 16: crops of 16 to train and test
    assert board["provenance"]["preprocessing"] == {
        pair: {"resize": resize, "stored_size": stored, "image_size": 16}
    }
    assert "- preprocessing: " in (results / "good" / "leaderboard.md").read_text()


def test_source_weights_are_checked_without_pretraining(tmp_path, monkeypatch):
    from harness.search import models

    def no_training(*args, **kwargs):
        raise AssertionError("validate pretrained the source weights")

    monkeypatch.setattr(models, "source_pretrained", no_training)
    path = _study(tmp_path, "good")
    path.write_text(path.read_text().replace('weights = "none"', 'weights = "source"'))
    checked = _harness("validate", "--study", str(path))
    assert checked.exit_code == 0, checked.output
    assert "pretrains them on the source first" in checked.output


def test_validate_refuses_a_changed_study_as_run_does(tmp_path):
    path = _study(tmp_path, "good")
    results = tmp_path / "out"
    ran = _harness("run", "--study", str(path), "--results-dir", str(results), "--no-report")
    assert ran.exit_code == 0, ran.output
    journal = results / "good" / "optuna.journal"
    before = journal.read_bytes()
    same = _harness("validate", "--study", str(path), "--results-dir", str(results))
    assert same.exit_code == 0, same.output  # unchanged: it would resume
    changed = ("--study", str(path), "--results-dir", str(results), "--set", "batch_size=16")
    checked = _harness("validate", *changed)
    assert journal.read_bytes() == before  # validate read the storage and wrote nothing
    ran = _harness("run", *changed, "--no-report")
    message = _refusal(checked, path)
    assert message == _refusal(ran, path)  # the same check, the same words
    assert "batch_size changed since its trials were run (batch_size was 32, now 16)" in message


def test_validate_creates_no_storage(tmp_path):
    path = _study(tmp_path, "good")
    for storage in (None, f"sqlite:///{tmp_path / 'db' / 'x.db'}", f"journal:///{tmp_path / 'j'}"):
        extra = ("--storage", storage) if storage else ()
        args = ("--study", str(path), "--results-dir", str(tmp_path / "out"), *extra)
        checked = _harness("validate", *args)
        assert checked.exit_code == 0, checked.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "good.toml"]
