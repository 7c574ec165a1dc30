"""Contract checks for harness plugins, to call from a plugin's own test suite.

The hooks in :mod:`harness.hookspecs` describe what a backbone, head, dataset or strategy factory
(and a plugin's command) must do. This module checks it, in the spirit of scikit-learn's ``check_estimator``: each
``check_*`` function builds the thing from its factory, runs a list of named checks on it and
returns one :class:`CheckResult` per check. One failing check never hides the others: each runs on
its own, and a check that cannot run because an earlier one failed says so (``"not run: ..."``).
:func:`assert_passes` turns the results into a single test failure listing every failed check.

Use it in your plugin's tests (plain pytest; CPU only, a few seconds per entry)::

    # tests/test_contract.py of your plugin's distribution
    from harness.testing import assert_passes, check_backbone, check_dataset, check_strategy

    from my_package.plugin import MyStrategy, build_my_dataset, build_my_net


    def test_strategy_honours_the_contract():
        assert_passes(check_strategy(MyStrategy))


    def test_strategy_with_options():
        assert_passes(check_strategy(MyStrategy, options={"shots": 5}))


    def test_backbone_honours_the_contract():
        assert_passes(check_backbone(build_my_net, "my-net", image_size=32))


    def test_dataset_honours_the_contract():
        for domain in ("plain", "noisy"):
            assert_passes(check_dataset(build_my_dataset, domain, options={"n": 60}))

Or check everything the plugin registers, exactly as the harness loads it (the plugin must be
installed, e.g. ``pip install -e .``)::

    from harness.registry import Registry
    from harness.testing import assert_passes, check_plugin


    def test_whole_plugin():
        registry = Registry()
        registry.load_entry_points(only=["my_plugin"], strict=True)  # the entry-point name
        assert_passes(check_plugin(registry, "my_plugin"))

What is checked
---------------
- backbone: the factory returns a ``Backbone``; its stages cover every parameter exactly once
  (``Backbone.check``), none is empty, they run stem first; a float batch gives finite
  ``(N, num_features)`` features; ``mean``/``std`` are 3 values for pixels in [0, 1]; freeze depth
  ``k`` leaves exactly the later stages trainable; one optimiser step trains it with finite
  gradients; ``weights="none"`` is reproducible under the seed the harness sets. Pretrained
  weights (``"imagenet"``) are not checked: they may need a network.
- head: for every task it declares, built over a tiny timm backbone (``test_resnet``), it maps a
  batch to ``(N, num_classes)`` logits (classification) or ``(N, num_classes, H, W)``
  (segmentation), backpropagates, and rejects an unknown option with ``TypeError``.
- dataset: the factory returns a ``DomainData`` that passes ``DomainData.check``, with the asked
  image size, a declared task and unique class names; train and test/val do not share images
  (compared by their bytes; up to 10% is tolerated for real data with duplicates); it is
  deterministic; its fingerprint follows its data.
- strategy: the factory returns a ``Strategy`` with consistent declarations; ``search_space``
  names start with ``strategy.``; it rejects an unknown option with ``TypeError``; it trains a tiny
  model for a few steps through the harness's own engine with a finite loss, and the engine hands
  it target labels only as ``target_labels`` allows.
- command: its name is not a built-in command, typer can build ``harness <name> --help`` from
  its signature, and it has a description or docstring. Nothing is run.

Each check function accepts a registry :class:`~harness.registry.Entry` (its factory, name and
metadata such as ``tasks`` are used) or the bare factory. The checks seed torch, numpy and
``random`` themselves and restore the caller's random state afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api import IGNORE_INDEX, Backbone, Batch, DomainData, StepContext, Strategy
from harness.errors import HarnessError, PluginContractError
from harness.registry import KINDS, Entry, Registry, unknown_message
from harness.training.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    generators_kept,
    resolve_freeze_depth,
    seed_everything,
)

__all__ = [
    "DUPLICATE_TOLERANCE",
    "CheckResult",
    "PluginCheckError",
    "assert_passes",
    "check_backbone",
    "check_command",
    "check_dataset",
    "check_entry",
    "check_head",
    "check_plugin",
    "check_strategy",
]

#: tasks the harness knows
TASKS = ("classification", "segmentation")
#: what a strategy may declare as ``target_labels``
TARGET_LABELS = ("none", "few", "all")
#: share of test (or val) images that may repeat a train image byte for byte before
#: ``dataset.disjoint_splits`` fails: real data sets hold a few genuine duplicates
DUPLICATE_TOLERANCE = 0.10
#: the keyword passed to a factory to see that it rejects unknown options
UNKNOWN_OPTION = "harness_contract_check_unknown_option"
#: number of classes of the heads and data the checks build
NUM_CLASSES = 3
#: the keys of ``Strategy.fixed`` the harness reads
KNOWN_FIXED = ("freeze_depth",)
#: a plugin registering more backbones than this is checked on its ``test_*`` names only
MAX_BACKBONES = 50

_NOT_RUN = "not run: "
_SKIPPED = "skipped: "
_CPU = torch.device("cpu")
_T = TypeVar("_T")
EntryOrFactory = Entry | Callable[..., Any]


# =========================================================================================== results


@dataclass
class CheckResult:
    """The outcome of one named check, e.g. ``backbone.stages`` or ``head.segmentation.output``.

    ``detail`` says what went wrong (and usually how to fix it) when ``passed`` is false; for a
    passed check it may hold a note (``"seed has no effect on the splits"``) or say why the check
    was skipped (``"skipped: needs options: root"``).
    """

    name: str
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"{status} {self.name}" + (f": {self.detail}" if self.detail else "")


class PluginCheckError(AssertionError):
    """Raised by :func:`assert_passes`; ``failures`` holds the failed :class:`CheckResult` s."""

    def __init__(self, failures: Sequence[CheckResult], total: int) -> None:
        self.failures = list(failures)
        root = [f for f in self.failures if not f.detail.startswith(_NOT_RUN)]
        blocked = [f for f in self.failures if f.detail.startswith(_NOT_RUN)]
        lines = [f"{len(self.failures)} of {total} plugin contract checks failed:"]
        lines += [f"  {f.name}: {f.detail}" for f in root]
        if blocked:
            lines.append(
                f"  not run because of the failures above: {', '.join(f.name for f in blocked)}"
            )
        super().__init__("\n".join(lines))


def assert_passes(results: Iterable[CheckResult] | Mapping[str, Iterable[CheckResult]]) -> None:
    """Raise :class:`PluginCheckError` (an ``AssertionError``) listing every failed check.

    Accepts the list a ``check_*`` function returns, or the dict :func:`check_plugin` returns (its
    check names are then prefixed with the entry, ``"strategy:my-da/strategy.trains"``).
    """
    if isinstance(results, Mapping):
        flat = [
            CheckResult(f"{key}/{r.name}", r.passed, r.detail)
            for key, rs in results.items()
            for r in rs
        ]
    else:
        flat = list(results)
    failures = [r for r in flat if not r.passed]
    if failures:
        raise PluginCheckError(failures, len(flat))


# =========================================================================================== machinery


class _Fail(Exception):
    """A contract violation found by a check; its message is the CheckResult's detail."""


