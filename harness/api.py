"""Types and helpers that plugins build on. See ``harness.hookspecs`` for the hooks themselves."""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from harness.errors import DatasetError, NonFiniteLossError, PluginContractError, WeightsError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "Batch",
    "DatasetError",
    "DomainData",
    "NonFiniteLossError",
    "Split",
    "StepContext",
    "Strategy",
    "WeightsError",
    "fingerprint_tensors",
    "load_weights_file",
    "random_split",
    "stages_from_prefixes",
    "stratified_split",
]

Task = Literal["classification", "segmentation"]
#: mask value of pixels that carry no label (void) in segmentation
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """One split of a domain: uint8 images ``(N, C, H, W)`` and int64 labels: ``(N,)`` class
    indices, or ``(N, H, W)`` masks for segmentation (``IGNORE_INDEX`` = 255 marks void pixels)."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise PluginContractError(
                f"split images must be a uint8 tensor (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or len(self.y) != len(self.x):
            raise PluginContractError(
                f"split labels must be int64 with one label per image, got {self.y.dtype} "
                f"{tuple(self.y.shape)} for {len(self.x)} images"
            )

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))

    def subset(self, index: Tensor) -> Split:
        return Split(self.x[index], self.y[index])


@dataclass
class DomainData:
    """A domain with deterministic train/val/test splits, as a dataset factory returns it."""

    name: str
    task: Task
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x: Tensor,
        y: Tensor,
        *,
        class_names: Sequence[str],
        seed: int,
        fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
        task: Task = "classification",
        meta: dict[str, Any] | None = None,
    ) -> DomainData:
        """Split one labelled pool into seeded train/val/test splits (stratified by class for
        classification; by image for segmentation, where ``y`` holds masks ``(N, H, W)``)."""
        if y.ndim == 1:
            train_i, val_i, test_i = stratified_split(y, fractions, seed)
        else:
            train_i, val_i, test_i = random_split(len(y), fractions, seed)
        return cls(
            name=name,
            task=task,
            class_names=list(class_names),
            train=Split(x[train_i], y[train_i]),
            val=Split(x[val_i], y[val_i]),
            test=Split(x[test_i], y[test_i]),
            fingerprint=fingerprint_tensors(x, y, train_i, val_i, test_i),
            meta=dict(meta or {}),
        )

    def check(self, image_size: int | None = None) -> None:
        """Raise ``PluginContractError`` when the data break the dataset contract."""
        shapes = {tuple(s.x.shape[1:]) for s in (self.train, self.val, self.test)}
        if len(shapes) != 1:
            raise PluginContractError(
                f"domain {self.name!r}: splits have different image shapes {shapes}"
            )
        c, h, w = self.image_shape
        if c != 3:
            raise PluginContractError(f"domain {self.name!r}: images must have 3 channels, got {c}")
        if image_size is not None and (h, w) != (image_size, image_size):
            raise PluginContractError(
                f"domain {self.name!r}: asked for {image_size} px images, got {h}x{w}"
            )
        for split_name in ("train", "val", "test"):
            split: Split = getattr(self, split_name)
            if len(split) == 0:
                raise PluginContractError(f"domain {self.name!r}: the {split_name} split is empty")
            y = split.y
            if self.task == "segmentation":
                if y.shape[1:] != split.x.shape[2:]:
                    raise PluginContractError(
                        f"domain {self.name!r}: {split_name} masks are {tuple(y.shape[1:])}, images "
                        f"{tuple(split.x.shape[2:])}"
                    )
                y = y[y != IGNORE_INDEX]
                if y.numel() == 0:
                    continue
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise PluginContractError(
                    f"domain {self.name!r}: {split_name} labels span {lo}..{hi} but there are "
                    f"{self.num_classes} classes"
                )


def stratified_split(
    y: Tensor, fractions: tuple[float, float, float], seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded per-class split of indices into three parts with the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    for label in torch.unique(y).tolist():
        idx = torch.nonzero(y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    return tuple(torch.sort(torch.cat(p)).values for p in parts)  # type: ignore[return-value]


def random_split(
    n: int, fractions: tuple[float, float, float], seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded split of ``range(n)`` into three sorted parts with the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = round(fractions[0] * n), round(fractions[1] * n)
    parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
    return tuple(torch.sort(p).values for p in parts)  # type: ignore[return-value]


def fingerprint_tensors(*tensors: Tensor | bytes | str) -> str:
    """A short, stable hash of tensors' bytes (and strings): changes when the data change."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(t, str):
            h.update(t.encode())
        else:
            h.update(t)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------- models


