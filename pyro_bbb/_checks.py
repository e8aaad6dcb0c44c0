"""Argument and data validation shared by the public functions (clear ValueErrors).

Every public function validates its arguments here, so that one kind of bad input
gets one answer everywhere.  In particular :func:`targets` is the one place that
decides the shape a model's targets ``y`` must have, used by ``fit``,
``to_inference_data``, ``run_hmc``, ``run_nuts`` and the models' own ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def unit_interval(name: str, value) -> float:
    """A number strictly between 0 and 1 (a probability such as a target acceptance)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def fraction(name: str, value) -> float:
    """A number in (0, 1]: a factor that may leave a value as it is."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def seed(value, name: str = "seed", allow_none: bool = True) -> int | None:
    """A random seed: a non-negative integer (numpy integers too, bools not), or None."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral) or value < 0:
        allowed = "a non-negative integer or None" if allow_none else "a non-negative integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def device(value, name: str = "device") -> torch.device | None:
    """A torch device that exists on this machine ("cpu", "cuda", "cuda:1", "mps"), or None."""
    if value is None:
        return None
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda:0', got {value!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={value!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name}={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={value!r}: MPS is not available on this machine")
    return dev


def noise_scale(value) -> float | str:
    """A regressor's observation noise: a finite number > 0 (not a bool), or "learned"."""
    if isinstance(value, str) and value == "learned":
        return value
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, Real)
        or not np.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"noise must be a positive float or 'learned', got {value!r}")
    return float(value)


# -- data ------------------------------------------------------------------------------
def is_model(model) -> bool:
    """A pyro_bbb model (BayesianRegressor / BayesianClassifier), not any Pyro callable."""
    return all(hasattr(model, a) for a in ("network", "output", "initial_values", "target_shape"))


def network_dtype(model) -> torch.dtype | None:
    """The dtype of a pyro_bbb model's weights (what its inputs are cast to); else None."""
    if not is_model(model):
        return None
    return next(iter(model.initial_values().values())).dtype


def as_tensor(name: str, value) -> Tensor:
    """``value`` as a real-valued tensor (arrays, lists, scalars); a clear error otherwise."""
    if isinstance(value, Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value) if isinstance(value, (list, tuple)) else value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{name} must be a numeric array or tensor, got {type(value).__name__} ({err})"
            ) from None
    if tensor.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {tensor.dtype}")
    return tensor


