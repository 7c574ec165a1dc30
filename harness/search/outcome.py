"""How a finished search went, from the stored trials alone: the (pair, method) studies whose every
budgeted trial failed, each with its most common failure reason and one error, so that a run in
which a method never trained ends non-zero and says why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.errors import SearchFailedError
from harness.store.backends import study_names
from harness.store.schema import ERROR, budget_trials, fail_reason, optuna_study_name
from harness.study import StudySpec


@dataclass(frozen=True)
class AllFailed:
    """A study whose ``trials`` budgeted trials all failed, ``count`` of them for ``reason``."""

    study: str
    trials: int
    reason: str
    count: int
    error: str

    def __str__(self) -> str:
        error = f": {self.error}" if self.error else ""
        return (
            f"{self.study}: all {self.trials} trials failed; most common: "
            f"{self.reason} ({self.count} of {self.trials}){error}"
        )


def all_failed(name: str, trials: list[FrozenTrial], budget: int) -> AllFailed | None:
    """``name``'s failure when every budgeted trial failed (none completed or was pruned), else
    None; the error shown is the last line of the first such trial's error."""
    budgeted = budget_trials(trials, budget)
    if not budgeted or any(t.state != TrialState.FAIL for t in budgeted):
        return None
    reasons = Counter(fail_reason(t) or "unknown" for t in budgeted)
    reason, count = reasons.most_common(1)[0]
    errors = [
        str(t.user_attrs.get(ERROR) or "")
        for t in budgeted
        if (fail_reason(t) or "unknown") == reason
    ]
    lines = next((e.strip().splitlines() for e in errors if e.strip()), [""])
    return AllFailed(name, len(budgeted), reason, count, lines[-1].strip())


def failed_studies(spec: StudySpec, storage: optuna.storages.BaseStorage) -> list[AllFailed]:
    """Every (pair, method) study of ``spec`` in ``storage`` whose budgeted trials all failed, in
    study-file order."""
    names = study_names(storage)
    out = []
    for pair in spec.pairs:
        for method in spec.methods:
            name = optuna_study_name(pair, method)
            if name not in names:
                continue
            study = optuna.load_study(study_name=name, storage=storage)
            failed = all_failed(name, study.get_trials(deepcopy=False), spec.budget.trials)
            if failed is not None:
                out.append(failed)
    return out


def check_outcome(spec: StudySpec, storage: optuna.storages.BaseStorage, trials_csv: Path) -> None:
    """Raise :class:`SearchFailedError`, one line per study, when every trial of one failed."""
    failed = failed_studies(spec, storage)
    if failed:
        raise SearchFailedError(
            "\n".join(str(f) for f in failed),
            hint=f"every trial's error is in {trials_csv}; failed trials use up the budget, so "
            "delete the results or pass another --storage to search again",
        )
