"""The search space: what a trial's parameters are (suggested, pinned or fixed by the strategy),
and the training configuration they make."""

from __future__ import annotations

from typing import Any

import optuna
import torch

from harness import api
from harness.errors import PluginContractError, StudySpecError
from harness.store.schema import PARAMS
from harness.study import StudySpec
from harness.training.engine import Precision, TrainConfig, resolve_freeze_depth
from harness.training.recipe import (
    DEFAULT_EMA_DECAY,
    DEFAULT_MAGNITUDE,
    DEFAULT_NUM_OPS,
    Recipe,
)


def _suggest_float(trial: optuna.Trial, name: str, space: list[float] | float) -> float:
    if isinstance(space, list):
        lo, hi = space
        return lo if lo == hi else trial.suggest_float(name, lo, hi, log=True)
    return float(space)


def _number(
    trial: optuna.Trial, name: str, space: list[float] | float | None, default: float
) -> float:
    """A float searched uniformly in [low, high], or the pinned one (the sampler is not asked)."""
    if isinstance(space, list):
        lo, hi = space
        return float(lo) if lo == hi else trial.suggest_float(name, lo, hi)
    return default if space is None else float(space)


def _choice(trial: optuna.Trial, name: str, space: list[Any] | Any, default: Any) -> Any:
    """One of a list of values (a single one is pinned, and the sampler is not asked)."""
    if space is None:
        return default
    values = space if isinstance(space, list) else [space]
    return values[0] if len(values) == 1 else trial.suggest_categorical(name, values)


def _recipe(
    spec: StudySpec, trial: optuna.Trial, strategy: api.Strategy, params: dict[str, Any]
) -> None:
    """The training recipe's parameters, pinned defaults included (so every trial records every
    dimension); only what the study searches asks the sampler, so a study that sets none of
    these keys draws exactly what it drew before they existed."""
    s = spec.search
    policy = params["augment.policy"]
    if policy in ("randaugment", "trivialaugment") and s.augment_ops is not None:
        params["augment.ops"] = list(s.augment_ops)
    if policy == "randaugment":
        if isinstance(s.num_ops, list) and s.num_ops[0] < s.num_ops[1]:
            params["augment.num_ops"] = trial.suggest_int("augment.num_ops", *s.num_ops)
        else:
            num_ops = s.num_ops[0] if isinstance(s.num_ops, list) else s.num_ops
            params["augment.num_ops"] = DEFAULT_NUM_OPS if num_ops is None else int(num_ops)
        params["augment.magnitude"] = _number(
            trial, "augment.magnitude", s.magnitude, DEFAULT_MAGNITUDE
        )
    if s.mixes:
        _mixing(spec, trial, strategy, params)
    params["optimizer.name"] = _choice(trial, "optimizer.name", s.optimizer, "adamw")
    params["schedule.name"] = _choice(trial, "schedule.name", s.schedule, "cosine")
    params["schedule.warmup"] = _number(trial, "schedule.warmup", s.warmup, 0.0)
    params["loss.label_smoothing"] = _number(trial, "loss.label_smoothing", s.label_smoothing, 0.0)
    params["backbone.drop_path"] = _number(trial, "backbone.drop_path", s.drop_path, 0.0)
    # a strategy that averages its own weights (SWA) is never given an EMA besides
    if strategy.weight_average is None and _choice(trial, "ema.on", s.ema, False):
        params["ema.decay"] = _number(trial, "ema.decay", s.ema_decay, DEFAULT_EMA_DECAY)
    params["data.batch_size"] = int(
        _choice(trial, "data.batch_size", s.batch_size, spec.batch_size)
    )


def _mixing(
    spec: StudySpec, trial: optuna.Trial, strategy: api.Strategy, params: dict[str, Any]
) -> None:
    """MixUp and CutMix for a strategy that takes mixed labels; off (both alphas 0, and the
    sampler not asked) for one that does not."""
    s = spec.search
    if not strategy.mixed_labels:
        params["augment.mixup_alpha"] = params["augment.cutmix_alpha"] = 0.0
        return
    params["augment.mixup_alpha"] = _number(trial, "augment.mixup_alpha", s.mixup_alpha, 0.0)
    params["augment.cutmix_alpha"] = _number(trial, "augment.cutmix_alpha", s.cutmix_alpha, 0.0)
    params["augment.mix_prob"] = _number(trial, "augment.mix_prob", s.mix_prob, 1.0)


