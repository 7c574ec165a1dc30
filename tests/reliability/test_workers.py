"""The worker processes' parent: CPU threads and GPUs per worker, and stopping them on SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import torch

from harness.search.workers import Preempted, run_workers, thread_share, worker_env


def test_thread_share_divides_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(
        os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False
    )
    assert [thread_share(n) for n in (1, 2, 3, 8, 20)] == [
        8,
        4,
        2,
        1,
        1,
    ]  # the 8 allowed, not the 64
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert thread_share(4) == 16  # no affinity call on this system: every CPU of the machine
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert thread_share(4) == 1


def test_the_real_affinity_mask_is_respected():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this system")
    assert thread_share(1) == len(os.sched_getaffinity(0))


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_worker_env_sets_the_rank_and_the_thread_share(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _gpus(monkeypatch, 0)
    env = worker_env(2, 3, "auto")
    assert env["HARNESS_WORKER_RANK"] == "2"
    assert env["HARNESS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "4"
    assert "CUDA_VISIBLE_DEVICES" not in env  # no GPU: nothing to hand out


def test_worker_env_gives_each_worker_a_gpu_round_robin(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _gpus(monkeypatch, 2)
    assert [worker_env(k, 5, "auto")["CUDA_VISIBLE_DEVICES"] for k in range(5)] == [
        "0",
        "1",
        "0",
        "1",
        "0",
    ]
    assert [worker_env(k, 2, "cuda")["CUDA_VISIBLE_DEVICES"] for k in range(2)] == ["0", "1"]
    # the GPUs this process was given, by their ids, not 0..n-1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert [worker_env(k, 3, "auto")["CUDA_VISIBLE_DEVICES"] for k in range(3)] == ["3", "5", "3"]


def test_a_pinned_or_single_device_is_left_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    _gpus(monkeypatch, 2)
    for device in ("cuda:1", "cpu"):  # cuda:1 is the study's choice: every worker uses it
        assert {worker_env(k, 2, device)["CUDA_VISIBLE_DEVICES"] for k in range(2)} == {"3,5"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    _gpus(monkeypatch, 1)
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(1, 2, "auto")  # one GPU: shared by all


# a worker that stops at SIGTERM (status 130, as `harness run` does), or one that ignores it
_FAKE_WORKER = """
import os, signal, sys, time
stubborn = os.environ["HARNESS_WORKER_RANK"] == "1"
signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else (lambda *a: sys.exit(130)))
open(sys.argv[1] + os.environ["HARNESS_WORKER_RANK"], "w").close()
time.sleep(120)
"""


def test_sigterm_is_forwarded_and_a_worker_that_does_not_stop_is_killed(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_STOP_GRACE_S", "1")
    ready = str(tmp_path / "ready")
    logged: list[str] = []
    exits: list[tuple[int, int]] = []
    sent: dict[str, float] = {}

    def preempt() -> None:
        end = time.monotonic() + 60
        while not all(os.path.exists(ready + str(k)) for k in range(2)) and time.monotonic() < end:
            time.sleep(0.05)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)  # handled by run_workers' handler, in the main thread

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=preempt, daemon=True).start()
    with pytest.raises(Preempted, match="SIGTERM"):
        run_workers(
            [], 2, "cpu", lambda rank, code: exits.append((rank, code)), logged.append,
            command=lambda argv, rank: [sys.executable, "-c", _FAKE_WORKER, ready],
        )  # fmt: skip
    took = time.monotonic() - sent["at"]
    assert sorted(exits) == [(0, 130), (1, -signal.SIGKILL)]
    assert 1 <= took < 10
    killed = [m for m in logged if "SIGKILL" in m]
    assert len(killed) == 1 and killed[0].startswith("worker 1 ") and "marked lost" in killed[0]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
