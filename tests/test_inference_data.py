"""Tests of ``pyro_bbb.inference_data.to_inference_data``.

Every number is checked against something computed without it: scipy's normal
log density from the stored draws, a Pyro trace of the model conditioned on a
stored draw, numpy's softmax.  BBB and NUTS runs are short (structure is what is
tested here; accuracy is tested in test_compare.py) and seeded.
"""

from __future__ import annotations

import json
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import pyro.poutine as poutine  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402
from scipy.special import log_softmax, softmax  # noqa: E402

import pyro_bbb as bbb  # noqa: E402
from pyro_bbb.predict import DEFAULT_CHUNK_ROWS  # noqa: E402
from pyro_bbb.hmc import run_nuts  # noqa: E402
from pyro_bbb.inference_data import to_inference_data  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: E402

GROUPS = {
    "posterior",
    "posterior_predictive",
    "log_likelihood",
    "sample_stats",
    "observed_data",
    "constant_data",
    "predictions",
    "predictions_constant_data",
}

# float64 throughout: comparisons against scipy can then be tight (1e-9 relative).
RTOL = 1e-9


# ----------------------------------------------------------------------------
# A small linear regression, fitted once by BBB and once by NUTS
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linreg():
    ds = bbb.datasets.conjugate_linear_regression(
        source="synthetic", n=30, d=2, noise=0.5, prior_scale=1.0, correlation=0.8, seed=1
    )
    pyro.set_rng_seed(0)
    model = bbb.BayesianRegressor(
        torch.nn.Linear(2, 1, bias=False).double(), prior=dist.Normal(0.0, 1.0), noise=ds.noise
    )
    guide = bbb.BBBGuide(model)
    history = bbb.fit(
        model, guide, ds.x, ds.y, epochs=300, lr=0.05, num_particles=4, kl="analytic",
        progress=False, seed=0,
    )
    ref = run_nuts(model, ds.x, ds.y, num_samples=40, warmup_steps=40, num_chains=2, progress=False)
    x_test = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None].repeat(1, 2)
    x_test[:, 1] *= -0.5
    y_test = x_test @ ds.posterior_mean
    kw = dict(x_test=x_test, y_test=y_test)
    vi = to_inference_data(model, guide, ds.x, ds.y, num_samples=60, history=history, seed=3, **kw)
    hmc = to_inference_data(model, ref, ds.x, ds.y, **kw)
    return dict(ds=ds, model=model, guide=guide, history=history, ref=ref, vi=vi, hmc=hmc, **kw)


def _coords(ds):
    return {k: v.values.tolist() for k, v in ds.coords.items() if k not in ("chain", "draw")}


def test_groups_names_dims_and_coords_agree(linreg):
    vi, hmc, model = linreg["vi"], linreg["hmc"], linreg["model"]
    assert set(vi.groups()) == GROUPS and set(hmc.groups()) == GROUPS
    for group in GROUPS - {"sample_stats"}:  # sample_stats differ by design (BBB vs NUTS)
        a, b = vi[group], hmc[group]
        assert list(a.data_vars) == list(b.data_vars), group
        for var in a.data_vars:
            assert a[var].dims == b[var].dims, (group, var)
        assert _coords(a) == _coords(b), group

    n, m = linreg["ds"].x.shape[0], linreg["x_test"].shape[0]
    assert list(vi.posterior.data_vars) == list(model.latent_names) == ["weight"]
    assert vi.posterior["weight"].dims == ("chain", "draw", "weight_dim_0", "weight_dim_1")
    assert vi.posterior["weight"].shape == (1, 60, 1, 2)
    assert hmc.posterior["weight"].shape == (2, 40, 1, 2)
    assert vi.posterior_predictive["y"].dims == ("chain", "draw", "obs")
    assert vi.log_likelihood["y"].dims == ("chain", "draw", "obs")
    assert vi.observed_data["y"].dims == ("obs",) and vi.observed_data.sizes["obs"] == n
    assert vi.constant_data["x"].dims == ("obs", "feature")
    assert set(vi.predictions.data_vars) == {"f", "y", "log_lik"}
    for var in ("f", "y", "log_lik"):
        assert vi.predictions[var].dims == ("chain", "draw", "test")
    assert vi.predictions.sizes["test"] == m
    assert vi.predictions_constant_data["x"].dims == ("test", "feature")
    assert vi.predictions_constant_data["y"].dims == ("test",)
    # Everything is numpy on the host.
    for group in GROUPS:
        for var in vi[group].data_vars:
            assert isinstance(vi[group][var].values, np.ndarray)


