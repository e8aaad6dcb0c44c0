"""Weight pruning by signal-to-noise ratio (Blundell et al. 2015, section 5.1, Table 2).

Bayes by Backprop learns an uncertainty per weight, so a weight whose posterior
mean is small compared with its posterior std (a low signal-to-noise ratio
``|mu| / sigma``) can be removed.  :func:`prune` ranks the weights of all network
sites together (one global ranking, as in the paper), and fixes the lowest
``fraction`` of them at a constant 0: ``mu = 0`` and ``sigma = 0``, so every draw of
a pruned weight is exactly 0.

Mechanism.  ``sigma = softplus(rho)`` is never exactly 0, and ``rho = -inf`` would
make ``log q`` infinite, so a pruned guide carries an explicit boolean mask per
site (``guide.keep_mask(name)``: True = kept) that every way of reading the guide
honours: :meth:`~PrunedBBBGuide.sample_posterior`, :meth:`~PrunedBBBGuide.forward`
/ :meth:`~PrunedBBBGuide.get_posterior` (so Pyro's ``Predictive`` sees the zeros
too), ``median`` / ``quantiles``, ``scales`` (0 where pruned), ``snr`` (0 where
pruned) and ``log_density`` (the density of the kept weights only: a pruned weight
is a constant of the network, no longer a random variable).  The guide's ``mu`` of
a pruned weight is set to 0 as well; its ``rho`` is left as it was and affects no
draw, density or summary.

A pruned guide is a :class:`PrunedBBBGuide`, a small subclass of
:class:`~pyro_bbb.BBBGuide`.  It is meant for prediction and for reading the
posterior.  **Training a pruned guide further is not supported** (``fit`` would
not use its fast path, and pruned weights could not come back): prune after
training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Real
from operator import attrgetter

import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import register_kl

from .guide import BBBGuide, SoftplusNormal, _kl_softplus_normal

__all__ = ["prune", "PrunedBBBGuide", "PruneSummary"]


@dataclass(frozen=True)
class PruneSummary:
    """What :func:`prune` did.

    Attributes
    ----------
    fraction : float
        The fraction asked for.
    num_weights : int
        Weights in the ranked sites together.
    num_removed : int
        Weights fixed at 0 (``floor(fraction * num_weights)``, or more if the guide
        had already been pruned further).
    threshold_snr : float
        Largest SNR among the removed weights (0.0 when none was removed).
    removed_per_site : dict
        ``{site: number removed}``.
    """

    fraction: float
    num_weights: int
    num_removed: int
    threshold_snr: float
    removed_per_site: dict = field(default_factory=dict)

    @property
    def num_kept(self) -> int:
        return self.num_weights - self.num_removed


class _PrunedNormal(SoftplusNormal):
    """``Normal(mu, softplus(rho))`` where ``keep`` is True, the constant 0 elsewhere.

    ``log_prob`` and ``entropy`` count the kept elements only (the pruned ones are
    not random), so they stay finite."""

    def __init__(self, loc, rho, keep, validate_args=None):
        self.keep = keep
        super().__init__(loc, rho, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_PrunedNormal, _instance)
        new.keep = self.keep.expand(torch.Size(batch_shape))
        return super().expand(batch_shape, _instance=new)

    def _zero_pruned(self, value: Tensor) -> Tensor:
        return torch.where(self.keep, value, torch.zeros((), dtype=value.dtype, device=value.device))

    def rsample(self, sample_shape=torch.Size()):
        return self._zero_pruned(super().rsample(sample_shape))

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        return self._zero_pruned(super().log_prob(value))

    def entropy(self):
        return self._zero_pruned(super().entropy())


@register_kl(_PrunedNormal, torch.distributions.Normal)
def _kl_pruned_normal(q, p):
    return q._zero_pruned(_kl_softplus_normal(q, p))


class PrunedBBBGuide(BBBGuide):
    """A :class:`~pyro_bbb.BBBGuide` with some weights fixed at exactly 0.

    Made by :func:`prune`, not directly.  ``keep_mask(name)`` is the boolean mask
    of a site (True = kept); sites that were not ranked have no mask.  Everything
    that draws from or summarizes the guide applies the masks (see the module
    docstring).  Training it further is not supported.
    """

    # -- masks -------------------------------------------------------------------
    def _masks(self) -> dict[str, Tensor]:
        keep = self.__dict__["_modules"].get("keep")
        if keep is None:
            return {}
        return {name: keep.get_buffer(name) for name in self._pruned_sites}

    def keep_mask(self, name: str) -> Tensor | None:
        """Boolean mask of site ``name`` (True = kept), or None if it was not pruned."""
        return self._masks().get(name)

    def _set_masks(self, masks: dict[str, Tensor]) -> None:
        keep = nn.Module()
        for name, mask in masks.items():
            owner = keep
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_buffer(leaf, mask.detach().clone().to(torch.bool))
        self._pruned_sites = tuple(masks)
        self.keep = keep

    def _apply(self, value: Tensor, name: str) -> Tensor:
        mask = self.keep_mask(name)
        if mask is None:
            return value
        return torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device))

    # -- the guide -----------------------------------------------------------------
    def get_posterior(self, name: str | None = None, *args, **kwargs):
        if not isinstance(name, str):  # every site, as BBBGuide.get_posterior()
            return super().get_posterior(name, *args, **kwargs)
        mask = self.keep_mask(name)
        if mask is None:
            return super().get_posterior(name)
        q = _PrunedNormal(attrgetter(name)(self.loc), attrgetter(name)(self.rho), mask)
        return q.to_event(self._event_dims[name])

    # -- summaries --------------------------------------------------------------------
    def site_scale(self, name: str) -> Tensor:
        """sigma of site ``name``, exactly 0 for pruned weights (also in ``guide.scales``)."""
        return self._apply(super().site_scale(name), name)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, Tensor]:
        """Marginal quantiles; every quantile of a pruned weight is 0."""
        return {n: self._apply(v, n) for n, v in super().quantiles(quantiles).items()}

    @torch.no_grad()
    def snr(self) -> dict[str, Tensor]:
        """|mu| / sigma per weight; 0 for pruned weights (mu = sigma = 0)."""
        return {n: self._apply(v, n) for n, v in super().snr().items()}

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, generator: torch.Generator | None = None):
        """As :meth:`BBBGuide.sample_posterior`, with pruned weights exactly 0.  Kept
        weights are the very draws the unpruned guide would give with the same
        random state."""
        draws = super().sample_posterior(num_samples, generator=generator)
        return {n: self._apply(v, n) for n, v in draws.items()}


def _check_fraction(fraction) -> float:
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, Real)
        or not math.isfinite(fraction)
        or not 0 <= fraction < 1
    ):
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    return float(fraction)


def _ranked_sites(guide: BBBGuide, sites) -> tuple[str, ...]:
    known = guide._site_names()
    if sites is None:
        network = getattr(guide._user_model[0], "network", None)
        if network is None or not hasattr(network, "site_names"):
            raise ValueError(
                "sites: the guide's model has no Bayesian network (model.network.site_names); "
                "name the sites to prune"
            )
        sites = network.site_names
    elif isinstance(sites, str):
        sites = (sites,)
    sites = tuple(sites)
    if not sites:
        raise ValueError("sites: name at least one site")
    unknown = [s for s in sites if s not in known]
    if unknown:
        raise ValueError(f"sites: {unknown} are not sites of the guide ({known})")
    constrained = [s for s in sites if guide._transforms[s] is not None]
    if constrained:
        raise ValueError(f"sites: {constrained} are constrained (not weights) and cannot be pruned")
    return sites


def prune(
    guide: BBBGuide,
    fraction: float,
    *,
    inplace: bool = True,
    sites: Iterable[str] | None = None,
) -> PrunedBBBGuide:
    """Remove the weights with the lowest signal-to-noise ratio ``|mu| / sigma``.

    The weights of all ranked sites are ranked together (one global ranking, as in
    Blundell et al. 2015, section 5.1), and the lowest ``floor(fraction * n)`` of
    them are fixed at the constant 0: their ``mu`` becomes 0 and their ``sigma`` 0,
    so every draw of a pruned weight is exactly 0 while the kept weights are drawn
    as before.  Ties in SNR are broken by position (a stable sort over the sites in
    order, each flattened row-major).  Weights already pruned rank first, so
    pruning again by a larger fraction removes a superset.

    Parameters
    ----------
    guide : BBBGuide
        A trained guide (it must be set up).
    fraction : float in [0, 1)
        Share of the ranked weights to remove.  0 removes none.
    inplace : bool, default True
        True: the guide itself becomes a :class:`PrunedBBBGuide` (its class is
        swapped, as ``torch.nn.utils.parametrize`` does) and is returned.  False:
        the guide is left untouched and a pruned copy, sharing the model, is
        returned.
    sites : iterable of str, optional
        The sites to rank.  Default: the network's weight sites
        (``model.network.site_names``, biases included) of a pyro_bbb model -- never
        a learned noise or other extra latent.

    Returns
    -------
    PrunedBBBGuide
        The pruned guide.  ``guide.prune_summary`` (a :class:`PruneSummary`) says
        how many weights were removed and at which SNR; ``guide.keep_mask(name)``
        gives the mask of a site.

    Notes
    -----
    Use the pruned guide for prediction (:func:`~pyro_bbb.predict`,
    ``sample_posterior``, Pyro's ``Predictive``) and for summaries.  Training a
    pruned guide further is not supported.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> from pyro_bbb.prune import prune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> model = bbb.BayesianClassifier(net, prior=dist.Normal(0.0, 1.0))
    >>> guide = bbb.BBBGuide(model)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> _ = bbb.fit(model, guide, x, y, epochs=3, progress=False, seed=0)
    >>> pruned = prune(guide, 0.75, inplace=False)
    >>> pruned.prune_summary.num_weights, pruned.prune_summary.num_removed
    (131, 98)
    >>> draws = pruned.sample_posterior(100)
    >>> int(sum((d[0] == 0).sum() for d in draws.values()))
    98
    >>> bbb.predict(model, pruned, x, num_samples=10).mean_probs.shape
    torch.Size([32, 3])
    """
    if not isinstance(guide, BBBGuide):
        raise ValueError(f"guide must be a BBBGuide, got {type(guide).__name__}")
    fraction = _check_fraction(fraction)
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace must be True or False, got {inplace!r}")
    if guide.prototype_trace is None:
        raise ValueError("guide is not set up yet: fit it (or call it once) before pruning")
    sites = _ranked_sites(guide, sites)

    with torch.no_grad():
        snr = guide.snr()  # a PrunedBBBGuide gives 0 where pruned; ranked first below
        old = guide._masks() if isinstance(guide, PrunedBBBGuide) else {}
        scores, sizes = [], []
        for name in sites:
            s = snr[name].detach().reshape(-1).to(torch.float64)
            if name in old:
                s = torch.where(old[name].reshape(-1), s, torch.full_like(s, -math.inf))
            scores.append(s.cpu())
            sizes.append(s.numel())
        scores = torch.cat(scores)
        if torch.isnan(scores).any():
            raise ValueError("the guide has NaN signal-to-noise ratios; cannot rank its weights")
        total = scores.numel()
        k = min(math.floor(round(fraction * total, 9)), total - 1)
        already = int(torch.isinf(scores).sum())
        k = max(k, already)
        order = torch.argsort(scores, stable=True)
        keep_flat = torch.ones(total, dtype=torch.bool)
        keep_flat[order[:k]] = False
        threshold = float(scores[order[k - 1]].clamp_min(0)) if k else 0.0

    target = guide if inplace else copy.deepcopy(guide)  # new parameters, the same model
    masks, removed, start = {}, {}, 0
    for name, size in zip(sites, sizes):
        loc = target.loc.get_parameter(name)
        mask = keep_flat[start : start + size].reshape(loc.shape).to(loc.device)
        start += size
        masks[name] = mask
        removed[name] = int((~mask).sum())
        with torch.no_grad():
            loc.masked_fill_(~mask, 0.0)
    for name, mask in old.items():  # sites pruned earlier but not ranked now stay pruned
        masks.setdefault(name, mask)
    if not isinstance(target, PrunedBBBGuide):
        target.__class__ = PrunedBBBGuide
    target._set_masks(masks)
    target.prune_summary = PruneSummary(
        fraction=fraction,
        num_weights=total,
        num_removed=k,
        threshold_snr=threshold,
        removed_per_site=removed,
    )
    return target
