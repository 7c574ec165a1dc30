"""Domain generalization strategies (plugins/dg.py): each trains on a batch of three source
domains, each penalty vanishes when the domains are alike and not when they differ, GroupDRO's
weights move to the worst domain, MixStyle changes training features only, and the plugin passes
the contract kit."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from test_engine import config as engine_config
from test_engine import model as engine_model
from torch import nn

from harness.api import Batch, DomainData, PluginContractError, StepContext
from harness.api.strategy import run_setup
from harness.data.pooled import pool_domains
from harness.registry import Registry
from harness.testing import assert_passes, check_strategy, parametrize_with_checks
from harness.testing.reference import reference, tiny_backbone
from harness.training.engine import Trainer
from harness.training.model import TransferModel
from harness_plugins import dg
from harness_plugins.dg_losses import (
    by_domain,
    irm_penalty,
    mean_cov_distance,
    mix_partners,
    mixstyle,
    multi_source_moments,
    pairwise_mean,
)

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = sorted(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["harness"]
)
NUM_CLASSES, DOMAINS, PER_DOMAIN = 4, 3, 6


def _registry() -> Registry:
    registry = Registry()  # not the process-wide one: collection runs before conftest's isolation
    registry.load_entry_points(only=BUILTIN)
    return registry


def _model() -> TransferModel:
    bb = tiny_backbone("test_resnet")
    torch.manual_seed(0)
    return TransferModel(bb, nn.Linear(bb.num_features, NUM_CLASSES))


def _batch(shift: float = 1.0, copies: bool = False, target: bool = False) -> Batch:
    """Three domains of PER_DOMAIN images; domain d shifted by ``d * shift``. ``copies``: every
    domain holds the same images and labels (the degenerate case)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(PER_DOMAIN, 3, 32, 32, generator=g)
    y = torch.arange(PER_DOMAIN) % NUM_CLASSES
    if copies:
        xs = [base] * DOMAINS
    else:
        xs = [torch.randn(PER_DOMAIN, 3, 32, 32, generator=g) + d * shift for d in range(DOMAINS)]
    domain = torch.arange(DOMAINS).repeat_interleave(PER_DOMAIN)
    batch = Batch(source=(torch.cat(xs), y.repeat(DOMAINS)), source_domain=domain)
    if target:
        batch.target = (torch.randn(PER_DOMAIN, 3, 32, 32, generator=g) - 2.0, None)
    return batch


def _ctx(params: dict, extra=None, step: int = 5, total: int = 10, domains=DOMAINS) -> StepContext:
    return StepContext(
        params=params,
        epoch=0,
        epochs=1,
        step=step,
        total_steps=total,
        num_classes=NUM_CLASSES,
        extra=extra,
        num_source_domains=domains,
    )


def _space(strategy) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    return strategy.search_space(trial)


def _step(name: str, batch: Batch, params: dict | None = None, model=None, eval_mode=False):
    strategy = dg.STRATEGIES[name]()
    model = model or _model()
    params = {**_space(strategy), **(params or {})}
    domains = DOMAINS if batch.source_domain is not None else 1
    extra = run_setup(strategy, model, NUM_CLASSES, params, model.feature_dim, domains)
    model.eval() if eval_mode else model.train()
    return (
        strategy,
        model,
        strategy.training_step(model, batch, _ctx(params, extra, domains=domains)),
    )


@pytest.mark.parametrize("name", sorted(dg.STRATEGIES))
def test_each_strategy_trains_on_three_domains(name: str) -> None:
    strategy, model, loss = _step(name, _batch(target=name == "m3sda"))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    space = _space(strategy)
    assert all(k.startswith("strategy.") for k in space), space
    uses_target = name == "m3sda"
    assert strategy.uses_target is uses_target
    assert strategy.target_images == ("train" if uses_target else "none")
    assert strategy.mixed_labels is (name in ("erm", "swa"))
    assert strategy.weight_average == ("swa" if name == "swa" else None)


@pytest.mark.parametrize("name", sorted(dg.STRATEGIES))
def test_each_strategy_applies_the_trials_label_smoothing(name: str) -> None:
    losses = []
    for smoothing in (0.0, 0.3):
        strategy, model = dg.STRATEGIES[name](), _model()
        params = _space(strategy)
        extra = run_setup(strategy, model, NUM_CLASSES, params, model.feature_dim, DOMAINS)
        context = dataclasses.replace(_ctx(params, extra), label_smoothing=smoothing)
        torch.manual_seed(1)
        batch = _batch(target=name == "m3sda")
        losses.append(strategy.training_step(model.train(), batch, context).detach())
    assert not torch.equal(*losses)


