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

import copy
import itertools
import math
import weakref
from contextlib import ExitStack
from numbers import Real
from operator import attrgetter

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

from ._checks import positive_float

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

__all__ = ["BBBGuide", "DEFAULT_INIT_SCALE", "SiteScales"]

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


_guide_numbers = itertools.count()


def _new_param_store_prefix() -> str:
    """A param-store prefix that no other guide of this process has: "BBBGuide" for the
    first, then "BBBGuide_1", "BBBGuide_2", ..."""
    number = next(_guide_numbers)
    return "BBBGuide" if number == 0 else f"BBBGuide_{number}"


def _forget_param_store_entries(prefix: str) -> None:
    store = pyro.get_param_store()
    for key in [k for k in store.keys() if k.startswith(prefix + ".")]:
        del store[key]


class SiteScales:
    """sigma = softplus(rho) of a guide's sites, read like Pyro's ``AutoNormal.scales``.

    ``guide.scales.w`` is a tensor that autograd follows back to rho (as AutoNormal's is);
    nested site names read as ``attrgetter("0.weight")(guide.scales)`` or
    ``guide.scales["0.weight"]``.  ``guide.scales()`` gives every site as a dict of
    detached tensors.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    >>> guide = BBBGuide(model, init_scale=0.1)
    >>> _ = guide()
    >>> guide.scales.w
    tensor([0.1000, 0.1000], grad_fn=<SoftplusBackward0>)
    >>> guide.scales()
    {'w': tensor([0.1000, 0.1000])}
    """

    def __init__(self, guide: "BBBGuide", path: str = ""):
        self._guide, self._path = guide, path

    def _names(self) -> list[str]:
        return [n for n in self._guide._site_names() if n.startswith(self._path)]

    def __getitem__(self, name: str):
        name = self._path + name
        names = self._names()
        if name in names:
            return self._guide.site_scale(name)
        if any(n.startswith(name + ".") for n in names):
            return SiteScales(self._guide, name + ".")
        raise KeyError(f"{name!r} is not a site of the guide; its sites are {names}")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # copy / pickle protocol look-ups
            raise AttributeError(attr)
        try:
            return self[attr]
        except KeyError as err:
            raise AttributeError(err.args[0]) from None

    def __call__(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return {n: self._guide.site_scale(n) for n in self._names()}

    def __iter__(self):
        return iter(self._names())

    def __repr__(self) -> str:
        return f"SiteScales({self._names()})"


class BBBGuide(AutoGuide):
    r"""Mean-field Gaussian guide of Bayes by Backprop, as a Pyro ``AutoGuide``.

    A drop-in for Pyro's ``AutoNormal``: the same arguments (``init_loc_fn``,
    ``init_scale``, ``create_plates``), per-site ``locs`` and ``scales``, ``median`` and
    ``quantiles``, local latents in subsampled plates; sigma is ``softplus(rho)``.

    Parameters
    ----------
    model : callable
        A Pyro model: one from :class:`~pyro_bbb.BayesianRegressor`,
        :class:`~pyro_bbb.BayesianClassifier`, or any hand-written model whose
        latent sites are continuous.
    init_scale : float
        Initial sigma of every site (see :data:`DEFAULT_INIT_SCALE`).
    init_loc_fn : None, float, dict or callable
        Initial mu.  ``None``: the module's own weights for networks made by
        :func:`~pyro_bbb.bayesianize` (its random init keeps hidden units apart;
        a pretrained net starts where it was trained), Pyro's ``init_to_median``
        for other sites.  A float sets every mu to it (in unconstrained space);
        a dict maps site names to values; a callable is a Pyro init strategy
        (``init_to_value(values=...)``, ``init_to_feasible``, ...).
    create_plates : callable, optional
        As in Pyro's AutoGuides, for models with local latents in subsampled plates.
    init_loc : None, float, dict or callable
        Another name of ``init_loc_fn`` (give at most one of the two).

    Notes
    -----
    A local latent inside a subsampled plate has mu and rho for every data point; each
    call draws only the batch's entries (the plate's indices), as ``AutoNormal`` does.
    ``guide.locs.<site>`` is mu, ``guide.scales.<site>`` is sigma (see
    :class:`SiteScales`).  ``get_posterior()`` without a site name gives
    ``{site: q(site)}``: the mean-field q is the product of these marginals.

    ``pickle`` / ``torch.save`` keep the parameters and the set-up, not the model (as
    Pyro's AutoGuides do): a reloaded guide samples, predicts and trains on as before,
    but must have been run once before it was saved.  ``copy.deepcopy`` shares the model.
    Each guide, reloaded and copied ones included, registers its parameters in Pyro's
    param store under a prefix of its own, so Pyro's ``SVI`` on one never moves another.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> def model(x, y=None):
    ...     w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    ...     with pyro.plate("data", x.shape[0]):
    ...         return pyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)
    >>> guide = BBBGuide(model)
    >>> x, y = torch.randn(10, 2), torch.bernoulli(torch.full((10,), 0.5))
    >>> guide(x, y)["w"].shape
    torch.Size([2])
    >>> guide.snr()["w"].shape
    torch.Size([2])
    >>> guide.locs.w.shape, guide.scales.w.shape
    (torch.Size([2]), torch.Size([2]))
    """

    def __init__(
        self,
        model,
        *,
        init_scale: float = DEFAULT_INIT_SCALE,
        init_loc_fn=None,
        create_plates=None,
        init_loc=None,
    ):
        init_scale = positive_float("init_scale", init_scale)
        if init_loc is not None:
            if init_loc_fn is not None:
                raise ValueError("init_loc is another name of init_loc_fn: give one, not both")
            init_loc_fn = init_loc
        if not (init_loc_fn is None or isinstance(init_loc_fn, (Real, dict)) or callable(init_loc_fn)):
            raise ValueError(
                "init_loc_fn must be None, a float, a dict or a callable, "
                f"got {type(init_loc_fn).__name__}"
            )
        self.init_scale = init_scale
        self.init_loc_fn = init_loc_fn
        self._user_model = (model,)  # a tuple keeps the model out of the guide's submodules
        super().__init__(InitMessenger(self._init_value)(model), create_plates=create_plates)
        self._use_own_param_store_names()

    # -- param-store names, copies, pickles ---------------------------------------------------
    def _use_own_param_store_names(self) -> None:
        # Pyro's SVI finds a guide's parameters through the global param store, where
        # PyroModule registers each under the module's name ("BBBGuide.loc.w").  Under the
        # one class-wide name AutoGuide gives, a copy (torch.load, pickle, deepcopy) or a
        # second guide would share the first one's entries, and SVI on it would move the
        # first one's tensors.  So every instance renames itself (and its submodules) to a
        # prefix of its own; the entries leave the store when the guide is collected.
        old, new = self._pyro_name, _new_param_store_prefix()
        for module in self.modules():
            name = getattr(module, "_pyro_name", None)
            if isinstance(module, PyroModule) and (name == old or name.startswith(old + ".")):
                module._pyro_name = new + name[len(old) :]
        weakref.finalize(self, _forget_param_store_entries, new).atexit = False

    def __getstate__(self):
        # As AutoGuide, leave out the model (a local function, a module holding data) and
        # with it the init strategy: both serve the set-up only.  Unlike AutoGuide, which
        # clears the original's reference to the model, only the saved state loses them.
        state = dict(PyroModule.__getstate__(self))
        state.update(_model=(None,), _user_model=(None,), master=None, init_loc_fn=None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._use_own_param_store_names()

    def __deepcopy__(self, memo):
        # Copies of the parameters and the set-up, the same model (not part of the state).
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = dict(PyroModule.__getstate__(self))
        shared = {key: state.pop(key) for key in ("_model", "_user_model")}
        state = copy.deepcopy(state, memo)
        state.update(shared, master=None)
        new.__setstate__(state)
        return new

    def load_state_dict(self, state_dict, *args, **kwargs):
        """As :meth:`torch.nn.Module.load_state_dict`, into a guide that has been run once.

        The guide makes its parameters when it first sees the model's arguments, so a guide
        that never ran has none to load into: run it once (``guide(x, y)``) first.

        Examples
        --------
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("w", dist.Normal(0.0, 1.0))
        >>> trained, fresh = BBBGuide(model), BBBGuide(model)
        >>> _ = trained(), fresh()
        >>> fresh.load_state_dict(trained.state_dict())
        <All keys matched successfully>
        """
        if self.prototype_trace is None and len(state_dict):
            raise RuntimeError(
                "load_state_dict: this guide has no parameters yet (it makes them when it first "
                "sees the model's arguments); run the guide once, e.g. guide(x, y) or "
                "fit(model, guide, x, y, ...), before load_state_dict"
            )
        return super().load_state_dict(state_dict, *args, **kwargs)

    # -- set-up -----------------------------------------------------------------------
    def _init_value(self, site):
        spec = self.init_loc_fn
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
        # param store (one loaded from disk, say), instead of this guide's initial value.
        loc, rho = PyroModule(), PyroModule()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:  # Pyro's AutoGuides' message, with this guide
                raise ValueError(
                    f"Continuous inference cannot handle discrete sample site '{name}'. "
                    "Consider enumerating that variable as documented in "
                    "https://pyro.ai/examples/enumeration.html . "
                    "If you are already enumerating, take care to hide this site when "
                    "constructing an autoguide, e.g. "
                    f"guide = BBBGuide(poutine.block(model, hide=['{name}']))."
                )
            with helpful_support_errors(site):  # e.g. a sphere: points to a reparameterizer
                transform = _unconstraining_inverse(site["fn"].support)
                init_loc = transform.inv(site["value"].detach()).detach()
            event_dim = site["fn"].event_dim + init_loc.dim() - site["value"].dim()
            for frame in site["cond_indep_stack"]:  # subsampled local latents: full size
                full_size = frame.full_size or frame.size
                if full_size != frame.size:
                    init_loc = periodic_repeat(init_loc, full_size, frame.dim - event_dim)
            init_rho = inverse_softplus(torch.full_like(init_loc, self.init_scale))
            # A copy: for a real site the value is the model's own initial tensor (identity transform),
            # which the optimizer must not move.
            deep_setattr(loc, name, nn.Parameter(init_loc.clone(memory_format=torch.contiguous_format)))
            deep_setattr(rho, name, nn.Parameter(init_rho))
            self._event_dims[name] = event_dim
            self._transforms[name] = None if _is_real(site["fn"].support) else transform
        self.loc, self.rho = loc, rho
        # Same reason: drop stale entries of these names from the param store, so Pyro's
        # SVI and pyro.optim see this guide's parameters.
        _forget_param_store_entries(f"{self._pyro_name}.loc")
        _forget_param_store_entries(f"{self._pyro_name}.rho")

    def _site_names(self):
        if self.prototype_trace is None:
            raise RuntimeError("the guide is not set up yet: call it once, or fit() it, first")
        return [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]

    # -- the guide ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Draw every latent site from q; returns ``{name: value}``.

        A local latent in a subsampled plate is drawn for the batch only: its mu and rho
        are read at the plate's indices."""
        if self.prototype_trace is None:
            if self.model is None:
                raise RuntimeError(
                    "this guide was saved before it was ever run and has no model: run a guide "
                    "once (guide(x, y) or fit(...)) before saving it"
                )
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                batch = []  # (dim, indices) of the subsampled plates around the site
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        plate = plates[frame.name]
                        stack.enter_context(plate)
                        if plate.subsample_size < plate.size:
                            batch.append((frame.dim, plate.indices))
                q = self._batch_posterior(name, batch) if batch else self.get_posterior(name)
                result[name] = pyro.sample(name, q)
        return result

    def _batch_posterior(self, name: str, batch) -> dist.Distribution:
        loc, rho = attrgetter(name)(self.loc), attrgetter(name)(self.rho)
        for dim, indices in batch:
            dim -= self._event_dims[name]
            if loc.dim() >= -dim and loc.shape[dim] > 1:  # size 1: broadcast over the plate
                loc = loc.index_select(dim, indices.to(loc.device))
                rho = rho.index_select(dim, indices.to(rho.device))
        return self._posterior(name, loc, rho)

    def _posterior(self, name: str, loc: Tensor, rho: Tensor) -> dist.Distribution:
        q = SoftplusNormal(loc, rho).to_event(self._event_dims[name])
        transform = self._transforms[name]
        return q if transform is None else dist.TransformedDistribution(q, transform)

    def get_posterior(self, name: str | None = None, *args, **kwargs):
        """q of one site as a distribution: ``Normal(mu, softplus(rho))`` with the site's
        event dims, pushed to the site's support when constrained.

        Without a site name (or called with the model's arguments, as Pyro's
        ``AutoGuide.get_posterior(*args, **kwargs)``): ``{site: q(site)}`` for every site;
        the mean-field q is the product of these marginals.

        Examples
        --------
        >>> import pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("w", dist.Normal(0.0, 1.0))
        ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
        >>> guide = BBBGuide(model)
        >>> _ = guide()
        >>> guide.get_posterior("s").support
        GreaterThan(lower_bound=0.0)
        >>> sorted(guide.get_posterior())
        ['s', 'w']
        """
        if not isinstance(name, str):
            return {n: self.get_posterior(n) for n in self._site_names()}
        return self._posterior(name, attrgetter(name)(self.loc), attrgetter(name)(self.rho))

    @property
    def locs(self) -> PyroModule:
        """mu of every site, as AutoNormal's ``guide.locs``: ``guide.locs.w``, or
        ``attrgetter("0.weight")(guide.locs)`` for nested names (in unconstrained space).
        The module that holds these parameters (also ``guide.loc``)."""
        return self.loc

    @property
    def scales(self) -> SiteScales:
        """sigma = softplus(rho) of every site, as AutoNormal's ``guide.scales``:
        ``guide.scales.w``; ``guide.scales()`` is the dict of all sites (detached)."""
        return SiteScales(self)

    def site_scale(self, name: str) -> Tensor:
        """sigma = softplus(rho) of site ``name`` (autograd follows it back to rho)."""
        return F.softplus(attrgetter(name)(self.rho))

    # -- summaries --------------------------------------------------------------------------
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
