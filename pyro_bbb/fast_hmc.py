"""A fast HMC reference: ChEES-HMC, many chains in lockstep as one batched computation.

:func:`run_hmc` samples the posterior of a pyro_bbb model (``BayesianRegressor``,
``BayesianClassifier``) with ChEES-HMC (Hoffman, Radul & Sountsov, "An Adaptive MCMC
Scheme for Setting Trajectory Lengths in Hamiltonian Monte Carlo", AISTATS 2021).
All chains take the same number of leapfrog steps per iteration, so one iteration is
``L`` calls of one batched potential whose leading dimension is the chain: the network
runs once for all chains, and Python's per-step cost is paid once, not once per chain.
Pyro's NUTS pays ~1 ms of Python per leapfrog step per chain on a small network; here
that cost is shared by all chains.

The pieces are small functions in the style of BlackJAX: a kernel (:func:`hmc_init`,
:func:`hmc_step`) that knows nothing about adaptation, and adaptation states with
``*_init`` / ``*_update`` functions that see only what the kernel returns:

* **potential** (:class:`Potential`): ``U(u) = -(log p(theta, y) + log|det dT/du|)``
  with ``theta = T(u)``, ``T = biject_to(prior.support)`` per site, evaluated for all
  chains at once through the model's batched :meth:`log_joint` (for a
  ``torch.nn.Sequential`` of ``Linear`` layers and elementwise activations, a direct
  batched forward pass that skips ``vmap``, checked against :meth:`log_joint` when
  it is set up); its gradient is one ``torch.autograd.grad`` of the sum over chains.
  All sites are flattened into one vector per chain, ``(C, D)``.
* **kernel**: jittered-length HMC with a diagonal mass matrix; per chain a Metropolis
  accept; a transition is *divergent* if at any leapfrog step the energy error exceeds
  1000 or is not finite (then it is rejected).
* **step size**: dual averaging (Nesterov 2009, as in Hoffman & Gelman 2014 and Stan)
  on the *harmonic* mean of the chains' acceptance probabilities, which keeps the
  worst chains moving (ChEES-HMC's choice), towards ``target_accept_prob``.
* **trajectory length** ``T``: each iteration integrates for ``t = h_n T`` with ``h_n``
  the base-2 Halton (van der Corput) sequence in (0, 1), so ``L = ceil(t / eps)``
  steps; during warmup ``log T`` follows the gradient of the ChEES criterion
  ``1/4 E[(||z' - E z||^2 - ||z - E z||^2)^2]`` (means across chains, in the
  preconditioned coordinates ``z = u / sqrt(diag M^-1)``) by RMSProp as in TFP's
  ``GradientBasedTrajectoryLengthAdaptation`` (decay 0.95, bias-corrected, updates
  clipped to +-0.35), and sampling uses the iterate average (weights ``n^-1/2``).
  Changes for short warmups (a few hundred iterations, not thousands): the
  gradient is the scale-free ``d log ChEES / d log T`` from running means (see
  :func:`chees_update`), both ends of a transition are centred alike (see
  :func:`chees_statistics`), and the rate is 0.05 (TFP: 0.025) from a first
  trajectory of 10 steps.
* **mass matrix**: diagonal ``M^-1`` = the variance of the draws across all chains
  and iterations of a window (see :func:`welford_inverse_mass`), in Stan's doubling
  windows (75 initial and 50 final iterations, fewer in short warmups).  After each window the step size
  is re-initialised by the doubling/halving heuristic and dual averaging restarts;
  ``T`` restarts at 1 after the first window (unit marginal scales in the new
  metric) and carries over after later ones (see :func:`warmup_end_window`).

The windows, the buffers and where each window's draws are collected come from one
function, :func:`warmup_schedule`, driven by :func:`warmup`, which tracks how many
windows have closed.  Chains start from prior draws (as :func:`pyro_bbb.hmc.run_nuts`
does) or, with ``init="map"``, from short MAP fits of those draws.  The result
is an :class:`~pyro_bbb.hmc.HMCReference` (:class:`ChEESReference`) with the same
site names as ``run_nuts``, so :func:`pyro_bbb.to_inference_data` and ``compare``
take it unchanged, plus convergence ``diagnostics`` read on the network output
``f(x*)``: rank-normalised split R-hat (Vehtari et al. 2021), nested R-hat
(Margossian et al. 2024) over superchains, and bulk ESS.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable, NamedTuple

import numpy as np
import pyro
import torch
from torch import Tensor
from torch.distributions import biject_to
from tqdm.auto import tqdm

from . import _checks
from .compare import ESS_MIN, rhat_passes
from .hmc import HMCReference

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's refactor notice
    import arviz as az

__all__ = [
    "ChEESReference",
    "HMCInfo",
    "HMCState",
    "Potential",
    "hmc_init",
    "hmc_step",
    "WarmupSchedule",
    "map_fit",
    "nested_rhat",
    "reference_converged",
    "run_hmc",
    "warmup",
    "warmup_schedule",
]

#: Energy error above which a transition counts as divergent (Stan's and Pyro's value).
DIVERGENCE_THRESHOLD = 1000.0
#: Where chains start: prior draws, or short MAP fits from prior draws (see run_hmc).
INIT_STRATEGIES = ("prior", "map")
#: Per-draw sample statistics, each (chains, draws) in the result.
SAMPLE_STATS = ("acceptance_rate", "step_size", "n_steps", "trajectory_length", "diverging", "lp",
                "energy")


# ============================================================================
# The potential: one batched log density over chains, in unconstrained space
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
        priors = _model_priors(model)
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


def _model_priors(model) -> dict:
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
# The kernel: jittered HMC for C chains at once (no adaptation in here)
# ============================================================================
class HMCState(NamedTuple):
    """Positions ``(C, D)`` (unconstrained), their potential ``(C,)`` and gradient ``(C, D)``."""

    position: Tensor
    potential: Tensor
    grad: Tensor


class HMCInfo(NamedTuple):
    """What one transition tells the adaptation and the sample stats (per chain)."""

    acceptance_rate: Tensor  # min(1, exp(-energy error)); 0 if divergent
    accepted: Tensor  # bool
    diverging: Tensor  # bool
    energy: Tensor  # Hamiltonian at the returned state
    proposal_position: Tensor  # end of the trajectory (C, D)
    proposal_momentum: Tensor  # momentum there (C, D)
    n_steps: int


def hmc_init(position: Tensor, potential_fn: Callable) -> HMCState:
    """The kernel state at ``position`` (C, D)."""
    potential, grad = potential_fn(position)
    return HMCState(position.detach(), potential, grad)


def _kinetic(momentum: Tensor, inv_mass: Tensor) -> Tensor:
    return 0.5 * (momentum * momentum * inv_mass).sum(-1)


def hmc_step(
    state: HMCState,
    potential_fn: Callable,
    *,
    step_size: float,
    inv_mass: Tensor,
    n_steps: int,
    generator: torch.Generator,
) -> tuple[HMCState, HMCInfo]:
    """One HMC transition of every chain: ``n_steps`` leapfrog steps, then Metropolis.

    The momentum is drawn from ``N(0, M)`` with ``M = diag(1 / inv_mass)``.  A chain
    whose energy error exceeds :data:`DIVERGENCE_THRESHOLD` (or is not finite) at any
    step is divergent and rejected.
    """
    q0, u0, g0 = state
    noise = torch.randn(q0.shape, generator=generator, device=q0.device, dtype=q0.dtype)
    p = noise * inv_mass.rsqrt()
    h0 = u0 + _kinetic(p, inv_mass)
    q, g, u = q0, g0, u0
    diverging = torch.zeros_like(u0, dtype=torch.bool)
    half = 0.5 * step_size
    for _ in range(n_steps):
        p = p - half * g
        q = q + step_size * inv_mass * p
        u, g = potential_fn(q)
        p = p - half * g
        # NaN-safe: a non-finite energy error is divergent too.
        diverging |= ~((u + _kinetic(p, inv_mass) - h0) <= DIVERGENCE_THRESHOLD)
    h1 = u + _kinetic(p, inv_mass)
    log_accept = torch.where(diverging, torch.full_like(h0, -math.inf), h0 - h1)
    acceptance = torch.exp(torch.clamp(log_accept, max=0.0))
    uniform = torch.rand(u0.shape, generator=generator, device=q0.device, dtype=q0.dtype)
    accepted = torch.log(uniform) < log_accept
    new = HMCState(
        torch.where(accepted[:, None], q, q0),
        torch.where(accepted, u, u0),
        torch.where(accepted[:, None], g, g0),
    )
    energy = torch.where(accepted, h1, h0)
    return new, HMCInfo(acceptance, accepted, diverging, energy, q, p, n_steps)


def halton(i: int) -> float:
    """The base-2 Halton (van der Corput) number of ``i >= 1``: 1/2, 1/4, 3/4, 1/8, ..."""
    out, f = 0.0, 0.5
    while i > 0:
        out += f * (i & 1)
        i >>= 1
        f *= 0.5
    return out


def num_leapfrog_steps(trajectory_length: float, step_size: float, jitter: float, maximum: int) -> int:
    """``ceil(jitter * T / eps)`` clipped to ``[1, maximum]``."""
    n = math.ceil(jitter * trajectory_length / step_size) if step_size > 0 else maximum
    return int(min(max(n, 1), maximum))


# ============================================================================
# Adaptation: step size, trajectory length, mass matrix (each init / update)
# ============================================================================
class DualAveragingState(NamedTuple):
    log_step: float
    log_step_avg: float
    h_avg: float
    count: int
    mu: float


def dual_averaging_init(step_size: float) -> DualAveragingState:
    """Nesterov's dual averaging, centred at ``log(10 eps)`` (Hoffman & Gelman 2014)."""
    return DualAveragingState(math.log(step_size), math.log(step_size), 0.0, 0, math.log(10 * step_size))


