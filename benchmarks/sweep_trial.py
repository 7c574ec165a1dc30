"""One trial of a DomainBed-style sweep, as a script of one's own would run it: a fresh process,
images through a per-sample torchvision ``DataLoader``, a plain training loop, no pruning and no
feature cache. ``benchmarks/test_sweep_vs_harness.py`` starts it once per configuration.

It builds the same model from the same weights and reads the same splits as the harness (through
the harness's study, model and data builders), so that the two searches differ only in how they
search and how they feed the model.

Usage: ``python benchmarks/sweep_trial.py STUDY.toml OVERRIDES_JSON PARAMS_JSON SEED`` (the study
with one method, after the overrides); prints one
JSON line ``{"val": ..., "test": ..., "seconds": ...}``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from harness.registry import get_registry  # noqa: E402
from harness.search import RunOptions, build_driver  # noqa: E402
from harness.study import load_study  # noqa: E402
from harness.training.augment import get_policy  # noqa: E402
from harness.training.inputs import normalized  # noqa: E402


def per_sample_transform(params: dict, allow_flip: bool) -> v2.Transform:
    """The trial's augmentation policy with torchvision's per-sample transforms (no flip where
    the domain forbids it, as the harness does: digits are not symmetric)."""
    name = params.get("augment.policy", "none")
    if name == "randaugment":
        return v2.RandAugment(int(params["augment.num_ops"]), int(params["augment.magnitude"]))
    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "none":
        return v2.Identity()
    p = get_policy(name)
    return v2.Compose([
        v2.RandomAffine(degrees=p.rotate, translate=(p.translate, p.translate), scale=p.scale, shear=p.shear),
        v2.RandomHorizontalFlip(p.hflip if allow_flip else 0.0),
        v2.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue),
        v2.RandomGrayscale(p.grayscale),
        v2.RandomInvert(p.invert),
        v2.RandomApply([v2.GaussianBlur(3)], p=p.blur),
        v2.RandomErasing(p.cutout, scale=(1 / 16, 1 / 16), ratio=(1, 1)),
    ])  # fmt: skip


class Images(Dataset):
    """A split's uint8 images and labels, transformed one at a time."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: v2.Transform) -> None:
        self.x, self.y, self.t = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.t(self.x[i]).float() / 255, self.y[i]


def optimizer(model, params: dict, lr_backbone: float, lr_head: float) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr_backbone},
        {"params": model.head_parameters(), "lr": lr_head},
    ]
    groups = [g for g in groups if g["params"]]
    wd = float(params["optimizer.weight_decay"])
    if params.get("optimizer.name", "adamw") == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=wd)
    return torch.optim.AdamW(groups, weight_decay=wd)


def lr_factor(step: int, total: int, params: dict) -> float:
    warm = int(float(params.get("schedule.warmup", 0.0)) * total)
    kind = params.get("schedule.name", "cosine")
    if step < warm:
        return (step + 1) / warm
    if kind == "constant":
        return 1.0
    if kind == "step":
        return 0.1 ** sum(step >= f * total for f in (0.5, 0.75))
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    right = 0
    for i in range(0, len(x), 256):
        logits = model(normalized(x[i : i + 256].float() / 255, model, False))
        right += int((logits.argmax(1) == y[i : i + 256]).sum())
    return right / len(x)


def main(study: str, overrides: dict, params: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    spec = load_study(study, overrides=overrides)
    driver = build_driver(
        spec, get_registry(), RunOptions(results_dir=Path(tempfile.mkdtemp()), log=lambda m: None)
    )
    rm = driver.methods[0]
    source, target = driver.domains.pair_data(0)
    weights = driver.models.backbone_weights(rm, source)  # cached on disk by the harness
    model = driver.models.build_model(rm, weights, target.num_classes)
    model.freeze(int(params["backbone.freeze_depth"]))
    train = target.train  # the fine-tuning methods train on the target's labels
    loader = DataLoader(
        Images(
            train.x, train.y, per_sample_transform(params, bool(target.meta.get("hflip", True)))
        ),
        batch_size=int(params.get("data.batch_size", spec.batch_size)),
        shuffle=True,
        drop_last=True,
    )
    opt = optimizer(model, params, float(params.get("backbone.lr", 0.0)), float(params["head.lr"]))
    total = len(loader) * spec.budget.max_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, params))
    smoothing = float(params.get("loss.label_smoothing", 0.0))
    for _ in range(spec.budget.max_epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(normalized(x, model, False)), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    val = accuracy(model, target.val.x, target.val.y)
    test = accuracy(model, target.test.x, target.test.y)
    return {"val": val, "test": test, "seconds": time.perf_counter() - T0}


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("HARNESS_BENCH_THREADS", "2")))
    out = main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(out))
