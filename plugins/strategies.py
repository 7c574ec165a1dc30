"""Strategies for a labelled source and a target: the baseline and the supervised fine-tuning family
(fine-tuning, linear probing, LP-FT, L2-SP).

The same code serves classification and segmentation: cross-entropy (``ctx.supervised_loss``, with
the trial's label smoothing) ignores void pixels (255), and takes MixUp/CutMix's soft labels.
"""

from __future__ import annotations

import torch
from torch import nn

from harness import hookimpl
from harness.api import Batch, Option, StepContext, Strategy

#: the options of the fine-tuning family (``FineTune.__init__``)
SHOTS = {
    "shots": Option(
        int, min=1, default=None, help="labelled target images per class; all when unset"
    )
}


class SourceOnly(Strategy):
    """Train on source labels only; the target is seen only when scoring. The baseline."""

    uses_source = True
    uses_target = False
    target_labels = "none"
    mixed_labels = True
    description = "train on source labels, evaluate on the target (baseline)"

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        return ctx.supervised_loss(model(x), y)


class FineTune(Strategy):
    """Start from the backbone's weights and train on target labels (all, or ``shots`` per class)."""

    uses_source = False
    uses_target = True
    mixed_labels = True
    description = "train on target labels from the pretrained/source weights"

    def __init__(self, shots: int | None = None) -> None:
        super().__init__()
        if shots is not None and (not isinstance(shots, int) or shots < 1):
            raise ValueError(f"shots must be a positive integer, got {shots!r}")
        self._shots = shots

    @property
    def shots(self) -> int | None:
        return self._shots

    @property
    def target_labels(self) -> str:  # type: ignore[override]
        return "few" if self._shots else "all"

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.target
        return ctx.supervised_loss(model(x), y)


class LinearProbe(FineTune):
    """Freeze the whole backbone and train only the head on target labels."""

    fixed = {"freeze_depth": "all"}
    description = "backbone frozen, head trained on target labels"


class LPFT(FineTune):
    """Linear probe, then fine-tune (Kumar et al., 2022): for the first ``strategy.lp_fraction``
    of training the backbone is held fixed (no gradient, normalization statistics frozen) while the
    head learns; then everything trains, so the features start moving under a sensible head."""

    description = "linear probe first, then fine-tune everything (LP-FT)"
    #: whether the last step was a probe step (which left the backbone in eval mode)
    _probed = False

    def search_space(self, trial):
        return {"strategy.lp_fraction": trial.suggest_float("strategy.lp_fraction", 0.1, 0.7)}

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.target
        if (
            ctx.progress < float(ctx.params.get("strategy.lp_fraction", 0.5))
            and not model.head_takes_images
        ):
            model.backbone.eval()
            self._probed = True
            with torch.no_grad():
                features = model.features(x)
            logits = model.head(features)
        else:
            if self._probed and model.training:
                # the probe phase put the backbone in eval mode and the engine sets modes once per
                # epoch: without this, the rest of the epoch in which the phase switches would
                # fine-tune with frozen normalization statistics (frozen stages stay in eval mode)
                model.train()
                self._probed = False
            logits = model(x)
        return ctx.supervised_loss(logits, y)


class _StartingPoint(nn.Module):
    """The backbone's weights at the start of training, as buffers (nothing to optimize)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.names = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
        for i, n in enumerate(self.names):
            self.register_buffer(
                f"w{i}", dict(model.backbone.named_parameters())[n].detach().clone()
            )

    def distance(self, model) -> torch.Tensor:
        params = dict(model.backbone.named_parameters())
        total = (
            torch.zeros((), device=next(iter(self.buffers())).device)
            if self.names
            else torch.zeros(())
        )
        for i, n in enumerate(self.names):
            total = total + (params[n].float() - getattr(self, f"w{i}").float()).pow(2).sum()
        return total


class L2SP(FineTune):
    """Fine-tune with a penalty ``alpha / 2 * ||w - w0||^2`` pulling the trainable backbone weights
    towards their starting point w0 (Li et al., 2018) instead of towards zero."""

    description = "fine-tune with an L2 penalty towards the starting weights (L2-SP)"

    def search_space(self, trial):
        return {"strategy.alpha": trial.suggest_float("strategy.alpha", 1e-4, 1.0, log=True)}

    def setup(self, model, num_classes, params, feature_dim):
        return _StartingPoint(model)

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.target
        ce = ctx.supervised_loss(model(x), y)
        return ce + 0.5 * float(ctx.params.get("strategy.alpha", 0.01)) * ctx.extra.distance(model)


@hookimpl
def register_strategies(register):
    register("source-only", SourceOnly, description=SourceOnly.description, options={})
    register("finetune", FineTune, description=FineTune.description, options=SHOTS)
    register("linear-probe", LinearProbe, description=LinearProbe.description, options=SHOTS)
    register("lp-ft", LPFT, description=LPFT.description, options=SHOTS)
    register("l2-sp", L2SP, description=L2SP.description, options=SHOTS)
