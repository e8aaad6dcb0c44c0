"""Where mean-field VI goes wrong: three problems, Bayes by Backprop against an HMC reference.

Each problem is fitted twice on the same Pyro model and prior: by Bayes by Backprop
(``pyro_bbb.fit``, a mean-field Gaussian ``BBBGuide``) and by the ChEES-HMC reference
(``pyro_bbb.run_hmc``, many chains in lockstep).  ``pyro_bbb.compare`` reads both in
function space (per test input: std ratio VI / HMC, coverage) and reports the PSIS
k-hat of q (Yao, Vehtari, Simpson & Gelman 2018) and the reference's R-hat / ESS.

1. ``curve``: the regression curve of Blundell et al. (2015, section 5.2, Figure 5),
   data in x in [0, 0.5], a 1-16-1 ReLU network; predictive bands and the std ratio
   against x, inside the data and away from it.
2. ``in_between``: the "in-between" toy of Foong, Li, Hernandez-Lobato & Turner (2019):
   two clusters of inputs, x in [-1, -0.7] and [0.5, 1], y = sin(3x) + noise, the same
   1-16-1 ReLU network.  Does the predictive std grow in the gap between the clusters?
3. ``logistic``: Bayesian logistic regression on scikit-learn's breast_cancer
   (30 standardized features, ``BayesianClassifier(nn.Linear(30, 1))``, Bernoulli
   likelihood).  The weights are identifiable, so weight space can be read too:
   mean-field VI under-estimates the marginal stds of a correlated posterior.

    python comparisons/vi_failures.py --quick    # CI: small budgets (< 75 s on 2 cores)
    python comparisons/vi_failures.py            # full: converged-size HMC (< 20 min)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pyro.distributions as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classification as cls  # noqa: E402  (same folder: versions, command line, tables)

import pyro_bbb as bbb  # noqa: E402
from pyro_bbb.compare import ESS_MIN, PARETO_K_MAX, RHAT_MAX, khat_reading  # noqa: E402

warnings.filterwarnings("ignore", message="More chains .* than draws")  # many short chains: by design

PROBLEMS = ("curve", "in_between", "logistic")
TITLES = {
    "curve": "1. Regression curve (Blundell et al. 2015, Fig. 5)",
    "in_between": "2. In-between uncertainty (Foong et al. 2019)",
    "logistic": "3. Logistic regression, breast_cancer",
}

# Budgets.  VI: `epochs` at lr, then epochs // 2 at lr / 5 (a two-step schedule that
# takes the noise out of the last iterates).  HMC: chains x (warmup + draws), at most
# `max_steps` leapfrog steps per iteration.
_BNN_QUICK = dict(epochs=500, particles=4, vi_draws=500, chains=32, warmup=60, draws=20, max_steps=32)
_BNN_FULL = dict(epochs=2000, particles=8, vi_draws=2000, chains=64, warmup=400, draws=300, max_steps=256)
CONFIGS = {
    "quick": {
        "curve": dict(_BNN_QUICK),
        "in_between": dict(_BNN_QUICK),
        "logistic": dict(epochs=500, particles=4, vi_draws=500, chains=32, warmup=100, draws=50,
                         max_steps=64),
    },
    "full": {
        "curve": dict(_BNN_FULL),
        "in_between": dict(_BNN_FULL),
        "logistic": dict(epochs=3000, particles=8, vi_draws=4000, chains=64, warmup=300, draws=200,
                         max_steps=256),
    },
}
LR = 0.01
PRIOR_SCALE = 1.0  # N(0, 1) on every weight and bias, in every problem
HIDDEN = 16
NOISE = 0.1  # fixed observation noise std of both regression problems

# Problem 1: the curve, x in [0, 0.5]; the network sees z = (x - 0.25) / 0.25 in [-1, 1].
CURVE_N = 100
CURVE_RANGE = (0.0, 0.5)
CURVE_TEST = (-0.5, 1.0, 61)
CURVE_CENTER, CURVE_SCALE = 0.25, 0.25
# Problem 2: two clusters and a gap.
GAP_CLUSTERS = ((-1.0, -0.7), (0.5, 1.0))
GAP_N_PER_CLUSTER = 40
GAP_NOISE = 0.1
GAP_CORE = (-0.5, 0.3)  # the middle of the gap: at least 0.2 from either cluster
GAP_TEST = (-2.0, 2.0, 81)
# Problem 3: an "uncertain" test point has an HMC mean probability in this range.
UNCERTAIN = (0.05, 0.95)


def gap_function(x):
    return torch.sin(3.0 * x) if isinstance(x, torch.Tensor) else np.sin(3.0 * np.asarray(x))


# -- data -------------------------------------------------------------------------------------
def curve_data(seed):
    x, y = bbb.datasets.regression_curve(CURVE_N, seed=seed, low=CURVE_RANGE[0], high=CURVE_RANGE[1])
    x_test = torch.linspace(*CURVE_TEST)[:, None]
    return x, y, x_test


def in_between_data(seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [lo + (hi - lo) * torch.rand(GAP_N_PER_CLUSTER, generator=gen) for lo, hi in GAP_CLUSTERS]
    x = torch.cat(parts)[:, None]
    y = gap_function(x[:, 0]) + GAP_NOISE * torch.randn(x.shape[0], generator=gen)
    x_test = torch.linspace(*GAP_TEST)[:, None]
    return x, y, x_test


# -- fitting ----------------------------------------------------------------------------------
def make_regressor(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    return bbb.BayesianRegressor(net, prior=dist.Normal(0.0, PRIOR_SCALE), noise=NOISE)


def fit_vi(model, x, y, cfg, seed):
    guide = bbb.BBBGuide(model)
    t0 = time.perf_counter()
    common = dict(num_particles=cfg["particles"], kl="analytic", progress=False)
    h1 = bbb.fit(model, guide, x, y, epochs=cfg["epochs"], lr=LR, seed=seed, **common)
    h2 = bbb.fit(model, guide, x, y, epochs=max(1, cfg["epochs"] // 2), lr=LR / 5, seed=seed + 1, **common)
    elbo = np.concatenate([h1.elbo, h2.elbo])
    tail = elbo[-max(1, len(elbo) // 10):]
    return guide, time.perf_counter() - t0, float(np.mean(tail))


def fit_hmc(model, x, y, x_test, cfg, seed):
    return bbb.run_hmc(
        model, x, y, num_chains=cfg["chains"], num_samples=cfg["draws"], warmup_steps=cfg["warmup"],
        max_leapfrog_steps=cfg["max_steps"], x_test=x_test, seed=seed, progress=False,
    )


def run_problem(model, x, y, x_test, cfg, seed, in_data, y_test=None):
    """VI and HMC on one model; returns (guide, reference, report, seconds)."""
    guide, vi_s, elbo = fit_vi(model, x, y, cfg, seed)
    t0 = time.perf_counter()
    ref = fit_hmc(model, x, y, x_test, cfg, seed)
    hmc_s = time.perf_counter() - t0
    common = dict(x_test=x_test, y_test=y_test, seed=seed)
    vi = bbb.to_inference_data(model, guide, x, y, num_samples=cfg["vi_draws"], **common)
    hmc = bbb.to_inference_data(model, ref, x, y, **common)
    report = bbb.compare(vi, hmc, in_data=in_data)
    return guide, ref, report, {"vi": vi_s, "hmc": hmc_s, "vi_final_elbo": elbo}


# -- what every problem reports -----------------------------------------------------------
def diagnostics(report, ref, x_plot=None, data_mask=None) -> dict:
    """k-hat of q and the reference's convergence, read on f(x*); with 1-D test inputs
    ``x_plot``, also where R-hat is worst and how it fares on the inputs in ``data_mask``."""
    k = report.get("psis_khat", "posterior")
    d = ref.diagnostics
    rhat = np.asarray(d["rhat_f"], dtype=float)
    out = {
        "psis_khat": k,
        "khat_reading": khat_reading(k),
        "hmc_max_rhat": report.get("max_rhat", "f(x*)"),
        "hmc_median_rhat": float(np.nanmedian(rhat)),
        "hmc_share_rhat_ok": float(np.mean(rhat <= RHAT_MAX)),
        "hmc_max_nested_rhat": d.get("max_nested_rhat_f"),
        "hmc_min_ess_bulk": report.get("min_ess_bulk", "f(x*)"),
        "hmc_min_ess_tail": report.get("min_ess_tail", "f(x*)"),
        "hmc_divergences": int(report.get("divergences", "all draws")),
        "hmc_step_size": float(ref.adaptation["step_size"]),
        "hmc_trajectory_length": float(ref.adaptation["trajectory_length"]),
        "hmc_mean_leapfrog_steps": float(np.mean(ref.sample_stats["n_steps"])),
        "hmc_wall_s": float(ref.wall_time),
    }
    if x_plot is not None:
        out["hmc_max_rhat_at_x"] = float(x_plot[int(np.nanargmax(rhat))])
        out["hmc_share_rhat_ok_in_data"] = float(np.mean(rhat[data_mask] <= RHAT_MAX))
        out["hmc_max_rhat_in_data"] = float(np.nanmax(rhat[data_mask]))
    out["hmc_converged"] = bool(
        out["hmc_max_rhat"] <= RHAT_MAX and out["hmc_min_ess_bulk"] >= ESS_MIN and out["hmc_divergences"] == 0
    )
    return out


def _med(a) -> float:
    a = np.asarray(a, dtype=float)
    return float(np.nanmedian(a)) if a.size and np.isfinite(a).any() else math.nan


def _curves(per_input, x_plot, truth) -> dict:
    """Per test input, for the JSON and the figures."""
    p = per_input
    cols = ["vi_mean", "vi_std", "hmc_mean", "hmc_std", "std_ratio", "vi_q05", "vi_q95", "hmc_q05", "hmc_q95"]
    out = {"x": [float(v) for v in x_plot]}
    out.update({c: [float(v) for v in p[c]] for c in cols})
    out["truth"] = [float(v) for v in truth]
    return out


def _half_stds(report) -> list[np.ndarray]:
    """HMC's posterior std of f(x*) from the first and from the second half of its chains:
    how much the reference's own answer moves with the chains it is read from."""
    f = np.asarray(report.hmc.predictions["f"].values, dtype=np.float64)  # (chain, draw, test)
    half = f.shape[0] // 2
    return [f[:half].reshape(-1, f.shape[-1]).std(0, ddof=1), f[half:].reshape(-1, f.shape[-1]).std(0, ddof=1)]


