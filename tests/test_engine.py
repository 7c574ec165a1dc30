from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import api
from harness.api import Batch, DomainData, Strategy
from harness.errors import NonFiniteLossError
from harness.training.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    classification_metrics,
    few_shot_indices,
    resolve_device,
    resolve_freeze_depth,
)
from harness.training.inputs import model_input
from harness_plugins.heads import build_linear
from harness_plugins.timm_backbones import build_timm_backbone

CPU = torch.device("cpu")


def domain(name: str, n: int = 60, size: int = 16, seed: int = 0, classes: int = 3) -> DomainData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 0] = (y * 80).view(-1, 1, 1).to(torch.uint8)  # learnable signal in channel 0
    return DomainData.from_arrays(
        name, x, y, class_names=[str(i) for i in range(classes)], seed=seed
    )


def model(name: str = "test_resnet", classes: int = 3) -> TransferModel:
    bb = build_timm_backbone(name, weights="none")
    return TransferModel(bb, build_linear(backbone=bb, num_classes=classes, task="classification"))


def config(**kw) -> TrainConfig:
    base = dict(
        epochs=1, batch_size=16, backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.0, freeze_depth=0,
        augment="none", seed=0, device=CPU, precision=Precision.for_device(CPU),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


class Recorder(Strategy):
    """Records what the engine hands to a step."""

    uses_source = True
    uses_target = True
    target_labels = "none"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Batch] = []

    def training_step(self, m, batch, ctx):
        self.seen.append(batch)
        x, y = batch.source
        return F.cross_entropy(m(x), y)


def test_device_and_precision_defaults_on_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = Precision.for_device(CPU)
    assert not p.autocast_bf16 and not p.channels_last and p.describe() == "fp32"
    cuda = Precision.for_device(torch.device("cuda"))
    assert (
        cuda.autocast_bf16
        and cuda.channels_last
        and cuda.describe() == "bf16-autocast+channels_last"
    )
    assert Precision.for_device(torch.device("cuda"), "fp32").describe() == "fp32"


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"])
def test_freeze_depth_freezes_the_first_k_stages_stem_first(name):
    m = model(name)
    stages = m.spec.stages
    assert len(stages) >= 3
    assert resolve_freeze_depth("all", len(stages)) == len(stages)
    for depth in (0, 1, len(stages) - 1, len(stages)):
        m.freeze(depth)
        trainable = {n for n, p in m.backbone.named_parameters() if p.requires_grad}
        for i, stage in enumerate(stages):
            assert all((n in trainable) == (i >= depth) for n in stage), (name, depth, i)
        assert all(p.requires_grad for p in m.head.parameters())
    # the stem is the first stage
    first = stages[0][0]
    assert any(
        k in first for k in ("conv1", "stem", "patch_embed", "conv_stem", "cls_token", "pos_embed")
    )


def test_frozen_batchnorm_keeps_its_statistics():
    src, tgt = domain("s"), domain("t", seed=1)
    m = model()
    bn_stem = m.backbone.bn1
    before = bn_stem.running_mean.clone()
    trainer = Trainer(m, Recorder(), src, tgt, config(freeze_depth=1))
    trainer.fit()
    assert torch.equal(bn_stem.running_mean, before)  # frozen stem: stats untouched
    assert not torch.equal(m.backbone.layer4[0].bn1.running_mean, torch.zeros_like(before[:1]))


def test_target_labels_are_hidden_from_strategies_that_declare_none():
    src, tgt = domain("s"), domain("t", seed=1)
    rec = Recorder()
    Trainer(model(), rec, src, tgt, config()).fit()
    assert rec.seen and all(b.target is not None and b.target[1] is None for b in rec.seen)
    assert all(b.source[1] is not None for b in rec.seen)

    class AllLabels(Recorder):
        target_labels = "all"

    rec2 = AllLabels()
    Trainer(model(), rec2, src, tgt, config()).fit()
    assert all(b.target[1] is not None for b in rec2.seen)


