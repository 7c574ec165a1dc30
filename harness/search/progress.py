"""What a search says after each trial: a log line or a progress record, and MLflow tracking."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from harness.metrics import primary_metric
from harness.store.schema import FAIL_REASON, count_budget
from harness.study import StudySpec, spec_error

Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def tracking_callbacks(spec: StudySpec) -> list[Callback]:
    """Optuna's MLflow callback when the study sets ``tracking.mlflow_uri``."""
    uri = spec.tracking.mlflow_uri
    if not uri:
        return []
    try:
        from optuna_integration.mlflow import MLflowCallback
    except ImportError:
        raise spec_error(
            spec,
            "tracking.mlflow_uri",
            "MLflow tracking needs the optional packages: pip install 'transfer-harness[tracking]'",
        ) from None
    return [
        MLflowCallback(
            tracking_uri=uri, metric_name=primary_metric(spec.task), create_experiment=True
        )
    ]


def progress_callback(
    spec: StudySpec,
    label: str,
    started: float,
    log: Callable[[str], None],
    progress: Callable[[dict[str, Any]], None] | None,
) -> Callback:
    """After each trial: ``progress`` gets a record of it, or else ``log`` a line."""

    def cb(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        # what uses up the budget (interrupted, lost and surplus trials do not), never past it
        n = min(count_budget(trials), spec.budget.trials)
        best = max(
            (t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None),
            default=None,
        )
        value = (
            f"{trial.value:.4f}"
            if trial.value is not None
            else trial.user_attrs.get(FAIL_REASON, "")
        )
        if trial.state == TrialState.PRUNED:
            value = f"pruned@{len(trial.intermediate_values)}"
        info = {
            "study": label,
            "trial": trial.number,
            "state": trial.state.name,
            "value": value,
            "best": best,
            "done": n,
            "budget": spec.budget.trials,
            "elapsed": time.perf_counter() - started,
        }
        if progress:
            progress(info)
        else:
            best_s = f"{best:.4f}" if best is not None else "-"
            log(
                f"{label}: trial {trial.number} {trial.state.name.lower()} {value}  "
                f"[{n}/{spec.budget.trials}, best {best_s}, {info['elapsed']:.0f}s]"
            )

    return cb
