"""DomainBed's table for leave-one-domain-out studies: per selection rule, one row per method, one
column per held-out domain and the average over them.

A *group* is a set of pairs that share their domains (sources and target together) and differ in
their target: every domain of the set held out once, trained on the others, as
``[[pairs]] leave_one_out`` writes them. At least three pairs make a group (two domains give a
pair each way, which is a board, not a leave-one-out table). A cell is the primary test metric's
mean ± standard error over the final seeds of the trial that the row's rule picked on that pair,
read from the board; the average is the mean of a row's cells, and only a row with every
held-out domain gets one. A study without a group gets no table, and its files stay as they were.
"""

from __future__ import annotations

import html
from typing import Any, NamedTuple

import pandas as pd

from harness.metrics import metric_label, primary_metric
from harness.publish.flags import SEARCH_LEGEND, search_mark, search_marked
from harness.publish.format import finite, truthy
from harness.study import Pair, StudySpec

#: fewest pairs a leave-one-out group has (DomainBed's smallest benchmarks have four domains)
MIN_GROUP = 3
#: a cell or an average that cannot be given
MISSING = "—"


class Group(NamedTuple):
    """Pairs holding out each of ``domains`` in turn, in study-file order."""

    domains: list[str]
    pairs: list[Pair]

    @property
    def held_out(self) -> list[str]:
        return [p.target for p in self.pairs]


def sources_of(pair: Pair) -> list[str]:
    """A pair's source domains as a list (one for a one-source pair)."""
    sources = getattr(pair, "sources", None)
    if sources is not None:
        return list(sources)
    return [pair.source] if isinstance(pair.source, str) else list(pair.source)


def groups(spec: StudySpec) -> list[Group]:
    """The study's leave-one-out groups, in the order of their first pair."""
    by_domains: dict[frozenset[str], list[Pair]] = {}
    for pair in spec.pairs:
        if getattr(pair, "in_domain", False):
            continue
        sources = sources_of(pair)
        if pair.target in sources:
            continue
        by_domains.setdefault(frozenset([*sources, pair.target]), []).append(pair)
    out = []
    for pairs in by_domains.values():
        held = list(dict.fromkeys(p.target for p in pairs))
        if len(held) < MIN_GROUP:
            continue
        firsts = [next(p for p in pairs if p.target == t) for t in held]  # one pair per target
        out.append(Group([*sources_of(firsts[0]), firsts[0].target], firsts))
    return out


def tables(spec: StudySpec, board: pd.DataFrame) -> list[dict[str, Any]]:
    """Every group's tables, one per selection rule, JSON-ready (fractions, not %); empty when
    the study has no leave-one-out group."""
    metric = primary_metric(spec.task)
    out = []
    for group in groups(spec):
        keys = [p.key for p in group.pairs]
        rows = [r for r in _records(board) if r.get("pair") in keys]
        out.append(
            {
                "domains": sorted(group.domains, key=_held_order(group)),
                "held_out": group.held_out,
                "pairs": keys,
                "metric": metric,
                "final_seeds": spec.final_seeds,
                "tables": [
                    {"selection": rule, "rows": _rule_rows(spec, group, rows, rule, metric)}
                    for rule in _rules(rows)
                ],
            }
        )
    return out


def _held_order(group: Group) -> Any:
    held = group.held_out
    return lambda d: held.index(d) if d in held else len(held)


def _records(board: pd.DataFrame) -> list[dict[str, Any]]:
    return board.to_dict("records") if len(board) else []


def _rules(rows: list[dict[str, Any]]) -> list[str]:
    """The selection rules of the group's rows, in board order (a row not started has none)."""
    return list(dict.fromkeys(r["selection"] for r in rows if _started(r)))


def _started(row: dict[str, Any]) -> bool:
    return row.get("status") != "not started" and bool(row.get("selection"))


def _rule_rows(
    spec: StudySpec, group: Group, rows: list[dict[str, Any]], rule: str, metric: str
) -> list[dict[str, Any]]:
    """One row per method that has a row under ``rule`` in the group, or none started at all."""
    out = []
    for method in spec.methods:
        mine = [r for r in rows if r.get("method") == method.key]
        picked = {r["pair"]: r for r in mine if _started(r) and r["selection"] == rule}
        if not picked and any(_started(r) for r in mine):
            continue  # selected by other rules only (``auto``)
        cells = {p.target: _cell(picked.get(p.key), metric) for p in group.pairs}
        means = [c["mean"] for c in cells.values()]
        out.append(
            {
                "method": method.key,
                "strategy": method.strategy,
                "oracle": any(truthy(r.get("oracle")) for r in picked.values()),
                "search_saw_target_labels": any(search_marked(r) for r in picked.values()),
                "cells": cells,
                "average": sum(means) / len(means) if all(finite(m) for m in means) else None,
            }
        )
    return out


