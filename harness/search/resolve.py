"""From a study's names to the plugins' entries: each method's backbone, head and strategy, each
pair's datasets; every mismatch is the study file's error, raised before anything is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness import api
from harness.errors import HarnessError, PluginContractError
from harness.options import check_options
from harness.registry import Entry, Registry, check_domain
from harness.study import Method, StudySpec, spec_error
from harness.versions import package_version

#: the distribution of the built-in plugins: provenance names it without a version, as always
BUILTIN_DIST = "transfer-harness"


@dataclass
class DomainRef:
    text: str
    entry: Entry
    sub: str | None
    options: dict[str, Any]
    #: the dataset alias's own stored size, if it sets one
    stored_size: int | list[int] | None = None


@dataclass
class ResolvedMethod:
    method: Method
    backbone: Entry
    head: Entry
    strategy: Entry

    def new_strategy(self) -> api.Strategy:
        s = self.strategy.factory(**self.method.strategy_options)
        if not isinstance(s, api.Strategy):
            raise PluginContractError(
                f"strategy factory of plugin {self.strategy.plugin!r} ({self.strategy.dist}) returned "
                f"{type(s).__name__}, not harness.api.Strategy"
            )
        return s


def plugin_label(entry: Entry, registry: Registry | None = None) -> str:
    """``"plugin (dist)"`` for a built-in, ``"plugin (dist version)"`` for any other distribution:
    the version installed, else the one the registry recorded when it loaded the plugin."""
    version = None
    if entry.dist != BUILTIN_DIST:
        version = package_version(entry.dist)
        info = registry.plugins.get(entry.plugin) if registry is not None else None
        if version is None and info is not None and info.dist == entry.dist:
            version = info.version if info.version not in ("", "?") else None
    return (
        f"{entry.plugin} ({entry.dist} {version})" if version else f"{entry.plugin} ({entry.dist})"
    )


def resolve_domain(spec: StudySpec, registry: Registry, text: str, key: str) -> DomainRef:
    """The dataset entry, sub-domain and options a pair's ``source`` or ``target`` names."""
    name, _, sub = text.partition("/")
    stored = spec.datasets[name].stored_size if name in spec.datasets else None
    try:
        if name in spec.datasets:
            alias = spec.datasets[name]
            entry = registry.get("dataset", alias.plugin)
            options = alias.options
        else:
            entry, options = registry.get("dataset", name), {}
    except HarnessError as exc:
        raise spec_error(spec, key, exc) from None
    if spec.task not in entry.tasks:
        raise spec_error(spec, key, f"dataset {name!r} does not serve {spec.task}")
    try:
        check_domain(entry, sub or None, name)
    except HarnessError as exc:
        raise spec_error(spec, key, exc) from None
    try:
        check_options(entry, options, name)
    except HarnessError as exc:
        raise spec_error(spec, f"datasets.{name}" if name in spec.datasets else key, exc) from None
    return DomainRef(text, entry, sub or None, options, stored)


def _check_tasks(spec: StudySpec, i: int, m: Method, entries: dict[str, Entry]) -> None:
    tasks = entries["head"].tasks
    if spec.task not in tasks:
        raise spec_error(
            spec,
            f"methods[{i}].head",
            f"head {m.head!r} supports {', '.join(tasks)}, not {spec.task}",
        )
    strategy_tasks = entries["strategy"].tasks
    if spec.task not in strategy_tasks:
        raise spec_error(
            spec,
            f"methods[{i}].strategy",
            f"strategy {m.strategy!r} supports {', '.join(strategy_tasks)}, not {spec.task}",
        )


def resolve_methods(spec: StudySpec, registry: Registry) -> list[ResolvedMethod]:
    """Every method's entries, with its strategy built once to check its options."""
    out = []
    for i, m in enumerate(spec.methods):
        entries = {}
        for kind, attr in (("backbone", "backbone"), ("head", "head"), ("strategy", "strategy")):
            try:
                entries[kind] = registry.get(kind, getattr(m, attr))
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{i}].{attr}", exc) from None
        _check_tasks(spec, i, m, entries)
        for kind, key in (("head", "head_options"), ("strategy", "strategy_options")):
            try:
                check_options(entries[kind], getattr(m, key), getattr(m, kind))
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{i}].{key}", exc) from None
        rm = ResolvedMethod(m, entries["backbone"], entries["head"], entries["strategy"])
        try:
            strategy = rm.new_strategy()
        except (TypeError, ValueError) as exc:
            raise spec_error(
                spec, f"methods[{i}].strategy_options", f"{m.strategy}: {exc}"
            ) from None
        if strategy.shots and spec.task != "classification":
            raise spec_error(
                spec,
                f"methods[{i}].strategy_options",
                "shots (k labelled images per class) applies to classification only",
            )
        out.append(rm)
    return out
