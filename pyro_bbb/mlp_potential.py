"""A fused batched HMC potential for multilayer perceptrons, with a hand-derived gradient.

:class:`MLPPotential` evaluates the same ``U(u)`` as :class:`pyro_bbb.fast_hmc.Potential`
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
:class:`~pyro_bbb.fast_hmc.Potential` otherwise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Independent, LogNormal, Normal

from .fast_hmc import Potential
from .nn import BayesianClassifier, BayesianRegressor
from .priors import ScaleMixtureNormal

__all__ = ["MLPPotential", "batched_potential", "mlp_layout"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


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
    :class:`~pyro_bbb.fast_hmc.Potential`.

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


class MLPPotential(Potential):
    """:class:`~pyro_bbb.fast_hmc.Potential` for MLPs, with a fused forward and a
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
                "priors; use pyro_bbb.fast_hmc.Potential (or batched_potential) for this model"
            )
        self.layers = layers
        self.xt = x.t().contiguous()  # (d, N)
        self.xt_ones = torch.cat([self.xt, self.xt.new_ones(1, self.xt.shape[1])])
        self.minus_one = x.new_tensor(-1.0)
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
        gradient, as :meth:`pyro_bbb.fast_hmc.Potential.value_and_grad`."""
        u = u.detach()
        chains = u.shape[0]
        work = self._arrays(chains, u)
        out = self._forward(u, work)
        potential, dout, noise_grad, sigma = self._likelihood(u, out, work)
        pieces = self._backward(u, dout, work)
        if noise_grad is not None:
            pieces.append(noise_grad[:, None])
        grad = torch.cat(pieces, 1)
        potential += self._add_prior(u, grad)
        ok = torch.isfinite(potential) & torch.isfinite(grad).all(-1)
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
        pieces = []
        for index in range(len(self.layers) - 1, 0, -1):
            layer = self.layers[index]
            dz, dw, db = work["dz"][index], work["dw"][index], work["db"][index]
            torch.bmm(dz, work["z"][index - 1].transpose(1, 2), out=dw)
            part = [dw.view(chains, -1)]
            if layer.bias is not None:
                torch.sum(dz, -1, out=db)
                part.append(db)
            pieces[:0] = part
            self._through_activation(u, layer, index, work)
        # First layer: [x; 1] (d + 1, N) times dz^T (N, C h): weights and bias in one
        # product, in the orientation MKL runs fastest for these shapes.
        first = self.layers[0]
        rows = chains * first.fan_out
        dw0 = work["dw0"]
        torch.mm(self.xt_ones, work["dz"][0].view(rows, -1).t(), out=dw0)
        d = first.fan_in
        weight = dw0[:d].view(d, chains, first.fan_out).permute(1, 2, 0).reshape(chains, -1)
        part = [weight] if first.bias is None else [weight, dw0[d].view(chains, -1)]
        return part + pieces

    def _through_activation(self, u: Tensor, layer: _Layer, index: int, work: dict) -> None:
        """``dU/dz`` of the layer below from ``dU/dz`` of this one: ``W^T dz`` times the
        activation's derivative, written from its output ``a`` (tanh ``1 - a^2``, ReLU
        ``a > 0``, sigmoid ``a (1 - a)``)."""
        chains = u.shape[0]
        w = u[:, layer.weight[0] : layer.weight[1]].view(chains, layer.fan_out, layer.fan_in)
        below = self.layers[index - 1]
        a, tmp, target = work["z"][index - 1], work["tmp"][index - 1], work["dz"][index - 1]
        if layer.fan_out == 1:  # an outer product: cheaper as a broadcast multiply
            torch.mul(w.transpose(1, 2), work["dz"][index], out=tmp)  # dU/da
        else:
            torch.bmm(w.transpose(1, 2), work["dz"][index], out=tmp)
        if below.activation is None:  # two Linear layers in a row
            target.copy_(tmp)
        elif below.activation == "tanh":
            torch.mul(a, a, out=target)
            torch.addcmul(tmp, tmp, target, value=-1.0, out=target)
        elif below.activation == "relu":
            torch.sign(a, out=target)
            target.mul_(tmp)
        else:  # sigmoid
            torch.mul(a, a, out=target)
            torch.sub(a, target, out=target)
            target.mul_(tmp)

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
