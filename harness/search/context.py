"""What every part of a run shares: the study, the plugins, the device and the log; and how a run
is set up (:class:`RunOptions`)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.registry import Registry
from harness.study import StudySpec, spec_error
from harness.training.engine import Precision, resolve_device


@dataclass
class RunOptions:
    results_dir: Path
    storage: str | None = None
    log: Callable[[str], None] = print
    progress: Callable[[dict[str, Any]], None] | None = None
    #: worker processes sharing the storage on this machine (chooses the embedded storage)
    workers: int = 1
    #: this process's index among them; None for a lone ``harness run``
    rank: int | None = None
    #: seconds between looks at studies that other processes are still working on
    poll_s: float = 1.0
    #: the seed the sampler's suggestions start from, when not the study's (benchmarks compare
    #: searches over several; what is recorded as the study's sampler seed stays the study's)
    sampler_seed: int | None = None


@dataclass(frozen=True)
class Context:
    """The study, the plugins it resolves against, the device it runs on and where it logs."""

    spec: StudySpec
    registry: Registry
    device: torch.device
    #: the study's pinned precision (for "auto", the device's default until a backbone is probed)
    precision: Precision
    log: Callable[[str], None] = print


def make_context(
    spec: StudySpec, registry: Registry, log: Callable[[str], None] = print
) -> Context:
    """The run's context; a device the machine lacks is the study file's error."""
    try:
        device = resolve_device(spec.device)
    except (RuntimeError, ValueError) as exc:
        raise spec_error(spec, "device", str(exc)) from None
    return Context(spec, registry, device, Precision.for_device(device, spec.precision), log)


def release_memory(device: torch.device) -> None:
    """Hand a finished trial's memory back to the device. A trial's tensors go with their last
    reference; collecting cycles matters only where the caching allocator can then hand their
    memory back, so it is done on CUDA only."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
