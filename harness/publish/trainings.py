"""The disclosure of selection rules that train more than once per trial (leave-one-source-out:
one more training per source held out): how many trainings each (pair, method) search took, as
the provenance records it and the boards say it."""

from __future__ import annotations

from typing import Any

from harness.publish.results import Results
from harness.publish.seeded import seeded_note
from harness.store.schema import TRAININGS


def trainings(results: Results) -> dict[str, Any]:
    """The provenance's ``trainings``: per pair and method, the budgeted trials and the
    trainings they took; empty where every trial trained once."""
    studies: dict[str, dict[str, Any]] = {}
    for e in results.entries:
        if e.study is None:
            continue
        counts = [int(t.user_attrs.get(TRAININGS, 1)) for t in e.study.budgeted]
        if any(c > 1 for c in counts):
            studies.setdefault(e.pair.key, {})[e.method.key] = {
                "trials": len(counts),
                "trainings": sum(counts),
                "per_trial": max(counts),
            }
    return {"trainings": studies} if studies else {}


def trainings_note(provenance: dict[str, Any], pair: str) -> str | None:
    """One sentence under a pair's table where some trial trained more than once: how many
    trainings the trials took (rows selected otherwise cost as much: the trials are shared)."""
    parts = [
        f"{method}: {s['trainings']} trainings for {s['trials']} trials ({s['per_trial']} per "
        "trial: the trial's own and one per source held out)"
        for method, s in (provenance.get("trainings") or {}).get(pair, {}).items()
    ]
    if not parts:
        return None
    return (
        "Leave-one-source-out trains each trial's parameters once more per source: the budget "
        "counts trials, and each trial here cost that many trainings: " + "; ".join(parts) + "."
    )


def pair_notes(provenance: dict[str, Any], pair: str) -> list[str]:
    """The sentences under a pair's table, in the order every board shows them: warm-started
    trials, then trials that trained more than once."""
    notes = (seeded_note(provenance, pair), trainings_note(provenance, pair))
    return [n for n in notes if n]
