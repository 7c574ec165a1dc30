"""What a backbone or head plugin provides: ``Backbone``, weights loading, head capabilities,
and ``TransferModel``, the model a strategy receives."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from harness.api.data import IMAGENET_MEAN, IMAGENET_STD
from harness.errors import PluginContractError, WeightsError


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


# --------------------------------------------------------------------------------------- heads


@runtime_checkable
class ImageHead(Protocol):
    """A head that reads the images rather than pooled features (``takes_images = True``) and
    returns per-pixel logits ``(N, num_classes, H, W)``: a segmentation decoder that runs the
    backbone's modules itself."""

    takes_images: bool

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class FeatureMapHead(Protocol):
    """A segmentation head that also hands out the backbone's deepest feature map, which the
    feature-level adaptation strategies (dann, coral, mmd) align."""

    #: channels ``C`` of the deepest feature map
    deepest_channels: int

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(N, K, H, W)`` and the deepest feature map ``(N, C, h, w)`` of one pass."""
        ...


def takes_images(head: nn.Module) -> bool:
    """Whether ``head`` is an ``ImageHead`` that says so."""
    return isinstance(head, ImageHead) and bool(head.takes_images)


# --------------------------------------------------------------------------------------- model


@runtime_checkable
class TransferModel(Protocol):
    """The model a strategy receives (in ``setup``, ``training_step`` and ``adapt``): a backbone
    and a head, an ``nn.Module``. ``harness.training.engine.TransferModel`` implements it."""

    #: the backbone's module, and the ``Backbone`` that describes it
    backbone: nn.Module
    spec: Backbone
    head: nn.Module
    #: "classification" or "segmentation"
    task: str
    #: whether the head is an ``ImageHead`` (``model(x)`` then skips ``features``)
    head_takes_images: bool
    #: the normalization of the backbone's weights, ``(1, 3, 1, 1)`` buffers
    mean: Tensor
    std: Tensor
    training: bool

    def __call__(self, x: Tensor) -> Tensor:
        """Logits of normalized images: ``(N, K)``, or ``(N, K, H, W)`` for segmentation."""
        ...

    def features(self, x: Tensor) -> Tensor:
        """The backbone's pooled features ``(N, spec.num_features)``."""
        ...

    def normalize(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] to the backbone's normalized input."""
        ...

    @property
    def feature_dim(self) -> int | None:
        """Width of the features a feature-level strategy aligns: ``spec.num_features`` for
        classification, the head's ``deepest_channels`` for segmentation (``None`` without)."""
        ...

    def head_parameters(self) -> list[nn.Parameter]:
        """The head's own parameters (a decoder shares the backbone's)."""
        ...

    def train(self, mode: bool = True) -> TransferModel: ...

    def eval(self) -> TransferModel: ...
