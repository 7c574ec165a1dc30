"""The supervised fine-tuning family: LP-FT, L2-SP and layer-wise learning-rate decay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_uda import batch, cpu_config, ctx, digits_pair, tiny_model  # noqa: F401 - fixture reused

from harness.api import Batch
from harness.training.engine import Trainer
from harness_plugins.strategies import L2SP, LPFT


def target_batch(seed: int = 0) -> Batch:
    b = batch(seed=seed)
    return Batch(target=(b.source[0], b.source[1]))


def test_lp_ft_keeps_the_backbone_fixed_during_the_probe_phase_only():
    torch.manual_seed(0)
    model, b = tiny_model(bn=True), target_batch()
    model.train()
    params = {"strategy.lp_fraction": 0.5}
    bn = model.backbone[0]
    stats = bn.running_mean.clone()
    LPFT().training_step(model, b, ctx(params, progress=0.2)).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad.abs().sum() > 0
    assert torch.equal(bn.running_mean, stats)  # statistics frozen while probing
    model.zero_grad()
    model.train()
    LPFT().training_step(model, b, ctx(params, progress=0.8)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_l2_sp_penalizes_distance_to_the_starting_weights_not_to_zero():
    torch.manual_seed(0)
    model, b = tiny_model(), target_batch()
    strategy = L2SP()
    start = strategy.setup(model, 3, {}, model.feature_dim)
    c = ctx({"strategy.alpha": 1.0}, extra=start)
    ce = float(F.cross_entropy(model(b.target[0]), b.target[1]))
    assert float(strategy.training_step(model, b, c)) == pytest.approx(
        ce, rel=1e-6
    )  # at w0: no penalty
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)
    n = sum(p.numel() for p in model.backbone.parameters())
    ce = float(F.cross_entropy(model(b.target[0]), b.target[1]))
    assert float(strategy.training_step(model, b, c)) == pytest.approx(
        ce + 0.5 * n * 0.01, rel=1e-4
    )


def test_l2_sp_trains_in_the_engine_with_a_module_that_has_no_parameters(digits_pair):  # noqa: F811
    source, target = digits_pair
    model = tiny_model(num_classes=10)
    cfg = cpu_config(backbone_lr=1e-2, params={"strategy.alpha": 0.1})
    result = Trainer(model, L2SP(), source, target, cfg).fit()
    assert len(result.train_loss) == 1


def test_layer_wise_decay_gives_earlier_stages_smaller_learning_rates(digits_pair):  # noqa: F811
    source, target = digits_pair
    model = tiny_model(num_classes=10, bn=True)  # two stages: the norm (stem), then the conv
    cfg = cpu_config(backbone_lr=1e-2, head_lr=1e-3, params={"backbone.lr_decay": 0.5})
    trainer = Trainer(model, LPFT(), source, target, cfg)
    lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.backbone[0].weight)] == pytest.approx(5e-3)
    assert lrs[id(model.backbone[1].weight)] == pytest.approx(1e-2)
    assert lrs[id(model.head.weight)] == pytest.approx(1e-3)


def test_lp_ft_fine_tunes_with_the_backbone_in_train_mode_from_the_step_it_switches(digits_pair):  # noqa: F811
    """The engine sets train mode once per epoch; the probe phase puts the backbone in eval mode,
    so the switch inside an epoch must put it back, or fine-tuning runs with frozen statistics."""
    source, target = digits_pair
    model = tiny_model(num_classes=10, bn=True)
    cfg = cpu_config(backbone_lr=1e-2, params={"strategy.lp_fraction": 0.5})
    strategy = LPFT()
    seen = []
    original = strategy.training_step

    def recording_step(m, b, c):
        stats = m.backbone[0].running_mean.clone()
        loss = original(m, b, c)
        seen.append(
            (c.progress, m.backbone[0].training, not torch.equal(stats, m.backbone[0].running_mean))
        )
        return loss

    strategy.training_step = recording_step
    Trainer(model, strategy, source, target, cfg).fit()
    probe = [s for s in seen if s[0] < 0.5]
    tune = [s for s in seen if s[0] >= 0.5]
    assert probe and tune and len(seen) >= 3
    assert all(not training and not moved for _, training, moved in probe)
    assert all(training and moved for _, training, moved in tune), tune
