"""Tests of pyro_bbb.schemes against exact posteriors and hand-computed forwards."""

import functools
import math

import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import pytest
import torch
from torch.nn import functional as F

import pyro_bbb as bbb
from pyro_bbb import schemes
from pyro_bbb.hmc.potential import Potential

F64 = torch.float64


# ---------------------------------------------------------------- helpers
def conjugate():
    # n=20, d=2, noise 1, correlated features: posterior sds ~0.35, correlation -0.78, so
    # a mean-field answer (correlation 0, sds x0.62) is far from the exact one.
    return bbb.datasets.conjugate_linear_regression(n=20, d=2, noise=1.0, correlation=0.8, seed=0)


def conjugate_model(ref):
    # No hidden layer, no bias, known noise, N(0, 1) prior: exactly the conjugate model.
    torch.manual_seed(0)
    net = torch.nn.Linear(ref.x.shape[1], 1, bias=False).to(F64)
    return bbb.BayesianRegressor(net, prior=dist.Normal(torch.tensor(0.0, dtype=F64), 1.0),
                                 noise=ref.noise)


def small_bnn(noise="learned", hidden=8, seed=0, prior=None):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
    prior = prior or bbb.ScaleMixtureNormal(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))
    return bbb.BayesianRegressor(net, prior=prior, noise=noise)


def bnn_data(n=30):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=gen)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=gen)


def latent_shapes_of_model(model, x, y):
    """The reference: the latent sample sites of a Pyro trace of the model itself."""
    trace = poutine.trace(model).get_trace(x, y)
    return {n: s["value"].shape for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}


def latent_shapes_of(posterior, x, y):
    if isinstance(posterior, dict):
        leads = {v.shape[:2] for v in posterior.values()}
        assert len(leads) == 1 and next(iter(leads))[0] == 1  # one chain, same draws
        return {n: v.shape[2:] for n, v in posterior.items()}
    trace = poutine.trace(posterior).get_trace(x, y)
    return {n: s["value"].shape for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
            and not s["infer"].get("is_auxiliary")}


def check_sites(posterior, model, x, y):
    expected = latent_shapes_of_model(model, x, y)
    got = latent_shapes_of(posterior, x, y)
    assert got == expected
    assert set(expected) == set(model.latent_names)


# ---------------------------------------------------------------- Laplace
def test_laplace_equals_the_exact_gaussian_posterior():
    ref = conjugate()
    guide = schemes.laplace(conjugate_model(ref), ref.x, ref.y, epochs=300, lr=0.05, progress=False)
    post = guide.get_posterior()
    # The log joint is quadratic: its Hessian is the posterior precision anywhere, so the
    # covariance is exact to round-off; the mean is the MAP, to Adam's convergence
    # (measured 2.5e-4 posterior sds after 300 steps; 1e-3 sds leaves room).
    torch.testing.assert_close(post.covariance_matrix, ref.posterior_cov, rtol=1e-8, atol=1e-12)
    assert ((post.loc - ref.posterior_mean) / ref.exact_std).abs().max() < 1e-3


def test_laplace_at_a_saddle_point_raises_a_clear_error():
    # A 1-2-1 tanh network with all weights 0, left there (one step of lr 1e-8): at zero
    # weights the curvature in (W1, W2) has cross terms sum(x y) / noise^2 ~ 700 against
    # diagonal prior terms of 1 -- an indefinite Hessian, no Gaussian's precision.
    net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
    x = torch.linspace(-1, 1, 20)[:, None]
    with pytest.raises(ValueError, match="not positive definite.*epochs"):
        schemes.laplace(model, x, x[:, 0], epochs=1, lr=1e-8, progress=False)


def test_laplace_jitter_adds_to_the_precision():
    ref = conjugate()
    jitter = 2.5
    guide = schemes.laplace(conjugate_model(ref), ref.x, ref.y, epochs=300, lr=0.05,
                            jitter=jitter, progress=False)
    post = guide.get_posterior()
    # Exact: the covariance is (Lambda + jitter I)^-1 with Lambda the posterior precision;
    # the mean is still the MAP (to Adam's convergence, as above).
    expected = torch.linalg.inv(ref.precision + jitter * torch.eye(2, dtype=F64))
    torch.testing.assert_close(post.covariance_matrix, expected, rtol=1e-8, atol=1e-12)
    assert ((post.loc - ref.posterior_mean) / ref.exact_std).abs().max() < 1e-3
    check_sites(guide, conjugate_model(ref), ref.x, ref.y)


