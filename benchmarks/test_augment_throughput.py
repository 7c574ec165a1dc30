"""Augmentation: the batched on-device policy against the same policy applied per sample in a DataLoader."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from harness.augment import augment, get_policy

N, SIZE, BATCH = 512, 32, 64


class _PerSample(Dataset):
    """The 'strong' policy written with torchvision transforms, one image at a time."""

    def __init__(self, x: torch.Tensor) -> None:
        p = get_policy("strong")
        self.x = x
        self.t = v2.Compose([
            v2.RandomAffine(degrees=p.rotate, translate=(p.translate, p.translate), scale=p.scale, shear=p.shear),
            v2.RandomHorizontalFlip(p.hflip),
            v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue),
            v2.RandomGrayscale(p.grayscale),
            v2.RandomInvert(p.invert),
            v2.RandomApply([v2.GaussianBlur(3)], p=p.blur),
            v2.RandomErasing(p.cutout, scale=(1 / 16, 1 / 16), ratio=(1, 1)),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.t(self.x[i])
        return (img + torch.randn_like(img) * get_policy("strong").noise).clamp_(0, 1)


def _per_sample(x: torch.Tensor) -> None:
    for _ in DataLoader(_PerSample(x), batch_size=BATCH, num_workers=0):
        pass


def _batched(x: torch.Tensor, g: torch.Generator) -> None:
    for batch in x.split(BATCH):
        augment(batch, "strong", generator=g)


def _best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def test_batched_augmentation_vs_per_sample_dataloader(benchmark):
    x = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    per_sample = _best_of(lambda: _per_sample(x))
    benchmark.pedantic(_batched, args=(x, g), rounds=5, iterations=1)
    batched = benchmark.stats.stats.min
    ratio = per_sample / batched
    benchmark.extra_info.update(
        {
            "per_sample_images_per_s": round(N / per_sample, 1),
            "batched_images_per_s": round(N / batched, 1),
            "speedup_batched_over_per_sample": round(ratio, 2),
        }
    )
    print(f"\nstrong policy, {SIZE}px: per-sample DataLoader {N / per_sample:.0f} img/s, "
          f"batched on device {N / batched:.0f} img/s, speed-up {ratio:.1f}x")  # fmt: skip
    assert batched > 0  # reported, not asserted: see benchmarks/README.md
