"""Transfer-learning benchmark harness.

Importing this package stays light (no torch, optuna or pandas) so that the CLI starts quickly.
Plugin authors import ``hookimpl`` from here or from ``harness.api``, which holds the rest of the
plugin surface (types, errors, helpers); the hooks are specified in ``harness.hookspecs``.
"""

from harness.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
