"""Several processes on one search: trial leases, stale-trial reaping, claims, pre-emption, workers.

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
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from harness.store.schema import LEASE


def heartbeat_s() -> float:
    return float(os.environ.get("HARNESS_HEARTBEAT_S", "10"))


def grace_s() -> float:
    return float(os.environ.get("HARNESS_GRACE_S", "60"))


class Preempted(KeyboardInterrupt):
    """SIGTERM arrived: leave the running trial marked, then exit. A KeyboardInterrupt, so that
    everything that cleans up after Ctrl-C cleans up after a pre-emption too."""


def install_preemption_handler() -> None:
    """SIGTERM raises ``Preempted`` in the main thread, once; a second signal is not needed to stop."""
    if threading.current_thread() is not threading.main_thread():
        return
    state = {"raised": False}

    def handler(signum: int, frame: Any) -> None:
        if state["raised"]:
            return
        state["raised"] = True
        raise Preempted(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)
    if os.environ.get("HARNESS_WORKER_RANK") is not None:
        # a worker gets Ctrl-C from the terminal and SIGTERM from its parent: stop once
        signal.signal(signal.SIGINT, handler)


# ------------------------------------------------------------------------------------- leases


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


class _Heartbeats:
    """One thread per process that renews the heartbeat of every lease this process holds, rather
    than a thread started and joined for each trial (waiting for it to wake and end cost up to a
    millisecond a trial)."""

    def __init__(self) -> None:
        #: (storage id, trial id) -> (storage, trial id, monotonic time of its last beat)
        self._held: dict[tuple[int, int], tuple[optuna.storages.BaseStorage, int, float]] = {}
        self._lock = threading.Lock()  # held while beating: a lease is not let go mid-beat
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def beat(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
        try:
            storage.set_trial_system_attr(
                trial_id, LEASE, {"host": host_key(), "pid": os.getpid(), "beat": time.time()}
            )
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


#: trial id -> (its lease as last seen, this process's monotonic time when it was first seen so)
_SEEN: dict[int, tuple[Any, float]] = {}


def _signature(t: FrozenTrial) -> Any:
    info = t.system_attrs.get(LEASE)
    if isinstance(info, dict):
        return ("lease", info.get("host"), info.get("pid"), info.get("beat"))
    return ("no lease", t.datetime_start)  # asked, not yet leased (or begun by an older harness)


def is_stale(t: FrozenTrial, now: float | None = None, here: str | None = None) -> bool:
    """Whether a RUNNING trial's holder is gone.

    ``now`` is this process's ``time.monotonic()`` (a parameter for tests). A holder on this host
    whose process has ended is gone at once. Any other holder is gone when this process has seen
    the same lease (same heartbeat value) for more than ``grace_s`` seconds of its own clock: how old
    the heartbeat's timestamp looks to this machine's clock does not matter.
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
    seen = _SEEN.get(t._trial_id)
    if seen is None or seen[0] != sig:  # first look, or it beat since the last look
        _SEEN[t._trial_id] = (sig, now)
        return False
    return now - seen[1] > grace_s()


def _forget_old_looks(now: float) -> None:
    """Keep ``_SEEN`` small: a look older than three grace periods is of a trial no longer running
    (a running one would have been reaped by now); forgetting it at worst restarts its grace period."""
    limit = 3 * grace_s()
    for trial_id in [k for k, (_, first) in _SEEN.items() if now - first > limit]:
        del _SEEN[trial_id]


def reap(
    study: optuna.Study, retry: bool = True, log: Callable[[str], None] | None = None
) -> list[int]:
    """Fail every stale RUNNING trial of ``study`` (reason ``lost``) and queue each again, once.

    Safe with any number of processes reaping at the same time: the RUNNING -> FAIL step succeeds
    for one of them only, and only that one queues the retry. Optuna takes no attribute on a
    finished trial, so the reason is written just before the state; the trial is read again first
    so that one that finished or beat meanwhile is left alone. Should its holder finish it in the
    moment between the two writes, it stays finished with a stray ``lost`` reason, which nothing
    reads on a trial that did not fail (the budget, trials.csv).
    """
    storage = study._storage
    reaped = []
    _forget_old_looks(time.monotonic())
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t):
            continue
        now = storage.get_trial(t._trial_id)
        if now.state != TrialState.RUNNING or _signature(now) != _signature(t):
            continue  # finished, or its holder beat, since the look
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", "lost")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
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
    if "retry_of" in t.user_attrs:  # retried at most once
        return False
    study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
    return True


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
    template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"key": key})
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    study._storage.set_trial_system_attr(
        trial_id, LEASE, {"host": host_key(), "pid": os.getpid(), "beat": time.time()}
    )
    if _holder(study, key) != trial_id:
        with contextlib.suppress(UpdateFinishedTrialError):
            study._storage.set_trial_user_attr(trial_id, "fail_reason", "surplus")
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
        return None
    return trial_id


