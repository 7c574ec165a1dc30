"""How well each label-free selection rule ranked the trials: its Spearman correlation with the
target validation accuracy of the same completed trials. Judged after the search from scores recorded
with every trial; it never selects anything."""

from __future__ import annotations

from typing import Any

from harness.api.validation import HELD_OUT_SOURCES
from harness.publish.format import finite
from harness.rules import uses_target_labels

#: the method name of the agreement entry that pools every method of a pair
POOLED = "all methods (pooled)"
#: a rank correlation over fewer trials is not reported
MIN_AGREEMENT_TRIALS = 3


def agreement_rules(task: str, scored: list[dict[str, float]]) -> list[str]:
    """The rules judged: every registered rule of ``task`` and every recorded one, in that order,
    except those that read target labels (and leave-one-source-out where no trial recorded it)."""
    from harness.registry import get_registry

    # a rule that trains once more per source is scored only where a study selects with it
    registered = [
        n
        for n, e in get_registry().entries["validator"].items()
        if task in e.tasks and HELD_OUT_SOURCES not in e.factory().reads
    ]
    names = dict.fromkeys([*registered, *(name for s in scored for name in s)])
    return [n for n in names if not uses_target_labels(n)]


def agreement(
    pair: str, method: str, scored: list[dict[str, float]], rules: list[str]
) -> dict[str, Any]:
    """Spearman correlation, over completed trials (``scored``: each one's scores), between each
    label-free rule's score and the trial's target-val accuracy: one method's trials, or every
    method's of the pair (``method`` = ``POOLED``); ``rules``: from :func:`agreement_rules`. ``n`` counts the trials behind each rule's value (those with both numbers);
    ``note`` says why values are missing."""
    truth = [s.get("target-val") for s in scored]
    out: dict[str, Any] = {
        "pair": pair,
        "method": method,
        "scope": "pooled" if method == POOLED else "method",
        "trials": sum(finite(v) for v in truth),
        "n": {},
    }
    tied = []
    for rule in rules:
        scores = [s.get(rule) for s in scored]
        out["n"][rule] = sum(finite(a) and finite(b) for a, b in zip(scores, truth, strict=True))
        out[rule] = rank_agreement(scores, truth)
        if out[rule] is None and out["n"][rule] >= MIN_AGREEMENT_TRIALS:
            tied.append(rule)
    notes = []
    if out["trials"] < MIN_AGREEMENT_TRIALS:
        notes.append(
            f"too few completed trials with a target-val accuracy ({out['trials']}; a correlation "
            f"needs {MIN_AGREEMENT_TRIALS})"
        )
    if tied:
        notes.append(
            f"no correlation for {', '.join(tied)}: the scores or the accuracies are all equal"
        )
    out["note"] = "; ".join(notes) or None
    return out


def rank_agreement(scores: list[float | None], truth: list[float | None]) -> float | None:
    """Spearman rank correlation between a rule's scores and the true accuracies of the same
    trials (ties get average ranks); ``None`` with fewer than three finite pairs or no spread."""
    import pandas as pd

    pairs = [(s, t) for s, t in zip(scores, truth, strict=True) if finite(s) and finite(t)]
    if len(pairs) < 3:
        return None
    frame = pd.DataFrame(pairs, columns=["score", "truth"]).rank()
    if frame["score"].nunique() < 2 or frame["truth"].nunique() < 2:
        return None
    return float(frame["score"].corr(frame["truth"]))
