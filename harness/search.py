"""The search driver: one Optuna study per (pair, method), then seeded final runs on the test split."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from harness import api
from harness.errors import HarnessError, NonFiniteLossError, PluginContractError, StudySpecError
from harness.metrics import primary_metric, score
from harness.registry import Entry, Registry
from harness.store.schema import (
    FINALS_SUFFIX,
    FINISHED,
    PARAMS,
    best_trial,
    budget_trials,
    count_budget,
    final_key,
    final_seeds,
    has_room,
    is_finite_number,
    is_surplus,
    optuna_study_name,
    parse_final_key,
    trial_params,
)
from harness.study import Method, StudySpec, spec_error
from harness.training.engine import (
    Precision,
    TrainConfig,
    Trainer,
    TransferModel,
    predict,
    resolve_device,
    resolve_freeze_depth,
    seed_everything,
    unlabelled_logits,
)
from harness.training.probe import device_name
from harness.training.reset import BackboneReset
from harness.training.weights import SourceRecipe, build_backbone, source_pretrained
from harness.validators import VALIDATORS, validate
from harness.versions import git_commit
from harness.workers import claim, host_key, lease, reap, release, requeue

#: decoder used to pretrain a backbone on a segmentation source (weights = "source")
SOURCE_PRETRAIN_SEG_HEAD = "fpn"
# keys of a study's configuration that must not change between runs sharing a storage
_FROZEN_CONFIG = (
    "pair", "method", "task", "metric", "direction", "image_size", "batch_size", "max_epochs", "search", "selection",
    "data", "pretrain", "reuse_backbone",
)  # fmt: skip


def default_storage(results_dir: Path) -> str:
    """The embedded SQLite file: where studies begun before the journal default keep their trials."""
    return f"sqlite:///{(results_dir / 'optuna.db').resolve()}"


def journal_storage(results_dir: Path) -> str:
    """The embedded journal file: what new studies use, with one worker or several."""
    return f"journal:///{(results_dir / 'optuna.journal').resolve()}"


def embedded_storage(results_dir: Path, workers: int = 1) -> str:
    """The storage under ``results/<study>/``: the file a study already has, else a journal file.

    Optuna's FAQ advises against SQLite when several processes write at once and recommends its
    journal storage (one file, appended under a file lock) for several processes on one machine.
    It is also the cheaper one for a lone process: an append per write (``DurableJournalFile``),
    and reads served from memory, where SQLite pays a transaction per write and a query per read
    (measured in ``benchmarks/test_search_efficiency.py``). A study begun in SQLite stays there.
    """
    if (results_dir / "optuna.journal").exists():
        return journal_storage(results_dir)
    if (results_dir / "optuna.db").is_file():
        url = default_storage(results_dir)
        check_workers(
            url, workers, f"{results_dir / 'optuna.db'} holds this study's trials in SQLite"
        )
        return url
    return journal_storage(results_dir)


def storage_kind(url: str) -> str:
    """'sqlite', 'journal' (a file on this machine) or 'server' (PostgreSQL, MySQL, ...)."""
    if url.startswith("sqlite:"):
        return "sqlite"
    if url.startswith("journal:") or url.endswith(".journal"):
        return "journal"
    return "server"


def check_workers(url: str, workers: int, what: str | None = None) -> None:
    if workers > 1 and storage_kind(url) == "sqlite":
        raise HarnessError(
            f"{what or 'storage ' + repr(url)}: Optuna advises against SQLite with several writing "
            f"processes, so it cannot take --workers {workers}",
            hint="run it with --workers 1, or use a database server (--storage postgresql://user@host/db); "
            "a study begun with --workers N and no --storage keeps its trials in a journal file its workers share",
        )


_SQLITE_LOCKS: dict[str, int] = {}


def lock_sqlite(url: str) -> None:
    """Hold, for this process's lifetime, the lock that lets one process at a time write a SQLite file."""
    path = url.removeprefix("sqlite:///")
    if not url.startswith("sqlite:///") or path in ("", ":memory:") or path in _SQLITE_LOCKS:
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise HarnessError(
            f"another process is running a search in {path}; Optuna advises against SQLite with several writing processes",
            hint="wait for it to end, or run the study with --workers N (a journal file the workers share) "
            "or on a database server (--storage postgresql://...)",
        ) from None
    _SQLITE_LOCKS[path] = fd


