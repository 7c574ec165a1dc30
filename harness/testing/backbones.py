"""Backbone checks: stages, forward, normalization, freezing, training and reproducibility."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api import Backbone
from harness.errors import PluginContractError
from harness.testing.core import (
    NUM_CLASSES,
    CheckResult,
    Checks,
    EntryOrFactory,
    Fail,
    describe,
    images,
    short,
    unpack,
)
from harness.training.engine import TransferModel, generators_kept, seed_everything

#: the checks, in the order they run (``backbone.<check>``)
CHECKS = (
    "factory",
    "stages",
    "forward",
    "stage_order",
    "normalization",
    "freeze",
    "deterministic",
    "trains",
)


def check_backbone(
    entry_or_factory: EntryOrFactory, name: str | None = None, *, image_size: int = 32
) -> list[CheckResult]:
    """Check a backbone factory ``factory(name, *, weights, in_chans=3) -> Backbone``.

    ``name`` is the registered name to build (taken from the entry when an Entry is given;
    required for a bare factory). ``image_size`` is the side of the square test images: use the
    size your backbone needs when it only accepts one. Checks, named ``backbone.<check>``:
    ``factory``, ``stages``, ``stage_order``, ``forward``, ``normalization``, ``freeze``,
    ``trains`` and ``deterministic``.
    """
    factory, entry_name, _ = unpack(entry_or_factory, "backbone")
    name = name or entry_name
    if not name:
        raise TypeError("check_backbone(factory, name): a bare factory needs the name to build")
    c = Checks("backbone")
    with generators_kept():  # the checks seed freely; the caller's random state stays
        bb = c.value("factory", lambda: _build_backbone(factory, name))
        if bb is None:
            for check in CHECKS[1:]:
                c.blocked(check, ["factory"])
            return c.results
        c.run("stages", lambda: _backbone_stages(bb))
        c.run("forward", lambda: _backbone_forward(bb, image_size))
        c.run("stage_order", lambda: _backbone_stage_order(bb, image_size), needs=["forward"])
        c.run("normalization", lambda: _backbone_normalization(bb))
        c.run("freeze", lambda: _backbone_freeze(bb), needs=["stages"])
        # deterministic compares the untouched first build with a second one; trains then uses it
        c.run("deterministic", lambda: _backbone_deterministic(bb, factory, name))
        c.run("trains", lambda: _backbone_trains(bb, image_size), needs=["forward"])
    return c.results


def _build_backbone(factory: Callable[..., Any], name: str) -> Backbone:
    seed_everything(0)
    bb = factory(name, weights="none")
    if not isinstance(bb, Backbone):
        raise Fail(
            f"factory({name!r}, weights='none') returned {type(bb).__name__}, not harness.api.Backbone"
        )
    if not isinstance(bb.module, nn.Module):
        raise Fail(f"Backbone.module is {type(bb.module).__name__}, not a torch.nn.Module")
    nf = bb.num_features
    if isinstance(nf, bool) or not isinstance(nf, int) or nf < 1:
        raise Fail(f"Backbone.num_features must be a positive int, got {nf!r}")
    return bb


def _backbone_stages(bb: Backbone) -> str:
    stages = bb.stages
    if not isinstance(stages, list | tuple) or not all(
        isinstance(s, list | tuple) and all(isinstance(n, str) for n in s) for s in stages
    ):
        raise Fail("Backbone.stages must be a list of lists of parameter names, stem first")
    if not stages:
        raise Fail("Backbone.stages is empty: list at least one stage (the whole network)")
    params = [n for n, _ in bb.module.named_parameters()]
    known = set(params)
    seen: dict[str, int] = {}
    twice = []
    for i, stage in enumerate(stages):
        for n in stage:
            if n in seen:
                twice.append(f"{n} (stages {seen[n]} and {i})")
            seen[n] = i
    if twice:
        raise Fail(f"parameters listed in two stages: {short(twice)}")
    unknown = [n for n in seen if n not in known]
    if unknown:
        raise Fail(
            f"stages list names that are not parameters of the module: {short(unknown)} "
            "(names must be as module.named_parameters() gives them)"
        )
    try:
        bb.check()
    except PluginContractError as exc:
        raise Fail(
            f"{exc} ({len(known - set(seen))} of {len(known)} parameters in no stage); every "
            "parameter must be in exactly one stage, or freeze depths leave it trainable. "
            "harness.api.stages_from_prefixes(module, prefixes) builds stages from name prefixes"
        ) from None
    empty = [i for i, s in enumerate(stages) if not s]
    if empty:
        raise Fail(
            f"stage(s) {empty} of {len(stages)} are empty: freeze depth k must freeze k non-empty "
            "stages, the stem (stage 0) first"
        )
    return f"{len(stages)} stages over {len(params)} parameters"


def _backbone_forward(bb: Backbone, size: int) -> None:
    module = bb.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(images(2, size))
    except Exception as exc:
        fixed = getattr(module, "pretrained_cfg", None) or {}
        hint = ""
        if fixed.get("fixed_input_size") and fixed.get("input_size"):
            hint = f"; the model takes {tuple(fixed['input_size'])} inputs only: check it with image_size={fixed['input_size'][-1]}"
        raise Fail(
            f"forward of a (2, 3, {size}, {size}) batch failed: {describe(exc)}{hint}"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor):
        raise Fail(f"forward returned {type(out).__name__}, not a tensor of pooled features")
    expected = (2, bb.num_features)
    if tuple(out.shape) != expected:
        raise Fail(
            f"forward of a (2, 3, {size}, {size}) batch gave shape {tuple(out.shape)}, expected "
            f"{expected} = (N, num_features): forward must return pooled features (a timm model "
            "does with num_classes=0), and num_features must match them"
        )
    if not out.is_floating_point():
        raise Fail(f"forward returned {out.dtype} features, expected floating point")
    if not torch.isfinite(out).all():
        raise Fail("forward of a random batch gave non-finite features (NaN or inf)")


def _backbone_stage_order(bb: Backbone, size: int) -> str | None:
    """Stages must run in forward order, stem first: compares when each stage's modules first run."""
    module = bb.module
    owner: dict[str, nn.Module] = {}
    for mod_name, mod in module.named_modules():
        if mod is module:
            continue
        for p_name, _ in mod.named_parameters(prefix=mod_name, recurse=False):
            owner[p_name] = mod
    first_call: dict[int, int] = {}

    def hook(mod: nn.Module, _args: Any) -> None:
        first_call.setdefault(id(mod), len(first_call))

    handles = [
        m.register_forward_pre_hook(hook) for m in {id(m): m for m in owner.values()}.values()
    ]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(images(2, size))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    starts: list[tuple[int, int, str]] = []  # (first call, stage, a parameter of it)
    for i, stage in enumerate(bb.stages):
        calls = [
            (first_call[id(owner[n])], n)
            for n in stage
            if n in owner and id(owner[n]) in first_call
        ]
        if calls:
            at, n = min(calls)
            starts.append((at, i, n))
    if not starts or starts[0][1] != 0:
        return (
            "cannot tell where stage 0 runs (its parameters belong to no module that forward calls)"
        )
    for (at_a, i, n_a), (at_b, j, n_b) in zip(starts, starts[1:], strict=False):
        if at_b < at_a:
            raise Fail(
                f"stage {j} (e.g. {n_b!r}) starts running before stage {i} (e.g. {n_a!r}): list "
                "stages in forward order, stem first, so that freeze depth k freezes the k stages "
                "nearest the input"
            )
    return None


