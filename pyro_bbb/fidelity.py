"""Many inference schemes against one reference: a fidelity table, a summary, pictures.

:func:`compare_schemes` (also reached as ``compare(reference, {name: idata, ...})``)
runs :func:`pyro_bbb.compare.compare` once per scheme and reads one row per
scheme from each :class:`~pyro_bbb.compare.ComparisonReport`: the function-space
numbers of the NeurIPS 2021 "Approximate Inference in Bayesian Deep Learning"
competition (W1 for regression; agreement and total variation for classifiers),
the std ratio in and away from the data, interval coverage, test error and log
predictive density, and PSIS k-hat where the scheme has a log density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import _checks
from .compare import ComparisonReport, compare, json_value, markdown_table, new_figure, save_png
from .hmc.diagnostics import ESS_MIN, rhat_passes

__all__ = ["FidelityReport", "compare_schemes", "confidence_word", "DEFINITIONS", "OVERCONFIDENT_BELOW",
           "UNDERCONFIDENT_ABOVE", "ECE_BINS", "expected_calibration_error", "definitions_markdown"]

#: A predictive std ratio (scheme / reference) below this reads over-confident ...
OVERCONFIDENT_BELOW = 0.8
#: ... and above this under-confident (1 / 0.8: the same factor either way).
UNDERCONFIDENT_ABOVE = 1.25
#: Equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15;
#: 10 keeps bins populated on small test sets).
ECE_BINS = 10

#: One sentence per metric of :attr:`FidelityReport.table`, the only place they are defined.
DEFINITIONS = {
    "std_ratio_median_in": "median over test inputs in the data of the scheme's predictive std of f "
                           "over the reference's (ideal 1)",
    "std_ratio_median_away": "the same median over test inputs away from the data (ideal 1)",
    "smd_mean_abs": "mean over test inputs of |mean_scheme - mean_reference| / std_reference (ideal 0)",
    "w1_mean": "1-Wasserstein distance between the scheme's and the reference's predictive samples "
               "of f at each test input (scipy.stats.wasserstein_distance), averaged over inputs (ideal 0)",
    "w1_mean_in": "w1_mean over test inputs in the data only",
    "w1_mean_away": "w1_mean over test inputs away from the data only",
    "coverage_50": "share of the reference's draws inside the scheme's central 50% interval, "
                   "averaged over test inputs (ideal 0.5)",
    "coverage_90": "share of the reference's draws inside the scheme's central 90% interval, "
                   "averaged over test inputs (ideal 0.9)",
    "rmse": "root mean squared error of the scheme's predictive mean of f on the test set",
    "error_rate": "share of test points where the argmax of the mean class probability is wrong",
    "lpd": "mean over test points of log mean_draws p(y*|theta) (higher is better)",
    "psis_khat": "Pareto k of the importance weights p/q of the scheme's own draws "
                 "(Yao et al. 2018; NaN without a log density)",
    "agreement": "share of test points whose top class matches the reference's (ideal 1)",
    "tv": "total variation: half the L1 distance between the scheme's and the reference's mean "
          "class probabilities, averaged over test points (ideal 0)",
    "ece": f"expected calibration error of the scheme's mean class probabilities on the test set "
           f"({ECE_BINS} equal-width confidence bins; ideal 0)",
}


def definitions_markdown() -> str:
    """The page ``docs/metrics.md``: :data:`DEFINITIONS` as a Markdown table, one row per
    metric.  The page is this function's output, so the docs cannot drift from the code;
    rewrite it after editing a definition::

        python -c "from pyro_bbb import fidelity; print(fidelity.definitions_markdown(), end='')" > docs/metrics.md

    >>> print(definitions_markdown().splitlines()[0])
    # Metrics of the fidelity report
    """
    rows = [f"| `{name}` | {_escape_cell(text)} |" for name, text in DEFINITIONS.items()]
    return "\n".join([
        "# Metrics of the fidelity report",
        "",
        "The columns of `FidelityReport.table` (`pyro-bbb compare --methods ...`, "
        "`comparisons/fidelity.py`). The scheme is the approximation being judged, the reference "
        "the sampler's posterior of the same model. This page is written by "
        "`pyro_bbb.fidelity.definitions_markdown()` from `pyro_bbb.fidelity.DEFINITIONS`, "
        "the one place these definitions live.",
        "",
        "| metric | definition |",
        "|---|---|",
        *rows,
    ]) + "\n"


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the Markdown cell


@dataclass
class FidelityReport:
    """What :func:`compare_schemes` found: one row per scheme against one reference.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per scheme: ``scheme`` and the metrics of :data:`DEFINITIONS`
        (``rmse`` or ``error_rate``; ``agreement, tv, ece`` for classifiers).
    reports : dict
        Scheme name -> its one-scheme :class:`~pyro_bbb.compare.ComparisonReport`.
    reference_converged : bool
        Whether the reference passed R-hat, bulk / tail ESS and divergence checks.
    reference_convergence : pandas.DataFrame
        The reference's convergence rows (``max_rhat, min_ess_bulk, ...``).
    reference_warnings : list of str
    definitions : dict
        Metric -> one-sentence definition (:data:`DEFINITIONS`).

    Examples
    --------
    >>> rep = compare(hmc, {"bbb": vi, "ensemble": ens})  # doctest: +SKIP
    >>> rep.table.set_index("scheme").w1_mean  # doctest: +SKIP
    >>> print(rep.summary())  # doctest: +SKIP
    """

    table: pd.DataFrame
    reports: dict
    reference_converged: bool
    reference_convergence: pd.DataFrame
    reference_warnings: list = field(default_factory=list)
    definitions: dict = field(default_factory=lambda: dict(DEFINITIONS))
    classifier: bool = False

    def __repr__(self) -> str:
        return (f"FidelityReport({len(self.table)} schemes, reference "
                f"{'converged' if self.reference_converged else 'NOT converged'})")

    @property
    def fidelity_metric(self) -> str:
        """The metric schemes are ranked by: ``"tv"`` for classifiers, else ``"w1_mean"``."""
        return "tv" if self.classifier else "w1_mean"

    def summary(self) -> str:
        """A few sentences read from the numbers: the closest scheme, in and away from the
        data, where each is over- or under-confident, and the reference's verdict."""
        return " ".join(_summary_sentences(self))

    def to_markdown(self) -> str:
        """The summary, then the table, then the definitions of its columns."""
        metrics = [c for c in self.table.columns if c != "scheme"]
        lines = ["# Inference schemes against the reference", "", self.summary(), ""]
        if self.reference_warnings:
            lines += ["## Reference warnings", ""] + [f"- {w}" for w in self.reference_warnings] + [""]
        lines += ["## Fidelity", "", markdown_table(self.table), "", "## Definitions", ""]
        lines += [f"- `{m}`: {self.definitions[m]}." for m in metrics if m in self.definitions]
        lines += ["", "## Reference convergence", "", markdown_table(self.reference_convergence), ""]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"schemes": {scheme: {metric: value}}, "summary", "reference_converged",
        "reference_warnings", "definitions"}``; NaN and inf as None.

        >>> import json
        >>> json.dumps(rep.to_dict())  # doctest: +SKIP
        """
        schemes = {
            str(r["scheme"]): {k: json_value(v) for k, v in r.items() if k != "scheme"}
            for r in self.table.to_dict(orient="records")
        }
        return {
            "schemes": schemes,
            "summary": self.summary(),
            "reference_converged": bool(self.reference_converged),
            "reference_warnings": [str(w) for w in self.reference_warnings],
            "definitions": dict(self.definitions),
        }

    def plot(self, folder) -> list[Path]:
        """Write PNGs into ``folder`` and return their paths: ``scheme_bands.png`` (one panel
        per scheme over the reference's 90% band) and ``scheme_std_ratio.png`` for 1-D inputs,
        ``scheme_fidelity.png`` (w1_mean or tv per scheme) always.  No pyplot state is used."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        first = next(iter(self.reports.values()), None)
        if first is not None and _input_dim(first) == 1:
            written.append(save_png(_plot_bands(self.reports), folder / "scheme_bands.png"))
            written.append(save_png(_plot_std_ratios(self.reports), folder / "scheme_std_ratio.png"))
        written.append(save_png(_plot_bars(self.table, self.fidelity_metric), folder / "scheme_fidelity.png"))
        return written


# ----------------------------------------------------------------------------
# compare_schemes
# ----------------------------------------------------------------------------
def compare_schemes(reference, approximations, *, in_data=None) -> FidelityReport:
    """Compare many approximations of one model's posterior with one sampler's reference.

    Parameters
    ----------
    reference : arviz.InferenceData
        A sampler's posterior (``posterior_kind == "sampler"``) from
        :func:`pyro_bbb.inference_data.to_inference_data`, with predictions at ``x_test``.
    approximations : dict
        Scheme name -> InferenceData of the same model, data and ``x_test``.
    in_data : array of bool, optional
        Which test inputs count as in the data (default: compare's nearest-neighbour rule).

    Returns
    -------
    FidelityReport

    Examples
    --------
    >>> rep = compare_schemes(hmc, {"bbb": vi, "lowrank": vi2})  # doctest: +SKIP
    >>> rep.table.columns[:3].tolist()  # doctest: +SKIP
    ['scheme', 'std_ratio_median_in', 'std_ratio_median_away']
    """
    _checks.fidelity_inputs(reference, approximations)
    reports = {str(name): compare(idata, reference, in_data=in_data) for name, idata in approximations.items()}
    first = next(iter(reports.values()))
    classifier = first.vi.posterior.attrs.get("task", reference.posterior.attrs.get("task")) == "classification"
    rows = [_scheme_row(name, rep, reference, classifier) for name, rep in reports.items()]
    convergence = first.table[first.table.section == "hmc convergence"][["metric", "scope", "value", "note"]]
    convergence = convergence.reset_index(drop=True)
    reference_warnings = [w for w in first.warnings if "reference" in w]
    return FidelityReport(
        table=pd.DataFrame(rows),
        reports=reports,
        reference_converged=_converged(convergence),
        reference_convergence=convergence,
        reference_warnings=reference_warnings,
        classifier=classifier,
    )


def _converged(rows: pd.DataFrame) -> bool:
    """The verdict of compare's reference check, read from its rows."""
    value = dict(zip(rows.metric, rows.value))
    divergences = value.get("divergences", np.nan)
    return (rhat_passes(value.get("max_rhat", np.nan))
            and value.get("min_ess_bulk", np.nan) >= ESS_MIN
            and value.get("min_ess_tail", np.nan) >= ESS_MIN
            and (math.isnan(divergences) or divergences == 0))


def _scheme_row(name: str, rep: ComparisonReport, reference, classifier: bool) -> dict:
    per = rep.per_input
    inside, away = per[per.in_data], per[~per.in_data]
    row = {
        "scheme": name,
        "std_ratio_median_in": _median(inside.std_ratio),
        "std_ratio_median_away": _median(away.std_ratio),
        "smd_mean_abs": _mean(per.smd.abs()),
        "w1_mean": _mean(per.w1),
        "w1_mean_in": _mean(inside.w1),
        "w1_mean_away": _mean(away.w1),
        "coverage_50": _mean(per.coverage_50),
        "coverage_90": _mean(per.coverage_90),
    }
    error = "error_rate" if classifier else "rmse"
    row[error] = _table_value(rep, error)
    row["lpd"] = _table_value(rep, "mlpd")
    row["psis_khat"] = _table_value(rep, "psis_khat")
    if classifier:
        row.update(_class_metrics(rep.vi, reference))
    return row


def _table_value(rep: ComparisonReport, metric: str) -> float:
    rows = rep.table[rep.table.metric == metric]
    return float(rows.vi.iloc[0]) if len(rows) else np.nan


def _mean(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else np.nan


def _median(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else np.nan


# ----------------------------------------------------------------------------
# Classifier metrics
# ----------------------------------------------------------------------------
def _mean_probs(idata) -> np.ndarray:
    prob = np.asarray(idata.predictions["prob"].values, dtype=np.float64)
    return prob.reshape((-1,) + prob.shape[2:]).mean(0)  # (test, class)


def _class_metrics(scheme, reference) -> dict:
    p, q = _mean_probs(scheme), _mean_probs(reference)
    pcd = scheme.predictions_constant_data
    y = np.asarray(pcd["y"].values).astype(int) if "y" in pcd else None
    return {
        "agreement": float(np.mean(p.argmax(-1) == q.argmax(-1))),
        "tv": float(np.mean(0.5 * np.abs(p - q).sum(-1))),
        "ece": expected_calibration_error(p, y) if y is not None else np.nan,
    }


def expected_calibration_error(probs, labels, num_bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017): sum over equal-width bins of the top-class
    confidence of (share of points in the bin) * |accuracy - mean confidence| in the bin.

    >>> expected_calibration_error(np.array([[0.2, 0.8], [0.4, 0.6]]), np.array([1, 0]))
    0.4
    """
    probs, labels = _checks.class_probabilities(probs, labels)
    conf, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == labels).astype(np.float64)
    # Bins (lo, hi], the first one [0, hi]: searchsorted on the inner edges.
    which = np.searchsorted(np.linspace(0.0, 1.0, num_bins + 1)[1:-1], conf, side="left")
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return round(float(total), 12)


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------
def _summary_sentences(rep: FidelityReport) -> list[str]:
    t = rep.table.set_index("scheme")
    metric = rep.fidelity_metric
    out = []
    if rep.reference_converged:
        out.append("The reference converged (R-hat, bulk and tail ESS, divergences on f(x*)).")
        ranked = t[metric].dropna().sort_values(kind="stable")
        if len(ranked):
            order = ", ".join(f"{n} ({v:.3g})" for n, v in ranked.items())
            out.append(f"Closest to the reference by {metric}: {ranked.index[0]}; all schemes: {order}.")
        if not rep.classifier:
            for col, where in (("w1_mean_in", "in the data"), ("w1_mean_away", "away from the data")):
                part = t[col].dropna()
                if len(part):
                    out.append(f"Closest {where}: {part.idxmin()} (w1 {part.min():.3g}).")
    else:
        out.append("The reference did not converge (" + "; ".join(rep.reference_warnings or ["see its rows"])
                   + "); no scheme is ranked against it.")
    out.append(f"A std ratio below {OVERCONFIDENT_BELOW:g} reads over-confident, above "
               f"{UNDERCONFIDENT_ABOVE:g} under-confident.")
    for name, r in t.iterrows():
        out.append(f"{name}: {_confidence(r.std_ratio_median_in)} in the data, "
                   f"{_confidence(r.std_ratio_median_away)} away from it.")
    return out


def confidence_word(ratio: float) -> str:
    """A finite std ratio (scheme over reference) read as "over-confident" (below
    :data:`OVERCONFIDENT_BELOW`), "under-confident" (above :data:`UNDERCONFIDENT_ABOVE`)
    or "about right".

    >>> confidence_word(0.4), confidence_word(1.0), confidence_word(2.0)
    ('over-confident', 'about right', 'under-confident')
    """
    if ratio < OVERCONFIDENT_BELOW:
        return "over-confident"
    return "under-confident" if ratio > UNDERCONFIDENT_ABOVE else "about right"


def _confidence(ratio: float) -> str:
    if not np.isfinite(ratio):
        return "no test input"
    return f"{confidence_word(ratio)} (std ratio {ratio:.2f})"


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------
def _input_dim(rep: ComparisonReport) -> int:
    x = rep.vi.constant_data["x"]
    return int(np.prod(x.shape[1:], dtype=int))


def _first_output(per: pd.DataFrame) -> pd.DataFrame:
    return per[per.output == per.output.min()].sort_values("x", kind="stable")


def _plot_bands(reports: dict):
    n = len(reports)
    fig = new_figure((4.0 * min(n, 3), 3.2 * math.ceil(n / 3)))
    for i, (name, rep) in enumerate(reports.items()):
        ax = fig.add_subplot(math.ceil(n / 3), min(n, 3), i + 1)
        rows = _first_output(rep.per_input)
        x = rows.x.to_numpy()
        ax.fill_between(x, rows.hmc_q05, rows.hmc_q95, color="black", alpha=0.15, lw=0, label="reference 90%")
        ax.plot(x, rows.hmc_mean, color="black", lw=1)
        ax.fill_between(x, rows.vi_q05, rows.vi_q95, color="tab:orange", alpha=0.3, lw=0, label=f"{name} 90%")
        ax.plot(x, rows.vi_mean, color="tab:orange", lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("x*")
        ax.legend(fontsize=7)
    return fig


def _plot_std_ratios(reports: dict):
    fig = new_figure()
    ax = fig.add_subplot()
    for name, rep in reports.items():
        rows = _first_output(rep.per_input)
        ax.plot(rows.x.to_numpy(), rows.std_ratio.to_numpy(float), lw=1.3, label=name)
    for level, style in ((1.0, "-"), (OVERCONFIDENT_BELOW, ":"), (UNDERCONFIDENT_ABOVE, ":")):
        ax.axhline(level, color="black", lw=0.8, ls=style)
    ax.set_xlabel("x*")
    ax.set_ylabel("predictive std / reference's")
    ax.set_title("Std ratio per scheme")
    ax.legend(fontsize=8)
    return fig


def _plot_bars(table: pd.DataFrame, metric: str):
    fig = new_figure((max(4.0, 1.0 + 0.9 * len(table)), 3.5))
    ax = fig.add_subplot()
    ax.bar(table.scheme.astype(str), table[metric].to_numpy(float), color="tab:orange")
    ax.set_ylabel(metric)
    ax.set_title(f"Distance to the reference ({metric}; lower is closer)")
    return fig
