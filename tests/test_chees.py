"""Tests of the fast HMC reference, ``pyro_bbb.hmc`` (ChEES-HMC over many chains).

Every check is against something computed independently of the sampler: the model's
log joint from a Pyro trace, the closed-form posterior of a conjugate linear
regression, exact draws of a Gaussian (the kernel must leave it invariant), Pyro's
NUTS on the same BNN.  Seeds are fixed, so runs are deterministic; each tolerance
says how far a *correct* sampler could fall with another seed.
"""

from __future__ import annotations

import importlib
import math
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_bbb as bbb
from pyro_bbb.hmc import ChEESReference, HMCReference, run_hmc, run_nuts
from pyro_bbb.hmc.adaptation import (
    adaptation_windows,
    chees_statistics,
    warmup,
    warmup_end_window,
    warmup_final,
    warmup_init,
    warmup_schedule,
    welford_update,
)
from pyro_bbb.hmc.chees import MIN_TIMED_DRAWS, map_fit
from pyro_bbb.hmc.diagnostics import convergence_problems, nested_rhat, reference_converged
from pyro_bbb.hmc.kernel import (
    HMCInfo,
    halton,
    harmonic_mean,
    hmc_init,
    hmc_step,
    num_leapfrog_steps,
)
from pyro_bbb.hmc.potential import Potential
from pyro_bbb.inference_data import to_inference_data

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's refactor notice
    import arviz as az


def tanh_net(hidden, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    ).to(dtype)


def trace_log_joint(model, values, x, y) -> float:
    """log p(theta, y | x) at constrained ``values``, from a Pyro trace of the model."""
    conditioned = pyro.poutine.condition(model, data=values)
    return float(pyro.poutine.trace(conditioned).get_trace(x, y).log_prob_sum())


@pytest.fixture(scope="module")
def curve_data():
    return bbb.datasets.regression_curve(30, seed=1, dtype=torch.float64)


# ----------------------------------------------------------------------------
# 1. The potential is the model's log joint (Pyro trace) plus the log-Jacobian
# ----------------------------------------------------------------------------
class TwoLayer(torch.nn.Module):
    """Not a Sequential: the potential takes the model's general (vmap) path."""

    def __init__(self, hidden):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(1, hidden), torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


@pytest.mark.parametrize("noise", [0.1, "learned"])
@pytest.mark.parametrize("kind", ["sequential", "custom"])
def test_potential_equals_pyro_trace(noise, kind, curve_data):
    x, y = curve_data
    torch.manual_seed(0)
    net = tanh_net(8, torch.float64) if kind == "sequential" else TwoLayer(8).double()
    model = bbb.BayesianRegressor(
        net, prior=bbb.ScaleMixtureNormal(0.5, 1.0, math.exp(-6)), noise=noise,
    )
    pot = Potential(model, x, y)
    assert pot.fast_path == (kind == "sequential")
    assert pot.dim == 8 + 8 + 8 + 1 + (noise == "learned")
    u = torch.randn(4, pot.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pyro.validation_enabled(False):
        value, grad = pot.value_and_grad(u)
    values, logdet = pot.unflatten(u)
    for c in range(4):
        draw = {k: v[c] for k, v in values.items()}
        expected = trace_log_joint(model, draw, x, y)
        if noise == "learned":  # u = log(noise): log |d noise / du| = log(noise)
            assert float(logdet[c]) == pytest.approx(float(torch.log(draw["noise"])), abs=1e-12)
            expected += float(torch.log(draw["noise"]))
        else:
            assert float(logdet[c]) == 0.0
        assert float(value[c]) == pytest.approx(-expected, rel=1e-10, abs=1e-9)
    # The batched gradient is the gradient of each chain's own potential.
    for c in (0, 3):
        uc = u[c].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(-pot.log_density(uc[None])[0], uc)
        torch.testing.assert_close(grad[c], g, rtol=1e-10, atol=1e-10)
    # flatten inverts unflatten.
    torch.testing.assert_close(pot.flatten(values), u)


def test_potential_classifier_matches_trace():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model = bbb.BayesianClassifier(net, prior=dist.Normal(0.0, 1.0))
    pot = Potential(model, x, y)
    u = torch.randn(3, pot.dim, generator=g)
    value, _ = pot.value_and_grad(u)
    values, _ = pot.unflatten(u)
    for c in range(3):
        expected = trace_log_joint(model, {k: v[c] for k, v in values.items()}, x, y)
        assert float(value[c]) == pytest.approx(-expected, rel=1e-5)


def test_non_finite_positions_are_divergent_not_errors(curve_data):
    x, y = curve_data
    model = bbb.BayesianRegressor(tanh_net(4, torch.float64), prior=dist.Normal(0.0, 1.0), noise=0.1)
    pot = Potential(model, x, y)
    u = torch.zeros(3, pot.dim, dtype=torch.float64)
    u[1, 0] = math.nan
    u[2, 3] = math.inf
    value, grad = pot.value_and_grad(u)
    assert math.isfinite(float(value[0])) and torch.all(torch.isinf(value[1:]))
    assert torch.all(grad[1:] == 0) and torch.all(torch.isfinite(grad))


def test_overflowing_positive_site_is_divergent_not_an_error(curve_data):
    # A finite log-noise far out (a divergent trajectory) overflows exp in float32: the
    # LogNormal prior would refuse the value inf; the row must be rejected instead.
    x, y = curve_data
    model = bbb.BayesianRegressor(tanh_net(4, torch.float32), prior=dist.Normal(0.0, 1.0), noise="learned")
    pot = Potential(model, x.float(), y.float())
    u = torch.zeros(3, pot.dim)
    u[1, -1] = 200.0   # exp(200) = inf in float32
    u[2, -1] = -200.0  # exp(-200) = 0
    with pyro.validation_enabled(True):
        value, grad = pot.value_and_grad(u)
    assert math.isfinite(float(value[0])) and torch.all(torch.isinf(value[1:]))
    assert torch.all(grad[1:] == 0) and torch.all(torch.isfinite(grad))


# ----------------------------------------------------------------------------
# 2. The kernel leaves a Gaussian invariant (exact draws in, exact draws out)
# ----------------------------------------------------------------------------
def test_hmc_step_preserves_a_gaussian():
    d, c = 5, 4000
    scales = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0], dtype=torch.float64)

    def potential(u):
        return 0.5 * ((u / scales) ** 2).sum(-1), u / scales**2

    gen = torch.Generator().manual_seed(1)
    state = hmc_init(torch.randn(c, d, generator=gen, dtype=torch.float64) * scales, potential)
    # A mass matrix off by a factor of 2-4 and a long, odd trajectory: any error in
    # the leapfrog, kinetic energy or Metropolis step shows up in the moments.
    inv_mass = (scales**2) * torch.tensor([0.5, 2.0, 1.0, 4.0, 0.25], dtype=torch.float64)
    for _ in range(3):
        state, info = hmc_step(state, potential, step_size=0.35, inv_mass=inv_mass, n_steps=7,
                               generator=gen)
    z = state.position / scales
    assert 0.2 < float(info.acceptance_rate.mean()) < 0.999  # the test has teeth
    # Exact N(0, 1) draws: mean ~ N(0, 1/c), variance ~ N(1, 2/c); 4.5 sigma.
    assert torch.all(z.mean(0).abs() < 4.5 / math.sqrt(c))
    assert torch.all((z.var(0) - 1).abs() < 4.5 * math.sqrt(2 / c))
    assert not bool(info.diverging.any())


