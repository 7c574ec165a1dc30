"""The index of published studies, read back from each ``<study>/leaderboard.json``:
``results/README.md`` (one row per study, its headline: the rank-1 row of each pair, and links) and
the state ``harness ls`` shows (not started, partial or published)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from harness.fileio import write_text
from harness.metrics import LABELS, METRICS, primary_metric
from harness.publish.format import pm


def write_results_index(results_root: Path) -> Path:
    """Regenerate ``results_root/README.md``: one row per ``<study>/leaderboard.json``."""
    results_root = Path(results_root)
    results_root.mkdir(parents=True, exist_ok=True)
    rows, unfinished = [], []
    for board_file in sorted(results_root.glob("*/leaderboard.json")):
        row, missing = _study_row(board_file)
        if missing is None:
            rows.append(row)
        else:  # an interrupted or running study is not published: listed apart
            unfinished.append([row[0], row[1], missing, row[4]])
    lines = [
        "# Published results",
        "",
        "Every study published in this folder. *Headline*: the rank-1 row of each source → target pair "
        "among the rows not flagged oracle (reference rows, trained on target labels in a table of "
        "methods compared without them, are not ranked), its target **test** primary metric in %, "
        "mean ± standard error over the seeded final runs, and the rule that selected its trial: a labelled "
        "validation split (`target-val`, `source-val`) or a label-free validator scoring unlabelled "
        "target validation images (`im`, `snd`, ...); a method picked by several rules with the same "
        "result is listed once with all of them. *Notes* after a description are the study's own "
        "disclosures (its `notes`). Each study's `index.html` is a self-contained "
        "report with plots; `leaderboard.md` the table and provenance.",
        "",
        "This file is generated from each `<study>/leaderboard.json`; do not edit it by hand.",
        "",
    ]
    if rows:
        lines += [
            "| study | description | headline (rank 1 per pair) | rows | report |",
            "|---|---|---|--:|---|",
            *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows),
        ]
    else:
        lines.append("No study has been published yet.")
    if unfinished:
        lines += [
            "",
            "## Unfinished",
            "",
            "Studies begun but not finished (interrupted, or still running): not published, and "
            "their rows are not final. Run the same `harness run` command again to finish one.",
            "",
            "| study | description | missing | report |",
            "|---|---|---|---|",
            *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in unfinished),
        ]
    path = results_root / "README.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _study_row(board_file: Path) -> tuple[list[str], str | None]:
    """study, description, headline, row count and links of one ``<study>/leaderboard.json``, and
    what it lacks when it is unfinished (None when it is complete)."""
    folder = board_file.parent
    name = folder.name
    missing = None
    try:
        data = json.loads(board_file.read_text(encoding="utf-8"))
        records = data.get("rows") or []
        description = data.get("description") or ""
        if data.get("notes"):
            description += f" *Notes:* {data['notes']}"
        headline = _headline(records)
        count = str(len(records))
        missing = _missing(data)
    except (OSError, ValueError, AttributeError) as exc:
        description, headline, count = (
            f"(unreadable leaderboard.json: {type(exc).__name__})",
            "-",
            "-",
        )
    links = []
    if (folder / "index.html").is_file():
        links.append(f"[index.html]({quote(name)}/index.html)")
    if (folder / "leaderboard.md").is_file():
        links.append(f"[leaderboard.md]({quote(name)}/leaderboard.md)")
    return [name, description, headline, count, " · ".join(links) or "-"], missing


def _missing(data: dict[str, Any]) -> str | None:
    """What an unfinished study's ``leaderboard.json`` lacks, in words; None when it is complete.
    A file written before the ``state`` key is judged by its rows' statuses."""
    statuses = [r.get("status", "final") for r in data.get("rows") or []]
    if data.get("state") != "partial" and statuses and all(s == "final" for s in statuses):
        return None
    missing = data.get("missing") or {}
    not_started = missing.get("not_started", [None] * statuses.count("not started"))
    short = sum(s not in ("final", "not started") for s in statuses)
    parts = [f"{len(not_started)} not started"] if not_started else []
    parts += [f"{short} row(s) without all final seeds"] if short else []
    return ", ".join(parts) or "no rows"


def _headline(records: list[dict[str, Any]]) -> str:
    metric = next(
        (
            primary_metric(task)
            for task in METRICS
            if any(f"test_{primary_metric(task)}" in r for r in records)
        ),
        None,
    )
    if metric is None:
        return "-"
    # one entry per (pair, method, score): rules that picked the same result share it
    entries: dict[tuple[str, str, str], list[str]] = {}
    for r in records:
        if r.get("rank") == 1 and not r.get("oracle"):  # oracle rows rank among themselves
            key = (str(r.get("pair")), str(r.get("label") or r.get("method")), pm(r, metric))
            rules = entries.setdefault(key, [])
            if r.get("selection") and r["selection"] not in rules:
                rules.append(str(r["selection"]))
    parts = [
        f"{pair}: {method}, {LABELS[metric]} {score}"
        + (f" (selected by {', '.join(rules)})" if rules else "")
        for (pair, method, score), rules in entries.items()
    ]
    return "; ".join(parts) or "-"


def _md_cell(text: str) -> str:
    # link cells keep their markdown; everything else is plain text
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "&lt;")


def study_state(study_file: Path, folder: Path) -> tuple[str, str, str]:
    """``harness ls``'s state (not started, partial or published), row count and description of
    the study ``study_file`` whose results are in ``folder``."""
    board = folder / "leaderboard.json"
    state, rows, description = "not started", "-", ""
    if board.is_file():
        data = json.loads(board.read_text())
        rows = str(len(data.get("rows", [])))
        description = data.get("description", "")
        state = "published" if _missing(data) is None else "partial"
    elif (folder / "optuna.db").is_file() or (folder / "optuna.journal").is_file():
        state = "partial"
    if not description:
        try:
            description = str(tomllib.loads(study_file.read_text()).get("description", ""))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            description = "(not valid TOML)"
    return state, rows, description
