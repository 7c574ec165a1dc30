"""The worker processes of ``harness run --workers N`` on one machine: their environment (CPU
threads, GPU), starting and stopping them, and pre-emption (SIGTERM stops like Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


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


def worker_command(argv: list[str], rank: int) -> list[str]:
    """The command line of worker ``rank``: ``harness run`` with ``argv``."""
    return [sys.executable, "-m", "harness.cli", "run", *argv, "--worker-rank", str(rank)]


def _kill_stragglers(
    procs: list[subprocess.Popen[bytes]],
    codes: dict[int, int],
    killed: set[int],
    grace: float,
    log: Callable[[str], None],
) -> None:
    """SIGKILL the workers still running ``grace`` seconds after SIGTERM (once each)."""
    for k, p in enumerate(procs):
        if k not in codes and k not in killed and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            killed.add(k)
            log(
                f"worker {k} (pid {p.pid}) had not stopped {grace:g} s after SIGTERM: killed it (SIGKILL); "
                "its trial is marked lost and queued again"
            )


def run_workers(
    argv: list[str],
    workers: int,
    device: str,
    on_exit: Callable[[int, int], None],
    log: Callable[[str], None],
    command: Callable[[list[str], int], list[str]] = worker_command,
) -> list[int]:
    """Start ``workers`` processes of ``harness run`` with ``argv``, wait for them, and call
    ``on_exit(rank, returncode)`` as each ends. Returns the codes.

    SIGTERM and SIGINT are forwarded to the workers as SIGTERM (each marks its running trial
    interrupted and exits); a worker still running ``HARNESS_STOP_GRACE_S`` seconds (30) later is
    killed, so its trial is reaped as lost. After a forwarded signal, raises ``Preempted`` once
    every worker has ended. ``command`` makes each worker's command line."""
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
            procs.append(subprocess.Popen(command(argv, k), env=worker_env(k, workers, device)))
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
                _kill_stragglers(procs, codes, killed, grace, log)
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stopping["signal"] is not None:
        raise Preempted(
            f"signal {signal.Signals(stopping['signal']).name}, forwarded to the workers"
        )
    return [codes[k] for k in range(len(procs))]
