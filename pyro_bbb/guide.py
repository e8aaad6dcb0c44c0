"""The Bayes by Backprop guide: a mean-field Gaussian with sigma = softplus(rho).

Each latent site gets its own mean ``mu`` and raw scale ``rho``; a draw is
``w = mu + softplus(rho) * eps`` with ``eps ~ N(0, I)`` (Blundell et al. 2015,
section 3.2).  Sites are sampled directly as ``Normal(mu, sigma)`` rather than
through an auxiliary site (as Pyro's ``AutoNormal`` does), so that
``TraceMeanField_ELBO`` and :func:`pyro_bbb.fit` can use the closed-form KL
wherever the prior has one.  Sites with constrained support (e.g. a learned
noise std) are Gaussian in unconstrained space, pushed through
``biject_to(support)``.
"""

from __future__ import annotations

import math
from operator import attrgetter
from contextlib import ExitStack
from numbers import Real

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.transforms import ExpTransform, biject_to
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median, init_to_value
from pyro.infer.autoguide.utils import deep_setattr, helpful_support_errors
from pyro.nn import PyroModule
from pyro.ops.tensor_utils import periodic_repeat
from torch import Tensor, nn
from torch.distributions import register_kl

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

__all__ = ["BBBGuide", "DEFAULT_INIT_SCALE"]

DEFAULT_INIT_SCALE = 0.01
"""Initial posterior std.  Small enough that the network first fits the data
almost like a point estimate (large initial noise drowns the gradient of the
likelihood), large enough that rho = softplus^-1(0.01) = -4.6 still moves at a
useful rate under Adam."""


def inverse_softplus(y: Tensor) -> Tensor:
    """rho with softplus(rho) = y, stable for small and large y."""
    return y + torch.log(-torch.expm1(-y))


def log_softplus(rho: Tensor, softplus_rho: Tensor | None = None) -> Tensor:
    """log(softplus(rho)) with softplus clamped at the smallest normal float (rho < -87 in
    float32, where softplus underflows): value and gradient stay finite for every rho.
    Pass softplus(rho) if already computed."""
    sigma = F.softplus(rho) if softplus_rho is None else softplus_rho
    return torch.log(sigma.clamp_min(torch.finfo(sigma.dtype).tiny))


class SoftplusNormal(dist.Normal):
    """``Normal(loc, softplus(rho))`` whose log density, entropy and KL never square
    sigma: finite even where sigma**2 underflows (rho < -50 in float32), where torch's
    ``Normal`` returns 0/0 = NaN."""

    def __init__(self, loc, rho, validate_args=None):
        self.rho = rho
        tiny = torch.finfo(rho.dtype).tiny
        super().__init__(loc, F.softplus(rho).clamp_min(tiny), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SoftplusNormal, _instance)
        new.rho = self.rho.expand(torch.Size(batch_shape))
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        z = (value - self.loc) / self.scale
        return -0.5 * z * z - log_softplus(self.rho) - _LOG_SQRT_2PI

    def entropy(self):
        return 0.5 + _LOG_SQRT_2PI + log_softplus(self.rho)


@register_kl(SoftplusNormal, torch.distributions.Normal)
def _kl_softplus_normal(q, p):
    log_ratio = torch.log(p.scale) - log_softplus(q.rho)
    return log_ratio + (q.scale**2 + (q.loc - p.loc) ** 2) / (2 * p.scale**2) - 0.5


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _unconstraining_inverse(support):
    """Map from unconstrained space to ``support``.  Plain ``exp`` for positive sites,
    so that q is exactly log-normal and the KL to a log-normal prior is analytic."""
    return ExpTransform() if support is constraints.positive else biject_to(support)


