"""Every file of a study's results, written from one read of its storage: the leaderboard files,
and on request the page, the bundle and the published index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness.publish import leaderboard
from harness.publish.location import published
from harness.publish.results import read_results


def write_outputs(
    spec: Any, url: str, target_dir: Path, report: bool = False, index: Any = None
) -> tuple[pd.DataFrame, list[Path], str | None]:
    """The board, the files written and, when the page could not be made, why (the leaderboard
    is written first and a failing page does not undo it)."""
    results = read_results(spec, url)  # the only read of the storage: every file is made from it
    board, trials, provenance = leaderboard.tables(results)
    paths = leaderboard.write(target_dir, spec, board, trials, provenance)
    if not report:
        return board, paths, None
    from harness.publish.bundle import export_bundle
    from harness.publish.html import write_report
    from harness.publish.index import write_results_index

    try:
        paths.append(export_bundle(target_dir, results, board))  # first: the page links it
        paths.append(write_report(target_dir, results, board, trials, provenance))
        if published(spec) if index is None else index:
            paths.append(write_results_index(target_dir.parent))
    except Exception as exc:  # noqa: BLE001 - the leaderboard is written; a page must not undo that
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return board, paths, f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return board, paths, None
