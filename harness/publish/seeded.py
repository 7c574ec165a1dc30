"""The disclosure of ``[search] warm_start``: which trials of each (pair, method) began from a
configuration found elsewhere, and where, as the provenance records it and the boards say it."""

from __future__ import annotations

from typing import Any

from harness.publish.results import Results
from harness.store.schema import SEEDED_FROM, WARM_START


def warm_start(results: Results) -> dict[str, Any]:
    """The provenance's ``warm_start``: the setting and, per pair and method, the budgeted
    trials seeded (trial number -> origin) and the configurations skipped with the reason; empty
    for a study without warm start."""
    setting = results.spec.search.warm_start
    studies: dict[str, dict[str, Any]] = {}
    for e in results.entries:
        if e.study is None:
            continue
        record = e.study.attrs.get(WARM_START) or {}
        seeded = {
            str(t.number): t.user_attrs[SEEDED_FROM]
            for t in e.study.budgeted
            if SEEDED_FROM in t.user_attrs
        }
        if record or seeded:
            studies.setdefault(e.pair.key, {})[e.method.key] = {
                "trials": len(e.study.budgeted),
                "seeded": seeded,
                "skipped": record.get("skipped", []),
            }
    if setting is None and not studies:
        return {}
    return {"warm_start": {"setting": setting, "studies": studies}}


def seeded_note(provenance: dict[str, Any], pair: str) -> str | None:
    """One sentence under a pair's table: how many trials of each method were seeded, and from
    where; None where the study has no warm start."""
    warm = provenance.get("warm_start")
    if not warm:
        return None
    parts = []
    for method, s in (warm.get("studies") or {}).get(pair, {}).items():
        seeded = s.get("seeded") or {}
        origins = "; ".join(f"trial {n} from {origin}" for n, origin in seeded.items())
        part = f"{method}: {len(seeded)} of {s.get('trials', 0)} trials seeded"
        part += f" ({origins})" if origins else ""
        if s.get("skipped"):
            part += f", {len(s['skipped'])} configuration(s) skipped as outside this space"
        parts.append(part)
    if not parts:
        return None
    return f"Warm start ({warm.get('setting')}): " + "; ".join(parts) + "."
