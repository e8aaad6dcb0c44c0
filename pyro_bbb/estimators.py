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
KL sums and the mixture prior's log density) runs as one autograd function with
a hand-written backward (:class:`_SiteTerms`) for scalar Gaussian and
scale-mixture priors: the same value and gradient as the autograd chain, in
fewer passes over the weights.  (``torch.compile`` of that chain was measured
on CPU: 25-50 s to compile, and no step-time gain beyond the noise, because
softplus, log, sigmoid and ``randn`` dominate and ATen's kernels for them are
already vectorized; so it is not offered.)
"""

from __future__ import annotations

import contextlib
import math
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


class _SiteTerms(torch.autograd.Function):
    """:func:`_site_terms_autograd` for scalar Gaussian / scale-mixture priors, with the
    backward written out: d/dmu and d/drho in a few fused passes over the weights, no
    autograd graph over weight-sized intermediates.  Same value and gradient up to float
    rounding (tests/test_estimators.py compares them), except that where sigma is clamped
    to the smallest normal float (rho < -87 in float32) the log sigma term keeps its
    derivative (finite) instead of autograd's zero."""

    @staticmethod
    def forward(ctx, mu, rho, eps, spec, mode, want, p):
        ctx.set_materialize_grads(False)
        sigma = F.softplus(rho).clamp_min_(torch.finfo(rho.dtype).tiny)
        sum_log_sigma = torch.log(sigma).sum()
        w = None if eps is None else torch.addcmul(mu, sigma, eps)
        out = w if want == "w" else sigma * eps if want == "delta" else sigma.square()
        d = None
        if mode == "analytic":
            m, s = spec.loc, spec.scale
            n = mu.numel()
            sum_sq_sigma = out.sum() if want == "var" else _sq_sum(sigma)
            kl = p * (
                n * math.log(s) - 0.5 * n - sum_log_sigma
                + (sum_sq_sigma + _sq_sum(mu if m == 0.0 else mu - m)) / (2 * s * s)
            )
        else:
            kl = -p * sum_log_sigma - 0.5 * _sq_sum(eps)
            if isinstance(spec, _NormalSpec):
                m, s = spec.loc, spec.scale
                kl = kl + w.numel() * math.log(s) + _sq_sum(w if m == 0.0 else w - m) / (2 * s * s)
            else:
                a = w.square()
                d = torch.mul(a, -spec.k).add_(spec.c)
                kl = kl - spec.base * w.numel() + spec.inv_2var * a.sum() - F.softplus(d).sum()
        ctx.spec, ctx.mode, ctx.want, ctx.p = spec, mode, want, p
        ctx.lead = tuple(range(eps.dim() - mu.dim())) if eps is not None else ()
        ctx.save_for_backward(mu, rho, eps, w, sigma, d)
        return out, kl

    @staticmethod
    def backward(ctx, g_out, g_kl):
        mu, rho, eps, w, sigma, d = ctx.saved_tensors
        spec, mode, want, p, lead = ctx.spec, ctx.mode, ctx.want, ctx.p, ctx.lead

        def lead_sum(t):
            return t.sum(lead) if lead else t

        # G = dL/dw at the draw w = mu + sigma * eps, through the output (want "w") and the
        # Monte Carlo KL's -log p(w).  (log q(w) = -sum log sigma - eps^2 / 2 + const does
        # not depend on w at fixed eps: it gives the -p / sigma term below.)
        G = g_out if want == "w" else None
        if g_kl is not None and mode == "mc":
            if isinstance(spec, _NormalSpec):  # d(-log p)/dw = (w - m) / s^2
                coef = g_kl / (spec.scale * spec.scale)
                h = torch.mul(w, coef) if G is None else torch.addcmul(G, w, coef)
                if spec.loc != 0.0:
                    h = h.sub_(coef * spec.loc)
            else:  # d(-log p)/dw = w (2 inv_2var + 2 k sigmoid(c - k w^2))
                coef = torch.addcmul(2 * spec.inv_2var * g_kl, torch.sigmoid(d), 2 * spec.k * g_kl)
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
            c = g_kl * (p / (s * s))
            gm = torch.mul(mu if m == 0.0 else mu - m, c)
            grad_mu = gm if grad_mu is None else gm.add_(grad_mu)
        if want == "var" and g_out is not None:  # d(sigma^2)/dsigma = 2 sigma
            t = (g_out * 2 if c is None else torch.add(c, g_out, alpha=2)).mul_(sigma)
            a = t if a is None else a.add_(t)
        elif c is not None:
            a = torch.mul(sigma, c) if a is None else a.addcmul_(sigma, c)
        if g_kl is not None:  # d(-p sum log sigma)/dsigma = -p / sigma
            neg = g_kl * -p
            a = torch.reciprocal(sigma).mul_(neg) if a is None else a.addcdiv_(neg, sigma)
        grad_rho = None if a is None else a.mul_(torch.sigmoid(rho))
        return grad_mu, grad_rho, None, None, None, None, None


def _sq_sum(t: Tensor) -> Tensor:
    """sum(t^2) in one pass (a dot product for contiguous tensors)."""
    if t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    return t.square().sum()