def _to_dtype(name: str, tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to ``dtype``: finite values that overflow it (1e300 into float32) are an error."""
    if tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if tensor.is_floating_point() and not torch.equal(torch.isfinite(cast), torch.isfinite(tensor)):
        raise ValueError(f"{name} has values too large for the network's {dtype} (|{name}| up to "
                         f"{float(tensor[torch.isfinite(tensor)].abs().max()):.3g})")
    return cast


def as_inputs(x, dtype=None, name: str = "x") -> Tensor:
    """x as a float tensor of shape (n, ...), finite; 1-D x is n rows of one feature."""
    x = as_tensor(name, x)
    x = _to_dtype(name, x, dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype()))
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    if x.dim() == 1:
        x = x[:, None]
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def inputs(model, x, name: str = "x") -> Tensor:
    """Inputs for ``model``: in its weights' dtype, finite, and of the shape its first
    layer reads (``in_features`` / ``in_channels``) where the network says so."""
    x = as_tensor(name, x)
    given = tuple(x.shape)
    x = as_inputs(x, network_dtype(model), name)
    expected = model.network.input_shape if is_model(model) else None
    if expected is not None:
        row = x.shape[1:]
        if len(row) != len(expected) or any(e is not None and e != r for e, r in zip(expected, row)):
            want = ", ".join(["n"] + ["*" if e is None else str(e) for e in expected])
            raise ValueError(
                f"{name} must have shape ({want}) for this network (its first layer reads "
                f"{_features(expected)}), got shape {given}"
            )
    return x


def _features(expected) -> str:
    if len(expected) == 1:
        return f"{expected[0]} features"
    return f"{expected[0]} channels of {len(expected) - 1}-D signals"


def targets(y, n: int, shape: tuple, classification: bool = False, dtype=None, name: str = "y") -> Tensor:
    """``y`` in the one shape the likelihood reads: ``(n, *shape)``.

    ``shape`` is the per-row target shape the model's outputs call for (``()`` for a
    one-output regressor or any classifier, ``(d,)`` for d outputs).  A trailing
    dimension of size 1 on a per-row scalar target is dropped (a column vector);
    anything else that does not match is an error, never a broadcast.  Only shapes
    and dtypes are handled here (cheap enough for every call of a model);
    :func:`model_data` checks the values.
    """
    y = as_tensor(name, y)
    shape = tuple(shape)
    if not shape and y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if tuple(y.shape) != (n,) + shape:
        if classification:
            want, why = f"({n},) or ({n}, 1)", "one class label per row"
        elif not shape:
            want, why = f"({n},) or ({n}, 1)", "one target per row: the network has 1 output"
        else:
            want = f"({n}, {', '.join(map(str, shape))})"
            why = f"the network has {shape[0]} outputs" if len(shape) == 1 else "the network's output shape"
        raise ValueError(f"{name} must have shape {want} ({why}), got shape {tuple(y.shape)}")
    if classification:
        return y if y.dtype == torch.long or y.is_floating_point() else y.long()
    target_dtype = dtype or (y.dtype if y.is_floating_point() else torch.get_default_dtype())
    return _to_dtype(name, y, target_dtype)


def model_data(model, x, y, dtype=None, names=("x", "y")) -> tuple[Tensor, Tensor]:
    """Validated (x, y): x as :func:`inputs`, y as :func:`targets`, lengths match, finite
    values, class labels integers in range.  Any Pyro model gets the generic checks;
    ``dtype`` is for those (a pyro_bbb model's data take its weights' dtype)."""
    xn, yn = names
    x = inputs(model, x, xn)
    if dtype is not None and not is_model(model):
        x = _to_dtype(xn, x, dtype)
    if y is None:
        raise ValueError(f"{yn} is required (the targets the posterior is conditioned on)")
    y = as_tensor(yn, y)
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(
            f"{xn} and {yn} must have the same number of rows, got {x.shape[0]} and "
            f"{y.shape[0] if y.dim() else 'a scalar'}"
        )
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError(f"{yn} contains NaN or inf")
    if not is_model(model):
        return x, (y.to(x.dtype) if y.is_floating_point() else y)
    classification = getattr(model, "task", None) == "classification"
    if classification and y.is_floating_point() and (y != y.round()).any():
        raise ValueError(f"{yn}: class labels must be integers")
    y = targets(y, x.shape[0], model.target_shape(x), classification, x.dtype, yn)
    if classification:
        y = y.long()
        k = model.num_classes(x)
        if (y < 0).any() or (y >= k).any():
            raise ValueError(
                f"{yn}: class labels must lie in [0, {k - 1}] for a network with {k} classes, "
                f"got range [{int(y.min())}, {int(y.max())}]"
            )
    return x, y


# -- posteriors as InferenceData (compare) ------------------------------------------------
#: sample_stats variables that only a sampler writes (ArviZ's names).
SAMPLER_STATS = ("diverging", "step_size", "tree_depth", "n_steps", "acceptance_rate", "energy")


def posterior_kind(idata) -> str | None:
    """"sampler", "variational", or None when ``idata`` does not say.

    ``to_inference_data`` writes the attr ``posterior_kind``; otherwise a sampler is
    recognised by its per-draw statistics and a variational posterior by ``log_q``.
    """
    attrs = dict(idata.posterior.attrs) if "posterior" in idata.groups() else {}
    attrs.update(getattr(idata, "attrs", None) or {})
    if attrs.get("posterior_kind") in ("sampler", "variational"):
        return attrs["posterior_kind"]
    if "sample_stats" in idata.groups():
        names = set(idata.sample_stats.data_vars)
        if names & set(SAMPLER_STATS):
            return "sampler"
        if "log_q" in names:
            return "variational"
    return None


def comparable_posteriors(vi, hmc) -> None:
    """``vi`` a scheme and ``hmc`` a sampler's reference, both fitted to the same data."""
    kinds = posterior_kind(vi), posterior_kind(hmc)
    if kinds == ("sampler", "variational"):
        raise ValueError(
            "vi and hmc are swapped: vi holds a sampler's draws and hmc a variational "
            "posterior; pass the variational posterior as vi and the reference as hmc"
        )
    if kinds[1] == "variational":
        raise ValueError(
            "hmc must be a sampler's reference (to_inference_data of run_hmc / run_nuts), "
            "got a variational posterior"
        )
    for group, var in (("observed_data", "y"), ("constant_data", "x")):
        if group not in vi.groups() or group not in hmc.groups():
            continue
        if var not in vi[group] or var not in hmc[group]:
            continue
        a, b = np.asarray(vi[group][var].values), np.asarray(hmc[group][var].values)
        # rtol 1e-6: the same data stored once in float32 and once in float64 agree to
        # float32's rounding (6e-8); different data sets differ far more.
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-6, atol=0.0, equal_nan=True):
            raise ValueError(
                f"vi and hmc were fitted to different training data: their {group} {var!r} "
                f"differ (shapes {a.shape} and {b.shape}); build both from the same x and y"
            )