def test_leapfrog_matches_a_plain_loop_and_leaves_the_start_state_untouched():
    # U = |q|^2 / 2 with a potential that returns its own input as the gradient: the
    # kernel's in-place momentum updates must neither change the start state nor the
    # gradient it was handed.  Reference: the textbook leapfrog in NumPy, float64.
    def potential(u):
        return 0.5 * (u * u).sum(-1), u

    q0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    state = hmc_init(q0.clone(), potential)
    inv_mass = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    _, info = hmc_step(state, potential, step_size=0.3, inv_mass=inv_mass, n_steps=5,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(state.position, q0) and torch.equal(state.grad, q0)
    noise = torch.randn(q0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = inv_mass.numpy()
    q, p = q0.numpy().copy(), (noise * inv_mass.rsqrt()).numpy()
    for _ in range(5):
        p = p - 0.15 * q
        q = q + 0.3 * m * p
        p = p - 0.15 * q
    np.testing.assert_allclose(info.proposal_position.numpy(), q, rtol=1e-12)
    np.testing.assert_allclose(info.proposal_momentum.numpy(), p, rtol=1e-12)


def test_divergent_transitions_are_rejected():
    def potential(u):  # a cliff: the energy error explodes for any step
        return 1e6 * (u**2).sum(-1), 2e6 * u

    gen = torch.Generator().manual_seed(0)
    q0 = torch.randn(8, 2, generator=gen)
    state = hmc_init(q0, potential)
    new, info = hmc_step(state, potential, step_size=1.0, inv_mass=torch.ones(2), n_steps=3,
                         generator=gen)
    assert bool(info.diverging.all()) and not bool(info.accepted.any())
    assert torch.equal(new.position, q0)
    assert torch.all(info.acceptance_rate == 0)


# ----------------------------------------------------------------------------
# 3. Pieces of the adaptation and the diagnostics
# ----------------------------------------------------------------------------
def test_halton_and_windows():
    assert [halton(i) for i in range(1, 8)] == [0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]
    assert adaptation_windows(99) == []
    # Stan's default schedule for 1000 warmup iterations (init_buffer 75, window 25,
    # term_buffer 50): metric updates after iterations 100, 150, 250, 450, 950 (1-based).
    assert adaptation_windows(1000) == [99, 149, 249, 449, 949]
    assert adaptation_windows(200) == [99, 149]  # the final 50 iterations tune the step size
    for w in (100, 120, 149):  # too short for 75 + 25 + 50: 15% / 10% buffers
        ends = adaptation_windows(w)
        assert ends == sorted(ends) and ends[0] >= int(0.15 * w) and ends[-1] == w - int(0.1 * w) - 1


def test_chees_statistics_on_exact_gaussian_dynamics():
    """For N(0, I_d) the flow is a rotation, z(t) = z cos t + p sin t, and the ChEES
    criterion is C(t) = d sin^2 t, so t dC/dt = d t sin 2t (derivation in the test)."""
    # Delta = (|p|^2 - |z|^2) sin^2 t + 2 z.p sin t cos t; the two terms are
    # uncorrelated with E(|p|^2 - |z|^2)^2 = 4d and E(z.p)^2 = d, so
    # E Delta^2 = 4 d sin^2 t and C = E Delta^2 / 4 = d sin^2 t.
    d, c, t = 3, 200_000, 0.7
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(c, d, generator=gen, dtype=torch.float64)
    p = torch.randn(c, d, generator=gen, dtype=torch.float64)
    z1 = z * math.cos(t) + p * math.sin(t)
    p1 = -z * math.sin(t) + p * math.cos(t)
    ones = torch.ones(c, dtype=torch.float64)
    info = HMCInfo(ones, ones.bool(), ~ones.bool(), ones, z1, p1, 1)
    slope, chees = chees_statistics(z, info, torch.ones(d, dtype=torch.float64), t)
    assert chees == pytest.approx(d * math.sin(t) ** 2, rel=0.03)
    assert slope == pytest.approx(d * t * math.sin(2 * t), rel=0.03)
    # A mass matrix only rescales coordinates: the same flow seen through
    # u = z * s with inverse mass s^2 gives the same statistics.
    s = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64)
    info_s = info._replace(proposal_position=z1 * s, proposal_momentum=p1 / s)
    assert chees_statistics(z * s, info_s, s**2, t) == pytest.approx((slope, chees), rel=1e-9)


def test_nested_rhat():
    rng = np.random.default_rng(0)
    same = rng.normal(size=(64, 50, 3))
    assert np.all(nested_rhat(same, 8) < 1.02)
    shifted = same + np.repeat(np.arange(8), 8)[:, None, None]  # superchains disagree
    assert np.all(nested_rhat(shifted, 8) > 2)
    # One draw per chain still works (the many-short-chains regime).
    assert np.all(np.isfinite(nested_rhat(same[:, :1], 8)))
    with pytest.raises(ValueError, match="num_superchains"):
        nested_rhat(same, 5)


# ----------------------------------------------------------------------------
# 3b. The warmup schedule: one place for windows, every window filled
# ----------------------------------------------------------------------------
WARMUP_LENGTHS = [100, 101, 120, 149, 150, 151, 200, 300, 500, 666, 667, 668, 1000, 2000, 5000]


@pytest.mark.parametrize("warmup_steps", WARMUP_LENGTHS)
def test_warmup_schedule_is_stans_windowed_adaptation(warmup_steps):
    sched = warmup_schedule(warmup_steps)
    windows = sched.windows
    assert windows, "100 or more warmup iterations adapt the mass matrix"
    # Contiguous, none empty, between the two fast buffers.
    assert all(stop > start for start, stop in windows)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    if warmup_steps >= 150:  # Stan's 75 / 25 / 50 with doubling windows
        assert (sched.init_buffer, sched.term_buffer) == (75, 50)
        sizes = [stop - start for start, stop in windows]
        assert sizes[:-1] == [25 * 2**k for k in range(len(sizes) - 1)]
        assert sizes[-1] >= 25 * 2 ** (len(sizes) - 1)  # the last one stretched
    else:  # 15% / 75% / 10%
        assert sched.init_buffer == int(0.15 * warmup_steps)
        assert sched.term_buffer == int(0.10 * warmup_steps)
    # The metric updates of adaptation_windows are the windows' last iterations.
    assert adaptation_windows(warmup_steps) == [stop - 1 for _, stop in windows]
    assert [sched.window_of(i) for i in range(warmup_steps)].count(None) == (
        sched.init_buffer + sched.term_buffer)


def test_warmup_schedule_short_runs_have_no_windows():
    assert warmup_schedule(99).windows == () and warmup_schedule(0).windows == ()
    # Stan's schedule for 1000 iterations: updates after 100, 150, 250, 450, 950 (1-based).
    assert warmup_schedule(1000).windows == ((75, 100), (100, 150), (150, 250), (250, 450), (450, 950))


def _gaussian_potential(scales):
    """U(u) = |u / scales|^2 / 2: N(0, diag(scales^2)), a potential in closed form."""
    inv_var = 1.0 / scales**2
    return lambda u: (0.5 * (u * u * inv_var).sum(-1), u * inv_var)


@pytest.mark.parametrize(
    "warmup_steps", [100, 149, 150, 200, 667, 1000, pytest.param(5000, marks=pytest.mark.slow)])
def test_warmup_fills_every_window_with_its_draws(warmup_steps):
    """Driving the warmup loop: each mass-matrix update sees chains x window length
    draws (an empty window used to give M^-1 = 1e-3 from 667 iterations on), and
    the adapted M^-1 is the target's variance, not the regulariser's 1e-3."""
    scales = torch.tensor([0.5, 2.0], dtype=torch.float64)
    pot = _gaussian_potential(scales)
    gen = torch.Generator().manual_seed(0)
    chains = 4
    state = hmc_init(torch.randn(chains, 2, generator=gen, dtype=torch.float64), pot)
    _, ws, trace = warmup(state, pot, gen, warmup_steps=warmup_steps, max_leapfrog_steps=2)
    windows = warmup_schedule(warmup_steps).windows
    assert trace["window_draws"] == [chains * (stop - start) for start, stop in windows]
    assert ws.windows_closed == len(windows)
    assert len(trace["n_steps"]) == warmup_steps
    # The last window holds >= 100 draws (4 chains x >= 25); with at most 2 leapfrog
    # steps they are autocorrelated, so only the order of magnitude is checked here,
    # far from an empty window's 1e-3 / 4 = 2.5e-4 (the exact check is the
    # conjugate-model test below).
    ratio = ws.inv_mass.numpy() / scales.numpy() ** 2
    assert np.all((ratio > 0.1) & (ratio < 10)), ratio


def test_first_window_is_tracked_not_inferred_from_the_metric():
    """T restarts at 1 after the first window only -- also when a later window's
    metric happens to be the unit one."""
    pot = _gaussian_potential(torch.full((2,), 0.1, dtype=torch.float64))  # step sizes << 1
    gen = torch.Generator().manual_seed(0)
    state = hmc_init(0.1 * torch.randn(8, 2, generator=gen, dtype=torch.float64), pot)
    ws = warmup_init(state, pot, gen, 1000)
    for _ in range(30):
        draw = 0.1 * torch.randn(8, 2, generator=gen, dtype=torch.float64)
        ws = ws._replace(welford=welford_update(ws.welford, draw))
    ws = ws._replace(chees=ws.chees._replace(log_length_avg=math.log(3.0)))
    first = warmup_end_window(ws, state, pot, gen, 1000)
    # T = 1 in the new metric (at least one step: the clip to one step size).
    assert first.trajectory_length == pytest.approx(max(1.0, first.step_size))
    assert first.trajectory_length < 3.0
    assert first.windows_closed == 1
    later = warmup_end_window(ws._replace(windows_closed=1), state, pot, gen, 1000)
    assert later.trajectory_length == pytest.approx(3.0) and later.windows_closed == 2
    assert torch.all(ws.inv_mass == 1)  # the unit metric that used to mean "first window"
    assert later.inv_mass.numpy() == pytest.approx(0.01, rel=0.5)  # the draws' variance


def _sample_adapted(state, pot, ws, gen, iterations, first_iteration=0, max_steps=1000):
    """Transitions with the kernel the warmup ``ws`` left (as run_hmc samples): yields
    ``(state, info)`` after each."""
    step_size, length, inv_mass = warmup_final(ws, max_steps)
    for i in range(first_iteration, first_iteration + iterations):
        n = num_leapfrog_steps(length, step_size, halton(i + 1), max_steps)
        state, info = hmc_step(state, pot, step_size=step_size, inv_mass=inv_mass, n_steps=n,
                               generator=gen)
        yield state, info


def test_adapted_inverse_mass_is_the_exact_posterior_variance():
    """Conjugate linear regression with known noise (exact Gaussian posterior
    N(m, Sigma), strongly correlated features): the adapted diagonal M^-1 is the
    variance of the last window's draws, whose expectation is diag(Sigma)."""
    ref = bbb.datasets.conjugate_linear_regression(n=50, d=3, noise=0.5, correlation=0.6, seed=2)
    mean, precision = ref.posterior_mean, ref.precision
    pot = lambda u: (0.5 * (((u - mean) @ precision) * (u - mean)).sum(-1), (u - mean) @ precision)
    gen = torch.Generator().manual_seed(0)
    chains, warmup_steps = 16, 1000
    start = mean + torch.randn(chains, 3, generator=gen, dtype=torch.float64)  # prior-like spread
    state, ws, trace = warmup(hmc_init(start, pot), pot, gen, warmup_steps=warmup_steps)
    first, stop = warmup_schedule(warmup_steps).windows[-1]  # (450, 950)
    draws = chains * (stop - first)
    assert trace["window_draws"][-1] == draws
    # A sample variance of n_eff Gaussian draws has relative sd sqrt(2 / n_eff).  The
    # window's draws mix like draws of the adapted kernel (a metric close to the final
    # one), so n_eff = draws x (bulk ESS per draw) of 200 transitions with the final
    # kernel; 5 sd for each of 3 coordinates (a 2e-6 chance of a false alarm).
    inv_mass = ws.inv_mass  # what warmup_final hands to sampling
    sampled = [s.position.numpy() for s, _ in _sample_adapted(state, pot, ws, gen, 200)]
    w = np.stack(sampled, 1)
    ess = az.ess(az.convert_to_dataset({"w": w}), method="bulk")["w"].values
    n_eff = draws * np.minimum(ess / w[..., 0].size, 1.0)
    tol = 5 * np.sqrt(2 / n_eff)
    exact = ref.posterior_cov.diagonal().numpy()
    np.testing.assert_array_less(np.abs(inv_mass.numpy() / exact - 1), tol)
    assert np.all(tol < 0.2)  # the check means something (n_eff >= 1250)
    # Correlated features: diag(Sigma) is not 1 / diag(Lambda), which a metric read off
    # the local curvature would give; the check tells the two apart.
    assert np.all(np.abs(exact * precision.diagonal().numpy() - 1) > 2 * tol)


@pytest.mark.parametrize("target", [0.65, 0.8])
def test_sampling_meets_the_target_acceptance(target):
    """The step size the warmup leaves gives, when sampling, the acceptance asked for:
    the harmonic mean over chains (what dual averaging targets) on a 100-dimensional
    Gaussian with marginal scales 0.1 to 10, from over-dispersed starts.

    Over 10 seeds it was 0.64-0.68 at 0.65 and 0.79-0.81 at 0.8; with Stan's shrinkage
    (0.05) 0.74-0.78 at 0.65, which the 0.04 tolerance rejects."""
    scales = torch.logspace(-1, 1, 100, dtype=torch.float64)
    pot = lambda u: (0.5 * ((u / scales) ** 2).sum(-1), u / scales**2)
    gen = torch.Generator().manual_seed(0)
    start = 3 * torch.randn(64, 100, generator=gen, dtype=torch.float64)
    state, ws, _ = warmup(hmc_init(start, pot), pot, gen, warmup_steps=300,
                          target_accept_prob=target)
    accepted = [harmonic_mean(info.acceptance_rate, info.diverging)
                for _, info in _sample_adapted(state, pot, ws, gen, 100, first_iteration=300)]
    assert abs(np.mean(accepted) - target) < 0.04


# ----------------------------------------------------------------------------
# 4. Conjugate linear regression (diabetes): exact posterior mean and covariance
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diabetes():
    pytest.importorskip("sklearn")
    return bbb.datasets.conjugate_linear_regression("diabetes", noise=None)


@pytest.fixture(scope="module")
def diabetes_ref(diabetes):
    ref = diabetes
    d = ref.x.shape[1]
    net = torch.nn.Linear(d, 1, bias=False).double()
    model = bbb.BayesianRegressor(
        net, prior=dist.Normal(torch.tensor(0.0, dtype=torch.float64), ref.prior_scale),
        noise=ref.noise,
    )
    run = run_hmc(model, ref.x, ref.y, num_chains=32, num_samples=100, warmup_steps=150,
                  seed=0, progress=False)
    return model, run


def test_diabetes_matches_exact_posterior(diabetes, diabetes_ref):
    ref = diabetes
    _, run = diabetes_ref
    draws = run.samples["weight"][..., 0, :].numpy()  # (chains, draws, d)
    c, s, d = draws.shape
    assert (c, s, d) == (32, 100, 10)
    # Whiten with the exact posterior: z = L^-1 (w - m) is N(0, I) under it, so
    # every check below is on unit-scale, uncorrelated coordinates.
    chol = torch.linalg.cholesky(ref.posterior_cov).numpy()
    z = np.linalg.solve(chol, (draws - ref.posterior_mean.numpy()).reshape(-1, d).T).T
    z = z.reshape(c, s, d)
    ds = az.convert_to_dataset({"z": z})
    ess = az.ess(ds, method="bulk")["z"].values
    assert np.all(ess > 200), ess  # the sampler mixed: the MCSEs below mean something
    assert float(az.rhat(ds)["z"].max()) < 1.05
    flat = z.reshape(-1, d)
    # Means: N(0, 1/ESS) each; 4.5 MCSE (10 coordinates: a 7e-5 chance in all).
    np.testing.assert_array_less(np.abs(flat.mean(0)), 4.5 / np.sqrt(ess))
    # Covariance of z is I: a sample variance has sd sqrt(2/ESS), a covariance
    # sqrt(1/ESS); 4.5 of those for each of the 55 entries.
    cov = np.cov(flat, rowvar=False)
    n_eff = ess.min()
    tol = 4.5 * np.sqrt((1 + np.eye(d)) / n_eff)
    assert np.all(np.abs(cov - np.eye(d)) < tol), np.abs(cov - np.eye(d)).max()


def test_result_fields_and_inference_data(diabetes, diabetes_ref):
    model, run = diabetes_ref
    assert isinstance(run, ChEESReference) and isinstance(run, HMCReference)
    assert run.sampler == "pyro_bbb ChEES-HMC"
    assert set(run.samples) == set(model.latent_names)
    assert run.samples["weight"].device.type == "cpu"
    st = run.sample_stats
    for name in ("acceptance_rate", "step_size", "n_steps", "diverging", "lp", "energy",
                 "trajectory_length"):
        assert st[name].shape == (32, 100), name
    assert st["diverging"].dtype == np.bool_ and np.issubdtype(st["n_steps"].dtype, np.integer)
    assert np.all((st["acceptance_rate"] >= 0) & (st["acceptance_rate"] <= 1))
    # Lockstep: one step size and one number of leapfrog steps per iteration.
    assert np.all(st["n_steps"] == st["n_steps"][:1]) and np.all(st["step_size"] == st["step_size"][0, 0])
    # lp is the log joint at the draw (real-valued weights: no Jacobian).
    x, y = diabetes.x, diabetes.y
    for c, i in [(0, 0), (5, 37), (31, 99)]:
        draw = {k: v[c, i] for k, v in run.samples.items()}
        assert st["lp"][c, i] == pytest.approx(trace_log_joint(model, draw, x, y), rel=1e-9)
    # energy - (-lp) is the kinetic energy of a N(0, M) momentum: chi2_d / 2 >= 0, mean d/2.
    kinetic = st["energy"] + st["lp"]
    assert np.all(kinetic >= -1e-8) and abs(kinetic.mean() - 5.0) < 0.5
    # Max over the 442 outputs f(x_i): the usual 1.05 bar for "converged".
    assert run.diagnostics["max_rhat_f"] < 1.05 and run.diagnostics["divergences"] == 0
    assert run.diagnostics["max_nested_rhat_f"] < 1.05  # 32 chains -> 4 superchains
    assert run.settings["num_superchains"] == 4
    idata = to_inference_data(model, run, x, y, x_test=x[:5])
    assert idata.posterior["weight"].shape == (32, 100, 1, 10)
    assert idata.posterior.attrs["inference"] == "pyro_bbb ChEES-HMC"
    assert idata.sample_stats["acceptance_rate"].shape == (32, 100)
    assert "pyro_bbb ChEES-HMC" in repr(run)


def test_compare_takes_the_reference():
    """BBB vs run_hmc through to_inference_data and compare, as with run_nuts."""
    from pyro_bbb.compare import ComparisonReport, compare

    gen = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 16)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.2 * torch.randn(16, generator=gen)
    model = bbb.BayesianRegressor(tanh_net(3), prior=dist.Normal(0.0, 1.0), noise=0.2)
    guide = bbb.BBBGuide(model)
    bbb.fit(model, guide, x, y, epochs=100, lr=0.03, progress=False, seed=0)
    ref = run_hmc(model, x, y, num_chains=16, num_samples=25, warmup_steps=60, progress=False)
    x_test = torch.tensor([[-1.5], [0.0], [0.5]])
    vi = to_inference_data(model, guide, x, y, x_test=x_test, num_samples=100, seed=0)
    hmc = to_inference_data(model, ref, x, y, x_test=x_test)
    report = compare(vi, hmc)
    assert isinstance(report, ComparisonReport)
    assert len(report.per_input) == 3 and (report.per_input.hmc_std > 0).all()


