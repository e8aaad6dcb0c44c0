"""Property-based tests: odd but plausible input never gives a silent non-finite result.

Over tiny networks (1-4 inputs, 0-1 hidden layers of 1-4 units) and odd data
(float64 numpy, integer arrays, nested lists, column targets, wrong shapes, NaN,
values near the float32 limit, complex numbers), ``fit``, ``predict``,
``to_inference_data`` and ``compare`` either return finite numbers or raise a
ValueError / TypeError / NonFiniteLossError whose message names an argument.
Examples and epochs are few, so the whole file runs in well under 40 s.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import pyro_bbb as bbb

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: F401

#: Words an error message may name: the arguments of the functions under test
#: (NonFiniteLossError names the step and the site or parameter instead).
ARGUMENT = re.compile(r"\b(x|y|x_test|y_test|num_samples|seed|noise|posterior|vi|hmc|step)\b")
ALLOWED = (ValueError, TypeError, bbb.NonFiniteLossError)
SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no 'explain' phase: minutes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

N = 6  # rows


@st.composite
def networks(draw):
    """(model, features, task, outputs) for a tiny network."""
    features = draw(st.integers(1, 4))
    hidden = draw(st.sampled_from([0, 1, 2, 4]))
    task = draw(st.sampled_from(["regression", "classification"]))
    outputs = draw(st.integers(1, 2)) if task == "regression" else draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 3)))
    if hidden:
        act = draw(st.sampled_from([torch.nn.Tanh, torch.nn.ReLU]))
        net = torch.nn.Sequential(torch.nn.Linear(features, hidden), act(), torch.nn.Linear(hidden, outputs))
    else:
        net = torch.nn.Linear(features, outputs)
    if draw(st.booleans()):
        net = net.double()
    prior = dist.Normal(0.0, 1.0)
    if task == "regression":
        model = bbb.BayesianRegressor(net, prior=prior, noise=draw(st.sampled_from([0.1, 1.0, "learned"])))
    else:
        model = bbb.BayesianClassifier(net, prior=prior)
    return model, features, task, outputs


#: Odd data, each drawn with probability 1/12 per argument (else the data are sound,
#: in one of several containers and dtypes), so that most examples reach every function.
ODD = ["wrong shape", "nan", "huge", "complex"]


def _kind(draw):
    return draw(st.sampled_from(ODD + ["ok"] * 8))


def _container(draw, a):
    """The same data as float64 numpy, a float32 tensor, an integer array or a nested list."""
    kind = draw(st.sampled_from(["numpy", "tensor", "list", "int"]))
    if kind == "tensor":
        return torch.as_tensor(a, dtype=torch.float32 if a.dtype.kind == "f" else None)
    if kind == "list":
        return a.tolist()
    if kind == "int" and a.dtype.kind == "f" and np.isfinite(a).all() and np.abs(a).max() < 1e15:
        return np.round(a).astype(np.int64)
    return a


def _real(draw, shape, kind):
    a = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    if kind == "nan":
        a.flat[0] = np.nan
    elif kind == "huge":
        a *= draw(st.sampled_from([1e6, 1e30, 1e300]))
    return a + 1j if kind == "complex" else _container(draw, a)


@st.composite
def inputs(draw, features):
    kind = _kind(draw)
    shape = (N, features)
    if kind == "wrong shape":
        shape = draw(st.sampled_from([(N,), (N, features + 1), (N, features, 1)]))
        shape = (N, features + 1) if shape == (N,) and features == 1 else shape
    elif features == 1 and draw(st.booleans()):
        shape = (N,)  # one feature: 1-D x is fine
    return _real(draw, shape, kind)


@st.composite
def targets(draw, task, outputs):
    kind = _kind(draw)
    if task == "classification":
        k = max(outputs, 2)
        labels = np.random.default_rng(draw(st.integers(0, 99))).integers(0, k, N)
        if kind == "wrong shape":
            labels = np.stack([labels, labels], 1)
        elif kind == "nan":
            labels = labels.astype(np.float64) + 0.5  # not integers
        elif kind == "huge":
            labels[0] = k  # out of range
        elif draw(st.booleans()):
            labels = labels[:, None]  # a column is fine
        return labels + 1j if kind == "complex" else _container(draw, labels)
    shape = (N,) if outputs == 1 else (N, outputs)
    if kind == "wrong shape":
        shape = (N, outputs + 1)
    elif outputs == 1 and draw(st.booleans()):
        shape = (N, 1)  # a column is fine
    return _real(draw, shape, kind)


def _check_error(err: BaseException, where: str):
    event(f"{where}: {type(err).__name__}: {str(err)[:70]}")
    assert isinstance(err, ALLOWED), f"{type(err).__name__}: {err}"
    assert ARGUMENT.search(str(err)), f"the message names no argument: {err}"


def _finite(*tensors):
    for t in tensors:
        assert np.isfinite(np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t)).all()


def _fit(model, x, y, epochs):
    pyro.clear_param_store()
    guide = bbb.BBBGuide(model)
    history = bbb.fit(model, guide, x, y, epochs=epochs, lr=0.01, progress=False, seed=0)
    _finite(history.loss, history.log_likelihood, history.kl)
    return guide


@SETTINGS
@given(data=st.data())
def test_fit_and_predict_give_finite_numbers_or_name_the_argument(data):
    model, features, task, outputs = data.draw(networks())
    x, y = data.draw(inputs(features)), data.draw(targets(task, outputs))
    try:
        guide = _fit(model, x, y, data.draw(st.integers(1, 3)))
    except ALLOWED as err:
        _check_error(err, "fit")
        return
    except BaseException as err:  # anything else is a defect: say what it was
        pytest.fail(f"fit raised {type(err).__name__}: {err}")
    x_new = data.draw(inputs(features))
    num_samples = data.draw(st.sampled_from([None, 1, 2, 5]))
    try:
        pred = bbb.predict(model, guide, x_new, num_samples=num_samples, seed=0)
    except ALLOWED as err:
        _check_error(err, "predict")
        return
    event("predict: finite")
    _finite(pred.f, pred.y, pred.mean, pred.std, pred.f_std)
    if task == "classification":
        _finite(pred.entropy, pred.mutual_information)


class _Reference:
    """A sampler's output as to_inference_data reads it (draws and per-draw statistics),
    made from guide draws: compare's inputs without the cost of a sampler."""

    sampler = "property-test sampler"

    def __init__(self, guide):
        draws = guide.sample_posterior(20)
        self.samples = {k: v.detach().reshape((2, 10) + v.shape[1:]) for k, v in draws.items()}
        self.sample_stats = {"diverging": np.zeros((2, 10), bool)}


