"""Everything that can fail before training, tried once before a search begins: the search space
against each backbone's stages, each pair's data, each method's weights and head, and a sample
batch through every model."""

from __future__ import annotations

import torch

from harness.api import DomainData
from harness.api.strategy import declaration_problem
from harness.api.validation import HELD_OUT_SOURCES
from harness.errors import HarnessError, PluginContractError
from harness.metrics import default_metrics, reported_metrics
from harness.registry import Registry, unknown_message
from harness.rules import reads_unlabelled_target
from harness.search.domains import DomainCache
from harness.search.models import ModelFactory
from harness.search.resolve import ResolvedMethod
from harness.search.selection import resolve_rule, selection_rules
from harness.study import AUTO_RULE, StudySpec, spec_error
from harness.training.inputs import model_input
from harness.training.model import set_drop_path
from harness.training.weights import build_backbone, source_pretraining_head


def _num_stages(rm: ResolvedMethod) -> int:
    """The stages of the method's backbone, from a build without weights (nothing downloaded or
    read) that leaves the random generators as they were."""
    with torch.random.fork_rng(devices=[]):
        return len(build_backbone(rm.backbone, rm.method.backbone, "none").stages)


def _drop_path_modules(rm: ResolvedMethod) -> int:
    """How many drop-path modules the method's backbone has (a build without weights, as
    :func:`_num_stages`; the rates it sets belong to that throwaway build)."""
    with torch.random.fork_rng(devices=[]):
        return set_drop_path(build_backbone(rm.backbone, rm.method.backbone, "none").module, 0.0)


def check_drop_path(spec: StudySpec, methods: list[ResolvedMethod]) -> None:
    """Refuse a searched or pinned ``search.drop_path`` above 0 for a backbone without drop-path
    modules, which every such trial would fail on."""
    rate = spec.search.drop_path
    top = max(rate) if isinstance(rate, list) else rate
    if top is None or top <= 0:
        return
    counts: dict[tuple[str, str], int] = {}
    for j, rm in enumerate(methods):
        key = (rm.backbone.plugin, rm.method.backbone)
        if key not in counts:
            try:
                counts[key] = _drop_path_modules(rm)
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{j}].backbone", exc) from None
        if counts[key] == 0:
            raise spec_error(
                spec,
                "search.drop_path",
                f"{rate} for methods[{j}] ({rm.method.backbone}, {rm.method.strategy}): the "
                "backbone has no timm DropPath modules (timm models with residual blocks have "
                "them); leave drop_path unset or 0 for a study of this backbone",
            )


def check_search_space(spec: StudySpec, methods: list[ResolvedMethod]) -> None:
    """Refuse a ``search.freeze_depth`` past the stages of a backbone that searches it (a strategy
    that fixes its own depth does not), instead of training with fewer frozen stages than asked."""
    depth = spec.search.freeze_depth
    if depth == "auto":
        return
    top = max(depth) if isinstance(depth, list) else int(depth)
    stages: dict[tuple[str, str], int] = {}
    for j, rm in enumerate(methods):
        if "freeze_depth" in rm.new_strategy().fixed:
            continue
        key = (rm.backbone.plugin, rm.method.backbone)
        if key not in stages:
            try:
                stages[key] = _num_stages(rm)
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{j}].backbone", exc) from None
        n = stages[key]
        if top > n:
            raise spec_error(
                spec,
                "search.freeze_depth",
                f"{depth} is past {rm.method.backbone}'s {n} stages (0..{n} allowed; "
                f"methods[{j}] searches it)",
            )


def _weights(models: ModelFactory, rm: ResolvedMethod, source: DomainData, pretrain: bool) -> str:
    """The method's weights; without ``pretrain``, ``weights = "source"`` is checked with random
    ones (the same shapes) and the head that would pretrain them, training nothing."""
    if pretrain or rm.method.weights != "source":
        return models.backbone_weights(rm, source)
    source_pretraining_head(models.ctx.registry, source.task)
    return "none"