@dataclass
class Backbone:
    """A feature extractor and the facts the harness needs about it.

    ``stages`` lists parameter names of ``module`` stage by stage, stem first; every trainable
    parameter belongs to exactly one stage. ``mean`` and ``std`` are the input normalization the
    weights expect (pixel values in [0, 1]).
    """

    module: nn.Module
    num_features: int
    stages: list[list[str]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_info: list[dict[str, Any]] = field(default_factory=list)
    name: str = ""

    def check(self) -> None:
        names = [n for n, _ in self.module.named_parameters()]
        staged = [n for stage in self.stages for n in stage]
        if not self.stages:
            raise PluginContractError(f"backbone {self.name!r} lists no stages")
        missing = sorted(set(names) - set(staged))
        if missing:
            raise PluginContractError(
                f"backbone {self.name!r}: parameters in no stage: {', '.join(missing[:5])}"
            )
        if len(staged) != len(set(staged)):
            raise PluginContractError(
                f"backbone {self.name!r}: a parameter is listed in two stages"
            )


def stages_from_prefixes(module: nn.Module, prefixes: Iterable[str]) -> list[list[str]]:
    """Group ``module``'s parameters into stages by name prefix, in the given order."""
    prefixes = list(prefixes)
    stages: list[list[str]] = [[] for _ in prefixes]
    for name, _ in module.named_parameters():
        for i, prefix in enumerate(prefixes):
            if name == prefix or name.startswith(prefix + "."):
                stages[i].append(name)
                break
        else:
            raise PluginContractError(
                f"parameter {name!r} matches none of the stage prefixes {prefixes}"
            )
    return [s for s in stages if s]


#: files read with ``reuse=True``: (path, mtime, size) -> state dict, most recently used last
_REUSED: dict[tuple[str, int, int], dict[str, Tensor]] = {}
#: at most this many bytes of tensors are kept for reuse (the newest files first)
REUSE_BYTES = 2**30


def load_weights_file(path: str | Path, *, reuse: bool = False) -> dict[str, Tensor]:
    """Load a state dict from ``.safetensors`` or a torch checkpoint, never executing pickled code.

    Torch checkpoints are read with ``weights_only=True``; a nested ``state_dict``/``model`` entry
    is unwrapped. Anything else raises ``WeightsError`` naming the file.

    With ``reuse=True`` the tensors read from an unchanged file (same path, modification time and
    size) are kept in memory and returned again by the next such call, so a search that builds a
    model from the same weights for every trial reads and parses the file once. The tensors are
    then shared between callers: copy them into a model (``load_state_dict``), never modify them
    in place.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file not found: {path}",
            hint="set weights to an existing .safetensors or .pth file, or to 'none'",
        )
    if not reuse:
        return _read_weights_file(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    state = _REUSED.pop(key, None)
    if state is None:
        state = _read_weights_file(path)
    _REUSED[key] = state
    total = 0
    for k in reversed(list(_REUSED)):  # newest first; drop what no longer fits
        total += sum(t.numel() * t.element_size() for t in _REUSED[k].values())
        if total > REUSE_BYTES and k != key:
            del _REUSED[k]
    return state


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"refused to load {path}: it holds pickled objects other than tensors "
            "(read with torch.load(weights_only=True); nothing in it was executed)",
            hint="re-save the state dict as .safetensors, or as a checkpoint of plain tensors",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user error
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        raise WeightsError(
            f"cannot load weights from {path}: {type(exc).__name__}: {detail[0][:200] if detail else ''}",
            hint="torch checkpoints are read with weights_only=True; save plain tensors or use .safetensors",
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


# --------------------------------------------------------------------------------------- strategies


@dataclass
class Batch:
    """What one training step receives. ``target`` labels are ``None`` unless the strategy's
    ``target_labels`` allows them."""

    source: tuple[Tensor, Tensor] | None = None
    target: tuple[Tensor, Tensor | None] | None = None


@dataclass
class StepContext:
    """Where training stands, for schedules: ``progress`` runs from 0 to 1 over the trial."""

    params: dict[str, Any]
    epoch: int
    epochs: int
    step: int
    total_steps: int
    num_classes: int
    extra: nn.Module | None = None

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


class Strategy:
    """Base class of adaptation strategies (see ``hookspecs.register_strategies``)."""

    #: receives labelled source batches
    uses_source: ClassVar[bool] = True
    #: receives target batches (images, and labels only as ``target_labels`` allows)
    uses_target: ClassVar[bool] = False
    #: which target training labels the strategy reads: "none", "few" or "all"
    target_labels: ClassVar[Literal["none", "few", "all"]] = "none"
    #: hyperparameters the strategy pins instead of searching, e.g. {"freeze_depth": "all"}
    fixed: ClassVar[dict[str, Any]] = {}
    #: the tasks the strategy applies to; a study of another task is refused before training
    tasks: ClassVar[tuple[str, ...]] = ("classification", "segmentation")
    #: may the engine compute a fully frozen, unaugmented backbone's features once and serve them
    #: from a cache? ``model(x)``, ``model.features(x)`` and ``model.head(f)`` keep working either
    #: way (only the exact batch tensors the engine built are served from the cache). Set False if
    #: the strategy changes the backbone's weights or BatchNorm statistics during training (AdaBN)
    #: or otherwise needs the backbone to really run on every step.
    cache_features: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"unknown option(s) {sorted(options)}")

    @property
    def shots(self) -> int | None:
        """Labelled target images per class, when ``target_labels == "few"``."""
        return None

    def search_space(self, trial: optuna.Trial) -> dict[str, Any]:
        return {}

    def setup(self, model: nn.Module, num_classes: int, params: dict[str, Any]) -> nn.Module | None:
        """Build extra trainable modules (a domain discriminator, ...); they reach ``training_step``
        as ``ctx.extra`` and are optimized with the head's learning rate, times the module's
        ``lr_scale`` attribute when it has one."""
        return None

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def adapt(self, model: nn.Module, target_images: Iterable[Tensor]) -> None:
        """Called after every epoch, before the model is scored, for strategies with
        ``uses_target``: ``target_images`` yields normalized, unaugmented target training batches
        without labels (AdaBN re-estimates normalization statistics here). Default: nothing."""


def check_finite(loss: Tensor) -> Tensor:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"non-finite loss {loss.detach().float().cpu().tolist()}")
    return loss
