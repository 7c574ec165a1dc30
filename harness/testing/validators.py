"""Validator checks: a selection rule builds, declares what it reads from the menu, and scores
synthetic inputs of the declared kinds with a finite number, the same one twice.

The synthetic inputs are random logits, labels and features of plausible shapes (two domains of
40 rows, 4 classes, 8 feature dimensions): a rule that needs real data to give a meaningful value
still has to give a finite one here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from harness.api.validation import SEGMENTATION_INPUTS, Validator, declaration_problem
from harness.testing.core import CheckResult, Checks, EntryOrFactory, Fail, unpack

#: the checks, in the order they run (``validator.<check>``)
CHECKS = ("factory", "declaration", "tasks", "score", "deterministic")
ROWS, CLASSES, DIM = 40, 4, 8


def check_validator(entry_or_factory: EntryOrFactory) -> list[CheckResult]:
    """Check a validator registered with ``register_validators``: ``factory()`` must return a
    ``harness.api.Validator`` whose ``reads`` come from ``VALIDATOR_INPUTS`` (``candidates``
    alone for a pooled rule), whose segmentation rules read only what segmentation provides,
    and whose score of synthetic inputs is a finite float, the same when asked twice."""
    factory, _, meta = unpack(entry_or_factory, "validator")
    c = Checks("validator")
    validator = c.value("factory", factory)
    c.run("declaration", lambda: _declared(validator), needs=["factory"])
    c.run("tasks", lambda: _tasks(validator, meta), needs=["declaration"])
    first = c.value("score", lambda: _score(validator), needs=["declaration"])
    c.run("deterministic", lambda: _same(validator, first), needs=["score"])
    return c.results


def _declared(validator: Any) -> None:
    problem = declaration_problem(validator)
    if problem:
        raise Fail(problem)


def _tasks(validator: Validator, meta: dict[str, Any]) -> None:
    if "segmentation" not in meta.get("tasks", ("classification", "segmentation")):
        return
    missing = [r for r in validator.reads if r not in (*SEGMENTATION_INPUTS, "candidates")]
    if missing:
        raise Fail(
            f"serves segmentation but reads {missing[0]!r}, which segmentation does not provide "
            f"({', '.join(SEGMENTATION_INPUTS)}); register it with tasks=('classification',)"
        )


def synthetic_inputs(seed: int = 0) -> dict[str, Any]:
    """One value of every menu item, seeded."""
    g = torch.Generator().manual_seed(seed)
    return {
        "target_logits": torch.randn(ROWS, CLASSES, generator=g),
        "target_labels": torch.randint(0, CLASSES, (ROWS,), generator=g),
        "source_logits": torch.randn(ROWS, CLASSES, generator=g),
        "source_labels": torch.randint(0, CLASSES, (ROWS,), generator=g),
        "target_features": torch.randn(ROWS, DIM, generator=g) + 0.5,
        "source_features": torch.randn(ROWS, DIM, generator=g),
        "target_metric": 0.5,
        "source_metric": 0.75,
        "candidates": [torch.randn(ROWS, CLASSES, generator=g).softmax(1) for _ in range(3)],
    }


def _score(validator: Validator) -> list[float]:
    inputs = synthetic_inputs()
    if validator.pooled:
        values = list(validator.score_candidates(inputs["candidates"]))
        if len(values) != len(inputs["candidates"]):
            raise Fail(f"score_candidates gave {len(values)} values for 3 candidates")
    else:
        values = [validator.score({r: inputs[r] for r in validator.reads})]
    for v in values:
        if not isinstance(v, int | float) or not math.isfinite(v):
            raise Fail(f"scored {v!r}: a rule's value must be a finite float")
    return [float(v) for v in values]


def _same(validator: Validator, first: list[float] | None) -> None:
    again = _score(validator)
    if again != first:
        raise Fail(f"scored {first} then {again} on the same inputs: seed any randomness")


def check_names() -> list[str]:
    """The names :func:`check_validator` reports, without running it."""
    return [f"validator.{n}" for n in CHECKS]
