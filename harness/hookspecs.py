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
Each ``register_*`` hook receives a ``register`` function (typed as ``Register`` below) owned by
the harness and calls it once per thing it provides. The harness records which plugin and which
distribution gave each entry, refuses a second entry of the same kind and name (naming both
plugins), and answers an unknown name with the closest registered names. ``NAME_RULE`` below is
the one statement of what a registered name may be.

A plugin module never imports the search driver, the engine or the CLI: everything it needs is
in ``harness`` (``hookimpl``) and ``harness.api`` (types, errors, helpers). Hooks are called once
per process, one plugin at a time; an exception raised inside one plugin's hook is reported with
that plugin's name and does not stop the others.

This module stays free of torch so that ``import harness`` is fast; ``docs/plugins.md`` carries
each hook's docstring verbatim (``docs/hook_reference.py`` writes it, a test keeps them equal).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pluggy

from harness.options import Declared

PROJECT = "harness"
ENTRY_POINT_GROUP = "harness"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: the naming rule for everything a plugin registers, stated once (docs and README point here)
NAME_RULE = (
    "lowercase letters, digits, '-', '_' and '.', starting with a letter or digit "
    "(no '/': a study writes a dataset's sub-domain as 'dataset/sub')"
)
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")

#: the tasks a study can have
TASKS = ("classification", "segmentation")
#: what an entry that passes no ``tasks=`` serves, per kind
DEFAULT_TASKS = {
    "head": ("classification",),
    "dataset": ("classification",),
    "strategy": TASKS,
    "validator": TASKS,
    "metric": ("classification",),
}


@dataclass(frozen=True)
class OpenDomains:
    """A dataset's ``domains=`` when its sub-domains follow a rule rather than a list, such as
    ``rotated-digits/90``: ``accepts`` is a regular expression a sub-domain must match in full,
    or a function that says whether one is valid; ``examples`` are a few valid names (shown in
    errors and built by the contract kit); ``help`` says the rule in words ("an angle in
    degrees, 0 to 359").

    It behaves as a container: ``"90" in domains`` applies the rule, and iterating gives the
    examples."""

    accepts: str | Callable[[str], bool]
    examples: tuple[str, ...]
    help: str = ""

    def __post_init__(self) -> None:
        if not self.examples or not all(isinstance(e, str) and e in self for e in self.examples):
            raise ValueError(
                f"OpenDomains needs examples that its rule accepts, got {self.examples!r}"
            )

    def __contains__(self, sub: object) -> bool:
        if not isinstance(sub, str):
            return False
        if isinstance(self.accepts, str):
            return re.fullmatch(self.accepts, sub) is not None
        return bool(self.accepts(sub))

    def __iter__(self) -> Iterator[str]:
        return iter(self.examples)

    def __bool__(self) -> bool:
        return True


