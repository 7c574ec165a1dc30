"""Where and in what precision a trial computes, and the seeding of the global generators."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f'device {spec!r} asked for, but CUDA is not available here (use "auto" or "cpu")'
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {spec!r} asked for, but there are {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` (the current device) and ``cuda:0`` are, when 0 is
    the current device; tensors report the indexed form."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


@dataclass(frozen=True)
class Precision:
    """How tensors are computed: bf16 autocast and channels_last on CUDA, fp32 elsewhere."""

    autocast_bf16: bool
    channels_last: bool

    @classmethod
    def for_device(cls, device: torch.device, spec: str = "auto") -> Precision:
        """A pinned choice, or for "auto" the static default (the search probes per backbone
        instead: see ``harness.training.probe``)."""
        if spec == "fp32":
            return cls(False, False)
        if spec == "bf16":
            return cls(True, device.type == "cuda")
        if spec in ("fp32-channels_last", "bf16-channels_last"):
            return cls(spec.startswith("bf16"), True)
        return cls(device.type == "cuda", device.type == "cuda")

    def autocast(self, device: torch.device):
        if self.autocast_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def describe(self) -> str:
        return ("bf16-autocast" if self.autocast_bf16 else "fp32") + (
            "+channels_last" if self.channels_last else ""
        )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the CPU one and every CUDA device's).

    The same seeds as ``torch.manual_seed``, without its queueing a seed for every other
    accelerator backend torch is built with (each with a recorded stack trace), which a trial
    would pay twice."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)


@contextmanager
def generators_kept(seed: int | None = None) -> Iterator[None]:
    """Run the block without moving Python's, NumPy's or torch's CPU generator (seeding torch's
    with ``seed`` first, if given): what it draws leaves the caller's random numbers as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
