"""Leaderboards: aggregate the storage with pandas and write CSV, Markdown and JSON atomically.

Everything here is computed from the Optuna storage and the study file alone, so
``harness leaderboard`` can rebuild the files without training.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from harness import __version__
from harness.fileio import atomic_path, write_json, write_text
from harness.metrics import LABELS, METRICS, primary_metric
from harness.search import make_storage
from harness.store.schema import (
    best_trial,
    budget_trials,
    counts,
    final_seeds,
    optuna_study_name,
    trial_params,
    trial_score,
)
from harness.study import StudySpec
from harness.validators import VALIDATORS, rank_agreement
from harness.versions import git_commit, package_version

PACKAGES = (
    "torch", "torchvision", "timm", "optuna", "segmentation-models-pytorch", "pluggy",
    "pandas", "torchmetrics", "numpy", "scikit-learn", "scikit-image",
)  # fmt: skip


def collect(spec: StudySpec, storage_url: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Rows (one per pair x method), every trial, and the provenance, read from the storage."""
    storage = make_storage(storage_url)
    existing = {
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    }
    rows: list[dict[str, Any]] = []
    trial_rows: list[dict[str, Any]] = []
    counts = {s.name: 0 for s in TrialState}
    devices, precisions, samplers, pruners, fingerprints, plugins = (
        set(),
        set(),
        set(),
        set(),
        {},
        set(),
    )
    compute_s, starts, ends = 0.0, [], []
    run_commits: set[str] = set()
    device_names: set[str] = set()
    agreement: list[dict[str, Any]] = []
    counted: dict[tuple[str, int], set[int]] = {}  # final runs shared by several rules count once
    for pair in spec.pairs:
        pooled: list[optuna.trial.FrozenTrial] = []  # completed trials of every method of the pair
        pair_agreement: list[dict[str, Any]] = []
        for method in spec.methods:
            name = optuna_study_name(pair, method)
            row: dict[str, Any] = {
                "pair": pair.key,
                "source": pair.source,
                "target": pair.target,
                "method": method.key,
                "backbone": method.backbone,
                "weights": method.weights,
                "head": method.head,
                "strategy": method.strategy,
            }
            if name not in existing:
                rows.append(
                    {
                        **row,
                        "label": method.key,
                        "selection": ", ".join(spec.selection_rules),
                        "status": "not started",
                    }
                )
                pair_agreement.append(_agreement(pair.key, method.key, []))
                continue
            study = optuna.load_study(study_name=name, storage=storage)
            attrs = study.user_attrs
            config = attrs.get("config", {})
            fingerprints[pair.key] = config.get("data", {})
            plugins.update((config.get("plugins") or {}).values())
            if "sampler" in attrs:
                samplers.add(json.dumps(attrs["sampler"], sort_keys=True))
            if "pruner" in attrs:
                pruners.add(attrs["pruner"])
            trials = study.get_trials(deepcopy=False)
            for t in trials:
                counts[t.state.name] += 1
                if t.datetime_start and t.datetime_complete:
                    compute_s += (t.datetime_complete - t.datetime_start).total_seconds()
                    starts.append(t.datetime_start)
                    ends.append(t.datetime_complete)
                trial_rows.append(_trial_row(pair.key, method.key, t))
            # exactly the budgeted trials: the first `budget` that count, by trial number
            budgeted = budget_trials(trials, spec.budget.trials)
            complete = [t for t in budgeted if t.state == TrialState.COMPLETE and _finite(t.value)]
            row.update(
                target_labels=config.get("target_labels", ""),
                trials_complete=sum(t.state == TrialState.COMPLETE for t in budgeted),
                trials_pruned=sum(t.state == TrialState.PRUNED for t in budgeted),
                trials_failed=sum(t.state == TrialState.FAIL for t in budgeted),
                trials_not_counted=sum(t.state.is_finished() for t in trials) - len(budgeted),
            )
            rules = config.get("selection_rules") or [
                {"rule": config.get("selection", ""), "oracle": bool(config.get("oracle", False))}
            ]
            pair_agreement.append(_agreement(pair.key, method.key, complete))
            pooled += complete
            for sel in rules:
                rule_row = {**row, "selection": sel["rule"], "oracle": bool(sel["oracle"])}
                best = best_trial(complete, sel["rule"])
                if best is None:
                    rows.append({**rule_row, "status": "no completed trial"})
                    continue
                finals = [
                    attrs[k]
                    for s in final_seeds(spec)
                    if (k := f"final:{best.number}:{s}") in attrs
                ]
                for f in finals:
                    if f["seed"] not in counted.setdefault((name, best.number), set()):
                        counted[(name, best.number)].add(f["seed"])
                        compute_s += f.get("seconds", 0.0)
                    run_commits.add(f.get("git_commit") or "unknown")
                    devices.add(f.get("device", "?"))
                    if f.get("device_name"):
                        device_names.add(f["device_name"])
                    precisions.add(f.get("precision", "?"))
                params = trial_params(best)
                rule_row.update(
                    status="final"
                    if len(finals) == spec.final_seeds
                    else f"{len(finals)}/{spec.final_seeds} seeds",
                    best_trial=best.number,
                    val_score=trial_score(best, sel["rule"])
                    if trial_score(best, sel["rule"]) is not None
                    else best.value,
                    n_seeds=len(finals),
                    seeds=[f["seed"] for f in finals],
                    best_params=params,
                    precision=", ".join(sorted({str(f.get("precision", "?")) for f in finals})),
                )
                for metric in METRICS[spec.task]:
                    values = [f["test"][metric] for f in finals if _finite(f["test"].get(metric))]
                    mean, std = _mean_std(values)
                    rule_row[f"test_{metric}"] = mean
                    rule_row[f"test_{metric}_std"] = std
                    rule_row[f"test_{metric}_se"] = (
                        std / math.sqrt(len(values)) if _finite(std) else math.nan
                    )
                per_class = [
                    f["test"]["per_class_iou"] for f in finals if "per_class_iou" in f["test"]
                ]
                if per_class:
                    frame = pd.DataFrame(per_class, dtype=float)
                    rule_row["test_per_class_iou"] = [
                        None if pd.isna(v) else float(v) for v in frame.mean(skipna=True)
                    ]
                rows.append(rule_row)
        # the pooled figure first: over all methods' trials it rests on several times more trials
        agreement += [_agreement(pair.key, POOLED, pooled), *pair_agreement]
    board = pd.DataFrame(rows)
    primary = f"test_{primary_metric(spec.task)}"
    if primary in board:
        # only rows with all their final seeds compete; partial rows stay unranked
        # oracle rows are ranked among themselves, never against honestly selected ones
        ranked = board[primary].where(board["status"] == "final")
        group = (
            [board["pair"], board["oracle"].fillna(False).astype(bool)]
            if "oracle" in board
            else board["pair"]
        )
        board["rank"] = ranked.groupby(group).rank(ascending=False, method="min").astype("Int64")
        # honestly selected rows first, then the oracle rows, each block in rank order
        order = ["pair", "_oracle", "rank"] if "oracle" in board else ["pair", "rank"]
        board["_oracle"] = (
            board["oracle"].fillna(False).astype(bool) if "oracle" in board else False
        )
        board = (
            board.sort_values(order, na_position="last", kind="stable")
            .drop(columns="_oracle")
            .reset_index(drop=True)
        )
    trials_df = pd.DataFrame(trial_rows)
    provenance = {
        "study": spec.name,
        "study_file": spec.path,
        "study_file_sha256": spec.file_hash,
        "overrides": spec.overrides,
        "harness_version": __version__,
        "git_commit": git_commit(Path(spec.path).parent if spec.path else Path.cwd()),
        "final_runs_git_commits": sorted(run_commits),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: package_version(p) for p in PACKAGES},
        "device": sorted(devices),
        "device_names": sorted(device_names),
        "precision": sorted(precisions),
        "seeds": {
            "study": spec.seed,
            "data_split": spec.seed,
            "trial": "study seed + trial number",
            "final": final_seeds(spec),
            # true: a trial's head is initialized from its seed, the backbone reset to the weights;
            # false: the backbone is built under the seed and the head initialized after it
            "reuse_backbone": spec.reuse_backbone,
        },
        "sampler": [json.loads(s) for s in sorted(samplers)],
        "pruner": sorted(pruners),
        "selection_rule": spec.selection,
        "selection_note": (
            "trials are scored on validation splits and label-free validators only; the target test split "
            "is read once per final seeded run; target-val accuracy of every trial is recorded to judge the "
            "validators afterwards and selects only rows whose rule is target-val"
        ),
        "validator_agreement": agreement,
        "data_fingerprints": fingerprints,
        "plugins": sorted(plugins),
        "budget": spec.budget.model_dump(),
        "trial_counts": {k: v for k, v in counts.items() if v},
        "compute_seconds": round(compute_s, 1),
        "wall_seconds": round((max(ends) - min(starts)).total_seconds(), 1) if starts else 0.0,
        "storage": _redact(storage_url).replace(str(Path.cwd().resolve()) + "/", ""),
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return board, trials_df, provenance


