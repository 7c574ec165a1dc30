"""Backbone weights: building backbones through their plugin, and ``weights = "source"``.

Source pretraining trains backbone + linear head on the source domain once with a fixed recipe and
caches the backbone as safetensors, keyed by everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.api import IGNORE_INDEX, Backbone, DomainData, Strategy
from harness.errors import PluginContractError
from harness.fileio import atomic_path, cache_dir


def build_backbone(entry: Any, name: str, weights: str) -> Backbone:
    backbone = entry.factory(name, weights=weights)
    if not isinstance(backbone, Backbone):
        raise PluginContractError(
            f"backbone factory of plugin {entry.plugin!r} ({entry.dist}) returned "
            f"{type(backbone).__name__}, not harness.api.Backbone"
        )
    backbone.name = backbone.name or name
    backbone.check()
    return backbone


@dataclass(frozen=True)
class SourceRecipe:
    epochs: int
    lr: float
    weight_decay: float
    augment: str
    batch_size: int
    seed: int
    #: the side images are cropped to when stored larger (None: as stored)
    input_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The recipe as the source-weights key records it (``input_size`` only when set: the
        crops of the source images differ with it)."""
        out = dict(self.__dict__)
        if out["input_size"] is None:
            out.pop("input_size")
        return out


class _SourceCE(Strategy):
    uses_source, uses_target, target_labels = True, False, "none"

    def training_step(self, model, batch, ctx):
        x, y = batch.source
        return nn.functional.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)


#: the name the source-weights key records for the plain linear layer that pretrains a
#: classification backbone (the engine builds it itself: it is not a head plugin)
SOURCE_LINEAR_HEAD = "linear"
#: the ``register(...)`` meta key of the head that pretrains a backbone on a segmentation source
SOURCE_PRETRAINING = "source_pretraining"


def source_pretraining_head(registry: Any, task: str) -> Any | None:
    """The head entry that pretrains backbones on a ``task`` source: ``None`` for classification
    (a linear layer does), else the one head registered with ``source_pretraining=True``."""
    if task != "segmentation":
        return None
    heads = [
        e
        for e in (registry.get("head", n) for n in registry.names("head"))
        if e.meta.get(SOURCE_PRETRAINING) and task in e.tasks
    ]
    if len(heads) != 1:
        found = ", ".join(e.name for e in heads) or "none"
        raise PluginContractError(
            f'weights = "source" on {task} needs exactly one head registered with '
            f"{SOURCE_PRETRAINING}=True; found {found}",
            hint="load the plugin that provides it (the built-in smp_heads declares fpn)",
        )
    return heads[0]


def source_weights_key(
    backbone: str,
    source: DomainData,
    recipe: SourceRecipe,
    head: str = SOURCE_LINEAR_HEAD,
    extra: dict[str, Any] | None = None,
) -> str:
    import importlib.metadata as md

    from harness.versions import HARNESS_VERSION as __version__

    payload = json.dumps(
        {
            "extra": extra or {},
            "timm": md.version("timm"),
            "backbone": backbone,
            "head": head,
            "source": source.fingerprint,
            "shape": list(source.image_shape),
            "recipe": recipe.as_dict(),
            "harness": __version__.split(".")[0:2],
            "torch": torch.__version__.split("+")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def source_pretrained(
    entry: Any,
    backbone_name: str,
    source: DomainData,
    recipe: SourceRecipe,
    device: torch.device,
    precision: Any,
    log: Any = None,
    head: Any = None,
) -> Path:
    """Path of the cached source-pretrained backbone weights, training them on first use.

    ``head`` is the entry of the decoder for a segmentation source (``source_pretraining_head``);
    a classification source is pretrained with a linear layer."""
    from filelock import FileLock

    key = source_weights_key(
        backbone_name,
        source,
        recipe,
        head.name if head is not None else SOURCE_LINEAR_HEAD,
        {
            "plugin": f"{entry.plugin} ({entry.dist})",
            "precision": precision.describe(),
            "device": device.type,
        },
    )
    path = cache_dir() / "source-weights" / f"{backbone_name.replace('/', '_')}-{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return path
        if log:
            log(
                f"pretraining {backbone_name} on source {source.name!r} ({recipe.epochs} epochs, cached as {path.name})"
            )
        _pretrain(entry, backbone_name, source, recipe, device, precision, head, path)
        return path


def _pretrain(
    entry: Any,
    backbone_name: str,
    source: DomainData,
    recipe: SourceRecipe,
    device: torch.device,
    precision: Any,
    head: Any,
    path: Path,
) -> None:
    """Train backbone + head on the source with ``recipe`` and save the backbone to ``path``."""
    from safetensors.torch import save_file

    from harness.metrics import primary_metric, score
    from harness.training.engine import TrainConfig, Trainer, TransferModel, seed_everything

    seed_everything(recipe.seed)
    backbone = build_backbone(entry, backbone_name, "none")
    if head is None:
        linear = nn.Linear(backbone.num_features, source.num_classes)
        model = TransferModel(backbone, linear, input_size=recipe.input_size)
    else:
        decoder = head.factory(backbone=backbone, num_classes=source.num_classes, task=source.task)
        model = TransferModel(backbone, decoder, source.task, recipe.input_size)
    cfg = TrainConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        backbone_lr=recipe.lr,
        head_lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        freeze_depth=0,
        augment=recipe.augment,
        seed=recipe.seed,
        device=device,
        precision=precision,
    )
    trainer = Trainer(model, _SourceCE(), source, source, cfg)
    trainer.fit()
    metric = primary_metric(source.task)
    val = score(source.task, trainer.predict(source.val), source.val, source.num_classes)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    meta = {
        "backbone": backbone_name,
        "source": source.name,
        "source_fingerprint": source.fingerprint,
        f"source_val_{metric}": f"{val[metric]:.4f}",
        "recipe": json.dumps(recipe.as_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
