"""Several processes on one study: trial leases, stale-trial reaping, requeueing, and claims.

A trial is leased to the process that runs it: the lease (a system attribute of the trial) names
the host and process and carries a heartbeat that a thread renews every ``heartbeat_s`` seconds.
Any process may reap a RUNNING trial whose holder is gone: at once when the holder was a process on
this host that no longer exists; otherwise once this process has seen the same heartbeat unchanged
for ``grace_s`` seconds of its own monotonic clock. The heartbeat's timestamp is never compared with
this machine's clock, so machines whose clocks disagree (by seconds or by years) do not reap each
other's live trials, nor keep a dead one forever: a trial whose holder died is reaped between
``grace_s`` and ``grace_s`` plus one look later (the search looks before each trial and every few
seconds while it waits), counted from the first time this process looked at it. A reaped trial fails
with reason ``lost`` and is queued once more with the same parameters. Optuna's own heartbeat exists
only for RDBStorage; the lease works the same way on the journal file and on a database server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness.store.optuna_compat import storage_of, study_id, trial_id
from harness.store.schema import CLAIM_KEY, FAIL_REASON, LEASE, RETRY_OF, SEEDED_FROM


def heartbeat_s() -> float:
    return float(os.environ.get("HARNESS_HEARTBEAT_S", "10"))


def grace_s() -> float:
    return float(os.environ.get("HARNESS_GRACE_S", "60"))


def host_key() -> str:
    """This host and process namespace: pids are comparable only between processes with the same key."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, ns = "", 0
    return f"{socket.gethostname()}:{boot}:{ns}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet waited for) exists but runs nothing
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _lease_record() -> dict[str, Any]:
    return {"host": host_key(), "pid": os.getpid(), "beat": time.time()}