class Register(Protocol):
    """The `register` callback every `register_*` hook receives.

    - `name`: see `NAME_RULE`; one name per kind.
    - `factory`: what the harness calls when a study names the entry (see each hook).
    - `description`: one line for `harness plugins`.
    - `tasks`: heads, datasets and strategies only: the tasks the entry serves, a subset of
      `TASKS`. Declared here and nowhere else (default: `DEFAULT_TASKS` of the kind); a study
      of another task is refused before training.
    - `domains`: datasets only: the sub-domains served, a list of names or `OpenDomains`.
    - `options`: heads, datasets and strategies: the options a study may pass the factory
      (`head_options`, a dataset alias's keys, `strategy_options`), each a `harness.api.Option`
      with its type, range or choices, the factory's default and a line of help; or a function
      returning them, called when first needed (the smp heads read a library's signature).
      The harness checks a study's options against them before anything is built: an unknown
      one is answered with the allowed names and the closest, a bad value with the declared
      type and range (`hidden must be an int >= 1, got -5`). Without `options`, the factory's
      signature says which names it takes (a factory taking `**options` then checks its own);
      the contract kit checks that declared options are parameters of the factory and that
      every required parameter is declared. Example: `register("mlp", build_mlp, options={
      "hidden": Option(int, min=1, default=256), "dropout": Option(float, min=0, max=1,
      default=0.2)})`.
    - `meta`: further documented keys of a kind (`min_image_size` and
      `source_pretraining` for heads), shown by `harness plugins`.
    """

    def __call__(
        self,
        name: str,
        factory: Callable[..., Any],
        description: str = "",
        *,
        tasks: Sequence[str] | None = None,
        domains: Sequence[str] | OpenDomains | None = None,
        options: Declared | None = None,
        **meta: Any,
    ) -> None: ...


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone factories: feature extractors that a head sits on.

    `register(name, factory, description="")`; the factory is called as

    ```python
    factory(name: str, *, weights: str, in_chans: int = 3) -> harness.api.Backbone
    ```

    - `name` is the registered name the study asked for (one factory may serve many names).
    - `weights` is `"none"` (random init), `"imagenet"` (the library's own pretrained weights,
      which may need a model hub), or the path of a local weights file (`.safetensors`, or a torch
      checkpoint: read it with `harness.api.load_weights_file`, which uses `weights_only=True`).
      The harness resolves `weights = "source"` (pretraining on the source domain) into such a
      file before calling the factory, so a factory never sees `"source"`. When weights cannot
      be had (no network), raise `harness.api.WeightsError` saying how to supply a local file.

    The returned `Backbone` wraps an `nn.Module` whose `forward(x)` maps a float batch
    `(N, in_chans, H, W)` to pooled features `(N, num_features)`, lists its parameter names stage
    by stage, **stem first** (`harness.api.stages_from_prefixes` helps), so that freeze depth `k`
    means "the first k stages" for any backbone, and names the normalization (mean, std) its
    weights expect. Segmentation decoders additionally need a timm model with `feature_info`
    (any hierarchical timm model qualifies).

    Example:

    ```python
    @hookimpl
    def register_backbones(register):
        register("lenet", build_lenet, description="LeNet-5 for 32 px digits")

    def build_lenet(name, *, weights, in_chans=3):
        net = LeNet(in_chans)
        if weights != "none":
            net.load_state_dict(harness.api.load_weights_file(weights))
        return harness.api.Backbone(
            module=net, num_features=84,
            stages=harness.api.stages_from_prefixes(net, ["conv1", "conv2", "fc"]),
        )
    ```
    """


@hookspec
def register_heads(register: Register) -> None:
    """Register heads: modules mapping backbone features to outputs.

    `register(name, factory, description="", tasks=("classification",), **meta)`; the factory is
    called as

    ```python
    factory(*, backbone: harness.api.Backbone, num_classes: int, task: str, **options)
        -> torch.nn.Module
    ```

    A classification head maps `(N, backbone.num_features)` to logits `(N, num_classes)`.
    `options` come from the study's `head_options`, checked against `register(options=...)` (or
    the factory's signature) before the factory is called; a factory taking `**options` still
    rejects unknown ones with a `TypeError`.

    Capabilities, each a Protocol in `harness.api`:

    - `ImageHead`: a module with `takes_images = True` receives the images instead and returns
      `(N, num_classes, H, W)`; it runs the backbone's modules itself (the smp decoders).
    - `FeatureMapHead`: `forward_with_features(x)` returns the logits and the backbone's
      deepest feature map `(N, C, h, w)` from the same pass, and `deepest_channels` is `C`. The
      feature-level adaptation strategies (`dann`, `coral`, `mmd`) need it on segmentation and
      stop with a `PluginContractError` naming what is missing.

    Meta keys: `min_image_size` (the smallest image size the head works at) and
    `source_pretraining=True`: the decoder that `weights = "source"` pretrains a backbone with on
    a segmentation source (one registered head declares it; the built-in `fpn` does).

    Example:

    ```python
    @hookimpl
    def register_heads(register):
        register("cosine", lambda *, backbone, num_classes, task: CosineClassifier(
            backbone.num_features, num_classes))
    ```
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: each serves one or more *domains* with train/val/test splits.

    `register(name, factory, description="", tasks=("classification",), domains=None,
    options=None)`; the factory is called as

    ```python
    factory(domain: str | None, *, image_size: int, seed: int, **options)
        -> harness.api.DomainData | harness.api.ImageFiles
    ```

    A study names a domain as `"name"` (`domain=None`) or `"name/sub"`. `domains` lists the
    sub-domains (`["amazon", "dslr"]`), or states their rule with `harness.api.OpenDomains`
    (`OpenDomains(r"\\d+", examples=("0", "90"))` for `rotated-digits/90`); a study naming
    another is refused before any data is built. A study-level alias binds a dataset to options
    (`[datasets.office31] plugin = "folder", root = "~/data/office31"`): they are checked
    against `options` (or the factory's signature) before any data is built.

    The factory must be deterministic for a given `(domain, image_size, seed, options)`: the same
    images in the same splits every time. `DomainData.from_arrays` makes seeded splits and a
    fingerprint from one labelled pool; images are uint8 `(N, 3, image_size, image_size)`, labels
    `(N,)` class indices or `(N, H, W)` masks with 255 (`IGNORE_INDEX`) for void pixels. A file
    that cannot be read raises `harness.api.DatasetError` naming the file.

    A dataset larger than memory returns `harness.api.ImageFiles(name, class_names, paths,
    labels)` instead: the harness decodes the files once (`harness.api.images`' reader, at the
    study's stored size) into a cache every run and worker maps, and splits it into index views
    (by `fractions`, or `splits` positions; official lists for `protocol = "standard"` in
    `meta["lists"]`). Segmentation or a format of its own gives `decode(i, (height, width))`
    returning the image (and mask) as uint8, raising on a file it cannot read.

    `DomainData.meta` (or `ImageFiles.meta`) keys the harness reads (others are kept for the
    plugin's own use):

    - `hflip` (default `True`): whether a horizontal flip preserves the labels. Training flips
      only when both the source and the target allow it (digits say `False`).

    Augmentation policies (`augment.policy`): `none`; `light` rotates up to 10 degrees, shifts
    10 %, zooms 0.9-1.1, flips, and jitters brightness and contrast; `strong` rotates up to 20
    degrees and adds shear, colour, grayscale, invert, noise, blur and cutout; `randaugment` and
    `trivialaugment` draw per image from `AUGMENT_OPS`, rotating up to 30 or 135 degrees. A dataset
    whose labels depend on orientation should say so: rotation cannot be switched off per dataset.

    Example:

    ```python
    @hookimpl
    def register_datasets(register):
        register("noise", build_noise, description="random images, for smoke tests")

    def build_noise(domain, *, image_size, seed, n=300):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 2, (n,), generator=g)
        return harness.api.DomainData.from_arrays("noise", x, y, class_names=["a", "b"], seed=seed)
    ```
    """


@hookspec
def register_strategies(register: Register) -> None:
    """Register adaptation strategies: how a trial trains from source and target data.

    `register(name, factory, description="", tasks=("classification", "segmentation"))`; the
    factory is called with the study's `strategy_options` and returns a `harness.api.Strategy`.
    `tasks` is declared with `register` only (a `tasks` class attribute is ignored, with a warning).
    Example:

    ```python
    class EntropyMin(harness.api.Strategy):
        uses_source = True  # receives labelled source batches
        uses_target = True  # receives target batches
        target_labels = "none"  # "none" | "few" | "all": the engine enforces it
        fixed = {}  # pinned hyperparameters, e.g. {"freeze_depth": "all"}
        cache_features = True  # False if a step changes the backbone (AdaBN's statistics)

        def search_space(self, trial):  # names start with "strategy."
            return {"strategy.weight": trial.suggest_float("strategy.weight", 0.01, 1, log=True)}

        def training_step(self, model, batch, ctx):  # the loss of one step
            (xs, ys), (xt, _) = batch.source, batch.target
            p = model(xt).softmax(1)
            ent = -(p * p.clamp_min(1e-8).log()).sum(1).mean()
            ctx.log("target_entropy", ent)
            return ctx.supervised_loss(model(xs), ys) + ctx.params["strategy.weight"] * ent

        # optional: setup(model, num_classes, params, feature_dim) -> extra module or None,
        # param_groups(extra, lr, weight_decay), adapt(model, target_images)

    @hookimpl
    def register_strategies(register):
        register("entropy-min", EntropyMin, tasks=("classification",))
    ```

    `target_labels = "none"` hands the step target batches with `y = None`; selecting such a
    method with target labels is reported as *oracle* on every leaderboard.
    **setup** runs once per trial, after the model is on its device and frozen to the trial's
    depth, with the global generators seeded by the trial's seed. `model` is a
    `harness.api.TransferModel`; `feature_dim` its `feature_dim`: `backbone.num_features` for
    classification, the head's `deepest_channels` for segmentation (`None` without). The module
    it returns is moved to the device, reaches `training_step` as `ctx.extra`, and is optimized
    by the trial's optimizer (AdamW or SGD, `optimizer.name`) in the groups `param_groups(extra,
    lr, weight_decay)` gives; the default is one group at the head's `lr` times `extra.lr_scale`
    if set, with the trial's weight decay. A setup of three parameters (no `feature_dim`) warns.

    **training_step** receives `batch.source = (images, labels)` and `batch.target = (images,
    labels or None)`, normalized and augmented, and runs, `ctx.extra` included, under the trial's
    autocast (bf16 on most GPUs). `model(x)` gives logits, `model.features(x)` pooled features
    (classification), `model.head(f)` logits from them; `ctx.progress` runs from 0 to 1 over the
    trial; `ctx.log(name, value)` values are averaged per epoch, stored with each completed trial
    and shown in `trials.csv` (`diagnostic:<name>`, the last epoch's). The model and `ctx.extra`
    are put in training mode at the start of every epoch (frozen stages stay in eval mode);
    scoring switches the model to eval mode and back. Compute the supervised loss with
    `ctx.supervised_loss(logits, y)`, for label smoothing (docs/plugins.md, *Strategy API*).

    **adapt** gets unaugmented, normalized target training batches without labels, under
    `torch.no_grad()` and autocast, the model in training mode (AdaBN re-estimates statistics).

    With the whole backbone frozen and augmentation `"none"`, the engine serves the backbone's
    features from a cache (`Strategy.cache_features`)."""


@hookspec
def register_validators(register: Register) -> None:
    """Register selection rules: how a trial is scored so that the search can pick among trials
    without the target test split.

    `register(name, factory, description="", tasks=("classification", "segmentation"))`; the
    factory is called with no arguments and returns a `harness.api.Validator`. A study selects
    with it by name (`selection = ["my-rule", "target-val"]`); every trial records every
    registered rule's score, and the leaderboard reports how each one ranked the trials.

    A validator declares what it reads (`reads`) from the menu `harness.api.VALIDATOR_INPUTS`:
    target and source validation logits, their labels, pooled features, or the task's primary
    metric on a labelled validation split (segmentation provides `target_logits`,
    `target_metric` and `source_metric`), or, with several sources, `held_out_source_metric`
    (each source scored by a model trained on the others). Reading `target_labels` or
    `target_metric` makes the rule oracle for methods that claim to need no target labels.
    `higher_is_better = False` declares a risk: the harness stores and ranks it negated. A
    `pooled` validator reads `candidates` only and scores all completed trials of a method
    together, after the search.
    Example:

    ```python
    class Confidence(harness.api.Validator):
        reads = ("target_logits",)

        def score(self, inputs):  # inputs holds exactly what `reads` names
            return float(inputs["target_logits"].softmax(1).amax(1).mean())

    @hookimpl
    def register_validators(register):
        register("confidence", Confidence, description="mean top-class probability")
    ```
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register metrics: what final runs report on the target test split.

    `register(name, factory, description="", tasks=("classification",), label="short name")`;
    the factory is called as `factory(num_classes=K)` and returns a `harness.api.Metric`: the
    harness calls `update(outputs, target)` with a split's outputs (classification: float logits
    `(N, K)` and int64 labels; segmentation: int64 predicted and true classes `(B, H, W)`, a few
    images at a time, 255 = void) and then `compute()`, a float fraction (shown in %) or one
    float per class. `label` names it in tables (default: the name). A study reports it with
    `metrics = ["accuracy", "my-metric"]`; the task's first built-in metric (accuracy, mIoU)
    stays the one rows are ranked and trials selected by. Example:

    ```python
    class Top2(harness.api.Metric):
        def __init__(self, num_classes):
            super().__init__(num_classes)
            self.hits, self.rows = 0, 0

        def update(self, outputs, target):
            top = outputs.topk(min(2, outputs.shape[1]), dim=1).indices
            self.hits += int((top == target[:, None]).any(1).sum())
            self.rows += len(target)

        def compute(self):
            return self.hits / max(self.rows, 1)

    @hookimpl
    def register_metrics(register):
        register("top2", Top2, description="true class among the two highest", label="top-2")
    ```
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register subcommands of the `harness` command line.

    `register(name, function, description="")`; `function` is a plain function whose parameters
    are declared the way typer reads them (type hints, `typer.Option` defaults); it becomes
    `harness <name>`. Raise `harness.api.HarnessError` for a user error: it is printed as one
    line with exit status 2. A name that a built-in command already uses is refused.

    Example:

    ```python
    import typer

    @hookimpl
    def register_commands(register):
        register("hello", hello, description="say hello")

    def hello(name: str = typer.Option("world", help="who to greet")) -> None:
        \"\"\"Say hello. Example: harness hello --name you\"\"\"
        print(f"hello {name}")
    ```
    """


def hook_names() -> list[str]:
    """Names of every hook in this contract (used by the meta-tests and ``harness plugins``)."""
    return sorted(name for name, obj in globals().items() if _is_hookspec(obj))


def _is_hookspec(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, f"{PROJECT}_spec")
