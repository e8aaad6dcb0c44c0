"""The batched potential: ``U(u)`` and its gradient for all chains at once.

Two implementations of one function, with one flat layout:

* :class:`Potential`: ``U(u) = -(log p(theta, y) + log|det dT/du|)`` with ``theta =
  T(u)``, ``T = biject_to(prior.support)`` per site, evaluated for all chains at once
  through the model's batched :meth:`log_joint` (for a ``torch.nn.Sequential`` of
  ``Linear`` layers and elementwise activations, a direct batched forward pass that
  skips ``vmap``, checked against :meth:`log_joint` when it is set up); its gradient is
  one ``torch.autograd.grad`` of the sum over chains.  All sites are flattened into one
  vector per chain, ``(C, D)``.
* :class:`MLPPotential`: the same ``U(u)`` for multilayer perceptrons, fused, with a
  hand-derived gradient (below).

:func:`batched_potential` picks the fused one when the model qualifies.

The fused potential
-------------------
:class:`MLPPotential` evaluates the same ``U(u)`` as :class:`Potential`
(same flat layout, same transforms, same treatment of non-finite rows) for a
``BayesianRegressor`` (fixed noise, or learned noise with a ``LogNormal`` prior) or a
``BayesianClassifier`` whose network is a ``Linear`` or a ``Sequential`` of ``Linear``
layers and ``ReLU`` / ``Tanh`` / ``Sigmoid``, with ``Normal`` or
:class:`~pyro_bbb.priors.ScaleMixtureNormal` priors on the weights.  Instead of an
autograd graph per call it runs, for ``C`` chains at once:

* the first layer as ONE matrix product of the chains' weights side by side,
  ``(C h, d) @ (d, N)`` (``x @ W1`` with ``W1`` of shape ``(d, C h)``, transposed so
  that every later array is ``(C, units, N)``, contiguous per chain);
* later layers as ``baddbmm`` (chain = batch), activations in place;
* the backward pass by hand (``dU/df``, then ``bmm`` / ``mm`` down the layers);
* the priors' log densities and gradients in closed form: Normal
  ``-(w - m)^2 / 2s^2``; the scale mixture through ``logaddexp`` and its softmax weight
  ``r = sigmoid(a1 - a2)``; the learned noise ``sigma = exp(v)`` with
  ``-log LogNormal(sigma) - log|d sigma / dv| = (v - m)^2 / 2s^2 + log(s sqrt(2 pi))``.

Work arrays are allocated once per number of chains; one call allocates only the
gradient it returns (the kernel keeps it across steps).  :func:`batched_potential`
picks this class when the model qualifies and the general
:class:`Potential` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Independent, LogNormal, Normal, biject_to

from ..nn import BayesianClassifier, BayesianRegressor
from ..priors import ScaleMixtureNormal

__all__ = ["MLPPotential", "Potential", "batched_potential", "mlp_layout", "model_priors"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


# ============================================================================
# The general potential: the model's batched log joint, autograd gradient
# ============================================================================
class _Site(NamedTuple):
    name: str
    shape: torch.Size  # constrained (site) shape
    unconstrained_shape: torch.Size
    start: int
    stop: int
    transform: torch.distributions.Transform
    identity: bool  # real support: no transform, no Jacobian
    support: torch.distributions.constraints.Constraint


class Potential:
    """``U(u) = -(log p(theta, y | x) + log|det dT/du|)`` for a batch of chains.

    ``u`` has shape ``(C, D)``: every latent site of the model, mapped to unconstrained
    space by ``biject_to(prior.support)`` and flattened, in ``model.latent_names``
    order.  Real-valued sites (network weights) are the identity; a positive site such
    as a learned ``"noise"`` is ``exp``, whose log-Jacobian is added.

    Parameters
    ----------
    model : BayesianRegressor or BayesianClassifier
        A pyro_bbb model (has ``log_joint`` and ``latent_names``).
    x, y : Tensor
        Data on the model's device, validated.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> model = bbb.BayesianRegressor(torch.nn.Linear(2, 1), prior=dist.Normal(0., 1.),
    ...                               noise="learned")
    >>> pot = Potential(model, torch.randn(5, 2), torch.randn(5))
    >>> pot.dim                       # 2 weights + 1 bias + log(noise)
    4
    >>> u, g = pot.value_and_grad(torch.zeros(3, 4))
    >>> u.shape, g.shape
    (torch.Size([3]), torch.Size([3, 4]))
    """

    def __init__(self, model, x: Tensor, y: Tensor):
        self.model, self.x, self.y = model, x, y
        priors = model_priors(model)
        sites, start = [], 0
        for name in model.latent_names:
            prior = priors[name]
            shape = torch.Size(prior.batch_shape + prior.event_shape)
            transform = biject_to(prior.support)
            ushape = torch.Size(transform.inverse_shape(shape))
            stop = start + ushape.numel()
            sites.append(_Site(name, shape, ushape, start, stop, transform, _is_identity(transform),
                               prior.support))
            start = stop
        self.sites = tuple(sites)
        # Constrained sites whose values can leave their support numerically (exp overflow).
        self._checked_sites = tuple(t for t in sites if not t.identity and t.support.event_dim == 0)
        self.dim = start
        #: Whether the network runs as a direct batched forward pass (a Sequential MLP;
        #: see ``BayesianNetwork.evaluate``) rather than through vmap.
        self.fast_path = x.dim() == 2 and model.network.mlp_layers() is not None

    # -- layout ------------------------------------------------------------------------
    def unflatten(self, u: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Constrained values ``{site: (C, *shape)}`` and ``log|det dT/du|`` of shape (C,)."""
        batch = u.shape[:-1]
        values, logdet = {}, u.new_zeros(batch)
        for site in self.sites:
            v = u[..., site.start : site.stop].reshape(batch + site.unconstrained_shape)
            if site.identity:
                values[site.name] = v
                continue
            theta = site.transform(v)
            ladj = site.transform.log_abs_det_jacobian(v, theta)
            logdet = logdet + ladj.reshape(batch + (-1,)).sum(-1)
            values[site.name] = theta
        return values, logdet

    def flatten(self, values: Mapping[str, Tensor]) -> Tensor:
        """Unconstrained flat vectors ``(C, D)`` from constrained values ``{site: (C, *shape)}``."""
        parts = []
        for site in self.sites:
            v = values[site.name]
            batch = v.shape[: v.dim() - len(site.shape)]
            parts.append(site.transform.inv(v).reshape(batch + (-1,)))
        return torch.cat(parts, -1)

    # -- density -------------------------------------------------------------------------
    def log_density(self, u: Tensor) -> Tensor:
        """``-U(u)``: the log joint plus the log-Jacobian, shape (C,)."""
        values, logdet = self.unflatten(u)
        return self.model.log_joint(values, self.x, self.y) + logdet

    def _in_support(self, u: Tensor) -> Tensor:
        """Rows of finite ``u`` whose constrained values are finite and in their support:
        a finite u can still overflow (exp(u) = inf for a positive site far out in a
        divergent trajectory), which the priors' validation would refuse."""
        ok = torch.ones(u.shape[:-1], dtype=torch.bool, device=u.device)
        with torch.no_grad():
            for site in self._checked_sites:  # elementwise transforms: the flat slice will do
                v = site.transform(u[..., site.start : site.stop])
                ok &= (torch.isfinite(v) & site.support.check(v)).all(-1)
        return ok

    def value_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``U(u)`` (C,) and ``dU/du`` (C, D), detached; rows with non-finite ``u``, with
        values outside their support, or whose potential or gradient is not finite give
        ``U = inf`` and a zero gradient (such a chain is divergent and will be rejected)."""
        good = torch.isfinite(u).all(-1)
        u = torch.where(good[..., None], u, torch.zeros_like(u))
        good &= self._in_support(u)
        u = torch.where(good[..., None], u, torch.zeros_like(u))
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            potential = -self.log_density(u)
            (grad,) = torch.autograd.grad(potential.sum(), u)
        potential = potential.detach()
        ok = good & torch.isfinite(potential) & torch.isfinite(grad).all(-1)
        if not bool(ok.all()):
            potential = torch.where(ok, potential, torch.full_like(potential, math.inf))
            grad = torch.where(ok[..., None], grad, torch.zeros_like(grad))
        return potential, grad


def _is_identity(transform) -> bool:
    """True for ``biject_to(real)`` (an empty ``ComposeTransform``), possibly wrapped in
    ``IndependentTransform``: such a site needs no Jacobian term."""
    transforms = torch.distributions.transforms
    while isinstance(transform, transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, transforms.ComposeTransform) and not transform.parts


def model_priors(model) -> dict:
    """Every latent site's prior, checked: continuous support, known to the model."""
    priors = {**model.network.priors(), **model.extra_priors()}
    for name in model.latent_names:
        if name not in priors:
            raise ValueError(
                f"model: no prior found for latent site {name!r}; run_hmc handles pyro_bbb "
                "models only -- use pyro_bbb.run_nuts for this model"
            )
        support = priors[name].support
        if support.is_discrete:
            raise ValueError(
                f"model: latent site {name!r} is discrete ({support}); HMC needs continuous "
                "latents -- use pyro_bbb.run_nuts (it enumerates discrete sites)"
            )
    return priors