def dual_averaging_update(
    state: DualAveragingState, accept_stat: float, target: float,
    gamma: float = 0.05, t0: float = 10.0, kappa: float = 0.75,
) -> DualAveragingState:
    """One step towards ``accept_stat == target`` (a statistic in [0, 1])."""
    t = state.count + 1
    eta = 1.0 / (t + t0)
    h_avg = (1 - eta) * state.h_avg + eta * (target - accept_stat)
    log_step = state.mu - math.sqrt(t) / gamma * h_avg
    w = t ** (-kappa)
    log_step_avg = w * log_step + (1 - w) * state.log_step_avg
    return DualAveragingState(log_step, log_step_avg, h_avg, t, state.mu)


class ChEESState(NamedTuple):
    log_length: float  # the RMSProp iterate, log T
    log_length_avg: float  # iterate average with weights n^-1/2
    sq_grad_avg: float  # RMSProp's running mean of squared gradients
    count: int  # RMSProp steps (bias correction)
    avg_count: int  # iterates in the average (restarted by chees_restart)
    slope_avg: float  # running mean of t dC/dt (C: the ChEES criterion)
    chees_avg: float  # running mean of C


#: RMSProp on log T as in TFP's GradientBasedTrajectoryLengthAdaptation (rate 0.025
#: there; 0.05 here, for warmups of a few hundred iterations).
CHEES_LEARNING_RATE = 0.05
CHEES_SQ_GRAD_DECAY = 0.95
CHEES_MAX_LOG_UPDATE = 0.35
#: Decay of the running means of the criterion and its slope (~10 iterations).
CHEES_AVERAGE_DECAY = 0.9
#: Leapfrog steps of the first trajectory (T starts at this many step sizes).
INITIAL_STEPS = 10


def chees_init(trajectory_length: float) -> ChEESState:
    log_length = math.log(trajectory_length)
    return ChEESState(log_length, log_length, 0.0, 0, 0, 0.0, 0.0)


def chees_restart(state: ChEESState, trajectory_length: float) -> ChEESState:
    """Continue from ``trajectory_length`` (after a metric change), restarting the average."""
    log_length = math.log(trajectory_length)
    return state._replace(log_length=log_length, log_length_avg=log_length, avg_count=0)


def chees_statistics(
    initial_position: Tensor, info: HMCInfo, inv_mass: Tensor, integration_time: float
) -> tuple[float, float]:
    """``(t dC/dt, C)`` of one transition, estimated across chains.

    ``C = 1/4 E[(|z' - m'|^2 - |z - m|^2)^2]`` is the ChEES criterion (Hoffman et al.
    2021) in the preconditioned coordinates ``z = u / sqrt(M^-1)``, where the
    kinetic energy is ``|p_z|^2 / 2`` and the velocity ``v = sqrt(M^-1) p``; along
    the trajectory ``dC/dt = E[(|z' - m'|^2 - |z - m|^2) (z' - m') . v']``.  Chains
    are weighted by their acceptance probability (divergent and non-finite ones get
    zero weight), and ``m'``, ``m`` are the weighted means of the proposals and of
    the starting points.  ``t`` is the integration time actually used,
    ``n_steps * step_size``.
    """
    scale = inv_mass.sqrt()
    z1 = info.proposal_position / scale
    ok = torch.isfinite(z1).all(-1) & torch.isfinite(info.proposal_momentum).all(-1) & ~info.diverging
    weight = torch.where(ok, info.acceptance_rate, torch.zeros_like(info.acceptance_rate))
    weight = weight.to(torch.float64)
    total = weight.sum()
    if not float(total) > 1e-12:
        return 0.0, 0.0
    z1 = torch.where(ok[:, None], z1, torch.zeros_like(z1)).to(torch.float64)
    v1 = torch.where(ok[:, None], info.proposal_momentum * scale, torch.zeros_like(z1))
    v1 = v1.to(torch.float64)
    z0 = (initial_position / scale).to(torch.float64)
    # Both ends centred with the same weights: the two means then differ by O(t), so
    # Delta -> 0 as t -> 0.  (Centring the start at its plain mean, as TFP does, adds
    # a t-independent offset when acceptance varies across chains -- as it does far
    # from equilibrium -- which flattens the estimated C(t) and stalls T.)
    c1 = z1 - (weight[:, None] * z1).sum(0) / total
    c0 = z0 - (weight[:, None] * z0).sum(0) / total
    delta = (c1 * c1).sum(-1) - (c0 * c0).sum(-1)
    slope = integration_time * float((weight * delta * (c1 * v1).sum(-1)).sum() / total)
    chees = 0.25 * float((weight * delta**2).sum() / total)
    if not (math.isfinite(slope) and math.isfinite(chees)):
        return 0.0, 0.0
    return slope, chees


