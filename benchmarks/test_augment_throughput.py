"""Augmentation: the batched on-device policy against the same policy applied per sample in a DataLoader."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from harness.training.augment import augment, get_policy, randaugment_policy, trivialaugment_policy
from harness.training.engine import Precision, resolve_device

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


class _Torchvision(Dataset):
    """torchvision's own searched policy, one image at a time."""

    def __init__(self, x: torch.Tensor, transform) -> None:
        self.x, self.t = x, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.t(self.x[i])


#: the ops of torchvision's RandAugment and TrivialAugmentWide, under this harness's names
TORCHVISION_OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
    "saturation", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip

#: the strongest searched policy (3 ops at magnitude 15, over all 22 ops and over torchvision's
#: 14) and TrivialAugment, each against torchvision's own applied per sample in a DataLoader
SEARCHED = {
    "randaugment": (randaugment_policy(3, 15.0), lambda: v2.RandAugment(num_ops=3, magnitude=15)),
    "randaugment-same-ops": (
        randaugment_policy(3, 15.0, TORCHVISION_OPS),
        lambda: v2.RandAugment(num_ops=3, magnitude=15),
    ),
    "trivialaugment": (trivialaugment_policy(), v2.TrivialAugmentWide),
    "trivialaugment-same-ops": (trivialaugment_policy(TORCHVISION_OPS), v2.TrivialAugmentWide),
}


@pytest.mark.parametrize("kind", list(SEARCHED))
def test_searched_policy_vs_torchvision_per_sample(benchmark, kind):
    policy, make = SEARCHED[kind]
    x = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(_Torchvision(x, make()), batch_size=BATCH, num_workers=0)
    per_sample = _best_of(lambda: [None for _ in loader])

    def batched() -> None:
        for batch in x.split(BATCH):
            augment(batch, policy, generator=g)

    batched()  # warm-up
    benchmark.pedantic(batched, rounds=5, iterations=1)
    ours = benchmark.stats.stats.min
    ratio = per_sample / ours
    benchmark.extra_info.update(
        {
            "policy": kind,
            "per_sample_images_per_s": round(N / per_sample, 1),
            "batched_images_per_s": round(N / ours, 1),
            "speedup_batched_over_per_sample": round(ratio, 2),
        }
    )
    print(f"\n{kind}, {SIZE}px: torchvision per-sample DataLoader {N / per_sample:.0f} img/s, "
          f"batched on device {N / ours:.0f} img/s, speed-up {ratio:.1f}x")  # fmt: skip
    assert ours > 0  # reported, not asserted: see benchmarks/README.md


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_augmentation_outpaces_training(benchmark, name):
    """Augmentation must never bound a trial: batched 'strong' augmentation against the model's
    training throughput (the engine, fp32, same images and batch size) in the same run."""
    from test_engine_overhead import _data, _engine_epoch, _model

    device = resolve_device("auto")
    precision = Precision.for_device(device, "fp32")
    data = _data()
    model = _model(name).to(device)
    _engine_epoch(model, data, device, precision)  # warm-up
    train = _best_of(lambda: _engine_epoch(model, data, device, precision), rounds=2)
    x = torch.rand(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    _batched(x, g)
    benchmark.pedantic(_batched, args=(x, g), rounds=5, iterations=1)
    batched = benchmark.stats.stats.min
    train_ips, aug_ips = len(data.train) / train, N / batched
    ratio = aug_ips / train_ips
    benchmark.extra_info.update(
        {
            "model": name,
            "train_images_per_s": round(train_ips, 1),
            "augment_images_per_s": round(aug_ips, 1),
            "augment_over_training_throughput": round(ratio, 1),
        }
    )
    print(f"\nstrong augmentation {aug_ips:.0f} img/s vs {name} training {train_ips:.0f} img/s "
          f"({SIZE}px, batch {BATCH}, {device}): {ratio:.1f}x")  # fmt: skip
    assert batched > 0