def write(
    results_dir: Path,
    spec: StudySpec,
    board: pd.DataFrame,
    trials: pd.DataFrame,
    provenance: dict[str, Any],
) -> list[Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    csv_cols = [c for c in board.columns if c not in ("best_params", "seeds", "test_per_class_iou")]
    flat = board[csv_cols].copy()
    if "best_params" in board:
        flat["best_params"] = board["best_params"].map(
            lambda p: json.dumps(p, sort_keys=True) if isinstance(p, dict) else ""
        )
    for name, frame in (("leaderboard.csv", flat), ("trials.csv", trials)):
        path = results_dir / name
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
        paths.append(path)
    path = results_dir / "leaderboard.json"
    write_json(
        path,
        {
            "study": spec.name,
            "description": spec.description,
            "rows": _records(board),
            "provenance": provenance,
        },
    )
    paths.append(path)
    path = results_dir / "leaderboard.md"
    write_text(path, to_markdown(spec, board, provenance))
    paths.append(path)
    return paths


def to_markdown(spec: StudySpec, board: pd.DataFrame, provenance: dict[str, Any]) -> str:
    lines = [f"# Leaderboard: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    m1, m2 = METRICS[spec.task][:2]
    lines += [
        f"Target **test** {LABELS[m1]} and {LABELS[m2]} in %, mean ± standard error over "
        f"{spec.final_seeds} seeded final runs of the trial that the row's selection rule picked "
        "(standard deviations are in leaderboard.csv/json). Trials were selected on a validation split "
        "or by a label-free validator on unlabelled target validation images (column *selection*); the "
        "test split was read only by the final runs. Rows marked **oracle** were selected with target "
        "labels although the method trains without them; they are ranked among themselves. Column *val*: "
        "the selecting score of the picked trial, in % for a validation split, the validator's own value "
        "(higher is better) for a label-free rule.",
        "",
    ]
    for pair, group in board.groupby("pair", sort=False):
        lines += [f"## {pair}", ""]
        table = pd.DataFrame(
            {
                "rank": group.get("rank", pd.Series(dtype="Int64")).astype("string").fillna("-"),
                "method": group["method"],
                "strategy": group["strategy"],
                f"test {LABELS[m1]} %": [_pm(r, m1) for r in group.to_dict("records")],
                f"test {LABELS[m2]} %": [_pm(r, m2) for r in group.to_dict("records")],
                "val": [_val(r) for r in group.to_dict("records")],
                "selection": [
                    (r.get("selection") or "-") + (" **oracle**" if r.get("oracle") else "")
                    for r in group.to_dict("records")
                ],
                "trials (ok/pruned/failed)": [
                    f"{_int(r.get('trials_complete'))}/{_int(r.get('trials_pruned'))}/{_int(r.get('trials_failed'))}"
                    for r in group.to_dict("records")
                ],
                "status": group["status"],
            }
        )
        lines += [table.to_markdown(index=False), ""]
    lines += _agreement_markdown(provenance.get("validator_agreement") or [])
    p = provenance
    lines += [
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
        f"- study file {p['study_file']} (sha256 {p['study_file_sha256']}); trials {json.dumps(p['trial_counts'])}",
        f"- compute {p['compute_seconds']:.0f} s, wall {p['wall_seconds']:.0f} s; generated {p['generated_at']}",
        "",
    ]
    return "\n".join(lines)


def _agreement_markdown(agreement: list[dict[str, Any]]) -> list[str]:
    if not agreement:
        return []
    table = pd.DataFrame(
        {
            "pair": [a["pair"] for a in agreement],
            "method": [a.get("method", "-") for a in agreement],
            "trials": [str(a.get("trials", 0)) for a in agreement],
            **{rule: [_rho_cell(a, rule) for a in agreement] for rule in AGREEMENT_RULES},
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
    if not _finite(value):
        if entry.get("trials", 0) < MIN_AGREEMENT_TRIALS:
            return "-"  # the row's note says why
        return f"- (n={n})" if n < MIN_AGREEMENT_TRIALS else "- (tied)"
    return _rho(value) + ("" if n == entry.get("trials") else f" (n={n})")


def _rho(v: Any) -> str:
    return f"{v:+.2f}" if _finite(v) else "-"


def _pm(row: dict[str, Any], metric: str) -> str:
    mean, std = row.get(f"test_{metric}"), row.get(f"test_{metric}_se")
    if not _finite(mean):
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if _finite(std) else f"{100 * mean:.1f}"


def _val(row: dict[str, Any]) -> str:
    """The selecting score: a validation metric in %, or a label-free validator's raw value."""
    v = row.get("val_score")
    if row.get("selection") in ("target-val", "source-val"):
        return _pct(v)
    return f"{float(v):.3f}" if _finite(v) else "-"


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}" if _finite(v) else "-"


def _int(v: Any) -> int:
    return int(v) if _finite(v) else 0


def _records(board: pd.DataFrame) -> list[dict[str, Any]]:
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


AGREEMENT_RULES = ("source-val", *VALIDATORS)
#: the method name of the agreement entry that pools every method of a pair
POOLED = "all methods (pooled)"
#: a rank correlation over fewer trials is not reported
MIN_AGREEMENT_TRIALS = 3


def _agreement(pair: str, method: str, complete: list[optuna.trial.FrozenTrial]) -> dict[str, Any]:
    """Spearman correlation, over completed trials, between each label-free rule's score and the
    trial's target-val accuracy: one method's trials, or every method's of the pair (``method`` =
    ``POOLED``). ``n`` counts the trials behind each rule's value (those with both numbers);
    ``note`` says why values are missing. Computed after the search; it never selects anything."""
    scored = [t.user_attrs.get("scores") or {} for t in complete]
    truth = [s.get("target-val") for s in scored]
    out: dict[str, Any] = {
        "pair": pair,
        "method": method,
        "scope": "pooled" if method == POOLED else "method",
        "trials": sum(_finite(v) for v in truth),
        "n": {},
    }
    tied = []
    for rule in AGREEMENT_RULES:
        scores = [s.get(rule) for s in scored]
        out["n"][rule] = sum(_finite(a) and _finite(b) for a, b in zip(scores, truth, strict=True))
        out[rule] = rank_agreement(scores, truth)
        if out[rule] is None and out["n"][rule] >= MIN_AGREEMENT_TRIALS:
            tied.append(rule)
    notes = []
    if out["trials"] < MIN_AGREEMENT_TRIALS:
        notes.append(
            f"too few completed trials with a target-val accuracy ({out['trials']}; a correlation "
            f"needs {MIN_AGREEMENT_TRIALS})"
        )
    if tied:
        notes.append(
            f"no correlation for {', '.join(tied)}: the scores or the accuracies are all equal"
        )
    out["note"] = "; ".join(notes) or None
    return out


def _trial_row(pair: str, method: str, t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    row = {
        "pair": pair,
        "method": method,
        "trial": t.number,
        "state": t.state.name,
        "value": t.value,
        "epochs_reported": len(t.intermediate_values),
        "duration_s": t.duration.total_seconds() if t.duration else None,
        # only a failed trial has a reason (a trial may finish just as another process reaps it)
        "fail_reason": t.user_attrs.get("fail_reason", "")
        if t.state == optuna.trial.TrialState.FAIL
        else "",
        "retry_of": t.user_attrs.get("retry_of"),
        "counted": counts(t),
        "error": t.user_attrs.get("error", ""),
    }
    row.update(trial_params(t))
    row.update({f"score:{k}": v for k, v in (t.user_attrs.get("scores") or {}).items()})
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    s = pd.Series(values, dtype=float)
    return float(s.mean()), float(s.std(ddof=1)) if len(values) > 1 else math.nan


def _finite(v: Any) -> bool:
    try:
        return v is not None and v is not pd.NA and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
