"""Heads: linear and MLP classifiers over pooled backbone features."""

from __future__ import annotations

from torch import nn

from harness import hookimpl
from harness.api import Backbone, Option

_DROPOUT = "probability of zeroing a feature in training"


@hookimpl
def register_heads(register):
    register(
        "linear",
        build_linear,
        description="one linear layer",
        tasks=("classification",),
        options={"dropout": Option(float, min=0, max=1, default=0.0, help=_DROPOUT)},
    )
    register(
        "mlp",
        build_mlp,
        description="hidden layer with BatchNorm, ReLU and dropout",
        tasks=("classification",),
        options={
            "hidden": Option(int, min=1, default=256, help="width of the hidden layer"),
            "dropout": Option(float, min=0, max=1, default=0.2, help=_DROPOUT),
        },
    )


def build_linear(
    *, backbone: Backbone, num_classes: int, task: str, dropout: float = 0.0
) -> nn.Module:
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(backbone.num_features, num_classes))


def build_mlp(
    *, backbone: Backbone, num_classes: int, task: str, hidden: int = 256, dropout: float = 0.2
) -> nn.Module:
    return nn.Sequential(
        nn.Linear(backbone.num_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
