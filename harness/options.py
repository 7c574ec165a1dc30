"""A plugin's options: what each accepts, declared at registration or read from its factory, and the
check of a study's options against it before anything is built.

A plugin declares ``register(name, factory, options={"hidden": Option(int, min=1, default=256)})``;
one that declares nothing is checked against its factory's signature (a factory taking
``**options`` is then left to check its own). Every refusal is an ``OptionError``: one line naming
the option, the plugin and what is allowed.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError

#: what the harness itself passes each kind's factory: never a study's option
RESERVED = {
    "head": frozenset({"backbone", "num_classes", "task"}),
    "dataset": frozenset({"image_size", "seed"}),
    "strategy": frozenset(),
}
#: positional parameters the harness passes first (a dataset's ``domain``)
POSITIONAL = {"head": 0, "dataset": 1, "strategy": 0}
#: what ``register(options=...)`` takes: the options by name, or a function that returns them
#: (called when first needed, for options a library defines, as the smp decoders' do)
Declared = Mapping[str, "Option"] | Callable[[], Mapping[str, "Option"]]

_NO_DEFAULT: Any = inspect.Parameter.empty
_WORDS = {int: "an int", float: "a number", str: "a string", bool: "true or false"}
_WORDS.update({list: "a list", dict: "a table"})


class OptionError(HarnessError):
    """A study's option that the plugin does not accept: unknown, missing, or a bad value."""