def test_few_shot_uses_k_images_per_class():
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    idx = few_shot_indices(y, 4, seed=0)
    assert torch.bincount(y[idx]).tolist() == [4, 4, 3]
    assert torch.equal(idx, few_shot_indices(y, 4, seed=0))
    assert not torch.equal(idx, few_shot_indices(y, 4, seed=1))


def test_training_learns_and_is_deterministic():
    src, tgt = domain("s", n=90), domain("t", n=90, seed=1)

    def run() -> tuple[float, list[float]]:
        m = model()
        t = Trainer(m, Recorder(), src, tgt, config(epochs=4, augment="light"))
        res = t.fit(
            lambda e, mm: classification_metrics(t.predict(src.val), src.val.y, 3)["accuracy"]
        )
        return res.history[-1], res.train_loss

    acc1, loss1 = run()
    acc2, loss2 = run()
    assert loss1 == loss2 and acc1 == acc2
    assert loss1[-1] < loss1[0]


def test_non_finite_loss_fails_the_run():
    class Nan(Strategy):
        def training_step(self, m, batch, ctx):
            return m(batch.source[0]).sum() * float("nan")

    with pytest.raises(NonFiniteLossError, match="non-finite"):
        Trainer(model(), Nan(), domain("s"), domain("t"), config()).fit()


def test_extra_modules_from_setup_are_trained():
    class WithExtra(Strategy):
        def setup(self, m, num_classes, params, feature_dim):
            return nn.Linear(feature_dim, 1)

        def training_step(self, m, batch, ctx):
            x, y = batch.source
            return F.cross_entropy(m(x), y) + ctx.extra(m.features(x)).pow(2).mean()

    t = Trainer(model(), WithExtra(), domain("s"), domain("t"), config())
    w = t.extra.weight.detach().clone()
    t.fit()
    assert not torch.equal(w, t.extra.weight)


def test_setup_is_told_the_feature_width_and_its_module_says_how_it_is_optimized():
    seen = {}

    class Discriminating(Strategy):
        def setup(self, m, num_classes, params, feature_dim):
            seen["model"], seen["width"] = m, feature_dim
            return nn.Sequential(nn.Linear(feature_dim, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))

        def param_groups(self, extra, lr, weight_decay):
            return [
                {"params": list(extra[0].parameters()), "lr": lr * 3, "weight_decay": 0.5},
                {"params": [], "lr": lr},  # dropped: nothing to optimize
                {"params": list(extra[1:].parameters()), "lr": lr, "weight_decay": 0.0},
            ]

        def training_step(self, m, batch, ctx):
            x, y = batch.source
            return F.cross_entropy(m(x), y) + ctx.extra(m.features(x)).pow(2).mean()

    m = model()
    t = Trainer(m, Discriminating(), domain("s"), domain("t"), config(weight_decay=0.01))
    assert isinstance(seen["model"], api.TransferModel) and seen["width"] == m.spec.num_features
    groups = t.optimizer.param_groups[-2:]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(3e-2, 0.5), (1e-2, 0.0)]
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.01


def test_a_strategy_logs_diagnostics_that_the_result_averages_per_epoch():
    steps: list[list[int]] = [[], []]

    class Logging(Recorder):
        def training_step(self, m, batch, ctx):
            steps[ctx.epoch].append(ctx.step)
            ctx.log("step", ctx.step)  # a number
            ctx.log("ones", torch.ones(()))  # a tensor, kept on its device until the epoch ends
            if ctx.epoch == 1:
                ctx.log("late", 2.0)
            return super().training_step(m, batch, ctx)

    result = Trainer(model(), Logging(), domain("s"), domain("t"), config(epochs=2)).fit()
    assert result.diagnostics["step"] == [sum(e) / len(e) for e in steps]
    assert result.diagnostics["ones"] == [1.0, 1.0]
    assert math.isnan(result.diagnostics["late"][0]) and result.diagnostics["late"][1] == 2.0
    with pytest.raises(ValueError, match="name"):
        api.StepContext({}, 0, 1, 0, 1, 3).log("", 1.0)


