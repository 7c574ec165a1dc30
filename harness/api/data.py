"""Data a dataset plugin returns: a domain with splits of uint8 images and int64 labels
(:class:`DomainData`), or its image files for the harness to cache and map (:class:`ImageFiles`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from harness.errors import PluginContractError

Task = Literal["classification", "segmentation"]
#: mask value of pixels that carry no label (void) in segmentation
IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Split:
    """One split of a domain: uint8 images ``(N, C, H, W)`` and int64 labels: ``(N,)`` class
    indices, or ``(N, H, W)`` masks for segmentation (``IGNORE_INDEX`` = 255 marks void pixels).

    A split may be a view: with ``index``, ``x`` and ``y`` are the whole domain's images and labels
    (a memory-mapped store, say) and the split is the rows ``index`` of them, so that nothing
    copies a whole domain. ``take`` gathers a batch; ``images`` and ``labels`` materialize the
    split (what a plugin written against in-memory splits reads)."""

    def __init__(self, x: Tensor, y: Tensor, index: Tensor | None = None, key: str = "") -> None:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise PluginContractError(
                f"split images must be a uint8 tensor (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if y.dtype not in (torch.int64, torch.uint8) or len(y) != len(x):
            raise PluginContractError(
                f"split labels must be int64 with one label per image, got {y.dtype} "
                f"{tuple(y.shape)} for {len(x)} images"
            )
        if index is not None and (index.dtype != torch.int64 or index.ndim != 1):
            raise PluginContractError("a split's index must be a 1-D int64 tensor")
        self.store_x, self.store_y, self.index = x, y, index
        #: what identifies the store's contents (the decoded-image cache's key; "" in memory)
        self.key = key
        self._y: Tensor | None = None

    def __len__(self) -> int:
        return len(self.store_x) if self.index is None else len(self.index)

    def __repr__(self) -> str:
        view = "" if self.index is None else f" of {len(self.store_x)}"
        return f"Split({len(self)}{view} images {tuple(self.image_shape)}, {self.store_x.device})"

    @property
    def x(self) -> Tensor:
        """The split's images, materialized (a copy when the split is a view)."""
        return self.store_x if self.index is None else self.store_x[self.index]

    @property
    def y(self) -> Tensor:
        """The split's labels as int64, materialized: class indices (kept), or masks (made anew
        on each read: whole masks of a real-size domain are large, and the harness reads them a
        few at a time with :meth:`labels_range` instead)."""
        if self.store_y.ndim > 1:
            return (self.store_y if self.index is None else self.store_y[self.index]).long()
        if self._y is None:
            y = self.store_y if self.index is None else self.store_y[self.index]
            self._y = y.long()
        return self._y

    def labels_range(self, start: int, stop: int) -> Tensor:
        """Labels ``start:stop`` of the split, as stored (a slice, or a gather from a view)."""
        if self.index is None:
            return self.store_y[start:stop]
        return self.store_y[self.index[start:stop]]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.store_x.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.store_x.device

    @property
    def nbytes(self) -> int:
        """Bytes of the split's images and labels (what moving it whole would take)."""
        per_label = (
            self.store_y[0].numel() * self.store_y.element_size() if len(self.store_y) else 0
        )
        return len(self) * (self.store_x[0].numel() + per_label) if len(self.store_x) else 0

    def rows(self, idx: Tensor) -> Tensor:
        """Rows of the store at the split's positions ``idx``, on the store's device."""
        idx = idx.to(self.store_x.device)
        return idx if self.index is None else self.index.to(idx.device)[idx]

    def take(self, idx: Tensor, labels: bool = True) -> tuple[Tensor, Tensor | None]:
        """The images (uint8) and labels (int64) at the split's positions ``idx``, gathered on
        the store's device."""
        rows = self.rows(idx)
        return self.store_x[rows], self.store_y[rows].long() if labels else None

    def range(self, start: int, stop: int) -> Tensor:
        """Images ``start:stop`` of the split (a slice in memory, a gather from a view)."""
        if self.index is None:
            return self.store_x[start:stop]
        return self.store_x[self.index[start:stop]]

    def to(self, device: torch.device | str) -> Split:
        """The split materialized on ``device``: a view is gathered, nothing else is copied
        when the split is there already."""
        x, y = self.x, (self.store_y if self.index is None else self.store_y[self.index])
        return Split(x.to(device, non_blocking=True), y.to(device, non_blocking=True), key=self.key)

    def subset(self, index: Tensor) -> Split:
        """A view of the split's positions ``index`` (nothing copied)."""
        index = index.cpu().long()
        rows = index if self.index is None else self.index[index]
        return Split(self.store_x, self.store_y, rows, key=self.key)


