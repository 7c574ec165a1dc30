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


def git_commit(where: Path) -> str | None:
    """The checkout's commit, "-dirty" when tracked code differs from it (published results
    under results/ are outputs, not code, and do not count)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top,exclude)results"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
