"""Publishing: plots, a self-contained ``index.html``, a re-run bundle and the results index.

Everything here reads what :func:`harness.publish.leaderboard.collect` returns plus the Optuna storage, so
a report can be rebuilt at any time without training. Every file is written atomically.

- :func:`write_report` -> ``results/<study>/index.html`` and ``results/<study>/plots/*.png``
- :func:`export_bundle` -> ``results/<study>/bundle/`` (study file, resolved study, best
  parameters, ``rerun.sh``, ``README.txt``)
- :func:`write_results_index` -> ``results/README.md``, one row per published study
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.fileio import atomic_path, write_json, write_text
from harness.metrics import LABELS, METRICS, primary_metric
from harness.publish.leaderboard import _finite, _int, _pct, _pm, _records, _redact, _val
from harness.search import default_storage, journal_storage, make_storage, optuna_study_name
from harness.study import StudySpec

DPI = 100
PLOTS = "plots"
BUNDLE = "bundle"
LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard.json", "leaderboard.md", "trials.csv")
#: matplotlib's default first colour: the bars of non-oracle rows
BAR_COLOUR = "#1f77b4"
ORACLE_COLOUR = "#ff7f0e"


@dataclass
class Figure:
    """A plot written to ``plots/``, or the reason it could not be drawn (``file`` is None)."""

    title: str
    file: str | None = None  # relative to the results folder, e.g. "plots/x.png"
    png: bytes = b""
    note: str = ""


# ------------------------------------------------------------------------------------- report


def write_report(
    results_dir: Path,
    spec: StudySpec,
    board: pd.DataFrame,
    trials: pd.DataFrame,
    provenance: dict[str, Any],
    storage_url: str,
) -> Path:
    """Write ``plots/*.png`` and a self-contained ``index.html`` into ``results_dir``; return the
    path of ``index.html``. Plots that cannot be drawn (too few trials) are replaced by a note."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    names = _Names()
    pairs = _pairs(spec, board)
    storage = make_storage(storage_url)
    try:
        existing = {
            s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        }
        figures: dict[str, dict[str, Any]] = {}
        for pair in pairs:
            rows = board[board["pair"] == pair] if "pair" in board else board.iloc[0:0]
            entry: dict[str, Any] = {
                "leaderboard": _leaderboard_plot(results_dir, spec, pair, rows, names),
                "freeze": _freeze_depth_plot(results_dir, spec, pair, rows, trials, names),
                "methods": {},
            }
            for p in spec.pairs:
                if p.key != pair:
                    continue
                for method in spec.methods:
                    name = optuna_study_name(p, method)
                    study = (
                        optuna.load_study(study_name=name, storage=storage)
                        if name in existing
                        else None
                    )
                    entry["methods"][method.key] = (
                        _history_plot(results_dir, spec, pair, method.key, study, names),
                        _importance_plot(results_dir, spec, pair, method.key, study, names),
                    )
            figures[pair] = entry
    finally:
        _dispose(storage)
    _remove_stale_plots(results_dir, names.used)
    path = results_dir / "index.html"
    write_text(path, _html(results_dir, spec, board, provenance, pairs, figures))
    return path


def _pairs(spec: StudySpec, board: pd.DataFrame) -> list[str]:
    keys = [p.key for p in spec.pairs]
    if "pair" in board:
        keys += [k for k in board["pair"].drop_duplicates() if k not in keys]
    return keys


class _Names:
    """Unique, file-system-safe plot file names, deterministic in the order they are asked for."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: str) -> str:
        stem = "__".join(_slug(p) for p in parts)
        name, n = f"{stem}.png", 2
        while name in self.used:
            name, n = f"{stem}-{n}.png", n + 1
        self.used.add(name)
        return name


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.").lower()
    return slug[:80] or hashlib.sha1(text.encode()).hexdigest()[:8]


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
    col, std_col = f"test_{metric}", f"test_{metric}_std"
    title = f"{pair}: target test {LABELS[metric]} %, mean ± sd over seeds"
    records = [r for r in rows.to_dict("records") if _finite(r.get(col))]
    if not records:
        return Figure(title, note="no row has a test score yet (no final run finished)")
    records.sort(key=lambda r: -float(r[col]))
    with _pyplot() as plt:
        fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.45 * len(records)))
        means = [100 * float(r[col]) for r in records]
        stds = [100 * float(r[std_col]) if _finite(r.get(std_col)) else 0.0 for r in records]
        labels = [
            str(r["method"])
            + (" (oracle)" if _truthy(r.get("oracle")) else "")
            + ("" if r.get("status") == "final" else f" [{r.get('status')}]")
            for r in records
        ]
        colours = [ORACLE_COLOUR if _truthy(r.get("oracle")) else BAR_COLOUR for r in records]
        y = list(range(len(records)))
        ax.barh(
            y, means, xerr=stds, color=colours, capsize=4, height=0.6, error_kw={"elinewidth": 1.2}
        )
        for yi, m, s, r in zip(y, means, stds, records, strict=True):
            ax.text(min(m + s, 100) + 1, yi, _pm(r, metric), va="center", fontsize=8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 115)
        ax.set_xticks(range(0, 101, 20))
        ax.set_xlabel(f"target test {LABELS[metric]} %")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        return _save(results_dir, fig, names(pair, "leaderboard"), title)


def _freeze_depth_plot(
    results_dir: Path,
    spec: StudySpec,
    pair: str,
    rows: pd.DataFrame,
    trials: pd.DataFrame,
    names: _Names,
) -> Figure:
    metric = primary_metric(spec.task)
    title = f"{pair}: freeze depth vs trial validation {LABELS[metric]}"
    needed = {"pair", "method", "state", "value", "backbone.freeze_depth"}
    if trials is None or trials.empty or not needed <= set(trials.columns):
        return Figure(title, note="no trial recorded a freeze depth")
    t = trials[(trials["pair"] == pair) & (trials["state"] == TrialState.COMPLETE.name)].copy()
    t["value"] = pd.to_numeric(t["value"], errors="coerce")
    t["depth"] = pd.to_numeric(t["backbone.freeze_depth"], errors="coerce")
    t = t[t["value"].map(_finite) & t["depth"].map(_finite)]
    if t.empty:
        return Figure(title, note="no completed trial with a freeze depth and a finite value")
    selection = (
        dict(zip(rows["method"], rows["selection"], strict=False)) if "selection" in rows else {}
    )
    methods = list(dict.fromkeys(t["method"]))
    depths = sorted({int(d) for d in t["depth"]})
    width = min(0.8 / max(1, len(methods)), 0.35)
    with _pyplot() as plt:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        markers = "osD^v<>Pp*Xh"
        for j, method in enumerate(methods):
            m = t[t["method"] == method]
            offset = (j - (len(methods) - 1) / 2) * width
            colour = f"C{j % 10}"
            present = [d for d in depths if (m["depth"] == d).any()]
            # one box per method and depth: methods may be selected on different splits, so their
            # trial values are not pooled
            ax.boxplot([100 * m.loc[m["depth"] == d, "value"].to_numpy(dtype=float) for d in present],
                       positions=[d + offset for d in present], widths=width * 0.8, showfliers=False,
                       patch_artist=True, manage_ticks=False,
                       boxprops={"facecolor": "none", "edgecolor": colour, "alpha": 0.6},
                       medianprops={"color": colour}, whiskerprops={"color": colour, "alpha": 0.6},
                       capprops={"color": colour, "alpha": 0.6})  # fmt: skip
            rule = selection.get(method)
            label = f"{method} ({rule})" if isinstance(rule, str) and rule else str(method)
            ax.scatter(m["depth"] + offset, 100 * m["value"], s=26, alpha=0.9, marker=markers[j % len(markers)],
                       color=colour, label=label, zorder=3)  # fmt: skip
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlim(min(depths) - 0.7, max(depths) + 0.7)
        ax.set_xlabel("backbone.freeze_depth (stages frozen, stem first)")
        ax.set_ylabel(f"trial value: validation {LABELS[metric]} %")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False
        )
        return _save(results_dir, fig, names(pair, "freeze-depth"), title)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if _finite(t.value)
    ]


def _history_plot(
    results_dir: Path,
    spec: StudySpec,
    pair: str,
    method: str,
    study: optuna.Study | None,
    names: _Names,
) -> Figure:
    metric = primary_metric(spec.task)
    title = f"{method}: optimization history"
    if study is None:
        return Figure(title, note="not started: no Optuna study in the storage")
    if not _complete(study):
        return Figure(title, note="no completed trial yet")
    from optuna.visualization.matplotlib import plot_optimization_history

    with _pyplot():
        ax = plot_optimization_history(study, target_name=f"validation {LABELS[metric]}")
        fig = ax.figure
        fig.set_size_inches(6.5, 3.4)
        ax.set_title(f"{pair} | {method}\noptimization history", fontsize=9)
        return _save(results_dir, fig, names(pair, method, "history"), title)


def importance_note(study: optuna.Study) -> str | None:
    """Why parameter importances cannot be computed for ``study``, or None when they can: they
    need at least 2 completed trials and more than one parameter that varies across them."""
    complete = _complete(study)
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
    study: optuna.Study | None,
    names: _Names,
) -> Figure:
    metric = primary_metric(spec.task)
    title = f"{method}: parameter importances"
    if study is None:
        return Figure(title, note="not started: no Optuna study in the storage")
    note = importance_note(study)
    if note:
        return Figure(title, note=note)
    from optuna.visualization.matplotlib import plot_param_importances

    with _pyplot() as plt, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            ax = plot_param_importances(study, target_name=f"validation {LABELS[metric]}")
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
            f"{pair} | {method}\nparameter importances ({len(_complete(study))} completed trials)",
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


def _dispose(storage: Any) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


# ------------------------------------------------------------------------------------- HTML

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 1150px; padding: 1.2rem 1.5rem 3rem; color: #1b1b1b; background: #fff;
       line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
h3 { font-size: 1.02rem; margin: 1.4rem 0 0.4rem; font-family: ui-monospace, Menlo, Consolas, monospace; }
p.lead { font-size: 1.05rem; color: #333; }
p.note, span.note { color: #666; font-size: 0.9rem; }
td.nowrap { white-space: nowrap; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d6d6d6; padding: 0.3rem 0.55rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.method { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.85rem; }
.badge { display: inline-block; padding: 0 0.4rem; margin-left: 0.3rem; border-radius: 0.6rem;
         font-size: 0.75rem; font-weight: 600; }
.badge.oracle { background: #fde2c4; color: #8a4200; border: 1px solid #f0a050; }
figure { margin: 0.6rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e2e2e2; }
figcaption { font-size: 0.85rem; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 1rem; }
.grid figure { flex: 1 1 480px; }
a { color: #0b57d0; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 0.25rem 1rem; font-size: 0.9rem; }
dl.prov dt { font-weight: 600; }
dl.prov dd { margin: 0; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; margin: 0; }
footer { margin-top: 3rem; font-size: 0.8rem; color: #777; }
"""

# No scripts, fonts, styles or images may come from anywhere but this file (plots are data: URIs).
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _href(path: str) -> str:
    return _e(quote(path, safe="/._-~"))


def _html(
    results_dir: Path,
    spec: StudySpec,
    board: pd.DataFrame,
    provenance: dict[str, Any],
    pairs: list[str],
    figures: dict[str, dict[str, Any]],
) -> str:
    m1, m2 = (METRICS[spec.task] + (None,))[:2]
    title = f"Leaderboard: {spec.name}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if spec.description:
        out.append(f'<p class="lead">{_e(spec.description.strip())}</p>')
    out.append(
        f"<p>Target <strong>test</strong> {_e(LABELS[m1])}"
        + (f" and {_e(LABELS[m2])}" if m2 else "")
        + f" in %, mean ± standard error over {spec.final_seeds} seeded final runs of the trial the row's "
        "selection rule picked. Trials were selected on a validation split or by a label-free validator on "
        "unlabelled target validation images (column <em>selection</em>); the test split was read "
        "only by the final runs. Rows marked "
        '<span class="badge oracle">oracle</span> were selected with target labels although the method '
        "trains without them, and are ranked among themselves.</p>"
    )
    out.append(_nav(pairs))
    for pair in pairs:
        rows = board[board["pair"] == pair] if "pair" in board else board.iloc[0:0]
        fig = figures.get(pair, {})
        out.append(f'<h2 id="{_e(_slug(pair))}">{_e(pair)}</h2>')
        out.append(_table(rows, m1, m2))
        if "leaderboard" in fig:
            out.append(_figure(fig["leaderboard"]))
        if "freeze" in fig:
            out.append(_figure(fig["freeze"]))
        for rec in rows.to_dict("records"):
            method = rec["method"]
            out.append(f"<h3>{_e(method)}</h3>")
            out.append(_best_params(rec))
            history, importance = fig.get("methods", {}).get(method, (None, None))
            out.append(
                '<div class="grid">'
                + "".join(_figure(f) for f in (history, importance) if f)
                + "</div>"
            )
    out.append('<h2 id="files">Files</h2>')
    out.append(_files(results_dir, figures))
    out.append('<h2 id="provenance">Provenance</h2>')
    out.append(_provenance(provenance))
    out.append(
        f"<footer>Generated by harness {_e(provenance.get('harness_version', ''))} at "
        f"{_e(provenance.get('generated_at', ''))} from the Optuna storage and {_e(provenance.get('study_file', ''))}.</footer>"
    )
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _nav(pairs: list[str]) -> str:
    links = [f'<a href="#{_e(_slug(p))}">{_e(p)}</a>' for p in pairs]
    links += ['<a href="#files">files</a>', '<a href="#provenance">provenance</a>']
    return "<p>" + " · ".join(links) + "</p>"


def _table(rows: pd.DataFrame, m1: str, m2: str | None) -> str:
    head = ["rank", "method", "strategy", f"test {LABELS[m1]} %"]
    head += [f"test {LABELS[m2]} %"] if m2 else []
    head += ["val", "selection", "trials ok/pruned/failed", "status"]
    out = [
        "<table>",
        "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>",
        "<tbody>",
    ]
    for r in rows.to_dict("records"):
        rank = r.get("rank")
        rank = (
            "-"
            if rank is None or rank is pd.NA or (isinstance(rank, float) and math.isnan(rank))
            else int(rank)
        )
        selection = _e(r.get("selection") or "-")
        if _truthy(r.get("oracle")):
            selection += ' <span class="badge oracle">oracle</span>'
        cells = [
            f'<td class="num">{_e(rank)}</td>',
            f'<td class="method">{_e(r.get("method"))}</td>',
            f'<td class="nowrap">{_e(r.get("strategy"))}</td>',
            f'<td class="num">{_e(_pm(r, m1))}</td>',
        ]
        if m2:
            cells.append(f'<td class="num">{_e(_pm(r, m2))}</td>')
        cells += [
            f'<td class="num">{_e(_val(r))}</td>',
            f'<td class="nowrap">{selection}</td>',
            '<td class="num">'
            + _e(
                f"{_int(r.get('trials_complete'))}/{_int(r.get('trials_pruned'))}/{_int(r.get('trials_failed'))}"
            )
            + "</td>",
            f"<td>{_e(r.get('status'))}</td>",
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _best_params(rec: dict[str, Any]) -> str:
    params = rec.get("best_params")
    if not isinstance(params, dict) or not params:
        return f'<p class="note">{_e(rec.get("status") or "no best trial")}: no best parameters</p>'
    items = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in sorted(params.items())
    )
    trial = rec.get("best_trial")
    trial = int(trial) if _finite(trial) else "-"
    return (
        f'<p class="note">best trial {_e(trial)}, validation score {_e(_pct(rec.get("val_score")))} %</p>'
        f"<table><thead><tr><th>parameter</th><th>value</th></tr></thead><tbody>{items}</tbody></table>"
    )


def _truthy(v: Any) -> bool:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _figure(f: Figure | None) -> str:
    if f is None:
        return ""
    if f.file is None:
        return f'<figure><figcaption>{_e(f.title)}: <span class="note">{_e(f.note)}</span></figcaption></figure>'
    data = base64.b64encode(f.png).decode("ascii")
    note = f' <span class="note">{_e(f.note)}</span>' if f.note else ""
    return (
        f'<figure><a href="{_href(f.file)}"><img src="data:image/png;base64,{data}" alt="{_e(f.title)}"></a>'
        f'<figcaption>{_e(f.title)} (<a href="{_href(f.file)}">{_e(f.file)}</a>){note}</figcaption></figure>'
    )


def _files(results_dir: Path, figures: dict[str, dict[str, Any]]) -> str:
    items = [f'<li><a href="{_href(name)}">{_e(name)}</a></li>' for name in LEADERBOARD_FILES]
    plots = [
        f
        for entry in figures.values()
        for f in (
            entry.get("leaderboard"),
            entry.get("freeze"),
            *(x for pair in entry.get("methods", {}).values() for x in pair),
        )
        if f is not None and f.file
    ]
    if plots:
        items.append(
            "<li>plots:<ul>"
            + "".join(f'<li><a href="{_href(f.file)}">{_e(f.file)}</a></li>' for f in plots)
            + "</ul></li>"
        )
    bundle = results_dir / BUNDLE
    if bundle.is_dir():
        files = sorted(
            p.name for p in bundle.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        items.append(
            "<li>re-run bundle (<code>sh bundle/rerun.sh</code>):<ul>"
            + "".join(
                f'<li><a href="{_href(f"{BUNDLE}/{n}")}">{_e(f"{BUNDLE}/{n}")}</a></li>'
                for n in files
            )
            + "</ul></li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def _provenance(p: dict[str, Any]) -> str:
    out = ['<dl class="prov">']
    for key, value in p.items():
        out.append(f"<dt>{_e(key)}</dt>")
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
        ):
            out.append(
                f"<dd><pre>{_e(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre></dd>"
            )
        elif isinstance(value, list):
            out.append(f"<dd>{_e(', '.join(str(v) for v in value) or '-')}</dd>")
        else:
            out.append(f"<dd>{_e('-' if value is None else value)}</dd>")
    out.append("</dl>")
    out.append(
        "<details><summary>provenance as JSON</summary><pre>"
        + _e(json.dumps(p, indent=2, default=str))
        + "</pre></details>"
    )
    return "\n".join(out)


# ------------------------------------------------------------------------------------- bundle


def export_bundle(
    results_dir: Path, spec: StudySpec, board: pd.DataFrame, storage_url: str
) -> Path:
    """Write ``results_dir/bundle/``: the study file, ``resolved_study.json``, ``best_params.json``,
    ``rerun.sh`` (re-runs the final seeds against the storage) and ``README.txt``; return the folder."""
    from harness.errors import HarnessError

    results_dir = Path(results_dir)
    bundle = results_dir / BUNDLE
    bundle.mkdir(parents=True, exist_ok=True)
    source = Path(spec.path) if spec.path else None
    if source is None or not source.is_file():
        raise HarnessError(
            f"cannot bundle study {spec.name!r}: its study file {spec.path or '(none)'} is not there",
            hint="run the command from the folder the study was run from",
        )
    study_copy = bundle / f"{spec.name}.toml"  # `harness run` names the study after the file
    raw = source.read_bytes()
    with atomic_path(study_copy) as tmp:
        tmp.write_bytes(raw)
    write_json(bundle / "resolved_study.json", spec.model_dump(mode="json"))
    write_json(bundle / "best_params.json", _best_params_json(spec, board))

    default = {
        default_storage(results_dir): "optuna.db",
        journal_storage(results_dir): "optuna.journal",
    }.get(storage_url)
    shown_storage = _redact(storage_url)
    hashes = _started_with(spec, storage_url)
    write_text(bundle / "rerun.sh", _rerun_sh(results_dir, spec, shown_storage, default))
    (bundle / "rerun.sh").chmod(0o755)
    write_text(
        bundle / "README.txt", _bundle_readme(spec, board, shown_storage, default, hashes, raw)
    )
    return bundle


def _best_params_json(spec: StudySpec, board: pd.DataFrame) -> dict[str, Any]:
    metric = primary_metric(spec.task)
    pairs: dict[str, dict[str, Any]] = {}
    for r in _records(board):
        pairs.setdefault(r["pair"], {})[r["method"]] = {
            "rank": r.get("rank"),
            "status": r.get("status"),
            "strategy": r.get("strategy"),
            "selection": r.get("selection"),
            "oracle": _truthy(r.get("oracle")),
            "best_trial": r.get("best_trial"),
            "val_score": r.get("val_score"),
            f"test_{metric}": r.get(f"test_{metric}"),
            f"test_{metric}_std": r.get(f"test_{metric}_std"),
            "seeds": r.get("seeds"),
            "params": r.get("best_params") if isinstance(r.get("best_params"), dict) else None,
        }
    return {
        "study": spec.name,
        "task": spec.task,
        "primary_metric": metric,
        "note": "params of the best trial per (pair, method), chosen on the validation split named by 'selection'",
        "pairs": pairs,
    }


def _started_with(spec: StudySpec, storage_url: str) -> dict[str, str]:
    """The study file hash each Optuna study was started with, where it differs from the current file's."""
    out: dict[str, str] = {}
    try:
        storage = make_storage(storage_url)
    except Exception:  # noqa: BLE001 - the bundle does not need the storage to be reachable
        return out
    try:
        existing = {
            s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        }
        for pair in spec.pairs:
            for method in spec.methods:
                name = optuna_study_name(pair, method)
                if name in existing:
                    h = optuna.load_study(study_name=name, storage=storage).user_attrs.get(
                        "study_file_hash"
                    )
                    if h and h != spec.file_hash:
                        out[name] = h
    finally:
        _dispose(storage)
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
        )
    return json.dumps(str(v))


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _rerun_sh(results_dir: Path, spec: StudySpec, storage: str, default: str | None) -> str:
    sets = "".join(
        f" \\\n    --set {_sh(f'{k}={_toml_value(v)}')}" for k, v in spec.overrides.items()
    )
    scheme = "journal" if default == "optuna.journal" else "sqlite"
    storage_default = f'"{scheme}:///$HERE/../{default}"' if default else _sh(storage)
    results = ' --results-dir "$HERE/../.."' if results_dir.name == spec.name else ""
    lines = [
        "#!/bin/sh",
        f"# Re-run study {spec.name!r} from this bundle: `harness run` on the bundled study file,",
        "# against the storage the results came from.",
        "#",
        "# Re-running with the same storage resumes: completed trials are reused (nothing is searched",
        "# again once the trial budget is spent), and only the final seeded runs that are missing are",
        "# trained; then the leaderboard files are rewritten from the storage.",
        "# To repeat everything, search included, point HARNESS_STORAGE at a new, empty storage and",
        "# pass another --results-dir, e.g.",
        "#   HARNESS_STORAGE=journal:////tmp/rerun.journal sh rerun.sh --results-dir /tmp/rerun",
        "# Extra arguments are passed on to `harness run`; HARNESS names the harness executable.",
        "set -eu",
        'HERE=$(cd "$(dirname "$0")" && pwd)',
        f"STORAGE=${{HARNESS_STORAGE:-{storage_default}}}",
        f'exec "${{HARNESS:-harness}}" run --study "$HERE/{spec.name}.toml" --storage "$STORAGE"{results}{sets} "$@"',
        "",
    ]
    if "***@" in storage:
        lines.insert(
            11, "# The storage URL's credentials were removed: set HARNESS_STORAGE to the full URL."
        )
    return "\n".join(lines)


def _bundle_readme(
    spec: StudySpec,
    board: pd.DataFrame,
    storage: str,
    default: str | None,
    hashes: dict[str, str],
    raw: bytes,
) -> str:
    metric = primary_metric(spec.task)
    n_final = int((board["status"] == "final").sum()) if "status" in board else 0
    title = f"Re-run bundle of study {spec.name!r}"
    lines = [
        title,
        "=" * len(title),
        "",
        (spec.description.strip() + "\n") if spec.description else "",
        "Files",
        "-----",
        f"{spec.name}.toml       the study file, byte for byte (sha256 {hashlib.sha256(raw).hexdigest()[:16]}, as in the",
        "                      leaderboard's provenance); `harness run` names the study after the file.",
        "resolved_study.json   the study with every default filled in"
        + (
            f" and the --set overrides {json.dumps(spec.overrides)} applied"
            if spec.overrides
            else ""
        )
        + ".",
        "best_params.json      per pair and method: the best trial's parameters, its validation score,",
        f"                      selection rule, rank and target test {metric} (mean, sd and se over the seeds).",
        "rerun.sh              re-runs the study against its storage (see below).",
        "",
        "Re-running",
        "----------",
        "    sh rerun.sh",
        "",
        f"runs `harness run --study {spec.name}.toml --storage <url>`"
        + (" with the same --set overrides" if spec.overrides else "")
        + ". The storage is "
        + (
            f"the {'journal' if default == 'optuna.journal' else 'SQLite'} file ../{default}, beside this folder"
            if default
            else storage
        )
        + ".",
        "Running it against the same storage resumes: completed trials are reused and only missing",
        f"final runs ({spec.final_seeds} seeds per pair and method, seeds {spec.seed + 10_000}..{spec.seed + 10_000 + spec.final_seeds - 1})",
        "are trained, so with a complete storage it only rewrites the leaderboard. To repeat the whole",
        "search and the final runs, set HARNESS_STORAGE to a new, empty storage and pass another",
        "--results-dir; the study seed, the data splits and the search space are those of the study file.",
        "",
        "Trials were scored on validation splits only (labelled ones, or the unlabelled target",
        "validation images for label-free rules); the target test split was read once per final run.",
        f"{n_final} of {len(board)} leaderboard rows had all their final runs when this bundle was written.",
    ]
    if hashes:
        lines += [
            "",
            "Note: some Optuna studies were started with a different version of the study file",
            "(fields that do not change results, such as the trial budget, may differ):",
            *(f"  {name}: sha256 {h}" for name, h in sorted(hashes.items())),
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- results index


def write_results_index(results_root: Path) -> Path:
    """Regenerate ``results_root/README.md``: one row per ``<study>/leaderboard.json``."""
    results_root = Path(results_root)
    results_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for board_file in sorted(results_root.glob("*/leaderboard.json")):
        folder = board_file.parent
        name = folder.name
        try:
            data = json.loads(board_file.read_text(encoding="utf-8"))
            records = data.get("rows") or []
            description = data.get("description") or ""
            headline = _headline(records)
            count = str(len(records))
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
        rows.append([name, description, headline, count, " · ".join(links) or "-"])
    lines = [
        "# Published results",
        "",
        "Every study published in this folder. *Headline*: the rank-1 row of each source → target pair "
        "among the rows not flagged oracle, its target **test** primary metric in %, mean ± standard "
        "error over the seeded final runs, and the rule that selected its trial: a labelled "
        "validation split (`target-val`, `source-val`) or a label-free validator scoring unlabelled "
        "target validation images (`im`, `snd`, ...); a method picked by several rules with the same "
        "result is listed once with all of them. Each study's `index.html` is a self-contained "
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
    path = results_root / "README.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


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
            key = (str(r.get("pair")), str(r.get("label") or r.get("method")), _pm(r, metric))
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
