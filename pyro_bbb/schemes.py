"""The other approximations a methodologist compares with Bayes by Backprop and HMC.

One short function per scheme, each fitting the SAME pyro_bbb model (same sample
sites, same priors) and returning a kind of posterior that
:func:`~pyro_bbb.to_inference_data` reads, so that prediction, InferenceData and
comparison are shared by all schemes:

==============  ======================================================  ====================
name            scheme                                                  returns
==============  ======================================================  ====================
bbb             Bayes by Backprop (Blundell et al. 2015), :func:`bbb`   BBBGuide
bbb-mixture     the same, the model built with a ScaleMixtureNormal     BBBGuide
diagonal        mean-field Gaussian by Pyro's SVI (AutoNormal)          AutoNormal
lowrank         low-rank plus diagonal Gaussian (Ong et al. 2018)       AutoLowRank...Normal
fullrank        full-covariance Gaussian (Kucukelbir et al. 2017)       AutoMultivariateNormal
flow            inverse autoregressive flow (Kingma et al. 2016)        AutoIAFNormal
laplace         Laplace approximation at the MAP (MacKay 1992)          AutoMultivariateNormal
ensemble        deep ensemble of MAP fits (Lakshminarayanan 2017)       draws (1, K, ...)
dropout         MC dropout (Gal & Ghahramani 2016)                      draws (1, S, ...)
==============  ======================================================  ====================

Draws are dicts ``{site: tensor of shape (1, num_draws, *site_shape)}``: one "chain".
:func:`fit_scheme` fits any of them by name.  Every fit is full batch; ``epochs`` is
the number of optimization steps.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from pyro.ops.hessian import hessian
from torch import Tensor, nn
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms import ComposeTransformModule
from torch.distributions import biject_to
from tqdm.auto import tqdm

from . import _checks
from .hmc.potential import Potential
from .guide import DEFAULT_INIT_SCALE, BBBGuide
from .priors import ScaleMixtureNormal
from .train import NonFiniteLossError, fit

__all__ = [
    "AUTOGUIDE_KINDS",
    "ElementwiseAffine",
    "SCHEMES",
    "bbb",
    "bbb_mixture",
    "deep_ensemble",
    "dropout_weights",
    "fit_autoguide",
    "fit_scheme",
    "laplace",
    "mc_dropout",
]

#: ``fit_autoguide`` kinds and the Pyro AutoGuide each one trains.
AUTOGUIDE_KINDS = {
    "diagonal": AutoNormal,
    "lowrank": AutoLowRankMultivariateNormal,
    "fullrank": AutoMultivariateNormal,
    "flow": AutoIAFNormal,
}

_GUIDE_NUMBERS = itertools.count()


# ----------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------
def _model_and_data(model, x, y):
    if not _checks.is_model(model):
        raise ValueError(
            "model must be a pyro_bbb BayesianRegressor or BayesianClassifier, "
            f"got {type(model).__name__}"
        )
    return _checks.model_data(model, x, y)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """With a seed: torch's generators seeded by it, their states restored afterwards
    (Pyro draws from torch's global generator).  Without: the global state as it is."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _forget_entries(prefix: str) -> None:
    store = pyro.get_param_store()
    for key in [k for k in store.keys() if k == prefix or k.startswith(prefix + ".")]:
        try:
            del store[key]
        except KeyError:  # the value was already unregistered (a flow's nn.Parameters)
            pass


def _with_own_param_names(guide):
    # Pyro keeps an AutoGuide's parameters in the global param store under its class
    # name ("AutoNormal.locs.0.weight"): a second guide of one class would start from,
    # and then move, the first one's tensors.  A name of its own keeps each guide apart;
    # its entries leave the store when the guide is collected.
    guide._pyro_name = f"{guide._pyro_name}_{next(_GUIDE_NUMBERS)}"
    weakref.finalize(guide, _forget_entries, guide._pyro_name).atexit = False
    return guide


def _init_at_network(model):
    """Start a guide at the network's own initial weights (as BBBGuide does); other
    latents (a learned noise) at their prior median.  Copies, so training never
    writes into the model's initial values."""
    values = {n: v.detach().clone() for n, v in model.initial_values().items()}
    return functools.partial(init_to_value, values=values, fallback=init_to_median)


def _train_svi(model, guide, x, y, *, epochs, lr, num_particles, seed, progress, desc,
               lr_decay=1.0):
    """Full-batch SVI with Pyro's Trace_ELBO and Adam; particles vectorized; the
    learning rate falls geometrically to ``lr * lr_decay`` at the last step."""
    epochs = _checks.positive_int("epochs", epochs)
    lr = _checks.positive_float("lr", lr)
    num_particles = _checks.positive_int("num_particles", num_particles)
    lr_decay = _checks.fraction("lr_decay", lr_decay)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1,
                      max_plate_nesting=1)
    # ClippedAdam is Pyro's Adam with a per-step factor lrd on lr (and no clipping here)
    optimizer = (pyro.optim.Adam({"lr": lr}) if lr_decay == 1.0 else pyro.optim.ClippedAdam(
        {"lr": lr, "lrd": lr_decay ** (1.0 / epochs), "clip_norm": math.inf}))
    svi = SVI(model, guide, optimizer, elbo)
    with _seeded(_checks.seed(seed), x.device):
        for step in tqdm(range(epochs), disable=not progress, desc=desc, unit="step", leave=False):
            # num_data as fit passes it: the likelihood is scaled to the whole data set.
            loss = svi.step(x, y, num_data=x.shape[0])
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"{desc}: the loss is {loss} at step {step}; lower lr")
    return guide