def _covers(p, truth, who) -> np.ndarray:
    return (p[f"{who}_q05"].to_numpy() <= truth) & (truth <= p[f"{who}_q95"].to_numpy())


# -- problem 1: the curve ------------------------------------------------------------------------
def problem_curve(cfg, seed):
    x, y, x_test = curve_data(seed)
    to_z = lambda t: (t - CURVE_CENTER) / CURVE_SCALE  # noqa: E731
    xs = x_test[:, 0].numpy()
    inside = (xs >= CURVE_RANGE[0]) & (xs <= CURVE_RANGE[1])
    model = make_regressor(seed)
    guide, ref, report, secs = run_problem(model, to_z(x), y, to_z(x_test), cfg, seed, inside)
    p = report.per_input
    truth = bbb.datasets.curve_function(xs.astype(np.float64))
    cov_vi, cov_hmc = _covers(p, truth, "vi"), _covers(p, truth, "hmc")
    std_vi, std_hmc, ratio = p.vi_std.to_numpy(), p.hmc_std.to_numpy(), p.std_ratio.to_numpy()
    headline = {
        "std_ratio_in": _med(ratio[inside]),
        "std_ratio_out": _med(ratio[~inside]),
        "std_ratio_out_min": float(np.nanmin(ratio[~inside])),
        "std_ratio_at_ends": [float(ratio[0]), float(ratio[-1])],
        "vi_std_out_over_in": _med(std_vi[~inside]) / _med(std_vi[inside]),
        "hmc_std_out_over_in": _med(std_hmc[~inside]) / _med(std_hmc[inside]),
        "truth_coverage90_out_vi": float(cov_vi[~inside].mean()),
        "truth_coverage90_out_hmc": float(cov_hmc[~inside].mean()),
        "truth_coverage90_in_vi": float(cov_vi[inside].mean()),
        "truth_coverage90_in_hmc": float(cov_hmc[inside].mean()),
        "coverage90_of_hmc_in": _med(p.coverage_90[inside]),
        "coverage90_of_hmc_out": _med(p.coverage_90[~inside]),
        "smd_median_in": _med(np.abs(p.smd[inside])),
        "std_ratio_out_by_chain_half": [_med(std_vi[~inside] / h[~inside]) for h in _half_stds(report)],
        **diagnostics(report, ref, xs, inside),
    }
    settings = {
        "data": f"regression_curve(n={CURVE_N}, seed={seed}, x in {list(CURVE_RANGE)}, noise 0.02)",
        "input_scaling": f"network input z = (x - {CURVE_CENTER}) / {CURVE_SCALE} (data at z in [-1, 1])",
        "x_test": f"linspace{CURVE_TEST} in x",
        "network": f"1-{HIDDEN}-1 ReLU", "prior": f"N(0, {PRIOR_SCALE}^2) on all weights", "noise": NOISE,
        **cfg,
    }
    result = {"headline": headline, "settings": settings, "seconds": secs,
              "per_input": {**_curves(p, xs, truth), "hmc_rhat": hmp_list(ref.diagnostics["rhat_f"])},
              "inside": inside.tolist(),
              "data": {"x": x[:, 0].tolist(), "y": y.tolist()}}
    return result, report


