"""The mark on rows whose selection rule reads no target labels but whose search (the sampler and
pruner, driven by the study's first rule) did: their trial was picked label-free among trials
that target labels shaped. One owner, so every table marks and explains them the same way."""

from __future__ import annotations

from typing import Any

from harness.publish.format import truthy
from harness.publish.results import reads_target_labels

SEARCH_MARK = "†"
SEARCH_LEGEND = (
    f"{SEARCH_MARK} target labels drove this row's search (the study's first rule, which the "
    "sampler and pruner follow, is target-val); its own rule only picked among those trials."
)


def search_marked(row: dict[str, Any]) -> bool:
    """Whether ``row`` is selected without target labels from a search that saw them."""
    return truthy(row.get("search_saw_target_labels")) and not reads_target_labels(
        str(row.get("selection") or "")
    )


def search_mark(row: dict[str, Any]) -> str:
    """The mark to put after the row's selection rule (empty when it needs none)."""
    return f" {SEARCH_MARK}" if search_marked(row) else ""