def _adam_on_potential(potential: Potential, u: Tensor, *, epochs, lr, progress, desc, loss_fn=None):
    """Adam on rows of flat positions ``u`` (K, D), each row its own problem (Adam is
    elementwise and the summed potential separates over rows)."""
    epochs = _checks.positive_int("epochs", epochs)
    lr = _checks.positive_float("lr", lr)
    u = u.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=lr)
    for step in tqdm(range(epochs), disable=not progress, desc=desc, unit="step", leave=False):
        if loss_fn is None:
            value, grad = potential.value_and_grad(u.detach())
        else:
            value = loss_fn(u)
            (grad,) = torch.autograd.grad(value.sum(), u)
        if not (torch.isfinite(value).all() and torch.isfinite(grad).all()):
            raise NonFiniteLossError(
                f"{desc}: the negative log joint is not finite at step {step}; lower lr"
            )
        u.grad = grad
        optimizer.step()
    return u.detach()


def _as_one_chain(values: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: v.detach().unsqueeze(0).contiguous() for n, v in values.items()}


# ----------------------------------------------------------------------------
# Bayes by Backprop (the wrapper gives it the signature of the other schemes)
# ----------------------------------------------------------------------------
def bbb(model, x, y, *, estimator: str = "weights", epochs: int = 1000, lr: float = 1e-2,
        num_particles: int = 1, init_scale: float = DEFAULT_INIT_SCALE, seed=None,
        progress: bool = True, **fit_kwargs) -> BBBGuide:
    """Bayes by Backprop (Blundell et al. 2015, arXiv 1505.05424): a :class:`BBBGuide`
    trained by :func:`~pyro_bbb.fit` with the given ``estimator`` ("weights",
    "local_reparam" or "flipout"); ``fit_kwargs`` go to ``fit`` (``batch_size``,
    ``kl``, ...).  Returns the trained guide.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb_
    >>> x, y = bbb_.datasets.regression_curve(20)
    >>> model = bbb_.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0., 1.))
    >>> guide = bbb(model, x, y, epochs=5, seed=0, progress=False)
    >>> type(guide).__name__
    'BBBGuide'
    """
    guide = BBBGuide(model, init_scale=init_scale)
    fit(model, guide, x, y, epochs=epochs, lr=lr, num_particles=num_particles,
        estimator=estimator, seed=seed, progress=progress, **fit_kwargs)
    return guide


