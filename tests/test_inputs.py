"""Bad or unusual input gets the same clear answer from every public function.

numpy float64 data into a float32 network, inputs with the wrong number of
features, targets whose shape does not match the network's outputs, complex
inputs, bool noise, bad seeds and devices, one-draw predictions, float64 stds of
large outputs, and comparisons of posteriors that do not belong together.
References are the float32-tensor runs of the same calls (identical under the
same seed), Pyro's own trace log densities, and numpy's std.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

import pyro_bbb as bbb
from pyro_bbb.predict import Prediction
from pyro_bbb.train import BBBLoss

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: F401  (to_inference_data's InferenceData)

N = 12
RNG = np.random.default_rng(0)
X3 = RNG.standard_normal((N, 3))  # float64, as scikit-learn and pandas give
Y1 = X3 @ np.array([1.0, -0.5, 0.25]) + 0.1 * RNG.standard_normal(N)
SMALL_NUTS = dict(num_samples=4, warmup_steps=4, num_chains=1, max_tree_depth=3, progress=False)
SMALL_HMC = dict(num_chains=4, num_samples=4, warmup_steps=8, max_leapfrog_steps=8, progress=False)


def _regressor(features=3, outputs=1, hidden=2, noise=0.1):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, outputs)
    )
    return bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=noise)


def _fitted(model, x=X3, y=Y1):
    guide = bbb.BBBGuide(model)
    bbb.fit(model, guide, x, y, epochs=3, progress=False, seed=0)
    return guide


def _f32(a):
    return torch.as_tensor(a, dtype=torch.float32)


# ----------------------------------------------------------------------------
# 1. numpy float64 into a float32 network: cast to the weights' dtype
# ----------------------------------------------------------------------------
def test_fit_casts_float64_numpy_to_the_network_dtype():
    a, b = _regressor(), _regressor()
    ha = bbb.fit(a, bbb.BBBGuide(a), X3, Y1, epochs=5, progress=False, seed=0)
    hb = bbb.fit(b, bbb.BBBGuide(b), _f32(X3), _f32(Y1), epochs=5, progress=False, seed=0)
    np.testing.assert_array_equal(ha.loss, hb.loss)  # the float32 run, bit for bit


def test_predict_and_to_inference_data_cast_float64_numpy():
    model = _regressor()
    guide = _fitted(model)
    p64 = bbb.predict(model, guide, X3, num_samples=20, seed=0)
    p32 = bbb.predict(model, guide, _f32(X3), num_samples=20, seed=0)
    assert p64.f.dtype == torch.float32
    torch.testing.assert_close(p64.f, p32.f, rtol=0, atol=0)
    i64 = bbb.to_inference_data(model, guide, X3, Y1, x_test=X3[:4], num_samples=10, seed=0)
    i32 = bbb.to_inference_data(model, guide, _f32(X3), _f32(Y1), x_test=_f32(X3[:4]), num_samples=10, seed=0)
    np.testing.assert_array_equal(i64.predictions["f"].values, i32.predictions["f"].values)
    np.testing.assert_array_equal(i64.log_likelihood["y"].values, i32.log_likelihood["y"].values)


def test_samplers_cast_float64_numpy():
    model = _regressor()
    a = bbb.run_nuts(model, X3, Y1, **SMALL_NUTS)
    b = bbb.run_nuts(model, _f32(X3), _f32(Y1), **SMALL_NUTS)
    torch.testing.assert_close(a.samples["0.weight"], b.samples["0.weight"], rtol=0, atol=0)
    c = bbb.run_hmc(model, X3, Y1, **SMALL_HMC)
    d = bbb.run_hmc(model, _f32(X3), _f32(Y1), **SMALL_HMC)
    torch.testing.assert_close(c.samples["0.weight"], d.samples["0.weight"], rtol=0, atol=0)


def test_bbb_loss_casts_float64_numpy():
    model = _regressor()
    guide = _fitted(model)
    loss = BBBLoss(model, guide)
    pyro.set_rng_seed(1)
    from_numpy = loss(X3, Y1)
    pyro.set_rng_seed(1)
    from_f32 = loss(_f32(X3), _f32(Y1))
    assert from_numpy.dtype == torch.float32
    assert from_numpy.item() == from_f32.item()


# ----------------------------------------------------------------------------
# 2. x with the wrong feature shape: a ValueError naming x and both shapes
# ----------------------------------------------------------------------------
BAD_X = [RNG.standard_normal((N, 2)), RNG.standard_normal(N), RNG.standard_normal((N, 3, 1))]


@pytest.mark.parametrize("x", BAD_X, ids=["2-features", "1-D", "3-D"])
def test_wrong_feature_shape_is_a_value_error_everywhere(x):
    model = _regressor()
    guide = _fitted(model)
    pattern = r"x must have shape \(n, 3\).*got shape " + re.escape(str(tuple(x.shape)))
    calls = {
        "fit": lambda: bbb.fit(model, bbb.BBBGuide(model), x, Y1, epochs=1, progress=False),
        "predict": lambda: bbb.predict(model, guide, x),
        "to_inference_data": lambda: bbb.to_inference_data(model, guide, x, Y1, num_samples=5),
        "run_hmc": lambda: bbb.run_hmc(model, x, Y1, **SMALL_HMC),
        "run_nuts": lambda: bbb.run_nuts(model, x, Y1, **SMALL_NUTS),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=pattern):
            call()  # each of fit, predict, to_inference_data, run_hmc, run_nuts
    with pytest.raises(ValueError, match=r"x_test must have shape \(n, 3\)"):
        bbb.to_inference_data(model, guide, X3, Y1, x_test=x, num_samples=5)


def test_conv_networks_check_channels_and_rank_and_custom_modules_pass():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv1d(2, 1, 3), torch.nn.Flatten(), torch.nn.Linear(3, 1))
    model = bbb.BayesianRegressor(conv, prior=dist.Normal(0.0, 1.0))
    assert model.network.input_shape == (2, None)
    guide = bbb.BBBGuide(model)
    x, y = torch.randn(N, 2, 5), torch.randn(N)
    bbb.fit(model, guide, x, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2, \*\).*got shape \(12, 3, 5\)"):
        bbb.predict(model, guide, torch.randn(N, 3, 5))
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2, \*\).*got shape \(12, 2\)"):
        bbb.predict(model, guide, torch.randn(N, 2))

    class Flattening(torch.nn.Module):  # reads (n, 2, 2) through a Linear(4, 1)
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(x.flatten(1))

    custom = bbb.BayesianRegressor(Flattening(), prior=dist.Normal(0.0, 1.0))
    assert custom.network.input_shape is None
    pred = bbb.predict(custom, {"fc.weight": torch.randn(3, 1, 4), "fc.bias": torch.randn(3, 1)},
                       torch.randn(N, 2, 2))
    assert pred.f.shape == (3, N)


# ----------------------------------------------------------------------------
# 3. One place decides the target's shape
# ----------------------------------------------------------------------------
def _target_calls(model, guide, x, y):
    return {
        "fit": lambda: bbb.fit(model, bbb.BBBGuide(model), x, y, epochs=1, progress=False),
        "to_inference_data": lambda: bbb.to_inference_data(model, guide, x, y, num_samples=5),
        "run_hmc": lambda: bbb.run_hmc(model, x, y, **SMALL_HMC),
        "run_nuts": lambda: bbb.run_nuts(model, x, y, **SMALL_NUTS),
        "BBBLoss": lambda: BBBLoss(model, guide)(x, y),
    }


def test_one_output_regressor_rejects_two_column_targets():
    model = _regressor()
    guide = _fitted(model)
    y2 = np.stack([Y1, Y1], 1)
    for name, call in _target_calls(model, guide, X3, y2).items():
        with pytest.raises(ValueError, match=r"y must have shape \(12,\) or \(12, 1\).*got shape \(12, 2\)"):
            call()


def test_two_output_regressor_rejects_one_target_per_row():
    model = _regressor(outputs=2)
    guide = _fitted(model, y=np.stack([Y1, -Y1], 1))
    for name, call in _target_calls(model, guide, X3, Y1).items():
        with pytest.raises(ValueError, match=r"y must have shape \(12, 2\).*2 outputs.*got shape \(12,\)"):
            call()


def test_column_targets_are_read_as_one_target_per_row_everywhere():
    model = _regressor()
    guide = _fitted(model)
    column = Y1[:, None]
    a = bbb.run_nuts(model, X3, Y1, **SMALL_NUTS)
    b = bbb.run_nuts(model, X3, column, **SMALL_NUTS)
    torch.testing.assert_close(a.samples["2.weight"], b.samples["2.weight"], rtol=0, atol=0)
    np.testing.assert_array_equal(a.sample_stats["lp"], b.sample_stats["lp"])
    # lp of a real-valued model is Pyro's log joint at the draw, with y of shape (n,):
    # not the (n, n) broadcast likelihood (which reads about -5e4 here).
    draw = {k: v[0, -1] for k, v in b.samples.items()}
    x32, y32 = _f32(X3), _f32(Y1)
    trace = poutine.trace(poutine.condition(model, data=draw)).get_trace(x32, y32)
    assert b.sample_stats["lp"][0, -1] == pytest.approx(float(trace.log_prob_sum()), rel=1e-5)

    loss = BBBLoss(model, guide)
    pyro.set_rng_seed(3)
    flat = loss(x32, y32).item()
    pyro.set_rng_seed(3)
    assert loss(x32, _f32(column)).item() == pytest.approx(flat, rel=1e-6)


def test_run_nuts_without_targets_says_it_needs_y():
    model = _regressor()
    with pytest.raises(ValueError, match="y is required"):
        bbb.run_nuts(model, X3, None, **SMALL_NUTS)

    def linear(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)

    with pytest.raises(ValueError, match="y is required"):
        bbb.run_nuts(linear, _f32(X3), None, **SMALL_NUTS)


def test_classifier_targets_one_label_per_row():
    torch.manual_seed(0)
    model = bbb.BayesianClassifier(torch.nn.Linear(3, 3), prior=dist.Normal(0.0, 1.0))
    labels = np.arange(N) % 3
    with pytest.raises(ValueError, match=r"y must have shape \(12,\) or \(12, 1\) \(one class label per row\)"):
        bbb.fit(model, bbb.BBBGuide(model), X3, np.stack([labels, labels], 1), epochs=1, progress=False)
    bbb.fit(model, bbb.BBBGuide(model), X3, labels[:, None], epochs=1, progress=False)  # a column is fine


# ----------------------------------------------------------------------------
# 4. complex x, bool noise, seeds, devices
# ----------------------------------------------------------------------------
def test_complex_inputs_are_rejected():
    model = _regressor()
    guide = _fitted(model)
    xc = X3 + 1j
    with pytest.raises(TypeError, match="x must be real-valued"):
        bbb.fit(model, bbb.BBBGuide(model), xc, Y1, epochs=1, progress=False)
    with pytest.raises(TypeError, match="x must be real-valued"):
        bbb.predict(model, guide, xc)
    with pytest.raises(TypeError, match="y must be real-valued"):
        bbb.to_inference_data(model, guide, X3, Y1 + 1j, num_samples=5)


@pytest.mark.parametrize("noise", [True, False, np.bool_(True), -1.0, float("nan"), "fixed"])
def test_noise_must_be_a_positive_number_or_learned(noise):
    with pytest.raises(ValueError, match="noise must be a positive float or 'learned'"):
        bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0.0, 1.0), noise=noise)


@pytest.mark.parametrize("seed", [1.5, "a", True, -1])
def test_bad_seeds_are_value_errors_everywhere(seed):
    model = _regressor()
    guide = _fitted(model)
    calls = {
        "fit": lambda: bbb.fit(model, bbb.BBBGuide(model), X3, Y1, epochs=1, progress=False, seed=seed),
        "predict": lambda: bbb.predict(model, guide, X3, seed=seed),
        "to_inference_data": lambda: bbb.to_inference_data(model, guide, X3, Y1, num_samples=5, seed=seed),
        "run_hmc": lambda: bbb.run_hmc(model, X3, Y1, **SMALL_HMC, seed=seed),
        "run_nuts": lambda: bbb.run_nuts(model, X3, Y1, **SMALL_NUTS, seed=seed),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            call()


def test_numpy_integer_seeds_are_accepted():
    model = _regressor()
    x, y = _f32(X3), _f32(Y1)
    guide = _fitted(model, x, y)
    a = bbb.predict(model, guide, x, num_samples=5, seed=np.int64(4))
    b = bbb.predict(model, guide, x, num_samples=5, seed=4)
    torch.testing.assert_close(a.f, b.f, rtol=0, atol=0)
    a, b = _regressor(), _regressor()  # fresh models: a new guide starts where the last fit left
    ha = bbb.fit(a, bbb.BBBGuide(a), x, y, epochs=2, progress=False, seed=np.int32(2))
    hb = bbb.fit(b, bbb.BBBGuide(b), x, y, epochs=2, progress=False, seed=2)
    assert ha.loss == hb.loss


def test_devices_are_checked_with_a_short_value_error():
    model = _regressor()
    with pytest.raises(ValueError, match=r"device must be a torch device such as 'cpu'.*'foo'"):
        bbb.fit(model, bbb.BBBGuide(model), X3, Y1, epochs=1, progress=False, device="foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
            bbb.fit(model, bbb.BBBGuide(model), X3, Y1, epochs=1, progress=False, device="cuda")
    hist = bbb.fit(model, bbb.BBBGuide(model), X3, Y1, epochs=1, progress=False, device=torch.device("cpu"))
    assert len(hist.loss) == 1


# ----------------------------------------------------------------------------
# 5-6. Predictive std: at least two draws, in the draws' dtype, stable
# ----------------------------------------------------------------------------
def test_predict_needs_at_least_two_draws():
    model = _regressor()
    guide = _fitted(model)
    with pytest.raises(ValueError, match="num_samples must be at least 2"):
        bbb.predict(model, guide, X3, num_samples=1)
    one_draw = {k: v[None] for k, v in model.initial_values().items()}
    with pytest.raises(ValueError, match="num_samples: the posterior gives 1 draw"):
        bbb.predict(model, one_draw, X3)
    two = bbb.predict(model, guide, X3, num_samples=2, seed=0)
    assert torch.isfinite(two.std).all()


def test_prediction_std_is_computed_in_the_draws_dtype_and_stably():
    gen = torch.Generator().manual_seed(0)
    # float64 outputs near 1e30: finite in float32 too, but their squares are not.
    y64 = 1e30 * (1 + torch.randn(50, 4, generator=gen, dtype=torch.float64))
    pred = Prediction(f=y64, y=y64, task="regression")
    assert pred.std.dtype == torch.float64
    np.testing.assert_allclose(pred.std.numpy(), y64.numpy().std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(pred.f_std.numpy(), y64.numpy().std(0, ddof=1), rtol=1e-12)
    # Near 1e200 even float64 squares overflow: the reference std is numpy's of y / 1e200.
    huge = 1e200 * (1 + torch.randn(50, 4, generator=gen, dtype=torch.float64))
    expected = 1e200 * (huge.numpy() / 1e200).std(0, ddof=1)
    np.testing.assert_allclose(Prediction(f=huge, y=huge, task="regression").std.numpy(), expected, rtol=1e-12)
    # float32 draws near 1e20: their squares overflow float32, the std must not.
    y32 = (1e20 * (1 + torch.randn(50, 4, generator=gen, dtype=torch.float64))).float()
    std32 = Prediction(f=y32, y=y32, task="regression").std
    assert std32.dtype == torch.float32
    # float32 rounding of the draws and of the sums: relative error ~1e-6.
    np.testing.assert_allclose(std32.numpy(), y32.double().numpy().std(0, ddof=1), rtol=1e-5)
    labels = torch.tensor([[0, 1], [1, 1], [0, 1]])  # integer draws: the default dtype
    np.testing.assert_allclose(
        Prediction(f=labels, y=labels, task="classification").std.numpy(),
        labels.numpy().std(0, ddof=1),
    )


# ----------------------------------------------------------------------------
# 7. compare: the same training data, the arguments the right way round
# ----------------------------------------------------------------------------
class _Reference:
    """A sampler's output as to_inference_data reads it: draws (chains, draws, ...) and
    per-draw statistics (no sampler run needed to test argument checks)."""

    sampler = "test sampler"

    def __init__(self, guide):
        draws = guide.sample_posterior(40)
        self.samples = {k: v.detach().reshape((2, 20) + v.shape[1:]) for k, v in draws.items()}
        self.sample_stats = {"diverging": np.zeros((2, 20), bool), "lp": np.zeros((2, 20))}


@pytest.fixture(scope="module")
def pair():
    pyro.clear_param_store()
    model = _regressor(features=1)
    x, y = _f32(X3[:, :1]), _f32(Y1)
    guide = _fitted(model, x, y)
    x_test = torch.linspace(-2, 2, 5)[:, None]
    ref = _Reference(guide)
    vi = bbb.to_inference_data(model, guide, x, y, x_test=x_test, num_samples=40, seed=0)
    hmc = bbb.to_inference_data(model, ref, x, y, x_test=x_test)
    other_y = bbb.to_inference_data(model, ref, x, y + 1.0, x_test=x_test)
    other_x = bbb.to_inference_data(model, ref, x + 1.0, y, x_test=x_test)
    return vi, hmc, other_y, other_x


def test_to_inference_data_marks_which_side_is_a_sampler(pair):
    vi, hmc, _, _ = pair
    assert vi.attrs["posterior_kind"] == "variational"
    assert hmc.attrs["posterior_kind"] == "sampler"
    assert hmc.posterior.attrs["posterior_kind"] == "sampler"


def test_compare_rejects_posteriors_of_different_training_data(pair):
    vi, hmc, other_y, other_x = pair
    assert len(bbb.compare(vi, hmc).per_input) == 5
    with pytest.raises(ValueError, match="different training data: their observed_data 'y'"):
        bbb.compare(vi, other_y)
    with pytest.raises(ValueError, match="different training data: their constant_data 'x'"):
        bbb.compare(vi, other_x)


def test_compare_rejects_swapped_arguments(pair):
    vi, hmc, _, _ = pair
    with pytest.raises(ValueError, match="vi and hmc are swapped"):
        bbb.compare(hmc, vi)
    with pytest.raises(ValueError, match="hmc must be a sampler's reference"):
        bbb.compare(vi, vi)
    del hmc  # two samplers (say NUTS against ChEES-HMC) are a legitimate comparison
    _, ref, _, _ = pair
    assert len(bbb.compare(ref, ref).per_input) == 5


def test_non_finite_results_are_value_errors_naming_the_argument():
    model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0.0, 1.0))
    # 3e38 fits float32 (max 3.4e38); times a weight of 10 it overflows to inf.
    draws = {"weight": torch.full((3, 1, 1), 10.0), "bias": torch.zeros(3, 1)}
    with pytest.raises(ValueError, match="x: the network output is not finite"):
        bbb.predict(model, draws, torch.tensor([[3e38]]))
    nan_draws = {"weight": torch.full((3, 1, 1), float("nan")), "bias": torch.zeros(3, 1)}
    with pytest.raises(ValueError, match="posterior: the draws of site 'weight' contain NaN"):
        bbb.predict(model, nan_draws, torch.ones(2, 1))
    guide = _fitted(model, _f32(X3[:, :1]), _f32(Y1))
    with pytest.raises(ValueError, match="x, y: the log joint lp is not finite"):
        # finite in float32, but squared residuals of 1e30 overflow it
        bbb.to_inference_data(model, guide, _f32(X3[:, :1]), _f32(Y1) * 1e30, num_samples=5)