def unlock_sqlite(url: str) -> None:
    """Let other processes search in this SQLite file again (a no-op when this process holds no lock)."""
    fd = _SQLITE_LOCKS.pop(url.removeprefix("sqlite:///"), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock


def _journal_path(url: str) -> str:
    rest = url.removeprefix("journal:")
    return rest[2:] if rest.startswith("//") else rest


#: journal operations on studies: a study, its attributes (its configuration, its final runs)
_STUDY_OPS = frozenset(
    {JournalOperation.CREATE_STUDY, JournalOperation.DELETE_STUDY, JournalOperation.SET_STUDY_USER_ATTR, JournalOperation.SET_STUDY_SYSTEM_ATTR}
)  # fmt: skip
_FINISHED_STATES = frozenset(
    int(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
)


def _durable(log: dict[str, Any]) -> bool:
    """Whether an append finishes something: a study-level write, or a trial's end state."""
    op = log.get("op_code")
    return op in _STUDY_OPS or (
        op == JournalOperation.SET_TRIAL_STATE_VALUES and log.get("state") in _FINISHED_STATES
    )


class _FileLock(BaseJournalFileLock):
    """An exclusive ``flock`` on ``<journal>.flock``: what every harness process appends under.

    Optuna's default lock creates and renames a symbolic link for each append (made for NFS,
    where this journal must not be) and breaks a lock left by a killed process only after 30 s;
    the kernel drops an flock the moment its process dies, and taking one costs two system calls
    and no metadata writes."""

    def __init__(self, journal: str) -> None:
        self._path = journal + ".flock"
        self._fd: int | None = None
        self._pid = -1

    def acquire(self) -> bool:
        import fcntl

        if self._fd is None or self._pid != os.getpid():  # opened once per process
            self._fd, self._pid = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644), os.getpid()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __getstate__(self) -> dict[str, Any]:
        return {"_path": self._path, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


class DurableJournalFile(JournalFileBackend):
    """Optuna's journal file, fsync'd where it matters: an append that finishes something (a
    study-level write, a trial's end state) is written and fsync'd at once; the appends of a
    running trial (its creation, parameters, per-epoch reports, attributes, lease heartbeats) are
    written under the same lock but not fsync'd one by one. They reach the disk with the trial's
    end state, whose fsync flushes the whole file. Appends go through one descriptor per process.

    Other processes read the file through the page cache, so they see every append at once, and a
    killed process loses nothing it wrote. Only a machine crash can drop the unsynced tail, which
    is the running trials' progress: they are then lost and run again, as after a kill. The fsync
    was about 0.16 ms of the 0.24 ms an append cost on this project's machine, and a trial makes
    about 15 appends (``benchmarks/test_search_efficiency.py``).

    Optuna reads the file back after every append. When nothing else was appended between this
    process's last read and its append, that read takes the appended lines from memory instead of
    reopening and scanning the file (43 -> 25 us a write here); otherwise it reads the file."""

    def read_logs(self, log_number_from: int):
        # Optuna reads the file after every write and before every read of the storage: about
        # thirty times a trial. When the file ends where the next log would begin, nothing was
        # appended since (by this process or another) and there is nothing to open and read.
        offsets = self._log_number_offset
        own = self.__dict__.pop("_harness_own", None)
        size = os.stat(self._file_path).st_size
        if own is not None and own[0] == log_number_from:
            # this process's own append, right after everything it had read: its lines are
            # known, and only what others appended after them is read from the file
            yield from (json.loads(line) for line in own[1])
            log_number_from += len(own[1])
        if offsets.get(log_number_from, -1) == size:
            return
        yield from super().read_logs(log_number_from)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        lines = [(json.dumps(log, separators=(",", ":")) + "\n").encode("utf-8") for log in logs]
        data = b"".join(lines)
        with get_lock_file(self._lock):
            fd = self._append_fd()
            view = memoryview(data)
            while view:  # one write call appends all of it, short of a full disk or a signal
                view = view[os.write(fd, view) :]
            end = os.lseek(
                fd, 0, os.SEEK_CUR
            )  # appended: the descriptor is at the end of this write
            if any(_durable(log) for log in logs):
                os.fsync(fd)
        # When this process had read the file up to where its lines landed, the next read needs
        # neither the file nor its scan: it takes the lines from here (what others appended
        # after them is read from the file).
        offsets, known = self._log_number_offset, len(self._log_number_offset) - 1
        if offsets.get(known) == end - len(data):
            for line in lines:
                offsets[known + 1] = offsets[known] + len(line)
                known += 1
            self.__dict__["_harness_own"] = (known - len(lines), lines)

    def _append_fd(self) -> int:
        """This process's descriptor of the file, opened once for appending (not once a write)."""
        fd, pid = self.__dict__.get("_harness_fd", (None, None))
        if fd is None or pid != os.getpid():
            fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.__dict__["_harness_fd"] = (fd, os.getpid())
        return fd

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_harness_fd", None)
        state.pop("_harness_own", None)  # this process's lines, for its next read only
        return state

    def __del__(self) -> None:
        fd, pid = self.__dict__.get("_harness_fd", (None, None))
        if fd is not None and pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(fd)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    try:
        kind = storage_kind(url)
        if kind == "journal":
            path = Path(_journal_path(url))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(
                DurableJournalFile(str(path), _FileLock(str(path)))
            )
        if kind == "sqlite":
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, drivers and servers fail in many ways
        raise HarnessError(
            f"cannot open storage {url.split('@')[-1]!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
            hint="use a URL Optuna supports (postgresql://user@host/db, mysql+pymysql://..., sqlite:///path.db) "
            "with its driver installed, or journal:///path/file.journal",
        ) from None


def resolve_rule(rule: str, strategy: api.Strategy) -> tuple[str, bool]:
    """A study's selection rule for one method, and whether that is oracle selection (target
    labels used by a method that claims not to need them)."""
    if rule == "auto":
        rule = "target-val" if strategy.target_labels != "none" else "source-val"
    # "few" counts too: its trials would be chosen with far more target labels than k per class
    oracle = rule == "target-val" and strategy.target_labels in ("none", "few")
    return rule, oracle


def selection_rules(spec: StudySpec, strategy: api.Strategy) -> list[tuple[str, bool]]:
    """Every rule the study selects with, resolved for ``strategy``; the first drives the search."""
    out: list[tuple[str, bool]] = []
    for rule in spec.selection_rules:
        resolved = resolve_rule(rule, strategy)
        if resolved not in out:
            out.append(resolved)
    return out


def selection_rule(spec: StudySpec, strategy: api.Strategy) -> tuple[str, bool]:
    """The rule that drives the search (the sampler and pruner see its scores)."""
    return selection_rules(spec, strategy)[0]


def asha_min_resource(epochs: int) -> int:
    """Epochs after which successive halving first judges a trial (it does so once the epoch after
    them is reported): a sixth of the budget, and never before the third epoch. On the quickstart
    pair (``benchmarks/test_search_efficiency.py``) rankings after one or two epochs said little
    about the final score; judging after a fifth of 24 epochs, then after 13, kept the best score
    of an unpruned search, where judging one epoch earlier lost 2-4 points."""
    return max(2, epochs // 6)


class Halving(optuna.pruners.BasePruner):
    """Successive halving in which a trial goes on from a rung only by comparison with others there.

    Optuna's asynchronous ``SuccessiveHalvingPruner`` promotes the first trial to reach a rung
    unconditionally (it is the top third of one), so in a search that runs its trials one after
    another the first trial, a random start-up one, always trains to the end, and so does the
    first to reach each later rung. Here that first arrival stops at the rung (Optuna's
    ``bootstrap_count=1``); its score stays there for the later trials to be compared with. A
    later trial goes on when its score is at least the k-th best of the n trials at the rung, itself
    included, with k = n // reduction_factor and at least 1 (so ties go on, and while n < 2 *
    reduction_factor only the best does). Two trials of parallel workers that reach a rung at the
    same moment may both count as its first arrival.

    Guards: while no trial has completed, the budget's last place is not pruned, so a search that
    runs its whole budget completes a trial unless that last trial fails (a search cut short by
    ``timeout_s`` or an interrupt may end with none); and no trial is judged at its last epoch,
    where stopping it saves nothing.
    """

    def __init__(self, min_resource: int, reduction_factor: int, budget: int, epochs: int) -> None:
        self.halving = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=reduction_factor, bootstrap_count=1
        )
        self.budget, self.epochs = budget, epochs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if (trial.last_step or 0) >= self.epochs - 1 or not self.halving.prune(study, trial):
            return False
        if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            return True
        return not is_surplus(study, trial.number, self.budget - 1)  # the last place trains on


def describe_pruner(pruner: optuna.pruners.BasePruner) -> str:
    """The pruner and its settings, as provenance records it."""
    if isinstance(pruner, Halving):
        inner = pruner.halving
        return (
            f"SuccessiveHalvingPruner(min_resource={inner._min_resource}, reduction_factor={inner._reduction_factor}, "
            f"bootstrap_count={inner._bootstrap_count}); the last of {pruner.budget} trials is not pruned until one "
            f"completes; none is judged at its last epoch ({pruner.epochs})"
        )
    if isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner):
        return f"SuccessiveHalvingPruner(min_resource={pruner._min_resource}, reduction_factor={pruner._reduction_factor})"
    if isinstance(pruner, optuna.pruners.MedianPruner):
        return f"MedianPruner(n_startup_trials={pruner._n_startup_trials}, n_warmup_steps={pruner._n_warmup_steps})"
    return type(pruner).__name__


# ------------------------------------------------------------------------------------- resolution


@dataclass
class DomainRef:
    text: str
    entry: Entry
    sub: str | None
    options: dict[str, Any]


@dataclass
class ResolvedMethod:
    method: Method
    backbone: Entry
    head: Entry
    strategy: Entry

    def new_strategy(self) -> api.Strategy:
        s = self.strategy.factory(**self.method.strategy_options)
        if not isinstance(s, api.Strategy):
            raise PluginContractError(
                f"strategy factory of plugin {self.strategy.plugin!r} ({self.strategy.dist}) returned "
                f"{type(s).__name__}, not harness.api.Strategy"
            )
        return s


def resolve_domain(spec: StudySpec, registry: Registry, text: str, key: str) -> DomainRef:
    name, _, sub = text.partition("/")
    try:
        if name in spec.datasets:
            alias = spec.datasets[name]
            entry = registry.get("dataset", alias.plugin)
            options = alias.options
        else:
            entry, options = registry.get("dataset", name), {}
    except HarnessError as exc:
        raise spec_error(spec, key, exc) from None
    if spec.task not in entry.meta.get("tasks", ("classification",)):
        raise spec_error(spec, key, f"dataset {name!r} does not serve {spec.task}")
    declared = entry.meta.get("domains")
    if declared and sub and sub not in declared:
        from harness.registry import unknown_message

        raise spec_error(
            spec,
            key,
            unknown_message(f"domain of {name!r}", sub, list(declared))
            + f" (it serves {', '.join(declared)})",
        )
    return DomainRef(text, entry, sub or None, options)


def resolve_methods(spec: StudySpec, registry: Registry) -> list[ResolvedMethod]:
    out = []
    for i, m in enumerate(spec.methods):
        entries = {}
        for kind, attr in (("backbone", "backbone"), ("head", "head"), ("strategy", "strategy")):
            try:
                entries[kind] = registry.get(kind, getattr(m, attr))
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{i}].{attr}", exc) from None
        tasks = entries["head"].meta.get("tasks", ("classification",))
        if spec.task not in tasks:
            raise spec_error(
                spec,
                f"methods[{i}].head",
                f"head {m.head!r} supports {', '.join(tasks)}, not {spec.task}",
            )
        strategy_tasks = entries["strategy"].meta.get("tasks", ("classification", "segmentation"))
        if spec.task not in strategy_tasks:
            raise spec_error(
                spec,
                f"methods[{i}].strategy",
                f"strategy {m.strategy!r} supports {', '.join(strategy_tasks)}, not {spec.task}",
            )
        rm = ResolvedMethod(m, entries["backbone"], entries["head"], entries["strategy"])
        try:
            strategy = rm.new_strategy()
        except (TypeError, ValueError) as exc:
            raise spec_error(
                spec, f"methods[{i}].strategy_options", f"{m.strategy}: {exc}"
            ) from None
        if strategy.shots and spec.task != "classification":
            raise spec_error(
                spec,
                f"methods[{i}].strategy_options",
                "shots (k labelled images per class) applies to classification only",
            )
        out.append(rm)
    return out