# -- results ---------------------------------------------------------------------------
def finite_draws(name: str, draws) -> None:
    """Posterior draws ``{site: tensor}`` must be finite (a diverged fit gives NaN)."""
    for site, value in draws.items():
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise ValueError(f"{name}: the draws of site {site!r} contain NaN or inf")


def finite_result(name: str, value, what: str) -> None:
    """A computed quantity (outputs, log densities) must be finite: a non-finite one
    comes from data too large for the network's dtype, never a silent NaN."""
    if not bool(np.isfinite(value.detach().cpu().numpy() if isinstance(value, Tensor) else value).all()):
        raise ValueError(
            f"{name}: the {what} is not finite at some draws (inputs or targets too large for "
            "the network's dtype? standardize them)"
        )


def draws_by_chain(name: str, draws, sites=None, shapes=None) -> dict:
    """Draws ``{site: (chains, draws, *site_shape)}`` as tensors: every one of ``sites``
    present (when given), ``site_shape`` as in ``shapes`` (when known), the same
    (chains, draws) for all, finite."""
    if not draws:
        raise ValueError(f"{name} holds no draws")
    out = {}
    for site in sites if sites is not None else tuple(draws):
        if site not in draws:
            raise ValueError(f"{name}: no draws of site {site!r} (the model's sites are {list(sites)})")
        value = as_tensor(f"{name}[{site!r}]", draws[site]).detach()
        if value.dim() < 2:
            raise ValueError(
                f"{name}[{site!r}] must have shape (chains, draws, *site_shape), got {tuple(value.shape)}"
            )
        want = (shapes or {}).get(site)
        if want is not None and tuple(value.shape[2:]) != tuple(want):
            raise ValueError(
                f"{name}[{site!r}] must have shape (chains, draws, {', '.join(map(str, want))}), "
                f"got {tuple(value.shape)}"
            )
        lead = tuple(next(iter(out.values())).shape[:2]) if out else tuple(value.shape[:2])
        if tuple(value.shape[:2]) != lead:
            raise ValueError(
                f"{name}[{site!r}] has (chains, draws) = {tuple(value.shape[:2])}, expected {lead} "
                "as the other sites"
            )
        out[site] = value
    finite_draws(name, out)
    return out


# -- many schemes against one reference -------------------------------------------------
def fidelity_inputs(reference, approximations) -> None:
    """``reference`` a sampler's InferenceData, ``approximations`` a non-empty dict of them."""
    if not isinstance(approximations, Mapping) or hasattr(approximations, "groups") or not approximations:
        raise ValueError("approximations must be a non-empty dict: scheme name -> InferenceData")
    if "posterior" not in getattr(reference, "groups", lambda: [])():
        raise ValueError("reference must be an arviz.InferenceData (from to_inference_data)")
    if posterior_kind(reference) != "sampler":
        raise ValueError(
            "reference must be a sampler's posterior (to_inference_data of run_hmc / run_nuts), "
            f"got posterior_kind {posterior_kind(reference)!r}; pass the reference first"
        )


def class_probabilities(probs, labels):
    """``probs`` (n, classes) rows summing to 1 and ``labels`` (n,) integer classes."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs must be (n, classes) and labels (n,), got {probs.shape} and {labels.shape}")
    if not np.allclose(probs.sum(-1), 1.0, atol=1e-4) or (probs < 0).any():
        raise ValueError("probs rows must be probabilities summing to 1")
    return probs, labels.astype(int)
