"""The search driver: one Optuna study per (pair, method), then seeded final runs on the test split.

:class:`Driver` runs the trial loop and the final runs; it is handed what it needs (the resolved
methods, a :class:`~harness.search.models.ModelFactory`, a
:class:`~harness.search.domains.DomainCache`, a :class:`~harness.search.selection.Scorer` and the
storage), and :func:`build_driver` wires the default ones for a study.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness.registry import Registry
from harness.search import finals
from harness.search.context import Context, RunOptions, make_context, release_memory
from harness.search.domains import DomainCache
from harness.search.models import ModelFactory
from harness.search.objective import Objective
from harness.search.preflight import preflight
from harness.search.progress import progress_callback, tracking_callbacks
from harness.search.pruning import describe_pruner, make_pruner, make_sampler
from harness.search.resolve import ResolvedMethod, resolve_methods
from harness.search.selection import Scorer
from harness.search.space import mixing_refused
from harness.search.studies import check_stored, open_study
from harness.search.warm import WarmStart
from harness.store.backends import (
    lock_sqlite,
    open_run_storage,
    run_storage_url,
    storage_kind,
    study_names,
    unlock_sqlite,
)
from harness.store.leases import fail_surplus, finished_elsewhere, reap, requeue, trial_lease
from harness.store.schema import (
    ERROR,
    FINALS_SUFFIX,
    PRECISION,
    PRUNER,
    SAMPLER,
    WEIGHTS_FILES,
    count_budget,
    has_room,
    is_surplus,
    optuna_study_name,
)
from harness.study import StudySpec
from harness.training.engine import Precision
from harness.training.weights import weights_file_record
from harness.versions import git_commit


class Driver:
    """Runs a study: searches every (pair, method), then the final seeded runs."""

    def __init__(
        self,
        ctx: Context,
        options: RunOptions,
        methods: list[ResolvedMethod],
        storage_url: str | None,
        models: ModelFactory,
        domains: DomainCache,
        scorer: Scorer,
        objective: type[Objective] = Objective,
    ) -> None:
        self.ctx, self.spec, self.options, self.log = ctx, ctx.spec, options, ctx.log
        self.methods, self.models, self.domains, self.scorer = methods, models, domains, scorer
        #: makes each study's objective (``harness.search.objective.Objective`` or a subclass)
        self.objective = objective
        #: where the trials go; None for a driver that only checks (``harness validate``)
        self.storage_url = storage_url
        self._storage: optuna.storages.BaseStorage | None = None
        # SQLite is only ever used by one process; other storages may be shared, so final runs
        # are claimed before they are trained
        self.shared = storage_url is not None and storage_kind(storage_url) != "sqlite"
        self.git_commit = git_commit(Path(self.spec.path).parent if self.spec.path else Path.cwd())
        self._started = False
        self._announced: set[str] = set()
        self._deadlines: dict[str, float] = {}
        #: ``[search] warm_start``: the seeds queued as each search begins
        self.warm = WarmStart(ctx)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def precision(self) -> Precision:
        """The study's pinned precision (under "auto", each backbone's is probed)."""
        return self.ctx.precision

    @property
    def started(self) -> bool:
        """Whether the search has begun: the preflight passed (or, in a worker, its parent's did),
        so that what is in the storage from here on is worth publishing."""
        return self._started

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        """The run's storage (see :meth:`open_storage`)."""
        return self.open_storage()

    def open_storage(self) -> optuna.storages.BaseStorage:
        """The run's storage, opened (and on a first run created) at its first use: after the
        preflight, so that a study refused before training leaves no storage behind."""
        if self._storage is None:
            if self.storage_url is None:
                raise RuntimeError("this driver only checks a study: it has no storage")
            self._storage = open_run_storage(self.storage_url, self.options.results_dir)
        return self._storage

    def preflight(self) -> None:
        """Everything that can fail before training: data, weights, heads, options; then the
        storage is opened, so that a refused study leaves none behind."""
        self.warm.check()
        preflight(self.methods, self.models, self.domains)
        self.open_storage()  # here: the workers then share a storage that exists
        self._started = True

    def validate(self) -> list[str]:
        """The preflight short of training (``harness validate``): the same checks, except that
        ``weights = "source"`` is checked with random weights instead of being pretrained, and
        the studies already in the storage a run would resume are read (none is created) to refuse
        those whose configuration changed. Returns what the check could not cover."""
        self.warm.check()
        preflight(self.methods, self.models, self.domains, pretrain=False)
        o = self.options
        check_stored(self.spec, o.storage, o.results_dir, self.domains, self.methods)
        return [
            f'methods[{j}]: weights = "source" checked with random weights; '
            "`harness run` pretrains them on the source first"
            for j, rm in enumerate(self.methods)
            if rm.method.weights == "source"
        ]

    def run(self) -> None:
        """Search every (pair, method) and run its final seeds; with other processes on the same
        storage, come back to the studies they still work on until nothing is left to do."""
        if self._storage is not None:
            lock_sqlite(self.storage_url)  # held again if an earlier run() let it go (SQLite only)
        try:
            if self.options.rank is None:
                self.preflight()
            else:  # a local worker: its parent's preflight has checked the same study
                self._started = True
            pending = [(i, rm) for i in range(len(self.spec.pairs)) for rm in self.methods]
            while pending:
                waiting = []
                for i, rm in pending:
                    study = self.search(i, rm)
                    if not self.final_runs(i, rm, study):
                        waiting.append((i, rm))
                pending = waiting
                if pending:
                    time.sleep(self.options.poll_s)
        finally:
            unlock_sqlite(self.storage_url)  # a finished search no longer writes

    # -------------------------------------------------------------------------------- search

    def open_study(self, i: int, rm: ResolvedMethod) -> optuna.Study:
        """The study of pair ``i`` and method ``rm``, refused when its configuration changed."""
        return open_study(self.spec, self.storage, self.domains, i, rm)

    def search(self, i: int, rm: ResolvedMethod) -> optuna.Study:
        """Run trials until the study's budget is taken: finished, running elsewhere, or queued."""
        study = self.open_study(i, rm)
        label = optuna_study_name(self.spec.pairs[i], rm.method)
        reap(study, log=self.log)
        if not has_room(study, self.spec.budget.trials):
            if label not in self._announced:
                self._announced.add(label)
                self.log(
                    f"{label}: budget of {self.spec.budget.trials} trials already spent ({count_budget(study)} finished)"
                )
            return study
        deadline = self._deadlines.setdefault(
            label,
            time.time() + self.spec.budget.timeout_s if self.spec.budget.timeout_s else math.inf,
        )
        if time.time() >= deadline:
            return study
        source, _ = self.domains.pair_data(i)
        weights = self.models.backbone_weights(rm, source)
        self._set_up(study, rm, weights)
        self.warm.seed(study, self.storage, i, rm)
        refused = mixing_refused(self.spec, rm.new_strategy())
        if refused and f"mixing:{rm.method.key}" not in self._announced:
            self._announced.add(f"mixing:{rm.method.key}")
            self.log(f"{rm.method.key}: {refused}")  # once per method
        callbacks = [
            progress_callback(
                self.spec, label, time.perf_counter(), self.log, self.options.progress
            ),
            *tracking_callbacks(self.spec),
        ]
        objective = self.objective(
            self.ctx,
            self.models,
            self.scorer,
            rm,
            weights,
            self.domains.pair_data(i),
            commit=self.git_commit,
        )
        # Everything alive now (plugins, registries, data, imports) lives as long as the process:
        # leave it out of the garbage collector's scans, so that the collection after each trial
        # only walks that trial's objects.
        gc.collect()
        gc.freeze()
        while time.time() < deadline:
            reap(study, log=self.log)
            if not has_room(study, self.spec.budget.trials):
                break
            trial = study.ask()
            if is_surplus(study, trial.number, self.spec.budget.trials):
                # another process took the last place between the look and the ask
                fail_surplus(study, trial)
                break
            frozen = self._run_trial(study, trial, objective)
            if frozen is not None:
                for cb in callbacks:
                    cb(study, frozen)
        return study

    def _set_up(self, study: optuna.Study, rm: ResolvedMethod, weights: str) -> None:
        """Give ``study`` this process's sampler and pruner, and record them (the first process,
        or a lone one and worker 0, writes what provenance shows), with the hash of the weights
        file its trials start from (every distinct one any process used)."""
        record = weights_file_record(weights)
        seen = study.user_attrs.get(WEIGHTS_FILES, [])
        if record is not None and record not in seen:
            study.set_user_attr(WEIGHTS_FILES, [*seen, record])
        done = count_budget(study)
        study.sampler = make_sampler(
            self.spec,
            done,
            self.options.rank,
            storage_kind(self.storage_url) == "server",
            self.options.sampler_seed,
        )
        study.pruner = make_pruner(self.spec)
        if SAMPLER not in study.user_attrs or self.options.rank in (None, 0):
            study.set_user_attr(
                SAMPLER,
                {"name": type(study.sampler).__name__, "seed": self.spec.seed, "resumed_at": done},
            )
            study.set_user_attr(PRUNER, describe_pruner(study.pruner))
            study.set_user_attr(PRECISION, self.models.precision_for(rm).describe())

    def _run_trial(
        self, study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]
    ) -> FrozenTrial | None:
        """One trial under a lease; returns it finished, or None when another process reaped it.

        A reaped trial (its lease judged stale elsewhere: failed as ``lost`` and queued again there)
        refuses every write: ``report`` and ``set_user_attr`` raise UpdateFinishedTrialError, and
        ``tell`` raises ValueError ("Cannot tell a FAIL trial"). Its result is then dropped with one
        line in the log, and the search goes on with the next trial.
        """
        value, state = None, TrialState.COMPLETE
        interrupted: BaseException | None = None
        error: Exception | None = None
        with trial_lease(study, trial):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except Exception as exc:  # noqa: BLE001 - the objective recorded the reason; the search goes on
                state, error = TrialState.FAIL, exc
            except KeyboardInterrupt as exc:
                # Ctrl-C, SIGTERM: mark the trial, queue it again, stop
                state, interrupted = TrialState.FAIL, exc
        frozen = None
        try:
            # Optuna refuses to tell a finished trial before writing anything: the storage is
            # looked at only when it refuses, not for every trial
            frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except (UpdateFinishedTrialError, ValueError):
            if not finished_elsewhere(study, trial):
                raise
        finally:
            if frozen is not None and error is not None:
                self.log(
                    f"{study.study_name}: trial {trial.number} failed: {trial.user_attrs.get(ERROR) or type(error).__name__}"
                )
            error = None
            release_memory(self.device)  # after the exception and its frames are gone
        if frozen is None:
            self.log(
                f"{study.study_name}: trial {trial.number} was marked lost by another process meanwhile; its result is dropped"
            )
        if interrupted is not None:
            if frozen is not None:
                requeue(study, frozen)
            raise interrupted
        return frozen

    # -------------------------------------------------------------------------------- finals

    def final_runs(self, i: int, rm: ResolvedMethod, study: optuna.Study) -> bool:
        """Re-train the trial each selection rule picks with K seeds; each run reads the target test
        split once, and rules that pick the same trial share its runs.

        Returns False while other processes still work on this study (its trials or its final
        runs), True once there is nothing more to do here."""
        searching = time.time() < self._deadlines.get(study.study_name, math.inf)
        runs = finals.FinalRuns(
            self.ctx,
            self.models,
            self.scorer,
            self.storage,
            self.shared,
            self.git_commit,
            results_dir=self.options.results_dir,
        )
        return runs.run(study, rm, self.domains.pair_data, i, searching)

    def reap_all(self) -> list[int]:
        """Mark the trials and final-run claims of dead processes (called when a worker dies)."""
        names = study_names(self.storage)
        reaped = []
        for p in self.spec.pairs:
            for rm in self.methods:
                name = optuna_study_name(p, rm.method)
                if name in names:
                    reaped += reap(
                        optuna.load_study(study_name=name, storage=self.storage), log=self.log
                    )
                if name + FINALS_SUFFIX in names:
                    reap(
                        optuna.load_study(study_name=name + FINALS_SUFFIX, storage=self.storage),
                        retry=False,
                    )
        return reaped


