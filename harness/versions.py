"""What code produced a result: the checkout's commit and installed package versions."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
from pathlib import Path

#: this harness's version (``harness.__version__``), here so that any module can read it without
#: importing the package's ``__init__``
HARNESS_VERSION = "0.1.0"


def package_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


#: the folders whose untracked (not ignored) files count as code: a new module there changes what
#: a run does before anyone commits it
CODE_DIRS = ("harness", "plugins", "benchmarks")


def git_commit(where: Path) -> str | None:
    """The checkout's commit, "-dirty" when tracked code differs from it or an untracked file that
    git does not ignore lies under :data:`CODE_DIRS` (published results under results/ are
    outputs, not code, and do not count)."""
    tracked = ["--untracked-files=no", "--", ":(top,exclude)results"]
    untracked = ["--untracked-files=all", "--", *(f":(top){d}" for d in CODE_DIRS)]
    try:
        out = _git(where, "rev-parse", "--short=12", "HEAD")
        changes = [_git(where, "status", "--porcelain", *args) for args in (tracked, untracked)]
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = any(c.stdout.strip() for c in changes)
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _git(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=5)