def test_attrs_settings_and_sample_stats(linreg):
    vi, hmc, ref, history = linreg["vi"], linreg["hmc"], linreg["ref"], linreg["history"]
    for idata, inference in ((vi, "bbb"), (hmc, "Pyro NUTS")):
        for attrs in (idata.posterior.attrs, idata.attrs):
            assert attrs["inference"] == inference
            assert attrs["task"] == "regression"
            assert attrs["num_hidden_layers"] == 0
            assert isinstance(json.loads(attrs["settings"]), dict)
    assert json.loads(hmc.posterior.attrs["settings"])["num_samples"] == 40
    vi_settings = json.loads(vi.posterior.attrs["settings"])
    assert vi_settings["num_samples"] == 60 and vi_settings["steps"] == 300
    # HMC: every statistic of the reference, unchanged.
    assert set(hmc.sample_stats.data_vars) == set(ref.sample_stats)
    for name, value in ref.sample_stats.items():
        np.testing.assert_array_equal(hmc.sample_stats[name].values, value)
    assert hmc.sample_stats["diverging"].dtype == bool
    # BBB: lp and log_q per draw, the ELBO trace as an attribute.
    assert set(vi.sample_stats.data_vars) == {"lp", "log_q"}
    assert vi.sample_stats["lp"].shape == (1, 60)
    np.testing.assert_array_equal(vi.sample_stats.attrs["elbo"], history.elbo)


def test_arviz_functions_run(linreg):
    vi, hmc = linreg["vi"], linreg["hmc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(hmc)
        assert list(summary.index) == ["weight[0, 0]", "weight[0, 1]"]
        assert np.isfinite(az.summary(vi, kind="stats")["mean"]).all()
        axes = az.plot_forest([vi, hmc], model_names=["BBB", "HMC"])
        assert len(np.atleast_1d(axes)) >= 1
        az.plot_ppc(hmc)
        az.plot_ppc(vi)
        loo = az.loo(hmc, pointwise=True)
    plt.close("all")
    assert np.isfinite(loo.elpd_loo) and loo.pareto_k.shape == (linreg["ds"].x.shape[0],)


def _normal_ll(w, x, y, noise):
    """log N(y | x w, noise) for every draw: w (S, d), x (n, d) -> (S, n)."""
    return stats.norm.logpdf(y[None, :], loc=w @ x.T, scale=noise)


@pytest.mark.parametrize("which", ["vi", "hmc"])
def test_log_likelihood_and_outputs_match_scipy(linreg, which):
    idata, ds = linreg[which], linreg["ds"]
    w = idata.posterior["weight"].values  # (C, D, 1, d)
    chains, draws = w.shape[:2]
    w = w.reshape(chains * draws, -1)
    x, y = ds.x.numpy(), ds.y.numpy()
    expected = _normal_ll(w, x, y, ds.noise)
    got = idata.log_likelihood["y"].values.reshape(chains * draws, -1)
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    xt, yt = linreg["x_test"].numpy(), linreg["y_test"].numpy()
    f = idata.predictions["f"].values.reshape(chains * draws, -1)
    np.testing.assert_allclose(f, w @ xt.T, rtol=RTOL, atol=1e-12)
    ll = idata.predictions["log_lik"].values.reshape(chains * draws, -1)
    np.testing.assert_allclose(ll, _normal_ll(w, xt, yt, ds.noise), rtol=RTOL)
    np.testing.assert_array_equal(idata.constant_data["x"].values, x)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y)
    np.testing.assert_array_equal(idata.predictions_constant_data["x"].values, xt)
    # Predictive draws: y = f + noise * eps; with 2 * 30 * 40 >= 2400 draws the pooled
    # standardized residuals have std 1 within 4 standard errors (SE ~ 1/sqrt(2N)).
    yrep = idata.posterior_predictive["y"].values.reshape(chains * draws, -1)
    z = (yrep - w @ x.T) / ds.noise
    assert abs(z.std() - 1) < 4 / np.sqrt(2 * z.size)
    assert abs(z.mean()) < 4 / np.sqrt(z.size)


