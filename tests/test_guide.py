"""BBBGuide as a drop-in for Pyro's AutoNormal: subsampled local latents, Pyro's
support errors, AutoNormal's names, pickling, and guides that own their parameters."""

import copy
import gc
import io
import math
import pickle
from operator import attrgetter

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import biject_to
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_mean
from pyro.infer.reparam import ProjectedNormalReparam
from pyro.optim import Adam, ClippedAdam
from torch import nn

import pyro_bbb as bbb
from pyro_bbb import BayesianRegressor, BBBGuide


# -- local latents in a subsampled plate ---------------------------------------------------------
N_DATA, BATCH = 50, 20


def local_latent_model(x):
    with pyro.plate("batch", len(x), subsample_size=BATCH):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=pyro.subsample(x, event_dim=0))


def batch_plate(x):
    return pyro.plate("batch", len(x), subsample_size=BATCH)


@pytest.mark.parametrize("create_plates", [None, batch_plate], ids=["own-plates", "create_plates"])
def test_subsampled_local_latents_reach_the_closed_form_posterior(create_plates):
    """z_i ~ N(0, 1), x_i ~ N(z_i, 1): the posterior of z_i is N(x_i / 2, 1/2), and it is
    mean-field, so the ELBO's optimum is exact.  Each step sees 20 of the 50 points; the
    per-datum mu must line up with the batch's x_i (the plate's indices)."""
    pyro.set_rng_seed(0)
    x = 2.0 * torch.randn(N_DATA)
    guide = BBBGuide(local_latent_model, init_scale=0.5, create_plates=create_plates)
    trace = poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["value"].shape == (BATCH,)
    assert guide.locs.z.shape == guide.scales.z.shape == (N_DATA,)
    # 300 steps, the learning rate decayed 0.1 -> 0.005, 32 particles: each point is in
    # ~120 batches.  Seeds 0-2 end within 0.066 (mu) and 0.063 (sigma) of the posterior at
    # every point; untrained, mu is 0 (off by |x_i| / 2, up to 2) and sigma 0.5 (off by 0.21).
    steps = 300
    elbo = TraceMeanField_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(local_latent_model, guide, ClippedAdam({"lr": 0.1, "lrd": 0.05 ** (1 / steps)}), elbo)
    for _ in range(steps):
        svi.step(x)
    with torch.no_grad():
        assert (guide.locs.z - x / 2).abs().max() < 0.1
        assert (guide.scales.z - math.sqrt(0.5)).abs().max() < 0.1
    torch.testing.assert_close(guide.median()["z"], guide.locs.z.detach())


# -- pickling ------------------------------------------------------------------------------------
def _local_model():
    def model(y=None):  # a local function: pickle cannot save it
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Normal(w.sum(-1, keepdim=True), s), obs=y)

    return model


def _reload(guide, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(guide))
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_guide_of_a_local_function_model_round_trips(how):
    model = _local_model()
    guide = BBBGuide(model, init_scale=0.2, init_loc=lambda site: init_to_mean(site))  # local too
    y = torch.randn(4)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(y)
    loaded = _reload(guide, how)
    for name, value in guide.median().items():
        torch.testing.assert_close(loaded.median()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(loaded.quantiles([0.1, 0.9])["s"], guide.quantiles([0.1, 0.9])["s"])
    assert loaded.model is None  # the model is not saved, as in Pyro's AutoGuides
    assert guide.model is not None  # and the original keeps it
    assert loaded(y)["w"].shape == (3,)
    SVI(model, loaded, Adam({"lr": 0.05}), Trace_ELBO()).step(y)  # trains on


def test_bayesian_regressor_guide_round_trips_with_torch_save():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    model = BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise="learned")
    guide = BBBGuide(model)
    x, y = torch.randn(16, 2), torch.randn(16)
    bbb.fit(model, guide, x, y, epochs=2, progress=False, seed=0)
    loaded = _reload(guide, "torch.save")
    medians = guide.median()
    assert set(loaded.median()) == set(medians) and "noise" in medians
    for name, value in medians.items():
        torch.testing.assert_close(loaded.median()[name], value, rtol=0, atol=0)
    assert guide.model is not None
    pred = bbb.predict(model, loaded, x, num_samples=5)
    assert pred.f.shape == (5, 16)


