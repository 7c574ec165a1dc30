"""The losses of the domain generalization strategies in ``dg``, as plain functions of tensors (no
model, no plugin): per-domain grouping, pairwise alignment penalties, the IRMv1 penalty, moment
distances and MixStyle's feature-statistics mixing."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, autograd

from harness_plugins.uda_losses import mmd_loss


def by_domain(domain: Tensor, num_domains: int, *tensors: Tensor) -> list[tuple[int, ...]]:
    """Rows of each ``tensors`` grouped by ``domain`` (int64, one index per row): a list with one
    ``(d, rows of tensors[0], rows of tensors[1], ...)`` per domain present, in domain order.
    Domains absent from the batch are left out. One host sync (the group sizes)."""
    counts = torch.bincount(domain, minlength=num_domains).tolist()
    order = torch.argsort(domain, stable=True)
    parts = [t[order].split(counts) for t in tensors]
    return [(d, *(p[d] for p in parts)) for d, n in enumerate(counts) if n > 0]


def pairwise_mean(groups: Sequence[Tensor], distance: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The mean of ``distance`` over every unordered pair of ``groups``; zero (with a gradient
    path through the groups) when there are fewer than two."""
    pairs = list(itertools.combinations(groups, 2))
    if not pairs:
        return groups[0].float().sum() * 0.0 if groups else torch.zeros(())
    return torch.stack([distance(a, b) for a, b in pairs]).mean()


def mean_cov_distance(fa: Tensor, fb: Tensor) -> Tensor:
    """DomainBed's CORAL: the mean squared difference of the feature means plus that of the
    feature covariances (unbiased, over ``n - 1``) of two sets of features ``(n, d)``."""
    fa, fb = fa.float(), fb.float()

    def cov(f: Tensor) -> Tensor:
        c = f - f.mean(0, keepdim=True)
        return c.T @ c / max(1, f.shape[0] - 1)

    mean_diff = (fa.mean(0) - fb.mean(0)).pow(2).mean()
    return mean_diff + (cov(fa) - cov(fb)).pow(2).mean()


def gaussian_mmd(fa: Tensor, fb: Tensor) -> Tensor:
    """Squared MMD between two sets of features under a sum of Gaussian kernels at several
    bandwidths (``uda_losses.mmd_loss``: multiples of the pair's mean squared distance)."""
    return mmd_loss(fa, fb)


def irm_penalty(logits: Tensor, y: Tensor, loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """IRMv1 (Arjovsky et al., 2019) for one domain: the squared gradient of the risk with respect
    to a dummy classifier scale fixed at 1, estimated without bias as the product of the gradients
    on the even and the odd rows (DomainBed's estimator). Zero for fewer than two rows."""
    if logits.shape[0] < 2:
        return logits.float().sum() * 0.0
    scale = torch.ones((), device=logits.device, requires_grad=True)
    g1 = autograd.grad(loss(logits[0::2] * scale, y[0::2]), [scale], create_graph=True)[0]
    g2 = autograd.grad(loss(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
    return (g1 * g2).float()


def _smooth_norm(v: Tensor) -> Tensor:
    """Euclidean norm with a finite gradient at zero."""
    return (v.pow(2).sum() + 1e-12).sqrt()


def moment_distance(fa: Tensor, fb: Tensor, order: int = 2) -> Tensor:
    """M3SDA's moment distance between two sets of features ``(n, d)``: the Euclidean distance of
    the means plus, for k = 2..``order``, that of the element-wise k-th central moments."""
    fa, fb = fa.float(), fb.float()
    ma, mb = fa.mean(0), fb.mean(0)
    total = _smooth_norm(ma - mb)
    for k in range(2, order + 1):
        total = total + _smooth_norm((fa - ma).pow(k).mean(0) - (fb - mb).pow(k).mean(0))
    return total


def multi_source_moments(sources: Sequence[Tensor], target: Tensor, order: int = 2) -> Tensor:
    """M3SDA's moment matching: the mean moment distance of each source to the target plus the
    mean over every pair of sources (the second term is zero with one source)."""
    to_target = torch.stack([moment_distance(s, target, order) for s in sources]).mean()
    between = pairwise_mean(sources, lambda a, b: moment_distance(a, b, order))
    return to_target + between


def mix_partners(domain: Tensor) -> Tensor:
    """For each row, a random other row of a different domain; a random other row of any domain
    where there is none (one domain in the batch). No host sync."""
    n = domain.shape[0]
    if n < 2:
        return torch.zeros_like(domain)
    same = domain[:, None] == domain[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=domain.device)
    excluded = torch.where((~same).any(1, keepdim=True), same, eye)
    scores = torch.rand(n, n, device=domain.device).masked_fill(excluded, -1.0)
    return scores.argmax(1)


def mixstyle(x: Tensor, partner: Tensor, lam: Tensor, eps: float = 1e-6) -> Tensor:
    """MixStyle (Zhou et al., 2021): each feature map ``(B, C, H, W)`` normalized by its own
    channel statistics and re-styled with the ``lam``-weighted mix ``(B,)`` of its statistics and
    its partner's. The statistics carry no gradient, as in the paper. A 1x1 map has no spatial
    statistics (its mean is its content): it is returned as it is."""
    if x.shape[2] * x.shape[3] < 2:
        return x
    xf = x.float()
    mu = xf.mean((2, 3), keepdim=True).detach()
    sig = (xf.var((2, 3), keepdim=True, correction=0) + eps).sqrt().detach()
    lam = lam.view(-1, 1, 1, 1).to(xf.device)
    mu_mix = lam * mu + (1 - lam) * mu[partner]
    sig_mix = lam * sig + (1 - lam) * sig[partner]
    return (((xf - mu) / sig) * sig_mix + mu_mix).to(x.dtype)
