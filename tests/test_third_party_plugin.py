"""A third-party plugin, installed with pip, works like a built-in one.

``tests/example_plugin`` is a separate distribution (``harness-example-plugin``) that registers a
backbone, a dataset and a strategy through the ``harness`` entry-point group. These tests build and
install it with pip into a temporary directory (nothing is written into the repository or the
venv), then check that

- its installed metadata declares the entry point, and the harness discovers it from there;
- ``harness plugins`` shows it with its distribution name next to the built-in plugins;
- its factories honour the hook contract (run in-process, fast);
- a study mixing its backbone, dataset and strategy with built-in heads and strategies runs end to
  end through the CLI and produces a leaderboard whose provenance names the distribution.
"""

from __future__ import annotations

import csv
import importlib.metadata as md
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SRC = ROOT / "tests" / "example_plugin"
DIST = "harness-example-plugin"
ENTRY_POINT = "example"
BUILTIN_STRATEGIES = ("source-only", "finetune", "linear-probe")


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed into a fresh ``--target`` directory."""
    base = tmp_path_factory.mktemp("example_plugin")
    src = base / "src"
    # build from a copy: an in-tree build leaves build/ and *.egg-info next to the sources
    shutil.copytree(
        EXAMPLE_SRC,
        src,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc"),
    )
    site = base / "site"
    cmd = [
        sys.executable, "-m", "pip", "install",
        "--no-deps", "--no-build-isolation", "--no-index",  # nothing to download
        "--disable-pip-version-check", "--quiet",
        "--target", str(site), str(src),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "harness_example" / "plugin.py").is_file()
    return site


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = os.environ.copy()
    for key in ("HARNESS_PLUGINS", "HARNESS_STRICT_PLUGINS"):
        env.pop(key, None)  # every installed plugin loads, as for a user
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env["PYTHONIOENCODING"] = "utf-8"
    env["COLUMNS"] = "250"  # rich folds table cells to the terminal width
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def _harness(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


def _table_rows(text: str) -> list[list[str]]:
    """Rows of a rich table as cell texts; a cell wrapped over several lines is joined."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=False)]
    return rows


# --------------------------------------------------------------------------------------- install


def test_installed_metadata_declares_the_entry_point(plugin_site: Path) -> None:
    dists = [d for d in md.distributions(path=[str(plugin_site)]) if d.metadata["Name"] == DIST]
    assert len(dists) == 1
    dist = dists[0]
    assert dist.version == "0.1.0"
    assert dist.requires is None or dist.requires == []  # no dependency pulled from an index
    eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "harness"}
    assert eps == {ENTRY_POINT: "harness_example.plugin"}


