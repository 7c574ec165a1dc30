"""The report's plots, written to ``plots/*.png``: per pair the board's test scores and the trial
values by freeze depth, per (pair, method) Optuna's optimization history and parameter importances.
A plot that cannot be drawn (too few trials) is a :class:`Figure` with a note instead of a file.

Every plot is a function of :class:`~harness.publish.results.Results` and the tables made from it.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from harness.fileio import atomic_path
from harness.metrics import LABELS, primary_metric
from harness.publish.format import finite, pm, truthy
from harness.publish.labels import RuleLabel, rule_label, rules_label
from harness.publish.results import Results, StoredStudy
from harness.study import StudySpec

DPI = 100
PLOTS = "plots"
#: matplotlib's default first colour: the bars of non-oracle rows
BAR_COLOUR = "#1f77b4"
ORACLE_COLOUR = "#ff7f0e"
#: reference rows (trained on target labels, not ranked): grey
REFERENCE_COLOUR = "#8c8c8c"


@dataclass
class Figure:
    """A plot written to ``plots/``, or the reason it could not be drawn (``file`` is None)."""

    title: str
    file: str | None = None  # relative to the results folder, e.g. "plots/x.png"
    png: bytes = b""
    note: str = ""


def pairs_of(spec: StudySpec, board: pd.DataFrame) -> list[str]:
    """The pairs a report shows: the study file's, then any other the board holds."""
    keys = [p.key for p in spec.pairs]
    if "pair" in board:
        keys += [k for k in board["pair"].drop_duplicates() if k not in keys]
    return keys


def draw(
    results_dir: Path,
    results: Results,
    pairs: list[str],
    board: pd.DataFrame,
    trials: pd.DataFrame,
) -> dict[str, dict[str, Any]]:
    """Draw every plot of ``pairs`` into ``results_dir/plots/`` and remove plots left from earlier
    reports. Per pair: ``{"leaderboard": Figure, "freeze": Figure, "methods": {method: (history,
    importance)}}``."""
    spec = results.spec
    names = _Names()
    figures: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        rows = board[board["pair"] == pair] if "pair" in board else board.iloc[0:0]
        drivers = {
            e.method.key: driving_rule(e.study) for e in results.entries if e.pair.key == pair
        }
        entry: dict[str, Any] = {
            "leaderboard": _leaderboard_plot(results_dir, spec, pair, rows, names),
            "freeze": _freeze_depth_plot(results_dir, spec, pair, drivers, trials, names),
            "methods": {},
        }
        for e in results.entries:
            if e.pair.key == pair:
                entry["methods"][e.method.key] = (
                    _history_plot(results_dir, spec, pair, e.method.key, e.study, names),
                    _importance_plot(results_dir, spec, pair, e.method.key, e.study, names),
                )
        figures[pair] = entry
    _remove_stale_plots(results_dir, names.used)
    return figures


def driving_rule(study: StoredStudy | None) -> str | None:
    """The rule whose score is a study's trial values (the first rule, resolved for the method):
    what the sampler and pruner saw, and what the history and freeze-depth plots show."""
    return None if study is None else study.config.get("selection") or None


class _Names:
    """Unique, file-system-safe plot file names, deterministic in the order they are asked for."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: str) -> str:
        stem = "__".join(slug(p) for p in parts)
        name, n = f"{stem}.png", 2
        while name in self.used:
            name, n = f"{stem}-{n}.png", n + 1
        self.used.add(name)
        return name


def slug(text: str) -> str:
    """A file-system and URL-fragment safe form of ``text``."""
    safe = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.").lower()
    return safe[:80] or hashlib.sha1(text.encode()).hexdigest()[:8]


@contextmanager
def _pyplot() -> Iterator[Any]:
    """pyplot on the Agg backend, with rcParams (Optuna sets the ggplot style) restored after,
    and Optuna's ExperimentalWarning silenced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        plt.rcParams["text.parse_math"] = False  # method names may hold '$'
        yield plt


def _save(results_dir: Path, fig: Any, name: str, title: str) -> Figure:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    png = buf.getvalue()
    path = results_dir / PLOTS / name
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return Figure(title=title, file=f"{PLOTS}/{name}", png=png)


