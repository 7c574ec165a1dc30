"""The model a trial trains: a backbone plugin's module and a head plugin's module."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from harness.api import Backbone, FeatureMapHead, takes_images


class TransferModel(nn.Module):
    """Backbone plus head, the implementation of ``harness.api.TransferModel``: ``forward``
    gives logits, ``features`` the pooled backbone output."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        task: str = "classification",
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone.module
        self.head = head
        self.spec = backbone
        self.task = task
        #: side of the square images the model takes: larger stored images are cropped to it
        #: (randomly in training, centered otherwise); None takes images as they are stored
        self.input_size = input_size
        # a segmentation decoder runs the backbone's modules itself, on the image
        self.head_takes_images = takes_images(head)
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

    @property
    def feature_dim(self) -> int | None:
        """See ``harness.api.TransferModel.feature_dim``."""
        if self.task != "segmentation":
            return int(self.spec.num_features)
        if isinstance(self.head, FeatureMapHead):
            return int(self.head.deepest_channels)
        return None

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


#: the attribute a backbone plugin may set on a DropPath module: its share of the model's rate
#: (timm's linear profile over depth); the timm plugin records it when it builds a model
DROP_PATH_SHARE = "drop_path_share"


def set_drop_path(module: nn.Module, rate: float) -> int:
    """Set the drop probability of every timm ``DropPath`` in ``module`` in place: ``rate`` at
    the deepest block, less in earlier ones as timm's ``drop_path_rate`` spreads it (each
    module's recorded share, else (i + 1) / n for the i-th of n blocks that hold one, timm's
    profile when the first block, at rate 0, has none). Returns how many modules were set."""
    from timm.layers import DropPath  # the only drop-path modules the harness knows

    found = [(n, m) for n, m in module.named_modules() if isinstance(m, DropPath)]
    blocks: dict[str, int] = {}
    for name, _ in found:
        blocks.setdefault(name.rpartition(".")[0], len(blocks))
    for name, m in found:
        share = getattr(m, DROP_PATH_SHARE, None)
        if share is None:
            share = (blocks[name.rpartition(".")[0]] + 1) / len(blocks)
        m.drop_prob = float(rate) * float(share)
    return len(found)
