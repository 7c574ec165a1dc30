"""Data a dataset plugin returns: splits of uint8 images and int64 labels, and a domain."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from harness.errors import PluginContractError

Task = Literal["classification", "segmentation"]
#: mask value of pixels that carry no label (void) in segmentation
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