# ----------------------------------------------------------------------------
# 5. A learned (positive) noise
# ----------------------------------------------------------------------------
def test_learned_noise_is_positive_and_lp_has_the_jacobian():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + 0.3 * torch.randn(60, generator=g, dtype=torch.float64)
    model = bbb.BayesianRegressor(torch.nn.Linear(2, 1).double(), prior=dist.Normal(0.0, 1.0),
                                  noise="learned")
    run = run_hmc(model, x, y, num_chains=16, num_samples=50, warmup_steps=100, seed=1, progress=False)
    noise = run.samples["noise"]
    assert noise.shape == (16, 50) and torch.all(noise > 0)
    # 60 points with noise 0.3: the posterior of the noise sits near 0.3.
    assert 0.22 < float(noise.mean()) < 0.4
    lp = run.sample_stats["lp"]
    for c, i in [(0, 0), (7, 20), (15, 49)]:
        draw = {k: v[c, i] for k, v in run.samples.items()}
        expected = trace_log_joint(model, draw, x, y) + float(torch.log(draw["noise"]))
        assert lp[c, i] == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------
# 6. A small BNN against Pyro's NUTS, in function space
# ----------------------------------------------------------------------------
def _f_summary(model, ref, x_test):
    from pyro_bbb.predict import batched_outputs

    f = batched_outputs(model, ref.flat_samples(), x_test).double().numpy()
    f = f.reshape(ref.num_chains, ref.num_samples, -1)
    ds = az.convert_to_dataset({"f": f})
    return (
        f.reshape(-1, f.shape[-1]).mean(0),
        f.reshape(-1, f.shape[-1]).std(0),
        az.mcse(ds, method="mean")["f"].values,
        az.mcse(ds, method="sd")["f"].values,
    )