def test_vi_lp_is_the_pyro_log_joint_and_log_q_the_guide_density(linreg):
    vi, ds, model, guide = linreg["vi"], linreg["ds"], linreg["model"], linreg["guide"]
    loc = guide.median()["weight"].numpy()
    scale = guide.scales()["weight"].numpy()
    for i in (0, 17, 59):
        w = vi.posterior["weight"].values[0, i]
        draw = {"weight": torch.as_tensor(w)}
        trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(ds.x, ds.y)
        lp = trace.log_prob_sum().item()
        assert vi.sample_stats["lp"].values[0, i] == pytest.approx(lp, rel=RTOL)
        log_q = stats.norm.logpdf(w, loc, scale).sum()
        assert vi.sample_stats["log_q"].values[0, i] == pytest.approx(log_q, rel=1e-9)


def test_seed_reproducible_and_leaves_global_rng_alone(linreg):
    ds, model, guide = linreg["ds"], linreg["model"], linreg["guide"]
    state = torch.get_rng_state()
    a = to_inference_data(model, guide, ds.x, ds.y, num_samples=20, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    b = to_inference_data(model, guide, ds.x, ds.y, num_samples=20, seed=11)
    c = to_inference_data(model, guide, ds.x, ds.y, num_samples=20, seed=12)
    np.testing.assert_array_equal(a.posterior["weight"], b.posterior["weight"])
    np.testing.assert_array_equal(a.posterior_predictive["y"], b.posterior_predictive["y"])
    assert not np.array_equal(a.posterior["weight"], c.posterior["weight"])


def test_chunks_bound_the_forward_pass_and_do_not_change_results(linreg, monkeypatch):
    ds, model, guide = linreg["ds"], linreg["model"], linreg["guide"]
    seen = []
    original = type(model).output

    def spy(self, latents, x):
        seen.append((next(iter(latents.values())).shape[0], x.shape[0]))
        return original(self, latents, x)

    monkeypatch.setattr(type(model), "output", spy)
    x_big = torch.randn(10_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    small = to_inference_data(model, guide, ds.x, ds.y, x_test=x_big, num_samples=1000, seed=5)
    # Default chunk: DEFAULT_CHUNK_ROWS rows of draws x inputs per forward pass.
    assert max(s * n for s, n in seen) <= DEFAULT_CHUNK_ROWS
    assert small.predictions["f"].shape == (1, 1000, 10_000)
    seen.clear()
    chunked = to_inference_data(model, guide, ds.x, ds.y, x_test=x_big[:50], num_samples=30, seed=5, chunk_size=7)
    assert max(s for s, _ in seen) <= 7
    whole = to_inference_data(model, guide, ds.x, ds.y, x_test=x_big[:50], num_samples=30, seed=5, chunk_size=30)
    # Same draws (same seed), so the deterministic quantities agree exactly.
    np.testing.assert_array_equal(chunked.posterior["weight"], whole.posterior["weight"])
    np.testing.assert_allclose(chunked.predictions["f"], whole.predictions["f"], rtol=1e-12)
    np.testing.assert_allclose(chunked.log_likelihood["y"], whole.log_likelihood["y"], rtol=1e-12)
    np.testing.assert_allclose(chunked.sample_stats["lp"], whole.sample_stats["lp"], rtol=1e-12)


# ----------------------------------------------------------------------------
# Other model kinds
# ----------------------------------------------------------------------------
def _fitted(model, x, y, epochs=5):
    guide = bbb.BBBGuide(model)
    bbb.fit(model, guide, x, y, epochs=epochs, progress=False, seed=0)
    return guide


def test_classifier_probabilities_and_log_likelihood():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(25, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (25,), generator=gen)
    model = bbb.BayesianClassifier(torch.nn.Linear(2, 3).double(), prior=dist.Normal(0.0, 1.0))
    guide = _fitted(model, x, y)
    x_test, y_test = x[:6] + 0.5, y[:6]
    idata = to_inference_data(model, guide, x, y, x_test=x_test, y_test=y_test, num_samples=40, seed=0)
    pred = idata.predictions
    assert pred["f"].dims == ("chain", "draw", "test", "class")
    assert pred["prob"].dims == ("chain", "draw", "test", "class")
    assert pred["prob"].sizes["class"] == 3
    prob = pred["prob"].values
    np.testing.assert_allclose(prob.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(prob, softmax(pred["f"].values, -1), rtol=1e-10)
    assert pred["y"].dtype.kind == "i" and set(np.unique(pred["y"])) <= {0, 1, 2}
    logits = pred["f"].values
    expected = np.take_along_axis(log_softmax(logits, -1), y_test.numpy()[None, None, :, None], -1)[..., 0]
    np.testing.assert_allclose(pred["log_lik"].values, expected, rtol=1e-10)
    assert idata.observed_data["y"].dtype.kind == "i"
    assert idata.posterior.attrs["task"] == "classification"


def test_binary_classifier_has_two_class_probabilities():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = bbb.BayesianClassifier(torch.nn.Linear(3, 1).double(), prior=dist.Normal(0.0, 1.0))
    guide = _fitted(model, x, y)
    idata = to_inference_data(model, guide, x, y, x_test=x[:4], y_test=y[:4], num_samples=30, seed=0)
    pred = idata.predictions
    assert pred["f"].dims == ("chain", "draw", "test")  # the logit of class 1
    assert pred["prob"].shape == (1, 30, 4, 2)
    p1 = 1 / (1 + np.exp(-pred["f"].values))
    np.testing.assert_allclose(pred["prob"].values[..., 1], p1, rtol=1e-10)
    np.testing.assert_allclose(pred["prob"].values.sum(-1), 1.0, rtol=1e-12)
    yt = y[:4].numpy()
    expected = yt * np.log(p1) + (1 - yt) * np.log1p(-p1)
    np.testing.assert_allclose(pred["log_lik"].values, expected, rtol=1e-8)


def test_multi_output_regression_dims_and_log_likelihood():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(15, 2, generator=gen, dtype=torch.float64)
    y = torch.stack([x.sum(1), x[:, 0] - x[:, 1]], 1)
    model = bbb.BayesianRegressor(torch.nn.Linear(2, 2).double(), prior=dist.Normal(0.0, 1.0), noise=0.3)
    guide = _fitted(model, x, y)
    idata = to_inference_data(model, guide, x, y, x_test=x[:3], y_test=y[:3], num_samples=25, seed=0)
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs", "output")
    assert idata.observed_data["y"].dims == ("obs", "output")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    assert idata.predictions["f"].dims == ("chain", "draw", "test", "output")
    assert idata.predictions_constant_data["y"].dims == ("test", "output")
    assert set(idata.posterior.data_vars) == {"weight", "bias"}
    w = idata.posterior["weight"].values[0]  # (S, 2, 2)
    b = idata.posterior["bias"].values[0]  # (S, 2)
    f = np.einsum("nd,sod->sno", x.numpy(), w) + b[:, None, :]
    expected = stats.norm.logpdf(y.numpy()[None], f, 0.3).sum(-1)
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected, rtol=RTOL)


def test_learned_noise_site_and_lp():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 1, generator=gen, dtype=torch.float64)
    y = 2 * x[:, 0] + 0.3 * torch.randn(20, generator=gen, dtype=torch.float64)
    model = bbb.BayesianRegressor(torch.nn.Linear(1, 1).double(), prior=dist.Normal(0.0, 1.0), noise="learned")
    guide = _fitted(model, x, y, epochs=50)
    idata = to_inference_data(model, guide, x, y, num_samples=20, seed=0)
    assert "predictions" not in idata.groups()
    assert idata.posterior["noise"].dims == ("chain", "draw")
    noise = idata.posterior["noise"].values[0]
    assert (noise > 0).all()
    w = idata.posterior["weight"].values[0, :, 0, 0]
    b = idata.posterior["bias"].values[0, :, 0]
    expected = stats.norm.logpdf(y.numpy()[None], w[:, None] * x.numpy()[None, :, 0] + b[:, None], noise[:, None])
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected, rtol=RTOL)
    i = 4
    draw = {k: torch.as_tensor(idata.posterior[k].values[0, i]) for k in model.latent_names}
    trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(x, y)
    assert idata.sample_stats["lp"].values[0, i] == pytest.approx(trace.log_prob_sum().item(), rel=RTOL)