@SETTINGS
@given(data=st.data())
def test_inference_data_and_compare_give_finite_numbers_or_name_the_argument(data):
    model, features, task, outputs = data.draw(networks())
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    x_fit = rng.standard_normal((N, features))
    y_fit = (rng.integers(0, max(outputs, 2), N) if task == "classification"
             else rng.standard_normal((N,) if outputs == 1 else (N, outputs)))
    guide = _fit(model, x_fit, y_fit, 2)
    x, y = data.draw(inputs(features)), data.draw(targets(task, outputs))
    x_test = data.draw(inputs(features))
    try:
        vi = bbb.to_inference_data(model, guide, x, y, x_test=x_test, num_samples=20, seed=0)
        hmc = bbb.to_inference_data(model, _Reference(guide), x, y, x_test=x_test)
    except ALLOWED as err:
        _check_error(err, "to_inference_data")
        return
    event("compare reached")
    for idata in (vi, hmc):
        for group in ("posterior", "posterior_predictive", "log_likelihood", "predictions"):
            for var in idata[group].data_vars.values():
                _finite(var.values)
    report = bbb.compare(vi, hmc)
    columns = ["vi_mean", "vi_std", "hmc_mean", "hmc_std", "w1", "coverage_50", "coverage_90"]
    _finite(report.per_input[columns].to_numpy(dtype=float))
    with pytest.raises(ValueError, match="vi and hmc are swapped"):
        bbb.compare(hmc, vi)