def _backbone_normalization(bb: Backbone) -> None:
    for label, value in (("mean", bb.mean), ("std", bb.std)):
        if not isinstance(value, tuple | list) or len(value) != 3:
            raise Fail(
                f"Backbone.{label} must be a 3-tuple (one value per RGB channel), got {value!r}"
            )
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        ):
            raise Fail(f"Backbone.{label} must hold finite numbers, got {value!r}")
    if any(s <= 0 for s in bb.std):
        raise Fail(f"Backbone.std must be positive, got {tuple(bb.std)}")
    if any(not 0 <= m <= 1 for m in bb.mean) or any(s > 1 for s in bb.std):
        raise Fail(
            f"mean {tuple(bb.mean)} / std {tuple(bb.std)} are not on the [0, 1] pixel scale the "
            "harness normalizes (x - mean) / std on; values for 0..255 pixels are a common slip"
        )


def _backbone_freeze(bb: Backbone) -> str:
    head = nn.Linear(bb.num_features, NUM_CLASSES)
    model = TransferModel(bb, head)
    n = len(bb.stages)
    try:
        for k in range(n + 1):
            model.freeze(k)
            expected = {p for stage in bb.stages[k:] for p in stage}
            trainable = {name for name, p in bb.module.named_parameters() if p.requires_grad}
            if trainable != expected:
                parts = []
                if trainable - expected:
                    parts.append(f"still trainable: {short(sorted(trainable - expected))}")
                if expected - trainable:
                    parts.append(
                        f"frozen but in a later stage: {short(sorted(expected - trainable))}"
                    )
                raise Fail(
                    f"freeze depth {k} of {n} should leave exactly stages {k}..{n - 1} trainable; "
                    + "; ".join(parts)
                )
            if not all(p.requires_grad for p in head.parameters()):
                raise Fail(
                    f"freeze depth {k} froze head parameters: the backbone shares them with the head"
                )
    finally:
        model.freeze(0)
    return f"freeze depths 0..{n} checked"


