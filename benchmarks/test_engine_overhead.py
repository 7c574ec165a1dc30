"""Engine overhead: a trial's training throughput against a hand-written PyTorch loop."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from harness.api import DomainData
from harness.training.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    resolve_device,
    seed_everything,
)
from harness_plugins.heads import build_linear
from harness_plugins.strategies import SourceOnly
from harness_plugins.timm_backbones import build_timm_backbone

N, SIZE, BATCH = 512, 32, 64


def _data() -> DomainData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    y = torch.arange(N) % 10
    return DomainData.from_arrays(
        "bench", x, y, class_names=[str(i) for i in range(10)], seed=0, fractions=(0.98, 0.01, 0.01)
    )


def _model(name: str) -> TransferModel:
    seed_everything(0)
    bb = build_timm_backbone(name, weights="none")
    return TransferModel(bb, build_linear(backbone=bb, num_classes=10, task="classification"))


def _plain_epoch(
    model: TransferModel, data: DomainData, device: torch.device, precision: Precision
) -> int:
    """What a person would write by hand: the same model, data on the device, AdamW, one epoch."""
    x_all, y_all = data.train.x.to(device), data.train.y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    perm = torch.randperm(len(x_all), device=device)
    seen = 0
    for idx in perm.split(BATCH):
        x = model.normalize(x_all[idx].float().div_(255.0))
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen


def _engine_epoch(
    model: TransferModel, data: DomainData, device: torch.device, precision: Precision
) -> int:
    cfg = TrainConfig(
        epochs=1, batch_size=BATCH, backbone_lr=1e-3, head_lr=1e-3, weight_decay=1e-4, freeze_depth=0,
        augment="none", seed=0, device=device, precision=precision,
    )  # fmt: skip
    Trainer(model, SourceOnly(), data, data, cfg).fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data.train)


def _best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_engine_throughput_vs_plain_loop(benchmark, name):
    device = resolve_device("auto")
    precision = Precision.for_device(device)
    data = _data()
    model = _model(name).to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    _plain_epoch(model, data, device, precision)  # warm-up both paths
    _engine_epoch(model, data, device, precision)
    plain = _best_of(lambda: _plain_epoch(model, data, device, precision), rounds=3)
    benchmark.pedantic(_engine_epoch, args=(model, data, device, precision), rounds=3, iterations=1)
    engine = benchmark.stats.stats.min
    ratio = plain / engine  # throughput of the engine relative to the plain loop
    images = len(data.train)
    benchmark.extra_info.update(
        {
            "model": name,
            "device": str(device),
            "precision": precision.describe(),
            "plain_images_per_s": round(images / plain, 1),
            "engine_images_per_s": round(images / engine, 1),
            "throughput_ratio_engine_over_plain": round(ratio, 3),
        }
    )
    print(f"\n{name} {SIZE}px batch {BATCH} on {device}: plain {images / plain:.0f} img/s, "
          f"engine {images / engine:.0f} img/s, ratio {ratio:.3f}")  # fmt: skip
    assert engine > 0  # the figure is the ratio above; speed is reported, not asserted