def test_laplace_jitter_makes_a_saddle_point_usable():
    # The saddle above: cross terms ~700, so a jitter of 1e3 makes H + jitter I positive
    # definite, and the Gaussian's precision is exactly that.
    net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    for p in net.parameters():
        torch.nn.init.zeros_(p)
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
    x = torch.linspace(-1, 1, 20)[:, None]
    guide = schemes.laplace(model, x, x[:, 0], epochs=1, lr=1e-8, jitter=1e3, progress=False)
    precision = torch.linalg.inv(guide.get_posterior().covariance_matrix.double())
    assert torch.linalg.eigvalsh(precision).min() > 0
    # The curvature of the negative log joint at the (near-zero) point, plus the jitter.
    potential = Potential(model, x, x[:, 0])
    u = potential.flatten({n: v.unsqueeze(0) for n, v in model.initial_values().items()})[0]
    h = torch.autograd.functional.hessian(lambda v: -potential.log_density(v[None])[0], u)
    torch.testing.assert_close(precision.float(), h + 1e3 * torch.eye(len(u)), rtol=1e-3, atol=1e-2)
    with pytest.raises(ValueError, match="jitter"):
        schemes.laplace(model, x, x[:, 0], epochs=1, lr=1e-8, jitter=-1.0, progress=False)


# ---------------------------------------------------------------- Pyro's AutoGuides
@pytest.mark.slow
def test_fullrank_guide_is_near_the_exact_posterior():
    ref = conjugate()
    guide = schemes.fit_autoguide(conjugate_model(ref), ref.x, ref.y, "fullrank", epochs=250,
                                  lr=0.05, num_particles=16, seed=0, progress=False)
    post = guide.get_posterior()
    cov = post.covariance_matrix.detach()
    std = cov.diagonal().sqrt()
    exact_corr = ref.posterior_cov[0, 1] / (ref.exact_std[0] * ref.exact_std[1])
    # The full-rank Gaussian family contains the posterior, so only Adam's stationary noise
    # (16 particles, lr 0.05) remains: over seeds 0-2 the mean was within 0.06 sds, the sds
    # within 10%, the correlation within 0.014.  The bounds are ~3x those, and still
    # exclude the mean-field answer (correlation 0, sds x0.62).
    assert ((post.loc.detach() - ref.posterior_mean) / ref.exact_std).abs().max() < 0.25
    assert ((std / ref.exact_std - 1).abs() < 0.25).all()
    assert abs(cov[0, 1] / (std[0] * std[1]) - exact_corr) < 0.05


@pytest.mark.parametrize("kind, options", [("lowrank", {"rank": 2}), ("flow", {"hidden_dims": [40]})])
def test_lowrank_and_flow_guides_draw_the_model_sites(kind, options):
    model = small_bnn()
    x, y = bnn_data()
    guide = schemes.fit_autoguide(model, x, y, kind, epochs=3, seed=0, progress=False, **options)
    check_sites(guide, model, x, y)
    draws = guide.get_posterior().sample((7,))
    dim = sum(s.numel() for s in model.network.site_shapes.values()) + 1  # + log noise
    assert draws.shape == (7, dim) and torch.isfinite(draws).all()


def test_gaussian_guides_start_at_the_network_with_init_scale():
    model = small_bnn(noise=0.1)
    x, y = bnn_data()
    guide = schemes.fit_autoguide(model, x, y, "diagonal", epochs=1, lr=1e-9, init_scale=0.03,
                                  progress=False)
    for name, value in model.initial_values().items():
        loc = functools.reduce(getattr, name.split("."), guide.locs).detach()
        scale = functools.reduce(getattr, name.split("."), guide.scales).detach()
        torch.testing.assert_close(loc, value, atol=1e-6, rtol=0)
        torch.testing.assert_close(scale, torch.full_like(value, 0.03))


