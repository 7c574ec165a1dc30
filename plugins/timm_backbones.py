"""Backbones: any timm model by name, with weights none / imagenet / a local file."""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from harness import hookimpl
from harness.api import Backbone, WeightsError, load_weights_file

# Trailing groups of timm's group_matcher (final norms) get ids like 99999: they belong to the last stage.
_TRAILING_GROUP = 90000
#: seconds the model hub's host (or the proxy to it) gets to accept a connection
HUB_PROBE_TIMEOUT_S = 3.0
_WEIGHTS_HINT = (
    "on a machine without the model hub, save the weights once where it is "
    "reachable (timm.create_model(name, pretrained=True) then "
    "safetensors.torch.save_file(model.state_dict(), 'w.safetensors')) and set "
    "weights = '/path/to/w.safetensors' in the study"
)


@hookimpl
def register_backbones(register):
    import timm

    for name in timm.list_models():
        register(name, build_timm_backbone, description="timm model", source="timm")


def build_timm_backbone(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:

    weights = str(weights)
    if weights == "none":
        model = _create(name, in_chans, pretrained=False)
    elif weights == "imagenet":
        model = _pretrained(name, in_chans)
    else:
        model = _create(name, in_chans, pretrained=False)
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


def _create(name: str, in_chans: int, *, pretrained: bool):
    """``timm.create_model``, with DropPath modules where the model has them: built at
    ``drop_path_rate=1`` so that timm places them, each one's rate kept as its share of the
    rate a run sets (``backbone.drop_path``), then 0 until a run does. The weights are the
    same either way (no random draw depends on the rate)."""
    import timm
    from timm.layers import DropPath

    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, in_chans=in_chans, drop_path_rate=1.0
        )
    except TypeError:  # a model without drop path
        return timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans)
    for m in model.modules():
        if isinstance(m, DropPath):
            m.drop_path_share, m.drop_prob = m.drop_prob, 0.0
    return model


def _pretrained(name: str, in_chans: int):
    with _offline_unless_hub_reachable() as endpoint:
        try:
            return _create(name, in_chans, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - hub, network and missing-tag failures alike
            detail = (
                f"the model hub ({endpoint}) cannot be reached and the weights are not in the "
                "local cache"
                if endpoint
                else f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            )
            raise WeightsError(
                f"could not get pretrained weights for {name!r} through timm: {detail}",
                hint=_WEIGHTS_HINT,
            ) from None


@contextlib.contextmanager
def _offline_unless_hub_reachable() -> Iterator[str | None]:
    """huggingface_hub retries an unreachable hub for about a minute before it gives up. When a
    quick connection to the hub's host fails, the download runs in huggingface_hub's offline mode
    instead: weights in the local cache still load, others fail at once. Yields the unreachable
    endpoint, or ``None`` when the hub is used as usual."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without huggingface_hub downloads from plain URLs, no retries
        yield None
        return
    if constants.HF_HUB_OFFLINE or _reachable(constants.ENDPOINT):
        yield None
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield constants.ENDPOINT
    finally:
        constants.HF_HUB_OFFLINE = False


@functools.cache
def _reachable(endpoint: str) -> bool:
    """Whether the host of ``endpoint`` (or the proxy the environment sets for it) accepts a TCP
    connection within ``HUB_PROBE_TIMEOUT_S``; name resolution is inside the limit too."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or "", parsed.port or 80
    answered: list[bool] = []

    def connect() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            answered.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S)
    return bool(answered)


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
