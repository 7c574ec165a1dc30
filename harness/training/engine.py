"""The training and evaluation loop: device, precision, batching and augmentation on the device."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from harness.api import Backbone, Batch, DomainData, Split, StepContext, Strategy
from harness.errors import NonFiniteLossError
from harness.metrics import classification_metrics, score  # noqa: F401 - re-exported
from harness.training import augment as aug
from harness.training import features as feat

# ----------------------------------------------------------------------------- device & precision


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


@dataclass(frozen=True)
class Precision:
    """How tensors are computed: bf16 autocast and channels_last on CUDA, fp32 elsewhere."""

    autocast_bf16: bool
    channels_last: bool

    @classmethod
    def for_device(cls, device: torch.device, spec: str = "auto") -> Precision:
        """A pinned choice, or for "auto" the static default (the Runner probes per backbone
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
    accelerator backend torch is built with, each with a recorded stack trace: 0.1 ms a call,
    and a trial seeds twice."""
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


# ----------------------------------------------------------------------------- model


class TransferModel(nn.Module):
    """Backbone plus head; ``forward`` gives logits, ``features`` the pooled backbone output."""

    def __init__(self, backbone: Backbone, head: nn.Module, task: str = "classification") -> None:
        super().__init__()
        self.backbone = backbone.module
        self.head = head
        self.spec = backbone
        self.task = task
        # a segmentation decoder runs the backbone's modules itself, on the image
        self.head_takes_images = bool(getattr(head, "takes_images", False))
        self.register_buffer(
            "mean", torch.tensor(backbone.mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(backbone.std).view(1, -1, 1, 1), persistent=False)
        self._frozen_modules: list[nn.Module] = []

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.head_takes_images:
            return self.head(x)
        return self.head(self.backbone(x))

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the head that are not backbone parameters (a decoder shares the encoder's)."""
        shared = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.head.parameters() if id(p) not in shared]

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @property
    def num_stages(self) -> int:
        return len(self.spec.stages)

    def freeze(self, depth: int) -> None:
        """Freeze the first ``depth`` backbone stages (stem first); frozen norms stay in eval mode."""
        depth = max(0, min(int(depth), self.num_stages))
        frozen = {n for stage in self.spec.stages[:depth] for n in stage}
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(name not in frozen)
        if depth == self.num_stages:
            self._frozen_modules = [self.backbone]
            return
        self._frozen_modules = []
        for m in self.backbone.modules():
            own = [p for p in m._parameters.values() if p is not None]
            if own and not any(p.requires_grad for p in own):
                self._frozen_modules.append(m)

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if mode:
            for m in self._frozen_modules:
                m.eval()
        return self


def resolve_freeze_depth(value: Any, num_stages: int) -> int:
    if value == "all":
        return num_stages
    return max(0, min(int(value), num_stages))


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    backbone_lr: float
    head_lr: float
    weight_decay: float
    freeze_depth: int
    augment: str
    seed: int
    device: torch.device
    precision: Precision
    params: dict[str, Any] = field(default_factory=dict)
    #: seed of the k-shot target subset: fixed per study so that trials compare on the same images
    data_seed: int = 0
    #: reuse frozen backbone features where that is provably exact (see ``Trainer.caches_features``)
    cache_features: bool = True


@dataclass
class TrainResult:
    epochs_run: int
    history: list[float]
    train_loss: list[float]


def few_shot_indices(y: Tensor, shots: int, seed: int) -> Tensor:
    """``shots`` seeded indices per class (all of a class when it has fewer)."""
    if y.ndim != 1:
        raise ValueError("k-shot subsets are defined for class labels, not segmentation masks")
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    picks = []
    for label in torch.unique(y).tolist():
        idx = torch.nonzero(y == label).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.sort(torch.cat(picks)).values