class _Skip(Exception):
    """The check cannot run without options the caller did not give."""


class _Checks:
    """Runs named checks one at a time and records a CheckResult for each."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.results: list[CheckResult] = []
        self.failed: set[str] = set()

    def add(self, name: str, passed: bool, detail: str = "") -> None:
        self.results.append(CheckResult(f"{self.prefix}.{name}", passed, detail))
        if not passed:
            self.failed.add(name)

    def blocked(self, name: str, needs: Sequence[str]) -> bool:
        bad = [n for n in needs if n in self.failed]
        if bad:
            failed = ", ".join(f"{self.prefix}.{n}" for n in bad)
            self.add(name, False, f"{_NOT_RUN}{failed} failed")
        return bool(bad)

    def value(self, name: str, fn: Callable[[], _T], needs: Sequence[str] = ()) -> _T | None:
        """Run ``fn``; record a pass (and return its value) or a failure (and return None)."""
        if self.blocked(name, needs):
            return None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a CheckResult
            self.add(name, False, _describe(exc))
            return None
        self.add(name, True)
        return out

    def run(self, name: str, fn: Callable[[], str | None], needs: Sequence[str] = ()) -> bool:
        """Run ``fn``, which returns an optional note for a passed check."""
        if self.blocked(name, needs):
            return False
        try:
            note = fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a CheckResult
            self.add(name, False, _describe(exc))
            return False
        self.add(name, True, note or "")
        return True


def _library_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(torch.__file__) + os.sep]
    for mod in ("numpy", "optuna", "timm", "segmentation_models_pytorch"):
        with contextlib.suppress(Exception):
            dirs.append(os.path.dirname(__import__(mod).__file__) + os.sep)
    return tuple(dirs)


def _describe(exc: BaseException) -> str:
    """One line for an exception: its type, message, where it was raised and any harness hint."""
    if isinstance(exc, _Fail):
        return str(exc)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "; ".join(lines)
    if len(text) > 400:
        text = text[:400] + "..."
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    libraries = _library_dirs()
    own = [f for f in frames if f.filename != __file__ and not f.filename.startswith(libraries)]
    where = own[-1] if own else (frames[-1] if frames else None)
    if where is not None:
        out += f" (at {os.path.basename(where.filename)}:{where.lineno} in {where.name})"
    hint = getattr(exc, "hint", None) if isinstance(exc, HarnessError) else None
    if hint:
        out += f"; hint: {hint}"
    return out


def _seed(seed: int = 0) -> None:
    seed_everything(seed)


def _unpack(obj: EntryOrFactory, kind: str) -> tuple[Callable[..., Any], str, dict[str, Any]]:
    if isinstance(obj, Entry):
        if obj.kind != kind:
            raise TypeError(f"check_{kind} got the {obj.kind} entry {obj.name!r}; use check_entry")
        return obj.factory, obj.name, dict(obj.meta)
    if callable(obj):
        return obj, "", {}
    raise TypeError(f"check_{kind} needs a registry Entry or a factory, got {type(obj).__name__}")


def _missing_required(
    factory: Callable[..., Any], positional: int, provided: Iterable[str]
) -> list[str]:
    """Required parameters of ``factory`` the call would not supply (from its signature)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    given = set(provided)
    missing = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional > 0:
            positional -= 1
            continue
        if p.default is p.empty and p.name not in given:
            missing.append(p.name)
    return missing


_MISSING_ARG = re.compile(r"missing \d+ required (?:keyword-only |positional )?arguments?: (.+)$")


def _missing_from_type_error(exc: TypeError) -> list[str]:
    match = _MISSING_ARG.search(str(exc))
    return re.findall(r"'([^']+)'", match.group(1)) if match else []


def _skip_message(missing: Sequence[str]) -> str:
    opts = ", ".join(f"{m!r}: ..." for m in missing)
    return f"{_SKIPPED}needs options: {', '.join(missing)} (pass options={{{opts}}} to check it)"