def _cell(row: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    if row is None:
        return {"mean": None, "se": None, "n_seeds": 0, "status": "not started"}
    mean, se = row.get(f"test_{metric}"), row.get(f"test_{metric}_se")
    n = row.get("n_seeds")
    return {
        "mean": float(mean) if finite(mean) else None,
        "se": float(se) if finite(se) else None,
        "n_seeds": int(n) if finite(n) else 0,
        "status": row.get("status"),
    }


# --------------------------------------------------------------------------------------- shown


def _short(domains: list[str]) -> tuple[str, list[str]]:
    """A group's title and its domains as column heads: ``dataset/`` left out when they share it."""
    prefixes = {d.split("/", 1)[0] for d in domains}
    if len(prefixes) == 1 and all("/" in d for d in domains):
        return prefixes.pop(), [d.split("/", 1)[1] for d in domains]
    return "+".join(domains), list(domains)


def _pct(mean: Any, se: Any = None) -> str:
    if not finite(mean):
        return MISSING
    return f"{100 * mean:.1f} ± {100 * se:.1f}" if finite(se) else f"{100 * mean:.1f}"


def _cell_text(cell: dict[str, Any], final_seeds: int) -> str:
    text = _pct(cell["mean"], cell["se"])
    if finite(cell["mean"]) and cell.get("status") != "final":
        text += f" ({cell['n_seeds']}/{final_seeds})"
    return text


def _legend(group: dict[str, Any]) -> str:
    name = metric_label(group["metric"])
    return (
        f"Test {name} % on the held-out domain (column) of a model trained on the group's other "
        "domains, mean ± standard error over the final seeds "
        f"({group['final_seeds']}) of the trial the rule picked; avg: the mean over held-out domains, "
        f"{MISSING} where a method lacks one; (n/N): a cell with fewer final seeds than asked."
    )


def _title(group: dict[str, Any], rule: str) -> tuple[str, list[str]]:
    title, heads = _short(group["held_out"])
    return f"Leave one domain out: {title}, selected by {rule}", heads


def markdown_lines(spec: StudySpec, board: pd.DataFrame) -> list[str]:
    """The Markdown sections, one per group and rule (none for a study without a group)."""
    out: list[str] = []
    for group in tables(spec, board):
        for table in group["tables"]:
            title, heads = _title(group, table["selection"])
            rows = table["rows"]
            frame = pd.DataFrame(
                {
                    "method": [_label(r, "**oracle**") for r in rows],
                    **{
                        h: [_cell_text(r["cells"][d], group["final_seeds"]) for r in rows]
                        for h, d in zip(heads, group["held_out"], strict=True)
                    },
                    "avg": [_pct(r["average"]) for r in rows],
                }
            )
            marked = [SEARCH_LEGEND] if any(r["search_saw_target_labels"] for r in rows) else []
            table_text = frame.to_markdown(index=False, disable_numparse=True)
            out += [f"## {title}", "", table_text, "", _legend(group), "", *marked]
            out += [""] if marked else []
    return out


def _label(row: dict[str, Any], oracle: str) -> str:
    mark = search_mark({"search_saw_target_labels": row["search_saw_target_labels"]})
    return row["method"] + (f" {oracle}" if row["oracle"] else "") + mark


def html_sections(spec: StudySpec, board: pd.DataFrame) -> list[str]:
    """The same tables as HTML, in the page's table style (none for a study without a group)."""
    e = html.escape
    out: list[str] = []
    for group in tables(spec, board):
        for table in group["tables"]:
            title, heads = _title(group, table["selection"])
            head = ["method", *heads, "avg"]
            out += [
                f"<h2>{e(title)}</h2>",
                "<table>",
                "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>",
                "<tbody>",
            ]
            for r in table["rows"]:
                badge = ' <span class="badge oracle">oracle</span>' if r["oracle"] else ""
                mark = search_mark({"search_saw_target_labels": r["search_saw_target_labels"]})
                cells = [f'<td class="method">{e(r["method"])}{badge}{e(mark)}</td>']
                cells += [
                    f'<td class="num">{e(_cell_text(r["cells"][d], group["final_seeds"]))}</td>'
                    for d in group["held_out"]
                ]
                cells.append(f'<td class="num">{e(_pct(r["average"]))}</td>')
                out.append("<tr>" + "".join(cells) + "</tr>")
            out += ["</tbody>", "</table>", f'<p class="note">{e(_legend(group))}</p>']
    return out
