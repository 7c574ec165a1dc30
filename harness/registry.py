"""Plugin loading and lookups.

Entry points load one at a time so that one broken distribution cannot take the others down;
each hook is called per plugin so that every registered entry knows where it came from.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pluggy

from harness import hookspecs
from harness.errors import DuplicatePluginError, PluginLoadError, UnknownPluginError
from harness.options import checked_declaration, close_matches

KINDS = {
    "backbone": "register_backbones",
    "head": "register_heads",
    "dataset": "register_datasets",
    "strategy": "register_strategies",
    "validator": "register_validators",
    "metric": "register_metrics",
    "command": "register_commands",
}
#: comma-separated entry-point names; when set, only these plugins load (tests use it for isolation)
ENV_PLUGINS = "HARNESS_PLUGINS"
#: when "1", a plugin that fails to load raises instead of being reported
ENV_STRICT = "HARNESS_STRICT_PLUGINS"
#: the harness's own subcommands: a plugin command of the same name is not added
BUILTIN_COMMANDS = frozenset(
    {"run", "leaderboard", "plugins", "validate", "ls", "check-plugin", "index"}
    | {"export", "predict"}  # harness.cli_models
    | {"rank"}  # harness.cli_rank
)

_DUPLICATE_HINT = f"uninstall one of the two distributions, or limit plugins with {ENV_PLUGINS}"


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    dist: str
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this entry serves: its ``tasks=`` or the kind's default."""
        return tuple(self.meta.get("tasks", hookspecs.DEFAULT_TASKS.get(self.kind, ())))


@dataclass
class PluginInfo:
    name: str
    dist: str
    version: str
    module: str
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.plugins: dict[str, PluginInfo] = {}
        # names two plugins claimed: using one is an error naming both
        self.conflicts: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self.strict = False

    # ------------------------------------------------------------------ loading

    def load_entry_points(self, only: Iterable[str] | None = None, strict: bool = False) -> None:
        self.strict = strict
        wanted = set(only) if only is not None else None
        for ep in sorted(md.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name):
            if wanted is not None and ep.name not in wanted:
                continue
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            info = PluginInfo(ep.name, dist, version, ep.value)
            if ep.name in self.plugins:
                other = self.plugins[ep.name]
                info.name = (
                    f"{ep.name} ({dist})"  # keep the first plugin's row; report this one beside it
                )
                info.error = (
                    f"entry-point name {ep.name!r} is also used by {other.dist}; not loaded"
                )
                self._fail(info)
                continue
            self.plugins[ep.name] = info
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
                info.error = f"import failed: {_one_line(exc)}"
                self._fail(info, exc)
                continue
            self.add_plugin(module, info)

    def add_plugin(self, obj: Any, info: PluginInfo) -> None:
        """Register one plugin object (module) and collect its entries."""
        self.plugins.setdefault(info.name, info)
        try:
            self.pm.register(obj, name=info.name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._unregister(info.name)
            unknown = [n for n in _hook_like_names(obj) if n not in hookspecs.hook_names()]
            info.error = (
                f"implements unknown hook(s) {', '.join(unknown)}; known hooks: "
                f"{', '.join(hookspecs.hook_names())}"
                if unknown
                else f"invalid hook implementation: {_one_line(exc)}"
            )
            self._fail(info, exc)
            return
        added: list[Entry] = []
        try:
            for kind, hook_name in KINDS.items():
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin_name == info.name:
                        impl.function(register=partial(self._register, kind, info, added))
        except Exception as exc:  # noqa: BLE001
            for entry in added:
                self.entries[entry.kind].pop(entry.name, None)
            self._unregister(info.name)
            info.registered.clear()
            info.error = f"raised while registering: {_one_line(exc)}"
            self._fail(info, exc)

    def _register(
        self,
        kind: str,
        info: PluginInfo,
        added: list[Entry],
        name: str,
        factory: Callable[..., Any],
        description: str = "",
        **meta: Any,
    ) -> None:
        if not isinstance(name, str) or not hookspecs.NAME_PATTERN.match(name):
            raise ValueError(f"invalid {kind} name {name!r}: use {hookspecs.NAME_RULE}")
        if not callable(factory):
            raise TypeError(f"{kind} {name!r}: factory {factory!r} is not callable")
        meta = _checked_meta(kind, name, meta)
        existing = self.entries[kind].get(name)
        if existing is not None:
            message = (
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} "
                f"({existing.dist}) and by plugin {info.name!r} ({info.dist})"
            )
            self.conflicts[kind][name] = message
            info.error = f"{info.error}; {message}" if info.error else message
            if self.strict:
                raise DuplicatePluginError(message, hint=_DUPLICATE_HINT)
            return
        entry = Entry(kind, name, factory, info.name, info.dist, description, meta)
        self.entries[kind][name] = entry
        added.append(entry)
        info.registered.setdefault(kind, []).append(name)

    def _unregister(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)

    def _fail(self, info: PluginInfo, exc: BaseException | None = None) -> None:
        self.plugins[info.name] = info
        if self.strict:
            if isinstance(exc, DuplicatePluginError):
                raise exc
            raise PluginLoadError(
                f"plugin {info.name!r} ({info.dist}) {info.error}",
                hint=f"unset {ENV_STRICT} to load the other plugins anyway",
            ) from exc

    # ------------------------------------------------------------------ lookups

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Entry:
        if name in self.conflicts[kind]:
            raise DuplicatePluginError(self.conflicts[kind][name], hint=_DUPLICATE_HINT)
        try:
            return self.entries[kind][name]
        except KeyError:
            broken = "; ".join(f"{p.name} ({p.dist}): {p.error}" for p in self.errors)
            raise UnknownPluginError(
                unknown_message(kind, name, self.names(kind)),
                hint=f"`harness plugins --kind {kind}` lists all {kind}s"
                + (f"; plugins that failed to load: {broken}" if broken else ""),
            ) from None

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error]


