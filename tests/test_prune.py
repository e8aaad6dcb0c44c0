import math
from operator import attrgetter

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from torch import nn

import pyro_bbb as bbb
from pyro_bbb import BayesianClassifier, BayesianRegressor, BBBGuide
from pyro_bbb.prune import PrunedBBBGuide, prune

N01 = dist.Normal(0.0, 1.0)


def _net(d_in=3, hidden=6, d_out=3):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def _trained():
    """A guide whose mu and sigma differ from weight to weight (random mu, random sigma)."""
    torch.manual_seed(0)
    model = BayesianClassifier(_net(), prior=N01)
    x = torch.randn(16, 3)
    guide = BBBGuide(model, init_scale=0.1)
    guide(x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in model.network.site_names:
            loc, rho = guide.loc.get_parameter(name), guide.rho.get_parameter(name)
            loc.copy_(torch.randn(loc.shape, generator=gen))
            rho.copy_(torch.randn(rho.shape, generator=gen) - 2.0)
    return model, guide, x


def _expected_removed(guide, sites, fraction):
    """The removed set by hand: numpy's stable argsort of |mu|/sigma over all sites."""
    snr = []
    for name in sites:
        mu = guide.loc.get_parameter(name).detach().numpy().astype(np.float64)
        sigma = torch.nn.functional.softplus(guide.rho.get_parameter(name)).detach().numpy()
        snr.append(np.abs(mu).reshape(-1) / sigma.astype(np.float64).reshape(-1))
    sizes = [s.size for s in snr]
    flat = np.concatenate(snr)
    k = int(math.floor(fraction * flat.size + 1e-9))
    removed = np.zeros(flat.size, dtype=bool)
    removed[np.argsort(flat, kind="stable")[:k]] = True
    return dict(zip(sites, np.split(removed, np.cumsum(sizes)[:-1]))), k


@pytest.mark.parametrize("fraction", [0.3, 0.75, 0.95])
def test_removed_set_is_the_global_lowest_snr_fraction(fraction):
    model, guide, _ = _trained()
    sites = model.network.site_names
    expected, k = _expected_removed(guide, sites, fraction)
    pruned = prune(guide, fraction, inplace=False)
    assert pruned.prune_summary.num_removed == k
    assert pruned.prune_summary.num_weights == sum(v.size for v in expected.values())
    for name in sites:
        removed = ~pruned.keep_mask(name).numpy().reshape(-1)
        np.testing.assert_array_equal(removed, expected[name], err_msg=name)
        assert pruned.prune_summary.removed_per_site[name] == expected[name].sum()
    # the ranking is global: with random mu/sigma the sites lose different shares
    shares = {n: expected[n].mean() for n in sites}
    assert len(set(np.round(list(shares.values()), 6))) > 1
    # the threshold separates removed from kept
    snr = torch.cat([guide.snr()[n].reshape(-1) for n in sites])
    removed = torch.cat([~pruned.keep_mask(n).reshape(-1) for n in sites])
    assert snr[removed].max() <= pruned.prune_summary.threshold_snr <= snr[~removed].min()


def test_pruned_draws_are_exactly_zero_and_kept_draws_untouched():
    model, guide, x = _trained()
    pruned = prune(guide, 0.75, inplace=False)
    a = guide.sample_posterior(50, generator=torch.Generator().manual_seed(7))
    b = pruned.sample_posterior(50, generator=torch.Generator().manual_seed(7))
    for name in model.network.site_names:
        keep = pruned.keep_mask(name)
        assert (b[name][:, ~keep] == 0).all()
        assert torch.equal(b[name][:, keep], a[name][:, keep])
        # mu = 0 and sigma = 0 exactly for pruned weights, untouched for kept ones
        assert (pruned.loc.get_parameter(name)[~keep] == 0).all()
        assert (pruned.scales()[name][~keep] == 0).all()
        assert (pruned.median()[name][~keep] == 0).all()
        assert (pruned.quantiles([0.05, 0.95])[name][:, ~keep] == 0).all()
        assert (pruned.snr()[name][~keep] == 0).all()
        assert torch.equal(pruned.scales()[name][keep], guide.scales()[name][keep])
        assert torch.equal(pruned.loc.get_parameter(name)[keep], guide.loc.get_parameter(name)[keep])
    # the Pyro side (forward / get_posterior, Pyro's Predictive) sees the zeros too
    trace = pyro.poutine.trace(pruned).get_trace(x)
    for name in model.network.site_names:
        value = trace.nodes[name]["value"]
        assert (value[~pruned.keep_mask(name)] == 0).all()
        assert torch.isfinite(trace.nodes[name]["fn"].log_prob(value)).all()
    samples = Predictive(model, guide=pruned, num_samples=5, return_sites=["0.weight"])(x)
    assert (samples["0.weight"].reshape(5, 6, 3)[:, ~pruned.keep_mask("0.weight")] == 0).all()
    # log q counts the kept weights only, and stays finite
    draws = pruned.sample_posterior(4)
    assert torch.isfinite(pruned.log_density(draws)).all()


def test_predictions_equal_a_network_zeroed_by_hand():
    model, guide, x = _trained()
    sites = model.network.site_names
    expected, _ = _expected_removed(guide, sites, 0.5)
    pruned = prune(guide, 0.5, inplace=False)

    # 1. the posterior predictive: same draws as the unpruned guide, zeroed by hand
    torch.manual_seed(3)
    draws = guide.sample_posterior(40)
    for name in sites:
        draws[name][:, torch.from_numpy(expected[name]).reshape(draws[name].shape[1:])] = 0.0
    by_hand = bbb.predict(model, draws, x)
    got = bbb.predict(model, pruned, x, num_samples=40, seed=3)
    assert torch.equal(got.f, by_hand.f)
    assert torch.equal(got.mean_probs, by_hand.mean_probs)

    # 2. the posterior mean network: a plain torch net with mu, zeroed by hand
    net = _net()
    state = {}
    for name in sites:
        mu = guide.loc.get_parameter(name).detach().clone()
        mu[torch.from_numpy(expected[name]).reshape(mu.shape)] = 0.0
        state[name] = mu
    net.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.output(pruned.median(), x), net(x), rtol=0, atol=0)