def test_flow_starts_at_the_network_with_init_scale():
    # Untrained (one step of lr 1e-9), the located flow's draws sit at the network's
    # initial weights, spread ~init_scale: the IAF's own random shift and scale (of
    # order 1 at Pyro's initialization) are multiplied by init_scale = 0.03.  Bounds of
    # 3x init_scale on the mean and a factor 4 on the spread hold that; the unlocated
    # IAF (draws ~ N(0, 1): spread 1, mean 0 against weights up to 0.7) fails both.
    model = small_bnn(noise=0.1)
    x, y = bnn_data()
    guide = schemes.fit_autoguide(model, x, y, "flow", hidden_dims=[40], epochs=1, lr=1e-9,
                                  init_scale=0.03, seed=0, progress=False)
    draws = bbb.to_inference_data(model, guide, x, y, num_samples=2000, seed=0).posterior
    for name, value in model.initial_values().items():
        site = torch.as_tensor(draws[name].values[0])
        assert (site.mean(0) - value).abs().max() < 3 * 0.03, name
        assert 0.03 / 4 < site.std(0).min() and site.std(0).max() < 4 * 0.03, name


def test_elementwise_affine_matches_torch_affine_transform():
    loc, scale = torch.randn(5, dtype=F64), 0.3
    ours = schemes.ElementwiseAffine(loc, scale).to(F64)
    theirs = torch.distributions.AffineTransform(loc, torch.full_like(loc, scale), event_dim=1)
    z = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(ours(z), theirs(z))
    torch.testing.assert_close(ours.inv(ours(z)), z)
    torch.testing.assert_close(ours.log_abs_det_jacobian(z, ours(z)), theirs.log_abs_det_jacobian(z, theirs(z)))


def test_lr_decay_lowers_the_learning_rate_to_lr_times_decay():
    # Two steps with lr_decay 1e-12 take lr * 1e-6 and lr * 1e-12 (the lr falls
    # geometrically, reaching lr * lr_decay at the last step): Adam moves each parameter
    # by at most ~its lr, so they stay within 1e-7 of where they started, while two
    # steps at the constant lr 0.01 move them ~0.01 each.
    x, y = bnn_data()

    def fitted(epochs, lr, decay):
        model = small_bnn(noise=0.1)
        guide = schemes.fit_autoguide(model, x, y, "diagonal", epochs=epochs, lr=lr, lr_decay=decay,
                                      seed=0, progress=False)
        return torch.cat([p.detach().reshape(-1) for p in guide.parameters()])

    start, decayed, constant = fitted(1, 1e-12, 1.0), fitted(2, 0.01, 1e-12), fitted(2, 0.01, 1.0)
    assert (decayed - start).abs().max() < 1e-7
    assert (constant - start).abs().min() > 1e-3
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="lr_decay"):
            schemes.fit_autoguide(small_bnn(), x, y, "diagonal", epochs=1, lr_decay=bad, progress=False)


def test_two_guides_of_one_kind_keep_their_own_parameters():
    # Pyro names an AutoGuide's parameters by its class in the global param store; a second
    # AutoNormal must neither start from the first one's values nor move them.
    x, y = bnn_data()
    first = schemes.fit_autoguide(small_bnn(seed=0), x, y, "diagonal", epochs=20, seed=0, progress=False)
    before = {k: v.detach().clone() for k, v in first.median().items()}
    other = small_bnn(seed=1)
    second = schemes.fit_autoguide(other, x, -y, "diagonal", epochs=20, seed=0, progress=False)
    for name, value in first.median().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    # The second one started at its own network (seed 1), 20 steps of lr 0.01 away at most.
    start = other.initial_values()["0.weight"]
    assert (second.median()["0.weight"] - start).abs().max() <= 20 * 0.01 + 1e-6


