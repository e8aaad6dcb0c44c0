"""A fast HMC reference: ChEES-HMC, many chains in lockstep as one batched computation.

:func:`run_hmc` samples the posterior of a pyro_bbb model (``BayesianRegressor``,
``BayesianClassifier``) with ChEES-HMC (Hoffman, Radul & Sountsov, "An Adaptive MCMC
Scheme for Setting Trajectory Lengths in Hamiltonian Monte Carlo", AISTATS 2021).
All chains take the same number of leapfrog steps per iteration, so one iteration is
``L`` calls of one batched potential whose leading dimension is the chain: the network
runs once for all chains, and Python's per-step cost is paid once, not once per chain.
Pyro's NUTS pays ~1 ms of Python per leapfrog step per chain on a small network; here
that cost is shared by all chains.

The pieces are small functions in the style of BlackJAX, one module each:

* **potential** (:mod:`pyro_bbb.hmc.potential`): ``U(u) = -(log p(theta, y) +
  log|det dT/du|)`` with ``theta = T(u)``, ``T = biject_to(prior.support)`` per site,
  for all chains at once, flattened into one vector per chain, ``(C, D)``; fused with
  a hand-derived gradient for MLPs (:func:`~pyro_bbb.hmc.potential.batched_potential`).
* **kernel** (:mod:`pyro_bbb.hmc.kernel`): jittered-length HMC with a diagonal mass
  matrix; per chain a Metropolis accept; a transition is *divergent* if at any
  leapfrog step the energy error exceeds 1000 or is not finite (then it is rejected).
  It knows nothing about adaptation.
* **adaptation** (:mod:`pyro_bbb.hmc.adaptation`): step size by dual averaging on the
  harmonic-mean acceptance, trajectory length by the ChEES criterion, a diagonal mass
  matrix in Stan's windows; states with ``*_init`` / ``*_update`` functions that see
  only what the kernel returns, composed by
  :func:`~pyro_bbb.hmc.adaptation.warmup` over the one
  :func:`~pyro_bbb.hmc.adaptation.warmup_schedule`.
* **diagnostics** (:mod:`pyro_bbb.hmc.diagnostics`): R-hat, nested R-hat and ESS on
  ``f(x*)``, and the verdict :func:`~pyro_bbb.hmc.diagnostics.reference_converged`.

This module is the driver.  Chains start from prior draws (as
:func:`pyro_bbb.hmc.run_nuts` does) or, with ``init="map"``, from short MAP fits of
those draws (:func:`map_fit`).  After the warmup, sampling runs in blocks (more of
them with ``until_converged``).  The result is an
:class:`~pyro_bbb.hmc.HMCReference` (:class:`~pyro_bbb.hmc.ChEESReference`) with the
same site names as ``run_nuts``, so :func:`pyro_bbb.to_inference_data` and
``compare`` take it unchanged, plus convergence ``diagnostics`` read on the network
output ``f(x*)``: rank-normalised split R-hat (Vehtari et al. 2021), nested R-hat
(Margossian et al. 2024) over superchains, and bulk ESS.
"""

from __future__ import annotations

import time
import warnings
from numbers import Integral
from typing import NamedTuple

import numpy as np
import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import _checks
from .adaptation import check_start, warmup, warmup_final
from .diagnostics import convergence_problems, f_diagnostics, reference_converged
from .kernel import halton, harmonic_mean, hmc_init, hmc_step, num_leapfrog_steps
from .potential import Potential, batched_potential, model_priors
from .result import ChEESReference

__all__ = ["INIT_STRATEGIES", "MAP_JITTER", "MAP_LEARNING_RATE", "MAP_STEPS", "MIN_TIMED_DRAWS",
           "SAMPLE_STATS", "map_fit", "run_hmc"]

#: Where chains start: prior draws, or short MAP fits from prior draws (see run_hmc).
INIT_STRATEGIES = ("prior", "map")
#: Per-draw sample statistics, each (chains, draws) in the result.
SAMPLE_STATS = ("acceptance_rate", "step_size", "n_steps", "trajectory_length", "diverging", "lp",
                "energy")


