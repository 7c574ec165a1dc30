"""Domain generalization: several labelled source domains, a target never seen in training; and one
multi-source adaptation method that treats the sources separately.

The domain generalization strategies declare ``target_images = "none"``: the engine hands them
source batches only, with ``batch.source_domain`` (the index of each image's source domain; ``None``
for a single source, read as one domain, where every penalty below is zero and the strategy trains
as ``erm``). Their searched parameters and ranges follow DomainBed's ``hparams_registry`` where it
has the method (Gulrajani & Lopez-Paz, 2021).

- ``erm``: pooled sources, the supervised loss only (DomainBed's baseline).
- ``coral-dg``, ``mmd-dg``: align the features of every pair of source domains (mean and
  covariance; Gaussian-kernel MMD).
- ``groupdro``: minimize a weighted risk whose domain weights rise, by exponentiated gradient,
  on the domains with the highest loss (Sagawa et al., 2020).
- ``vrex``: mean plus a weighted variance of the per-domain risks (Krueger et al., 2021).
- ``irm``: the IRMv1 penalty (Arjovsky et al., 2019).
- ``mixstyle``: feature statistics mixed across domains in the early backbone stages (Zhou et al.,
  2021).
- ``swa``: ``erm`` with the weights averaged over the second half of training.
- ``dann-dg``: ``dann``'s discriminator predicting the source domain.
- ``m3sda``: multi-source adaptation (target images, no target labels) by moment matching between
  every pair of the sources and the target (Peng et al., 2019).

The penalties with annealing (``vrex``, ``irm``) switch from weight 1 to the searched weight at a
searched fraction of training. DomainBed also resets Adam at that step, because the jump in the
gradients' scale meets running moments estimated before it; the strategy does not own the
trial's optimizer, so here it is not reset (the first updates after the switch are bounded by
AdamW's normalization, a few times the learning rate).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness import hookimpl
from harness.api import (
    TASKS,
    Batch,
    PluginContractError,
    StepContext,
    Strategy,
    reverse_gradient,
)
from harness_plugins.dg_losses import (
    by_domain,
    gaussian_mmd,
    irm_penalty,
    mean_cov_distance,
    mix_partners,
    mixstyle,
    multi_source_moments,
    pairwise_mean,
)
from harness_plugins.uda import DANN, OPTIONS, _Discriminator, _Unsupervised
from harness_plugins.uda_losses import adversarial_coefficient


def source_domains(batch: Batch, ctx: StepContext) -> tuple[Tensor, int]:
    """The source domain of each image of the batch (all zeros for a pair with one source) and
    the number of source domains of the pair."""
    x = batch.source[0]
    n = max(1, int(ctx.num_source_domains))
    if batch.source_domain is None:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device), n
    return batch.source_domain.to(device=x.device, dtype=torch.long), n


def domain_risks(ctx: StepContext, logits: Tensor, y: Tensor, domain: Tensor, n: int):
    """``(domains present, their supervised risks stacked)`` over one forward pass's logits."""
    groups = by_domain(domain, n, logits, y)
    risks = torch.stack([ctx.supervised_loss(lg, yg).float() for _, lg, yg in groups])
    return [d for d, _, _ in groups], risks


def annealed(ctx: StepContext, weight: str, anneal: str) -> float:
    """Penalty weight 1 until the fraction ``ctx.params[anneal]`` of training, then the searched
    weight (DomainBed's annealing of IRM and V-REx)."""
    if ctx.progress < float(ctx.params.get(anneal, 0.1)):
        return 1.0
    return float(ctx.params.get(weight, 1.0))


# ------------------------------------------------------------------------------ strategies


class ERM(Strategy):
    """Empirical risk minimization over the pooled source domains (DomainBed's baseline)."""

    uses_source = True
    uses_target = False
    target_labels = "none"
    target_images = "none"
    mixed_labels = True
    description = "pooled source domains, supervised loss only (domain generalization baseline)"

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        return ctx.supervised_loss(model(x), y)