def site_terms(mu, rho, eps, prior, spec, mode: str, want: str, p: int):
    """(out, kl) of one parameter tensor; see the comment above :func:`_site_terms_autograd`."""
    if mode == "analytic" and not isinstance(spec, _NormalSpec):
        raise ValueError("the closed-form KL needs a Gaussian prior")
    if isinstance(spec, _MixtureSpec) or (isinstance(spec, _NormalSpec) and spec.scalar):
        return _SiteTerms.apply(mu, rho, eps, spec, mode, want, p)
    return _site_terms_autograd(mu, rho, eps, prior, spec, mode, want, p)


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


class _LeanLoss(nn.Module):
    """What the three estimators share: the guide's sites, the extra (non-weight)
    latents, the likelihood with the data plate's N / B scaling, ``last_terms`` and
    ``diagnose``."""

    estimator = ""

    def __init__(self, model, guide, num_particles: int = 1, kl: str = "mc"):
        super().__init__()
        if not supports_lean_step(model, guide):
            raise ValueError(f"{type(self).__name__} needs a pyro_bbb model and a BBBGuide")
        if guide.prototype_trace is None:
            raise ValueError("the guide is not set up yet: call it once on a batch first")
        self.model = model
        self.guide = guide
        self.num_particles = _checks.positive_int("num_particles", num_particles)
        self.kl = _checks.choice("kl", kl, ("mc", "analytic"))
        self.last_terms: dict[str, Tensor] = {}

    def _sites(self) -> list[_Site]:
        """Per weight site its guide parameters and prior, cached until the guide's
        parameters change (e.g. moved to another device)."""
        key = tuple(id(p) for p in self.guide.parameters())
        if getattr(self, "_cache_key", None) != key:
            priors = self.model.network.priors()
            self._cache = [
                _Site(n, self.guide.loc.get_parameter(n), self.guide.rho.get_parameter(n), p, _prior_spec(p))
                for n, p in priors.items()
            ]
            self._cache_key = key
            self._on_new_sites(self._cache)
        return self._cache

    def _on_new_sites(self, sites):
        pass

    def _lead(self):
        return (self.num_particles,) if self.num_particles > 1 else ()

    def _draw(self, site: _Site, want: str, mode: str | None = None, need_eps: bool = True):
        """One site's output and KL, with the KL mode the user asked for where the prior
        allows it (the closed form needs a Gaussian prior; else Monte Carlo)."""
        mode = mode or ("analytic" if self.kl == "analytic" and site.analytic_ok else "mc")
        eps = None
        if need_eps or mode == "mc":
            loc = site.loc
            eps = torch.randn(self._lead() + loc.shape, dtype=loc.dtype, device=loc.device)
        return site_terms(site.loc, site.rho, eps, site.prior, site.spec, mode, want, self.num_particles)

    def _extra_latents(self, latents: dict, kl):
        """Non-weight latents (e.g. a learned noise): few numbers, drawn from q directly."""
        p, lead = self.num_particles, self._lead()
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
        log_lik = log_lik * ((num_data or x.shape[0]) / x.shape[0])
        self.last_terms = {"log_likelihood": log_lik.detach() / p, "kl": torch.as_tensor(kl).detach() / p}
        self._last = (latents, log_lik, kl)
        return (kl_scale * kl - log_lik) / p

    def diagnose(self) -> str:
        """Name the first site of the last call whose value or term is not finite."""
        latents, log_lik, kl = self._last
        for name, value in latents.items():
            if not torch.isfinite(value).all():
                return f"site {name!r} has a non-finite value"
        for site in self._sites():
            for what, t in (("mu", site.loc), ("rho", site.rho)):
                if not torch.isfinite(t).all():
                    return f"site {site.name!r} has a non-finite {what}"
        if not torch.isfinite(torch.as_tensor(kl)):
            return "the KL term is not finite"
        if not torch.isfinite(log_lik):
            return "site 'y' has a non-finite log likelihood"
        return "no site is non-finite"


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
        latents, kl = {}, 0.0
        for site in self._sites():
            latents[site.name], site_kl = self._draw(site, "w")
            kl = kl + site_kl
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

    def __init__(self, model, guide, num_particles: int = 1, kl: str = "mc"):
        super().__init__(model, guide, num_particles, kl)
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
        latents, fixed, batched, kl = {}, {}, {}, 0.0
        for site in self._sites():
            if site.name in self._layer_sites:
                fixed_values, batched_values, site_kl = self._layer_site(site)
                fixed[site.name], batched[site.name] = fixed_values, batched_values
            else:  # drawn as in weight sampling
                latents[site.name], site_kl = self._draw(site, "w")
            kl = kl + site_kl
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

    def _layer_site(self, site):
        # The KL's own draw (kl="mc" or no closed form) is independent of the likelihood's noise.
        var, kl = self._draw(site, "var", need_eps=False)
        return {"mean": site.loc, "var": var}, {}, kl

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

    def _layer_site(self, site):
        is_weight = site.name in self._layers
        value, kl = self._draw(site, "delta" if is_weight else "w")
        key = "delta" if is_weight else "value"
        return {"mean": site.loc}, {key: value}, kl

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