@pytest.mark.parametrize("name", sorted(set(dg.STRATEGIES) - {"m3sda"}))
def test_each_dg_strategy_reads_a_single_source_as_one_domain(name: str) -> None:
    batch = _batch()
    batch.source_domain = None
    _, _, loss = _step(name, batch)
    assert torch.isfinite(loss) and loss.requires_grad


@pytest.mark.parametrize("name", ["coral-dg", "mmd-dg", "vrex", "groupdro"])
def test_penalties_vanish_between_identical_domains(name: str) -> None:
    """Identical domains (eval mode: per-image features): the loss is ERM's; different domains:
    the penalties add to it."""
    params = {"strategy.weight": 10.0, "strategy.anneal": 0.0, "strategy.eta": 0.05}
    same, differ = _batch(copies=True), _batch(shift=3.0)
    _, _, erm_same = _step("erm", same, eval_mode=True)
    _, _, loss_same = _step(name, same, params, eval_mode=True)
    assert loss_same.item() == pytest.approx(erm_same.item(), abs=1e-4)
    if name == "groupdro":
        return  # a weighting, not a penalty: equal risks give ERM (its weights: below)
    _, _, erm_differ = _step("erm", differ, eval_mode=True)
    _, _, loss_differ = _step(name, differ, params, eval_mode=True)
    assert loss_differ.item() > erm_differ.item() + 1e-5


def test_dann_dg_is_erm_for_one_domain_and_adversarial_for_several() -> None:
    params = {"strategy.weight": 1.0, "strategy.schedule": "constant"}
    one = _batch()
    one.source_domain = None
    _, _, erm = _step("erm", one, eval_mode=True)
    _, _, dann_one = _step("dann-dg", one, params, eval_mode=True)
    assert dann_one.item() == pytest.approx(erm.item(), abs=1e-5)
    _, _, dann_three = _step("dann-dg", _batch(), params, eval_mode=True)
    assert dann_three.item() > erm.item() + 0.1  # plus a 3-way domain cross-entropy


def test_coral_distance_is_zero_for_equal_statistics_only() -> None:
    f = torch.randn(20, 5)
    assert mean_cov_distance(f, f[torch.randperm(20)]).item() == pytest.approx(0.0, abs=1e-6)
    assert mean_cov_distance(f, f + 1.0).item() == pytest.approx(1.0, abs=1e-5)  # means only
    assert mean_cov_distance(f, 2.0 * f).item() > 0.01
    assert pairwise_mean([f], mean_cov_distance).item() == 0.0


def test_vrex_is_the_mean_risk_plus_weighted_variance() -> None:
    """Per-domain risks from a stub model: V-REx = mean + weight * variance after annealing,
    mean + variance before."""

    class Logits(nn.Module):  # the images are the logits
        def forward(self, x):
            return x

    y = torch.zeros(6, dtype=torch.long)
    x = torch.zeros(6, NUM_CLASSES)
    x[3:, 1] = 3.0  # domain 1 confidently wrong
    batch = Batch(source=(x, y), source_domain=torch.tensor([0, 0, 0, 1, 1, 1]))
    risks = torch.stack([F.cross_entropy(x[:3], y[:3]), F.cross_entropy(x[3:], y[3:])])
    mean, var = risks.mean(), (risks - risks.mean()).pow(2).mean()
    vrex = dg.VREx()
    params = {"strategy.weight": 100.0, "strategy.anneal": 0.5}
    late = vrex.training_step(Logits(), batch, _ctx(params, step=6))
    early = vrex.training_step(Logits(), batch, _ctx(params, step=2))
    assert late.item() == pytest.approx((mean + 100.0 * var).item(), rel=1e-5)
    assert early.item() == pytest.approx((mean + var).item(), rel=1e-5)


def test_irm_penalty_is_zero_at_a_stationary_scale_and_positive_when_wrong() -> None:
    y = torch.arange(8) % NUM_CLASSES
    zero = torch.zeros(8, NUM_CLASSES, requires_grad=True)
    assert irm_penalty(zero, y, F.cross_entropy).item() == pytest.approx(0.0, abs=1e-8)
    wrong = (3.0 * F.one_hot((y + 1) % NUM_CLASSES, NUM_CLASSES).float()).requires_grad_()
    penalty = irm_penalty(wrong, y, F.cross_entropy)
    assert penalty.item() > 0.1
    (grad,) = torch.autograd.grad(penalty, wrong)
    assert grad.abs().sum() > 0  # the penalty trains the logits
    assert irm_penalty(wrong[:1], y[:1], F.cross_entropy).item() == 0.0


