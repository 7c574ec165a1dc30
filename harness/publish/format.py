"""Cell formatting shared by every published file: a number as a percentage or a mean ± standard
error, a row's selecting score, board records as JSON-ready dicts, a storage URL without its
password. One owner, so the Markdown, the HTML page, the CLI table and the results index agree."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd


def finite(v: Any) -> bool:
    """Whether ``v`` is a finite number (None, pandas' NA and non-numbers are not)."""
    try:
        return v is not None and v is not pd.NA and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def truthy(v: Any) -> bool:
    """A board cell as a flag: missing values (None, NA, NaN) are false."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(v)


def rank_cell(v: Any) -> str:
    """A board row's rank as shown: ``-`` for a row that is not ranked (unfinished or not started)."""
    return str(int(v)) if finite(v) else "-"


def pm(row: dict[str, Any], metric: str) -> str:
    """A row's test ``metric`` in %, mean ± standard error over its final seeds."""
    mean, std = row.get(f"test_{metric}"), row.get(f"test_{metric}_se")
    if not finite(mean):
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if finite(std) else f"{100 * mean:.1f}"


def val(row: dict[str, Any]) -> str:
    """The selecting score: a validation metric in %, or a label-free validator's raw value."""
    v = row.get("val_score")
    if row.get("selection") in ("target-val", "source-val"):
        return pct(v)
    return f"{float(v):.3f}" if finite(v) else "-"


def pct(v: Any) -> str:
    return f"{100 * v:.1f}" if finite(v) else "-"


def count(v: Any) -> int:
    """A trial count cell as an int (0 where the row has none)."""
    return int(v) if finite(v) else 0


def trial_counts(row: dict[str, Any]) -> str:
    """``ok/pruned/failed`` trial counts of a board row."""
    return (
        f"{count(row.get('trials_complete'))}/{count(row.get('trials_pruned'))}"
        f"/{count(row.get('trials_failed'))}"
    )


def records(board: pd.DataFrame) -> list[dict[str, Any]]:
    """The board's rows as plain Python dicts: NaN, infinities and NA become None."""
    out = []
    for rec in board.to_dict("records"):
        out.append(
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else _plain(v))
                for k, v in rec.items()
            }
        )
    return out


def _plain(v: Any) -> Any:
    if v is pd.NA:
        return None
    if hasattr(v, "item") and not isinstance(v, list | dict):
        return v.item()
    return v


def redact(url: str) -> str:
    """A storage URL without its credentials."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def shown_storage(url: str) -> str:
    """A storage URL as printed and published: no credentials, relative to the working folder."""
    return redact(url).replace(str(Path.cwd().resolve()) + "/", "")
