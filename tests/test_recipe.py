"""The training recipe of ``[search]``: optimizer, schedule, label smoothing, drop path, EMA and
SWA, batch size and MixUp/CutMix; pinned or searched, recorded on every trial, and with the
defaults the training the harness always did."""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
import pytest
import torch
import torch.nn.functional as F
from conftest import write_study
from test_engine import CPU, config, domain, model
from timm.layers import DropPath
from torch import nn

from harness.api import StepContext, Strategy
from harness.search.space import mixing_refused, suggest, train_config
from harness.study import load_study
from harness.study_tables import SearchSpace
from harness.training import averaging, crops
from harness.training import recipe as rcp
from harness.training.engine import Precision, Trainer
from harness.training.inputs import training_crop
from harness.training.model import set_drop_path
from harness.training.recipe import Recipe
from harness_plugins.strategies import FineTune, SourceOnly

#: what a study without any recipe key asks the sampler, in order (as before the recipe existed)
DEFAULT_DRAWS = [
    "backbone.freeze_depth",
    "backbone.lr",
    "head.lr",
    "optimizer.weight_decay",
    "augment.policy",
]


class LrRecorder(SourceOnly):
    """Source-only training that records the head group's learning rate at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []
        self.trainer: Trainer | None = None
        self.labels: list[torch.Tensor] = []

    def training_step(self, model, batch, ctx):
        assert self.trainer is not None
        self.lrs.append(self.trainer.optimizer.param_groups[-1]["lr"])
        self.labels.append(batch.source[1])
        return super().training_step(model, batch, ctx)


class PlainCE(Strategy):
    """Source-only written as strategies were before ``supervised_loss``."""

    def training_step(self, m, batch, ctx):
        x, y = batch.source
        return F.cross_entropy(m(x), y, ignore_index=255)


def _trainer(strategy: Strategy, r: Recipe = Recipe(), seed: int = 0, **kw) -> Trainer:
    torch.manual_seed(seed)
    net = model()
    cfg = config(**{"recipe": r, "epochs": 2, **kw})
    trainer = Trainer(net, strategy, domain("s", n=64), domain("t", n=64, seed=1), cfg)
    if isinstance(strategy, LrRecorder):
        strategy.trainer = trainer
    return trainer


def _weights(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


# ------------------------------------------------------------------ optimizer and schedule


def _expected(r: Recipe, total: int) -> list[float]:
    warm = round(r.warmup * total)
    rest = total - warm
    out = []
    for s in range(total):
        if s < warm:
            out.append((s + 1) / warm)
        elif r.schedule == "cosine":
            out.append(0.5 * (1 + math.cos(math.pi * (s - warm) / rest)))
        elif r.schedule == "constant":
            out.append(1.0)
        else:
            out.append(1.0 if s - warm < rest / 2 else 0.1 if s - warm < 3 * rest / 4 else 0.01)
    return out


@pytest.mark.parametrize(
    "r",
    [
        Recipe(),
        Recipe(schedule="cosine", warmup=0.25),
        Recipe(schedule="constant"),
        Recipe(schedule="constant", warmup=0.125),
        Recipe(schedule="step"),
        Recipe(optimizer="sgd", schedule="step", warmup=0.25),
    ],
)
def test_each_schedule_gives_its_learning_rate_curve(r):
    strategy = LrRecorder()
    _trainer(strategy, r, freeze_depth=5).fit()  # batches of 16, 2 epochs
    total = len(strategy.lrs)
    assert total >= 6
    expected = [1e-2 * f for f in _expected(r, total)]
    assert strategy.lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_sgd_is_nesterov_with_the_same_parameter_groups_as_adamw():
    params = {"backbone.lr_decay": 0.5}
    adamw = _trainer(SourceOnly(), params=params).optimizer
    sgd = _trainer(SourceOnly(), Recipe(optimizer="sgd"), params=params).optimizer
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in sgd.param_groups)
    shape = [(g["lr"], [p.shape for p in g["params"]]) for g in adamw.param_groups]
    assert [(g["lr"], [p.shape for p in g["params"]]) for g in sgd.param_groups] == shape
    assert len(shape) > 2  # one group per backbone stage and the head


# ------------------------------------------------------------------ label smoothing


def test_supervised_loss_is_cross_entropy_with_the_trials_smoothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 255, 1])
    ctx = StepContext(params={}, epoch=0, epochs=1, step=0, total_steps=1, num_classes=4)
    plain = F.cross_entropy(logits, y, ignore_index=255)
    assert torch.equal(ctx.supervised_loss(logits, y), plain)  # bit for bit without smoothing
    ctx.label_smoothing = 0.2
    smoothed = ctx.supervised_loss(logits, y)
    assert not torch.allclose(smoothed, plain)
    expected = F.cross_entropy(logits, y, ignore_index=255, label_smoothing=0.2)
    assert torch.equal(smoothed, expected)
    soft = F.one_hot(y[:4], 4).float()  # probabilities: the same loss as the class indices
    assert torch.allclose(
        ctx.supervised_loss(logits[:4], soft),
        F.cross_entropy(logits[:4], y[:4], label_smoothing=0.2),
    )


def test_label_smoothing_changes_training_and_zero_is_the_old_loss_bit_for_bit():
    old = _trainer(PlainCE())
    old_result = old.fit()
    new = _trainer(SourceOnly())
    new_result = new.fit()
    assert new_result.train_loss == old_result.train_loss
    assert all(
        torch.equal(a, b) for a, b in zip(_weights(old.model), _weights(new.model), strict=True)
    )
    smoothed = _trainer(SourceOnly(), Recipe(label_smoothing=0.3)).fit()
    assert smoothed.train_loss[0] != new_result.train_loss[0]


# ------------------------------------------------------------------ weight averages


class Snapshots:
    """An ``on_epoch`` that keeps the weights each epoch is scored with."""

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def __call__(self, epoch: int, m) -> float:
        self.seen.append(_weights(m))
        return 0.0


def test_ema_weights_are_what_is_scored_and_returned_and_training_is_untouched():
    raw, ema = Snapshots(), Snapshots()
    plain = _trainer(SourceOnly())
    plain_result = plain.fit(raw)
    steps = LrRecorder()
    averaged = _trainer(steps, Recipe(ema_decay=0.5))
    result = averaged.fit(ema)
    assert result.train_loss == plain_result.train_loss  # the raw weights trained as before
    for before, after in zip(raw.seen, ema.seen, strict=True):
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    kept = list(averaged._average.averaged.module.parameters())
    final = _weights(averaged.model)
    assert all(torch.equal(a, b) for a, b in zip(final, kept, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(final, ema.seen[-1], strict=True))
    assert averaged._average.count == len(steps.lrs)  # one update per step


class Swa(SourceOnly):
    weight_average = "swa"


def test_swa_averages_the_second_half_of_the_epochs():
    raw, swa = Snapshots(), Snapshots()
    _trainer(SourceOnly(), epochs=4).fit(raw)
    trainer = _trainer(Swa(), epochs=4)
    trainer.fit(swa)
    for epoch in range(3):  # before any average, then the average of one: the raw weights
        assert all(torch.equal(a, b) for a, b in zip(raw.seen[epoch], swa.seen[epoch], strict=True))
    mean = [(a + b) / 2 for a, b in zip(raw.seen[2], raw.seen[3], strict=True)]
    for a, b in zip(mean, _weights(trainer.model), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert trainer._average.count == 2


def _flat(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.flatten() for w in weights])


def test_ema_decay_warms_up_like_timms():
    assert averaging.warmed_up_decay(0.999, 1) == pytest.approx(2 / 11)
    assert averaging.warmed_up_decay(0.999, 80) == pytest.approx(0.9)
    assert averaging.warmed_up_decay(0.999, 10**6) == 0.999
    assert averaging.warmed_up_decay(0.5, 100) == 0.5


def test_a_short_run_with_the_default_ema_scores_the_trained_not_the_initial_weights():
    """A few steps at decay 0.999 without warm-up would leave the average at 99.4% of the
    initial weights; warmed up, it is the trained model's neighbour."""
    torch.manual_seed(0)
    init = model()  # what _trainer builds, before training
    plain = _trainer(SourceOnly())
    plain.fit()
    averaged = _trainer(SourceOnly(), Recipe(ema_decay=rcp.DEFAULT_EMA_DECAY))
    averaged.fit()
    assert 4 <= averaged._average.count <= 10  # a short run
    raw, ema = _flat(_weights(plain.model)), _flat(_weights(averaged.model))
    start = _flat(_weights(init))
    assert (ema - raw).norm() < 0.1 * (ema - start).norm()
    split = plain.source.val
    logits = [t.predict(split) for t in (plain, averaged)]
    init.eval()
    with torch.no_grad():
        first = init(torch.cat(list(plain.target_images(split))))
    assert (logits[1] - logits[0]).abs().mean() < 0.25 * (logits[1] - first).abs().mean()


