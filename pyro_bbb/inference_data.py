"""ArviZ ``InferenceData`` for Bayes by Backprop and for the HMC reference.

:func:`to_inference_data` turns either posterior -- a fitted :class:`~pyro_bbb.BBBGuide`
or an HMC reference (:func:`pyro_bbb.hmc.run_nuts`) -- of a pyro_bbb model into one
``InferenceData`` with the *same* variable names, dimensions and coordinates, so that
``az.plot_forest([vi, hmc])``, ``az.compare`` and :func:`pyro_bbb.compare` line up
element by element.  Everything the network computes (outputs, predictive draws,
pointwise log-likelihoods) is evaluated in chunks of draws with one batched forward
pass per chunk, on the model's device, and lands on the host as numpy.

Groups and variables (``S`` draws per chain; ``n`` training rows, ``m`` test rows)::

    posterior                   <site>        (chain, draw, <site>_dim_0, ...)
    posterior_predictive        y             (chain, draw, obs[, output])
    log_likelihood              y             (chain, draw, obs)
    sample_stats                HMC: diverging, step_size, tree_depth, n_steps,
                                     energy, acceptance_rate, lp (whatever the run has)
                                BBB: lp = log p(theta, y), log_q = log q(theta);
                                     attrs["elbo"] = the ELBO trace (with history)
    observed_data               y             (obs[, output])
    constant_data               x             (obs, feature[, feature_dim_1, ...])
    predictions (x_test)        f             (chain, draw, test[, output | class])
                                prob          (chain, draw, test, class)  classifiers
                                y             (chain, draw, test[, output])
                                log_lik       (chain, draw, test)         with y_test
    predictions_constant_data   x             (test, feature[, ...])
                                y             (test[, output])           with y_test

For a one-logit (Bernoulli) classifier ``f`` is the logit of class 1, shape
``(chain, draw, test)``, and ``prob`` has two classes.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import torch
from torch import Tensor

from . import _checks
from .predict import DEFAULT_CHUNK_ROWS, as_draws, batched_outputs

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's refactor notice
    import arviz as az

__all__ = ["to_inference_data"]

#: Other samplers' names for ArviZ's ``sample_stats`` variables.
_STAT_ALIASES = {
    "divergent": "diverging",
    "divergences": "diverging",
    "accept_prob": "acceptance_rate",
    "mean_tree_accept": "acceptance_rate",
    "accept_stat": "acceptance_rate",
    "num_steps": "n_steps",
    "treedepth": "tree_depth",
    "stepsize": "step_size",
}


#: What each quantity of ``_evaluate`` is, for error messages.
_QUANTITY = {"y": "predictive draw of y", "log_lik": "pointwise log-likelihood",
             "prob": "class probability", "f": "network output"}


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _site_dims(name: str, shape) -> list[str]:
    return [f"{name}_dim_{i}" for i in range(len(shape))]


def _feature_dims(x: Tensor) -> list[str]:
    return ["feature"] + [f"feature_dim_{i}" for i in range(1, x.dim() - 1)]


def _output_dims(value_shape, leading: int, name: str) -> list[str]:
    """Names of the dims after ``leading`` ones: "output"/"class" for a last dim."""
    extra = len(value_shape) - leading
    if extra <= 0:
        return []
    if extra == 1:
        return [name]
    return [name] + [f"{name}_dim_{i}" for i in range(1, extra)]


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _evaluate(model, draws, x, y, chunk_size, classifier):
    """Network output, predictive draws and (if y) pointwise log-likelihood at x.

    Returns numpy arrays on the host, each with leading dim S; the device holds
    one chunk of draws at a time.
    """
    num_draws = next(iter(draws.values())).shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ROWS // max(1, x.shape[0]))
    out: dict[str, np.ndarray] = {}

    def put(key, value, start):
        # One host array per quantity, filled chunk by chunk (no list of chunks to
        # concatenate: that doubles the peak and fragments the heap).
        value = _numpy(value)
        if key not in out:
            out[key] = np.empty((num_draws,) + value.shape[1:], dtype=value.dtype)
        out[key][start : start + value.shape[0]] = value

    with torch.no_grad():
        for i in range(0, num_draws, chunk_size):
            chunk = {k: v[i : i + chunk_size] for k, v in draws.items()}
            f = batched_outputs(model, chunk, x, chunk_size)
            likelihood = model.likelihood(f, model._lift(chunk, f))
            put("y", likelihood.sample(), i)
            if y is not None:
                put("log_lik", likelihood.log_prob(y), i)
            if classifier:
                if f.dim() == 2 or f.shape[-1] == 1:  # one logit: Bernoulli
                    f = f.reshape(f.shape[:2])
                    p1 = torch.sigmoid(f)
                    prob = torch.stack([1 - p1, p1], -1)
                else:
                    prob = torch.softmax(f, -1)
                put("prob", prob, i)
            put("f", f, i)
    return out


def _log_joint(model, draws, x, y, chunk_size) -> np.ndarray:
    num_draws = next(iter(draws.values())).shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ROWS // max(1, x.shape[0]))
    with torch.no_grad():
        return np.concatenate(
            [
                _numpy(model.log_joint({k: v[i : i + chunk_size] for k, v in draws.items()}, x, y))
                for i in range(0, num_draws, chunk_size)
            ]
        )


def to_inference_data(
    model,
    posterior,
    x,
    y,
    *,
    x_test=None,
    y_test=None,
    num_samples: int = 500,
    history=None,
    seed: int | None = None,
    chunk_size: int | None = None,
):
    """ArviZ ``InferenceData`` of a BBB guide or an HMC reference, with shared names.

    Parameters
    ----------
    model : BayesianRegressor or BayesianClassifier
        The pyro_bbb model both posteriors belong to.
    posterior : BBBGuide, Pyro AutoGuide, MCMC, HMC reference or dict of draws
        Anything :func:`pyro_bbb.predict.as_draws` reads;         A fitted guide (``num_samples`` draws from q, stored as 1 chain) or the
        result of :func:`pyro_bbb.hmc.run_nuts` (or any object with ``samples``
        ``{site: (chains, draws, *shape)}`` and ``sample_stats``; all its chains and
        draws are kept and ``num_samples`` is ignored).
    x, y : array-like
        The training data the posterior was fitted to (for ``posterior_predictive``,
        ``log_likelihood``, ``observed_data``, ``constant_data`` and BBB's ``lp``),
        validated as in :func:`pyro_bbb.fit` (cast to the weights' dtype, shapes the
        network reads, ``y`` in the shape of its outputs).
    x_test, y_test : array-like, optional
        Inputs at which to store ``predictions`` (network output ``f``, class
        probabilities ``prob`` for classifiers, predictive draws ``y``) and, with
        ``y_test``, the pointwise test log-likelihood ``log_lik``.
    num_samples : int, default 500
        Draws from a guide.
    history : pyro_bbb.History, optional
        BBB's training record; its ELBO trace becomes ``sample_stats.attrs["elbo"]``.
    seed : int, optional
        Seeds the guide's draws and the predictive draws (the caller's global
        random stream is left untouched when given).
    chunk_size : int, optional
        Draws per batched forward pass (default: about 2.6e5 rows of draws x
        inputs), which bounds the device memory.

    Returns
    -------
    arviz.InferenceData
        Groups ``posterior``, ``posterior_predictive``, ``log_likelihood``,
        ``sample_stats``, ``observed_data``, ``constant_data`` and, with ``x_test``,
        ``predictions`` and ``predictions_constant_data``; see the module docstring
        for variables and dims.  Every group's attrs (and ``idata.attrs``) hold
        ``inference`` ("bbb" or the sampler's name), ``posterior_kind``
        ("variational" for a guide, "sampler" for a reference: what
        :func:`pyro_bbb.compare` reads to tell the sides apart), ``settings``
        (JSON string), ``task`` and ``num_hidden_layers``.

    Notes
    -----
    BBB's ``lp`` is ``log p(theta, y)`` in the sites' constrained space, the same
    space as ``log_q``, so ``lp - log_q`` are importance log-weights of q.  Pyro
    NUTS's ``lp`` is read in its unconstrained space (it adds the log-Jacobian of
    constrained sites such as a learned noise; the two agree for real-valued
    weights).

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> from pyro_bbb.inference_data import to_inference_data
    >>> x = torch.linspace(-1, 1, 20)[:, None]
    >>> y = 2 * x[:, 0] + 0.1 * torch.randn(20)
    >>> model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0.0, 1.0), noise=0.1)
    >>> guide = bbb.BBBGuide(model)
    >>> hist = bbb.fit(model, guide, x, y, epochs=20, progress=False, seed=0)
    >>> idata = to_inference_data(model, guide, x, y, x_test=torch.zeros(3, 1),
    ...                           num_samples=100, history=hist, seed=0)
    >>> idata.posterior["weight"].dims
    ('chain', 'draw', 'weight_dim_0', 'weight_dim_1')
    >>> idata.predictions["f"].shape
    (1, 100, 3)
    >>> idata.posterior.attrs["inference"]
    'bbb'
    """
    _check_model(model)
    num_samples = _checks.positive_int("num_samples", num_samples)
    if chunk_size is not None:
        chunk_size = _checks.positive_int("chunk_size", chunk_size)
    seed = _checks.seed(seed)
    if history is not None and not hasattr(history, "elbo"):
        raise ValueError(
            f"history must be a pyro_bbb History (from fit) or None, got {type(history).__name__}"
        )
    x, y, x_test, y_test = _data(model, x, y, x_test, y_test)
    ref = next(iter(model.initial_values().values()))
    # One seeded stream for the guide's draws and then the predictive draws (one seed
    # for both streams would correlate the weights' noise with the observations').
    with torch.random.fork_rng(devices=_rng_devices(ref.device), enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        draws = as_draws(posterior, model, x, y, num_samples=num_samples)
        flat = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in draws.flat().items()}
        attrs = _attrs(model, posterior, draws, num_samples, seed, history)
        build = _Builder(attrs, draws.num_chains, draws.num_draws, x)
        # The log joint is checked first: its error names the data (x, y) it overflows on.
        sample_stats = _sample_stats(build, model, draws, flat, x, y, chunk_size, history)
        train, test = _evaluate_all(model, flat, x, y, x_test, y_test, chunk_size)
    groups = {"posterior": build.dataset(
        {k: _numpy(v) for k, v in draws.values.items()},
        {k: _site_dims(k, v.shape[2:]) for k, v in draws.values.items()},
    )}
    groups.update(_training_groups(build, train, x, y))
    groups["sample_stats"] = sample_stats
    if test is not None:
        groups.update(_prediction_groups(build, test, x_test, y_test, attrs["task"] == "classification"))
    return az.InferenceData(attrs=dict(attrs), **groups)


def _check_model(model) -> None:
    for attr in ("output", "log_likelihood", "log_joint", "sample_y", "latent_names", "initial_values"):
        if not hasattr(model, attr):
            raise ValueError(
                "model must be a pyro_bbb model (BayesianRegressor / BayesianClassifier), "
                f"got {type(model).__name__} without {attr!r}"
            )


def _data(model, x, y, x_test, y_test):
    """Validated training and test data on the model's device."""
    device = next(iter(model.initial_values().values())).device

    def on_device(name, value):  # validation may run the network (a classifier's class count)
        return None if value is None else _checks.as_tensor(name, value).to(device)

    x, y = _checks.model_data(model, on_device("x", x), on_device("y", y))
    if y_test is not None and x_test is None:
        raise ValueError("y_test is given without x_test")
    if x_test is not None:
        if y_test is not None:
            x_test, y_test = _checks.model_data(
                model, on_device("x_test", x_test), on_device("y_test", y_test), names=("x_test", "y_test")
            )
        else:
            x_test = _checks.inputs(model, on_device("x_test", x_test), "x_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"x_test must have the same feature shape as x, got {tuple(x_test.shape[1:])} "
                f"and {tuple(x.shape[1:])}"
            )
    return x, y, x_test, y_test


