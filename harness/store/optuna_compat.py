"""Every use of Optuna's private API, and only here: each with the public API that would replace it.

The rest of the harness calls the small functions below, so that an Optuna release that moves one
of these names breaks one module, and the tests of the journal and the leases say which.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend

# private: the journal's lock base class and its context manager (public: a lock protocol taken
# by JournalFileBackend(lock_obj=...), which Optuna documents but does not export)
from optuna.storages.journal._file import BaseJournalFileLock, get_lock_file

# private: the operation codes of journal lines (public: none; they would belong to the journal API)
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import FrozenTrial, TrialState


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes (public: a ``Study.storage`` property)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """A study's id in its storage (public: a ``Study.study_id`` property)."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """A trial's id in its storage (public: ``Trial.trial_id``/``FrozenTrial.trial_id``)."""
    return trial._trial_id


def journal_log_offsets(backend: JournalFileBackend) -> dict[int, int]:
    """Where each log a journal file backend has read begins in its file, by log number (public:
    none; an incremental reader's position would belong to the journal API)."""
    return backend._log_number_offset


def halving_settings(pruner: optuna.pruners.SuccessiveHalvingPruner) -> tuple[int, int, int]:
    """(min_resource, reduction_factor, bootstrap_count) of a successive-halving pruner (public:
    read-only properties of the pruner's constructor arguments)."""
    return pruner._min_resource, pruner._reduction_factor, pruner._bootstrap_count


def median_settings(pruner: optuna.pruners.MedianPruner) -> tuple[int, int]:
    """(n_startup_trials, n_warmup_steps) of a median pruner (public: read-only properties)."""
    return pruner._n_startup_trials, pruner._n_warmup_steps


# ------------------------------------------------------------------------------------- journal

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


class JournalFlock(BaseJournalFileLock):
    """An exclusive ``flock`` on ``<journal>.flock``: what every harness process appends under
    (subclasses Optuna's private lock base; public: a documented lock protocol).

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
    is the running trials' progress: they are then lost and run again, as after a kill. What the
    fsync and an append cost is measured in ``benchmarks/test_search_efficiency.py``.

    Optuna reads the file back after every append. When nothing else was appended between this
    process's last read and its append, that read takes the appended lines from memory instead of
    reopening and scanning the file; otherwise it reads the file.

    Overrides ``read_logs``/``append_logs`` and reads the private ``_log_number_offset``,
    ``_file_path`` and ``_lock`` (public: a backend hook for an append's durability, and an
    incremental read that knows its own appends)."""

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
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
            # appended: the descriptor is at the end of this write
            end = os.lseek(fd, 0, os.SEEK_CUR)
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


def journal_storage_at(path: str) -> optuna.storages.JournalStorage:
    """A journal storage on ``path``, appended under :class:`JournalFlock`."""
    return optuna.storages.JournalStorage(DurableJournalFile(path, JournalFlock(path)))