def _bnn_agreement(hidden, n, noise, nuts_kwargs, hmc_kwargs):
    x, y = bbb.datasets.regression_curve(n, seed=2)
    model = bbb.BayesianRegressor(tanh_net(hidden), prior=dist.Normal(0.0, 1.0), noise=noise)
    # Inside the data range, where the posterior's modes (permuted, sign-flipped or
    # not) agree on f; outside it a chain stuck in one mode is not a fair reference.
    x_test = torch.linspace(0.05, 0.45, 5)[:, None]
    nuts = run_nuts(model, x, y, progress=False, seed=0, **nuts_kwargs)
    hmc = run_hmc(model, x, y, progress=False, seed=0, x_test=x_test, **hmc_kwargs)
    m_n, s_n, mcse_m_n, mcse_s_n = _f_summary(model, nuts, x_test)
    m_h, s_h, mcse_m_h, mcse_s_h = _f_summary(model, hmc, x_test)
    # Two independent Monte Carlo estimates of one quantity differ by about
    # N(0, mcse_1^2 + mcse_2^2) (ArviZ's MCSEs, from each run's own ESS); 4.5 of
    # those at each of 5 test points fails a correct pair of samplers with
    # probability ~3e-5 per run.
    np.testing.assert_array_less(np.abs(m_h - m_n), 4.5 * np.hypot(mcse_m_h, mcse_m_n))
    np.testing.assert_array_less(np.abs(s_h - s_n), 4.5 * np.hypot(mcse_s_h, mcse_s_n))
    return hmc


