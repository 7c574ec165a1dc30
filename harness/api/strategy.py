"""What a strategy plugin builds on: ``Strategy``, the ``Batch`` and ``StepContext`` of a step,
and gradient reversal for adversarial strategies."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api.data import IGNORE_INDEX
from harness.api.models import TransferModel
from harness.errors import PluginContractError

if TYPE_CHECKING:
    import optuna


@dataclass
class Batch:
    """What one training step receives. ``target`` labels are ``None`` unless the strategy's
    ``target_labels`` allows them."""

    source: tuple[Tensor, Tensor] | None = None
    target: tuple[Tensor, Tensor | None] | None = None
    #: int64 (B,): each source image's domain, its index in the pair's list of sources (None for
    #: a pair with one source)
    source_domain: Tensor | None = None


@dataclass
class StepContext:
    """Where training stands, for schedules: ``progress`` runs from 0 to 1 over the trial.

    ``log(name, value)`` records a diagnostic of this step (a discriminator's accuracy); the
    engine averages each name over an epoch into ``TrainResult.diagnostics``."""

    params: dict[str, Any]
    epoch: int
    epochs: int
    step: int
    total_steps: int
    num_classes: int
    extra: nn.Module | None = None
    #: how many source domains the pair has (``Batch.source_domain`` indexes them)
    num_source_domains: int = 1
    #: name -> the values logged so far (the engine passes one dict per epoch)
    logged: dict[str, list[Tensor | float]] = field(default_factory=dict)
    #: the trial's label smoothing (``loss.label_smoothing``), which ``supervised_loss`` applies
    label_smoothing: float = 0.0

    def supervised_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy with the trial's label smoothing: ``y`` holds class indices (void
        pixels, 255, ignored), or (B, C) float class probabilities (MixUp/CutMix targets)."""
        if y.is_floating_point():
            return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return F.cross_entropy(
            logits, y, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing
        )

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)

    def log(self, name: str, value: Tensor | float) -> None:
        """Record ``value`` (a number or a one-element tensor, kept on its device) under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a diagnostic needs a non-empty name, got {name!r}")
        value = value.detach().float().reshape(()) if isinstance(value, Tensor) else float(value)
        self.logged.setdefault(name, []).append(value)


@runtime_checkable
class LRScaled(Protocol):
    """A strategy module optimized at the head's learning rate times ``lr_scale`` (the default
    ``Strategy.param_groups`` reads it)."""

    lr_scale: float


class Strategy:
    """Base class of adaptation strategies (see ``hookspecs.register_strategies``)."""

    #: receives labelled source batches
    uses_source: ClassVar[bool] = True
    #: receives target batches (images, and labels only as ``target_labels`` allows)
    uses_target: ClassVar[bool] = False
    #: which target training labels the strategy reads: "none", "few" or "all"
    target_labels: ClassVar[Literal["none", "few", "all"]] = "none"
    #: whether the strategy sees target images at all: "none" for domain generalization (never a
    #: target batch, no ``adapt``, no label-free selection rule; only the oracle target-val)
    target_images: ClassVar[Literal["train", "none"]] = "train"
    #: hyperparameters the strategy pins instead of searching, e.g. {"freeze_depth": "all"}
    fixed: ClassVar[dict[str, Any]] = {}
    #: may the engine compute a fully frozen, unaugmented backbone's features once and serve them
    #: from a cache? ``model(x)``, ``model.features(x)`` and ``model.head(f)`` keep working either
    #: way (only the exact batch tensors the engine built are served from the cache). Set False if
    #: the strategy changes the backbone's weights or BatchNorm statistics during training (AdaBN)
    #: or otherwise needs the backbone to really run on every step.
    cache_features: ClassVar[bool] = True
    #: how many source domains the pair being trained has (``Batch.source_domain`` indexes them);
    #: set on the instance by the engine before ``setup``, so modules can be sized by it
    num_source_domains: int = 1
    #: True: ``training_step`` takes soft (B, C) float source labels (the labelled target for a
    #: strategy without source data) and computes its supervised loss with
    #: ``ctx.supervised_loss``; only such a strategy is given MixUp/CutMix batches
    mixed_labels: ClassVar[bool] = False
    #: "swa": the engine averages the weights at the end of each epoch of the second half of
    #: training and scores (and returns) the average, its batch norms' statistics recomputed on
    #: the training images it read; None trains and scores the weights as they are
    weight_average: ClassVar[Literal["swa"] | None] = None
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "tasks" in cls.__dict__:
            warnings.warn(
                f"{cls.__name__}.tasks is ignored: a strategy's tasks are declared once, with "
                "register(name, factory, tasks=(...)) in register_strategies",
                FutureWarning,
                stacklevel=2,
            )

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"unknown option(s) {sorted(options)}")

    @property
    def shots(self) -> int | None:
        """Labelled target images per class, when ``target_labels == "few"``."""
        return None

    def search_space(self, trial: optuna.Trial) -> dict[str, Any]:
        return {}

    def setup(
        self,
        model: TransferModel,
        num_classes: int,
        params: dict[str, Any],
        feature_dim: int | None,
    ) -> nn.Module | None:
        """Build extra trainable modules (a domain discriminator over ``feature_dim`` features);
        they reach ``training_step`` as ``ctx.extra``. Runs under the trial's seed."""
        return None

    def param_groups(
        self, extra: nn.Module, lr: float, weight_decay: float
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups of the module ``setup`` returned, given the head's learning rate
        and the trial's weight decay. Default: one group at ``lr`` times ``extra.lr_scale``
        (``LRScaled``; 1 without), with ``weight_decay``."""
        scale = float(extra.lr_scale) if isinstance(extra, LRScaled) else 1.0
        return [
            {"params": list(extra.parameters()), "lr": lr * scale, "weight_decay": weight_decay}
        ]

    def training_step(self, model: TransferModel, batch: Batch, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def adapt(self, model: TransferModel, target_images: Iterable[Tensor]) -> None:
        """Called after every epoch, before the model is scored, for strategies with
        ``uses_target``: ``target_images`` yields normalized, unaugmented target training batches
        without labels (AdaBN re-estimates normalization statistics here). Default: nothing."""


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:  # noqa: D102
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return -ctx.coeff * grad, None


def reverse_gradient(x: Tensor, coeff: float = 1.0) -> Tensor:
    """Gradient reversal (Ganin & Lempitsky, 2015): the identity forward; on the way back the
    gradient is multiplied by ``-coeff``. Put it between the features and a domain
    discriminator so that the backbone learns to fool what the discriminator learns."""
    return _ReverseGradient.apply(x, coeff)


def run_setup(
    strategy: Strategy,
    model: Any,
    num_classes: int,
    params: dict[str, Any],
    feature_dim: int | None,
    num_source_domains: int = 1,
) -> nn.Module | None:
    """``strategy.setup`` with the feature width (and ``strategy.num_source_domains`` set first);
    a strategy written before ``setup`` took it (three
    parameters) is still called as it was, with a warning that says what to change. A strategy
    whose declarations contradict each other (:func:`declaration_problem`) is refused first."""
    problem = declaration_problem(strategy)
    if problem is not None:
        raise PluginContractError(f"strategy {type(strategy).__name__}: {problem}")
    strategy.num_source_domains = num_source_domains
    try:
        inspect.signature(strategy.setup).bind(model, num_classes, params, feature_dim)
    except TypeError:
        warnings.warn(
            f"{type(strategy).__name__}.setup(model, num_classes, params) is the old signature: "
            "add a fourth parameter, feature_dim (the width of the features a head receives)",
            FutureWarning,
            stacklevel=2,
        )
        return strategy.setup(model, num_classes, params)
    return strategy.setup(model, num_classes, params, feature_dim)


def declaration_problem(strategy: Strategy | type[Strategy]) -> str | None:
    """Why a strategy's class declarations contradict each other, or None: one that sees no
    target image (``target_images = "none"``) can neither use the target nor read its labels."""
    if strategy.target_images not in ("train", "none"):
        return f"target_images must be 'train' or 'none', got {strategy.target_images!r}"
    if strategy.target_images == "none" and strategy.uses_target:
        return (
            "declares uses_target = True and target_images = 'none'; a strategy that sees no "
            "target image gets no target batch"
        )
    if strategy.target_images == "none" and strategy.target_labels != "none":
        return f"declares target_labels = {strategy.target_labels!r} and target_images = 'none'"
    return None