class _DomainPenalty(ERM):
    """ERM over one forward pass plus ``strategy.weight`` times a penalty between source domains,
    searched on a log scale over ``weight_range``. Hard labels only (mixing images blurs their
    domains)."""

    mixed_labels = False
    weight_range: tuple[float, float] = (0.1, 10.0)  # DomainBed's mmd_gamma: 10 ** U(-1, 1)

    def search_space(self, trial) -> dict[str, Any]:
        low, high = self.weight_range
        return {"strategy.weight": trial.suggest_float("strategy.weight", low, high, log=True)}


class _FeaturePairs(_DomainPenalty):
    """ERM plus the mean of ``distance`` over every pair of source domains' pooled features."""

    @staticmethod
    def distance(fa: Tensor, fb: Tensor) -> Tensor:
        raise NotImplementedError

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        domain, n = source_domains(batch, ctx)
        f = model.features(x)
        groups = [g for _, g in by_domain(domain, n, f)]
        penalty = pairwise_mean(groups, self.distance)
        ctx.log("domain_penalty", penalty)
        weight = float(ctx.params.get("strategy.weight", 1.0))
        return ctx.supervised_loss(model.head(f), y) + weight * penalty


class CoralDG(_FeaturePairs):
    """CORAL between source domains: squared differences of feature means and covariances."""

    description = "align feature means and covariances between every pair of source domains"
    distance = staticmethod(mean_cov_distance)


class MMDDG(_FeaturePairs):
    """MMD between source domains under Gaussian kernels at several bandwidths."""

    description = "align every pair of source domains' features by Gaussian-kernel MMD"
    distance = staticmethod(gaussian_mmd)


