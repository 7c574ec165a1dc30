"""The search: one Optuna study per (pair, method), then seeded final runs on the test split.

``build_driver(spec, registry, options)`` resolves a study's plugins and its storage and returns
the :class:`Driver` (its storage is opened once the preflight passes); ``driver.run()`` searches
and runs the final seeds. The driver is handed its collaborators (a :class:`ModelFactory`, a
:class:`DomainCache`, a :class:`Scorer`), each of which can be built, replaced and tested on its own.
"""

from harness.search.context import Context, RunOptions, make_context
from harness.search.domains import DomainCache
from harness.search.driver import Driver, build_driver
from harness.search.models import ModelFactory
from harness.search.objective import Objective, failure_reason
from harness.search.pruning import (
    Halving,
    asha_min_resource,
    describe_pruner,
    make_pruner,
    make_sampler,
)
from harness.search.resolve import ResolvedMethod, resolve_domain, resolve_methods
from harness.search.selection import Scorer, resolve_rule, selection_rule, selection_rules

__all__ = [
    "Context",
    "DomainCache",
    "Driver",
    "Halving",
    "ModelFactory",
    "Objective",
    "ResolvedMethod",
    "RunOptions",
    "Scorer",
    "asha_min_resource",
    "build_driver",
    "describe_pruner",
    "failure_reason",
    "make_context",
    "make_pruner",
    "make_sampler",
    "resolve_domain",
    "resolve_methods",
    "resolve_rule",
    "selection_rule",
    "selection_rules",
]
