"""The re-run bundle, ``results/<study>/bundle/``: the study file byte for byte, the resolved
study, the best parameters per (pair, method, selection rule), ``rerun.sh`` (``harness run``
against the storage the results came from) and ``README.txt``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import HarnessError
from harness.fileio import atomic_path, write_json, write_text
from harness.metrics import primary_metric
from harness.publish.format import records, redact, truthy
from harness.publish.results import Results
from harness.store.backends import default_storage, journal_storage
from harness.study import StudySpec

BUNDLE = "bundle"


def export_bundle(results_dir: Path, results: Results, board: pd.DataFrame) -> Path:
    """Write ``results_dir/bundle/``: the study file, ``resolved_study.json``, ``best_params.json``,
    ``rerun.sh`` (re-runs the final seeds against the storage) and ``README.txt``; return the folder."""
    spec, storage_url = results.spec, results.storage_url
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
    write_json(bundle / "resolved_study.json", spec.dump())
    write_json(bundle / "best_params.json", _best_params_json(spec, board))

    default = {
        default_storage(results_dir): "optuna.db",
        journal_storage(results_dir): "optuna.journal",
    }.get(storage_url)
    shown = redact(storage_url)
    write_text(bundle / "rerun.sh", _rerun_sh(results_dir, spec, shown, default))
    (bundle / "rerun.sh").chmod(0o755)
    hashes = _started_with(results)
    write_text(bundle / "README.txt", _bundle_readme(spec, board, shown, default, hashes, raw))
    return bundle


def _best_params_json(spec: StudySpec, board: pd.DataFrame) -> dict[str, Any]:
    metric = primary_metric(spec.task)
    pairs: dict[str, dict[str, Any]] = {}
    for r in records(board):
        rules = pairs.setdefault(r["pair"], {}).setdefault(r["method"], {})
        rules[r.get("selection") or "-"] = {
            "rank": r.get("rank"),
            "status": r.get("status"),
            "strategy": r.get("strategy"),
            "selection": r.get("selection"),
            "oracle": truthy(r.get("oracle")),
            "search_saw_target_labels": truthy(r.get("search_saw_target_labels")),
            "best_trial": r.get("best_trial"),
            "val_score": r.get("val_score"),
            f"test_{metric}": r.get(f"test_{metric}"),
            f"test_{metric}_std": r.get(f"test_{metric}_std"),
            f"test_{metric}_se": r.get(f"test_{metric}_se"),
            "seeds": r.get("seeds"),
            "params": r.get("best_params") if isinstance(r.get("best_params"), dict) else None,
        }
    return {
        "study": spec.name,
        "task": spec.task,
        "primary_metric": metric,
        # the space the params were searched in: `[search] warm_start` takes only a file whose
        # space is the seeded study's
        "search": spec.search.config(),
        "note": "pairs -> pair -> method -> selection rule -> the trial that rule picked (chosen on "
        "the validation data the rule names) with its params and its target test metric over the "
        "final seeds (mean, std, se)",
        "pairs": pairs,
    }


def _started_with(results: Results) -> dict[str, str]:
    """The study file hash each Optuna study was started with, where it differs from the current file's."""
    out: dict[str, str] = {}
    for e in results.entries:
        h = e.study.file_hash if e.study else None
        if h and h != results.spec.file_hash:
            out[e.study.name] = h
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
    n_final = int((board["status"] == "final").sum()) if "status" in board else 0
    title = f"Re-run bundle of study {spec.name!r}"
    lines = [
        title,
        "=" * len(title),
        "",
        (spec.description.strip() + "\n") if spec.description else "",
        *_files_section(spec, raw),
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


def _files_section(spec: StudySpec, raw: bytes) -> list[str]:
    """The README's list of the bundle's files."""
    metric = primary_metric(spec.task)
    return [
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
        "best_params.json      pairs -> pair -> method -> selection rule -> the trial that rule picked:",
        "                      its parameters (params), validation score (val_score), rank, oracle flag,",
        "                      whether target labels drove the search (search_saw_target_labels), and",
        f"                      target test {metric} over the final seeds: test_{metric} (mean),",
        f"                      test_{metric}_std (sd) and test_{metric}_se (se); under `search`, the",
        "                      search space, so that another study's `[search] warm_start` can use it.",
        "rerun.sh              re-runs the study against its storage (see below).",
        "",
    ]