def test_small_bnn_agrees_with_nuts_quick():
    """1-3-1 tanh, 20 points, noise 0.3: a posterior NUTS covers at depth 5 (~15 s)."""
    hmc = _bnn_agreement(
        3, 20, 0.3,
        dict(num_samples=150, warmup_steps=60, num_chains=1, max_tree_depth=5),
        dict(num_chains=32, num_samples=50, warmup_steps=100),
    )
    assert hmc.diagnostics["max_rhat_f"] < 1.05


@pytest.mark.slow
@pytest.mark.long
def test_small_bnn_agrees_with_nuts():
    """1-10-1 tanh, 30 points, noise 0.1 (minutes: Pyro NUTS at depth 8)."""
    hmc = _bnn_agreement(
        10, 30, 0.1,
        dict(num_samples=300, warmup_steps=200, num_chains=2, max_tree_depth=8),
        dict(num_chains=64, num_samples=100, warmup_steps=200),
    )
    assert hmc.diagnostics["max_rhat_f"] < 1.05


# ----------------------------------------------------------------------------
# 7. Arguments, models it cannot handle, seeding, global state
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    x, y = bbb.datasets.regression_curve(10, seed=0)
    model = bbb.BayesianRegressor(tanh_net(3), prior=dist.Normal(0.0, 1.0), noise=0.1)
    return model, x, y


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_chains": 1}, "num_chains"),
        ({"num_chains": 2.5}, "num_chains"),
        ({"num_chains": True}, "num_chains"),
        ({"num_samples": 0}, "num_samples"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"target_accept_prob": 1.0}, "target_accept_prob"),
        ({"target_accept_prob": 0}, "target_accept_prob"),
        ({"max_leapfrog_steps": 0}, "max_leapfrog_steps"),
        ({"num_superchains": 3}, "num_superchains"),
        ({"num_superchains": 1}, "num_superchains"),
        ({"seed": -1}, "seed"),
        ({"progress": "yes"}, "progress"),
        ({"x_test": torch.zeros(3, 2)}, "x_test"),
    ],
)
def test_bad_arguments_raise(kwargs, name, tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match=name):
        run_hmc(model, x, y, **{"num_chains": 4, "progress": False, **kwargs})


