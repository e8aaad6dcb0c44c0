"""Priors over network weights: the paper's scale mixture, and which prior goes where.

Blundell et al. (2015, eq. 7) put a fixed, shared scale mixture of two zero-mean
Gaussians on every weight,

    P(w) = pi N(w | 0, sigma1^2) + (1 - pi) N(w | 0, sigma2^2),   sigma1 > sigma2, sigma2 << 1,

so that many weights can sit near zero (the narrow component) while a few stay
large (the wide one).  Gaussian priors are plain :class:`pyro.distributions.Normal`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from numbers import Real

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all, lazy_property

__all__ = ["ScaleMixtureNormal", "PriorSpec", "resolve_prior", "prior_on_device"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class ScaleMixtureNormal(TorchDistribution):
    r"""Zero-mean scale mixture of two Gaussians, the prior of Blundell et al. (2015).

    .. math:: p(w) = \pi\,\mathcal N(w \mid 0, \sigma_1^2) + (1-\pi)\,\mathcal N(w \mid 0, \sigma_2^2)

    ``log_prob`` combines the two components with ``logsumexp``, so it is finite
    for every finite ``w`` (a naive ``log(pi * N1 + (1 - pi) * N2)`` underflows to
    ``-inf`` once both densities are below the smallest float, e.g. ``|w| = 1e3``
    with ``sigma1 = 1``).

    ``rsample`` picks a component per element, then scales a standard normal draw:
    the draw is differentiable with respect to the sigmas, not with respect to
    ``pi`` (the prior is fixed in Bayes by Backprop, so nothing needs that).

    Parameters
    ----------
    pi : float or Tensor
        Weight of the first (wide) component, strictly between 0 and 1.
    sigma1, sigma2 : float or Tensor
        Standard deviations of the two components, both > 0.  The paper uses
        ``sigma1 > sigma2`` and ``sigma2 << 1``; the order is not enforced.

    Examples
    --------
    >>> import math, torch
    >>> prior = ScaleMixtureNormal(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))
    >>> prior.log_prob(torch.tensor([0.0, 1e3])).isfinite().all().item()
    True
    >>> prior.expand([400, 784]).to_event(2).batch_shape
    torch.Size([])
    """

    arg_constraints = {
        "pi": constraints.interval(0.0, 1.0),
        "sigma1": constraints.positive,
        "sigma2": constraints.positive,
    }
    support = constraints.real
    has_rsample = True

    def __init__(self, pi, sigma1, sigma2, validate_args=None):
        for name, value in (("pi", pi), ("sigma1", sigma1), ("sigma2", sigma2)):
            _check_argument(name, value)
        self.pi, self.sigma1, self.sigma2 = broadcast_all(pi, sigma1, sigma2)
        super().__init__(self.pi.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros_like(self.pi)

    @property
    def variance(self) -> torch.Tensor:
        return self.pi * self.sigma1**2 + (1 - self.pi) * self.sigma2**2

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ScaleMixtureNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.pi = self.pi.expand(batch_shape)
        new.sigma1 = self.sigma1.expand(batch_shape)
        new.sigma2 = self.sigma2.expand(batch_shape)
        super(ScaleMixtureNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        half_sq = 0.5 * value * value
        log1 = torch.log(self.pi) - torch.log(self.sigma1) - half_sq / self.sigma1**2
        log2 = torch.log1p(-self.pi) - torch.log(self.sigma2) - half_sq / self.sigma2**2
        return torch.logaddexp(log1, log2) - _LOG_SQRT_2PI

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        wide = torch.rand(shape, dtype=self.pi.dtype, device=self.pi.device) < self.pi
        scale = torch.where(wide, self.sigma1, self.sigma2)
        return scale * torch.randn(shape, dtype=self.pi.dtype, device=self.pi.device)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def __repr__(self) -> str:
        def fmt(t):
            return f"{t.item():.4g}" if t.numel() == 1 else f"Tensor{tuple(t.shape)}"

        return (
            f"ScaleMixtureNormal(pi={fmt(self.pi)}, sigma1={fmt(self.sigma1)}, "
            f"sigma2={fmt(self.sigma2)})"
        )


def _check_argument(name: str, value) -> None:
    t = torch.as_tensor(value, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    if name == "pi":
        if not ((t > 0) & (t < 1)).all():
            raise ValueError(f"pi must lie strictly between 0 and 1, got {value!r}")
    elif not (t > 0).all():
        raise ValueError(f"{name} must be > 0, got {value!r}")


PriorSpec = (
    TorchDistribution
    | Mapping[str, TorchDistribution]
    | Callable[[str, torch.Tensor], TorchDistribution]
)
"""What ``bayesianize`` accepts as a prior.

