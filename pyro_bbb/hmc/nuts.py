"""The HMC reference: Pyro's NUTS on the very model that Bayes by Backprop fits.

:func:`run_nuts` runs Pyro's No-U-Turn sampler (Hoffman & Gelman 2014, with
multinomial trajectory sampling, Betancourt 2017) on any Pyro model called as
``model(x, y, **model_kwargs)`` -- the same model object, with the same priors,
that variational inference uses -- and returns an :class:`HMCReference`: the
draws per chain plus the per-draw sampler statistics that ArviZ expects in its
``sample_stats`` group (``diverging``, ``step_size``, ``tree_depth``,
``n_steps``, ``energy``, ``acceptance_rate``, ``lp``).

Pyro's :class:`~pyro.infer.mcmc.MCMC` does not expose those statistics per draw,
so the kernel here is :class:`pyro.infer.mcmc.NUTS` with three small overrides
that only *observe* what the algorithm already computes (see
:class:`_RecordingNUTS`); the sampler itself is untouched.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Mapping

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import init_to_sample, init_to_value
from pyro.infer.mcmc import MCMC, NUTS

from .. import _checks
from .result import HMCReference

__all__ = ["SAMPLE_STATS", "run_nuts"]

#: Names of the per-draw statistics, in ArviZ's ``sample_stats`` vocabulary.
SAMPLE_STATS = (
    "diverging",
    "step_size",
    "tree_depth",
    "n_steps",
    "energy",
    "acceptance_rate",
    "lp",
)
_STAT_DTYPES = {
    "diverging": np.bool_,
    "step_size": np.float64,
    "tree_depth": np.int64,
    "n_steps": np.int64,
    "energy": np.float64,
    "acceptance_rate": np.float64,
    "lp": np.float64,
}


# ----------------------------------------------------------------------------
# The kernel: Pyro's NUTS, plus bookkeeping
# ----------------------------------------------------------------------------
class _PhasePoint(dict):
    """A leapfrog position (site name -> unconstrained tensor) that also carries
    the Hamiltonian ``H(z, r)`` of the phase-space point it came from.

    Pyro's trees keep a proposal's position and potential energy but not its
    momentum; tagging the proposal when the leaf is built is what lets the
    kernel report the Hamiltonian *at the selected draw* (Stan's ``energy__``)
    without storing the trajectory.  ``dict.copy`` returns a plain ``dict``, so
    the tag never leaks out of the kernel.
    """

    __slots__ = ("energy",)

    def __init__(self, z, energy):
        super().__init__(z)
        self.energy = energy


class _RecordingNUTS(NUTS):
    """:class:`pyro.infer.mcmc.NUTS` that records statistics of every transition.

    Nothing about the algorithm changes (same random draws, same samples as
    ``NUTS`` under the same seed); three methods are wrapped to observe it:

    * ``_build_basetree`` is one leapfrog step: it is counted (``n_steps``) and
      its proposal is tagged with its Hamiltonian (see :class:`_PhasePoint`).
    * ``_build_tree`` called from ``sample`` (outermost recursion level) is one
      doubling of the trajectory: the number of such calls is the tree depth
      (exact; Stan's ``treedepth__`` convention, so ``1 <= tree_depth <=
      max_tree_depth`` and ``2**(tree_depth-1) <= n_steps <= 2**tree_depth - 1``).
      The subtrees' ``sum_accept_probs / num_proposals`` is the same acceptance
      statistic that Pyro feeds to dual averaging, and a divergent subtree is the
      same condition under which Pyro appends to ``_divergences``.
    * ``sample`` notes the step size used for the transition and, afterwards,
      reads the kernel's cache: the potential energy of the returned draw
      (``lp = -potential_energy``) and whether the draw moved.

    ``self.transitions`` holds one dict per transition, warmup included
    (``"warmup": True``); it is reset by ``setup`` and survives ``cleanup``.
    """

    def setup(self, warmup_steps, *args, **kwargs):
        self.transitions = []
        self._record = None
        self._tree_level = 0
        super().setup(warmup_steps, *args, **kwargs)

    def _build_basetree(self, z, r, z_grads, log_slice, direction, energy_current):
        tree = super()._build_basetree(
            z, r, z_grads, log_slice, direction, energy_current
        )
        record = getattr(self, "_record", None)
        if record is None:  # called outside ``sample``: nothing to record
            return tree
        record["n_steps"] += 1
        # For a one-step tree r_right_unscaled is the momentum at the new point.
        energy = tree.z_proposal_pe + self._kinetic_energy(tree.r_right_unscaled)
        return tree._replace(z_proposal=_PhasePoint(tree.z_proposal, energy))

    def _build_tree(
        self, z, r, z_grads, log_slice, direction, tree_depth, energy_current
    ):
        outermost = self._tree_level == 0
        self._tree_level += 1
        try:
            tree = super()._build_tree(
                z, r, z_grads, log_slice, direction, tree_depth, energy_current
            )
        finally:
            self._tree_level -= 1
        record = getattr(self, "_record", None)
        if outermost and record is not None:
            record["tree_depth"] += 1
            record["energy_start"] = float(energy_current)
            record["sum_accept_probs"] += float(tree.sum_accept_probs)
            record["num_proposals"] += int(tree.num_proposals)
            record["diverging"] = record["diverging"] or bool(tree.diverging)
        return tree

    def sample(self, params):
        z_start = self._z_last
        self._tree_level = 0
        self._record = record = {
            "warmup": self._t < self._warmup_steps,
            "step_size": float(self.step_size),
            "tree_depth": 0,
            "n_steps": 0,
            "energy_start": math.nan,
            "sum_accept_probs": 0.0,
            "num_proposals": 0,
            "diverging": False,
        }
        try:
            out = super().sample(params)
        finally:
            self._record = None
        z_last, potential_energy = self._z_last, self._potential_energy_last
        moved = isinstance(z_last, _PhasePoint) and z_last is not z_start
        num = record.pop("num_proposals")
        sum_accept = record.pop("sum_accept_probs")
        energy_start = record.pop("energy_start")
        record["acceptance_rate"] = sum_accept / num if num else 1.0
        record["energy"] = float(z_last.energy) if moved else energy_start
        record["lp"] = (
            -float(potential_energy) if potential_energy is not None else math.nan
        )
        self.transitions.append(record)
        return out


# ----------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------

class _GlobalRNG:
    """Save and restore the global RNGs that ``pyro.set_rng_seed`` reseeds
    (torch CPU and CUDA, numpy, random), so that a run does not perturb the
    caller's random stream."""

    def __enter__(self):
        self._torch = torch.get_rng_state()
        self._cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        )
        self._numpy = np.random.get_state()
        self._random = random.getstate()
        return self

    def __exit__(self, *exc):
        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
        np.random.set_state(self._numpy)
        random.setstate(self._random)
        return False


