"""Frozen features computed once: an in-process, memory-bounded cache of backbone outputs.

When the whole backbone is frozen, kept in eval mode and fed images without random augmentation,
its output for an image never changes during a trial, nor across trials that start from the same
weights. The engine then computes the pooled features of a split once, keeps them here, and hands
strategies a model whose backbone looks them up (``CachedBackbone``), so ``model(x)``,
``model.features(x)`` and ``model.head(f)`` behave exactly as before, only faster.

A partly frozen backbone is not cached: its frozen prefix feeds trainable stages whose input
would have to be cached per stage (timm models do not share one way to split the forward pass
there), and that is left for later rather than approximated.

The key holds everything the features depend on: a hash of the backbone's parameters and buffers,
a hash of the split's images, the normalization, precision and memory format, and the device.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from harness.api.data import Split
from harness.training.inputs import image_batches, model_input

#: bump when the way features are computed changes, so old entries can never be served
_FORMAT = "features-v1"
_DEFAULT_MB = 1024


def _tensor_token(t: Tensor) -> tuple[Any, ...]:
    # data_ptr + in-place version counter: changes whenever the optimizer or a copy_ writes the tensor
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype)


def _hash_tensor(h: Any, t: Tensor) -> None:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    t = t.contiguous().reshape(-1)
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))


def _state_token(tensors: list[tuple[str, Tensor]]) -> tuple[Any, ...]:
    return tuple((name, _tensor_token(t)) for name, t in tensors)


def module_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer of ``module`` by name, each submodule's parameters then its
    buffers: what the memo of ``state_hash`` watches (cheaper to list than a state dict)."""
    out = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        for k, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None:
                out.append((f"{prefix}.{k}" if prefix else k, t))
    return out


def state_hash(module: nn.Module, memo: bool = True) -> str:
    """A hash of ``module``'s parameters and buffers (names, shapes, values).

    Memoized on the module against the tensors' addresses and in-place version counters, so an
    unchanged module is hashed once, and any optimizer step or ``load_state_dict`` invalidates it.
    ``memo=False`` hashes the values now, whatever is remembered.
    """
    token = _state_token(module_tensors(module))
    known = module.__dict__.get("_harness_state_hash") if memo else None
    if known is not None and known[0] == token:
        if callable(known[1]):  # told what to hash with (remember_state_hash)
            module.__dict__["_harness_state_hash"] = (token, known[1]())
        return module.__dict__["_harness_state_hash"][1]
    h = hashlib.sha1(usedforsecurity=False)
    for name, t in module.state_dict(keep_vars=True).items():
        h.update(name.encode())
        _hash_tensor(h, t)
    digest = h.hexdigest()
    module.__dict__["_harness_state_hash"] = (token, digest)
    return digest


def remember_state_hash(
    module: nn.Module,
    digest: str | Callable[[], str],
    tensors: list[tuple[str, Tensor]] | None = None,
) -> None:
    """Record that ``module``'s tensors, as they are now, hash to ``digest`` (or to what the
    callable returns when first asked), so ``state_hash`` does not hash them while they stay
    unchanged. For a caller that has just written known values into them (``harness.training.reset``),
    which may pass ``module_tensors(module)`` if it has them."""
    module.__dict__["_harness_state_hash"] = (
        _state_token(tensors or module_tensors(module)),
        digest,
    )


def data_hash(x: Tensor | Split) -> str:
    """A hash of an image tensor's bytes, memoized on the tensor against its version counter; for
    a split, of its store's identity (the decoded-image cache's key, else its bytes) and its rows."""
    if isinstance(x, Split):
        return _split_hash(x)
    token = _tensor_token(x)
    memo = getattr(x, "_harness_data_hash", None)
    if memo is not None and memo[0] == token:
        return memo[1]
    h = hashlib.sha1(usedforsecurity=False)
    _hash_tensor(h, x)
    digest = h.hexdigest()
    x._harness_data_hash = (token, digest)  # type: ignore[attr-defined]
    return digest


def _split_hash(split: Split) -> str:
    if split.index is None:
        return data_hash(split.store_x)
    memo = split.__dict__.get("_harness_data_hash")
    if memo is None:
        h = hashlib.sha1(usedforsecurity=False)
        h.update((split.key or data_hash(split.store_x)).encode())
        _hash_tensor(h, split.index)
        memo = split.__dict__["_harness_data_hash"] = h.hexdigest()
    return memo


class FeatureCache:
    """Least-recently-used store of feature tensors, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("HARNESS_FEATURE_CACHE_MB", _DEFAULT_MB)) * 2**20)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

    def get_or_compute(self, key: tuple[Any, ...], compute: Callable[[], Tensor]) -> Tensor:
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        value = compute()
        size = value.numel() * value.element_size()
        if size <= self.max_bytes:
            self._entries[key] = value
            while self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)
        return value


#: the process-wide cache: the search driver runs many trials in one process, and they share it
FEATURE_CACHE = FeatureCache()


def feature_key(
    model: Any, x: Tensor | Split, precision: Any, device: torch.device
) -> tuple[Any, ...]:
    """Everything the frozen features of images ``x`` (a tensor or a split) depend on."""
    return (
        _FORMAT,
        state_hash(model.backbone),
        data_hash(x),
        tuple(model.mean.flatten().tolist()),
        tuple(model.std.flatten().tolist()),
        precision.describe(),
        str(device),
    )


@torch.no_grad()
def compute_features(
    model: Any, x_uint8: Tensor | Split, precision: Any, device: torch.device, batch_size: int
) -> Tensor:
    """Pooled backbone output for every image, in eval mode, preprocessed as the engine does it."""
    backbone = model.backbone
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for images in image_batches(x_uint8, batch_size):
            x = model_input(images, model, precision.channels_last, device)
            with precision.autocast(device):
                out.append(backbone(x))
    finally:
        backbone.train(was_training)
    return torch.cat(out)


class CachedBackbone(nn.Module):
    """Stands in for a frozen backbone during training: returns precomputed features for the
    exact input tensors the engine announced for this step, and runs the real backbone for
    anything else (a strategy that mixes or perturbs its inputs, or puts the backbone in training
    mode, gets real features)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._expected: list[tuple[Tensor, int, Tensor]] = []
        self.served = 0
        self.computed = 0

    def expect(self, x: Tensor, features: Tensor) -> None:
        if len(x) != len(features):
            raise ValueError(f"{len(features)} cached feature rows for a batch of {len(x)} images")
        self._expected.append((x, x._version, features))

    def clear(self) -> None:
        self._expected.clear()

    def forward(self, x: Tensor) -> Tensor:
        if not self.inner.training:
            for seen, version, features in self._expected:
                if x is seen and x._version == version:
                    self.served += 1
                    return features
        self.computed += 1
        return self.inner(x)


@contextmanager
def swapped_backbone(model: Any, wrapper: CachedBackbone) -> Iterator[None]:
    """Put ``wrapper`` in place of ``model.backbone`` for the duration of the block."""
    original = model.backbone
    model.backbone = wrapper
    try:
        yield
    finally:
        wrapper.clear()
        model.backbone = original
