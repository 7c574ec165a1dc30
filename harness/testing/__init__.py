"""Contract checks for harness plugins, to call from a plugin's own test suite.

The hooks in :mod:`harness.hookspecs` describe what a backbone, head, dataset or strategy factory
(and a plugin's command) must do. This module checks it, in the spirit of scikit-learn's ``check_estimator``: each
``check_*`` function builds the thing from its factory, runs a list of named checks on it and
returns one :class:`CheckResult` per check. One failing check never hides the others: each runs on
its own, and a check that cannot run because an earlier one failed says so (``"not run: ..."``).
:func:`assert_passes` turns the results into a single test failure listing every failed check.

Use it in your plugin's tests (plain pytest; CPU only, a few seconds per entry)::

    # tests/test_contract.py of your plugin's distribution
    from harness.testing import assert_passes, check_backbone, check_dataset, check_strategy

    from my_package.plugin import MyStrategy, build_my_dataset, build_my_net


    def test_strategy_honours_the_contract():
        assert_passes(check_strategy(MyStrategy))


    def test_strategy_with_options():
        assert_passes(check_strategy(MyStrategy, options={"shots": 5}))


    def test_backbone_honours_the_contract():
        assert_passes(check_backbone(build_my_net, "my-net", image_size=32))


    def test_dataset_honours_the_contract():
        for domain in ("plain", "noisy"):
            assert_passes(check_dataset(build_my_dataset, domain, options={"n": 60}))

Or check everything the plugin registers, exactly as the harness loads it (the plugin must be
installed, e.g. ``pip install -e .``)::

    from harness.testing import Registry, assert_passes, check_plugin


    def test_whole_plugin():
        registry = Registry()
        registry.load_entry_points(only=["my_plugin"], strict=True)  # the entry-point name
        assert_passes(check_plugin(registry, "my_plugin"))

Or get one pytest test per check, as scikit-learn's ``parametrize_with_checks`` does, with the
checks your plugin is known to fail marked ``xfail`` (strict: an expected failure that passes
fails the run, so that the map stays true)::

    from harness.testing import Registry, parametrize_with_checks

    registry = Registry()
    registry.load_entry_points(only=["my_plugin"], strict=True)


    @parametrize_with_checks(
        registry,
        "my_plugin",
        options={"dataset": {"image_size": 16}},
        expected_failures={"strategy:my-da/strategy.trains": "needs 64 px images"},
    )
    def test_my_plugin(check):
        check()

Test ids read ``strategy:my-da/strategy.trains``; a key of ``expected_failures`` is such an id, or
a check name (``strategy.trains``) for every entry. The first test of an entry runs all of that
entry's checks once; a check skipped for want of options, or not run because another check
failed, is skipped with that reason. ``parametrize_with_checks([entry, ...])`` takes registry
entries instead of a plugin.

What is checked
---------------
- backbone: the factory returns a ``Backbone``; its stages cover every parameter exactly once
  (``Backbone.check``), none is empty, they run stem first; a float batch gives finite
  ``(N, num_features)`` features; ``mean``/``std`` are 3 values for pixels in [0, 1]; freeze depth
  ``k`` leaves exactly the later stages trainable; one optimiser step trains it with finite
  gradients; ``weights="none"`` is reproducible under the seed the harness sets. Pretrained
  weights (``"imagenet"``) are not checked: they may need a network.
- head: for every task it declares, built over a tiny timm backbone (``test_resnet``), it maps a
  batch to ``(N, num_classes)`` logits (classification) or ``(N, num_classes, H, W)``
  (segmentation), backpropagates, and rejects an unknown option with ``TypeError``.
- dataset: the factory returns a ``DomainData`` that passes ``DomainData.check``, with the asked
  image size, a declared task and unique class names; train and test/val do not share images
  (compared by their bytes; up to 10% is tolerated for real data with duplicates); it is
  deterministic; its fingerprint follows its data.
- strategy: the factory returns a ``Strategy`` with consistent declarations; ``search_space``
  names start with ``strategy.``; it rejects an unknown option with ``TypeError``; it trains a tiny
  model for a few steps through the harness's own engine with a finite loss, and the engine hands
  it target labels only as ``target_labels`` allows.
- command: its name is not a built-in command, typer can build ``harness <name> --help`` from
  its signature, and it has a description or docstring. Nothing is run.
- plugin (``check_plugin`` and ``parametrize_with_checks`` over a registry): it loaded, and no
  other installed plugin declares its entry-point name or registers one of its entries' names.

Each check function accepts a registry :class:`~harness.registry.Entry` (its factory, name and
metadata such as ``tasks`` are used) or the bare factory. The checks seed torch, numpy and
``random`` themselves and restore the caller's random state afterwards.

The package holds one module per plugin kind (``backbones``, ``heads``, ``datasets``,
``strategies``, ``commands``), ``plugin`` for whole plugins, ``parametrize`` for the pytest helper
and ``core`` for the results and the runner they share; import from ``harness.testing``.
"""

from __future__ import annotations

from harness.registry import Registry, get_registry
from harness.testing.backbones import check_backbone
from harness.testing.commands import check_command
from harness.testing.core import (
    DUPLICATE_TOLERANCE,
    KNOWN_FIXED,
    MAX_BACKBONES,
    NUM_CLASSES,
    TARGET_LABELS,
    TASKS,
    UNKNOWN_OPTION,
    CheckResult,
    EntryOrFactory,
    PluginCheckError,
    assert_passes,
)
from harness.testing.datasets import check_dataset
from harness.testing.heads import check_head
from harness.testing.metrics import check_metric
from harness.testing.parametrize import ContractCheck, parametrize_with_checks
from harness.testing.plugin import CHECKED_KINDS, check_entry, check_names, check_plugin
from harness.testing.strategies import check_strategy
from harness.testing.validators import check_validator

__all__ = [
    "Registry",
    "get_registry",
    "CHECKED_KINDS",
    "DUPLICATE_TOLERANCE",
    "KNOWN_FIXED",
    "MAX_BACKBONES",
    "NUM_CLASSES",
    "TARGET_LABELS",
    "TASKS",
    "UNKNOWN_OPTION",
    "CheckResult",
    "ContractCheck",
    "EntryOrFactory",
    "PluginCheckError",
    "assert_passes",
    "check_backbone",
    "check_command",
    "check_dataset",
    "check_entry",
    "check_head",
    "check_names",
    "check_plugin",
    "check_strategy",
    "check_validator",
    "check_metric",
    "parametrize_with_checks",
]
