"""The example plugin: a backbone, a dataset, a strategy, a selection rule, a metric and a
command, registered through hooks.

How the harness finds this module
---------------------------------
``pyproject.toml`` of this distribution declares::

    [project.entry-points.harness]
    example = "harness_example.plugin"

When a ``harness`` command starts, it imports every module of that entry-point group and calls
the ``register_*`` functions below that are marked with ``@hookimpl``. Each of them receives a
``register`` callback and calls it once per thing it provides::

    register(name, factory, description="...", **meta)

The harness only stores the factory at that point; it calls it later, when a study names the
entry. So registration must be cheap: build nothing here, import nothing heavy at module level
that a plain ``harness plugins`` would not need.

What a plugin may import
------------------------
``harness.api``: the ``hookimpl`` decorator (also ``harness.hookimpl``), the data types, the errors
and the helpers.
Nothing else of the harness: the search driver, the engine and the CLI are not part of the
contract and may change. The full contract, with one example per hook, is ``harness.hookspecs``.

What is registered here
-----------------------
- backbone ``example-lenet``: a LeNet-style CNN (:class:`LeNet`, :func:`build_lenet`);
- dataset ``example-shapes`` with sub-domains ``plain`` and ``noisy`` (:func:`build_shapes`),
  so that a study can pair ``example-shapes/plain -> example-shapes/noisy``;
- strategy ``example-entropy``: source cross-entropy plus entropy minimisation on the unlabelled
  target (:class:`EntropyMinimization`);
- validator ``example-confidence``: the mean top-class probability on the unlabelled target
  validation images, a selection rule a study names in ``selection`` (:class:`Confidence`);
- metric ``example-top2``: the true class among the two highest logits (:class:`TopTwo`);
- command ``harness example-shapes-info`` (:func:`shapes_info`).

A plugin may implement any subset of the hooks; this one implements all but one
(``register_heads`` is left out: studies use the built-in ``linear`` and ``mlp`` heads). Names
follow ``harness.api.NAME_RULE``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.api import (
    Backbone,
    Batch,
    DatasetError,
    DomainData,
    Metric,
    Register,
    StepContext,
    Strategy,
    Validator,
    WeightsError,
    hookimpl,
    load_weights_file,
    stages_from_prefixes,
)

__all__ = [
    "SHAPE_CLASSES",
    "SHAPE_DOMAINS",
    "Confidence",
    "EntropyMinimization",
    "TopTwo",
    "LeNet",
    "build_lenet",
    "build_shapes",
    "register_backbones",
    "register_datasets",
    "register_metrics",
    "register_strategies",
    "register_validators",
]


# ======================================================================================= hooks
#
# The hook functions must be named exactly like the hooks in harness.hookspecs and take the
# argument `register`. A misspelt hook name is reported by `harness plugins` as an unknown hook.


@hookimpl
def register_backbones(register: Register) -> None:
    """Register the ``example-lenet`` backbone."""
    register(
        "example-lenet",
        build_lenet,
        description="LeNet-style CNN (conv-pool-conv-pool-fc), random init or a local weights file",
    )


@hookimpl
def register_datasets(register: Register) -> None:
    """Register the ``example-shapes`` dataset and the sub-domains it serves."""
    register(
        "example-shapes",
        build_shapes,
        description="synthetic squares, circles and bars; sub-domains plain and noisy",
        tasks=("classification",),
        domains=list(SHAPE_DOMAINS),
    )


@hookimpl
def register_strategies(register: Register) -> None:
    """Register the ``example-entropy`` strategy. The factory is the class itself."""
    register("example-entropy", EntropyMinimization, description=EntropyMinimization.description)


@hookimpl
def register_validators(register: Register) -> None:
    """Register the ``example-confidence`` selection rule (label-free: it reads target logits)."""
    register("example-confidence", Confidence, description="mean top-class target probability")


class Confidence(Validator):
    """The mean top-class probability on the target validation images: a confident model is
    expected to be a better one (a weak rule, kept short as an example of the hook).

    ``reads`` names what the harness computes for it, from ``harness.api.VALIDATOR_INPUTS``;
    ``score`` receives exactly those items and returns a float, higher meaning better."""

    reads = ("target_logits",)

    def score(self, inputs: dict[str, Any]) -> float:
        return float(inputs["target_logits"].float().softmax(1).amax(1).mean())


@hookimpl
def register_metrics(register: Register) -> None:
    """Register the ``example-top2`` metric; a study reports it with ``metrics = ["example-top2"]``."""
    register("example-top2", TopTwo, description="true class among the two highest", label="top-2")


class TopTwo(Metric):
    """The fraction of images whose true class is among the two highest logits. The harness
    calls ``update`` with logits and labels (possibly several times) and then ``compute``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.hits, self.rows = 0, 0

    def update(self, outputs: Tensor, target: Tensor) -> None:
        top = outputs.topk(min(2, outputs.shape[1]), dim=1).indices
        self.hits += int((top == target[:, None]).any(1).sum())
        self.rows += len(target)

    def compute(self) -> float:
        return self.hits / max(self.rows, 1)


