"""Posterior predictive: one batched forward pass over weight draws, chunked.

Pyro's ``Predictive`` loops over draws in Python by default; here all draws of a
chunk go through the network in one vmapped call, and chunking over draws
bounds the memory of the hidden activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import MCMC
from pyro.infer.autoguide import AutoGuide
from torch import Tensor

from . import _checks

__all__ = ["POSTERIOR_KINDS", "PosteriorDraws", "Prediction", "as_draws", "predict", "posterior_draws",
           "batched_outputs"]

#: Rows (draws x inputs) per forward chunk: 2^14 rows keep a 50-unit hidden layer
#: near 3 MB in float32, which stays in cache (2^18 rows measured 3x slower on CPU).
DEFAULT_CHUNK_ROWS = 2**14


#: What :func:`as_draws` calls each kind of posterior (InferenceData's ``posterior_kind``).
POSTERIOR_KINDS = ("variational", "sampler", "draws")


@dataclass
class PosteriorDraws:
    """Draws of every site by chain, ``{site: (chains, draws, *site_shape)}``, and where
    they came from: ``kind`` (one of :data:`POSTERIOR_KINDS`), ``inference`` (the
    scheme's name), ``log_q`` (``(chains, draws)`` log q(theta) of a guide, else None)
    and ``sample_stats`` (a sampler's per-draw statistics, numpy ``(chains, draws)``)."""

    values: dict
    kind: str
    inference: str
    log_q: Tensor | None = None
    sample_stats: dict | None = None

    @property
    def num_chains(self) -> int:
        return int(next(iter(self.values.values())).shape[0])

    @property
    def num_draws(self) -> int:
        return int(next(iter(self.values.values())).shape[1])

    def flat(self) -> dict[str, Tensor]:
        """Chains pooled: ``{site: (chains * draws, *site_shape)}``."""
        return {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in self.values.items()}


def _guide_draws(guide, num_samples, args, generator) -> tuple[dict, Tensor]:
    """Draws and log q of any Pyro AutoGuide: the guide traced once under a plate of
    ``num_samples`` draws outside the model's plates (as ``Predictive(parallel=True)``)."""
    if hasattr(guide, "sample_posterior") and hasattr(guide, "log_density"):  # BBBGuide
        if guide.prototype_trace is None:
            raise ValueError("posterior: the guide is not set up yet; fit() it (or call it once) first")
        draws = {k: v.detach() for k, v in guide.sample_posterior(num_samples, generator=generator).items()}
        with torch.no_grad():
            return draws, guide.log_density(draws)
    if getattr(guide, "prototype_trace", None) is None and not args:
        raise ValueError("posterior: the guide is not set up yet; pass x (and y) or fit it first")
    seed = None if generator is None else int(torch.randint(2**62, (), generator=generator))
    with torch.no_grad(), torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if getattr(guide, "prototype_trace", None) is None:
            guide(*args)
        nesting = max([-f.dim for s in guide.prototype_trace.nodes.values()
                       for f in s.get("cond_indep_stack", ())] + [0])
        with pyro.plate("posterior_draws", num_samples, dim=-(nesting + 1)):
            trace = poutine.trace(guide).get_trace(*args)
        trace.compute_log_prob()
    shapes = {n: s["value"].shape for n, s in guide.prototype_trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"]}
    draws, log_q = {}, torch.zeros(num_samples)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        log_q = log_q.to(site["log_prob"].device) + site["log_prob"].reshape(num_samples, -1).sum(-1)
        if name in shapes:
            draws[name] = site["value"].detach().reshape((num_samples,) + tuple(shapes[name]))
    return draws, log_q


def _mcmc_stats(mcmc, num_chains: int, num_draws: int) -> dict:
    """``diverging`` (chains, draws) from Pyro's per-chain divergence indices."""
    diag = mcmc.diagnostics().get("divergences")
    if diag is None:
        return {}
    diverging = np.zeros((num_chains, num_draws), dtype=bool)
    for c in range(num_chains):
        for i in diag.get(f"chain {c}", []):
            if 0 <= int(i) < num_draws:
                diverging[c, int(i)] = True
    return {"diverging": diverging}


def as_draws(posterior, model=None, x=None, y=None, *, num_samples: int | None = None,
             seed: int | None = None, generator=None, kind: str | None = None) -> PosteriorDraws:
    """Any posterior as draws by chain: the one adapter behind ``predict`` and
    ``to_inference_data``.

    ``posterior`` may be a BBBGuide (or PrunedBBBGuide), any Pyro AutoGuide (Laplace's
    too; ``x`` and ``y`` are its call's arguments, needed when it is not set up), a
    ``pyro.infer.MCMC`` run, an HMC reference (``run_nuts`` / ``run_hmc``) or a dict
    ``{site: (chains, draws, *site_shape)}`` (``kind`` says what made it, default
    ``"draws"``).  A guide gives one chain of ``num_samples`` draws (default 200); with
    ``model`` every one of its sites must be present.  ``seed`` or ``generator`` fixes
    a guide's draws (the global random state is left alone with a seed).

    >>> import torch
    >>> d = as_draws({"w": torch.zeros(2, 5, 3)})
    >>> d.kind, d.num_chains, d.num_draws, d.flat()["w"].shape
    ('draws', 2, 5, torch.Size([10, 3]))
    """
    seed = _checks.seed(seed)
    if kind is not None:
        _checks.choice("kind", kind, POSTERIOR_KINDS)
    sites = tuple(model.latent_names) if model is not None and hasattr(model, "latent_names") else None
    shapes = getattr(getattr(model, "network", None), "site_shapes", None)
    if isinstance(posterior, Mapping):
        values = _checks.draws_by_chain("posterior", posterior, sites, shapes)
        return PosteriorDraws(values, kind or "draws", "draws")
    if isinstance(posterior, MCMC):
        values = {k: v.detach() for k, v in posterior.get_samples(group_by_chain=True).items()}
        values = _checks.draws_by_chain("posterior", values, sites, shapes)
        c, s = next(iter(values.values())).shape[:2]
        return PosteriorDraws(values, kind or "sampler", f"Pyro {type(posterior.kernel).__name__}",
                              sample_stats=_mcmc_stats(posterior, c, s))
    if hasattr(posterior, "samples") and hasattr(posterior, "sample_stats"):  # HMCReference
        values = _checks.draws_by_chain("posterior", dict(posterior.samples), sites, shapes)
        stats = {k: np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v)
                 for k, v in dict(posterior.sample_stats).items()}
        return PosteriorDraws(values, kind or "sampler",
                              str(getattr(posterior, "sampler", type(posterior).__name__)), sample_stats=stats)
    if not isinstance(posterior, AutoGuide):
        raise ValueError(
            "posterior must be a BBBGuide, a Pyro AutoGuide, a pyro.infer.MCMC run, an HMC reference "
            f"(run_nuts / run_hmc) or a dict of draws, got {type(posterior).__name__}"
        )
    if getattr(posterior, "prototype_trace", True) is None and x is None:
        raise ValueError("posterior: the guide is not set up yet; fit() it (or call it once) first")
    num_samples = _checks.positive_int("num_samples", 200 if num_samples is None else num_samples)
    args = tuple(_checks.as_tensor(n, v) for n, v in (("x", x), ("y", y)) if v is not None)
    with torch.random.fork_rng(devices=_rng_devices(posterior), enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        draws, log_q = _guide_draws(posterior, num_samples, args, generator)
    values = _checks.draws_by_chain("posterior", {k: v[None] for k, v in draws.items()}, sites, shapes)
    inference = "bbb" if hasattr(posterior, "sample_posterior") else type(posterior).__name__
    return PosteriorDraws(values, kind or "variational", inference, log_q=log_q.detach()[None])


def _rng_devices(guide) -> list[int]:
    # fork_rng also saves and restores the CUDA generator of the guide's device.
    devices = {p.device.index or 0 for p in guide.parameters() if p.device.type == "cuda"}
    return sorted(devices)


def posterior_draws(posterior, num_samples: int | None = None, generator=None, *, model=None,
                    x=None, y=None) -> dict[str, Tensor]:
    """Weight draws ``{site: (S, *shape)}``, chains pooled, of any posterior :func:`as_draws` reads.

    A guide is sampled ``num_samples`` times (default 200); a sampler or a dict of draws
    gives all its draws, chains concatenated (``num_samples`` thins them evenly).  A
    dict may also hold pooled draws ``(S, *shape)`` of a ``model``'s sites (or of any
    sites, without a model).

    >>> import torch
    >>> posterior_draws({"w": torch.zeros(2, 5, 3)}, num_samples=4)["w"].shape
    torch.Size([4, 3])
    """
    if isinstance(posterior, Mapping) and _pooled(posterior, model):
        posterior = {k: torch.as_tensor(v)[None] for k, v in posterior.items()}
    draws = as_draws(posterior, model, x, y, num_samples=num_samples, generator=generator)
    flat = draws.flat()
    if draws.kind != "variational" and num_samples is not None:
        total = next(iter(flat.values())).shape[0]
        keep = torch.linspace(0, total - 1, min(_checks.positive_int("num_samples", num_samples), total))
        flat = {k: v[keep.round().long()] for k, v in flat.items()}
    return flat


def _pooled(draws: Mapping, model) -> bool:
    """A dict of pooled draws (S, *site_shape) rather than (chains, draws, *site_shape)."""
    shapes = getattr(getattr(model, "network", None), "site_shapes", None)
    if shapes is None:
        return False
    return any(k in shapes and torch.as_tensor(v).dim() == len(shapes[k]) + 1 for k, v in draws.items())


def batched_outputs(model, draws: Mapping[str, Tensor], x: Tensor, chunk_size: int | None = None):
    """f(x) for every draw, shape ``(S, n, ...)``, in chunks of ``chunk_size`` draws."""
    num_draws = next(iter(draws.values())).shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ROWS // max(1, x.shape[0]))
    chunk_size = _checks.positive_int("chunk_size", chunk_size)
    out = None
    with torch.no_grad():
        for i in range(0, num_draws, chunk_size):
            f = model.output({k: v[i : i + chunk_size] for k, v in draws.items()}, x)
            if out is None:
                # One output buffer, filled in place: a list of small chunk outputs between
                # the large freed temporaries fragments the heap (measured: 1.9 GB peak for
                # 1,000 x 10,000 ReLU outputs of 40 MB).
                out = f.new_empty((num_draws,) + f.shape[1:])
            out[i : i + f.shape[0]] = f
    return out


@dataclass
class Prediction:
    """Draws of the network output ``f`` and of the observations ``y`` at n inputs.

    Regression: ``mean``/``std``/``quantiles`` describe y (f plus observation
    noise); ``f_mean``/``f_std`` the network output alone.  Classification:
    ``probs`` per draw, ``mean_probs``, and the decomposition of predictive
    uncertainty ``entropy = aleatoric + mutual_information`` (in nats).
    """

    f: Tensor
    y: Tensor
    task: str

    @property
    def num_samples(self) -> int:
        return self.f.shape[0]

    @property
    def f_mean(self) -> Tensor:
        return self.f.mean(0)

    @property
    def f_std(self) -> Tensor:
        return _stable_std(self.f)

    @property
    def mean(self) -> Tensor:
        return self.mean_probs if self.task == "classification" else self.y.mean(0)

    @property
    def std(self) -> Tensor:
        """Std of y over draws (``num_samples`` >= 2), in the draws' floating dtype."""
        return _stable_std(self.y)

    def quantiles(self, qs) -> Tensor:
        """Quantiles of y over draws: shape ``(len(qs), n, ...)``."""
        q = torch.as_tensor(qs, dtype=self.y.dtype if self.y.is_floating_point() else torch.float32)
        return torch.quantile(self.y.to(q.dtype), q, dim=0)

    # -- classification ----------------------------------------------------------
    @property
    def probs(self) -> Tensor:
        if self.task != "classification":
            raise AttributeError("probs: only for classifiers")
        if self.f.dim() == 2 or self.f.shape[-1] == 1:  # one logit: Bernoulli
            p1 = torch.sigmoid(self.f.reshape(self.f.shape[:2]))
            return torch.stack([1 - p1, p1], -1)
        return torch.softmax(self.f, -1)

    @property
    def mean_probs(self) -> Tensor:
        return self.probs.mean(0)

    @property
    def entropy(self) -> Tensor:
        """Predictive entropy H[E_w p(y|x, w)] (total uncertainty)."""
        return _entropy(self.mean_probs)

    @property
    def aleatoric(self) -> Tensor:
        """Expected entropy E_w H[p(y|x, w)]."""
        return _entropy(self.probs).mean(0)

    @property
    def mutual_information(self) -> Tensor:
        """I(y; w | x) = entropy - aleatoric: the epistemic part."""
        return (self.entropy - self.aleatoric).clamp_min(0)


def _stable_std(draws: Tensor) -> Tensor:
    """Sample std over dim 0 (Bessel-corrected), in the draws' dtype (integer labels:
    the default dtype).  Deviations are scaled by their largest magnitude before they
    are squared, so values whose squares overflow (1e20 in float32) still give a
    finite std."""
    if not draws.is_floating_point():
        draws = draws.to(torch.get_default_dtype())
    deviation = draws - draws.mean(0)
    scale = deviation.abs().amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale * (deviation / scale).std(0)


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def predict(
    model,
    posterior,
    x,
    num_samples: int | None = None,
    *,
    chunk_size: int | None = None,
    seed: int | None = None,
) -> Prediction:
    """Posterior predictive of a pyro_bbb model at inputs ``x``.

    Parameters
    ----------
    model : BayesianRegressor or BayesianClassifier
    posterior : BBBGuide, Pyro AutoGuide, MCMC, HMC reference or dict of draws
        Where the weights come from (see :func:`as_draws`; a dict may hold pooled draws
        ``(S, *site_shape)``).
    x : array-like, (n, ...)
    num_samples : int >= 2, optional
        Draws from a guide (default 200); an HMC reference gives all its draws
        by default, or this many, evenly thinned.  At least 2, so that ``std``
        (Bessel-corrected) is defined; a posterior with fewer draws is an error.
    chunk_size : int, optional
        Draws per forward pass (default: 2^14 rows of draws x inputs).
    seed : int, optional
        Seeds the draws (weights and observation noise).

    ``x`` is cast to the dtype of the model's weights (numpy float64 into a float32
    network is fine) and must have the shape the network's first layer reads.
    Non-finite draws or outputs are a ValueError, never a silent NaN.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0.0, 1.0))
    >>> guide = bbb.BBBGuide(model)
    >>> x = torch.linspace(0, 1, 20)[:, None]
    >>> _ = bbb.fit(model, guide, x, 2 * x[:, 0], epochs=2, progress=False)
    >>> pred = bbb.predict(model, guide, x, num_samples=50)
    >>> pred.f.shape, pred.mean.shape
    (torch.Size([50, 20]), torch.Size([20]))
    """
    if not hasattr(model, "output"):
        raise ValueError("predict needs a pyro_bbb model (BayesianRegressor / BayesianClassifier)")
    if num_samples is not None:
        num_samples = _checks.positive_int("num_samples", num_samples)
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 (the predictive std needs two draws), got {num_samples}")
    seed = _checks.seed(seed)
    ref = next(iter(model.initial_values().values()))
    x = _checks.inputs(model, x).to(ref.device)
    if seed is not None:
        torch.manual_seed(seed)
    draws = posterior_draws(posterior, num_samples, model=model)
    total = next(iter(draws.values())).shape[0]
    if total < 2:
        raise ValueError(f"num_samples: the posterior gives {total} draw(s); predict needs at least 2")
    draws = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in draws.items()}
    _checks.finite_draws("posterior", draws)
    f = batched_outputs(model, draws, x, chunk_size)
    _checks.finite_result("x", f, "network output")
    with torch.no_grad():
        y = model.sample_y(draws, f)
    _checks.finite_result("x", y, "predictive draw of y")
    return Prediction(f=f, y=y, task=model.task)