def test_groupdro_weights_move_to_the_worst_domain() -> None:
    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.scale

    y = torch.zeros(9, dtype=torch.long)
    x = torch.zeros(9, NUM_CLASSES)
    x[:3, 0] = 2.0  # domain 0 right, domain 1 unsure, domain 2 wrong
    x[6:, 2] = 2.0
    batch = Batch(source=(x, y), source_domain=torch.arange(3).repeat_interleave(3))
    strategy = dg.GroupDRO()
    params = {"strategy.eta": 0.1}
    extra = strategy.setup(None, NUM_CLASSES, params, None)
    weights = []
    for step in range(5):
        loss = strategy.training_step(Logits(), batch, _ctx(params, extra, step=step))
        weights.append(extra.q.clone())
    assert torch.isfinite(loss)
    assert weights[-1].sum().item() == pytest.approx(1.0)
    assert weights[-1].argmax().item() == 2 and weights[-1][2] > weights[0][2] > 1 / 3
    assert weights[-1][0] < weights[0][0] < 1 / 3


def test_mixstyle_changes_training_features_and_not_evaluation() -> None:
    strategy = dg.MixStyle()
    model = _model()
    params = {"strategy.p": 1.0, "strategy.alpha": 0.3}
    assert run_setup(strategy, model, NUM_CLASSES, params, model.feature_dim) is None
    assert [name for name, _ in dg.stage_modules(model)] == ["layer1", "layer2", "layer3"]
    seen = []
    model.head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    batch = _batch()
    x = batch.source[0]
    for mode in (True, False):
        model.train(mode)
        seen.clear()
        torch.manual_seed(1)
        strategy.training_step(model, batch, _ctx(params))
        with torch.no_grad():
            plain = model.features(x)
        if mode:
            assert not torch.allclose(seen[0], plain, atol=1e-4)
        else:
            assert torch.equal(seen[0], plain)
    # the hooks are idle outside training steps, in training mode too
    model.train()
    with torch.no_grad():
        assert torch.equal(model.features(x), model.features(x))


def test_mixstyle_leaves_no_hook_so_the_next_trial_reuses_its_backbone(tmp_path, monkeypatch):
    """Trials share one backbone module (harness.training.reset): each trial's MixStyle mixes
    once per stage in its training steps, and leaves the module as the reset needs it."""
    from safetensors.torch import save_file

    from harness.training.reset import BackboneReset

    path = str(tmp_path / "w.safetensors")
    save_file(tiny_backbone("test_resnet").module.state_dict(), path)
    factory = reference("backbone", "test_resnet").factory
    reset = BackboneReset(lambda: factory("test_resnet", weights=path))
    calls = []
    mix = dg._Mixer.__call__
    monkeypatch.setattr(dg._Mixer, "__call__", lambda *a: calls.append(a[1]) or mix(*a))
    params = {"strategy.p": 1.0, "strategy.alpha": 0.3}
    backbones = []
    for _ in range(3):  # a fresh strategy per trial, as the search makes them
        bb = reset()
        backbones.append(bb)
        model = TransferModel(bb, nn.Linear(bb.num_features, NUM_CLASSES)).train()
        strategy = dg.MixStyle()
        for _ in range(2):  # a second setup of the same strategy adds no second set of hooks
            run_setup(strategy, model, NUM_CLASSES, params, model.feature_dim, DOMAINS)
        stages = [m for _, m in dg.stage_modules(model)]
        for _ in range(2):
            calls.clear()
            strategy.training_step(model, _batch(), _ctx(params))
            assert calls == stages  # one hook per stage: none of an earlier trial's
        calls.clear()
        model(_batch().source[0])  # outside a step, in training mode too: no hook left
        assert calls == []
    assert backbones[1] is backbones[0] and backbones[2] is backbones[0]
    assert reset.refused is None and reset.reuses == 2


def test_mixstyle_refuses_a_backbone_without_feature_maps() -> None:
    bb = tiny_backbone("test_vit")
    model = TransferModel(bb, nn.Linear(bb.num_features, NUM_CLASSES))
    strategy = dg.MixStyle()
    params = {"strategy.p": 1.0, "strategy.alpha": 0.1}
    run_setup(strategy, model, NUM_CLASSES, params, model.feature_dim)
    with pytest.raises(PluginContractError, match=r"mixstyle mixes \(B, C, H, W\) feature maps"):
        strategy.training_step(model.train(), _batch(), _ctx(params))
    model.eval()
    with torch.no_grad():  # outside training steps the hooks are idle
        assert model(_batch().source[0]).shape == (DOMAINS * PER_DOMAIN, NUM_CLASSES)