class _Heartbeats:
    """One thread per process that renews the heartbeat of every lease this process holds, rather
    than a thread started and joined for each trial."""

    def __init__(self) -> None:
        #: (storage id, trial id) -> (storage, trial id, monotonic time of its last beat)
        self._held: dict[tuple[int, int], tuple[optuna.storages.BaseStorage, int, float]] = {}
        self._lock = threading.Lock()  # held while beating: a lease is not let go mid-beat
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def beat(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
        try:
            storage.set_trial_system_attr(trial_id, LEASE, _lease_record())
            return True
        except UpdateFinishedTrialError:  # reaped meanwhile: nothing left to renew
            return False

    def hold(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        self.beat(storage, trial_id)
        with self._lock:
            self._held[(id(storage), trial_id)] = (storage, trial_id, time.monotonic())
            if self._thread is None or not self._thread.is_alive():  # the first, or a forked child
                self._thread = threading.Thread(
                    target=self._run, name="harness-leases", daemon=True
                )
                self._thread.start()
        self._wake.set()  # the period may have changed (HARNESS_HEARTBEAT_S)

    def let_go(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        with self._lock:
            self._held.pop((id(storage), trial_id), None)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            period = heartbeat_s()
            with self._lock:
                for key, (storage, trial_id, last) in list(self._held.items()):
                    if time.monotonic() - last < period:
                        continue
                    try:
                        if self.beat(storage, trial_id):
                            self._held[key] = (storage, trial_id, time.monotonic())
                        else:
                            del self._held[key]
                    except Exception:  # noqa: BLE001 - a storage hiccup; the next beat tries again
                        self._held[key] = (storage, trial_id, time.monotonic())
                due = min(
                    (last + period for _, _, last in self._held.values()),
                    default=time.monotonic() + period,
                )
            self._wake.wait(max(0.01, due - time.monotonic()))


_HEARTBEATS = _Heartbeats()


@contextlib.contextmanager
def lease(storage: optuna.storages.BaseStorage, trial_id: int) -> Iterator[None]:
    """Hold the lease of a RUNNING trial while the block runs, renewing its heartbeat."""
    _HEARTBEATS.hold(storage, trial_id)
    try:
        yield
    finally:
        _HEARTBEATS.let_go(storage, trial_id)


@contextlib.contextmanager
def trial_lease(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """:func:`lease` for a trial of ``study``."""
    with lease(storage_of(study), trial_id(trial)):
        yield


def _signature(t: FrozenTrial) -> Any:
    info = t.system_attrs.get(LEASE)
    if isinstance(info, dict):
        return ("lease", info.get("host"), info.get("pid"), info.get("beat"))
    return ("no lease", t.datetime_start)  # asked, not yet leased (or begun by an older harness)


class Looks:
    """What this process has seen of the leases of RUNNING trials, and when: whether a holder is
    gone is judged from how long this process has seen the same heartbeat. One per process
    (:data:`LOOKS`); a test, or a tool that judges by other rules, passes its own to :func:`reap`."""

    def __init__(self) -> None:
        #: trial id -> (its lease as last seen, this process's monotonic time when first seen so)
        self.seen: dict[int, tuple[Any, float]] = {}

    def is_stale(self, t: FrozenTrial, now: float | None = None, here: str | None = None) -> bool:
        """Whether a RUNNING trial's holder is gone.

        ``now`` is this process's ``time.monotonic()`` (a parameter for tests). A holder on this
        host whose process has ended is gone at once. Any other holder is gone when this process
        has seen the same lease (same heartbeat value) for more than ``grace_s`` seconds of its own
        clock: how old the heartbeat's timestamp looks to this machine's clock does not matter.
        """
        now = time.monotonic() if now is None else now
        info = t.system_attrs.get(LEASE)
        if isinstance(info, dict) and info.get("host") == (here or host_key()):
            pid = int(info.get("pid", 0))
            if pid == os.getpid():
                return False
            if not _alive(pid):
                return True
        sig = _signature(t)
        key = trial_id(t)
        seen = self.seen.get(key)
        if seen is None or seen[0] != sig:  # first look, or it beat since the last look
            self.seen[key] = (sig, now)
            return False
        return now - seen[1] > grace_s()

    def forget_old(self, now: float) -> None:
        """Keep the looks few: one older than three grace periods is of a trial no longer running
        (a running one would have been reaped by now); forgetting it at worst restarts its grace period."""
        limit = 3 * grace_s()
        for key in [k for k, (_, first) in self.seen.items() if now - first > limit]:
            del self.seen[key]


#: this process's looks
LOOKS = Looks()


def is_stale(t: FrozenTrial, now: float | None = None, here: str | None = None) -> bool:
    """:meth:`Looks.is_stale` with this process's looks."""
    return LOOKS.is_stale(t, now, here)


def reap(
    study: optuna.Study,
    retry: bool = True,
    log: Callable[[str], None] | None = None,
    looks: Looks | None = None,
) -> list[int]:
    """Fail every stale RUNNING trial of ``study`` (reason ``lost``) and queue each again, once.

    Safe with any number of processes reaping at the same time: the RUNNING -> FAIL step succeeds
    for one of them only, and only that one queues the retry. Optuna takes no attribute on a
    finished trial, so the reason is written just before the state; the trial is read again first
    so that one that finished or beat meanwhile is left alone. Should its holder finish it in the
    moment between the two writes, it stays finished with a stray ``lost`` reason, which nothing
    reads on a trial that did not fail (the budget, trials.csv).
    """
    looks = looks or LOOKS
    storage = storage_of(study)
    reaped = []
    looks.forget_old(time.monotonic())
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not looks.is_stale(t):
            continue
        now = storage.get_trial(trial_id(t))
        if now.state != TrialState.RUNNING or _signature(now) != _signature(t):
            continue  # finished, or its holder beat, since the look
        try:
            storage.set_trial_user_attr(trial_id(t), FAIL_REASON, "lost")
            storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # finished or reaped by someone else meanwhile
        reaped.append(t.number)
        queued = retry and requeue(study, t)
        if log:
            log(
                f"{study.study_name}: trial {t.number} lost its worker; marked failed"
                + (", queued again" if queued else "")
            )
    return reaped


def requeue(study: optuna.Study, t: FrozenTrial) -> bool:
    """Queue a trial that did not finish on its own once more, with the same parameters."""
    if RETRY_OF in t.user_attrs:  # retried at most once
        return False
    seeded = {SEEDED_FROM: t.user_attrs[SEEDED_FROM]} if SEEDED_FROM in t.user_attrs else {}
    study.enqueue_trial(dict(t.params), user_attrs={RETRY_OF: t.number, **seeded})
    return True


def finished_elsewhere(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether ``trial``, still running here, was finished by another process (reaped)."""
    return storage_of(study).get_trial(trial_id(trial)).state.is_finished()


def fail_surplus(study: optuna.Study, trial: optuna.Trial) -> None:
    """Fail a trial asked for past the budget (reason ``surplus``): it takes no place."""
    storage_of(study).set_trial_user_attr(trial_id(trial), FAIL_REASON, "surplus")
    study.tell(trial, state=TrialState.FAIL)


# ------------------------------------------------------------------------------------- claims


def claim(study: optuna.Study, key: str) -> int | None:
    """Claim the unit of work ``key`` (a final run) in ``study``, a study that holds claims only.

    A claim is a trial created RUNNING with the key in one storage operation; of several claims of
    one key, the one with the lowest number wins, the others fail as ``surplus``. Returns the
    claim's trial id, or None when the key is done or another live process holds it.
    """
    reap(study, retry=False)
    if _holder(study, key) is not None:
        return None
    storage = storage_of(study)
    template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={CLAIM_KEY: key})
    claim_id = storage.create_new_trial(study_id(study), template_trial=template)
    storage.set_trial_system_attr(claim_id, LEASE, _lease_record())
    if _holder(study, key) != claim_id:
        with contextlib.suppress(UpdateFinishedTrialError):
            storage.set_trial_user_attr(claim_id, FAIL_REASON, "surplus")
            storage.set_trial_state_values(claim_id, TrialState.FAIL)
        return None
    return claim_id


def _holder(study: optuna.Study, key: str) -> int | None:
    live = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
        if t.user_attrs.get(CLAIM_KEY) == key
    ]
    return trial_id(min(live, key=lambda t: t.number)) if live else None


def claimed_keys(study: optuna.Study) -> set[str]:
    """Keys of the claims other processes (or this one) are running now."""
    return {
        t.user_attrs.get(CLAIM_KEY)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    }


def release(study: optuna.Study, claim_id: int, done: bool, reason: str = "error") -> None:
    """End a claim: complete when its work is done, else failed with ``reason`` (claimable again)."""
    storage = storage_of(study)
    with contextlib.suppress(UpdateFinishedTrialError):
        if done:
            storage.set_trial_state_values(claim_id, TrialState.COMPLETE, [0.0])
        else:
            storage.set_trial_user_attr(claim_id, FAIL_REASON, reason)
            storage.set_trial_state_values(claim_id, TrialState.FAIL)
