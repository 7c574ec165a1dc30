"""How a trial's model is made: the backbone's weights (source-pretrained where the method says
so), the backbone reused and reset in place between trials, the head, and each backbone's precision."""

from __future__ import annotations

from pathlib import Path

import torch

from harness import api
from harness.errors import PluginContractError
from harness.search.context import Context
from harness.search.resolve import ResolvedMethod
from harness.training.engine import Precision, TransferModel
from harness.training.reset import BackboneReset
from harness.training.weights import (
    SourceRecipe,
    build_backbone,
    source_pretrained,
    source_pretraining_head,
)


class ModelFactory:
    """Builds each trial's, final run's and preflight's model. ``reset`` is how a kept backbone is
    made new again (``harness.training.reset.BackboneReset``, or a stand-in with its interface)."""

    def __init__(self, ctx: Context, reset: type[BackboneReset] = BackboneReset) -> None:
        self.ctx, self.spec, self.reset = ctx, ctx.spec, reset
        #: the one backbone kept for reuse, by (plugin, backbone, weights, weights file's stat)
        self.resets: dict[tuple, BackboneReset] = {}
        #: the precision "auto" chose, by backbone name
        self.precisions: dict[str, Precision] = {}

    def backbone_weights(self, rm: ResolvedMethod, source: api.DomainData) -> str:
        """The method's weights: a name, or the path of the backbone pretrained on ``source``."""
        w = rm.method.weights
        if w != "source":
            return w
        p = self.spec.pretrain
        recipe = SourceRecipe(
            p.epochs,
            p.lr,
            p.weight_decay,
            p.augment,
            self.spec.batch_size,
            self.spec.seed,
            self.spec.image_size,
        )
        head = source_pretraining_head(self.ctx.registry, source.task)
        return str(
            source_pretrained(
                rm.backbone,
                rm.method.backbone,
                source,
                recipe,
                self.ctx.device,
                self.precision_for(rm),
                self.ctx.log,
                head,
            )
        )

    def build_model(
        self, rm: ResolvedMethod, weights: str, num_classes: int, reuse: bool = False
    ) -> TransferModel:
        """A fresh model: the backbone with ``weights`` and a new head initialized from the global
        generators. With ``reuse`` (trials, final runs and the preflight, which build one model at a
        time) and the study's ``reuse_backbone``, the backbone is the previous call's module reset in
        place where that gives exactly what a build gives (``harness.training.reset``): the head's
        initialization then follows the caller's seed directly, not the backbone's."""
        reset = self._backbone_reset(rm, weights) if reuse and self.spec.reuse_backbone else None
        backbone = (
            reset()
            if reset is not None
            else build_backbone(rm.backbone, rm.method.backbone, weights)
        )
        head = rm.head.factory(
            backbone=backbone,
            num_classes=num_classes,
            task=self.spec.task,
            **rm.method.head_options,
        )
        if not isinstance(head, torch.nn.Module):
            raise PluginContractError(
                f"head factory of plugin {rm.head.plugin!r} ({rm.head.dist}) returned {type(head).__name__}, "
                "not a torch.nn.Module"
            )
        return TransferModel(backbone, head, self.spec.task, self.spec.image_size)

    def _backbone_reset(self, rm: ResolvedMethod, weights: str) -> BackboneReset | None:
        if weights == "none":
            return None  # every trial's backbone is a new random initialization
        path = Path(weights)
        st = path.stat() if path.is_file() else None
        key = (rm.backbone.plugin, rm.method.backbone, weights, st and (st.st_mtime_ns, st.st_size))
        if key not in self.resets:
            self.resets.clear()  # one module kept: the trials and final runs of one method at a time
            self.resets[key] = self.reset(
                lambda: build_backbone(rm.backbone, rm.method.backbone, weights)
            )
        return self.resets[key]

    def precision_for(self, rm: ResolvedMethod) -> Precision:
        """The pinned precision, or for "auto" the fastest by a short probe, cached on disk per
        backbone, image size, batch size, device and torch version (see ``harness.training.probe``)."""
        if self.spec.precision != "auto":
            return self.ctx.precision
        name = rm.method.backbone
        if name not in self.precisions:
            from harness.training import probe

            self.precisions[name] = probe.resolve(
                "auto", self.ctx.device, backbone=name, image_size=self.spec.image_size, batch_size=self.spec.batch_size,
                build=lambda: self.build_model(rm, "none", 2), log=self.ctx.log,
            )  # fmt: skip
        return self.precisions[name]