def test_guide_saved_before_it_ran_says_so():
    loaded = _reload(BBBGuide(_local_model()), "pickle")
    with pytest.raises(RuntimeError, match="saved before it was ever run"):
        loaded()


# -- Pyro's helpful errors -------------------------------------------------------------------
def _message(guide_class, model):
    with pytest.raises(ValueError) as err:
        guide_class(model)()
    return str(err.value).splitlines()[0]  # Pyro may append the trace's shapes


def test_spherical_site_points_to_the_reparameterizer_as_pyro_does():
    def model():
        pyro.sample("direction", dist.ProjectedNormal(torch.ones(3)))

    message = _message(BBBGuide, model)
    assert message == _message(AutoNormal, model)
    assert "ProjectedNormalReparam" in message
    # the advice works
    reparam = poutine.reparam(model, config={"direction": ProjectedNormalReparam()})
    assert set(BBBGuide(reparam)()) == {"direction_normal"}


@pytest.mark.parametrize(
    "site", [dist.Bernoulli(0.3), dist.Poisson(2.0)], ids=["enumerable", "not-enumerable"]
)
def test_discrete_site_points_to_enumeration_as_pyro_does(site):
    def model():
        pyro.sample("k", site)

    message = _message(BBBGuide, model)
    assert "https://pyro.ai/examples/enumeration.html" in message
    assert "guide = BBBGuide(poutine.block(model, hide=['k']))" in message
    if site.has_enumerate_support:  # AutoNormal gives its message for this one
        assert message == _message(AutoNormal, model).replace("AutoNormal", "BBBGuide")


# -- AutoNormal's conventions ----------------------------------------------------------------
def _many_supports_model():
    pyro.sample("w", dist.Normal(torch.tensor([0.5, -1.0, 2.0]), 1.0).to_event(1))
    pyro.sample("layer.bias", dist.Normal(3.0, 2.0).expand([2]).to_event(1))  # a nested name
    pyro.sample("noise", dist.LogNormal(0.3, 0.5))
    pyro.sample("p", dist.Beta(2.0, 5.0))


def _both_guides(**kwargs):
    guide = BBBGuide(_many_supports_model, init_scale=0.2, **kwargs)
    auto = AutoNormal(_many_supports_model, init_loc_fn=init_to_mean, init_scale=0.2)
    guide(), auto()
    return guide, auto


SITES = ["w", "layer.bias", "noise", "p"]


@pytest.mark.parametrize("keyword", ["init_loc_fn", "init_loc"])
def test_init_loc_fn_locs_scales_and_quantiles_match_autonormal(keyword):
    guide, auto = _both_guides(**{keyword: init_to_mean})
    assert guide.init_loc_fn is init_to_mean
    for name in SITES:
        torch.testing.assert_close(attrgetter(name)(guide.locs), attrgetter(name)(auto.locs))
        torch.testing.assert_close(attrgetter(name)(guide.scales), attrgetter(name)(auto.scales))
    quantiles = [0.1, 0.9]
    for mine, pyros in [(guide.median(), auto.median()), (guide.quantiles(quantiles), auto.quantiles(quantiles))]:
        for name in SITES:
            torch.testing.assert_close(mine[name], pyros[name])


def test_init_loc_fn_and_its_alias_together_are_refused():
    with pytest.raises(ValueError, match="init_loc is another name of init_loc_fn: give one"):
        BBBGuide(_many_supports_model, init_loc_fn=init_to_mean, init_loc=0.0)


def test_scales_are_softplus_rho_with_gradients_and_as_a_dict():
    guide = BBBGuide(_many_supports_model)
    guide()
    with torch.no_grad():
        guide.rho.w.copy_(torch.tensor([-3.0, 0.0, 2.0]))
    torch.testing.assert_close(guide.scales.w, F.softplus(torch.tensor([-3.0, 0.0, 2.0])))
    guide.scales.w.sum().backward()  # as AutoNormal's scales, sigma leads back to rho
    torch.testing.assert_close(guide.rho.w.grad, torch.sigmoid(torch.tensor([-3.0, 0.0, 2.0])))
    assert guide.scales["layer.bias"] is not None
    torch.testing.assert_close(guide.scales["layer.bias"], attrgetter("layer.bias")(guide.scales))
    as_dict = guide.scales()
    assert list(as_dict) == SITES and not as_dict["w"].requires_grad
    torch.testing.assert_close(as_dict["w"], guide.scales.w.detach())
    assert guide.locs is guide.loc
    with pytest.raises(AttributeError, match="not a site"):
        guide.scales.nothing


