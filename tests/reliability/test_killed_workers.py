"""A worker killed mid-trial (SIGKILL) and a run pre-empted (SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from optuna.trial import TrialState
from procs import start, trials, user_attrs, wait_for, write

from harness.search import count_budget, default_storage, journal_storage
from harness.workers import LEASE

pytestmark = pytest.mark.slow


def _running(url: str):
    return next((t for t in trials(url) if t.state == TrialState.RUNNING and LEASE in t.system_attrs), None)


def test_sigkilled_worker_trial_is_marked_lost_retried_once_and_the_budget_finishes(tmp_path):
    write(tmp_path, trials=3, epochs=6, final_seeds=1)
    url = journal_storage(tmp_path / "results" / "par")
    log = tmp_path / "run.log"
    proc = start("--study", "par", "--workers", "2", "--no-report", cwd=tmp_path, log=log)
    try:
        victim = wait_for(lambda: _running(url), timeout=180, proc=proc, log=log)
        os.kill(victim.system_attrs[LEASE]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        lost = wait_for(lambda: next((t for t in trials(url) if t.number == victim.number and t.state.is_finished()), None), timeout=30, log=log)
        marked_after = time.monotonic() - killed_at
        assert lost.state == TrialState.FAIL, "the trial ended before the kill reached it; a slower machine needs more epochs"
        assert proc.wait(timeout=240) == 1, log.read_text()[-3000:]  # one of two workers failed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"killed trial marked failed after {marked_after:.1f} s")
    assert lost.user_attrs["fail_reason"] == "lost"
    assert marked_after < 15  # the parent notices its worker's death at once; generous bound
    first = trials(url)
    retries = [t for t in first if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1  # retried once, with the parameters it had drawn (none if killed before drawing)
    assert retries[0].params.items() >= lost.params.items()
    assert count_budget(first) == 3 and not [t for t in first if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    board = json.loads((tmp_path / "results" / "par" / "leaderboard.json").read_text())["rows"]

    # running the command again finishes whatever is missing, and changes nothing that is done
    proc = start("--study", "par", "--workers", "2", "--no-report", cwd=tmp_path, log=log)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    again = trials(url)
    assert [(t.number, t.state, t.value) for t in again] == [(t.number, t.state, t.value) for t in first]
    assert count_budget(again) == 3
    assert len([k for k in user_attrs(url) if k.startswith("final:")]) == 1  # one final seed, trained once
    rows = json.loads((tmp_path / "results" / "par" / "leaderboard.json").read_text())["rows"]
    assert board[0]["status"] == "final" and rows[0]["test_accuracy"] == board[0]["test_accuracy"]


def test_sigterm_marks_the_running_trial_and_exits_within_seconds(tmp_path):
    write(tmp_path, trials=2, epochs=20, final_seeds=1)
    url = default_storage(tmp_path / "results" / "par")
    log = tmp_path / "run.log"
    proc = start("--study", "par", "--no-report", cwd=tmp_path, log=log)
    try:
        victim = wait_for(lambda: _running(url), timeout=180, proc=proc, log=log)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"pre-empted run exited {took:.1f} s after SIGTERM")
    assert code == 130, log.read_text()[-3000:]
    assert took < 20
    after = trials(url)
    assert not [t for t in after if t.state == TrialState.RUNNING]
    stopped = next(t for t in after if t.number == victim.number)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
    assert [t.user_attrs.get("retry_of") for t in after if t.state == TrialState.WAITING] == [victim.number]
    assert count_budget(after) == 0
    assert "interrupted" in log.read_text() and "Traceback" not in log.read_text()
