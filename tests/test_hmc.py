"""Tests of the Pyro-NUTS reference, ``pyro_bbb.hmc.nuts``.

Each check is against something computed independently of the sampler: the
closed-form posterior of a conjugate linear regression, the model's log joint
from a Pyro trace, the change-of-variables Jacobian, the kinetic-energy law.
Seeds are fixed, so the runs are deterministic; the tolerances say how far a
*correct* sampler could fall with another seed.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pyro
import pyro.distributions as dist
import torch

try:
    from pyro_bbb.hmc import HMCReference, run_nuts
except ModuleNotFoundError:  # package not installed: run from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pyro_bbb.hmc import HMCReference, run_nuts

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's refactor notice
    import arviz as az


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
PRIOR_SCALE = 1.0  # w ~ N(0, s^2 I)
NOISE = 0.5  # y ~ N(Xw, sigma^2), sigma known


def linreg(x, y=None):
    """Conjugate Bayesian linear regression, w as one site of shape (d,)."""
    d = x.shape[-1]
    w = pyro.sample("w", dist.Normal(x.new_zeros(d), PRIOR_SCALE).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)


def linreg_learned_noise(x, y=None):
    """Same regression with a positive (constrained) noise scale."""
    d = x.shape[-1]
    w = pyro.sample("w", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(x.new_tensor(-1.0), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)


def bnn(x, y=None, hidden=8):
    """A 1-8-1 tanh network, weights as sample sites with N(0, 1) priors."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, hidden]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([hidden, 1]).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    f = (torch.tanh(x @ w1 + b1) @ w2 + b2).squeeze(-1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(f, 0.1), obs=y)


def log_joint(model, draw, *args):
    """The model's log joint at ``draw`` (constrained values), from a trace."""
    conditioned = pyro.poutine.condition(model, data=draw)
    return pyro.poutine.trace(conditioned).get_trace(*args).log_prob_sum().item()


# ----------------------------------------------------------------------------
# Data and the shared linear-regression run
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linreg_data():
    g = torch.Generator().manual_seed(123)
    n, d = 50, 3
    corr = torch.tensor([[1.0, 0.8, 0.5], [0.8, 1.0, 0.6], [0.5, 0.6, 1.0]])
    x = torch.randn(n, d, generator=g) @ torch.linalg.cholesky(corr).T
    w_true = torch.tensor([1.0, -0.5, 0.3])
    y = x @ w_true + NOISE * torch.randn(n, generator=g)
    # Exact posterior (numpy, float64): Sigma = (X'X / sigma^2 + I / s^2)^-1,
    # mu = Sigma X'y / sigma^2.
    X, Y = x.double().numpy(), y.double().numpy()
    precision = X.T @ X / NOISE**2 + np.eye(d) / PRIOR_SCALE**2
    cov = np.linalg.inv(precision)
    mean = cov @ X.T @ Y / NOISE**2
    return x, y, mean, cov


@pytest.fixture(scope="module")
def linreg_ref(linreg_data):
    x, y, _, _ = linreg_data
    return run_nuts(
        linreg, x, y, num_samples=300, warmup_steps=300, num_chains=2, seed=0,
        progress=False,
    )