# -- problem 2: in-between -------------------------------------------------------------------------
def gap_regions(xs):
    cluster = np.zeros(xs.shape, bool)
    for lo, hi in GAP_CLUSTERS:
        cluster |= (xs >= lo - 1e-6) & (xs <= hi + 1e-6)
    gap = (xs >= GAP_CORE[0] - 1e-6) & (xs <= GAP_CORE[1] + 1e-6)
    outside = (xs < GAP_CLUSTERS[0][0] - 1e-6) | (xs > GAP_CLUSTERS[1][1] + 1e-6)
    return cluster, gap, outside


def problem_in_between(cfg, seed):
    x, y, x_test = in_between_data(seed)
    xs = x_test[:, 0].numpy()
    cluster, gap, outside = gap_regions(xs)
    model = make_regressor(seed)
    guide, ref, report, secs = run_problem(model, x, y, x_test, cfg, seed, cluster)
    p = report.per_input
    truth = gap_function(xs.astype(np.float64))
    cov_vi, cov_hmc = _covers(p, truth, "vi"), _covers(p, truth, "hmc")
    std_vi, std_hmc, ratio = p.vi_std.to_numpy(), p.hmc_std.to_numpy(), p.std_ratio.to_numpy()
    headline = {
        "std_ratio_cluster": _med(ratio[cluster]),
        "std_ratio_gap": _med(ratio[gap]),
        "std_ratio_outside": _med(ratio[outside]),
        "vi_gap_over_cluster": _med(std_vi[gap]) / _med(std_vi[cluster]),
        "hmc_gap_over_cluster": _med(std_hmc[gap]) / _med(std_hmc[cluster]),
        "vi_max_gap_over_max_cluster": float(np.max(std_vi[gap]) / np.max(std_vi[cluster])),
        "hmc_max_gap_over_max_cluster": float(np.max(std_hmc[gap]) / np.max(std_hmc[cluster])),
        "vi_std_gap": _med(std_vi[gap]),
        "hmc_std_gap": _med(std_hmc[gap]),
        "vi_std_cluster": _med(std_vi[cluster]),
        "hmc_std_cluster": _med(std_hmc[cluster]),
        "truth_coverage90_gap_vi": float(cov_vi[gap].mean()),
        "truth_coverage90_gap_hmc": float(cov_hmc[gap].mean()),
        "vi_abs_error_gap": _med(np.abs(p.vi_mean.to_numpy() - truth)[gap]),
        "hmc_abs_error_gap": _med(np.abs(p.hmc_mean.to_numpy() - truth)[gap]),
        "std_ratio_gap_by_chain_half": [_med(std_vi[gap] / h[gap]) for h in _half_stds(report)],
        "hmc_gap_over_cluster_by_chain_half": [_med(h[gap]) / _med(h[cluster]) for h in _half_stds(report)],
        **diagnostics(report, ref, xs, cluster),
    }
    settings = {
        "data": f"{GAP_N_PER_CLUSTER} points uniform in each of {[list(c) for c in GAP_CLUSTERS]}, "
                f"y = sin(3x) + N(0, {GAP_NOISE}^2), generator seed {seed}",
        "regions": f"cluster: inside a cluster; gap: x in {list(GAP_CORE)}; outside: |x| > 1",
        "x_test": f"linspace{GAP_TEST}",
        "network": f"1-{HIDDEN}-1 ReLU", "prior": f"N(0, {PRIOR_SCALE}^2) on all weights", "noise": NOISE,
        **cfg,
    }
    result = {"headline": headline, "settings": settings, "seconds": secs,
              "per_input": {**_curves(p, xs, truth), "hmc_rhat": hmp_list(ref.diagnostics["rhat_f"])},
              "regions": {"cluster": cluster.tolist(), "gap": gap.tolist(), "outside": outside.tolist()},
              "data": {"x": x[:, 0].tolist(), "y": y.tolist()}}
    return result, report


# -- problem 3: logistic regression --------------------------------------------------------------
def _flat_weights(draws: dict) -> np.ndarray:
    """(S, 31): the 30 coefficients, then the bias."""
    w = np.asarray(draws["weight"], dtype=np.float64).reshape(-1, 30)
    b = np.asarray(draws["bias"], dtype=np.float64).reshape(-1, 1)
    return np.concatenate([w, b], 1)


def _logits(idata) -> np.ndarray:
    """(draws, test points): the logit draws in an InferenceData's predictions."""
    f = np.asarray(idata.predictions["f"].values, np.float64)
    return f.reshape(-1, f.shape[-1])


def logistic_function_space(p, vi_id, hmc_id) -> dict:
    """Per test point: logit and probability std ratios, HMC's mean probability, uncertain or not, |mean difference|."""
    f_vi, f_hmc = _logits(vi_id), _logits(hmc_id)
    logit_ratio = f_vi.std(0, ddof=1) / f_hmc.std(0, ddof=1)
    prob_ratio = p.std_ratio.to_numpy()
    hmc_p = p.hmc_mean.to_numpy()
    uncertain = (hmc_p > UNCERTAIN[0]) & (hmc_p < UNCERTAIN[1])
    abs_diff = np.abs(p.vi_mean.to_numpy() - hmc_p)
    return {"logit_ratio": logit_ratio, "prob_ratio": prob_ratio, "hmc_p": hmc_p, "uncertain": uncertain,
            "abs_diff": abs_diff}


def logistic_weight_space(vi_id, hmc_id, xte) -> dict:
    """VI's and HMC's weights and stds, HMC's covariance and correlations, and mean-field theory's stds from them."""
    w_vi = _flat_weights({k: vi_id.posterior[k].values for k in ("weight", "bias")})
    w_hmc = _flat_weights({k: hmc_id.posterior[k].values for k in ("weight", "bias")})
    cov = np.cov(w_hmc, rowvar=False)
    sd_hmc, sd_vi = np.sqrt(np.diag(cov)), w_vi.std(0, ddof=1)
    corr = cov / np.outer(sd_hmc, sd_hmc)
    off = np.abs(corr[~np.eye(31, dtype=bool)])
    precision = np.linalg.inv(cov)
    # For a Gaussian posterior N(m, S), the mean-field q minimizing KL(q || p) has
    # var_i = 1 / (S^-1)_ii (Bishop 2006, Pattern Recognition and Machine Learning, sec. 10.1.2).
    sd_mf = 1.0 / np.sqrt(np.diag(precision))
    xt1 = np.concatenate([xte.numpy().astype(np.float64), np.ones((xte.shape[0], 1))], 1)
    logit_sd_mf = np.sqrt((xt1**2 / np.diag(precision)).sum(1))
    logit_sd_full = np.sqrt(np.einsum("ni,ij,nj->n", xt1, cov, xt1))
    eig = np.linalg.eigvalsh(corr)
    w_ratio = sd_vi / sd_hmc
    return {"w_vi": w_vi, "w_hmc": w_hmc, "cov": cov, "sd_hmc": sd_hmc, "sd_vi": sd_vi, "corr": corr,
            "off": off, "precision": precision, "sd_mf": sd_mf, "logit_sd_mf": logit_sd_mf,
            "logit_sd_full": logit_sd_full, "eig": eig, "w_ratio": w_ratio}