def _leaderboard_plot(
    results_dir: Path, spec: StudySpec, pair: str, rows: pd.DataFrame, names: _Names
) -> Figure:
    metric = primary_metric(spec.task)
    col, se_col = f"test_{metric}", f"test_{metric}_se"
    title = (
        f"{pair}: target test {LABELS[metric]} %, mean ± standard error over seeds, "
        "of the trial each row's selection rule picked"
    )
    records = [r for r in rows.to_dict("records") if finite(r.get(col))]
    if not records:
        return Figure(title, note="no row has a test score yet (no final run finished)")
    records.sort(key=lambda r: -float(r[col]))
    with _pyplot() as plt:
        fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.45 * len(records)))
        means = [100 * float(r[col]) for r in records]
        ses = [100 * float(r[se_col]) if finite(r.get(se_col)) else 0.0 for r in records]
        labels = [_bar_label(r) for r in records]
        colours = [_bar_colour(r) for r in records]
        y = list(range(len(records)))
        ax.barh(
            y, means, xerr=ses, color=colours, capsize=4, height=0.6, error_kw={"elinewidth": 1.2}
        )
        for yi, m, s, r in zip(y, means, ses, records, strict=True):
            ax.text(min(m + s, 100) + 1, yi, pm(r, metric), va="center", fontsize=8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 115)
        ax.set_xticks(range(0, 101, 20))
        ax.set_xlabel(f"target test {LABELS[metric]} %")
        ax.set_title(title.replace(", of the", ",\nof the"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        return _save(results_dir, fig, names(pair, "leaderboard"), title)


def _bar_label(r: dict[str, Any]) -> str:
    """A bar's label: the method, the rule that picked its trial, and its flags."""
    flags = [str(r.get("selection") or "-")]
    flags += ["oracle"] if truthy(r.get("oracle")) else []
    flags += ["reference: target labels"] if truthy(r.get("reference")) else []
    status = "" if r.get("status") == "final" else f" [{r.get('status')}]"
    return f"{r['method']} ({', '.join(flags)}){status}"


def _bar_colour(r: dict[str, Any]) -> str:
    if truthy(r.get("reference")):
        return REFERENCE_COLOUR
    return ORACLE_COLOUR if truthy(r.get("oracle")) else BAR_COLOUR


def _freeze_depth_plot(
    results_dir: Path,
    spec: StudySpec,
    pair: str,
    drivers: dict[str, str | None],
    trials: pd.DataFrame,
    names: _Names,
) -> Figure:
    """Each method's trial values by freeze depth: the score of the rule that drove its search."""
    shown = rules_label([r for r in drivers.values() if r], spec.task)
    title = f"{pair}: freeze depth vs trial value ({shown.axis})"
    needed = {"pair", "method", "state", "value", "backbone.freeze_depth"}
    if trials is None or trials.empty or not needed <= set(trials.columns):
        return Figure(title, note="no trial recorded a freeze depth")
    t = trials[(trials["pair"] == pair) & (trials["state"] == TrialState.COMPLETE.name)].copy()
    t["value"] = pd.to_numeric(t["value"], errors="coerce")
    t["depth"] = pd.to_numeric(t["backbone.freeze_depth"], errors="coerce")
    t = t[t["value"].map(finite) & t["depth"].map(finite)]
    if t.empty:
        return Figure(title, note="no completed trial with a freeze depth and a finite value")
    labels = {m: rule_label(r, spec.task) for m, r in drivers.items()}
    with _pyplot() as plt:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        _freeze_depth_axes(ax, t, labels)
        ax.set_xlabel("backbone.freeze_depth (stages frozen, stem first)")
        ax.set_ylabel(f"trial value: {shown.axis}")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False
        )
        return _save(results_dir, fig, names(pair, "freeze-depth"), title)


def _freeze_depth_axes(ax: Any, t: pd.DataFrame, labels: dict[str, RuleLabel]) -> None:
    """One box and one scatter per method and depth: methods may be selected on different
    splits, so their trial values are not pooled; each in its own rule's unit (``labels``)."""
    methods = list(dict.fromkeys(t["method"]))
    depths = sorted({int(d) for d in t["depth"]})
    width = min(0.8 / max(1, len(methods)), 0.35)
    markers = "osD^v<>Pp*Xh"
    for j, method in enumerate(methods):
        m = t[t["method"] == method]
        offset = (j - (len(methods) - 1) / 2) * width
        colour = f"C{j % 10}"
        present = [d for d in depths if (m["depth"] == d).any()]
        label = labels.get(method) or rule_label(None, "classification")
        values = m["value"].astype(float).map(label.scale)
        ax.boxplot([values[m["depth"] == d].to_numpy(dtype=float) for d in present],
                   positions=[d + offset for d in present], widths=width * 0.8, showfliers=False,
                   patch_artist=True, manage_ticks=False,
                   boxprops={"facecolor": "none", "edgecolor": colour, "alpha": 0.6},
                   medianprops={"color": colour}, whiskerprops={"color": colour, "alpha": 0.6},
                   capprops={"color": colour, "alpha": 0.6})  # fmt: skip
        ax.scatter(m["depth"] + offset, values, s=26, alpha=0.9, marker=markers[j % len(markers)],
                   color=colour, label=f"{method} ({label.axis})", zorder=3)  # fmt: skip
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlim(min(depths) - 0.7, max(depths) + 0.7)


def _optuna_study(study: StoredStudy, label: RuleLabel | None = None) -> optuna.Study:
    """An in-memory copy of a stored study, trial numbers kept: Optuna's plots take a Study.
    With ``label``, completed trials' values are in its unit (a labelled split's score in %)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"
    try:
        mirror = optuna.create_study(study_name=study.name, directions=study.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    trials = study.trials
    if label is not None and label.percent:
        trials = [_scaled(t, label) for t in trials]
    mirror.add_trials(trials)
    return mirror


def _scaled(t: FrozenTrial, label: RuleLabel) -> FrozenTrial:
    if t.state != TrialState.COMPLETE or not finite(t.value):
        return t
    scaled = copy.deepcopy(t)
    scaled.value = label.scale(float(t.value))
    return scaled


def _history_plot(
    results_dir: Path,
    spec: StudySpec,
    pair: str,
    method: str,
    study: StoredStudy | None,
    names: _Names,
) -> Figure:
    label = rule_label(driving_rule(study), spec.task)
    title = f"{method}: optimization history, trial value = {label.axis}"
    if study is None:
        return Figure(title, note="not started: no Optuna study in the storage")
    if not study.completed():
        return Figure(title, note="no completed trial yet")
    from optuna.visualization.matplotlib import plot_optimization_history

    with _pyplot():
        ax = plot_optimization_history(_optuna_study(study, label), target_name=label.axis)
        fig = ax.figure
        fig.set_size_inches(6.5, 3.4)
        ax.set_title(f"{pair} | {method}\noptimization history ({label.axis})", fontsize=9)
        return _save(results_dir, fig, names(pair, method, "history"), title)


def importance_note(complete: list[FrozenTrial]) -> str | None:
    """Why parameter importances cannot be computed over the ``complete`` trials, or None when
    they can: they need at least 2 completed trials and more than one parameter that varies
    across them."""
    if len(complete) < 2:
        return f"parameter importances need at least 2 completed trials ({len(complete)} so far)"
    common = set.intersection(*(set(t.params) for t in complete))
    varying = sorted(
        p for p in common if len({json.dumps(t.params[p], default=str) for t in complete}) > 1
    )
    if len(varying) < 2:
        shown = f" (only {varying[0]})" if varying else ""
        return f"parameter importances need more than one searched parameter that varies across completed trials{shown}"
    return None


def _importance_plot(
    results_dir: Path,
    spec: StudySpec,
    pair: str,
    method: str,
    study: StoredStudy | None,
    names: _Names,
) -> Figure:
    label = rule_label(driving_rule(study), spec.task)
    title = f"{method}: parameter importances for the trial value ({label.name})"
    if study is None:
        return Figure(title, note="not started: no Optuna study in the storage")
    note = importance_note(study.completed())
    if note:
        return Figure(title, note=note)
    from optuna.visualization.matplotlib import plot_param_importances

    mirror = _optuna_study(study)
    with _pyplot() as plt, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            ax = plot_param_importances(mirror, target_name=label.name)
        except (RuntimeError, ValueError) as exc:  # e.g. a search space that changed between trials
            plt.close("all")
            return Figure(
                title,
                note=f"parameter importances not computable: {str(exc).splitlines()[0][:200]}",
            )
        # Optuna's caveats (e.g. too few trials in a regime of a conditional parameter) go in the caption
        caveats = list(
            dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning))
        )
        fig = ax.figure
        n = len(ax.get_yticks())
        fig.set_size_inches(6.5, 1.4 + 0.35 * max(n, 2))
        ax.set_title("", loc="left")  # Optuna's own title, replaced by a centred one
        ax.set_title(
            f"{pair} | {method}\nparameter importances for {label.name} "
            f"({len(study.completed())} completed trials)",
            fontsize=9,
        )
        figure = _save(results_dir, fig, names(pair, method, "importance"), title)
    figure.note = " ".join(f"Optuna: {c}" for c in caveats)
    return figure


def _remove_stale_plots(results_dir: Path, keep: set[str]) -> None:
    folder = results_dir / PLOTS
    if folder.is_dir():
        for png in folder.glob("*.png"):
            if png.name not in keep:
                png.unlink(missing_ok=True)