def test_models_it_cannot_handle_point_to_run_nuts(tiny):
    _, x, y = tiny

    def plain_pyro_model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w * x[:, 0], 0.1), obs=y)

    with pytest.raises(ValueError, match="run_nuts"):
        run_hmc(plain_pyro_model, x, y, progress=False)

    class DiscreteExtra(bbb.BayesianRegressor):
        @property
        def latent_names(self):
            return super().latent_names + ("k",)

        def extra_priors(self):
            return {"k": dist.Bernoulli(0.5)}

    model = DiscreteExtra(tanh_net(3), prior=dist.Normal(0.0, 1.0), noise=0.1)
    with pytest.raises(ValueError, match="discrete.*run_nuts"):
        run_hmc(model, x, y, progress=False)
    with pytest.raises(ValueError, match="y"):
        run_hmc(bbb.BayesianRegressor(tanh_net(3), prior=dist.Normal(0.0, 1.0)), x, None)


def test_seeded_deterministic_and_global_rng_untouched(tiny):
    model, x, y = tiny
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run_hmc(model, x, y, num_chains=4, num_samples=5, warmup_steps=10, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    b = run_hmc(model, x, y, num_chains=4, num_samples=5, warmup_steps=10, seed=7, progress=False)
    c = run_hmc(model, x, y, num_chains=4, num_samples=5, warmup_steps=10, seed=8, progress=False)
    for k in a.samples:
        assert torch.equal(a.samples[k], b.samples[k])
    assert not torch.equal(a.samples["0.weight"], c.samples["0.weight"])
    assert a.settings["num_superchains"] == 0 and "nested_rhat_f" not in a.diagnostics


def test_progress_bar(tiny, capsys):
    model, x, y = tiny
    run_hmc(model, x, y, num_chains=4, num_samples=3, warmup_steps=3, progress=True)
    err = capsys.readouterr().err
    assert "sample" in err and "acc" in err


@pytest.mark.cuda
def test_runs_on_the_models_device(tiny):
    model, x, y = tiny
    model = bbb.BayesianRegressor(tanh_net(3), prior=dist.Normal(0.0, 1.0), noise=0.1).cuda()
    run = run_hmc(model, x, y, num_chains=8, num_samples=10, warmup_steps=20, progress=False)
    assert run.samples["0.weight"].device.type == "cpu"


# ----------------------------------------------------------------------------
# 8. The convergence verdict reads R-hat as it prints it
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("rhat, passes", [(1.0101, True), (1.0149, True), (1.0150, False),
                                          (1.02, False), (float("nan"), False)])
def test_reference_verdict_rounds_rhat_as_printed(rhat, passes):
    diag = {"max_rhat_f": rhat, "min_ess_bulk_f": 1000.0, "min_ess_tail_f": 1000.0}
    assert reference_converged(diag) is passes
    assert reference_converged({**diag, "min_ess_tail_f": 399.0}) is False
    assert reference_converged({**diag, "min_ess_bulk_f": 399.0}) is False


@pytest.fixture(scope="module")
def tiny_idata(tiny):
    model, x, y = tiny
    ref = run_hmc(model, x, y, num_chains=4, num_samples=20, warmup_steps=10, progress=False)
    guide = bbb.BBBGuide(model)
    guide(x, y)  # set up, unfitted: only the HMC side is read
    vi = to_inference_data(model, guide, x, y, x_test=x[:3], num_samples=50, seed=0)
    return vi, to_inference_data(model, ref, x, y, x_test=x[:3])


@pytest.mark.parametrize("rhat, shown", [(1.0101, None), (1.0150, "max R-hat 1.0150 > 1.01")])
def test_compare_verdict_on_the_rhat_boundary(rhat, shown, tiny_idata, monkeypatch):
    """compare()'s warning: 1.0101 reads 1.01 and passes; 1.0150 fails, printed with
    4 digits.  ArviZ's R-hat and ESS are replaced by fixed values so that only the
    verdict is under test."""
    compare_module = importlib.import_module("pyro_bbb.compare")  # the module, not the function

    fixed = lambda value: (lambda data, **kw: data.isel(chain=0, draw=0) * 0 + value)  # noqa: E731
    monkeypatch.setattr(compare_module.az, "rhat", fixed(rhat))
    monkeypatch.setattr(compare_module.az, "ess", fixed(5000.0))
    vi, hmc = tiny_idata
    report = compare_module.compare(vi, hmc)
    verdicts = [w for w in report.warnings if "not converged" in w]
    if shown is None:
        assert not any("R-hat" in w for w in verdicts), verdicts
    else:
        assert len(verdicts) == 1 and shown in verdicts[0], verdicts
    row = report.table.query("section == 'hmc convergence' and metric == 'max_rhat'")
    assert float(row["value"].iloc[0]) == pytest.approx(rhat)


# ----------------------------------------------------------------------------
# 9. Sampling until converged, within a budget
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conjugate_model():
    ref = bbb.datasets.conjugate_linear_regression(n=30, d=2, noise=0.5, seed=1)
    net = torch.nn.Linear(2, 1, bias=False).double()
    model = bbb.BayesianRegressor(
        net, prior=dist.Normal(torch.tensor(0.0, dtype=torch.float64), ref.prior_scale), noise=ref.noise)
    return model, ref


def test_until_converged_stops_when_converged(conjugate_model):
    model, ref = conjugate_model
    x_test = ref.x[:3]
    run = run_hmc(model, ref.x, ref.y, num_chains=8, num_samples=40, warmup_steps=100, x_test=x_test,
                  until_converged=True, max_samples=2000, seed=0, progress=False)
    d = run.diagnostics
    assert run.converged and run.stop_reason == "converged" and convergence_problems(d) == []
    # It stopped at the first block boundary where the check passed, long before the cap.
    draws = run.samples["weight"].shape[1]
    assert draws % 40 == 0 and draws < 2000
    assert reference_converged(d) and d["min_ess_bulk_f"] >= 400 and d["min_ess_tail_f"] >= 400
    assert run.sample_stats["lp"].shape == (8, draws)
    # ... and not one block later than needed: the check on the draws one block
    # shorter fails (recomputed on those draws alone).
    if draws > 40:
        f = (run.samples["weight"][..., 0, :] @ x_test.T).numpy()[:, : draws - 40]
        data = az.convert_to_dataset({"f": f})
        ok = (float(az.rhat(data)["f"].max()) < 1.015 and float(az.ess(data, method="bulk")["f"].min()) >= 400
              and float(az.ess(data, method="tail")["f"].min()) >= 400)
        assert not ok


@pytest.mark.parametrize("diagnostics, expected", [
    ({"max_rhat_f": 1.0149, "min_ess_bulk_f": 400.0, "min_ess_tail_f": 400.0}, []),
    ({"max_rhat_f": 1.0150, "min_ess_bulk_f": 400.0, "min_ess_tail_f": 400.0, "divergences": 0},
     ["max R-hat 1.0150 > 1.01"]),
    ({"max_rhat_f": 1.0, "min_ess_bulk_f": 399.6, "min_ess_tail_f": float("nan"), "divergences": 1},
     ["min bulk ESS 399 < 400", "min tail ESS nan < 400", "1 divergent transition"]),
])
def test_convergence_problems_name_each_failure_as_the_check_reads_it(diagnostics, expected):
    assert convergence_problems(diagnostics) == expected
    # the check and the list agree (divergences are listed but are not part of the check)
    assert reference_converged(diagnostics) == (not [p for p in expected if "divergent" not in p])


@pytest.mark.parametrize("budget, reason, draws", [({"max_samples": 10}, "max_samples", 10),
                                                   ({"max_samples": 3}, "max_samples", 3),
                                                   ({"time_limit": 1e-3}, "time_limit", 4)])
def test_until_converged_reports_the_limit(conjugate_model, budget, reason, draws):
    model, ref = conjugate_model
    # 4 chains x at most 10 draws: ESS cannot reach 400 (ArviZ caps it at n log10 n).
    with pytest.warns(RuntimeWarning, match="did not converge") as record:
        run = run_hmc(model, ref.x, ref.y, num_chains=4, num_samples=5, warmup_steps=20,
                      until_converged=True, seed=0, progress=False, **budget)
    assert not run.converged and run.stop_reason == reason
    # The warning names the budget, what failed (as convergence_problems says) and the
    # draws the run holds.
    message = str(record[0].message)
    limit = f"{reason}={budget[reason]:g}" if reason == "time_limit" else f"{reason}={budget[reason]}"
    assert limit in message and f"{draws} draws per chain" in message
    for problem in convergence_problems(run.diagnostics):
        assert problem in message
    assert 0 < run.adaptation["warmup_seconds"] <= run.wall_time
    # Blocks of 5, never past max_samples; a spent clock still leaves MIN_TIMED_DRAWS.
    assert run.samples["weight"].shape[1] == draws
    plain = run_hmc(model, ref.x, ref.y, num_chains=4, num_samples=5, warmup_steps=20, seed=0,
                    progress=False)
    assert plain.stop_reason == "num_samples" and not plain.converged


def test_time_limit_stops_inside_a_block(conjugate_model):
    model, ref = conjugate_model
    # One block of a million draws would take hours; the clock is read after every
    # transition, so the run ends about a second in (10 s allows for a loaded machine);
    # the draws the clock allowed are then checked, and may pass on this easy posterior.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run = run_hmc(model, ref.x, ref.y, num_chains=4, num_samples=10**6, warmup_steps=20,
                      until_converged=True, time_limit=1.0, seed=0, progress=False)
    assert run.stop_reason in ("time_limit", "converged")
    # it warns exactly when it stopped unconverged
    assert any("did not converge" in str(w.message) for w in record) == (not run.converged)
    assert run.converged == (run.stop_reason == "converged")
    assert MIN_TIMED_DRAWS <= run.samples["weight"].shape[1] < 10**6
    assert run.wall_time < 10.0
    assert run.sample_stats["lp"].shape == (4, run.samples["weight"].shape[1])


