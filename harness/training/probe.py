"""``precision = "auto"``: time a few training steps in each precision and memory format, keep the
fastest, and remember the answer on disk.

Whether bf16 autocast or channels_last pays depends on the backbone, the image size, the batch
size and the hardware (on a CPU with AMX, bf16 + channels_last can be twice as fast for one model
at 64 px and slower for another at 32 px), so it is measured rather than guessed. The answer is
cached under ``HARNESS_CACHE_DIR/precision/``, keyed by backbone, image size, batch size, device
name, thread count and torch version, so each combination is probed once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.fileio import atomic_path, cache_dir
from harness.training.device import Precision

#: explicit choices a study may pin, besides "auto"
NAMES = ("fp32", "fp32-channels_last", "bf16", "bf16-channels_last")
WARMUP_STEPS = 2
TIMED_STEPS = 3


def from_name(name: str, device: torch.device) -> Precision:
    """A pinned precision. ``"bf16"`` keeps its old meaning (channels_last on CUDA only)."""
    if name not in NAMES:
        raise ValueError(f"unknown precision {name!r}; use 'auto' or one of {', '.join(NAMES)}")
    return Precision.for_device(device, name)


ALL = [Precision(bf16, cl) for bf16 in (False, True) for cl in (False, True)]


def candidates(device: torch.device) -> list[Precision]:
    """What "auto" chooses from. On CUDA: all four. On a CPU only the fp32 layouts, unless
    ``HARNESS_PROBE_CPU_BF16=1``: bf16 autocast can be twice as fast there (AMX), but on this
    project's machine (torch 2.14.1, oneDNN) its convolution backward returned NaN weight
    gradients a few steps into training, so it is not picked silently; pin it to use it."""
    if device.type == "cuda" or os.environ.get("HARNESS_PROBE_CPU_BF16") == "1":
        return list(ALL)
    return [p for p in ALL if not p.autocast_bf16]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{name or platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    )


def probe_key(
    backbone: str, image_size: int, batch_size: int, device: torch.device
) -> dict[str, Any]:
    return {
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": device_name(device),
        "torch": torch.__version__,
    }


def _cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "precision" / f"{digest}.json"


def choose(
    key: dict[str, Any],
    options: list[Precision],
    measure: Callable[[Precision], float],
    log: Callable[[str], None] = print,
) -> tuple[Precision, dict[str, Any]]:
    """The fastest of ``options`` by ``measure`` (seconds per step, lower is better), read from the
    on-disk cache when this key was probed before. A candidate that raises is skipped."""
    path = _cache_file(key)
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("key") == key:
                choice = record["choice"]
                log(f"precision auto for {_label(key)}: {choice} (probed before, {path})")
                return Precision(choice["autocast_bf16"], choice["channels_last"]), record
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable record is probed again
    timings: dict[str, float] = {}
    for p in options:
        try:
            timings[p.describe()] = float(measure(p))
        except Exception as exc:  # noqa: BLE001 - a precision the hardware cannot run is just not chosen
            log(f"precision probe: {p.describe()} failed ({type(exc).__name__}: {str(exc)[:120]})")
    if not timings:
        raise RuntimeError(f"precision probe for {_label(key)}: every candidate failed")
    best = min(options, key=lambda p: timings.get(p.describe(), float("inf")))
    record = {
        "key": key,
        "choice": {
            "autocast_bf16": best.autocast_bf16,
            "channels_last": best.channels_last,
            "name": best.describe(),
        },
        "seconds_per_step": timings,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    shown = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timings.items())
    log(
        f"precision auto for {_label(key)}: {best.describe()} (per training step: {shown}; cached in {path})"
    )
    return best, record


def _label(key: dict[str, Any]) -> str:
    return (
        f"{key['backbone']} at {key['image_size']} px, batch {key['batch_size']} on {key['device']}"
    )


def step_timer(
    build: Callable[[], Any],
    image_size: int,
    batch_size: int,
    device: torch.device,
    *,
    warmup: int = WARMUP_STEPS,
    steps: int = TIMED_STEPS,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[[Precision], float]:
    """A ``measure`` for ``choose``: the fastest of ``steps`` full training steps (forward,
    backward, AdamW) of a freshly built model on random images, after ``warmup`` untimed ones."""

    def measure(precision: Precision) -> float:
        torch.manual_seed(0)
        model = build().to(device)
        if precision.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randn(batch_size, 3, image_size, image_size, device=device)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        best = float("inf")
        for i in range(warmup + steps):
            timed = i >= warmup
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = clock() if timed else 0.0
            with precision.autocast(device):
                out = model(x)
            loss = out.float().square().mean()  # any output shape: logits or segmentation maps
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            else:
                loss.detach().item()  # CPU work is synchronous; reading the loss keeps the step honest
            if timed:
                best = min(best, clock() - t0)
        return best

    return measure


def resolve(
    spec: str,
    device: torch.device,
    *,
    backbone: str,
    image_size: int,
    batch_size: int,
    build: Callable[[], Any],
    log: Callable[[str], None] = print,
) -> Precision:
    """The precision a method trains in: the pinned one, or for "auto" the probed fastest."""
    if spec != "auto":
        return from_name(spec, device)
    key = probe_key(backbone, image_size, batch_size, device)
    measure = step_timer(build, image_size, batch_size, device)
    return choose(key, candidates(device), measure, log)[0]