class _Batches:
    """Seeded random batches of indices into a split, reshuffled each pass."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.g = n, min(batch_size, n), generator
        self._perm: Tensor | None = None
        self._pos = 0

    def epoch(self) -> list[Tensor]:
        perm = torch.randperm(self.n, generator=self.g)
        batches = list(perm.split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:  # a batch of one breaks BatchNorm
            batches.pop()
        return batches

    def next(self) -> Tensor:
        if self._perm is None or self._pos + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=self.g)
            self._pos = 0
        out = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return out


class Trainer:
    """Runs one training job: a model, a strategy, source and target data, a recipe."""

    def __init__(
        self,
        model: TransferModel,
        strategy: Strategy,
        source: DomainData,
        target: DomainData,
        cfg: TrainConfig,
    ) -> None:
        self.model, self.strategy, self.cfg = model, strategy, cfg
        self.device = cfg.device
        seed_everything(cfg.seed)  # modules a strategy adds in setup() start from the run's seed
        self.source, self.target = source, target
        self.num_classes = target.num_classes
        tensors = [
            t for _, t in feat.module_tensors(model)
        ]  # one walk, not one per parameters() and buffers()
        if any(t.device != self.device for t in tensors):
            model.to(self.device)  # a reset backbone is there already
            tensors = [t for _, t in feat.module_tensors(model)]  # moving replaces buffers
        if cfg.precision.channels_last and not all(
            t.is_contiguous(memory_format=torch.channels_last) for t in tensors if t.dim() == 4
        ):
            model.to(memory_format=torch.channels_last)
        model.freeze(cfg.freeze_depth)
        self.extra = strategy.setup(model, self.num_classes, cfg.params)
        if self.extra is not None:
            self.extra.to(self.device)
        self.optimizer = self._optimizer()
        self.hflip = bool(source.meta.get("hflip", True)) and bool(target.meta.get("hflip", True))
        self.feature_cache: feat.FeatureCache = feat.FEATURE_CACHE

    @property
    def caches_features(self) -> bool:
        """Whether the frozen backbone's output can be computed once and reused: the whole backbone
        is frozen and in eval mode, the images see no random augmentation (so no flip either), the
        head reads pooled features, and neither the run nor the strategy opted out."""
        m = self.model
        return (
            self.cfg.cache_features
            and bool(getattr(self.strategy, "cache_features", True))
            and self.cfg.augment == "none"
            and m.task == "classification"
            and not m.head_takes_images
            and m._frozen_modules == [m.backbone]
            and not any(p.requires_grad for p in m.backbone.parameters())
        )

    def _cached(self, split: Split | None) -> Tensor | None:
        if split is None:
            return None
        key = feat.feature_key(self.model, split.x, self.cfg.precision, self.device)
        return self.feature_cache.get_or_compute(
            key,
            lambda: feat.compute_features(
                self.model, split.x, self.cfg.precision, self.device, self.cfg.batch_size * 4
            ),
        )

    def _prepared(self, split: Split | None, max_bytes: int = 256 * 2**20) -> Tensor | None:
        """The whole split preprocessed (no augmentation), when it is small enough to keep."""
        if split is None or split.x.numel() * 4 > max_bytes:
            return None
        return self._prepare(split.x, None, torch.Generator())[0]

    def _slice(self, prepared: Tensor, idx: Tensor) -> Tensor:
        x = prepared[idx]
        if self.cfg.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = [g for g in self._backbone_groups() if g["params"]]
        groups.append({"params": self.model.head_parameters(), "lr": cfg.head_lr})
        extra = list(self.extra.parameters()) if self.extra is not None else []
        if extra:
            scale = float(getattr(self.extra, "lr_scale", 1.0))
            groups.append({"params": extra, "lr": cfg.head_lr * scale})
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused or None)

    def _backbone_groups(self) -> list[dict[str, Any]]:
        """Trainable backbone parameters, one group per stage when ``backbone.lr_decay`` < 1:
        the last stage gets ``backbone_lr``, each earlier one ``lr_decay`` times the next."""
        decay = float(self.cfg.params.get("backbone.lr_decay", 1.0))
        named = dict(self.model.backbone.named_parameters())
        if decay == 1.0:
            return [
                {
                    "params": [p for p in named.values() if p.requires_grad],
                    "lr": self.cfg.backbone_lr,
                }
            ]
        stages = self.model.spec.stages
        return [
            {
                "params": [named[n] for n in stage if named[n].requires_grad],
                "lr": self.cfg.backbone_lr * decay ** (len(stages) - 1 - i),
            }
            for i, stage in enumerate(stages)
        ]

    def target_images(self, split: Split) -> Iterator[Tensor]:
        """Normalized, unaugmented batches of ``split``'s images, for ``Strategy.adapt``."""
        for start in range(0, len(split), self.cfg.batch_size):
            x = self.model.normalize(
                split.x[start : start + self.cfg.batch_size].float().div_(255.0)
            )
            if self.cfg.precision.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x

    def _prepare(
        self, x_uint8: Tensor, y: Tensor | None, g: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """uint8 batch -> augmented, normalized float batch; a mask moves with its image."""
        x = x_uint8.float().div_(255.0)
        if self.cfg.augment != "none":
            if y is not None and y.ndim == 3:
                x, y = aug.augment(x, self.cfg.augment, generator=g, allow_flip=self.hflip, mask=y)
            else:
                x = aug.augment(x, self.cfg.augment, generator=g, allow_flip=self.hflip)
        x = self.model.normalize(x)
        if self.cfg.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def fit(
        self, on_epoch: Callable[[int, TransferModel], float | None] | None = None
    ) -> TrainResult:
        """Train for ``cfg.epochs``; after each epoch ``on_epoch(epoch, model)`` may score and prune."""
        cfg, strategy, device = self.cfg, self.strategy, self.device
        seed_everything(cfg.seed)
        index_gen = torch.Generator().manual_seed(cfg.seed)
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

        source_split = self.source.train.to(device) if strategy.uses_source else None
        target_split: Split | None = None
        if strategy.uses_target:
            target_split = self.target.train
            if strategy.target_labels == "few" and not strategy.shots:
                raise ValueError(
                    f"strategy {type(strategy).__name__} declares target_labels='few' but no shots"
                )
            if strategy.shots:
                target_split = target_split.subset(
                    few_shot_indices(target_split.y, strategy.shots, cfg.data_seed)
                )
            target_split = target_split.to(device)
        give_target_labels = strategy.target_labels != "none"
        primary = source_split if source_split is not None else target_split
        if primary is None:
            raise ValueError(
                f"strategy {type(strategy).__name__} uses neither source nor target data"
            )
        primary_batches = _Batches(len(primary), cfg.batch_size, index_gen)
        paired = (
            _Batches(len(target_split), cfg.batch_size, index_gen)
            if source_split is not None and target_split is not None
            else None
        )
        steps_per_epoch = len(primary_batches.epoch())
        total = steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total))),
        )
        history: list[float] = []
        losses: list[float] = []
        step = 0
        cached = self.caches_features
        wrapper = feat.CachedBackbone(self.model.backbone) if cached else None
        if cached:
            source_feats, target_feats = self._cached(source_split), self._cached(target_split)
            frozen_state = feat.state_hash(self.model.backbone)
            # without augmentation a batch is a slice of the preprocessed split: prepare it once
            source_x, target_x = self._prepared(source_split), self._prepared(target_split)
        for epoch in range(cfg.epochs):
            self.model.train()
            if self.extra is not None:
                self.extra.train()
            loss_sum = torch.zeros((), device=device)
            n_steps = 0
            swap = (
                feat.swapped_backbone(self.model, wrapper) if wrapper is not None else nullcontext()
            )
            with swap:
                for idx in primary_batches.epoch():
                    idx = idx.to(device, non_blocking=True)
                    batch = Batch()
                    if wrapper is not None:
                        wrapper.clear()
                    if source_split is not None:
                        if wrapper is not None and source_x is not None:
                            batch.source = (self._slice(source_x, idx), source_split.y[idx])
                        else:
                            batch.source = self._prepare(
                                source_split.x[idx], source_split.y[idx], aug_gen
                            )
                        if wrapper is not None:
                            wrapper.expect(batch.source[0], source_feats[idx])
                        if paired is not None:
                            tidx = paired.next().to(device, non_blocking=True)
                            ty = target_split.y[tidx] if give_target_labels else None
                            if wrapper is not None and target_x is not None:
                                batch.target = (self._slice(target_x, tidx), ty)
                            else:
                                batch.target = self._prepare(target_split.x[tidx], ty, aug_gen)
                            if wrapper is not None:
                                wrapper.expect(batch.target[0], target_feats[tidx])
                    else:
                        ty = primary.y[idx] if give_target_labels else None
                        if wrapper is not None and target_x is not None:
                            batch.target = (self._slice(target_x, idx), ty)
                        else:
                            batch.target = self._prepare(primary.x[idx], ty, aug_gen)
                        if wrapper is not None:
                            wrapper.expect(batch.target[0], target_feats[idx])
                    ctx = StepContext(
                        params=cfg.params,
                        epoch=epoch,
                        epochs=cfg.epochs,
                        step=step,
                        total_steps=total,
                        num_classes=self.num_classes,
                        extra=self.extra,
                    )
                    with cfg.precision.autocast(device):
                        loss = strategy.training_step(self.model, batch, ctx)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    scheduler.step()
                    loss_sum += loss.detach().float()
                    n_steps += 1
                    step += 1
            if cached and feat.state_hash(self.model.backbone) != frozen_state:
                raise RuntimeError(
                    f"strategy {type(strategy).__name__} changed the frozen backbone's weights or buffers "
                    "while its features were cached; give the strategy cache_features = False"
                )
            mean_loss = float(loss_sum) / max(1, n_steps)  # one device sync per epoch
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({mean_loss}) in epoch {epoch + 1}"
                )
            losses.append(mean_loss)
            if target_split is not None:
                with torch.no_grad(), cfg.precision.autocast(device):
                    strategy.adapt(self.model, self.target_images(target_split))
            if on_epoch is not None:
                value = on_epoch(epoch, self.model)
                if value is not None:
                    history.append(value)
        return TrainResult(cfg.epochs, history, losses)

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict(self, split: Split) -> Tensor:
        return predict(self.model, split, self.cfg.batch_size * 4, self.device, self.cfg.precision)


