from __future__ import annotations

import os
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the built-in plugins are exactly what pyproject.toml declares in the entry-point group
BUILTIN_PLUGINS = ",".join(
    sorted(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["harness"]
    )
)


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory):
    """Only the built-in plugins, a private weights cache, and no model hub."""
    cache = tmp_path_factory.mktemp("harness-cache")
    saved = {
        k: os.environ.get(k)
        for k in (
            "HARNESS_PLUGINS",
            "HARNESS_CACHE_DIR",
            "HF_HUB_OFFLINE",
            "HARNESS_STRICT_PLUGINS",
        )
    }
    os.environ["HARNESS_PLUGINS"] = BUILTIN_PLUGINS
    os.environ["HARNESS_CACHE_DIR"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("HARNESS_STRICT_PLUGINS", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


TINY_STUDY = """
description = "tiny test study"
image_size = 16
batch_size = 64
seed = 0
final_seeds = 2
{extra_top}

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
weights = "{weights}"
head = "linear"
strategy = "source-only"

[[methods]]
backbone = "test_resnet"
weights = "{weights}"
head = "linear"
strategy = "finetune"

[[methods]]
backbone = "test_resnet"
weights = "{weights}"
head = "mlp"
strategy = "linear-probe"

[budget]
trials = {trials}
max_epochs = 2

[search]
startup_trials = 1
pruner = "median"

[pretrain]
epochs = 2
"""


def write_study(
    directory: Path,
    name: str = "tiny",
    *,
    trials: int = 2,
    weights: str = "none",
    extra_top: str = "",
    body: str | None = None,
) -> Path:
    path = directory / f"{name}.toml"
    text = (
        body
        if body is not None
        else TINY_STUDY.format(trials=trials, weights=weights, extra_top=extra_top)
    )
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def study_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    return d
