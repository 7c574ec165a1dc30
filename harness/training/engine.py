"""The training loop: one trial's model, strategy, data and recipe, with batching and
augmentation on the device.

The model (``harness.training.model``), devices and precision (``harness.training.device``) and
evaluation (``harness.training.evaluate``) live beside it; their names are importable from here
too, as the rest of the harness has always imported them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from harness.api import Batch, DomainData, Split, StepContext, Strategy
from harness.api.strategy import run_setup
from harness.data.pooled import num_domains, source_domain
from harness.errors import NonFiniteLossError
from harness.metrics import classification_metrics, score  # noqa: F401 - re-exported
from harness.training import augment as aug
from harness.training import averaging, recipe
from harness.training import features as feat
from harness.training.batches import Batches, DomainBatches, batch_order, few_shot_indices  # noqa: F401
from harness.training.device import (  # noqa: F401 - re-exported
    Precision,
    generators_kept,
    resolve_device,
    same_device,
    seed_everything,
)
from harness.training.evaluate import predict, unlabelled_logits  # noqa: F401 - re-exported
from harness.training.inputs import (
    image_batches,
    model_input,
    normalized,
    training_crop,
    unit_pixels,
)
from harness.training.loader import Gathered, Loader, Take
from harness.training.model import TransferModel, resolve_freeze_depth  # noqa: F401 - re-exported
from harness.training.recipe import Recipe


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
    #: gather batches on a thread ahead of use even when the splits are on the device (the path
    #: a domain too large for the device takes; ``[data] placement = "stream"``)
    stream: bool = False
    #: optimizer, schedule, label smoothing, drop path, EMA, MixUp/CutMix (default: none of them)
    recipe: Recipe = field(default_factory=Recipe)


@dataclass
class TrainResult:
    epochs_run: int
    #: what ``on_epoch`` returned after each epoch (the trial's validation score)
    history: list[float]
    #: mean training loss of each epoch
    train_loss: list[float]
    #: what the strategy logged (``StepContext.log``): name -> mean of each epoch (NaN for an
    #: epoch in which it logged nothing under that name)
    diagnostics: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class _Data:
    """What one ``fit`` draws from: the splits on the device, their batch orders, and for a cached
    frozen backbone its features and the preprocessed images."""

    source: Split | None
    target: Split | None
    primary: Split
    primary_batches: Batches | DomainBatches
    paired: Batches | None
    target_labels: bool
    aug_gen: torch.Generator
    wrapper: feat.CachedBackbone | None = None
    source_feats: Tensor | None = None
    target_feats: Tensor | None = None
    source_x: Tensor | None = None
    target_x: Tensor | None = None
    source_domain: Tensor | None = None  # each source image's domain, with several sources


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
        if any(not same_device(t.device, self.device) for t in tensors):
            model.to(self.device)  # a reset backbone is there already
            tensors = [t for _, t in feat.module_tensors(model)]  # moving replaces buffers
        if cfg.precision.channels_last and not all(
            t.is_contiguous(memory_format=torch.channels_last) for t in tensors if t.dim() == 4
        ):
            model.to(memory_format=torch.channels_last)
        model.freeze(cfg.freeze_depth)
        recipe.prepare(model, strategy, cfg.recipe)  # drop path; refuses what cannot train
        self.policy = recipe.augment_policy(cfg.augment, cfg.params)
        self.extra = run_setup(
            strategy, model, self.num_classes, cfg.params, model.feature_dim, num_domains(source)
        )
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
            and bool(self.strategy.cache_features)
            and self.cfg.augment == "none"
            and not self.cfg.recipe.mixes
            and m.task == "classification"
            and not m.head_takes_images
            and m._frozen_modules == [m.backbone]
            and not any(p.requires_grad for p in m.backbone.parameters())
        )

    def _cached(self, split: Split | None) -> Tensor | None:
        if split is None:
            return None
        key = feat.feature_key(self.model, split, self.cfg.precision, self.device)
        return self.feature_cache.get_or_compute(
            key,
            lambda: feat.compute_features(
                self.model, split, self.cfg.precision, self.device, self.cfg.batch_size * 4
            ),
        )

    def _prepared(self, split: Split | None, max_bytes: int = 256 * 2**20) -> Tensor | None:
        """The whole split preprocessed (no augmentation), when it is small enough to keep."""
        if split is None or len(split) * math.prod(split.image_shape) * 4 > max_bytes:
            return None
        return self._prepare(split.x.to(self.device), None, torch.Generator())[0]

    def _slice(self, prepared: Tensor, idx: Tensor) -> Tensor:
        x = prepared[idx]
        if self.cfg.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = recipe.backbone_groups(self.model, cfg.params, cfg.backbone_lr)
        groups = [g for g in groups if g["params"]]
        groups.append({"params": self.model.head_parameters(), "lr": cfg.head_lr})
        if self.extra is not None:
            extra = self.strategy.param_groups(self.extra, cfg.head_lr, cfg.weight_decay)
            # a group's params may be a generator (module.parameters()): listed once, here
            extra = [{**g, "params": list(g["params"])} for g in extra]
            groups += [g for g in extra if g["params"]]
        return recipe.make_optimizer(groups, cfg.recipe.optimizer, cfg.weight_decay, self.device)

    def target_images(self, split: Split) -> Iterator[Tensor]:
        """Normalized, unaugmented batches of ``split``'s images, for ``Strategy.adapt`` (and
        SWA's batch norms)."""
        for x in image_batches(split, self.cfg.batch_size):
            yield model_input(x, self.model, self.cfg.precision.channels_last, self.device)

    def _prepare(
        self, x_uint8: Tensor, y: Tensor | None, g: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """uint8 batch -> cropped, augmented, normalized float batch; a mask moves with its
        image."""
        x, y = self._cropped(unit_pixels(x_uint8), y, g)
        if self.cfg.augment != "none":
            if y is not None and y.ndim == 3:
                x, y = aug.augment(x, self.policy, generator=g, allow_flip=self.hflip, mask=y)
            else:
                x = aug.augment(x, self.policy, generator=g, allow_flip=self.hflip)
        return normalized(x, self.model, self.cfg.precision.channels_last), y

    def _cropped(
        self, x: Tensor, y: Tensor | None, g: torch.Generator
    ) -> tuple[Tensor, Tensor | None]:
        """The training crop (:func:`harness.training.inputs.training_crop`)."""
        scale = self.cfg.params.get("augment.crop_scale")
        return training_crop(x, y, self.model, self.cfg.augment, scale, g)

    # ------------------------------------------------------------------------- the loop

    def fit(
        self, on_epoch: Callable[[int, TransferModel], float | None] | None = None
    ) -> TrainResult:
        """Train for ``cfg.epochs``; after each epoch ``on_epoch(epoch, model)`` may score and prune."""
        cfg, strategy, device = self.cfg, self.strategy, self.device
        seed_everything(cfg.seed)
        data = self._data()
        total = len(data.primary_batches.epoch()) * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, recipe.lr_factor(cfg.recipe, total)
        )
        r, task = cfg.recipe, self.model.task
        self._mixer = recipe.mixer(r, strategy, task, self.num_classes, cfg.seed + 2)
        self._average = averaging.weight_average(self.model, r.ema_decay, strategy.weight_average)
        frozen_state = self._cache_features(data)
        history: list[float] = []
        losses: list[float] = []
        diagnostics: dict[str, list[float]] = {}
        step = 0
        for epoch in range(cfg.epochs):
            loss_sum, n_steps, logged = self._epoch(epoch, data, scheduler, step, total)
            step += n_steps
            if frozen_state is not None and feat.state_hash(self.model.backbone) != frozen_state:
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
            _collect(diagnostics, logged, epoch)
            norms = self.target_images(data.primary)  # SWA's batch norms, recomputed on these
            autocast = cfg.precision.autocast(device)
            with averaging.scored(self._average, self.model, epoch, cfg.epochs, norms, autocast):
                if data.target is not None:
                    with torch.no_grad(), cfg.precision.autocast(device):
                        strategy.adapt(self.model, self.target_images(data.target))
                if on_epoch is not None:
                    value = on_epoch(epoch, self.model)
                    if value is not None:
                        history.append(value)
        return TrainResult(cfg.epochs, history, losses, diagnostics)

    def _data(self) -> _Data:
        """The splits a strategy reads, on the device (a k-shot subset of the target when it asks
        for one), and seeded batch orders over them."""
        cfg, strategy, device = self.cfg, self.strategy, self.device
        index_gen = torch.Generator().manual_seed(cfg.seed)
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        source_split = self.source.train if strategy.uses_source else None
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
        primary = source_split if source_split is not None else target_split
        if primary is None:
            raise ValueError(
                f"strategy {type(strategy).__name__} uses neither source nor target data"
            )
        domains = source_domain(self.source) if source_split is not None else None
        primary_batches = batch_order(len(primary), cfg.batch_size, index_gen, domains)
        paired = (
            Batches(len(target_split), cfg.batch_size, index_gen)
            if source_split is not None and target_split is not None
            else None
        )
        labels = strategy.target_labels != "none"
        data = _Data(source_split, target_split, primary, primary_batches, paired, labels, aug_gen)
        data.source_domain = None if domains is None else domains.to(device)
        return data

    def _cache_features(self, data: _Data) -> str | None:
        """For a cached frozen backbone: fill ``data`` with the splits' features and preprocessed
        images, and return the backbone's state hash (``None`` when nothing is cached)."""
        if not self.caches_features:
            return None
        data.wrapper = feat.CachedBackbone(self.model.backbone)
        data.source_feats, data.target_feats = self._cached(data.source), self._cached(data.target)
        frozen_state = feat.state_hash(self.model.backbone)
        # without augmentation a batch is a slice of the preprocessed split: prepare it once
        data.source_x, data.target_x = self._prepared(data.source), self._prepared(data.target)
        return frozen_state

    def _epoch(
        self, epoch: int, data: _Data, scheduler: Any, step: int, total: int
    ) -> tuple[Tensor, int, dict[str, list[Any]]]:
        """One pass over the primary split: the summed loss (on the device), the steps taken and
        what the strategy logged."""
        cfg, device = self.cfg, self.device
        self.model.train()
        if self.extra is not None:
            self.extra.train()
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        logged: dict[str, list[Any]] = {}
        swap = (
            feat.swapped_backbone(self.model, data.wrapper)
            if data.wrapper is not None
            else nullcontext()
        )
        steps = [
            (idx, data.paired.next() if data.paired is not None else None)
            for idx in data.primary_batches.epoch()
        ]  # drawn in the order the loop used to draw them, so the batches are the same
        gathered = Loader(device, cfg.stream)([self._takes(s, t, data) for s, t in steps])
        with swap:
            for (idx, tidx), parts in zip(steps, gathered, strict=True):
                batch = self._batch(idx, tidx, parts, data)
                if self._mixer is not None:
                    batch = self._mixer(batch)
                ctx = StepContext(
                    params=cfg.params,
                    epoch=epoch,
                    epochs=cfg.epochs,
                    step=step + n_steps,
                    total_steps=total,
                    num_classes=self.num_classes,
                    extra=self.extra,
                    logged=logged,
                    label_smoothing=cfg.recipe.label_smoothing,
                    num_source_domains=num_domains(self.source),
                )
                with cfg.precision.autocast(device):
                    loss = self.strategy.training_step(self.model, batch, ctx)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                scheduler.step()
                if self._average is not None and self._average.per_step:
                    self._average.update(self.model)
                loss_sum += loss.detach().float()
                n_steps += 1
        return loss_sum, n_steps, logged

    def _takes(self, idx: Tensor, tidx: Tensor | None, data: _Data) -> list[Take]:
        """What a step reads: the source at ``idx`` and the target at ``tidx``, or the target
        alone at ``idx``; images only where no preprocessed split stands in for them."""
        cached = data.wrapper is not None
        if data.source is None:
            return [
                Take(
                    data.primary,
                    idx,
                    not (cached and data.target_x is not None),
                    data.target_labels,
                )
            ]
        takes = [Take(data.source, idx, not (cached and data.source_x is not None))]
        if tidx is not None:
            assert data.target is not None
            images = not (cached and data.target_x is not None)
            takes.append(Take(data.target, tidx, images, data.target_labels))
        return takes

    def _batch(self, idx: Tensor, tidx: Tensor | None, parts: list[Gathered], data: _Data) -> Batch:
        """The step's batch from what the loader gathered: source images and labels at ``idx``
        and the target at ``tidx``, or the target alone at ``idx`` for a strategy that reads no
        source."""
        if data.wrapper is not None:
            data.wrapper.clear()
        batch = Batch()
        if data.source is not None:
            batch.source = self._pair(parts[0], idx, data.source_x, data.source_feats, data)
            if data.source_domain is not None:
                batch.source_domain = data.source_domain[idx.to(data.source_domain.device)]
            if tidx is not None:
                batch.target = self._pair(parts[1], tidx, data.target_x, data.target_feats, data)
        else:
            batch.target = self._pair(parts[0], idx, data.target_x, data.target_feats, data)
        return batch

    def _pair(
        self,
        gathered: Gathered,
        idx: Tensor,
        prepared: Tensor | None,
        features: Tensor | None,
        data: _Data,
    ) -> tuple[Tensor, Tensor | None]:
        """A split's images and (when given) labels at ``idx``, as the model takes them; with a
        cached backbone the images are announced with their cached features."""
        x, y = gathered
        if data.wrapper is not None and prepared is not None:
            pair = (self._slice(prepared, idx.to(prepared.device)), y)
        else:
            assert x is not None
            pair = self._prepare(x, y, data.aug_gen)
        if data.wrapper is not None:
            assert features is not None
            data.wrapper.expect(pair[0], features[idx.to(features.device)])
        return pair

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict(self, split: Split) -> Tensor:
        return predict(self.model, split, self.cfg.batch_size * 4, self.device, self.cfg.precision)


def _collect(diagnostics: dict[str, list[float]], logged: dict[str, list[Any]], epoch: int) -> None:
    """Append each logged name's mean over the epoch (one device sync per name); NaN where a
    name was not logged."""
    for name, values in logged.items():
        diagnostics.setdefault(name, [math.nan] * epoch).append(float(sum(values)) / len(values))
    for values in diagnostics.values():
        if len(values) == epoch:
            values.append(math.nan)