def logistic_headline(fs, ws, report, ref) -> dict:
    """The logistic problem's headline: function and weight space against HMC and theory, test scores, diagnostics."""
    prob_ratio, logit_ratio, uncertain, abs_diff = (fs[k] for k in ("prob_ratio", "logit_ratio", "uncertain",
                                                                      "abs_diff"))
    cov, precision, sd_vi, sd_mf, sd_hmc = (ws[k] for k in ("cov", "precision", "sd_vi", "sd_mf", "sd_hmc"))
    w_ratio, off, eig = ws["w_ratio"], ws["off"], ws["eig"]
    return {
        "prob_std_ratio_median": _med(prob_ratio),
        "prob_std_ratio_median_uncertain": _med(prob_ratio[uncertain]),
        "num_uncertain": int(uncertain.sum()),
        "num_test": int(len(prob_ratio)),
        "logit_std_ratio_median": _med(logit_ratio),
        "logit_std_ratio_range": [float(np.min(logit_ratio)), float(np.max(logit_ratio))],
        "share_test_logit_std_ratio_gt1": float(np.mean(logit_ratio > 1)),
        "prob_mean_abs_diff_mean": float(abs_diff.mean()),
        "prob_mean_abs_diff_max": float(abs_diff.max()),
        "prob_mean_abs_diff_mean_uncertain": float(abs_diff[uncertain].mean()) if uncertain.any() else math.nan,
        "weight_std_ratio_median": _med(w_ratio),
        "weight_std_ratio_range": [float(w_ratio.min()), float(w_ratio.max())],
        "share_weights_std_ratio_lt1": float(np.mean(w_ratio < 1)),
        "meanfield_theory_std_ratio_median": _med(sd_mf / sd_hmc),
        "vi_over_meanfield_theory_median": _med(sd_vi / sd_mf),
        "corr_vi_std_with_theory": float(np.corrcoef(np.log(sd_vi), np.log(sd_mf))[0, 1]),
        "meanfield_theory_logit_std_ratio_median": _med(ws["logit_sd_mf"] / ws["logit_sd_full"]),
        # share of each coefficient's posterior variance explained by the others (1 - 1 / VIF)
        "hmc_multiple_r2_median": _med(1.0 - 1.0 / (np.diag(cov) * np.diag(precision))),
        "hmc_multiple_r2_range": [float(v) for v in np.sort(1.0 - 1.0 / (np.diag(cov) * np.diag(precision)))[[0, -1]]],
        "hmc_abs_corr_median": _med(off),
        "hmc_abs_corr_max": float(off.max()),
        "hmc_corr_condition_number": float(eig.max() / eig.min()),
        "error_rate_vi": report.get("error_rate", "test", "vi"),
        "error_rate_hmc": report.get("error_rate", "test", "hmc"),
        "mlpd_vi": report.get("mlpd", "test", "vi"),
        "mlpd_hmc": report.get("mlpd", "test", "hmc"),
        **diagnostics(report, ref),
    }


def problem_logistic(cfg, seed):
    """Logistic regression on breast cancer, BBB against HMC; returns (the problem's result, the report)."""
    data = bbb.datasets.load_sklearn("breast_cancer", seed=seed)
    torch.manual_seed(seed)
    model = bbb.BayesianClassifier(nn.Linear(30, 1), prior=dist.Normal(0.0, PRIOR_SCALE))
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    in_data = np.ones(xte.shape[0], bool)  # 30-D: every test point is "in the data"
    guide, ref, report, secs = run_problem(model, xtr, ytr, xte, cfg, seed, in_data, y_test=yte)
    p = report.per_input
    vi_id, hmc_id = report.vi, report.hmc
    fs = logistic_function_space(p, vi_id, hmc_id)  # probabilities and logits per test point
    # weight space: VI against HMC marginals, and against what mean-field theory predicts
    ws = logistic_weight_space(vi_id, hmc_id, xte)
    headline = logistic_headline(fs, ws, report, ref)
    settings = {
        "data": f"load_sklearn('breast_cancer', seed={seed}): {xtr.shape[0]} train / {xte.shape[0]} test, "
                "30 features standardized with training statistics",
        "model": "BayesianClassifier(nn.Linear(30, 1)): Bernoulli(logits = x w + b)",
        "prior": f"N(0, {PRIOR_SCALE}^2) on the 30 weights and the bias",
        **cfg,
    }
    sd_vi, sd_hmc, sd_mf, w_vi, w_hmc = (ws[k] for k in ("sd_vi", "sd_hmc", "sd_mf", "w_vi", "w_hmc"))
    result = {
        "headline": headline, "settings": settings, "seconds": secs,
        "per_test": {"hmc_mean_prob": hmp_list(fs["hmc_p"]), "vi_mean_prob": hmp_list(p.vi_mean),
                     "vi_prob_std": hmp_list(p.vi_std), "hmc_prob_std": hmp_list(p.hmc_std),
                     "logit_std_ratio": hmp_list(fs["logit_ratio"]),
                     "meanfield_theory_logit_std": hmp_list(ws["logit_sd_mf"]),
                     "hmc_logit_std_gaussian": hmp_list(ws["logit_sd_full"])},
        "weights": {"label": [f"w[{i}]" for i in range(30)] + ["b"], "feature": list(data.feature_names) + ["bias"],
                    "vi_std": hmp_list(sd_vi), "hmc_std": hmp_list(sd_hmc), "meanfield_theory_std": hmp_list(sd_mf),
                    "vi_mean": hmp_list(w_vi.mean(0)), "hmc_mean": hmp_list(w_hmc.mean(0))},
        "hmc_corr": ws["corr"].tolist(),
    }
    return result, report


def hmp_list(a):
    return [float(v) for v in np.asarray(a, dtype=float)]


# -- figures ------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shade(ax, spans, label=None):
    for i, (lo, hi) in enumerate(spans):
        ax.axvspan(lo, hi, color="0.9", zorder=0, label=label if i == 0 else None)


