"""What the command line prints: its two consoles and the tables it shows."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from harness.publish.format import shown_storage

#: messages, progress and errors
console = Console(stderr=True, highlight=False, soft_wrap=True)
#: results: tables and listings a user may pipe elsewhere
out = Console(highlight=False, soft_wrap=True)


def run_header(driver: Any) -> str:
    """The line a run starts with: the study's size, device, precision and storage."""
    spec = driver.spec
    precision = (
        "precision auto: probed per backbone"
        if spec.precision == "auto"
        else driver.precision.describe()
    )
    return (
        f"study {spec.name}: {len(spec.pairs)} pair(s) x {len(spec.methods)} method(s), "
        f"{spec.budget.trials} trials each, device {driver.device} ({precision}), "
        f"storage {shown_storage(driver.storage_url)}"
    )


def print_board(spec: Any, board: Any) -> None:
    """The board as one table per pair on the terminal."""
    from harness.metrics import LABELS, primary_metric
    from harness.publish.format import pm, rank_cell, trial_counts, truthy

    metric = primary_metric(spec.task)
    for pair, rows in board.groupby("pair", sort=False):
        table = Table(
            title=f"{spec.name}: {pair}, target test {LABELS[metric]} % (mean ± standard error over seeds)"
        )
        for col in (
            "rank",
            "method",
            f"test {LABELS[metric]} %",
            "selection",
            "trials ok/pruned/failed",
        ):
            table.add_column(col, overflow="fold")
        for r in rows.to_dict("records"):
            table.add_row(
                rank_cell(r.get("rank")),
                r["method"],
                pm(r, metric),
                (r.get("selection") or "-") + (" (oracle)" if truthy(r.get("oracle")) else ""),
                trial_counts(r),
            )
        out.print(table)


def plugins_table(registry: Any) -> Table:
    """Every plugin with its distribution, version, what it registered and its load error."""
    table = Table(title="harness plugins")
    for col in ("plugin", "distribution", "version", "registered", "error"):
        table.add_column(col, overflow="fold")
    for info in sorted(registry.plugins.values(), key=lambda p: p.name):
        parts = []
        for k, names in info.registered.items():
            shown = ", ".join(names[:6]) + (
                f", ... ({len(names)} in all)" if len(names) > 6 else ""
            )
            parts.append(f"{k}: {shown}")
        table.add_row(info.name, info.dist, info.version, "\n".join(parts), info.error or "")
    out.print(table)
    return table
