"""Where a domain's images live during a run: on the device whole, when they fit a share of its
free memory, or on the host (in memory, or mapped from the decoded-image cache) with batches
gathered and copied ahead of use (``harness.training.loader``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from harness.api.data import DomainData

SPLITS = ("train", "val", "test")


def domain_bytes(data: DomainData) -> int:
    """Bytes the domain's three splits take on the device once moved there whole."""
    return sum(getattr(data, s).nbytes for s in SPLITS)


def free_device_memory(device: torch.device) -> int | None:
    """Free memory of a GPU in bytes (None for the CPU, where nothing is moved)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def decide(
    nbytes: int, free: int | None, placement: str, share: float
) -> tuple[str, dict[str, Any]]:
    """``"device"`` or ``"host"`` for a domain of ``nbytes`` given the device's ``free`` memory
    (None: the CPU, where the domain stays where it is), with the figures behind the choice."""
    figures: dict[str, Any] = {"bytes": nbytes, "placement": placement}
    if free is None:
        return "host", figures
    figures |= {"free_bytes": free, "device_share": share}
    if placement == "stream":
        return "host", figures
    if placement == "device" or nbytes <= share * free:
        return "device", figures
    return "host", figures


def place(
    data: DomainData,
    device: torch.device,
    placement: str,
    share: float,
    log: Callable[[str], None],
) -> DomainData:
    """``data`` with its splits on the device, or left on the host, as :func:`decide` says; the
    decision and its figures are logged and kept in ``meta["placement"]``."""
    nbytes = domain_bytes(data)
    where, figures = decide(nbytes, free_device_memory(device), placement, share)
    streamed = where == "host" and (device.type != "cpu" or placement == "stream")
    if device.type != "cpu" or placement == "stream":
        free = figures.get("free_bytes")
        room = f" of {free / 2**30:.2f} GiB free" if free is not None else ""
        how = "whole on the device" if where == "device" else "on the host, batches streamed"
        log(f"domain {data.name}: {nbytes / 2**30:.2f} GiB{room}: {how}")
    splits = {s: getattr(data, s) for s in SPLITS}
    if where == "device":
        splits = {s: split.to(device) for s, split in splits.items()}
    meta = dict(data.meta)
    if streamed or where == "device":
        meta["placement"] = {"where": "device" if where == "device" else "host", **figures}
    return DomainData(
        name=data.name,
        task=data.task,
        class_names=data.class_names,
        fingerprint=data.fingerprint,
        meta=meta,
        **splits,
    )
