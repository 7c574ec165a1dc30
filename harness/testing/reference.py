"""The tiny reference models a head or strategy is checked over, found by name in the registry.

The kit builds a plugin's head over a tiny backbone (``test_resnet`` unless told otherwise) and
trains a strategy through a tiny model, with the ``fpn`` segmentation head for segmentation. It
looks these up by name the way a study does, so that it depends on no plugin module. The
process-wide registry answers when it holds the name; a plugin's own tests often load that plugin
alone (``HARNESS_PLUGINS=my_plugin``), so the kit then asks every installed plugin.
"""

from __future__ import annotations

import functools

from harness.api import Backbone
from harness.registry import Entry, Registry, get_registry
from harness.training.engine import seed_everything

#: the segmentation head a strategy is trained with on segmentation data
SEGMENTATION_HEAD = "fpn"


def reference(kind: str, name: str) -> Entry:
    """The registered ``kind`` entry ``name``; raises the registry's errors when there is none."""
    registry = get_registry()
    if name not in registry.entries[kind] and name not in registry.conflicts[kind]:
        registry = _installed()
    return registry.get(kind, name)


@functools.cache
def _installed() -> Registry:
    registry = Registry()
    registry.load_entry_points()
    return registry


def tiny_backbone(name: str) -> Backbone:
    """The backbone ``name`` with random weights, built under seed 0."""
    factory = reference("backbone", name).factory
    seed_everything(0)
    return factory(name, weights="none")
