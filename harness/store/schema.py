"""What the harness keeps in an Optuna storage: every study and trial attribute name, the keys of
final runs, and the rules that read them back (which trials count towards the budget, which trial a
selection rule picks). Whoever writes or reads the storage goes through here.

Layout of one storage:

- one Optuna study per (pair, method), named ``"<pair> | <method>"``; its user attributes hold the
  configuration it was begun with (``config``), the study file's hash, the sampler, pruner and
  precision, and one :data:`FinalRun` record per final seeded run under ``final:<trial>:<seed>``,
  with its per-image test outcomes beside it under ``per_image:<trial>:<seed>``
  (:mod:`harness.store.per_image`; written first, absent from storages made before them);
- beside it, on storages several processes share, ``"<pair> | <method> | final runs"``, whose
  trials are claims of final runs (user attribute ``key``: the final run's key);
- each trial's user attributes: every parameter it trained with (``params``), every selection
  rule's score (``scores``), its last training loss, and when it failed, the reason and the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.metrics import is_finite_number
from harness.study import Method, Pair, StudySpec

STUDY_SEP = " | "
#: the study beside each (pair, method) study that holds claims of its final runs (shared storages)
FINALS_SUFFIX = f"{STUDY_SEP}final runs"

# ---- study user attributes
CONFIG = "config"
STUDY_FILE_HASH = "study_file_hash"
SAMPLER = "sampler"
PRUNER = "pruner"
PRECISION = "precision"
#: the weights files the method's trials started from (source-pretrained or the study's own):
#: a list of ``{file, sha256}``, one per distinct file a search used
WEIGHTS_FILES = "weights_files"
#: how ``[search] warm_start`` seeded the study: the setting, the seeds queued (their origins)
#: and the configurations skipped with the reason
WARM_START = "warm_start"
FINAL_PREFIX = "final:"
PER_IMAGE_PREFIX = "per_image:"

# ---- trial user attributes
#: every parameter a trial trained with, suggested or fixed
PARAMS = "params"
#: every selection rule's score of the trial's final model
SCORES = "scores"
#: a trial's target validation probabilities, compact, for pooled selection rules (EnsV)
PREDICTIONS = "target_predictions"
TRAIN_LOSS = "train_loss"
#: leave-one-source-out: each source's primary validation metric when held out, in source order
HELD_OUT_METRICS = "held_out_metrics"
#: trainings a trial took where more than one (1 + one per source under leave-one-source-out)
TRAININGS = "trainings"
#: what the strategy logged with ``ctx.log``: name -> per-epoch mean (None for an epoch without it)
DIAGNOSTICS = "diagnostics"
FAIL_REASON = "fail_reason"
ERROR = "error"
#: a trial queued again after its first run was interrupted or lost: the number of that first run
RETRY_OF = "retry_of"
#: the commit of the code the trial ran at (``harness.versions.git_commit``, "-dirty" included)
GIT_COMMIT = "git_commit"
#: a trial queued by ``[search] warm_start``: where its configuration came from ("pair A->B
#: trial 3", "file best_params.json:A->B/method/rule")
SEEDED_FROM = "seeded_from"
#: a final-run claim's key (a trial of the ``final runs`` study)
CLAIM_KEY = "key"

# ---- trial system attributes
#: the process running a trial and its last heartbeat
LEASE = "harness:lease"

#: fail reasons of trials that did not fail on their own merits and do not use up the budget
NOT_COUNTED = ("interrupted", "lost", "surplus")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class FinalRun(TypedDict, total=False):
    """One final seeded run of a selected trial, as stored under :func:`final_key`."""

    trial: int
    seed: int
    #: the driving rule's score of the final model (validation data only)
    val: float
    scores: dict[str, float | None]
    #: target test metrics: the only record of the test split
    test: dict[str, Any]
    seconds: float
    device: str
    device_name: str
    precision: str
    git_commit: str | None
    #: the run's staged weights where the study keeps models (``keep_models`` not "none"): the
    #: path relative to the study's results directory and the file's sha256
    model: dict[str, str]


def optuna_study_name(pair: Pair, method: Method) -> str:
    return f"{pair.key}{STUDY_SEP}{method.key}"


def final_seeds(spec: StudySpec) -> list[int]:
    """The seeds of the K final runs of a selected trial."""
    return [spec.seed + 10_000 + k for k in range(spec.final_seeds)]


def final_key(trial: int, seed: int) -> str:
    return f"{FINAL_PREFIX}{trial}:{seed}"


def per_image_key(trial: int, seed: int) -> str:
    """Where the per-image test outcomes of the final run :func:`final_key` names are kept."""
    return f"{PER_IMAGE_PREFIX}{trial}:{seed}"


def parse_final_key(key: str) -> tuple[int, int]:
    """(trial number, seed) of a :func:`final_key`."""
    _, number, seed = key.split(":")
    return int(number), int(seed)


def final_runs(attrs: dict[str, Any], trial: int, seeds: list[int]) -> list[FinalRun]:
    """The stored final runs of ``trial`` for ``seeds``, in seed order (missing ones left out)."""
    return [attrs[k] for s in seeds if (k := final_key(trial, s)) in attrs]


def trial_params(trial: FrozenTrial) -> dict[str, Any]:
    """Every parameter ``trial`` trained with: one attribute, or (storages written before it) one
    ``param:<name>`` attribute per parameter."""
    params = trial.user_attrs.get(PARAMS)
    if isinstance(params, dict):
        return dict(params)
    return {
        k.removeprefix("param:"): v for k, v in trial.user_attrs.items() if k.startswith("param:")
    }


def trial_scores(trial: FrozenTrial) -> dict[str, float | None]:
    return dict(trial.user_attrs.get(SCORES) or {})


def trial_score(trial: FrozenTrial, rule: str) -> float | None:
    """A finished trial's score under ``rule`` (validation splits and label-free validators only)."""
    value = trial_scores(trial).get(rule)
    return value if is_finite_number(value) else None


