"""Bayes by Backprop against the HMC reference: metrics, a report, pictures.

:func:`compare` reads two ``InferenceData`` built by
:func:`pyro_bbb.inference_data.to_inference_data` -- one from a BBB guide, one
from an HMC reference of the same model -- and returns a :class:`ComparisonReport`.

Function space comes first.  A neural network's weights are not identifiable
(hidden units permute, signs flip: many weight vectors give the same function),
so VI and HMC are compared through the marginals of the network output ``f(x*)``
(for classifiers the probability of the last class) at each test input: the
ratio of predictive stds, the standardized mean difference, the 1-Wasserstein
distance between the two marginals, and how many HMC draws VI's 50% / 90%
central intervals cover.  Inputs near the training data and away from it are
summarized apart: mean-field VI is known to be over-confident away from the data.

Then, where the data allow: test error and mean log predictive density, PSIS-LOO
(Vehtari, Gelman & Gabry 2017) of both, the PSIS k-hat of the variational
posterior itself (Yao, Vehtari, Simpson & Gelman 2018), the convergence of the
reference (R-hat, bulk/tail ESS, divergences: a reference that has not converged
is no ground truth), and weight-space statistics that mean something only for
models without hidden layers.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from scipy.special import logsumexp
from scipy.stats import wasserstein_distance

from . import _checks
from .hmc.diagnostics import (ESS_MIN, RHAT_MAX, convergence_problems, f_diagnostics,
                               rhat_passes)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's refactor notice
    import arviz as az

__all__ = ["ComparisonReport", "compare", "khat_reading", "rhat_passes", "RHAT_MAX", "ESS_MIN",
           "PARETO_K_MAX", "plot_reference_chains", "reference_chain_quantities",
           "REFERENCE_PICTURES", "REFERENCE_PICTURES_NOTE"]

#: Pareto k above which PSIS (LOO or the VI diagnostic) is unreliable.
PARETO_K_MAX = 0.7

#: The reference's chain pictures (:func:`plot_reference_chains`), and what to look for in them.
REFERENCE_PICTURES = ("reference_trace.png", "reference_rank.png")
REFERENCE_PICTURES_NOTE = (
    "The reference's chains on quantities a network identifies (the noise std where it is learned, "
    "f(x*) at three test inputs, a classifier's last-class probability; never weights, which "
    "permute): in the trace plot the chains should overlap, each wandering over the same range "
    "with no trend, and in the rank plot each chain's histogram of ranks should be flat (a sloped "
    "or humped one sampled another region)."
)


IDENTIFIABLE_NOTE = "meaningful: no hidden layer, the weights are identifiable"
NOT_IDENTIFIABLE_NOTE = "not identifiable: units permute and flip signs; read function space instead"

_SECTION_TITLES = {
    "function space": "Function space: predictive marginals at x*",
    "test data": "Test data",
    "psis-loo": "PSIS-LOO",
    "vi diagnostics": "VI diagnostics: PSIS k-hat of q",
    "hmc convergence": "HMC reference convergence",
    "weight space": "Weight space",
}

_TABLE_COLUMNS = ["section", "metric", "scope", "vi", "hmc", "value", "note"]

#: Per-input metrics summarized in the table: (column, ideal value, how "worst" is read).
_SUMMARIZED = (
    ("std_ratio", 1.0, "log"),
    ("smd", 0.0, "abs"),
    ("w1", 0.0, "max"),
    ("coverage_50", 0.5, "abs"),
    ("coverage_90", 0.9, "abs"),
)


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------
@dataclass
class ComparisonReport:
    """What :func:`compare` found.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per metric, columns ``section, metric, scope, vi, hmc, value,
        note``.  Sections: ``"function space"`` (``std_ratio``, ``smd``, ``w1``,
        ``coverage_50``, ``coverage_90`` as ``_median`` and ``_worst``, and
        ``num_inputs``, each for scope ``"in_data"`` and ``"away"``),
        ``"test data"`` (``rmse`` or ``error_rate``, ``mlpd``), ``"psis-loo"``
        (``elpd_loo``, ``elpd_loo_se``, ``p_loo``, ``pareto_k_gt_0.7``),
        ``"vi diagnostics"`` (``psis_khat``), ``"hmc convergence"`` (``max_rhat``,
        ``min_ess_bulk``, ``min_ess_tail``, ``divergences``), ``"weight space"``
        (``std_ratio_median``, ``smd_median`` per site).
    per_input : pandas.DataFrame
        One row per test input (and output): ``test``, ``output``, ``x`` (first
        feature), ``in_data``, ``vi_mean, vi_std, hmc_mean, hmc_std``,
        ``std_ratio, smd, w1, coverage_50, coverage_90`` and the 5/25/50/75/95%
        quantiles ``vi_q05 ... hmc_q95``.
    weight_space : pandas.DataFrame
        One row per posterior site: ``site, size, std_ratio_median, std_ratio_min,
        std_ratio_max, smd_median, smd_max_abs, identifiable, note``.
    warnings : list of str
        Reasons not to trust a number (unconverged reference, high Pareto k, ...).
    weight_elements : pandas.DataFrame
        One row per posterior element: ``site, element`` (flat index), ``label``
        (``"site[i, j]"``), ``vi_mean, vi_std, hmc_mean, hmc_std, std_ratio, smd``.
        Read it only where ``weight_space.identifiable``.

    Examples
    --------
    >>> report = compare(vi, hmc)  # doctest: +SKIP
    >>> report.get("std_ratio_median", "away")  # doctest: +SKIP
    0.62
    >>> report.table.query("section == 'hmc convergence'")  # doctest: +SKIP
    >>> open("report.md", "w").write(report.to_markdown())  # doctest: +SKIP
    >>> report.plot("report/")  # doctest: +SKIP
    [PosixPath('report/predictive_bands.png'), ...]
    """

    table: pd.DataFrame
    per_input: pd.DataFrame
    weight_space: pd.DataFrame
    warnings: list = field(default_factory=list)
    weight_elements: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    vi: object = field(default=None, repr=False)
    hmc: object = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"ComparisonReport({len(self.table)} metrics, {len(self.per_input)} test rows, "
            f"{len(self.weight_space)} sites, {len(self.warnings)} warnings)"
        )

    # -- lookup --------------------------------------------------------------------
    def get(self, metric: str, scope: str | None = None, column: str = "value") -> float:
        """One number of the table, e.g. ``report.get("std_ratio_median", "in_data")``."""
        rows = self.table[self.table.metric == metric]
        if scope is not None:
            rows = rows[rows.scope == scope]
        if len(rows) != 1:
            raise KeyError(f"{len(rows)} rows for metric={metric!r}, scope={scope!r}")
        return float(rows.iloc[0][column])

    # -- export --------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready: plain floats/ints/str/bool, NaN and inf as None.

        Examples
        --------
        >>> import json
        >>> json.dumps(report.to_dict())  # doctest: +SKIP
        """
        return {
            "table": _records(self.table),
            "per_input": _records(self.per_input),
            "weight_space": _records(self.weight_space),
            "weight_elements": _records(self.weight_elements),
            "warnings": [str(w) for w in self.warnings],
            "inference": {
                "vi": _attr(self.vi, "inference"),
                "hmc": _attr(self.hmc, "inference"),
            },
        }

    def to_markdown(self, max_input_rows: int = 20) -> str:
        """The report as Markdown: one table per section, warnings, a per-input excerpt.

        ``max_input_rows`` rows of ``per_input``, evenly spaced, are shown.
        """
        lines = ["# BBB vs HMC", ""]
        vi_name, hmc_name = _attr(self.vi, "inference"), _attr(self.hmc, "inference")
        if vi_name or hmc_name:
            lines += [f"VI: `{vi_name}`; reference: `{hmc_name}`.", ""]
        if self.warnings:
            lines += ["## Warnings", ""] + [f"- {w}" for w in self.warnings] + [""]
        for section, title in _SECTION_TITLES.items():
            rows = self.table[self.table.section == section]
            if rows.empty or section == "weight space":
                continue
            lines += [f"## {title}", ""]
            cols = [c for c in ("metric", "scope", "vi", "hmc", "value", "note") if rows[c].notna().any()]
            lines += [_markdown_table(rows[cols]), ""]
        if not self.weight_space.empty:
            ws = self.weight_space
            lines += [
                f"## {_SECTION_TITLES['weight space']}",
                "",
                f"Per site, over its elements ({ws.note.iloc[0]}).",
                "",
                _markdown_table(ws.drop(columns=["note", "identifiable"])),
                "",
            ]
            if bool(ws.identifiable.all()) and 0 < len(self.weight_elements) <= 50:
                lines += [
                    "Per element:",
                    "",
                    _markdown_table(self.weight_elements.drop(columns=["site", "element"])),
                    "",
                ]
        if not self.per_input.empty:
            n = len(self.per_input)
            keep = np.unique(np.linspace(0, n - 1, min(n, max_input_rows)).round().astype(int))
            cols = ["test", "output", "x", "in_data", "vi_mean", "hmc_mean", "vi_std", "hmc_std",
                    "std_ratio", "smd", "w1", "coverage_50", "coverage_90"]
            lines += [
                "## Per test input",
                "",
                f"{len(keep)} of {n} rows.",
                "",
                _markdown_table(self.per_input.iloc[keep][cols]),
                "",
            ]
        return "\n".join(lines)

    # -- pictures --------------------------------------------------------------------
    def plot(self, folder) -> list[Path]:
        """Write the report's pictures as PNG files into ``folder``; return their paths.

        ``predictive_bands.png`` and ``std_ratio.png`` for 1-D inputs,
        ``std_scatter.png`` always, ``elbo.png`` when the VI data carry the ELBO
        trace, ``forest.png`` (at most 4 posterior variables, first 5 elements
        along each of their dims) when both posteriors have the same variables.
        (The report folder adds the reference's chains: :func:`plot_reference_chains`.)
        Files are written atomically (a temporary file in ``folder``, then
        ``os.replace``); figures are made without pyplot, so the caller's
        matplotlib backend and open figures are left alone.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        first = self.per_input[self.per_input.output == self.per_input.output.min()]
        first = first.sort_values("x", kind="stable")
        if self.vi is not None and _input_dim(self.vi) == 1:
            written.append(_save(_plot_bands(first, self.vi), folder / "predictive_bands.png"))
            written.append(_save(_plot_std_ratio(first, self.vi), folder / "std_ratio.png"))
        written.append(_save(_plot_std_scatter(self.per_input), folder / "std_scatter.png"))
        elbo = _elbo(self.vi)
        if elbo is not None and len(elbo):
            written.append(_save(_plot_elbo(elbo), folder / "elbo.png"))
        fig = _plot_forest(self.vi, self.hmc)
        if fig is not None:
            written.append(_save(fig, folder / "forest.png"))
        return written


# ----------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------
def compare(vi, hmc, *, in_data=None) -> ComparisonReport:
    """Compare a BBB posterior with an HMC reference, function space first.

    Parameters
    ----------
    vi, hmc : arviz.InferenceData
        From :func:`pyro_bbb.inference_data.to_inference_data` of the same model,
        the same training data and the same ``x_test`` (so both have a
        ``predictions`` group): ``vi`` from the guide, ``hmc`` from the reference.
        A ValueError says so when their ``observed_data`` / ``constant_data``
        differ, or when ``hmc`` is a variational posterior (swapped arguments).
    in_data : array of bool, shape (num_test,), optional
        Which test inputs count as "in the data".  Default: those whose distance
        to the nearest training input is at most the largest nearest-neighbour
        distance among the training inputs (Euclidean, on flattened features).

    Returns
    -------
    ComparisonReport
        ``table``, ``per_input``, ``weight_space``, ``warnings``; ``to_dict()``,
        ``to_markdown()``, ``plot(folder)``.

    Notes
    -----
    Per test input (for classifiers: the probability of the last class):
    ``std_ratio = std_vi / std_hmc`` (ideal 1; mean-field VI is mostly < 1, above all away from the data),
    ``smd = (mean_vi - mean_hmc) / std_hmc`` (ideal 0), ``w1`` the 1-Wasserstein
    distance of the two sets of draws (ideal 0, in the units of f), and
    ``coverage_50`` / ``coverage_90`` the fraction of HMC draws inside VI's
    central 50% / 90% interval (ideal 0.5 / 0.9).  "Worst" is the value farthest
    from the ideal (for the std ratio: largest ``|log ratio|``, sign kept).

    The VI k-hat uses ``lp - log_q`` from ``vi.sample_stats`` as importance
    log-weights of q; k < 0.5 reads "good", 0.5-0.7 "usable", > 0.7 "unreliable"
    (Yao et al. 2018).  For a BNN, k-hat is usually large: q misses most of the
    posterior's (multimodal, permutation-symmetric) mass even when its
    predictions are good, which is why function space is the primary view.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> from pyro_bbb.hmc import run_nuts
    >>> from pyro_bbb.inference_data import to_inference_data
    >>> x = torch.linspace(-1, 1, 20)[:, None]
    >>> y = 2 * x[:, 0] + 0.3 * torch.randn(20)
    >>> model = bbb.BayesianRegressor(torch.nn.Linear(1, 1), prior=dist.Normal(0.0, 1.0), noise=0.3)
    >>> guide = bbb.BBBGuide(model)
    >>> _ = bbb.fit(model, guide, x, y, epochs=300, lr=0.05, progress=False, seed=0)
    >>> ref = run_nuts(model, x, y, num_samples=100, warmup_steps=100, progress=False)
    >>> x_test = torch.linspace(-2, 2, 9)[:, None]
    >>> vi = to_inference_data(model, guide, x, y, x_test=x_test, seed=0)
    >>> hmc = to_inference_data(model, ref, x, y, x_test=x_test)
    >>> report = compare(vi, hmc)
    >>> list(report.per_input.columns[:4])
    ['test', 'output', 'x', 'in_data']
    >>> bool(report.weight_space.identifiable.all())   # no hidden layer
    True
    >>> print(report.to_markdown())  # doctest: +SKIP

    Many schemes against one reference: ``compare(reference, {"bbb": vi, ...})``
    (the reference first, then a dict name -> InferenceData) returns a
    :class:`pyro_bbb.fidelity.FidelityReport` with a row per scheme.
    """
    if isinstance(hmc, Mapping) and not isinstance(hmc, az.InferenceData):  # InferenceData is a Mapping too
        from .fidelity import compare_schemes

        return compare_schemes(vi, hmc, in_data=in_data)
    _check_idata("vi", vi)
    _check_idata("hmc", hmc)
    _checks.comparable_posteriors(vi, hmc)
    task = _attr(vi, "task") or _attr(hmc, "task")
    classifier = task == "classification"
    var = "prob" if classifier else "f"
    for name, idata in (("vi", vi), ("hmc", hmc)):
        if var not in idata.predictions:
            raise ValueError(f"{name}.predictions has no {var!r} (task {task!r})")
    x_test = np.asarray(vi.predictions_constant_data["x"].values)
    x_hmc = np.asarray(hmc.predictions_constant_data["x"].values)
    if x_test.shape != x_hmc.shape or not np.allclose(x_test, x_hmc, rtol=1e-5, atol=1e-8):
        raise ValueError("vi and hmc hold predictions at different x_test; build both with the same x_test")
    num_test = x_test.shape[0]

    vi_draws, outputs = _flat_draws(vi.predictions[var], classifier)
    hmc_draws, _ = _flat_draws(hmc.predictions[var], classifier)
    if vi_draws.shape[1] != hmc_draws.shape[1]:
        raise ValueError(
            f"vi and hmc predictions differ in shape: {vi.predictions[var].shape} and "
            f"{hmc.predictions[var].shape}"
        )

    # -- which test inputs lie in the data ---------------------------------------------
    if in_data is None:
        mask = _default_in_data(np.asarray(vi.constant_data["x"].values), x_test)
    else:
        mask = np.asarray(in_data)
        if mask.dtype != bool or mask.shape != (num_test,):
            raise ValueError(
                f"in_data must be a boolean array of shape ({num_test},) (one flag per test "
                f"input), got dtype {mask.dtype} and shape {mask.shape}"
            )
    num_out = vi_draws.shape[1] // num_test
    per_input = _per_input(vi_draws, hmc_draws, x_test, mask, num_out, outputs)

    report_warnings: list[str] = []
    rows: list[dict] = []
    rows += _function_space_rows(per_input, num_out)
    rows += _test_rows(vi, hmc, classifier)
    rows += _loo_rows(vi, hmc, report_warnings)
    rows += _khat_rows(vi, report_warnings)
    rows += _convergence_rows(hmc, report_warnings)
    weight_space, weight_elements = _weight_space(vi, hmc)
    for r in weight_space.itertuples():
        for metric in ("std_ratio_median", "smd_median"):
            rows.append(_row("weight space", metric, r.site, value=getattr(r, metric), note=r.note))
    table = pd.DataFrame(rows, columns=_TABLE_COLUMNS)
    for c in ("vi", "hmc", "value"):
        table[c] = table[c].astype(float)
    return ComparisonReport(
        table=table,
        per_input=per_input,
        weight_space=weight_space,
        warnings=report_warnings,
        weight_elements=weight_elements,
        vi=vi,
        hmc=hmc,
    )


# ----------------------------------------------------------------------------
# Pieces of compare
# ----------------------------------------------------------------------------
def _check_idata(name, idata):
    if not isinstance(idata, az.InferenceData):
        raise ValueError(f"{name} must be an arviz.InferenceData (from to_inference_data), got {type(idata).__name__}")
    for group in ("posterior", "predictions", "predictions_constant_data", "constant_data"):
        if group not in idata.groups():
            hint = " (pass x_test to to_inference_data)" if group.startswith("predictions") else ""
            raise ValueError(f"{name} has no {group!r} group{hint}")


def _attr(idata, key):
    if idata is None:
        return None
    if key in getattr(idata, "attrs", {}):
        return idata.attrs[key]
    if "posterior" in idata.groups():
        return idata.posterior.attrs.get(key)
    return None


def _flat_draws(da, classifier):
    """(chain, draw, test, ...) -> (draws, test * outputs), test-major; and the output labels."""
    values = np.asarray(da.values, dtype=np.float64)
    if classifier:  # probability of the last class
        labels = [values.shape[-1] - 1]
        values = values[..., -1]
    else:
        labels = None
    s = values.shape[0] * values.shape[1]
    flat = values.reshape(s, -1)
    if labels is None:
        labels = list(range(int(np.prod(values.shape[3:], dtype=int))))
    return flat, labels


def _default_in_data(x_train, x_test):
    xtr = x_train.reshape(x_train.shape[0], -1).astype(np.float64)
    xte = x_test.reshape(x_test.shape[0], -1).astype(np.float64)
    tree = cKDTree(xtr)
    if xtr.shape[0] >= 2:
        nn, _ = tree.query(xtr, k=2)
        radius = float(np.max(nn[:, 1]))
    else:
        radius = 0.0
    dist, _ = tree.query(xte, k=1)
    # Relative slack: inputs stored in float32 put equal distances a few ulps apart.
    return dist <= radius * (1 + 1e-6) + 1e-12


def _per_input(vi, hmc, x_test, mask, num_out, outputs):
    num_test = x_test.shape[0]
    vi_mean, hmc_mean = vi.mean(0), hmc.mean(0)
    vi_std, hmc_std = vi.std(0, ddof=1), hmc.std(0, ddof=1)
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    vi_q, hmc_q = np.quantile(vi, qs, axis=0), np.quantile(hmc, qs, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        std_ratio = vi_std / hmc_std
        smd = (vi_mean - hmc_mean) / hmc_std
    w1 = np.array([wasserstein_distance(vi[:, r], hmc[:, r]) for r in range(vi.shape[1])])
    cov50 = np.mean((hmc >= vi_q[1]) & (hmc <= vi_q[3]), axis=0)
    cov90 = np.mean((hmc >= vi_q[0]) & (hmc <= vi_q[4]), axis=0)
    x_first = x_test.reshape(num_test, -1)[:, 0].astype(np.float64)
    frame = {
        "test": np.repeat(np.arange(num_test), num_out),
        "output": np.tile(np.asarray(outputs, dtype=int), num_test),
        "x": np.repeat(x_first, num_out),
        "in_data": np.repeat(mask, num_out),
        "vi_mean": vi_mean,
        "vi_std": vi_std,
        "hmc_mean": hmc_mean,
        "hmc_std": hmc_std,
        "std_ratio": std_ratio,
        "smd": smd,
        "w1": w1,
        "coverage_50": cov50,
        "coverage_90": cov90,
    }
    for i, q in enumerate(qs):
        frame[f"vi_q{round(100 * q):02d}"] = vi_q[i]
    for i, q in enumerate(qs):
        frame[f"hmc_q{round(100 * q):02d}"] = hmc_q[i]
    return pd.DataFrame(frame)


def _row(section, metric, scope, vi=np.nan, hmc=np.nan, value=np.nan, note=""):
    return {"section": section, "metric": metric, "scope": scope, "vi": _float(vi),
            "hmc": _float(hmc), "value": _float(value), "note": note}


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return np.nan


def _worst(values, ideal, how):
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return np.nan
    if how == "log":
        with np.errstate(divide="ignore"):
            return v[np.argmax(np.abs(np.log(v)))]
    if how == "max":
        return v.max()
    return v[np.argmax(np.abs(v - ideal))]


def _function_space_rows(per_input, num_out):
    rows = []
    for scope, sel in (("in_data", per_input.in_data), ("away", ~per_input.in_data)):
        part = per_input[sel]
        n_inputs = part.test.nunique()
        rows.append(_row("function space", "num_inputs", scope, value=n_inputs,
                         note=f"test inputs {'near' if scope == 'in_data' else 'away from'} the training data"))
        for col, ideal, how in _SUMMARIZED:
            if part.empty:
                note = "no test input in this region"
                med = worst = np.nan
            else:
                note = f"ideal {ideal:g}"
                med = np.nanmedian(part[col].to_numpy(dtype=float)) if part[col].notna().any() else np.nan
                worst = _worst(part[col], ideal, how)
            rows.append(_row("function space", f"{col}_median", scope, value=med, note=note))
            worst_note = note if part.empty else {
                "log": f"largest |log ratio|, sign kept; {note}",
                "abs": f"farthest from {ideal:g}",
                "max": "largest",
            }[how]
            rows.append(_row("function space", f"{col}_worst", scope, value=worst, note=worst_note))
    return rows


def _test_rows(vi, hmc, classifier):
    pcd_vi, pcd_hmc = vi.predictions_constant_data, hmc.predictions_constant_data
    if "y" not in pcd_vi or "y" not in pcd_hmc:
        return []
    y = np.asarray(pcd_vi["y"].values)
    if y.shape != pcd_hmc["y"].shape or not np.allclose(y, pcd_hmc["y"].values):
        raise ValueError("vi and hmc hold different y_test")
    rows = []
    values = {}
    for name, idata in (("vi", vi), ("hmc", hmc)):
        pred = idata.predictions
        if classifier:
            prob = np.asarray(pred["prob"].values, dtype=np.float64)
            mean_prob = prob.reshape((-1,) + prob.shape[2:]).mean(0)
            values[name] = float(np.mean(mean_prob.argmax(-1) != y))
        else:
            f = np.asarray(pred["f"].values, dtype=np.float64)
            mean_f = f.reshape((-1,) + f.shape[2:]).mean(0)
            values[name] = float(np.sqrt(np.mean((mean_f - y.astype(np.float64)) ** 2)))
    from .fidelity import DEFINITIONS  # here, not at the top: fidelity imports this module

    metric = "error_rate" if classifier else "rmse"
    note = DEFINITIONS[metric] + "; value = vi - hmc"
    rows.append(_row("test data", metric, "test", values["vi"], values["hmc"], values["vi"] - values["hmc"], note))
    if "log_lik" in vi.predictions and "log_lik" in hmc.predictions:
        mlpd = {}
        for name, idata in (("vi", vi), ("hmc", hmc)):
            ll = np.asarray(idata.predictions["log_lik"].values, dtype=np.float64)
            ll = ll.reshape(-1, ll.shape[2])
            mlpd[name] = float(np.mean(logsumexp(ll, axis=0) - math.log(ll.shape[0])))
        rows.append(_row("test data", "mlpd", "test", mlpd["vi"], mlpd["hmc"], mlpd["vi"] - mlpd["hmc"],
                         DEFINITIONS["lpd"] + "; value = vi - hmc"))
    return rows


def _loo_rows(vi, hmc, report_warnings):
    if "log_likelihood" not in vi.groups() or "log_likelihood" not in hmc.groups():
        return []
    res = {}
    for name, idata in (("vi", vi), ("hmc", hmc)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loo = az.loo(idata, pointwise=True)
        k = np.asarray(loo.pareto_k.values)
        res[name] = {
            "elpd": float(loo.elpd_loo),
            "se": float(loo.se),
            "p": float(loo.p_loo),
            "bad": int(np.sum(k > PARETO_K_MAX)),
            "n": int(k.size),
        }
    note = "value = vi - hmc"
    rows = [
        _row("psis-loo", "elpd_loo", "train", res["vi"]["elpd"], res["hmc"]["elpd"],
             res["vi"]["elpd"] - res["hmc"]["elpd"], note),
        _row("psis-loo", "elpd_loo_se", "train", res["vi"]["se"], res["hmc"]["se"], note=""),
        _row("psis-loo", "p_loo", "train", res["vi"]["p"], res["hmc"]["p"],
             res["vi"]["p"] - res["hmc"]["p"], note),
    ]
    flags = [f"{name}: {r['bad']} of {r['n']}" for name, r in res.items() if r["bad"]]
    rows.append(_row("psis-loo", f"pareto_k_gt_{PARETO_K_MAX}", "train", res["vi"]["bad"], res["hmc"]["bad"],
                     note=("unreliable where k > 0.7 (" + "; ".join(flags) + ")") if flags else "all k <= 0.7"))
    for name, r in res.items():
        if r["bad"]:
            report_warnings.append(
                f"PSIS-LOO of {name}: Pareto k > {PARETO_K_MAX} at {r['bad']} of {r['n']} training "
                "points; its elpd_loo is unreliable there"
            )
    return rows


def khat_reading(k: float) -> str:
    """Yao et al. (2018): < 0.5 good, 0.5-0.7 usable, > 0.7 unreliable."""
    if not np.isfinite(k):
        return "undefined"
    if k < 0.5:
        return "good"
    if k <= PARETO_K_MAX:
        return "usable"
    return "unreliable"


def _khat_rows(vi, report_warnings):
    stats = vi.sample_stats if "sample_stats" in vi.groups() else None
    if stats is None or "lp" not in stats or "log_q" not in stats:
        return [_row("vi diagnostics", "psis_khat", "posterior", note="vi.sample_stats lacks lp / log_q")]
    log_w = (np.asarray(stats["lp"].values, np.float64) - np.asarray(stats["log_q"].values, np.float64)).ravel()
    if not np.all(np.isfinite(log_w)):
        return [_row("vi diagnostics", "psis_khat", "posterior", note="non-finite lp - log_q")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = az.psislw(log_w)
    k = float(np.asarray(k))
    reading = khat_reading(k)
    if reading == "unreliable":
        report_warnings.append(
            f"PSIS k-hat of the VI posterior is {k:.2f} > {PARETO_K_MAX}: q is far from the posterior "
            "in weight space (importance weights lp - log_q are heavy-tailed); for a BNN this is "
            "expected, read function space"
        )
    return [_row("vi diagnostics", "psis_khat", "posterior", vi=k, value=k,
                 note=f"{reading} (< 0.5 good, 0.5-0.7 usable, > 0.7 unreliable; Yao et al. 2018)")]


def _convergence_rows(hmc, report_warnings):
    f = hmc.predictions["f"]
    d = f_diagnostics(f.values, 0)
    max_rhat, min_bulk, min_tail = d["max_rhat_f"], d["min_ess_bulk_f"], d["min_ess_tail_f"]
    stats = hmc.sample_stats if "sample_stats" in hmc.groups() else {}
    divergences = int(np.sum(stats["diverging"].values)) if "diverging" in stats else None
    num_chains = int(f.sizes["chain"])
    rows = [
        _row("hmc convergence", "max_rhat", "f(x*)", hmc=max_rhat, value=max_rhat,
             note=f"want <= {RHAT_MAX} ({num_chains} chains)"),
        _row("hmc convergence", "min_ess_bulk", "f(x*)", hmc=min_bulk, value=min_bulk, note=f"want >= {ESS_MIN}"),
        _row("hmc convergence", "min_ess_tail", "f(x*)", hmc=min_tail, value=min_tail, note=f"want >= {ESS_MIN}"),
        _row("hmc convergence", "divergences", "all draws", hmc=divergences, value=divergences,
             note="want 0" if divergences is not None else "no diverging statistic"),
    ]
    problems = convergence_problems({"max_rhat_f": max_rhat, "min_ess_bulk_f": min_bulk,
                                     "min_ess_tail_f": min_tail, "divergences": divergences})
    if problems:
        report_warnings.insert(
            0,
            "the HMC reference is not converged: " + "; ".join(problems)
            + " (read on its predictions f(x*)); its numbers are not a reliable ground truth",
        )
    return rows


def _weight_space(vi, hmc):
    layers = _attr(vi, "num_hidden_layers")
    if layers is None:
        layers = _attr(hmc, "num_hidden_layers")
    identifiable = layers is not None and int(layers) == 0
    note = IDENTIFIABLE_NOTE if identifiable else NOT_IDENTIFIABLE_NOTE
    rows, elements = [], []
    for site in vi.posterior.data_vars:
        if site not in hmc.posterior.data_vars:
            continue
        a = np.asarray(vi.posterior[site].values, np.float64)
        b = np.asarray(hmc.posterior[site].values, np.float64)
        if a.shape[2:] != b.shape[2:]:
            continue
        shape = a.shape[2:]
        a = a.reshape(-1, int(np.prod(shape, dtype=int)))
        b = b.reshape(-1, int(np.prod(shape, dtype=int)))
        vi_mean, vi_std = a.mean(0), a.std(0, ddof=1)
        hmc_mean, hmc_std = b.mean(0), b.std(0, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = vi_std / hmc_std
            smd = (vi_mean - hmc_mean) / hmc_std
        rows.append({
            "site": str(site),
            "size": int(a.shape[1]),
            "std_ratio_median": float(np.median(ratio)),
            "std_ratio_min": float(np.min(ratio)),
            "std_ratio_max": float(np.max(ratio)),
            "smd_median": float(np.median(smd)),
            "smd_max_abs": float(np.max(np.abs(smd))),
            "identifiable": identifiable,
            "note": note,
        })
        for i, index in enumerate(np.ndindex(*shape)):
            label = f"{site}[{', '.join(map(str, index))}]" if index else str(site)
            elements.append({
                "site": str(site), "element": i, "label": label,
                "vi_mean": vi_mean[i], "vi_std": vi_std[i], "hmc_mean": hmc_mean[i],
                "hmc_std": hmc_std[i], "std_ratio": ratio[i], "smd": smd[i],
            })
    cols = ["site", "size", "std_ratio_median", "std_ratio_min", "std_ratio_max", "smd_median",
            "smd_max_abs", "identifiable", "note"]
    element_cols = ["site", "element", "label", "vi_mean", "vi_std", "hmc_mean", "hmc_std",
                    "std_ratio", "smd"]
    return pd.DataFrame(rows, columns=cols), pd.DataFrame(elements, columns=element_cols)


# ----------------------------------------------------------------------------
# Export helpers
# ----------------------------------------------------------------------------
def json_value(v):
    """A table cell as plain JSON: bool / int / float, NaN and inf as None, else str."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(v)