def _check_init_values(init_values, model, x, y, model_kwargs):
    """Validate ``init_values`` against a prior trace of the model."""
    if not isinstance(init_values, Mapping):
        raise ValueError(
            f"init_values must be a dict of site name -> value, got {type(init_values).__name__}"
        )
    with poutine.block():
        trace = poutine.trace(model).get_trace(x, y, **model_kwargs)
    latent = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    unknown = sorted(set(init_values) - set(latent))
    if unknown:
        raise ValueError(
            f"init_values names unknown latent site(s) {unknown}; "
            f"the model's latent sites are {sorted(latent)}"
        )
    values = {}
    for name, value in init_values.items():
        proto = latent[name]["value"]
        value = torch.as_tensor(value, dtype=proto.dtype, device=proto.device).detach()
        if value.shape != proto.shape:
            raise ValueError(
                f"init_values[{name!r}] has shape {tuple(value.shape)}, "
                f"the site has shape {tuple(proto.shape)}"
            )
        values[name] = value
    return values


def _chain_progress_hook(chain, num_chains):
    """A ``hook_fn`` that writes the chain number into Pyro's progress bar.

    Pyro's single-process runner labels its bar only "Warmup"/"Sample"; its
    logging handler holds the bar, so the hook relabels it (best effort: if
    Pyro's internals change, the bar keeps Pyro's label).
    """
    label = f"chain {chain + 1}/{num_chains}"
    logger = logging.getLogger("pyro.infer.mcmc")

    def hook(kernel, params, stage, i):
        for handler in logger.handlers:
            bar = getattr(handler, "progress_bar", None)
            if bar is not None:
                try:
                    bar.set_description(f"{stage} [{label}]", refresh=False)
                except Exception:  # pragma: no cover - cosmetic only
                    pass

    return hook