def _evaluate_all(model, flat, x, y, x_test, y_test, chunk_size):
    """Outputs, predictive draws and log-likelihoods at the training and test inputs, checked finite."""
    classifier = getattr(model, "task", None) == "classification"
    train = _evaluate(model, flat, x, y, chunk_size, classifier)
    test = _evaluate(model, flat, x_test, y_test, chunk_size, classifier) if x_test is not None else None
    for key, value in train.items():
        _checks.finite_result("x, y" if key == "log_lik" else "x", value, _QUANTITY[key])
    for key, value in (test or {}).items():
        _checks.finite_result("x_test, y_test" if key == "log_lik" else "x_test", value, _QUANTITY[key])
    return train, test


def _attrs(model, posterior, draws, num_samples, seed, history) -> dict:
    """The attrs of every group: ``inference``, ``posterior_kind``, ``posterior_type``,
    ``settings`` (JSON), ``task``, ``num_hidden_layers``."""
    if draws.kind == "variational":
        settings = {
            "num_samples": num_samples,
            "seed": seed,
            "init_scale": getattr(posterior, "init_scale", None),
            "guide": type(posterior).__name__,
        }
        if history is not None:
            elbo = np.asarray(history.elbo, dtype=np.float64)
            settings.update(
                steps=int(len(elbo)),
                seconds=float(getattr(history, "seconds", math.nan)),
                interrupted=bool(getattr(history, "interrupted", False)),
                final_elbo=float(elbo[-1]) if len(elbo) else None,
            )
    elif hasattr(posterior, "kernel"):  # pyro.infer.MCMC
        settings = {k: getattr(posterior, k, None) for k in ("num_samples", "warmup_steps", "num_chains")}
    else:
        settings = dict(getattr(posterior, "settings", {}) or {})
        settings["wall_time"] = float(getattr(posterior, "wall_time", math.nan))
    return {
        "inference": draws.inference,
        "posterior_kind": draws.kind,
        "posterior_type": type(posterior).__name__,
        "settings": json.dumps(settings, default=str, sort_keys=True),
        "task": str(getattr(model, "task", "unknown")),
        "num_hidden_layers": int(model.network.num_hidden_layers),
    }