def test_fraction_zero_changes_nothing():
    model, guide, x = _trained()
    pruned = prune(guide, 0.0, inplace=False)
    assert pruned.prune_summary.num_removed == 0
    assert pruned.prune_summary.threshold_snr == 0.0
    a = guide.sample_posterior(20, generator=torch.Generator().manual_seed(0))
    b = pruned.sample_posterior(20, generator=torch.Generator().manual_seed(0))
    for name in a:
        assert pruned.keep_mask(name).all()
        assert torch.equal(a[name], b[name])
    assert torch.equal(bbb.predict(model, guide, x, 20, seed=1).f, bbb.predict(model, pruned, x, 20, seed=1).f)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", None, True])
def test_bad_fraction_raises(bad):
    _, guide, _ = _trained()
    with pytest.raises(ValueError, match="fraction"):
        prune(guide, bad)


def test_other_bad_arguments():
    model, guide, _ = _trained()
    with pytest.raises(ValueError, match="guide"):
        prune(object(), 0.5)
    with pytest.raises(ValueError, match="not set up"):
        prune(BBBGuide(BayesianClassifier(_net(), prior=N01)), 0.5)
    with pytest.raises(ValueError, match="sites"):
        prune(guide, 0.5, sites=["nope"])
    with pytest.raises(ValueError, match="inplace"):
        prune(guide, 0.5, inplace="no")


def test_inplace_false_leaves_the_original_unchanged():
    model, guide, x = _trained()
    before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    draws_before = guide.sample_posterior(10, generator=torch.Generator().manual_seed(0))
    pruned = prune(guide, 0.9, inplace=False)
    assert pruned is not guide
    assert type(guide) is BBBGuide and isinstance(pruned, PrunedBBBGuide)
    after = guide.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    draws_after = guide.sample_posterior(10, generator=torch.Generator().manual_seed(0))
    for k in draws_before:
        assert torch.equal(draws_before[k], draws_after[k])
    # the copy shares the model, and the original is still a working guide
    assert pruned._user_model[0] is model
    assert guide.model is not None and pruned.model is not None
    guide(x)
    pruned(x)
    # the original still trains on its fast path
    bbb.fit(model, guide, x, torch.randint(0, 3, (16,)), epochs=1, progress=False)


def test_inplace_true_prunes_the_guide_itself_and_repruning_removes_a_superset():
    model, guide, x = _trained()
    expected, _ = _expected_removed(guide, model.network.site_names, 0.5)
    out = prune(guide, 0.5)
    assert out is guide and isinstance(guide, PrunedBBBGuide)
    for name in model.network.site_names:
        np.testing.assert_array_equal(~guide.keep_mask(name).numpy().reshape(-1), expected[name])
    first = {n: guide.keep_mask(n).clone() for n in model.network.site_names}
    prune(guide, 0.8)
    assert guide.prune_summary.num_removed == math.floor(0.8 * guide.prune_summary.num_weights)
    for name, keep in first.items():
        assert not (guide.keep_mask(name) & ~keep).any()  # once pruned, stays pruned
    prune(guide, 0.1)  # a smaller fraction cannot bring weights back
    assert guide.prune_summary.num_removed == math.floor(0.8 * guide.prune_summary.num_weights)


