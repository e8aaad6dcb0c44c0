"""Bayesian neural networks as Pyro models, from any ``torch.nn.Module``.

:func:`bayesianize` turns every parameter tensor of a module into one Pyro sample
site named by its module path (``"0.weight"``), and runs the untouched module
with :func:`torch.func.functional_call`.  Weights with leading sample dimensions
(vectorized particles, ``Predictive(parallel=True)``, chains) go through one
:func:`torch.func.vmap`-ed forward pass, so no layer has to be rewritten and no
Python loop runs over draws.

:class:`BayesianRegressor` and :class:`BayesianClassifier` add a likelihood in a
subsampling-aware data plate: ``model(x, y=None, num_data=None)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn
from torch.nn import functional as F
from torch.func import functional_call, vmap

from . import _checks
from .priors import PriorSpec, prior_on_device, resolve_prior

__all__ = ["BayesianNetwork", "bayesianize", "BayesianRegressor", "BayesianClassifier"]


class BayesianNetwork(PyroModule):
    """A module whose parameters are Pyro sample sites; build it with :func:`bayesianize`.

    Attributes
    ----------
    net : nn.Module
        A private copy of the user's module.  Its Bayesian parameters became
        buffers holding their initial values (the guide starts its means there);
        excluded parameters stay ordinary ``nn.Parameter`` s.
    site_names : tuple of str
        The sample sites, one per Bayesian parameter tensor, in module order.
    """

    def __init__(self, module: nn.Module, prior: PriorSpec, exclude: Iterable[str] = ()):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        net = copy.deepcopy(module)
        exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        all_names = [n for n, _ in net.named_parameters(remove_duplicate=False)]
        if len(all_names) != len(dict(net.named_parameters())):
            raise ValueError("modules with tied (shared) parameters are not supported")
        names = [n for n in all_names if not _is_excluded(n, exclude)]
        if not names:
            raise ValueError(
                f"no parameter left to make Bayesian (parameters: {all_names}, exclude: {exclude})"
            )
        unmatched = [p for p in exclude if not any(_is_excluded(n, (p,)) for n in all_names)]
        if unmatched:
            raise ValueError(f"exclude: {unmatched} match no parameter of {all_names}")
        priors = {}
        for name in names:
            module_path, _, leaf = name.rpartition(".")
            owner = net.get_submodule(module_path)
            value = owner._parameters.pop(leaf).detach().clone()
            owner.register_buffer(leaf, value)
            priors[name] = resolve_prior(prior, name, value)
        self.net = net
        self.site_names = tuple(names)
        self.site_shapes = {n: net.get_buffer(n).shape for n in names}
        self._priors = priors
        self._priors_by_device: dict = {}

    # -- priors ----------------------------------------------------------------
    def priors(self, device=None, dtype=None) -> dict[str, dist.Distribution]:
        """The prior of every site, with parameters on ``device`` (default: the net's)."""
        ref = self.net.get_buffer(self.site_names[0])
        key = (torch.device(device) if device is not None else ref.device, dtype or ref.dtype)
        if key not in self._priors_by_device:
            self._priors_by_device[key] = {
                n: prior_on_device(p, *key) for n, p in self._priors.items()
            }
        return self._priors_by_device[key]

    def initial_values(self) -> dict[str, Tensor]:
        """The module's own parameter values (random init or pretrained), per site."""
        return {n: self.net.get_buffer(n) for n in self.site_names}

    # -- sampling and evaluation --------------------------------------------------
    def sample_weights(self) -> dict[str, Tensor]:
        """One ``pyro.sample`` statement per parameter tensor; returns the values."""
        return {n: pyro.sample(n, p) for n, p in self.priors().items()}

    def evaluate(self, weights: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Network output for given weights, batched over their leading sample dims.

        ``weights[name]`` has shape ``batch_shape + site_shape``; the result has
        shape ``batch_shape + output_shape``, computed in one vmapped call.
        """
        batch_shape = self.batch_shape(weights)
        layers = self.mlp_layers()
        if not batch_shape:
            if layers is not None:  # what nn.Linear runs, minus functional_call's module swaps
                return self._mlp_forward(layers, weights, x, batched=False)
            return functional_call(self.net, dict(weights), (x,))
        if layers is not None and x.dim() == 2:
            return self._mlp_forward(layers, weights, x)
        flat = {
            n: weights[n].expand(batch_shape + s).reshape((-1,) + s)
            for n, s in self.site_shapes.items()
        }
        out = vmap(
            lambda w: functional_call(self.net, w, (x,)), randomness="different"
        )(flat)
        return out.reshape(batch_shape + out.shape[1:])

    def mlp_layers(self):
        """For a ``Linear`` or an ``nn.Sequential`` of ``Linear`` and parameter-free
        elementwise modules whose parameters are all sample sites: the layers, as
        ``(weight, bias | None)`` site names or a module.  None for any other network
        (the direct forward here and the fused HMC potential read it)."""
        if not hasattr(self, "_mlp_cache"):
            self._mlp_cache = _mlp_layers(self.net, self.site_shapes)
        return self._mlp_cache

    @staticmethod
    def _mlp_forward(layers, weights, x, batched=True):
        # Batched weights as a leading dimension of plain matrix products: the same
        # output as vmap over functional_call without vmap's per-call batching rules
        # (several times faster for small networks on a CPU).  With one batch dimension
        # shared by all weights, each Linear is one baddbmm (the bias added in the
        # product) and known activations run in place on the layer's own output.
        fused = False
        if batched:
            lead = {weights[n].shape[:-1 if is_bias else -2] for n, is_bias in _sites_of(layers)}
            fused = len(lead) == 1 and len(next(iter(lead))) == 1
        h, owned = x, False  # owned: h is this function's intermediate, safe to overwrite
        for layer in layers:
            if isinstance(layer, nn.Module):
                inplace = _INPLACE.get(type(layer)) if owned else None
                h = inplace(h) if inplace is not None else layer(h)
                continue
            weight, bias = layer
            w, b = weights[weight], None if bias is None else weights[bias]
            if not batched:
                h = F.linear(h, w, b)
            elif fused:
                if h.dim() == 2:  # the shared inputs, viewed per draw (no copy)
                    h = h.expand((w.shape[0],) + h.shape)
                wt = w.transpose(-1, -2)
                h = torch.bmm(h, wt) if b is None else torch.baddbmm(b.unsqueeze(-2), h, wt)
            else:
                h = torch.matmul(h, w.transpose(-1, -2))
                if b is not None:
                    h = h + b.unsqueeze(-2)
            owned = True
        return h

    def batch_shape(self, weights: Mapping[str, Tensor]) -> torch.Size:
        """The broadcast leading (sample) shape of a dict of weight values."""
        shapes = []
        for name, shape in self.site_shapes.items():
            if name not in weights:
                raise KeyError(f"no value for weight site {name!r}")
            value = weights[name]
            lead = value.dim() - len(shape)
            if lead < 0 or value.shape[lead:] != shape:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(value.shape)}, expected (..., *{tuple(shape)})"
                )
            shapes.append(value.shape[:lead])
        return torch.broadcast_shapes(*shapes)

    def forward(self, x: Tensor) -> Tensor:
        return self.evaluate(self.sample_weights(), x)

    @property
    def input_shape(self) -> tuple | None:
        """The per-row input shape the first layer reads, ``None`` for a free size:
        ``(in_features,)`` for a Linear, ``(in_channels, None, ...)`` for a Conv.  None
        when the network does not start with one (a custom module may reshape first)."""
        first = self.net
        while type(first) is nn.Sequential and len(first) > 0:
            first = first[0]
        if isinstance(first, nn.Linear) and first.in_features > 0:
            return (first.in_features,)
        if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and first.in_channels > 0:
            return (first.in_channels,) + (None,) * len(first.kernel_size)
        return None

    @property
    def num_hidden_layers(self) -> int:
        """Parametrized leaf modules minus one: 0 means the weights are identifiable."""
        owners = {n.rpartition(".")[0] for n in self.site_names}
        owners |= {n.rpartition(".")[0] for n, _ in self.net.named_parameters()}
        return len(owners) - 1


def _is_excluded(name: str, patterns: tuple[str, ...]) -> bool:
    import fnmatch

    return any(
        name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def bayesianize(
    module: nn.Module, prior: PriorSpec, exclude: Iterable[str] = ()
) -> BayesianNetwork:
    """Turn a torch module into a :class:`BayesianNetwork` with a prior on its weights.

    Parameters
    ----------
    module : nn.Module
        Any module (Linear, Conv1d/2d, nested Sequentials, your own class).  It is
        copied; the original stays usable as a plain network.
    prior : distribution, mapping or callable
        See :data:`pyro_bbb.priors.PriorSpec`: one distribution for all weights,
        ``{"pattern": distribution}`` (first match wins), or ``f(name, param)``.
    exclude : iterable of str
        Parameter names, module prefixes (``"0"`` excludes ``"0.weight"`` and
        ``"0.bias"``) or fnmatch patterns that stay deterministic.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
    >>> bnn = bayesianize(net, dist.Normal(0.0, 1.0))
    >>> bnn.site_names
    ('0.weight', '0.bias', '2.weight', '2.bias')
    >>> w = {n: torch.randn(7, *s) for n, s in bnn.site_shapes.items()}  # 7 draws
    >>> bnn.evaluate(w, torch.zeros(10, 1)).shape
    torch.Size([7, 10, 1])
    """
    return BayesianNetwork(module, prior, exclude)


class _BayesianModel(PyroModule):
    """A Bayesian network plus a likelihood; call as ``model(x, y=None, num_data=None)``."""

    task: str

    def __init__(self, net, prior, exclude):
        super().__init__()
        if isinstance(net, BayesianNetwork):
            if prior is not None:
                raise ValueError("prior: net is already Bayesian; pass prior=None")
            self.network = net
        else:
            if prior is None:
                raise ValueError("prior is required (e.g. pyro.distributions.Normal(0., 1.))")
            self.network = bayesianize(net, prior, exclude)

    # Subclasses define the likelihood and any extra latent sites.
    def extra_priors(self) -> dict[str, dist.Distribution]:
        return {}

    def likelihood(self, f: Tensor, latents: Mapping[str, Tensor]) -> dist.Distribution:
        raise NotImplementedError

    def target_shape(self, x: Tensor) -> tuple:
        """The per-row shape of targets for inputs ``x`` (``()``: one scalar per row),
        read off the network's output on the first row."""
        ref = next(iter(self.initial_values().values()))
        with torch.no_grad():
            f = self.output(self.initial_values(), x[:1].to(device=ref.device, dtype=ref.dtype))
        return self._target_shape(f.shape[1:])

    def _target_shape(self, output_shape) -> tuple:
        # Per-row target shape for a per-row output shape (from :meth:`output`).
        return tuple(output_shape)

    # -- the Pyro model ------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor | None = None, num_data: int | None = None) -> Tensor:
        latents = self.network.sample_weights()
        latents.update({n: pyro.sample(n, p) for n, p in self.extra_priors().items()})
        # Plates outside the data plate (particles, parallel Predictive) give every global
        # latent batch shape (..., K, 1): the trailing 1 is the data dim.  Drop it so that
        # f = (..., K, n) lines up with the plates.
        batch = self.network.batch_shape(latents)
        if batch and batch[-1] == 1:
            latents = {k: v.squeeze(len(batch) - 1) for k, v in latents.items()}
            batch = batch[:-1]
        x = _checks.as_tensor("x", x)
        dtype = next(iter(latents.values())).dtype
        if x.dtype != dtype:  # numpy float64 into a float32 network
            x = x.to(dtype)
        f = self.output(latents, x)
        n = x.shape[0]
        if y is not None:  # never a broadcast (n, n) likelihood: y in the shape f calls for
            row = self._target_shape(f.shape[len(batch) + 1 :])
            y = _checks.targets(y, n, row, self.task == "classification", f.dtype)
        with pyro.plate("data", size=num_data or n, subsample=torch.arange(n, device=x.device)):
            pyro.sample("y", self.likelihood(f, self._lift(latents, f)), obs=y)
        return f

    # -- batched densities over draws (prediction, InferenceData, HMC) -------------
    @property
    def latent_names(self) -> tuple[str, ...]:
        return self.network.site_names + tuple(self.extra_priors())

    def initial_values(self) -> dict[str, Tensor]:
        return self.network.initial_values()

    def output(self, latents: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The likelihood's parameter f(x) (regression mean, or logits) per draw."""
        return self._output(self.network.evaluate(latents, x))

    def log_prior(self, latents: Mapping[str, Tensor]) -> Tensor:
        """log p(theta) per draw, summed over all latent sites (constrained space)."""
        priors = {**self.network.priors(), **self.extra_priors()}
        return sum(p.log_prob(latents[n]) for n, p in priors.items())

    def log_likelihood(self, latents: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Pointwise log p(y_i | theta, x_i), shape ``batch_shape + (n,)``."""
        f = self.output(latents, x)
        return self.likelihood(f, self._lift(latents, f)).log_prob(y)

    def log_joint(self, latents: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """log p(theta, y | x) per draw: what a Pyro trace of ``model(x, y)`` sums to."""
        return self.log_prior(latents) + self.log_likelihood(latents, x, y).sum(-1)

    def sample_y(self, latents: Mapping[str, Tensor], f: Tensor) -> Tensor:
        """Draws of y given per-draw outputs ``f`` (from :meth:`output`)."""
        return self.likelihood(f, self._lift(latents, f)).sample()

    def _lift(self, latents, f):
        # Scalar extra latents of batch shape (S,) broadcast against f of shape (S, n, ...).
        lifted = dict(latents)
        for name in self.extra_priors():
            v = latents[name]
            lifted[name] = v.reshape(v.shape + (1,) * (f.dim() - v.dim()))
        return lifted

    def _output(self, out: Tensor) -> Tensor:
        return out


class BayesianRegressor(_BayesianModel):
    """Regression: y ~ Normal(net(x), noise) with a prior on the network's weights.

    Parameters
    ----------
    net : nn.Module or BayesianNetwork
        Output shape ``(n, 1)`` (targets ``(n,)``) or ``(n, d)`` (targets ``(n, d)``).
    prior : prior spec
        Prior on the weights, see :func:`bayesianize`.
    noise : float or "learned"
        Observation noise std.  ``"learned"`` makes it a latent site ``"noise"``
        with prior ``noise_prior``.
    noise_prior : distribution, default ``LogNormal(0, 1)``
        Prior of a learned noise std.  The default has median 1 (the std of
        standardized targets) and 95% of its mass in [0.14, 7.1]; being log-normal
        it pairs with the guide's log-normal posterior, so the KL is analytic.
    exclude : iterable of str
        Parameters kept deterministic, see :func:`bayesianize`.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> model = BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
    >>> model(torch.zeros(5, 1)).shape
    torch.Size([5])
    """

    task = "regression"

    def __init__(self, net, prior=None, *, noise=0.1, noise_prior=None, exclude=()):
        super().__init__(net, prior, exclude)
        noise = _checks.noise_scale(noise)
        if noise == "learned":
            self._noise_prior = noise_prior or dist.LogNormal(0.0, 1.0)
            if self._noise_prior.support is not dist.constraints.positive:
                raise ValueError("noise_prior must have positive support (e.g. LogNormal)")
            if "noise" in self.network.site_names:
                raise ValueError("the network has a parameter named 'noise'; rename it")
            self.noise = None
        else:
            if noise_prior is not None:
                raise ValueError("noise_prior is only used with noise='learned'")
            self.noise = float(noise)
            self._noise_prior = None

    def extra_priors(self):
        if self._noise_prior is None:
            return {}
        ref = self.network.net.get_buffer(self.network.site_names[0])
        key = (ref.device, ref.dtype)
        if getattr(self, "_noise_prior_key", None) != key:
            self._noise_prior_on_device = prior_on_device(self._noise_prior, *key)
            self._noise_prior_key = key
        return {"noise": self._noise_prior_on_device}

    def likelihood(self, f, latents):
        scale = latents["noise"] if self.noise is None else self.noise
        d = dist.Normal(f, scale)
        return d.to_event(1) if self._multi_output else d

    def _output(self, out):
        self._multi_output = out.shape[-1] != 1
        return out if self._multi_output else out.squeeze(-1)



class BayesianClassifier(_BayesianModel):
    """Classification: y ~ Categorical(logits=net(x)) (or Bernoulli for one output).

    The likelihood takes logits directly (never ``log(softmax)``), which keeps it
    finite for logits of any size.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> model = BayesianClassifier(net, prior=dist.Normal(0.0, 1.0))
    >>> model(torch.zeros(5, 4)).shape
    torch.Size([5, 3])
    """

    task = "classification"

    def __init__(self, net, prior=None, *, exclude=()):
        super().__init__(net, prior, exclude)

    def likelihood(self, f, latents):
        if f.shape[-1] == 1:
            return _LabelBernoulli(logits=f.squeeze(-1))
        return dist.Categorical(logits=f)

    def _target_shape(self, output_shape):
        return ()  # one label per row, whatever the number of logits

    def num_classes(self, x: Tensor) -> int:
        with torch.no_grad():
            out = self.network.evaluate(self.network.initial_values(), x[:1])
        return max(2, out.shape[-1])


class _LabelBernoulli(dist.Bernoulli):
    """Bernoulli over integer labels {0, 1}, so both likelihoods take the same y."""

    def log_prob(self, value):
        return super().log_prob(value.to(self.logits.dtype))

    def sample(self, sample_shape=torch.Size()):
        return super().sample(sample_shape).long()


_ELEMENTWISE = (
    nn.Tanh, nn.ReLU, nn.Sigmoid, nn.SiLU, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Softplus,
    nn.Identity, nn.Mish, nn.Softsign,
)


# Activations of _ELEMENTWISE that have an in-place form with the same result and backward.
_INPLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_}


def _sites_of(layers):
    """(site name, is a bias) of each Linear of ``layers``."""
    for layer in layers:
        if not isinstance(layer, nn.Module):
            yield layer[0], False
            if layer[1] is not None:
                yield layer[1], True


def _mlp_layers(net: nn.Module, site_shapes: Mapping[str, torch.Size]):
    """See :meth:`BayesianNetwork.mlp_layers`."""
    if type(net) is nn.Linear:
        children = [("", net)]
    elif type(net) is nn.Sequential:
        children = [(f"{name}.", module) for name, module in net.named_children()]
    else:
        return None
    layers = []
    for prefix, module in children:
        if type(module) is nn.Linear:
            # Every tensor the layer holds must be a sample site (a deterministic,
            # excluded parameter would be left out of the direct forward).
            if any(getattr(module, leaf) is not None and f"{prefix}{leaf}" not in site_shapes
                   for leaf in ("weight", "bias")):
                return None
            layers.append((f"{prefix}weight", f"{prefix}bias" if module.bias is not None else None))
        elif type(module) in _ELEMENTWISE and not list(module.parameters()):
            layers.append(module)
        else:
            return None
    return layers