def chees_update(state: ChEESState, slope: float, chees: float) -> ChEESState:
    """One RMSProp step of gradient *ascent* on log T.

    The gradient is the log-derivative of the criterion, ``d log C / d log T =
    E_h[t dC/dt] / E_h[C]``, with running means over iterations (so over the jitter
    ``h``), clipped to [-1, 1].  It is scale-free: far from equilibrium the raw
    ``dC/dT`` of single iterations spans many orders of magnitude, and fed to
    RMSProp as TFP does, one huge value freezes ``T`` for hundreds of iterations.
    """
    d = CHEES_AVERAGE_DECAY
    slope_avg = d * state.slope_avg + (1 - d) * slope
    chees_avg = d * state.chees_avg + (1 - d) * chees
    grad = slope_avg / chees_avg if chees_avg > 0 else 0.0
    grad = min(max(grad, -1.0), 1.0) if math.isfinite(grad) else 0.0
    count = state.count + 1
    sq = CHEES_SQ_GRAD_DECAY * state.sq_grad_avg + (1 - CHEES_SQ_GRAD_DECAY) * grad * grad
    sq_hat = sq / (1 - CHEES_SQ_GRAD_DECAY**count)
    update = CHEES_LEARNING_RATE * grad / math.sqrt(sq_hat + 1e-20)
    update = min(max(update, -CHEES_MAX_LOG_UPDATE), CHEES_MAX_LOG_UPDATE)
    log_length = state.log_length + update
    avg_count = state.avg_count + 1
    w = avg_count ** (-0.5)
    log_length_avg = w * log_length + (1 - w) * state.log_length_avg
    return ChEESState(log_length, log_length_avg, sq, count, avg_count, slope_avg, chees_avg)


class WelfordState(NamedTuple):
    """Running mean and sum of squares per chain, (C, D), over ``count`` iterations."""

    mean: Tensor
    m2: Tensor
    count: int


def welford_init(num_chains: int, dim: int, like: Tensor) -> WelfordState:
    z = torch.zeros(num_chains, dim, dtype=torch.float64, device=like.device)
    return WelfordState(z, z.clone(), 0)


def welford_update(state: WelfordState, position: Tensor) -> WelfordState:
    count = state.count + 1
    x = position.to(torch.float64)
    delta = x - state.mean
    mean = state.mean + delta / count
    m2 = state.m2 + delta * (x - mean)
    return WelfordState(mean, m2, count)


def welford_inverse_mass(state: WelfordState) -> Tensor:
    """Variance of all draws of the window (all chains, all iterations), regularised
    towards 1e-3 as in Stan.

    The total variance (within plus between chains) is the cross-chain estimate of
    the posterior's marginal scales.  The pooled *within*-chain variance was tried
    too: on a BNN it reflects the local scale of whatever region each chain sits in
    while warming up, gave 5x larger step sizes, and let chains settle in narrow
    regions they did not leave (R-hat 1.1 on f(x*)); the total variance did not.
    """
    n, c = state.count, state.mean.shape[0]
    grand = state.mean.mean(0)
    between = n * ((state.mean - grand) ** 2).sum(0)
    total = n * c
    var = (state.m2.sum(0) + between) / max(total - 1, 1)
    return (total / (total + 5.0)) * var + 1e-3 * (5.0 / (total + 5.0))


#: Stan's windowed adaptation: initial fast buffer, first slow window, final fast buffer.
INIT_BUFFER, FIRST_WINDOW, TERM_BUFFER = 75, 25, 50
#: Under this many warmup iterations there is no mass-matrix adaptation: the final
#: buffer would leave dual averaging fewer than 10 iterations to settle the step size.
MIN_ADAPTED_WARMUP = 100


@dataclass(frozen=True)
class WarmupSchedule:
    """The one warmup schedule: where each mass-matrix window starts and stops.

    ``windows`` are ``(start, stop)`` pairs of 0-based warmup iterations, ``stop``
    exclusive, contiguous, none empty.  Iterations before the first window are the
    initial fast buffer (step size and trajectory length only, far from
    equilibrium), those after the last the final fast buffer (the step size for the
    last metric).  The draws of iteration ``i`` feed the window holding ``i``; the
    metric is updated after the window's last iteration, ``stop - 1``.
    """

    warmup_steps: int
    windows: tuple[tuple[int, int], ...]

    @property
    def init_buffer(self) -> int:
        return self.windows[0][0] if self.windows else self.warmup_steps

    @property
    def term_buffer(self) -> int:
        return self.warmup_steps - self.windows[-1][1] if self.windows else 0

    def window_of(self, iteration: int) -> int | None:
        """Index of the window holding ``iteration``, or None in a fast buffer."""
        for k, (start, stop) in enumerate(self.windows):
            if start <= iteration < stop:
                return k
        return None


def warmup_schedule(warmup_steps: int) -> WarmupSchedule:
    """Stan's windowed adaptation for ``warmup_steps`` iterations.

    An initial buffer of 75 iterations and a final buffer of 50, slow windows of
    25, 50, 100, ... iterations in between, the last stretched to the final buffer
    when the next one would not fit; under 150 warmup iterations, where those do
    not fit, 15% / 75% / 10% as Stan does; under :data:`MIN_ADAPTED_WARMUP` no
    windows at all.

    >>> warmup_schedule(200).windows
    ((75, 100), (100, 150))
    >>> warmup_schedule(1000).windows
    ((75, 100), (100, 150), (150, 250), (250, 450), (450, 950))
    """
    if warmup_steps < MIN_ADAPTED_WARMUP:
        return WarmupSchedule(warmup_steps, ())
    if warmup_steps >= INIT_BUFFER + FIRST_WINDOW + TERM_BUFFER:
        init, term = INIT_BUFFER, TERM_BUFFER
    else:
        init, term = int(0.15 * warmup_steps), int(0.10 * warmup_steps)
    slow_end = warmup_steps - term
    windows, start, size = [], init, FIRST_WINDOW
    while True:
        stop = start + size
        if stop + 2 * size > slow_end:  # the next window would not fit: stretch this one
            windows.append((start, slow_end))
            return WarmupSchedule(warmup_steps, tuple(windows))
        windows.append((start, stop))
        start, size = stop, 2 * size


