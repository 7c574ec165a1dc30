"""Cached frozen features: exact, used only where valid, shared across trials, keyed by the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.api import Strategy
from harness.training import features as feat
from harness.training.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    predict,
    seed_everything,
)
from harness_plugins.heads import build_linear
from harness_plugins.strategies import FineTune, LinearProbe, SourceOnly
from harness_plugins.timm_backbones import build_timm_backbone
from tests.test_engine import domain

CPU = torch.device("cpu")


def model(seed: int = 0) -> TransferModel:
    seed_everything(seed)
    bb = build_timm_backbone("test_resnet", weights="none")
    return TransferModel(bb, build_linear(backbone=bb, num_classes=3, task="classification"))


def config(**kw) -> TrainConfig:
    base = dict(
        epochs=3, batch_size=16, backbone_lr=1e-3, head_lr=1e-2, weight_decay=1e-4, freeze_depth=99,
        augment="none", seed=0, device=CPU, precision=Precision.for_device(CPU, "fp32"),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def train(
    strategy: Strategy, cache: feat.FeatureCache, **kw
) -> tuple[Trainer, list[float], torch.Tensor]:
    src, tgt = domain("s", n=90), domain("t", n=90, seed=1)
    m = model()
    t = Trainer(m, strategy, src, tgt, config(**kw))
    t.feature_cache = cache
    res = t.fit(
        lambda e, mm: float(predict(mm, tgt.val, 32, CPU, t.cfg.precision, cache=cache).sum())
    )
    return t, res.train_loss, predict(m, tgt.test, 32, CPU, t.cfg.precision, cache=None)


def test_cached_and_uncached_linear_probe_train_the_same_head():
    cache = feat.FeatureCache()
    t1, loss1, out1 = train(LinearProbe(), cache)
    t2, loss2, out2 = train(LinearProbe(), feat.FeatureCache(), cache_features=False)
    assert t1.caches_features and not t2.caches_features
    assert len(cache) == 2  # the target train split and the validation split
    torch.testing.assert_close(torch.tensor(loss1), torch.tensor(loss2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out1, out2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        t1.model.head[-1].weight, t2.model.head[-1].weight, rtol=1e-4, atol=1e-5
    )


def test_the_backbone_really_runs_only_when_features_are_not_cached(monkeypatch):
    calls = {"n": 0}
    real = feat.CachedBackbone.forward

    def counting(self, x):
        out = real(self, x)
        calls["n"] += 1
        return out

    monkeypatch.setattr(feat.CachedBackbone, "forward", counting)
    t, _, _ = train(LinearProbe(), feat.FeatureCache())
    assert calls["n"] > 0  # the step went through the stand-in backbone


@pytest.mark.parametrize(
    "why, strategy, kw",
    [
        ("augmentation on", LinearProbe(), {"augment": "light"}),
        ("backbone partly trainable", FineTune(), {"freeze_depth": 2}),
        ("run opted out", LinearProbe(), {"cache_features": False}),
    ],
)
def test_no_cache_where_it_would_not_be_exact(why, strategy, kw):
    cache = feat.FeatureCache()
    t, _, _ = train(strategy, cache, **kw)
    assert not t.caches_features, why
    train_hashes = {feat.data_hash(t.source.train.x), feat.data_hash(t.target.train.x)}
    assert not any(key[2] in train_hashes for key in cache._entries), (
        why
    )  # only evaluation may cache


def test_a_strategy_can_opt_out():
    class AdaBNLike(LinearProbe):
        cache_features = False

    cache = feat.FeatureCache()
    t, _, _ = train(AdaBNLike(), cache)
    assert not t.caches_features
    assert Strategy.cache_features is True


def test_later_trials_reuse_the_features():
    cache = feat.FeatureCache()
    train(LinearProbe(), cache)
    misses = cache.misses
    train(LinearProbe(), cache, head_lr=3e-3, seed=5)  # another trial, same weights and data
    assert cache.misses == misses and cache.hits > 0


def test_source_only_with_a_frozen_backbone_caches_source_features():
    cache = feat.FeatureCache()
    t, _, _ = train(SourceOnly(), cache)
    assert t.caches_features and len(cache) == 2  # source train + target val


def test_key_changes_with_weights_buffers_data_and_precision():
    m1, m2 = model(0), model(1)
    x = domain("t").train.x
    fp32, bf16 = Precision.for_device(CPU, "fp32"), Precision.for_device(CPU, "bf16")
    k = feat.feature_key(m1, x, fp32, CPU)
    assert k == feat.feature_key(m1, x, fp32, CPU)
    assert k != feat.feature_key(m2, x, fp32, CPU)  # other weights
    assert k != feat.feature_key(m1, x, bf16, CPU)
    assert k != feat.feature_key(m1, domain("u", seed=3).train.x, fp32, CPU)
    with torch.no_grad():
        m1.backbone.bn1.running_mean.add_(1.0)  # a buffer changed in place (as AdaBN would)
    assert k != feat.feature_key(m1, x, fp32, CPU)
    with torch.no_grad():
        next(m1.backbone.parameters()).mul_(2.0)
    k2 = feat.feature_key(m1, x, fp32, CPU)
    with torch.no_grad():
        next(m1.backbone.parameters()).div_(2.0)
        m1.backbone.bn1.running_mean.sub_(1.0)
    assert feat.feature_key(m1, x, fp32, CPU) == k != k2  # same values, same key


def test_a_mixed_batch_gets_real_features():
    class Mix(LinearProbe):
        def training_step(self, m, batch, ctx):
            x, y = batch.target
            mixed = 0.5 * (x + x.flip(0))
            assert torch.allclose(m.features(mixed), m.spec.module(mixed))
            return F.cross_entropy(m(x), y)

    t, _, _ = train(Mix(), feat.FeatureCache())
    assert t.caches_features


def test_changing_the_frozen_backbone_while_cached_is_refused():
    class Sneaky(LinearProbe):
        def training_step(self, m, batch, ctx):
            with torch.no_grad():
                m.spec.module.bn1.running_var.mul_(1.01)
            x, y = batch.target
            return F.cross_entropy(m(x), y)

    with pytest.raises(RuntimeError, match="cache_features = False"):
        train(Sneaky(), feat.FeatureCache())


def test_cache_is_memory_bounded():
    cache = feat.FeatureCache(max_bytes=3 * 4 * 100)
    for i in range(5):
        cache.get_or_compute(("k", i), lambda: torch.zeros(100))
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    cache.get_or_compute(("k", 4), lambda: torch.ones(100))
    assert cache.hits == 1