@hookimpl
def register_commands(register: Register) -> None:
    """Add ``harness example-shapes-info`` to the command line: a plugin can bring its own tools."""
    register("example-shapes-info", shapes_info, description="describe the example-shapes domains")


def shapes_info(image_size: int = 32, n: int = 240) -> None:
    """Print the class balance of the example-shapes domains.

    Example: harness example-shapes-info --image-size 16
    """
    for domain in ("plain", "noisy"):
        data = build_shapes(domain, image_size=image_size, seed=0, n=n)
        counts = torch.bincount(torch.cat([data.train.y, data.val.y, data.test.y]), minlength=3)
        print(
            f"{domain}: "
            + ", ".join(f"{c}={k}" for c, k in zip(data.class_names, counts.tolist(), strict=True))
        )


# ======================================================================================= backbone


class LeNet(nn.Module):
    """A LeNet-style feature extractor: conv-pool-conv-pool, then two fully connected layers.

    ``forward`` maps a float batch ``(N, in_chans, H, W)`` to features ``(N, num_features)``,
    which is all a backbone must do: the harness puts the head (``linear``, ``mlp``, ...) on top.
    An adaptive pooling layer before the fully connected part makes the output size independent
    of the input size, so the same network serves 16 px and 224 px images.

    The parameter names start with ``conv1``, ``conv2`` and ``fc``: those prefixes are the stages
    the harness freezes stem first (freeze depth 1 = ``conv1``, 2 = ``conv1`` + ``conv2``, ...).
    """

    def __init__(self, in_chans: int = 3, num_features: int = 84) -> None:
        super().__init__()
        self.num_features = num_features
        self.conv1 = nn.Conv2d(in_chans, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.squash = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, num_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(self.squash(x))


def build_lenet(name: str, *, weights: str = "none", in_chans: int = 3) -> Backbone:
    """Backbone factory for ``example-lenet``.

    The harness calls it as ``factory(name, weights=..., in_chans=...)``. ``weights`` is one of

    - ``"none"``: random initialisation;
    - ``"imagenet"``: library-pretrained weights. LeNet has none, so this raises ``WeightsError``
      (exit status 2 and a hint in the CLI, not a traceback);
    - a path to a local ``.safetensors`` or torch checkpoint. ``load_weights_file`` reads it
      safely (never unpickling code) and raises ``WeightsError`` naming the file when it cannot.

    A study's ``weights = "source"`` arrives here as such a path: the harness pretrains this
    backbone on the source domain, saves ``module.state_dict()`` and passes the file back in.
    """
    weights = str(weights)
    net = LeNet(in_chans=in_chans)
    if weights == "imagenet":
        raise WeightsError(
            f"backbone {name!r} has no ImageNet weights",
            hint="use weights = 'none', 'source', or the path of a saved LeNet state dict",
        )
    if weights != "none":
        state = load_weights_file(weights)
        hint = "the file must hold the state dict of harness_example.plugin.LeNet"
        try:
            # strict=False reports missing and unexpected keys instead of raising on them;
            # a tensor of the wrong shape still raises RuntimeError
            result = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise WeightsError(
                f"weights file {weights} does not fit backbone {name!r}: "
                f"{str(exc).strip().splitlines()[-1].strip()}",
                hint=hint,
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                f"weights file {weights} does not fit backbone {name!r}: "
                f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}",
                hint=hint,
            )
    return Backbone(
        module=net,
        num_features=net.num_features,
        # every trainable parameter must fall in exactly one stage, listed stem first
        stages=stages_from_prefixes(net, ["conv1", "conv2", "fc"]),
        # the normalisation the weights expect, applied by the harness to pixels in [0, 1]
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        name=name,
    )