def mixing_refused(spec: StudySpec, strategy: api.Strategy) -> str | None:
    """The line the search logs once per method when the study mixes labels and the strategy
    cannot take them (its trials train without mixing); None otherwise."""
    if not spec.search.mixes or strategy.mixed_labels:
        return None
    return (
        f"{type(strategy).__name__} does not take mixed labels (mixed_labels = False): "
        "its trials train without MixUp/CutMix"
    )


def _freeze_depth(
    spec: StudySpec, trial: optuna.Trial, strategy: api.Strategy, num_stages: int
) -> int:
    s = spec.search
    if "freeze_depth" in strategy.fixed:
        return resolve_freeze_depth(strategy.fixed["freeze_depth"], num_stages)
    if s.freeze_depth == "auto":
        return trial.suggest_int("backbone.freeze_depth", 0, num_stages)
    top = max(s.freeze_depth) if isinstance(s.freeze_depth, list) else int(s.freeze_depth)
    if top > num_stages:  # the preflight refuses it first; never trained with fewer frozen stages
        raise StudySpecError(
            f"search.freeze_depth: {s.freeze_depth} is past the backbone's {num_stages} stages "
            f"(0..{num_stages} allowed)"
        )
    if isinstance(s.freeze_depth, list):
        lo, hi = s.freeze_depth
        return trial.suggest_int("backbone.freeze_depth", lo, hi)
    return int(s.freeze_depth)


def suggest(
    spec: StudySpec, trial: optuna.Trial, strategy: api.Strategy, num_stages: int
) -> dict[str, Any]:
    """Every parameter of ``trial``, in the order the sampler is asked for them; recorded on the
    trial in one write (the pinned and fixed ones are not in ``trial.params``)."""
    s = spec.search
    params: dict[str, Any] = {}
    depth = _freeze_depth(spec, trial, strategy, num_stages)
    params["backbone.freeze_depth"] = depth
    if depth < num_stages:
        params["backbone.lr"] = _suggest_float(trial, "backbone.lr", s.backbone_lr)
        if isinstance(s.layer_decay, list) and s.layer_decay[0] < s.layer_decay[1]:
            params["backbone.lr_decay"] = trial.suggest_float("backbone.lr_decay", *s.layer_decay)
        else:
            decay = s.layer_decay[0] if isinstance(s.layer_decay, list) else s.layer_decay
            if decay != 1.0:
                params["backbone.lr_decay"] = float(decay)
    params["head.lr"] = _suggest_float(trial, "head.lr", s.head_lr)
    params["optimizer.weight_decay"] = _suggest_float(
        trial, "optimizer.weight_decay", s.weight_decay
    )
    policies = [s.augment] if isinstance(s.augment, str) else s.augment
    params["augment.policy"] = (
        policies[0] if len(policies) == 1 else trial.suggest_categorical("augment.policy", policies)
    )
    if isinstance(s.crop_scale, list) and s.crop_scale[0] < s.crop_scale[1]:
        params["augment.crop_scale"] = trial.suggest_float("augment.crop_scale", *s.crop_scale)
    elif s.crop_scale is not None:
        scale = s.crop_scale[0] if isinstance(s.crop_scale, list) else s.crop_scale
        params["augment.crop_scale"] = float(scale)
    _recipe(spec, trial, strategy, params)
    extra = strategy.search_space(trial)
    bad = [k for k in extra if not k.startswith("strategy.")]
    if bad:
        raise PluginContractError(
            f"strategy search_space returned {bad}; names must start with 'strategy.'"
        )
    params.update(extra)
    trial.set_user_attr(PARAMS, params)
    return params


def train_config(
    spec: StudySpec,
    params: dict[str, Any],
    seed: int,
    device: torch.device,
    precision: Precision,
) -> TrainConfig:
    """How a trial or final run with ``params`` trains."""
    return TrainConfig(
        epochs=spec.budget.max_epochs,
        batch_size=int(params.get("data.batch_size", spec.batch_size)),
        backbone_lr=float(params.get("backbone.lr", 0.0)),
        head_lr=float(params["head.lr"]),
        weight_decay=float(params["optimizer.weight_decay"]),
        freeze_depth=int(params["backbone.freeze_depth"]),
        augment=str(params["augment.policy"]),
        seed=seed,
        device=device,
        precision=precision,
        params=params,
        data_seed=spec.seed,
        stream=spec.data.placement == "stream",
        recipe=Recipe.from_params(params),
    )