# ------------------------------------------------------------------------------------- the run


@dataclass
class RunOptions:
    results_dir: Path
    storage: str | None = None
    log: Callable[[str], None] = print
    progress: Callable[[dict[str, Any]], None] | None = None
    #: worker processes sharing the storage on this machine (chooses the embedded storage)
    workers: int = 1
    #: this process's index among them; None for a lone ``harness run``
    rank: int | None = None
    #: seconds between looks at studies that other processes are still working on
    poll_s: float = 1.0


@dataclass
class Runner:
    """Runs a study: resolves plugins, searches every (pair, method), then the final seeded runs."""

    spec: StudySpec
    registry: Registry
    options: RunOptions
    device: torch.device = field(init=False)
    precision: Precision = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.device = resolve_device(self.spec.device)
        except (RuntimeError, ValueError) as exc:
            raise spec_error(self.spec, "device", str(exc)) from None
        self.precision = Precision.for_device(self.device, self.spec.precision)
        # start-up, not a trial's work: the metrics library takes about a second to import
        import torchmetrics.functional.classification  # noqa: F401

        self.methods = resolve_methods(self.spec, self.registry)
        self.domains = {
            (i, side): resolve_domain(
                self.spec, self.registry, getattr(p, side), f"pairs[{i}].{side}"
            )
            for i, p in enumerate(self.spec.pairs)
            for side in ("source", "target")
        }
        self._data: dict[str, api.DomainData] = {}
        self.storage_url = self.options.storage or embedded_storage(
            self.options.results_dir, self.options.workers
        )
        check_workers(self.storage_url, self.options.workers)
        self.options.results_dir.mkdir(parents=True, exist_ok=True)
        if storage_kind(self.storage_url) == "sqlite":
            lock_sqlite(self.storage_url)
        self.storage = make_storage(self.storage_url)
        # SQLite is only ever used by one process; other storages may be shared, so final runs
        # are claimed before they are trained
        self.shared = storage_kind(self.storage_url) != "sqlite"
        self.log = self.options.log
        self.searching = False  # set once preflight passed: from then on results are worth writing
        self._announced: set[str] = set()
        self._deadlines: dict[str, float] = {}
        self.git_commit = git_commit(Path(self.spec.path).parent if self.spec.path else Path.cwd())

    # -------------------------------------------------------------------------------- data

    def domain(self, i: int, side: str) -> api.DomainData:
        ref = self.domains[(i, side)]
        key = json.dumps(
            [ref.entry.plugin, ref.entry.name, ref.sub, ref.options], sort_keys=True, default=str
        )
        if key not in self._data:
            try:
                data = ref.entry.factory(
                    ref.sub, image_size=self.spec.image_size, seed=self.spec.seed, **ref.options
                )
            except TypeError as exc:
                raise spec_error(
                    self.spec, f"pairs[{i}].{side}", f"dataset {ref.entry.name!r}: {exc}"
                ) from None
            except HarnessError as exc:
                raise spec_error(self.spec, f"pairs[{i}].{side}", exc) from None
            if not isinstance(data, api.DomainData):
                raise PluginContractError(
                    f"dataset factory of plugin {ref.entry.plugin!r} ({ref.entry.dist}) returned "
                    f"{type(data).__name__}, not harness.api.DomainData"
                )
            data.check(self.spec.image_size)
            self._data[key] = api.DomainData(
                name=ref.text,
                task=data.task,
                class_names=data.class_names,
                train=data.train.to(self.device),
                val=data.val.to(self.device),
                test=data.test.to(self.device),
                fingerprint=data.fingerprint,
                meta=data.meta,
            )
        return self._data[key]

    def pair_data(self, i: int) -> tuple[api.DomainData, api.DomainData]:
        source, target = self.domain(i, "source"), self.domain(i, "target")
        if source.class_names != target.class_names:
            raise spec_error(
                self.spec,
                f"pairs[{i}]",
                f"source {source.name!r} and target {target.name!r} have different classes "
                f"({len(source.class_names)} vs {len(target.class_names)})",
            )
        return source, target

    # -------------------------------------------------------------------------------- models

    def backbone_weights(self, rm: ResolvedMethod, source: api.DomainData) -> str:
        w = rm.method.weights
        if w != "source":
            return w
        p = self.spec.pretrain
        recipe = SourceRecipe(
            p.epochs, p.lr, p.weight_decay, p.augment, self.spec.batch_size, self.spec.seed
        )
        head = None
        if source.task == "segmentation":
            head = self.registry.get("head", SOURCE_PRETRAIN_SEG_HEAD)
        return str(
            source_pretrained(
                rm.backbone,
                rm.method.backbone,
                source,
                recipe,
                self.device,
                self.precision_for(rm),
                self.log,
                head,
            )
        )

    def build_model(
        self, rm: ResolvedMethod, weights: str, num_classes: int, reuse: bool = False
    ) -> TransferModel:
        """A fresh model: the backbone with ``weights`` and a new head initialized from the global
        generators. With ``reuse`` (trials, final runs and the preflight, which build one model at a
        time) and the study's ``reuse_backbone``, the backbone is the previous call's module reset in
        place where that gives exactly what a build gives (``harness.training.reset``): the head's
        initialization then follows the caller's seed directly, not the backbone's."""
        reset = self._backbone_reset(rm, weights) if reuse and self.spec.reuse_backbone else None
        backbone = (
            reset()
            if reset is not None
            else build_backbone(rm.backbone, rm.method.backbone, weights)
        )
        head = rm.head.factory(
            backbone=backbone,
            num_classes=num_classes,
            task=self.spec.task,
            **rm.method.head_options,
        )
        if not isinstance(head, torch.nn.Module):
            raise PluginContractError(
                f"head factory of plugin {rm.head.plugin!r} ({rm.head.dist}) returned {type(head).__name__}, "
                "not a torch.nn.Module"
            )
        return TransferModel(backbone, head, self.spec.task)

    def _backbone_reset(self, rm: ResolvedMethod, weights: str) -> BackboneReset | None:
        if weights == "none":
            return None  # every trial's backbone is a new random initialization
        path = Path(weights)
        st = path.stat() if path.is_file() else None
        key = (rm.backbone.plugin, rm.method.backbone, weights, st and (st.st_mtime_ns, st.st_size))
        resets = self.__dict__.setdefault("_resets", {})
        if key not in resets:
            resets.clear()  # one module kept: the trials and final runs of one method at a time
            resets[key] = BackboneReset(
                lambda: build_backbone(rm.backbone, rm.method.backbone, weights)
            )
        return resets[key]

    def precision_for(self, rm: ResolvedMethod) -> Precision:
        """The pinned precision, or for "auto" the fastest by a short probe, cached on disk per
        backbone, image size, batch size, device and torch version (see ``harness.training.probe``)."""
        if self.spec.precision != "auto":
            return self.precision
        chosen = self.__dict__.setdefault("_precisions", {})
        name = rm.method.backbone
        if name not in chosen:
            from harness.training import probe

            chosen[name] = probe.resolve(
                "auto", self.device, backbone=name, image_size=self.spec.image_size, batch_size=self.spec.batch_size,
                build=lambda: self.build_model(rm, "none", 2), log=self.log,
            )  # fmt: skip
        return chosen[name]

    def preflight(self) -> None:
        """Everything that can fail before training: data, weights, heads, options."""
        for i in range(len(self.spec.pairs)):
            source, target = self.pair_data(i)
            for j, rm in enumerate(self.methods):
                try:
                    weights = self.backbone_weights(rm, source)
                    model = self.build_model(rm, weights, target.num_classes, reuse=True)
                    expected = (2, target.num_classes) + (
                        tuple(target.image_shape[1:]) if self.spec.task == "segmentation" else ()
                    )
                    try:
                        with torch.no_grad():
                            x = target.val.x[:2].float().div(255)
                            out = model.eval().to(self.device)(model.to(self.device).normalize(x))
                    except Exception as exc:  # noqa: BLE001 - timm and smp refuse shapes in many ways
                        raise PluginContractError(
                            f"{rm.method.backbone} + {rm.method.head} fails on a sample batch of "
                            f"{self.spec.image_size} px images: {str(exc).splitlines()[0][:200]}"
                        ) from None
                    if tuple(out.shape) != expected:
                        raise PluginContractError(
                            f"model output has shape {tuple(out.shape)}, expected {expected}"
                        )
                except HarnessError as exc:
                    raise spec_error(self.spec, f"methods[{j}]", exc) from None
                except TypeError as exc:
                    raise spec_error(
                        self.spec, f"methods[{j}].head_options", f"head {rm.method.head!r}: {exc}"
                    ) from None

    # -------------------------------------------------------------------------------- search

    def config_of(self, i: int, rm: ResolvedMethod, strategy: api.Strategy) -> dict[str, Any]:
        source, target = self.pair_data(i)
        rule, oracle = selection_rule(self.spec, strategy)
        return {
            "selection_rules": [
                {"rule": r, "oracle": o} for r, o in selection_rules(self.spec, strategy)
            ],
            "pair": self.spec.pairs[i].model_dump(),
            "method": rm.method.model_dump(),
            "task": self.spec.task,
            "metric": primary_metric(self.spec.task),
            "direction": "maximize",
            "image_size": self.spec.image_size,
            "batch_size": self.spec.batch_size,
            "max_epochs": self.spec.budget.max_epochs,
            "search": self.spec.search.model_dump(),
            "selection": rule,
            "oracle": oracle,
            "pretrain": self.spec.pretrain.model_dump() if rm.method.weights == "source" else None,
            # how a trial's model is made, which decides its random initialization
            "reuse_backbone": self.spec.reuse_backbone,
            "data": {"source": source.fingerprint, "target": target.fingerprint},
            "target_labels": strategy.target_labels,
            "plugins": {
                "source": f"{self.domains[(i, 'source')].entry.plugin} ({self.domains[(i, 'source')].entry.dist})",
                "target": f"{self.domains[(i, 'target')].entry.plugin} ({self.domains[(i, 'target')].entry.dist})",
                "backbone": f"{rm.backbone.plugin} ({rm.backbone.dist})",
                "head": f"{rm.head.plugin} ({rm.head.dist})",
                "strategy": f"{rm.strategy.plugin} ({rm.strategy.dist})",
            },
        }

    def open_study(self, i: int, rm: ResolvedMethod) -> optuna.Study:
        strategy = rm.new_strategy()
        name = optuna_study_name(self.spec.pairs[i], rm.method)
        config = self.config_of(i, rm, strategy)
        study = optuna.create_study(
            storage=self.storage, study_name=name, direction="maximize", load_if_exists=True
        )
        old = study.user_attrs.get("config")
        if old is None and study.direction != optuna.study.StudyDirection.MAXIMIZE:
            old = {}  # made by something else than the harness, which always maximizes
        if old is None:
            study.set_user_attr("config", config)
            study.set_user_attr("study_file_hash", self.spec.file_hash)
        else:
            # a key the stored configuration lacks was not recorded by the harness that began the study
            changed = [
                k for k in _FROZEN_CONFIG
                if k in old and json.dumps(old.get(k), sort_keys=True) != json.dumps(config.get(k), sort_keys=True)
            ]  # fmt: skip
            if study.direction != optuna.study.StudyDirection.MAXIMIZE:
                changed.insert(0, "direction")
                old = {**old, "direction": study.direction.name.lower()}
            if changed:
                raise StudySpecError(
                    f"{self.spec.path}: cannot resume {name!r}: {', '.join(changed)} changed since its "
                    f"trials were run ({_describe_change(old, config, changed[0])})",
                    hint="name the study differently, pass another --storage, or delete its results to start over",
                )
        return study

    def _sampler(self, n_done: int) -> optuna.samplers.BaseSampler:
        # The seed moves with the number of finished trials so that a resumed run does not replay
        # the same random start-up suggestions.
        # Processes sharing a study must not draw the same suggestions: each worker's seed is
        # offset by its rank, and by its host and process where machines share a database.
        seed = self.spec.seed + n_done + 1009 * (self.options.rank or 0)
        if self.options.rank is None and storage_kind(self.storage_url) == "server":
            seed += zlib.crc32(f"{host_key()}:{os.getpid()}".encode()) % 1_000_003
        if self.spec.search.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # TPE counts the finished trials itself when deciding whether start-up is over
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=self.spec.search.startup_trials, multivariate=True
        )

    def _pruner(self) -> optuna.pruners.BasePruner:
        s, epochs = self.spec.search, self.spec.budget.max_epochs
        if s.pruner == "none":
            return optuna.pruners.NopPruner()
        if s.pruner == "asha":
            return Halving(asha_min_resource(epochs), 3, self.spec.budget.trials, epochs)
        if s.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=1, max_resource=epochs, reduction_factor=3
            )
        return optuna.pruners.MedianPruner(
            n_startup_trials=s.startup_trials, n_warmup_steps=max(1, epochs // 3)
        )

    def suggest(
        self, trial: optuna.Trial, strategy: api.Strategy, num_stages: int
    ) -> dict[str, Any]:
        s = self.spec.search
        params: dict[str, Any] = {}
        if "freeze_depth" in strategy.fixed:
            depth = resolve_freeze_depth(strategy.fixed["freeze_depth"], num_stages)
        elif s.freeze_depth == "auto":
            depth = trial.suggest_int("backbone.freeze_depth", 0, num_stages)
        elif isinstance(s.freeze_depth, list):
            lo, hi = (min(v, num_stages) for v in s.freeze_depth)
            depth = trial.suggest_int("backbone.freeze_depth", lo, hi)
        else:
            depth = min(int(s.freeze_depth), num_stages)
        params["backbone.freeze_depth"] = depth
        if depth < num_stages:
            params["backbone.lr"] = _suggest_float(trial, "backbone.lr", s.backbone_lr)
            if isinstance(s.layer_decay, list) and s.layer_decay[0] < s.layer_decay[1]:
                params["backbone.lr_decay"] = trial.suggest_float(
                    "backbone.lr_decay", *s.layer_decay
                )
            else:
                decay = s.layer_decay[0] if isinstance(s.layer_decay, list) else s.layer_decay
                if decay != 1.0:
                    params["backbone.lr_decay"] = float(decay)
        params["head.lr"] = _suggest_float(trial, "head.lr", s.head_lr)
        params["optimizer.weight_decay"] = _suggest_float(
            trial, "optimizer.weight_decay", s.weight_decay
        )
        policies = [s.augment] if isinstance(s.augment, str) else s.augment
        params["augment.policy"] = (
            policies[0]
            if len(policies) == 1
            else trial.suggest_categorical("augment.policy", policies)
        )
        extra = strategy.search_space(trial)
        bad = [k for k in extra if not k.startswith("strategy.")]
        if bad:
            raise PluginContractError(
                f"strategy search_space returned {bad}; names must start with 'strategy.'"
            )
        params.update(extra)
        # one write for all of them (the pinned and fixed ones are not in trial.params)
        trial.set_user_attr(PARAMS, params)
        return params

    def train_config(
        self, params: dict[str, Any], seed: int, num_stages: int, precision: Precision | None = None
    ) -> TrainConfig:
        return TrainConfig(
            epochs=self.spec.budget.max_epochs,
            batch_size=self.spec.batch_size,
            backbone_lr=float(params.get("backbone.lr", 0.0)),
            head_lr=float(params["head.lr"]),
            weight_decay=float(params["optimizer.weight_decay"]),
            freeze_depth=int(params["backbone.freeze_depth"]),
            augment=str(params["augment.policy"]),
            seed=seed,
            device=self.device,
            precision=precision or self.precision,
            params=params,
            data_seed=self.spec.seed,
        )

    def rule_score(
        self,
        rule: str,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
    ) -> float:
        """``model``'s score under a selection rule: accuracy (mIoU) on a labelled validation split,
        or a label-free validator on the unlabelled target validation images."""
        if rule in ("target-val", "source-val"):
            split = target.val if rule == "target-val" else source.val
            return self._split_score(
                predict(model, split, self.spec.batch_size * 4, self.device, precision),
                split,
                target,
            )
        return VALIDATORS[rule](self._validator_logits(model, target, precision))

    def all_scores(
        self,
        model: TransferModel,
        source: api.DomainData,
        target: api.DomainData,
        precision: Precision,
    ) -> dict[str, float]:
        """Every rule's score, recorded with each trial: the study's rules select from them, and the
        label-free validators are later compared with target-val (never used by the search).

        Two passes over validation images for classification (the target's logits serve both its
        accuracy and the validators), three for segmentation (whose predictions are labels)."""
        batch = self.spec.batch_size * 4
        target_out = predict(model, target.val, batch, self.device, precision)
        scores = {
            "target-val": self._split_score(target_out, target.val, target),
            "source-val": self._split_score(
                predict(model, source.val, batch, self.device, precision), source.val, target
            ),
        }
        logits = (
            target_out
            if self.spec.task == "classification"
            else self._validator_logits(model, target, precision)
        )
        return scores | validate(logits)

    def _split_score(self, out: torch.Tensor, split: api.Split, target: api.DomainData) -> float:
        return float(
            score(self.spec.task, out, split.y, target.num_classes)[primary_metric(self.spec.task)]
        )

    def _validator_logits(
        self, model: TransferModel, target: api.DomainData, precision: Precision
    ) -> torch.Tensor:
        """What label-free validators read: the target validation images' logits (through the
        frozen-feature cache where it applies), seeded pixels of them for segmentation."""
        batch = self.spec.batch_size * 4
        if self.spec.task == "classification":
            return predict(model, target.val, batch, self.device, precision)
        return unlabelled_logits(
            model, target.val, batch, self.device, precision, seed=self.spec.seed
        )

    def objective(
        self, i: int, rm: ResolvedMethod, weights: str
    ) -> Callable[[optuna.Trial], float]:
        source, target = self.pair_data(i)

        def run(trial: optuna.Trial) -> float:
            strategy = rm.new_strategy()
            rule, _ = selection_rule(self.spec, strategy)
            try:
                seed_everything(self.spec.seed + trial.number)
                model = self.build_model(rm, weights, target.num_classes, reuse=True)
                params = self.suggest(trial, strategy, model.num_stages)
                cfg = self.train_config(
                    params, self.spec.seed + trial.number, model.num_stages, self.precision_for(rm)
                )
                trainer = Trainer(model, strategy, source, target, cfg)

                last: dict[str, float] = {}

                def on_epoch(epoch: int, m: TransferModel) -> float:
                    if epoch == cfg.epochs - 1:  # the final model: every rule's score in one go
                        last.update(self.all_scores(m, source, target, cfg.precision))
                        value = last[rule]
                    else:
                        value = self.rule_score(rule, m, source, target, cfg.precision)
                    if not math.isfinite(value):
                        raise NonFiniteLossError(
                            f"non-finite {rule} score ({value}) after epoch {epoch + 1}"
                        )
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")
                    return value

                result = trainer.fit(on_epoch)
                # the model is unchanged since the last epoch's scores
                scores = last or self.all_scores(trainer.model, source, target, cfg.precision)
                # (the epochs it trained are its reported intermediate values: no attribute of their own)
                trial.set_user_attr(
                    "scores", {k: v if math.isfinite(v) else None for k, v in scores.items()}
                )
                trial.set_user_attr("train_loss", result.train_loss[-1])
                if not (
                    is_finite_number(result.history[-1]) and is_finite_number(result.train_loss[-1])
                ):
                    raise NonFiniteLossError(
                        f"the trial ended with {rule} {result.history[-1]}, loss {result.train_loss[-1]}"
                    )
                return result.history[-1]
            except (optuna.TrialPruned, UpdateFinishedTrialError):
                raise  # pruned; or reaped by another process, which wrote the reason
            except Exception as exc:
                # a reaped trial takes no more writes: keep the original error, not the refusal
                with contextlib.suppress(UpdateFinishedTrialError):
                    trial.set_user_attr("fail_reason", failure_reason(exc))
                    trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:300]}")
                raise
            except BaseException:  # Ctrl-C, SIGTERM: the trial did not fail on its own merits
                with contextlib.suppress(UpdateFinishedTrialError):
                    trial.set_user_attr("fail_reason", "interrupted")
                raise
            finally:
                _release_memory(self.device)

        return run

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
        source, _ = self.pair_data(i)
        weights = self.backbone_weights(rm, source)
        done = count_budget(study)
        study.sampler = self._sampler(done)
        study.pruner = self._pruner()
        if "sampler" not in study.user_attrs or self.options.rank in (None, 0):
            study.set_user_attr(
                "sampler",
                {"name": type(study.sampler).__name__, "seed": self.spec.seed, "resumed_at": done},
            )
            study.set_user_attr("pruner", describe_pruner(study.pruner))
            study.set_user_attr("precision", self.precision_for(rm).describe())
        callbacks = [
            self._progress_callback(label, time.perf_counter()),
            *self._tracking_callbacks(),
        ]
        objective = self.objective(i, rm, weights)
        # Everything alive now (plugins, registries, data, imports) lives as long as the process:
        # leave it out of the garbage collector's scans, so that the collection after each trial
        # only walks that trial's objects (a full scan cost about a second per trial here).
        gc.collect()
        gc.freeze()
        while time.time() < deadline:
            reap(study, log=self.log)
            if not has_room(study, self.spec.budget.trials):
                break
            trial = study.ask()
            if is_surplus(study, trial.number, self.spec.budget.trials):
                # another process took the last place between the look and the ask
                study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "surplus")
                study.tell(trial, state=TrialState.FAIL)
                break
            frozen = self._run_trial(study, trial, objective)
            if frozen is not None:
                for cb in callbacks:
                    cb(study, frozen)
        return study

    def _run_trial(
        self, study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]
    ) -> optuna.trial.FrozenTrial | None:
        """One trial under a lease; returns it finished, or None when another process reaped it.

        A reaped trial (its lease judged stale elsewhere: failed as ``lost`` and queued again there)
        refuses every write: ``report`` and ``set_user_attr`` raise UpdateFinishedTrialError, and
        ``tell`` raises ValueError ("Cannot tell a FAIL trial"). Its result is then dropped with one
        line in the log, and the search goes on with the next trial.
        """
        value, state = None, TrialState.COMPLETE
        interrupted: BaseException | None = None
        error: Exception | None = None
        with lease(study._storage, trial._trial_id):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except Exception as exc:  # noqa: BLE001 - the objective recorded the reason; the search goes on
                state, error = TrialState.FAIL, exc
            except (
                KeyboardInterrupt
            ) as exc:  # Ctrl-C, SIGTERM: mark the trial, queue it again, stop
                state, interrupted = TrialState.FAIL, exc
        frozen = None
        try:
            # Optuna refuses to tell a finished trial before writing anything: the storage is
            # looked at only when it refuses, not for every trial
            frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except (UpdateFinishedTrialError, ValueError):
            if not self._reaped(study, trial):
                raise
        finally:
            if frozen is not None and error is not None:
                self.log(
                    f"{study.study_name}: trial {trial.number} failed: {trial.user_attrs.get('error') or type(error).__name__}"
                )
            error = None
            _release_memory(self.device)  # after the exception and its frames are gone
        if frozen is None:
            self.log(
                f"{study.study_name}: trial {trial.number} was marked lost by another process meanwhile; its result is dropped"
            )
        if interrupted is not None:
            if frozen is not None:
                requeue(study, frozen)
            raise interrupted
        return frozen

    @staticmethod
    def _reaped(study: optuna.Study, trial: optuna.Trial) -> bool:
        """Whether ``trial``, still running here, was finished by another process (reaped)."""
        return study._storage.get_trial(trial._trial_id).state.is_finished()

    def _tracking_callbacks(self) -> list[Callable[[optuna.Study, Any], None]]:
        uri = self.spec.tracking.mlflow_uri
        if not uri:
            return []
        try:
            from optuna_integration.mlflow import MLflowCallback
        except ImportError:
            raise spec_error(
                self.spec,
                "tracking.mlflow_uri",
                "MLflow tracking needs the optional packages: pip install 'transfer-harness[tracking]'",
            ) from None
        return [
            MLflowCallback(
                tracking_uri=uri, metric_name=primary_metric(self.spec.task), create_experiment=True
            )
        ]

    def _progress_callback(self, label: str, started: float) -> Callable[[optuna.Study, Any], None]:
        def cb(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            trials = study.get_trials(deepcopy=False)
            n = sum(1 for t in trials if t.state in FINISHED)
            best = max(
                (t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None),
                default=None,
            )
            value = (
                f"{trial.value:.4f}"
                if trial.value is not None
                else trial.user_attrs.get("fail_reason", "")
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
                "budget": self.spec.budget.trials,
                "elapsed": time.perf_counter() - started,
            }
            if self.options.progress:
                self.options.progress(info)
            else:
                best_s = f"{best:.4f}" if best is not None else "-"
                self.log(
                    f"{label}: trial {trial.number} {trial.state.name.lower()} {value}  "
                    f"[{n}/{self.spec.budget.trials}, best {best_s}, {info['elapsed']:.0f}s]"
                )

        return cb

    # -------------------------------------------------------------------------------- finals

    def final_runs(self, i: int, rm: ResolvedMethod, study: optuna.Study) -> bool:
        """Re-train the trial each selection rule picks with K seeds; each run reads the target test
        split once, and rules that pick the same trial share its runs.

        Returns False while other processes still work on this study (its trials or its final
        runs), True once there is nothing more to do here."""
        trials = study.get_trials(deepcopy=False)
        searching = time.time() < self._deadlines.get(study.study_name, math.inf)
        if any(
            t.state == TrialState.RUNNING or (t.state == TrialState.WAITING and searching)
            for t in trials
        ):
            return False  # the best trial is not known yet
        budgeted = budget_trials(trials, self.spec.budget.trials)
        picks: dict[int, optuna.trial.FrozenTrial] = {}
        for rule, _ in selection_rules(self.spec, rm.new_strategy()):
            best = best_trial(budgeted, rule)
            if best is not None:
                picks.setdefault(best.number, best)
        if not picks:
            self.log(f"{study.study_name}: no completed trial, no final runs")
            return True
        keys = [final_key(n, s) for n in picks for s in final_seeds(self.spec)]
        missing = [key for key in keys if key not in study.user_attrs]
        if not missing:
            return True
        claims = None
        if self.shared:
            claims = optuna.create_study(
                storage=self.storage,
                study_name=study.study_name + FINALS_SUFFIX,
                direction="maximize",
                load_if_exists=True,
            )
        source, target = self.pair_data(i)
        weights = None
        for key in missing:
            claim_id = None
            if claims is not None:
                claim_id = claim(claims, key)
                if claim_id is None:
                    continue  # done or being done by another process
                if (
                    key
                    in optuna.load_study(
                        study_name=study.study_name, storage=self.storage
                    ).user_attrs
                ):
                    release(claims, claim_id, done=True)
                    continue
            number, seed = parse_final_key(key)
            best = picks[number]
            ok, reason = False, "interrupted"
            try:
                with (
                    lease(self.storage, claim_id)
                    if claim_id is not None
                    else contextlib.nullcontext()
                ):
                    weights = weights or self.backbone_weights(rm, source)
                    self._final_run(study, rm, best, seed, key, weights, source, target)
                ok = True
            except Exception as exc:  # noqa: BLE001 - recorded; the other seeds and studies go on
                reason = failure_reason(exc)
                self.log(
                    f"{study.study_name}: final seed {seed} failed ({reason}): {type(exc).__name__}: {str(exc)[:200]}"
                )
            finally:
                if claims is not None and claim_id is not None:
                    release(claims, claim_id, done=ok, reason=reason)
                _release_memory(self.device)
        if claims is None:
            return True
        attrs = optuna.load_study(study_name=study.study_name, storage=self.storage).user_attrs
        remaining = {key for key in keys if key not in attrs}
        # another process still trains one of them: look again later
        return not any(
            t.user_attrs.get("key") in remaining
            for t in claims.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        )

    def _final_run(
        self,
        study: optuna.Study,
        rm: ResolvedMethod,
        best: optuna.trial.FrozenTrial,
        seed: int,
        key: str,
        weights: str,
        source: api.DomainData,
        target: api.DomainData,
    ) -> None:
        strategy = rm.new_strategy()
        rule, _ = selection_rule(self.spec, strategy)
        params = trial_params(best)
        t0 = time.perf_counter()
        seed_everything(seed)
        model = self.build_model(rm, weights, target.num_classes, reuse=True)
        cfg = self.train_config(params, seed, model.num_stages, self.precision_for(rm))
        trainer = Trainer(model, strategy, source, target, cfg)
        trainer.fit()
        metric = primary_metric(self.spec.task)
        scores = self.all_scores(trainer.model, source, target, cfg.precision)
        test = self.evaluate_test(trainer, target)
        if not (is_finite_number(scores[rule]) and is_finite_number(test[metric])):
            raise NonFiniteLossError(f"final run scored a non-finite {rule} or test {metric}")
        record = {
            "trial": best.number,
            "seed": seed,
            "val": scores[rule],
            "scores": {k2: v if math.isfinite(v) else None for k2, v in scores.items()},
            "test": test,
            "seconds": time.perf_counter() - t0,
            "device": str(self.device),
            # the processor or GPU model: float results differ between kernels that processors pick
            "device_name": device_name(self.device),
            "precision": cfg.precision.describe(),
            "git_commit": self.git_commit,
        }
        study.set_user_attr(key, record)
        self.log(
            f"{study.study_name}: final seed {seed} of trial {best.number}: target test {metric} {test[metric]:.4f}"
        )

    def evaluate_test(self, trainer: Trainer, target: api.DomainData) -> dict[str, Any]:
        """The only place the target test split is read."""
        return score(
            self.spec.task, trainer.predict(target.test), target.test.y, target.num_classes
        )

    # -------------------------------------------------------------------------------- all

    def run(self) -> None:
        """Search every (pair, method) and run its final seeds; with other processes on the same
        storage, come back to the studies they still work on until nothing is left to do."""
        if storage_kind(self.storage_url) == "sqlite":
            lock_sqlite(self.storage_url)  # held again if an earlier run() of this runner let it go
        try:
            if (
                self.options.rank is None
            ):  # a local worker's parent has checked the same study already
                self.preflight()
            self.searching = True
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

    def reap_all(self) -> list[int]:
        """Mark the trials and final-run claims of dead processes (called when a worker dies)."""
        names = {
            s.study_name
            for s in optuna.get_all_study_summaries(self.storage, include_best_trial=False)
        }
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


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, NonFiniteLossError):
        return "nonfinite"
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    return "error"


def _suggest_float(trial: optuna.Trial, name: str, space: list[float] | float) -> float:
    if isinstance(space, list):
        lo, hi = space
        return lo if lo == hi else trial.suggest_float(name, lo, hi, log=True)
    return float(space)


def _describe_change(old: dict[str, Any], new: dict[str, Any], key: str) -> str:
    a, b = json.dumps(old.get(key), sort_keys=True), json.dumps(new.get(key), sort_keys=True)
    if len(a) + len(b) > 240:
        return f"{key} differs"
    return f"{key} was {a}, now {b}"


def _release_memory(device: torch.device) -> None:
    # A trial's tensors go with their last reference; collecting cycles matters only where the
    # caching allocator can then hand their memory back (a forced collection cost ~50 ms a trial).
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