# ======================================================================================= dataset

SHAPE_CLASSES = ("square", "circle", "bar")
SHAPE_DOMAINS = ("plain", "noisy")
#: each sub-domain draws its own shapes, so source and target never share an image
_DOMAIN_STREAM = {"plain": 0, "noisy": 1}


def build_shapes(
    domain: str | None, *, image_size: int, seed: int, n: int = 240, shape_seed: int = 0
) -> DomainData:
    """Dataset factory for ``example-shapes``: coloured shapes, 3 balanced classes.

    The harness calls it as ``factory(domain, image_size=..., seed=..., **options)``:

    - ``domain`` is the part after the ``/`` in a study (``example-shapes/noisy`` -> ``"noisy"``),
      or ``None`` for plain ``example-shapes``, which here means ``"plain"``;
    - ``seed`` is the study seed. Pass it to ``DomainData.from_arrays``, which uses it for the
      stratified train/val/test split; the images themselves depend only on ``shape_seed``;
    - the keyword options (``n``, ``shape_seed``) come from a study-level alias::

          [datasets.shapes-big]
          plugin = "example-shapes"
          n = 900

      An unknown option fails as a ``TypeError`` that the harness reports with the study key.

    The result must be deterministic for the same arguments: every generator below is seeded.
    Images are uint8 ``(n, 3, image_size, image_size)``, labels int64 ``(n,)``. The ``plain``
    sub-domain draws shapes on black; ``noisy`` draws other shapes on a random background
    colour with pixel noise.
    """
    sub = "plain" if domain is None else domain
    if sub not in SHAPE_DOMAINS:
        raise DatasetError(
            f"dataset 'example-shapes' has no sub-domain {sub!r}; allowed: {', '.join(SHAPE_DOMAINS)}",
            hint="name it as example-shapes/plain or example-shapes/noisy",
        )
    if image_size < 8:
        raise DatasetError(f"example-shapes needs image_size >= 8, got {image_size}")
    if n < 5 * len(SHAPE_CLASSES):
        raise DatasetError(
            f"example-shapes needs n >= {5 * len(SHAPE_CLASSES)} so that every split holds "
            f"every class, got n={n}"
        )

    g = torch.Generator().manual_seed(1000 * shape_seed + _DOMAIN_STREAM[sub])
    y = torch.arange(n, dtype=torch.int64) % len(SHAPE_CLASSES)
    x = _draw_shapes(y, image_size, g, noisy=sub == "noisy")
    return DomainData.from_arrays(
        f"example-shapes/{sub}",
        x,
        y,
        class_names=SHAPE_CLASSES,
        seed=seed,
        # shapes are symmetric, so horizontal flips are a label-preserving augmentation
        meta={"hflip": True, "sub_domain": sub},
    )