def _checked_meta(kind: str, name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """``tasks``, ``domains`` and ``options`` as the hookspecs define them, or a ``TypeError``
    saying why not."""
    if meta.get("options") is not None:
        meta = {**meta, "options": checked_declaration(kind, name, meta["options"])}
    if "tasks" in meta:
        if kind not in hookspecs.DEFAULT_TASKS:
            raise TypeError(f"{kind} {name!r}: tasks= applies to heads, datasets and strategies")
        tasks = meta["tasks"]
        if isinstance(tasks, str) or not tasks or not set(tasks) <= set(hookspecs.TASKS):
            raise TypeError(
                f"{kind} {name!r}: tasks must be a non-empty sequence of {hookspecs.TASKS}, "
                f"got {tasks!r}"
            )
        meta = {**meta, "tasks": tuple(tasks)}
    domains = meta.get("domains")
    if domains is not None:
        if kind != "dataset":
            raise TypeError(f"{kind} {name!r}: domains= applies to datasets only")
        if not isinstance(domains, hookspecs.OpenDomains):
            if isinstance(domains, str) or not all(isinstance(d, str) for d in domains):
                raise TypeError(
                    f"dataset {name!r}: domains must be a list of names or OpenDomains, "
                    f"got {domains!r}"
                )
            meta = {**meta, "domains": list(domains)}
    return meta


def check_domain(entry: Entry, sub: str | None, name: str | None = None) -> None:
    """Refuse a sub-domain the dataset ``entry`` does not declare (``domains=`` in its
    registration; none declared accepts any). ``name`` is how the study calls the dataset."""
    declared = entry.meta.get("domains")
    if not declared or not sub or sub in declared:
        return
    name = name or entry.name
    if isinstance(declared, hookspecs.OpenDomains):
        rule = f"{declared.help}, " if declared.help else ""
        message = f"unknown domain of {name!r} {sub!r} ({rule}e.g. {', '.join(declared.examples)})"
    else:
        message = unknown_message(f"domain of {name!r}", sub, list(declared))
        message += f" (it serves {', '.join(declared)})"
    raise UnknownPluginError(message)


def unknown_message(kind: str, name: str, known: list[str]) -> str:
    close = close_matches(name, known)
    suggestion = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}{suggestion}"


def _hook_like_names(obj: Any) -> list[str]:
    return [n for n in dir(obj) if hasattr(getattr(obj, n, None), f"{hookspecs.PROJECT}_impl")]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    loc = f" ({os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {text[0] if text else ''}{loc}"


_DEFAULT: Registry | None = None


def get_registry(*, reload: bool = False, strict: bool | None = None) -> Registry:
    """The process-wide registry, loading entry points on first use.

    ``HARNESS_PLUGINS`` limits which entry points load; ``HARNESS_STRICT_PLUGINS=1`` makes a
    broken plugin an error instead of a reported failure.
    """
    global _DEFAULT
    if _DEFAULT is None or reload:
        only_env = os.environ.get(ENV_PLUGINS)
        only = (
            [s.strip() for s in only_env.split(",") if s.strip()] if only_env is not None else None
        )
        if strict is None:
            strict = os.environ.get(ENV_STRICT, "") in ("1", "true", "yes")
        registry = Registry()
        registry.load_entry_points(only=only, strict=strict)
        _DEFAULT = registry
    return _DEFAULT