def test_mixstyle_keeps_content_and_takes_its_partners_style() -> None:
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    partner = torch.tensor([1, 0, 3, 2])
    assert torch.allclose(mixstyle(x, partner, torch.ones(4)), x, atol=1e-4)
    styled = mixstyle(x, partner, torch.zeros(4))
    assert torch.allclose(styled.mean((2, 3)), x.mean((2, 3))[partner], atol=1e-4)
    assert torch.allclose(styled.std((2, 3)), x.std((2, 3))[partner], atol=1e-3)
    one_by_one = torch.randn(4, 3, 1, 1)
    assert torch.equal(mixstyle(one_by_one, partner, torch.zeros(4)), one_by_one)


def test_mix_partners_come_from_another_domain() -> None:
    domain = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    for _ in range(5):
        partner = mix_partners(domain)
        assert (domain[partner] != domain).all()
    one = torch.zeros(5, dtype=torch.long)
    assert (mix_partners(one) != torch.arange(5)).all()  # another image of the one domain


def test_moment_matching_between_sources_and_target() -> None:
    f = torch.randn(12, 4)
    assert multi_source_moments([f, f[torch.randperm(12)]], f).item() == pytest.approx(0, abs=1e-4)
    assert multi_source_moments([f, f + 1.0], f).item() > 0.5
    groups = by_domain(torch.tensor([1, 0, 1, 2]), 4, torch.arange(4))
    assert [(d, rows.tolist()) for d, rows in groups] == [(0, [1]), (1, [0, 2]), (2, [3])]


def _noisy_domain(name: str, n: int, shift: int, seed: int) -> DomainData:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 120, (n, 3, 16, 16), generator=g) + shift).to(torch.uint8)
    y = torch.arange(n) % 3
    return DomainData.from_arrays(name, x, y, class_names=["0", "1", "2"], seed=seed)


@pytest.mark.parametrize("name", sorted(dg.STRATEGIES))
def test_each_strategy_trains_in_the_engine_on_pooled_sources(name: str) -> None:
    """Two epochs of the real engine over three pooled source domains (the domain index and
    count as the engine hands them); GroupDRO ends with unequal weights over the 3 domains."""
    parts = [_noisy_domain(d, 30, 40 * i, i) for i, d in enumerate("abc")]
    strategy = dg.STRATEGIES[name]()
    params = {"head.lr": 1e-2, "backbone.lr": 1e-3, **_space(strategy)}
    trainer = Trainer(
        engine_model(),
        strategy,
        pool_domains("a+b+c", parts),
        _noisy_domain("t", 30, 100, 9),
        engine_config(epochs=2, batch_size=12, params=params),
    )
    result = trainer.fit()
    assert len(result.train_loss) == 2 and all(map(math.isfinite, result.train_loss))
    if name == "groupdro":
        q = trainer.extra.q
        assert q.shape == (3,) and q.sum().item() == pytest.approx(1.0)
        assert q.max() - q.min() > 1e-4


@parametrize_with_checks(_registry(), "dg")
def test_dg_plugin_passes_the_contract_kit(check) -> None:
    check()


def test_erm_takes_soft_labels() -> None:
    """``mixed_labels``: erm's loss goes through ``ctx.supervised_loss``, soft targets included."""
    batch = _batch()
    x, y = batch.source
    soft = F.one_hot(y, NUM_CLASSES).float() * 0.8 + 0.05
    batch.source = (x, soft)
    _, model, loss = _step("erm", batch, eval_mode=True)
    with torch.no_grad():
        expected = -(soft * F.log_softmax(model(x), 1)).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_a_multi_source_dg_study_runs_end_to_end(tmp_path) -> None:
    from test_multi_source import study
    from test_search import make_runner

    from harness.publish import leaderboard
    from harness.study import load_study

    spec = load_study(str(study(tmp_path, strategies=("erm", "groupdro"), name="dg-e2e")))
    runner = make_runner(tmp_path, spec)
    runner.run()
    board, _, prov = leaderboard.collect(spec, runner.storage_url)
    assert (board["status"] == "final").all(), board[["method", "status"]]
    assert set(board["pair"]) == {"digits+m2->digits-m"}
    assert board["test_accuracy"].notna().all()
    assert set(prov["target_images"].values()) == {"none"}


@pytest.mark.parametrize("name", dg.BOTH_TASKS)
def test_erm_and_swa_serve_segmentation(name: str) -> None:
    results = check_strategy(_registry().get("strategy", name), task="segmentation")
    assert_passes(results)
