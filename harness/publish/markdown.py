"""``leaderboard.md``: the board per pair, how well the label-free rules ranked the trials, and the
provenance, as Markdown."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from harness.metrics import metric_label
from harness.publish import domainbed
from harness.publish.agreement import MIN_AGREEMENT_TRIALS, POOLED
from harness.publish.flags import SEARCH_LEGEND, search_mark, search_marked
from harness.publish.format import finite, pm, trial_counts, truthy, val
from harness.publish.labels import REFERENCE_NOTE, rank_label
from harness.publish.rank import shown_metrics, unfinished
from harness.publish.trainings import pair_notes
from harness.publish.uncertainty import CI_LABEL, NA, RESAMPLES, ci_cell
from harness.study import StudySpec

#: what a board of the ``standard`` protocol says under its title
STANDARD_NOTE = (
    "Standard protocol, as the adaptation literature reports: the target's test images are its "
    "unlabelled training images (or its official test list); these numbers do not compare with "
    "held-out tables."
)


def protocol_title(spec: StudySpec, missing: Any) -> str:
    """What follows a board's title: the protocol when it is not the default, and "partial"."""
    standard = " (standard protocol)" if spec.data.protocol == "standard" else ""
    return standard + (" (partial)" if missing else "")


def to_markdown(spec: StudySpec, board: pd.DataFrame, provenance: dict[str, Any]) -> str:
    missing = unfinished(board)
    lines = [f"# Leaderboard: {spec.name}" + protocol_title(spec, missing), ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    if spec.notes:
        lines += [f"**Notes.** {spec.notes.strip()}", ""]
    if spec.data.protocol == "standard":
        lines += [STANDARD_NOTE, ""]
    if missing:
        lines += [_partial_notice(missing), ""]
    shown = shown_metrics(spec)
    named = ", ".join(metric_label(m) for m in shown[:-1]) + f" and {metric_label(shown[-1])}"
    lines += [
        f"Target **test** {named if len(shown) > 1 else metric_label(shown[0])} in %, mean ± "
        "standard error over "
        f"{spec.final_seeds} seeded final runs of the trial that the row's selection rule picked "
        "(standard deviations are in leaderboard.csv/json). Trials were selected on a validation split "
        "or by a label-free validator on unlabelled target validation images (column *selection*); the "
        "test split was read only by the final runs. Rows marked **oracle** were selected with target "
        "labels although the method trains without them; they are ranked among themselves. Column *val*: "
        "the selecting score of the picked trial, in % for a validation split, the validator's own value "
        "(higher is better) for a label-free rule.",
        "",
    ]
    if "reference" in board and board["reference"].fillna(False).any():
        lines += [REFERENCE_NOTE, ""]
    lines += domainbed.markdown_lines(spec, board)  # leave-one-out groups only
    for pair, group in board.groupby("pair", sort=False):
        own = " (in-domain)" if "in_domain" in group and group["in_domain"].any() else ""
        lines += [f"## {pair}{own}", "", _pair_table(group, shown), ""]
        for note in pair_notes(provenance, str(pair)):
            lines += [note, ""]
    lines += _agreement_markdown(provenance.get("validator_agreement") or [])
    lines += _provenance_markdown(provenance)
    return "\n".join(lines)


def _partial_notice(missing: dict[str, Any]) -> str:
    """The notice of an unfinished study: what it lacks, and that its rows are not final."""
    parts = []
    if missing["not_started"]:
        parts.append(f"not started: {', '.join(missing['not_started'])}")
    if missing["without_final_seeds"]:
        rows = [
            f"{r['method']} ({r['selection']}: {r['status']})"
            for r in missing["without_final_seeds"]
        ]
        parts.append(f"rows without all their final seeds: {', '.join(rows)}")
    return (
        "**Partial results**: this study is unfinished (interrupted, or still running); "
        + "; ".join(parts)
        + ". Only rows with all their final seeds are ranked. Run the same `harness run` command "
        "again to finish it."
    )


def _pair_table(group: pd.DataFrame, shown: list[str]) -> str:
    records = group.to_dict("records")
    m1 = shown[0]
    table = pd.DataFrame(
        {
            "rank": [rank_label(r) for r in records],
            "method": group["method"],
            "strategy": group["strategy"],
            f"test {metric_label(m1)} %": [pm(r, m1) for r in records],
            f"{CI_LABEL} %": [ci_cell(r, m1) for r in records],
            **{f"test {metric_label(m)} %": [pm(r, m) for r in records] for m in shown[1:]},
            "val": [val(r) for r in records],
            "selection": [
                (r.get("selection") or "-")
                + (" **oracle**" if truthy(r.get("oracle")) else "")
                + search_mark(r)
                for r in records
            ],
            "trials (ok/pruned/failed)": [trial_counts(r) for r in records],
            "status": group["status"],
        }
    )
    legend = (
        f"± is the standard error over the final seeds. *{CI_LABEL}*: test {metric_label(m1)}, 95% "
        f"bootstrap interval over test images and seeds ({RESAMPLES} resamples); {NA} where the "
        "storage has no per-image test outcomes."
    )
    marked = [SEARCH_LEGEND] if any(search_marked(r) for r in records) else []
    return "\n\n".join([table.to_markdown(index=False), legend, *marked])


def _provenance_markdown(p: dict[str, Any]) -> list[str]:
    return [
        "## Provenance",
        "",
        f"- harness {p['harness_version']}; final runs at commit {', '.join(p['final_runs_git_commits']) or 'unknown'}; "
        f"table written at commit {p['git_commit'] or 'unknown'}; Python {p['python']}",
        "- " + ", ".join(f"{k} {v}" for k, v in p["packages"].items() if v),
        f"- device: {', '.join(p['device']) or '-'}"
        + (f" ({', '.join(p['device_names'])})" if p.get("device_names") else "")
        + f"; precision: {', '.join(p['precision']) or '-'}",
        f"- seeds: study {p['seeds']['study']}, final runs {p['seeds']['final']}; sampler {p['sampler']}; pruner {', '.join(p['pruner'])}",
        f"- data fingerprints: {json.dumps(p['data_fingerprints'], sort_keys=True)}",
        *(
            [f"- preprocessing: {json.dumps(p['preprocessing'], sort_keys=True)}"]
            if p.get("preprocessing")
            else []
        ),
        f"- study file {p['study_file']} (sha256 {p['study_file_sha256']}); trials {json.dumps(p['trial_counts'])}",
        f"- compute {p['compute_seconds']:.0f} s, wall {p['wall_seconds']:.0f} s; generated {p['generated_at']}",
        "",
    ]


def _judged(agreement: list[dict[str, Any]]) -> list[str]:
    """The rules the agreement entries judge, in their order."""
    return list(dict.fromkeys(rule for a in agreement for rule in a.get("n", {})))


def _agreement_markdown(agreement: list[dict[str, Any]]) -> list[str]:
    if not agreement:
        return []
    table = pd.DataFrame(
        {
            "pair": [a["pair"] for a in agreement],
            "method": [a.get("method", "-") for a in agreement],
            "trials": [str(a.get("trials", 0)) for a in agreement],
            **{rule: [_rho_cell(a, rule) for a in agreement] for rule in _judged(agreement)},
            "note": [a.get("note") or "" for a in agreement],
        }
    )
    return [
        "## How well label-free rules ranked the trials",
        "",
        "Spearman correlation between each rule's score and the target validation accuracy of the "
        "same completed trials (1 = same order, 0 = unrelated, negative = reversed). Row "
        f"*{POOLED}* pools every completed trial of every method of the pair; the other rows take "
        "one method's trials each, and with a handful of trials those are noisy. Column *trials*: "
        "how many trials each correlation is over (a rule's own count follows its value when it "
        f"scored fewer); fewer than {MIN_AGREEMENT_TRIALS} give no correlation, and the row says so. "
        "Computed after the search from scores recorded with every trial; it plays no part in "
        "selection.",
        "",
        table.to_markdown(index=False, disable_numparse=True),  # keep the signed two-decimal format
        "",
    ]


def _rho_cell(entry: dict[str, Any], rule: str) -> str:
    value, n = entry.get(rule), (entry.get("n") or {}).get(rule, entry.get("trials", 0))
    if not finite(value):
        if entry.get("trials", 0) < MIN_AGREEMENT_TRIALS:
            return "-"  # the row's note says why
        return f"- (n={n})" if n < MIN_AGREEMENT_TRIALS else "- (tied)"
    return _rho(value) + ("" if n == entry.get("trials") else f" (n={n})")


def _rho(v: Any) -> str:
    return f"{v:+.2f}" if finite(v) else "-"
