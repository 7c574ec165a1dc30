from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_study


def harness(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env={**os.environ},
    )  # fmt: skip


@pytest.mark.slow
def test_run_study_end_to_end_then_rebuild_leaderboard(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    write_study(tmp_path / "benchmarks", "e2e", trials=2, weights="source")
    result = harness("run", "--study", "e2e", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # progress: trials done out of the budget, best value so far, time
    assert "[1/2, best" in result.stderr and "s]" in result.stderr
    assert "pretraining test_resnet on source 'digits'" in result.stderr
    out = tmp_path / "results" / "e2e"
    for name in (
        "leaderboard.csv",
        "leaderboard.md",
        "leaderboard.json",
        "trials.csv",
        "optuna.journal",
    ):
        assert (out / name).is_file(), name
    data = json.loads((out / "leaderboard.json").read_text())
    rows = data["rows"]
    assert len(rows) == 3 and all(r["status"] == "final" and r["n_seeds"] == 2 for r in rows)
    assert all(0 <= r["test_accuracy"] <= 1 and r["test_accuracy_std"] >= 0 for r in rows)
    assert sorted(r["rank"] for r in rows) == [1, 2, 3]
    prov = data["provenance"]
    assert prov["study_file"] == "benchmarks/e2e.toml" and prov["seeds"]["final"] == [10000, 10001]
    csv = pd.read_csv(out / "leaderboard.csv")
    assert list(csv["method"]) == [r["method"] for r in rows]
    assert "digits->digits-m" in (out / "leaderboard.md").read_text()
    assert "| e2e |" in (tmp_path / "results" / "README.md").read_text()  # a benchmarks/ study

    # rerun: nothing to train, same numbers
    again = harness("run", "--study", "e2e", cwd=tmp_path)
    assert again.returncode == 0 and "already spent" in again.stderr
    assert "pretraining" not in again.stderr  # cached source weights, no final runs repeated
    rows2 = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert [r["test_accuracy"] for r in rows2] == [r["test_accuracy"] for r in rows]

    # rebuild from the storage without training
    (out / "leaderboard.md").unlink()
    rebuilt = harness("leaderboard", "--study", "e2e", cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "leaderboard.md").is_file()
    rows3 = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert [r["test_accuracy"] for r in rows3] == [r["test_accuracy"] for r in rows]


def test_leaderboard_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    write_study(tmp_path / "benchmarks", "nothing")
    result = harness("leaderboard", "--study", "nothing", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "harness run --study nothing" in result.stderr


def test_plugins_command_lists_distribution_version_and_entries(tmp_path):
    result = harness("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in (
        "transfer-harness",
        "strategy: source-only",
        "dataset: digits",
        "head: linear",
        "in all)",
    ):
        assert text in result.stdout, text
    listed = harness("plugins", "--kind", "strategy", cwd=tmp_path)
    assert listed.returncode == 0
    assert re.search(r"^linear-probe\s+strategies \(transfer-harness\)", listed.stdout, re.M)
    bad = harness("plugins", "--kind", "backbones", cwd=tmp_path)
    assert bad.returncode == 2 and "'backbone'" in bad.stderr


def test_missing_weights_file_fails_before_training(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    write_study(tmp_path / "benchmarks", "w", weights="/nonexistent/w.safetensors")
    result = harness("run", "--study", "w", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "methods[0]" in result.stderr and "weights file not found" in result.stderr
    assert "trial 0" not in result.stderr  # no trial ran before the error
    assert not (tmp_path / "results" / "w" / "leaderboard.csv").exists()  # nothing to publish


def test_check_plugin_command(tmp_path):
    ok = harness("check-plugin", "strategies", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "strategy:finetune: ok" in ok.stdout and "passes every check" in ok.stderr
    bad = harness("check-plugin", "strategy", cwd=tmp_path)
    assert bad.returncode == 2 and "'strategies'" in bad.stderr


COLLIDER = """from harness import hookimpl
from harness_plugins.heads import build_linear


@hookimpl
def register_heads(register):
    register("linear", build_linear, description="a second linear head")
"""


def test_check_plugin_fails_a_plugin_whose_name_an_installed_one_registers(tmp_path):
    """``collider`` loads before the built-in ``heads`` and keeps the name ``linear``: the
    registry reports the duplicate on the built-in's row, and check-plugin must fail the
    plugin it checks, naming both plugins and distributions."""
    site = tmp_path / "site"
    info = site / "collider_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: collider-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[harness]\ncollider = collider_mod\n")
    (site / "collider_mod.py").write_text(COLLIDER)
    paths = (str(site), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env["HARNESS_PLUGINS"] += ",collider"
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "check-plugin", "collider"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "head:linear: 1 failed" in result.stdout, result.stdout
    for words in ("head.unique_name", "'collider' (collider-plugin)", "'heads' (transfer-harness)"):
        assert words in result.stdout, result.stdout


def test_ls_shows_study_states(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    write_study(tmp_path / "benchmarks", "fresh")
    write_study(tmp_path / "benchmarks", "begun")
    (tmp_path / "results" / "begun").mkdir(parents=True)
    (tmp_path / "results" / "begun" / "optuna.db").write_bytes(b"")
    result = harness("ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {
        line.split("│")[1].strip(): line
        for line in result.stdout.splitlines()
        if line.count("│") > 2
    }
    assert "not started" in lines["fresh"] and "partial" in lines["begun"]


def test_every_command_help_has_an_example():
    import typer

    from harness.cli import app
    from harness.registry import BUILTIN_COMMANDS

    group = typer.main.get_command(app)
    assert set(group.commands) == BUILTIN_COMMANDS
    for name, command in group.commands.items():
        assert "Example: harness " in (command.help or ""), name


def test_a_failing_report_does_not_undo_the_leaderboard(tmp_path, capsys):
    import optuna

    from harness.cli import _write_board
    from harness.study import load_study

    (tmp_path / "benchmarks").mkdir()
    spec = load_study(str(write_study(tmp_path / "benchmarks", "rep")))
    url = f"sqlite:///{tmp_path / 'x.db'}"
    optuna.create_study(storage=url, study_name="unrelated")
    (tmp_path / "out" / "index.html").mkdir(parents=True)  # a folder holds the page's name
    _write_board(spec, url, tmp_path / "out", quiet=True, report=True)
    assert (tmp_path / "out" / "leaderboard.json").is_file()
    assert not (tmp_path / "out" / "index.html").is_file()
    assert "the leaderboard is written but the report is not" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["..", "..."])
def test_a_study_file_named_only_with_dots_is_refused(tmp_path, name):
    """``...toml`` would be study ``..``: its results would land outside --results-dir."""
    path = write_study(tmp_path, name)
    for command in ("run", "validate", "leaderboard"):
        extra = ["--results-dir", str(tmp_path / "res")] if command != "validate" else []
        result = harness(command, "--study", str(path), *extra, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"{name}.toml" in error[0], result.stderr
        assert "must contain a letter or digit" in error[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.toml"]  # nothing written


def test_results_go_beside_a_study_outside_benchmarks(tmp_path, monkeypatch):
    from harness.publish.location import published, results_root, run_command
    from harness.study import load_study

    (tmp_path / "benchmarks").mkdir()
    write_study(tmp_path / "benchmarks", "quick")
    (tmp_path / "mine").mkdir()
    own = write_study(tmp_path / "mine", "quick")  # the same stem as a published study
    monkeypatch.chdir(tmp_path)
    spec = load_study("quick")  # the published study: results/ and the index, as always
    assert published(spec) and results_root(spec, None) == Path("results")
    assert run_command(spec, None) == "harness run --study quick"
    mine = load_study(str(own))
    assert not published(mine) and results_root(mine, None) == Path("mine") / "results"
    assert results_root(mine, Path("elsewhere")) == Path("elsewhere")
    assert run_command(mine, Path("out")) == "harness run --study mine/quick.toml --results-dir out"


def test_leaderboard_hint_names_a_study_outside_benchmarks_by_its_path(tmp_path):
    (tmp_path / "mine").mkdir()
    write_study(tmp_path / "mine", "own")
    result = harness("leaderboard", "--study", "mine/own.toml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "harness run --study mine/own.toml" in result.stderr
    assert str(Path("mine") / "results" / "own") in result.stderr  # where it looked


def test_progress_counts_only_what_uses_the_budget(tmp_path):
    """A resumed run: an interrupted trial does not count, and the count never passes the budget."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from harness.search.progress import progress_callback
    from harness.store.schema import FAIL_REASON
    from harness.study import load_study

    spec = load_study(str(write_study(tmp_path, "resumed", trials=3)))
    study = optuna.create_study(direction="maximize")
    cut = create_trial(state=TrialState.FAIL, user_attrs={FAIL_REASON: "interrupted"})
    study.add_trial(cut)
    for value in (0.1, 0.2, 0.3):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value))
    lines: list[str] = []
    records: list[dict] = []
    last = study.trials[-1]
    progress_callback(spec, "s", 0.0, lines.append, None)(study, last)
    progress_callback(spec, "s", 0.0, lines.append, records.append)(study, last)
    assert "[3/3, best 0.3000" in lines[0] and records[0]["done"] == 3
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.4))  # a surplus one
    progress_callback(spec, "s", 0.0, lines.append, None)(study, study.trials[-1])
    assert "[3/3, best 0.4000" in lines[1]
