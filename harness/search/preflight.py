"""Everything that can fail before training, tried once before a search begins: each pair's data,
each method's weights and head, and a sample batch through every model."""

from __future__ import annotations

import torch

from harness.errors import HarnessError, PluginContractError
from harness.search.domains import DomainCache
from harness.search.models import ModelFactory
from harness.search.resolve import ResolvedMethod
from harness.study import spec_error
from harness.training.inputs import model_input


def _sample_batch(models: ModelFactory, rm: ResolvedMethod, domains: DomainCache, i: int) -> None:
    spec, device = models.spec, models.ctx.device
    source, target = domains.pair_data(i)
    weights = models.backbone_weights(rm, source)
    model = models.build_model(rm, weights, target.num_classes, reuse=True)
    expected = (2, target.num_classes) + (
        tuple(target.image_shape[1:]) if spec.task == "segmentation" else ()
    )
    try:
        with torch.no_grad():
            net = model.eval().to(device)
            out = net(model_input(target.val.x[:2], net, channels_last=False))
    except Exception as exc:  # noqa: BLE001 - timm and smp refuse shapes in many ways
        raise PluginContractError(
            f"{rm.method.backbone} + {rm.method.head} fails on a sample batch of "
            f"{spec.image_size} px images: {str(exc).splitlines()[0][:200]}"
        ) from None
    if tuple(out.shape) != expected:
        raise PluginContractError(f"model output has shape {tuple(out.shape)}, expected {expected}")


def preflight(methods: list[ResolvedMethod], models: ModelFactory, domains: DomainCache) -> None:
    """Check every (pair, method); a failure is the study file's error, naming the method."""
    spec = models.spec
    for i in range(len(spec.pairs)):
        domains.pair_data(i)
        for j, rm in enumerate(methods):
            try:
                _sample_batch(models, rm, domains, i)
            except HarnessError as exc:
                raise spec_error(spec, f"methods[{j}]", exc) from None
            except TypeError as exc:
                raise spec_error(
                    spec, f"methods[{j}].head_options", f"head {rm.method.head!r}: {exc}"
                ) from None
