"""Where a study's trials are kept: storage URLs, which kind each is, and opening them.

Optuna's FAQ advises against SQLite when several processes write at once and recommends its
journal storage (one file, appended under a file lock) for several processes on one machine. It is
also the cheaper one for a lone process: an append per write, and reads served from memory, where
SQLite pays a transaction per write and a query per read (measured in
``benchmarks/test_search_efficiency.py``). A study begun in SQLite stays there.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna

from harness.errors import HarnessError
from harness.store.optuna_compat import journal_storage_at


def default_storage(results_dir: Path) -> str:
    """The embedded SQLite file: where studies begun before the journal default keep their trials."""
    return f"sqlite:///{(results_dir / 'optuna.db').resolve()}"


def journal_storage(results_dir: Path) -> str:
    """The embedded journal file: what new studies use, with one worker or several."""
    return f"journal:///{(results_dir / 'optuna.journal').resolve()}"


def embedded_storage(results_dir: Path, workers: int = 1) -> str:
    """The storage under ``results/<study>/``: the file a study already has, else a journal file."""
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
    """Refuse several writing processes on a SQLite file."""
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


def storage_file(url: str) -> Path | None:
    """The file a SQLite or journal URL keeps its trials in; None for a database server."""
    kind = storage_kind(url)
    if kind == "server":
        return None
    return Path(url.removeprefix("sqlite:///") if kind == "sqlite" else _journal_path(url))


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Open the storage at ``url``; a URL that does not open is one line and a hint."""
    try:
        kind = storage_kind(url)
        if kind == "journal":
            path = Path(_journal_path(url))
            path.parent.mkdir(parents=True, exist_ok=True)
            return journal_storage_at(str(path))
        if kind == "sqlite":
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy, drivers and servers fail in many ways
        raise HarnessError(
            f"cannot open storage {url.split('@')[-1]!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
            hint="use a URL Optuna supports (postgresql://user@host/db, mysql+pymysql://..., sqlite:///path.db) "
            "with its driver installed, or journal:///path/file.journal",
        ) from None


def run_storage_url(url: str | None, results_dir: Path, workers: int) -> str:
    """The URL a run writes to: ``url``, else the embedded one; checked for the number of workers,
    and a SQLite file that exists locked for this process (a second process is refused before its
    preflight). Nothing is created: :func:`open_run_storage` does that once the study is checked."""
    url = url or embedded_storage(results_dir, workers)
    check_workers(url, workers)
    if storage_kind(url) == "sqlite" and Path(url.removeprefix("sqlite:///")).is_file():
        lock_sqlite(url)
    return url


def open_run_storage(url: str, results_dir: Path) -> optuna.storages.BaseStorage:
    """Open (and on a first run create) the storage at ``url`` from :func:`run_storage_url`, with
    ``results_dir`` made and a SQLite file locked for this process."""
    results_dir.mkdir(parents=True, exist_ok=True)
    if storage_kind(url) == "sqlite":
        lock_sqlite(url)
    return make_storage(url)


def study_names(storage: optuna.storages.BaseStorage) -> set[str]:
    """The names of every study in ``storage``."""
    return {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Close a database storage's connections (other storages hold none)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()
