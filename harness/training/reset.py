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
  one, or a submodule's attribute was set or changed (``momentum``, a convolution's ``stride``).

The shared module is only safe because trials run one after another in a process and each drops
its model before the next is built: the search driver's ``harness.search.ModelFactory`` uses it
for trials, final runs and the preflight.
A study opts out with ``reuse_backbone = false``: every trial then builds its backbone under its
seed and draws its head's initialization after it, as the harness did before this module (the
way to repeat a result made then).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from harness.api import Backbone
from harness.training.engine import generators_kept
from harness.training.features import module_tensors

_PLAIN = frozenset({bool, int, float, str, type(None)})


def _plain(v: Any) -> bool:
    """A setting compared by value: a number, string, None, or a tuple of them (a convolution's
    ``stride``, ``padding``)."""
    return type(v) in _PLAIN or (type(v) is tuple and all(type(e) in _PLAIN for e in v))


_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


_MEMO = "_harness_state_hash"  # the frozen-feature cache's note on a module (features.state_hash)


def _keys(d: dict[str, Any]) -> tuple[str, ...]:
    keys = tuple(d)
    return tuple(k for k in keys if k != _MEMO) if _MEMO in d else keys


def _getter(keys: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``d -> tuple(d[k] for k in keys)``, in C (itemgetter returns a bare value for one key)."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    return (lambda d: (d[keys[0]],)) if keys else (lambda d: ())


class _Layout:
    """What a trial may not change in a backbone, taken once from the module as built and its
    ``module_tensors``: the names, dtypes and shapes of its tensors (not the tensor objects: moving
    to another device replaces buffers), its submodules, their attribute names, the values of their
    plain attributes (``momentum``, ``eps``, a convolution's ``stride``), the number of hooks on
    each. ``check`` compares a module with it in a few C-level passes (about 0.2 ms for timm's
    ``test_resnet``, where the walk it replaced took 0.4 ms)."""

    def __init__(self, module: nn.Module, tensors: list[tuple[str, Tensor]]) -> None:
        self.mods = [m for _, m in module.named_modules(remove_duplicate=False)]
        dicts = [m.__dict__ for m in self.mods]
        self.keys = [_keys(d) for d in dicts]
        self._settings = [
            _getter([k for k in ks if k != "training" and _plain(d[k])])
            for ks, d in zip(self.keys, dicts, strict=True)
        ]
        self._hooks = [_getter([h for h in _HOOKS if h in d]) for d in dicts]
        self.values = [g(d) for g, d in zip(self._settings, dicts, strict=True)]
        self.types = [tuple(map(type, v)) for v in self.values]
        self.hooks = [tuple(map(len, g(d))) for g, d in zip(self._hooks, dicts, strict=True)]
        self.shapes = [(n, t.dtype, t.shape) for n, t in tensors]

    def check(self, module: nn.Module) -> list[tuple[str, Tensor]] | None:
        """``module``'s tensors by name (``features.module_tensors``, the list the frozen-feature
        cache watches) when it still has this layout, else None."""
        mods = [m for _, m in module.named_modules(remove_duplicate=False)]
        if len(mods) != len(self.mods) or any(map(operator.is_not, mods, self.mods)):
            return None
        dicts = [m.__dict__ for m in mods]
        if list(map(_keys, dicts)) != self.keys:
            return None
        values = [g(d) for g, d in zip(self._settings, dicts, strict=True)]
        # types first: a plain attribute that became a tensor or an array, even of an equal value,
        # is a change, and comparing it with a number could raise instead of answering
        if [tuple(map(type, v)) for v in values] != self.types or values != self.values:
            return None
        if [tuple(map(len, g(d))) for g, d in zip(self._hooks, dicts, strict=True)] != self.hooks:
            return None
        tensors = module_tensors(module)
        if [(n, t.dtype, t.shape) for n, t in tensors] != self.shapes:
            return None
        return tensors


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
        self._training: list[bool] = []
        self._layout: _Layout | None = None
        self._requires: list[bool | None] = []
        self._digest: str | None = None
        self.reuses = 0
        self.builds = 0
        #: why the backbone is built for every call (None while it is reset)
        self.refused: str | None = None

    def __call__(self) -> Backbone:
        if self._live is None:
            return self._first() if self.refused is None else self._fresh()
        tensors = self._layout.check(self._live.module)
        if tensors is None:
            self._live, self._layout, self._values = None, None, []
            self.refused = "a trial changed more than the values of its backbone"
            return self._fresh()
        self._restore(tensors)
        self.reuses += 1
        return self._live

    def _fresh(self) -> Backbone:
        self.builds += 1
        return self._build()

    def _first(self) -> Backbone:
        with generators_kept():
            backbone = self._build()
            state = torch.get_rng_state()
        with generators_kept(
            seed=int(state[-64:].sum()) + 1
        ):  # another state than the first build's
            other = self._build()
        self.builds += 2
        tensors = module_tensors(backbone.module)
        if not _same_tensors(tensors, module_tensors(other.module)):
            self.refused = (
                "its weights depend on the random seed (the weights do not cover all of them)"
            )
            return self._fresh()  # under the caller's generators, as without reuse
        self._live, self._layout = backbone, _Layout(backbone.module, tensors)
        with torch.no_grad():
            self._values = [t.detach().clone() for _, t in tensors]
        self._requires = [
            t.requires_grad if isinstance(t, nn.Parameter) else None for _, t in tensors
        ]
        self._training = [m.training for m in self._layout.mods]
        self._remember_hash(tensors)
        return backbone

    def _restore(self, tensors: list[tuple[str, Tensor]]) -> None:
        live = [t.detach() for _, t in tensors]
        if live and live[0].device != self._values[0].device:  # the trials train on a GPU
            self._values = [v.to(t.device) for v, t in zip(self._values, live, strict=True)]
        with torch.no_grad():
            torch._foreach_copy_(live, self._values)
        for (_, t), flag in zip(tensors, self._requires, strict=True):
            if flag is not None:  # a parameter
                if t.requires_grad != flag:
                    t.requires_grad_(flag)
                if t.grad is not None:
                    t.grad = None
        for m, flag in zip(self._layout.mods, self._training, strict=True):
            object.__setattr__(
                m, "training", flag
            )  # what Module.train sets, without Module.__setattr__'s checks
        self._remember_hash(tensors)

    def _remember_hash(self, tensors: list[tuple[str, Tensor]] | None = None) -> None:
        """Tell the frozen-feature cache what the weights are: their hash is computed the first
        time a trial looks its features up and remembered for every later trial, instead of
        hashing the backbone in every trial (about 25 ms for a ResNet-18)."""
        from harness.training.features import remember_state_hash, state_hash

        def learn() -> str:
            self._digest = state_hash(self._live.module, memo=False)
            return self._digest

        remember_state_hash(
            self._live.module, self._digest or learn, tensors
        )  # the same list, same order
