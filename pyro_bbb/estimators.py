"""How weights are drawn in a training step: the lean Bayes by Backprop estimator.

For a pyro_bbb model with a :class:`~pyro_bbb.BBBGuide`, :class:`WeightSamplingLoss`
computes exactly the objective of :class:`~pyro_bbb.train.BBBLoss` (Pyro's
``Trace_ELBO`` / ``TraceMeanField_ELBO`` on the same model and guide) without
Pyro's tracing: per parameter tensor one draw ``w = mu + softplus(rho) * eps``,
and

    log q(w) = sum(-log sigma - eps^2 / 2) - n log(2 pi) / 2

read from ``eps`` directly (w - mu = sigma * eps exactly), which has the same
value and the same total derivative in (mu, rho) as ``Normal(mu, sigma).log_prob(w)``.
The closed-form KL replaces log q - log p where ``kl="analytic"`` and the prior
is Gaussian.  The data plate's N/B scaling and the KL weight are applied as in
``BBBLoss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal, kl_divergence

from . import _checks
from .guide import log_softplus

__all__ = ["WeightSamplingLoss", "supports_lean_step"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def supports_lean_step(model, guide) -> bool:
    """Whether (model, guide) is a pyro_bbb model with a BBBGuide (the lean path applies)."""
    from .guide import BBBGuide
    from .nn import _BayesianModel

    return isinstance(model, _BayesianModel) and type(guide) is BBBGuide


def _gaussian_prior(prior):
    """(loc, scale) of an elementwise Gaussian prior, else None."""
    base = prior.base_dist if isinstance(prior, Independent) else prior
    if not isinstance(base, Normal):
        return None
    return _scalar_if_broadcast(base.loc), _scalar_if_broadcast(base.scale)


def _scalar_if_broadcast(t: Tensor):
    """A scalar prior expanded to a weight's shape is read as a Python float: the sums
    below then cost no pass over an expanded tensor per step."""
    if all(stride == 0 for stride in t.stride()):
        return float(t[(0,) * t.dim()])
    return t


# Sums over a weight tensor w of the Gaussian prior's terms; m, s floats or tensors.
def _sum_log(s, w):
    return math.log(s) * w.numel() if isinstance(s, float) else torch.log(s).expand_as(w).sum()


def _half_sq_sum(w, m, s) -> Tensor:
    """sum((w - m)^2 / (2 s^2))."""
    d = w if isinstance(m, float) and m == 0.0 else w - m
    if isinstance(s, float):
        return d.square().sum() / (2 * s * s)
    return (d / s).square().sum() / 2


class WeightSamplingLoss(nn.Module):
    """Negative ELBO of Bayes by Backprop for pyro_bbb models, without Pyro traces.

    Same call signature and ``last_terms`` as :class:`~pyro_bbb.train.BBBLoss`:
    ``loss(x, y, num_data=N, kl_scale=s)``.  The guide must be set up (called
    once) before this module is built.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> model = bbb.BayesianRegressor(torch.nn.Linear(2, 1), prior=dist.Normal(0.0, 1.0))
    >>> guide = bbb.BBBGuide(model)
    >>> x, y = torch.randn(8, 2), torch.randn(8)
    >>> _ = guide(x, y)
    >>> WeightSamplingLoss(model, guide, num_particles=4, kl="analytic")(x, y).shape
    torch.Size([])
    """

    def __init__(self, model, guide, num_particles: int = 1, kl: str = "mc"):
        super().__init__()
        if not supports_lean_step(model, guide):
            raise ValueError("WeightSamplingLoss needs a pyro_bbb model and a BBBGuide")
        if guide.prototype_trace is None:
            raise ValueError("the guide is not set up yet: call it once on a batch first")
        self.model = model
        self.guide = guide
        self.num_particles = _checks.positive_int("num_particles", num_particles)
        self.kl = _checks.choice("kl", kl, ("mc", "analytic"))
        self.last_terms: dict[str, Tensor] = {}

    def _sites(self):
        """Per weight site: (name, loc, rho, prior, Gaussian (loc, scale) or None), cached
        until the guide's parameters change (e.g. moved to another device)."""
        key = tuple(id(p) for p in self.guide.parameters())
        if getattr(self, "_cache_key", None) != key:
            priors = self.model.network.priors()
            self._cache = [
                (n, self.guide.loc.get_parameter(n), self.guide.rho.get_parameter(n), p, _gaussian_prior(p))
                for n, p in priors.items()
            ]
            self._cache_key = key
        return self._cache

    def forward(self, x: Tensor, y: Tensor, num_data: int | None = None, kl_scale: float = 1.0) -> Tensor:
        p = self.num_particles
        lead = (p,) if p > 1 else ()
        latents, kl = {}, 0.0
        for name, loc, rho, prior, gaussian in self._sites():
            eps = torch.randn(lead + loc.shape, dtype=loc.dtype, device=loc.device)
            sigma = F.softplus(rho)
            w = torch.addcmul(loc, sigma, eps)
            latents[name] = w
            sum_log_sigma = log_softplus(rho, sigma).sum()
            if gaussian is not None:
                m, s = gaussian
                if self.kl == "analytic":  # sum of KL(N(mu, sigma) || N(m, s)), as reductions
                    kl = kl + p * (
                        _sum_log(s, loc) - 0.5 * loc.numel() - sum_log_sigma
                        + _half_sq_sum(sigma, 0.0, s) + _half_sq_sum(loc, m, s)
                    )
                    continue
                log_p = -_sum_log(s, w) - _HALF_LOG_2PI * w.numel() - _half_sq_sum(w, m, s)
            else:
                log_p = prior.log_prob(w).sum()
            log_q = -p * sum_log_sigma - 0.5 * eps.square().sum() - _HALF_LOG_2PI * eps.numel()
            kl = kl + log_q - log_p
        for name, prior in self.model.extra_priors().items():  # e.g. a learned noise: few numbers
            q = self.guide.get_posterior(name)
            value = q.rsample(lead)
            latents[name] = value
            try:
                site_kl = p * kl_divergence(q, prior).sum() if self.kl == "analytic" else None
            except NotImplementedError:
                site_kl = None
            kl = kl + (site_kl if site_kl is not None else (q.log_prob(value) - prior.log_prob(value)).sum())
        f = self.model.output(latents, x)
        log_lik = self.model.likelihood(f, self.model._lift(latents, f)).log_prob(y).sum()
        log_lik = log_lik * ((num_data or x.shape[0]) / x.shape[0])
        self.last_terms = {"log_likelihood": log_lik.detach() / p, "kl": kl.detach() / p}
        self._last = (latents, log_lik, kl)
        return (kl_scale * kl - log_lik) / p

    def diagnose(self) -> str:
        latents, log_lik, kl = self._last
        for name, value in latents.items():
            if not torch.isfinite(value).all():
                return f"site {name!r} has a non-finite value"
        if not torch.isfinite(torch.as_tensor(kl)):
            return "the KL term is not finite"
        if not torch.isfinite(log_lik):
            return "site 'y' has a non-finite log likelihood"
        return "no site is non-finite"
