"""Domain adaptation strategies: each changes what it should, on tiny hand-built models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.api import IGNORE_INDEX, Backbone, Batch, StepContext, reverse_gradient
from harness.training.engine import Precision, TrainConfig, Trainer, TransferModel
from harness_plugins import uda


def cpu_config(**kw) -> TrainConfig:
    """A one-epoch fp32 CPU training configuration for the tiny models here; ``kw`` overrides it."""
    base = dict(
        epochs=1, batch_size=32, backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.0, freeze_depth=0,
        augment="none", seed=0, device=torch.device("cpu"), precision=Precision(False, False),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def tiny_model(num_classes: int = 3, bn: bool = False, features: int = 8) -> TransferModel:
    layers: list[nn.Module] = [nn.BatchNorm2d(3)] if bn else []
    layers += [
        nn.Conv2d(3, features, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    module = nn.Sequential(*layers)
    names = [n for n, _ in module.named_parameters()]
    backbone = Backbone(
        module=module, num_features=features, stages=[names[:2], names[2:]] if bn else [names]
    )
    return TransferModel(backbone, nn.Linear(features, num_classes))


def ctx(params=None, progress: float = 1.0, extra=None, num_classes: int = 3) -> StepContext:
    return StepContext(
        params=params or {},
        epoch=0,
        epochs=1,
        step=int(progress * 100),
        total_steps=100,
        num_classes=num_classes,
        extra=extra,
    )


def batch(n: int = 6, seed: int = 0, shift: float = 1.0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, 8, 8, generator=g)
    xt = torch.randn(n, 3, 8, 8, generator=g) + shift
    return Batch(source=(xs, torch.randint(0, 3, (n,), generator=g)), target=(xt, None))


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()
    ]


# ------------------------------------------------------------------------------ DANN


def test_reverse_grad_is_identity_forward_and_negated_scaled_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.5))


def test_dann_discriminator_learns_and_backbone_receives_its_gradient_reversed():
    torch.manual_seed(0)
    model, strategy, b = tiny_model(), uda.DANN(), batch()
    params = {"strategy.weight": 2.0, "strategy.disc_hidden": 16, "strategy.disc_lr_scale": 3.0}
    disc = strategy.setup(
        model, 3, params, model.feature_dim
    ).eval()  # eval: no dropout, so passes are comparable
    assert disc.lr_scale == 3.0
    c = ctx(params, progress=0.5, extra=disc)
    coeff = 2.0 * uda.ramp(0.5)

    strategy.training_step(model, b, c).backward()
    total_backbone, total_disc = grads(model.backbone), grads(disc)

    # the same two losses computed by hand, without the reversal
    model.zero_grad(), disc.zero_grad()
    (xs, ys), (xt, _) = b.source, b.target
    f = model.features(torch.cat([xs, xt]))
    F.cross_entropy(model.head(f[:6]), ys).backward(retain_graph=True)
    ce_backbone = grads(model.backbone)
    model.zero_grad()
    domain = torch.cat([torch.ones(6), torch.zeros(6)])
    F.binary_cross_entropy_with_logits(disc(f), domain).backward()
    adv_backbone, adv_disc = grads(model.backbone), grads(disc)

    for t, ce, adv in zip(total_backbone, ce_backbone, adv_backbone, strict=True):
        assert torch.allclose(t, ce - coeff * adv, atol=1e-5)
    for t, adv in zip(total_disc, adv_disc, strict=True):  # the discriminator minimizes its loss
        assert torch.allclose(t, adv, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in adv_backbone)


def test_dann_schedule_starts_at_zero_and_rises_to_one():
    assert uda.ramp(0.0) == 0.0
    assert 0.99 < uda.ramp(1.0) <= 1.0
    assert uda.ramp(0.1) < uda.ramp(0.3) < uda.ramp(0.6)


def test_dann_schedule_and_gamma_are_searched_and_used():
    import optuna

    # by default DANN's own ramp (gamma 10), recorded but not searched
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    fixed = uda.DANN().search_space(trial)
    assert fixed["strategy.schedule"] == "ramp" and fixed["strategy.gamma"] == 10.0
    assert set(trial.distributions) == {
        "strategy.weight",
        "strategy.disc_hidden",
        "strategy.disc_lr_scale",
    }
    assert (
        uda.DANN(schedule="constant", gamma=3).search_space(trial)["strategy.schedule"]
        == "constant"
    )
    with pytest.raises(ValueError, match="schedule must be one of"):
        uda.DANN(schedule="step")
    with pytest.raises(ValueError, match="gamma"):
        uda.DANN(gamma=-1)

    space = uda.DANN(schedule="search").search_space(
        optuna.trial.FixedTrial(
            {
                "strategy.weight": 1.0,
                "strategy.schedule": "ramp",
                "strategy.gamma": 3.0,
                "strategy.disc_hidden": 64,
                "strategy.disc_lr_scale": 1.0,
            }
        )
    )
    assert space["strategy.schedule"] == "ramp" and space["strategy.gamma"] == 3.0
    constant = uda.DANN(schedule="search").search_space(
        optuna.trial.FixedTrial(
            {
                "strategy.weight": 1.0,
                "strategy.schedule": "constant",
                "strategy.disc_hidden": 64,
                "strategy.disc_lr_scale": 1.0,
            }
        )
    )
    assert "strategy.gamma" not in constant  # a constant weight has no ramp to shape
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    uda.DANN(schedule="search").search_space(trial)
    assert trial.distributions["strategy.schedule"].choices == ("ramp", "constant")

    coeff = uda.adversarial_coefficient
    assert coeff({"strategy.weight": 2.0, "strategy.schedule": "constant"}, 0.0) == 2.0
    assert coeff(
        {"strategy.weight": 2.0, "strategy.schedule": "ramp", "strategy.gamma": 3.0}, 0.2
    ) == pytest.approx(2.0 * (2.0 / (1.0 + math.exp(-0.6)) - 1.0))
    assert coeff({"strategy.weight": 2.0}, 0.2) == pytest.approx(
        2.0 * uda.ramp(0.2, 10.0)
    )  # DANN's default
    assert coeff({"strategy.gamma": 30.0}, 0.1) > coeff({"strategy.gamma": 3.0}, 0.1)
    with pytest.raises(ValueError, match="strategy.schedule"):
        coeff({"strategy.schedule": "step"}, 0.5)

    # at the start of training the ramp gives the backbone no adversarial gradient; constant does
    def backbone_grads(schedule):
        torch.manual_seed(0)
        model, strategy, b = tiny_model(), uda.DANN(), batch()
        params = {"strategy.weight": 1.0, "strategy.schedule": schedule, "strategy.disc_hidden": 16}
        disc = strategy.setup(model, 3, params, model.feature_dim).eval()
        strategy.training_step(model, b, ctx(params, progress=0.0, extra=disc)).backward()
        return grads(model.backbone)

    torch.manual_seed(0)
    model, b = tiny_model(), batch()
    F.cross_entropy(model(b.source[0]), b.source[1]).backward()
    ce_only = grads(model.backbone)
    assert all(
        torch.allclose(a, c, atol=1e-6)
        for a, c in zip(backbone_grads("ramp"), ce_only, strict=True)
    )
    assert any(
        not torch.allclose(a, c, atol=1e-6)
        for a, c in zip(backbone_grads("constant"), ce_only, strict=True)
    )


def seg_model(num_classes: int = 3) -> TransferModel:
    from harness_plugins.smp_heads import SmpHead
    from harness_plugins.timm_backbones import build_timm_backbone

    torch.manual_seed(0)
    bb = build_timm_backbone("test_resnet", weights="none")
    return TransferModel(bb, SmpHead("fpn", bb, num_classes), "segmentation")


def seg_batch(n: int = 3, size: int = 64, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, 3, (n, size, size), generator=g)
    ys[:, :4] = IGNORE_INDEX
    xt = torch.rand(n, 3, size, size, generator=g) * 0.5 + 0.8
    return Batch(source=(torch.randn(n, 3, size, size, generator=g), ys), target=(xt, None))


def test_dann_on_segmentation_discriminates_every_location_of_the_deepest_map_with_reversed_gradients():
    model, strategy, b = seg_model().eval(), uda.DANN(), seg_batch()  # eval: passes are comparable
    params = {"strategy.weight": 1.5, "strategy.schedule": "constant", "strategy.disc_hidden": 16}
    disc = strategy.setup(model, 3, params, model.feature_dim).eval()
    assert disc.net[0].in_features == model.head.deepest_channels == 96
    seen = []
    disc.register_forward_hook(lambda _m, i, _o: seen.append(i[0].shape))
    strategy.training_step(model, b, ctx(params, extra=disc, num_classes=3)).backward()
    total_backbone, total_decoder, total_disc = (
        grads(model.backbone),
        [p.grad.clone() for p in model.head_parameters()],
        grads(disc),
    )
    assert seen == [(2 * 3 * 2 * 2, 96)]  # 3 + 3 images, a 2x2 map at 64 px: one row per location

    model.zero_grad(), disc.zero_grad()
    (xs, ys), (xt, _) = b.source, b.target
    logits, fmap = model.head.forward_with_features(torch.cat([xs, xt]))
    assert fmap.shape == (6, 96, 2, 2) and logits.shape == (6, 3, 64, 64)
    F.cross_entropy(logits[:3], ys, ignore_index=IGNORE_INDEX).backward(retain_graph=True)
    ce_backbone, ce_decoder = (
        grads(model.backbone),
        [p.grad.clone() for p in model.head_parameters()],
    )
    model.zero_grad()
    rows = fmap.flatten(2).transpose(1, 2).flatten(0, 1)  # image-major, as the strategy orders them
    domain = torch.cat([torch.ones(12), torch.zeros(12)])
    F.binary_cross_entropy_with_logits(disc(rows), domain).backward()
    adv_backbone, adv_disc = grads(model.backbone), grads(disc)

    for t, ce, adv in zip(total_backbone, ce_backbone, adv_backbone, strict=True):
        assert torch.allclose(t, ce - 1.5 * adv, atol=1e-5)
    for t, adv in zip(total_disc, adv_disc, strict=True):
        assert torch.allclose(t, adv, atol=1e-6)
    for t, ce in zip(total_decoder, ce_decoder, strict=True):  # the map is read before the decoder
        assert torch.allclose(t, ce, atol=1e-6)
    assert sum(float(a.abs().sum()) for a in adv_backbone) > 0


def test_sampled_locations_are_distinct_and_all_when_few():
    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    every = uda.sample_locations(fmap, 16)
    assert torch.equal(every, fmap.flatten(2).transpose(1, 2))
    torch.manual_seed(0)
    some = uda.sample_locations(fmap, 5)
    assert some.shape == (2, 5, 3)
    for i in range(2):
        rows = {tuple(r.tolist()) for r in some[i]}
        assert len(rows) == 5 and rows <= {tuple(r.tolist()) for r in every[i]}


def test_the_engine_optimizes_a_strategy_module_at_its_own_learning_rate(digits_pair):
    source, target = digits_pair
    model = tiny_model(num_classes=10)
    cfg = cpu_config(
        params={"strategy.weight": 1.0, "strategy.disc_hidden": 8, "strategy.disc_lr_scale": 0.1}
    )
    trainer = Trainer(model, uda.DANN(), source, target, cfg)
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-2])  # backbone, discriminator (0.1 x head), head
    before = [p.detach().clone() for p in trainer.extra.parameters()]
    trainer.fit()
    assert any(
        not torch.equal(a, p) for a, p in zip(before, trainer.extra.parameters(), strict=True)
    )


# ------------------------------------------------------------------------------ feature alignment


def test_coral_is_zero_for_equal_covariances_and_grows_with_the_difference():
    f = torch.randn(64, 5)
    assert uda.coral_loss(f, f + 3.0) == pytest.approx(
        0.0, abs=1e-6
    )  # a shift keeps the covariance
    assert uda.coral_loss(f, 2 * f) > uda.coral_loss(f, 1.2 * f) > 0


def test_mmd_separates_shifted_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    assert abs(float(uda.mmd_loss(a, b))) < 0.1
    assert float(uda.mmd_loss(a, b + 3.0)) > 5 * abs(float(uda.mmd_loss(a, b)))


@pytest.mark.parametrize("cls", [uda.CORAL, uda.MMD])
def test_alignment_strategies_add_their_term_to_the_source_loss(cls):
    torch.manual_seed(0)
    model, b = tiny_model(), batch(shift=2.0)
    plain = float(cls().training_step(model, b, ctx({"strategy.weight": 0.0})).detach())
    weighted = float(cls().training_step(model, b, ctx({"strategy.weight": 10.0})).detach())
    assert weighted > plain
    assert plain == pytest.approx(float(F.cross_entropy(model(b.source[0]), b.source[1])), rel=1e-5)


def timm_classifier(num_classes: int = 3) -> TransferModel:
    from harness_plugins.timm_backbones import build_timm_backbone

    torch.manual_seed(0)
    bb = build_timm_backbone("test_resnet", weights="none")
    return TransferModel(bb, nn.Linear(bb.num_features, num_classes))


def shifted_batch(n: int = 16, size: int = 16) -> Batch:
    """Source images and target images of another scale and mean: a covariate shift."""
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)
    return Batch(
        source=(xs, ys), target=(torch.randn(n, 3, size, size, generator=g) * 2.0 + 1.0, None)
    )


def trained(cls, weight: float, b: Batch, steps: int = 8) -> TransferModel:
    """test_resnet after ``steps`` Adam steps of ``cls``'s loss at ``weight``: 0 leaves the source
    cross-entropy on the same joint forward passes (the source-only loss), from the same seed."""
    model = timm_classifier().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        c = StepContext(
            params={"strategy.weight": weight},
            epoch=0,
            epochs=1,
            step=step,
            total_steps=steps,
            num_classes=3,
        )
        cls().training_step(model, b, c).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    ("cls", "weight", "distance"),
    [(uda.CORAL, 100.0, uda.coral_loss), (uda.MMD, 5.0, uda.mmd_loss)],
)
def test_alignment_training_brings_source_and_target_feature_statistics_together(
    cls, weight, distance
):
    b = shifted_batch()
    after = {}
    for w in (0.0, weight):
        model = trained(cls, w, b)
        with torch.no_grad():
            after[w] = float(distance(model.features(b.source[0]), model.features(b.target[0])))
    assert after[weight] < 0.5 * after[0.0], after


def test_mcc_training_reduces_class_confusion_on_the_target():
    b = shifted_batch()
    after = {}
    for w in (0.0, 10.0):
        model = trained(uda.MCC, w, b)
        with torch.no_grad():
            after[w] = float(uda.class_confusion_loss(model(b.target[0]), 2.5))
    assert after[10.0] < 0.7 * after[0.0], after


def test_class_confusion_is_zero_for_confident_distinct_classes_and_high_for_uniform_ones():
    confident = 20 * torch.eye(4)
    assert float(uda.class_confusion_loss(confident, 1.0)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(8, 4)
    assert float(uda.class_confusion_loss(uniform, 2.5)) == pytest.approx(3 / 4, rel=1e-5)


# ------------------------------------------------------------------------------ AdaBN


def test_adabn_changes_normalization_statistics_only():
    torch.manual_seed(0)
    model = tiny_model(bn=True)
    model.train()
    bn = model.backbone[0]
    target = [torch.randn(16, 3, 8, 8) * 2 + 5, torch.randn(16, 3, 8, 8) * 2 + 5]
    weights = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "running" not in k and "num_batches" not in k
    }
    uda.AdaBN().adapt(model, iter(target))
    every = torch.cat(target)
    assert torch.allclose(bn.running_mean, every.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, every.var((0, 2, 3), unbiased=True), rtol=0.02)
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert bn.momentum == 0.1 and model.training and bn.training


def test_adabn_runs_after_every_epoch_in_the_engine(digits_pair):
    source, target = digits_pair
    model = tiny_model(num_classes=10, bn=True)
    cfg = cpu_config()
    Trainer(model, uda.AdaBN(), source, target, cfg).fit()
    x = model.normalize(target.train.x.float() / 255)
    # a cumulative average of batch means: the short last batch weighs a little more than its share
    assert torch.allclose(model.backbone[0].running_mean, x.mean((0, 2, 3)), atol=2e-3)
    assert not torch.allclose(model.backbone[0].running_mean, torch.zeros(3), atol=0.05)


# ------------------------------------------------------------------------------ entropy, pseudo-labels


def test_entropy_of_known_distributions():
    assert float(uda.entropy(torch.zeros(1, 4))[0]) == pytest.approx(math.log(4))
    assert float(uda.entropy(torch.tensor([[30.0, 0.0, 0.0]]))[0]) == pytest.approx(0.0, abs=1e-6)
    per_pixel = uda.entropy(torch.zeros(2, 5, 3, 3))
    assert per_pixel.shape == (2, 3, 3) and torch.allclose(
        per_pixel, torch.full((2, 3, 3), math.log(5))
    )


def test_entropy_minimization_makes_target_predictions_more_confident():
    torch.manual_seed(0)
    model, b = tiny_model(), batch(n=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    start = float(uda.entropy(model(b.target[0])).mean())
    for _ in range(30):
        opt.zero_grad()
        uda.EntropyMin().training_step(model, b, ctx({"strategy.weight": 5.0})).backward()
        opt.step()
    assert float(uda.entropy(model(b.target[0])).mean()) < 0.5 * start


def test_pseudo_labels_keep_confident_predictions_only():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 9.0]])
    assert uda.pseudo_labels(logits, 0.9).tolist() == [0, IGNORE_INDEX, 2]
    seg = torch.zeros(1, 3, 2, 2)
    seg[0, 1, 0, 0] = 10.0
    assert uda.pseudo_labels(seg, 0.9).tolist() == [
        [[1, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]]
    ]


def test_self_training_adds_nothing_during_warmup_and_pseudo_label_loss_after():
    torch.manual_seed(0)
    model, b = tiny_model(), batch()
    with torch.no_grad():
        model.head.weight.mul_(50)  # confident target predictions
    params = {"strategy.warmup": 0.5, "strategy.threshold": 0.5, "strategy.weight": 1.0}
    source_ce = float(F.cross_entropy(model(b.source[0]), b.source[1]))
    assert float(
        uda.SelfTraining().training_step(model, b, ctx(params, progress=0.2))
    ) == pytest.approx(source_ce, rel=1e-5)
    assert float(uda.SelfTraining().training_step(model, b, ctx(params, progress=0.8))) > source_ce


def test_self_training_learns_from_confident_target_predictions_only_and_from_none_in_warmup():
    """The gradient reaching each target image: the model treats images independently (no
    BatchNorm), so an image whose prediction is below the threshold must get none."""
    torch.manual_seed(0)
    model, b = tiny_model(), batch(n=8)
    with torch.no_grad():
        model.head.weight.mul_(20)
        conf = F.softmax(model(b.target[0]), 1).max(1).values
    threshold = float(conf.median())  # half of the target images are confident
    confident = conf >= threshold
    assert 0 < int(confident.sum()) < 8
    params = {"strategy.warmup": 0.3, "strategy.threshold": threshold, "strategy.weight": 1.0}

    def target_grad(progress):
        xt = b.target[0].clone().requires_grad_()
        step_batch = Batch(source=b.source, target=(xt, None))
        uda.SelfTraining().training_step(
            model, step_batch, ctx(params, progress=progress)
        ).backward()
        return xt.grad.flatten(1).abs().sum(1)

    during_warmup, after_warmup = target_grad(0.2), target_grad(0.5)
    assert torch.all(during_warmup == 0)
    assert torch.all(after_warmup[~confident] == 0) and torch.all(after_warmup[confident] > 0)

    # and training pushes the confident images towards their own pseudo-labels
    labels = model(b.target[0]).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = F.softmax(model(b.target[0]), 1)[torch.arange(8), labels][confident].detach()
    for _ in range(5):
        opt.zero_grad()
        uda.SelfTraining().training_step(
            model, b, ctx({**params, "strategy.weight": 5.0}, progress=0.9)
        ).backward()
        opt.step()
    after = F.softmax(model(b.target[0]), 1)[torch.arange(8), labels][confident].detach()
    assert after.mean() > before.mean()


# ------------------------------------------------------------------------------ FDA


def test_fda_swaps_low_frequency_amplitude_and_keeps_the_phase():
    g = torch.Generator().manual_seed(0)
    src, tgt = (
        torch.rand(2, 3, 16, 16, generator=g),
        torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.3,
    )
    out = uda.low_frequency_swap(src, tgt, beta=0.125)  # half-width 2
    fo = torch.fft.fftshift(torch.fft.fft2(out), dim=(-2, -1))
    fs = torch.fft.fftshift(torch.fft.fft2(src), dim=(-2, -1))
    ft = torch.fft.fftshift(torch.fft.fft2(tgt), dim=(-2, -1))
    window = (slice(None), slice(None), slice(6, 11), slice(6, 11))
    assert torch.allclose(fo.abs()[window], ft.abs()[window], atol=1e-3)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[6:11, 6:11] = False
    assert torch.allclose(fo.abs()[..., outside], fs.abs()[..., outside], atol=1e-3)
    strong = fs.abs() > 1e-2
    dphase = torch.remainder(fo.angle() - fs.angle() + math.pi, 2 * math.pi) - math.pi
    assert dphase[strong].abs().max() < 1e-3
    # the mean colour (zero frequency) now is the target's
    assert torch.allclose(out.mean((2, 3)), tgt.mean((2, 3)), atol=1e-4)


def test_fda_with_a_zero_window_returns_the_source():
    src = torch.rand(1, 3, 8, 8)
    assert torch.allclose(uda.low_frequency_swap(src, torch.rand(1, 3, 8, 8), beta=0.01), src)


def test_fda_step_trains_a_segmentation_model():
    torch.manual_seed(0)
    model = TransferModel(
        Backbone(module=nn.Identity(), num_features=3, stages=[[]]),
        nn.Conv2d(3, 4, 1),
        task="segmentation",
    )
    model.spec.stages = [[]]
    x = torch.rand(4, 3, 16, 16)
    y = torch.randint(0, 4, (4, 16, 16))
    y[:, 0, 0] = IGNORE_INDEX
    b = Batch(source=(x, y), target=(torch.rand(4, 3, 16, 16), None))
    loss = uda.FDA().training_step(
        model, b, ctx({"strategy.beta": 0.1, "strategy.entropy_weight": 0.01}, num_classes=4)
    )
    loss.backward()
    assert math.isfinite(float(loss)) and model.head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def digits_pair():
    from harness_plugins.datasets import build_digits, build_digits_m

    return build_digits(None, image_size=8, seed=0), build_digits_m(None, image_size=8, seed=0)


@pytest.mark.parametrize(
    "name", ["entropy-min", "fda", "self-training", "adabn", "dann", "coral", "mmd"]
)
def test_strategies_pass_the_contract_on_segmentation(name):
    from harness.registry import get_registry
    from harness.testing import assert_passes, check_strategy

    entry = get_registry().get("strategy", name)
    assert "segmentation" in entry.meta["tasks"]
    assert_passes(check_strategy(entry, task="segmentation"))


def test_only_mcc_declares_classification_only():
    from harness.registry import get_registry

    assert get_registry().get("strategy", "mcc").meta["tasks"] == ("classification",)
    for name in ("dann", "coral", "mmd"):
        assert get_registry().get("strategy", name).meta["tasks"] == (
            "classification",
            "segmentation",
        )


def test_smp_head_gives_its_logits_and_the_backbones_deepest_map_from_one_pass():
    model = seg_model().eval()
    x = torch.randn(2, 3, 64, 64)
    logits, fmap = model.head.forward_with_features(x)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)
        assert torch.allclose(fmap, model.backbone.forward_features(x), atol=1e-5)
    assert fmap.shape[1] == model.head.deepest_channels


def test_feature_level_strategies_name_what_a_segmentation_head_lacks():
    from harness.errors import PluginContractError

    model = TransferModel(
        Backbone(module=nn.Identity(), num_features=3, stages=[[]]),
        nn.Conv2d(3, 4, 1),
        task="segmentation",
    )
    b = Batch(
        source=(torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))),
        target=(torch.rand(2, 3, 8, 8), None),
    )
    with pytest.raises(PluginContractError, match="deepest_channels"):
        uda.DANN().setup(model, 4, {}, model.feature_dim)
    with pytest.raises(PluginContractError, match="forward_with_features"):
        uda.CORAL().training_step(model, b, ctx({}, num_classes=4))


@pytest.mark.parametrize(
    ("cls", "distance", "low", "high"),
    [(uda.CORAL, uda.coral_loss, 0.1, 100.0), (uda.MMD, uda.mmd_loss, 0.05, 5.0)],
)
def test_feature_alignment_is_source_ce_plus_weighted_discrepancy(cls, distance, low, high):
    import optuna

    torch.manual_seed(0)
    model, b = tiny_model(), batch()
    loss = cls().training_step(model, b, ctx({"strategy.weight": 0.3}))
    (xs, ys), (xt, _) = b.source, b.target
    f = model.features(torch.cat([xs, xt]))
    expected = F.cross_entropy(model.head(f)[:6], ys) + 0.3 * distance(f[:6], f[6:])
    assert torch.equal(loss, expected)
    trial = optuna.create_study().ask()
    cls().search_space(trial)
    dist = trial.distributions["strategy.weight"]
    assert (dist.low, dist.high, dist.log) == (low, high, True)


# ------------------------------------------------------------------------------ source loss


class PlainCE(StepContext):
    """The source loss every strategy here computed before it went through ``supervised_loss``."""

    def supervised_loss(self, logits, y):
        return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)


def test_supervised_loss_without_smoothing_is_plain_cross_entropy_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 6, 6, requires_grad=True)
    y = torch.randint(0, 5, (4, 6, 6))
    y[:, :2] = IGNORE_INDEX  # void pixels
    for lg, lab in ((logits, y), (logits[:, :, 0, 0], y[:, 3, 3])):
        ours = ctx().supervised_loss(lg, lab)
        (g_ours,) = torch.autograd.grad(ours, logits)
        plain = F.cross_entropy(lg, lab, ignore_index=IGNORE_INDEX)
        (g_plain,) = torch.autograd.grad(plain, logits)
        assert torch.equal(ours, plain) and torch.equal(g_ours, g_plain)


def _step(name: str, context: type[StepContext], smoothing: float):
    """One training step of strategy ``name`` under fixed seeds: its loss and the gradients."""
    params = {"strategy.warmup": 0.0, "strategy.threshold": 0.0}
    torch.manual_seed(0)
    model, strategy = tiny_model(), uda.STRATEGIES[name]()
    extra = strategy.setup(model, 3, params, model.feature_dim)
    c = context(
        params=params, epoch=0, epochs=1, step=50, total_steps=100, num_classes=3, extra=extra,
        label_smoothing=smoothing,
    )  # fmt: skip
    torch.manual_seed(1)
    loss = strategy.training_step(model.train(), batch(), c)
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("name", sorted(uda.STRATEGIES))
def test_every_strategy_takes_its_source_loss_from_the_context_with_its_label_smoothing(name):
    loss, grad = _step(name, StepContext, 0.0)
    before, grad_before = _step(name, PlainCE, 0.0)
    assert torch.equal(loss, before)  # without smoothing: exactly the loss of before
    assert all(map(torch.equal, grad, grad_before))
    smoothed, _ = _step(name, StepContext, 0.3)
    assert not torch.equal(smoothed, loss)  # ``[search] label_smoothing`` reaches it