def test_get_posterior_without_a_name_gives_every_site_with_autonormals_density():
    guide, auto = _both_guides(init_loc_fn=init_to_mean)
    posterior = guide.get_posterior()
    assert list(posterior) == SITES
    assert list(guide.get_posterior(torch.zeros(1))) == SITES  # Pyro's form: the model's arguments
    draws = poutine.trace(auto).get_trace()
    for name in SITES:
        prior = auto.prototype_trace.nodes[name]["fn"]
        loc, scale = attrgetter(name)(auto.locs), attrgetter(name)(auto.scales)
        reference = dist.TransformedDistribution(  # the q that AutoNormal draws from
            dist.Normal(loc, scale).to_event(prior.event_dim), biject_to(prior.support)
        )
        value = draws.nodes[name]["value"].detach()
        torch.testing.assert_close(posterior[name].log_prob(value), reference.log_prob(value))
        torch.testing.assert_close(
            posterior[name].log_prob(value), guide.get_posterior(name).log_prob(value)
        )


# -- every guide owns its parameters ---------------------------------------------------------------
def _regression_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def _svi_steps(guide, x, y, steps=5):
    svi = SVI(_regression_model, guide, Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)


@pytest.mark.parametrize("how", ["torch.save", "pickle", "deepcopy"])
def test_a_copy_owns_its_parameters_under_svi(how):
    torch.manual_seed(0)
    x, y = torch.randn(20, 2), torch.randn(20)
    original = BBBGuide(_regression_model, init_scale=0.2)
    _svi_steps(original, x, y, steps=2)
    twin = copy.deepcopy(original) if how == "deepcopy" else _reload(original, how)
    before_original = original.loc.w.detach().clone()
    before_twin = twin.loc.w.detach().clone()
    torch.testing.assert_close(before_twin, before_original, rtol=0, atol=0)

    _svi_steps(twin, x, y)
    assert not torch.equal(twin.loc.w.detach(), before_twin)
    assert torch.equal(original.loc.w.detach(), before_original)

    after_twin = twin.loc.w.detach().clone()
    _svi_steps(original, x, y)  # and the other way round
    assert not torch.equal(original.loc.w.detach(), before_original)
    assert torch.equal(twin.loc.w.detach(), after_twin)


def test_param_store_entries_leave_with_their_guide():
    x, y = torch.randn(20, 2), torch.randn(20)
    first, second = BBBGuide(_regression_model), BBBGuide(_regression_model)
    _svi_steps(first, x, y, steps=1)
    _svi_steps(second, x, y, steps=1)
    store = pyro.get_param_store()
    keys = set(store.keys())
    assert len(keys) == 4  # loc and rho of each guide, under distinct names
    second_keys = {k for k in keys if store[k] is second.loc.w or store[k] is second.rho.w}
    assert len(second_keys) == 2
    del second
    gc.collect()
    assert set(store.keys()) == keys - second_keys


# -- load_state_dict --------------------------------------------------------------------------
def test_load_state_dict_into_a_guide_that_never_ran_says_what_to_do():
    x, y = torch.randn(20, 2), torch.randn(20)
    trained = BBBGuide(_regression_model)
    _svi_steps(trained, x, y)
    fresh = BBBGuide(_regression_model)
    with pytest.raises(RuntimeError, match=r"run the guide once, e\.g\. guide\(x, y\)"):
        fresh.load_state_dict(trained.state_dict())
    fresh(x, y)
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.median()["w"], trained.median()["w"], rtol=0, atol=0)


def test_fit_leaves_the_models_initial_values_as_they_were():
    # The guide starts at the network's own values; training must move a copy of them, or a
    # second guide on the same model would start where the first one stopped.
    import pyro_bbb as bbb

    x, y = bbb.datasets.regression_curve(30, seed=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
    before = {k: v.clone() for k, v in model.initial_values().items()}
    guide = bbb.BBBGuide(model)
    bbb.fit(model, guide, x, y, epochs=20, lr=0.05, seed=0, progress=False)
    assert any(not torch.equal(guide.locs.get_parameter(k), before[k]) for k in before)  # it trained
    for name, value in model.initial_values().items():
        assert torch.equal(value, before[name]), name
