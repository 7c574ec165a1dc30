"""The training recipe beyond learning rates: optimizer, learning-rate schedule, label smoothing,
drop path, weight averaging (EMA) and MixUp/CutMix, as ``[search]`` pins or searches them.

The defaults are the recipe every study trained with before these settings existed (AdamW,
cosine without warm-up, no smoothing, no drop path, no EMA, no mixing), and with them the engine
takes exactly the steps it took then.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.api import Batch, Strategy
from harness.training import augment as aug
from harness.training.model import set_drop_path

#: RandAugment's defaults where the study pins no value (torchvision's)
DEFAULT_NUM_OPS = 2
DEFAULT_MAGNITUDE = 9.0
DEFAULT_EMA_DECAY = 0.999
#: SGD's momentum (Nesterov)
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class Recipe:
    """How a run trains beyond its learning rates, weight decay, freeze depth and augmentation."""

    optimizer: str = "adamw"
    schedule: str = "cosine"
    #: share of the steps spent in a linear warm-up
    warmup: float = 0.0
    label_smoothing: float = 0.0
    #: the deepest block's drop-path rate (earlier blocks get less, as timm's drop_path_rate)
    drop_path: float = 0.0
    #: exponential moving average of the weights, evaluated instead of them (None: off)
    ema_decay: float | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Recipe:
        """The recipe a trial's parameters describe; a parameter a trial does not have (one
        stored before it existed) is the default, so such a trial trains as it did."""
        decay = params.get("ema.decay")
        return cls(
            optimizer=str(params.get("optimizer.name", "adamw")),
            schedule=str(params.get("schedule.name", "cosine")),
            warmup=float(params.get("schedule.warmup", 0.0)),
            label_smoothing=float(params.get("loss.label_smoothing", 0.0)),
            drop_path=float(params.get("backbone.drop_path", 0.0)),
            ema_decay=None if decay is None else float(decay),
            mixup_alpha=float(params.get("augment.mixup_alpha", 0.0)),
            cutmix_alpha=float(params.get("augment.cutmix_alpha", 0.0)),
            mix_prob=float(params.get("augment.mix_prob", 1.0)),
        )


def make_optimizer(
    groups: list[dict[str, Any]], name: str, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), or SGD with Nesterov momentum 0.9 (weight decay as an L2
    term), over the parameter groups; each group carries its own learning rate."""
    fused = device.type == "cuda" or None
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            momentum=SGD_MOMENTUM,
            nesterov=True,
            weight_decay=weight_decay,
            fused=fused,
        )
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; allowed: adamw, sgd")
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused)


def lr_factor(recipe: Recipe, total: int) -> Callable[[int], float]:
    """The learning rate at each step as a multiple of a group's base rate.

    The first ``round(warmup * total)`` steps rise linearly to 1 (step i at (i + 1) / W); over
    the rest, "cosine" falls to 0 along half a cosine, "constant" stays at 1, and "step" drops
    tenfold at half and again at three quarters of them. Cosine without warm-up is the
    expression the engine always used, to the bit."""
    if recipe.schedule == "cosine" and recipe.warmup == 0:
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
    warm = round(recipe.warmup * total)
    rest = max(1, total - warm)
    shapes: dict[str, Callable[[int], float]] = {
        "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * min(s, rest) / rest)),
        "constant": lambda s: 1.0,
        "step": lambda s: 0.1 ** ((2 * s >= rest) + (4 * s >= 3 * rest)),
    }
    if recipe.schedule not in shapes:
        raise ValueError(f"unknown schedule {recipe.schedule!r}; allowed: {', '.join(shapes)}")
    shape = shapes[recipe.schedule]
    return lambda step: (step + 1) / warm if step < warm else shape(step - warm)


def prepare(model: Any, strategy: Strategy, recipe: Recipe) -> None:
    """Set the model's drop-path rates for this run (models are reused between trials: set every
    time, 0 when off) and refuse a recipe the strategy or the backbone cannot take."""
    name = type(strategy).__name__
    if recipe.mixes and not strategy.mixed_labels:
        raise ValueError(
            f"strategy {name} does not take mixed labels (mixed_labels = False); "
            "it cannot train with MixUp/CutMix"
        )
    if recipe.ema_decay is not None and strategy.weight_average is not None:
        raise ValueError(
            f"strategy {name} averages its weights ({strategy.weight_average}); "
            "ema cannot be set with it"
        )
    if set_drop_path(model.backbone, recipe.drop_path) == 0 and recipe.drop_path > 0:
        raise ValueError(
            f"backbone.drop_path {recipe.drop_path}: the backbone has no timm DropPath modules "
            "(timm models that have residual blocks do; leave drop_path at 0 for this one)"
        )


def augment_policy(name: str, params: dict[str, Any]) -> aug.Policy | aug.SearchedPolicy | str:
    """What ``augment`` is given for a trial's ``augment.policy``: a preset's name, or the
    RandAugment / TrivialAugment policy its parameters describe."""
    ops = params.get("augment.ops")
    ops = tuple(ops) if ops is not None else None
    if name == "randaugment":
        num_ops = int(params.get("augment.num_ops", DEFAULT_NUM_OPS))
        magnitude = float(params.get("augment.magnitude", DEFAULT_MAGNITUDE))
        return aug.randaugment_policy(num_ops, magnitude, ops)
    if name == "trivialaugment":
        return aug.trivialaugment_policy(ops)
    return name


class Mixer:
    """MixUp/CutMix of the labelled batch a supervised loss reads (the source, or the target of
    a strategy that reads no source), drawing from its own CPU generator so that every other
    random stream of the run stays as it is."""

    def __init__(self, recipe: Recipe, num_classes: int, seed: int) -> None:
        self.recipe, self.num_classes = recipe, num_classes
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: Batch) -> Batch:
        from harness.training.mixing import mix

        field = "source" if batch.source is not None else "target"
        pair = getattr(batch, field)
        if pair is None or pair[1] is None:
            return batch
        r = self.recipe
        x, soft = mix(
            pair[0],
            pair[1],
            self.num_classes,
            mixup_alpha=r.mixup_alpha,
            cutmix_alpha=r.cutmix_alpha,
            prob=r.mix_prob,
            generator=self.generator,
        )
        return dataclasses.replace(batch, **{field: (x, soft)})


def mixer(
    recipe: Recipe, strategy: Strategy, task: str, num_classes: int, seed: int
) -> Mixer | None:
    """The run's mixer, or None when it does not mix."""
    if not recipe.mixes or not strategy.mixed_labels or task != "classification":
        return None
    return Mixer(recipe, num_classes, seed)


def backbone_groups(
    model: nn.Module, params: dict[str, Any], backbone_lr: float
) -> list[dict[str, Any]]:
    """Trainable backbone parameters, one group per stage when ``backbone.lr_decay`` < 1: the
    last stage gets ``backbone_lr``, each earlier one ``lr_decay`` times the next."""
    decay = float(params.get("backbone.lr_decay", 1.0))
    named = dict(model.backbone.named_parameters())  # type: ignore[union-attr]
    if decay == 1.0:
        return [{"params": [p for p in named.values() if p.requires_grad], "lr": backbone_lr}]
    stages = model.spec.stages  # type: ignore[union-attr]
    return [
        {
            "params": [named[n] for n in stage if named[n].requires_grad],
            "lr": backbone_lr * decay ** (len(stages) - 1 - i),
        }
        for i, stage in enumerate(stages)
    ]