def _check_model(model):
    for attr in ("log_joint", "latent_names", "network", "extra_priors"):
        if not hasattr(model, attr):
            raise ValueError(
                "run_hmc samples pyro_bbb models (BayesianRegressor, BayesianClassifier), "
                f"which have a batched log joint; got {type(model).__name__} without "
                f"{attr!r}. For any other Pyro model use pyro_bbb.run_nuts(model, x, y, ...)"
            )


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
    priors = model_priors(model)
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
        Target of the harmonic mean (over chains) of the acceptance probability, which
        the adapted step size meets when sampling (ChEES-HMC's and BlackJAX's 0.65);
        raise it (0.8, 0.9) if there are divergences: ReLU networks may need 0.9.
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
        ``"num_samples"`` for a plain run) say which, and a run that stops unconverged
        warns (``RuntimeWarning``) with what failed and how much of the time the
        warmup took.
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
        size collapsing below :data:`~pyro_bbb.hmc.adaptation.STEP_SIZE_FLOOR` times its start, or every
        transition of the first :data:`~pyro_bbb.hmc.adaptation.MAX_DIVERGENT_START` warmup iterations
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
    args = _check_run_hmc_arguments(
        model, x, y, num_chains=num_chains, num_samples=num_samples, warmup_steps=warmup_steps,
        target_accept_prob=target_accept_prob, max_leapfrog_steps=max_leapfrog_steps,
        num_superchains=num_superchains, x_test=x_test, init=init, until_converged=until_converged,
        time_limit=time_limit, max_samples=max_samples, seed=seed, progress=progress,
    )
    start_time = time.perf_counter()
    run, warm, adapted = _run(model, args, start_time)
    wall_time = time.perf_counter() - start_time
    result = _result(run, warm, adapted, _settings(args), wall_time)
    if args.until_converged and not result.converged:
        warnings.warn(not_converged_message(result), RuntimeWarning, stacklevel=2)
    return result


def not_converged_message(result: ChEESReference) -> str:
    """Why an ``until_converged`` run stopped unconverged, and how much of its budget
    the warmup took (a warmup that fills the time limit leaves a handful of draws)."""
    problems = "; ".join(convergence_problems(result.diagnostics))
    warmup_time = float(result.adaptation["warmup_seconds"])
    limit = result.settings[result.stop_reason]  # "time_limit" or "max_samples"
    budget = f"time_limit={limit:g} s" if result.stop_reason == "time_limit" else f"max_samples={limit}"
    return (f"run_hmc: the reference did not converge within {budget} ({problems}; on f(x*)); "
            f"{result.num_samples} draws per chain after a warmup of {warmup_time:.3g} s of "
            f"{result.wall_time:.3g} s. Its numbers are not a reference: raise the budget "
            "(or, if the warmup took most of it, lower warmup_steps or max_leapfrog_steps)")


