"""Several source domains as one: each split the concatenation of theirs, in the pair's order,
with every image's domain index kept in ``meta`` (what the engine draws equal shares by and
hands strategies as ``Batch.source_domain``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from harness.api.data import DomainData, Split, fingerprint_tensors

#: ``meta`` key of a pooled domain: split name -> int64 (N,) domain index of each of its images
SOURCE_DOMAIN = "source_domain"
#: ``meta`` key of a pooled domain: the names of its domains, in index order
SOURCE_DOMAINS = "source_domains"
SPLITS = ("train", "val", "test")


def pool_domains(name: str, parts: Sequence[DomainData]) -> DomainData:
    """One domain of ``parts`` (same task, classes and image shape: the caller checks). The
    splits are materialized and concatenated: a view of a mapped cache is copied into memory,
    on the device when every part is there, else on the host."""
    device = parts[0].train.device
    if any(getattr(p, s).device != device for p in parts for s in SPLITS):
        device = torch.device("cpu")
    splits = {s: _concat([getattr(p, s) for p in parts], device) for s in SPLITS}
    domains = {
        s: torch.repeat_interleave(
            torch.arange(len(parts)), torch.tensor([len(getattr(p, s)) for p in parts])
        )
        for s in SPLITS
    }
    meta = _common_meta(parts)
    meta[SOURCE_DOMAIN] = domains
    meta[SOURCE_DOMAINS] = [p.name for p in parts]
    return DomainData(
        name=name,
        task=parts[0].task,
        class_names=list(parts[0].class_names),
        fingerprint=fingerprint_tensors(*(p.fingerprint for p in parts)),
        meta=meta,
        **splits,
    )


def _concat(splits: list[Split], device: torch.device) -> Split:
    xs = [s.x.to(device) for s in splits]
    ys = [(s.store_y if s.index is None else s.store_y[s.index]).to(device) for s in splits]
    if len({y.dtype for y in ys}) > 1:
        ys = [y.long() for y in ys]
    return Split(torch.cat(xs), torch.cat(ys))


def _common_meta(parts: Sequence[DomainData]) -> dict[str, Any]:
    """What the parts say alike; a key on which they differ holds the list of their values (a
    flip is allowed only where every part allows it)."""
    keys = [k for p in parts for k in p.meta if k not in (SOURCE_DOMAIN, SOURCE_DOMAINS)]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        values = [p.meta.get(key) for p in parts]
        out[key] = values[0] if all(_same(v, values[0]) for v in values) else values
    out["hflip"] = all(bool(p.meta.get("hflip", True)) for p in parts)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return bool(a == b)


def source_domain(data: DomainData, split: str = "train") -> Tensor | None:
    """The domain index of each image of ``data``'s ``split`` (None: not a pooled domain)."""
    pooled = data.meta.get(SOURCE_DOMAIN)
    return None if pooled is None else pooled[split]


def num_domains(data: DomainData) -> int:
    """How many domains ``data`` pools (1 for an ordinary domain)."""
    return len(data.meta.get(SOURCE_DOMAINS) or [data.name])


def leave_out(data: DomainData, k: int) -> tuple[DomainData, DomainData]:
    """``data`` (a pooled domain) without its domain ``k``, and domain ``k`` alone: views of the
    same splits, the rest's domain indices renumbered in order (what leave-one-source-out trains
    on and scores)."""
    names = list(data.meta[SOURCE_DOMAINS])
    rest_splits, held_splits, rest_domains = {}, {}, {}
    for s in SPLITS:
        index = data.meta[SOURCE_DOMAIN][s]
        keep = torch.nonzero(index != k).flatten()
        rest_splits[s] = getattr(data, s).subset(keep)
        held_splits[s] = getattr(data, s).subset(torch.nonzero(index == k).flatten())
        rest_domains[s] = index[keep] - (index[keep] > k).long()
    common = {key: v for key, v in data.meta.items() if key not in (SOURCE_DOMAIN, SOURCE_DOMAINS)}
    rest = DomainData(
        name=f"{data.name} without {names[k]}",
        task=data.task,
        class_names=list(data.class_names),
        fingerprint=fingerprint_tensors(data.fingerprint, torch.tensor([k])),
        meta={**common, SOURCE_DOMAIN: rest_domains, SOURCE_DOMAINS: names[:k] + names[k + 1 :]},
        **rest_splits,
    )
    held = DomainData(
        name=names[k],
        task=data.task,
        class_names=list(data.class_names),
        fingerprint=fingerprint_tensors(data.fingerprint, torch.tensor([-1 - k])),
        meta=dict(common),
        **held_splits,
    )
    return rest, held
