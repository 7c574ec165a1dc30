"""The ready study files for the field's benchmarks validate on trees with the real layout.

The data cannot be downloaded here, nor ImageNet weights: each study is validated with
``HARNESS_DATA`` pointing at a tiny tree with the real folder and class names, and its methods'
``weights`` set to none (``--set``); everything else (plugins, options, stored sizes, the
protocol, a batch through every ResNet-50 model at 224 px) is checked as ``harness run`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.study import load_study
from harness_plugins.preset_lists import OFFICE31_CLASSES, OFFICE_HOME_CLASSES

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.jpg")


def _tree(root: Path, domains: list[str], classes: tuple[str, ...], images: str = "") -> None:
    rng = np.random.default_rng(0)
    for domain in domains:
        for cls in classes:
            _images(root / domain / images / cls, 5, rng)


def _validate(study: str, data: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    spec = load_study(str(ROOT / "benchmarks" / f"{study}.toml"))
    none = [f"methods[{j}].weights=none" for j in range(len(spec.methods))]
    args = ["validate", "--study", str(ROOT / "benchmarks" / f"{study}.toml")]
    args += ["--results-dir", str(tmp_path / "results")]
    for item in none:
        args += ["--set", item]
    env = {**os.environ, "HARNESS_DATA": str(data)}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=900, env=env,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("study", "folder", "domains", "classes", "images"),
    [
        ("office31", "office31", ["amazon", "dslr", "webcam"], OFFICE31_CLASSES, "images"),
        (
            "office-home",
            "office_home",
            ["Art", "Clipart", "Product", "Real_World"],
            OFFICE_HOME_CLASSES,
            "",
        ),
    ],
)
def test_a_ready_classification_study_validates(
    tmp_path: Path, study: str, folder: str, domains: list[str], classes, images: str
) -> None:
    _tree(tmp_path / "data" / folder, domains, classes, images)
    result = _validate(study, tmp_path / "data", tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "images decoded" in out  # the domains were read, at the stored size
    assert not (tmp_path / "results").exists()  # validate writes nothing


@pytest.mark.slow
def test_the_ready_segmentation_study_validates(tmp_path: Path) -> None:
    from test_seg_datasets import _make_cityscapes, _make_gta5

    _make_gta5(tmp_path / "data" / "gta5")
    _make_cityscapes(tmp_path / "data" / "cityscapes")
    result = _validate("gta5-cityscapes", tmp_path / "data", tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "decoding gta5: 5 images decoded" in out and "decoding cityscapes" in out


def test_the_ready_studies_say_where_the_data_must_be() -> None:
    for name in ("office31", "office-home", "gta5-cityscapes"):
        spec = load_study(str(ROOT / "benchmarks" / f"{name}.toml"))
        assert "$HARNESS_DATA" in spec.description
        assert spec.image_size >= 224 and all(m.backbone == "resnet50" for m in spec.methods)


def test_without_data_a_ready_study_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_DATA"}
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "validate", "--study",
         str(ROOT / "benchmarks" / "office31.toml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "HARNESS_DATA" in result.stdout + result.stderr
