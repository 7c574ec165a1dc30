"""A worker killed mid-trial (SIGKILL) and a run pre-empted (SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import time

import pandas as pd
import pytest
from optuna.trial import TrialState
from procs import run, start, trials, user_attrs, wait_for, write

from harness.store.backends import journal_storage
from harness.store.schema import LEASE, count_budget

pytestmark = pytest.mark.slow


def _running(url: str):
    return next(
        (t for t in trials(url) if t.state == TrialState.RUNNING and LEASE in t.system_attrs), None
    )


def _training(url: str):
    """A running trial past its first epoch: killed there, its worker holds no storage lock (a
    worker killed while appending to the journal leaves a lock Optuna breaks only after 30 s)."""
    return next(
        (
            t
            for t in trials(url)
            if t.state == TrialState.RUNNING and LEASE in t.system_attrs and t.intermediate_values
        ),
        None,
    )


def test_sigkilled_worker_trial_is_marked_lost_retried_once_and_the_budget_finishes(tmp_path):
    write(tmp_path, trials=3, epochs=6, final_seeds=1)
    url = journal_storage(tmp_path / "results" / "par")
    log = tmp_path / "run.log"
    proc = start("--study", "par", "--workers", "2", "--no-report", cwd=tmp_path, log=log)
    try:
        victim = wait_for(lambda: _training(url), timeout=240, proc=proc, log=log)
        os.kill(victim.system_attrs[LEASE]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        lost = wait_for(
            lambda: next(
                (t for t in trials(url) if t.number == victim.number and t.state.is_finished()),
                None,
            ),
            timeout=30,
            log=log,
        )
        marked_after = time.monotonic() - killed_at
        assert lost.state == TrialState.FAIL, (
            "the trial ended before the kill reached it; a slower machine needs more epochs"
        )
        assert proc.wait(timeout=240) == 1, log.read_text()[-3000:]  # one of two workers failed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"killed trial marked failed after {marked_after:.1f} s")
    assert lost.user_attrs["fail_reason"] == "lost"
    assert marked_after < 15  # the parent notices its worker's death at once; generous bound
    first = trials(url)
    retries = [t for t in first if t.user_attrs.get("retry_of") == victim.number]
    assert (
        len(retries) == 1
    )  # retried once, with the parameters it had drawn (none if killed before drawing)
    assert retries[0].params.items() >= lost.params.items()
    assert count_budget(first) == 3 and not [
        t for t in first if t.state in (TrialState.RUNNING, TrialState.WAITING)
    ]
    board = json.loads((tmp_path / "results" / "par" / "leaderboard.json").read_text())["rows"]

    # running the command again finishes whatever is missing, and changes nothing that is done
    proc = start("--study", "par", "--workers", "2", "--no-report", cwd=tmp_path, log=log)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    again = trials(url)
    assert [(t.number, t.state, t.value) for t in again] == [
        (t.number, t.state, t.value) for t in first
    ]
    assert count_budget(again) == 3
    assert (
        len([k for k in user_attrs(url) if k.startswith("final:")]) == 1
    )  # one final seed, trained once
    rows = json.loads((tmp_path / "results" / "par" / "leaderboard.json").read_text())["rows"]
    assert board[0]["status"] == "final" and rows[0]["test_accuracy"] == board[0]["test_accuracy"]


def _sigterm(proc, timeout: float) -> tuple[int, float]:
    """Send SIGTERM to ``proc`` and wait for it: its exit status and the seconds it took."""
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - sent


def test_sigterm_marks_the_running_trial_and_exits_within_seconds(tmp_path):
    write(tmp_path, trials=2, epochs=20, final_seeds=1)
    url = journal_storage(tmp_path / "results" / "par")
    log = tmp_path / "run.log"
    proc = start("--study", "par", "--no-report", cwd=tmp_path, log=log)
    try:
        victim = wait_for(lambda: _running(url), timeout=180, proc=proc, log=log)
        code, took = _sigterm(proc, timeout=60)
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
    assert [t.user_attrs.get("retry_of") for t in after if t.state == TrialState.WAITING] == [
        victim.number
    ]
    assert count_budget(after) == 0
    assert "interrupted" in log.read_text() and "Traceback" not in log.read_text()


def test_rerunning_a_sigkilled_lone_run_reaps_its_trial_retries_it_once_and_finishes_the_budget(
    tmp_path,
):
    write(tmp_path, trials=2, epochs=4, final_seeds=1)
    url = journal_storage(tmp_path / "results" / "par")
    log = tmp_path / "run.log"
    proc = start("--study", "par", "--no-report", cwd=tmp_path, log=log)

    def one_done_next_running():
        now = trials(url)
        return any(t.state == TrialState.COMPLETE for t in now) and _running(url)

    started = time.monotonic()
    try:
        wait_for(one_done_next_running, timeout=300, proc=proc, log=log)
        print(f"killed {time.monotonic() - started:.0f} s after the start")
        proc.kill()  # SIGKILL: nothing is marked, the lease stays behind
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = trials(url)
    victims = [t for t in first if t.state == TrialState.RUNNING]
    assert len(victims) == 1, (
        "the trial ended before the kill reached it; a slower machine needs more epochs"
    )
    victim = victims[0]
    done = {t.number: t.value for t in first if t.state == TrialState.COMPLETE}
    assert done and count_budget(first) == len(done)

    # the same command again: the dead process's trial is reaped at once, retried once, the budget finished
    started = time.monotonic()
    again = run("--study", "par", "--no-report", cwd=tmp_path, timeout=600)
    print(f"the second run took {time.monotonic() - started:.0f} s")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"trial {victim.number} lost its worker; marked failed, queued again" in again.stderr
    after = trials(url)
    lost = after[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"] == "lost"
    retries = [t for t in after if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params.items() >= victim.params.items()
    assert {n: after[n].value for n in done} == done  # completed trials untouched
    assert count_budget(after) == 2 and not [
        t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)
    ]
    assert not [
        t for t in after if "retry_of" in t.user_attrs and t.user_attrs["retry_of"] != victim.number
    ]
    assert len([k for k in user_attrs(url) if k.startswith("final:")]) == 1
    out = tmp_path / "results" / "par"
    table = pd.read_csv(out / "trials.csv")
    assert int(table["counted"].sum()) == 2
    row = table[table["trial"] == victim.number].iloc[0]
    assert row["state"] == "FAIL" and row["fail_reason"] == "lost" and not row["counted"]
    assert json.loads((out / "leaderboard.json").read_text())["rows"][0]["status"] == "final"


def test_sigterm_to_the_parent_of_several_workers_stops_them_all_and_marks_their_trials(tmp_path):
    write(tmp_path, trials=4, epochs=40, final_seeds=1)
    url = journal_storage(tmp_path / "results" / "par")
    log = tmp_path / "run.log"
    proc = start("--study", "par", "--workers", "2", "--no-report", cwd=tmp_path, log=log)

    def both_running():
        running = [
            t for t in trials(url) if t.state == TrialState.RUNNING and LEASE in t.system_attrs
        ]
        return running if len({t.system_attrs[LEASE]["pid"] for t in running}) == 2 else None

    try:
        victims = wait_for(both_running, timeout=300, proc=proc, log=log)
        pids = {t.system_attrs[LEASE]["pid"] for t in victims}
        code, took = _sigterm(proc, timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"two workers stopped {took:.1f} s after SIGTERM to their parent")
    text = log.read_text(errors="replace")
    assert code == 130, text[-3000:]
    assert took < 30  # the default HARNESS_STOP_GRACE_S; each worker stops on its own well before
    for pid in pids:  # no worker outlives its parent
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    after = trials(url)
    assert not [t for t in after if t.state == TrialState.RUNNING]
    for victim in victims:
        stopped = after[victim.number]
        assert (
            stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted"
        )
    queued = sorted(t.user_attrs.get("retry_of") for t in after if t.state == TrialState.WAITING)
    assert queued == sorted(t.number for t in victims)
    assert count_budget(after) == len([t for t in after if t.state == TrialState.COMPLETE])
    assert "interrupted" in text and "Traceback" not in text and "SIGKILL" not in text