# ============================================================================
# The fused potential for MLPs
# ============================================================================
class _Layer(NamedTuple):
    weight: tuple[int, int]  # (start, stop) in the flat vector
    bias: tuple[int, int] | None
    fan_out: int
    fan_in: int
    activation: str | None  # applied after this layer (None for the output layer)


def mlp_layout(model) -> tuple[_Layer, ...] | None:
    """The layers of a qualifying model's network, or None when it needs the general path.

    Qualifies: a ``BayesianRegressor`` or ``BayesianClassifier`` whose network is a
    ``Linear`` or a ``Sequential`` of ``Linear`` and ``ReLU`` / ``Tanh`` / ``Sigmoid``
    (no two activations in a row, none last), every parameter a sample site with a
    ``Normal`` or ``ScaleMixtureNormal`` prior, and (regression) a fixed noise or a
    learned one with a ``LogNormal`` prior.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    >>> layers = mlp_layout(bbb.BayesianRegressor(net, prior=dist.Normal(0., 1.)))
    >>> [(l.fan_out, l.fan_in, l.activation) for l in layers]
    [(5, 3, 'tanh'), (1, 5, None)]
    """
    if not isinstance(model, (BayesianRegressor, BayesianClassifier)):
        return None
    network = model.network
    walk = network.mlp_layers()  # Linear site names and activation modules, or None
    if walk is None:
        return None
    offsets, start = {}, 0
    priors = network.priors()
    for name in network.site_names:
        if _weight_prior_kind(priors[name]) is None:
            return None
        stop = start + network.site_shapes[name].numel()
        offsets[name], start = (start, stop), stop
    if isinstance(model, BayesianRegressor) and model.noise is None:
        if not isinstance(model.extra_priors()["noise"], LogNormal):
            return None
    layers, pending = [], None
    for step in walk:
        if isinstance(step, tuple):  # a Linear layer: (weight, bias | None) site names
            if pending is not None:
                layers.append(pending)
            weight, bias = step
            fan_out, fan_in = network.site_shapes[weight]
            pending = _Layer(offsets[weight], offsets[bias] if bias else None, fan_out, fan_in, None)
        elif type(step) in _ACTIVATIONS and pending is not None and pending.activation is None:
            pending = pending._replace(activation=_ACTIVATIONS[type(step)])
        else:
            return None
    if pending is None or pending.activation is not None:
        return None  # an activation on the output: not a likelihood parameter we know
    layers.append(pending)
    return tuple(layers)


