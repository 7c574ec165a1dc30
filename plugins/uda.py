"""Unsupervised domain adaptation: labelled source, unlabelled target images.

Every strategy here declares ``target_labels = "none"``: the engine hands it target images only.
Each adds a term to the source cross-entropy and searches its own weight (``strategy.*``).

- ``dann``: a domain discriminator behind a gradient-reversal layer (Ganin & Lempitsky, 2015).
- ``mcc``: minimum class confusion on target predictions (Jin et al., 2020).
- ``coral``, ``mmd``: align second-order statistics / kernel embeddings of the pooled features.
- ``adabn``: source training, then normalization statistics re-estimated on the target (Li et al., 2016).
- ``entropy-min``: minimize the entropy of target predictions (the idea behind ADVENT).
- ``self-training``: confidence-thresholded pseudo-labels on the target.
- ``fda``: source images restyled with the target's low-frequency amplitude (Yang & Soatto, 2020).

Every strategy but ``mcc`` serves segmentation too. There the output-level ones work per pixel,
and the feature-level ones (dann, coral, mmd) on the backbone's deepest feature map, one feature
vector per location (sampled, at most ``locations_per_image`` per image); see ``joint``. ``mcc``
stays classification-only: its class-correlation matrix is defined over a batch of image-level
predictions, and how to weigh the strongly correlated pixels of one image in it is a design
question this harness has not studied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness import hookimpl
from harness.api import IGNORE_INDEX, Batch, StepContext, Strategy
from harness.errors import PluginContractError

# ------------------------------------------------------------------------------ building blocks


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:  # noqa: D102
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return -ctx.coeff * grad, None


def reverse_grad(x: Tensor, coeff: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``-coeff`` on the way back."""
    return _ReverseGrad.apply(x, coeff)