class _Builder:
    """ArviZ datasets with shared attrs and coordinates (chain, draw, obs, feature...)."""

    def __init__(self, attrs, num_chains, num_draws, x):
        self.attrs, self.shape = attrs, (num_chains, num_draws)
        self.coords = {"chain": np.arange(num_chains), "draw": np.arange(num_draws), "obs": np.arange(x.shape[0])}
        for i, size in enumerate(x.shape[1:]):
            self.coords[_feature_dims(x)[i]] = np.arange(size)

    def chains(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(self.shape + a.shape[1:])

    def dataset(self, data, dims, default_dims=None, extra_attrs=None):
        for name, value in data.items():
            lead = 2 if default_dims is None else len(default_dims)
            for dim, size in zip(dims[name], value.shape[lead:]):
                self.coords.setdefault(dim, np.arange(size))
        used = {d for name in data for d in dims[name]} | set(default_dims or ("chain", "draw"))
        with warnings.catch_warnings():
            # "More chains than draws" is ArviZ's guess at a transposed array; the
            # dims here are explicit, and run_hmc's many short chains are deliberate.
            warnings.filterwarnings("ignore", message="More chains")
            return az.dict_to_dataset(
                data,
                attrs={**self.attrs, **(extra_attrs or {})},
                coords={k: v for k, v in self.coords.items() if k in used},
                dims=dims,
                default_dims=default_dims,
            )


def _training_groups(build, train, x, y) -> dict:
    """posterior_predictive, log_likelihood, observed_data and constant_data."""
    y_np = _numpy(y)
    y_dims = ["obs"] + _output_dims(y_np.shape, 1, "output")
    return {
        "posterior_predictive": build.dataset({"y": build.chains(train["y"])}, {"y": y_dims}),
        "log_likelihood": build.dataset({"y": build.chains(train["log_lik"])}, {"y": ["obs"]}),
        "observed_data": build.dataset({"y": y_np}, {"y": y_dims}, default_dims=[]),
        "constant_data": build.dataset({"x": _numpy(x)}, {"x": ["obs"] + _feature_dims(x)}, default_dims=[]),
    }


def _sample_stats(build, model, draws, flat, x, y, chunk_size, history):
    """A sampler's per-draw statistics; otherwise lp = log p(theta, y) and (a guide's) log_q."""
    if draws.kind == "sampler":
        stats = {}
        for name, value in (draws.sample_stats or {}).items():
            name = _STAT_ALIASES.get(name, name)
            if value.shape[:2] != build.shape:
                raise ValueError(
                    f"posterior.sample_stats[{name!r}] has shape {value.shape}, expected "
                    f"(chains, draws) = {build.shape} leading"
                )
            stats[name] = value
        return build.dataset(stats, {k: [f"{k}_dim_{i}" for i in range(v.ndim - 2)] for k, v in stats.items()})
    lp = _log_joint(model, flat, x, y, chunk_size)
    _checks.finite_result("x, y", lp, "log joint lp")
    stats = {"lp": build.chains(lp)}
    if draws.log_q is not None:
        log_q = _numpy(draws.log_q)
        _checks.finite_result("posterior", log_q, "log density log_q")
        stats["log_q"] = log_q
    extra = {"elbo": np.asarray(history.elbo, dtype=np.float64)} if history is not None else None
    return build.dataset(stats, {k: [] for k in stats}, extra_attrs=extra)


def _prediction_groups(build, test, x_test, y_test, classifier) -> dict:
    """predictions (f, y, prob for classifiers, log_lik with y_test) and their constant data."""
    build.coords["test"] = np.arange(x_test.shape[0])
    f_name = "class" if classifier else "output"
    pred = {"f": build.chains(test["f"]), "y": build.chains(test["y"])}
    pred_dims = {
        "f": ["test"] + _output_dims(test["f"].shape, 2, f_name),
        "y": ["test"] + _output_dims(test["y"].shape, 2, "output"),
    }
    if classifier:
        pred["prob"] = build.chains(test["prob"])
        pred_dims["prob"] = ["test", "class"]
    if y_test is not None:
        pred["log_lik"] = build.chains(test["log_lik"])
        pred_dims["log_lik"] = ["test"]
    const = {"x": _numpy(x_test)}
    const_dims = {"x": ["test"] + _feature_dims(x_test)}
    if y_test is not None:
        yt = _numpy(y_test)
        const["y"] = yt
        const_dims["y"] = ["test"] + _output_dims(yt.shape, 1, "output")
    return {
        "predictions": build.dataset(pred, pred_dims),
        "predictions_constant_data": build.dataset(const, const_dims, default_dims=[]),
    }
