"""``harness rank``: transferability scores of every backbone of a study before fine-tuning.

``register(app)`` adds the command; the scores are ``harness.transfer``'s, their inputs
``harness.search.ranking``'s. It prints a table and writes ``results/<study>/transferability.json``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from harness.console import console, out
from harness.errors import StudySpecError

#: the names ``register`` adds (``harness.registry.BUILTIN_COMMANDS`` lists them too)
COMMANDS = ("rank",)

SCORED_ON = (
    "the labelled source training split of each pair (source labels; no target image read), "
    "each backbone built as the study builds it, in eval mode, with the evaluation center crop"
)


StudyOpt = Annotated[
    str, typer.Option("--study", "-s", help="study name under benchmarks/ or a .toml path")
]
ResultsOpt = Annotated[
    Path | None, typer.Option("--results-dir", help="where <study>/ goes, as for run")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a study field: --set device=cpu")
]


def register(app: typer.Typer, parse_sets: Callable[[list[str] | None], dict[str, Any]]) -> None:
    """Add ``rank`` to ``app``; ``parse_sets`` reads ``--set`` as every command reads it."""

    def rank(study: StudyOpt, results_dir: ResultsOpt = None, set_: SetOpt = None) -> None:
        """Score every backbone of a study's methods on each pair before fine-tuning (LogME,
        LEEP, NCE, H-score; higher is better) from features of the labelled source training
        images, and write results/<study>/transferability.json. weights = "source" is
        pretrained first (cached, as a run would).

        Example: harness rank --study rank-digits
        """
        rank_cmd(study, results_dir, parse_sets(set_))

    app.command("rank")(rank)


def _log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(msg)}", soft_wrap=True)


def rank_cmd(study: str, results_dir: Path | None, overrides: dict[str, Any]) -> None:
    """The command's work: load, score, write the JSON, print the table (and, where the study
    has a leaderboard, each score's Kendall tau with its accuracies)."""
    from harness.fileio import write_json
    from harness.publish.location import results_root
    from harness.registry import get_registry
    from harness.search import DomainCache, ModelFactory, make_context, resolve_methods
    from harness.search.ranking import rank_study
    from harness.study import load_study

    spec = load_study(study, overrides)
    if spec.task != "classification":
        raise StudySpecError(
            f"{spec.path}: task: harness rank scores classification studies only, not {spec.task!r}"
        )
    registry = get_registry()
    ctx = make_context(spec, registry, _log)
    methods = resolve_methods(spec, registry)
    started = time.perf_counter()
    records = rank_study(ctx, methods, DomainCache(ctx), ModelFactory(ctx))
    target_dir = results_root(spec, results_dir) / spec.name
    data = {
        "study": spec.name,
        "scored_on": SCORED_ON,
        "higher_is_better": True,
        "rows": records,
        "provenance": _provenance(spec, ctx, time.perf_counter() - started),
    }
    path = target_dir / "transferability.json"
    write_json(path, data)
    print_scores(spec.name, records)
    _print_agreement(target_dir, data)
    console.print(f"wrote {escape(str(path))}")


def _provenance(spec: Any, ctx: Any, seconds: float) -> dict[str, Any]:
    from harness.publish.provenance import PACKAGES
    from harness.versions import HARNESS_VERSION, git_commit, package_version

    return {
        "study_file": spec.path,
        "study_file_sha256": spec.file_hash,
        "overrides": spec.overrides,
        "harness_version": HARNESS_VERSION,
        "git_commit": git_commit(Path(spec.path).parent if spec.path else Path.cwd()),
        "python": platform.python_version(),
        "packages": {p: package_version(p) for p in PACKAGES},
        "device": str(ctx.device),
        "image_size": spec.image_size,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "wall_seconds": round(seconds, 1),
    }


def _cell(score: dict[str, Any]) -> str:
    if score.get("value") is None:
        return "n/a"
    return f"{score['value']:.4g} ({score['seconds']:.2f}s)"


def print_scores(name: str, records: list[dict[str, Any]]) -> None:
    """The scores as one table: a row per (pair, backbone), a column per score with its time."""
    from harness.transfer import LABELS, SCORES

    table = Table(title=f"{name}: transferability before fine-tuning (higher is better; seconds)")
    for col in ("pair", "backbone", "images", *(LABELS[s] for s in SCORES)):
        table.add_column(col, overflow="fold")
    reasons: dict[str, str] = {}
    for r in records:
        table.add_row(
            r["pair"], r["label"], str(r["images"]), *(_cell(r["scores"][s]) for s in SCORES)
        )
        for s in SCORES:
            why = r["scores"][s].get("not_available")
            if why:
                reasons[r["label"]] = why
    out.print(table)
    for label, why in reasons.items():
        console.print(f"[dim]n/a for {escape(label)}:[/] {escape(why)}", soft_wrap=True)


def _print_agreement(target_dir: Path, data: dict[str, Any]) -> None:
    """Where the study has a leaderboard already, each score's Kendall tau with its accuracies."""
    board = target_dir / "leaderboard.json"
    if not board.is_file():
        return
    from harness.publish.transferability import correlations
    from harness.transfer import LABELS

    rows = json.loads(board.read_text(encoding="utf-8")).get("rows", [])
    for c in correlations(data, rows):
        taus = ", ".join(
            f"{LABELS[s]} {t:+.2f}" if t is not None else f"{LABELS[s]} -"
            for s, t in c["tau"].items()
        )
        out.print(f"{c['pair']}: Kendall tau with fine-tuned test accuracy: {taus}")
