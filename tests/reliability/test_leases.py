"""Leases, reaping, claims and the budget as the study's total: the rules, without training."""

from __future__ import annotations

import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from harness.store.backends import journal_storage, make_storage
from harness.store.leases import Looks, claim, host_key, lease, reap, release
from harness.store.optuna_compat import storage_of, study_id, trial_id
from harness.store.schema import LEASE, budget_trials, count_budget, has_room, is_surplus


@pytest.fixture
def url(tmp_path):
    return journal_storage(tmp_path)


def _study(url: str, name: str = "s") -> optuna.Study:
    return optuna.create_study(
        storage=make_storage(url), study_name=name, direction="maximize", load_if_exists=True
    )


def _running(study: optuna.Study, lease_info: dict | None, x: float = 0.5) -> int:
    trial = study.ask({"x": FloatDistribution(0, 1)})
    if lease_info is not None:
        storage_of(study).set_trial_system_attr(trial_id(trial), LEASE, lease_info)
    return trial.number


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_trial_of_a_dead_local_process_is_reaped_at_once_and_queued_again_once(url):
    study = _study(url)
    n = _running(study, {"host": host_key(), "pid": _dead_pid(), "beat": time.time()})
    assert reap(study) == [n]
    lost = study.get_trials()[n]
    assert lost.state == TrialState.FAIL and lost.user_attrs["fail_reason"] == "lost"
    queued = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].user_attrs["retry_of"] == n
    # the retry dies too: failed again, but not queued a third time
    retry = study.ask()
    assert retry.number == queued[0].number and retry.suggest_float("x", 0, 1) == lost.params["x"]
    storage_of(study).set_trial_system_attr(
        trial_id(retry), LEASE, {"host": host_key(), "pid": _dead_pid(), "beat": time.time()}
    )
    assert reap(study) == [retry.number]
    assert not [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert count_budget(study) == 0  # lost trials do not use up the budget


class AllStale(Looks):
    """A reaper that judges every running trial's holder gone."""

    def is_stale(self, t, now=None, here=None):
        return True


def test_a_remote_trial_is_reaped_only_after_its_heartbeat_stood_still_for_the_grace_period(
    url, monkeypatch
):
    monkeypatch.setenv("HARNESS_GRACE_S", "30")
    study = _study(url)
    n = _running(study, {"host": "other-machine", "pid": 1, "beat": 1000.0})
    t0 = time.monotonic()
    t = study.get_trials()[n]
    is_stale = Looks().is_stale  # a process that has looked at no trial yet
    assert not is_stale(t, now=t0)  # the first look starts the clock, whatever the beat says
    assert not is_stale(t, now=t0 + 29)
    assert is_stale(t, now=t0 + 31)
    # it beats: the grace period starts again from this look
    storage_of(study).set_trial_system_attr(
        trial_id(t), LEASE, {"host": "other-machine", "pid": 1, "beat": 1010.0}
    )
    t = study.get_trials()[n]
    assert (
        not is_stale(t, now=t0 + 40) and not is_stale(t, now=t0 + 69) and is_stale(t, now=t0 + 71)
    )


@pytest.mark.parametrize("skew_s", [-10 * 365 * 86400, -3600, 3600, 10 * 365 * 86400])
def test_clock_skew_between_machines_neither_reaps_a_live_trial_nor_keeps_a_dead_one(
    url, monkeypatch, skew_s
):
    """The other machine's clock is years or an hour behind or ahead of this one's."""
    monkeypatch.setenv("HARNESS_GRACE_S", "0.6")
    study = _study(url)
    n = _running(study, {"host": "other-machine", "pid": 1, "beat": time.time() + skew_s})
    looks = Looks()  # a process that has looked at no trial yet
    alive_until = time.monotonic() + 1.5
    while time.monotonic() < alive_until:  # the holder beats every 0.2 s on its own clock
        assert reap(study, looks=looks) == []
        beat = study.get_trials()[n].system_attrs[LEASE]["beat"]
        storage_of(study).set_trial_system_attr(
            trial_id(study.get_trials()[n]),
            LEASE,
            {"host": "other-machine", "pid": 1, "beat": beat + 0.2},
        )
        time.sleep(0.2)
    assert study.get_trials()[n].state == TrialState.RUNNING
    # the holder dies: reaped once its last beat has stood still for the grace period, not before
    died = time.monotonic()
    assert reap(study, looks=looks) == []
    while not reap(study, looks=looks):
        assert time.monotonic() - died < 5, "a dead remote trial was never reaped"
        time.sleep(0.05)
    waited = time.monotonic() - died
    assert 0.6 <= waited < 2
    assert study.get_trials()[n].user_attrs["fail_reason"] == "lost"


def test_a_live_lease_renews_its_heartbeat_and_is_never_reaped(url, monkeypatch):
    monkeypatch.setenv("HARNESS_HEARTBEAT_S", "0.1")
    study = _study(url)
    trial = study.ask()
    with lease(storage_of(study), trial_id(trial)):
        first = storage_of(study).get_trial(trial_id(trial)).system_attrs[LEASE]["beat"]
        time.sleep(0.5)
        assert reap(study) == []
        assert storage_of(study).get_trial(trial_id(trial)).system_attrs[LEASE]["beat"] > first


def test_two_processes_reaping_at_once_queue_one_retry(url):
    a, b = _study(url), _study(url)  # two storage handles on one journal file, as two workers have
    _running(a, {"host": host_key(), "pid": _dead_pid(), "beat": time.time()})
    stale = a.get_trials(states=(TrialState.RUNNING,))
    assert len(stale) == 1
    assert len(reap(a)) + len(reap(b)) == 1
    assert len([t for t in b.get_trials() if t.state == TrialState.WAITING]) == 1


def test_a_unit_of_work_is_claimed_by_one_process(url, monkeypatch):
    claims = _study(url, "claims")
    first = claim(claims, "final:3:10000")
    assert first is not None
    assert claim(claims, "final:3:10000") is None  # held by a live process (this one)
    other = claim(claims, "final:3:10001")
    assert other is not None and other != first
    release(claims, first, done=False)
    retry = claim(claims, "final:3:10000")  # a failed claim may be taken again
    assert retry is not None
    release(claims, retry, done=True)
    assert claim(claims, "final:3:10000") is None  # done
    # another process claims the same key between this one's look and its claim: the lower number wins
    # (this process's reap and first look see the storage as it was before the other's claim)
    before = claims.get_trials(deepcopy=True)
    template = create_trial(state=TrialState.RUNNING, user_attrs={"key": "final:3:10002"})
    storage_of(claims).create_new_trial(study_id(claims), template_trial=template)
    stale_reads = iter([before, before])
    read = claims.get_trials

    def get_trials(deepcopy=True, states=None):
        snapshot = next(stale_reads, None)
        if snapshot is None:
            return read(deepcopy=deepcopy, states=states)
        return [t for t in snapshot if states is None or t.state in states]

    monkeypatch.setattr(claims, "get_trials", get_trials)
    assert claim(claims, "final:3:10002") is None
    monkeypatch.undo()
    surplus = [t for t in claims.get_trials() if t.user_attrs.get("fail_reason") == "surplus"]
    assert [t.user_attrs["key"] for t in surplus] == ["final:3:10002"]


def _finished(
    state: TrialState, value: float | None = None, reason: str | None = None
) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=state, value=value, user_attrs={"fail_reason": reason} if reason else {}
    )


