"""Transfer-learning benchmark harness.

Importing this package stays light (no torch, optuna or pandas) so that the CLI starts quickly.
Plugin authors import ``hookimpl`` from here or from ``harness.api``, which holds the rest of the
plugin surface (types, errors, helpers); the hooks are specified in ``harness.hookspecs``.
"""

from harness.hookspecs import hookimpl
from harness.versions import HARNESS_VERSION as __version__

__all__ = ["__version__", "hookimpl", "load_model"]


def __getattr__(name: str):
    """``harness.load_model`` imports torch only when first used (PEP 562)."""
    if name == "load_model":
        from harness.models.load import load_model

        return load_model
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