def _images(n: int, size: int, seed: int = 0) -> Tensor:
    """A normalized float batch like the one the harness feeds a model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    return (x - 0.45) / 0.225


def _tiny_backbone(name: str) -> Backbone:
    from harness_plugins.timm_backbones import build_timm_backbone

    _seed(0)
    return build_timm_backbone(name, weights="none")


def _short(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# =========================================================================================== backbones


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
    factory, entry_name, _ = _unpack(entry_or_factory, "backbone")
    name = name or entry_name
    if not name:
        raise TypeError("check_backbone(factory, name): a bare factory needs the name to build")
    c = _Checks("backbone")
    with generators_kept():  # the checks seed freely; the caller's random state stays
        bb = c.value("factory", lambda: _build_backbone(factory, name))
        if bb is None:
            for check in (
                "stages",
                "forward",
                "stage_order",
                "normalization",
                "freeze",
                "deterministic",
                "trains",
            ):
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
    _seed(0)
    bb = factory(name, weights="none")
    if not isinstance(bb, Backbone):
        raise _Fail(
            f"factory({name!r}, weights='none') returned {type(bb).__name__}, not harness.api.Backbone"
        )
    if not isinstance(bb.module, nn.Module):
        raise _Fail(f"Backbone.module is {type(bb.module).__name__}, not a torch.nn.Module")
    nf = bb.num_features
    if isinstance(nf, bool) or not isinstance(nf, int) or nf < 1:
        raise _Fail(f"Backbone.num_features must be a positive int, got {nf!r}")
    return bb


def _backbone_stages(bb: Backbone) -> str:
    stages = bb.stages
    if not isinstance(stages, list | tuple) or not all(
        isinstance(s, list | tuple) and all(isinstance(n, str) for n in s) for s in stages
    ):
        raise _Fail("Backbone.stages must be a list of lists of parameter names, stem first")
    if not stages:
        raise _Fail("Backbone.stages is empty: list at least one stage (the whole network)")
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
        raise _Fail(f"parameters listed in two stages: {_short(twice)}")
    unknown = [n for n in seen if n not in known]
    if unknown:
        raise _Fail(
            f"stages list names that are not parameters of the module: {_short(unknown)} "
            "(names must be as module.named_parameters() gives them)"
        )
    try:
        bb.check()
    except PluginContractError as exc:
        raise _Fail(
            f"{exc} ({len(known - set(seen))} of {len(known)} parameters in no stage); every "
            "parameter must be in exactly one stage, or freeze depths leave it trainable. "
            "harness.api.stages_from_prefixes(module, prefixes) builds stages from name prefixes"
        ) from None
    empty = [i for i, s in enumerate(stages) if not s]
    if empty:
        raise _Fail(
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
            out = module(_images(2, size))
    except Exception as exc:
        fixed = getattr(module, "pretrained_cfg", None) or {}
        hint = ""
        if fixed.get("fixed_input_size") and fixed.get("input_size"):
            hint = f"; the model takes {tuple(fixed['input_size'])} inputs only: check it with image_size={fixed['input_size'][-1]}"
        raise _Fail(
            f"forward of a (2, 3, {size}, {size}) batch failed: {_describe(exc)}{hint}"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor):
        raise _Fail(f"forward returned {type(out).__name__}, not a tensor of pooled features")
    expected = (2, bb.num_features)
    if tuple(out.shape) != expected:
        raise _Fail(
            f"forward of a (2, 3, {size}, {size}) batch gave shape {tuple(out.shape)}, expected "
            f"{expected} = (N, num_features): forward must return pooled features (a timm model "
            "does with num_classes=0), and num_features must match them"
        )
    if not out.is_floating_point():
        raise _Fail(f"forward returned {out.dtype} features, expected floating point")
    if not torch.isfinite(out).all():
        raise _Fail("forward of a random batch gave non-finite features (NaN or inf)")


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
            module(_images(2, size))
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
            raise _Fail(
                f"stage {j} (e.g. {n_b!r}) starts running before stage {i} (e.g. {n_a!r}): list "
                "stages in forward order, stem first, so that freeze depth k freezes the k stages "
                "nearest the input"
            )
    return None


def _backbone_normalization(bb: Backbone) -> None:
    for label, value in (("mean", bb.mean), ("std", bb.std)):
        if not isinstance(value, tuple | list) or len(value) != 3:
            raise _Fail(
                f"Backbone.{label} must be a 3-tuple (one value per RGB channel), got {value!r}"
            )
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        ):
            raise _Fail(f"Backbone.{label} must hold finite numbers, got {value!r}")
    if any(s <= 0 for s in bb.std):
        raise _Fail(f"Backbone.std must be positive, got {tuple(bb.std)}")
    if any(not 0 <= m <= 1 for m in bb.mean) or any(s > 1 for s in bb.std):
        raise _Fail(
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
                    parts.append(f"still trainable: {_short(sorted(trainable - expected))}")
                if expected - trainable:
                    parts.append(
                        f"frozen but in a later stage: {_short(sorted(expected - trainable))}"
                    )
                raise _Fail(
                    f"freeze depth {k} of {n} should leave exactly stages {k}..{n - 1} trainable; "
                    + "; ".join(parts)
                )
            if not all(p.requires_grad for p in head.parameters()):
                raise _Fail(
                    f"freeze depth {k} froze head parameters: the backbone shares them with the head"
                )
    finally:
        model.freeze(0)
    return f"freeze depths 0..{n} checked"


def _backbone_trains(bb: Backbone, size: int) -> str:
    model = TransferModel(bb, nn.Linear(bb.num_features, NUM_CLASSES)).train()
    x = _images(4, size, seed=1)
    y = torch.tensor([0, 1, 2, 0])
    before = {n: p.detach().clone() for n, p in bb.module.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = F.cross_entropy(model(x), y)
    if not torch.isfinite(loss):
        raise _Fail(f"the loss of a linear head on the features is {float(loss)}")
    optimizer.zero_grad()
    loss.backward()
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    if bad:
        raise _Fail(f"non-finite gradients in {_short(bad)}")
    params = dict(bb.module.named_parameters())
    reached = [n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    if not reached:
        raise _Fail(
            "no backbone parameter received a gradient: forward must not detach its output, run "
            "under torch.no_grad(), or leave torch (e.g. through numpy)"
        )
    no_grad = [n for n, p in params.items() if p.grad is None]
    optimizer.step()
    changed = [n for n, p in params.items() if not torch.equal(before[n], p.detach())]
    if not changed:
        raise _Fail("one optimizer step changed no backbone parameter")
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    note = f"loss {loss.item():.4f} -> {after.item():.4f} after one SGD step"
    if no_grad:
        note += f"; {len(no_grad)} parameter(s) get no gradient (unused in forward?): {_short(no_grad, 3)}"
    return note


def _backbone_deterministic(first: Backbone, factory: Callable[..., Any], name: str) -> None:
    a = first.module.state_dict()
    b = _build_backbone(factory, name).module.state_dict()
    if a.keys() != b.keys():
        raise _Fail("two builds with weights='none' have different state-dict keys")
    differ = [
        k
        for k in a
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])
    ]
    if differ:
        raise _Fail(
            f"two builds with weights='none' under the same seed differ in {len(differ)} tensor(s) "
            f"(e.g. {differ[0]!r}): draw the random initialisation from torch's global generator, "
            "which the harness seeds before it builds a model (harness.training.engine.seed_everything "
            "seeds torch, numpy and random)"
        )


# =========================================================================================== heads


def check_head(
    entry_or_factory: EntryOrFactory,
    *,
    tasks: Sequence[str] | None = None,
    backbone: str = "test_resnet",
    image_size: int = 32,
    seg_image_size: int = 64,
    options: Mapping[str, Any] | None = None,
) -> list[CheckResult]:
    """Check a head factory ``factory(*, backbone, num_classes, task, **options) -> nn.Module``.

    Every task the head declares (the entry's ``tasks``, or ``tasks=``; default
    ``("classification",)``) is checked over the tiny timm backbone ``backbone``, with
    ``num_classes=3`` and the given head ``options``: classification on ``image_size`` px images,
    segmentation on ``seg_image_size`` px ones (or the entry's ``min_image_size`` when larger).
    Checks, named ``head.<task>.<check>``: ``factory``, ``output``, ``backward`` and
    ``unknown_option``; plus ``head.tasks`` and ``head.backbone`` (the tiny backbone builds).
    A factory with required options that are not given is skipped with a passed note.
    """
    factory, _, meta = _unpack(entry_or_factory, "head")
    raw = tasks if tasks is not None else meta.get("tasks", ("classification",))
    declared = (raw,) if isinstance(raw, str) else tuple(raw)
    opts = dict(options or {})
    seg_size = max(seg_image_size, int(meta.get("min_image_size") or 0))
    c = _Checks("head")
    c.run("tasks", lambda: _declared_tasks(raw))
    missing = _missing_required(factory, 0, {"backbone", "num_classes", "task", *opts})
    if missing:
        c.add("factory", True, _skip_message(missing))
        return c.results
    with generators_kept():  # the checks seed freely; the caller's random state stays
        c.run("backbone", lambda: _builds(backbone))
        for task in declared:
            if task in TASKS:
                size = seg_size if task == "segmentation" else image_size
                _check_head_task(c, factory, task, backbone, size, opts)
    return c.results


def _builds(backbone: str) -> None:
    _tiny_backbone(backbone)


def _declared_tasks(declared: Any) -> None:
    if isinstance(declared, str):
        raise _Fail(
            f"tasks={declared!r} is a string: register with tasks=({declared!r},), a tuple (the "
            "harness tests `task in tasks`, which on a string matches substrings)"
        )
    if not isinstance(declared, Sequence) or not declared:
        raise _Fail(f"tasks must be a non-empty tuple of task names, got {declared!r}")
    unknown = [t for t in declared if t not in TASKS]
    if unknown:
        raise _Fail(f"unknown task(s) {unknown}; the harness knows {', '.join(TASKS)}")


def _check_head_task(
    c: _Checks,
    factory: Callable[..., Any],
    task: str,
    backbone: str,
    size: int,
    opts: dict[str, Any],
) -> None:
    t = f"{task}."

    def build() -> tuple[Backbone, nn.Module]:
        bb = _tiny_backbone(backbone)
        head = factory(backbone=bb, num_classes=NUM_CLASSES, task=task, **opts)
        if not isinstance(head, nn.Module):
            raise _Fail(f"factory returned {type(head).__name__}, not a torch.nn.Module")
        return bb, head

    built = c.value(t + "factory", build, needs=["backbone"])
    if built is None:
        c.blocked(t + "output", [t + "factory"])
        c.blocked(t + "backward", [t + "factory"])
    else:
        bb, head = built
        c.run(t + "output", lambda: _head_output(bb, head, task, size))
        c.run(t + "backward", lambda: _head_backward(bb, head, task, size), needs=[t + "output"])
    c.run(
        t + "unknown_option",
        lambda: _head_unknown_option(factory, backbone, task, opts),
        needs=["backbone"],
    )


def _head_model(bb: Backbone, head: nn.Module, task: str) -> TransferModel:
    return TransferModel(bb, head, task)


def _head_output(bb: Backbone, head: nn.Module, task: str, size: int) -> None:
    model = _head_model(bb, head, task).eval()
    with torch.no_grad():
        out = model(_images(2, size))
    if task == "segmentation":
        expected: tuple[int, ...] = (2, NUM_CLASSES, size, size)
        how = (
            "a segmentation head sets takes_images = True, gets the images and returns logits "
            "(N, num_classes, H, W) at the input resolution"
        )
    else:
        expected = (2, NUM_CLASSES)
        how = "a classification head maps pooled features (N, backbone.num_features) to logits (N, num_classes)"
    if not isinstance(out, Tensor):
        raise _Fail(f"{task} output is {type(out).__name__}, not a tensor; {how}")
    if tuple(out.shape) != expected:
        raise _Fail(
            f"{task} output has shape {tuple(out.shape)}, expected {expected} for 2 images of "
            f"{size} px and num_classes={NUM_CLASSES}; {how}"
        )
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise _Fail(
            f"{task} output must be finite floating-point logits, got {out.dtype} with NaN/inf"
        )


def _head_backward(bb: Backbone, head: nn.Module, task: str, size: int) -> str | None:
    model = _head_model(bb, head, task).train()
    model.zero_grad(set_to_none=True)
    out = model(_images(2, size, seed=1))
    g = torch.Generator().manual_seed(0)
    if task == "segmentation":
        y = torch.randint(0, NUM_CLASSES, (2, size, size), generator=g)
        y[:, :2] = IGNORE_INDEX
    else:
        y = torch.randint(0, NUM_CLASSES, (2,), generator=g)
    F.cross_entropy(out.float(), y, ignore_index=IGNORE_INDEX).backward()
    own = model.head_parameters()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if any(not torch.isfinite(g).all() for g in grads):
        raise _Fail("backward gave non-finite gradients")
    if not own:
        return "the head has no parameters of its own"
    if all(p.grad is None for p in own):
        raise _Fail(
            "no head parameter received a gradient: the output must be computed from the head's "
            "parameters without detaching"
        )
    return None


def _head_unknown_option(
    factory: Callable[..., Any], backbone: str, task: str, opts: dict[str, Any]
) -> None:
    bb = _tiny_backbone(backbone)
    try:
        factory(backbone=bb, num_classes=NUM_CLASSES, task=task, **opts, **{UNKNOWN_OPTION: 1})
    except TypeError:
        return
    except Exception as exc:  # noqa: BLE001
        raise _Fail(
            f"an unknown option raised {_describe(exc)}; raise TypeError so that the harness reports "
            "it as a head_options error"
        ) from None
    raise _Fail(
        f"the unknown option {UNKNOWN_OPTION}=1 was accepted silently: reject unknown options with "
        "TypeError (do not swallow **options) so that a typo in head_options fails before training"
    )


# =========================================================================================== datasets


def check_dataset(
    entry_or_factory: EntryOrFactory,
    domain: str | None = None,
    *,
    image_size: int = 32,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[CheckResult]:
    """Check a dataset factory ``factory(domain, *, image_size, seed, **options) -> DomainData``.

    ``domain`` is the sub-domain to build (``None`` for the plain name); ``options`` the
    keyword options a study alias would pass (``{"root": ...}``, or a small ``{"n": 30}`` to keep
    the check fast). A factory with required options that are not given (``root`` of a folder
    dataset) is skipped: one passed ``dataset.factory`` result that says ``"skipped: needs
    options: root"``. Checks, named ``dataset.<check>`` (``dataset/<domain>.<check>`` with a
    domain): ``factory``, ``contract``, ``image_size``, ``task``, ``class_names``,
    ``disjoint_splits``, ``deterministic`` and ``fingerprint``.
    """
    factory, _, meta = _unpack(entry_or_factory, "dataset")
    declared = (
        meta.get("tasks", ("classification",)) if isinstance(entry_or_factory, Entry) else TASKS
    )
    opts = dict(options or {})
    c = _Checks("dataset" if domain is None else f"dataset/{domain}")
    missing = _missing_required(factory, 1, {"image_size", "seed", *opts})
    if missing:
        c.add("factory", True, _skip_message(missing))
        return c.results

    def build(s: int) -> DomainData:
        try:
            data = factory(domain, image_size=image_size, seed=s, **opts)
        except TypeError as exc:
            needed = _missing_from_type_error(exc)
            if needed and not opts:
                raise _Skip(_skip_message(needed)) from None
            raise
        if not isinstance(data, DomainData):
            raise _Fail(f"factory returned {type(data).__name__}, not harness.api.DomainData")
        return data

    with generators_kept():  # the checks seed freely; the caller's random state stays
        try:
            data = build(seed)
        except _Skip as skip:
            c.add("factory", True, str(skip))
            return c.results
        except Exception as exc:  # noqa: BLE001
            c.add("factory", False, _describe(exc))
            data = None
        if data is None:
            for check in (
                "contract",
                "image_size",
                "task",
                "class_names",
                "disjoint_splits",
                "deterministic",
                "fingerprint",
            ):
                c.blocked(check, ["factory"])
            return c.results
        c.add(
            "factory",
            True,
            f"{len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test images",
        )
        c.run("contract", lambda: _dataset_contract(data, image_size))
        c.run("image_size", lambda: _dataset_image_size(data, image_size))
        c.run("task", lambda: _dataset_task(data, declared))
        c.run("class_names", lambda: _dataset_class_names(data))
        c.run("disjoint_splits", lambda: _dataset_disjoint(data))
        c.run("deterministic", lambda: _dataset_deterministic(data, build(seed)))
        c.run("fingerprint", lambda: _dataset_fingerprint(data, build(seed + 1), seed))
    return c.results


def _dataset_contract(data: DomainData, size: int) -> None:
    try:
        data.check(size)
    except PluginContractError as exc:
        raise _Fail(str(exc)) from None
    for split_name in ("train", "val", "test"):
        y = getattr(data, split_name).y
        if data.task == "classification" and y.ndim != 1:
            raise _Fail(
                f"{split_name} labels of a classification domain must be (N,), got {tuple(y.shape)}"
            )
        if data.task == "segmentation" and y.ndim != 3:
            raise _Fail(
                f"{split_name} masks of a segmentation domain must be (N, H, W), got {tuple(y.shape)}"
            )


def _dataset_image_size(data: DomainData, size: int) -> None:
    for split_name in ("train", "val", "test"):
        shape = tuple(getattr(data, split_name).x.shape[1:])
        if shape != (3, size, size):
            raise _Fail(
                f"{split_name} images are {shape}, expected (3, {size}, {size}) for image_size={size}"
            )


def _dataset_task(data: DomainData, declared: Any) -> None:
    _declared_tasks(declared)
    if data.task not in TASKS:
        raise _Fail(f"DomainData.task is {data.task!r}; the harness knows {', '.join(TASKS)}")
    if data.task not in declared:
        raise _Fail(
            f"the data are for {data.task!r} but the dataset is registered with tasks={tuple(declared)}: "
            "declare the task in register(..., tasks=(...))"
        )


def _dataset_class_names(data: DomainData) -> str | None:
    names = data.class_names
    if not isinstance(names, list | tuple) or not names:
        raise _Fail(f"class_names must be a non-empty list of strings, got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise _Fail(f"class names must be non-empty strings, got {bad[:5]!r}")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise _Fail(f"class names must be unique; repeated: {dupes[:5]!r}")
    return None if len(names) > 1 else "only one class"


def _hashes(x: Tensor) -> list[bytes]:
    x = x.detach().cpu().contiguous()
    return [hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest() for img in x]


def _dataset_disjoint(data: DomainData) -> str | None:
    train = set(_hashes(data.train.x))
    notes = []
    for split_name in ("test", "val"):
        hashes = _hashes(getattr(data, split_name).x)
        shared = sum(h in train for h in hashes)
        share = shared / max(1, len(hashes))
        if share > DUPLICATE_TOLERANCE:
            raise _Fail(
                f"{shared} of {len(hashes)} {split_name} images ({share:.0%}) are byte-identical to "
                f"train images (tolerance {DUPLICATE_TOLERANCE:.0%}): train, val and test must be "
                "disjoint splits (harness.api.DomainData.from_arrays splits one pool for you)"
            )
        if shared:
            notes.append(
                f"{shared} of {len(hashes)} {split_name} images also in train (within tolerance)"
            )
    return "; ".join(notes) or None


def _dataset_deterministic(a: DomainData, b: DomainData) -> None:
    differ = _differences(a, b)
    if differ:
        raise _Fail(
            f"two calls with the same arguments gave different data ({', '.join(differ)}): seed every "
            "random choice, so that trials and resumed runs see the same images in the same splits"
        )
    if a.fingerprint != b.fingerprint:
        raise _Fail(
            f"two calls with the same arguments gave the same data but different fingerprints "
            f"({a.fingerprint!r} vs {b.fingerprint!r}): the fingerprint must depend on the data only"
        )


def _differences(a: DomainData, b: DomainData) -> list[str]:
    out = []
    if a.task != b.task:
        out.append("task")
    if list(a.class_names) != list(b.class_names):
        out.append("class_names")
    for split_name in ("train", "val", "test"):
        sa, sb = getattr(a, split_name), getattr(b, split_name)
        for part in ("x", "y"):
            ta, tb = getattr(sa, part), getattr(sb, part)
            if ta.shape != tb.shape or not torch.equal(ta, tb):
                out.append(f"{split_name}.{part}")
    return out


def _dataset_fingerprint(a: DomainData, other: DomainData, seed: int) -> str | None:
    if not isinstance(a.fingerprint, str) or not a.fingerprint:
        raise _Fail(
            f"fingerprint must be a non-empty string, got {a.fingerprint!r} "
            "(harness.api.fingerprint_tensors computes one)"
        )
    differ = _differences(a, other)
    if differ and a.fingerprint == other.fingerprint:
        raise _Fail(
            f"seed {seed} and seed {seed + 1} give different data ({', '.join(differ)}) with the same "
            f"fingerprint {a.fingerprint!r}: the fingerprint must change when the images, labels or "
            "split change (hash the pool and the split indices, e.g. with harness.api.fingerprint_tensors)"
        )
    if not differ and a.fingerprint != other.fingerprint:
        raise _Fail(
            f"seed {seed} and seed {seed + 1} give identical data but different fingerprints: the "
            "fingerprint must depend on the data only"
        )
    return None if differ else "the seed has no effect on the data or splits"


# =========================================================================================== strategies


@dataclass
class _Recorded:
    batches: list[Batch] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def check_strategy(
    entry_or_factory: EntryOrFactory,
    *,
    options: Mapping[str, Any] | None = None,
    task: str = "classification",
    backbone: str = "test_resnet",
) -> list[CheckResult]:
    """Check a strategy factory ``factory(**options) -> Strategy`` (usually the class itself).

    ``options`` are the study's ``strategy_options`` (``{"shots": 5}``). The training check runs
    the harness's own engine for one epoch of a few steps on tiny random data: the tiny timm
    ``backbone`` with a linear head on 32 px images for ``task="classification"``, or with the
    ``fpn`` segmentation head on 64 px images for ``task="segmentation"``. Checks, named
    ``strategy.<check>``: ``factory``, ``declarations``, ``search_space``, ``unknown_option``,
    ``trains`` and ``target_labels``. A factory with required options that are not given is
    skipped (one passed ``strategy.factory`` result saying ``"skipped: needs options: ..."``).
    """
    factory, _, _ = _unpack(entry_or_factory, "strategy")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    opts = dict(options or {})
    c = _Checks("strategy")
    missing = _missing_required(factory, 0, opts)
    if missing:
        c.add("factory", True, _skip_message(missing))
        return c.results
    with generators_kept():  # the checks seed freely; the caller's random state stays
        strategy = c.value("factory", lambda: _build_strategy(factory, opts))
        if strategy is None:
            for check in (
                "declarations",
                "search_space",
                "unknown_option",
                "trains",
                "target_labels",
            ):
                c.blocked(check, ["factory"])
            return c.results
        c.run("declarations", lambda: _strategy_declarations(strategy, task))
        space = c.value("search_space", lambda: _strategy_search_space(strategy))
        c.run("unknown_option", lambda: _strategy_unknown_option(factory, opts))
        record = _Recorded()
        c.run(
            "trains",
            lambda: _strategy_trains(strategy, space or {}, task, backbone, record),
            needs=["declarations", "search_space"],
        )
        if record.batches or "trains" not in c.failed:
            c.run("target_labels", lambda: _strategy_target_labels(strategy, record))
        else:
            c.blocked("target_labels", ["trains"])
    return c.results


def _build_strategy(factory: Callable[..., Any], opts: dict[str, Any]) -> Strategy:
    s = factory(**opts)
    if not isinstance(s, Strategy):
        raise _Fail(f"factory returned {type(s).__name__}, not a harness.api.Strategy")
    return s


def _strategy_declarations(s: Strategy, task: str) -> str | None:
    for attr in ("uses_source", "uses_target"):
        if not isinstance(getattr(s, attr), bool):
            raise _Fail(f"{attr} must be a bool, got {getattr(s, attr)!r}")
    if not (s.uses_source or s.uses_target):
        raise _Fail(
            "uses_source and uses_target are both False: the strategy would receive no data"
        )
    labels = s.target_labels
    if labels not in TARGET_LABELS:
        raise _Fail(f"target_labels must be one of {TARGET_LABELS}, got {labels!r}")
    shots = s.shots
    if labels == "few" and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise _Fail(
            f"target_labels='few' needs shots, a positive int (labelled images per class), got {shots!r}"
        )
    if shots and labels != "few":
        raise _Fail(
            f"shots={shots!r} but target_labels={labels!r}: a k-shot strategy declares 'few', so that "
            "leaderboards report how many target labels it used"
        )
    if shots and task != "classification":
        raise _Fail("shots (k labelled images per class) applies to classification only")
    if labels != "none" and not s.uses_target:
        raise _Fail(
            f"target_labels={labels!r} but uses_target=False: the strategy never receives target "
            "batches; declare target_labels='none' (it is reported as oracle otherwise)"
        )
    fixed = s.fixed
    if not isinstance(fixed, Mapping):
        raise _Fail(f"fixed must be a dict of pinned hyperparameters, got {type(fixed).__name__}")
    if "freeze_depth" in fixed:
        depth = fixed["freeze_depth"]
        if depth != "all" and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
            raise _Fail(f"fixed['freeze_depth'] must be 'all' or an int >= 0, got {depth!r}")
    unread = sorted(k for k in fixed if k not in KNOWN_FIXED)
    return f"fixed keys the harness does not read: {unread}" if unread else None


def _strategy_search_space(s: Strategy) -> dict[str, Any]:
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        space = s.search_space(trial)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if not isinstance(space, Mapping):
        raise _Fail(f"search_space must return a dict of name -> value, got {type(space).__name__}")
    bad = [k for k in space if not (isinstance(k, str) and k.startswith("strategy."))]
    if bad:
        raise _Fail(
            f"search_space returned {bad}: names must start with 'strategy.' (e.g. "
            f"'strategy.{bad[0]}') so that they cannot collide with the harness's own "
            "hyperparameters (backbone.lr, head.lr, ...); the harness refuses the trial otherwise"
        )
    suggested = [k for k in trial.distributions if not k.startswith("strategy.")]
    if suggested:
        raise _Fail(
            f"search_space suggested optuna parameters {suggested}: suggest them as 'strategy.<name>' "
            "too, or they collide with the harness's own in the study"
        )
    try:
        json.dumps(dict(space))
    except (TypeError, ValueError) as exc:
        raise _Fail(
            f"search_space values must be JSON-serialisable (they are stored with the trial): {exc}"
        ) from None
    return dict(space)


def _strategy_unknown_option(factory: Callable[..., Any], opts: dict[str, Any]) -> None:
    try:
        factory(**opts, **{UNKNOWN_OPTION: 1})
    except TypeError:
        return
    except Exception as exc:  # noqa: BLE001
        raise _Fail(
            f"an unknown option raised {_describe(exc)}; raise TypeError so that the harness reports "
            "it as a strategy_options error"
        ) from None
    raise _Fail(
        f"the unknown option {UNKNOWN_OPTION}=1 was accepted silently: reject unknown options with "
        "TypeError (harness.api.Strategy.__init__ does) so that a typo fails before training"
    )


def _tiny_domain(name: str, task: str, n: int, size: int, seed: int) -> DomainData:
    """Random images with a learnable signal, ``NUM_CLASSES`` classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    if task == "segmentation":
        y = torch.randint(0, NUM_CLASSES, (n, size, size), generator=g)
        x[:, 0] = (y * 100).clamp(max=255).to(torch.uint8)
        y[:, :, :2] = IGNORE_INDEX
    else:
        y = torch.arange(n) % NUM_CLASSES
        x[:, 0] = (y * 100).view(-1, 1, 1).to(torch.uint8)
    return DomainData.from_arrays(name, x, y, class_names=names, seed=seed, task=task)  # type: ignore[arg-type]