def test_a_strategy_that_averages_its_weights_gets_no_ema(tmp_path):
    spec = load_study(str(write_study(tmp_path)), SEARCHED)
    trial = Calls(FIXED)
    assert "ema.decay" not in suggest(spec, trial, Swa(), 5)
    assert not {"ema.on", "ema.decay"} & set(trial.asked)
    with pytest.raises(ValueError, match="averages its weights"):
        _trainer(Swa(), Recipe(ema_decay=0.9))


def _stem_mean(trainer: Trainer, split) -> torch.Tensor:
    """The stem batch norm's input mean over ``split``'s unaugmented batches, each batch
    counting once (as a cumulative average with momentum None counts them)."""
    with torch.no_grad():
        means = [
            trainer.model.backbone.conv1(x).mean((0, 2, 3)) for x in trainer.target_images(split)
        ]
    return torch.stack(means).mean(0)


def test_swa_recomputes_batch_norm_statistics_on_the_source_training_images():
    plain = _trainer(SourceOnly(), epochs=4).fit()
    trainer = _trainer(Swa(), epochs=4)
    result = trainer.fit()
    assert result.train_loss == plain.train_loss  # the raw weights and statistics trained on
    stem = trainer.model.backbone.bn1
    expected = _stem_mean(trainer, trainer.source.train)
    torch.testing.assert_close(stem.running_mean, expected, atol=1e-5, rtol=1e-4)
    buffers = trainer._average.averaged.module.backbone.bn1.running_mean  # the epochs' average
    assert not torch.allclose(stem.running_mean, buffers, atol=1e-2)
    frozen = _trainer(Swa(), epochs=4, freeze_depth=1)  # a frozen stem keeps its statistics
    frozen.fit()
    assert torch.equal(frozen.model.backbone.bn1.running_mean, torch.zeros_like(expected))
    assert frozen.model.backbone.layer4[0].bn1.num_batches_tracked == len(
        list(frozen.target_images(frozen.source.train))
    )  # one cumulative pass over the source training images