class _Arguments(NamedTuple):
    """run_hmc's arguments, checked and normalised; the data on the model's device."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    device: torch.device
    num_chains: int
    num_samples: int
    warmup_steps: int
    target_accept_prob: float
    max_leapfrog_steps: int
    num_superchains: int
    init: str
    until_converged: bool
    time_limit: float | None
    max_samples: int | None
    seed: int
    progress: bool


def _check_run_hmc_arguments(model, x, y, *, num_chains, num_samples, warmup_steps,
                             target_accept_prob, max_leapfrog_steps, num_superchains, x_test,
                             init, until_converged, time_limit, max_samples, seed,
                             progress) -> _Arguments:
    """ValueError for a bad argument (checked in the order of run_hmc's signature, the
    model first); else the normalised arguments."""
    _check_model(model)
    num_chains = _checks.positive_int("num_chains", num_chains)
    if num_chains < 2:
        raise ValueError(f"num_chains must be >= 2 (ChEES adapts across chains), got {num_chains}")
    num_samples = _checks.positive_int("num_samples", num_samples)
    warmup_steps = _checks.integer("warmup_steps", warmup_steps, 0)
    target_accept_prob = _checks.unit_interval("target_accept_prob", target_accept_prob)
    max_leapfrog_steps = _checks.positive_int("max_leapfrog_steps", max_leapfrog_steps)
    seed = _checks.seed(seed, allow_none=False)
    progress = _checks.boolean("progress", progress)
    num_superchains = _check_num_superchains(num_superchains, num_chains)
    model_priors(model)  # discrete sites -> ValueError before anything runs
    x, y, x_test, device = _check_data(model, x, y, x_test)
    init = _checks.choice("init", init, INIT_STRATEGIES)
    until_converged = _checks.boolean("until_converged", until_converged)
    time_limit = None if time_limit is None else _checks.positive_float("time_limit", time_limit)
    max_samples = None if max_samples is None else _checks.positive_int("max_samples", max_samples)
    if until_converged and time_limit is None and max_samples is None:
        raise ValueError("until_converged=True needs a budget: time_limit (seconds) or max_samples")
    if not until_converged and (time_limit is not None or max_samples is not None):
        raise ValueError("time_limit and max_samples bound until_converged=True runs; "
                         "set until_converged=True or leave them None")
    return _Arguments(x, y, x_test, device, num_chains, num_samples, warmup_steps,
                      target_accept_prob, max_leapfrog_steps, num_superchains, init,
                      until_converged, time_limit, max_samples, seed, progress)


def _check_num_superchains(num_superchains, num_chains: int) -> int:
    """The default (``num_chains // 8`` if that is >= 2 and divides, else 0), or the
    value checked: 0 or an integer >= 2 that divides ``num_chains``."""
    if num_superchains is None:
        k = num_chains // 8
        return k if k >= 2 and num_chains % k == 0 else 0
    if (
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
    return int(num_superchains)


def _check_data(model, x, y, x_test):
    """``x``, ``y`` and ``x_test`` (default ``x``) validated, on the model's device, in
    its dtype; and that device."""
    ref = next(iter(model.initial_values().values()))
    device, dtype = ref.device, ref.dtype
    x, y = _checks.model_data(model, x, y, dtype)
    x, y = x.to(device), y.to(device)
    if x_test is None:
        return x, y, x, device
    x_test = _checks.inputs(model, x_test, "x_test").to(device)
    if x_test.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"x_test must have the same feature shape as x, got {tuple(x_test.shape[1:])} "
            f"and {tuple(x.shape[1:])}"
        )
    return x, y, x_test, device


def _settings(args: _Arguments) -> dict:
    """The ``settings`` of the result: the arguments of the run and what they mean."""
    init_strategy = (f"MAP fits ({MAP_STEPS} Adam steps, lr {MAP_LEARNING_RATE}) from prior "
                     f"draws, chains jittered by N(0, {MAP_JITTER}^2)" if args.init == "map" else
                     "prior draws") + (" shared within superchains" if args.num_superchains else "")
    return {
        "num_chains": args.num_chains,
        "num_samples": args.num_samples,
        "warmup_steps": args.warmup_steps,
        "target_accept_prob": args.target_accept_prob,
        "max_leapfrog_steps": args.max_leapfrog_steps,
        "num_superchains": args.num_superchains,
        "seed": args.seed,
        "init": args.init,
        "init_strategy": init_strategy,
        "until_converged": args.until_converged,
        "time_limit": args.time_limit,
        "max_samples": args.max_samples,
        "jitter": "halton",
        "mass_matrix": "diagonal, variance across chains and window draws, Stan windows",
    }


def _run(model, args: _Arguments, start_time: float):
    """Starts, warmup, sampling: the blocks' output (see :func:`_sample_blocks`), the
    warmup trace and the adapted ``(step_size, trajectory_length, inv_mass)``."""
    bar = tqdm(total=args.warmup_steps + args.num_samples, disable=not args.progress,
               desc="warmup", leave=True)
    with pyro.validation_enabled(False):
        potential = batched_potential(model, args.x, args.y)  # fused for MLPs, else Potential
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        position = _initial_positions(potential, model, args.num_chains, args.num_superchains,
                                      args.init, args.seed, generator)
        try:
            state = hmc_init(position, potential.value_and_grad)
            check_start(state)
            state, ws, warm = warmup(state, potential.value_and_grad, generator,
                                     warmup_steps=args.warmup_steps,
                                     target_accept_prob=args.target_accept_prob,
                                     max_leapfrog_steps=args.max_leapfrog_steps, bar=bar)
            step_size, length, inv_mass = warmup_final(ws, args.max_leapfrog_steps)
            warm["seconds"] = time.perf_counter() - start_time
            bar.set_description("sample")
            kernel = dict(step_size=step_size, length=length, inv_mass=inv_mass,
                          max_leapfrog_steps=args.max_leapfrog_steps)
            budget = dict(until_converged=args.until_converged, time_limit=args.time_limit,
                          max_samples=args.max_samples, start_time=start_time)
            run = _sample_blocks(state, potential, args.x_test, generator, kernel, budget,
                                 args.num_samples, args.warmup_steps, args.num_superchains, bar)
        finally:
            bar.close()
    return run, warm, (step_size, length, inv_mass)


def _result(run: dict, warm: dict, adapted: tuple, settings: dict, wall_time: float) -> ChEESReference:
    """The :class:`~pyro_bbb.hmc.ChEESReference` of a finished run."""
    step_size, length, inv_mass = adapted
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
        accept = harmonic_mean(info.acceptance_rate, info.diverging)
        bar.set_postfix(acc=f"{accept:.2f}", step=f"{step_size:.2g}", L=n, refresh=False)
        bar.update()
    return state, draws, stats


def _sample_blocks(state, potential, x_test, generator, kernel, budget, num_samples,
                   first_iteration, num_superchains, bar):
    """Blocks of ``num_samples`` draws per chain; one block unless ``until_converged``,
    then more until :func:`reference_converged` or the budget says stop.  The time
    limit is read after every transition, so a run ends within one transition of it
    (once it holds :data:`MIN_TIMED_DRAWS` draws)."""
    from ..predict import batched_outputs

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
        diagnostics = f_diagnostics(np.concatenate(fs, 1), num_superchains)
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