class _GroupWeights(nn.Module):
    """GroupDRO's domain weights ``q`` (a buffer, kept across the steps of a trial)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("q", torch.ones(0))

    def weights(self, n: int, device: torch.device) -> Tensor:
        if self.q.numel() != n:  # sized at the first step, when the domain count is known
            self.q = torch.full((n,), 1.0 / n, device=device)
        return self.q


class GroupDRO(_DomainPenalty):
    """Group distributionally robust optimization: the risk weighted by ``q``, with
    ``q_d <- q_d * exp(eta * risk_d)`` renormalized every step (Sagawa et al., 2020, Alg. 1)."""

    description = "minimize the worst source domain's risk (exponentiated-gradient domain weights)"

    def search_space(self, trial) -> dict[str, Any]:
        # DomainBed: groupdro_eta 10 ** U(-3, -1)
        return {"strategy.eta": trial.suggest_float("strategy.eta", 1e-3, 1e-1, log=True)}

    def setup(self, model, num_classes, params, feature_dim):
        return _GroupWeights()

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        domain, n = source_domains(batch, ctx)
        present, risks = domain_risks(ctx, model(x), y, domain, n)
        q = ctx.extra.weights(max(n, max(present) + 1), risks.device)
        idx = torch.tensor(present, device=q.device)
        with torch.no_grad():
            eta = float(ctx.params.get("strategy.eta", 0.01))
            q[idx] *= torch.exp(eta * risks.detach())
            q /= q.sum()
        ctx.log("max_domain_weight", q.max())
        return (q[idx] * risks).sum()


class VREx(_DomainPenalty):
    """Risk extrapolation: the mean of the per-domain risks plus a weight times their variance;
    the weight is 1 until the annealing fraction of training, then ``strategy.weight``."""

    description = "mean + weighted variance of the source domains' risks (V-REx)"

    def search_space(self, trial) -> dict[str, Any]:
        # DomainBed: vrex_lambda 10 ** U(-1, 5); vrex_penalty_anneal_iters 10 ** U(0, 4) of 5,000
        # steps, here a fraction of training
        return {
            "strategy.weight": trial.suggest_float("strategy.weight", 1e-1, 1e5, log=True),
            "strategy.anneal": trial.suggest_float("strategy.anneal", 1e-3, 1.0, log=True),
        }

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        domain, n = source_domains(batch, ctx)
        _, risks = domain_risks(ctx, model(x), y, domain, n)
        mean = risks.mean()
        penalty = (risks - mean).pow(2).mean()
        ctx.log("domain_penalty", penalty)
        return mean + annealed(ctx, "strategy.weight", "strategy.anneal") * penalty


class IRM(VREx):
    """Invariant risk minimization (IRMv1): the mean per-domain risk plus a weight times the mean
    per-domain IRM penalty; the weight is annealed and searched as in ``vrex`` (DomainBed's
    irm_lambda and irm_penalty_anneal_iters have vrex's ranges)."""

    description = "invariant risk minimization (IRMv1 penalty, annealed)"

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        domain, n = source_domains(batch, ctx)
        groups = by_domain(domain, n, model(x), y)
        risks = torch.stack([ctx.supervised_loss(lg, yg).float() for _, lg, yg in groups])
        penalty = torch.stack(
            [irm_penalty(lg, yg, ctx.supervised_loss) for _, lg, yg in groups]
        ).mean()
        ctx.log("domain_penalty", penalty)
        return risks.mean() + annealed(ctx, "strategy.weight", "strategy.anneal") * penalty


def stage_modules(model, count: int = 3) -> list[tuple[str, nn.Module]]:
    """The backbone modules of up to ``count`` stages after the stem, never the last stage (whose
    output is pooled into the features): for each, the widest module that holds its stage's
    parameters and no other."""
    modules = dict(model.backbone.named_modules())
    found = []
    for names in model.spec.stages[1:-1][:count]:
        parts = [n.split(".") for n in names]
        prefix = []
        for level in zip(*parts, strict=False):
            if len(set(level)) > 1:
                break
            prefix.append(level[0])
        while prefix and ".".join(prefix) not in modules:
            prefix.pop()
        # a one-block stage: its block's parent (the stage) holds the same parameters
        while len(prefix) > 1 and _holds_only(modules[".".join(prefix[:-1])], prefix[:-1], names):
            prefix.pop()
        if prefix and _holds_only(modules[".".join(prefix)], prefix, names):
            found.append((".".join(prefix), modules[".".join(prefix)]))
    return found


def _holds_only(module: nn.Module, prefix: list[str], names: list[str]) -> bool:
    """Whether every parameter of ``module`` (at ``prefix`` in the backbone) is in ``names``."""
    own = {".".join([*prefix, n]) for n, _ in module.named_parameters()}
    return own <= set(names)


class _Mixer:
    """The forward hook MixStyle puts on stage modules for the forward pass of a training step,
    with ``domain`` (each image's source domain) set for it."""

    def __init__(self, p: float, alpha: float, backbone: str) -> None:
        self.p, self.alpha, self.backbone = p, alpha, backbone
        self.domain: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        if self.domain is None:
            return None
        if not isinstance(output, Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise PluginContractError(
                f"mixstyle mixes (B, C, H, W) feature maps; backbone {self.backbone!r} gives "
                f"{shape} after an early stage: use a convolutional backbone"
            )
        if float(torch.rand(())) >= self.p:  # applied with probability p, per stage and step
            return None
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((output.shape[0],))
        return mixstyle(output, mix_partners(self.domain), lam)


class MixStyle(ERM):
    """MixStyle (Zhou et al., 2021): after each of the first three stages past the stem, with
    probability ``p``, every image's channel means and deviations are replaced by a Beta(alpha,
    alpha) mix of its own and those of a random image of another source domain. Forward hooks
    do it, registered around the forward pass of each training step and removed after it:
    scoring and adaptation see the plain backbone, and so does the next trial, whose backbone
    is the same module reset in place (``harness.training.reset`` refuses one left with hooks)."""

    mixed_labels = False
    cache_features = False  # the backbone must run: the hooks change its feature maps
    description = "mix feature statistics across source domains in early stages (MixStyle)"
    _mixer: _Mixer | None = None
    _stages: list[nn.Module] = []

    def search_space(self, trial) -> dict[str, Any]:
        # not in DomainBed; around the paper's p = 0.5, alpha = 0.1
        return {
            "strategy.p": trial.suggest_float("strategy.p", 0.1, 0.9),
            "strategy.alpha": trial.suggest_float("strategy.alpha", 0.05, 1.0, log=True),
        }

    def setup(self, model, num_classes, params, feature_dim):
        stages = stage_modules(model)
        if not stages:
            raise PluginContractError(
                f"mixstyle found no backbone stage between the stem and the last stage of "
                f"{model.spec.name!r} to mix feature statistics after"
            )
        mixer = _Mixer(
            float(params.get("strategy.p", 0.5)),
            float(params.get("strategy.alpha", 0.1)),
            model.spec.name,
        )
        self._mixer, self._stages = mixer, [m for _, m in stages]
        return None

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        domain, _ = source_domains(batch, ctx)
        if not model.training:
            return ctx.supervised_loss(model(x), y)
        self._mixer.domain = domain
        handles = [m.register_forward_hook(self._mixer) for m in self._stages]
        try:
            logits = model(x)
        finally:
            for handle in handles:
                handle.remove()
            self._mixer.domain = None
        return ctx.supervised_loss(logits, y)


class SWA(ERM):
    """ERM whose weights the engine averages uniformly over the second half of the epochs and
    evaluates averaged (Izmailov et al., 2018). SWA rather than SWAD: SWAD picks its averaging
    window from the validation loss's valley, step by step; the engine scores once per epoch."""

    weight_average = "swa"
    description = (
        "ERM with weights averaged over the second half of training (SWA; SWAD's loss-valley "
        "window needs per-step validation loss, the engine scores per epoch)"
    )


class DANNDG(DANN):
    """Domain-adversarial DG: ``dann``'s discriminator, behind the same gradient reversal and
    schedule, classifies each source image's domain; no target image is used."""

    uses_target = False
    target_images = "none"
    description = "domain-adversarial training across source domains (DANN's discriminator)"

    def setup(self, model, num_classes, params, feature_dim):
        if feature_dim is None:
            raise PluginContractError("dann-dg needs pooled features (a classification model)")
        return _Discriminator(
            feature_dim,
            int(params.get("strategy.disc_hidden", 256)),
            float(params.get("strategy.disc_lr_scale", 1.0)),
            outputs=max(2, self.num_source_domains),  # one logit would be read as a binary one
        )

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        domain, n = source_domains(batch, ctx)
        f = model.features(x)
        if n < 2:  # one domain: nothing to tell apart, ERM
            return ctx.supervised_loss(model.head(f), y)
        coeff = adversarial_coefficient(ctx.params, ctx.progress)
        domain_logits = ctx.extra(reverse_gradient(f, coeff))
        adv = F.cross_entropy(domain_logits, domain)
        return ctx.supervised_loss(model.head(f), y) + adv


class M3SDA(_Unsupervised):
    """Moment matching for multi-source adaptation (M3SDA's alignment; its per-source classifiers
    are left out): the source loss plus a weight times the moment distance (means and element-wise
    variances) between each source domain and the target and between every pair of sources."""

    description = (
        "multi-source adaptation: match feature moments across every source and the target"
    )

    def search_space(self, trial) -> dict[str, Any]:
        # not in DomainBed; the weight spans the range of its feature-alignment weights, lower
        return {"strategy.weight": trial.suggest_float("strategy.weight", 1e-2, 10.0, log=True)}

    def training_step(self, model, batch: Batch, ctx: StepContext):
        ls, _, fs, ft = self.joint(model, batch)
        domain, n = source_domains(batch, ctx)
        sources = [g for _, g in by_domain(domain, n, fs)]
        penalty = multi_source_moments(sources, ft)
        ctx.log("moment_distance", penalty)
        weight = float(ctx.params.get("strategy.weight", 1.0))
        return ctx.supervised_loss(ls, batch.source[1]) + weight * penalty


STRATEGIES = {
    "erm": ERM,
    "coral-dg": CoralDG,
    "mmd-dg": MMDDG,
    "groupdro": GroupDRO,
    "vrex": VREx,
    "irm": IRM,
    "mixstyle": MixStyle,
    "swa": SWA,
    "dann-dg": DANNDG,
    "m3sda": M3SDA,
}

#: supervised losses only: these serve segmentation (per pixel) as well
BOTH_TASKS = ("erm", "swa")


@hookimpl
def register_strategies(register):
    for name, cls in STRATEGIES.items():
        tasks = TASKS if name in BOTH_TASKS else ("classification",)
        options = OPTIONS["dann"] if name == "dann-dg" else {}
        register(name, cls, description=cls.description, tasks=tasks, options=options)
