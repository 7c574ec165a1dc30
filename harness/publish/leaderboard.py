"""The leaderboard files: ``leaderboard.csv``, ``.json``, ``.md`` and ``trials.csv``, written
atomically from the board, the trials and the provenance.

Everything is computed from the Optuna storage and the study file alone, so ``harness leaderboard``
rebuilds the files without training: :func:`~harness.publish.results.read_results` reads the
storage once, then :func:`tables` makes the three tables from what it read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from harness.fileio import atomic_path, write_json, write_text
from harness.models.keep import finalize
from harness.publish import domainbed, rank, uncertainty
from harness.publish.format import records
from harness.publish.markdown import to_markdown
from harness.publish.provenance import provenance_of
from harness.publish.results import Results, read_results
from harness.publish.transferability import section as transfer_section
from harness.study import StudySpec

#: the columns of the board that hold lists or dicts: JSON only, not in leaderboard.csv
NESTED = ("best_params", "seeds", "test_per_class_iou", "test_per_seed")


class Tables(NamedTuple):
    """The board (one row per pair, method and selection rule), every trial, and the provenance."""

    board: pd.DataFrame
    trials: pd.DataFrame
    provenance: dict[str, Any]


def tables(results: Results) -> Tables:
    """The three tables; ``trials.csv`` also gets each final run's test value on the trial it re-ran."""
    trials = uncertainty.with_final_runs(rank.trials_frame(results), results)
    return Tables(rank.board(results), trials, provenance_of(results))


def collect(spec: StudySpec, storage_url: str) -> Tables:
    """Read the storage and make the tables, when nothing else is published from the same read."""
    return tables(read_results(spec, storage_url))


def write(
    results_dir: Path,
    spec: StudySpec,
    board: pd.DataFrame,
    trials: pd.DataFrame,
    provenance: dict[str, Any],
) -> list[Path]:
    """Write the four leaderboard files into ``results_dir``; return their paths. The kept models
    of the rows the study keeps (``keep_models``) are put in their folders first
    (:func:`harness.models.keep.finalize`), so that ``leaderboard.json`` lists their hashes."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    flat = board[[c for c in board.columns if c not in NESTED]].copy()
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
    missing = rank.unfinished(board)
    rows = rank.with_models(records(board), finalize(results_dir, spec, board, provenance))
    # an unfinished study says so, and what it lacks; a complete one's file has no such keys
    state = {} if missing is None else {"state": "partial", "missing": missing}
    ranked = transfer_section(results_dir, rows)  # after `harness rank`: the scores' tau
    if ranked is not None:
        provenance = {**provenance, "transferability": ranked[1]}
    write_json(
        path,
        {
            "study": spec.name,
            "description": spec.description,
            **({"notes": spec.notes} if spec.notes else {}),  # the study's disclosures
            **state,
            "rows": rows,
            # DomainBed's tables, only for a study with leave-one-out groups
            **({"domainbed": held} if (held := domainbed.tables(spec, board)) else {}),
            "provenance": provenance,
        },
    )
    paths.append(path)
    path = results_dir / "leaderboard.md"
    write_text(path, to_markdown(spec, board, provenance) + (f"\n{ranked[0]}" if ranked else ""))
    paths.append(path)
    return paths