def _sample_batch(
    models: ModelFactory, rm: ResolvedMethod, domains: DomainCache, i: int, pretrain: bool
) -> None:
    spec, device = models.spec, models.ctx.device
    source, target = domains.pair_data(i)
    weights = _weights(models, rm, source, pretrain)
    model = models.build_model(rm, weights, target.num_classes, reuse=True)
    x = target.val.range(0, 2)
    if spec.task == "segmentation":  # the model trains on crops of image_size
        x = x[..., : spec.image_size, : spec.image_size]
    expected = (2, target.num_classes) + (tuple(x.shape[2:]) if spec.task == "segmentation" else ())
    try:
        with torch.no_grad():
            net = model.eval().to(device)
            out = net(model_input(x, net, channels_last=False))
    except Exception as exc:  # noqa: BLE001 - timm and smp refuse shapes in many ways
        raise PluginContractError(
            f"{rm.method.backbone} + {rm.method.head} fails on a sample batch of "
            f"{spec.image_size} px images: {str(exc).splitlines()[0][:200]}"
        ) from None
    if tuple(out.shape) != expected:
        raise PluginContractError(f"model output has shape {tuple(out.shape)}, expected {expected}")


def check_protocol(spec: StudySpec, methods: list[ResolvedMethod]) -> None:
    """Refuse, under ``protocol = "standard"`` (where the target's training images are its test
    images), a method that trains on target labels: it would be scored on what it learned."""
    if spec.data.protocol != "standard":
        return
    for j, rm in enumerate(methods):
        labels = rm.new_strategy().target_labels
        if labels != "none":
            raise spec_error(
                spec,
                f"methods[{j}].strategy",
                f"{rm.method.strategy!r} trains on target labels (target_labels = {labels!r}), "
                'but under data.protocol = "standard" the target\'s training images are its test '
                'images; use protocol = "held-out" for target-supervised methods',
            )


#: the rules and metrics the harness's own plugins register, and those plugins' entry-point names
BUILTIN_RULES = ("target-val", "source-val", "entropy", "im", "snd", "bnm", "dev", "ensv")
VALIDATORS_PLUGIN, METRICS_PLUGIN = "validators", "metrics"


def check_selection(spec: StudySpec, registry: Registry, methods: list[ResolvedMethod]) -> None:
    """Every rule of ``selection`` (``auto`` as each method resolves it) is a validator registered
    for the study's task, and the first one (it drives the sampler and pruner) is scored per
    trial, not pooled after the search."""
    entries = registry.entries["validator"]
    known = [n for n, e in entries.items() if spec.task in e.tasks]
    allowed = ", ".join(["auto", *known])
    auto = (
        {r for rm in methods for r in _auto_rules(spec, rm)}
        if AUTO_RULE in spec.selection_rules
        else set()
    )
    for rule in [*(r for r in spec.selection_rules if r != AUTO_RULE), *sorted(auto)]:
        if rule not in entries:
            why = unknown_message("validator", rule, known)
            if rule in BUILTIN_RULES:  # HARNESS_PLUGINS left the built-in rules out
                why += f" (the built-in rules come from the {VALIDATORS_PLUGIN!r} plugin: load it)"
            raise spec_error(spec, "selection", f"{why}; allowed: {allowed}")
        if rule not in known:
            raise spec_error(
                spec,
                "selection",
                f"validator {rule!r} serves {', '.join(entries[rule].tasks)}, not {spec.task}; "
                f"allowed: {allowed}",
            )
    first = spec.selection_rules[0]
    if first != AUTO_RULE and entries[first].factory().pooled:
        raise spec_error(
            spec,
            "selection",
            f"{first!r} scores every trial against the others after the search, so it cannot "
            f'drive the search: put a per-trial rule first (selection = ["im", "{first}"])',
        )


