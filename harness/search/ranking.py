"""What ``harness rank`` scores: each distinct backbone (with its weights) of a study's methods on
each pair's labelled source training images, before any fine-tuning.

The backbone is built as a run builds it (``ModelFactory.backbone_weights``: ``weights = "source"``
is pretrained on the source first, or read from the cache a run shares), in eval mode, its input
the study's image size with the evaluation center crop (``harness.training.features``). LEEP and
NCE also need a source classifier: the linear layer that pretrained ``weights = "source"``, or a
timm model's own pretrained classifier for ``weights = "imagenet"``; without one they are reported
as not available, with the reason. No target image is read: scores use source labels only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness import api, transfer
from harness.errors import HarnessError, PluginContractError
from harness.search.context import Context
from harness.search.domains import DomainCache
from harness.search.models import ModelFactory
from harness.search.resolve import ResolvedMethod
from harness.study import spec_error
from harness.training.features import compute_features
from harness.training.model import TransferModel
from harness.training.weights import build_backbone, source_head_path


@dataclass
class Inputs:
    """One backbone's features of one source's training images and its source classifier's logits
    (``None``, with ``why``, where it has none)."""

    features: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None
    classifier: str
    seconds: float


def backbone_label(method: Any) -> str:
    """``name(weights)``, as a leaderboard's method key names the backbone."""
    weights = method.weights if method.weights in ("none", "imagenet", "source") else "file"
    return f"{method.backbone}({weights})"


def distinct_backbones(methods: list[ResolvedMethod]) -> dict[str, tuple[int, ResolvedMethod]]:
    """Each backbone with its weights once, with the index of the first method that has it."""
    out: dict[str, tuple[int, ResolvedMethod]] = {}
    for j, rm in enumerate(methods):
        key = f"{rm.backbone.plugin}:{rm.method.backbone}:{rm.method.weights}"
        out.setdefault(key, (j, rm))
    return out


def score_inputs(inputs: Inputs) -> dict[str, dict[str, Any]]:
    """Every score of ``transfer.SCORES`` with the seconds it took, or why it is not available."""
    f, y, logits = inputs.features, inputs.labels, inputs.logits
    calls: dict[str, Callable[[], float]] = {
        "logme": lambda: transfer.logme(f, y),
        "hscore": lambda: transfer.hscore(f, y),
    }
    if logits is not None:
        calls["leep"] = lambda: transfer.leep(logits, y)
        calls["nce"] = lambda: transfer.nce(logits.argmax(axis=1), y)
    out: dict[str, dict[str, Any]] = {}
    for name in transfer.SCORES:
        if name not in calls:
            out[name] = {"value": None, "seconds": None, "not_available": inputs.classifier}
            continue
        start = time.perf_counter()
        value = calls[name]()
        out[name] = {"value": value, "seconds": round(time.perf_counter() - start, 4)}
    return out


def rank_study(
    ctx: Context, methods: list[ResolvedMethod], domains: DomainCache, models: ModelFactory
) -> list[dict[str, Any]]:
    """One record per (pair, distinct backbone): the scores, their times, what they were computed
    from. A backbone that cannot be built is the study file's error, naming its method."""
    spec, done = ctx.spec, {}
    records = []
    for i, pair in enumerate(spec.pairs):
        source = domains.domain(i, "source")
        for j, rm in distinct_backbones(methods).values():
            key = (source.name, source.fingerprint, rm.backbone.plugin, rm.method.backbone, rm.method.weights)  # fmt: skip
            if key not in done:
                try:
                    inputs = backbone_inputs(ctx, models, rm, source)
                except HarnessError as exc:
                    raise spec_error(spec, f"methods[{j}]", exc) from None
                done[key] = (inputs, score_inputs(inputs))
            inputs, scores = done[key]
            records.append(
                {
                    "pair": pair.key,
                    "source": pair.source_name,
                    "backbone": rm.method.backbone,
                    "weights": rm.method.weights,
                    "label": backbone_label(rm.method),
                    "images": int(len(inputs.labels)),
                    "feature_dim": int(inputs.features.shape[1]),
                    "features_seconds": round(inputs.seconds, 3),
                    "source_classifier": inputs.classifier if inputs.logits is not None else None,
                    "scores": scores,
                }
            )
    return records


