"""Frozen features computed once: a 10-epoch linear-probe trial with the feature cache against the
same trial recomputing the frozen forward pass, and a later trial that finds the features cached."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from harness.api import DomainData
from harness.metrics import classification_metrics
from harness.training import features as feat
from harness.training.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    predict,
    resolve_device,
    seed_everything,
)
from harness.training.reset import BackboneReset
from harness_plugins.heads import build_linear
from harness_plugins.strategies import LinearProbe
from harness_plugins.timm_backbones import build_timm_backbone

N, SIZE, BATCH, EPOCHS = 1280, 32, 64, 10


def _data() -> DomainData:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % 10
    x = torch.randint(0, 256, (N, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    return DomainData.from_arrays("bench", x, y, class_names=[str(i) for i in range(10)], seed=0)


def _trial(
    reset: BackboneReset, data: DomainData, device, precision, cache: feat.FeatureCache | None
) -> float:
    """One linear-probe trial as the search driver runs it: the backbone reset to the pretrained weights
    (``harness.training.reset``) under the trial's seed, a new head, train it, score validation every epoch."""
    seed_everything(0)
    bb = reset()
    model = TransferModel(bb, build_linear(backbone=bb, num_classes=10, task="classification"))
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
def test_linear_probe_with_cached_features(benchmark, name, tmp_path):
    device = resolve_device("auto")
    precision = Precision.for_device(device, "fp32")
    data = _data()
    seed_everything(0)
    weights = tmp_path / f"{name}.safetensors"  # stands in for pretrained weights
    save_file(build_timm_backbone(name, weights="none").module.state_dict(), str(weights))

    def new_search() -> BackboneReset:
        """What a search starts with: the backbone built once (the search driver's preflight), the hash
        of its weights not yet known to the feature cache."""
        reset = BackboneReset(lambda: build_timm_backbone(name, weights=str(weights)))
        reset()
        assert reset.refused is None, reset.refused
        return reset

    def timed(fn) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    reset = new_search()
    _trial(reset, data, device, precision, None)  # warm-up
    recompute, acc_plain = timed(lambda: _trial(reset, data, device, precision, None))
    first = []
    for _ in range(2):  # best of two first trials, each of a new search with an empty cache
        cache, reset = feat.FeatureCache(), new_search()
        first.append(timed(lambda c=cache, r=reset: _trial(r, data, device, precision, c)))
    first_s, acc_cached = min(first)
    benchmark.pedantic(_trial, args=(reset, data, device, precision, cache), rounds=5, iterations=1)
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
