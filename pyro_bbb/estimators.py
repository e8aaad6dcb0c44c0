"""How a training step draws: weight sampling, local reparameterization, Flipout.

Three estimators of the same negative ELBO of Bayes by Backprop for a pyro_bbb
model with a :class:`~pyro_bbb.BBBGuide` (mean-field Gaussian, sigma = softplus(rho)),
without Pyro's tracing.  All three have the same call signature and conventions
as :class:`~pyro_bbb.train.BBBLoss`: ``loss(x, y, num_data=N, kl_scale=s)`` returns

    mean over particles of  kl_scale * KL_estimate - (N / B) * log p(y_batch | w)

and leaves the detached expected log-likelihood and KL in ``last_terms``;
``diagnose()`` names what went non-finite.

:class:`WeightSamplingLoss` (the paper)
    Per parameter tensor one draw ``w = mu + softplus(rho) * eps`` per particle, and

        log q(w) = sum(-log sigma - eps^2 / 2) - n log(2 pi) / 2

    read from ``eps`` directly (w - mu = sigma * eps exactly), which has the same
    value and the same total derivative in (mu, rho) as ``Normal(mu, sigma).log_prob(w)``.
    The closed-form KL replaces log q - log p where ``kl="analytic"`` and the prior
    is Gaussian.

:class:`LocalReparamLoss` (Kingma, Salimans & Welling 2015)
    An ``nn.Linear`` layer with Bayesian weight receives the input rows ``x_b``
    and returns ``x_b mu^T + b_mu + sqrt(x_b^2 sigma^2^T + sigma_b^2) * z_b`` with
    ``z ~ N(0, I)`` per example: the exact distribution of the pre-activation
    ``x_b w^T + b`` under q, drawn independently per example instead of through
    one shared weight draw.  Each example's likelihood term has the same
    expectation as under weight sampling (it depends on that example's
    marginal only), so the expected loss and its gradient are BBB's; the
    gradient's variance is lower because the noise no longer correlates across
    the minibatch.  The weights themselves are never drawn, so the KL comes
    apart from the likelihood: closed form for Gaussian priors with
    ``kl="analytic"``; otherwise (``kl="mc"``, or the scale-mixture prior,
    which has no closed form) the Monte Carlo KL on an *independent* weight
    draw per particle, which has the same expectation.  Exact only for inputs
    of shape ``(batch, in_features)`` (rows = examples): a Linear layer applied
    to higher-rank inputs (a sequence, an image's positions) raises
    ``ValueError`` (use ``"flipout"``).  Bayesian weights of other layers
    (convolutions, ...) are drawn as in weight sampling.

:class:`FlipoutLoss` (Wen, Vicol, Ba, Tran & Grosse 2018)
    One weight perturbation ``delta = sigma * E`` per particle, decorrelated across
    examples by random signs: example b uses ``delta * (s_b r_b^T)`` with
    ``r_b, s_b`` uniform on {-1, 1}, i.e. ``x_b mu^T + ((x_b * r_b) delta^T) * s_b``.
    Each example's weights are an exact draw from q (the sign flips leave
    ``sigma * E`` in distribution unchanged), so the expected loss is BBB's.
    For ``nn.Linear`` (any input rank: dim 0 indexes the examples) and
    ``nn.Conv1d/2d/3d`` (the signs are per channel, one kernel per example: exact
    too).  The KL is Monte Carlo on ``w = mu + delta`` (``kl="mc"``) or closed
    form.  The bias is drawn as in weight sampling, shared by the minibatch.

Layers are intercepted, not rewritten: while the loss evaluates the network,
each such layer of the model's private module copy (``model.network.net``) gets
an instance-level ``forward`` reading the current (mu, sigma); the user's module
runs untouched otherwise (``functional_call``, and ``vmap`` over particles).
Only modules of exactly these types are intercepted (a subclass may have its
own ``forward``); each must be called exactly once per forward pass, else a
``ValueError`` names it (a layer called twice must reuse one weight draw, which
these per-call estimators cannot).  Both assume, as the likelihood does, that the
examples of a minibatch do not interact inside the network (no BatchNorm in
training mode): each example's output must depend on its own row only.

The elementwise work per parameter tensor (softplus, log sigma, the draw, the
KL sums and the mixture prior's log density) runs in one autograd function for
all weight tensors of a step, with a hand-written backward (:class:`_SiteTerms`),
for scalar Gaussian and scale-mixture priors: the same value and gradient as the
autograd chain, in fewer passes over the weights and one autograd node.  With
``compile=True`` its forward and backward run as ``torch.compile``'d kernels (one
loop over the weights per pass; softplus and sigmoid(rho) from one exp).  On a CPU
the transcendental functions and ``randn``, not the memory passes, dominate, so
compiling pays for the scale-mixture prior (whose log density adds a softplus and
a sigmoid per weight) more than for the Gaussian; see ``benchmarks/``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal, kl_divergence
from torch.func import functional_call, vmap

from . import _checks
from .priors import ScaleMixtureNormal

__all__ = ["FlipoutLoss", "LocalReparamLoss", "WeightSamplingLoss", "supports_lean_step"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def supports_lean_step(model, guide) -> bool:
    """Whether (model, guide) is a pyro_bbb model with a BBBGuide (the lean path applies)."""
    from .guide import BBBGuide
    from .nn import _BayesianModel

    return isinstance(model, _BayesianModel) and type(guide) is BBBGuide


# -- priors the fast path knows ---------------------------------------------------------------
@dataclass(frozen=True)
class _NormalSpec:
    """N(loc, scale^2) elementwise, loc and scale Python floats (or tensors: slow path)."""

    loc: float | Tensor
    scale: float | Tensor

    @property
    def scalar(self) -> bool:
        return isinstance(self.loc, float) and isinstance(self.scale, float)


@dataclass(frozen=True)
class _MixtureSpec:
    """pi N(0, s1^2) + (1 - pi) N(0, s2^2) elementwise, written around the wider component:

    log p(w) = base - w^2 / (2 s_wide^2) + softplus(c - k w^2) - log sqrt(2 pi),

    base = log pi_wide - log s_wide, c = log(pi_narrow / s_narrow) - base,
    k = 1 / (2 s_narrow^2) - 1 / (2 s_wide^2) >= 0: the same value as the
    logsumexp of the two components, finite for every finite w."""

    base: float
    inv_2var: float  # 1 / (2 s_wide^2)
    c: float
    k: float

    @staticmethod
    def of(pi: float, s1: float, s2: float) -> "_MixtureSpec":
        (pw, sw), (pn, sn) = sorted([(pi, s1), (1.0 - pi, s2)], key=lambda t: -t[1])
        base = math.log(pw) - math.log(sw)
        return _MixtureSpec(
            base=base,
            inv_2var=1.0 / (2 * sw * sw),
            c=math.log(pn) - math.log(sn) - base,
            k=1.0 / (2 * sn * sn) - 1.0 / (2 * sw * sw),
        )


def _prior_spec(prior):
    """A _NormalSpec / _MixtureSpec for elementwise Gaussian / scale-mixture priors, else None."""
    base = prior.base_dist if isinstance(prior, Independent) else prior
    if isinstance(base, Normal):
        return _NormalSpec(_scalar_if_constant(base.loc), _scalar_if_constant(base.scale))
    if isinstance(base, ScaleMixtureNormal):
        pi, s1, s2 = (_scalar_if_constant(t) for t in (base.pi, base.sigma1, base.sigma2))
        if all(isinstance(v, float) for v in (pi, s1, s2)):
            return _MixtureSpec.of(pi, s1, s2)
    return None


def _scalar_if_constant(t: Tensor):
    """A prior parameter with one value everywhere (a scalar prior expanded to a weight's
    shape) as a Python float: the sums then cost no pass over an expanded tensor.
    Checked once per guide set-up (the result is cached)."""
    t = torch.as_tensor(t)
    if t.numel() == 0:
        return t
    first = t.reshape(-1)[0]
    if all(s == 0 for s in t.stride()) or bool((t == first).all()):
        return float(first)
    return t


# -- the elementwise terms of one parameter tensor ---------------------------------------------
# want: what the caller needs besides the KL
#   "w":     the weight draw mu + sigma * eps               (weight sampling, Flipout's bias)
#   "delta": the perturbation sigma * eps                   (Flipout's weight)
#   "var":   sigma^2                                        (local reparameterization)
# mode: "mc" (KL on the draw mu + sigma * eps) or "analytic" (closed form, Gaussian prior).
# eps has shape lead + shape, lead = () or (num_particles,); p = num_particles.
# The KL returned is summed over particles (the callers divide the loss by p).


def _site_terms_autograd(mu, rho, eps, prior, spec, mode: str, want: str, p: int):
    """The reference: plain torch ops, differentiated by autograd.  Used for priors the
    fast path does not know, and by the tests."""
    sigma = F.softplus(rho)
    sum_log_sigma = torch.log(sigma.clamp_min(torch.finfo(sigma.dtype).tiny)).sum()
    w = None if eps is None else torch.addcmul(mu, sigma, eps)
    if mode == "analytic":
        m, s = spec.loc, spec.scale
        n = mu.numel()
        if spec.scalar:
            kl = n * math.log(s) - 0.5 * n - sum_log_sigma
            kl = kl + (sigma.square().sum() + (mu - m).square().sum()) / (2 * s * s)
        else:
            kl = torch.log(s).expand_as(mu).sum() - 0.5 * n - sum_log_sigma
            kl = kl + ((sigma / s).square().sum() + ((mu - m) / s).square().sum()) / 2
        kl = p * kl
    else:
        log_q = -p * sum_log_sigma - 0.5 * eps.square().sum() - _HALF_LOG_2PI * eps.numel()
        if isinstance(spec, _NormalSpec) and spec.scalar:
            m, s = spec.loc, spec.scale
            log_p = -(math.log(s) + _HALF_LOG_2PI) * w.numel() - (w - m).square().sum() / (2 * s * s)
        elif isinstance(spec, _MixtureSpec):
            a = w.square()
            log_p = (spec.base - _HALF_LOG_2PI) * w.numel() - spec.inv_2var * a.sum()
            log_p = log_p + F.softplus(spec.c - spec.k * a).sum()
        else:
            log_p = prior.log_prob(w).sum()
        kl = log_q - log_p
    if want == "w":
        return w, kl
    if want == "delta":
        return sigma * eps, kl
    return sigma.square(), kl


@dataclass(frozen=True)
class _Term:
    """What one parameter tensor asks of :class:`_SiteTerms` (see the comment above)."""

    spec: _NormalSpec | _MixtureSpec  # scalar parameters
    mode: str
    want: str


class _SiteTerms(torch.autograd.Function):
    """:func:`_site_terms_autograd` for all parameter tensors of a step with scalar
    Gaussian / scale-mixture priors, with the backward written out: d/dmu and d/drho in a
    few fused passes over the weights, no autograd graph over weight-sized intermediates,
    one autograd node per step.  Same value and gradient up to float rounding
    (tests/test_estimators.py compares them), except that where sigma is clamped to the
    smallest normal float (rho < -87 in float32) the log sigma term keeps its derivative
    (finite) instead of autograd's zero.

    ``_SiteTerms.apply(terms, p, compiled, mu_1, rho_1, eps_1, mu_2, ...)`` returns the
    outputs of the terms in order, then the KL summed over them.  ``compiled``: run the
    forward and backward passes as ``torch.compile``'d kernels (each elementwise chain
    one loop over the weights, instead of one ATen call per operation); True, or the
    key of the configuration (terms, shapes, dtypes, devices) when the caller has one."""

    @staticmethod
    def forward(ctx, terms, p, compiled, *tensors):
        ctx.set_materialize_grads(False)
        config = compiled
        if config is True:
            config = (terms, p) + tuple(None if t is None else (t.shape, t.dtype, t.device) for t in tensors)
        compiled = config is not None and config is not False
        ctx.config = config
        run = _kernel(_terms_forward, config) if compiled else _terms_forward
        *outs, kl, saved = run(terms, p, tensors, compiled)
        ctx.terms, ctx.p, ctx.compiled = terms, p, compiled
        ctx.save_for_backward(*saved)
        return (*outs, kl)

    @staticmethod
    def backward(ctx, *grads):
        run = _kernel(_terms_backward, ctx.config) if ctx.compiled else _terms_backward
        grads = run(ctx.terms, ctx.p, grads[:-1], grads[-1], ctx.saved_tensors, ctx.compiled)
        return (None, None, None, *grads)


def _terms_forward(terms, p, tensors, compiled):
    """The outputs of the terms, their KL, and what the backward needs."""
    outs, saved, sums, coefs, const = [], [], [], [], 0.0
    sq_sum = (lambda t: t.square().sum()) if compiled else _sq_sum
    for k, term in enumerate(terms):
        mu, rho, eps = tensors[3 * k: 3 * k + 3]
        spec, mode, want = term.spec, term.mode, term.want
        if compiled:  # one exp for sigma and its derivative sigmoid(rho), saved for the backward
            sigma, dsigma = _softplus_and_sigmoid(rho)
            sigma = sigma.clamp_min(torch.finfo(rho.dtype).tiny)
            sum_log_sigma = torch.log(sigma).sum()
        else:  # separate ATen calls cost the same: the backward computes sigmoid(rho)
            sigma, dsigma = F.softplus(rho), None
            sum_log_sigma = _clamp_and_sum_log(sigma)
        w = None if eps is None else torch.addcmul(mu, sigma, eps)
        out = w if want == "w" else sigma * eps if want == "delta" else sigma.square()
        sums.append(sum_log_sigma)
        d = None
        # KL = const + sum_i coef_i * sums_i, the constants as Python floats.
        if mode == "analytic":
            m, s = spec.loc, spec.scale
            n = mu.numel()
            sums += [out.sum() if want == "var" else sq_sum(sigma), sq_sum(mu if m == 0.0 else mu - m)]
            coefs += [-p, p / (2 * s * s), p / (2 * s * s)]
            const += p * n * (math.log(s) - 0.5)
        else:
            sums.append(sq_sum(eps))
            coefs += [-p, -0.5]
            if isinstance(spec, _NormalSpec):
                m, s = spec.loc, spec.scale
                sums.append(sq_sum(w if m == 0.0 else w - m))
                coefs.append(1 / (2 * s * s))
                const += w.numel() * math.log(s)
            else:
                a = w.square()
                d = torch.mul(a, -spec.k).add_(spec.c)
                if compiled:  # the backward needs sigmoid(d), not d
                    softplus_d, d = _softplus_and_sigmoid(d)
                else:
                    softplus_d = F.softplus(d)
                sums += [a.sum(), softplus_d.sum()]
                coefs += [spec.inv_2var, -1.0]
                const -= spec.base * w.numel()
        outs.append(out)
        saved += [mu, rho if dsigma is None else dsigma, eps, w, sigma, d]
    if compiled:  # one fused reduction
        kl = sum(c * t for c, t in zip(coefs, sums)) + const
    else:  # two small ops instead of two per sum
        ref = tensors[0]
        kl = torch.dot(torch.stack(sums), _constant(tuple(coefs), ref.dtype, ref.device)).add_(const)
    return (*outs, kl, saved)


def _terms_backward(terms, p, g_outs, g_kl, saved, compiled):
    """(d/dmu, d/drho, None) per term, given the gradients of the outputs and of the KL."""
    memo = {}

    def g_kl_times(factor):  # made once per factor: the terms share most
        if factor not in memo:
            memo[factor] = g_kl * factor
        return memo[factor]

    grads = []
    for k, term in enumerate(terms):
        mu, rho_or_dsigma, eps, w, sigma, d = saved[6 * k: 6 * k + 6]
        if not compiled:  # the forward saved rho and d, not their sigmoids
            rho_or_dsigma = torch.sigmoid(rho_or_dsigma)
            d = None if d is None else torch.sigmoid(d)
        grads += [*_site_backward(term, p, g_outs[k], g_kl, g_kl_times, mu, rho_or_dsigma, eps, w, sigma, d),
                  None]
    return grads


def _softplus_and_sigmoid(x):
    """softplus(x) (torch's, linear above 20) and its derivative sigmoid(x) from one exp:
    for the compiled kernels, where the exp, not the memory traffic, is the cost."""
    e = torch.exp(x)
    linear = x > 20.0
    return torch.where(linear, x, torch.log1p(e)), torch.where(linear, 1.0, e / (1.0 + e))


_KERNELS: dict = {}


def _kernel(fn, config):
    """``fn`` compiled by ``torch.compile`` for one configuration (terms, particles,
    shapes, dtypes, devices), once per process.  Each configuration compiles a copy of
    ``fn``'s code object: torch.compile counts recompilations per code object and stops
    at a limit (8), which a process training many different networks would reach."""
    key = (fn.__name__, config)
    if key not in _KERNELS:
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        _KERNELS[key] = torch.compile(copy, dynamic=False, fullgraph=True)
    return _KERNELS[key]


def _site_backward(term, p, g_out, g_kl, g_kl_times, mu, dsigma, eps, w, sigma, sigmoid_d):
    """(d/dmu, d/drho) of one term, given the gradients of its output and of the KL,
    ``g_kl_times(f)`` = the KL's gradient times f, ``dsigma`` = sigmoid(rho) and, for the
    mixture prior's Monte Carlo KL, ``sigmoid_d`` = sigmoid(c - k w^2)."""
    spec, mode, want = term.spec, term.mode, term.want
    lead = tuple(range(eps.dim() - mu.dim())) if eps is not None else ()

    def lead_sum(t):
        return t.sum(lead) if lead else t

    # G = dL/dw at the draw w = mu + sigma * eps, through the output (want "w") and the
    # Monte Carlo KL's -log p(w).  (log q(w) = -sum log sigma - eps^2 / 2 + const does
    # not depend on w at fixed eps: it gives the -p / sigma term below.)
    G = g_out if want == "w" else None
    if g_kl is not None and mode == "mc":
        if isinstance(spec, _NormalSpec):  # d(-log p)/dw = (w - m) / s^2
            coef = g_kl_times(1 / (spec.scale * spec.scale))
            h = torch.mul(w, coef) if G is None else torch.addcmul(G, w, coef)
            if spec.loc != 0.0:
                h = h.sub_(g_kl_times(spec.loc / (spec.scale * spec.scale)))
        else:  # d(-log p)/dw = w (2 inv_2var + 2 k sigmoid(c - k w^2))
            coef = torch.addcmul(g_kl_times(2 * spec.inv_2var), sigmoid_d, g_kl_times(2 * spec.k))
            h = coef.mul_(w) if G is None else torch.addcmul(G, w, coef)
        G = h
    # a = dL/dsigma: sum over particles of (the factor of eps) * eps, plus direct terms.
    E = G
    if want == "delta" and g_out is not None:
        E = g_out if E is None else E + g_out
    a = None if E is None else lead_sum(E * eps)
    grad_mu = None if G is None else lead_sum(G)  # may be g_out itself: never written to
    c = None  # coefficient of sigma in a, from the closed-form KL's sigma^2 / (2 s^2)
    if g_kl is not None and mode == "analytic":
        m, s = spec.loc, spec.scale
        c = g_kl_times(p / (s * s))
        if grad_mu is None:
            grad_mu = torch.mul(mu if m == 0.0 else mu - m, c)
        else:  # one pass (grad_mu may be g_out itself: not written to)
            grad_mu = torch.addcmul(grad_mu, mu if m == 0.0 else mu - m, c)
    if want == "var" and g_out is not None:  # d(sigma^2)/dsigma = 2 sigma
        t = (g_out * 2 if c is None else torch.add(c, g_out, alpha=2)).mul_(sigma)
        a = t if a is None else a.add_(t)
    elif c is not None:
        a = torch.mul(sigma, c) if a is None else a.addcmul_(sigma, c)
    if g_kl is not None:  # d(-p sum log sigma)/dsigma = -p / sigma
        neg = g_kl_times(-p)
        a = torch.reciprocal(sigma).mul_(neg) if a is None else a.addcdiv_(neg, sigma)
    grad_rho = None if a is None else a.mul_(dsigma)
    return grad_mu, grad_rho


def _sq_sum(t: Tensor) -> Tensor:
    """sum(t^2) in one pass (a dot product for contiguous tensors)."""
    if t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    return t.square().sum()


def _clamp_and_sum_log(sigma: Tensor) -> Tensor:
    """Clamp sigma (in place) to the smallest normal float, and return sum(log sigma).

    On a CPU, where the log is the costliest pass over the weights after ``randn`` and
    softplus, one min/max pass decides both: no clamp pass unless sigma underflowed, and,
    where all of sigma lies in [1e-18, 1e18], the sum as the logs of products of pairs:
    half the logs, each product a normal float (no under- or overflow), so the sum is as
    accurate as the plain one's float rounding."""
    tiny = torch.finfo(sigma.dtype).tiny
    half = sigma.numel() // 2
    if sigma.device.type != "cpu" or half < 512 or not sigma.is_contiguous():  # (a GPU: no sync)
        return torch.log(sigma.clamp_min_(tiny)).sum()
    flat = sigma.view(-1)
    lo, hi = (v.item() for v in torch.aminmax(flat))
    if lo < tiny:
        sigma.clamp_min_(tiny)
    if not (lo >= 1e-18 and hi <= 1e18):
        return torch.log(sigma).sum()
    total = torch.log(flat[:half] * flat[half: 2 * half]).sum()
    return total if 2 * half == flat.numel() else total + torch.log(flat[-1])


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype, device) -> Tensor:
    """A small constant tensor, made once (the KL's coefficients: no copy to a GPU per step)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _fusable(spec) -> bool:
    """Whether :class:`_SiteTerms` handles a prior (scalar Gaussian or scale mixture)."""
    return isinstance(spec, _MixtureSpec) or (isinstance(spec, _NormalSpec) and spec.scalar)


# -- the losses ----------------------------------------------------------------------------------
@dataclass
class _Site:
    name: str
    loc: nn.Parameter
    rho: nn.Parameter
    prior: object
    spec: object  # _NormalSpec, _MixtureSpec or None

    @property
    def analytic_ok(self) -> bool:
        return isinstance(self.spec, _NormalSpec)


def _placement(sites: list[_Site]) -> tuple:
    return (sites[0].loc.device, sites[0].loc.dtype) if sites else ()


class _LeanLoss(nn.Module):
    """What the three estimators share: the guide's sites, the extra (non-weight)
    latents, the likelihood with the data plate's N / B scaling, ``last_terms`` and
    ``diagnose``."""

    estimator = ""

    def __init__(self, model, guide, num_particles: int = 1, kl: str = "mc", compile: bool = False):
        super().__init__()
        if not supports_lean_step(model, guide):
            raise ValueError(f"{type(self).__name__} needs a pyro_bbb model and a BBBGuide")
        if guide.prototype_trace is None:
            raise ValueError("the guide is not set up yet: call it once on a batch first")
        self.model = model
        self.guide = guide
        self.num_particles = _checks.positive_int("num_particles", num_particles)
        self.kl = _checks.choice("kl", kl, ("mc", "analytic"))
        self.compile = bool(compile)
        self._plans: dict = {}
        self.last_terms: dict[str, Tensor] = {}

    def _sites(self) -> list[_Site]:
        """Per weight site its guide parameters and prior, cached until the guide sets up
        new parameters (its loc / rho modules are replaced) or they move to another device
        or dtype.  (Checked every step: kept to a few attribute reads.)"""
        key = (id(self.guide.loc), id(self.guide.rho))
        cache = getattr(self, "_cache", None)
        if cache is None or self._cache_key != key + _placement(cache):
            priors = self.model.network.priors()
            self._cache = [
                _Site(n, self.guide.loc.get_parameter(n), self.guide.rho.get_parameter(n), p, _prior_spec(p))
                for n, p in priors.items()
            ]
            self._cache_key = key + _placement(self._cache)
            self._plans.clear()
            self._on_new_sites(self._cache)
        return self._cache

    def _on_new_sites(self, sites):
        pass

    def _lead(self):
        return (self.num_particles,) if self.num_particles > 1 else ()

    def _draw_sites(self, requests) -> tuple[dict[str, Tensor], Tensor | float]:
        """Per requested ``(site, want, need_eps)`` its output, and the KL summed over the
        sites, with the KL mode the user asked for where the prior allows it (the closed
        form needs a Gaussian prior; else Monte Carlo).  The sites with scalar Gaussian /
        mixture priors go through one :class:`_SiteTerms` call (and one ``randn``) per
        dtype and device."""
        p, lead = self.num_particles, self._lead()
        outs, kl = {}, 0.0
        unfused, groups = self._plan(requests)
        for site, mode, want, need_eps in unfused:
            loc = site.loc
            eps = torch.randn(lead + loc.shape, dtype=loc.dtype, device=loc.device) if need_eps else None
            outs[site.name], site_kl = _site_terms_autograd(loc, site.rho, eps, site.prior, site.spec, mode, want, p)
            kl = kl + site_kl
        for (dtype, device), (sites, terms, sizes, needs, config) in groups.items():
            noise = torch.randn(sum(sizes), dtype=dtype, device=device).split(sizes)
            tensors = []
            for site, need_eps, eps in zip(sites, needs, noise):
                tensors += [site.loc, site.rho, eps.view(lead + site.loc.shape) if need_eps else None]
            *values, group_kl = _SiteTerms.apply(terms, p, config, *tensors)
            outs.update(zip((site.name for site in sites), values))
            kl = group_kl if isinstance(kl, float) and kl == 0.0 else kl + group_kl
        return outs, kl

    def _plan(self, requests):
        """How :meth:`_draw_sites` draws ``requests``, worked out once (it is the same every
        step): the unfused sites with their KL mode, and per (dtype, device) the fused
        sites, their terms (one tuple object: compile's guards see the same one), the
        sizes of their noise, whether they need it, and with ``compile`` the key of their
        compiled kernels (else None)."""
        key = tuple((id(site), want, need_eps) for site, want, need_eps in requests)
        if key not in self._plans:
            lead = self._lead()
            unfused, groups = [], {}
            for site, want, need_eps in requests:
                mode = "analytic" if self.kl == "analytic" and site.analytic_ok else "mc"
                need_eps = need_eps or mode == "mc"
                if not _fusable(site.spec):
                    unfused.append((site, mode, want, need_eps))
                    continue
                where = (site.loc.dtype, site.loc.device)
                sites, terms, sizes, needs = groups.setdefault(where, ([], [], [], []))
                sites.append(site)
                terms.append(_Term(site.spec, mode, want))
                sizes.append(math.prod(lead + site.loc.shape) if need_eps else 0)
                needs.append(need_eps)
            groups = {where: (g[0], tuple(g[1]), g[2], g[3], None) for where, g in groups.items()}
            if self.compile:  # the configuration's key for its compiled kernels (_kernel)
                groups = {where: g[:4] + ((g[1], self.num_particles, where, tuple(s.loc.shape for s in g[0]),
                                           tuple(g[3])),) for where, g in groups.items()}
            self._plans[key] = (unfused, groups)
        return self._plans[key]

    def _extra_latents(self, latents: dict, kl):
        """Non-weight latents (e.g. a learned noise): few numbers, drawn from q directly."""
        p, lead = self.num_particles, self._lead()
        self._last = (latents, None, None)  # what culprit() reads if a density raises below
        for name, prior in self.model.extra_priors().items():
            q = self.guide.get_posterior(name)
            value = q.rsample(lead)
            latents[name] = value
            try:
                site_kl = p * kl_divergence(q, prior).sum() if self.kl == "analytic" else None
            except NotImplementedError:
                site_kl = None
            kl = kl + (site_kl if site_kl is not None else (q.log_prob(value) - prior.log_prob(value)).sum())
        return kl

    def _finish(self, out, latents, x, y, num_data, kl_scale, kl):
        p = self.num_particles
        f = self.model._output(out)
        log_lik = self.model.likelihood(f, self.model._lift(latents, f)).log_prob(y).sum()
        if num_data is not None and num_data != x.shape[0]:
            log_lik = log_lik * (num_data / x.shape[0])
        kl = torch.as_tensor(kl, device=log_lik.device)

        def per_particle(t):  # (no op for one particle: the step is short on small networks)
            return t if p == 1 else t / p

        self.last_terms = {"log_likelihood": per_particle(log_lik.detach()), "kl": per_particle(kl.detach())}
        self._last = (latents, log_lik, kl)
        return per_particle((kl if kl_scale == 1.0 else kl_scale * kl) - log_lik)

    def diagnose(self) -> str:
        """Name the first site of the last call whose value or term is not finite."""
        return self.culprit() or "no site is non-finite"

    def culprit(self) -> str | None:
        """The first site of the last call with a non-finite value or term, or with a draw
        outside its support (a call that raised in a density reaches no terms); None if
        there is none."""
        latents, log_lik, kl = getattr(self, "_last", ({}, None, None))
        supports = {name: prior.support for name, prior in self.model.extra_priors().items()}
        for name, value in latents.items():
            if not torch.isfinite(value).all():
                return f"site {name!r} has a non-finite value"
            if name in supports and not supports[name].check(value).all():
                return f"site {name!r} has a draw outside its support {supports[name]} (it under- or overflowed)"
        for site in self._sites():
            for what, t in (("mu", site.loc), ("rho", site.rho)):
                if not torch.isfinite(t).all():
                    return f"site {site.name!r} has a non-finite {what}"
        if kl is not None and not torch.isfinite(torch.as_tensor(kl)):
            return "the KL term is not finite"
        if log_lik is not None and not torch.isfinite(log_lik):
            return "site 'y' has a non-finite log likelihood"
        return None


class WeightSamplingLoss(_LeanLoss):
    """Negative ELBO of Bayes by Backprop for pyro_bbb models, without Pyro traces.

    Same call signature and ``last_terms`` as :class:`~pyro_bbb.train.BBBLoss`:
    ``loss(x, y, num_data=N, kl_scale=s)``, and the same value and gradient for
    the same noise.  The guide must be set up (called once) before this module
    is built.

    Parameters
    ----------
    model, guide : pyro_bbb model, BBBGuide
    num_particles : int
        Weight draws per step, evaluated in one vmapped forward pass.
    kl : {"mc", "analytic"}
        Monte Carlo KL on the same draws (the paper), or the closed form where
        the prior is Gaussian (Monte Carlo for other priors).

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

    estimator = "weights"

    def forward(self, x: Tensor, y: Tensor, num_data: int | None = None, kl_scale: float = 1.0) -> Tensor:
        latents, kl = self._draw_sites([(site, "w", True) for site in self._sites()])
        kl = self._extra_latents(latents, kl)
        out = self.model.network.evaluate({n: latents[n] for n in self.model.network.site_names}, x)
        return self._finish(out, latents, x, y, num_data, kl_scale, kl)


# -- layer-level estimators -----------------------------------------------------------------------
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _Layer:
    path: str
    module: nn.Module
    weight: str  # site name
    bias: str | None  # site name, or None if the bias is deterministic / absent
    calls: int = 0


class _LayerLoss(_LeanLoss):
    """Base of the layer-level estimators: finds the layers to intercept, patches their
    ``forward`` while the network runs, and vmaps over particles."""

    layer_types: tuple = ()

    def __init__(self, model, guide, num_particles: int = 1, kl: str = "mc", compile: bool = False):
        super().__init__(model, guide, num_particles, kl, compile)
        self._sites()
        if not self._layers:
            kinds = ", ".join(t.__name__ for t in self.layer_types)
            raise ValueError(
                f"estimator={self.estimator!r}: the network has no layer of type {kinds} with a "
                f"Bayesian weight (sites: {list(self.model.network.site_names)}); "
                "use estimator='weights'"
            )

    def _on_new_sites(self, sites):
        names = {s.name for s in sites}
        layers = {}
        for path, module in self.model.network.net.named_modules():
            if type(module) not in self.layer_types or "forward" in module.__dict__:
                continue
            prefix = f"{path}." if path else ""
            if prefix + "weight" not in names:
                continue
            bias = prefix + "bias" if prefix + "bias" in names else None
            layers[prefix + "weight"] = _Layer(path, module, prefix + "weight", bias)
        self._layers = layers  # keyed by weight site
        self._layer_sites = {n for l in layers.values() for n in (l.weight, l.bias) if n}

    @contextlib.contextmanager
    def _patched(self, forward_of):
        """Give each intercepted layer an instance-level forward while the network runs."""
        layers = list(self._layers.values())
        try:
            for layer in layers:
                layer.calls = 0
                layer.module.forward = forward_of(layer)
            yield
        finally:
            for layer in layers:
                layer.module.__dict__.pop("forward", None)
        for layer in layers:
            if layer.calls != 1:
                raise ValueError(
                    f"estimator={self.estimator!r}: layer {layer.path or '(root)'!r} "
                    f"({type(layer.module).__name__}) was called {layer.calls} times in one forward "
                    "pass; these estimators need each Bayesian layer called exactly once (a module "
                    "that reuses a layer, or reads its weight directly, needs estimator='weights')"
                )

    def forward(self, x: Tensor, y: Tensor, num_data: int | None = None, kl_scale: float = 1.0) -> Tensor:
        p = self.num_particles
        sites = self._sites()
        values, kl = self._draw_sites([
            (site, *self._layer_want(site)) if site.name in self._layer_sites
            else (site, "w", True)  # drawn as in weight sampling
            for site in sites
        ])
        latents, fixed, batched = {}, {}, {}
        for site in sites:
            if site.name in self._layer_sites:
                fixed[site.name], batched[site.name] = self._layer_values(site, values[site.name])
            else:
                latents[site.name] = values[site.name]
        kl = self._extra_latents(latents, kl)
        weights = {n: latents[n] for n in self.model.network.site_names if n in latents}
        net = self.model.network.net
        state = {}

        def forward_of(layer):
            def layer_forward(inp):
                layer.calls += 1
                return self._layer_forward(layer, inp, state["fixed"], state["batched"])

            return layer_forward

        def run(w, batched_values, _index):
            state["fixed"], state["batched"] = fixed, batched_values
            return functional_call(net, w, (x,))

        with self._patched(forward_of):
            if p == 1:
                out = run(weights, batched, None)
            else:
                index = torch.arange(p, device=x.device)
                out = vmap(run, randomness="different")(weights, batched, index)
        state.clear()
        return self._finish(out, latents, x, y, num_data, kl_scale, kl)


class LocalReparamLoss(_LayerLoss):
    """Negative ELBO with the local reparameterization trick (Kingma et al. 2015) for the
    ``nn.Linear`` layers with Bayesian weights; same expected loss and gradient as
    :class:`WeightSamplingLoss`, lower gradient variance.

    Each such layer returns ``mean + sqrt(var) * z`` with ``mean = x mu^T + b_mu``,
    ``var = x^2 sigma^2^T + sigma_b^2`` and fresh ``z ~ N(0, 1)`` per example and unit.
    The weights are not drawn, so the KL is the closed form (``kl="analytic"``,
    Gaussian prior) or, for ``kl="mc"`` and for priors without a closed form (the
    scale mixture), Monte Carlo on an independent weight draw per particle: the same
    expectation, and a weight-sized ``randn`` per step.  Inputs to an intercepted
    layer must have shape ``(batch, in_features)`` (else ``ValueError``: the trick
    is exact only when rows are independent examples; use :class:`FlipoutLoss`).
    Bayesian parameters of other layers are weight-sampled.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0))
    >>> guide = bbb.BBBGuide(model)
    >>> x, y = torch.randn(8, 2), torch.randn(8)
    >>> _ = guide(x, y)
    >>> LocalReparamLoss(model, guide, num_particles=3, kl="analytic")(x, y).shape
    torch.Size([])
    """

    estimator = "local_reparam"
    layer_types = (nn.Linear,)

    def _layer_want(self, site):
        # The KL's own draw (kl="mc" or no closed form) is independent of the likelihood's noise.
        return "var", False

    def _layer_values(self, site, var):
        return {"mean": site.loc, "var": var}, {}

    def _layer_forward(self, layer, x, fixed, batched):
        if x.dim() != 2:
            raise ValueError(
                f"estimator='local_reparam': layer {layer.path or '(root)'!r} got an input of shape "
                f"{tuple(x.shape)}; local reparameterization is exact only for inputs "
                "(batch, in_features) whose rows are independent examples. Use estimator='flipout' "
                "(exact for any input shape) or 'weights'"
            )
        w = fixed[layer.weight]
        if layer.bias is None:
            mean = F.linear(x, w["mean"], layer.module.bias)
            var = F.linear(x.square(), w["var"])
        else:
            b = fixed[layer.bias]
            mean = F.linear(x, w["mean"], b["mean"])
            var = F.linear(x.square(), w["var"], b["var"])
        tiny = torch.finfo(var.dtype).tiny
        return torch.addcmul(mean, var.clamp_min(tiny).sqrt(), torch.randn_like(mean))


class FlipoutLoss(_LayerLoss):
    """Negative ELBO with Flipout (Wen et al. 2018) for ``nn.Linear`` and
    ``nn.Conv1d/2d/3d`` layers with Bayesian weights; same expected loss and gradient
    as :class:`WeightSamplingLoss`, lower gradient variance.

    Per particle one perturbation ``delta = sigma * E``, ``E ~ N(0, I)``; example b
    sees the weight ``mu + delta * (s_b r_b^T)`` with random signs on the output and
    input units (channels, for convolutions), computed as
    ``x mu^T + ((x * r) delta^T) * s`` with two matrix products.  The KL is Monte
    Carlo on ``mu + delta`` (``kl="mc"``) or the closed form (``kl="analytic"``,
    Gaussian prior).  The bias is drawn once per particle as in weight sampling.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> model = bbb.BayesianRegressor(net, prior=bbb.ScaleMixtureNormal(0.5, 1.0, 0.05))
    >>> guide = bbb.BBBGuide(model)
    >>> x, y = torch.randn(8, 2), torch.randn(8)
    >>> _ = guide(x, y)
    >>> FlipoutLoss(model, guide, num_particles=3)(x, y).shape
    torch.Size([])
    """

    estimator = "flipout"
    layer_types = (nn.Linear,) + _CONVS

    def _layer_want(self, site):
        return ("delta" if site.name in self._layers else "w"), True

    def _layer_values(self, site, value):
        return {"mean": site.loc}, {("delta" if site.name in self._layers else "value"): value}

    def _layer_forward(self, layer, x, fixed, batched):
        module = layer.module
        mu, delta = fixed[layer.weight]["mean"], batched[layer.weight]["delta"]
        bias = module.bias if layer.bias is None else batched[layer.bias]["value"]
        out_units, in_units = mu.shape[0], x.shape[-1]
        if isinstance(module, nn.Linear):  # x: (in,) or (batch, ..., in); dim 0 = examples
            apply = F.linear
            rows = x.shape[:1] + (1,) * (x.dim() - 2) if x.dim() > 1 else ()
            r_shape, s_shape = rows + (in_units,), rows + (out_units,)
        else:  # x: (C_in, *spatial) or (batch, C_in, *spatial)
            apply = module._conv_forward
            spatial = mu.dim() - 2
            in_units = x.shape[-spatial - 1]
            rows = x.shape[: x.dim() - spatial - 1]
            r_shape = rows + (in_units,) + (1,) * spatial
            s_shape = rows + (out_units,) + (1,) * spatial
        # Random signs per example on the input and output units, shared by all positions
        # of the example: its weight mu + delta * (s r^T) is one exact draw from q.
        r = _rademacher(r_shape, x)
        s = _rademacher(s_shape, x)
        return torch.addcmul(apply(x, mu, bias), apply(x * r, delta, None), s)


def _rademacher(shape, like: Tensor) -> Tensor:
    return torch.randint(0, 2, shape, dtype=like.dtype, device=like.device).mul_(2).sub_(1)
