"""Model reset: a search's trials share one backbone module, reset in place to the loaded weights.

A trial starts from the study's weights (a file, ``source``, ``imagenet``). Building the backbone
through its plugin for every trial constructs the network, initializes every weight and then
overwrites every weight from the file: about 6 ms for timm's ``test_resnet`` and more the larger
the model, spent per trial on numbers nobody reads. ``BackboneReset`` builds it once and for
every later trial copies the loaded weights back into the same module and restores its flags
(``requires_grad``, train mode, no gradients).

A reset must give exactly the backbone a build gives:

- **The weights determine it.** The first build is compared with a second one under other random
  generator states; a backbone that differs (random weights, layers the weights do not cover) is
  built through its plugin for every trial instead. Both builds run with the caller's generators
  saved and restored, so a trial's random numbers (its head's initialization first) come from
  its seed alone, whether its backbone was built or reset.
- **A trial changed only values.** A reset is refused, and the backbone built afresh, when a
  parameter or buffer changed name, dtype or shape, a submodule was replaced, a hook was left on
  one, or a submodule's attribute was set or changed (``momentum``, say).

The shared module is only safe because trials run one after another in a process and each drops
its model before the next is built: ``Runner`` uses it for trials, final runs and its preflight.
A study opts out with ``reuse_backbone = false``: every trial then builds its backbone under its
seed and draws its head's initialization after it, as the harness did before this module (the
published studies made that way keep it, to stay reproducible).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from harness.api import Backbone
from harness.engine import generators_kept
from harness.features import module_tensors

_PLAIN = frozenset({bool, int, float, str, type(None)})
_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def _walk(module: nn.Module) -> tuple[list[nn.Module], list[tuple[str, Tensor]], tuple[Any, ...]]:
    """``module``'s submodules, its tensors by name (``features.module_tensors``, the list the
    frozen-feature cache watches) and what a trial may not change: the names, dtypes and shapes of
    the tensors (not the tensor objects: moving to another device replaces buffers), the
    submodules, their plain attributes, the names of their other attributes, their hooks."""
    tensors = module_tensors(module)
    mods = [m for _, m in module.named_modules(remove_duplicate=False)]
    shape = [(name, t.dtype, t.shape) for name, t in tensors]
    for m in mods:
        d = m.__dict__
        shape.append(
            (
                id(m),
                tuple((k, v) if type(v) in _PLAIN else k for k, v in d.items() if k != "training" and k[:8] != "_harness"),
                tuple(len(d[h]) for h in _HOOKS if h in d),
            )
        )
    return mods, tensors, tuple(shape)


def _same_tensors(a: list[tuple[str, Tensor]], b: list[tuple[str, Tensor]]) -> bool:
    return len(a) == len(b) and all(
        na == nb and ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)
        for (na, ta), (nb, tb) in zip(a, b, strict=True)
    )


class BackboneReset:
    """Hands out the backbone ``build`` makes: the first call builds it, later calls reset the
    same module where that gives exactly what a build would (module docstring), else build."""

    def __init__(self, build: Callable[[], Backbone]) -> None:
        self._build = build
        self._live: Backbone | None = None
        self._values: list[Tensor] = []
        self._flags: tuple[list[bool], list[bool]] = ([], [])
        self._signature: tuple[Any, ...] | None = None
        self._digest: str | None = None
        self.reuses = 0
        self.builds = 0
        #: why the backbone is built for every call (None while it is reset)
        self.refused: str | None = None

    def __call__(self) -> Backbone:
        if self._live is None:
            return self._first() if self.refused is None else self._fresh()
        walk = _walk(self._live.module)
        if walk[2] != self._signature:
            self._live, self._signature, self._values = None, None, []
            self.refused = "a trial changed more than the values of its backbone"
            return self._fresh()
        self._restore(walk)
        self.reuses += 1
        return self._live

    def _fresh(self) -> Backbone:
        self.builds += 1
        return self._build()

    def _first(self) -> Backbone:
        with generators_kept():
            backbone = self._build()
            state = torch.get_rng_state()
        with generators_kept(seed=int(state[-64:].sum()) + 1):  # another state than the first build's
            other = self._build()
        self.builds += 2
        mods, tensors, self._signature = _walk(backbone.module)
        if not _same_tensors(tensors, _walk(other.module)[1]):
            self.refused = "its weights depend on the random seed (the weights do not cover all of them)"
            self._signature = None
            return self._fresh()  # under the caller's generators, as without reuse
        self._live = backbone
        with torch.no_grad():
            self._values = [t.detach().clone() for _, t in tensors]
        self._flags = ([t.requires_grad for _, t in tensors], [m.training for m in mods])
        self._remember_hash(tensors)
        return backbone

    def _restore(self, walk) -> None:
        mods, tensors, _ = walk
        live = [t.detach() for _, t in tensors]
        if live and live[0].device != self._values[0].device:  # the trials train on a GPU
            self._values = [v.to(t.device) for v, t in zip(self._values, live, strict=True)]
        with torch.no_grad():
            torch._foreach_copy_(live, self._values)
        for (_, t), flag in zip(tensors, self._flags[0], strict=True):
            if isinstance(t, nn.Parameter):
                t.requires_grad_(flag)
                t.grad = None
        for m, flag in zip(mods, self._flags[1], strict=True):
            m.training = flag
        self._remember_hash(tensors)

    def _remember_hash(self, tensors: list[tuple[str, Tensor]] | None = None) -> None:
        """Tell the frozen-feature cache what the weights are: their hash is computed the first
        time a trial looks its features up and remembered for every later trial, instead of
        hashing the backbone in every trial (about 25 ms for a ResNet-18)."""
        from harness.features import remember_state_hash, state_hash

        def learn() -> str:
            self._digest = state_hash(self._live.module, memo=False)
            return self._digest

        remember_state_hash(self._live.module, self._digest or learn, tensors)  # the same list, same order
