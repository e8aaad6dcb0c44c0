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

import importlib
import sys
import types

# Public names and the module each lives in.  They are imported on first use, so that
# ``import pyro_bbb`` (and the ``pyro-bbb`` command's ``--help``) does not pay for torch,
# Pyro and ArviZ until something needs them.
_PUBLIC = {
    "ComparisonReport": "compare", "compare": "compare", "FidelityReport": "fidelity",
    "ChEESReference": "hmc.result", "HMCReference": "hmc.result", "run_hmc": "hmc.chees",
    "run_nuts": "hmc.nuts",
    "BBBGuide": "guide",
    "BayesianClassifier": "nn", "BayesianNetwork": "nn", "BayesianRegressor": "nn", "bayesianize": "nn",
    "to_inference_data": "inference_data",
    "Prediction": "predict", "predict": "predict", "as_draws": "predict",
    "PrunedBBBGuide": "prune", "PruneSummary": "prune", "prune": "prune",
    "ScaleMixtureNormal": "priors",
    "BBBLoss": "train", "History": "train", "NonFiniteLossError": "train", "fit": "train",
    "kl_weights": "train",
}


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif name in ("datasets", "schemes"):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'pyro_bbb' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; for the three named like the function
    they define (compare, predict, prune) the package keeps the function, as
    ``from .compare import compare`` would."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "BBBGuide",
    "BBBLoss",
    "BayesianClassifier",
    "BayesianNetwork",
    "BayesianRegressor",
    "ChEESReference",
    "ComparisonReport",
    "FidelityReport",
    "HMCReference",
    "History",
    "NonFiniteLossError",
    "Prediction",
    "PruneSummary",
    "PrunedBBBGuide",
    "ScaleMixtureNormal",
    "bayesianize",
    "compare",
    "as_draws",
    "datasets",
    "fit",
    "kl_weights",
    "predict",
    "prune",
    "run_hmc",
    "run_nuts",
    "schemes",
    "to_inference_data",
]
