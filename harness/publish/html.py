"""``index.html``: a self-contained report page (the board per pair with its plots, each method's
best parameters, the files and the provenance), with no script and nothing loaded from elsewhere:
plots are embedded as data URIs."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from harness.fileio import write_text
from harness.metrics import metric_label
from harness.publish.bundle import BUNDLE
from harness.publish.domainbed import html_sections
from harness.publish.format import finite, pm, trial_counts, truthy
from harness.publish.labels import REFERENCE_LABEL, REFERENCE_NOTE, rank_label, rule_label
from harness.publish.markdown import STANDARD_NOTE, protocol_title
from harness.publish.plots import Figure, draw, pairs_of, slug
from harness.publish.rank import shown_metrics, unfinished
from harness.publish.results import Results
from harness.publish.trainings import pair_notes
from harness.publish.uncertainty import CI_LABEL, ci_cell
from harness.study import StudySpec

LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard.json", "leaderboard.md", "trials.csv")


def write_report(
    results_dir: Path,
    results: Results,
    board: pd.DataFrame,
    trials: pd.DataFrame,
    provenance: dict[str, Any],
) -> Path:
    """Write ``plots/*.png`` and a self-contained ``index.html`` into ``results_dir``; return the
    path of ``index.html``. Plots that cannot be drawn (too few trials) are replaced by a note."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    pairs = pairs_of(results.spec, board)
    figures = draw(results_dir, results, pairs, board, trials)
    path = results_dir / "index.html"
    write_text(path, _html(results_dir, results.spec, board, provenance, pairs, figures))
    return path


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
.badge.reference { background: #e8e8e8; color: #333; border: 1px solid #aaa; }
p.notes { border-left: 3px solid #f0a050; padding-left: 0.6rem; }
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
    shown = shown_metrics(spec)
    out = _head(spec, shown, unfinished(board))
    out.append(_nav(pairs))
    out += html_sections(spec, board)  # DomainBed's tables, for leave-one-out groups only
    for pair in pairs:
        rows = board[board["pair"] == pair] if "pair" in board else board.iloc[0:0]
        out += _pair_section(pair, rows, figures.get(pair, {}), spec.task, shown)
        out += [f'<p class="note">{_e(note)}</p>' for note in pair_notes(provenance, pair)]
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


def _partial_notice(missing: dict[str, Any]) -> str:
    """The notice of an unfinished study, at the top of the page."""
    started, short = len(missing["not_started"]), len(missing["without_final_seeds"])
    return (
        "<p><strong>Partial results</strong>: this study is unfinished (interrupted, or still "
        f"running): {started} method(s) not started, {short} row(s) without all their final seeds. "
        "Only rows with all their final seeds are ranked.</p>"
    )


def _head(spec: StudySpec, shown: list[str], missing: dict[str, Any] | None) -> list[str]:
    """The document head, the title and the lead paragraphs (and what an unfinished study lacks)."""
    title = f"Leaderboard: {spec.name}" + protocol_title(spec, missing)
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
    if spec.notes:
        out.append(f'<p class="notes"><strong>Notes.</strong> {_e(spec.notes.strip())}</p>')
    if spec.data.protocol == "standard":
        out.append(f"<p>{_e(STANDARD_NOTE)}</p>")
    if missing:
        out.append(_partial_notice(missing))
    out.append(
        f"<p>Target <strong>test</strong> {_e(metric_label(shown[0]))}"
        + "".join(f" and {_e(metric_label(m))}" for m in shown[1:])
        + f" in %, mean ± standard error over {spec.final_seeds} seeded final runs of the trial the row's "
        "selection rule picked. Trials were selected on a validation split or by a label-free validator on "
        "unlabelled target validation images (column <em>selection</em>); the test split was read "
        "only by the final runs. Rows marked "
        '<span class="badge oracle">oracle</span> were selected with target labels although the method '
        "trains without them, and are ranked among themselves. Column <em>selecting score</em>: the "
        "picked trial's score under the row's rule, in % for a labelled validation split, the "
        "validator's own value for a label-free rule.</p>"
    )
    return out


def _pair_section(
    pair: str, rows: pd.DataFrame, fig: dict[str, Any], task: str, shown: list[str]
) -> list[str]:
    """One pair: its table, its plots, and each row's best parameters; each method's search plots
    once, after its first row."""
    own = " (in-domain)" if "in_domain" in rows and rows["in_domain"].fillna(False).any() else ""
    out = [f'<h2 id="{_e(slug(pair))}">{_e(pair + own)}</h2>', _table(rows, task, shown)]
    if "reference" in rows and rows["reference"].fillna(False).astype(bool).any():
        out.append(f'<p class="note">{_e(REFERENCE_NOTE.replace("*", ""))}</p>')
    if "leaderboard" in fig:
        out.append(_figure(fig["leaderboard"]))
    if "freeze" in fig:
        out.append(_figure(fig["freeze"]))
    shown: set[str] = set()
    for rec in rows.to_dict("records"):
        method = rec["method"]
        rule = f", selected by {rec['selection']}" if rec.get("selection") else ""
        out.append(f"<h3>{_e(method + rule)}</h3>")
        out.append(_best_params(rec, task))
        if method in shown:
            continue
        shown.add(method)
        history, importance = fig.get("methods", {}).get(method, (None, None))
        out.append(
            '<div class="grid">'
            + "".join(_figure(f) for f in (history, importance) if f)
            + "</div>"
        )
    return out


def _nav(pairs: list[str]) -> str:
    links = [f'<a href="#{_e(slug(p))}">{_e(p)}</a>' for p in pairs]
    links += ['<a href="#files">files</a>', '<a href="#provenance">provenance</a>']
    return "<p>" + " · ".join(links) + "</p>"


def _table(rows: pd.DataFrame, task: str, shown: list[str]) -> str:
    head = ["rank", "method", "strategy", f"test {metric_label(shown[0])} %", f"{CI_LABEL} %"]
    head += [f"test {metric_label(m)} %" for m in shown[1:]]
    head += ["selecting score", "selection", "trials ok/pruned/failed", "status"]
    out = [
        "<table>",
        "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>",
        "<tbody>",
    ]
    for r in rows.to_dict("records"):
        rank = _e(rank_label(r))
        if truthy(r.get("reference")):
            rank = f'<span class="badge reference">{_e(REFERENCE_LABEL)}</span>'
        selection = _e(r.get("selection") or "-")
        if truthy(r.get("oracle")):
            selection += ' <span class="badge oracle">oracle</span>'
        label = rule_label(r.get("selection"), task)
        cells = [
            f'<td class="num">{rank}</td>',
            f'<td class="method">{_e(r.get("method"))}</td>',
            f'<td class="nowrap">{_e(r.get("strategy"))}</td>',
            f'<td class="num">{_e(pm(r, shown[0]))}</td>',
            f'<td class="num">{_e(ci_cell(r, shown[0]))}</td>',
            *(f'<td class="num">{_e(pm(r, m))}</td>' for m in shown[1:]),
        ]
        cells += [
            f'<td class="num">{_e(label.name)} {_e(label.value(r.get("val_score")))}</td>',
            f'<td class="nowrap">{selection}</td>',
            f'<td class="num">{_e(trial_counts(r))}</td>',
            f"<td>{_e(r.get('status'))}</td>",
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _best_params(rec: dict[str, Any], task: str) -> str:
    params = rec.get("best_params")
    if not isinstance(params, dict) or not params:
        return f'<p class="note">{_e(rec.get("status") or "no best trial")}: no best parameters</p>'
    items = "".join(
        f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in sorted(params.items())
    )
    trial = rec.get("best_trial")
    trial = int(trial) if finite(trial) else "-"
    label = rule_label(rec.get("selection"), task)
    score = f"{label.name} {label.value(rec.get('val_score'))}"
    return (
        f'<p class="note">best trial {_e(trial)} under {_e(rec.get("selection") or "-")}: {_e(score)}</p>'
        f"<table><thead><tr><th>parameter</th><th>value</th></tr></thead><tbody>{items}</tbody></table>"
    )


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
