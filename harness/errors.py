"""Errors the CLI turns into one line plus a hint (exit status 2)."""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness reports to a user without a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class StudySpecError(HarnessError):
    """A study file is missing, malformed, or names something that does not exist."""


class UnknownPluginError(HarnessError):
    """A study or command names a backbone, head, dataset or strategy nobody registered."""


class DuplicatePluginError(HarnessError):
    """Two plugins registered the same name for the same kind."""


class PluginLoadError(HarnessError):
    """A plugin failed to import, declares an unknown hook, or raised while registering."""


class WeightsError(HarnessError):
    """Pretrained weights could not be obtained or do not fit the backbone."""


class DatasetError(HarnessError):
    """A dataset could not be built: a missing folder, an unreadable image, a bad layout."""


class DataNotFoundError(DatasetError):
    """A dataset's files are not where it looks: a missing root, an unset data variable."""


class CacheError(HarnessError):
    """The decoded-image cache cannot be written: an unwritable directory or a full disk."""


class PluginContractError(HarnessError):
    """A plugin factory returned something that does not honour the hook's contract."""


class SearchFailedError(HarnessError):
    """Every trial of a method failed: the leaderboard is written, and the run exits 1."""

    exit_code = 1


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss (the trial fails with reason 'nonfinite')."""