# ----------------------------------------------------------------------------
# 1. Conjugate linear regression against its closed-form posterior
# ----------------------------------------------------------------------------
def test_linear_regression_matches_exact_posterior(linreg_data, linreg_ref):
    _, _, mean, cov = linreg_data
    draws = linreg_ref.samples["w"].double().numpy()  # (chains, draws, d)
    assert draws.shape == (2, 300, 3)
    ds = az.convert_to_dataset({"w": draws})
    ess_mean = az.ess(ds, method="mean")["w"].values
    ess_sd = az.ess(ds, method="sd")["w"].values
    sd = np.sqrt(np.diag(cov))
    # Sanity: the chains mixed, so the MCSEs below mean something.
    assert np.all(ess_mean > 100), ess_mean
    assert float(az.rhat(ds)["w"].max()) < 1.05

    # Means: the error of a chain average is ~ N(0, MCSE^2), MCSE = sd / sqrt(ESS);
    # 4 MCSE is a 6e-5 two-sided chance per coordinate for a correct sampler.
    flat = draws.reshape(-1, 3)
    mcse = sd / np.sqrt(ess_mean)
    np.testing.assert_array_less(np.abs(flat.mean(0) - mean), 4 * mcse)

    # Stds: for a Gaussian, the relative error of a sample sd is ~ 1 / sqrt(2 ESS)
    # (Var s^2 = 2 sigma^4 / ESS); allow 4 of those (about 0.1 at ESS ~ 600).
    rel_tol = 4 / np.sqrt(2 * ess_sd)
    np.testing.assert_array_less(np.abs(flat.std(0, ddof=1) / sd - 1), rel_tol)

    # Correlations (the features are correlated, so the posterior is): the sd of
    # a sample correlation is ~ (1 - rho^2) / sqrt(ESS); allow 4 of those.
    rho = cov / np.outer(sd, sd)
    rho_hat = np.corrcoef(flat, rowvar=False)
    tol = 4 * (1 - rho**2) / np.sqrt(ess_mean.min()) + 1e-9
    assert np.all(np.abs(rho_hat - rho) <= tol), (rho_hat, rho)


# ----------------------------------------------------------------------------
# 2. A constrained site: draws in the support, lp with its Jacobian
# ----------------------------------------------------------------------------
def test_constrained_site_positive_and_lp_includes_jacobian(linreg_data):
    x, y, _, _ = linreg_data
    ref = run_nuts(
        linreg_learned_noise, x, y, num_samples=50, warmup_steps=50, num_chains=2,
        seed=1, progress=False,
    )
    sigma = ref.samples["sigma"]
    assert sigma.shape == (2, 50)
    assert torch.all(sigma > 0)
    lp = ref.sample_stats["lp"]
    assert np.all(np.isfinite(lp))
    # NUTS samples u = log(sigma); lp is the log density in u, so it is the log
    # joint plus log |d sigma / du| = log sigma. float32 model: 1e-3 absolute.
    for c in range(2):
        for i in range(0, 50, 7):
            draw = {k: v[c, i] for k, v in ref.samples.items()}
            expected = log_joint(linreg_learned_noise, draw, x, y) + float(
                torch.log(draw["sigma"])
            )
            assert lp[c, i] == pytest.approx(expected, abs=1e-3)
    # Sanity on the value: 50 points with noise 0.5 pin sigma near 0.5.
    assert 0.35 < float(sigma.mean()) < 0.7