def _draw_shapes(y: Tensor, size: int, g: torch.Generator, *, noisy: bool) -> Tensor:
    """Render one shape per label, all at once: uint8 ``(N, 3, size, size)``."""
    n = len(y)
    s = float(size)
    half = (0.15 + 0.15 * torch.rand(n, generator=g)) * s  # half-width of the shape
    cx = (0.3 + 0.4 * torch.rand(n, generator=g)) * s
    cy = (0.3 + 0.4 * torch.rand(n, generator=g)) * s
    fg = 110 + 145 * torch.rand(n, 3, generator=g)  # bright shape colours
    bg = 90 * torch.rand(n, 3, generator=g) if noisy else torch.zeros(n, 3)

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = (coords.view(1, 1, -1) - cx.view(-1, 1, 1)).abs()  # (N, 1, S)
    dy = (coords.view(1, -1, 1) - cy.view(-1, 1, 1)).abs()  # (N, S, 1)
    h = half.view(-1, 1, 1)
    masks = torch.stack(
        [
            (dx <= h) & (dy <= h),  # square
            dx**2 + dy**2 <= h**2,  # circle
            (dx <= 1.6 * h) & (dy <= 0.35 * h),  # horizontal bar
        ],
        dim=1,
    )  # (N, 3 classes, S, S)
    mask = masks[torch.arange(n), y].unsqueeze(1)  # (N, 1, S, S)
    img = torch.where(mask, fg.view(n, 3, 1, 1), bg.view(n, 3, 1, 1))
    if noisy:
        img = img + 35.0 * torch.randn(img.shape, generator=g)
    return img.round().clamp(0, 255).to(torch.uint8)


# ======================================================================================= strategy


class EntropyMinimization(Strategy):
    """Source cross-entropy plus entropy minimisation on unlabelled target batches.

    The loss of one step is ``CE(source) + w * H(target)`` where ``H`` is the mean entropy of
    the model's predictions on a target batch: the model is pushed to be confident on the
    target too (Grandvalet & Bengio, 2005).

    The class attributes are the contract with the training engine:

    - ``uses_source`` / ``uses_target``: each step's ``Batch`` holds a labelled source batch and
      a target batch of the same size;
    - ``target_labels = "none"``: the engine hands over target batches with ``y = None``, and
      trials are selected on the *source* validation split (``selection = "auto"``); a study
      that forces target-val selection gets this method marked *oracle*;
    - ``search_space``: the weight ``w`` is searched by Optuna next to the harness's own
      hyperparameters (learning rates, freeze depth, ...). Names must start with ``strategy.``.

    Options come from the study's ``strategy_options`` and arrive as keyword arguments to the
    constructor: here ``ramp`` (a fraction of training during which ``w`` grows linearly from 0,
    so the classifier learns something before it is asked to be confident). Invalid options
    raise ``TypeError``/``ValueError``, which the harness reports before any training.
    """

    uses_source = True
    uses_target = True
    target_labels = "none"
    description = "source cross-entropy + searched weight x prediction entropy on the target"

    def __init__(self, ramp: float = 0.0) -> None:
        super().__init__()
        if not isinstance(ramp, int | float) or not 0.0 <= ramp <= 1.0:
            raise ValueError(f"ramp must be a number in [0, 1], got {ramp!r}")
        self.ramp = float(ramp)

    def search_space(self, trial: Any) -> dict[str, Any]:
        """Suggest the entropy weight; what is returned here reaches ``ctx.params``."""
        return {
            "strategy.entropy_weight": trial.suggest_float(
                "strategy.entropy_weight", 1e-3, 1.0, log=True
            )
        }

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> Tensor:
        """Return the loss of one step; the engine runs backward and the optimiser."""
        xs, ys = batch.source
        xt, _ = batch.target  # labels are None: target_labels = "none"
        loss = F.cross_entropy(model(xs), ys)
        weight = float(ctx.params["strategy.entropy_weight"])
        if self.ramp > 0:
            weight *= min(1.0, ctx.progress / self.ramp)
        log_p = model(xt).float().log_softmax(dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
        ctx.log("target_entropy", entropy)  # a diagnostic: averaged per epoch by the engine
        return loss + weight * entropy
