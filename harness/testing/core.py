"""What every check module shares: the results, the runner that records them, and small helpers.

A check is a function that returns nothing (or a note) when the contract holds and raises
:class:`Fail` with a message that says what is wrong, and usually how to fix it, when it does not.
:class:`Checks` runs such functions one at a time, so that one failure never hides the others.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from harness.errors import HarnessError
from harness.hookspecs import TASKS
from harness.registry import Entry

#: what a strategy may declare as ``target_labels``
TARGET_LABELS = ("none", "few", "all")
#: share of test (or val) images that may repeat a train image byte for byte before
#: ``dataset.disjoint_splits`` fails: real data sets hold a few genuine duplicates
DUPLICATE_TOLERANCE = 0.10
#: the keyword passed to a factory to see that it rejects unknown options
UNKNOWN_OPTION = "harness_contract_check_unknown_option"
#: number of classes of the heads and data the checks build
NUM_CLASSES = 3
#: the keys of ``Strategy.fixed`` the harness reads
KNOWN_FIXED = ("freeze_depth",)
#: a plugin registering more backbones than this is checked on its ``test_*`` names only
MAX_BACKBONES = 50

#: the detail of a failed check that could not run because another failed
NOT_RUN = "not run: "
#: the detail of a passed check that was not run for want of options
SKIPPED = "skipped: "
CPU = torch.device("cpu")
_T = TypeVar("_T")
EntryOrFactory = Entry | Callable[..., Any]
#: frames in the kit's own files are not where a plugin went wrong
_KIT_DIR = os.path.dirname(__file__) + os.sep


# =========================================================================================== results


@dataclass
class CheckResult:
    """The outcome of one named check, e.g. ``backbone.stages`` or ``head.segmentation.output``.

    ``detail`` says what went wrong (and usually how to fix it) when ``passed`` is false; for a
    passed check it may hold a note (``"seed has no effect on the splits"``) or say why the check
    was skipped (``"skipped: needs options: root"``).
    """

    name: str
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"{status} {self.name}" + (f": {self.detail}" if self.detail else "")


class PluginCheckError(AssertionError):
    """Raised by :func:`assert_passes`; ``failures`` holds the failed :class:`CheckResult` s."""

    def __init__(self, failures: Sequence[CheckResult], total: int) -> None:
        self.failures = list(failures)
        root = [f for f in self.failures if not f.detail.startswith(NOT_RUN)]
        blocked = [f for f in self.failures if f.detail.startswith(NOT_RUN)]
        lines = [f"{len(self.failures)} of {total} plugin contract checks failed:"]
        lines += [f"  {f.name}: {f.detail}" for f in root]
        if blocked:
            lines.append(
                f"  not run because of the failures above: {', '.join(f.name for f in blocked)}"
            )
        super().__init__("\n".join(lines))


def assert_passes(results: Iterable[CheckResult] | Mapping[str, Iterable[CheckResult]]) -> None:
    """Raise :class:`PluginCheckError` (an ``AssertionError``) listing every failed check.

    Accepts the list a ``check_*`` function returns, or the dict :func:`check_plugin` returns (its
    check names are then prefixed with the entry, ``"strategy:my-da/strategy.trains"``).
    """
    if isinstance(results, Mapping):
        flat = [
            CheckResult(f"{key}/{r.name}", r.passed, r.detail)
            for key, rs in results.items()
            for r in rs
        ]
    else:
        flat = list(results)
    failures = [r for r in flat if not r.passed]
    if failures:
        raise PluginCheckError(failures, len(flat))


# =========================================================================================== machinery


class Fail(Exception):
    """A contract violation found by a check; its message is the CheckResult's detail."""


class Skip(Exception):
    """The check cannot run without options the caller did not give."""


