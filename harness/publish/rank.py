"""The board: one row per (pair, method, selection rule), ranked within each pair; and the table of
every trial. Both are functions of :class:`~harness.publish.results.Results`."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from harness.metrics import primary_metric, reported_metrics
from harness.publish import uncertainty
from harness.publish.format import finite
from harness.publish.labels import label_free
from harness.publish.results import Entry, Results, Selection, StoredStudy
from harness.store.schema import (
    ERROR,
    RETRY_OF,
    SEEDED_FROM,
    TRAININGS,
    counts,
    fail_reason,
    trial_diagnostics,
    trial_params,
    trial_score,
    trial_scores,
)
from harness.study import StudySpec


def board(results: Results) -> pd.DataFrame:
    """Rows in study-file order (pairs, methods, rules), ranked and ordered within each pair."""
    spec = results.spec
    rows: list[dict[str, Any]] = []
    in_domain = any(p.in_domain for p in spec.pairs)  # a column only where some pair is
    for entry in results.entries:
        row = _identity(entry) | ({"in_domain": entry.pair.in_domain} if in_domain else {})
        if entry.study is None:
            selection = ", ".join(spec.selection_rules)
            rows.append(
                {**row, "label": entry.method.key, "selection": selection, "status": "not started"}
            )
            continue
        row.update(_trial_counts(entry.study, entry.study.config))
        for sel in entry.study.selections:
            rows.append(_rule_row(spec, row, sel))
    return _ranked(spec, pd.DataFrame(rows))


def _identity(entry: Entry) -> dict[str, Any]:
    pair, method = entry.pair, entry.method
    return {
        "pair": pair.key,
        "source": pair.source_name,
        "target": pair.target,
        "method": method.key,
        "backbone": method.backbone,
        "weights": method.weights,
        "head": method.head,
        "strategy": method.strategy,
    }


def _trial_counts(study: StoredStudy, config: dict[str, Any]) -> dict[str, Any]:
    budgeted = study.budgeted
    return {
        "target_labels": config.get("target_labels", ""),
        "trials_complete": sum(t.state == TrialState.COMPLETE for t in budgeted),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in budgeted),
        "trials_failed": sum(t.state == TrialState.FAIL for t in budgeted),
        "trials_not_counted": sum(t.state.is_finished() for t in study.trials) - len(budgeted),
    }


def _rule_row(spec: StudySpec, row: dict[str, Any], sel: Selection) -> dict[str, Any]:
    """The row of one selection rule: the trial it picked and its final runs' test metrics."""
    rule_row = {**row, "selection": sel.rule, "oracle": sel.oracle,
                "search_saw_target_labels": sel.search_saw_target_labels}  # fmt: skip
    best, finals = sel.best, sel.finals
    if best is None:
        return {**rule_row, "status": "no completed trial"}
    score = trial_score(best, sel.rule)
    rule_row.update(
        status="final"
        if len(finals) == spec.final_seeds
        else f"{len(finals)}/{spec.final_seeds} seeds",
        best_trial=best.number,
        val_score=score if score is not None else best.value,
        n_seeds=len(finals),
        seeds=[f["seed"] for f in finals],
        best_params=trial_params(best),
        precision=", ".join(sorted({str(f.get("precision", "?")) for f in finals})),
    )
    for metric in table_metrics(spec):
        values = [f["test"][metric] for f in finals if finite(f["test"].get(metric))]
        mean, std = _mean_std(values)
        rule_row[f"test_{metric}"] = mean
        rule_row[f"test_{metric}_std"] = std
        rule_row[f"test_{metric}_se"] = std / math.sqrt(len(values)) if finite(std) else math.nan
    per_class = [f["test"]["per_class_iou"] for f in finals if "per_class_iou" in f["test"]]
    if per_class:
        frame = pd.DataFrame(per_class, dtype=float)
        rule_row["test_per_class_iou"] = [
            None if pd.isna(v) else float(v) for v in frame.mean(skipna=True)
        ]
    rule_row.update(uncertainty.row_fields(spec.task, sel))  # per-seed values, 95% interval
    return rule_row


def table_metrics(spec: StudySpec) -> list[str]:
    """The metrics a study reports as mean ± standard error columns (one number per run)."""
    return [m for m in reported_metrics(spec.task, spec.metrics) if m != "per_class_iou"]


def shown_metrics(spec: StudySpec) -> list[str]:
    """The metrics the Markdown and HTML tables show: the first two by default, every one a
    study names in ``metrics``."""
    return table_metrics(spec) if spec.metrics else table_metrics(spec)[:2]


