"""Adaptation during warmup: step size, trajectory length, mass matrix, one schedule.

Each adaptation is a state with ``*_init`` / ``*_update`` functions that see only what
the kernel (:mod:`pyro_bbb.hmc.kernel`) returns; :func:`warmup` composes them.

* **step size**: dual averaging (Nesterov 2009, as in Hoffman & Gelman 2014 and Stan)
  on the *harmonic* mean of the chains' acceptance probabilities, which keeps the
  worst chains moving (ChEES-HMC's choice), towards ``target_accept_prob``, with
  twice Stan's shrinkage (:data:`DUAL_AVERAGING_GAMMA`) so that the averaged step
  meets the target when sampling.
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
  windows (75 initial and 50 final iterations, fewer in short warmups).  After each
  window the step size is re-initialised by the doubling/halving heuristic and dual averaging restarts;
  ``T`` restarts at 1 after the first window (unit marginal scales in the new
  metric) and carries over after later ones (see :func:`warmup_end_window`).

The windows, the buffers and where each window's draws are collected come from one
function, :func:`warmup_schedule`, driven by :func:`warmup`, which tracks how many
windows have closed.  A posterior that HMC cannot sample (no finite start, a step size
collapsing, every early transition divergent) raises ``ValueError`` here
(:func:`check_start`, :func:`find_step_size`, :func:`warmup`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .kernel import HMCInfo, HMCState, halton, harmonic_mean, hmc_step, num_leapfrog_steps

__all__ = ["DUAL_AVERAGING_GAMMA", "ChEESState", "DualAveragingState", "WarmupSchedule",
           "WarmupState", "WelfordState", "adaptation_windows", "check_start", "chees_init",
           "chees_restart", "chees_statistics", "chees_update", "dual_averaging_init",
           "dual_averaging_update", "find_step_size", "warmup", "warmup_end_window",
           "warmup_final", "warmup_init", "warmup_schedule", "warmup_update", "welford_init",
           "welford_inverse_mass", "welford_update"]


# ============================================================================
# Step size, trajectory length, mass matrix (each init / update)
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


#: Dual averaging's shrinkage ``gamma``: Stan's 0.05 swings the iterates by ~0.6 in log
#: step size within a 50-iteration final buffer, and their average then lies below the
#: step that meets the target (sampling acceptance 0.74-0.78 against 0.65 on a
#: 100-dimensional Gaussian, 64 chains, 10 seeds); 0.1 meets it (0.64-0.68).
DUAL_AVERAGING_GAMMA = 0.1


def dual_averaging_update(
    state: DualAveragingState, accept_stat: float, target: float,
    gamma: float = DUAL_AVERAGING_GAMMA, t0: float = 10.0, kappa: float = 0.75,
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


def check_start(state: HMCState) -> None:
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


def _clip_length(length: float, step_size: float, max_steps: int) -> float:
    """T within [one step, ``max_steps`` steps] (as BlackJAX clips it)."""
    return min(max(length, step_size), max_steps * step_size)


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
    accept = harmonic_mean(info.acceptance_rate, info.diverging)
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
    >>> from pyro_bbb.hmc.kernel import hmc_init
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
        accept = harmonic_mean(info.acceptance_rate, info.diverging)
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