def test_the_budget_is_the_study_total_and_places_go_by_trial_number():
    study = optuna.create_study(direction="maximize")
    for t in (
        _finished(TrialState.COMPLETE, 0.2),
        _finished(TrialState.FAIL, reason="lost"),
        _finished(TrialState.FAIL, reason="nonfinite"),
        _finished(TrialState.PRUNED),
        _finished(TrialState.COMPLETE, 0.9),  # a fourth counted trial, past a budget of 3
    ):
        study.add_trial(t)
    trials = study.get_trials()
    assert count_budget(study) == 4
    assert [t.number for t in budget_trials(trials, 3)] == [
        0,
        2,
        3,
    ]  # the 0.9 overshoot is left out
    assert not has_room(study, 3) and not has_room(study, 4) and has_room(study, 5)
    assert is_surplus(study, 5, 4) and not is_surplus(study, 5, 5)
    study.enqueue_trial({})
    assert has_room(study, 3)  # a queued trial is popped, then found surplus


def test_a_trial_that_finishes_while_it_is_reaped_keeps_its_result_and_no_lost_label(
    url, monkeypatch
):
    from harness.publish.rank import trial_row

    # its holder beat, or finished it, after the reaper's look and before its writes: left alone
    study, holder = _study(url), _study(url)
    snapshot_of = study.get_trials
    n = _running(study, {"host": "other-machine", "pid": 1, "beat": 0.0})
    k = _running(study, {"host": "other-machine", "pid": 1, "beat": 0.0})
    before = snapshot_of(deepcopy=True, states=(TrialState.RUNNING,))
    holder.tell(n, 0.7)
    storage_of(holder).set_trial_system_attr(
        trial_id(before[1]), LEASE, {"host": "other-machine", "pid": 1, "beat": 5.0}
    )
    monkeypatch.setattr(
        study, "get_trials", lambda **kw: before if kw.get("states") else snapshot_of(**kw)
    )
    assert reap(study, looks=AllStale()) == []
    done = snapshot_of()[n]
    assert done.state == TrialState.COMPLETE and "fail_reason" not in done.user_attrs
    assert snapshot_of()[k].state == TrialState.RUNNING
    holder.tell(k, 0.1)
    # finished between the reaper's two writes: it stays complete and is listed without a reason
    monkeypatch.undo()
    m = _running(study, {"host": "other-machine", "pid": 1, "beat": 0.0})
    storage = storage_of(study)
    write_attr = storage.set_trial_user_attr

    def label_then_holder_finishes(trial_id, key, value):
        write_attr(trial_id, key, value)
        holder.tell(m, 0.8)

    monkeypatch.setattr(storage, "set_trial_user_attr", label_then_holder_finishes)
    assert reap(study, looks=AllStale()) == []
    done = study.get_trials()[m]
    assert done.state == TrialState.COMPLETE and done.value == 0.8
    assert not [t for t in study.get_trials() if t.state == TrialState.WAITING]  # not queued again
    row = trial_row("a->b", "m", done)
    assert row["fail_reason"] == "" and row["counted"]
