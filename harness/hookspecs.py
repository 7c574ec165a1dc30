"""The contract between the harness and its plugins.

Every extension point of the harness is a hook in this file. A plugin is a Python module (or any
object) with functions named like the hooks below, decorated with ``harness.hookimpl``, and
declared in the ``harness`` entry-point group of its distribution::

    # pyproject.toml of a third-party package
    [project.entry-points.harness]
    my_plugin = "my_package.plugin"

The built-in plugins in ``plugins/`` (installed as ``harness_plugins``) are declared exactly the
same way, so everything here is also how the harness extends itself.

Registration by callback
------------------------
Each ``register_*`` hook receives a ``register`` function owned by the harness and calls it once
per thing it provides::

    register(name, factory, description="...", **meta)

The harness records which plugin and which distribution gave each entry, refuses a second entry
of the same kind and name (naming both plugins), and answers an unknown name with the closest
registered names. Names are lowercase and may contain ``-``, ``_`` and ``.`` (a ``/`` separates a
dataset from its sub-domain in a study, so it cannot be part of a name).

A plugin module never imports the search driver, the engine or the CLI: it only needs
``harness.hookimpl`` and the types in ``harness.api``.

Hooks are called once per process, one plugin at a time; an exception raised inside one plugin's
hook is reported with that plugin's name and does not stop the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "harness"
ENTRY_POINT_GROUP = "harness"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone factories: feature extractors that a head sits on.

    ``register(name, factory, description="")``

    The factory is called as::

        factory(name: str, *, weights: str, in_chans: int = 3) -> harness.api.Backbone

    - ``name`` is the registered name the study asked for (one factory may serve many names).
    - ``weights`` is ``"none"`` (random init), ``"imagenet"`` (the library's own pretrained
      weights, which may need a model hub), or the path of a local weights file (``.safetensors``,
      or a torch checkpoint that must be loaded with ``torch.load(..., weights_only=True)``).
      The harness itself resolves ``weights = "source"`` (pretraining on the source domain) into
      such a local file before calling the factory, so a factory never sees ``"source"``.
      When weights cannot be had (no network), raise ``harness.api.WeightsError`` with a message
      that says how to supply a local file.

    The returned ``Backbone`` wraps an ``nn.Module`` whose ``forward(x)`` maps a float batch
    ``(N, in_chans, H, W)`` to pooled features ``(N, num_features)``, and lists its parameters
    stage by stage, **stem first**, so that freeze depth ``k`` means "the first k stages" for any
    backbone. It also names the normalization (mean, std) its weights expect.

    Example::

        @hookimpl
        def register_backbones(register):
            register("lenet", build_lenet, description="LeNet-5 for 32 px digits")

        def build_lenet(name, *, weights, in_chans=3):
            net = LeNet(in_chans)
            if weights not in ("none", None):
                net.load_state_dict(harness.api.load_weights_file(weights))
            return harness.api.Backbone(
                module=net, num_features=84,
                stages=harness.api.stages_from_prefixes(net, ["conv1", "conv2", "fc"]),
            )
    """


