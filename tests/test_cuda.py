"""End to end on a CUDA device: every piece keeps priors, parameters, data and draws on the
GPU and hands InferenceData back as numpy.  Skipped without a GPU."""

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_bbb as bbb

pytestmark = pytest.mark.cuda


def _problem(device):
    torch.manual_seed(0)
    x, y = bbb.datasets.regression_curve(60, seed=0)
    net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    prior = {"*.bias": dist.Normal(0.0, 1.0), "*": bbb.ScaleMixtureNormal(0.5, 1.0, math.exp(-6))}
    model = bbb.BayesianRegressor(net, prior=prior, noise="learned").to(device)
    return model, bbb.BBBGuide(model), x.to(device), y.to(device)


@pytest.mark.parametrize("estimator,compile", [("weights", False), ("weights", True), ("local_reparam", True)])
def test_fit_predict_inference_data_on_cuda_match_cpu(estimator, compile):
    runs = {}
    for device in ("cpu", "cuda"):
        model, guide, x, y = _problem(device)
        hist = bbb.fit(model, guide, x, y, epochs=5, num_particles=2, kl="analytic", estimator=estimator,
                       compile=compile, seed=0, progress=False)
        assert all(p.device.type == device for p in guide.parameters())
        pred = bbb.predict(model, guide, x, num_samples=20, seed=0)
        assert pred.f.device.type == device
        idata = bbb.to_inference_data(model, guide, x, y, x_test=x[:5], num_samples=20, seed=0)
        assert isinstance(idata.posterior["0.weight"].values, np.ndarray)
        runs[device] = hist.loss
    # Different RNG streams on the two devices: compare the deterministic first loss only
    # loosely (same initial guide, different weight noise): both finite and of one scale.
    assert all(math.isfinite(v) for v in runs["cuda"])
    assert abs(math.log(abs(runs["cuda"][0])) - math.log(abs(runs["cpu"][0]))) < 1.0


def test_run_nuts_on_cuda():
    model, guide, x, y = _problem("cuda")
    ref = bbb.run_nuts(model, x, y, num_samples=5, warmup_steps=5, num_chains=1, max_tree_depth=3, progress=False)
    assert ref.samples["0.weight"].device.type == "cpu"
    idata = bbb.to_inference_data(model, ref, x, y, x_test=x[:5])
    assert np.isfinite(idata.predictions["f"].values).all()
