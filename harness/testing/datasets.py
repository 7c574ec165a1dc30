"""Dataset checks: the DomainData contract, disjoint splits, determinism and the fingerprint."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from harness.api import DataNotFoundError, DomainData, ImageFiles
from harness.data.domains import as_domain
from harness.errors import PluginContractError
from harness.registry import Entry
from harness.testing.core import (
    DUPLICATE_TOLERANCE,
    TASKS,
    CheckResult,
    Checks,
    EntryOrFactory,
    Fail,
    Skip,
    declared_tasks,
    describe,
    missing_from_type_error,
    missing_required,
    skip_message,
    unpack,
)
from harness.training.engine import generators_kept

#: the checks, in the order they run (``dataset.<check>``, ``dataset/<domain>.<check>``)
CHECKS = (
    "factory",
    "contract",
    "image_size",
    "task",
    "class_names",
    "disjoint_splits",
    "deterministic",
    "fingerprint",
)


def check_dataset(
    entry_or_factory: EntryOrFactory,
    domain: str | None = None,
    *,
    image_size: int = 32,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[CheckResult]:
    """Check a dataset factory ``factory(domain, *, image_size, seed, **options)`` that returns a
    ``DomainData``, or an ``ImageFiles`` (decoded through the harness's cache and checked as the
    domain a run would make of it).

    ``domain`` is the sub-domain to build (``None`` for the plain name); ``options`` the
    keyword options a study alias would pass (``{"root": ...}``, or a small ``{"n": 30}`` to keep
    the check fast). A factory with required options that are not given (``root`` of a folder
    dataset) is skipped: one passed ``dataset.factory`` result that says ``"skipped: needs
    options: root"``. Checks, named ``dataset.<check>`` (``dataset/<domain>.<check>`` with a
    domain): ``factory``, ``contract``, ``image_size``, ``task``, ``class_names``,
    ``disjoint_splits``, ``deterministic`` and ``fingerprint``.
    """
    factory, _, meta = unpack(entry_or_factory, "dataset")
    declared = (
        meta.get("tasks", ("classification",)) if isinstance(entry_or_factory, Entry) else TASKS
    )
    opts = dict(options or {})
    c = Checks("dataset" if domain is None else f"dataset/{domain}")
    missing = missing_required(factory, 1, {"image_size", "seed", *opts})
    if missing:
        c.add("factory", True, skip_message(missing))
        return c.results
    build = functools.partial(_build, factory, domain, image_size, opts)
    with generators_kept():  # the checks seed freely; the caller's random state stays
        try:
            data = build(seed)
        except Skip as skip:
            c.add("factory", True, str(skip))
            return c.results
        except Exception as exc:  # noqa: BLE001
            c.add("factory", False, describe(exc))
            for check in CHECKS[1:]:
                c.blocked(check, ["factory"])
            return c.results
        c.add(
            "factory",
            True,
            f"{len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test images",
        )
        _run_checks(c, data, build, image_size, declared, seed)
    return c.results


def _build(
    factory: Callable[..., Any], domain: str | None, image_size: int, opts: dict[str, Any], s: int
) -> DomainData:
    try:
        made = factory(domain, image_size=image_size, seed=s, **opts)
    except TypeError as exc:
        needed = missing_from_type_error(exc)
        if needed and not opts:
            raise Skip(skip_message(needed)) from None
        raise
    except DataNotFoundError as exc:
        if opts:
            raise
        raise Skip(f"skipped: no data where it looks by default ({exc})") from None
    if isinstance(made, ImageFiles):  # decoded through the harness's cache, as a run does
        return as_domain(made, image_size, seed=s, log=lambda _: None)
    if not isinstance(made, DomainData):
        raise Fail(
            f"factory returned {type(made).__name__}, not harness.api.DomainData or ImageFiles"
        )
    return made


def _run_checks(
    c: Checks,
    data: DomainData,
    build: Callable[[int], DomainData],
    image_size: int,
    declared: Any,
    seed: int,
) -> None:
    """Every check after ``factory``, on the data it built."""
    c.run("contract", lambda: _dataset_contract(data, image_size))
    c.run("image_size", lambda: _dataset_image_size(data, image_size))
    c.run("task", lambda: _dataset_task(data, declared))
    c.run("class_names", lambda: _dataset_class_names(data))
    c.run("disjoint_splits", lambda: _dataset_disjoint(data))
    c.run("deterministic", lambda: _dataset_deterministic(data, build(seed)))
    c.run("fingerprint", lambda: _dataset_fingerprint(data, build(seed + 1), seed))


def _dataset_contract(data: DomainData, size: int) -> None:
    try:
        data.check(size)
    except PluginContractError as exc:
        raise Fail(str(exc)) from None
    for split_name in ("train", "val", "test"):
        y = getattr(data, split_name).y
        if data.task == "classification" and y.ndim != 1:
            raise Fail(
                f"{split_name} labels of a classification domain must be (N,), got {tuple(y.shape)}"
            )
        if data.task == "segmentation" and y.ndim != 3:
            raise Fail(
                f"{split_name} masks of a segmentation domain must be (N, H, W), got {tuple(y.shape)}"
            )


def _dataset_image_size(data: DomainData, size: int) -> None:
    for split_name in ("train", "val", "test"):
        shape = tuple(getattr(data, split_name).x.shape[1:])
        if shape != (3, size, size):
            raise Fail(
                f"{split_name} images are {shape}, expected (3, {size}, {size}) for image_size={size}"
            )


def _dataset_task(data: DomainData, declared: Any) -> None:
    declared_tasks(declared)
    if data.task not in TASKS:
        raise Fail(f"DomainData.task is {data.task!r}; the harness knows {', '.join(TASKS)}")
    if data.task not in declared:
        raise Fail(
            f"the data are for {data.task!r} but the dataset is registered with tasks={tuple(declared)}: "
            "declare the task in register(..., tasks=(...))"
        )


def _dataset_class_names(data: DomainData) -> str | None:
    names = data.class_names
    if not isinstance(names, list | tuple) or not names:
        raise Fail(f"class_names must be a non-empty list of strings, got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise Fail(f"class names must be non-empty strings, got {bad[:5]!r}")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise Fail(f"class names must be unique; repeated: {dupes[:5]!r}")
    return None if len(names) > 1 else "only one class"


def _hashes(x: Tensor) -> list[bytes]:
    x = x.detach().cpu().contiguous()
    return [hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest() for img in x]


def _dataset_disjoint(data: DomainData) -> str | None:
    train = set(_hashes(data.train.x))
    notes = []
    for split_name in ("test", "val"):
        hashes = _hashes(getattr(data, split_name).x)
        shared = sum(h in train for h in hashes)
        share = shared / max(1, len(hashes))
        if share > DUPLICATE_TOLERANCE:
            raise Fail(
                f"{shared} of {len(hashes)} {split_name} images ({share:.0%}) are byte-identical to "
                f"train images (tolerance {DUPLICATE_TOLERANCE:.0%}): train, val and test must be "
                "disjoint splits (harness.api.DomainData.from_arrays splits one pool for you)"
            )
        if shared:
            notes.append(
                f"{shared} of {len(hashes)} {split_name} images also in train (within tolerance)"
            )
    return "; ".join(notes) or None


def _dataset_deterministic(a: DomainData, b: DomainData) -> None:
    differ = _differences(a, b)
    if differ:
        raise Fail(
            f"two calls with the same arguments gave different data ({', '.join(differ)}): seed every "
            "random choice, so that trials and resumed runs see the same images in the same splits"
        )
    if a.fingerprint != b.fingerprint:
        raise Fail(
            f"two calls with the same arguments gave the same data but different fingerprints "
            f"({a.fingerprint!r} vs {b.fingerprint!r}): the fingerprint must depend on the data only"
        )


def _differences(a: DomainData, b: DomainData) -> list[str]:
    out = []
    if a.task != b.task:
        out.append("task")
    if list(a.class_names) != list(b.class_names):
        out.append("class_names")
    for split_name in ("train", "val", "test"):
        sa, sb = getattr(a, split_name), getattr(b, split_name)
        for part in ("x", "y"):
            ta, tb = getattr(sa, part), getattr(sb, part)
            if ta.shape != tb.shape or not torch.equal(ta, tb):
                out.append(f"{split_name}.{part}")
    return out


def _dataset_fingerprint(a: DomainData, other: DomainData, seed: int) -> str | None:
    if not isinstance(a.fingerprint, str) or not a.fingerprint:
        raise Fail(
            f"fingerprint must be a non-empty string, got {a.fingerprint!r} "
            "(harness.api.fingerprint_tensors computes one)"
        )
    differ = _differences(a, other)
    if differ and a.fingerprint == other.fingerprint:
        raise Fail(
            f"seed {seed} and seed {seed + 1} give different data ({', '.join(differ)}) with the same "
            f"fingerprint {a.fingerprint!r}: the fingerprint must change when the images, labels or "
            "split change (hash the pool and the split indices, e.g. with harness.api.fingerprint_tensors)"
        )
    if not differ and a.fingerprint != other.fingerprint:
        raise Fail(
            f"seed {seed} and seed {seed + 1} give identical data but different fingerprints: the "
            "fingerprint must depend on the data only"
        )
    return None if differ else "the seed has no effect on the data or splits"


def check_names(domain: str | None = None) -> list[str]:
    """The names :func:`check_dataset` reports for ``domain``, without running it (a skipped
    factory reports ``factory`` only)."""
    prefix = "dataset" if domain is None else f"dataset/{domain}"
    return [f"{prefix}.{n}" for n in CHECKS]
