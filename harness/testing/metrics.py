"""Metric checks: a metric builds for a number of classes, takes the outputs of its task in a
few ``update`` calls, and computes a finite fraction (or one value per class), the same however
the rows are split between calls."""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.api import IGNORE_INDEX
from harness.api.metric import Metric
from harness.testing.core import CheckResult, Checks, EntryOrFactory, Fail, unpack

#: the checks, in the order they run (``metric.<check>``)
CHECKS = ("factory", "classification", "segmentation", "chunked")
CLASSES = 4


def check_metric(entry_or_factory: EntryOrFactory) -> list[CheckResult]:
    """Check a metric registered with ``register_metrics``: ``factory(num_classes=4)`` gives a
    ``harness.api.Metric``; for each task it serves, seeded outputs of that task give a finite
    value in [0, 1] (or a list of 4 such values, NaN allowed), equal whether fed in one
    ``update`` or in several."""
    factory, _, meta = unpack(entry_or_factory, "metric")
    tasks = meta.get("tasks", ("classification",))
    c = Checks("metric")
    c.run("factory", lambda: _builds(factory))
    for task in ("classification", "segmentation"):
        if task in tasks:
            c.run(task, lambda task=task: _value(factory, task, 1), needs=["factory"])
        else:
            c.add(task, True, f"not served (tasks={tuple(tasks)})")
    c.run("chunked", lambda: _chunked(factory, tasks[0]), needs=["factory"])
    return c.results


def _builds(factory: Any) -> None:
    metric = factory(num_classes=CLASSES)
    if not isinstance(metric, Metric):
        raise Fail(f"factory(num_classes={CLASSES}) returned {type(metric).__name__}, not a Metric")


def outputs(task: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded outputs and targets of ``task``: 40 rows of logits, or 4 masks of 8x8 with void."""
    g = torch.Generator().manual_seed(seed)
    if task == "classification":
        return torch.randn(40, CLASSES, generator=g), torch.randint(0, CLASSES, (40,), generator=g)
    truth = torch.randint(0, CLASSES, (4, 8, 8), generator=g)
    truth[:, 0] = IGNORE_INDEX
    return torch.randint(0, CLASSES, (4, 8, 8), generator=g), truth


def _value(factory: Any, task: str, parts: int) -> Any:
    metric = factory(num_classes=CLASSES)
    out, target = outputs(task)
    for o, t in zip(out.chunk(parts), target.chunk(parts), strict=True):
        metric.update(o, t)
    value = metric.compute()
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) != CLASSES:
        raise Fail(f"a per-class value must have {CLASSES} entries, got {len(value)}")
    for v in values:
        if not isinstance(v, int | float) or not (math.isnan(v) or 0 <= v <= 1):
            raise Fail(
                f"computed {v!r}: a metric is a fraction in [0, 1] (NaN for an absent class)"
            )
        if math.isnan(v) and not isinstance(value, list):
            raise Fail("computed NaN: only per-class values may be NaN")
    return value


def _chunked(factory: Any, task: str) -> None:
    whole, parts = _value(factory, task, 1), _value(factory, task, 4)
    same = whole == parts or (
        isinstance(whole, list)
        and all(
            a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(whole, parts, strict=True)
        )
    )
    if not same:
        raise Fail(f"one update gave {whole}, four gave {parts}: accumulate over update calls")


def check_names(meta: dict[str, Any] | None = None) -> list[str]:
    """The names :func:`check_metric` reports, without running it."""
    return [f"metric.{n}" for n in CHECKS]