# ----------------------------------------------------------------------------
# 3. Per-draw statistics: shapes, dtypes, internal consistency, lp bookkeeping
# ----------------------------------------------------------------------------
def test_sample_stats_shapes_and_bookkeeping(linreg_data, linreg_ref):
    x, y, _, _ = linreg_data
    ref = linreg_ref
    assert isinstance(ref, HMCReference)
    assert ref.sampler == "Pyro NUTS"
    assert (ref.num_chains, ref.num_samples) == (2, 300)
    assert ref.settings["chain_method"] == "sequential"
    assert ref.settings["num_samples"] == 300 and ref.settings["seed"] == 0
    assert ref.wall_time > 0 and len(ref.mcmc) == 2
    assert ref.flat_samples()["w"].shape == (600, 3)
    assert torch.equal(ref.flat_samples()["w"][300:], ref.samples["w"][1])
    assert ref.samples["w"].device.type == "cpu"

    st = ref.sample_stats
    expected = {
        "diverging": np.bool_, "step_size": np.floating, "tree_depth": np.integer,
        "n_steps": np.integer, "energy": np.floating, "acceptance_rate": np.floating,
        "lp": np.floating,
    }
    assert set(st) == set(expected)
    for name, kind in expected.items():
        assert st[name].shape == (2, 300), name
        assert np.issubdtype(st[name].dtype, kind), (name, st[name].dtype)
        assert np.all(np.isfinite(st[name].astype(float))), name

    depth, n_steps = st["tree_depth"], st["n_steps"]
    assert np.all((depth >= 1) & (depth <= ref.settings["max_tree_depth"]))
    # Depth is read exactly; NUTS completes every doubling but the last, so
    # 2^(depth-1) <= n_steps <= 2^depth - 1.
    assert np.all(2 ** (depth - 1) <= n_steps) and np.all(n_steps <= 2**depth - 1)
    assert np.all(st["step_size"] > 0)
    # The step size is frozen after warmup: one value per chain.
    assert np.all(st["step_size"] == st["step_size"][:, :1])
    assert np.all((st["acceptance_rate"] >= 0) & (st["acceptance_rate"] <= 1))
    # Divergences agree with Pyro's own diagnostics.
    for c, mcmc in enumerate(ref.mcmc):
        pyro_div = mcmc.diagnostics()["divergences"]["chain 0"]
        assert sorted(pyro_div) == list(np.flatnonzero(st["diverging"][c]))
    assert ref.num_divergences() == int(st["diverging"].sum())

    # lp is the model's log joint at each draw (no constrained sites here, so
    # no Jacobian). float32 log densities of size ~50: 1e-3 absolute.
    for c in range(2):
        for i in range(0, 300, 23):
            draw = {"w": ref.samples["w"][c, i]}
            assert st["lp"][c, i] == pytest.approx(
                log_joint(linreg, draw, x, y), abs=1e-3
            )

    # energy = -lp + kinetic energy at the draw, and the draw's momentum is
    # N(0, M) under NUTS, so energy + lp ~ chi2_d / 2: >= 0 with mean d/2 = 1.5.
    # Its sd is sqrt(d/2) ~ 1.22; over 600 (autocorrelated) draws a mean within
    # 0.3 of 1.5 is ~ 4 standard errors at an effective size of ~ 250.
    kinetic = st["energy"] + st["lp"]
    assert np.all(kinetic >= -1e-4)
    assert abs(kinetic.mean() - 1.5) < 0.3, kinetic.mean()
    # ArviZ reads the energies (E-BFMI); for this easy posterior it is healthy.
    assert np.all(az.bfmi(st["energy"]) > 0.3)


def test_recording_does_not_change_the_sampler(linreg_data):
    """Plain Pyro NUTS, same seed and settings, gives the same draws; its own
    running acceptance statistic equals the mean of the recorded one."""
    from pyro.infer.autoguide.initialization import init_to_sample
    from pyro.infer.mcmc import MCMC, NUTS

    x, y, _, _ = linreg_data
    ref = run_nuts(
        linreg_learned_noise, x, y, num_samples=30, warmup_steps=30, num_chains=1,
        seed=5, progress=False,
    )
    mean_accept = []
    pyro.set_rng_seed(5)
    mcmc = MCMC(
        NUTS(linreg_learned_noise, init_strategy=init_to_sample),
        num_samples=30, warmup_steps=30, disable_progbar=True,
        hook_fn=lambda kernel, *_: mean_accept.append(kernel._mean_accept_prob),
    )
    mcmc.run(x, y)
    plain = mcmc.get_samples(group_by_chain=True)
    for name in ("w", "sigma"):
        torch.testing.assert_close(ref.samples[name], plain[name], rtol=0, atol=0)
    assert ref.sample_stats["acceptance_rate"].mean() == pytest.approx(
        mean_accept[-1], rel=1e-6  # Pyro sums float32 tensors, we sum floats
    )


# ----------------------------------------------------------------------------
# 4. Argument validation
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 2.5}, "num_samples"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"num_chains": 0}, "num_chains"),
        ({"target_accept_prob": 0.0}, "target_accept_prob"),
        ({"target_accept_prob": 1.0}, "target_accept_prob"),
        ({"target_accept_prob": 1.5}, "target_accept_prob"),
        ({"max_tree_depth": 0}, "max_tree_depth"),
        ({"init_values": {"nope": torch.zeros(3)}}, "init_values"),
        ({"init_values": {"w": torch.zeros(4)}}, "init_values"),
    ],
)
def test_bad_arguments_raise(kwargs, name, linreg_data):
    x, y, _, _ = linreg_data
    with pytest.raises(ValueError, match=name):
        run_nuts(linreg, x, y, progress=False, **kwargs)