def test_registry_discovers_the_installed_plugin(
    plugin_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.registry import Registry

    monkeypatch.syspath_prepend(str(plugin_site))
    registry = Registry()
    registry.load_entry_points(only=[ENTRY_POINT], strict=True)
    info = registry.plugins[ENTRY_POINT]
    assert (info.dist, info.version, info.error) == (DIST, "0.1.0", None)
    assert info.registered == {
        "backbone": ["example-lenet"],
        "dataset": ["example-shapes"],
        "strategy": ["example-entropy"],
        "command": ["example-shapes-info"],
        "validator": ["example-confidence"],
        "metric": ["example-top2"],
    }
    assert registry.get("dataset", "example-shapes").meta["domains"] == ["plain", "noisy"]
    assert registry.get("strategy", "example-entropy").dist == DIST


# --------------------------------------------------------------------------------------- CLI listing


def test_harness_plugins_shows_the_distribution(plugin_site: Path, tmp_path: Path) -> None:
    proc = _harness(["plugins"], _env(plugin_site), tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {cells[0]: cells for cells in _table_rows(proc.stdout)}
    assert ENTRY_POINT in rows, proc.stdout
    _, dist, version, registered, error = rows[ENTRY_POINT]
    assert (dist, version, error) == (DIST, "0.1.0", "")
    for name in ("example-lenet", "example-shapes", "example-entropy"):
        assert name in registered
    # the built-in plugins are still there, from their own distribution
    assert {"heads", "strategies", "datasets"} <= rows.keys()
    assert rows["strategies"][1] == "transfer-harness"


def test_plugin_adds_its_own_subcommand(plugin_site: Path, tmp_path: Path) -> None:
    proc = _harness(
        ["example-shapes-info", "--image-size", "16", "--n", "30"], _env(plugin_site), tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "plain: square=" in proc.stdout and "bar=" in proc.stdout, proc.stdout
    assert "noisy: " in proc.stdout
    helped = _harness(["--help"], _env(plugin_site), tmp_path)
    assert "example-shapes-info" in helped.stdout
    # without the plugin installed the command does not exist
    bare = _harness(["example-shapes-info"], _env(tmp_path), tmp_path)
    assert bare.returncode != 0


def test_harness_plugins_kind_strategy(plugin_site: Path, tmp_path: Path) -> None:
    proc = _harness(["plugins", "--kind", "strategy"], _env(plugin_site), tmp_path)
    assert proc.returncode == 0, proc.stderr
    # one line per name: name, plugin (distribution), description (rich expands the tabs)
    listed = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert f"{ENTRY_POINT} ({DIST})" in listed["example-entropy"]
    for name in BUILTIN_STRATEGIES:
        assert name in listed, proc.stdout


@pytest.mark.slow
def test_check_plugin_passes_the_installed_plugin(plugin_site: Path, tmp_path: Path) -> None:
    proc = _harness(["check-plugin", ENTRY_POINT], _env(plugin_site), tmp_path, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in (
        "backbone:example-lenet",
        "dataset:example-shapes",
        "strategy:example-entropy",
        "validator:example-confidence",
        "metric:example-top2",
    ):
        assert f"{key}: ok" in proc.stdout, proc.stdout
    assert f"plugin {ENTRY_POINT!r} passes every check" in proc.stderr


# --------------------------------------------------------------------------------------- factories


@pytest.fixture
def example(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    """The installed ``harness_example.plugin`` module, imported in this process."""
    monkeypatch.syspath_prepend(str(plugin_site))
    from harness_example import plugin

    assert Path(plugin.__file__).resolve().is_relative_to(plugin_site.resolve())
    return plugin


def test_shapes_dataset_contract(example) -> None:
    from harness.api import DatasetError

    plain = example.build_shapes(None, image_size=16, seed=0)
    plain.check(16)
    assert plain.class_names == ["square", "circle", "bar"]
    assert len(plain.train) + len(plain.val) + len(plain.test) == 240
    assert plain.train.x.dtype == torch.uint8 and plain.train.x.shape[1:] == (3, 16, 16)
    # deterministic; no sub-domain means "plain"; "noisy" is another domain
    again = example.build_shapes("plain", image_size=16, seed=0)
    assert again.fingerprint == plain.fingerprint
    assert torch.equal(again.test.x, plain.test.x)
    noisy = example.build_shapes("noisy", image_size=16, seed=0)
    noisy.check(16)
    assert noisy.fingerprint != plain.fingerprint
    assert noisy.class_names == plain.class_names
    # the seed moves the split, not the images
    other = example.build_shapes("plain", image_size=16, seed=1)
    assert not torch.equal(other.test.x, plain.test.x)
    assert len(example.build_shapes("noisy", image_size=24, seed=0, n=30).test) == 6

    with pytest.raises(DatasetError, match=r"'bogus'.*plain, noisy"):
        example.build_shapes("bogus", image_size=16, seed=0)


def test_lenet_backbone_contract(example, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from harness.api import Backbone, WeightsError

    bb = example.build_lenet("example-lenet", weights="none")
    assert isinstance(bb, Backbone)
    bb.check()
    assert [s[0].split(".")[0] for s in bb.stages] == ["conv1", "conv2", "fc"]
    assert (bb.mean, bb.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for size in (16, 40):
        assert bb.module(torch.rand(2, 3, size, size)).shape == (2, bb.num_features)

    with pytest.raises(WeightsError, match="no ImageNet weights"):
        example.build_lenet("example-lenet", weights="imagenet")

    path = tmp_path / "lenet.safetensors"
    save_file({k: v.contiguous() for k, v in bb.module.state_dict().items()}, str(path))
    loaded = example.build_lenet("example-lenet", weights=str(path))
    for key, value in bb.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)

    wrong_shape, partial = tmp_path / "wrong_shape.safetensors", tmp_path / "partial.safetensors"
    save_file({**bb.module.state_dict(), "conv1.weight": torch.zeros(1)}, str(wrong_shape))
    save_file({"conv1.weight": bb.module.conv1.weight.detach().clone()}, str(partial))
    for bad in (wrong_shape, partial):
        with pytest.raises(WeightsError, match="does not fit"):
            example.build_lenet("example-lenet", weights=str(bad))
    with pytest.raises(WeightsError, match="not found"):
        example.build_lenet("example-lenet", weights=str(tmp_path / "missing.pth"))


def test_entropy_strategy_contract(example) -> None:
    import optuna

    from harness.api import Batch, StepContext, Strategy

    strategy = example.EntropyMinimization()
    assert isinstance(strategy, Strategy)
    assert (strategy.uses_source, strategy.uses_target, strategy.target_labels) == (
        True,
        True,
        "none",
    )

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    params = strategy.search_space(trial)
    dist = trial.distributions["strategy.entropy_weight"]
    assert (dist.low, dist.high, dist.log) == (1e-3, 1.0, True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    batch = Batch(
        source=(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])),
        target=(torch.rand(4, 3, 8, 8), None),
    )
    ctx = StepContext(params=params, epoch=0, epochs=1, step=0, total_steps=1, num_classes=3)
    loss = strategy.training_step(model, batch, ctx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model[1].weight.grad is not None

    with pytest.raises(TypeError):
        example.EntropyMinimization(shots=5)
    with pytest.raises(ValueError, match="ramp"):
        example.EntropyMinimization(ramp=2)


# --------------------------------------------------------------------------------------- end to end

STUDY = """
description = "the example plugin end to end: its backbone, dataset and strategy next to built-ins"
image_size = 16
batch_size = 32
seed = 0
final_seeds = 2
device = "cpu"

[[pairs]]
source = "example-shapes/plain"
target = "example-shapes/noisy"

[[methods]]
backbone = "example-lenet"
weights = "source"
head = "linear"
strategy = "example-entropy"

[[methods]]
backbone = "example-lenet"
head = "linear"
strategy = "source-only"

[budget]
trials = 2
max_epochs = 2

[search]
sampler = "tpe"
pruner = "none"
startup_trials = 1
augment = "none"

[pretrain]
epochs = 2
augment = "none"
"""


@pytest.mark.slow
def test_study_with_the_example_plugin_runs_end_to_end(plugin_site: Path, tmp_path: Path) -> None:
    study = tmp_path / "example_shapes.toml"
    study.write_text(STUDY)
    results, cache = tmp_path / "results", tmp_path / "cache"
    # one intra-op thread: the model is tiny, and spinning OpenMP threads slow it down on busy CPUs
    env = _env(plugin_site, HARNESS_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")

    proc = _harness(
        ["run", "--study", str(study), "--results-dir", str(results)], env, tmp_path, 300
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    out = results / "example_shapes"
    assert (out / "leaderboard.csv").is_file()
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["strategy"]: r for r in board["rows"]}
    assert len(board["rows"]) == 2 and rows.keys() == {"example-entropy", "source-only"}
    for row in rows.values():
        assert row["status"] == "final"
        assert row["n_seeds"] == 2
        acc = row["test_accuracy"]
        assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0
        assert row["trials_complete"] + row["trials_pruned"] + row["trials_failed"] == 2
        assert row["target_labels"] == "none" and row["oracle"] is False
    entropy = rows["example-entropy"]
    assert 1e-3 <= entropy["best_params"]["strategy.entropy_weight"] <= 1.0
    # what the strategy logged with ctx.log reaches trials.csv, for its trials only
    with open(out / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    logged = [
        float(t["diagnostic:target_entropy"])
        for t in trials
        if t["state"] == "COMPLETE" and "entropy" in t["method"]
    ]
    assert logged and all(math.isfinite(v) and v >= 0.0 for v in logged)
    assert all(not t["diagnostic:target_entropy"] for t in trials if "source-only" in t["method"])

    plugins = board["provenance"]["plugins"]
    assert f"{ENTRY_POINT} ({DIST} 0.1.0)" in plugins  # a third-party plugin with its version
    assert any("transfer-harness" in p for p in plugins)  # the built-in head and strategy
    # weights = "source": the harness pretrained the plugin's backbone and handed it back as a file
    assert list((cache / "source-weights").glob("example-lenet-*.safetensors"))
