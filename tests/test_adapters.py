"""Tests of ``pyro_bbb.predict.as_draws``: every kind of posterior against draws made by hand."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

import pyro_bbb as bbb
from pyro_bbb.inference_data import to_inference_data
from pyro_bbb.predict import as_draws

X = torch.linspace(-1, 1, 8)[:, None].repeat(1, 2)
Y = X[:, 0] - 0.5 * X[:, 1]


def _model():
    pyro.clear_param_store()
    return bbb.BayesianRegressor(torch.nn.Linear(2, 1), prior=dist.Normal(0.0, 1.0), noise=0.3)


def test_autonormal_draws_match_hand_set_locs_and_scales():
    model = _model()
    guide = AutoNormal(model)
    guide(X, Y)
    # Assignment (not copy_): a PyroParam with a constraint stores its unconstrained value.
    guide.locs.weight = torch.tensor([[1.0, -2.0]])
    guide.scales.weight = torch.tensor([[0.5, 0.1]])
    d = as_draws(guide, model, X, Y, num_samples=4000, seed=0)
    w = d.values["weight"]
    assert d.kind == "variational" and d.inference == "AutoNormal" and w.shape == (1, 4000, 1, 2)
    # 4000 draws: the standard error of a mean is scale / 63, of a std scale / 89;
    # 5 standard errors never fail by chance at this seed and catch a wrong scale.
    torch.testing.assert_close(w[0].mean(0), torch.tensor([[1.0, -2.0]]), atol=5 * 0.5 / 63, rtol=0)
    torch.testing.assert_close(w[0].std(0), torch.tensor([[0.5, 0.1]]), atol=0, rtol=5 / 89)
    # log q is the product of the two normal densities (bias sits at its own loc/scale).
    q = dist.Normal(guide.locs.bias, guide.scales.bias).log_prob(d.values["bias"][0]).sum(-1)
    q = q + dist.Normal(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.1]])).log_prob(w[0]).sum((-1, -2))
    torch.testing.assert_close(d.log_q[0], q.detach())


@pytest.mark.parametrize("cls", [AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal,
                                 AutoIAFNormal, "laplace"])
def test_autoguides_give_the_model_sites_and_the_same_inference_data_as_bbb(cls):
    model = _model()
    if cls == "laplace":
        guide = AutoLaplaceApproximation(model)
        guide(X, Y)
        guide = guide.laplace_approximation(X, Y)
    else:
        guide = cls(model, hidden_dim=[4]) if cls is AutoIAFNormal else cls(model)
    d = as_draws(guide, model, X, Y, num_samples=30, seed=1)
    assert set(d.values) == set(model.latent_names)
    for name, shape in model.network.site_shapes.items():
        assert d.values[name].shape == (1, 30) + tuple(shape)
        assert torch.isfinite(d.values[name]).all()
    assert d.log_q.shape == (1, 30) and torch.isfinite(d.log_q).all()
    idata = to_inference_data(model, guide, X, Y, x_test=X[:3], num_samples=30, seed=1)
    bbb_guide = bbb.BBBGuide(model)
    bbb_guide(X, Y)
    ref = to_inference_data(model, bbb_guide, X, Y, x_test=X[:3], num_samples=30, seed=1)
    assert set(idata.groups()) == set(ref.groups())
    for group in ("posterior", "posterior_predictive", "log_likelihood", "predictions", "sample_stats"):
        assert list(idata[group].data_vars) == list(ref[group].data_vars), group
        for var in idata[group].data_vars:
            assert idata[group][var].dims == ref[group][var].dims, (group, var)
    assert idata.attrs["posterior_kind"] == "variational"
    assert idata.attrs["posterior_type"] == type(guide).__name__


def test_mcmc_keeps_its_chains_and_values():
    model = _model()
    mcmc = MCMC(NUTS(model), num_samples=15, warmup_steps=15, num_chains=2, disable_progbar=True)
    pyro.set_rng_seed(0)
    mcmc.run(X, Y)
    d = as_draws(mcmc, model)
    expected = mcmc.get_samples(group_by_chain=True)
    assert d.kind == "sampler" and d.num_chains == 2 and d.num_draws == 15
    for name, value in expected.items():
        assert torch.equal(d.values[name], value)
    idata = to_inference_data(model, mcmc, X, Y)
    assert idata.posterior.sizes["chain"] == 2
    assert torch.equal(torch.as_tensor(idata.posterior["weight"].values), expected["weight"])
    assert idata.attrs["posterior_kind"] == "sampler" and idata.attrs["inference"] == "Pyro NUTS"
    assert idata.sample_stats["diverging"].shape == (2, 15)


def _dict(model, chains=2, draws=5):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn((chains, draws) + tuple(s), generator=g) for n, s in model.network.site_shapes.items()}


def test_dict_of_draws_is_stored_exactly():
    model = _model()
    draws = _dict(model)
    idata = to_inference_data(model, draws, X, Y)
    for name, value in draws.items():
        assert torch.equal(torch.as_tensor(idata.posterior[name].values), value)
    assert idata.attrs["posterior_kind"] == "draws"
    assert to_inference_data(model, as_draws(draws, kind="sampler").values, X, Y).attrs["posterior_kind"] == "draws"
    assert as_draws(draws, kind="sampler").kind == "sampler"


@pytest.mark.parametrize("spoil, match", [
    (lambda d: d.pop("bias"), "'bias'"),
    (lambda d: d.__setitem__("bias", torch.zeros(2, 5, 3)), "'bias'"),
    (lambda d: d.__setitem__("bias", torch.zeros(2, 4, 1)), "'bias'"),
    (lambda d: d["weight"].__setitem__((0, 0, 0, 0), math.nan), "'weight'"),
])
def test_bad_dicts_name_the_site(spoil, match):
    model = _model()
    draws = _dict(model)
    spoil(draws)
    with pytest.raises(ValueError, match=match):
        as_draws(draws, model)
    with pytest.raises(ValueError, match=match):
        to_inference_data(model, draws, X, Y)