# ---------------------------------------------------------------- deep ensemble
def test_ensemble_members_are_the_map_of_the_conjugate_model():
    ref = conjugate()
    draws = schemes.deep_ensemble(conjugate_model(ref), ref.x, ref.y, num_members=4, epochs=1500,
                                  lr=0.05, seed=0, progress=False)
    assert draws["weight"].shape == (1, 4, 1, 2)
    # MAP = posterior mean here; the objective is a strictly concave quadratic, so every
    # member converges there from its own prior draw (Adam, 1,500 steps: measured 2e-15 sds).
    members = draws["weight"][0, :, 0]
    assert ((members - ref.posterior_mean) / ref.exact_std).abs().max() < 1e-6


def test_ensemble_members_of_a_bnn_are_distinct_fits():
    # A Gaussian prior: the scale mixture's spikes (sd e^-6) are far narrower than Adam's
    # steps, so from its draws (half of them inside a spike) the log joint can fall.
    model = small_bnn(prior=dist.Normal(0.0, 1.0))
    x, y = bnn_data()
    draws = schemes.deep_ensemble(model, x, y, num_members=3, epochs=300, lr=0.02, seed=0,
                                  progress=False)
    check_sites(draws, model, x, y)
    potential = Potential(model, x, y)
    u = potential.flatten({n: v[0] for n, v in draws.items()})
    # Distinct: different prior draws lead to different modes (units permute, signs flip);
    # measured pairwise distances ~6.5 in the 34 coordinates.
    gaps = torch.cdist(u, u)[~torch.eye(3, dtype=torch.bool)]
    assert gaps.min() > 1.0
    # Fitted: each member's negative log joint far below that of its start (the same prior
    # draws, seed 0): measured 110-133 at the starts, 16-20 at the members.
    priors = {**model.network.priors(), **model.extra_priors()}
    torch.manual_seed(0)
    starts = potential.flatten({n: priors[n].sample((3,)) for n in model.latent_names})
    assert (potential.value_and_grad(u)[0] < 0.3 * potential.value_and_grad(starts)[0]).all()


