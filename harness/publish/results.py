"""Read a study's storage once into one :class:`Results` object; every published file (the board,
the provenance, Markdown, HTML, plots, the bundle) is a function of it.

What the storage holds is read through :mod:`harness.store.schema`; the rules that pick rows (the
budgeted trials, the trial each selection rule picks, its final runs) are applied here once, so the
board and the provenance count the same runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from harness.publish.format import finite
from harness.registry import get_registry
from harness.rules import rule_set, scores_with_pooled, uses_target_labels
from harness.store.backends import close_storage, make_storage, study_names
from harness.store.schema import (
    CONFIG,
    STUDY_FILE_HASH,
    FinalRun,
    best_trial,
    budget_trials,
    final_runs,
    final_seeds,
    optuna_study_name,
    per_image_key,
)
from harness.study import Method, Pair, StudySpec


def reads_target_labels(rule: str) -> bool:
    """Whether selection rule ``rule`` reads target labels (the labelled target validation split)."""
    return uses_target_labels(rule)


@dataclass(frozen=True)
class Selection:
    """What one selection rule picked in one study: the trial and its stored final runs."""

    rule: str
    #: selected with target labels by a method that trains without them
    oracle: bool
    best: FrozenTrial | None
    #: the best trial's final runs, in seed order (missing ones left out)
    finals: list[FinalRun] = field(default_factory=list)
    #: the search (sampler and pruner) was driven by a rule that reads target labels, whatever
    #: this rule reads: a label-free rule then only picked among trials that target labels shaped
    search_saw_target_labels: bool = False
    #: each final run's per-image test outcomes (:mod:`harness.store.per_image`), aligned with
    #: ``finals``; None where the storage has none (written before they were kept)
    per_image: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class StoredStudy:
    """One (pair, method) Optuna study as stored: its attributes and every trial, by number."""

    name: str
    attrs: dict[str, Any]
    directions: list[StudyDirection]
    trials: list[FrozenTrial]
    #: the first ``budget`` counted trials by number: those a leaderboard row is made of
    budgeted: list[FrozenTrial]
    #: the budgeted trials that completed with a finite value
    complete: list[FrozenTrial]
    selections: list[Selection]
    #: every budgeted trial's scores by number, pooled rules' (EnsV) included
    scores: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        """The configuration the study was begun with."""
        return self.attrs.get(CONFIG, {})

    @property
    def file_hash(self) -> str | None:
        """The hash of the study file the study was begun with."""
        return self.attrs.get(STUDY_FILE_HASH)

    def completed(self) -> list[FrozenTrial]:
        """Every completed trial with a finite value, budgeted or not (the plots show them all)."""
        return [t for t in self.trials if t.state == TrialState.COMPLETE and finite(t.value)]


@dataclass(frozen=True)
class Entry:
    """One (pair, method) of the study file, and its Optuna study when it has been started."""

    pair: Pair
    method: Method
    study: StoredStudy | None


@dataclass(frozen=True)
class Results:
    """Everything published about a study, read from its storage in one pass."""

    spec: StudySpec
    storage_url: str
    #: one per (pair, method), pairs in study-file order, then methods in study-file order
    entries: list[Entry]

    def of_pair(self, pair: Pair) -> list[Entry]:
        """The entries of one pair of the study file, methods in study-file order."""
        return [e for e in self.entries if e.pair is pair]


def read_results(spec: StudySpec, storage_url: str) -> Results:
    """Open the storage at ``storage_url`` once and read every (pair, method) study of ``spec``."""
    storage = make_storage(storage_url)
    try:
        existing = study_names(storage)
        entries = []
        for pair in spec.pairs:
            for method in spec.methods:
                name = optuna_study_name(pair, method)
                study = None
                if name in existing:
                    study = _read_study(spec, optuna.load_study(study_name=name, storage=storage))
                entries.append(Entry(pair, method, study))
    finally:
        close_storage(storage)
    return Results(spec=spec, storage_url=storage_url, entries=entries)


def _read_study(spec: StudySpec, study: optuna.Study) -> StoredStudy:
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    budgeted = budget_trials(trials, spec.budget.trials)
    complete = [t for t in budgeted if t.state == TrialState.COMPLETE and finite(t.value)]
    config = attrs.get(CONFIG, {})
    rules = config.get("selection_rules") or [
        {"rule": config.get("selection", ""), "oracle": bool(config.get("oracle", False))}
    ]
    driver = rules[0]["rule"]  # the first rule drives the search (sampler and pruner)
    scores = scores_with_pooled(budgeted, rule_set(get_registry(), spec.task))
    selections = []
    for sel in rules:
        best = best_trial(complete, sel["rule"], scores)
        finals = [] if best is None else final_runs(attrs, best.number, final_seeds(spec))
        outcomes = [attrs.get(per_image_key(f["trial"], f["seed"])) for f in finals]
        selections.append(
            Selection(
                sel["rule"], bool(sel["oracle"]), best, finals,
                search_saw_target_labels=reads_target_labels(driver), per_image=outcomes,
            )
        )  # fmt: skip
    return StoredStudy(
        name=study.study_name,
        attrs=attrs,
        directions=study.directions,
        trials=trials,
        budgeted=budgeted,
        complete=complete,
        selections=selections,
        scores=scores,
    )