# ------------------------------------------------------------------ random resized crops


class ImageRecorder(SourceOnly):
    """Source-only training that keeps the images of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[torch.Tensor] = []

    def training_step(self, model, batch, ctx):
        self.images.append(batch.source[0])
        return super().training_step(model, batch, ctx)


def _seen(augment: str, params: dict) -> list[torch.Tensor]:
    strategy = ImageRecorder()
    trainer = _trainer(strategy, augment=augment, params=params, epochs=1)
    trainer.model.input_size = 16  # the domains are stored at the input size, as digits are
    trainer.fit()
    return strategy.images


def test_crop_scale_crops_images_stored_at_the_input_size():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    net = SimpleNamespace(input_size=16, task="classification")
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    out, _ = training_crop(x, None, net, "light", 0.3, g())
    assert torch.equal(out, crops.random_resized_crop(x, 16, (0.3, 1.0), generator=g()))
    assert out.shape == x.shape and not torch.equal(out, x)
    for augment, scale in (("none", 0.3), ("light", None)):  # no augmentation, or no scale
        assert training_crop(x, None, net, augment, scale, g())[0] is x
    mask = torch.zeros(8, 16, 16, dtype=torch.long)  # segmentation: as before, untouched
    out, kept = training_crop(x, mask, net, "light", 0.3, g())
    assert out is x and kept is mask
    plain, cropped = _seen("light", {}), _seen("light", {"augment.crop_scale": 0.3})
    assert all(a.shape == b.shape for a, b in zip(plain, cropped, strict=True))
    assert not torch.equal(plain[0], cropped[0])
    unaugmented = _seen("none", {"augment.crop_scale": 0.3})
    assert all(torch.equal(a, b) for a, b in zip(unaugmented, _seen("none", {}), strict=True))


# ------------------------------------------------------------------ drop path


def test_drop_path_rates_are_set_over_depth_and_reset_every_run():
    torch.manual_seed(0)
    net = model("test_vit")
    modules = [m for m in net.backbone.modules() if isinstance(m, DropPath)]
    assert modules and all(m.drop_prob == 0 for m in modules)
    src, tgt = domain("s", n=16), domain("t", n=16, seed=1)
    Trainer(net, SourceOnly(), src, tgt, config(recipe=Recipe(drop_path=0.2)))
    rates = [m.drop_prob for m in modules]
    assert rates[-1] == pytest.approx(0.2) and rates[0] == pytest.approx(0.2 / 5)  # blocks 1..5
    assert rates == sorted(rates)
    Trainer(net, SourceOnly(), src, tgt, config())  # the model reused by the next trial
    assert all(m.drop_prob == 0 for m in modules)


def test_drop_path_without_recorded_shares_follows_the_blocks_and_needs_modules():
    blocks = nn.ModuleDict(
        {
            "a": nn.ModuleDict({"dp": DropPath()}),
            "b": nn.ModuleDict({"p1": DropPath(), "p2": DropPath()}),
        }
    )
    assert set_drop_path(blocks, 0.4) == 3
    assert [m.drop_prob for m in blocks.modules() if isinstance(m, DropPath)] == [0.2, 0.4, 0.4]
    plain = SimpleNamespace(backbone=nn.Linear(2, 2))
    rcp.prepare(plain, SourceOnly(), Recipe())  # nothing to set, nothing asked
    with pytest.raises(ValueError, match="no timm DropPath modules"):
        rcp.prepare(plain, SourceOnly(), Recipe(drop_path=0.1))


# ------------------------------------------------------------------ mixing


def test_mixed_batches_reach_a_mixing_strategy_and_never_another():
    strategy = LrRecorder()  # source-only: mixed_labels
    _trainer(strategy, Recipe(mixup_alpha=0.4, cutmix_alpha=1.0), freeze_depth=5).fit()
    for y in strategy.labels:
        assert y.dtype.is_floating_point and y.shape[1] == 3
        assert torch.allclose(y.sum(1), torch.ones(len(y)))
    assert any((y.max(1).values < 1).any() for y in strategy.labels)  # some were mixed
    hard = LrRecorder()
    _trainer(hard, freeze_depth=5).fit()
    assert all(not y.dtype.is_floating_point for y in hard.labels)
    with pytest.raises(ValueError, match="does not take mixed labels"):
        _trainer(PlainCE(), Recipe(mixup_alpha=0.2))


# ------------------------------------------------------------------ the search space


class Calls:
    """A trial that records what the sampler is asked, answering from a fixed trial."""

    def __init__(self, params: dict) -> None:
        self.fixed, self.asked = optuna.trial.FixedTrial(params), []

    def __getattr__(self, name):
        attr = getattr(self.fixed, name)
        if not name.startswith("suggest_"):
            return attr

        def asked(key, *args, **kw):
            self.asked.append(key)
            return attr(key, *args, **kw)

        return asked


FIXED = {
    "backbone.freeze_depth": 1,
    "backbone.lr": 1e-3,
    "head.lr": 1e-2,
    "optimizer.weight_decay": 1e-4,
    "augment.policy": "randaugment",
    "augment.num_ops": 3,
    "augment.magnitude": 12.0,
    "augment.mixup_alpha": 0.3,
    "augment.cutmix_alpha": 0.5,
    "augment.mix_prob": 0.7,
    "optimizer.name": "sgd",
    "schedule.name": "step",
    "schedule.warmup": 0.1,
    "loss.label_smoothing": 0.1,
    "backbone.drop_path": 0.2,
    "ema.on": True,
    "ema.decay": 0.99,
    "data.batch_size": 8,
}

SEARCHED = {
    "search.augment": ["none", "randaugment"],
    "search.augment_ops": ["rotate", "solarize", "shear_x"],
    "search.num_ops": [1, 3],
    "search.magnitude": [5, 15],
    "search.mixup_alpha": [0, 0.4],
    "search.cutmix_alpha": [0, 1.0],
    "search.mix_prob": [0.5, 1.0],
    "search.optimizer": ["adamw", "sgd"],
    "search.schedule": ["cosine", "step"],
    "search.warmup": [0, 0.2],
    "search.label_smoothing": [0, 0.2],
    "search.drop_path": [0, 0.3],
    "search.ema": [False, True],
    "search.ema_decay": [0.9, 0.999],
    "search.batch_size": [8, 32],
}


def test_a_study_without_recipe_keys_asks_the_sampler_what_it_always_did(tmp_path):
    spec = load_study(str(write_study(tmp_path)))
    trial = Calls({**FIXED, "augment.policy": "light"})
    params = suggest(spec, trial, FineTune(), 5)
    assert trial.asked == DEFAULT_DRAWS
    assert params["optimizer.name"] == "adamw" and params["schedule.name"] == "cosine"
    assert params["schedule.warmup"] == 0.0 and params["loss.label_smoothing"] == 0.0
    assert params["backbone.drop_path"] == 0.0 and params["data.batch_size"] == spec.batch_size
    assert "ema.decay" not in params and "augment.mixup_alpha" not in params
    cfg = train_config(spec, params, 0, CPU, Precision.for_device(CPU))
    assert cfg.recipe == Recipe() and cfg.batch_size == spec.batch_size
    assert SearchSpace().config() == {
        "sampler": "tpe",
        "pruner": "asha",
        "startup_trials": 3,
        "freeze_depth": "auto",
        "backbone_lr": [1e-4, 3e-2],
        "head_lr": [1e-4, 3e-2],
        "weight_decay": [1e-6, 1e-2],
        "augment": ["none", "light", "strong"],
        "layer_decay": 1.0,
    }


def test_every_searched_dimension_is_drawn_recorded_and_trained_with(tmp_path):
    spec = load_study(str(write_study(tmp_path)), SEARCHED)
    trial = Calls(FIXED)
    params = suggest(spec, trial, SourceOnly(), 5)
    recorded = {k: params[k] for k in FIXED if k != "ema.on"}
    assert recorded == {k: v for k, v in FIXED.items() if k != "ema.on"}
    assert params["augment.ops"] == ["rotate", "solarize", "shear_x"]
    assert set(trial.asked) == set(FIXED)
    cfg = train_config(spec, params, 0, CPU, Precision.for_device(CPU))
    assert cfg.batch_size == 8
    assert cfg.recipe == Recipe("sgd", "step", 0.1, 0.1, 0.2, 0.99, 0.3, 0.5, 0.7)
    assert spec.search.config()["batch_size"] == [8, 32]


def test_a_strategy_without_mixed_labels_records_mixing_off_and_is_told_once(tmp_path):
    spec = load_study(str(write_study(tmp_path)), SEARCHED)
    trial = Calls(FIXED)
    params = suggest(spec, trial, PlainCE(), 5)
    assert params["augment.mixup_alpha"] == params["augment.cutmix_alpha"] == 0.0
    assert "augment.mix_prob" not in params
    assert not {"augment.mixup_alpha", "augment.cutmix_alpha", "augment.mix_prob"} & set(
        trial.asked
    )
    assert "does not take mixed labels" in (mixing_refused(spec, PlainCE()) or "")
    assert mixing_refused(spec, SourceOnly()) is None
    assert mixing_refused(load_study(str(write_study(tmp_path, "plain"))), PlainCE()) is None


def test_pinned_recipe_values_are_recorded_without_the_sampler(tmp_path):
    pinned = {
        "search.optimizer": "sgd",
        "search.schedule": ["constant"],
        "search.warmup": 0.1,
        "search.ema": True,
        "search.batch_size": [16],
        "search.augment": "randaugment",
        "search.num_ops": 2,
        "search.magnitude": [7, 7],
    }
    spec = load_study(str(write_study(tmp_path)), pinned)
    trial = Calls(FIXED)
    params = suggest(spec, trial, SourceOnly(), 5)
    assert trial.asked == [k for k in DEFAULT_DRAWS if k != "augment.policy"]
    assert params["optimizer.name"] == "sgd" and params["schedule.name"] == "constant"
    assert params["ema.decay"] == rcp.DEFAULT_EMA_DECAY and params["data.batch_size"] == 16
    assert params["augment.num_ops"] == 2 and params["augment.magnitude"] == 7.0


def test_a_searched_batch_size_changes_the_steps(tmp_path):
    spec = load_study(str(write_study(tmp_path)), {"search.batch_size": [8, 32]})
    steps = {}
    for size in (8, 32):
        fixed = {**FIXED, "data.batch_size": size, "augment.policy": "none"}
        params = suggest(spec, Calls(fixed), SourceOnly(), 5)
        cfg = train_config(spec, params, 0, CPU, Precision.for_device(CPU))
        strategy = LrRecorder()
        cfg.epochs, cfg.freeze_depth = 1, 5
        trainer = Trainer(model(), strategy, domain("s", n=64), domain("t", n=64, seed=1), cfg)
        strategy.trainer = trainer
        trainer.fit()
        steps[size] = len(strategy.lrs)
    assert steps[8] > steps[32] >= 1


def test_recomputing_norms_leaves_out_a_last_batch_of_one_image():
    from harness.training.averaging import recompute_norms

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    x = torch.randn(6, 3, 2, 2)
    assert recompute_norms(model, [x[:5], x[5:]]) == 1  # no error on the image left over
    expected = model[0](x[:5]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected.detach())
