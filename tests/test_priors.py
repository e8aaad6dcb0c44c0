import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from pyro_bbb import ScaleMixtureNormal
from pyro_bbb.priors import prior_on_device, resolve_prior


@pytest.mark.parametrize("pi,s1,s2", [(0.5, 1.0, math.exp(-6)), (0.25, math.exp(-1), math.exp(-7))])
def test_log_prob_matches_scipy(pi, s1, s2):
    w = np.linspace(-3, 3, 41)
    expected = np.log(pi * stats.norm.pdf(w, 0, s1) + (1 - pi) * stats.norm.pdf(w, 0, s2))
    params = [torch.tensor(v, dtype=torch.float64) for v in (pi, s1, s2)]
    got = ScaleMixtureNormal(*params).log_prob(torch.tensor(w, dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_log_prob_finite_far_in_the_tails():
    prior = ScaleMixtureNormal(0.5, 1.0, math.exp(-6))
    w = torch.tensor([-1e3, 1e3, 1e6])
    lp = prior.log_prob(w)
    assert torch.isfinite(lp).all()
    # Far out only the wide component counts: log(pi) + log N(w | 0, 1).
    expected = math.log(0.5) + stats.norm.logpdf(1e3)
    assert lp[1].item() == pytest.approx(expected, rel=1e-6)


def test_sample_moments():
    pi, s1, s2 = 0.3, 2.0, 0.1
    prior = ScaleMixtureNormal(pi, s1, s2)
    torch.manual_seed(0)
    w = prior.sample((200_000,))
    var = pi * s1**2 + (1 - pi) * s2**2
    # The sample variance of n draws has sd ~ sqrt(Var(w^2)/n); with kurtosis ~ 9 here
    # that is < 1.5% of var for n = 2e5: 5% is over 3 sd.
    assert w.var().item() == pytest.approx(var, rel=0.05)
    assert prior.variance.item() == pytest.approx(var)
    assert abs(w.mean().item()) < 5 * math.sqrt(var / w.numel())
    # Fraction from the narrow component: |w| < 0.3 catches ~99.7% of it and ~12% of the wide.
    narrow = (w.abs() < 0.3).float().mean().item()
    expected = (1 - pi) * (2 * stats.norm.cdf(3) - 1) + pi * (2 * stats.norm.cdf(0.15) - 1)
    assert narrow == pytest.approx(expected, abs=0.01)


def test_rsample_differentiable_in_sigmas():
    s1 = torch.tensor(1.0, requires_grad=True)
    w = ScaleMixtureNormal(0.5, s1, 0.01).rsample((1000,))
    w.pow(2).mean().backward()
    assert s1.grad is not None and s1.grad > 0


def test_shapes_expand_and_to_event():
    prior = ScaleMixtureNormal(0.5, 1.0, 0.01)
    assert prior.batch_shape == torch.Size([])
    e = prior.expand([3, 4])
    assert e.batch_shape == (3, 4) and e.sample().shape == (3, 4)
    ind = e.to_event(2)
    assert ind.event_shape == (3, 4) and ind.batch_shape == ()
    assert ind.log_prob(torch.zeros(5, 3, 4)).shape == (5,)
    batched = ScaleMixtureNormal(torch.tensor([0.2, 0.8]), 1.0, 0.01)
    assert batched.batch_shape == (2,)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(pi=0.0, sigma1=1.0, sigma2=0.1), "pi"),
        (dict(pi=1.0, sigma1=1.0, sigma2=0.1), "pi"),
        (dict(pi=1.5, sigma1=1.0, sigma2=0.1), "pi"),
        (dict(pi=0.5, sigma1=0.0, sigma2=0.1), "sigma1"),
        (dict(pi=0.5, sigma1=1.0, sigma2=-1.0), "sigma2"),
        (dict(pi=0.5, sigma1=float("nan"), sigma2=0.1), "sigma1"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ScaleMixtureNormal(**kwargs)


def test_resolve_prior_dict_callable_and_errors():
    mix = ScaleMixtureNormal(0.5, 1.0, 0.01)
    spec = {"*.bias": dist.Normal(0.0, 3.0), "*": mix}
    bias = resolve_prior(spec, "0.bias", torch.zeros(4))
    weight = resolve_prior(spec, "0.weight", torch.zeros(4, 2))
    assert bias.event_shape == (4,) and weight.event_shape == (4, 2)
    assert bias.log_prob(torch.zeros(4)).item() == pytest.approx(4 * stats.norm.logpdf(0, 0, 3))
    assert isinstance(weight.base_dist, ScaleMixtureNormal)
    by_fn = resolve_prior(lambda n, p: dist.Normal(0.0, 1.0 / p.shape[-1]), "w", torch.zeros(2, 4))
    assert by_fn.base_dist.scale[0, 0].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no entry matches"):
        resolve_prior({"*.bias": mix}, "0.weight", torch.zeros(2))
    with pytest.raises(ValueError, match="real support"):
        resolve_prior(dist.HalfNormal(1.0), "w", torch.zeros(2))


def test_prior_on_device_rebuilds_same_density():
    prior = resolve_prior(ScaleMixtureNormal(0.5, 1.0, 0.01), "w", torch.zeros(3))
    moved = prior_on_device(prior, "cpu", torch.float64)
    v = torch.tensor([0.1, -2.0, 5.0], dtype=torch.float64)
    assert moved.log_prob(v).dtype == torch.float64
    assert moved.log_prob(v).item() == pytest.approx(prior.log_prob(v.float()).item(), rel=1e-6)