* one distribution, shared by every weight (a scalar one is expanded to each
  parameter's shape);
* a mapping from parameter-name patterns (:mod:`fnmatch` style, e.g. ``"0.weight"``,
  ``"*.bias"``, ``"*"``) to distributions; the first matching pattern wins;
* a callable ``prior(name, parameter) -> distribution``.
"""


def resolve_prior(spec: PriorSpec, name: str, parameter: torch.Tensor):
    """The prior of one parameter tensor: a distribution with event shape = its shape.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> p = resolve_prior({"*.bias": dist.Normal(0.0, 1.0)}, "0.bias", torch.zeros(3))
    >>> p.event_shape
    torch.Size([3])
    """
    if isinstance(spec, torch.distributions.Distribution):
        prior = spec
    elif isinstance(spec, Mapping):
        prior = next((d for pat, d in spec.items() if fnmatch.fnmatchcase(name, pat)), None)
        if prior is None:
            raise ValueError(
                f"prior: no entry matches parameter {name!r}; patterns given: {list(spec)}. "
                "Add a catch-all entry such as '*'."
            )
    elif callable(spec):
        prior = spec(name, parameter)
    else:
        raise ValueError(
            f"prior must be a distribution, a mapping or a callable, got {type(spec).__name__}"
        )
    if not isinstance(prior, torch.distributions.Distribution):
        raise ValueError(f"prior for {name!r} is not a distribution: {prior!r}")
    if prior.event_shape:
        if prior.event_shape != parameter.shape:
            raise ValueError(
                f"prior for {name!r} has event shape {tuple(prior.event_shape)}, "
                f"parameter has shape {tuple(parameter.shape)}"
            )
        return prior
    if prior.support is not constraints.real:
        raise ValueError(f"prior for weight {name!r} must have real support, got {prior.support}")
    try:
        expanded = prior.expand(parameter.shape)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"prior for {name!r} with batch shape {tuple(prior.batch_shape)} cannot be "
            f"expanded to the parameter's shape {tuple(parameter.shape)}"
        ) from err
    return expanded.to_event(parameter.dim())


def prior_on_device(prior, device, dtype=None):
    """A copy of ``prior`` whose parameter tensors live on ``device`` (and ``dtype``).

    Distributions cannot be moved with ``.to``; rebuilding them from their
    ``arg_constraints`` keeps priors usable on CUDA without CPU tensors sneaking
    into the forward pass.  Works for the distributions whose constructor takes
    their ``arg_constraints`` names (Normal, Laplace, StudentT, ScaleMixtureNormal,
    ...), and through ``Independent`` and ``expand`` wrappers.
    """
    import pyro.distributions as dist

    if isinstance(prior, torch.distributions.Independent):
        base = prior_on_device(prior.base_dist, device, dtype)
        return dist.Independent(base, prior.reinterpreted_batch_ndims)
    if isinstance(prior, dist.ExpandedDistribution):
        return prior_on_device(prior.base_dist, device, dtype).expand(prior.batch_shape)
    args = {}
    for key in prior.arg_constraints:
        lazy = isinstance(getattr(type(prior), key, None), lazy_property)
        if lazy and key not in prior.__dict__:
            continue  # e.g. Categorical's probs when built from logits
        value = getattr(prior, key)
        if isinstance(value, torch.Tensor):
            args[key] = value.to(device=device, dtype=dtype or value.dtype)
        elif isinstance(value, Real):
            args[key] = value
    try:
        return type(prior)(**args, validate_args=prior._validate_args)
    except TypeError as err:
        raise ValueError(
            f"cannot move prior {prior!r} to {device}: construct it with tensors on that device"
        ) from err
