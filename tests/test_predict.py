import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from torch import nn

import pyro_bbb as bbb
from pyro_bbb import BayesianClassifier, BayesianRegressor, BBBGuide

N01 = dist.Normal(0.0, 1.0)


def _ready(model, x):
    guide = BBBGuide(model, init_scale=0.3)
    guide(x)
    return guide


def test_regression_predictive_matches_closed_form_for_linear_model():
    """For a linear model with no hidden layer, f(x) = w x + b under q is Gaussian with
    mean mu_w x + mu_b and variance sigma_w^2 x^2 + sigma_b^2; y adds the noise."""
    torch.manual_seed(0)
    model = BayesianRegressor(nn.Linear(1, 1), prior=N01, noise=0.5)
    x = torch.tensor([[-2.0], [0.0], [3.0]])
    guide = _ready(model, x)
    pred = bbb.predict(model, guide, x, num_samples=40000, seed=1)
    mu_w, mu_b = guide.median()["weight"].item(), guide.median()["bias"].item()
    s_w, s_b = guide.scales()["weight"].item(), guide.scales()["bias"].item()
    mean = mu_w * x[:, 0] + mu_b
    f_sd = torch.sqrt(s_w**2 * x[:, 0] ** 2 + s_b**2)
    y_sd = torch.sqrt(f_sd**2 + 0.25)
    # 40000 draws: the sample mean is within 4 * sd / 200 and the sd within ~2% (4 standard errors).
    torch.testing.assert_close(pred.f_mean, mean, atol=(4 * f_sd / 200).max().item(), rtol=0)
    torch.testing.assert_close(pred.f_std, f_sd, rtol=0.02, atol=0)
    torch.testing.assert_close(pred.std, y_sd, rtol=0.02, atol=0)
    q = pred.quantiles([0.25, 0.75])
    expected = torch.tensor(stats.norm.ppf([0.25, 0.75]))[:, None].float() * y_sd + mean
    torch.testing.assert_close(q, expected, atol=0.03, rtol=0)


def test_chunking_does_not_change_draws():
    model = BayesianRegressor(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)), prior=N01)
    x = torch.randn(30, 2)
    guide = _ready(model, x)
    a = bbb.predict(model, guide, x, num_samples=50, seed=3, chunk_size=7)
    b = bbb.predict(model, guide, x, num_samples=50, seed=3, chunk_size=1000)
    torch.testing.assert_close(a.f, b.f)


def test_classification_uncertainty_decomposition():
    torch.manual_seed(0)
    model = BayesianClassifier(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)), prior=N01)
    x = torch.randn(20, 2)
    guide = _ready(model, x)
    pred = bbb.predict(model, guide, x, num_samples=300, seed=0)
    probs = torch.softmax(pred.f, -1).numpy()
    assert np.allclose(pred.mean_probs.sum(-1).numpy(), 1.0, atol=1e-5)
    # Independent reference: scipy's entropy of the mean and the mean entropy.
    total = stats.entropy(probs.mean(0), axis=-1)
    aleatoric = stats.entropy(probs, axis=-1).mean(0)
    np.testing.assert_allclose(pred.entropy.numpy(), total, rtol=1e-4)
    np.testing.assert_allclose(pred.aleatoric.numpy(), aleatoric, rtol=1e-4)
    np.testing.assert_allclose(pred.mutual_information.numpy(), np.maximum(total - aleatoric, 0), atol=1e-5)
    assert (pred.entropy <= math.log(3) + 1e-6).all()
    assert pred.y.shape == (300, 20) and pred.y.max() <= 2


def test_binary_classifier_with_one_logit():
    model = BayesianClassifier(nn.Linear(2, 1), prior=N01)
    x = torch.randn(10, 2)
    guide = _ready(model, x)
    pred = bbb.predict(model, guide, x, num_samples=100, seed=0)
    torch.testing.assert_close(pred.probs[..., 1], torch.sigmoid(pred.f[..., 0]))
    assert set(pred.y.unique().tolist()) <= {0, 1}


def test_predict_accepts_a_dict_of_draws_and_matches_manual_forward():
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    model = BayesianRegressor(net, prior=N01, noise=0.1)
    draws = {n: torch.randn(6, *s) for n, s in model.network.site_shapes.items()}
    x = torch.linspace(-1, 1, 5)
    pred = bbb.predict(model, draws, x, num_samples=6)
    manual = torch.stack([
        torch.func.functional_call(net, {k: v[i] for k, v in draws.items()}, (x[:, None],))[:, 0]
        for i in range(6)
    ])
    torch.testing.assert_close(pred.f, manual)


def test_default_draw_counts():
    # A guide gives 200 draws by default; a dict of draws (or an HMC reference) all of its own.
    model = BayesianRegressor(nn.Linear(1, 1), prior=N01, noise=0.1)
    x = torch.linspace(-1, 1, 5)
    guide = _ready(model, x[:, None])
    assert bbb.predict(model, guide, x).f.shape == (200, 5)
    draws = {n: torch.randn(300, *s) for n, s in model.network.site_shapes.items()}
    assert bbb.predict(model, draws, x).f.shape == (300, 5)
    assert bbb.predict(model, draws, x, num_samples=30).f.shape == (30, 5)
