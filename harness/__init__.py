"""Transfer-learning benchmark harness.

Importing this package stays light (no torch, optuna or pandas) so that the CLI starts quickly;
plugin authors import ``hookimpl`` from here and the data types from ``harness.api``.
"""

from harness.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
