"""One pytest test per contract check, as scikit-learn's ``parametrize_with_checks`` gives one per
estimator check, with a map of the checks a plugin is known to fail.

The checks of one entry share what they build (a check that needs a trained model runs after the
one that trains it), so the first test of an entry runs all of that entry's checks once, and each
test then reports its own result: a failed check fails its test, a check skipped for want of
options or not run because another check failed is skipped with that reason, and a check named in
``expected_failures`` is marked ``xfail`` (strict: once it passes, remove it from the map).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from harness.registry import Entry, Registry, unknown_message
from harness.testing.core import MAX_BACKBONES, NOT_RUN, SKIPPED, CheckResult, PluginCheckError
from harness.testing.plugin import (
    check_names,
    entry_options,
    entry_results,
    name_collision,
    plugin_entries,
    plugin_problems,
)

if TYPE_CHECKING:
    import pytest


class _Group:
    """The results of one entry's checks (or a plugin's own), computed on first use."""

    def __init__(self, run: Callable[[], list[CheckResult]]) -> None:
        self._run = run
        self._results: list[CheckResult] | None = None
        self._error: Exception | None = None

    def results(self) -> list[CheckResult]:
        if self._error is not None:
            raise self._error
        if self._results is None:
            try:
                self._results = self._run()
            except Exception as exc:
                self._error = exc
                raise
        return self._results


class ContractCheck:
    """One named check of one entry, as a test parameter: call it in the test to run it.

    ``id`` is ``"<kind>:<entry>/<check>"`` (``"strategy:my-da/strategy.trains"``), as
    :func:`~harness.testing.assert_passes` names the results of :func:`check_plugin`; ``entry``
    is the registry entry it checks (None for a plugin's own checks, ``plugin:<name>/...``).
    """

    def __init__(self, id: str, name: str, entry: Entry | None, group: _Group) -> None:
        self.id, self.name, self.entry = id, name, entry
        self._group = group

    def __repr__(self) -> str:
        return self.id

    def __call__(self) -> None:
        """Pass, fail with :class:`PluginCheckError`, or skip, as the check's result says."""
        __tracebackhide__ = True
        import pytest

        results = self._group.results()
        result = next((r for r in results if r.name == self.name), None)
        if result is None:
            note = next((r for r in results if r.passed and r.detail.startswith(SKIPPED)), None)
            if note is not None:
                pytest.skip(f"{note.name}: {note.detail}")
            raise AssertionError(
                f"{self.id}: the kit reported no such check, only {[r.name for r in results]}"
            )
        if result.detail.startswith(NOT_RUN if not result.passed else SKIPPED):
            pytest.skip(result.detail)
        if not result.passed:
            raise PluginCheckError([CheckResult(self.id, False, result.detail)], 1)


def parametrize_with_checks(
    entries: Registry | Iterable[Entry],
    plugin: str | None = None,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    expected_failures: Mapping[str, str] | None = None,
    max_backbones: int = MAX_BACKBONES,
) -> pytest.MarkDecorator:
    """A ``pytest.mark.parametrize`` over every contract check, one test id per check::

        @parametrize_with_checks(registry, "my_plugin", expected_failures={...})
        def test_my_plugin(check):
            check()

    ``entries`` is a registry and ``plugin`` the entry-point name of the plugin to check (every
    entry it registered, and the plugin's own load and name checks, as :func:`check_plugin`
    does), or a list of registry entries. ``options`` are the check functions' keyword arguments,
    by kind or by entry, as for :func:`check_plugin`. ``expected_failures`` maps a check's id
    (``"strategy:my-da/strategy.trains"``) or its name for every entry (``"strategy.trains"``) to
    the reason it fails; those checks are marked ``xfail``. A key that names no check is an error.
    """
    import pytest

    checks = _plugin_checks(entries, plugin, max_backbones, options)
    expected = dict(expected_failures or {})
    known = {c.id for c in checks} | {c.name for c in checks}
    unknown = [key for key in expected if key not in known]
    if unknown:
        raise ValueError(
            f"expected_failures: {unknown_message('check', unknown[0], sorted(known))}"
        )
    params = []
    for c in checks:
        reason = expected.get(c.id, expected.get(c.name))
        marks = (
            [pytest.mark.xfail(reason=reason, raises=PluginCheckError, strict=True)]
            if reason is not None
            else []
        )
        params.append(pytest.param(c, id=c.id, marks=marks))
    return pytest.mark.parametrize("check", params)


def _plugin_checks(
    entries: Registry | Iterable[Entry],
    plugin: str | None,
    max_backbones: int,
    options: Mapping[str, Mapping[str, Any]] | None,
) -> list[ContractCheck]:
    registry = entries if isinstance(entries, Registry) else None
    if registry is None:
        selected = list(entries)
    elif plugin is None:
        raise TypeError("parametrize_with_checks(registry, plugin): name the plugin to check")
    else:
        selected = plugin_entries(registry, plugin, max_backbones=max_backbones)
    out: list[ContractCheck] = []
    if registry is not None and plugin is not None:
        problems = plugin_problems(registry, plugin)
        group = _Group(lambda: problems)
        out += [ContractCheck(f"plugin:{plugin}/{r.name}", r.name, None, group) for r in problems]
    for entry in selected:
        key = f"{entry.kind}:{entry.name}"
        kwargs = entry_options(options, key)
        collision = name_collision(registry, entry) if registry is not None else None
        first = [collision] if collision else []
        group = _Group(lambda e=entry, k=kwargs, f=first: f + entry_results(e, k))
        names = [r.name for r in first] + check_names(entry, **kwargs)
        out += [ContractCheck(f"{key}/{name}", name, entry, group) for name in names]
    return out
