"""A study's ``[[pairs]]``: one source or several and a target (:class:`Pair`), the
``leave_one_out`` tables that expand into pairs, and the checks that a pair's domains differ."""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from harness.study_tables import StrictModel


class Pair(StrictModel):
    #: one domain, or several (a multi-source pair: a one-element list is read as its domain)
    source: str | list[str]
    target: str = Field(min_length=1)
    #: source and target are one domain on purpose (an in-domain reference): allowed, and its rows
    #: are labelled in-domain; without it such a pair is refused as a mistake
    in_domain: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Any:
        names = v if isinstance(v, list) else [v]
        if not names or not all(isinstance(s, str) and s for s in names):
            raise ValueError(f"expected a domain or a non-empty list of domains, got {v!r}")
        twice = sorted({s for s in names if names.count(s) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} is listed twice; each source domain once")
        return names[0] if len(names) == 1 else names

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # written only when set: the configuration of every study begun before it stays the same
        data = handler(self)
        if not self.in_domain:
            data.pop("in_domain", None)
        return data

    @property
    def sources(self) -> list[str]:
        """The source domains, always a list (one element for a one-source pair)."""
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @property
    def source_name(self) -> str:
        """The sources as one name: ``a`` for one, ``a+b+c`` for several."""
        return "+".join(self.sources)

    @property
    def key(self) -> str:
        return f"{self.source_name}->{self.target}"


#: the keys a ``[[pairs]]`` table with ``leave_one_out`` may hold
LEAVE_ONE_OUT = "leave_one_out"


def expand_leave_one_out(tables: list[Any]) -> tuple[list[Any], list[str]]:
    """``[[pairs]] leave_one_out = [d1, d2, d3, ...]``: one pair per domain, that domain the
    target and the others (in the listed order) its sources; other tables are kept. Returns the
    pairs and the file key of each."""
    pairs: list[Any] = []
    where: list[str] = []
    for i, table in enumerate(tables):
        if not isinstance(table, dict) or LEAVE_ONE_OUT not in table:
            pairs.append(table)
            where.append(f"pairs[{i}]")
            continue
        key, domains = f"pairs[{i}].{LEAVE_ONE_OUT}", table[LEAVE_ONE_OUT]
        others = sorted(set(table) - {LEAVE_ONE_OUT})
        if others:
            raise ValueError(
                f"{key}: a leave_one_out table holds no other key (found {', '.join(others)}); "
                "write a pair with source and target in its own [[pairs]] table"
            )
        if not isinstance(domains, list) or not all(isinstance(d, str) and d for d in domains):
            raise ValueError(f"{key}: expected a list of domain names, got {domains!r}")
        twice = sorted({d for d in domains if domains.count(d) > 1})
        if twice:
            raise ValueError(f"{key}: {twice[0]!r} is listed twice; each domain once")
        if len(domains) < 3:
            raise ValueError(
                f"{key}: needs at least three domains (two sources and a held-out target), "
                f"got {len(domains)}"
            )
        for target in domains:
            pairs.append({"source": [d for d in domains if d != target], "target": target})
            where.append(key)
    return pairs, where


def pair_domain_problem(
    pair: Pair, identity: Callable[[str], Any], where: str, aliases: Container[str] = ()
) -> str | None:
    """Why ``pair``'s domains (compared by ``identity``: a dataset alias and its dataset are one)
    do not make a transfer, or None; ``where`` is the pair's key in the study file, ``aliases``
    the names of the study's ``datasets`` (named when two names are one domain through one)."""
    ids = [identity(s) for s in pair.sources]
    target = identity(pair.target)
    if len(pair.sources) == 1:
        if pair.in_domain or ids[0] != target:
            return None
        same = (
            repr(pair.source)
            if pair.source == pair.target
            else f"{pair.source!r} and {pair.target!r}"
        )
        return (
            f"{where}: source and target are the same domain ({same}), not a transfer; "
            "set in_domain = true on the pair if that is meant"
        )
    names = pair.sources
    twice = next(
        ((a, b) for k, a in enumerate(names) for b in names[k + 1 :] if identity(a) == identity(b)),
        None,
    )
    as_source = next((s for s, d in zip(names, ids, strict=True) if d == target), None)
    if where.endswith(LEAVE_ONE_OUT) and (twice or as_source):
        # one list of domains: a source that is the target is a domain listed twice in it
        a, b = twice or (pair.target, as_source)
        return f"{where}: {_listed_twice(a, b, aliases)}; each domain once"
    if twice is not None:
        return (
            f"{where}.source: {twice[0]!r} names a domain listed twice"
            f"{_through(*twice, aliases)}; each source domain once"
        )
    if as_source is not None:
        return (
            f"{where}: target {pair.target!r} is also a source"
            f"{_through(pair.target, as_source, aliases)}; the target of a pair with "
            "several sources must be none of them"
        )
    if pair.in_domain:
        return f"{where}.in_domain: an in-domain reference has one source"
    return None


def _alias(a: str, b: str, aliases: Container[str]) -> str | None:
    """Which of two names of one domain is a dataset alias (the second if both are)."""
    return next((n for n in (b, a) if n.partition("/")[0] in aliases), None)


def _through(a: str, b: str, aliases: Container[str]) -> str:
    """How ``b`` names the domain ``a`` names: nothing when the names are the same, else
    `` (as alias 'b')`` or `` (as 'b', through alias 'a')``."""
    if a == b:
        return ""
    alias = _alias(a, b, aliases)
    if alias == b:
        return f" (as alias {b!r})"
    return f" (as {b!r}, through alias {alias!r})" if alias else f" (as {b!r})"


def _listed_twice(a: str, b: str, aliases: Container[str]) -> str:
    """``'digits' is listed twice (through alias 'dig')`` for names ``a``, ``b`` of one domain."""
    alias = _alias(a, b, aliases)
    if alias is None:
        return f"{a!r} and {b!r} are one domain, listed twice"
    return f"{a if alias == b else b!r} is listed twice (through alias {alias!r})"
