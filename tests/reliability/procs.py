"""Helpers for the reliability tests: `harness run` as a process, and looks into its storage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from harness.store.backends import make_storage

STUDY = """
image_size = 16
batch_size = 64
seed = 0
final_seeds = {final_seeds}

[[pairs]]
source = "digits"
target = "digits-m"

[[methods]]
backbone = "test_resnet"
head = "linear"
strategy = "finetune"

[budget]
trials = {trials}
max_epochs = {epochs}

[search]
startup_trials = 1
pruner = "none"
"""

STUDY_NAME = "digits->digits-m | test_resnet(none)+linear+finetune"


def write(
    tmp: Path, name: str = "par", *, trials: int = 3, epochs: int = 1, final_seeds: int = 1
) -> Path:
    (tmp / "benchmarks").mkdir(exist_ok=True)
    path = tmp / "benchmarks" / f"{name}.toml"
    path.write_text(
        textwrap.dedent(STUDY.format(trials=trials, epochs=epochs, final_seeds=final_seeds))
    )
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def run(
    *args: str, cwd: Path, timeout: int = 300, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env(**extra),
    )  # fmt: skip


def start(*args: str, cwd: Path, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", *args],
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env(**extra),
    )


def trials(url: str, name: str = STUDY_NAME) -> list[optuna.trial.FrozenTrial]:
    if url.startswith("sqlite:///"):
        if not Path(url.removeprefix("sqlite:///")).is_file():
            return []  # not begun yet (opening would create the file)
        # look read-only: Optuna's RDBStorage writes its version rows when it opens a file, even
        # with skip_table_creation, and that write can collide with the run creating them
        path = url.removeprefix("sqlite:///")
        try:
            storage = optuna.storages.RDBStorage(
                f"sqlite:///file:{path}?mode=ro&uri=true",
                skip_table_creation=True,
                skip_compatibility_check=True,
            )
            optuna.get_all_study_summaries(storage, include_best_trial=False)
        except Exception:  # noqa: BLE001 - the schema is not (all) there yet
            return []
    else:
        storage = make_storage(url)
    if name not in {
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    }:
        return []
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def user_attrs(url: str, name: str = STUDY_NAME) -> dict[str, Any]:
    return optuna.load_study(study_name=name, storage=make_storage(url)).user_attrs


def wait_for(
    what: Callable[[], Any],
    timeout: float,
    step: float = 0.2,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> Any:
    """Poll ``what`` until it returns something truthy; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the run ended (status {proc.returncode}) before the awaited state\n{_tail(log)}"
            )
        time.sleep(step)
    raise AssertionError(f"not reached within {timeout} s\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
