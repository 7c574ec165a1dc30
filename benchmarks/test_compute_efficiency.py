"""Precision probe and compute efficiency: for each model and image size, the training-step time in
fp32 / bf16 autocast x contiguous / channels_last (what ``precision = "auto"`` measures), the pick,
and the achieved GFLOP/s (counted with FlopCounterMode) over the machine's measured fp32 matmul peak."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.training import probe
from harness.training.engine import Precision, TransferModel, resolve_device, seed_everything
from harness_plugins.heads import build_linear
from harness_plugins.timm_backbones import build_timm_backbone

BATCH = 64
_PEAK: dict[str, float] = {}


def matmul_peak_gflops(device: torch.device, n: int = 2048, rounds: int = 5) -> float:
    """The machine's fp32 matmul rate: the best of a few timed n x n products (2 n^3 FLOPs each)."""
    if str(device) in _PEAK:
        return _PEAK[str(device)]
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    _PEAK[str(device)] = 2 * n**3 / best / 1e9
    return _PEAK[str(device)]


def _build(name: str):
    def build() -> TransferModel:
        bb = build_timm_backbone(name, weights="none")
        return TransferModel(bb, build_linear(backbone=bb, num_classes=10, task="classification"))

    return build


def train_step_flops(build, size: int, device: torch.device) -> int:
    """FLOPs of one training step (forward and backward) on a batch, as FlopCounterMode counts them."""
    model = build().to(device).train()
    x = torch.randn(BATCH, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_precision_probe_and_flops(benchmark, name, size):
    device = resolve_device("auto")
    seed_everything(0)
    build = _build(name)
    peak = matmul_peak_gflops(device)
    flops = train_step_flops(build, size, device)
    measure = probe.step_timer(build, size, BATCH, device, warmup=2, steps=4)
    options = probe.ALL  # all four, bf16 included, to show what it would buy (see probe.candidates)
    times = {p.describe(): measure(p) for p in options}
    best = min(options, key=lambda p: times[p.describe()])
    auto = min(
        probe.candidates(device), key=lambda p: times[p.describe()]
    )  # what precision = "auto" picks
    # pytest-benchmark's own table: the auto pick's training step, timed again
    benchmark.pedantic(measure, args=(auto,), rounds=1, iterations=1)
    fp32 = times[Precision(False, False).describe()]
    gflops = {k: flops / v / 1e9 for k, v in times.items()}
    benchmark.extra_info.update(
        {
            "model": name,
            "image_size": size,
            "batch": BATCH,
            "device": probe.device_name(device),
            "seconds_per_step": {k: round(v, 4) for k, v in times.items()},
            "auto_pick": auto.describe(),
            "fastest": best.describe(),
            "speedup_auto_over_fp32": round(fp32 / times[auto.describe()], 2),
            "speedup_fastest_over_fp32": round(fp32 / times[best.describe()], 2),
            "train_step_gflop": round(flops / 1e9, 3),
            "gflops": {k: round(v, 1) for k, v in gflops.items()},
            "matmul_peak_gflops_fp32": round(peak, 1),
            "fraction_of_peak": {k: round(v / peak, 3) for k, v in gflops.items()},
        }
    )
    shown = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items())
    print(f"\n{name} {size}px batch {BATCH} on {device}: {shown}; auto picks {auto.describe()} "
          f"({fp32 / times[auto.describe()]:.2f}x fp32), fastest {best.describe()} ({fp32 / times[best.describe()]:.2f}x); "
          f"{flops / 1e9:.2f} GFLOP/step; fp32 {gflops['fp32']:.1f} GFLOP/s = {gflops['fp32'] / peak:.1%}, "
          f"auto {gflops[auto.describe()]:.1f} GFLOP/s = {gflops[auto.describe()] / peak:.1%}, fastest "
          f"{gflops[best.describe()]:.1f} GFLOP/s = {gflops[best.describe()] / peak:.1%} of the {peak:.0f} GFLOP/s "
          f"fp32 matmul peak")  # fmt: skip
    assert flops > 0