def run_nuts(
    model,
    x,
    y=None,
    *,
    num_samples: int = 200,
    warmup_steps: int = 200,
    num_chains: int = 2,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    jit_compile: bool = False,
    seed: int = 0,
    progress: bool = True,
    init_values: dict | None = None,
    **model_kwargs,
) -> HMCReference:
    """Sample the posterior of a Pyro model with Pyro's NUTS: the HMC reference.

    The model is called as ``model(x, y, **model_kwargs)``, the same call (and
    so the same priors and likelihood) that variational inference uses.  Step
    size (dual averaging towards ``target_accept_prob``) and a diagonal mass
    matrix are adapted during warmup, as in Stan.

    Chains run **one after another in this process**, each as its own
    ``pyro.infer.mcmc.MCMC(..., num_chains=1)`` seeded with
    ``pyro.set_rng_seed(seed + chain)``.  Pyro's multi-process chains
    (``num_chains > 1`` in one ``MCMC``) need a picklable model, fork or spawn
    worker processes that each start their own torch thread pool, and fail in
    ways that are hard to debug (hangs, lost exceptions); on a 2-core machine
    they gain nothing, since torch already uses the cores within a chain.  The
    global RNG states (torch, numpy, random) are restored on return, so a call
    leaves the caller's random stream where it was.

    Parameters
    ----------
    model : callable
        A Pyro model ``model(x, y, **model_kwargs)``; ``y`` is observed.
    x, y : Tensor or array-like
        Inputs and targets; ``y`` is required.  For a pyro_bbb model they are
        validated as in :func:`pyro_bbb.fit`: cast to the weights' dtype, ``x`` in
        the shape the network reads, ``y`` in the shape of its outputs (a column
        ``(n, 1)`` for a one-output regressor is read as ``(n,)``).
    num_samples : int, >= 1
        Post-warmup draws per chain.
    warmup_steps : int, >= 0
        Adaptation draws per chain, discarded.
    num_chains : int, >= 1
        Number of chains (run sequentially).
    target_accept_prob : float in (0, 1)
        Target of step-size adaptation; raise it (0.9, 0.95) if there are
        divergences.
    max_tree_depth : int, >= 1
        At most ``2**max_tree_depth - 1`` leapfrog steps per draw.
    jit_compile : bool
        Trace the potential energy with ``torch.jit.trace`` (Pyro's
        ``jit_compile``).  ``torch.jit.trace`` is deprecated in torch 2.13, so
        this is off by default; if tracing fails the chain is rerun without
        it, with a ``RuntimeWarning``.
    seed : int
        Chain ``c`` is seeded with ``seed + c``.
    progress : bool
        Show Pyro's progress bar for each chain (labelled with the chain).
    init_values : dict, optional
        Site name -> initial (constrained) value, used by every chain
        (:func:`~pyro.infer.autoguide.initialization.init_to_value`); sites
        not named are initialised as below.
    **model_kwargs
        Passed to the model.

    Returns
    -------
    HMCReference
        ``samples`` (constrained, ``(num_chains, num_samples, *shape)``) and
        per-draw ``sample_stats``.

    Notes
    -----
    *Initialisation.*  By default each chain starts from a draw of the prior
    (:func:`~pyro.infer.autoguide.initialization.init_to_sample`) rather than
    Pyro's default ``init_to_uniform(radius=2)``.  A prior draw respects the
    prior's scale: for a network with a narrow prior (the paper's
    ``sigma1 = e^-1, e^-2``) uniform(-2, 2) weights sit many prior standard
    deviations out, and for a wide one they are needlessly saturating; a prior
    draw is also what a BNN "looks like" before seeing data.  ``init_to_median``
    would start every weight at 0, a saddle point of a tanh network where all
    hidden units are interchangeable, and it starts all chains at one point,
    which blunts R-hat.  On a 1-8-1 tanh network (noise 0.1, 20 points) the
    three strategies warmed up alike (same leapfrog counts within 5%, same
    post-warmup lp, no post-warmup divergences), with N(0, 1) and with
    N(0, 0.135^2) weight priors, so the choice rests on the reasons above.

    *Cost.*  NUTS on a BNN is expensive: on that 1-8-1 network with N(0, 1)
    priors the adapted step size is ~0.008 and almost every draw uses the
    full ``2**max_tree_depth - 1`` leapfrog steps, at ~1.4 ms per step
    (Pyro's tracing overhead dominates a model this small; ``jit_compile``
    saves ~30%): ~0.3 s per draw at ``max_tree_depth=8``, ~1 s at 10.

    *Per-draw statistics* are recorded by a minimal subclass of Pyro's
    ``NUTS`` that only observes the sampler (same draws as plain ``NUTS``):
    ``tree_depth`` is read exactly (number of trajectory doublings; it always
    equals ``ceil(log2(n_steps + 1))``), ``n_steps`` counts leapfrog steps,
    ``energy`` is the Hamiltonian ``U(z) + r^T M^{-1} r / 2`` at the selected
    draw with its momentum (Stan's ``energy__``), ``acceptance_rate`` is the
    trajectory's mean acceptance probability (Stan's ``accept_stat__``),
    ``step_size`` is the step size used for that draw, and ``diverging`` marks
    transitions whose energy error exceeded 1000 (Pyro's criterion).

    *What ``lp`` is, exactly.*  ``lp = -U(u)``, minus Pyro's potential energy
    at the draw, where ``u`` are the unconstrained coordinates NUTS moves in
    (``theta = T(u)``, ``T = biject_to(support)``)::

        lp = log p(y | theta, x) + log p(theta) + log |det dT/du|

    i.e. the model's log joint (every sample site, prior and likelihood, with
    any ``poutine.scale`` / plate subsampling factors, discrete enumerated
    sites summed out) at the draw, **plus** the log-Jacobian of the map from
    unconstrained to constrained space -- Stan's ``lp__`` convention.  For
    models whose latent sites all have real support (e.g. BNN weights with
    Normal or scale-mixture priors) the Jacobian term is 0 and ``lp`` is
    exactly the log joint ``poutine.trace(...).log_prob_sum()``.  For a
    positive site with ``T = exp`` the term is ``log sigma``.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> def model(x, y=None):
    ...     w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    ...     with pyro.plate("data", x.shape[0]):
    ...         pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)
    >>> x = torch.randn(30, 2)
    >>> y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(30)
    >>> ref = run_nuts(model, x, y, num_samples=50, warmup_steps=50, progress=False)
    >>> ref.samples["w"].shape
    torch.Size([2, 50, 2])
    >>> ref.sample_stats["tree_depth"].shape, ref.sample_stats["diverging"].dtype
    ((2, 50), dtype('bool'))
    >>> ref.flat_samples()["w"].shape
    torch.Size([100, 2])
    """
    x, y, settings = _check_run_nuts_arguments(
        model, x, y, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
        target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth,
        jit_compile=jit_compile, seed=seed, init_values=init_values,
    )
    seed = settings["seed"]
    use_jit = settings["jit_compile"]
    mcmcs, draws, stats = [], [], []
    start = time.perf_counter()
    with _GlobalRNG():
        if init_values:
            pyro.set_rng_seed(seed)
            values = _check_init_values(init_values, model, x, y, model_kwargs)
            init_strategy = init_to_value(values=values, fallback=init_to_sample)
        else:
            init_strategy = init_to_sample

        for chain in range(settings["num_chains"]):
            mcmc, kernel, use_jit = _run_chain(model, x, y, model_kwargs, chain, settings,
                                               init_strategy, use_jit, progress)
            mcmcs.append(mcmc)
            chain_draws, chain_stats = _chain_output(mcmc, kernel, settings["num_samples"])
            draws.append(chain_draws)
            stats.append(chain_stats)
    wall_time = time.perf_counter() - start

    samples = {k: torch.cat([d[k] for d in draws], dim=0) for k in draws[0]}
    sample_stats = {
        name: np.stack([s[name] for s in stats], axis=0) for name in SAMPLE_STATS
    }
    return HMCReference(
        samples=samples,
        sample_stats=sample_stats,
        sampler="Pyro NUTS",
        settings=settings,
        wall_time=wall_time,
        mcmc=mcmcs,
    )