def _strategy_trains(
    s: Strategy, space: dict[str, Any], task: str, backbone: str, record: _Recorded
) -> str:
    segmentation = task == "segmentation"
    size, n = (64, 10) if segmentation else (32, 24)
    source = _tiny_domain("contract-source", task, n, size, seed=0)
    target = _tiny_domain("contract-target", task, n, size, seed=1)
    bb = _tiny_backbone(backbone)
    if segmentation:
        from harness_plugins.smp_heads import SmpHead

        head: nn.Module = SmpHead("fpn", bb, NUM_CLASSES)
    else:
        head = nn.Linear(bb.num_features, NUM_CLASSES)
    model = TransferModel(bb, head, task)
    fixed = s.fixed if isinstance(s.fixed, Mapping) else {}
    depth = resolve_freeze_depth(fixed.get("freeze_depth", 0), model.num_stages)
    params: dict[str, Any] = {
        "backbone.freeze_depth": depth,
        "head.lr": 1e-2,
        "optimizer.weight_decay": 0.0,
        "augment.policy": "none",
    }
    if depth < model.num_stages:
        params["backbone.lr"] = 1e-3
    params.update(space)
    cfg = TrainConfig(
        epochs=1,
        batch_size=4 if segmentation else 8,
        backbone_lr=float(params.get("backbone.lr", 0.0)),
        head_lr=1e-2,
        weight_decay=0.0,
        freeze_depth=depth,
        augment="none",
        seed=0,
        device=_CPU,
        precision=Precision.for_device(_CPU, "fp32"),
        params=params,
        data_seed=0,
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    original = s.training_step

    def recording_step(model: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        record.batches.append(batch)
        loss = original(model, batch, ctx)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = (
                type(loss).__name__
                if not isinstance(loss, Tensor)
                else f"a tensor of shape {tuple(loss.shape)}"
            )
            raise _Fail(f"training_step must return the loss as a scalar tensor, got {got}")
        if not loss.requires_grad:
            raise _Fail(
                "training_step returned a loss that does not require grad: compute it from the "
                "model's output without detaching or torch.no_grad()"
            )
        record.losses.append(float(loss.detach()))
        return loss

    s.training_step = recording_step  # type: ignore[method-assign]
    try:
        result = Trainer(model, s, source, target, cfg).fit()
    except Exception as exc:
        raise _Fail(_describe(exc) + _label_hint(s, record, exc)) from None
    finally:
        with contextlib.suppress(AttributeError):
            del s.training_step
    if not record.losses:
        raise _Fail("the engine ran no training step")
    if not all(math.isfinite(v) for v in record.losses):
        raise _Fail(f"training produced non-finite losses: {record.losses}")
    changed = [
        name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())
    ]
    if not changed:
        raise _Fail(f"{len(record.losses)} training steps changed no model parameter")
    return (
        f"{len(record.losses)} steps on {size} px {task} data, mean loss {result.train_loss[-1]:.4f}; "
        f"{len(changed)} parameter tensors changed"
    )


def _label_hint(s: Strategy, record: _Recorded, exc: BaseException) -> str:
    """A strategy that declares no target labels and crashes on ``y=None`` gets told why."""
    got_none = any(b.target is not None and b.target[1] is None for b in record.batches)
    if (
        got_none
        and s.target_labels == "none"
        and isinstance(exc, TypeError | AttributeError | ValueError)
    ):
        return (
            "; this strategy declares target_labels='none', so the engine hands it target batches "
            "with y=None: if training_step reads target labels, declare target_labels='all' (or "
            "'few' with shots), which marks it as using target labels on every leaderboard"
        )
    return ""


def _strategy_target_labels(s: Strategy, record: _Recorded) -> str:
    if not record.batches:
        raise _Fail("the engine ran no training step, so no batch could be inspected")
    labels = s.target_labels
    for i, b in enumerate(record.batches):
        if s.uses_source and (b.source is None or b.source[1] is None):
            raise _Fail(f"step {i}: uses_source=True but the batch holds no labelled source data")
        if not s.uses_source and b.source is not None:
            raise _Fail(f"step {i}: uses_source=False but the batch holds source data")
        if s.uses_target and b.target is None:
            raise _Fail(f"step {i}: uses_target=True but the batch holds no target data")
        if not s.uses_target and b.target is not None:
            raise _Fail(f"step {i}: uses_target=False but the batch holds target data")
        if b.target is not None:
            if labels == "none" and b.target[1] is not None:
                raise _Fail(f"step {i}: target_labels='none' but the target batch carries labels")
            if labels != "none" and b.target[1] is None:
                raise _Fail(
                    f"step {i}: target_labels={labels!r} but the target batch carries no labels"
                )
    return f"target_labels={labels!r} honoured in {len(record.batches)} steps"


# =========================================================================================== commands


def check_command(entry_or_function: EntryOrFactory, name: str | None = None) -> list[CheckResult]:
    """Check a command registered with ``register_commands``: ``function`` becomes ``harness <name>``.

    ``name`` is the subcommand name (from the entry when an Entry is given; for a bare function
    its name with ``-`` for ``_``). The command is mounted on a fresh typer app the way the
    harness mounts it and asked for ``--help``; nothing is run. Checks, named
    ``command.<check>``: ``name`` (not a built-in command), ``help`` (typer accepts the
    signature) and ``docs`` (a description or docstring for ``harness --help``).
    """
    function, entry_name, _ = _unpack(entry_or_function, "command")
    description = entry_or_function.description if isinstance(entry_or_function, Entry) else ""
    name = name or entry_name or getattr(function, "__name__", "").replace("_", "-")
    c = _Checks("command")
    c.run("name", lambda: _command_name(name))
    c.run("help", lambda: _command_help(function, name, description))
    c.run("docs", lambda: _command_docs(function, description))
    return c.results


def _command_name(name: str) -> None:
    from harness.cli import BUILTIN_COMMANDS

    if not name:
        raise _Fail("the command has no name")
    if name in BUILTIN_COMMANDS:
        raise _Fail(
            f"{name!r} is a built-in harness command, so the harness refuses to add it; pick another name"
        )


def _command_help(function: Callable[..., Any], name: str, description: str) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _group() -> None:
        """A group, so that the command is reached by its name as under ``harness``."""

    how = "declare parameters the way typer reads them (type hints, typer.Option defaults)"
    try:
        app.command(name or "command", help=description or None)(function)
        result = CliRunner().invoke(app, [name or "command", "--help"])
    except Exception as exc:  # noqa: BLE001 - typer refuses signatures in many ways
        raise _Fail(f"`harness {name} --help` fails: {_describe(exc)}; {how}") from None
    if result.exit_code != 0:
        why = _describe(result.exception) if result.exception else result.output.strip()[-300:]
        raise _Fail(f"`harness {name} --help` fails (exit {result.exit_code}): {why}; {how}")


def _command_docs(function: Callable[..., Any], description: str) -> None:
    if not (description or "").strip() and not (inspect.getdoc(function) or "").strip():
        raise _Fail(
            "no description and no docstring: `harness --help` would list the command without a "
            "word; pass description= to register() or give the function a docstring"
        )


# =========================================================================================== registry

#: the kinds of entry the kit checks (a kind added to the registry later is reported as unchecked)
CHECKED_KINDS = ("backbone", "head", "dataset", "strategy", "command")


def check_entry(entry: Entry, **kwargs: Any) -> list[CheckResult]:
    """Check one registry entry with the check function of its kind.

    ``kwargs`` go to that function (``image_size=``, ``options=``, ...). A dataset that declares
    sub-domains (``register(..., domains=[...])``) is checked on each of them unless ``domain=``
    is given.
    """
    if entry.kind == "backbone":
        return check_backbone(entry, **kwargs)
    if entry.kind == "head":
        return check_head(entry, **kwargs)
    if entry.kind == "dataset":
        domains = entry.meta.get("domains")
        if domains and "domain" not in kwargs:
            return [r for d in domains for r in check_dataset(entry, d, **kwargs)]
        return check_dataset(entry, **kwargs)
    if entry.kind == "strategy":
        return check_strategy(entry, **kwargs)
    if entry.kind == "command":
        return check_command(entry, **kwargs)
    raise ValueError(f"the kit has no checks for {entry.kind} entries ({entry.name!r})")


def check_plugin(
    registry: Registry,
    name: str,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    max_backbones: int = MAX_BACKBONES,
) -> dict[str, list[CheckResult]]:
    """Check every entry that the plugin ``name`` (its entry-point name) registered.

    Returns ``{"kind:name": results}``; a plugin that failed to load gets ``"plugin:<name>"``
    with a failed ``plugin.load`` result. ``options`` gives keyword arguments for the check
    functions, by kind (``{"dataset": {"image_size": 16}}``) and by entry
    (``{"dataset:shapes": {"options": {"n": 30}}, "head:pan": {"seg_image_size": 128}}``); the
    entry's win. A plugin that registers more than ``max_backbones`` backbones (timm registers
    every timm model) is checked on its backbones named ``test_*`` only.
    """
    if name not in registry.plugins:
        raise ValueError(unknown_message("plugin", name, sorted(registry.plugins)))
    options = options or {}
    out: dict[str, list[CheckResult]] = {}
    info = registry.plugins[name]
    if info.error:
        out[f"plugin:{name}"] = [CheckResult("plugin.load", False, info.error)]
    for kind in KINDS:
        entries = sorted(
            (e for e in registry.entries[kind].values() if e.plugin == name), key=lambda e: e.name
        )
        if kind == "backbone" and len(entries) > max_backbones:
            entries = [e for e in entries if e.name.startswith("test_")]
        for entry in entries:
            key = f"{kind}:{entry.name}"
            if kind not in CHECKED_KINDS:
                out[key] = [
                    CheckResult(
                        f"{kind}.unchecked",
                        True,
                        f"{_SKIPPED}the kit has no checks for {kind} entries",
                    )
                ]
                continue
            kwargs = {**dict(options.get(kind, {})), **dict(options.get(key, {}))}
            out[key] = check_entry(entry, **kwargs)
    return out