def _base(prior):
    while hasattr(prior, "base_dist"):  # Independent / expanded wrappers of a site's prior
        prior = prior.base_dist
    return prior


def bbb_mixture(model, x, y, **kwargs) -> BBBGuide:
    """Bayes by Backprop with the paper's scale-mixture prior.  The prior is part of
    the model: build it with ``prior=ScaleMixtureNormal(...)``; this checks that it
    was, then runs :func:`bbb`.

    Examples
    --------
    >>> import math, torch
    >>> import pyro_bbb as bbb_
    >>> prior = bbb_.ScaleMixtureNormal(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))
    >>> model = bbb_.BayesianRegressor(torch.nn.Linear(1, 1), prior=prior)
    >>> x, y = bbb_.datasets.regression_curve(20)
    >>> type(bbb_mixture(model, x, y, epochs=5, seed=0, progress=False)).__name__
    'BBBGuide'
    """
    priors = model.network.priors() if _checks.is_model(model) else {}
    if not any(isinstance(_base(p), ScaleMixtureNormal) for p in priors.values()):
        raise ValueError(
            "model: the 'bbb-mixture' scheme needs a model built with a ScaleMixtureNormal "
            "prior (e.g. BayesianRegressor(net, prior=ScaleMixtureNormal(0.5, 1.0, "
            "math.exp(-6)))); for another prior use 'bbb'"
        )
    return bbb(model, x, y, **kwargs)


# ----------------------------------------------------------------------------
# Pyro's AutoGuides trained by SVI
# ----------------------------------------------------------------------------
def fit_autoguide(model, x, y, kind: str = "fullrank", *, epochs: int = 1000, lr: float = 1e-2,
                  num_particles: int = 1, init_scale: float = DEFAULT_INIT_SCALE,
                  rank: int | None = None, hidden_dims=None, num_transforms: int = 1,
                  lr_decay: float = 1.0, seed=None, progress: bool = True):
    """A Pyro AutoGuide fitted by SVI with ``Trace_ELBO`` and Adam (full batch).

    ``kind``: ``"diagonal"`` (``AutoNormal``, mean-field), ``"lowrank"``
    (``AutoLowRankMultivariateNormal``, covariance ``W W^T + D`` with ``rank`` columns,
    Pyro's default ``sqrt(dim)`` if None; Ong, Nott & Smith 2018), ``"fullrank"``
    (``AutoMultivariateNormal``, as in ADVI, Kucukelbir et al. 2017, arXiv 1603.00788)
    or ``"flow"`` (``AutoIAFNormal``, an inverse autoregressive flow, Kingma et al.
    2016, arXiv 1606.04934, with ``num_transforms`` transforms whose networks have
    ``hidden_dims`` units, each at least the number of latent dimensions).
    The Gaussians start at the network's initial weights with std ``init_scale``, as
    :class:`BBBGuide` does, so that a BNN starts near a point estimate; the flow starts
    there too: its IAF is followed by a learned elementwise affine map that starts at
    the network's weights with scale ``init_scale`` (Pyro's AutoIAFNormal alone starts
    at ``N(0, I)``, the prior of an N(0, 1) BNN).  ``lr_decay`` < 1 lowers Adam's
    learning rate geometrically to ``lr * lr_decay`` at the last step: a full-rank
    guide needs it, as Adam's constant steps on its thousands of noisy covariance
    entries otherwise random-walk them (yacht gap split 0, 2,000 steps at lr 0.01:
    ELBO not finite in float32, predictive std 30x the mean-field guide's; with
    ``lr_decay=0.01`` the std is 0.75x the mean-field guide's).

    Returns the trained guide, for :func:`~pyro_bbb.to_inference_data`.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb_
    >>> x, y = bbb_.datasets.regression_curve(20)
    >>> model = bbb_.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0., 1.))
    >>> guide = fit_autoguide(model, x, y, "lowrank", rank=1, epochs=5, progress=False)
    >>> guide.get_posterior().event_shape
    torch.Size([2])
    """
    _checks.choice("kind", kind, tuple(AUTOGUIDE_KINDS))
    x, y = _model_and_data(model, x, y)
    if kind == "flow":
        if hidden_dims is not None:
            hidden_dims = [_checks.positive_int("hidden_dims", h) for h in hidden_dims]
        guide = AutoIAFNormal(model, hidden_dim=hidden_dims,
                              num_transforms=_checks.positive_int("num_transforms", num_transforms))
        _locate_flow(guide, model, _checks.positive_float("init_scale", init_scale), x, y)
    else:
        options = dict(init_loc_fn=_init_at_network(model),
                       init_scale=_checks.positive_float("init_scale", init_scale))
        if kind == "lowrank" and rank is not None:
            options["rank"] = _checks.positive_int("rank", rank)
        guide = AUTOGUIDE_KINDS[kind](model, **options)
    guide = _with_own_param_names(guide)
    return _train_svi(model, guide, x, y, epochs=epochs, lr=lr, num_particles=num_particles,
                      seed=seed, progress=progress, desc=kind, lr_decay=lr_decay)


