"""Write the hook reference of ``docs/plugins.md`` from ``harness/hookspecs.py``.

The reference is each hook's docstring, verbatim, in the order the hooks are defined, between two
marker lines; everything else in the page is written by hand. ``tests/test_registry.py`` fails when
the committed page differs from what this script writes, so the two cannot drift::

    python docs/hook_reference.py          # rewrite docs/plugins.md in place
    python docs/hook_reference.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from harness import hookspecs

PAGE = Path(__file__).with_name("plugins.md")
BEGIN = "<!-- hook reference: generated from harness/hookspecs.py by docs/hook_reference.py -->"
END = "<!-- end of hook reference -->"


def reference() -> str:
    """The generated section, markers included."""
    parts = [
        BEGIN,
        "",
        f"Names: {hookspecs.NAME_RULE}.",
        "",
        "### The `register` callback",
        "",
        inspect.getdoc(hookspecs.Register) or "",
    ]
    hooks = [obj for obj in vars(hookspecs).values() if hookspecs._is_hookspec(obj)]
    for hook in hooks:
        parts += ["", f"### `{hook.__name__}(register)`", "", inspect.getdoc(hook) or ""]
    return "\n".join(parts + ["", END])


def render(page: str) -> str:
    """``page`` with its reference section replaced by the generated one."""
    head, found, rest = page.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"{PAGE} lacks the markers {BEGIN!r} ... {END!r}")
    return head + reference() + tail


def main(argv: list[str]) -> int:
    page = PAGE.read_text()
    fresh = render(page)
    if "--check" in argv:
        return 0 if fresh == page else 1
    PAGE.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