def _records(df: pd.DataFrame) -> list[dict]:
    return [{str(k): json_value(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _cell(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        if float(v).is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (numbers with 4 significant digits, NaN blank).

    >>> print(markdown_table(pd.DataFrame({"a": [1.0, 0.12345]})))
    | a |
    |---|
    | 1 |
    | 0.1235 |
    """
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule] + body)


# ----------------------------------------------------------------------------
# Pictures (matplotlib Figure objects, no pyplot state)
# ----------------------------------------------------------------------------
def new_figure(figsize=(7.0, 4.0)):
    """A matplotlib Figure made without pyplot (the caller's backend and figures stay alone).

    >>> new_figure().get_size_inches().tolist()
    [7.0, 4.0]
    """
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as PNG atomically: a temporary file in the same folder, then ``os.replace``.

    >>> save_png(new_figure(), Path("picture.png"))  # doctest: +SKIP
    PosixPath('picture.png')
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        fig.clear()
    return path


_markdown_table, _figure, _save = markdown_table, new_figure, save_png


def _input_dim(idata) -> int:
    x = idata.constant_data["x"]
    return int(np.prod(x.shape[1:], dtype=int))


def _training_points(idata):
    x = np.asarray(idata.constant_data["x"].values, np.float64).reshape(-1)
    y = np.asarray(idata.observed_data["y"].values) if "observed_data" in idata.groups() else None
    if y is not None:
        y = y.reshape(y.shape[0], -1)[:, 0]
        if _attr(idata, "task") == "classification":
            k = idata.predictions.sizes.get("class", 2)
            y = (y == k - 1).astype(float)
    return x, y


def _plot_bands(rows, vi):
    fig = _figure()
    ax = fig.add_subplot()
    x = rows.x.to_numpy()
    for who, color, label in (("hmc", "black", "HMC"), ("vi", "tab:orange", "BBB")):
        ax.fill_between(x, rows[f"{who}_q05"], rows[f"{who}_q95"], color=color, alpha=0.12, lw=0)
        ax.fill_between(x, rows[f"{who}_q25"], rows[f"{who}_q75"], color=color, alpha=0.25, lw=0)
        ax.plot(x, rows[f"{who}_mean"], color=color, lw=1.5, label=f"{label} mean, 50% / 90%")
    xt, yt = _training_points(vi)
    if yt is not None:
        ax.plot(xt, yt, "o", ms=3, color="tab:blue", label="training data")
    classifier = _attr(vi, "task") == "classification"
    ax.set_xlabel("x*")
    ax.set_ylabel("p(last class | x*)" if classifier else "f(x*)")
    ax.set_title("Predictive bands: BBB vs HMC")
    ax.legend(fontsize=8)
    return fig


def _runs(x, flag):
    """(start, end) x-intervals of consecutive True flags (x sorted)."""
    spans, start = [], None
    for xi, fi, prev in zip(x, flag, np.r_[x[:1], x[:-1]]):
        if fi and start is None:
            start = xi
        if not fi and start is not None:
            spans.append((start, prev))
            start = None
    if start is not None:
        spans.append((start, x[-1]))
    return spans


def _plot_std_ratio(rows, vi):
    fig = _figure()
    ax = fig.add_subplot()
    x = rows.x.to_numpy()
    for i, (a, b) in enumerate(_runs(x, rows.in_data.to_numpy())):
        ax.axvspan(a, b, color="tab:blue", alpha=0.12, lw=0, label="in the data" if i == 0 else None)
    ratio = rows.std_ratio.to_numpy(dtype=float)
    ax.plot(x, ratio, color="tab:orange", lw=1.5, label="std BBB / std HMC")
    ax.axhline(1.0, color="black", lw=1, ls="--")
    if np.all(ratio[np.isfinite(ratio)] > 0) and np.isfinite(ratio).any():
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(ScalarFormatter())
    xt, _ = _training_points(vi)  # training inputs as a rug along the bottom
    ax.plot(xt, np.full_like(xt, 0.02), "|", color="tab:blue", transform=ax.get_xaxis_transform())
    ax.set_xlabel("x*")
    ax.set_ylabel("predictive std ratio")
    ax.set_title("BBB / HMC predictive std")
    ax.legend(fontsize=8)
    return fig


def _plot_std_scatter(per_input):
    fig = _figure((5.0, 5.0))
    ax = fig.add_subplot()
    for flag, color, label in ((True, "tab:blue", "in the data"), (False, "tab:red", "away from the data")):
        part = per_input[per_input.in_data == flag]
        if len(part):
            ax.scatter(part.hmc_std, part.vi_std, s=10, color=color, alpha=0.7, label=label)
    vals = np.r_[per_input.hmc_std.to_numpy(float), per_input.vi_std.to_numpy(float)]
    vals = vals[np.isfinite(vals)]
    if vals.size:
        lo, hi = vals.min(), vals.max()
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--", label="equal")
        if lo > 0:
            ax.set_xscale("log")
            ax.set_yscale("log")
    ax.set_xlabel("HMC predictive std")
    ax.set_ylabel("BBB predictive std")
    ax.set_title("Predictive std per test input")
    ax.legend(fontsize=8)
    return fig


def _elbo(vi):
    if vi is None or "sample_stats" not in vi.groups():
        return None
    elbo = vi.sample_stats.attrs.get("elbo")
    return None if elbo is None else np.atleast_1d(np.asarray(elbo, dtype=np.float64))


def _plot_elbo(elbo):
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(elbo) + 1), elbo, lw=0.8)
    finite = elbo[np.isfinite(elbo)]
    if finite.size > 10:  # keep the early transient from flattening the rest
        lo, hi = np.quantile(finite, 0.05), finite.max()
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")
    ax.set_title("BBB training: ELBO")
    return fig


def _plot_forest(vi, hmc, max_vars=4, max_elements=5):
    if vi is None or hmc is None:
        return None
    names = [v for v in vi.posterior.data_vars if v in hmc.posterior.data_vars][:max_vars]
    if not names:
        return None
    coords, num_rows = {}, 0
    for v in names:
        size = 1
        for dim in vi.posterior[v].dims[2:]:
            k = min(max_elements, vi.posterior.sizes[dim])
            coords[dim] = list(range(k))
            size *= k
        num_rows += size
    fig = _figure((7.0, 1.5 + 0.45 * num_rows))
    ax = fig.add_subplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az.plot_forest(
            [vi, hmc], model_names=["BBB", "HMC"], var_names=names, coords=coords,
            combined=True, ax=ax, show=False,
        )
    ax.set_title("Posterior (first elements): BBB vs HMC")
    return fig


# At most this many chains in the rank plot: 32 stacked histograms are unreadable.
_RANK_MAX_CHAINS = 8


def reference_chain_quantities(hmc, num_inputs=3) -> dict:
    """Readable, identifiable quantities of the reference, name -> (chain, draw) array: the
    noise std if it has one, and f(x*) (a classifier's last-class probability, as compared)
    at ``num_inputs`` test inputs evenly spread in the order of the first feature."""
    out = {}
    if "noise" in hmc.posterior.data_vars and hmc.posterior["noise"].ndim == 2:
        out["noise"] = np.asarray(hmc.posterior["noise"].values, np.float64)
    classifier = _attr(hmc, "task") == "classification"
    values = np.asarray(hmc.predictions["prob" if classifier else "f"].values, np.float64)
    values = values[..., -1] if classifier else values
    values = values.reshape(values.shape[:3] + (-1,))[..., 0]  # the first output
    x = np.asarray(hmc.predictions_constant_data["x"].values, np.float64)
    x = x.reshape(x.shape[0], -1)[:, 0]
    order = np.argsort(x, kind="stable")
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(num_inputs, len(order))).round().astype(int))]
    name = "p" if classifier else "f"
    for i in picks:
        out[f"{name}(x*[{i}])"] = values[:, :, i]
    return out


def plot_reference_chains(hmc, folder) -> list[Path]:
    """Write the reference's ``reference_trace.png`` (ArviZ ``plot_trace``) and
    ``reference_rank.png`` (ArviZ ``plot_rank``, at most 8 chains) into ``folder``; return
    their paths ([] without a reference or with one chain).  The quantities are those of
    :data:`REFERENCE_PICTURES_NOTE`; figures are made without pyplot and written atomically.

    >>> plot_reference_chains(hmc, "report/")  # doctest: +SKIP
    [PosixPath('report/reference_trace.png'), PosixPath('report/reference_rank.png')]
    """
    if hmc is None or "predictions" not in hmc.groups() or hmc.predictions.sizes.get("chain", 1) < 2:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    quantities = reference_chain_quantities(hmc)
    data = az.from_dict(posterior=quantities)
    names = list(quantities)
    trace = _figure((8.0, 1.9 * len(names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az.plot_trace(data, var_names=names, compact=False, axes=trace.subplots(len(names), 2, squeeze=False),
                      show=False)
    trace.suptitle("Reference: trace per chain")
    rank = _figure((3.2 * len(names), 3.4))
    chains = data.posterior.isel(chain=slice(0, _RANK_MAX_CHAINS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        az.plot_rank(chains, var_names=names, ax=rank.subplots(1, len(names), squeeze=False)[0], show=False)
    shown = min(_RANK_MAX_CHAINS, data.posterior.sizes["chain"])
    rank.suptitle(f"Reference: rank histograms ({shown} of {data.posterior.sizes['chain']} chains)")
    return [_save(trace, folder / REFERENCE_PICTURES[0]), _save(rank, folder / REFERENCE_PICTURES[1])]