@pytest.mark.parametrize("kwargs, name", [
    ({"until_converged": True}, "time_limit"),
    ({"max_samples": 10}, "until_converged"),
    ({"until_converged": True, "time_limit": 0}, "time_limit"),
    ({"until_converged": True, "max_samples": 0}, "max_samples"),
    ({"until_converged": 1, "max_samples": 5}, "until_converged"),
    ({"init": "sgd"}, "init"),
])
def test_budget_arguments_are_checked(kwargs, name, tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match=name):
        run_hmc(model, x, y, num_chains=4, progress=False, **kwargs)


# ----------------------------------------------------------------------------
# 10. Superchains from MAP fits
# ----------------------------------------------------------------------------
def test_map_fit_finds_the_posterior_mode_of_every_row(conjugate_model):
    """Gaussian posterior: the mode is the exact posterior mean; four rows from
    different starts, fitted as one batch."""
    model, ref = conjugate_model
    pot = Potential(model, ref.x, ref.y)
    start = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fitted = map_fit(pot, start, steps=800, lr=0.01)
    sd = ref.posterior_cov.diagonal().sqrt()
    # Adam's last steps are ~lr (0.01) around the optimum: well within 0.2 sd (sd ~0.1).
    assert torch.all((fitted - ref.posterior_mean).abs() < 0.2 * sd), (fitted, ref.posterior_mean)