@hookspec
def register_heads(register: Register) -> None:
    """Register heads: modules mapping backbone features to outputs.

    ``register(name, factory, description="", tasks=("classification",))``

    ``tasks`` lists the tasks the head supports (``"classification"``, ``"segmentation"``).
    A study that pairs a head with a task it does not declare is refused before training.

    The factory is called as::

        factory(*, backbone: harness.api.Backbone, num_classes: int, task: str, **options)
            -> torch.nn.Module

    For classification the module maps ``(N, backbone.num_features)`` to logits
    ``(N, num_classes)``. ``options`` come from the study's ``[[methods]]`` entry
    (``head_options = {hidden = 256}``); reject unknown options with a ``TypeError``.

    Example::

        @hookimpl
        def register_heads(register):
            register("cosine", lambda *, backbone, num_classes, task: CosineClassifier(
                backbone.num_features, num_classes))
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: each serves one or more *domains* with train/val/test splits.

    ``register(name, factory, description="", tasks=("classification",), domains=None)``

    ``domains`` optionally lists the sub-domains the dataset serves (``["amazon", "dslr"]``);
    a study names a domain as ``"name"`` or ``"name/sub"``, and a study-level alias can bind a
    dataset to options (``[datasets.office31] plugin = "folder", root = "~/data/office31"``).

    The factory is called as::

        factory(domain: str | None, *, image_size: int, seed: int, **options)
            -> harness.api.DomainData

    and must be deterministic for a given ``(domain, image_size, seed, options)``: the same
    images in the same splits every time. ``DomainData`` carries uint8 image tensors
    ``(N, 3, image_size, image_size)`` and int64 labels per split, the class names, the task and a
    fingerprint of the data (``harness.api.fingerprint_tensors`` computes one). A file that cannot be
    read must raise ``harness.api.DatasetError`` naming the file.

    Example::

        @hookimpl
        def register_datasets(register):
            register("noise", build_noise, description="random images, for smoke tests")

        def build_noise(domain, *, image_size, seed, n=300):
            g = torch.Generator().manual_seed(seed)
            x = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
            y = torch.randint(0, 2, (n,), generator=g)
            return harness.api.DomainData.from_arrays("noise", x, y, class_names=["a", "b"], seed=seed)
    """


@hookspec
def register_strategies(register: Register) -> None:
    """Register adaptation strategies: how a trial trains from source and target data.

    ``register(name, factory, description="")``

    The factory is called with the options of the study's ``[[methods]]`` entry
    (``strategy_options = {shots = 5}``) and returns a ``harness.api.Strategy``. A strategy declares

    - which data a step receives (``uses_source``: labelled source batches;
      ``uses_target``: target batches),
    - ``target_labels``: ``"none"``, ``"few"`` or ``"all"``. The engine enforces it: a strategy
      that declares ``"none"`` receives target batches with ``y = None``. Selecting such a
      method with target labels is reported as *oracle* on every leaderboard.
    - ``fixed``: hyperparameters it pins (``{"freeze_depth": "all"}`` for a linear probe),
    - ``search_space(trial)``: its own hyperparameters, named ``strategy.<name>``,
    - ``setup(model, num_classes, params)``: extra trainable modules (a domain discriminator),
    - ``training_step(model, batch, ctx)``: the loss of one step.

    Example::

        class EntropyMin(harness.api.Strategy):
            uses_source, uses_target, target_labels = True, True, "none"

            def search_space(self, trial):
                return {"strategy.weight": trial.suggest_float("strategy.weight", 0.01, 1, log=True)}

            def training_step(self, model, batch, ctx):
                xs, ys = batch.source
                xt, _ = batch.target
                p = model(xt).softmax(1)
                ent = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
                return F.cross_entropy(model(xs), ys) + ctx.params["strategy.weight"] * ent

        @hookimpl
        def register_strategies(register):
            register("entropy-min", EntropyMin)
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register subcommands of the ``harness`` command line.

    ``register(name, function, description="")``

    ``function`` is a plain function whose parameters are declared the way typer reads them
    (type hints, ``typer.Option`` defaults); it becomes ``harness <name>``. Raise
    ``harness.errors.HarnessError`` for a user error: it is printed as one line with exit status 2.
    A name that a built-in command already uses is refused.

    Example::

        import typer

        @hookimpl
        def register_commands(register):
            register("hello", hello, description="say hello")

        def hello(name: str = typer.Option("world", help="who to greet")) -> None:
            \"\"\"Say hello. Example: harness hello --name you\"\"\"
            print(f"hello {name}")
    """


def hook_names() -> list[str]:
    """Names of every hook in this contract (used by the meta-tests and ``harness plugins``)."""
    return sorted(name for name, obj in globals().items() if _is_hookspec(obj))


def _is_hookspec(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, f"{PROJECT}_spec")
