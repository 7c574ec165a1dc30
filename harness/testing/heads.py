"""Head checks: for every task a head declares, its output shape, backward pass and options."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api import IGNORE_INDEX, Backbone
from harness.options import signature_mismatches
from harness.testing.core import (
    NUM_CLASSES,
    TASKS,
    UNKNOWN_OPTION,
    CheckResult,
    Checks,
    EntryOrFactory,
    Fail,
    declared_tasks,
    describe,
    images,
    missing_required,
    skip_message,
    unpack,
)
from harness.testing.reference import tiny_backbone
from harness.training.engine import TransferModel, generators_kept

#: the checks of each declared task, in the order they run (``head.<task>.<check>``)
TASK_CHECKS = ("factory", "output", "backward", "unknown_option")


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
    ``unknown_option``; plus ``head.tasks``, ``head.declared_options`` (the options declared with
    ``register(options=...)`` match the factory's parameters) and ``head.backbone`` (the tiny
    backbone builds).
    A factory with required options that are not given is skipped with a passed note.
    """
    factory, _, meta = unpack(entry_or_factory, "head")
    raw = tasks if tasks is not None else meta.get("tasks", ("classification",))
    declared = _declared(raw)
    opts = dict(options or {})
    seg_size = max(seg_image_size, int(meta.get("min_image_size") or 0))
    c = Checks("head")
    c.run("tasks", lambda: declared_tasks(raw))
    c.run("declared_options", lambda: declared_options_match(factory, "head", meta))
    missing = missing_required(factory, 0, {"backbone", "num_classes", "task", *opts})
    if missing:
        c.add("factory", True, skip_message(missing))
        return c.results
    with generators_kept():  # the checks seed freely; the caller's random state stays
        c.run("backbone", lambda: _builds(backbone))
        for task in declared:
            if task in TASKS:
                size = seg_size if task == "segmentation" else image_size
                _check_head_task(c, factory, task, backbone, size, opts)
    return c.results


def declared_options_match(factory: Callable[..., Any], kind: str, meta: Mapping[str, Any]) -> str:
    """The options an entry declares are parameters of its factory, and every required parameter
    is declared (``harness.options.signature_mismatches``)."""
    problems = signature_mismatches(factory, kind, meta)
    if problems:
        raise Fail(
            "; ".join(problems) + ": register(options=...) must name what the factory takes, "
            "since the harness refuses any other option of a study"
        )
    if meta.get("options") is None:
        return "none declared: a study's options are checked against the factory's signature"
    return ""


def _builds(backbone: str) -> None:
    tiny_backbone(backbone)


def _check_head_task(
    c: Checks,
    factory: Callable[..., Any],
    task: str,
    backbone: str,
    size: int,
    opts: dict[str, Any],
) -> None:
    t = f"{task}."

    def build() -> tuple[Backbone, nn.Module]:
        bb = tiny_backbone(backbone)
        head = factory(backbone=bb, num_classes=NUM_CLASSES, task=task, **opts)
        if not isinstance(head, nn.Module):
            raise Fail(f"factory returned {type(head).__name__}, not a torch.nn.Module")
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
        out = model(images(2, size))
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
        raise Fail(f"{task} output is {type(out).__name__}, not a tensor; {how}")
    if tuple(out.shape) != expected:
        raise Fail(
            f"{task} output has shape {tuple(out.shape)}, expected {expected} for 2 images of "
            f"{size} px and num_classes={NUM_CLASSES}; {how}"
        )
    if not out.is_floating_point() or not torch.isfinite(out).all():
        raise Fail(
            f"{task} output must be finite floating-point logits, got {out.dtype} with NaN/inf"
        )


def _head_backward(bb: Backbone, head: nn.Module, task: str, size: int) -> str | None:
    model = _head_model(bb, head, task).train()
    model.zero_grad(set_to_none=True)
    out = model(images(2, size, seed=1))
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
        raise Fail("backward gave non-finite gradients")
    if not own:
        return "the head has no parameters of its own"
    if all(p.grad is None for p in own):
        raise Fail(
            "no head parameter received a gradient: the output must be computed from the head's "
            "parameters without detaching"
        )
    return None


def _head_unknown_option(
    factory: Callable[..., Any], backbone: str, task: str, opts: dict[str, Any]
) -> None:
    bb = tiny_backbone(backbone)
    try:
        factory(backbone=bb, num_classes=NUM_CLASSES, task=task, **opts, **{UNKNOWN_OPTION: 1})
    except TypeError:
        return
    except Exception as exc:  # noqa: BLE001
        raise Fail(
            f"an unknown option raised {describe(exc)}; raise TypeError so that the harness reports "
            "it as a head_options error"
        ) from None
    raise Fail(
        f"the unknown option {UNKNOWN_OPTION}=1 was accepted silently: reject unknown options with "
        "TypeError (do not swallow **options) so that a typo in head_options fails before training"
    )


def check_names(meta: Mapping[str, Any], tasks: Sequence[str] | None = None) -> list[str]:
    """The names :func:`check_head` reports, without running it (a skipped factory reports fewer)."""
    raw = tasks if tasks is not None else meta.get("tasks", ("classification",))
    names = ["head.tasks", "head.declared_options", "head.backbone"]
    try:
        declared = _declared(raw)
    except TypeError:  # check_head raises it too: every check of the entry then errors
        return names
    return names + [f"head.{t}.{n}" for t in declared if t in TASKS for n in TASK_CHECKS]


def _declared(raw: Any) -> tuple[str, ...]:
    return (raw,) if isinstance(raw, str) else tuple(raw)