def trial_diagnostics(trial: FrozenTrial) -> dict[str, list[float | None]]:
    return dict(trial.user_attrs.get(DIAGNOSTICS) or {})


def fail_reason(trial: FrozenTrial) -> str:
    return trial.user_attrs.get(FAIL_REASON, "")


def best_trial(
    trials: list[FrozenTrial],
    rule: str,
    scores: Mapping[int, Mapping[str, Any]] | None = None,
) -> FrozenTrial | None:
    """The completed trial that ``rule`` selects: highest score, then the earliest. ``scores``
    (by trial number) replaces the stored ones: pooled rules are scored over all trials."""

    def value(t: FrozenTrial) -> float | None:
        if scores is None:
            return trial_score(t, rule)
        v = scores.get(t.number, {}).get(rule)
        return v if is_finite_number(v) else None

    scored = [
        (v, t) for t in trials if t.state == TrialState.COMPLETE and (v := value(t)) is not None
    ]
    if not scored:
        # storages written before per-rule scores existed: the objective value is the driving rule's
        scored = [
            (t.value, t)
            for t in trials
            if t.state == TrialState.COMPLETE and is_finite_number(t.value)
        ]
    if not scored:
        return None
    return max(scored, key=lambda vt: (vt[0], -vt[1].number))[1]


# ---- budget accounting: which trials use up a study's budget


def counts(t: FrozenTrial) -> bool:
    """Whether a trial uses up the budget: finished, and not interrupted, lost or surplus."""
    return t.state in FINISHED and not (
        t.state == TrialState.FAIL and fail_reason(t) in NOT_COUNTED
    )


def count_budget(study: optuna.Study | list[FrozenTrial]) -> int:
    """Finished trials that use up the budget: interrupted, lost and surplus ones do not."""
    trials = study.get_trials(deepcopy=False) if isinstance(study, optuna.Study) else study
    return sum(1 for t in trials if counts(t))


def budget_trials(trials: list[FrozenTrial], budget: int) -> list[FrozenTrial]:
    """The trials a leaderboard is made of: the first ``budget`` counted ones by trial number, so
    that a trial another worker started past the budget never changes the result."""
    return sorted((t for t in trials if counts(t)), key=lambda t: t.number)[:budget]


def has_room(study: optuna.Study, budget: int) -> bool:
    """Whether another trial may start: a queued one waits, or the taken places are fewer than the budget."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return sum(1 for t in trials if counts(t) or t.state == TrialState.RUNNING) < budget


def is_surplus(study: optuna.Study, number: int, budget: int) -> bool:
    """Whether the trial ``number`` comes after the budget: places are taken in trial-number order."""
    trials = study.get_trials(deepcopy=False)
    taken = sum(
        1
        for t in trials
        if t.number < number and (counts(t) or t.state in (TrialState.RUNNING, TrialState.WAITING))
    )
    return taken >= budget
