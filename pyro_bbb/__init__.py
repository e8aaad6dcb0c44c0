"""pyro_bbb: Bayes by Backprop (Blundell et al. 2015) for Pyro models, judged against HMC.

Examples
--------
>>> import math, torch
>>> import pyro_bbb as bbb
>>> x, y = bbb.datasets.regression_curve(100)
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
>>> prior = bbb.ScaleMixtureNormal(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))
>>> model = bbb.BayesianRegressor(net, prior=prior, noise=0.1)
>>> guide = bbb.BBBGuide(model)
>>> history = bbb.fit(model, guide, x, y, epochs=3, progress=False)
>>> bbb.predict(model, guide, x, num_samples=10).f.shape
torch.Size([10, 100])
"""

from . import datasets
from .compare import ComparisonReport, compare
from .fast_hmc import ChEESReference, run_hmc
from .guide import BBBGuide
from .hmc import HMCReference, run_nuts
from .nn import BayesianClassifier, BayesianNetwork, BayesianRegressor, bayesianize
from .inference_data import to_inference_data
from .predict import Prediction, predict
from .prune import PrunedBBBGuide, PruneSummary, prune
from .priors import ScaleMixtureNormal
from .train import BBBLoss, History, NonFiniteLossError, fit, kl_weights

__version__ = "0.1.0"

__all__ = [
    "BBBGuide",
    "BBBLoss",
    "BayesianClassifier",
    "BayesianNetwork",
    "BayesianRegressor",
    "ChEESReference",
    "ComparisonReport",
    "HMCReference",
    "History",
    "NonFiniteLossError",
    "Prediction",
    "PruneSummary",
    "PrunedBBBGuide",
    "ScaleMixtureNormal",
    "bayesianize",
    "compare",
    "datasets",
    "fit",
    "kl_weights",
    "predict",
    "prune",
    "run_hmc",
    "run_nuts",
    "to_inference_data",
]