@dataclass
class ImageFiles:
    """A domain as image files and their class labels, returned by a dataset factory instead of
    a :class:`DomainData` when the images should not be held in memory: the harness decodes them
    once (threads, at the study's stored size, with ``resize``) into its decoded-image cache,
    which every later run and every worker process maps read-only, and splits the domain into
    views of it.

    ``splits`` gives the train/val/test positions in ``paths`` where a dataset has official lists
    (DomainNet, VisDA); otherwise the harness splits by ``fractions``, seeded and stratified by
    class, as :meth:`DomainData.from_arrays` does. The harness keys its cache on the files'
    paths, sizes and modification times, the stored size, the resize rule and the dataset's
    options and version; ``key`` adds whatever else decides the pixels (the sizes and times of
    files other than ``paths``, such as masks, which ``decode`` reads).
    Unreadable files stop the run, listed by path, unless ``skip_bad_files`` leaves them out.

    ``decode`` reads file ``i`` where the harness's own image reader is not enough: segmentation
    (an image and its mask) or a format of the dataset's own. ``decode(i, (height, width))``
    returns the image ``(height, width, 3)`` uint8 and, for segmentation, its mask
    ``(height, width)`` uint8 (``IGNORE_INDEX`` for void), and raises on a file it cannot read
    (the error's message is the reason given). Segmentation files have no ``labels``."""

    name: str
    class_names: list[str]
    paths: list[Path]
    labels: list[int] | None = None
    splits: dict[str, list[int]] | None = None
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    resize: str = "center-crop"
    skip_bad_files: bool = False
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    task: Task = "classification"
    decode: Callable[[int, tuple[int, int]], tuple[Any, Any]] | None = None

    def __post_init__(self) -> None:
        self.paths = [p if isinstance(p, Path) else Path(p) for p in self.paths]
        if self.task == "segmentation":
            if self.decode is None:
                raise PluginContractError(
                    f"domain {self.name!r}: segmentation files need a decode(i, (height, width)) "
                    "that returns the image and its mask"
                )
            self.labels = [0] * len(self.paths)  # masks are decoded, not listed
        if self.labels is None:
            raise PluginContractError(f"domain {self.name!r}: classification files need labels")
        self.labels = [int(v) for v in self.labels]
        if len(self.paths) != len(self.labels):
            raise PluginContractError(
                f"domain {self.name!r}: {len(self.paths)} files but {len(self.labels)} labels"
            )
        if not self.paths:
            raise PluginContractError(f"domain {self.name!r}: no image files")
        bad = [v for v in self.labels if not 0 <= v < len(self.class_names)]
        if bad:
            raise PluginContractError(
                f"domain {self.name!r}: label {bad[0]} outside 0..{len(self.class_names) - 1}"
            )
        if self.splits is not None:
            if set(self.splits) != {"train", "val", "test"}:
                raise PluginContractError(
                    f"domain {self.name!r}: splits must name train, val and test, got "
                    f"{sorted(self.splits)}"
                )
            n = len(self.paths)
            for split, rows in self.splits.items():
                if any(not 0 <= r < n for r in rows):
                    raise PluginContractError(
                        f"domain {self.name!r}: the {split} split names a file outside 0..{n - 1}"
                    )


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
        return self.train.image_shape

    def _mask_range(self, split: Split, split_name: str) -> tuple[int | None, int | None]:
        """The range of a split's mask values outside void, read a few masks at a time (whole
        masks of a real-size domain as one int64 tensor would not fit in memory)."""
        if split.store_y.shape[1:] != split.image_shape[1:]:
            raise PluginContractError(
                f"domain {self.name!r}: {split_name} masks are {tuple(split.store_y.shape[1:])}, "
                f"images {tuple(split.image_shape[1:])}"
            )
        ranges = [
            _labelled_range(split.labels_range(start, start + 64))
            for start in range(0, len(split), 64)
        ]
        found = [r for r in ranges if r is not None]
        if not found:
            return None, None
        return min(r[0] for r in found), max(r[1] for r in found)

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
            train=Split(x, y, train_i),
            val=Split(x, y, val_i),
            test=Split(x, y, test_i),
            fingerprint=fingerprint_tensors(x, y, train_i, val_i, test_i),
            meta=dict(meta or {}),
        )

    def check(self, image_size: int | tuple[int, int] | None = None) -> None:
        """Raise ``PluginContractError`` when the data break the dataset contract (images of
        ``image_size``: a square's side, or ``(width, height)``)."""
        shapes = {s.image_shape for s in (self.train, self.val, self.test)}
        if len(shapes) != 1:
            raise PluginContractError(
                f"domain {self.name!r}: splits have different image shapes {shapes}"
            )
        c, h, w = self.image_shape
        if c != 3:
            raise PluginContractError(f"domain {self.name!r}: images must have 3 channels, got {c}")
        wanted = (image_size, image_size) if isinstance(image_size, int) else image_size
        if wanted is not None and (w, h) != tuple(wanted):
            raise PluginContractError(
                f"domain {self.name!r}: asked for {wanted[0]}x{wanted[1]} px images (width x "
                f"height), got {w}x{h}"
            )
        for split_name in ("train", "val", "test"):
            split: Split = getattr(self, split_name)
            if len(split) == 0:
                raise PluginContractError(f"domain {self.name!r}: the {split_name} split is empty")
            if self.task == "segmentation":
                lo, hi = self._mask_range(split, split_name)
                if lo is None:
                    continue
            else:
                lo, hi = int(split.y.min()), int(split.y.max())
            if lo < 0 or hi >= self.num_classes:
                raise PluginContractError(
                    f"domain {self.name!r}: {split_name} labels span {lo}..{hi} but there are "
                    f"{self.num_classes} classes"
                )


def _labelled_range(y: Tensor) -> tuple[int, int] | None:
    """The smallest and largest label of masks ``y`` outside void, or None if all is void."""
    y = y[y != IGNORE_INDEX]
    return (int(y.min()), int(y.max())) if y.numel() else None


def stratified_split(
    y: Tensor, fractions: tuple[float, float, float], seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded per-class split of indices into three parts with the given fractions."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    for label in sorted(set(y.tolist())):  # torch.unique's values, in a fraction of its time
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