# ----------------------------------------------------------------------------
# Seeding, global state, init_values
# ----------------------------------------------------------------------------
def test_seeding_is_per_chain_and_global_rng_is_restored(linreg_data):
    x, y, _, _ = linreg_data
    small = dict(num_samples=5, warmup_steps=5, progress=False)
    torch.manual_seed(42)
    expected_next = torch.rand(3)
    torch.manual_seed(42)
    two = run_nuts(linreg, x, y, num_chains=2, seed=7, **small)
    assert torch.equal(torch.rand(3), expected_next)  # caller's stream untouched
    # Chain c is seeded with seed + c, so chain 1 of seed 7 is chain 0 of seed 8.
    one = run_nuts(linreg, x, y, num_chains=1, seed=8, **small)
    assert torch.equal(two.samples["w"][1], one.samples["w"][0])
    np.testing.assert_array_equal(two.sample_stats["lp"][1], one.sample_stats["lp"][0])


def test_init_values_start_the_chains(linreg_data):
    x, y, _, _ = linreg_data
    far = torch.tensor([30.0, -30.0, 30.0])
    seen = []

    def recording_model(x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(3), PRIOR_SCALE).to_event(1))
        seen.append(w.detach().clone())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)

    ref = run_nuts(
        recording_model, x, y, num_samples=2, warmup_steps=0, num_chains=2,
        max_tree_depth=2, init_values={"w": far}, progress=False,
    )
    # Each chain's initial state is exactly the given value (a prior draw never
    # is), so the model is evaluated there at least once per chain.
    assert sum(bool(torch.equal(v, far)) for v in seen) >= 2
    assert ref.samples["w"].shape == (2, 2, 3)


def test_jit_compile_runs_or_falls_back(linreg_data):
    x, y, _, _ = linreg_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation / fallback
        ref = run_nuts(
            linreg, x, y, num_samples=10, warmup_steps=10, num_chains=1,
            jit_compile=True, progress=False,
        )
    assert ref.settings["jit_compile"] is True
    assert torch.isfinite(ref.samples["w"]).all()
    assert np.isfinite(ref.sample_stats["lp"]).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_jit_failure_falls_back_with_a_warning(linreg_data):
    x, y, _, _ = linreg_data

    def untraceable(x, y=None):
        if torch.jit.is_tracing():
            raise RuntimeError("this model cannot be traced")
        linreg(x, y)

    with pytest.warns(RuntimeWarning, match="jit_compile"):
        ref = run_nuts(
            untraceable, x, y, num_samples=10, warmup_steps=10, num_chains=2,
            jit_compile=True, progress=False,
        )
    assert ref.settings["jit_fallback"] is True
    assert ref.samples["w"].shape == (2, 10, 3)
    assert torch.isfinite(ref.samples["w"]).all()


def test_progress_bar_names_the_chain(linreg_data, capsys):
    x, y, _, _ = linreg_data
    run_nuts(linreg, x, y, num_samples=3, warmup_steps=3, num_chains=2, progress=True)
    err = capsys.readouterr().err
    if "CI" in os.environ or "PYTEST_XDIST_WORKER" in os.environ:
        pytest.skip("Pyro disables its progress bar here")
    assert "chain 2/2" in err


# ----------------------------------------------------------------------------
# 5. A tiny BNN runs
# ----------------------------------------------------------------------------
def test_tiny_bnn_runs():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 20).unsqueeze(-1)
    y = torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(20, generator=g)
    ref = run_nuts(
        bnn, x, y, num_samples=20, warmup_steps=20, num_chains=2, max_tree_depth=5,
        seed=0, progress=False,
    )
    assert ref.samples["w1"].shape == (2, 20, 1, 8)
    assert ref.samples["w2"].shape == (2, 20, 8, 1)
    assert ref.samples["b2"].shape == (2, 20, 1)
    assert np.all(ref.sample_stats["tree_depth"] <= 5)
    assert np.all(ref.sample_stats["n_steps"] <= 2**5 - 1)
    assert np.all(np.isfinite(ref.sample_stats["lp"]))
    # Real-support sites only: lp is the log joint.
    draw = {k: v[1, -1] for k, v in ref.samples.items()}
    assert ref.sample_stats["lp"][1, -1] == pytest.approx(
        log_joint(bnn, draw, x, y), abs=1e-2
    )
