"""Segmentation heads: segmentation-models-pytorch decoders over the backbone plugin's timm model.

The decoder reads multi-scale features from the *same* module objects as the backbone, so freeze
depth, pretrained weights (none / imagenet / local file / source) and learning rates mean exactly
what they mean for classification.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor, nn

from harness import hookimpl
from harness.api import Backbone, Option, PluginContractError

#: harness name -> smp architecture name
ARCHITECTURES = {
    "unet": "unet",
    "unetplusplus": "unetplusplus",
    "fpn": "fpn",
    "deeplabv3plus": "deeplabv3plus",
    "linknet": "linknet",
    "manet": "manet",
    "pan": "pan",
    "pspnet": "pspnet",
    "upernet": "upernet",
}
#: the decoder that pretrains a backbone on a segmentation source (``source_pretraining`` meta)
SOURCE_PRETRAINING_DECODER = "fpn"
#: smp model arguments the head sets itself: never a study's option
SET_BY_HEAD = frozenset({"encoder_name", "encoder_weights", "classes"})


@hookimpl
def register_heads(register):
    for name, arch in ARCHITECTURES.items():
        register(
            name,
            _factory(arch),
            description=f"segmentation-models-pytorch {arch} decoder over the backbone's stages",
            tasks=("segmentation",),
            # PAN pools its deepest map further: below 128 px there is nothing left to pool
            min_image_size=128 if arch == "pan" else 32,
            options=functools.partial(smp_options, arch),
            # the decoder that weights = "source" pretrains a backbone with on segmentation
            **({"source_pretraining": True} if name == SOURCE_PRETRAINING_DECODER else {}),
        )


@functools.cache
def smp_options(arch: str) -> dict[str, Option]:
    """The options of an smp architecture, from its model's signature (smp's own defaults):
    typed from each default, ``*_dropout`` a probability, counts and depths at least 1, the output
    stride 8 or 16; a string or ``None`` default accepts any value (smp reads several forms)."""
    import segmentation_models_pytorch as smp

    sig = inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[arch])
    return {
        p.name: _option(p.name, p.default)
        for p in sig.parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in SET_BY_HEAD
    }


def _option(name: str, default: Any) -> Option:
    text = f"segmentation-models-pytorch's {name} (default {default!r})"
    if name == "encoder_output_stride":
        return Option(int, choices=(8, 16), default=default, help=text)
    if name.endswith("dropout"):
        return Option(float, min=0, max=1, default=default, help=text)
    if isinstance(default, bool):
        return Option(bool, default=default, help=text)
    if isinstance(default, int):
        return Option(int, min=1, default=default, help=text)
    if isinstance(default, tuple):
        return Option(list, default=default, help=text)
    return Option(None, default=default, help=text)


def _factory(arch: str):
    def build(*, backbone: Backbone, num_classes: int, task: str, **options: Any) -> nn.Module:
        return SmpHead(arch, backbone, num_classes, **options)

    build.__name__ = f"build_{arch}"
    return build


class SmpHead(nn.Module):
    """An smp model whose timm encoder is replaced by a feature view of the harness backbone: a
    ``harness.api.ImageHead`` and ``FeatureMapHead``."""

    takes_images = True  # forward(x) gets images, not pooled features

    def __init__(self, arch: str, backbone: Backbone, num_classes: int, **options: Any) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp
        from timm.models._features import FeatureListNet

        model = backbone.module
        if not (
            hasattr(model, "feature_info") and hasattr(model, "pretrained_cfg") and backbone.name
        ):
            raise PluginContractError(
                f"head {arch!r} needs a timm backbone with multi-scale features; "
                f"{backbone.name or type(model).__name__!r} is not one",
            )
        try:
            net = smp.create_model(
                arch,
                encoder_name=f"tu-{backbone.name}",
                encoder_weights=None,
                classes=num_classes,
                **options,
            )
            out_indices = net.encoder.model.feature_info.out_indices
            # Shares the backbone's modules: what trains or freezes there trains or freezes here.
            features = _feature_view(FeatureListNet, model, out_indices)
            stride = getattr(net.encoder, "_output_stride", 32)
            if stride < 32:
                features = _Restride(features, stride)
            net.encoder.model = features
        except TypeError:
            raise
        except Exception as exc:  # noqa: BLE001 - smp and timm word their refusals in many ways
            raise PluginContractError(
                f"head {arch!r} cannot be built on backbone {backbone.name!r}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
            ) from None
        self.net = net
        self.arch = arch

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @property
    def deepest_channels(self) -> int:
        """Channels of the deepest feature map the decoder reads (``forward_with_features``)."""
        return int(self.net.encoder.out_channels[-1])

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-pixel logits and the deepest encoder feature map ``(B, C, h, w)`` of the same pass
        (the domain adaptation strategies align it). The map is caught on its way out of the
        encoder, so the decoder runs exactly as in ``forward``."""
        caught: list[Tensor] = []
        handle = self.net.encoder.register_forward_hook(lambda _m, _i, out: caught.append(out[-1]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, caught[-1]


def _feature_view(feature_cls: Any, model: nn.Module, out_indices: Any) -> nn.Module:
    # timm flattens nn.Sequential stages for some families (ConvNeXt, EfficientNet) and not for
    # others (ResNet); the one that finds every feature module is the right one.
    try:
        return feature_cls(model, out_indices=out_indices, flatten_sequential=False)
    except AssertionError:
        return feature_cls(model, out_indices=out_indices, flatten_sequential=True)


class _Restride(nn.Module):
    """Upsample the deepest features to the output stride a decoder expects (DeepLabV3+ and PAN
    want 1/16). smp gets there with dilated convolutions, which would change the backbone that
    classification uses; here the backbone stays as it is and its deepest maps are resized."""

    def __init__(self, features: nn.Module, stride: int) -> None:
        super().__init__()
        self.features = features
        self.stride = stride
        self.feature_info = features.feature_info
        self.factors = [max(1, r // stride) for r in features.feature_info.reduction()]

    def forward(self, x: Tensor) -> list[Tensor]:
        out = self.features(x)
        return [
            f
            if k == 1
            else nn.functional.interpolate(f, scale_factor=k, mode="bilinear", align_corners=False)
            for f, k in zip(out, self.factors, strict=True)
        ]
