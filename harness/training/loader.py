"""Training batches gathered by index: from splits on the device directly, or from splits on the
host (a memory-mapped domain too large for the device) by a background thread that gathers the
next batches into pinned memory and copies them to the device while the current one trains.

Both ways give the same tensors in the same order (the batches' indices are drawn before either
runs), so where a domain lives changes the speed of a run, never its numbers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from harness.api.data import Split
from harness.training.device import same_device

#: batches gathered ahead of the one training
DEPTH = 2


@dataclass(frozen=True)
class Take:
    """What one step reads of one split: the positions ``idx``, its images and/or its labels."""

    split: Split
    idx: Tensor
    images: bool = True
    labels: bool = True


Gathered = tuple[Tensor | None, Tensor | None]


class Loader:
    """Gathers each step's :class:`Take` s on ``device``: synchronously when every split is there,
    else (or when ``stream`` forces it) ``DEPTH`` steps ahead on a thread, through pinned memory
    when the device is a GPU."""

    def __init__(self, device: torch.device, stream: bool = False) -> None:
        self.device, self.stream = device, stream

    def streams(self, splits: Sequence[Split | None]) -> bool:
        return self.stream or any(
            s is not None and not same_device(s.device, self.device) for s in splits
        )

    def __call__(self, steps: Sequence[Sequence[Take]]) -> Iterator[list[Gathered]]:
        if not self.streams([t.split for step in steps for t in step]):
            for step in steps:
                yield [self._gather(t) for t in step]
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-loader") as pool:
            ahead: deque[Future[list[Gathered]]] = deque()
            for step in steps:
                ahead.append(pool.submit(lambda s=step: [self._gather(t) for t in s]))
                if len(ahead) > DEPTH:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def _gather(self, take: Take) -> Gathered:
        split = take.split
        rows = split.rows(take.idx)
        x = split.store_x[rows] if take.images else None
        y = split.store_y[rows].long() if take.labels else None
        return self._to_device(x), self._to_device(y)

    def _to_device(self, t: Tensor | None) -> Tensor | None:
        if t is None or same_device(t.device, self.device):
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()  # so that the copy below runs while the current step computes
        return t.to(self.device, non_blocking=True)
