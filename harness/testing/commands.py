"""Command checks: a plugin's subcommand has a free name, a signature typer reads, and a help text."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from harness.registry import BUILTIN_COMMANDS, Entry
from harness.testing.core import CheckResult, Checks, EntryOrFactory, Fail, describe, unpack

#: the checks, in the order they run (``command.<check>``)
CHECKS = ("name", "help", "docs")


def check_command(entry_or_function: EntryOrFactory, name: str | None = None) -> list[CheckResult]:
    """Check a command registered with ``register_commands``: ``function`` becomes ``harness <name>``.

    ``name`` is the subcommand name (from the entry when an Entry is given; for a bare function
    its name with ``-`` for ``_``). The command is mounted on a fresh typer app the way the
    harness mounts it and asked for ``--help``; nothing is run. Checks, named
    ``command.<check>``: ``name`` (not a built-in command), ``help`` (typer accepts the
    signature) and ``docs`` (a description or docstring for ``harness --help``).
    """
    function, entry_name, _ = unpack(entry_or_function, "command")
    description = entry_or_function.description if isinstance(entry_or_function, Entry) else ""
    name = name or entry_name or getattr(function, "__name__", "").replace("_", "-")
    c = Checks("command")
    c.run("name", lambda: _command_name(name))
    c.run("help", lambda: _command_help(function, name, description))
    c.run("docs", lambda: _command_docs(function, description))
    return c.results


def _command_name(name: str) -> None:
    if not name:
        raise Fail("the command has no name")
    if name in BUILTIN_COMMANDS:
        raise Fail(
            f"{name!r} is a built-in harness command, so the harness refuses to add it; pick another name"
        )


def _command_help(function: Callable[..., Any], name: str, description: str) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _group() -> None:
        """A group, so that the command is reached by its name as under ``harness``."""

    how = "declare parameters the way typer reads them (type hints, typer.Option defaults)"
    try:
        app.command(name or "command", help=description or None)(function)
        result = CliRunner().invoke(app, [name or "command", "--help"])
    except Exception as exc:  # noqa: BLE001 - typer refuses signatures in many ways
        raise Fail(f"`harness {name} --help` fails: {describe(exc)}; {how}") from None
    if result.exit_code != 0:
        why = describe(result.exception) if result.exception else result.output.strip()[-300:]
        raise Fail(f"`harness {name} --help` fails (exit {result.exit_code}): {why}; {how}")


def _command_docs(function: Callable[..., Any], description: str) -> None:
    if not (description or "").strip() and not (inspect.getdoc(function) or "").strip():
        raise Fail(
            "no description and no docstring: `harness --help` would list the command without a "
            "word; pass description= to register() or give the function a docstring"
        )


def check_names() -> list[str]:
    """The names :func:`check_command` reports, without running it."""
    return [f"command.{n}" for n in CHECKS]
