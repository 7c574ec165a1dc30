"""Strategy checks: declarations, search space, options, and a few training steps in the engine."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from harness.api import IGNORE_INDEX, Batch, DomainData, StepContext, Strategy
from harness.api.strategy import declaration_problem
from harness.testing.core import (
    CPU,
    KNOWN_FIXED,
    NUM_CLASSES,
    TARGET_LABELS,
    TASKS,
    UNKNOWN_OPTION,
    CheckResult,
    Checks,
    EntryOrFactory,
    Fail,
    describe,
    missing_required,
    skip_message,
    unpack,
)
from harness.testing.heads import declared_options_match
from harness.testing.reference import SEGMENTATION_HEAD, reference, tiny_backbone
from harness.training.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    generators_kept,
    resolve_freeze_depth,
)

#: the checks, in the order they run (``strategy.<check>``)
CHECKS = ("factory", "declarations", "search_space", "unknown_option", "trains", "target_labels")


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
    segmentation_head: str = SEGMENTATION_HEAD,
) -> list[CheckResult]:
    """Check a strategy factory ``factory(**options) -> Strategy`` (usually the class itself).

    ``options`` are the study's ``strategy_options`` (``{"shots": 5}``). The training check runs
    the harness's own engine for one epoch of a few steps on tiny random data: the tiny timm
    ``backbone`` with a linear head on 32 px images for ``task="classification"``, or with the
    ``segmentation_head`` (``fpn``) on 64 px images for ``task="segmentation"``; both are found by
    name among the registered plugins. Checks, named
    ``strategy.<check>``: ``declared_options`` (the options declared with
    ``register(options=...)`` match the factory's parameters), ``factory``, ``declarations``, ``search_space``, ``unknown_option``,
    ``trains`` and ``target_labels``. A factory with required options that are not given is
    skipped (one passed ``strategy.factory`` result saying ``"skipped: needs options: ..."``).
    """
    factory, _, meta = unpack(entry_or_factory, "strategy")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    opts = dict(options or {})
    c = Checks("strategy")
    c.run("declared_options", lambda: declared_options_match(factory, "strategy", meta))
    missing = missing_required(factory, 0, opts)
    if missing:
        c.add("factory", True, skip_message(missing))
        return c.results
    with generators_kept():  # the checks seed freely; the caller's random state stays
        strategy = c.value("factory", lambda: _build_strategy(factory, opts))
        if strategy is None:
            for check in CHECKS[1:]:
                c.blocked(check, ["factory"])
            return c.results
        c.run("declarations", lambda: _strategy_declarations(strategy, task))
        space = c.value("search_space", lambda: _strategy_search_space(strategy))
        c.run("unknown_option", lambda: _strategy_unknown_option(factory, opts))
        record = _Recorded()
        models = (backbone, segmentation_head)
        c.run(
            "trains",
            lambda: _strategy_trains(strategy, space or {}, task, models, record),
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
        raise Fail(f"factory returned {type(s).__name__}, not a harness.api.Strategy")
    return s


def _strategy_declarations(s: Strategy, task: str) -> str | None:
    for attr in ("uses_source", "uses_target"):
        if not isinstance(getattr(s, attr), bool):
            raise Fail(f"{attr} must be a bool, got {getattr(s, attr)!r}")
    if not (s.uses_source or s.uses_target):
        raise Fail("uses_source and uses_target are both False: the strategy would receive no data")
    labels = s.target_labels
    if labels not in TARGET_LABELS:
        raise Fail(f"target_labels must be one of {TARGET_LABELS}, got {labels!r}")
    shots = s.shots
    if labels == "few" and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise Fail(
            f"target_labels='few' needs shots, a positive int (labelled images per class), got {shots!r}"
        )
    if shots and labels != "few":
        raise Fail(
            f"shots={shots!r} but target_labels={labels!r}: a k-shot strategy declares 'few', so that "
            "leaderboards report how many target labels it used"
        )
    if shots and task != "classification":
        raise Fail("shots (k labelled images per class) applies to classification only")
    if labels != "none" and not s.uses_target:
        raise Fail(
            f"target_labels={labels!r} but uses_target=False: the strategy never receives target "
            "batches; declare target_labels='none' (it is reported as oracle otherwise)"
        )
    problem = declaration_problem(s)
    if problem is not None:
        raise Fail(problem)
    fixed = s.fixed
    if not isinstance(fixed, Mapping):
        raise Fail(f"fixed must be a dict of pinned hyperparameters, got {type(fixed).__name__}")
    if "freeze_depth" in fixed:
        depth = fixed["freeze_depth"]
        if depth != "all" and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
            raise Fail(f"fixed['freeze_depth'] must be 'all' or an int >= 0, got {depth!r}")
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
        raise Fail(f"search_space must return a dict of name -> value, got {type(space).__name__}")
    bad = [k for k in space if not (isinstance(k, str) and k.startswith("strategy."))]
    if bad:
        raise Fail(
            f"search_space returned {bad}: names must start with 'strategy.' (e.g. "
            f"'strategy.{bad[0]}') so that they cannot collide with the harness's own "
            "hyperparameters (backbone.lr, head.lr, ...); the harness refuses the trial otherwise"
        )
    suggested = [k for k in trial.distributions if not k.startswith("strategy.")]
    if suggested:
        raise Fail(
            f"search_space suggested optuna parameters {suggested}: suggest them as 'strategy.<name>' "
            "too, or they collide with the harness's own in the study"
        )
    try:
        json.dumps(dict(space))
    except (TypeError, ValueError) as exc:
        raise Fail(
            f"search_space values must be JSON-serialisable (they are stored with the trial): {exc}"
        ) from None
    return dict(space)


def _strategy_unknown_option(factory: Callable[..., Any], opts: dict[str, Any]) -> None:
    try:
        factory(**opts, **{UNKNOWN_OPTION: 1})
    except TypeError:
        return
    except Exception as exc:  # noqa: BLE001
        raise Fail(
            f"an unknown option raised {describe(exc)}; raise TypeError so that the harness reports "
            "it as a strategy_options error"
        ) from None
    raise Fail(
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
    s: Strategy, space: dict[str, Any], task: str, models: tuple[str, str], record: _Recorded
) -> str:
    segmentation = task == "segmentation"
    size, n = (64, 10) if segmentation else (32, 24)
    source = _tiny_domain("contract-source", task, n, size, seed=0)
    target = _tiny_domain("contract-target", task, n, size, seed=1)
    model = _tiny_model(task, *models)
    cfg = _train_config(s, space, model, segmentation)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    s.training_step = _recording(s.training_step, record)  # type: ignore[method-assign]
    try:
        result = Trainer(model, s, source, target, cfg).fit()
    except Exception as exc:
        raise Fail(describe(exc) + _label_hint(s, record, exc)) from None
    finally:
        with contextlib.suppress(AttributeError):
            del s.training_step
    if not record.losses:
        raise Fail("the engine ran no training step")
    if not all(math.isfinite(v) for v in record.losses):
        raise Fail(f"training produced non-finite losses: {record.losses}")
    changed = [
        name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())
    ]
    if not changed:
        raise Fail(f"{len(record.losses)} training steps changed no model parameter")
    return (
        f"{len(record.losses)} steps on {size} px {task} data, mean loss {result.train_loss[-1]:.4f}; "
        f"{len(changed)} parameter tensors changed"
    )


def _tiny_model(task: str, backbone: str, segmentation_head: str) -> TransferModel:
    """The tiny backbone with a linear head, or with ``segmentation_head`` for segmentation."""
    if task == "segmentation":
        build_head = reference("head", segmentation_head).factory
        bb = tiny_backbone(backbone)
        head: nn.Module = build_head(backbone=bb, num_classes=NUM_CLASSES, task=task)
    else:
        bb = tiny_backbone(backbone)
        head = nn.Linear(bb.num_features, NUM_CLASSES)
    return TransferModel(bb, head, task)


def _train_config(
    s: Strategy, space: dict[str, Any], model: TransferModel, segmentation: bool
) -> TrainConfig:
    """One epoch on the CPU in fp32, the strategy's pinned freeze depth and its search space."""
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
    return TrainConfig(
        epochs=1,
        batch_size=4 if segmentation else 8,
        backbone_lr=float(params.get("backbone.lr", 0.0)),
        head_lr=1e-2,
        weight_decay=0.0,
        freeze_depth=depth,
        augment="none",
        seed=0,
        device=CPU,
        precision=Precision.for_device(CPU, "fp32"),
        params=params,
        data_seed=0,
    )


def _recording(
    original: Callable[[nn.Module, Batch, StepContext], Tensor], record: _Recorded
) -> Callable[[nn.Module, Batch, StepContext], Tensor]:
    """``training_step`` that records each batch and loss, and checks the loss it returns."""

    def recording_step(model: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        record.batches.append(batch)
        loss = original(model, batch, ctx)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = (
                type(loss).__name__
                if not isinstance(loss, Tensor)
                else f"a tensor of shape {tuple(loss.shape)}"
            )
            raise Fail(f"training_step must return the loss as a scalar tensor, got {got}")
        if not loss.requires_grad:
            raise Fail(
                "training_step returned a loss that does not require grad: compute it from the "
                "model's output without detaching or torch.no_grad()"
            )
        record.losses.append(float(loss.detach()))
        return loss

    return recording_step


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
        raise Fail("the engine ran no training step, so no batch could be inspected")
    labels = s.target_labels
    for i, b in enumerate(record.batches):
        if s.uses_source and (b.source is None or b.source[1] is None):
            raise Fail(f"step {i}: uses_source=True but the batch holds no labelled source data")
        if not s.uses_source and b.source is not None:
            raise Fail(f"step {i}: uses_source=False but the batch holds source data")
        if s.uses_target and b.target is None:
            raise Fail(f"step {i}: uses_target=True but the batch holds no target data")
        if not s.uses_target and b.target is not None:
            raise Fail(f"step {i}: uses_target=False but the batch holds target data")
        if b.target is not None:
            if labels == "none" and b.target[1] is not None:
                raise Fail(f"step {i}: target_labels='none' but the target batch carries labels")
            if labels != "none" and b.target[1] is None:
                raise Fail(
                    f"step {i}: target_labels={labels!r} but the target batch carries no labels"
                )
    return f"target_labels={labels!r} honoured in {len(record.batches)} steps"


def check_names() -> list[str]:
    """The names :func:`check_strategy` reports, without running it (a skipped factory reports
    ``declared_options`` and ``factory`` only)."""
    return ["strategy.declared_options"] + [f"strategy.{n}" for n in CHECKS]