def _base_prior(prior):
    while isinstance(prior, Independent):
        prior = prior.base_dist
    return prior


def _weight_prior_kind(prior) -> str | None:
    base = _base_prior(prior)
    if base.event_shape:
        return None
    if isinstance(base, ScaleMixtureNormal):
        return "mixture"
    return "normal" if isinstance(base, Normal) else None


def batched_potential(model, x: Tensor, y: Tensor) -> Potential:
    """The cheapest exact potential for ``model``: :class:`MLPPotential` when
    :func:`mlp_layout` accepts the model (and ``x`` is a matrix), else
    :class:`Potential`.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> model = bbb.BayesianRegressor(net, prior=dist.Normal(0., 1.), noise=0.1)
    >>> type(batched_potential(model, torch.randn(6, 2), torch.randn(6))).__name__
    'MLPPotential'
    """
    if x.dim() == 2 and mlp_layout(model) is not None:
        return MLPPotential(model, x, y)
    return Potential(model, x, y)


class _PriorTerms(NamedTuple):
    """Closed-form log prior of the weights, elementwise over the first ``dim`` entries."""

    dim: int
    loc: Tensor | None  # None: every mean is 0
    # Normal: half_precision = 1 / 2s^2, log_norm = -log s - log sqrt(2 pi), per element
    # (or a 0-d tensor when all elements share it).  Mixture: two of each.
    half_precision: tuple[Tensor, ...]
    log_weight: tuple[Tensor, ...]