def _ranked(spec: StudySpec, board: pd.DataFrame) -> pd.DataFrame:
    """Rank rows with all their final seeds within each pair, oracle rows among themselves and
    reference rows (:func:`reference_rows`) not at all; then order each pair's rows: honestly
    selected ones first, then oracle ones, each in rank order, then the reference rows."""
    primary = f"test_{primary_metric(spec.task)}"
    if primary not in board:
        return board
    reference = reference_rows(board)
    if reference.any():  # a column only where some row is a reference
        board["reference"] = reference
    # only rows with all their final seeds compete; partial rows and references stay unranked
    ranked = board[primary].where((board["status"] == "final") & ~reference)
    oracle = board["oracle"].fillna(False).astype(bool) if "oracle" in board else False
    board["rank"] = (
        ranked.groupby([board["pair"], oracle] if "oracle" in board else board["pair"])
        .rank(ascending=False, method="min")
        .astype("Int64")
    )
    board["_oracle"], board["_reference"] = oracle, reference
    return (
        board.sort_values(
            ["pair", "_reference", "_oracle", "rank"], na_position="last", kind="stable"
        )
        .drop(columns=["_oracle", "_reference"])
        .reset_index(drop=True)
    )


def reference_rows(board: pd.DataFrame) -> pd.Series:
    """The rows shown apart as references, unranked: in a pair where some row was selected by a
    label-free validator (a domain-adaptation table: methods compared without target labels),
    the rows whose strategy trains on target labels (``target_labels`` "few" or "all"), such as
    fine-tuning on them, the ceiling. Ranked against the rows that use none, they would lead
    the ranking for what they were given, not for what they do."""
    if "target_labels" not in board or "selection" not in board:
        return pd.Series(False, index=board.index)
    adaptation = board["pair"].isin(board.loc[board["selection"].map(label_free), "pair"])
    return adaptation & board["target_labels"].isin(["few", "all"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    s = pd.Series(values, dtype=float)
    return float(s.mean()), float(s.std(ddof=1)) if len(values) > 1 else math.nan


def trials_frame(results: Results) -> pd.DataFrame:
    """Every trial of every started study, one row each (``trials.csv``)."""
    return pd.DataFrame(
        [
            trial_row(e.pair.key, e.method.key, t, e.study.scores.get(t.number))
            for e in results.entries
            if e.study is not None
            for t in e.study.trials
        ]
    )


def trial_row(
    pair: str, method: str, t: FrozenTrial, scores: dict[str, float] | None = None
) -> dict[str, Any]:
    """One ``trials.csv`` row; ``scores`` (pooled rules' included) replaces the stored ones."""
    row = {
        "pair": pair,
        "method": method,
        "trial": t.number,
        "state": t.state.name,
        "value": t.value,
        "epochs_reported": len(t.intermediate_values),
        "duration_s": t.duration.total_seconds() if t.duration else None,
        # only a failed trial has a reason (a trial may finish just as another process reaps it)
        "fail_reason": fail_reason(t) if t.state == TrialState.FAIL else "",
        "retry_of": t.user_attrs.get(RETRY_OF),
        # a column only where ``[search] warm_start`` queued some trial: where it came from
        **({"seeded_from": t.user_attrs[SEEDED_FROM]} if SEEDED_FROM in t.user_attrs else {}),
        # a column only where a rule trained a trial more than once (leave-one-source-out)
        **({"trainings": t.user_attrs[TRAININGS]} if TRAININGS in t.user_attrs else {}),
        "counted": counts(t),
        "error": t.user_attrs.get(ERROR, ""),
    }
    row.update(trial_params(t))
    row.update({f"score:{k}": v for k, v in (scores or trial_scores(t)).items()})
    # a strategy's own diagnostics (``ctx.log``), at the last epoch trained
    row.update({f"diagnostic:{k}": vs[-1] for k, vs in trial_diagnostics(t).items() if vs})
    return row


def with_models(
    rows: list[dict[str, Any]], models: dict[int, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The board's records with ``models`` ({seed, path, sha256} per kept seed) on the rows that
    kept models; rows without (every row of a study run before models were kept) are unchanged."""
    return [{**r, "models": models[i]} if i in models else r for i, r in enumerate(rows)]


def unfinished(board: pd.DataFrame) -> dict[str, Any] | None:
    """What an unfinished study lacks: its (pair, method)s not started and its rows without all
    their final seeds; None when every row is final."""
    status = board["status"] if "status" in board else pd.Series("not started", index=board.index)
    if len(board) and (status == "final").all():
        return None
    rows = board.assign(status=status).to_dict("records")
    return {
        "not_started": [
            f"{r['pair']}: {r['method']}" for r in rows if r["status"] == "not started"
        ],
        "without_final_seeds": [
            {k: r.get(k) for k in ("pair", "method", "selection", "status")}
            for r in rows
            if r["status"] not in ("final", "not started")
        ],
    }
