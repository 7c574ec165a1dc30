"""How well the transferability scores of ``harness rank`` ranked a study's backbones: per pair
and score, Kendall's tau between the score and each backbone's fine-tuned target test accuracy,
for the leaderboard (JSON and a Markdown section). Read from ``transferability.json`` beside the
leaderboard; nothing here trains or reads the storage."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.transfer import LABELS, SCORES, kendall_tau

FILE = "transferability.json"
#: the leaderboard column a backbone's accuracy is read from
ACCURACY = "test_accuracy"


def _backbone_accuracy(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """Each (pair, backbone, weights)'s best mean test accuracy over its rows with all their final
    seeds, oracle rows counted only for a backbone that has no other."""
    best: dict[tuple[str, str, str], tuple[bool, float]] = {}
    for r in rows:
        value = r.get(ACCURACY)
        if r.get("status") != "final" or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue
        key = (r["pair"], r["backbone"], r["weights"])
        honest = not bool(r.get("oracle"))
        old = best.get(key)
        if old is None or (honest, value) > old:
            best[key] = (honest, float(value))
    return {k: v for k, (_, v) in best.items()}


def correlations(ranked: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pair: the backbones compared, and each score's tau (``None`` with fewer than 3
    backbones that have both a score and an accuracy, or a constant side)."""
    accuracy = _backbone_accuracy(rows)
    out = []
    pairs = list(dict.fromkeys(r["pair"] for r in ranked.get("rows", [])))
    for pair in pairs:
        mine = [r for r in ranked["rows"] if r["pair"] == pair]
        acc = [accuracy.get((pair, r["backbone"], r["weights"])) for r in mine]
        entry: dict[str, Any] = {
            "pair": pair,
            "backbones": [r["label"] for r, a in zip(mine, acc, strict=True) if a is not None],
            "tau": {},
        }
        for score in SCORES:
            values = [_value(r, score) for r in mine]
            ok = [
                (v, a) for v, a in zip(values, acc, strict=True) if v is not None and a is not None
            ]
            entry["tau"][score] = kendall_tau([v for v, _ in ok], [a for _, a in ok])
            entry.setdefault("n", {})[score] = len(ok)
        out.append(entry)
    return out


def _value(record: dict[str, Any], score: str) -> float | None:
    v = record.get("scores", {}).get(score, {}).get("value")
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def section(results_dir: Path, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The leaderboard's Markdown section and JSON entry, or ``None`` without a
    ``transferability.json`` in ``results_dir`` (``harness rank`` writes it)."""
    path = Path(results_dir) / FILE
    if not path.is_file():
        return None
    ranked = json.loads(path.read_text(encoding="utf-8"))
    corr = correlations(ranked, rows)
    lines = [
        "## Transferability scores against fine-tuned accuracy",
        "",
        "Kendall's tau between each score of `harness rank` (computed before training, on the "
        "labelled source training images) and each backbone's best target test accuracy on this "
        "board (rows with all their final seeds; oracle rows only for a backbone without others). "
        "1 ranks the backbones exactly as fine-tuning did; - needs at least 3 backbones with both.",
        "",
        "| pair | backbones | " + " | ".join(LABELS[s] for s in SCORES) + " |",
        "|---|---|" + "---|" * len(SCORES),
    ]
    for c in corr:
        cells = [_tau_cell(c["tau"][s], c["n"][s]) for s in SCORES]
        lines.append(f"| {c['pair']} | {', '.join(c['backbones']) or '-'} | " + " | ".join(cells) + " |")  # fmt: skip
    lines.append("")
    return "\n".join(lines), {"file": FILE, "kendall_tau": corr}


def _tau_cell(tau: float | None, n: int) -> str:
    return f"{tau:+.2f} (n={n})" if tau is not None else f"- (n={n})"