def _prior_terms(model, dtype, device) -> _PriorTerms:
    network = model.network
    locs, halfp1, halfp2, logw1, logw2, mixture = [], [], [], [], [], False
    priors = network.priors(device=device, dtype=dtype)
    for name in network.site_names:
        base = _base_prior(priors[name])
        shape = network.site_shapes[name]
        if isinstance(base, ScaleMixtureNormal):
            mixture = True
            pi, s1, s2 = (t.expand(shape).reshape(-1) for t in (base.pi, base.sigma1, base.sigma2))
            locs.append(torch.zeros_like(pi))
            halfp1.append(0.5 / s1**2)
            halfp2.append(0.5 / s2**2)
            logw1.append(torch.log(pi) - torch.log(s1) - _LOG_SQRT_2PI)
            logw2.append(torch.log1p(-pi) - torch.log(s2) - _LOG_SQRT_2PI)
        else:  # Normal: a mixture whose second component has weight 0
            loc, scale = base.loc.expand(shape).reshape(-1), base.scale.expand(shape).reshape(-1)
            locs.append(loc)
            halfp1.append(0.5 / scale**2)
            halfp2.append(torch.zeros_like(scale))
            logw1.append(-torch.log(scale) - _LOG_SQRT_2PI)
            logw2.append(torch.full_like(scale, -math.inf))
    loc = torch.cat(locs)
    loc = None if bool((loc == 0).all()) else loc

    def compact(parts):  # one shared value -> a 0-d tensor (a scalar multiply per call)
        t = torch.cat(parts)
        return t[0].clone() if bool((t == t[0]).all()) else t

    if mixture:
        terms = (compact(halfp1), compact(halfp2)), (compact(logw1), compact(logw2))
    else:
        terms = (compact(halfp1),), (compact(logw1),)
    dim = sum(shape.numel() for shape in network.site_shapes.values())
    return _PriorTerms(dim, loc, *terms)


#: Elements of the largest work array (chains x width x N) per block of chains on CPU
#: (4 MiB of float32).  64 chains, 50 tanh units, one thread, blocks against the whole
#: batch timed in turns in one process: energy (blocks of 30) 0.84x the CPU time,
#: concrete (22) 0.66x, wine-quality-red (14) 0.60x; yacht (one block) unchanged.
CPU_BLOCK_ELEMENTS = 2**20


