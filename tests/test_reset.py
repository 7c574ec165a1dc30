"""Model reset (harness.training.reset): trials share one backbone module, reset in place to its weights,
and get exactly what building it afresh would give them."""

from __future__ import annotations

import random

import numpy as np
import optuna
import pytest
import torch
from conftest import write_study
from safetensors.torch import save_file
from test_search import make_runner

import harness.training.engine
import harness.training.features as feat
from harness.errors import StudySpecError
from harness.search import ModelFactory
from harness.study import load_study
from harness.training.engine import seed_everything
from harness.training.reset import BackboneReset
from harness_plugins.timm_backbones import build_timm_backbone


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("reset") / "w.safetensors"
    torch.manual_seed(123)
    save_file(build_timm_backbone("test_resnet", weights="none").module.state_dict(), str(path))
    return str(path)


def _state(backbone):
    return {k: v.clone() for k, v in backbone.module.state_dict().items()}


def _train_a_little(backbone):
    """What a trial does to its backbone: frozen stem, BN in eval, an optimizer step, stats moved."""
    m = backbone.module
    for p in m.conv1.parameters():
        p.requires_grad_(False)
    m.bn1.eval()
    out = m(torch.rand(4, 3, 16, 16)).sum()
    out.backward()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)


def test_a_reset_backbone_is_the_same_module_with_exactly_the_weights_and_flags_of_a_fresh_build(
    weights,
):
    reset = BackboneReset(lambda: build_timm_backbone("test_resnet", weights=weights))
    first = reset()
    assert reset.refused is None
    fresh = build_timm_backbone("test_resnet", weights=weights)
    _train_a_little(first)
    assert any(not torch.equal(v, fresh.module.state_dict()[k]) for k, v in _state(first).items())
    again = reset()
    assert again is first and reset.reuses == 1
    assert all(torch.equal(v, fresh.module.state_dict()[k]) for k, v in _state(again).items())
    assert all(p.requires_grad and p.grad is None for p in again.module.parameters())
    assert all(m.training for m in again.module.modules())


def test_building_the_template_leaves_the_callers_generators_alone(weights):
    seed_everything(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    seed_everything(7)
    BackboneReset(lambda: build_timm_backbone("test_resnet", weights=weights))()
    assert (
        torch.equal(torch.rand(3), expected[0])
        and random.random() == expected[1]
        and np.random.rand() == expected[2]
    )


def test_a_backbone_whose_weights_depend_on_the_seed_is_built_for_every_call():
    reset = BackboneReset(lambda: build_timm_backbone("test_resnet", weights="none"))
    torch.manual_seed(1)
    a = reset()
    assert reset.refused and "seed" in reset.refused
    torch.manual_seed(1)
    b = reset()
    assert a is not b and reset.reuses == 0
    # each build follows the caller's seed, as without reuse
    assert all(torch.equal(v, b.module.state_dict()[k]) for k, v in _state(a).items())


@pytest.mark.parametrize(
    "change",
    [
        "hook",
        "attribute",
        "new attribute",
        "tensor attribute",
        "equal 0-d tensor",
        "array attribute",
        "stride",
        "module",
        "dtype",
    ],
)
def test_a_trial_that_changed_more_than_values_gets_a_fresh_build(weights, change):
    reset = BackboneReset(lambda: build_timm_backbone("test_resnet", weights=weights))
    first = reset()
    fresh = _state(build_timm_backbone("test_resnet", weights=weights))
    if change == "hook":
        first.module.layer1.register_forward_hook(lambda *a: None)
    elif change == "attribute":
        first.module.bn1.momentum = None
    elif change == "new attribute":
        first.module.layer1.scale = 2.0
    elif change == "tensor attribute":
        first.module.bn1.eps = torch.full((4,), 1e-3)
    elif change == "equal 0-d tensor":
        first.module.bn1.eps = torch.tensor(first.module.bn1.eps)
    elif change == "array attribute":
        first.module.bn1.eps = np.full(4, 1e-3)
    elif change == "stride":
        conv = next(m for m in first.module.modules() if isinstance(m, torch.nn.Conv2d))
        conv.stride = tuple(s + 1 for s in conv.stride)
    elif change == "dtype":
        first.module.layer1.to(torch.float64)
    else:
        first.module.act1 = torch.nn.Identity()
    again = reset()
    assert again is not first and "changed" in reset.refused
    assert all(torch.equal(v, fresh[k]) for k, v in _state(again).items())
    assert reset() is not again  # and from then on, a build every time


def test_the_feature_cache_hashes_reset_weights_once(weights, monkeypatch):
    reset = BackboneReset(lambda: build_timm_backbone("test_resnet", weights=weights))
    module = reset().module
    hashed = []
    real = feat._hash_tensor
    monkeypatch.setattr(feat, "_hash_tensor", lambda h, t: (hashed.append(1), real(h, t)))
    digest = feat.state_hash(module)
    assert hashed and digest == feat.state_hash(
        build_timm_backbone("test_resnet", weights=weights).module
    )
    hashed.clear()
    _train_a_little(reset())
    assert feat.state_hash(module) != digest  # trained weights are hashed for what they are
    hashed.clear()
    assert feat.state_hash(reset().module) == digest and not hashed  # reset: known without hashing


def _trial_values(runner):
    runner.preflight()
    out = []
    for rm in runner.methods:
        study = runner.search(0, rm)
        runner.final_runs(0, rm, study)
        out.append([(t.state.name, t.value) for t in study.get_trials()])
        out.append(
            sorted(
                (k, v["test"]["accuracy"])
                for k, v in study.user_attrs.items()
                if k.startswith("final:")
            )
        )
    return out


def test_a_search_with_reset_backbones_gives_what_building_every_one_gives(
    tmp_path, monkeypatch, weights
):
    """Every trial and final run of a study, with one backbone reset in place, scores exactly what
    it scores when each builds its backbone afresh (leaving the generators alone, as a reset does)."""
    (tmp_path / "benchmarks").mkdir()
    spec = load_study(str(write_study(tmp_path / "benchmarks", trials=3, weights=weights)))
    runner = make_runner(tmp_path / "reused", spec)
    reused = _trial_values(runner)
    (reset,) = runner.models.resets.values()
    assert reset.refused is None and reset.reuses >= 3 * 3 + 3 * 2

    class Fresh(BackboneReset):
        def __call__(self):
            with harness.training.engine.generators_kept():
                return self._build()

    built = make_runner(tmp_path / "built", spec, models=lambda ctx: ModelFactory(ctx, reset=Fresh))
    assert _trial_values(built) == reused


def test_reuse_backbone_false_builds_every_backbone_and_is_recorded(tmp_path, weights):
    (tmp_path / "benchmarks").mkdir()
    path = write_study(
        tmp_path / "benchmarks", trials=1, weights=weights, extra_top="reuse_backbone = false"
    )
    spec = load_study(str(path))
    runner = make_runner(tmp_path, spec)
    study = runner.search(0, runner.methods[1])
    assert not runner.models.resets
    assert study.user_attrs["config"]["reuse_backbone"] is False
    # resuming the study with the other setting is refused: its trials were made the other way
    again = make_runner(tmp_path, load_study(str(path), overrides={"reuse_backbone": True}))
    with pytest.raises(StudySpecError, match="reuse_backbone changed"):
        again.search(0, again.methods[1])
    assert len(optuna.load_study(study_name=study.study_name, storage=runner.storage).trials) == 1
