"""Backbone weights: building backbones through their plugin, and ``weights = "source"``.

Source pretraining trains backbone + linear head on the source domain once with a fixed recipe and
caches the backbone as safetensors, keyed by everything that determines it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
from collections.abc import Iterable
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


#: the harness modules whose code decides source-pretrained weights: this one (the recipe and the
#: pretraining loop), the engine and what it trains with (augmentation, crops, batches, inputs,
#: loaders, the model, device and precision); with the backbone plugin's and the pretraining
#: head's modules, their bytes are hashed into the source-weights key
PRETRAINING_MODULES = (
    "harness.training.weights", "harness.training.engine", "harness.training.augment",
    "harness.training.augment_kernels", "harness.training.augment_policies",
    "harness.training.augment_ops", "harness.training.mixing",
    "harness.training.crops", "harness.training.batches", "harness.training.inputs",
    "harness.training.loader", "harness.training.model", "harness.training.device",
)  # fmt: skip


def _defining_file(obj: Any) -> Path | None:
    """The source file that defines ``obj`` (a factory: function, class, method, partial or
    callable instance); None where it has none (built in, or made at run time)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    for candidate in (obj, type(obj)):
        try:
            found = inspect.getsourcefile(candidate)
        except TypeError:
            continue
        if found:
            return Path(found).resolve()
    return None


def source_code_files(entry: Any, head: Any = None) -> list[Path]:
    """The files whose code decides the weights ``weights = "source"`` pretrains: the harness's
    :data:`PRETRAINING_MODULES`, the backbone plugin's module and the pretraining head's."""
    files = {Path(importlib.import_module(m).__file__).resolve() for m in PRETRAINING_MODULES}
    for e in (entry, head):
        if e is not None and (found := _defining_file(e.factory)) is not None:
            files.add(found)
    return sorted(files)


@functools.cache
def _code_sha256(path: Path) -> str:
    """A code file's sha256, read once per process: the code a process runs is what it imported."""
    return file_sha256(path)


def source_code_hash(files: Iterable[Path]) -> str:
    """One hash of the bytes of ``files`` (by file name and content, so that the same code in
    another checkout or site-packages gives the same hash)."""
    digests = sorted((Path(f).name, _code_sha256(Path(f))) for f in files)
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@functools.lru_cache(maxsize=32)
def _weights_sha256(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def weights_file_record(weights: str) -> dict[str, str] | None:
    """What the provenance records of a method's weights file (source-pretrained or the study's
    own): its name and sha256; None for named weights ("none", "imagenet")."""
    path = Path(weights)
    if weights in ("none", "imagenet") or not path.is_file():
        return None
    st = path.stat()
    return {"file": path.name, "sha256": _weights_sha256(str(path), st.st_mtime_ns, st.st_size)}


def source_weights_key(
    backbone: str,
    source: DomainData,
    recipe: SourceRecipe,
    head: str = SOURCE_LINEAR_HEAD,
    extra: dict[str, Any] | None = None,
    code: str | None = None,
) -> str:
    """The cache key of source-pretrained weights: everything that determines them, ``code`` the
    :func:`source_code_hash` of the code that trains them."""
    import importlib.metadata as md

    from harness.versions import HARNESS_VERSION as __version__

    payload = json.dumps(
        {
            "code": code,
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
        source_code_hash(source_code_files(entry, head)),
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
    if head is None:  # the source classifier, kept for the scores that need one (harness rank)
        _save_source_head(model.head, path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def source_head_path(weights: str | Path) -> Path:
    """Where the linear layer that pretrained a classification backbone on the source is kept,
    beside the backbone's weights file (written before it, so that one implies the other)."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".head.safetensors")


def _save_source_head(linear: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in linear.state_dict().items()}
    with atomic_path(source_head_path(path)) as tmp:
        save_file(state, str(tmp))