def check_target_images(spec: StudySpec, registry: Registry, methods: list[ResolvedMethod]) -> None:
    """A strategy that sees no target image declares nothing that contradicts it, and no rule
    of ``selection`` reads target images without labels for it (source-val and the oracle
    target-val do not)."""
    entries = registry.entries["validator"]
    label_free = {n for n, e in entries.items() if reads_unlabelled_target(e.factory())}
    allowed = [n for n, e in entries.items() if spec.task in e.tasks and n not in label_free]
    for j, rm in enumerate(methods):
        strategy = rm.new_strategy()
        problem = declaration_problem(strategy)
        if problem is not None:
            raise spec_error(
                spec, f"methods[{j}].strategy", f"strategy {rm.method.strategy!r}: {problem}"
            )
        if strategy.target_images != "none":
            continue
        bad = [r for r, _ in selection_rules(spec, strategy, registry) if r in label_free]
        if bad:
            raise spec_error(
                spec,
                "selection",
                f"{bad[0]!r} reads unlabelled target images, but strategy "
                f"{rm.method.strategy!r} (methods[{j}]) sees no target image "
                f'(target_images = "none"); allowed for it: auto, {", ".join(allowed)} '
                "(target-val is oracle)",
            )


def check_held_out_sources(
    spec: StudySpec, registry: Registry, methods: list[ResolvedMethod]
) -> None:
    """A rule that trains once more per source (leave-one-source-out) needs every pair to have
    several sources, and backbones that never saw the held-out source (not pretrained on the
    pooled sources)."""
    entries = registry.entries["validator"]
    rules = [
        r
        for r in spec.selection_rules
        if r in entries and HELD_OUT_SOURCES in entries[r].factory().reads
    ]
    if not rules:
        return
    for i, pair in enumerate(spec.pairs):
        if len(pair.sources) < 2:
            raise spec_error(
                spec,
                "selection",
                f"{rules[0]!r} holds out one source at a time, but {spec.pair_where(i)} "
                f"({pair.key}) has one source; use it on pairs of several sources only",
            )
    for j, rm in enumerate(methods):
        if rm.method.weights == "source":
            raise spec_error(
                spec,
                f"methods[{j}].weights",
                f'{rules[0]!r} scores each source held out, but weights = "source" pretrains '
                "the backbone on every source, the held-out one too; allowed with it: none, "
                "imagenet or a weights file",
            )


def _auto_rules(spec: StudySpec, rm: ResolvedMethod) -> list[str]:
    """What ``selection = "auto"`` means for one method: target-val or source-val."""
    return [resolve_rule(AUTO_RULE, rm.new_strategy())[0]]


def check_metrics(spec: StudySpec, registry: Registry) -> None:
    """Every name of ``metrics`` is a metric registered for the study's task."""
    entries = registry.entries["metric"]
    known = [n for n, e in entries.items() if spec.task in e.tasks]
    for name in reported_metrics(spec.task, spec.metrics):
        if name not in known:
            why = (
                f"metric {name!r} serves {', '.join(entries[name].tasks)}, not {spec.task}"
                if name in entries
                else unknown_message("metric", name, known)
            )
            if name not in entries and name in default_metrics(spec.task):
                why += f" (the built-in metrics come from the {METRICS_PLUGIN!r} plugin: load it)"
            raise spec_error(spec, "metrics", f"{why}; allowed: {', '.join(known)}")


def preflight(
    methods: list[ResolvedMethod],
    models: ModelFactory,
    domains: DomainCache,
    pretrain: bool = True,
) -> None:
    """Check every (pair, method); a failure is the study file's error, naming the method. Without
    ``pretrain`` (``harness validate``) nothing is trained: see :func:`_weights`."""
    spec = models.spec
    check_selection(spec, models.ctx.registry, methods)
    check_target_images(spec, models.ctx.registry, methods)
    check_held_out_sources(spec, models.ctx.registry, methods)
    check_metrics(spec, models.ctx.registry)
    check_search_space(spec, methods)
    check_drop_path(spec, methods)
    check_protocol(spec, methods)
    for i in range(len(spec.pairs)):
        domains.pair_data(i)
        for j, rm in enumerate(methods):
            try:
                _sample_batch(models, rm, domains, i, pretrain)
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{j}]", exc) from None
            except TypeError as exc:
                raise spec_error(
                    spec, f"methods[{j}].head_options", f"head {rm.method.head!r}: {exc}"
                ) from None