class ElementwiseAffine(TransformModule):
    """``y = loc + softplus(rho) * x``, learned: the last layer of a located flow."""

    bijective = True
    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, loc: Tensor, scale: float):
        super().__init__(cache_size=1)
        self.loc = nn.Parameter(loc.clone())
        self.rho = nn.Parameter(torch.full_like(loc, math.log(math.expm1(scale))))

    def _call(self, x):
        return self.loc + nn.functional.softplus(self.rho) * x

    def _inverse(self, y):
        return (y - self.loc) / nn.functional.softplus(self.rho)

    def log_abs_det_jacobian(self, x, y):
        return nn.functional.softplus(self.rho).log().sum(-1).expand(x.shape[:-1])


def _locate_flow(guide: AutoIAFNormal, model, init_scale: float, x, y) -> None:
    """Start an IAF guide where the Gaussian guides start: its flow is followed by a
    learned elementwise affine map at the network's initial weights with scale
    ``init_scale``.  Pyro's AutoIAFNormal starts at N(0, I) in the unconstrained space,
    the prior of an N(0, 1) BNN, and 2,000 Adam steps left it there (yacht: predictive
    std hundreds of times HMC's)."""
    with torch.no_grad(), poutine.block():
        guide(x, y, num_data=x.shape[0])  # builds the prototype trace and the flow
    initial = {**model.initial_values()}
    pieces = []
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        value = initial[name] if name in initial else init_to_median(site)  # as _init_at_network
        pieces.append(biject_to(site["fn"].support).inv(value.detach()).reshape(-1))
    # AutoIAFNormal's transform is always a ComposeTransformModule (Pyro's ``iterated``)
    guide.transform = ComposeTransformModule(
        [*guide.transform.parts, ElementwiseAffine(torch.cat(pieces), init_scale)])


