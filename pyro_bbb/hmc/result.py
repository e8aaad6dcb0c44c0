"""The result types: :class:`HMCReference` (draws and per-draw statistics, what
:func:`~pyro_bbb.hmc.run_nuts` returns) and :class:`ChEESReference` (the same plus
convergence diagnostics and the adapted kernel, what :func:`~pyro_bbb.hmc.run_hmc`
returns)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ChEESReference", "HMCReference"]


@dataclass
class HMCReference:
    """Draws and per-draw statistics of an HMC (NUTS) run; see :func:`~pyro_bbb.hmc.run_nuts`.

    Attributes
    ----------
    samples : dict[str, Tensor]
        Site name -> tensor of shape ``(num_chains, num_samples, *site_shape)``,
        on CPU, in the sites' constrained (natural) space.
    sample_stats : dict[str, numpy.ndarray]
        Each of shape ``(num_chains, num_samples)``, post-warmup draws only:
        ``diverging`` (bool), ``step_size``, ``tree_depth`` (int, number of
        trajectory doublings), ``n_steps`` (int, leapfrog steps),
        ``energy`` (Hamiltonian at the draw), ``acceptance_rate`` (mean
        Metropolis acceptance probability over the trajectory, the statistic
        step-size adaptation targets) and ``lp`` (unnormalised log posterior
        density in the sampler's unconstrained space; see :func:`~pyro_bbb.hmc.run_nuts`).
    sampler : str
        ``"Pyro NUTS"``.
    settings : dict
        The arguments of the run: ``num_samples``, ``warmup_steps``,
        ``num_chains``, ``target_accept_prob``, ``max_tree_depth``,
        ``jit_compile`` (as requested), ``jit_fallback`` (True if the JIT
        failed and the run went on without it), ``seed``, ``chain_method``
        (``"sequential"``), ``init_strategy``.
    wall_time : float
        Seconds for all chains, warmup and setup included.
    mcmc : list
        The :class:`pyro.infer.mcmc.MCMC` object of each chain.
    """

    samples: dict
    sample_stats: dict
    sampler: str = "Pyro NUTS"
    settings: dict = field(default_factory=dict)
    wall_time: float = 0.0
    mcmc: list = field(default_factory=list, repr=False)

    @property
    def num_chains(self) -> int:
        return int(next(iter(self.sample_stats.values())).shape[0])

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.sample_stats.values())).shape[1])

    def flat_samples(self) -> dict:
        """Chains pooled: site name -> ``(num_chains * num_samples, *site_shape)``."""
        return {k: v.reshape((-1,) + tuple(v.shape[2:])) for k, v in self.samples.items()}

    def num_divergences(self) -> int:
        """Number of divergent post-warmup transitions, all chains together."""
        return int(np.sum(self.sample_stats["diverging"]))

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape[2:]) for k, v in self.samples.items()}
        return (
            f"HMCReference(sampler={self.sampler!r}, num_chains={self.num_chains}, "
            f"num_samples={self.num_samples}, sites={shapes}, "
            f"divergences={self.num_divergences()}, wall_time={self.wall_time:.1f}s)"
        )


@dataclass(repr=False)
class ChEESReference(HMCReference):
    """An :class:`~pyro_bbb.hmc.HMCReference` from :func:`~pyro_bbb.hmc.run_hmc`, plus diagnostics.

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
        (draws behind each mass-matrix update) and ``warmup_seconds`` (wall seconds from
        the start to the end of warmup, starts and MAP fits included).
    converged : bool
        :func:`~pyro_bbb.hmc.reference_converged` on the final diagnostics.
    stop_reason : str
        ``"num_samples"``, or with ``until_converged`` ``"converged"``,
        ``"time_limit"`` or ``"max_samples"``.
    """

    diagnostics: dict = field(default_factory=dict)
    adaptation: dict = field(default_factory=dict, repr=False)
    converged: bool = False
    stop_reason: str = ""
