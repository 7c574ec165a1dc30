"""Training at real size: streamed batches equal resident ones, crops of images stored larger,
segmentation scored whole by sliding windows, and a study over a folder with [data] settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness.api import DomainData, Split, Strategy
from harness.training.engine import Precision, TrainConfig, Trainer, TransferModel
from harness.training.evaluate import forward, predict
from harness.training.loader import Loader, Take
from harness_plugins.heads import build_linear
from harness_plugins.strategies import FineTune
from harness_plugins.timm_backbones import build_timm_backbone
from harness_plugins.uda import DANN

CPU = torch.device("cpu")


def _domain(name: str, n: int = 48, size: int = 20, seed: int = 0) -> DomainData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 0] = (y * 80).view(-1, 1, 1).to(torch.uint8)
    return DomainData.from_arrays(name, x, y, class_names=["a", "b", "c"], seed=seed)


def _model(input_size: int | None = None) -> TransferModel:
    torch.manual_seed(0)
    bb = build_timm_backbone("test_resnet", weights="none")
    head = build_linear(backbone=bb, num_classes=3, task="classification")
    return TransferModel(bb, head, input_size=input_size)


def _config(**kw) -> TrainConfig:
    base = dict(
        epochs=2, batch_size=8, backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.0, freeze_depth=0,
        augment="light", seed=0, device=CPU, precision=Precision.for_device(CPU),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _fit(strategy: Strategy, **kw) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _model(kw.pop("input_size", None))
    result = Trainer(model, strategy, _domain("s"), _domain("t", seed=1), _config(**kw)).fit()
    return result.train_loss, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("strategy", [FineTune, DANN], ids=["source", "source+target"])
def test_streamed_batches_train_exactly_as_resident_ones(strategy: type[Strategy]) -> None:
    resident = _fit(strategy())
    streamed = _fit(strategy(), stream=True)
    assert resident[0] == streamed[0]
    assert all(torch.equal(resident[1][k], streamed[1][k]) for k in resident[1])


def test_the_loader_gathers_ahead_in_order() -> None:
    data = _domain("s")
    steps = [[Take(data.train, torch.tensor([i, i + 1]))] for i in range(0, 20, 2)]
    direct = list(Loader(CPU)(steps))
    ahead = list(Loader(CPU, stream=True)(steps))
    assert len(direct) == len(ahead) == 10
    for a, b in zip(direct, ahead, strict=True):
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    x, y = direct[3][0]
    assert torch.equal(x, data.train.x[[6, 7]]) and torch.equal(y, data.train.y[[6, 7]])
    assert not Loader(CPU).streams([data.train]) and Loader(CPU, stream=True).streams([None])


class _Sizes(Strategy):
    """Fine-tuning that records the size of the images the model is given."""

    uses_source, uses_target, target_labels = True, False, "none"

    def __init__(self) -> None:
        super().__init__()
        self.sizes: set[tuple[int, int]] = set()

    def training_step(self, model, batch, ctx):
        x, y = batch.source
        self.sizes.add(tuple(x.shape[-2:]))
        return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("augment", ["none", "light"])
def test_images_stored_larger_are_cropped_to_the_input_size(augment: str) -> None:
    strategy = _Sizes()
    losses, _ = _fit(strategy, input_size=16, augment=augment)
    assert strategy.sizes == {(16, 16)} and all(np.isfinite(losses))
    model = _model(16)
    calls: list[tuple[int, ...]] = []
    model.backbone.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
    out = predict(model, _domain("t").test, 4, CPU, Precision.for_device(CPU))
    assert out.shape == (len(_domain("t").test), 3) and {c[-2:] for c in calls} == {(16, 16)}


def test_random_resized_crops_when_the_trial_searches_their_scale() -> None:
    a = _fit(_Sizes(), input_size=16, params={"augment.crop_scale": 0.3})
    b = _fit(_Sizes(), input_size=16)
    assert a[0] != b[0]  # another crop rule, other batches


class _Seg(torch.nn.Module):
    """A 1x1 convolution as a segmentation model, with the harness model's attributes."""

    task, input_size = "segmentation", 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_segmentation_scores_whole_images_by_sliding_windows() -> None:
    model = _Seg()
    x = torch.rand(2, 3, 12, 20)
    with torch.no_grad():
        torch.testing.assert_close(forward(model, x), model(x))  # a 1x1 model: windows agree
        small = torch.rand(1, 3, 8, 8)
        assert torch.equal(forward(model, small), model(small))


def _folder(root: Path, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    for domain, shift in (("a", 0), ("b", 60)):
        for k, cls in enumerate(("x", "y")):
            (root / domain / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 120, (30, 40, 3), dtype=np.uint8)
                arr[..., k] += 100 + shift // 2
                Image.fromarray(arr).save(root / domain / cls / f"{i}.png")


def _harness(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=600, env={**os.environ},
    )  # fmt: skip


REAL_STUDY = """
image_size = 16
batch_size = 8
final_seeds = 1
[data]
stored_size = 20
placement = "stream"
protocol = "standard"
[datasets.mine]
plugin = "folder"
root = "{root}"
[[pairs]]
source = "mine/a"
target = "mine/b"
[[methods]]
backbone = "test_resnet"
strategy = "dann"
[budget]
trials = 2
max_epochs = 1
[search]
augment = "light"
crop_scale = [0.5, 1.0]
"""


def test_a_folder_study_with_data_settings_runs_and_records_them(tmp_path: Path) -> None:
    _folder(tmp_path / "data")
    (tmp_path / "real.toml").write_text(REAL_STUDY.format(root=tmp_path / "data"))
    result = _harness("run", "--study", "real.toml", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "decoding a: 16 images decoded" in out and "batches streamed" in out
    board = (tmp_path / "results" / "real" / "leaderboard.json").read_text()
    assert '"stored_size"' in board and '"protocol": "standard"' in board
    title = (tmp_path / "results" / "real" / "leaderboard.md").read_text().splitlines()[0]
    assert title == "# Leaderboard: real (standard protocol)"
    trials = (tmp_path / "results" / "real" / "trials.csv").read_text()
    assert "augment.crop_scale" in trials
    again = _harness("validate", "--study", "real.toml", cwd=tmp_path)
    assert again.returncode == 0 and "decoded in" not in again.stdout + again.stderr
    # the standard protocol tests on the target's training images: no target labels in training
    refused = _harness(
        "validate", "--study", "real.toml", "--set", "methods[0].strategy=finetune", cwd=tmp_path
    )
    assert refused.returncode == 2
    assert (
        "methods[0].strategy: 'finetune' trains on target labels" in refused.stdout + refused.stderr
    )


def test_standard_protocol_splits_a_generated_domain_by_side() -> None:
    from harness.data.splits import standard_domain

    data = _domain("d", n=30)
    target = standard_domain(data, "target", 0.2, 0)
    assert len(target.train) == len(target.test) == 30 == len(target.val)
    source = standard_domain(data, "source", 0.2, 0)
    assert len(source.train) + len(source.val) == 30 and len(source.val) == 6
    assert isinstance(source.train, Split) and source.train.store_x is data.train.store_x


def test_the_chunked_confusion_matrix_counts_as_torchmetrics_does() -> None:
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    from harness.metrics import confusion_matrix

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (37, 9, 11), generator=g)
    y[y == 4] = 255  # void
    preds = torch.randint(0, 4, (37, 9, 11), generator=g).to(torch.uint8)
    ours = confusion_matrix(preds, y, 4, chunk=5)
    theirs = multiclass_confusion_matrix(preds.long().flatten(), y.flatten(), 4, ignore_index=255)
    assert torch.equal(ours, theirs)