def backbone_inputs(
    ctx: Context, models: ModelFactory, rm: ResolvedMethod, source: api.DomainData
) -> Inputs:
    """The backbone as the study builds it, in eval mode, over ``source``'s training split."""
    spec = ctx.spec
    start = time.perf_counter()
    weights = models.backbone_weights(rm, source)
    precision = models.precision_for(rm)
    backbone = build_backbone(rm.backbone, rm.method.backbone, weights)
    classifier, why = source_classifier(rm, weights, backbone, source.num_classes)
    model = TransferModel(backbone, nn.Identity(), spec.task, spec.image_size).to(ctx.device)
    try:
        feats = compute_features(model, source.train, precision, ctx.device, spec.batch_size)
    except Exception as exc:  # noqa: BLE001 - timm refuses shapes in many ways
        raise PluginContractError(
            f"{rm.method.backbone} fails on {spec.image_size} px images: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        ) from None
    feats = feats.float()
    logits = None
    if classifier is not None:
        with torch.no_grad():
            logits = classifier.to(feats.device).eval()(feats).float().cpu().numpy()
    return Inputs(
        features=feats.cpu().numpy(),
        labels=source.train.y.cpu().numpy(),
        logits=logits,
        classifier=why,
        seconds=time.perf_counter() - start,
    )


def source_classifier(
    rm: ResolvedMethod, weights: str, backbone: api.Backbone, num_classes: int
) -> tuple[nn.Module | None, str]:
    """The classifier over source classes that LEEP and NCE read, and what it is; or ``None``
    and why there is none."""
    w = rm.method.weights
    if w == "source":
        path = source_head_path(weights)
        if not path.is_file():
            return None, (
                f"no source head beside {Path(weights).name} (pretrained before the harness kept "
                "it); delete that file to pretrain it again"
            )
        from safetensors.torch import load_file

        linear = nn.Linear(backbone.num_features, num_classes)
        linear.load_state_dict(load_file(str(path)))
        return linear, "the source-pretrained linear head"
    if w == "imagenet":
        if rm.backbone.meta.get("source") != "timm":
            return None, f"backbone plugin {rm.backbone.plugin!r} gives no pretrained classifier"
        return timm_classifier(rm.method.backbone, backbone)
    if w == "none":
        return None, 'weights = "none": a random backbone has no trained classifier'
    return None, "a weights file's classifier is not read (only its backbone weights are)"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The model hub left alone: the backbone's own build has just put the weights in its cache."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def timm_classifier(name: str, backbone: api.Backbone) -> tuple[nn.Module | None, str]:
    """A timm model's pretrained classifier, used only where it has more than one output and,
    applied to the backbone's features, gives exactly the full pretrained model's logits."""
    import timm

    try:
        with _offline(), torch.random.fork_rng(devices=[]):
            full = timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - hub, cache and missing-tag failures alike
        return (
            None,
            f"timm's pretrained classifier of {name} could not be read: {type(exc).__name__}",
        )
    outputs = int(getattr(full, "num_classes", 0) or 0)
    if outputs <= 1:
        return None, f"{name}'s pretrained model has no classifier over classes ({outputs} outputs)"
    classifier = full.get_classifier()
    size = int((getattr(full, "pretrained_cfg", {}) or {}).get("input_size", (3, 224, 224))[-1])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(2, 3, size, size)
        full.eval(), backbone.module.eval()
        try:
            ok = torch.allclose(full(x), classifier(backbone.module(x)), atol=1e-4, rtol=1e-3)
        except RuntimeError:  # shapes that do not fit: not this backbone's classifier
            ok = False
    if not ok:
        return None, f"{name}'s pretrained classifier does not apply to its pooled features"
    return classifier, f"timm's pretrained {name} classifier ({outputs} classes)"
