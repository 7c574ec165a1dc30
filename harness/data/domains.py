"""What a dataset plugin made, as a :class:`DomainData`: image files decoded through the cache
and split by the protocol, or in-memory data (re-split when the protocol is ``standard``)."""

from __future__ import annotations

from collections.abc import Callable

from harness.api.data import DomainData, ImageFiles
from harness.data.cache import load_decoded
from harness.data.splits import files_domain, standard_domain
from harness.errors import PluginContractError


def as_domain(
    made: DomainData | ImageFiles,
    stored_size: int | tuple[int, int],
    *,
    seed: int,
    protocol: str = "held-out",
    role: str = "source",
    plugin_key: str = "",
    log: Callable[[str], None] = print,
    what: str = "dataset factory",
) -> DomainData:
    """``made`` as a checked :class:`DomainData` of ``stored_size`` images (files decoded once
    into the decoded-image cache, keyed also by ``plugin_key``)."""
    if isinstance(made, ImageFiles):
        decoded = load_decoded(made, stored_size, plugin_key, log)
        data = files_domain(made, decoded, seed=seed, protocol=protocol, role=role)
    elif isinstance(made, DomainData):
        data = standard_domain(made, role, 0.2, seed) if protocol == "standard" else made
    else:
        raise PluginContractError(
            f"{what} returned {type(made).__name__}, not harness.api.DomainData or ImageFiles"
        )
    data.check(stored_size)
    return data