class BBBGuide(AutoGuide):
    r"""Mean-field Gaussian guide of Bayes by Backprop, as a Pyro ``AutoGuide``.

    Parameters
    ----------
    model : callable
        A Pyro model: one from :class:`~pyro_bbb.BayesianRegressor`,
        :class:`~pyro_bbb.BayesianClassifier`, or any hand-written model whose
        latent sites are continuous.
    init_scale : float
        Initial sigma of every site (see :data:`DEFAULT_INIT_SCALE`).
    init_loc : None, float, dict or callable
        Initial mu.  ``None``: the module's own weights for networks made by
        :func:`~pyro_bbb.bayesianize` (its random init keeps hidden units apart;
        a pretrained net starts where it was trained), Pyro's ``init_to_median``
        for other sites.  A float sets every mu to it (in unconstrained space);
        a dict maps site names to values; a callable is a Pyro init strategy.
    create_plates : callable, optional
        As in Pyro's AutoGuides, for models with local latents in subsampled plates.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> def model(x, y=None):
    ...     w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    ...     with pyro.plate("data", x.shape[0]):
    ...         return pyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)
    >>> guide = BBBGuide(model)
    >>> x = torch.randn(10, 2)
    >>> guide(x)["w"].shape
    torch.Size([2])
    >>> guide.snr()["w"].shape
    torch.Size([2])
    """

    def __init__(
        self,
        model,
        *,
        init_scale: float = DEFAULT_INIT_SCALE,
        init_loc=None,
        create_plates=None,
    ):
        if (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, Real)
            or not math.isfinite(init_scale)
            or init_scale <= 0
        ):
            raise ValueError(f"init_scale must be a finite float > 0, got {init_scale!r}")
        if not (init_loc is None or isinstance(init_loc, (Real, dict)) or callable(init_loc)):
            raise ValueError(
                f"init_loc must be None, a float, a dict or a callable, got {type(init_loc).__name__}"
            )
        self.init_scale = float(init_scale)
        self._init_loc = init_loc
        self._user_model = (model,)  # a tuple keeps the model out of the guide's submodules
        super().__init__(InitMessenger(self._init_value)(model), create_plates=create_plates)

    # -- set-up -----------------------------------------------------------------------
    def _init_value(self, site):
        spec = self._init_loc
        if callable(spec) and not isinstance(spec, dict):
            return spec(site)
        if isinstance(spec, Real):
            transform = _unconstraining_inverse(site["fn"].support)
            unconstrained = transform.inv(site["fn"].sample().detach())
            return transform(torch.full_like(unconstrained, float(spec)))
        values = dict(spec) if isinstance(spec, dict) else {}
        if spec is None:
            initial = getattr(self._user_model[0], "initial_values", None)
            if callable(initial):
                values = initial()
        return init_to_value(site, values=values, fallback=init_to_median)

    def _prototype_hide_fn(self, msg) -> bool:
        # Observed sites are not latent; nor is the likelihood of a pyro_bbb model that
        # is called without targets (its "y" site is then sampled, not observed).
        if prototype_hide_fn(msg):
            return True
        names = getattr(self._user_model[0], "latent_names", None)
        return names is not None and msg["name"] not in names

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self._event_dims = {}
        self._transforms = {}
        # Filled before being attached: a PyroModule assigned a parameter while its Pyro
        # context is active would adopt a stale value of the same name from the global
        # param store (a previous guide's), instead of this guide's initial value.
        loc, rho = PyroModule(), PyroModule()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].has_enumerate_support:
                raise ValueError(f"BBBGuide handles continuous sites only; {name!r} is discrete")
            transform = _unconstraining_inverse(site["fn"].support)
            with helpful_support_errors(site):
                init_loc = transform.inv(site["value"].detach()).detach()
            event_dim = site["fn"].event_dim + init_loc.dim() - site["value"].dim()
            for frame in site["cond_indep_stack"]:  # subsampled local latents: full size
                full_size = frame.full_size or frame.size
                if full_size != frame.size:
                    init_loc = periodic_repeat(init_loc, full_size, frame.dim - event_dim)
            init_rho = inverse_softplus(torch.full_like(init_loc, self.init_scale))
            deep_setattr(loc, name, nn.Parameter(init_loc.contiguous()))
            deep_setattr(rho, name, nn.Parameter(init_rho))
            self._event_dims[name] = event_dim
            self._transforms[name] = None if _is_real(site["fn"].support) else transform
        self.loc, self.rho = loc, rho
        # Same reason: drop a previous guide's entries of these names from the param
        # store, so Pyro's SVI and pyro.optim see this guide's parameters.
        store = pyro.get_param_store()
        for prefix in (f"{self._pyro_name}.loc.", f"{self._pyro_name}.rho."):
            for key in [k for k in store.keys() if k.startswith(prefix)]:
                del store[key]

    def _site_names(self):
        if self.prototype_trace is None:
            raise RuntimeError("the guide is not set up yet: call it once, or fit() it, first")
        return [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]

    # -- the guide ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Draw every latent site from q; returns ``{name: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, self.get_posterior(name))
        return result

    def get_posterior(self, name: str) -> dist.Distribution:
        """q(site) as a distribution: ``Normal(mu, softplus(rho))`` with the site's event
        dims, pushed to the site's support when constrained."""
        q = SoftplusNormal(attrgetter(name)(self.loc), attrgetter(name)(self.rho))
        q = q.to_event(self._event_dims[name])
        transform = self._transforms[name]
        return q if transform is None else dist.TransformedDistribution(q, transform)

    # -- summaries --------------------------------------------------------------------------
    @torch.no_grad()
    def scales(self) -> dict[str, Tensor]:
        """sigma = softplus(rho) per site (in unconstrained space)."""
        return {n: F.softplus(attrgetter(n)(self.rho)) for n in self._site_names()}

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """Posterior median of each site (mu pushed to the site's support)."""
        return {n: v[0] for n, v in self.quantiles([0.5]).items()}

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, Tensor]:
        """Marginal quantiles of each site, shape ``(len(quantiles), *site_shape)``."""
        out = {}
        for name in self._site_names():
            loc = attrgetter(name)(self.loc)
            q = torch.as_tensor(quantiles, dtype=loc.dtype, device=loc.device)
            q = q.reshape((-1,) + (1,) * loc.dim())
            values = dist.Normal(loc, F.softplus(attrgetter(name)(self.rho))).icdf(q)
            transform = self._transforms[name]
            out[name] = values if transform is None else transform(values)
        return out

    @torch.no_grad()
    def snr(self) -> dict[str, Tensor]:
        """Signal-to-noise ratio |mu| / sigma per weight (Blundell et al. 2015, sec. 5.1).

        For constrained sites it is read in unconstrained space."""
        return {
            n: attrgetter(n)(self.loc).abs() / F.softplus(attrgetter(n)(self.rho))
            for n in self._site_names()
        }

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, generator: torch.Generator | None = None):
        """``num_samples`` independent draws of every site: ``{name: (S, *shape)}``."""
        if not (isinstance(num_samples, int) and num_samples > 0):
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        draws = {}
        for name in self._site_names():
            loc = attrgetter(name)(self.loc)
            scale = F.softplus(attrgetter(name)(self.rho))
            eps = torch.randn(
                (num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device, generator=generator
            )
            value = loc + scale * eps
            transform = self._transforms[name]
            draws[name] = value if transform is None else transform(value)
        return draws

    @torch.no_grad()
    def log_density(self, draws: dict[str, Tensor]) -> Tensor:
        """log q(theta) per draw, in the sites' own (constrained) space: shape ``(S,)``."""
        total = 0.0
        for name in self._site_names():
            lp = self.get_posterior(name).log_prob(draws[name])
            total = total + lp.reshape(lp.shape[0], -1).sum(-1)
        return total