def test_float32_model_and_netcdf_roundtrip(linreg, tmp_path):
    x, y = linreg["ds"].x.float(), linreg["ds"].y.float()
    model = bbb.BayesianRegressor(torch.nn.Linear(2, 1), prior=dist.Normal(0.0, 1.0), noise=0.5)
    guide = _fitted(model, x, y)
    history = bbb.fit(model, guide, x, y, epochs=3, progress=False, seed=0)
    idata = to_inference_data(model, guide, x.double(), y.double(), x_test=x[:3], num_samples=10, history=history)
    assert idata.posterior["weight"].dtype == np.float32  # the model's dtype
    pytest.importorskip("h5netcdf")
    path = tmp_path / "vi.nc"
    idata.to_netcdf(path, engine="h5netcdf")
    back = az.from_netcdf(path, engine="h5netcdf")
    assert set(back.groups()) == set(idata.groups())
    np.testing.assert_array_equal(back.sample_stats.attrs["elbo"], history.elbo)
    assert back.posterior.attrs["inference"] == "bbb"


@pytest.mark.cuda
def test_model_on_cuda_gives_host_numpy(linreg):
    ds = linreg["ds"]
    model = bbb.BayesianRegressor(
        torch.nn.Linear(2, 1, bias=False).double(), prior=dist.Normal(0.0, 1.0), noise=ds.noise
    )
    guide = bbb.BBBGuide(model)
    bbb.fit(model, guide, ds.x, ds.y, epochs=50, lr=0.05, device="cuda", progress=False, seed=0)
    kw = dict(x_test=linreg["x_test"], y_test=linreg["y_test"])
    vi = to_inference_data(model, guide, ds.x, ds.y, num_samples=50, seed=0, **kw)
    for group in GROUPS:
        for var in vi[group].data_vars:
            assert isinstance(vi[group][var].values, np.ndarray)
    w = vi.posterior["weight"].values.reshape(50, -1)
    expected = _normal_ll(w, ds.x.numpy(), ds.y.numpy(), ds.noise)
    np.testing.assert_allclose(vi.log_likelihood["y"].values[0], expected, rtol=1e-9)
    # The CPU reference's draws, evaluated by the CUDA model: the same numbers (float64).
    hmc = to_inference_data(model, linreg["ref"], ds.x, ds.y, **kw)
    np.testing.assert_allclose(hmc.log_likelihood["y"], linreg["hmc"].log_likelihood["y"], rtol=1e-9)
    np.testing.assert_allclose(hmc.predictions["f"], linreg["hmc"].predictions["f"], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(posterior=object()), "posterior"),
        (dict(model=object()), "model"),
        (dict(num_samples=0), "num_samples"),
        (dict(chunk_size=-1), "chunk_size"),
        (dict(seed=-3), "seed"),
        (dict(history=[1.0]), "history"),
        (dict(y=torch.zeros(5)), "same number of rows"),
        (dict(y_test=torch.zeros(3)), "y_test"),
        (dict(x_test=torch.zeros(4, 3)), "x_test"),
        (dict(x_test=torch.zeros(4, 2), y_test=torch.zeros(3)), "same number of rows"),
        (dict(x=torch.full((30, 2), float("nan"))), "NaN"),
    ],
)
def test_invalid_arguments_raise_value_error(linreg, change, match):
    kwargs = dict(model=linreg["model"], posterior=linreg["guide"], x=linreg["ds"].x, y=linreg["ds"].y)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        to_inference_data(**kwargs)


def test_unfitted_guide_is_rejected():
    model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="posterior"):
        to_inference_data(model, bbb.BBBGuide(model), torch.zeros(3, 1), torch.zeros(3))