def test_every_model_input_is_the_one_preprocessing_step():
    m = model()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = m.normalize(x.float() / 255.0).contiguous(memory_format=torch.channels_last)
    assert torch.equal(model_input(x, m, channels_last=True), expected)
    assert model_input(x, m, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    t = Trainer(m, Recorder(), domain("s"), domain("t"), config())
    prepared, _ = t._prepare(x, None, torch.Generator())
    assert torch.equal(prepared, model_input(x, m, channels_last=False))


def test_metrics_known_answers():
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    y = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, y, 3)
    assert m["accuracy"] == pytest.approx(0.75)
    # per class F1: 1, 2/3, 2/3 -> macro 7/9
    assert m["macro_f1"] == pytest.approx(7 / 9, abs=1e-6)
    assert m["precision"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-6)
    assert m["recall"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-6)
    with pytest.raises(NonFiniteLossError):
        classification_metrics(torch.full((2, 3), float("nan")), torch.tensor([0, 1]), 3)


def test_segmentation_batches_move_masks_with_their_images():
    n, size = 8, 32
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy // 8 + xx // 8) % 4).expand(n, size, size).clone()
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[:, 0] = (mask * 60 + 30).to(torch.uint8)  # channel 0 encodes the class
    data = DomainData.from_arrays(
        "seg", x, mask, class_names=list("abcd"), seed=0, task="segmentation"
    )
    seen: list[Batch] = []

    class Rec(Strategy):
        def training_step(self, m, batch, ctx):
            seen.append(batch)
            return m(batch.source[0]).float().mean() * 0

    bb = build_timm_backbone("test_resnet", weights="none")
    from harness_plugins.smp_heads import SmpHead

    m = TransferModel(bb, SmpHead("fpn", bb, 4), "segmentation")
    geo = "light"  # geometry plus monotonic colour changes (no inversion)
    Trainer(m, Rec(), data, data, config(augment=geo, batch_size=4)).fit()
    xb, yb = seen[0].source
    assert yb.shape == xb.shape[:1] + xb.shape[2:]
    pixel = (xb[:, 0] * m.std[0, 0] + m.mean[0, 0]) * 255  # undo normalization of channel 0
    valid = yb != 255
    assert valid.float().mean() > 0.5 and (~valid).any()  # geometry moved the mask (void borders)
    # colours are jittered, so compare the order of the classes rather than exact values
    decoded = torch.stack([pixel[valid][yb[valid] == c].mean() for c in range(4)])
    assert torch.all(decoded[1:] > decoded[:-1])


def test_a_strategy_with_the_old_three_parameter_setup_still_trains_with_a_warning():
    from harness.training.engine import run_setup

    class Old(Strategy):
        def setup(self, model, num_classes, params):  # written before feature_dim existed
            return torch.nn.Linear(2, num_classes)

    class New(Strategy):
        def setup(self, model, num_classes, params, feature_dim):
            return torch.nn.Linear(feature_dim, num_classes)

    with pytest.warns(FutureWarning, match="feature_dim"):
        old = run_setup(Old(), None, 3, {}, 7)
    assert old.out_features == 3
    assert run_setup(New(), None, 3, {}, 7).in_features == 7


def test_param_groups_given_as_generators_are_trained():
    """A strategy's ``param_groups`` in plain PyTorch style (``module.parameters()``, a generator)
    must reach the optimizer with every parameter, not as an empty group."""

    class Gen(Strategy):
        uses_target = False

        def setup(self, model, num_classes, params, feature_dim):
            return torch.nn.Linear(feature_dim, 2)

        def param_groups(self, extra, lr, weight_decay):
            return [{"params": extra.parameters(), "lr": lr}]

        def training_step(self, m, batch, ctx):
            x, y = batch.source
            return F.cross_entropy(m(x), y)

    source = domain("s")
    trainer = Trainer(model(), Gen(), source, source, config())
    extra_ids = {id(p) for p in trainer.extra.parameters()}
    grouped = [
        g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} & extra_ids
    ]
    assert len(grouped) == 1 and {id(p) for p in grouped[0]["params"]} == extra_ids
