"""How well each label-free selection rule ranked the trials: its Spearman correlation with the
target validation accuracy of the same completed trials. Judged after the search from scores recorded
with every trial; it never selects anything."""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial

from harness.publish.format import finite
from harness.store.schema import trial_scores
from harness.validators import VALIDATORS, rank_agreement

AGREEMENT_RULES = ("source-val", *VALIDATORS)
#: the method name of the agreement entry that pools every method of a pair
POOLED = "all methods (pooled)"
#: a rank correlation over fewer trials is not reported
MIN_AGREEMENT_TRIALS = 3


def agreement(pair: str, method: str, complete: list[FrozenTrial]) -> dict[str, Any]:
    """Spearman correlation, over completed trials, between each label-free rule's score and the
    trial's target-val accuracy: one method's trials, or every method's of the pair (``method`` =
    ``POOLED``). ``n`` counts the trials behind each rule's value (those with both numbers);
    ``note`` says why values are missing."""
    scored = [trial_scores(t) for t in complete]
    truth = [s.get("target-val") for s in scored]
    out: dict[str, Any] = {
        "pair": pair,
        "method": method,
        "scope": "pooled" if method == POOLED else "method",
        "trials": sum(finite(v) for v in truth),
        "n": {},
    }
    tied = []
    for rule in AGREEMENT_RULES:
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