class MLPPotential(Potential):
    """:class:`Potential` for MLPs, with a fused forward and a
    hand-derived backward (no autograd); same ``U``, layout and divergence rules.

    Build it with :func:`batched_potential` (which checks that the model qualifies).

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> model = bbb.BayesianRegressor(net, prior=dist.Normal(0., 1.), noise="learned")
    >>> pot = MLPPotential(model, torch.randn(6, 2), torch.randn(6))
    >>> u, g = pot.value_and_grad(torch.zeros(3, pot.dim))
    >>> u.shape, g.shape
    (torch.Size([3]), torch.Size([3, 18]))
    """

    def __init__(self, model, x: Tensor, y: Tensor):
        super().__init__(model, x, y)
        layers = mlp_layout(model)
        if layers is None or x.dim() != 2:
            raise ValueError(
                "model: MLPPotential needs a BayesianRegressor / BayesianClassifier over a "
                "Sequential of Linear and ReLU / Tanh / Sigmoid with Normal or scale-mixture "
                "priors; use pyro_bbb.hmc.potential.Potential (or batched_potential) for this model"
            )
        self.layers = layers
        self.xt = x.t().contiguous()  # (d, N)
        self.xt_ones = torch.cat([self.xt, self.xt.new_ones(1, self.xt.shape[1])])
        self.minus_one, self.one = x.new_tensor(-1.0), x.new_tensor(1.0)
        self.prior = _prior_terms(model, x.dtype, x.device)
        outputs = layers[-1].fan_out
        if isinstance(model, BayesianClassifier):
            self.task = "bernoulli" if outputs == 1 else "categorical"
            labels = y.long()
            if self.task == "bernoulli":
                self.target = labels.to(x.dtype)[None, None, :]  # (1, 1, N)
            else:
                self.target = labels[None, None, :]  # gathered along the class dim
                self.onehot = torch.nn.functional.one_hot(labels, outputs).t().to(x.dtype)
            self.noise_index, self.const = None, 0.0
        else:
            self.task = "normal"
            self.target = (y[:, None] if y.dim() == 1 else y).t().contiguous()[None]  # (1, K, N)
            count = self.target.numel()
            self.const = count * _LOG_SQRT_2PI
            if model.noise is None:
                noise_site = next(s for s in self.sites if s.name == "noise")
                self.noise_index = noise_site.start
                noise_prior = model.extra_priors()["noise"]
                self.noise_loc = float(noise_prior.loc)
                self.noise_half_precision = 0.5 / float(noise_prior.scale) ** 2
                self.const += math.log(float(noise_prior.scale)) + _LOG_SQRT_2PI
            else:
                self.noise_index = None
                self.inv_var = 1.0 / model.noise**2
                self.const += count * math.log(model.noise)
        self._work: dict[int, dict] = {}
        # On CPU, chains go through in blocks whose largest (chains, width, N) array stays
        # near the cache; a GPU wants the whole batch at once.
        widest = max(layer.fan_out for layer in layers) * x.shape[0]
        self.block_chains = (max(1, CPU_BLOCK_ELEMENTS // widest) if x.device.type == "cpu"
                             else None)

    # -- work arrays, once per number of chains --------------------------------------------
    def _arrays(self, chains: int, like: Tensor) -> dict:
        work = self._work.get(chains)
        if work is None:
            new = lambda *shape: like.new_empty(shape)  # noqa: E731
            n = self.xt.shape[1]
            first = self.layers[0]
            work = {
                "w0": new(chains, first.fan_out, first.fan_in),
                "b0": new(chains * first.fan_out, 1),
                "z": [new(chains, layer.fan_out, n) for layer in self.layers],  # outputs
                "dz": [new(chains, layer.fan_out, n) for layer in self.layers],  # dU/d(pre-act)
                "tmp": [new(chains, layer.fan_out, n) for layer in self.layers],
                "dw": [new(chains, layer.fan_out, layer.fan_in) for layer in self.layers],
                "dw0": new(first.fan_in + 1, chains * first.fan_out),
                "db": [new(chains, layer.fan_out) for layer in self.layers],
            }
            self._work[chains] = work
        return work

    # -- the potential --------------------------------------------------------------------
    def value_and_grad(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``U(u)`` (C,) and ``dU/du`` (C, D); non-finite rows give ``U = inf`` and a zero
        gradient, as :meth:`Potential.value_and_grad`.  Computed in blocks of
        ``block_chains`` chains (``None``: all at once)."""
        u = u.detach()
        block = self.block_chains
        if block is None or u.shape[0] <= block:
            return self._value_and_grad_block(u)
        parts = [self._value_and_grad_block(part) for part in u.split(block)]
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])

    def _value_and_grad_block(self, u: Tensor) -> tuple[Tensor, Tensor]:
        chains = u.shape[0]
        work = self._arrays(chains, u)
        out = self._forward(u, work)
        potential, dout, noise_grad, sigma = self._likelihood(u, out, work)
        pieces = self._backward(u, dout, work)
        if noise_grad is not None:
            pieces.append(noise_grad[:, None])
        grad = torch.cat(pieces, 1)
        potential += self._add_prior(u, grad)
        # One reduction instead of an elementwise check: a NaN or inf anywhere in the row
        # makes the sum non-finite; a finite row whose sum overflows (|dU/du| ~ 1e38 in
        # float32) is flagged too, which only rejects a chain that is lost anyway.
        ok = torch.isfinite(potential + grad.sum(-1))
        if sigma is not None:  # exp(v) overflowed or underflowed: outside the support
            ok &= torch.isfinite(sigma) & (sigma > 0)
        if not bool(ok.all()):
            potential = torch.where(ok, potential, torch.full_like(potential, math.inf))
            grad = torch.where(ok[:, None], grad, torch.zeros_like(grad))
        return potential, grad

    def _forward(self, u: Tensor, work: dict) -> Tensor:
        """The network's output ``(C, K, N)``; hidden outputs stay in ``work["z"]``.

        ``tanh(z) = 2 sigmoid(2 z) - 1``: torch's CPU sigmoid is ~5x faster than its
        tanh, and the factor 2 rides on the matrix product (``alpha``, ``beta``)."""
        chains = u.shape[0]
        first = self.layers[0]
        scale = 2.0 if first.activation == "tanh" else 1.0
        w0 = work["w0"]
        w0.copy_(u[:, first.weight[0] : first.weight[1]].view(w0.shape))
        z = work["z"][0]
        rows = chains * first.fan_out
        if first.bias is None:
            torch.mm(w0.view(rows, first.fan_in), self.xt, out=z.view(rows, -1))
            if scale != 1.0:
                z.mul_(scale)
        else:
            work["b0"].view(chains, -1).copy_(u[:, first.bias[0] : first.bias[1]])
            torch.addmm(work["b0"], w0.view(rows, first.fan_in), self.xt, beta=scale, alpha=scale,
                        out=z.view(rows, -1))
        for index, layer in enumerate(self.layers):
            scale = 2.0 if layer.activation == "tanh" else 1.0
            if index:
                w = u[:, layer.weight[0] : layer.weight[1]].view(chains, layer.fan_out, layer.fan_in)
                z = work["z"][index]
                if layer.bias is None:
                    torch.bmm(w, work["z"][index - 1], out=z)
                    if scale != 1.0:
                        z.mul_(scale)
                else:
                    b = u[:, layer.bias[0] : layer.bias[1]].unsqueeze(-1)
                    torch.baddbmm(b, w, work["z"][index - 1], beta=scale, alpha=scale, out=z)
            if layer.activation == "tanh":
                z.sigmoid_()
                torch.add(self.minus_one, z, alpha=2.0, out=z)
            elif layer.activation == "relu":
                z.relu_()
            elif layer.activation == "sigmoid":
                z.sigmoid_()
        return z

    def _likelihood(self, u: Tensor, out: Tensor, work: dict):
        """``-log p(y | f)`` (C,) (plus the noise's prior and Jacobian terms, plus the
        constants) and ``dU/df`` written into ``work["dz"][-1]``."""
        dout = work["dz"][-1]
        noise_grad = sigma = None
        if self.task == "normal":
            torch.sub(out, self.target, out=dout)  # residuals f - y
            squares = torch.linalg.vecdot(dout.view(dout.shape[0], -1), dout.view(dout.shape[0], -1))
            if self.noise_index is None:
                potential = squares * (0.5 * self.inv_var) + self.const
                dout.mul_(self.inv_var)
            else:
                v = u[:, self.noise_index]
                inv_var = torch.exp(-2.0 * v)
                sigma = torch.exp(v)
                centred = v - self.noise_loc
                count = self.target.numel()
                # U = r.r / 2 sigma^2 + count v + (v - m)^2 / 2s^2 + consts (the prior's
                # -log sigma cancels the log-Jacobian +v).
                potential = 0.5 * squares * inv_var + count * v + self.noise_half_precision * centred**2
                potential += self.const
                noise_grad = count - squares * inv_var + (2.0 * self.noise_half_precision) * centred
                dout.mul_(inv_var[:, None, None])
        elif self.task == "bernoulli":
            # -log p = softplus(f) - y f;  d/df = sigmoid(f) - y
            potential = torch.nn.functional.softplus(out).sum((1, 2)) - torch.linalg.vecdot(
                out.view(out.shape[0], -1), self.target.view(1, -1))
            torch.sigmoid(out, out=dout)
            dout.sub_(self.target)
        else:
            # -log p = logsumexp_k f - f_y;  d/df = softmax(f) - onehot(y)
            lse = torch.logsumexp(out, 1)
            picked = out.gather(1, self.target.expand(out.shape[0], 1, -1))
            potential = (lse - picked[:, 0]).sum(-1)
            torch.softmax(out, 1, out=dout)
            dout.sub_(self.onehot)
        return potential, dout, noise_grad, sigma

    def _backward(self, u: Tensor, dout: Tensor, work: dict) -> list[Tensor]:
        """``dU/d(weights)`` of the likelihood, as (C, -1) pieces in the flat order."""
        chains = u.shape[0]
        pieces, row_scale = [], None
        for index in range(len(self.layers) - 1, 0, -1):
            layer = self.layers[index]
            dz, dw, db = work["dz"][index], work["dw"][index], work["db"][index]
            torch.bmm(dz, work["z"][index - 1].transpose(1, 2), out=dw)
            part = [dw.view(chains, -1)]
            if layer.bias is not None:
                torch.sum(dz, -1, out=db)
                part.append(db)
            pieces[:0] = part
            row_scale = self._through_activation(u, layer, index, work)
        # First layer: [x; 1] (d + 1, N) times dz^T (N, C h): weights and bias in one
        # product, in the orientation MKL runs fastest for these shapes.
        first = self.layers[0]
        rows = chains * first.fan_out
        dw0 = work["dw0"]
        torch.mm(self.xt_ones, work["dz"][0].view(rows, -1).t(), out=dw0)
        if row_scale is not None:
            dw0.mul_(row_scale.reshape(1, rows))
        d = first.fan_in
        weight = dw0[:d].view(d, chains, first.fan_out).permute(1, 2, 0).reshape(chains, -1)
        part = [weight] if first.bias is None else [weight, dw0[d].view(chains, -1)]
        return part + pieces

    def _through_activation(self, u: Tensor, layer: _Layer, index: int, work: dict) -> Tensor | None:
        """``dU/dz`` of the layer below from ``dU/dz`` of this one: ``W^T dz`` times the
        activation's derivative, written from its output ``a`` (tanh ``1 - a^2``, ReLU
        ``a > 0``, sigmoid ``a (1 - a)``).

        After a one-output layer (regression's last) ``W^T dz`` is an outer product
        ``w_h dz_n``: the derivative is multiplied by ``dz`` alone and, when the layer
        below is the first, ``w`` (C, h) is returned for the caller to apply to the first
        layer's small (d + 1, C h) gradient: two passes over the (C, h, N) array, not four."""
        chains = u.shape[0]
        w = u[:, layer.weight[0] : layer.weight[1]].view(chains, layer.fan_out, layer.fan_in)
        below = self.layers[index - 1]
        a, tmp, target = work["z"][index - 1], work["tmp"][index - 1], work["dz"][index - 1]
        dz = work["dz"][index]
        if layer.fan_out == 1 and below.activation is not None:
            self._activation_derivative(below.activation, a, target)
            target.mul_(dz)
            if index == 1:
                return w.view(chains, layer.fan_in)
            target.mul_(w.transpose(1, 2))
            return None
        if layer.fan_out == 1:  # an outer product: cheaper as a broadcast multiply
            torch.mul(w.transpose(1, 2), dz, out=tmp)  # dU/da
        else:
            torch.bmm(w.transpose(1, 2), dz, out=tmp)
        if below.activation is None:  # two Linear layers in a row
            target.copy_(tmp)
        else:
            self._activation_derivative(below.activation, a, target)
            target.mul_(tmp)
        return None

    def _activation_derivative(self, activation: str, a: Tensor, out: Tensor) -> None:
        """The activation's derivative from its output ``a``, in one pass, into ``out``."""
        if activation == "tanh":
            torch.addcmul(self.one, a, a, value=-1.0, out=out)  # 1 - a^2
        elif activation == "relu":
            torch.sign(a, out=out)  # a >= 0: 1 where the unit is on
        else:  # sigmoid
            torch.addcmul(a, a, a, value=-1.0, out=out)  # a - a^2

    def _add_prior(self, u: Tensor, grad: Tensor) -> Tensor:
        """Adds ``-d log p(w) / dw`` to ``grad`` in place; returns ``-log p(w)`` (C,)."""
        prior = self.prior
        w = u[:, : prior.dim]
        z = w if prior.loc is None else w - prior.loc
        g = grad[:, : prior.dim]
        if len(prior.half_precision) == 1:
            (halfp,), (logw,) = prior.half_precision, prior.log_weight
            hz = z * halfp
            g.add_(hz, alpha=2.0)
            value = torch.linalg.vecdot(hz, z)
            return value - (logw.sum() if logw.dim() else logw * prior.dim)
        (h1, h2), (l1, l2) = prior.half_precision, prior.log_weight
        sq = z * z
        a1 = l1 - h1 * sq
        a2 = l2 - h2 * sq
        r1 = torch.sigmoid(a1 - a2)  # the first component's softmax weight
        # -d/dz log p = 2 z (r1 h1 + (1 - r1) h2) = 2 z (h2 + r1 (h1 - h2))
        g.addcmul_(z, r1.mul_(h1 - h2).add_(h2), value=2.0)
        return -torch.logaddexp(a1, a2).sum(-1)
