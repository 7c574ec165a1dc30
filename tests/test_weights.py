from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness.training.engine
from harness.api import DomainData
from harness.errors import PluginContractError, WeightsError
from harness.registry import get_registry
from harness.training.engine import Precision
from harness.training.weights import SourceRecipe, source_pretrained
from harness_plugins.timm_backbones import build_timm_backbone


def _state(name="test_resnet"):
    torch.manual_seed(3)
    return build_timm_backbone(name, weights="none").module.state_dict()


def test_local_safetensors_and_torch_checkpoint_load(tmp_path):
    state = _state()
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pth)
    for path in (st, pth):
        bb = build_timm_backbone("test_resnet", weights=str(path))
        for k, v in bb.module.state_dict().items():
            assert torch.equal(v, state[k]), (path, k)


def test_checkpoint_with_classifier_keys_loads_into_backbone(tmp_path):
    import timm

    full = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    bb = build_timm_backbone("test_resnet", weights=str(path))
    assert torch.equal(bb.module.conv1[0].weight, full.conv1[0].weight)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in _state("test_vit").items()}, str(path))
    with pytest.raises(WeightsError, match="does not fit backbone 'test_resnet'"):
        build_timm_backbone("test_resnet", weights=str(path))
    with pytest.raises(WeightsError, match="not found"):
        build_timm_backbone("test_resnet", weights=str(tmp_path / "missing.safetensors"))


def test_imagenet_weights_offline_say_how_to_supply_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        build_timm_backbone("test_resnet", weights="imagenet")
    assert "weights = '/path/to/" in err.value.hint and "safetensors" in err.value.hint


def _digits(n=120):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return DomainData.from_arrays("src", x, y, class_names=["a", "b", "c"], seed=0)


def test_source_pretraining_is_cached_as_safetensors(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    entry = get_registry().get("backbone", "test_resnet")
    calls = []
    real_fit = harness.training.engine.Trainer.fit
    monkeypatch.setattr(
        harness.training.engine.Trainer,
        "fit",
        lambda self, *a, **k: calls.append(1) or real_fit(self, *a, **k),
    )
    recipe = SourceRecipe(
        epochs=1, lr=1e-3, weight_decay=0.0, augment="none", batch_size=32, seed=0
    )
    cpu = torch.device("cpu")
    src = _digits()
    p1 = source_pretrained(entry, "test_resnet", src, recipe, cpu, Precision.for_device(cpu))
    p2 = source_pretrained(entry, "test_resnet", src, recipe, cpu, Precision.for_device(cpu))
    assert p1 == p2 and p1.suffix == ".safetensors" and len(calls) == 1
    state = load_file(str(p1))
    assert "conv1.0.weight" in state
    # a different recipe or different data means different weights
    p3 = source_pretrained(
        entry,
        "test_resnet",
        src,
        SourceRecipe(2, 1e-3, 0.0, "none", 32, 0),
        cpu,
        Precision.for_device(cpu),
    )
    assert p3 != p1 and len(calls) == 2
    bb = build_timm_backbone("test_resnet", weights=str(p1))
    assert torch.equal(bb.module.conv1[0].weight, state["conv1.0.weight"])


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    import timm

    one_channel = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    path = tmp_path / "gray.safetensors"
    save_file({k: v.contiguous() for k, v in one_channel.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="size mismatch"):
        build_timm_backbone("test_resnet", weights=str(path))


def test_reused_weights_are_read_once_per_file_version_and_models_do_not_share_them(tmp_path):
    import os

    from harness import api

    state = _state()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    first = api.load_weights_file(path, reuse=True)
    assert api.load_weights_file(path, reuse=True) is first  # read and parsed once
    assert api.load_weights_file(path) is not first  # without reuse: a fresh read
    # two models built from it own their tensors: training one leaves the file's copy as it was
    a = build_timm_backbone("test_resnet", weights=str(path)).module
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    b = build_timm_backbone("test_resnet", weights=str(path)).module
    for k, v in b.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the file rewritten (as source pretraining replaces it): the new contents are read
    changed = {k: (v + 1 if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(changed, str(path))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = api.load_weights_file(path, reuse=True)
    assert again is not first
    assert all(torch.equal(again[k], changed[k]) for k in changed)


def test_the_segmentation_pretraining_decoder_is_declared_by_its_plugin():
    from harness.registry import Registry
    from harness.training.weights import source_pretraining_head

    assert source_pretraining_head(get_registry(), "classification") is None
    assert source_pretraining_head(get_registry(), "segmentation").name == "fpn"
    with pytest.raises(PluginContractError, match="source_pretraining=True; found none"):
        source_pretraining_head(Registry(), "segmentation")