def ramp(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule ``2 / (1 + exp(-gamma * progress)) - 1``: 0 at the start of training,
    rising smoothly towards 1, the faster the larger ``gamma`` (10 in Ganin et al., 2016)."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


#: adversarial weight schedules: ``ramp`` (DANN's) or ``constant`` (the full weight from step one)
SCHEDULES = ("ramp", "constant")


def adversarial_coefficient(params: dict[str, Any], progress: float) -> float:
    """The gradient-reversal coefficient at ``progress`` (0..1) of training: ``strategy.weight``
    times the schedule named by ``strategy.schedule`` (``ramp`` with ``strategy.gamma``)."""
    weight = float(params.get("strategy.weight", 1.0))
    schedule = params.get("strategy.schedule", "ramp")
    if schedule == "constant":
        return weight
    if schedule == "ramp":
        return weight * ramp(progress, float(params.get("strategy.gamma", 10.0)))
    raise ValueError(f"strategy.schedule must be one of {SCHEDULES}, got {schedule!r}")


def deepest_feature_map(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel logits ``(B, K, H, W)`` and the backbone's deepest feature map ``(B, C, h, w)``
    of a segmentation model, from one forward pass (the head's ``forward_with_features``)."""
    forward = getattr(model.head, "forward_with_features", None)
    if forward is None:
        raise PluginContractError(
            f"segmentation head {type(model.head).__name__} has no forward_with_features(x) -> "
            "(logits, deepest feature map): the feature-level strategies (dann, coral, mmd) need it"
        )
    return forward(x)


def sample_locations(fmap: Tensor, per_image: int) -> Tensor:
    """Feature vectors ``(B, k, C)`` at ``k = min(per_image, h * w)`` distinct random locations of
    each image's map ``(B, C, h, w)`` (all of them, in order, when there are no more than that)."""
    b, c, h, w = fmap.shape
    flat = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
    if h * w <= per_image:
        return flat
    idx = torch.rand(b, h * w, device=fmap.device).argsort(1)[:, :per_image]
    return torch.gather(flat, 1, idx[..., None].expand(-1, -1, c))


def entropy(logits: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) along ``dim``, per element of the other dims."""
    logp = F.log_softmax(logits.float(), dim=dim)
    return -(logp.exp() * logp).sum(dim)


def coral_loss(fs: Tensor, ft: Tensor) -> Tensor:
    """Squared Frobenius distance of the feature covariances, over 4 d^2 (Deep CORAL)."""
    fs, ft = fs.float(), ft.float()
    d = fs.shape[1]

    def cov(f: Tensor) -> Tensor:
        f = f - f.mean(0, keepdim=True)
        return f.T @ f / max(1, f.shape[0] - 1)

    return (cov(fs) - cov(ft)).pow(2).sum() / (4 * d * d)


def mmd_loss(
    fs: Tensor, ft: Tensor, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
) -> Tensor:
    """Biased squared MMD with a sum of Gaussian kernels whose bandwidths are multiples of the
    mean pairwise squared distance (measured on the batch, not differentiated)."""
    f = torch.cat([fs, ft]).float()
    d2 = torch.cdist(f, f).pow(2)
    base = d2.detach().sum() / max(1, f.shape[0] * (f.shape[0] - 1))
    k = sum(torch.exp(-d2 / (base * s + 1e-8)) for s in scales)
    n = fs.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def class_confusion_loss(logits: Tensor, temperature: float) -> Tensor:
    """Minimum class confusion: off-diagonal mass of the entropy-weighted class correlation of
    target predictions, normalized per class."""
    p = F.softmax(logits.float() / temperature, dim=1)
    h = -(p * torch.log(p + 1e-8)).sum(1).detach()
    w = 1.0 + torch.exp(-h)
    w = w * p.shape[0] / w.sum()
    corr = (p * w[:, None]).T @ p
    corr = corr / corr.sum(1, keepdim=True).clamp_min(1e-8)
    c = p.shape[1]
    return (corr.sum() - corr.trace()) / c


def low_frequency_swap(source: Tensor, target: Tensor, beta: float) -> Tensor:
    """Fourier domain adaptation: give ``source`` images (B, C, H, W) the amplitude spectrum of
    ``target`` images in the centred square of half-width ``floor(beta * min(H, W))`` around the
    zero frequency, keeping the source phase everywhere."""
    h, w = source.shape[-2:]
    half = int(math.floor(beta * min(h, w)))
    fs = torch.fft.fftshift(torch.fft.fft2(source.float()), dim=(-2, -1))
    if half < 1:
        return source.float().clone()
    ft = torch.fft.fftshift(torch.fft.fft2(target.float()), dim=(-2, -1))
    amp, phase = fs.abs(), fs.angle()
    cy, cx = h // 2, w // 2
    window = (
        slice(None),
        slice(None),
        slice(cy - half, cy + half + 1),
        slice(cx - half, cx + half + 1),
    )
    amp = amp.clone()
    amp[window] = ft.abs()[window]
    mixed = torch.fft.ifftshift(torch.polar(amp, phase), dim=(-2, -1))
    return torch.fft.ifft2(mixed).real


def _source_ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)


# ------------------------------------------------------------------------------ strategies


class _Unsupervised(Strategy):
    uses_source = True
    uses_target = True
    target_labels = "none"
    #: segmentation: feature vectors per image that ``joint`` samples from the deepest map
    locations_per_image = 64

    def joint(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One forward pass over the source and target batches together: (source logits,
        target logits, source features, target features).

        Classification: pooled features, one row per image. Segmentation: per-pixel logits, and
        one row per sampled location of the backbone's deepest feature map (source rows first).
        The deepest map rather than the decoder's output: it is what every decoder reads, the
        representation the classification variants pool, and small (stride 32: 4 locations at
        64 px, 64 at 256 px), so all or many of its locations fit in a batch. Aligning the
        decoder's output instead is output-space adaptation (Tsai et al., 2018), which aligns
        class probabilities rather than features and would need a different discriminator."""
        (xs, _), (xt, _) = batch.source, batch.target
        n = xs.shape[0]
        if getattr(model, "task", "classification") == "segmentation":
            logits, fmap = deepest_feature_map(model, torch.cat([xs, xt]))
            rows = sample_locations(fmap, self.locations_per_image)
            return logits[:n], logits[n:], rows[:n].flatten(0, 1), rows[n:].flatten(0, 1)
        f = model.features(torch.cat([xs, xt]))
        logits = model.head(f)
        return logits[:n], logits[n:], f[:n], f[n:]


class _Discriminator(nn.Module):
    def __init__(self, in_features: int, hidden: int, lr_scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, 1),
        )
        #: read by the engine: the discriminator's learning rate is the head's times this
        self.lr_scale = lr_scale

    def forward(self, f: Tensor) -> Tensor:
        return self.net(f.float()).squeeze(1)


class DANN(_Unsupervised):
    """Domain-adversarial training: a discriminator tells source from target features; the
    backbone receives its gradient reversed, scaled by ``adversarial_coefficient``: the weight
    times DANN's ramp or a constant schedule, fixed or searched (``schedule``).

    Segmentation: the same discriminator classifies every (sampled) location of the backbone's
    deepest feature map, a per-location domain discriminator (see ``joint`` for why there)."""

    description = "domain-adversarial training (gradient reversal, domain discriminator)"

    def __init__(self, schedule: str = "ramp", gamma: float = 10.0) -> None:
        """``schedule``: ``"ramp"`` (DANN's, with ``gamma``; the default), ``"constant"``, or
        ``"search"``: the schedule searched too, and for the ramp its ``gamma`` (2 to 30, log
        scale). Searching it is a choice of the study (``strategy_options = {schedule =
        "search"}``): it adds two parameters to every DANN search."""
        if schedule not in (*SCHEDULES, "search"):
            raise ValueError(
                f"schedule must be one of {', '.join(map(repr, (*SCHEDULES, 'search')))}, got {schedule!r}"
            )
        if not (isinstance(gamma, int | float) and gamma > 0):
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
        self.schedule, self.gamma = schedule, float(gamma)

    def search_space(self, trial) -> dict[str, Any]:
        space = {
            # log scale around the usual 1; the selected digits-uda trial used 0.14, and its trials
            # at 2-3.3 scored lower on target validation (results/digits-uda/trials.csv)
            "strategy.weight": trial.suggest_float("strategy.weight", 0.1, 5.0, log=True),
            "strategy.disc_hidden": trial.suggest_categorical(
                "strategy.disc_hidden", [64, 256, 1024]
            ),
            "strategy.disc_lr_scale": trial.suggest_float(
                "strategy.disc_lr_scale", 0.2, 5.0, log=True
            ),
        }
        if self.schedule != "search":  # fixed: recorded with the trial, not searched
            space["strategy.schedule"] = self.schedule
            if self.schedule == "ramp":
                space["strategy.gamma"] = self.gamma
            return space
        space["strategy.schedule"] = trial.suggest_categorical("strategy.schedule", list(SCHEDULES))
        if space["strategy.schedule"] == "ramp":  # gamma means nothing to a constant weight
            space["strategy.gamma"] = trial.suggest_float("strategy.gamma", 2.0, 30.0, log=True)
        return space

    def setup(self, model, num_classes, params):
        if getattr(model, "task", "classification") == "segmentation":
            channels = getattr(model.head, "deepest_channels", None)
            if channels is None:
                raise PluginContractError(
                    f"segmentation head {type(model.head).__name__} has no deepest_channels: dann "
                    "needs the channel count of the deepest feature map it discriminates"
                )
        else:
            channels = model.spec.num_features
        return _Discriminator(
            int(channels),
            int(params.get("strategy.disc_hidden", 256)),
            float(params.get("strategy.disc_lr_scale", 1.0)),
        )

    def training_step(self, model, batch: Batch, ctx: StepContext):
        ls, _, fs, ft = self.joint(model, batch)
        f = reverse_grad(torch.cat([fs, ft]), adversarial_coefficient(ctx.params, ctx.progress))
        domain = torch.cat([torch.ones(fs.shape[0]), torch.zeros(ft.shape[0])]).to(f.device)
        adv = F.binary_cross_entropy_with_logits(ctx.extra(f), domain)
        return _source_ce(ls, batch.source[1]) + adv


class MCC(_Unsupervised):
    """Minimum class confusion on target predictions."""

    tasks = ("classification",)
    description = "minimum class confusion on target predictions"

    def search_space(self, trial) -> dict[str, Any]:
        return {
            "strategy.weight": trial.suggest_float("strategy.weight", 0.1, 10.0, log=True),
            "strategy.temperature": trial.suggest_float("strategy.temperature", 1.0, 4.0),
        }

    def training_step(self, model, batch: Batch, ctx: StepContext):
        ls, lt, _, _ = self.joint(model, batch)
        mcc = class_confusion_loss(lt, float(ctx.params.get("strategy.temperature", 2.5)))
        return _source_ce(ls, batch.source[1]) + float(ctx.params.get("strategy.weight", 1.0)) * mcc


class CORAL(_Unsupervised):
    """Deep CORAL: align the covariance of source and target features (segmentation: of the
    sampled locations of the deepest feature map)."""

    description = "align source and target feature covariances (Deep CORAL)"

    def search_space(self, trial) -> dict[str, Any]:
        return {"strategy.weight": trial.suggest_float("strategy.weight", 0.1, 100.0, log=True)}

    def training_step(self, model, batch: Batch, ctx: StepContext):
        ls, _, fs, ft = self.joint(model, batch)
        return _source_ce(ls, batch.source[1]) + float(
            ctx.params.get("strategy.weight", 1.0)
        ) * coral_loss(fs, ft)


class MMD(_Unsupervised):
    """Align source and target features under a multi-bandwidth Gaussian-kernel MMD
    (segmentation: the sampled locations of the deepest feature map)."""

    description = "align source and target features by kernel MMD"

    def search_space(self, trial) -> dict[str, Any]:
        return {"strategy.weight": trial.suggest_float("strategy.weight", 0.05, 5.0, log=True)}

    def training_step(self, model, batch: Batch, ctx: StepContext):
        ls, _, fs, ft = self.joint(model, batch)
        return _source_ce(ls, batch.source[1]) + float(
            ctx.params.get("strategy.weight", 1.0)
        ) * mmd_loss(fs, ft)


class AdaBN(Strategy):
    """Train on the source; before every evaluation, replace the normalization statistics of
    every BatchNorm layer by those of the target training images. Parameters are untouched."""

    uses_source = True
    uses_target = True
    target_labels = "none"
    description = "source training, BatchNorm statistics re-estimated on the target"
    cache_features = False  # adapt() changes the backbone's statistics

    def training_step(self, model, batch: Batch, ctx: StepContext):
        x, y = batch.source
        return _source_ce(model(x), y)

    def adapt(self, model: nn.Module, target_images: Iterable[Tensor]) -> None:
        norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        if not norms:
            return
        modes = {m: m.training for m in model.modules()}
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the target batches
            m.train()
        try:
            for x in target_images:
                if x.shape[0] > 1:
                    model(x)
        finally:
            for m, mode in modes.items():
                m.training = mode
            for m, momentum in momenta.items():
                m.momentum = momentum


class EntropyMin(_Unsupervised):
    """Source cross-entropy plus the mean entropy of target predictions (per pixel for
    segmentation: ADVENT's direct entropy minimization)."""

    description = "minimize the entropy of target predictions (ADVENT's idea)"

    def search_space(self, trial) -> dict[str, Any]:
        return {"strategy.weight": trial.suggest_float("strategy.weight", 0.005, 1.0, log=True)}

    def training_step(self, model, batch: Batch, ctx: StepContext):
        (xs, ys), (xt, _) = batch.source, batch.target
        logits = model(torch.cat([xs, xt]))
        ls, lt = logits[: xs.shape[0]], logits[xs.shape[0] :]
        return (
            _source_ce(ls, ys) + float(ctx.params.get("strategy.weight", 0.1)) * entropy(lt).mean()
        )


class SelfTraining(_Unsupervised):
    """Source cross-entropy plus cross-entropy on target predictions whose confidence reaches
    ``threshold``, after a warm-up fraction of training (per pixel for segmentation)."""

    description = "confidence-thresholded pseudo-labels on the target"

    def search_space(self, trial) -> dict[str, Any]:
        return {
            "strategy.weight": trial.suggest_float("strategy.weight", 0.1, 3.0, log=True),
            "strategy.threshold": trial.suggest_float("strategy.threshold", 0.7, 0.99),
            "strategy.warmup": trial.suggest_float("strategy.warmup", 0.0, 0.5),
        }

    def training_step(self, model, batch: Batch, ctx: StepContext):
        (xs, ys), (xt, _) = batch.source, batch.target
        logits = model(torch.cat([xs, xt]))
        ls, lt = logits[: xs.shape[0]], logits[xs.shape[0] :]
        loss = _source_ce(ls, ys)
        if ctx.progress < float(ctx.params.get("strategy.warmup", 0.2)):
            return loss
        pseudo = pseudo_labels(lt.detach(), float(ctx.params.get("strategy.threshold", 0.9)))
        # mean over the confident predictions; zero when there is none (no host sync to check)
        kept = (pseudo != IGNORE_INDEX).sum().clamp_min(1)
        pseudo_ce = F.cross_entropy(lt, pseudo, ignore_index=IGNORE_INDEX, reduction="sum") / kept
        return loss + float(ctx.params.get("strategy.weight", 1.0)) * pseudo_ce


def pseudo_labels(logits: Tensor, threshold: float) -> Tensor:
    """Argmax labels where the softmax confidence reaches ``threshold``, else ``IGNORE_INDEX``."""
    conf, label = F.softmax(logits.float(), dim=1).max(1)
    return torch.where(conf >= threshold, label, torch.full_like(label, IGNORE_INDEX))


class FDA(_Unsupervised):
    """Train on source images restyled with target low-frequency amplitudes (labels unchanged),
    plus an entropy term on the target."""

    description = "Fourier domain adaptation: source images in target 'style' + target entropy"

    def search_space(self, trial) -> dict[str, Any]:
        return {
            "strategy.beta": trial.suggest_float("strategy.beta", 0.01, 0.15),
            "strategy.entropy_weight": trial.suggest_float(
                "strategy.entropy_weight", 1e-3, 0.3, log=True
            ),
        }

    def training_step(self, model, batch: Batch, ctx: StepContext):
        (xs, ys), (xt, _) = batch.source, batch.target
        mean, std = model.mean.to(xs.dtype), model.std.to(xs.dtype)
        # swap in pixel space ([0, 1]), then normalize again
        n = min(xs.shape[0], xt.shape[0])
        order = torch.arange(xs.shape[0], device=xs.device) % n
        styled = low_frequency_swap(
            xs * std + mean, (xt[order] * std + mean), float(ctx.params.get("strategy.beta", 0.05))
        )
        styled = (
            ((styled.clamp(0, 1) - mean) / std)
            .to(xs.dtype)
            .contiguous(memory_format=_memory_format(xs))
        )
        logits = model(torch.cat([styled, xt]))
        ls, lt = logits[: xs.shape[0]], logits[xs.shape[0] :]
        return (
            _source_ce(ls, ys)
            + float(ctx.params.get("strategy.entropy_weight", 0.01)) * entropy(lt).mean()
        )


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


STRATEGIES = {
    "dann": DANN,
    "mcc": MCC,
    "coral": CORAL,
    "mmd": MMD,
    "adabn": AdaBN,
    "entropy-min": EntropyMin,
    "self-training": SelfTraining,
    "fda": FDA,
}


@hookimpl
def register_strategies(register):
    for name, cls in STRATEGIES.items():
        register(name, cls, description=cls.description, tasks=cls.tasks)