def _holder(study: optuna.Study, key: str) -> int | None:
    live = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
        if t.user_attrs.get("key") == key
    ]
    return min(live, key=lambda t: t.number)._trial_id if live else None


def claim_pending(study: optuna.Study, keys: list[str]) -> list[str]:
    """Keys that are neither done nor held: ``claim`` would try them."""
    held = {
        t.user_attrs.get("key")
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
    }
    return [k for k in keys if k not in held]


def release(study: optuna.Study, trial_id: int, done: bool, reason: str = "error") -> None:
    with contextlib.suppress(UpdateFinishedTrialError):
        if done:
            study._storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.0])
        else:
            study._storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)


# ------------------------------------------------------------------------------------- workers


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the system has one (taskset,
    cgroup cpusets, a batch scheduler's allocation), else every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        with contextlib.suppress(OSError):
            return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def thread_share(workers: int) -> int:
    """CPU threads for each of ``workers`` processes: the usable CPUs divided between them, at least one."""
    return max(1, usable_cpus() // max(1, workers))


def worker_env(rank: int, workers: int, device: str) -> dict[str, str]:
    """The environment of worker ``rank``: its share of the CPU threads and, with several GPUs, its GPU.

    Only ``auto`` and ``cuda`` get a GPU of their own (round robin over the visible ones, so with
    fewer GPUs than workers some share). A study that names a device (``cuda:1``) has pinned it:
    every worker uses that device, and ``CUDA_VISIBLE_DEVICES`` is left as it is, since narrowing it
    would renumber the devices and make ``cuda:1`` point at another GPU or at none.
    """
    env = {
        **os.environ,
        "HARNESS_WORKER_RANK": str(rank),
        "HARNESS_NUM_THREADS": str(thread_share(workers)),
    }
    env["OMP_NUM_THREADS"] = env["HARNESS_NUM_THREADS"]
    if device in ("auto", "cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count > 1:  # one GPU per worker; with fewer GPUs than workers, they share round robin
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = (
                [i.strip() for i in visible.split(",") if i.strip()]
                if visible
                else [str(i) for i in range(count)]
            )
            env["CUDA_VISIBLE_DEVICES"] = ids[rank % len(ids)]
    return env


def stop_grace_s() -> float:
    """How long a worker may take to stop after SIGTERM before it is killed."""
    return float(os.environ.get("HARNESS_STOP_GRACE_S", "30"))


def _worker_command(argv: list[str], rank: int) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "run", *argv, "--worker-rank", str(rank)]


def run_workers(
    argv: list[str],
    workers: int,
    device: str,
    on_exit: Callable[[int, int], None],
    log: Callable[[str], None],
) -> list[int]:
    """Start ``workers`` processes of ``harness run`` with ``argv``, wait for them, and call
    ``on_exit(rank, returncode)`` as each ends. Returns the codes.

    SIGTERM and SIGINT are forwarded to the workers as SIGTERM (each marks its running trial
    interrupted and exits); a worker still running ``HARNESS_STOP_GRACE_S`` seconds (30) later is
    killed, so its trial is reaped as lost. After a forwarded signal, raises ``Preempted`` once
    every worker has ended."""
    procs: list[subprocess.Popen[bytes]] = []
    stopping: dict[str, Any] = {"signal": None, "at": None}

    def forward(signum: int, frame: Any) -> None:
        stopping["signal"] = signum
        stopping["at"] = stopping["at"] or time.monotonic()
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)

    # handlers first: a signal while the workers start still reaches every one started
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    codes: dict[int, int] = {}
    killed: set[int] = set()
    grace = stop_grace_s()
    try:
        for k in range(workers):
            procs.append(
                subprocess.Popen(_worker_command(argv, k), env=worker_env(k, workers, device))
            )
            if stopping["signal"] is not None:
                procs[-1].send_signal(signal.SIGTERM)
        log(
            f"started {workers} worker processes ({thread_share(workers)} CPU thread(s) each): pids {', '.join(str(p.pid) for p in procs)}"
        )
        while len(codes) < len(procs):
            for k, p in enumerate(procs):
                if k not in codes and p.poll() is not None:
                    codes[k] = p.returncode
                    on_exit(k, p.returncode)
            if stopping["at"] is not None and time.monotonic() - stopping["at"] > grace:
                for k, p in enumerate(procs):
                    if k not in codes and k not in killed and p.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.kill()
                        killed.add(k)
                        log(
                            f"worker {k} (pid {p.pid}) had not stopped {grace:g} s after SIGTERM: killed it (SIGKILL); "
                            "its trial is marked lost and queued again"
                        )
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stopping["signal"] is not None:
        raise Preempted(
            f"signal {signal.Signals(stopping['signal']).name}, forwarded to the workers"
        )
    return [codes[k] for k in range(len(procs))]