def _backbone_trains(bb: Backbone, size: int) -> str:
    model = TransferModel(bb, nn.Linear(bb.num_features, NUM_CLASSES)).train()
    x = images(4, size, seed=1)
    y = torch.tensor([0, 1, 2, 0])
    before = {n: p.detach().clone() for n, p in bb.module.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = F.cross_entropy(model(x), y)
    if not torch.isfinite(loss):
        raise Fail(f"the loss of a linear head on the features is {float(loss)}")
    optimizer.zero_grad()
    loss.backward()
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    if bad:
        raise Fail(f"non-finite gradients in {short(bad)}")
    params = dict(bb.module.named_parameters())
    reached = [n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    if not reached:
        raise Fail(
            "no backbone parameter received a gradient: forward must not detach its output, run "
            "under torch.no_grad(), or leave torch (e.g. through numpy)"
        )
    no_grad = [n for n, p in params.items() if p.grad is None]
    optimizer.step()
    changed = [n for n, p in params.items() if not torch.equal(before[n], p.detach())]
    if not changed:
        raise Fail("one optimizer step changed no backbone parameter")
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    note = f"loss {loss.item():.4f} -> {after.item():.4f} after one SGD step"
    if no_grad:
        note += f"; {len(no_grad)} parameter(s) get no gradient (unused in forward?): {short(no_grad, 3)}"
    return note


def _backbone_deterministic(first: Backbone, factory: Callable[..., Any], name: str) -> None:
    a = first.module.state_dict()
    b = _build_backbone(factory, name).module.state_dict()
    if a.keys() != b.keys():
        raise Fail("two builds with weights='none' have different state-dict keys")
    differ = [
        k
        for k in a
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])
    ]
    if differ:
        raise Fail(
            f"two builds with weights='none' under the same seed differ in {len(differ)} tensor(s) "
            f"(e.g. {differ[0]!r}): draw the random initialisation from torch's global generator, "
            "which the harness seeds before it builds a model (harness.training.engine.seed_everything "
            "seeds torch, numpy and random)"
        )


def check_names() -> list[str]:
    """The names :func:`check_backbone` reports, without running it."""
    return [f"backbone.{n}" for n in CHECKS]
