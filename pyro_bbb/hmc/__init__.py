"""HMC references for Bayes by Backprop: Pyro's NUTS and a fast ChEES-HMC, in parts.

The map of the package, one concept per module:

``nuts``
    :func:`run_nuts`: Pyro's NUTS on any Pyro model, with per-draw statistics.
``chees``
    :func:`run_hmc`: ChEES-HMC, many chains in lockstep on a pyro_bbb model's batched
    log joint -- the driver (starts, :func:`map_fit`, warmup, sampling blocks, when to
    stop) and the description of the algorithm.
``potential``
    The batched potential ``U(u)`` and its gradient for all chains at once:
    :class:`Potential` (autograd, any pyro_bbb model), :class:`MLPPotential` (fused,
    hand-derived gradient, for MLPs) and :func:`batched_potential`, which picks one.
``kernel``
    One jittered-length HMC transition of every chain (:func:`hmc_init`,
    :func:`hmc_step`, :func:`halton`, :func:`num_leapfrog_steps`); no adaptation.
``adaptation``
    Dual averaging, the ChEES trajectory-length update, the Welford mass matrix, the
    one warmup schedule (:func:`warmup_schedule`) and :func:`warmup`, which runs it.
``diagnostics``
    R-hat, nested R-hat (:func:`nested_rhat`) and ESS on f(x*)
    (:func:`f_diagnostics`), the thresholds (:data:`RHAT_MAX`, :data:`ESS_MIN`) and
    the verdict (:func:`reference_converged`, :func:`rhat_passes`,
    :func:`convergence_problems`): used by
    :func:`run_hmc`, :func:`pyro_bbb.compare` and the benchmarks.
``result``
    The result types :class:`HMCReference` and :class:`ChEESReference`.

The names below are imported on first use (as in :mod:`pyro_bbb`), so that reading the
diagnostics does not import Pyro.
"""

import importlib

# Public names and the module each lives in.
_PUBLIC = {
    "run_nuts": "nuts",
    "run_hmc": "chees", "map_fit": "chees",
    "HMCReference": "result", "ChEESReference": "result",
    "Potential": "potential", "MLPPotential": "potential", "batched_potential": "potential",
    "HMCInfo": "kernel", "HMCState": "kernel", "halton": "kernel", "hmc_init": "kernel",
    "hmc_step": "kernel", "num_leapfrog_steps": "kernel",
    "WarmupSchedule": "adaptation", "adaptation_windows": "adaptation", "warmup": "adaptation",
    "warmup_schedule": "adaptation",
    "ESS_MIN": "diagnostics", "RHAT_MAX": "diagnostics", "f_diagnostics": "diagnostics",
    "nested_rhat": "diagnostics", "reference_converged": "diagnostics",
    "rhat_passes": "diagnostics", "convergence_problems": "diagnostics",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