def adaptation_windows(warmup_steps: int) -> list[int]:
    """Iterations (0-based) after which the mass matrix is updated: the last
    iteration of each window of :func:`warmup_schedule`.

    >>> adaptation_windows(120)
    [42, 107]
    >>> adaptation_windows(1000)
    [99, 149, 249, 449, 949]
    """
    return [stop - 1 for _, stop in warmup_schedule(warmup_steps).windows]


#: The first trial step size of the warmup (before the doubling/halving search).
INITIAL_STEP_SIZE = 0.1
#: A step size this far below where its search started means no step is small enough:
#: the potential is flat-out infinite or its scale is absurd (e.g. y of 1e20).
STEP_SIZE_FLOOR = 1e-10


#: Energy errors HMC must resolve are O(1); where |U| times the float epsilon exceeds
#: this at every start, differences below it are rounding, and acceptance is noise.
ENERGY_RESOLUTION = 1e3


def _check_start(state: HMCState) -> None:
    """ValueError if no start has a finite potential, or if every start's potential
    is too large for its dtype to resolve energy errors (e.g. y of 1e20 in float64)."""
    u = state.potential
    if not bool(torch.isfinite(u).any()):
        raise _degenerate("the log density is not finite at any starting point")
    smallest = float(u[torch.isfinite(u)].abs().min())
    if smallest * torch.finfo(u.dtype).eps > ENERGY_RESOLUTION:
        raise _degenerate(f"the log density is {smallest:.3g} in magnitude at every starting "
                          f"point, beyond what {u.dtype} resolves")


def _degenerate(reason: str) -> ValueError:
    return ValueError(
        f"the posterior is degenerate for HMC: {reason} (acceptance 0 at any step size). "
        "Check y and x for extreme values; standardize y (and x) before sampling"
    )


def _check_step_size(step_size: float, reference: float) -> None:
    if not step_size >= STEP_SIZE_FLOOR * reference:
        raise _degenerate(f"the step size fell to {step_size:.3g}, below {STEP_SIZE_FLOOR:g} "
                          f"times its initial {reference:.3g}")


def find_step_size(
    state: HMCState,
    potential_fn: Callable,
    inv_mass: Tensor,
    step_size: float,
    generator: torch.Generator,
    target: float = 0.5,
    max_tries: int = 60,
) -> float:
    """Double or halve ``step_size`` until one leapfrog step's mean acceptance crosses
    ``target`` (Hoffman & Gelman 2014, Algorithm 4; averaged over chains).

    Raises ``ValueError`` (the posterior is degenerate) if halving goes below
    :data:`STEP_SIZE_FLOOR` times the starting ``step_size``."""

    def accept(eps):
        _, info = hmc_step(state, potential_fn, step_size=eps, inv_mass=inv_mass, n_steps=1,
                           generator=generator)
        return float(torch.nan_to_num(info.acceptance_rate, nan=0.0).mean())

    start = step_size
    direction = 1.0 if accept(step_size) > target else -1.0
    for _ in range(max_tries):
        new = step_size * 2.0**direction
        if direction < 0:
            _check_step_size(new, start)
        a = accept(new)
        if (direction > 0 and not a > target) or (direction < 0 and a > target):
            return new if direction < 0 else step_size
        step_size = new
    return step_size


# ============================================================================
# Diagnostics
# ============================================================================
def nested_rhat(draws: np.ndarray, num_superchains: int) -> np.ndarray:
    """Nested R-hat (Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari & Gelman 2024).

    ``draws`` has shape ``(chains, draws, ...)``; consecutive chains form
    ``num_superchains`` superchains of equal size.  ``nR = sqrt(1 + B / W)`` with ``B``
    the variance of the superchain means and ``W`` the mean over superchains of the
    between-chain variance within the superchain plus the mean within-chain variance.
    Values near 1 (below ~1.01-1.05) mean the superchains agree.

    >>> rng = np.random.default_rng(0)
    >>> float(nested_rhat(rng.normal(size=(64, 100)), 8)) < 1.01
    True
    """
    draws = np.asarray(draws, dtype=np.float64)
    c, n = draws.shape[:2]
    k = int(num_superchains)
    if k < 2 or c % k:
        raise ValueError(f"num_superchains must be >= 2 and divide the {c} chains, got {k}")
    m = c // k
    x = draws.reshape((k, m, n) + draws.shape[2:])
    chain_mean = x.mean(2)  # (k, m, ...)
    super_mean = chain_mean.mean(1)  # (k, ...)
    b = super_mean.var(0, ddof=1)
    within_chain = x.var(2, ddof=1).mean(1) if n > 1 else 0.0
    between_chain = chain_mean.var(1, ddof=1) if m > 1 else 0.0
    w = (between_chain + within_chain).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(1.0 + b / w)