@torch.no_grad()
def predict(
    model: TransferModel,
    split: Split,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    cache: feat.FeatureCache | None = feat.FEATURE_CACHE,
) -> Tensor:
    """Outputs for every image of ``split``, in eval mode, on the CPU: float32 logits for
    classification, predicted labels per pixel for segmentation (logits would not fit).

    With a fully frozen backbone the split's features come from ``cache`` (computed once, keyed by
    the backbone's weights and buffers, the images and the preprocessing); only the head runs."""
    was_training = model.training
    model.eval()
    out = []
    frozen = (
        cache is not None
        and model.task == "classification"
        and not model.head_takes_images
        and isinstance(model.backbone, nn.Module)
        and not any(p.requires_grad for p in model.backbone.parameters())
    )
    if frozen:
        key = feat.feature_key(model, split.x, precision, device)
        features = cache.get_or_compute(
            key, lambda: feat.compute_features(model, split.x, precision, device, batch_size)
        )
        for start in range(0, len(features), batch_size):
            with precision.autocast(device):
                logits = model.head(features[start : start + batch_size])
            out.append(logits.float().cpu())
        model.train(was_training)
        return torch.cat(out)
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device, non_blocking=True).float().div_(255.0)
        x = model.normalize(x)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            logits = model(x)
        out.append(logits.argmax(1).cpu() if logits.ndim == 4 else logits.float().cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def unlabelled_logits(
    model: TransferModel,
    split: Split,
    batch_size: int,
    device: torch.device,
    precision: Precision,
    pixels_per_image: int = 64,
    seed: int = 0,
) -> Tensor:
    """Logits of shape (rows, classes) for label-free validators, read from images only: one
    row per image for classification, ``pixels_per_image`` seeded pixels per image for
    segmentation (the same pixels for every model, so that trials compare)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device, non_blocking=True).float().div_(255.0)
        x = model.normalize(x)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            logits = model(x)
        logits = logits.float()
        if logits.ndim == 4:
            b, c, h, w = logits.shape
            flat = logits.permute(0, 2, 3, 1).reshape(b, h * w, c)
            idx = torch.randint(0, h * w, (b, pixels_per_image), generator=g).to(flat.device)
            logits = torch.gather(flat, 1, idx[..., None].expand(-1, -1, c)).reshape(-1, c)
        out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out)