# ----------------------------------------------------------------------------
# Laplace
# ----------------------------------------------------------------------------
def laplace(model, x, y, *, epochs: int = 1000, lr: float = 1e-2, jitter: float | None = None,
            seed=None, progress: bool = True) -> AutoMultivariateNormal:
    """The Laplace approximation (MacKay 1992; for BNNs Ritter et al. 2018): the MAP by
    Pyro's ``AutoLaplaceApproximation`` (Adam on the log joint, in the unconstrained
    space, started at the network's initial weights), then a Gaussian with the inverse
    Hessian of the negative log joint at the MAP as covariance, computed by Pyro
    (``guide.laplace_approximation``).

    Pyro's own is used rather than laplace-torch: laplace-torch works on an
    ``nn.Module`` with its own likelihood and prior conventions (a prior precision, a
    loss), not on a Pyro model's sample sites and priors; Pyro's Hessian is exact, of
    the same joint density every other scheme here sees.

    Returns an ``AutoMultivariateNormal``.  Raises ``ValueError`` when the Hessian at
    the point found is not positive definite (no Gaussian has it as precision): for a
    BNN, a saddle point or an unconverged MAP (common: ReLU networks, flat directions)
    -- train longer, pass ``jitter``, or pick a scheme that needs no Hessian
    (``fullrank``, ``ensemble``).  ``jitter``: the precision is ``H + jitter * I``
    instead (Pyro's traces and Hessian, the same Gaussian otherwise); this is a
    Gaussian prior of precision ``jitter`` added around the MAP, so it shrinks every
    variance -- say so when comparing it.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb_
    >>> x, y = bbb_.datasets.regression_curve(20)
    >>> model = bbb_.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0., 1.))
    >>> guide = laplace(model, x, y, epochs=200, progress=False)
    >>> guide.get_posterior().covariance_matrix.shape
    torch.Size([2, 2])
    """
    if jitter is not None:
        jitter = _checks.positive_float("jitter", jitter)
    x, y = _model_and_data(model, x, y)
    guide = _with_own_param_names(AutoLaplaceApproximation(model, init_loc_fn=_init_at_network(model)))
    _train_svi(model, guide, x, y, epochs=epochs, lr=lr, num_particles=1, seed=seed,
               progress=progress, desc="laplace")
    try:
        if jitter is None:
            gaussian = guide.laplace_approximation(x, y, num_data=x.shape[0])
        else:
            gaussian = _jittered_laplace(model, guide, jitter, x, y, num_data=x.shape[0])
    except torch.linalg.LinAlgError as err:  # the inverse or the Cholesky factor failed
        raise _not_positive_definite() from err
    if not torch.isfinite(gaussian.scale_tril).all():  # a negative curvature: sqrt < 0
        raise _not_positive_definite()
    return gaussian


