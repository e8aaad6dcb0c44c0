"""The kernel: jittered-length HMC for ``C`` chains at once, no adaptation in here.

Diagonal mass matrix; per chain a Metropolis accept; a transition is *divergent* if at
any leapfrog step the energy error exceeds :data:`DIVERGENCE_THRESHOLD` (1000) or is
not finite (then it is rejected).  All chains take the same number of leapfrog steps
(:func:`num_leapfrog_steps` of a trajectory length jittered by :func:`halton`), so one
transition is ``L`` calls of one batched potential.  The kernel (:func:`hmc_init`,
:func:`hmc_step`) knows nothing about adaptation; what adaptation needs it reads from
the :class:`HMCInfo` a step returns.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["DIVERGENCE_THRESHOLD", "HMCInfo", "HMCState", "halton", "harmonic_mean", "hmc_init",
           "hmc_step", "num_leapfrog_steps"]

#: Energy error above which a transition counts as divergent (Stan's and Pyro's value).
DIVERGENCE_THRESHOLD = 1000.0


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
    # Per step: two kicks in place on p (this function's own), one drift to a new q (the
    # potential may keep or return its input), the energy check.
    q, g, u = q0, g0, u0
    drift = step_size * inv_mass
    half_inv_mass = 0.5 * inv_mass
    below_threshold = torch.ones_like(u0, dtype=torch.bool)
    half = 0.5 * step_size
    for _ in range(n_steps):
        p.add_(g, alpha=-half)
        q = torch.addcmul(q, drift, p)
        u, g = potential_fn(q)
        p.add_(g, alpha=-half)
        error = torch.linalg.vecdot(p * half_inv_mass, p).add_(u).sub_(h0)
        # NaN-safe: a non-finite energy error is divergent too.
        below_threshold &= error <= DIVERGENCE_THRESHOLD
    diverging = ~below_threshold
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


def harmonic_mean(acceptance: Tensor, diverging: Tensor) -> float:
    """Harmonic mean of the acceptance probabilities of non-divergent chains (0 if none)."""
    a = acceptance[~diverging].to(torch.float64)
    if a.numel() == 0 or bool((a <= 0).any()):
        return 0.0
    return float(1.0 / (1.0 / a).mean())