def test_map_init_starts_superchains_at_their_modes(conjugate_model):
    model, ref = conjugate_model
    run = run_hmc(model, ref.x, ref.y, num_chains=16, num_samples=50, warmup_steps=100,
                  init="map", seed=0, progress=False)
    assert run.settings["init"] == "map" and "MAP" in run.settings["init_strategy"]
    assert run.settings["num_superchains"] == 2 and "nested_rhat_f" in run.diagnostics
    # Started at the mode, the chains sample the exact posterior: mean within 5 MCSE.
    w = run.samples["weight"][..., 0, :].numpy()
    ess = az.ess(az.convert_to_dataset({"w": w}), method="bulk")["w"].values
    sd = ref.posterior_cov.diagonal().sqrt().numpy()
    np.testing.assert_array_less(np.abs(w.reshape(-1, 2).mean(0) - ref.posterior_mean.numpy()),
                                 5 * sd / np.sqrt(ess))
    assert run.diagnostics["max_nested_rhat_f"] < 1.05


# ----------------------------------------------------------------------------
# 11. A degenerate posterior stops early with a clear error
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_targets_raise_quickly(dtype):
    """y of 1e20: in float32 the log density overflows everywhere, in float64 it is
    finite but no step size is accepted; both used to run for minutes at acceptance
    0 with step sizes near 1e-24."""
    x, y = bbb.datasets.regression_curve(10, seed=0)
    prior = dist.Normal(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    model = bbb.BayesianRegressor(tanh_net(3, dtype=dtype), prior=prior, noise=0.1)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="degenerate.*standardize y"):
        run_hmc(model, x.to(dtype), torch.full((10,), 1e20, dtype=dtype), num_chains=4,
                num_samples=5, warmup_steps=10, progress=False)
    assert time.perf_counter() - start < 2.0