def _check_run_nuts_arguments(model, x, y, *, num_samples, warmup_steps, num_chains,
                              target_accept_prob, max_tree_depth, jit_compile, seed, init_values):
    """ValueError for a bad argument; else the data (validated as for fit when ``model`` is
    a pyro_bbb model) and the run's ``settings``, every value normalised."""
    num_samples = _checks.integer("num_samples", num_samples, 1)
    warmup_steps = _checks.integer("warmup_steps", warmup_steps, 0)
    num_chains = _checks.integer("num_chains", num_chains, 1)
    max_tree_depth = _checks.integer("max_tree_depth", max_tree_depth, 1)
    target_accept_prob = _checks.unit_interval("target_accept_prob", target_accept_prob)
    seed = _checks.seed(seed, allow_none=False)
    if not callable(model):
        raise ValueError(f"model must be a callable Pyro model, got {model!r}")
    if _checks.is_model(model):  # the same data checks as fit and run_hmc
        x, y = _checks.model_data(model, x, y)
    elif y is None:
        raise ValueError("y is required: the reference is the posterior given the targets y")
    settings = {
        "num_samples": num_samples,
        "warmup_steps": warmup_steps,
        "num_chains": num_chains,
        "target_accept_prob": target_accept_prob,
        "max_tree_depth": max_tree_depth,
        "jit_compile": bool(jit_compile),
        "jit_fallback": False,
        "seed": seed,
        "chain_method": "sequential",
        "init_strategy": "init_to_sample" if not init_values else "init_to_value",
    }
    return x, y, settings