def _f_diagnostics(f: np.ndarray, num_superchains: int) -> dict:
    """R-hat, nested R-hat, bulk/tail ESS of f(x*) of shape (chains, draws, m), and
    their summaries (NaN where a run is too short to tell)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # "More chains than draws" is ArviZ's guess at a transposed array; many short
        # chains are exactly what this sampler makes.
        warnings.simplefilter("ignore")
        data = az.convert_to_dataset({"f": f})
        out = {
            "rhat_f": np.asarray(az.rhat(data)["f"].values),
            "ess_bulk_f": np.asarray(az.ess(data, method="bulk")["f"].values),
            "ess_tail_f": np.asarray(az.ess(data, method="tail")["f"].values),
        }
        if num_superchains:
            out["nested_rhat_f"] = nested_rhat(f, num_superchains)

        def reduce(fn, a):
            a = np.asarray(a, dtype=np.float64)
            return float(fn(a)) if np.isfinite(a).any() else math.nan

        out["max_rhat_f"] = reduce(np.nanmax, out["rhat_f"])
        out["min_ess_bulk_f"] = reduce(np.nanmin, out["ess_bulk_f"])
        out["min_ess_tail_f"] = reduce(np.nanmin, out["ess_tail_f"])
        out["median_ess_bulk_f"] = reduce(np.nanmedian, out["ess_bulk_f"])
        if num_superchains:
            out["max_nested_rhat_f"] = reduce(np.nanmax, out["nested_rhat_f"])
    return out


# ============================================================================
# The result
# ============================================================================
@dataclass(repr=False)
class ChEESReference(HMCReference):
    """An :class:`~pyro_bbb.hmc.HMCReference` from :func:`run_hmc`, plus diagnostics.

    Extra attributes
    ----------------
    diagnostics : dict
        On the network output at ``x_test`` (the training inputs if not given), each
        an array over the flattened test points: ``rhat_f`` (rank-normalised split
        R-hat), ``nested_rhat_f`` (nested R-hat over superchains), ``ess_bulk_f``,
        ``ess_tail_f``; and the scalars ``max_rhat_f``, ``max_nested_rhat_f``,
        ``min_ess_bulk_f``, ``min_ess_tail_f``, ``median_ess_bulk_f``, ``divergences``.
    adaptation : dict
        The adapted ``step_size``, ``trajectory_length``, ``inverse_mass_matrix``
        (numpy, per unconstrained coordinate) and the warmup traces
        ``warmup_step_size``, ``warmup_trajectory_length``, ``warmup_n_steps``,
        ``warmup_acceptance_rate`` (harmonic mean over chains), ``warmup_window_draws``
        (draws behind each mass-matrix update).
    converged : bool
        :func:`reference_converged` on the final diagnostics.
    stop_reason : str
        ``"num_samples"``, or with ``until_converged`` ``"converged"``,
        ``"time_limit"`` or ``"max_samples"``.
    """

    diagnostics: dict = field(default_factory=dict)
    adaptation: dict = field(default_factory=dict, repr=False)
    converged: bool = False
    stop_reason: str = ""


# ============================================================================
# The runner
# ============================================================================
def _check_model(model):
    for attr in ("log_joint", "latent_names", "network", "extra_priors"):
        if not hasattr(model, attr):
            raise ValueError(
                "run_hmc samples pyro_bbb models (BayesianRegressor, BayesianClassifier), "
                f"which have a batched log joint; got {type(model).__name__} without "
                f"{attr!r}. For any other Pyro model use pyro_bbb.run_nuts(model, x, y, ...)"
            )


def _check_unit_interval(name, value):
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


#: Adam steps and rate of the short MAP fits of ``init="map"``: a few hundred steps take
#: a prior draw into a mode's basin (MILE, ICLR 2025, fits longer; the chains'
#: warmup does the rest), each coordinate moves at most ~lr per step.
MAP_STEPS = 300
MAP_LEARNING_RATE = 0.02
#: Standard deviation of the jitter (unconstrained coordinates) that spreads the chains
#: of one superchain around its MAP point.
MAP_JITTER = 0.01


def map_fit(potential: Potential, position: Tensor, steps: int = MAP_STEPS,
            lr: float = MAP_LEARNING_RATE) -> Tensor:
    """Short MAP fits of ``-U`` (the log joint plus the log-Jacobian, in unconstrained
    space) by Adam, all rows of ``position`` (K, D) at once through the batched
    potential; returns the fitted (K, D).  A row whose potential is not finite gets a
    zero gradient and stays where it is.

    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> x = torch.linspace(-1, 1, 20)[:, None]
    >>> model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0., 1.), noise=0.1)
    >>> pot = Potential(model, x, 2 * x[:, 0])
    >>> map_fit(pot, torch.zeros(2, 2), steps=500, lr=0.05)[:, 0].round(decimals=1)
    tensor([2., 2.])
    """
    u = position.detach().clone()
    optimizer = torch.optim.Adam([u], lr=lr)
    for _ in range(steps):
        _, grad = potential.value_and_grad(u)
        u.grad = grad
        optimizer.step()
    return u.detach()


def _initial_positions(potential, model, num_chains, num_superchains, init, seed, generator):
    """Prior draws in unconstrained space, one per superchain (or chain); with
    ``init="map"`` each taken to its MAP point by :func:`map_fit`, then jittered by
    :data:`MAP_JITTER` per chain.  Chains of one superchain share a start."""
    priors = _model_priors(model)
    groups = num_superchains or num_chains
    device, dtype = potential.x.device, potential.x.dtype
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        values = {n: priors[n].sample((groups,)).to(device=device, dtype=dtype) for n in model.latent_names}
    u = potential.flatten(values)
    if init == "map":
        u = map_fit(potential, u)
    u = u.repeat_interleave(num_chains // groups, dim=0)
    if init == "map":
        u = u + MAP_JITTER * torch.randn(u.shape, generator=generator, device=device, dtype=dtype)
    return u


def run_hmc(
    model,
    x,
    y,
    *,
    num_chains: int = 64,
    num_samples: int = 100,
    warmup_steps: int = 200,
    target_accept_prob: float = 0.65,
    max_leapfrog_steps: int = 1000,
    num_superchains: int | None = None,
    x_test=None,
    init: str = "prior",
    until_converged: bool = False,
    time_limit: float | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ChEESReference:
    """Sample a pyro_bbb model's posterior with ChEES-HMC, many chains in lockstep.

    A fast HMC reference for Bayes by Backprop: all ``num_chains`` chains advance
    together, one batched evaluation of the model's log joint (and one autograd
    call) per leapfrog step.  Step size, trajectory length and a diagonal mass matrix
    are adapted across chains during warmup, then frozen; see the module docstring
    for the algorithm.

    Parameters
    ----------
    model : BayesianRegressor or BayesianClassifier
        A pyro_bbb model.  Other Pyro models (no batched ``log_joint``) and discrete
        latent sites raise ``ValueError``: use :func:`pyro_bbb.run_nuts` for them.
    x, y : array-like
        Inputs and targets, as for ``model(x, y)``.
    num_chains : int, >= 2, default 64
        Chains run together (the batch of every network evaluation).
    num_samples : int, >= 1, default 100
        Post-warmup draws kept per chain.
    warmup_steps : int, >= 0, default 200
        Adaptation iterations per chain, discarded.
    target_accept_prob : float in (0, 1), default 0.65
        Target of the harmonic mean (over chains) of the acceptance probability;
        raise it (0.8, 0.9) if there are divergences.
    max_leapfrog_steps : int, >= 1, default 1000
        Cap on leapfrog steps per iteration.
    num_superchains : int, optional
        Superchains for nested R-hat: chains ``k*m .. (k+1)*m - 1`` start from one
        prior draw.  Default: ``num_chains // 8`` if that is >= 2 and divides
        ``num_chains``, else every chain starts apart and nested R-hat is skipped
        (``0``: same).
    x_test : array-like, optional
        Inputs at which ``f(x*)`` is read for the diagnostics (default: ``x``).
    init : {"prior", "map"}, default "prior"
        ``"prior"``: each superchain (or chain) starts from a prior draw.  ``"map"``:
        those draws are first taken to a mode by :data:`MAP_STEPS` Adam steps on the
        log joint (all at once, :func:`map_fit`), and the chains of a superchain start
        at its MAP point plus N(0, :data:`MAP_JITTER` squared) jitter (Izmailov et
        al. 2021; MILE, ICLR 2025); with superchains, nested R-hat then says whether
        chains from different modes agree.  The default stays ``"prior"``: on the
        regression curve both pass the check at the same cost, and prior starts
        make no assumption that a short fit finds a useful mode.
    until_converged : bool, default False
        Keep drawing blocks of ``num_samples`` per chain until
        :func:`reference_converged` (max R-hat on f(x*) <= 1.01 as printed, bulk and
        tail ESS >= 400 at every test input) or the budget runs out; needs
        ``time_limit`` or ``max_samples``.  ``result.converged`` and
        ``result.stop_reason`` (``"converged"``, ``"time_limit"``, ``"max_samples"``;
        ``"num_samples"`` for a plain run) say which.
    time_limit : float, optional
        Seconds for the whole run, warmup included: sampling stops at the first
        transition that ends past it (after at least :data:`MIN_TIMED_DRAWS` draws
        per chain; warmup always runs to its end).
    max_samples : int, optional
        Cap on the draws per chain.
    seed : int, default 0
        Seeds the prior draws and a private ``torch.Generator``; the global random
        state is left untouched.
    progress : bool, default True
        A tqdm bar (warmup, then sampling) with acceptance, step size and steps.

    Returns
    -------
    ChEESReference
        An :class:`~pyro_bbb.hmc.HMCReference` (``samples`` ``(num_chains,
        num_samples, *shape)`` on CPU with the site names of ``run_nuts``;
        ``sample_stats`` ``acceptance_rate``, ``step_size``, ``n_steps``,
        ``trajectory_length``, ``diverging``, ``lp``, ``energy``, each ``(chains,
        draws)``; ``sampler = "pyro_bbb ChEES-HMC"``) plus ``diagnostics`` on f(x*),
        ``adaptation``, ``converged`` and ``stop_reason``.

    Raises
    ------
    ValueError
        For bad arguments, and when the posterior is degenerate for HMC: no start
        with a finite log density, one too large for its dtype to resolve, the step
        size collapsing below :data:`STEP_SIZE_FLOOR` times its start, or every
        transition of the first :data:`MAX_DIVERGENT_START` warmup iterations
        divergent (standardize y).

    Notes
    -----
    ``lp`` is, as for ``run_nuts``, the log joint plus the log-Jacobian of the map to
    unconstrained space (equal to the log joint for real-valued weights); ``energy``
    is the Hamiltonian at the draw; ``acceptance_rate`` the Metropolis acceptance
    probability ``min(1, exp(-dH))`` of the transition.  Chains of a BNN can settle in
    different modes (units permute, signs flip): judge convergence by the R-hats on
    ``f(x*)`` in ``diagnostics``, never on weights.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> x = torch.linspace(-1, 1, 20)[:, None]
    >>> y = 2 * x[:, 0] + 0.1 * torch.randn(20, generator=torch.Generator().manual_seed(0))
    >>> model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0., 1.), noise=0.1)
    >>> ref = run_hmc(model, x, y, num_chains=8, num_samples=20, warmup_steps=40, progress=False)
    >>> ref.samples["weight"].shape
    torch.Size([8, 20, 1, 1])
    >>> ref.sample_stats["acceptance_rate"].shape
    (8, 20)
    """
    # -- arguments -------------------------------------------------------------------
    _check_model(model)
    num_chains = _checks.positive_int("num_chains", num_chains)
    if num_chains < 2:
        raise ValueError(f"num_chains must be >= 2 (ChEES adapts across chains), got {num_chains}")
    num_samples = _checks.positive_int("num_samples", num_samples)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, Integral) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    warmup_steps = int(warmup_steps)
    target_accept_prob = _check_unit_interval("target_accept_prob", target_accept_prob)
    max_leapfrog_steps = _checks.positive_int("max_leapfrog_steps", max_leapfrog_steps)
    seed = _checks.seed(seed, allow_none=False)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    if num_superchains is None:
        k = num_chains // 8
        num_superchains = k if k >= 2 and num_chains % k == 0 else 0
    elif (
        isinstance(num_superchains, bool)
        or not isinstance(num_superchains, Integral)
        or num_superchains < 0
        or num_superchains == 1
        or (num_superchains and num_chains % num_superchains)
    ):
        raise ValueError(
            f"num_superchains must be 0 or an integer >= 2 that divides num_chains={num_chains}, "
            f"got {num_superchains!r}"
        )
    num_superchains = int(num_superchains)
    _model_priors(model)  # discrete sites -> ValueError before anything runs

    ref = next(iter(model.initial_values().values()))
    device, dtype = ref.device, ref.dtype
    x, y = _checks.model_data(model, x, y, dtype)
    x, y = x.to(device), y.to(device)
    if x_test is None:
        x_test = x
    else:
        x_test = _checks.inputs(model, x_test, "x_test").to(device)
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"x_test must have the same feature shape as x, got {tuple(x_test.shape[1:])} "
                f"and {tuple(x.shape[1:])}"
            )

    init = _checks.choice("init", init, INIT_STRATEGIES)
    if not isinstance(until_converged, bool):
        raise ValueError(f"until_converged must be True or False, got {until_converged!r}")
    time_limit = None if time_limit is None else _checks.positive_float("time_limit", time_limit)
    max_samples = None if max_samples is None else _checks.positive_int("max_samples", max_samples)
    if until_converged and time_limit is None and max_samples is None:
        raise ValueError("until_converged=True needs a budget: time_limit (seconds) or max_samples")
    if not until_converged and (time_limit is not None or max_samples is not None):
        raise ValueError("time_limit and max_samples bound until_converged=True runs; "
                         "set until_converged=True or leave them None")

    settings = {
        "num_chains": num_chains,
        "num_samples": num_samples,
        "warmup_steps": warmup_steps,
        "target_accept_prob": target_accept_prob,
        "max_leapfrog_steps": max_leapfrog_steps,
        "num_superchains": num_superchains,
        "seed": seed,
        "init": init,
        "init_strategy": (f"MAP fits ({MAP_STEPS} Adam steps, lr {MAP_LEARNING_RATE}) from prior "
                          f"draws, chains jittered by N(0, {MAP_JITTER}^2)" if init == "map" else
                          "prior draws") + (" shared within superchains" if num_superchains else ""),
        "until_converged": until_converged,
        "time_limit": time_limit,
        "max_samples": max_samples,
        "jitter": "halton",
        "mass_matrix": "diagonal, variance across chains and window draws, Stan windows",
    }

    start_time = time.perf_counter()
    bar = tqdm(total=warmup_steps + num_samples, disable=not progress, desc="warmup", leave=True)
    with pyro.validation_enabled(False):
        from .mlp_potential import batched_potential  # here: that module imports this one

        potential = batched_potential(model, x, y)  # fused for MLPs, else Potential
        generator = torch.Generator(device=device).manual_seed(seed)
        position = _initial_positions(potential, model, num_chains, num_superchains, init, seed,
                                      generator)
        try:
            state = hmc_init(position, potential.value_and_grad)
            _check_start(state)
            state, ws, warm = warmup(state, potential.value_and_grad, generator,
                                     warmup_steps=warmup_steps, target_accept_prob=target_accept_prob,
                                     max_leapfrog_steps=max_leapfrog_steps, bar=bar)
            step_size, length, inv_mass = warmup_final(ws, max_leapfrog_steps)
            bar.set_description("sample")
            kernel = dict(step_size=step_size, length=length, inv_mass=inv_mass,
                          max_leapfrog_steps=max_leapfrog_steps)
            budget = dict(until_converged=until_converged, time_limit=time_limit,
                          max_samples=max_samples, start_time=start_time)
            run = _sample_blocks(state, potential, x_test, generator, kernel, budget, num_samples,
                                 warmup_steps, num_superchains, bar)
        finally:
            bar.close()
    wall_time = time.perf_counter() - start_time

    sample_stats = {k: np.stack(v, 1) for k, v in run["stats"].items()}
    diagnostics = run["diagnostics"]
    diagnostics["divergences"] = int(sample_stats["diverging"].sum())
    adapted = {"step_size": step_size, "trajectory_length": length,
               "inverse_mass_matrix": inv_mass.cpu().numpy()}
    adaptation = {**adapted, **{f"warmup_{k}": np.asarray(v) for k, v in warm.items()}}
    return ChEESReference(
        samples=run["samples"],
        sample_stats=sample_stats,
        sampler="pyro_bbb ChEES-HMC",
        settings=settings,
        wall_time=wall_time,
        mcmc=[],
        diagnostics=diagnostics,
        adaptation=adaptation,
        converged=run["converged"],
        stop_reason=run["stop_reason"],
    )


#: Draws per chain a time-limited run takes whatever its clock says: split R-hat needs
#: two halves of at least two draws.
MIN_TIMED_DRAWS = 4


def _sample_block(state, fn, generator, kernel, first_iteration, num, bar, deadline=None, drawn=0):
    """Up to ``num`` post-warmup transitions with the adapted kernel; positions and
    stats.  With a ``deadline`` (a ``time.perf_counter()`` value) the block ends once
    the clock is past it, if the run (``drawn`` draws before this block) holds
    :data:`MIN_TIMED_DRAWS` draws by then."""
    step_size, length, inv_mass = kernel["step_size"], kernel["length"], kernel["inv_mass"]
    num_chains = state.position.shape[0]
    draws, stats = [], {k: [] for k in SAMPLE_STATS}
    for i in range(first_iteration, first_iteration + num):
        if (deadline is not None and drawn + len(draws) >= MIN_TIMED_DRAWS
                and time.perf_counter() > deadline):
            break
        n = num_leapfrog_steps(length, step_size, halton(i + 1), kernel["max_leapfrog_steps"])
        state, info = hmc_step(state, fn, step_size=step_size, inv_mass=inv_mass, n_steps=n,
                               generator=generator)
        draws.append(state.position)
        stats["acceptance_rate"].append(info.acceptance_rate.cpu().numpy().astype(np.float64))
        stats["step_size"].append(np.full(num_chains, step_size))
        stats["n_steps"].append(np.full(num_chains, n, dtype=np.int64))
        stats["trajectory_length"].append(np.full(num_chains, n * step_size))
        stats["diverging"].append(info.diverging.cpu().numpy())
        stats["lp"].append((-state.potential).cpu().numpy().astype(np.float64))
        stats["energy"].append(info.energy.cpu().numpy().astype(np.float64))
        accept = _harmonic_mean(info.acceptance_rate, info.diverging)
        bar.set_postfix(acc=f"{accept:.2f}", step=f"{step_size:.2g}", L=n, refresh=False)
        bar.update()
    return state, draws, stats


def _sample_blocks(state, potential, x_test, generator, kernel, budget, num_samples,
                   first_iteration, num_superchains, bar):
    """Blocks of ``num_samples`` draws per chain; one block unless ``until_converged``,
    then more until :func:`reference_converged` or the budget says stop.  The time
    limit is read after every transition, so a run ends within one transition of it
    (once it holds :data:`MIN_TIMED_DRAWS` draws)."""
    from .predict import batched_outputs

    model, num_chains = potential.model, state.position.shape[0]
    draws, stats, fs, total = [], {k: [] for k in SAMPLE_STATS}, [], 0
    size = min(num_samples, budget["max_samples"] or num_samples)
    deadline = (None if budget["time_limit"] is None
                else budget["start_time"] + budget["time_limit"])
    while True:
        state, block, block_stats = _sample_block(state, potential.value_and_grad, generator, kernel,
                                                  first_iteration + total, size, bar, deadline, total)
        draws += block
        for k, v in block_stats.items():
            stats[k] += v
        values, _ = potential.unflatten(torch.stack(block, 1).reshape(-1, potential.dim))
        with torch.no_grad():
            f = batched_outputs(model, values, x_test).reshape(num_chains, len(block), -1)
        fs.append(f.cpu().numpy().astype(np.float64))
        total += len(block)
        diagnostics = _f_diagnostics(np.concatenate(fs, 1), num_superchains)
        converged = reference_converged(diagnostics)
        stop = _stop_reason(converged, budget, total, deadline)
        if stop is not None:
            break
        if budget["max_samples"] is not None:
            size = min(num_samples, budget["max_samples"] - total)
        bar.total += size
    flat = torch.stack(draws, 1)  # (C, S, D)
    values, _ = potential.unflatten(flat.reshape(-1, potential.dim))
    samples = {name: v.reshape((num_chains, total) + tuple(v.shape[1:])).detach().cpu()
               for name, v in values.items()}
    return {"samples": samples, "stats": stats, "diagnostics": diagnostics,
            "converged": converged, "stop_reason": stop}


def _stop_reason(converged, budget, total, deadline):
    """Why sampling stops after a block, or None to draw another."""
    if not budget["until_converged"]:
        return "num_samples"
    if converged:
        return "converged"
    if budget["max_samples"] is not None and total >= budget["max_samples"]:
        return "max_samples"
    if deadline is not None and time.perf_counter() > deadline:
        return "time_limit"
    return None


def reference_converged(diagnostics: Mapping) -> bool:
    """The reference check on f(x*): max R-hat passes :data:`~pyro_bbb.compare.RHAT_MAX`
    as printed (:func:`~pyro_bbb.compare.rhat_passes`) and bulk and tail ESS reach
    :data:`~pyro_bbb.compare.ESS_MIN` at every test input.  Divergences are reported
    apart (``diagnostics["divergences"]``): more draws do not remove them.

    >>> reference_converged({"max_rhat_f": 1.0101, "min_ess_bulk_f": 450.0,
    ...                      "min_ess_tail_f": 410.0})
    True
    """
    return (rhat_passes(diagnostics["max_rhat_f"])
            and diagnostics["min_ess_bulk_f"] >= ESS_MIN
            and diagnostics["min_ess_tail_f"] >= ESS_MIN)


def _clip_length(length: float, step_size: float, max_steps: int) -> float:
    """T within [one step, ``max_steps`` steps] (as BlackJAX clips it)."""
    return min(max(length, step_size), max_steps * step_size)


def _harmonic_mean(acceptance: Tensor, diverging: Tensor) -> float:
    """Harmonic mean of the acceptance probabilities of non-divergent chains (0 if none)."""
    a = acceptance[~diverging].to(torch.float64)
    if a.numel() == 0 or bool((a <= 0).any()):
        return 0.0
    return float(1.0 / (1.0 / a).mean())


# ============================================================================
# The warmup: the three adaptations composed (none of it inside the kernel)
# ============================================================================
class WarmupState(NamedTuple):
    """Everything adapted during warmup, and the values the kernel uses now."""

    step_size: float
    trajectory_length: float
    inv_mass: Tensor
    dual_averaging: DualAveragingState
    chees: ChEESState
    welford: WelfordState
    windows_closed: int  # mass-matrix windows closed so far (0: still the unit metric)


def warmup_init(state: HMCState, potential_fn, generator, max_leapfrog_steps) -> WarmupState:
    """Unit mass matrix, a heuristic step size, ``T`` = :data:`INITIAL_STEPS` steps."""
    num_chains, dim = state.position.shape
    inv_mass = torch.ones(dim, dtype=state.position.dtype, device=state.position.device)
    step_size = find_step_size(state, potential_fn, inv_mass, INITIAL_STEP_SIZE, generator)
    length = _clip_length(step_size * INITIAL_STEPS, step_size, max_leapfrog_steps)
    return WarmupState(
        step_size, length, inv_mass, dual_averaging_init(step_size), chees_init(length),
        welford_init(num_chains, dim, state.position), 0,
    )


def warmup_update(
    ws: WarmupState, initial_position: Tensor, new_state: HMCState, info: HMCInfo,
    *, target_accept_prob: float, collect: bool, max_leapfrog_steps: int,
) -> WarmupState:
    """After one transition: dual averaging on the harmonic-mean acceptance, one
    ChEES step on ``log T``, and (if ``collect``) the draws into the window."""
    accept = _harmonic_mean(info.acceptance_rate, info.diverging)
    da = dual_averaging_update(ws.dual_averaging, accept, target_accept_prob)
    slope, crit = chees_statistics(initial_position, info, ws.inv_mass, info.n_steps * ws.step_size)
    chees = chees_update(ws.chees, slope, crit)
    step_size = math.exp(da.log_step)
    length = _clip_length(math.exp(chees.log_length), step_size, max_leapfrog_steps)
    welford = welford_update(ws.welford, new_state.position) if collect else ws.welford
    return ws._replace(step_size=step_size, trajectory_length=length, dual_averaging=da,
                       chees=chees, welford=welford)


def warmup_end_window(
    ws: WarmupState, state: HMCState, potential_fn, generator, max_leapfrog_steps: int
) -> WarmupState:
    """A mass-matrix window closes: new ``M^-1``, a fresh step size for it (dual
    averaging restarted there), and the trajectory length carried into the new metric.

    With ``M^-1`` set to the posterior variance, the preconditioned posterior has unit
    marginal scales, in which a quarter period of the Gaussian dynamics is
    ``pi/2``; so the first window (unit metric -> adapted) restarts ``T`` at 1 -- the
    length learnt in the unit metric, during burn-in from prior draws, says little
    about it (it can be off by 30x either way).  Later windows keep ``T``: both
    metrics are in those units.
    """
    inv_mass = welford_inverse_mass(ws.welford).to(ws.inv_mass.dtype)
    step_size = find_step_size(state, potential_fn, inv_mass, ws.step_size, generator)
    length = 1.0 if ws.windows_closed == 0 else math.exp(ws.chees.log_length_avg)
    length = _clip_length(length, step_size, max_leapfrog_steps)
    num_chains, dim = state.position.shape
    return WarmupState(
        step_size, length, inv_mass, dual_averaging_init(step_size),
        chees_restart(ws.chees, length), welford_init(num_chains, dim, state.position),
        ws.windows_closed + 1,
    )


def warmup_final(ws: WarmupState, max_leapfrog_steps: int) -> tuple[float, float, Tensor]:
    """The values sampling uses: averaged step size and trajectory length, ``M^-1``."""
    step_size = math.exp(ws.dual_averaging.log_step_avg)
    length = _clip_length(math.exp(ws.chees.log_length_avg), step_size, max_leapfrog_steps)
    return step_size, length, ws.inv_mass


#: Warmup iterations in which every transition of every chain diverged, from the
#: start, after which the posterior is declared degenerate (a working warmup has
#: shrunk the step size long before: dual averaging cuts it ~5x per rejection).
MAX_DIVERGENT_START = 25


def warmup(
    state: HMCState,
    potential_fn: Callable,
    generator: torch.Generator,
    *,
    warmup_steps: int,
    target_accept_prob: float = 0.65,
    max_leapfrog_steps: int = 1000,
    bar=None,
) -> tuple[HMCState, WarmupState, dict]:
    """Run the warmup of :func:`warmup_schedule` from ``state``; return the last state,
    the adapted :class:`WarmupState` and a trace of lists: ``step_size``,
    ``trajectory_length``, ``n_steps``, ``acceptance_rate`` (per iteration) and
    ``window_draws`` (draws, chains x iterations, behind each mass-matrix update).

    ``potential_fn(u)`` returns ``(U, dU/du)`` for positions ``(C, D)``.  Raises
    ``ValueError`` when the posterior is degenerate (the step size collapses, or every
    transition of the first :data:`MAX_DIVERGENT_START` iterations diverged).

    Examples
    --------
    >>> pot = lambda u: (0.5 * (u * u).sum(-1), u)            # N(0, I)
    >>> gen = torch.Generator().manual_seed(0)
    >>> s0 = hmc_init(torch.randn(4, 2, generator=gen), pot)
    >>> _, ws, trace = warmup(s0, pot, gen, warmup_steps=200)
    >>> trace["window_draws"]                                 # 4 chains x 25, x 50
    [100, 200]
    """
    schedule = warmup_schedule(warmup_steps)
    ws = warmup_init(state, potential_fn, generator, max_leapfrog_steps)
    initial_step = ws.step_size
    trace = {"step_size": [], "trajectory_length": [], "n_steps": [], "acceptance_rate": [],
             "window_draws": []}
    all_divergent = True
    for i in range(warmup_steps):
        n = num_leapfrog_steps(ws.trajectory_length, ws.step_size, halton(i + 1), max_leapfrog_steps)
        initial = state.position
        state, info = hmc_step(state, potential_fn, step_size=ws.step_size, inv_mass=ws.inv_mass,
                               n_steps=n, generator=generator)
        accept = _harmonic_mean(info.acceptance_rate, info.diverging)
        for key, value in (("step_size", ws.step_size), ("trajectory_length", ws.trajectory_length),
                           ("n_steps", n), ("acceptance_rate", accept)):
            trace[key].append(value)
        all_divergent = all_divergent and bool(info.diverging.all())
        if all_divergent and i == MAX_DIVERGENT_START - 1:
            raise _degenerate(f"every transition of the first {MAX_DIVERGENT_START} warmup "
                              "iterations diverged")
        window = schedule.window_of(i)
        ws = warmup_update(ws, initial, state, info, target_accept_prob=target_accept_prob,
                           collect=window is not None, max_leapfrog_steps=max_leapfrog_steps)
        _check_step_size(ws.step_size, initial_step)
        if window is not None and i == schedule.windows[window][1] - 1:
            trace["window_draws"].append(ws.welford.count * state.position.shape[0])
            ws = warmup_end_window(ws, state, potential_fn, generator, max_leapfrog_steps)
        if bar is not None:
            bar.set_postfix(acc=f"{accept:.2f}", step=f"{ws.step_size:.2g}", L=n, refresh=False)
            bar.update()
    return state, ws, trace
