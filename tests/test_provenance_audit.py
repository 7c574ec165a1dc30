"""Provenance the audit asked for: the source-weights key hashes the code that trains the weights,
the provenance records the weights file's sha256 and the commits trials ran at, and the dirty-tree
check counts untracked code files."""

from __future__ import annotations

import os
import subprocess
import types
from pathlib import Path

import optuna
import pytest
from conftest import BUILTIN_PLUGINS, write_study

from harness.fileio import cache_dir
from harness.publish import leaderboard
from harness.registry import Registry
from harness.search import RunOptions, build_driver
from harness.store.schema import GIT_COMMIT, WEIGHTS_FILES, optuna_study_name
from harness.study import load_study
from harness.training import weights
from harness.training.weights import (
    SourceRecipe,
    file_sha256,
    source_code_files,
    source_code_hash,
    source_weights_key,
)
from harness.versions import git_commit

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}

SOURCE_STUDY = """
description = "provenance of source-pretrained weights"
image_size = 16
batch_size = 64
seed = 0
final_seeds = 1
keep_models = "none"

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
weights = "source"
head = "linear"
strategy = "finetune"

[budget]
trials = 2
max_epochs = 1

[search]
startup_trials = 1

[pretrain]
epochs = 1
"""


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, env={**os.environ, **GIT_ENV}
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def commit_all(repo: Path) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "x")
    return git(repo, "rev-parse", "--short=12", "HEAD")


def registry() -> Registry:
    reg = Registry()
    reg.load_entry_points(only=BUILTIN_PLUGINS.split(","))
    return reg


def test_source_weights_key_changes_with_the_bytes_of_the_code_that_trains_them(tmp_path):
    code = tmp_path / "engine.py"
    code.write_text("def fit(): return 1\n")
    source = types.SimpleNamespace(fingerprint="f" * 16, image_shape=(3, 16, 16))
    recipe = SourceRecipe(1, 1e-3, 0.0, "none", 64, 0)

    def key() -> str:
        weights._code_sha256.cache_clear()  # a new process: the file is read again
        return source_weights_key("test_resnet", source, recipe, code=source_code_hash([code]))

    first = key()
    assert key() == first  # same code, same key: the cache is found again
    code.write_text("def fit(): return 2\n")
    assert key() != first
    code.write_text("def fit(): return 1\n")
    assert key() == first
    # the same code elsewhere (another checkout, site-packages) hashes the same
    elsewhere = tmp_path / "other" / "engine.py"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(code.read_bytes())
    assert source_code_hash([elsewhere]) == source_code_hash([code])


def test_hashed_code_is_the_engine_the_backbone_plugin_and_the_pretraining_head():
    reg = registry()
    backbone = reg.get("backbone", "test_resnet")
    names = {(f.parent.name, f.name) for f in source_code_files(backbone)}
    for expected in ("weights.py", "engine.py", "augment.py", "model.py", "loader.py"):
        assert ("training", expected) in names, expected
    assert ("plugins", "timm_backbones.py") in names
    head = weights.source_pretraining_head(reg, "segmentation")
    with_head = {(f.parent.name, f.name) for f in source_code_files(backbone, head)}
    assert with_head - names == {("plugins", "smp_heads.py")}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny ``weights = "source"`` study in its own git repository, run once."""
    repo = tmp_path_factory.mktemp("audit")
    git(repo, "init", "-q")
    (repo / "benchmarks").mkdir()
    spec = load_study(str(write_study(repo / "benchmarks", "audit", body=SOURCE_STUDY)))
    commit = commit_all(repo)
    options = RunOptions(results_dir=repo / "results" / spec.name, log=lambda m: None)
    runner = build_driver(spec, registry(), options)
    runner.run()
    return spec, runner, commit


def test_provenance_records_the_sha256_of_the_source_weights_file(source_run):
    spec, runner, _ = source_run
    _, _, prov = leaderboard.collect(spec, runner.storage_url)
    name = optuna_study_name(spec.pairs[0], spec.methods[0])
    [record] = prov["weights_files"][name]
    path = cache_dir() / "source-weights" / record["file"]
    assert path.is_file() and record["file"].startswith("test_resnet-")
    assert record["sha256"] == file_sha256(path) and len(record["sha256"]) == 64
    study = optuna.load_study(study_name=name, storage=runner.storage)
    assert study.user_attrs[WEIGHTS_FILES] == [record]


def test_trials_record_the_commit_they_ran_at(source_run):
    spec, runner, commit = source_run
    name = optuna_study_name(spec.pairs[0], spec.methods[0])
    trials = optuna.load_study(study_name=name, storage=runner.storage).get_trials()
    assert len(trials) == 2 and all(t.user_attrs[GIT_COMMIT] == commit for t in trials)
    _, _, prov = leaderboard.collect(spec, runner.storage_url)
    assert prov["trial_git_commits"] == [commit]
    assert prov["final_runs_git_commits"] == [commit]


def test_untracked_code_files_make_the_checkout_dirty(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "core.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    commit = commit_all(tmp_path)
    assert git_commit(tmp_path) == commit
    # outputs, notes and ignored files are not code
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "board.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("todo")
    (tmp_path / "harness" / "__pycache__").mkdir()
    (tmp_path / "harness" / "__pycache__" / "core.pyc").write_bytes(b"\0")
    assert git_commit(tmp_path / "harness") == commit
    # a new module, not yet added, deep under a code folder
    new = tmp_path / "harness" / "sub" / "new_module.py"
    new.parent.mkdir()
    new.write_text("y = 2\n")
    assert git_commit(tmp_path) == f"{commit}-dirty"
    assert git_commit(tmp_path / "harness" / "sub") == f"{commit}-dirty"  # from any folder
    new.unlink()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "mine.py").write_text("z = 3\n")
    assert git_commit(tmp_path) == f"{commit}-dirty"