def build_driver(
    spec: StudySpec,
    registry: Registry,
    options: RunOptions,
    *,
    models: Callable[[Context], ModelFactory] = ModelFactory,
    domains: Callable[[Context], DomainCache] = DomainCache,
    scorer: Callable[[Context], Scorer] = Scorer,
    objective: type[Objective] = Objective,
    check_only: bool = False,
) -> Driver:
    """A driver for ``spec`` with the default collaborators, or those the given factories make
    (each called with the run's :class:`Context`; ``objective`` is the class of each study's
    objective). Resolves every plugin and the storage's URL (a SQLite file a study already has is
    locked now): a mistake in the study file is raised here, before anything is trained. The
    storage itself is opened once the preflight has passed. With ``check_only`` (``harness
    validate``) the driver has no storage: it can only run :meth:`Driver.validate`."""
    ctx = make_context(spec, registry, options.log)
    # start-up, not a trial's work: the metrics library takes about a second to import
    import torchmetrics.functional.classification  # noqa: F401

    methods = resolve_methods(spec, registry)
    domain_cache = domains(ctx)
    url = (
        None
        if check_only
        else run_storage_url(options.storage, options.results_dir, options.workers)
    )
    return Driver(ctx, options, methods, url, models(ctx), domain_cache, scorer(ctx), objective)