def _run_chain(model, x, y, model_kwargs, chain, settings, init_strategy, use_jit, progress):
    """One chain, its own ``MCMC`` seeded with ``seed + chain``; if the JIT fails, the chain
    again without it (a RuntimeWarning, ``settings["jit_fallback"] = True``).  Returns the
    ``MCMC``, its kernel and whether later chains use the JIT."""
    num_chains = settings["num_chains"]
    while True:
        pyro.set_rng_seed(settings["seed"] + chain)
        kernel = _RecordingNUTS(
            model,
            target_accept_prob=settings["target_accept_prob"],
            max_tree_depth=settings["max_tree_depth"],
            jit_compile=use_jit,
            ignore_jit_warnings=True,
            init_strategy=init_strategy,
        )
        mcmc = MCMC(
            kernel,
            num_samples=settings["num_samples"],
            warmup_steps=settings["warmup_steps"],
            num_chains=1,
            disable_progbar=not progress,
            hook_fn=_chain_progress_hook(chain, num_chains) if progress else None,
        )
        # Pyro switches off requires_grad of the param store's
        # parameters while it traces, and does not switch it back if
        # tracing raises: remember them, to restore on failure.
        trainable = [
            v
            for _, v in pyro.get_param_store().named_parameters()
            if v.requires_grad
        ]
        try:
            mcmc.run(x, y, **model_kwargs)
        except Exception as err:
            if not use_jit:
                raise
            for v in trainable:
                v.requires_grad_(True)
            warnings.warn(
                f"run_nuts: jit_compile=True failed on chain {chain} "
                f"({type(err).__name__}: {err}); running without the JIT.",
                RuntimeWarning,
                stacklevel=3,  # the caller of run_nuts
            )
            use_jit = False
            settings["jit_fallback"] = True
            continue
        return mcmc, kernel, use_jit


def _chain_output(mcmc, kernel, num_samples):
    """One chain's draws (site -> ``(1, num_samples, *shape)`` on CPU) and its
    post-warmup statistics (name -> ``(num_samples,)``)."""
    draws = {
        k: v.detach().cpu()
        for k, v in mcmc.get_samples(group_by_chain=True).items()
    }
    records = [t for t in kernel.transitions if not t["warmup"]]
    if len(records) != num_samples:  # pragma: no cover - Pyro internals changed
        raise RuntimeError(
            f"recorded {len(records)} post-warmup transitions, expected {num_samples}"
        )
    stats = {
        name: np.asarray([r[name] for r in records], dtype=_STAT_DTYPES[name])
        for name in SAMPLE_STATS
    }
    return draws, stats
