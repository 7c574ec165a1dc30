from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.api import Backbone, stages_from_prefixes
from harness.errors import PluginContractError
from harness.metrics import segmentation_metrics
from harness.training.engine import TransferModel
from harness_plugins.smp_heads import ARCHITECTURES, SmpHead
from harness_plugins.timm_backbones import build_timm_backbone


def seg_model(arch: str, backbone: str = "test_resnet", classes: int = 5) -> TransferModel:
    bb = build_timm_backbone(backbone, weights="none")
    return TransferModel(bb, SmpHead(arch, bb, classes), "segmentation")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_decoder_on_a_tiny_backbone(arch):
    torch.manual_seed(0)
    size = 128 if arch == "pan" else 64  # PAN pools its deepest map further: it needs >= 128 px
    m = seg_model(arch)
    out = m(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5, size, size)
    out.mean().backward()
    # the decoder trains the backbone's own parameters: gradients reach them
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    backbone_ids = {id(p) for p in m.backbone.parameters()}
    assert m.head_parameters() and all(id(p) not in backbone_ids for p in m.head_parameters())


@pytest.mark.parametrize("backbone", ["test_convnext", "test_efficientnet"])
def test_decoders_on_other_backbone_families(backbone):
    for arch in ("unet", "fpn", "deeplabv3plus"):
        m = seg_model(arch, backbone)
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5, 64, 64)


def test_freeze_depth_and_weights_mean_the_same_as_for_classification(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    donor = build_timm_backbone("test_resnet", weights="none").module
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    bb = build_timm_backbone("test_resnet", weights=str(path))
    m = TransferModel(bb, SmpHead("unet", bb, 3), "segmentation")
    # the encoder inside the decoder holds the loaded weights (same tensors, not copies)
    enc = dict(m.head.net.encoder.named_parameters())
    stem = next(v for k, v in enc.items() if k.endswith("conv1.0.weight"))
    assert stem is bb.module.conv1[0].weight and torch.equal(stem, donor.conv1[0].weight)
    m.freeze(2)
    frozen = {n for s in bb.stages[:2] for n in s}
    for name, p in bb.module.named_parameters():
        assert p.requires_grad == (name not in frozen)
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    assert stem.grad is None


def test_backbones_without_multiscale_features_fail_clearly():
    with pytest.raises(PluginContractError, match="cannot be built on backbone 'test_vit'"):
        SmpHead("unet", build_timm_backbone("test_vit"), 3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    plain = Backbone(
        module=net, num_features=8, stages=stages_from_prefixes(net, ["0"]), name="plain"
    )
    with pytest.raises(PluginContractError, match="needs a timm backbone"):
        SmpHead("fpn", plain, 3)


def test_segmentation_metrics_known_answers():
    y = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    p = torch.tensor([[[0, 1, 1, 1], [2, 0, 1, 0]]])
    m = segmentation_metrics(p, y, 4)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2; class 3 absent
    assert m["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["per_class_iou"][3] != m["per_class_iou"][3]  # NaN: absent from prediction and truth
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)  # void pixels ignored
