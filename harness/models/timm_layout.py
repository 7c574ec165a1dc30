"""timm's own layout of a kept classifier (a timm backbone with the built-in ``linear`` head):
``config.json`` as timm's hub models carry it and the state dict under timm's key names, the
linear head's weight and bias renamed to the timm model's classifier. Then
``timm.create_model("local-dir:<folder>/timm", pretrained=True)`` (or ``create_model(name,
pretrained=True, num_classes=K, pretrained_cfg_overlay={"file": ..., "num_classes": K})``) gives the
logits of the harness's model without the harness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

#: the built-in plugins (entry-point names, distribution) whose models have timm's layout
HARNESS_DIST = "transfer-harness"
TIMM_PLUGIN = ("timm", HARNESS_DIST)
LINEAR_HEAD = ("heads", HARNESS_DIST, "linear")
#: fields of a timm model's ``pretrained_cfg`` carried into the layout's config (JSON-able ones)
_CFG_FIELDS = (
    "architecture", "tag", "interpolation", "crop_mode", "pool_size", "first_conv",
    "classifier", "fixed_input_size", "license",
)  # fmt: skip


def timm_info(
    model: nn.Module, backbone: tuple[str, str], head: tuple[str, str, str]
) -> dict[str, Any] | None:
    """What the layout needs from a trained ``TransferModel`` (the timm model's name, classifier
    and pretrained_cfg, the head's linear layer), or None where the layout does not apply: not a
    timm backbone, not the built-in linear head, or a model whose classifier timm does not name.
    ``backbone`` is (plugin, distribution), ``head`` (plugin, distribution, name)."""
    if tuple(head) != LINEAR_HEAD or tuple(backbone) != TIMM_PLUGIN:
        return None
    module = getattr(model, "backbone", None)
    cfg = dict(getattr(module, "pretrained_cfg", None) or {})
    classifier = cfg.get("classifier")
    linears = [n for n, m in model.head.named_modules() if isinstance(m, nn.Linear)]
    if not isinstance(classifier, str) or len(linears) != 1:
        return None
    architecture = cfg.get("architecture")
    if not architecture:
        return None
    return {
        "architecture": architecture,
        "classifier": classifier,
        "head_linear": f"head.{linears[0]}",
        "num_features": int(getattr(module, "num_features", 0)),
        "pretrained_cfg": {k: cfg[k] for k in _CFG_FIELDS if _jsonable(cfg.get(k))},
    }


def _jsonable(v: Any) -> bool:
    return v is not None and isinstance(v, (str, int, float, bool, list, tuple))


def timm_state(state: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The harness's state dict under timm's key names: ``backbone.*`` without the prefix, the
    head's linear layer as the timm model's classifier."""
    out = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    linear, classifier = info["head_linear"], info["classifier"]
    for part in ("weight", "bias"):
        if f"{linear}.{part}" in state:
            out[f"{classifier}.{part}"] = state[f"{linear}.{part}"]
    return out


def timm_config(card: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """timm's ``config.json`` of the kept model: its architecture, classes and the harness's
    preprocessing (mean, std, input size, the crop share of the stored size)."""
    pre = card["preprocessing"]
    size = int(pre["image_size"])
    stored = pre["stored_size"]
    stored_side = stored if isinstance(stored, int) else min(stored)
    names = [str(n) for n in card["class_names"]]
    cfg = {
        **info.get("pretrained_cfg", {}),
        "architecture": info["architecture"],
        "input_size": [3, size, size],
        "crop_pct": size / stored_side,
        "crop_mode": "center",
        # the harness resizes files bilinearly when it decodes them (harness.api.images)
        "interpolation": "bilinear",
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "num_classes": len(names),
        "classifier": info["classifier"],
        "label_names": names,
    }
    return {
        "architecture": info["architecture"],
        "num_classes": len(names),
        "num_features": info["num_features"],
        "pretrained_cfg": cfg,
        "label_names": names,
    }


def timm_files(weights: Path, card: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict (timm's names) and ``config.json`` of timm's layout for the harness
    weights at ``weights``."""
    from safetensors.torch import load_file

    info = card["timm"]
    return timm_state(load_file(str(weights)), info), timm_config(card, info)