class Checks:
    """Runs named checks one at a time and records a CheckResult for each."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.results: list[CheckResult] = []
        self.failed: set[str] = set()

    def add(self, name: str, passed: bool, detail: str = "") -> None:
        self.results.append(CheckResult(f"{self.prefix}.{name}", passed, detail))
        if not passed:
            self.failed.add(name)

    def blocked(self, name: str, needs: Sequence[str]) -> bool:
        bad = [n for n in needs if n in self.failed]
        if bad:
            failed = ", ".join(f"{self.prefix}.{n}" for n in bad)
            self.add(name, False, f"{NOT_RUN}{failed} failed")
        return bool(bad)

    def value(self, name: str, fn: Callable[[], _T], needs: Sequence[str] = ()) -> _T | None:
        """Run ``fn``; record a pass (and return its value) or a failure (and return None)."""
        if self.blocked(name, needs):
            return None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a CheckResult
            self.add(name, False, describe(exc))
            return None
        self.add(name, True)
        return out

    def run(self, name: str, fn: Callable[[], str | None], needs: Sequence[str] = ()) -> bool:
        """Run ``fn``, which returns an optional note for a passed check."""
        if self.blocked(name, needs):
            return False
        try:
            note = fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a CheckResult
            self.add(name, False, describe(exc))
            return False
        self.add(name, True, note or "")
        return True


def _library_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(torch.__file__) + os.sep]
    for mod in ("numpy", "optuna", "timm", "segmentation_models_pytorch"):
        with contextlib.suppress(Exception):
            dirs.append(os.path.dirname(__import__(mod).__file__) + os.sep)
    return tuple(dirs)


def describe(exc: BaseException) -> str:
    """One line for an exception: its type, message, where it was raised and any harness hint."""
    if isinstance(exc, Fail):
        return str(exc)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "; ".join(lines)
    if len(text) > 400:
        text = text[:400] + "..."
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    skipped = (_KIT_DIR, *_library_dirs())
    own = [f for f in frames if not f.filename.startswith(skipped)]
    where = own[-1] if own else (frames[-1] if frames else None)
    if where is not None:
        out += f" (at {os.path.basename(where.filename)}:{where.lineno} in {where.name})"
    hint = getattr(exc, "hint", None) if isinstance(exc, HarnessError) else None
    if hint:
        out += f"; hint: {hint}"
    return out


# =========================================================================================== helpers


def unpack(obj: EntryOrFactory, kind: str) -> tuple[Callable[..., Any], str, dict[str, Any]]:
    if isinstance(obj, Entry):
        if obj.kind != kind:
            raise TypeError(f"check_{kind} got the {obj.kind} entry {obj.name!r}; use check_entry")
        return obj.factory, obj.name, dict(obj.meta)
    if callable(obj):
        return obj, "", {}
    raise TypeError(f"check_{kind} needs a registry Entry or a factory, got {type(obj).__name__}")


def missing_required(
    factory: Callable[..., Any], positional: int, provided: Iterable[str]
) -> list[str]:
    """Required parameters of ``factory`` the call would not supply (from its signature)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []
    given = set(provided)
    missing = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional > 0:
            positional -= 1
            continue
        if p.default is p.empty and p.name not in given:
            missing.append(p.name)
    return missing


_MISSING_ARG = re.compile(r"missing \d+ required (?:keyword-only |positional )?arguments?: (.+)$")


def missing_from_type_error(exc: TypeError) -> list[str]:
    match = _MISSING_ARG.search(str(exc))
    return re.findall(r"'([^']+)'", match.group(1)) if match else []


def skip_message(missing: Sequence[str]) -> str:
    opts = ", ".join(f"{m!r}: ..." for m in missing)
    return f"{SKIPPED}needs options: {', '.join(missing)} (pass options={{{opts}}} to check it)"


def images(n: int, size: int, seed: int = 0) -> Tensor:
    """A normalized float batch like the one the harness feeds a model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    return (x - 0.45) / 0.225


def short(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def declared_tasks(declared: Any) -> None:
    """The ``tasks`` a head or dataset registers: a non-empty tuple of known task names."""
    if isinstance(declared, str):
        raise Fail(
            f"tasks={declared!r} is a string: register with tasks=({declared!r},), a tuple (the "
            "harness tests `task in tasks`, which on a string matches substrings)"
        )
    if not isinstance(declared, Sequence) or not declared:
        raise Fail(f"tasks must be a non-empty tuple of task names, got {declared!r}")
    unknown = [t for t in declared if t not in TASKS]
    if unknown:
        raise Fail(f"unknown task(s) {unknown}; the harness knows {', '.join(TASKS)}")