def test_only_network_sites_are_ranked_not_a_learned_noise():
    torch.manual_seed(0)
    model = BayesianRegressor(_net(d_out=1), prior=N01, noise="learned")
    x = torch.randn(16, 3)
    guide = BBBGuide(model)
    guide(x)
    with torch.no_grad():  # make the noise the lowest-SNR site of all
        guide.loc.get_parameter("noise").fill_(0.0)
        guide.rho.get_parameter("noise").fill_(5.0)
    pruned = prune(guide, 0.5, inplace=False)
    assert pruned.keep_mask("noise") is None
    assert pruned.prune_summary.num_weights == sum(p.numel() for p in _net(d_out=1).parameters())
    assert (pruned.sample_posterior(20)["noise"] > 0).all()
    with pytest.raises(ValueError, match="constrained"):
        prune(guide, 0.5, sites=["noise"])


def test_snr_pruning_after_fit_keeps_accuracy_and_beats_random_pruning():
    """End to end: fit with the paper's scale mixture, remove 75% of the weights by SNR
    (held-out accuracy stays close), versus 75% removed at random (accuracy collapses).
    Means over three training seeds: on this small net the drop at 75% varies from 0 to 12
    points between seeds (measured over 6), so one seed's drop is no test of the method;
    the mean of three stays within 10 points, and random pruning falls ~40 points."""
    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] * x[:, 1] > 0).long()
    x, y, x_test, y_test = x[:200], y[:200], x[200:], y[200:]
    prior = bbb.ScaleMixtureNormal(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))
    full, pruned, random = [], [], []
    for seed in range(3):
        torch.manual_seed(seed)
        model = BayesianClassifier(nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 2)), prior=prior)
        guide = BBBGuide(model)
        bbb.fit(model, guide, x, y, epochs=300, lr=0.03, batch_size=100, progress=False, seed=seed)

        def accuracy(posterior):
            probs = bbb.predict(model, posterior, x_test, 100, seed=0).mean_probs
            return (probs.argmax(-1) == y_test).float().mean().item()

        full.append(accuracy(guide))
        pruned.append(accuracy(prune(guide, 0.75, inplace=False)))
        torch.manual_seed(1)
        draws = guide.sample_posterior(100)
        gen = torch.Generator().manual_seed(0)
        for name, d in draws.items():
            d *= torch.rand(d.shape[1:], generator=gen) >= 0.75
        random.append(accuracy(draws))
    full, pruned, random = (sum(v) / 3 for v in (full, pruned, random))
    assert full > 0.9
    assert pruned > full - 0.1
    assert random < pruned - 0.2


def test_log_q_and_kl_count_kept_weights_only():
    model, guide, _ = _trained()
    pruned = prune(guide, 0.6, inplace=False)
    prior = dist.Normal(torch.tensor(0.0), torch.tensor(1.0))
    for name in model.network.site_names:
        keep = pruned.keep_mask(name)
        q, q0 = pruned.get_posterior(name).base_dist, guide.get_posterior(name).base_dist
        kl, kl0 = torch.distributions.kl_divergence(q, prior), torch.distributions.kl_divergence(q0, prior)
        assert (kl[~keep] == 0).all() and torch.equal(kl[keep], kl0[keep])
        value = pruned.sample_posterior(1)[name][0]
        lp, lp0 = q.log_prob(value), q0.log_prob(value)
        assert (lp[~keep] == 0).all() and torch.equal(lp[keep], lp0[keep])


def test_pruned_guide_reads_like_autonormal_with_zeros_where_pruned():
    # guide.scales.<site>, guide.scales() and get_posterior() without a name, with the masks.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
    guide = bbb.BBBGuide(model, init_scale=0.1)
    x, y = torch.randn(10, 2), torch.randn(10)
    guide(x, y)
    pruned = bbb.prune(guide, fraction=0.5)
    mask = pruned.keep_mask("0.weight")
    assert mask is not None and not mask.all() and mask.any()
    sigma = attrgetter("0.weight")(pruned.scales)
    assert torch.equal(sigma[~mask], torch.zeros_like(sigma[~mask]))
    assert torch.allclose(sigma[mask], torch.full_like(sigma[mask], 0.1))
    assert torch.equal(pruned.scales()["0.weight"], sigma.detach())
    posteriors = pruned.get_posterior()
    assert sorted(posteriors) == sorted(guide.get_posterior())
    draws = posteriors["0.weight"].sample((5,))
    assert torch.equal(draws[:, ~mask], torch.zeros_like(draws[:, ~mask]))
