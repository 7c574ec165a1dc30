"""A domain's train/val/test splits as views of its images, by the study's ``protocol``.

- ``held-out`` (the default): each domain split seeded 60/20/20 (or by its dataset's fractions, or
  its own split lists), the same splits whichever side of a pair it is on.
- ``standard`` (as the unsupervised adaptation literature reports): the source trains on its
  labelled images (its official training list where it has one) less a seeded validation share
  that model selection reads; the target's unlabelled training images are all its images (its
  official training list) and its test images all its images (its official test list). The
  target's validation split is its training images: label-free rules read them unlabelled, and
  ``target-val`` reads their labels, which is what makes it an oracle.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from harness.api.data import (
    DomainData,
    ImageFiles,
    Split,
    fingerprint_tensors,
    random_split,
    stratified_split,
)
from harness.data.cache import Decoded
from harness.errors import DatasetError

PROTOCOLS = ("held-out", "standard")
ROLES = ("source", "target")
BAD_FILES_HINT = (
    "delete or re-export these files, or set skip_bad_files = true in the dataset to leave them out"
)


def files_domain(
    files: ImageFiles, decoded: Decoded, *, seed: int, protocol: str, role: str
) -> DomainData:
    """The cached domain as a :class:`DomainData` whose splits are views of the mapped images."""
    good = _readable(files, decoded)
    labels = torch.tensor(files.labels, dtype=torch.int64)  # zeros for segmentation
    lists = files.meta.get("lists")
    if protocol == "standard":
        rows = standard_rows(good, labels, lists, role, files.fractions[1], seed)
    elif files.splits is not None:
        keep = set(good.tolist())
        rows = tuple(
            torch.tensor(sorted(r for r in files.splits[s] if r in keep), dtype=torch.int64)
            for s in ("train", "val", "test")
        )
    elif files.task == "segmentation":
        rows = tuple(good[p] for p in random_split(len(good), files.fractions, seed))
    else:
        rows = tuple(good[p] for p in stratified_split(labels[good], files.fractions, seed))
    for split, r in zip(("train", "val", "test"), rows, strict=True):
        if len(r) == 0:
            raise DatasetError(
                f"domain {files.name!r}: {len(good)} readable images leave the {split} split empty",
                hint="add images, or change val_fraction / test_fraction",
            )
    meta = {k: v for k, v in files.meta.items() if k != "lists"}
    h, w = decoded.images.shape[-2:]
    meta |= {"resize": files.resize, "stored_size": h if h == w else [w, h]}
    y = labels if decoded.masks is None else decoded.masks
    train, val, test = (Split(decoded.images, y, r, key=decoded.key) for r in rows)
    return DomainData(
        name=files.name,
        task=files.task,
        class_names=list(files.class_names),
        train=train,
        val=val,
        test=test,
        fingerprint=fingerprint_tensors(decoded.digest, labels, *rows),
        meta=meta,
    )


def _readable(files: ImageFiles, decoded: Decoded) -> Tensor:
    """The rows of the files that could be read; the others stop the run, or with
    ``skip_bad_files`` are named in a warning and left out."""
    if decoded.bad:
        lines = [f"{len(decoded.bad)} unreadable image file(s) in domain {files.name}:"]
        lines += [f"  {files.paths[i]}: {why}" for i, why in sorted(decoded.bad.items())]
        if not files.skip_bad_files:
            raise DatasetError("\n".join(lines), hint=BAD_FILES_HINT)
        warnings.warn("\n".join(lines) + "\n(skipped: skip_bad_files = true)", stacklevel=3)
    good = [i for i in range(len(files.paths)) if i not in decoded.bad]
    if not good:
        raise DatasetError(f"domain {files.name!r}: no readable image", hint=BAD_FILES_HINT)
    return torch.tensor(good, dtype=torch.int64)


def standard_rows(
    good: Tensor,
    labels: Tensor,
    lists: dict[str, Sequence[int]] | None,
    role: str,
    val_fraction: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train/val/test rows under the ``standard`` protocol (see the module's docstring); a
    source's test rows are its validation rows (a source's test split is never read)."""
    keep = set(good.tolist())

    def listed(name: str) -> Tensor:
        if not lists or name not in lists:
            return good
        return torch.tensor(sorted(r for r in lists[name] if r in keep), dtype=torch.int64)

    if role == "target":
        train = listed("train")
        return train, train, listed("test")
    pool = listed("train")
    train_p, val_p, _ = stratified_split(labels[pool], (1 - val_fraction, val_fraction, 0.0), seed)
    return pool[train_p], pool[val_p], pool[val_p]


def standard_domain(data: DomainData, role: str, val_fraction: float, seed: int) -> DomainData:
    """An in-memory domain re-split by the ``standard`` protocol: its three splits pooled."""
    x, y, rows = _pooled(data)
    # segmentation has no class to stratify by: one seeded share of the images
    labels = y.long() if y.ndim == 1 else torch.zeros(len(y), dtype=torch.int64)
    parts = standard_rows(rows, labels, None, role, val_fraction, seed)
    train, val, test = (Split(x, y, p) for p in parts)
    return DomainData(
        name=data.name,
        task=data.task,
        class_names=data.class_names,
        train=train,
        val=val,
        test=test,
        fingerprint=fingerprint_tensors(data.fingerprint, "standard", role, *parts),
        meta=data.meta,
    )


def _pooled(data: DomainData) -> tuple[Tensor, Tensor, Tensor]:
    """The images and labels of all three splits and the rows that hold them: the shared store
    when the splits are views of one, else the three concatenated."""
    splits = (data.train, data.val, data.test)
    store = splits[0].store_x
    if all(s.store_x is store and s.index is not None for s in splits):
        rows = torch.sort(torch.unique(torch.cat([s.index for s in splits]))).values
        return store, splits[0].store_y, rows
    x = torch.cat([s.x for s in splits])
    return x, torch.cat([s.y for s in splits]), torch.arange(len(x))
