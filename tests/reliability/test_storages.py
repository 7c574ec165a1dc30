"""Which storage takes how many workers, and several workers on a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState
from procs import STUDY_NAME, run, start, trials, user_attrs, wait_for, write

from harness.store.backends import default_storage, embedded_storage, journal_storage
from harness.store.schema import count_budget


def test_sqlite_is_refused_for_several_workers_with_one_line(tmp_path):
    write(tmp_path)
    result = run(
        "--study",
        "par",
        "--workers",
        "2",
        "--storage",
        f"sqlite:///{tmp_path / 'x.db'}",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert (
        lines[0].startswith("error: ")
        and "advises against SQLite" in lines[0]
        and "--workers 2" in lines[0]
    )
    assert lines[1].startswith("hint: ") and "postgresql://" in lines[1] and len(lines) == 2
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "results").exists()


def test_the_embedded_storage_is_a_journal_and_a_study_begun_in_sqlite_stays_there(tmp_path):
    assert (
        embedded_storage(tmp_path, 1) == embedded_storage(tmp_path, 4) == journal_storage(tmp_path)
    )
    (tmp_path / "optuna.db").write_bytes(
        b""
    )  # a study begun in SQLite stays there, for one worker only
    assert embedded_storage(tmp_path, 1) == default_storage(tmp_path)
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="advises against SQLite"):
        embedded_storage(tmp_path, 2)
    (tmp_path / "optuna.journal").write_bytes(b"")
    assert (
        embedded_storage(tmp_path, 1) == embedded_storage(tmp_path, 3) == journal_storage(tmp_path)
    )


# ------------------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL server URL: HARNESS_TEST_POSTGRES_URL, or a throwaway server on loopback."""
    given = os.environ.get("HARNESS_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    missing = "PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql or set HARNESS_TEST_POSTGRES_URL"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing = "the psycopg driver is not installed (pip install -e '.[postgres]')"
        initdb = None
    if not (initdb and pg_ctl):
        if os.environ.get("HARNESS_REQUIRE_POSTGRES") == "1":
            pytest.fail(missing + " (HARNESS_REQUIRE_POSTGRES=1)")
        pytest.skip(missing)
    base = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = (
        f"-k {base} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off -c max_connections=50"
    )
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the server for one test."""
    import psycopg

    name = f"harness_{uuid.uuid4().hex[:12]}"
    conn = psycopg.connect(postgres_server, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    # the driver named explicitly: SQLAlchemy 2.0 would pick psycopg2 for a bare postgresql://
    yield (
        postgres_server.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        + "/"
        + name
    )
    with contextlib.suppress(Exception), conn.cursor() as cur:
        cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    conn.close()


@pytest.mark.slow
def test_several_workers_on_postgresql_run_every_trial_once(tmp_path, postgres_url):
    write(tmp_path, trials=5, epochs=1, final_seeds=2)
    result = run(
        "--study",
        "par",
        "--workers",
        "3",
        "--storage",
        postgres_url,
        "--no-report",
        cwd=tmp_path,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    done = trials(postgres_url)
    assert count_budget(done) == 5 and Counter(t.state for t in done)[TrialState.COMPLETE] == 5
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    numbers = [t.number for t in done]
    assert len(numbers) == len(set(numbers))
    params = [tuple(sorted(t.params.items())) for t in done if t.state == TrialState.COMPLETE]
    assert len(set(params)) == 5  # no two workers drew the same suggestions
    finals = sorted(k for k in user_attrs(postgres_url) if k.startswith("final:"))
    assert len(finals) == 2
    claims = trials(postgres_url, STUDY_NAME + " | final runs")
    assert Counter(
        t.user_attrs["key"] for t in claims if t.state == TrialState.COMPLETE
    ) == Counter(finals)
    assert result.stderr.count("final seed") == 2  # each final run trained once
    board = (tmp_path / "results" / "par" / "leaderboard.md").read_text()
    assert "5/0/0" in board


def test_a_second_process_on_one_sqlite_file_is_refused(tmp_path):
    write(tmp_path)
    db = tmp_path / "results" / "par" / "optuna.db"  # a study begun in SQLite
    db.parent.mkdir(parents=True)
    db.write_bytes(b"")
    import fcntl

    with open(str(db) + ".lock", "w") as held:  # as a running `harness run` holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run("--study", "par", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "another process is running a search" in result.stderr and "--workers N" in result.stderr


@pytest.mark.slow
def test_two_independent_processes_on_one_journal_run_every_trial_once(tmp_path):
    """The several-machines mode on one machine: two separate `harness run` commands, one --storage."""
    write(tmp_path, trials=4, epochs=1, final_seeds=2)
    journal = tmp_path / "shared" / "study.journal"
    journal.parent.mkdir()
    url = f"journal:///{journal}"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [start("--study", "par", "--storage", url, "--no-report", cwd=tmp_path, log=logs[0])]
    try:
        wait_for(
            lambda: journal.is_file(), timeout=300, proc=procs[0], log=logs[0]
        )  # as the README advises
        procs.append(
            start("--study", "par", "--storage", url, "--no-report", cwd=tmp_path, log=logs[1])
        )
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in texts)
    done = trials(url)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(complete) == count_budget(done) == 4
    assert not [t for t in done if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # nothing lost or retried; a trial asked past the budget in a race is marked surplus, never trained
    assert {t.user_attrs.get("fail_reason") for t in done if t.state == TrialState.FAIL} <= {
        "surplus"
    }
    assert not [t for t in done if "retry_of" in t.user_attrs]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    finals = sorted(k for k in user_attrs(url) if k.startswith("final:"))
    assert len(finals) == 2
    claims = trials(url, STUDY_NAME + " | final runs")
    assert Counter(
        t.user_attrs["key"] for t in claims if t.state == TrialState.COMPLETE
    ) == Counter(finals)
    assert (
        sum(t.count("final seed") for t in texts) == 2
    )  # each final run trained once, by one of them
    pids = Counter(t.system_attrs["harness:lease"]["pid"] for t in complete)
    print(f"trials per process: {dict(pids)}")
    assert set(pids) <= {p.pid for p in procs}


def test_the_journal_fsyncs_what_finishes_something_and_every_process_sees_every_append(
    tmp_path, monkeypatch
):
    """A running trial's appends (its creation, parameters, reports, attributes) are written but
    not fsync'd one by one; its end state is, and that fsync flushes the rest. Another reader of
    the file sees every append at once, synced or not."""
    import optuna

    import harness.store.backends

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    url = journal_storage(tmp_path)
    study = optuna.create_study(
        storage=harness.store.backends.make_storage(url), study_name="s", direction="maximize"
    )
    other = optuna.load_study(
        storage=harness.store.backends.make_storage(url), study_name="s"
    )  # another process's view
    synced.clear()
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.report(0.5, 0)
    trial.set_user_attr("scores", {"a": 1})
    assert not synced
    seen = other.get_trials(deepcopy=False)[0]
    assert (
        seen.intermediate_values == {0: 0.5}
        and seen.user_attrs["scores"] == {"a": 1}
        and "x" in seen.params
    )
    study.tell(trial, 0.7)
    assert len(synced) == 1 and other.get_trials(deepcopy=False)[0].state == TrialState.COMPLETE
    study.set_user_attr("final:0", {"test": 1.0})  # a study's attributes: its final runs
    assert len(synced) == 2


def test_the_journal_reads_its_own_appends_from_memory_and_others_from_the_file(
    tmp_path, monkeypatch
):
    """After its own append, a process takes the lines it wrote from memory instead of reading the
    file again, unless another process appended after its last read; either way every view of the
    journal, interleaved writes included, equals what Optuna's own backend reads from the file."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    import harness.store.backends

    file_reads = []
    real = JournalFileBackend.read_logs
    monkeypatch.setattr(
        JournalFileBackend, "read_logs", lambda self, n: (file_reads.append(n), real(self, n))[1]
    )
    url = journal_storage(tmp_path)
    a = optuna.create_study(
        storage=harness.store.backends.make_storage(url), study_name="s", direction="maximize"
    )
    b = optuna.load_study(storage=harness.store.backends.make_storage(url), study_name="s")
    ta = a.ask()
    a.trials  # noqa: B018 - a has read everything
    file_reads.clear()
    for step in range(3):
        ta.report(0.1 * step, step)
    assert not file_reads  # its own lines, from memory
    tb = b.ask()  # b appends after a's last read ...
    tb.report(0.9, 0)
    file_reads.clear()
    ta.set_user_attr(
        "scores", {"x": 1, "2": [1.5, None]}
    )  # ... so a's next append is followed by a read
    assert file_reads
    a.tell(ta, 0.5)
    b.tell(tb, 0.25)

    def view(study):
        return [
            (t.number, t.state, t.value, t.intermediate_values, t.user_attrs, t.params)
            for t in study.get_trials()
        ]

    plain = optuna.load_study(
        storage=optuna.storages.JournalStorage(
            JournalFileBackend(str(tmp_path / "optuna.journal"))
        ),
        study_name="s",
    )
    assert view(a) == view(b) == view(plain)
    assert view(plain)[0][3] == {0: 0.0, 1: 0.1, 2: 0.2} and view(plain)[1][2] == 0.25


def test_own_lines_from_memory_then_others_from_the_file_read_as_the_file_says(tmp_path):
    """At the backend: this process's appended lines come from memory, what another writer added
    after them (a harness process, or a foreign writer that left half a line) from the file, and
    the result, offsets included, is what a fresh reader of the file gets."""
    import pickle

    from optuna.storages.journal import JournalFileBackend

    from harness.store.optuna_compat import DurableJournalFile, JournalFlock, journal_log_offsets

    path = str(tmp_path / "j.journal")
    a, b = (
        DurableJournalFile(path, JournalFlock(path)),
        DurableJournalFile(path, JournalFlock(path)),
    )
    a.append_logs([{"op_code": 0, "n": 0}])
    assert list(a.read_logs(0)) == [{"op_code": 0, "n": 0}]  # a has read everything
    a.append_logs([{"op_code": 5, "n": 1}, {"op_code": 5, "n": 2, "v": float("nan")}])
    assert (
        pickle.loads(pickle.dumps(a)).__dict__.get("_harness_own") is None
    )  # no lines of a's in a copy
    b.append_logs([{"op_code": 6, "n": 3}])
    with open(path, "ab") as f:
        f.write(b'{"op_code": 7, "n"')  # a foreign writer's unfinished line
    got = list(a.read_logs(1))
    fresh = JournalFileBackend(path)
    want = list(fresh.read_logs(0))[1:]
    assert [g["n"] for g in got] == [w["n"] for w in want] == [1, 2, 3]
    assert got[1]["v"] != got[1]["v"]  # NaN, parsed from the line as written
    assert journal_log_offsets(a) == journal_log_offsets(fresh)
    with open(path, "ab") as f:
        f.write(b": 4}\n")
    a.append_logs(
        [{"op_code": 8, "n": 5}]
    )  # the file grew under a: its lines are read from the file
    assert [g["n"] for g in a.read_logs(4)] == [4, 5]
    again = JournalFileBackend(path)
    assert [w["n"] for w in again.read_logs(0)] == [0, 1, 2, 3, 4, 5]
    assert journal_log_offsets(a) == journal_log_offsets(again)


def test_the_journal_lock_dies_with_its_process(tmp_path):
    """A process killed while it holds the journal's lock does not hold up the others (the
    kernel drops an flock with its process; Optuna's symlink lock waited 30 s)."""
    import time

    import optuna

    import harness.store.backends

    url = journal_storage(tmp_path)
    optuna.create_study(storage=harness.store.backends.make_storage(url), study_name="s")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(tmp_path / "optuna.journal.flock")],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == b"held"
    import threading

    study = optuna.load_study(storage=harness.store.backends.make_storage(url), study_name="s")
    writer = threading.Thread(target=study.ask, daemon=True)
    writer.start()
    writer.join(1.0)
    assert writer.is_alive()  # the append waits for the lock
    holder.kill()
    holder.wait()
    t0 = time.monotonic()
    writer.join(5)
    assert not writer.is_alive() and time.monotonic() - t0 < 5 and len(study.trials) == 1