def test_ensemble_seeds_repeat_and_differ():
    model, (x, y) = small_bnn(), bnn_data()
    a = schemes.deep_ensemble(model, x, y, num_members=2, epochs=2, seed=3, progress=False)
    b = schemes.deep_ensemble(model, x, y, num_members=2, epochs=2, seed=3, progress=False)
    c = schemes.deep_ensemble(model, x, y, num_members=2, epochs=2, seed=4, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


# ---------------------------------------------------------------- MC dropout
def test_masked_weights_equal_the_network_with_input_dropout():
    # The equivalence MC dropout rests on, against a forward written out by hand: dropout
    # masks m on each Linear layer's input, scaled by 1 / (1 - p).
    model = small_bnn(noise=0.1, hidden=5)
    x, _ = bnn_data(6)
    weights = model.initial_values()
    p, num = 0.3, 4
    gen = torch.Generator().manual_seed(0)
    masks = {"0.weight": torch.rand(num, 2, generator=gen) >= p,
             "2.weight": torch.rand(num, 5, generator=gen) >= p}
    effective = schemes.dropout_weights({n: v.expand(num, *v.shape) for n, v in weights.items()}, masks, p)
    f = model.output(effective, x)
    for s in range(num):
        h = F.linear(x * masks["0.weight"][s] / (1 - p), weights["0.weight"], weights["0.bias"])
        out = F.linear(torch.tanh(h) * masks["2.weight"][s] / (1 - p), weights["2.weight"], weights["2.bias"])
        torch.testing.assert_close(f[s], out[:, 0])


def test_mc_dropout_draws_drop_or_scale_whole_columns():
    model = small_bnn()
    x, y = bnn_data()
    p, num = 0.25, 400
    draws = schemes.mc_dropout(model, x, y, p=p, num_samples=num, epochs=20, seed=0, progress=False)
    check_sites(draws, model, x, y)
    dropped = 0
    for name, columns in (("0.weight", 2), ("2.weight", 8)):
        w = draws[name][0]  # (S, out, in)
        zero = (w == 0).all(dim=1)  # (S, in): a whole column dropped
        assert ((w == 0) == zero[:, None, :]).all()  # zeros come as whole columns only
        # Every kept column is the same one in every draw (the trained column / (1 - p)).
        column = w.sum(0) / (~zero).sum(0)  # the mean of the kept copies
        kept = torch.where(zero[:, None, :], column, w)
        torch.testing.assert_close(kept, column.expand_as(kept))
        dropped += int(zero.sum())
    # Dropped share ~ p: 4,000 columns, binomial sd 0.007, bound at 5 sd.
    assert abs(dropped / (num * 10) - p) < 0.035
    for name in ("0.bias", "2.bias", "noise"):  # point estimates, the same in every draw
        assert torch.equal(draws[name][0], draws[name][0, :1].expand_as(draws[name][0]))


def test_mc_dropout_with_small_p_trains_to_the_map():
    # With p = 0.02 the dropout objective is the log joint plus a small ridge term (about
    # p / (1 - p) of the data's precision on the diagonal, a shift ~0.06 sds), so the kept
    # weights times (1 - p) are the conjugate MAP = posterior mean, to within 0.3 sds.
    ref = conjugate()
    p = 0.02
    draws = schemes.mc_dropout(conjugate_model(ref), ref.x, ref.y, p=p, num_samples=50,
                               epochs=400, lr=0.05, seed=0, progress=False)
    w = draws["weight"][0, :, 0]  # (S, 2)
    trained = w.abs().amax(0) * torch.sign(w.sum(0)) * (1 - p)
    assert ((trained - ref.posterior_mean) / ref.exact_std).abs().max() < 0.3


# ---------------------------------------------------------------- by name
@pytest.mark.parametrize("name", [n for n in schemes.SCHEMES if n != "laplace"])
def test_every_scheme_returns_the_model_sites(name):
    model = small_bnn()
    x, y = bnn_data()
    options = {"num_members": 2} if name == "ensemble" else {}
    posterior = schemes.fit_scheme(name, model, x, y, epochs=3, seed=0, progress=False, **options)
    check_sites(posterior, model, x, y)


def test_laplace_by_name_returns_the_model_sites():
    # No hidden layer and a learned noise: a MAP with a positive definite Hessian.
    torch.manual_seed(0)
    model = bbb.BayesianRegressor(torch.nn.Linear(2, 1), prior=dist.Normal(0.0, 1.0), noise="learned")
    x, y = bnn_data()
    guide = schemes.fit_scheme("laplace", model, x, y, epochs=300, lr=0.05, progress=False)
    check_sites(guide, model, x, y)


def test_bbb_by_name_passes_the_estimator_to_fit():
    model, (x, y) = small_bnn(noise=0.1), bnn_data()
    guide = schemes.fit_scheme("bbb", model, x, y, estimator="flipout", epochs=2, seed=0, progress=False)
    assert isinstance(guide, bbb.BBBGuide)
    with pytest.raises(ValueError, match="estimator"):
        schemes.fit_scheme("bbb", model, x, y, estimator="nope", epochs=2, progress=False)


def test_scheme_argument_errors():
    model, (x, y) = small_bnn(), bnn_data()
    with pytest.raises(ValueError, match="name must be one of"):
        schemes.fit_scheme("hmc", model, x, y)
    with pytest.raises(ValueError, match="kind must be one of"):
        schemes.fit_autoguide(model, x, y, "banded")
    with pytest.raises(ValueError, match=r"p must lie in \(0, 1\)"):
        schemes.mc_dropout(model, x, y, p=1.0)
    with pytest.raises(ValueError, match="num_members"):
        schemes.deep_ensemble(model, x, y, num_members=0)
    gaussian = bbb.BayesianRegressor(torch.nn.Linear(2, 1), prior=dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="ScaleMixtureNormal"):
        schemes.fit_scheme("bbb-mixture", gaussian, x, y, epochs=1)
    with pytest.raises(ValueError, match="model must be a pyro_bbb"):
        schemes.laplace(lambda x, y=None: None, x, y)
    conv = bbb.BayesianRegressor(torch.nn.Sequential(torch.nn.Unflatten(1, (1, 2)), torch.nn.Conv1d(1, 1, 2),
                                                     torch.nn.Flatten()),
                                 prior=dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="nn.Linear"):
        schemes.mc_dropout(conv, x, y, epochs=1)
