"""Checks over registry entries: one entry by its kind, or every entry a plugin registered.

Beyond each entry's own checks, a plugin is checked as the registry sees it: that it loaded, and
that no other installed plugin claims its entry-point name or the name of one of its entries (the
harness refuses such a name while both are installed, whichever plugin loaded first).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.registry import KINDS, Entry, Registry, unknown_message
from harness.testing import backbones, commands, datasets, heads, metrics, strategies, validators
from harness.testing.backbones import check_backbone
from harness.testing.commands import check_command
from harness.testing.core import MAX_BACKBONES, SKIPPED, CheckResult, Checks
from harness.testing.datasets import check_dataset
from harness.testing.heads import check_head, declared_options_match
from harness.testing.metrics import check_metric
from harness.testing.strategies import check_strategy
from harness.testing.validators import check_validator

#: the kinds of entry the kit checks (a kind added to the registry later is reported as unchecked)
CHECKED_KINDS = ("backbone", "head", "dataset", "strategy", "command", "validator", "metric")
#: what to do about a name another installed plugin claims too
_RENAME = "rename yours, or uninstall one of the two distributions"


def check_entry(entry: Entry, **kwargs: Any) -> list[CheckResult]:
    """Check one registry entry with the check function of its kind.

    ``kwargs`` go to that function (``image_size=``, ``options=``, ...). A dataset that declares
    sub-domains (``register(..., domains=[...])``) is checked on each of them unless ``domain=``
    is given, after ``dataset.declared_options`` (its declared options match its factory).
    """
    if entry.kind == "backbone":
        return check_backbone(entry, **kwargs)
    if entry.kind == "head":
        return check_head(entry, **kwargs)
    if entry.kind == "dataset":
        c = Checks("dataset")
        c.run(
            "declared_options", lambda: declared_options_match(entry.factory, "dataset", entry.meta)
        )
        domains = entry.meta.get("domains")
        if domains and "domain" not in kwargs:
            return c.results + [r for d in domains for r in check_dataset(entry, d, **kwargs)]
        return c.results + check_dataset(entry, **kwargs)
    if entry.kind == "strategy":
        return check_strategy(entry, **kwargs)
    if entry.kind == "command":
        return check_command(entry, **kwargs)
    if entry.kind == "validator":
        return check_validator(entry, **kwargs)
    if entry.kind == "metric":
        return check_metric(entry, **kwargs)
    raise ValueError(f"the kit has no checks for {entry.kind} entries ({entry.name!r})")


def check_names(entry: Entry, **kwargs: Any) -> list[str]:
    """The names of the checks :func:`check_entry` reports for ``entry``, without running them.

    A factory skipped for want of options reports fewer (its ``factory`` check says why).
    """
    if entry.kind not in CHECKED_KINDS:
        return [f"{entry.kind}.unchecked"]
    if entry.kind == "backbone":
        return backbones.check_names()
    if entry.kind == "head":
        return heads.check_names(entry.meta, kwargs.get("tasks"))
    if entry.kind == "dataset":
        domains = entry.meta.get("domains")
        first = ["dataset.declared_options"]
        if domains and "domain" not in kwargs:
            return first + [n for d in domains for n in datasets.check_names(d)]
        return first + datasets.check_names(kwargs.get("domain"))
    if entry.kind == "strategy":
        return strategies.check_names()
    if entry.kind == "validator":
        return validators.check_names()
    if entry.kind == "metric":
        return metrics.check_names()
    return commands.check_names()


def check_plugin(
    registry: Registry,
    name: str,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    max_backbones: int = MAX_BACKBONES,
) -> dict[str, list[CheckResult]]:
    """Check every entry that the plugin ``name`` (its entry-point name) registered.

    Returns ``{"kind:name": results}``. A plugin that failed to load, or whose entry-point name
    another distribution declares too, gets ``"plugin:<name>"`` with a failed ``plugin.load`` or
    ``plugin.unique_name`` result; an entry whose name another plugin registers too starts with a
    failed ``<kind>.unique_name`` result naming both plugins. ``options`` gives keyword arguments
    for the check functions, by kind (``{"dataset": {"image_size": 16}}``) and by entry
    (``{"dataset:shapes": {"options": {"n": 30}}, "head:pan": {"seg_image_size": 128}}``); the
    entry's win. A plugin that registers more than ``max_backbones`` backbones (timm registers
    every timm model) is checked on its backbones named ``test_*`` only.
    """
    entries = plugin_entries(registry, name, max_backbones=max_backbones)
    out: dict[str, list[CheckResult]] = {}
    problems = plugin_problems(registry, name)
    if problems:
        out[f"plugin:{name}"] = problems
    for entry in entries:
        key = f"{entry.kind}:{entry.name}"
        collision = name_collision(registry, entry)
        first = [collision] if collision else []
        out[key] = first + entry_results(entry, entry_options(options, key))
    return out


def plugin_entries(
    registry: Registry, name: str, *, max_backbones: int = MAX_BACKBONES
) -> list[Entry]:
    """The entries the plugin ``name`` registered, by kind then name, as :func:`check_plugin`
    checks them (only the ``test_*`` backbones of a plugin with more than ``max_backbones``)."""
    if name not in registry.plugins:
        raise ValueError(unknown_message("plugin", name, sorted(registry.plugins)))
    out: list[Entry] = []
    for kind in KINDS:
        entries = sorted(
            (e for e in registry.entries[kind].values() if e.plugin == name), key=lambda e: e.name
        )
        if kind == "backbone" and len(entries) > max_backbones:
            entries = [e for e in entries if e.name.startswith("test_")]
        out += entries
    return out


def plugin_problems(registry: Registry, name: str) -> list[CheckResult]:
    """Failed results for a plugin that did not load, or whose entry-point name is taken twice."""
    info = registry.plugins[name]
    out = []
    if info.error:
        out.append(CheckResult("plugin.load", False, info.error))
    for key, other in registry.plugins.items():
        if key == f"{name} ({other.dist})":  # how the registry lists a second plugin of one name
            out.append(
                CheckResult(
                    "plugin.unique_name",
                    False,
                    f"the entry-point name {name!r} is declared by {info.dist} and by "
                    f"{other.dist}: the harness loads one of them only; {_RENAME}",
                )
            )
    return out


def name_collision(registry: Registry, entry: Entry) -> CheckResult | None:
    """A failed ``<kind>.unique_name`` result when another plugin registers ``entry``'s name too.

    The registry keeps the entry of the plugin that loaded first and reports the duplicate on the
    other plugin's row, so the plugin that loaded first needs this check to learn of it.
    """
    conflict = registry.conflicts[entry.kind].get(entry.name)
    if conflict is None:
        return None
    return CheckResult(
        f"{entry.kind}.unique_name",
        False,
        f"{conflict}; a study naming it fails while both are installed: {_RENAME}",
    )


def entry_options(options: Mapping[str, Mapping[str, Any]] | None, key: str) -> dict[str, Any]:
    """The keyword arguments for entry ``key`` (``"kind:name"``): its kind's, then its own."""
    options = options or {}
    kind = key.split(":", 1)[0]
    return {**dict(options.get(kind, {})), **dict(options.get(key, {}))}


def entry_results(entry: Entry, kwargs: dict[str, Any]) -> list[CheckResult]:
    """:func:`check_entry`'s results, or one passed note for a kind the kit has no checks for."""
    if entry.kind not in CHECKED_KINDS:
        detail = f"{SKIPPED}the kit has no checks for {entry.kind} entries"
        return [CheckResult(f"{entry.kind}.unchecked", True, detail)]
    return check_entry(entry, **kwargs)