def _jittered_laplace(model, guide, jitter, *args, **kwargs) -> AutoMultivariateNormal:
    """``guide.laplace_approximation`` with ``jitter * I`` added to the Hessian: the same
    traces, Pyro's Hessian, and the Gaussian guide built the way Pyro builds it."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    loss = guide_trace.log_prob_sum() - model_trace.log_prob_sum()
    precision = hessian(loss, guide.loc)
    with torch.no_grad():
        precision = precision + jitter * torch.eye(precision.shape[0], dtype=precision.dtype,
                                                   device=precision.device)
        cov = torch.linalg.inv(precision)
        scale = cov.diagonal().sqrt()
        scale_tril = torch.linalg.cholesky(cov / scale[:, None] / scale[None, :])
    gaussian = _with_own_param_names(AutoMultivariateNormal(model))
    with torch.no_grad(), poutine.block():
        gaussian(*args, **kwargs)  # sets up the same latent layout as the Laplace guide
    for name, value in (("loc", guide.loc.detach()), ("scale", scale), ("scale_tril", scale_tril)):
        delattr(gaussian, name)
        gaussian.register_buffer(name, value)
    return gaussian


def _not_positive_definite() -> ValueError:
    return ValueError(
        "laplace: the Hessian of the negative log joint at the MAP found is not positive "
        "definite (a saddle point or an unconverged MAP), so it is no Gaussian's precision; "
        "train longer (epochs, lr), pass jitter > 0 (precision H + jitter * I), or use "
        "'fullrank' or 'ensemble'"
    )


# ----------------------------------------------------------------------------
# Deep ensemble
# ----------------------------------------------------------------------------
def deep_ensemble(model, x, y, *, num_members: int = 5, epochs: int = 1000, lr: float = 1e-2,
                  seed=None, progress: bool = True) -> dict[str, Tensor]:
    """A deep ensemble (Lakshminarayanan et al. 2017, arXiv 1612.01474; as a posterior
    approximation, Izmailov et al. 2021, arXiv 2104.14421): ``num_members`` MAP fits
    by Adam on the log joint -- the prior included, i.e. weight decay for a Gaussian
    prior -- each from its own prior draw, all members in one batched computation
    (:class:`~pyro_bbb.hmc.potential.Potential`; a positive site such as a learned noise is
    optimized on the log scale, with its log-Jacobian, as Pyro's MAP guides do).

    Returns the members as one chain of draws, ``{site: (1, num_members, *shape)}``.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb_
    >>> x, y = bbb_.datasets.regression_curve(20)
    >>> model = bbb_.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0., 1.))
    >>> draws = deep_ensemble(model, x, y, num_members=3, epochs=10, seed=0, progress=False)
    >>> draws["weight"].shape
    torch.Size([1, 3, 1, 1])
    """
    num_members = _checks.positive_int("num_members", num_members)
    x, y = _model_and_data(model, x, y)
    potential = Potential(model, x, y)
    priors = {**model.network.priors(), **model.extra_priors()}
    with _seeded(_checks.seed(seed), x.device):
        starts = {n: priors[n].sample((num_members,)) for n in model.latent_names}
    u = _adam_on_potential(potential, potential.flatten(starts), epochs=epochs, lr=lr,
                           progress=progress, desc="ensemble")
    return _as_one_chain(potential.unflatten(u)[0])


# ----------------------------------------------------------------------------
# MC dropout
# ----------------------------------------------------------------------------
def _linear_weight_sites(model) -> dict[str, int]:
    """Each ``nn.Linear`` weight that is a sample site, with its number of inputs."""
    sites = {}
    for prefix, module in model.network.net.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if isinstance(module, nn.Linear) and name in model.network.site_shapes:
            sites[name] = module.in_features
    return sites


def dropout_weights(weights: dict[str, Tensor], masks: dict[str, Tensor], p: float) -> dict[str, Tensor]:
    """The weights a Linear layer with dropout on its input amounts to, for given masks.

    With input mask ``m`` (1 keeps an input, 0 drops it), the layer computes
    ``W (m * x) / (1 - p) + b = W' x + b`` with ``W'[:, j] = W[:, j] m_j / (1 - p)``:
    column ``j`` dropped or scaled.  ``masks[site]`` has shape ``(..., in_features)``
    and broadcasts against the leading dimensions of ``weights[site]``; sites without
    a mask are returned as they are.

    Examples
    --------
    >>> import torch
    >>> w = {"weight": torch.ones(2, 3)}
    >>> dropout_weights(w, {"weight": torch.tensor([1.0, 0.0, 1.0])}, p=0.5)["weight"]
    tensor([[2., 0., 2.],
            [2., 0., 2.]])
    """
    out = dict(weights)
    for name, mask in masks.items():
        out[name] = weights[name] * (mask.to(weights[name].dtype) / (1.0 - p)).unsqueeze(-2)
    return out


def _draw_masks(sites: dict[str, int], num: int, p: float, like: Tensor) -> dict[str, Tensor]:
    return {n: torch.rand(num, k, device=like.device, dtype=like.dtype) >= p for n, k in sites.items()}


def mc_dropout(model, x, y, *, p: float = 0.1, num_samples: int = 200, num_particles: int = 1,
               epochs: int = 1000, lr: float = 1e-2, seed=None, progress: bool = True) -> dict[str, Tensor]:
    """MC dropout (Gal & Ghahramani 2016, arXiv 1506.02142): the network trained with
    dropout of rate ``p`` on the input of every ``nn.Linear`` layer, plus the prior's
    log density (L2 for a Gaussian prior), then ``num_samples`` dropout draws.

    Input dropout is a mask on the layer's weights (:func:`dropout_weights`): each draw
    is a set of weights of the SAME model, its Linear weights' columns dropped or scaled
    by ``1 / (1 - p)``; biases, other layers and a learned noise are point estimates.
    Training maximizes ``log p(W) + E_m[log p(y | W * m)]``, the expectation estimated
    by ``num_particles`` masks per step, each shared by the whole batch (Gal &
    Ghahramani's objective; a mask per row, as ``nn.Dropout`` draws, has the same
    expectation).  Returns ``{site: (1, num_samples, *shape)}``.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb_
    >>> x, y = bbb_.datasets.regression_curve(20)
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> model = bbb_.BayesianRegressor(net, prior=dist.Normal(0., 1.))
    >>> draws = mc_dropout(model, x, y, p=0.2, num_samples=50, epochs=10, seed=0, progress=False)
    >>> draws["2.weight"].shape
    torch.Size([1, 50, 1, 8])
    """
    p = _checks.positive_float("p", p)
    if p >= 1:
        raise ValueError(f"p must lie in (0, 1), got {p!r}")
    num_samples = _checks.positive_int("num_samples", num_samples)
    num_particles = _checks.positive_int("num_particles", num_particles)
    x, y = _model_and_data(model, x, y)
    sites = _linear_weight_sites(model)
    if not sites:
        raise ValueError("model: mc_dropout needs a network with at least one nn.Linear weight site")
    potential = Potential(model, x, y)
    priors = {**model.network.priors(), **model.extra_priors()}
    start = dict(model.initial_values())
    like = next(iter(start.values()))
    for name in model.extra_priors():  # a learned noise starts at 1 (0 on the log scale)
        prior = priors[name]
        zero = like.new_zeros(prior.batch_shape + prior.event_shape)
        start[name] = biject_to(prior.support)(zero)

    def negative_objective(u):  # u: (1, D)
        values, logdet = potential.unflatten(u)
        masked = dropout_weights(values, _draw_masks(sites, num_particles, p, u), p)
        log_lik = model.log_likelihood(masked, x, y).sum(-1).mean(0)
        return -(model.log_prior(values) + logdet + log_lik)

    with _seeded(_checks.seed(seed), x.device):
        u0 = potential.flatten({n: v.unsqueeze(0) for n, v in start.items()})
        u = _adam_on_potential(potential, u0, epochs=epochs, lr=lr, progress=progress,
                               desc="dropout", loss_fn=negative_objective)
        values = {n: v.expand((num_samples,) + v.shape[1:]) for n, v in potential.unflatten(u)[0].items()}
        draws = dropout_weights(values, _draw_masks(sites, num_samples, p, u), p)
    return _as_one_chain(draws)


# ----------------------------------------------------------------------------
# By name
# ----------------------------------------------------------------------------
#: Scheme name -> function ``f(model, x, y, **options)``.
SCHEMES = {
    "bbb": bbb,
    "bbb-mixture": bbb_mixture,
    "diagonal": functools.partial(fit_autoguide, kind="diagonal"),
    "lowrank": functools.partial(fit_autoguide, kind="lowrank"),
    "fullrank": functools.partial(fit_autoguide, kind="fullrank"),
    "flow": functools.partial(fit_autoguide, kind="flow"),
    "laplace": laplace,
    "ensemble": deep_ensemble,
    "dropout": mc_dropout,
}


def fit_scheme(name: str, model, x, y, **options):
    """Fit scheme ``name`` (a key of :data:`SCHEMES`) on ``model``; ``options`` go to its
    function (``epochs``, ``lr``, ``seed``, ``progress``, and the scheme's own).

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb_
    >>> x, y = bbb_.datasets.regression_curve(20)
    >>> model = bbb_.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0., 1.))
    >>> draws = fit_scheme("ensemble", model, x, y, num_members=2, epochs=5, progress=False)
    >>> draws["bias"].shape
    torch.Size([1, 2, 1])
    """
    _checks.choice("name", name, tuple(SCHEMES))
    return SCHEMES[name](model, x, y, **options)
