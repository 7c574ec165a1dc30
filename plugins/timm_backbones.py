"""Backbones: any timm model by name, with weights none / imagenet / a local file."""

from __future__ import annotations

from pathlib import Path

from harness import hookimpl
from harness.api import Backbone, WeightsError, load_weights_file

# Trailing groups of timm's group_matcher (final norms) get ids like 99999: they belong to the last stage.
_TRAILING_GROUP = 90000


@hookimpl
def register_backbones(register):
    import timm

    for name in timm.list_models():
        register(name, build_timm_backbone, description="timm model", source="timm")


def build_timm_backbone(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:
    import timm

    weights = str(weights)
    if weights == "none":
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    elif weights == "imagenet":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_chans)
        except Exception as exc:  # noqa: BLE001 - hub, network and missing-tag failures alike
            raise WeightsError(
                f"could not get pretrained weights for {name!r} through timm: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                hint=(
                    "on a machine without the model hub, save the weights once where it is "
                    "reachable (timm.create_model(name, pretrained=True) then "
                    "safetensors.torch.save_file(model.state_dict(), 'w.safetensors')) and set "
                    "weights = '/path/to/w.safetensors' in the study"
                ),
            ) from None
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
        _load_local(model, Path(weights).expanduser(), name)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return Backbone(
        module=model,
        num_features=int(model.num_features),
        stages=timm_stages(model),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        feature_info=[dict(f) for f in getattr(model, "feature_info", [])],
        name=name,
    )


def timm_stages(model) -> list[list[str]]:
    """Parameter names per stage, stem first, from timm's coarse ``group_matcher``."""
    from timm.models import group_parameters

    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        groups = {}
        for i, (child, module) in enumerate(model.named_children()):
            names = [f"{child}.{n}" for n, _ in module.named_parameters()]
            if names:
                groups[i] = names
    ordered = [groups[k] for k in sorted(groups) if k < _TRAILING_GROUP]
    trailing = [n for k in sorted(groups) if k >= _TRAILING_GROUP for n in groups[k]]
    if trailing:
        if ordered:
            ordered[-1] = ordered[-1] + trailing
        else:
            ordered = [trailing]
    return [list(g) for g in ordered if g]


def _load_local(model, path: Path, name: str) -> None:
    state = load_weights_file(path, reuse=True)  # a search builds every trial from the same file
    classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or ()
    if isinstance(classifier, str):
        classifier = (classifier,)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifier)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        first = next(
            (line.strip() for line in str(exc).splitlines() if "size mismatch" in line),
            str(exc)[:200],
        )
        raise WeightsError(
            f"weights file {path} does not fit backbone {name!r}: {first}",
            hint="the file must hold the state dict of the same timm architecture and input channels",
        ) from None
    if result.missing_keys or result.unexpected_keys:
        detail = []
        if result.missing_keys:
            detail.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            detail.append(
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})"
            )
        raise WeightsError(
            f"weights file {path} does not fit backbone {name!r}: {', '.join(detail)} keys",
            hint="the file must hold the state dict of the same timm architecture",
        )
