"""Frozen features computed once: a 10-epoch linear-probe trial with the feature cache against the
same trial recomputing the frozen forward pass, and a later trial that finds the features cached."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from harness import features as feat
from harness.api import DomainData
from harness.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    predict,
    resolve_device,
    seed_everything,
)
from harness.metrics import classification_metrics
from harness_plugins.heads import build_linear
from harness_plugins.strategies import LinearProbe
from harness_plugins.timm_backbones import build_timm_backbone

N, SIZE, BATCH, EPOCHS = 1280, 32, 64, 10


def _data() -> DomainData:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % 10
    x = torch.randint(0, 256, (N, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    return DomainData.from_arrays("bench", x, y, class_names=[str(i) for i in range(10)], seed=0)


def _trial(template: TransferModel, data: DomainData, device, precision, cache: feat.FeatureCache | None) -> float:
    """One linear-probe trial as the Runner runs it: train the head, score validation every epoch."""
    model = copy.deepcopy(template)  # a fresh model with the same pretrained weights
    cfg = TrainConfig(
        epochs=EPOCHS, batch_size=BATCH, backbone_lr=0.0, head_lr=1e-2, weight_decay=1e-4, freeze_depth=99,
        augment="none", seed=0, device=device, precision=precision, cache_features=cache is not None,
    )  # fmt: skip
    trainer = Trainer(model, LinearProbe(), data, data, cfg)
    if cache is not None:
        trainer.feature_cache = cache

    def on_epoch(epoch, m):
        logits = predict(m, data.val, BATCH * 4, device, precision, cache=cache)
        return classification_metrics(logits, data.val.y, 10)["accuracy"]

    return trainer.fit(on_epoch).history[-1]


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_linear_probe_with_cached_features(benchmark, name):
    device = resolve_device("auto")
    precision = Precision.for_device(device, "fp32")
    data = _data()
    seed_everything(0)
    bb = build_timm_backbone(name, weights="none")
    template = TransferModel(bb, build_linear(backbone=bb, num_classes=10, task="classification"))

    def timed(fn) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    _trial(template, data, device, precision, None)  # warm-up
    recompute, acc_plain = timed(lambda: _trial(template, data, device, precision, None))
    first = []
    for _ in range(2):  # best of two cold-cache trials
        cache = feat.FeatureCache()
        first.append(timed(lambda c=cache: _trial(template, data, device, precision, c)))
    first_s, acc_cached = min(first)
    benchmark.pedantic(_trial, args=(template, data, device, precision, cache), rounds=5, iterations=1)
    reuse = benchmark.stats.stats.min
    ratio_first, ratio_reuse = recompute / first_s, recompute / reuse
    benchmark.extra_info.update(
        {
            "model": name,
            "epochs": EPOCHS,
            "train_images": len(data.train),
            "recompute_s": round(recompute, 3),
            "first_trial_s": round(first_s, 3),
            "reuse_trial_s": round(reuse, 4),
            "speedup_first_trial": round(ratio_first, 1),
            "speedup_later_trial": round(ratio_reuse, 1),
            "val_accuracy_recompute": acc_plain,
            "val_accuracy_cached": acc_cached,
        }
    )
    print(f"\n{name} linear probe, {EPOCHS} epochs, {len(data.train)} images {SIZE}px on {device}: recompute "
          f"{recompute:.2f}s, first cached trial {first_s:.3f}s ({ratio_first:.1f}x), later trial "
          f"{reuse:.4f}s ({ratio_reuse:.1f}x); val accuracy {acc_plain:.4f} vs {acc_cached:.4f}")  # fmt: skip
    assert abs(acc_plain - acc_cached) < 0.02  # same training: speed is reported, not asserted