def plot_regression(res, spans, path: Path, title: str, gap=None):
    plt = _plt()
    c = res["per_input"]
    x = np.array(c["x"])
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 9.0), sharex=True,
                             gridspec_kw={"height_ratios": [2.2, 1.3, 1.3]})
    ax = axes[0]
    _shade(ax, spans, "training inputs")
    if gap is not None:
        ax.axvspan(*gap, color="C3", alpha=0.07, zorder=0, label="gap (scored)")
    ax.fill_between(x, c["hmc_q05"], c["hmc_q95"], color="C0", alpha=0.25, label="HMC 90% band of f")
    ax.fill_between(x, c["vi_q05"], c["vi_q95"], color="C1", alpha=0.45, label="VI (BBB) 90% band of f")
    ax.plot(x, c["hmc_mean"], color="C0", lw=1.5, label="HMC mean")
    ax.plot(x, c["vi_mean"], color="C1", lw=1.5, ls="--", label="VI mean")
    ax.plot(x, c["truth"], color="k", lw=0.8, ls=":", label="true function")
    ax.scatter(res["data"]["x"], res["data"]["y"], s=7, color="k", zorder=3, label="data")
    lo = min(np.min(c["hmc_q05"]), np.min(res["data"]["y"]))
    hi = max(np.max(c["hmc_q95"]), np.max(res["data"]["y"]))
    pad = 0.1 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("f(x)")
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title(title, fontsize=10)
    ax = axes[1]
    _shade(ax, spans)
    ax.semilogy(x, c["hmc_std"], color="C0", label="HMC")
    ax.semilogy(x, c["vi_std"], color="C1", ls="--", label="VI (BBB)")
    ax.set_ylabel("posterior std of f(x)")
    ax.legend(fontsize=8)
    ax = axes[2]
    _shade(ax, spans)
    ax.semilogy(x, c["std_ratio"], color="C2")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("std ratio VI / HMC")
    ax.set_xlabel("x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_logistic(res, path: Path):
    plt = _plt()
    w, t = res["weights"], res["per_test"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    hs, vs, ms = (np.array(w[k]) for k in ("hmc_std", "vi_std", "meanfield_theory_std"))
    ax.loglog(hs, vs, "o", color="C1", ms=5, label="VI (BBB)")
    ax.loglog(hs, ms, "x", color="C2", ms=5, label="mean-field theory 1/sqrt(Prec_ii)")
    lim = [min(hs.min(), vs.min(), ms.min()) * 0.8, max(hs.max(), vs.max(), ms.max()) * 1.25]
    ax.plot(lim, lim, "k-", lw=0.8, label="equal")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("HMC marginal std of coefficient")
    ax.set_ylabel("approximate std")
    ax.set_title("weight space: 30 coefficients + bias", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    corr = np.array(res["hmc_corr"])
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("HMC posterior correlation (mean-field: identity)", fontsize=10)
    ax.set_xlabel("coefficient (30 = bias)")
    ax.set_ylabel("coefficient")
    ax = axes[2]
    hp, ratio = np.array(t["hmc_mean_prob"]), np.array(t["logit_std_ratio"])
    pr = np.array(t["vi_prob_std"]) / np.array(t["hmc_prob_std"])
    unc = (hp > UNCERTAIN[0]) & (hp < UNCERTAIN[1])
    theory = np.array(t["meanfield_theory_logit_std"]) / np.array(t["hmc_logit_std_gaussian"])
    ax.plot(hp, ratio, "o", ms=4, color="C0", label="logit, VI / HMC")
    ax.plot(hp, theory, "x", ms=4, color="C2", label="logit, mean-field theory / HMC")
    ax.plot(hp[unc], pr[unc], "s", ms=5, mfc="none", color="C3",
            label=f"probability, VI / HMC ({UNCERTAIN[0]} < p < {UNCERTAIN[1]})")
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("HMC mean P(benign) at the test point")
    ax.set_ylabel("posterior std ratio")
    ax.set_title(f"function space: {len(hp)} test points", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: short VI, short HMC")
    parser.add_argument("--out", type=Path, default=cls.DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="data, network init, VI and HMC seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--only", choices=PROBLEMS, nargs="+", default=list(PROBLEMS),
                        help="run only these problems")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    runners = {"curve": problem_curve, "in_between": problem_in_between, "logistic": problem_logistic}
    problems = {}
    for name in args.only:
        t0 = time.perf_counter()
        res, _ = runners[name](CONFIGS[mode][name], args.seed)
        res["seconds"]["total"] = time.perf_counter() - t0
        problems[name] = res
        h = res["headline"]
        print(f"[vi_failures] {name}: k-hat {h['psis_khat']:.2f}, HMC max R-hat {h['hmc_max_rhat']:.3f}, "
              f"min ESS {h['hmc_min_ess_bulk']:.0f} (VI {res['seconds']['vi']:.0f} s, "
              f"HMC {res['seconds']['hmc']:.0f} s)", flush=True)

    figures = {}
    if "curve" in problems:
        figures["curve"] = "vi_failures_curve.png"
        plot_regression(problems["curve"], [CURVE_RANGE], args.out / figures["curve"],
                        "Regression curve: BBB (mean-field) vs HMC, 1-16-1 ReLU")
    if "in_between" in problems:
        figures["in_between"] = "vi_failures_in_between.png"
        plot_regression(problems["in_between"], GAP_CLUSTERS, args.out / figures["in_between"],
                        "In-between toy: BBB (mean-field) vs HMC, 1-16-1 ReLU", gap=GAP_CORE)
    if "logistic" in problems:
        figures["logistic"] = "vi_failures_logistic.png"
        plot_logistic(problems["logistic"], args.out / figures["logistic"])

    total = time.perf_counter() - start
    result = {
        "mode": mode, "seed": args.seed, "seconds": total, "command": cls.command_line(),
        "versions": cls.versions(), "figures": figures,
        "problems": problems,
    }
    (args.out / "vi_failures.json").write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    write_report(args.out / "vi_failures.md", result, mode)
    print(f"[vi_failures] wrote {args.out} in {total:.0f} s", flush=True)
    return result


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


# -- report --------------------------------------------------------------------------------------------
def _f(v, fmt="{:.2f}"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def headline_table(problems) -> str:
    rows = []
    for name, res in problems.items():
        h = res["headline"]
        if name == "curve":
            near, far = f"{_f(h['std_ratio_in'])} (in [0, 0.5])", f"{_f(h['std_ratio_out'])} (outside)"
            own = (f"VI {_f(h['vi_std_out_over_in'])}, HMC {_f(h['hmc_std_out_over_in'])} (out / in)")
        elif name == "in_between":
            near, far = f"{_f(h['std_ratio_cluster'])} (clusters)", f"{_f(h['std_ratio_gap'])} (gap)"
            own = (f"VI {_f(h['vi_gap_over_cluster'])}, HMC {_f(h['hmc_gap_over_cluster'])} (gap / clusters)")
        else:
            near = f"{_f(h['logit_std_ratio_median'])} (logit), {_f(h['prob_std_ratio_median'])} (prob.)"
            far = f"{_f(h['weight_std_ratio_median'])} (weights)"
            own = f"mean abs. diff. of mean prob. {_f(h['prob_mean_abs_diff_mean'], '{:.4f}')}"
        rows.append([
            TITLES[name], near, far, own,
            f"{_f(h['psis_khat'])} ({h['khat_reading']})",
            f"{_f(h['hmc_max_rhat'], '{:.3f}')} (median {_f(h['hmc_median_rhat'], '{:.3f}')}; "
            f"{100 * h['hmc_share_rhat_ok']:.0f}% <= {RHAT_MAX})",
            _f(h.get("hmc_max_nested_rhat"), "{:.3f}"),
            f"{_f(h['hmc_min_ess_bulk'], '{:.0f}')} / {_f(h['hmc_min_ess_tail'], '{:.0f}')}",
            str(h["hmc_divergences"]),
        ])
    return cls.write_markdown_table(rows, [
        "problem", "std ratio VI/HMC, median (data)", "std ratio VI/HMC, median (away / gap / weights)",
        "each method's own std growth", "PSIS k-hat of q", "HMC max R-hat on f(x*)", "HMC max nested R-hat",
        "HMC min bulk / tail ESS", "divergences",
    ])


def settings_lines(res) -> list[str]:
    s = res["settings"]
    sec = res["seconds"]
    hmc = (f"ChEES-HMC `run_hmc`: {s['chains']} chains x ({s['warmup']} warmup + {s['draws']} draws), "
           f"at most {s['max_steps']} leapfrog steps per iteration, target acceptance 0.65; "
           f"adapted step size {res['headline']['hmc_step_size']:.2g}, trajectory length "
           f"{res['headline']['hmc_trajectory_length']:.2g}, {res['headline']['hmc_mean_leapfrog_steps']:.0f} "
           f"steps per draw; {sec['hmc']:.0f} s")
    vi = (f"BBB `fit`: full batch, {s['particles']} particles, closed-form KL, {s['epochs']} epochs at lr {LR} "
          f"then {s['epochs'] // 2} at lr {LR / 5} (Adam); final ELBO {sec['vi_final_elbo']:.1f}; "
          f"{s['vi_draws']} draws from q for the comparison; {sec['vi']:.0f} s")
    return [f"- {k}: {v}" for k, v in s.items() if k in ("data", "input_scaling", "x_test", "regions",
                                                             "model", "network", "prior", "noise")] + [
        f"- VI: {vi}", f"- HMC reference: {hmc}"]


def write_report(path: Path, r: dict, mode: str):
    problems = r["problems"]
    parts = [
        "# Where mean-field VI goes wrong: Bayes by Backprop against HMC on three problems",
        "",
        f"Mode: **{mode}**. Command (from the repository root):",
        "",
        f"```bash\n{r['command']}\n```",
        "",
        f"Total run time: {r['seconds']:.0f} s on {r['versions']['machine']}. Seed {r['seed']} (data, "
        "network initialisation, VI's weight noise, HMC's starting points and momenta).",
        "",
        "Every problem fits one Pyro model twice: by Bayes by Backprop (mean-field Gaussian `BBBGuide`, "
        "`pyro_bbb.fit`) and by the ChEES-HMC reference (`pyro_bbb.run_hmc`), and reads both with "
        "`pyro_bbb.compare`: per test input the ratio of posterior stds of the network output "
        "(VI / HMC, ideal 1), the PSIS k-hat of q (Yao et al. 2018: < 0.5 good, 0.5-0.7 usable, "
        f"> {PARETO_K_MAX} unreliable) and the reference's convergence on f(x*) (rank-normalised split "
        f"R-hat, want <= {RHAT_MAX}; bulk / tail ESS, want >= {ESS_MIN}; nested R-hat over superchains "
        "of 8 chains that share a start).",
        "",
        "## Headline",
        "",
        headline_table(problems),
        "",
    ]
    if mode == "quick":
        parts += ["Quick mode is a smoke test: the HMC reference is far too short to be converged and "
                  "VI is trained briefly. Read the full run for the numbers.", ""]
    for name, res in problems.items():
        h = res["headline"]
        parts += [f"## {TITLES[name]}", ""] + settings_lines(res) + [""]
        parts += [detail_table(name, h), "", f"![{name}]({r['figures'][name]})", ""]
        parts += ["**What it shows.** " + interpretation(name, h, mode), ""]
    parts += [
        "## References",
        "",
        "- Blundell, Cornebise, Kavukcuoglu & Wierstra (2015), Weight Uncertainty in Neural Networks, ICML.",
        "- Foong, Li, Hernandez-Lobato & Turner (2019), 'In-Between' Uncertainty in Bayesian Neural "
        "Networks, ICML Workshop on Uncertainty and Robustness in Deep Learning (arXiv 1906.11537).",
        "- Bishop (2006), Pattern Recognition and Machine Learning, sec. 10.1.2 (the mean field of a "
        "correlated Gaussian).",
        "- Yao, Vehtari, Simpson & Gelman (2018), Yes, but Did It Work?: Evaluating Variational "
        "Inference, ICML.",
        "- Hoffman, Radul & Sountsov (2021), An Adaptive MCMC Scheme for Setting Trajectory Lengths in "
        "Hamiltonian Monte Carlo (ChEES-HMC), AISTATS.",
        "- Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021), Rank-normalization, folding, and "
        "localization: an improved R-hat, Bayesian Analysis.",
        "",
        "## Versions",
        "",
        "\n".join(f"- {k}: {v}" for k, v in r["versions"].items()),
        "",
    ]
    path.write_text("\n".join(parts))


def detail_table(name, h) -> str:
    if name == "curve":
        rows = [
            ["median std ratio VI / HMC", _f(h["std_ratio_in"]), _f(h["std_ratio_out"])],
            ["std ratio at x = -0.5 / x = 1.0", "", " / ".join(_f(v) for v in h["std_ratio_at_ends"])],
            ["VI 90% band covers the true curve", f"{100 * h['truth_coverage90_in_vi']:.0f}%",
             f"{100 * h['truth_coverage90_out_vi']:.0f}%"],
            ["HMC 90% band covers the true curve", f"{100 * h['truth_coverage90_in_hmc']:.0f}%",
             f"{100 * h['truth_coverage90_out_hmc']:.0f}%"],
            ["share of HMC draws inside VI's 90% band (median)", _f(h["coverage90_of_hmc_in"]),
             _f(h["coverage90_of_hmc_out"])],
        ]
        return cls.write_markdown_table(rows, ["", "x in [0, 0.5] (data)", "outside [0, 0.5]"])
    if name == "in_between":
        rows = [
            ["median std of f, VI", _f(h["vi_std_cluster"], "{:.3f}"), _f(h["vi_std_gap"], "{:.3f}"),
             _f(h["vi_gap_over_cluster"])],
            ["median std of f, HMC", _f(h["hmc_std_cluster"], "{:.3f}"), _f(h["hmc_std_gap"], "{:.3f}"),
             _f(h["hmc_gap_over_cluster"])],
            ["median std ratio VI / HMC", _f(h["std_ratio_cluster"]), _f(h["std_ratio_gap"]), ""],
            ["max std in gap / max std in clusters", "", "",
             f"VI {_f(h['vi_max_gap_over_max_cluster'])}, HMC {_f(h['hmc_max_gap_over_max_cluster'])}"],
            ["90% band covers sin(3x) in the gap", "", f"VI {100 * h['truth_coverage90_gap_vi']:.0f}%, "
             f"HMC {100 * h['truth_coverage90_gap_hmc']:.0f}%", ""],
            ["median abs. error of the mean in the gap", "", f"VI {_f(h['vi_abs_error_gap'])}, "
             f"HMC {_f(h['hmc_abs_error_gap'])}", ""],
        ]
        return cls.write_markdown_table(rows, ["", "clusters", f"gap x in {list(GAP_CORE)}", "gap / clusters"])
    rows = [
        ["std ratio VI / HMC of the logit, median over test points (min - max)",
         f"{_f(h['logit_std_ratio_median'])} ({_f(h['logit_std_ratio_range'][0])} - "
         f"{_f(h['logit_std_ratio_range'][1])}); > 1 at {100 * h['share_test_logit_std_ratio_gt1']:.0f}% of test points"],
        ["same, predicted by mean-field theory from the HMC covariance",
         _f(h["meanfield_theory_logit_std_ratio_median"])],
        ["std ratio VI / HMC of the probability, median (all / uncertain points)",
         f"{_f(h['prob_std_ratio_median'])} / {_f(h['prob_std_ratio_median_uncertain'])} "
         f"({h['num_uncertain']} of {h['num_test']} test points with HMC mean in {list(UNCERTAIN)})"],
        ["mean abs. difference of mean probability, VI - HMC (mean / max / mean on uncertain)",
         f"{_f(h['prob_mean_abs_diff_mean'], '{:.4f}')} / {_f(h['prob_mean_abs_diff_max'], '{:.3f}')} / "
         f"{_f(h['prob_mean_abs_diff_mean_uncertain'], '{:.3f}')}"],
        ["weight std ratio VI / HMC, median (min - max) over 31 coefficients",
         f"{_f(h['weight_std_ratio_median'])} ({_f(h['weight_std_ratio_range'][0])} - "
         f"{_f(h['weight_std_ratio_range'][1])}); < 1 for {100 * h['share_weights_std_ratio_lt1']:.0f}%"],
        ["mean-field theory std / HMC std, median", _f(h["meanfield_theory_std_ratio_median"])],
        ["VI std / mean-field theory std, median (correlation of logs)",
         f"{_f(h['vi_over_meanfield_theory_median'])} ({_f(h['corr_vi_std_with_theory'])})"],
        ["HMC: share of each coefficient's variance explained by the others (1 - 1/VIF), median (range)",
         f"{_f(h['hmc_multiple_r2_median'])} ({_f(h['hmc_multiple_r2_range'][0])} - {_f(h['hmc_multiple_r2_range'][1])})"],
        ["HMC posterior |correlation|, median / max; condition number of the correlation matrix",
         f"{_f(h['hmc_abs_corr_median'])} / {_f(h['hmc_abs_corr_max'])}; {_f(h['hmc_corr_condition_number'], '{:.0f}')}"],
        ["test error rate VI / HMC", f"{100 * h['error_rate_vi']:.2f}% / {100 * h['error_rate_hmc']:.2f}%"],
        ["test mean log predictive density VI / HMC", f"{_f(h['mlpd_vi'], '{:.4f}')} / {_f(h['mlpd_hmc'], '{:.4f}')}"],
    ]
    return cls.write_markdown_table(rows, ["metric", "value"])


def _conv_sentence(h, detail: bool = True) -> str:
    ok = h["hmc_converged"]
    s = (f"The reference {'is' if ok else 'is not'} converged by the usual thresholds (max R-hat "
         f"{h['hmc_max_rhat']:.3f}, median {h['hmc_median_rhat']:.3f}, {100 * h['hmc_share_rhat_ok']:.0f}% of "
         f"test inputs at R-hat <= {RHAT_MAX}; min bulk ESS {h['hmc_min_ess_bulk']:.0f}; "
         f"{h['hmc_divergences']} divergences")
    if h.get("hmc_max_nested_rhat") is not None:
        s += f"; max nested R-hat {h['hmc_max_nested_rhat']:.3f}"
    s += ")."
    if detail and "hmc_max_rhat_at_x" in h and not h["hmc_converged"]:
        nested = h.get("hmc_max_nested_rhat")
        s += (f" The largest R-hat is at x = {h['hmc_max_rhat_at_x']:.2f}; on the test inputs among the "
              f"data it is at most {h['hmc_max_rhat_in_data']:.3f} ({100 * h['hmc_share_rhat_ok_in_data']:.0f}% "
              f"<= {RHAT_MAX}). "
              + ("Where the data do not pin f down, " if h["hmc_max_rhat_in_data"] < h["hmc_max_rhat"] else "")
              + "the chains move slowly between functions: R-hat says the chains' means are still "
              f"further apart than their within-chain spread explains, while the draws are plentiful "
              f"(min bulk ESS {h['hmc_min_ess_bulk']:.0f})")
        if nested is not None:
            s += f" and the superchains agree (nested R-hat {nested:.3f})"
        s += (". By R-hat the reference is not converged to the usual standard there; the split-half "
              "check above shows how much that can move the std ratios.")
    return s


def _rel(r: float) -> str:
    """How a std ratio VI / HMC reads in words."""
    if 0.8 <= r <= 1.25:
        return "close to"
    return "larger than" if r > 1 else "smaller than"


def _khat_sentence(h) -> str:
    k = h["psis_khat"]
    s = f"The PSIS k-hat of q is {k:.2f} ({h['khat_reading']}; Yao et al. 2018)"
    if k > PARETO_K_MAX:
        s += (": the importance weights p(theta, y) / q(theta) are so heavy-tailed that q cannot even "
              "be corrected by importance sampling, let alone be trusted as the posterior in weight space")
    return s + "."


def _half_sentence(values, what) -> str:
    a, b = values
    return (f" Read from either half of the HMC chains alone (independent starting points), {what} is "
            f"{a:.2f} and {b:.2f}, so the conclusion does not hinge on the chains that mix slowest.")


def _points_apart(h) -> str:
    n = round(abs(h["error_rate_vi"] - h["error_rate_hmc"]) * h["num_test"])
    return "the same number of misclassified test points" if n == 0 else \
        f"{n} of {h['num_test']} test point{'s' if n > 1 else ''} apart"


def _curve_reading(h) -> str:
    """The curve problem's reading: VI's std against HMC's in and away from the data, and k-hat."""
    r_in, r_out = h["std_ratio_in"], h["std_ratio_out"]
    return (
        f"Inside the data (x in [0, 0.5]) VI's posterior std of f is {_rel(r_in)} HMC's (median ratio "
        f"{r_in:.2f}); away from the data it is {_rel(r_out)} HMC's (median ratio {r_out:.2f}; "
        f"{h['std_ratio_at_ends'][0]:.2f} at x = -0.5 and {h['std_ratio_at_ends'][1]:.2f} at x = 1). "
        f"Both methods widen their bands away from the data, VI's std by a factor "
        f"{h['vi_std_out_over_in']:.1f} from inside to outside (medians) and HMC's by "
        f"{h['hmc_std_out_over_in']:.1f}. Outside the data VI's 90% band holds the true curve at "
        f"{100 * h['truth_coverage90_out_vi']:.0f}% of the test inputs, HMC's at "
        f"{100 * h['truth_coverage90_out_hmc']:.0f}% (no model can know the curve there from these data; "
        "a band that misses it claims knowledge the data do not give)."
        + _half_sentence(h["std_ratio_out_by_chain_half"], "the median std ratio outside the data")
        + " " + _khat_sentence(h)
        + " For a BNN this is expected (q sits in one mode of a permutation-symmetric, multimodal "
        "posterior) and says nothing by itself about the predictions, which is why the function-space "
        "ratios are the primary view."
    )


def _in_between_reading(h) -> str:
    """The in-between problem's reading: whether VI's std grows in the gap as HMC's does, and k-hat."""
    vi_g, hmc_g = h["vi_gap_over_cluster"], h["hmc_gap_over_cluster"]
    verdict = ("does not become more uncertain between the clusters than inside them"
               if vi_g < 1.5 else f"grows by a factor {vi_g:.1f} there, less than HMC's")
    return (
        f"HMC's posterior std of f in the middle of the gap is {hmc_g:.1f} times its std inside the "
        f"clusters (medians); VI's is {vi_g:.2f} times: the mean-field posterior {verdict}. "
        "This is the failure Foong et al. (2019) describe: for networks with one hidden layer they "
        "prove that a factorized Gaussian q bounds the predictive variance on the segment between two "
        "inputs by the variances at its ends, so no bump of uncertainty between the clusters is "
        "possible, while HMC (and the exact posterior) have one. The VI / HMC std ratio is "
        f"{h['std_ratio_cluster']:.2f} in the clusters and {h['std_ratio_gap']:.2f} in the gap. The "
        "consequence is over-confidence exactly where the model has no data: the true sin(3x) lies "
        f"inside VI's 90% band at {100 * h['truth_coverage90_gap_vi']:.0f}% of the gap inputs and "
        f"inside HMC's at {100 * h['truth_coverage90_gap_hmc']:.0f}%, with median absolute errors of the "
        f"mean {h['vi_abs_error_gap']:.2f} (VI) and {h['hmc_abs_error_gap']:.2f} (HMC)."
        + _half_sentence(h["std_ratio_gap_by_chain_half"], "the median std ratio in the gap")
        + " " + _khat_sentence(h)
    )


def _logistic_function_space_sentences(h) -> str:
    """The logistic reading's sentences on the logit's std, VI against HMC and mean-field theory."""
    r_logit = h["logit_std_ratio_median"]
    if r_logit > 1:
        return (
            f"In function space the error goes the other way at the test points: the std of the logit is "
            f"{r_logit:.2f} times HMC's (median; > 1 at {100 * h['share_test_logit_std_ratio_gt1']:.0f}% of "
            "the test points), and the same Gaussian mean-field theory predicts "
            f"{h['meanfield_theory_logit_std_ratio_median']:.2f}. Test points look like training points, and "
            "along the directions that the data pin down the posterior's correlations make the terms of "
            "x w cancel; a factorized q cannot cancel them, so it over-states the spread of the logit while "
            "under-stating that of the weights. "
        )
    return (
        f"In function space the std of the logit is {r_logit:.2f} times HMC's (median; Gaussian mean-field "
        f"theory predicts {h['meanfield_theory_logit_std_ratio_median']:.2f}). "
    )


def _logistic_reading(h) -> str:
    """The logistic problem's reading: a correlated posterior, the mean field's stds, agreeing predictions, k-hat."""
    return (
        "Logistic regression on 30 standardized, strongly collinear features (radius, perimeter and area "
        "of the same cells...) has a correlated posterior even where the pairwise correlations are mild "
        f"(median |correlation| {h['hmc_abs_corr_median']:.2f}, max {h['hmc_abs_corr_max']:.2f}): the other "
        f"coefficients jointly explain a median {100 * h['hmc_multiple_r2_median']:.0f}% (range "
        f"{100 * h['hmc_multiple_r2_range'][0]:.0f}-{100 * h['hmc_multiple_r2_range'][1]:.0f}%) of each "
        "coefficient's posterior variance. A factorized q cannot represent that: VI's marginal std is "
        f"smaller than HMC's for {100 * h['share_weights_std_ratio_lt1']:.0f}% of the 31 coefficients "
        f"(median ratio {h['weight_std_ratio_median']:.2f}). This is the textbook behaviour of the "
        "KL(q || p) mean field: for a Gaussian posterior N(m, S) the optimal factorized q has variances "
        "1 / (S^-1)_ii, the conditional rather than the marginal variances (Bishop 2006, sec. 10.1.2); "
        f"computed from the HMC covariance this predicts a median ratio of "
        f"{h['meanfield_theory_std_ratio_median']:.2f}, and VI's stds sit at "
        f"{h['vi_over_meanfield_theory_median']:.2f} times that prediction (correlation of logs "
        f"{h['corr_vi_std_with_theory']:.2f}). " + _logistic_function_space_sentences(h) +
        f"The mean probabilities still agree closely (mean |difference| {h['prob_mean_abs_diff_mean']:.4f}, "
        f"max {h['prob_mean_abs_diff_max']:.3f}), as do test error ({100 * h['error_rate_vi']:.2f}% vs "
        f"{100 * h['error_rate_hmc']:.2f}%, {_points_apart(h)}) and mean log predictive density "
        f"({h['mlpd_vi']:.4f} vs {h['mlpd_hmc']:.4f}). " + _khat_sentence(h)
        + " Here the posterior is identifiable, unimodal and 31-dimensional: a large k-hat says plainly "
        "that a factorized Gaussian is a poor stand-in for a correlated posterior, even when its "
        "predictive means are fine."
    )


def interpretation(name, h, mode) -> str:
    """A problem's "What it shows": a quick-mode note, else its reading and the reference's convergence."""
    if mode == "quick":
        return ("Smoke test only: the numbers show the pipeline runs end to end, with an unconverged "
                "reference. " + _conv_sentence(h, detail=False))
    conv = " " + _conv_sentence(h)
    if name == "curve":
        return _curve_reading(h) + conv
    if name == "in_between":
        return _in_between_reading(h) + conv
    return _logistic_reading(h) + conv


if __name__ == "__main__":
    main()