@dataclass(frozen=True)
class Option:
    """One option of a plugin: its type (``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``,
    a tuple of them, or ``None`` for any value), an inclusive range (``min``, ``max``) or an
    exclusive one (``gt``, ``lt``), the allowed values (``choices``), the factory's ``default``
    (``None`` there also allows ``None``) and one line of ``help``.

    An int is accepted where a float is declared (TOML writes ``0`` for ``0.0``); a bool is
    never an int.
    """

    type: type | tuple[type, ...] | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    default: Any = _NO_DEFAULT
    help: str = ""

    def check(self, name: str, value: Any) -> None:
        """Raise ``OptionError`` ("hidden must be an int >= 1, got -5") unless ``value`` fits."""
        if value is None and self.default is None:
            return
        if self.choices is not None:
            if value not in self.choices:
                allowed = ", ".join(repr(c) for c in self.choices)
                raise OptionError(f"{name} must be one of {allowed}, got {value!r}")
            return
        if not (self._type_ok(value) and self._range_ok(value)):
            raise OptionError(f"{name} must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        """What the option accepts, in words: "an int >= 1", "a number from 0 to 1"."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        types = self._types()
        words = " or ".join(_WORDS.get(t, f"a {t.__name__}") for t in types) or "any value"
        bounds = []
        if self.min is not None and self.max is not None:
            bounds.append(f"from {self.min} to {self.max}")
        else:
            bounds += [f">= {self.min}"] if self.min is not None else []
            bounds += [f"<= {self.max}"] if self.max is not None else []
        bounds += [f"> {self.gt}"] if self.gt is not None else []
        bounds += [f"< {self.lt}"] if self.lt is not None else []
        return " ".join([words, *bounds]) if bounds else words

    def _types(self) -> tuple[type, ...]:
        if self.type is None:
            return ()
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def _type_ok(self, value: Any) -> bool:
        types = self._types()
        if not types:
            return True
        for t in types:
            if t in (int, float) and isinstance(value, bool):
                continue
            if t is float and isinstance(value, int | float):
                return True
            if t is list and isinstance(value, list | tuple):
                return True
            if isinstance(value, t):
                return True
        return False

    def _range_ok(self, value: Any) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return True
        return not (
            (self.min is not None and value < self.min)
            or (self.max is not None and value > self.max)
            or (self.gt is not None and value <= self.gt)
            or (self.lt is not None and value >= self.lt)
        )


def close_matches(name: str, known: list[str]) -> list[str]:
    """Up to three of ``known`` that look like ``name`` (a typo, or a part of the name)."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [k for k in known if lowered in k][:3]
    return close


def checked_declaration(kind: str, name: str, declared: Any) -> Declared:
    """``register(options=...)`` as given, or a ``TypeError`` saying what it must be."""
    if kind not in RESERVED:
        raise TypeError(f"{kind} {name!r}: options= applies to heads, datasets and strategies")
    if callable(declared) and not isinstance(declared, Mapping):
        return declared
    if not isinstance(declared, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Option) for k, v in declared.items()
    ):
        raise TypeError(
            f"{kind} {name!r}: options must map option names to harness.api.Option, "
            f"got {declared!r}"
        )
    reserved = sorted(RESERVED[kind] & set(declared))
    if reserved:
        raise TypeError(f"{kind} {name!r}: {', '.join(reserved)} is passed by the harness")
    return dict(declared)


def declared_options(meta: Mapping[str, Any]) -> dict[str, Option] | None:
    """The options an entry declared with ``register(options=...)``, or ``None``."""
    declared = meta.get("options")
    if declared is None:
        return None
    return dict(declared() if callable(declared) else declared)


def factory_parameters(factory: Callable[..., Any], kind: str) -> dict[str, bool] | None:
    """The options ``factory`` takes by its signature, name -> required; ``None`` when it takes
    ``**options`` (it checks its own) or has no signature. A ``Strategy`` subclass that keeps the
    base ``__init__`` takes none."""
    if _keeps_strategy_init(factory):
        return {}
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    skip = POSITIONAL.get(kind, 0)
    out: dict[str, bool] = {}
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if positional and skip > 0:
            skip -= 1
            continue
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) or p.name in RESERVED.get(kind, ()):
            continue  # not something a study can pass by name
        out[p.name] = p.default is p.empty
    return out


def _keeps_strategy_init(factory: Any) -> bool:
    init = getattr(factory, "__init__", None) if inspect.isclass(factory) else None
    return getattr(init, "__qualname__", "") == "Strategy.__init__" and (
        getattr(init, "__module__", "") == "harness.api.strategy"
    )


def check_options(entry: Any, options: Mapping[str, Any], called: str | None = None) -> None:
    """Refuse ``options`` that the registry ``entry`` (a head, dataset or strategy) does not accept:
    an unknown name (with the closest and the allowed ones), a missing required one, or a value
    outside its declared type and range. ``called`` is how the study names the entry."""
    what = f"{entry.kind} {called or entry.name!r}"
    declared = declared_options(entry.meta)
    params = factory_parameters(entry.factory, entry.kind)
    allowed = list(declared) if declared is not None else list(params or {})
    if declared is not None or params is not None:
        for key in options:
            if key not in allowed:
                raise OptionError(unknown_option(key, what, allowed))
    for key, required in (params or {}).items():
        if required and key not in options:
            raise OptionError(f"missing option {key!r} of {what} (allowed: {', '.join(allowed)})")
    for key, value in options.items():
        if declared is not None and key in declared:
            declared[key].check(key, value)


def unknown_option(key: str, what: str, allowed: list[str]) -> str:
    """ "unknown option 'hiden' of head 'mlp'; did you mean 'hidden'? (allowed: hidden, dropout)"."""
    if not allowed:
        return f"unknown option {key!r} of {what} (it takes no options)"
    close = close_matches(key, allowed)
    suggestion = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown option {key!r} of {what}{suggestion} (allowed: {', '.join(allowed)})"


def signature_mismatches(
    factory: Callable[..., Any], kind: str, meta: Mapping[str, Any]
) -> list[str]:
    """How declared options disagree with the factory (the contract kit's check): a declared
    option the factory does not take, a required parameter not declared, a declared default
    that is not the factory's."""
    declared = declared_options(meta)
    if declared is None:
        return []
    params = factory_parameters(factory, kind)
    problems = []
    if params is not None:
        extra = [k for k in declared if k not in params]
        if extra:
            problems.append(f"declared option(s) {', '.join(extra)} not parameters of the factory")
        undeclared = [k for k, required in params.items() if required and k not in declared]
        if undeclared:
            problems.append(f"required parameter(s) {', '.join(undeclared)} not declared")
        defaults = _defaults(factory)
        problems += [
            f"option {k!r} declares default {o.default!r}, the factory's is {defaults[k]!r}"
            for k, o in declared.items()
            if o.default is not _NO_DEFAULT and k in defaults and defaults[k] != o.default
        ]
    return problems


def _defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in sig.parameters.values() if p.default is not p.empty}
