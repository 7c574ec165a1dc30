"""A kept model folder back into a model that predicts: ``load_model(folder)``.

Nothing in the folder is trusted before it is checked: the card's format (a newer harness's is
refused), every file's hash and the weights file's header (``card.verify``: safetensors only, a
pickle is never unpickled), then the plugin names against the registry. The model is rebuilt as the harness built it (backbone with
weights "none", a new head from its factory), and its state dict is loaded strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness.errors import HarnessError, UnknownPluginError, WeightsError
from harness.models import card as cards
from harness.models.predict import Prediction, Preprocessing, predict_images
from harness.training.device import Precision, resolve_device
from harness.training.model import TransferModel
from harness.training.weights import build_backbone

WEIGHTS, CARD = cards.WEIGHTS, cards.CARD
#: where an ensemble's members live: ``members/seed-<s>/``, each a whole kept model folder
MEMBERS = "members"


class LoadedModel:
    """A kept model (or an ensemble of the K seeds' models), in eval mode on its device.

    ``module`` is the ``TransferModel`` (an ``nn.ModuleList`` of them for an ensemble), ``card``
    the card as read, ``predict(images)`` the predictions with the card's preprocessing."""

    def __init__(
        self,
        folder: Path,
        card: dict[str, Any],
        members: list[TransferModel],
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.folder, self.card, self.members = folder, card, members
        self.device, self.precision = device, precision
        self.task: str = card["task"]
        self.class_names: list[str] = [str(c) for c in card["class_names"]]
        self.void_index: int | None = card.get("void_index")
        self.preprocessing = Preprocessing.from_card(card)

    @property
    def module(self) -> nn.Module:
        return self.members[0] if len(self.members) == 1 else nn.ModuleList(self.members)

    @property
    def ensemble(self) -> list[int] | None:
        return self.card.get("ensemble")

    def predict(
        self, images: Tensor | str | Path | list[str | Path], batch_size: int = 32
    ) -> Prediction:
        """Predictions for uint8 images ``(N, 3, H, W)`` (as the harness stores them) or image
        files (read with the harness's reader at the card's stored size): probabilities and
        classes for a classifier, a mask per image at its own size for segmentation. An
        unreadable file raises ``DatasetError`` naming it."""
        return predict_images(self, images, batch_size)

    def __repr__(self) -> str:
        kind = f"ensemble of {len(self.members)}" if len(self.members) > 1 else "model"
        return f"LoadedModel({kind}, {self.task}, {len(self.class_names)} classes, {self.folder})"


def load_model(
    folder: str | Path, device: str = "auto", precision: str | None = None, registry: Any = None
) -> LoadedModel:
    """The kept model (or ensemble) in ``folder``, checked and rebuilt, in eval mode on ``device``.

    ``precision`` is the harness's precision name (``fp32``, ``bf16``, ...); by default the one the
    card records the model was scored in, else fp32, so that predictions are the scored ones."""
    folder = Path(folder)
    card = checked_card(folder)
    if registry is None:
        from harness.registry import get_registry

        registry = get_registry()
    dev = resolve_device(device)
    if card.get("ensemble") is not None:
        members = [
            _member(folder / MEMBERS / f"seed-{s}", registry, dev) for s in _seeds(folder, card)
        ]
    else:
        members = [build_module(folder, card, registry, dev)]
    return LoadedModel(folder, card, members, dev, _precision(card, precision, dev))


def checked_card(folder: Path) -> dict[str, Any]:
    """The card of ``folder`` once its hashes, its format and its weights file's header are
    checked; raises ``WeightsError`` (one line) otherwise."""
    if not (folder / CARD).is_file():
        raise WeightsError(
            f"{folder}: no {CARD}; not a kept model folder",
            hint="`harness export --study NAME --out DIR` writes one",
        )
    card = cards.read_card(folder)  # a newer harness's card is refused here
    if card.get("ensemble") is not None:
        verify_ensemble(folder, card)
    else:
        cards.verify(folder)  # hashes, and weights that are safetensors: nothing is loaded before
    return card


def verify_ensemble(folder: Path, card: dict[str, Any]) -> None:
    """An ensemble's folder: every file its card lists present with its hash (the members'
    files among them), ``SHA256SUMS`` agreeing; then each member as a kept model."""
    files = card.get("files")
    sums_path = folder / cards.SUMS
    if not isinstance(files, dict) or not files or not sums_path.is_file():
        raise WeightsError(f"{folder}: an ensemble needs its card's files and {cards.SUMS}")
    sums = {}
    for line in sums_path.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.partition("  ")
        sums[name.strip()] = digest.strip()
    for name, digest in {**files, CARD: sums.get(CARD)}.items():
        path = folder / name
        if digest is None or sums.get(name) != digest:
            raise WeightsError(f"{sums_path}: does not agree with the card about {name}")
        if not path.is_file():
            raise WeightsError(f"{path}: missing")
        if cards.sha256_file(path) != digest:
            raise WeightsError(f"{path}: sha256 mismatch (changed since it was written)")
    for seed in _seeds(folder, card):
        cards.verify(folder / MEMBERS / f"seed-{seed}")


def build_module(
    folder: Path, card: dict[str, Any], registry: Any, device: torch.device
) -> TransferModel:
    """The card's model, rebuilt by its plugins and loaded strictly with the folder's weights."""
    from safetensors.torch import load_file

    bb, hd = card["backbone"], card["head"]
    try:
        bb_entry = registry.get("backbone", bb["name"])
        head_entry = registry.get("head", hd["name"])
    except UnknownPluginError as exc:
        raise UnknownPluginError(f"{folder / CARD}: {exc}", hint=exc.hint) from None
    backbone = build_backbone(bb_entry, bb["name"], "none")
    _check_normalization(folder, card, backbone)
    head = head_entry.factory(
        backbone=backbone,
        num_classes=len(card["class_names"]),
        task=card["task"],
        **(hd.get("options") or {}),
    )
    size = card["preprocessing"]["image_size"]
    model = TransferModel(backbone, head, card["task"], size)
    load_strictly(model, load_file(str(folder / WEIGHTS)), folder / WEIGHTS)
    return model.to(device).eval()


def load_strictly(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    """``model.load_state_dict(tensors, strict=True)``; a name the file holds once for tensors the
    model shares (a decoder's encoder is the backbone) is given to each of its names."""
    own = model.state_dict()
    by_storage: dict[int, list[str]] = {}
    for k, v in own.items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    full = dict(tensors)
    for names in by_storage.values():
        present = [n for n in names if n in tensors]
        for n in names:
            if n not in full and present:
                full[n] = tensors[present[0]]
    missing = sorted(set(own) - set(full))
    unexpected = sorted(set(full) - set(own))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise WeightsError(
            f"{path}: the weights do not fit the card's model: {len(missing)} missing, "
            f"{len(unexpected)} unexpected tensor(s) (first: {first!r})"
        )
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: {str(exc).splitlines()[-1].strip()}") from None


def _check_normalization(folder: Path, card: dict[str, Any], backbone: Any) -> None:
    """The backbone plugin must normalize as the card says the model was trained."""
    prep = card["preprocessing"]
    for key, ours in (("mean", backbone.mean), ("std", backbone.std)):
        theirs = prep.get(key)
        if theirs is not None and any(
            abs(float(a) - float(b)) > 1e-6 for a, b in zip(theirs, ours, strict=True)
        ):
            raise WeightsError(
                f"{folder / CARD}: preprocessing.{key} {list(theirs)} differs from backbone "
                f"{backbone.name!r}'s {list(ours)}; the plugin changed since the model was kept"
            )


def _member(folder: Path, registry: Any, device: torch.device) -> TransferModel:
    card = checked_card(folder)
    if card.get("ensemble") is not None:
        raise WeightsError(f"{folder}: an ensemble member is itself an ensemble")
    return build_module(folder, card, registry, device)


def _seeds(folder: Path, card: dict[str, Any]) -> list[int]:
    seeds = card["ensemble"]
    if not isinstance(seeds, list) or not seeds:
        raise WeightsError(f"{folder / CARD}: ensemble must be a non-empty list of seeds")
    return [int(s) for s in seeds]


def _precision(card: dict[str, Any], asked: str | None, device: torch.device) -> Precision:
    """The precision asked for, else the one the card records, else fp32."""
    name = asked or card.get("precision") or "fp32"
    if not isinstance(name, str):
        name = "fp32"
    # the leaderboard's way of writing it ("bf16-autocast+channels_last") or a study's name
    bf16 = name.startswith("bf16")
    if "+" in name or name.endswith("-autocast"):
        return Precision(bf16 and device.type == "cuda", "channels_last" in name)
    if name not in ("fp32", "bf16", "fp32-channels_last", "bf16-channels_last", "auto"):
        raise HarnessError(
            f"precision {name!r}: use fp32, bf16, fp32-channels_last or bf16-channels_last"
        )
    return Precision.for_device(device, name)
