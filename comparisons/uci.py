"""UCI regression suite: Bayes by Backprop and an HMC reference against published numbers.

The standard benchmark of Hernandez-Lobato & Adams (2015) and Gal & Ghahramani
(2016): for each of the 20 published train/test splits of a data set, inputs and
target are standardized with the training split's statistics, a one-hidden-layer
network (50 ReLU units) with a learned observation noise
(``BayesianRegressor(noise="learned")``, LogNormal(0, 1) prior on the noise std)
is fitted, and the test RMSE of the predictive mean and the test average log
predictive density (log of the mean over posterior draws of the Gaussian
likelihood, per test point, then averaged) are reported in the original units of
the target (RMSE * y_std, LL - log y_std), mean +- standard error over splits.

Methods, on yacht, bostonHousing, energy, concrete and wine-quality-red:

* ``bbb_gaussian``: BBB with a N(0, 1) prior on every weight and bias;
* ``bbb_mixture``: BBB with the paper's scale-mixture prior (see ``MIXTURE_PRIOR``);
* ``hmc``: ``pyro_bbb.run_hmc`` (ChEES-HMC, chains in lockstep) on the same model as
  ``bbb_gaussian``, on the first ``hmc_splits`` splits (all 20 in full mode, 2 in quick).

Every (data set, method, split) result is cached in ``uci_cache_<mode>.json`` in the
output folder as soon as it is done; a rerun with the same configuration resumes
from it (a different configuration starts afresh).  BBB's global settings (steps,
learning rate, initial sigma, the mixture prior) were chosen with ``--tune``, on
validation sets carved from the *training* rows of splits 0 and 1 of yacht and
bostonHousing; test data never enters that choice.

    python comparisons/uci.py --quick    # CI: yacht + bostonHousing, 2 splits, tiny budgets
    python comparisons/uci.py            # full: 5 data sets x 20 splits (HMC on splits 0-4)
    python comparisons/uci.py --tune     # the validation runs that fixed BBB's settings

Data: ``--root`` (default: the environment variable PYRO_BBB_UCI_ROOT, else
``<repo>/../shared/data/uci``), one folder per data set in the standard layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classification as cls  # noqa: E402  (versions, command line, tables)

import pyro.distributions as dist  # noqa: E402
import pyro_bbb as bbb  # noqa: E402
from pyro_bbb.predict import batched_outputs, posterior_draws  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "uci"

DATASETS = ("yacht", "bostonHousing", "energy", "concrete", "wine-quality-red")
METHODS = ("bbb_gaussian", "bbb_mixture", "hmc")
METHOD_LABELS = {
    "bbb_gaussian": "BBB, N(0,1) prior",
    "bbb_mixture": "BBB, scale mixture",
    "hmc": "HMC (ChEES), N(0,1) prior",
}
HIDDEN = 50
GAUSSIAN_PRIOR = dict(loc=0.0, scale=1.0)
# From the paper's grid (pi in {1/4, 1/2, 3/4}, -log sigma1 in {0, 1, 2}, -log sigma2 in
# {6, 7, 8}); chosen among the candidates of TUNE_GRID by validation log-likelihood.
MIXTURE_PRIOR = dict(pi=0.5, sigma1=math.exp(-1), sigma2=math.exp(-7))

# BBB: full-batch Adam, `steps` steps split into stages at lr, lr/3 and lr/10 (a
# step decay: pyro_bbb.fit has no scheduler, so each stage is one fit call that
# continues from the guide's state with a fresh Adam).
LR_STAGES = ((0.6, 1.0), (0.25, 1 / 3), (0.15, 0.1))
CONFIGS = {
    "quick": dict(
        datasets=("yacht", "bostonHousing"), splits=2,
        bbb=dict(steps=150, lr=0.01, num_particles=8, init_scale=1e-3, num_samples=100),
        hmc=dict(num_chains=4, warmup_steps=60, num_samples=30, max_leapfrog_steps=16,
                 target_accept_prob=0.8),
        hmc_splits=2,
    ),
    "full": dict(
        datasets=DATASETS, splits=20,
        bbb=dict(steps=600, lr=0.01, num_particles=8, init_scale=1e-3, num_samples=500),
        # Sample on until the reference check passes or a minute (warmup included) is up.
        hmc=dict(num_chains=16, num_superchains=4, init="map", warmup_steps=300, num_samples=100,
                 max_leapfrog_steps=64, target_accept_prob=0.8, until_converged=True, time_limit=60.0),
        hmc_splits=20,
    ),
}

# Gal & Ghahramani (2016), Table 1 (reprinting VI of Graves 2011 and PBP of
# Hernandez-Lobato & Adams 2015): (mean, standard error) over the 20 splits.
PUBLISHED = {
    "bostonHousing": {"VI": ((4.32, 0.29), (-2.90, 0.07)), "PBP": ((3.01, 0.18), (-2.57, 0.09)),
                      "dropout": ((2.97, 0.19), (-2.46, 0.06))},
    "concrete": {"VI": ((7.19, 0.12), (-3.39, 0.02)), "PBP": ((5.67, 0.09), (-3.16, 0.02)),
                 "dropout": ((5.23, 0.12), (-3.04, 0.02))},
    "energy": {"VI": ((2.65, 0.08), (-2.39, 0.03)), "PBP": ((1.80, 0.05), (-2.04, 0.02)),
               "dropout": ((1.66, 0.04), (-1.99, 0.02))},
    "wine-quality-red": {"VI": ((0.65, 0.01), (-0.98, 0.01)), "PBP": ((0.64, 0.01), (-0.97, 0.01)),
                         "dropout": ((0.62, 0.01), (-0.93, 0.01))},
    "yacht": {"VI": ((6.89, 0.67), (-3.43, 0.16)), "PBP": ((1.02, 0.05), (-1.63, 0.02)),
              "dropout": ((1.11, 0.09), (-1.55, 0.03))},
}
PUBLISHED_METHODS = ("VI", "PBP", "dropout")
# MC dropout with 10x the epochs (RMSE, LL), from the README of yaringal/DropoutUncertaintyExps
# (its +- there are standard deviations over splits, not standard errors, so they are left out).
DROPOUT_10X = {"yacht": (0.72, -1.38), "bostonHousing": (2.80, -2.39), "energy": (1.09, -1.72),
               "concrete": (4.81, -2.94), "wine-quality-red": (0.61, -0.92)}

# --tune: candidates scored on validation rows carved from the training split.
TUNE_SETS = (("yacht", 0), ("yacht", 1), ("bostonHousing", 0), ("bostonHousing", 1))
TUNE_VALIDATION = 0.1
TUNE_GRID = {
    "training (N(0,1) prior)": [
        dict(prior="gaussian", steps=1000, lr=0.01, init_scale=1e-2, decay=False),
        dict(prior="gaussian", steps=1000, lr=0.01, init_scale=1e-2, decay=True),
        dict(prior="gaussian", steps=1000, lr=0.01, init_scale=1e-3, decay=True),
        dict(prior="gaussian", steps=600, lr=0.01, init_scale=1e-3, decay=True),
        dict(prior="gaussian", steps=400, lr=0.01, init_scale=1e-3, decay=True),
        dict(prior="gaussian", steps=600, lr=0.01, init_scale=1e-4, decay=True),
    ],
    "scale mixture (training as chosen above)": [
        dict(prior=dict(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))),
        dict(prior=dict(pi=0.75, sigma1=1.0, sigma2=math.exp(-6))),
        dict(prior=dict(pi=0.25, sigma1=1.0, sigma2=math.exp(-6))),
        dict(prior=dict(pi=0.5, sigma1=math.exp(-1), sigma2=math.exp(-7))),
    ],
}


class DataMissing(SystemExit):
    pass


# -- data -----------------------------------------------------------------------------------
def resolve_root(arg) -> Path:
    root = Path(arg or os.environ.get(bbb.datasets.UCI_ROOT_ENV) or DEFAULT_ROOT).expanduser()
    if not root.is_dir():
        raise DataMissing(
            f"uci.py: UCI data folder {str(root)!r} not found. Pass --root DIR or set "
            f"{bbb.datasets.UCI_ROOT_ENV} to a folder holding yacht/, bostonHousing/, ... in the "
            "standard layout (see ../shared/data/uci/README.md)."
        )
    return root


def load_split(name: str, split: int, root: Path):
    try:
        return bbb.datasets.load_uci(name, split, root)
    except ValueError as err:
        raise DataMissing(f"uci.py: cannot load {name!r} split {split} from {str(root)!r}: {err}")


def carve_validation(x, y, fraction=TUNE_VALIDATION, seed=0):
    """(x_fit, y_fit, x_val, y_val): a seeded random `fraction` of the training rows held out."""
    n = x.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    num_val = int(round(fraction * n))
    val, fit_rows = perm[:num_val], perm[num_val:]
    return x[fit_rows], y[fit_rows], x[val], y[val]


# -- model, methods, scores -------------------------------------------------------------------
def make_model(d_in: int, prior, seed: int):
    torch.manual_seed(seed)  # the network's random init = the guide's initial means
    net = nn.Sequential(nn.Linear(d_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    if prior == "gaussian":
        p = dist.Normal(GAUSSIAN_PRIOR["loc"], GAUSSIAN_PRIOR["scale"])
    else:
        p = bbb.ScaleMixtureNormal(**(MIXTURE_PRIOR if prior == "mixture" else prior))
    return bbb.BayesianRegressor(net, prior=p, noise="learned")


def train_bbb(x, y, prior, *, steps, lr, num_particles, init_scale, seed, decay=True):
    """BBB, full batch; returns (model, guide, seconds)."""
    model = make_model(x.shape[1], prior, seed)
    guide = bbb.BBBGuide(model, init_scale=init_scale)
    stages = LR_STAGES if decay else ((1.0, 1.0),)
    counts = [int(round(f * steps)) for f, _ in stages]
    counts[-1] = steps - sum(counts[:-1])
    t0 = time.perf_counter()
    for k, (count, (_, factor)) in enumerate(zip(counts, stages)):
        bbb.fit(model, guide, x, y, epochs=count, lr=lr * factor, num_particles=num_particles,
                kl="analytic" if prior == "gaussian" else "mc", seed=seed * 10 + k, progress=False)
    return model, guide, time.perf_counter() - t0


def scores(model, draws, x, y, y_std: float) -> dict:
    """Test RMSE of the predictive mean and average log predictive density, original units."""
    f = batched_outputs(model, draws, x)  # (S, n), standardized units
    noise = draws["noise"].reshape(-1, 1).to(f)
    rmse = float((f.mean(0) - y).pow(2).mean().sqrt()) * y_std
    log_p = torch.distributions.Normal(f, noise).log_prob(y)  # (S, n)
    lppd = torch.logsumexp(log_p, 0) - math.log(f.shape[0])
    ll = float(lppd.mean()) - math.log(y_std)
    return {"rmse": rmse, "ll": ll, "noise_mean": float(noise.mean()) * y_std,
            "num_draws": int(f.shape[0])}


def run_bbb(data, prior, cfg, seed) -> dict:
    b = cfg["bbb"]
    model, guide, seconds = train_bbb(
        data.x_train, data.y_train, prior, steps=b["steps"], lr=b["lr"],
        num_particles=b["num_particles"], init_scale=b["init_scale"], seed=seed,
    )
    draws = guide.sample_posterior(b["num_samples"], generator=torch.Generator().manual_seed(seed))
    out = scores(model, draws, data.x_test, data.y_test, data.y_std)
    out["train_seconds"] = seconds
    return out


def run_hmc_split(data, cfg, seed) -> dict:
    model = make_model(data.x_train.shape[1], "gaussian", seed)
    cpu_start = time.process_time()
    ref = bbb.run_hmc(model, data.x_train, data.y_train, x_test=data.x_test, seed=seed,
                      progress=False, **cfg["hmc"])
    cpu_seconds = time.process_time() - cpu_start
    out = scores(model, posterior_draws(ref), data.x_test, data.y_test, data.y_std)
    d = ref.diagnostics
    rhat = np.asarray(d["rhat_f"], dtype=float)
    noise = ref.samples["noise"].reshape(ref.samples["noise"].shape[:2]).double()
    out.update(
        converged=bool(ref.converged),
        stop_reason=ref.stop_reason,
        draws_per_chain=int(noise.shape[1]),
        chain_noise_mean=(noise.mean(1) * data.y_std).tolist(),
        chain_lp_mean=np.asarray(ref.sample_stats["lp"]).mean(1).tolist(),
        train_seconds=ref.wall_time,
        cpu_seconds=cpu_seconds,
        max_rhat_f=float(d["max_rhat_f"]),
        median_rhat_f=float(np.nanmedian(rhat)),
        share_rhat_below_1_1=float(np.mean(rhat < 1.1)),
        min_ess_bulk_f=float(d["min_ess_bulk_f"]),
        min_ess_tail_f=float(d["min_ess_tail_f"]),
        median_ess_bulk_f=float(d["median_ess_bulk_f"]),
        max_nested_rhat_f=float(d.get("max_nested_rhat_f", math.nan)),
        divergences=int(d["divergences"]),
        acceptance=float(np.mean(ref.sample_stats["acceptance_rate"])),
        step_size=float(ref.adaptation["step_size"]),
        mean_leapfrog_steps=float(np.mean(ref.sample_stats["n_steps"])),
    )
    return out


def run_one(method, data, cfg, split) -> dict:
    if method == "hmc":
        return run_hmc_split(data, cfg, seed=split)
    return run_bbb(data, "gaussian" if method == "bbb_gaussian" else "mixture", cfg, seed=split)


def run_timed(job, cfg, root, threads=1) -> tuple:
    """One (data set, method, split) run, timed and stamped: the unit a worker does."""
    torch.set_num_threads(threads)
    name, method, split = job
    t0 = time.perf_counter()
    r = run_one(method, load_split(name, split, root), cfg, split)
    r["seconds"] = time.perf_counter() - t0
    r["finished_at"] = time.time()
    return job, r


def run_jobs(jobs, cfg, root, workers, threads=1):
    """Yield ``(job, result)`` as runs finish: in this process, or in ``workers``
    processes (each result is cached by the caller as soon as it arrives, so an
    interrupted study loses only the runs in flight)."""
    yield from cls.in_processes(run_timed, [(job, cfg, root, threads) for job in jobs], workers)


# -- the cache --------------------------------------------------------------------------------
def config_fingerprint(cfg, root: Path) -> dict:
    """What each method's results depend on, per method: a change to HMC's settings
    leaves the BBB results in the cache valid, and the other way round."""
    common = dict(gaussian_prior=GAUSSIAN_PRIOR, hidden=HIDDEN, root=str(root.resolve()), script_version=2)
    bbb_part = dict(common, bbb=cfg["bbb"], mixture_prior=MIXTURE_PRIOR, lr_stages=LR_STAGES)
    fp = {"bbb_gaussian": bbb_part, "bbb_mixture": bbb_part, "hmc": dict(common, hmc=cfg["hmc"])}
    return json.loads(json.dumps(fp))  # tuples -> lists, as read back from the file


class Cache:
    """Results per 'dataset/method/split', written (atomically) after each one; a
    method's results are kept on resume only if its fingerprint is unchanged."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint = path, fingerprint
        self.results: dict = {}
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            config = saved.get("config", {})
            kept = {m for m, fp in fingerprint.items() if config.get(m) == fp}
            self.results = {k: v for k, v in saved.get("results", {}).items()
                            if k.split("/")[1] in kept}
            stale = sorted(set(fingerprint) - kept)
            print(f"[uci] resuming from {path} ({len(self.results)} results cached"
                  + (f"; {', '.join(stale)} made with other settings, run afresh" if stale else "")
                  + ")", flush=True)

    @staticmethod
    def key(name, method, split) -> str:
        return f"{name}/{method}/{split}"

    def get(self, name, method, split):
        return self.results.get(self.key(name, method, split))

    def put(self, name, method, split, value):
        self.results[self.key(name, method, split)] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.fingerprint, "results": self.results}, indent=1))
        tmp.replace(self.path)


# -- summaries and the target -------------------------------------------------------------------
def summarize(cache: Cache, datasets, splits_of) -> dict:
    """{dataset: {method: {rmse_mean, rmse_se, ll_mean, ll_se, n_splits}}} (the uci.json layout)."""
    out = {}
    for name in datasets:
        out[name] = {}
        for method in METHODS:
            rs = [cache.get(name, method, s) for s in splits_of(method)]
            rs = [r for r in rs if r is not None]
            if not rs:
                continue
            rm, rse = cls.mean_se([r["rmse"] for r in rs])
            lm, lse = cls.mean_se([r["ll"] for r in rs])
            out[name][method] = {"rmse_mean": rm, "rmse_se": rse, "ll_mean": lm, "ll_se": lse,
                                 "n_splits": len(rs)}
    return out


def target_check(summary, candidates=("bbb_gaussian", "bbb_mixture")) -> dict:
    """Per data set: the better BBB prior (by mean test LL), whether it beats the published
    VI on RMSE and LL, and whether it is within one standard error of PBP on both (the
    standard error of the difference, sqrt(se_bbb^2 + se_pbp^2); being better counts)."""
    out = {}
    for name, res in summary.items():
        if name not in PUBLISHED or not all(m in res for m in ("bbb_gaussian", "bbb_mixture")):
            continue
        best = max(candidates, key=lambda m: res[m]["ll_mean"])
        r = res[best]
        (vi_rmse, _), (vi_ll, _) = PUBLISHED[name]["VI"]
        (pbp_rmse, pbp_rmse_se), (pbp_ll, pbp_ll_se) = PUBLISHED[name]["PBP"]
        se_rmse = math.hypot(r["rmse_se"], pbp_rmse_se)
        se_ll = math.hypot(r["ll_se"], pbp_ll_se)
        out[name] = {
            "best": best,
            "beats_vi_rmse": r["rmse_mean"] < vi_rmse,
            "beats_vi_ll": r["ll_mean"] > vi_ll,
            "pbp_rmse_z": (r["rmse_mean"] - pbp_rmse) / se_rmse,
            "pbp_ll_z": (pbp_ll - r["ll_mean"]) / se_ll,
        }
        o = out[name]
        o["beats_vi"] = o["beats_vi_rmse"] and o["beats_vi_ll"]
        o["within_pbp"] = o["pbp_rmse_z"] <= 1 and o["pbp_ll_z"] <= 1
    return out


# -- the figure ---------------------------------------------------------------------------------
def plot(summary, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.6), squeeze=False)
    colors = {"bbb_gaussian": "C0", "bbb_mixture": "C1", "hmc": "C2"}
    pub_style = {"VI": ("v", "0.55"), "PBP": ("s", "0.3"), "dropout": ("D", "0.0")}
    for j, name in enumerate(names):
        for row, (metric, label) in enumerate((("rmse", "test RMSE"), ("ll", "test log-likelihood"))):
            ax = axes[row][j]
            labels = []
            for i, method in enumerate(METHODS):
                if method not in summary[name]:
                    continue
                r = summary[name][method]
                ax.errorbar(len(labels), r[f"{metric}_mean"], yerr=r[f"{metric}_se"], fmt="o",
                            color=colors[method], capsize=3, label=METHOD_LABELS[method])
                labels.append({"bbb_gaussian": "BBB\nN(0,1)", "bbb_mixture": "BBB\nmix",
                               "hmc": f"HMC\n{r['n_splits']} sp"}[method])
            for pub in PUBLISHED_METHODS if name in PUBLISHED else ():
                (m_r, se_r), (m_l, se_l) = PUBLISHED[name][pub]
                m, se = (m_r, se_r) if metric == "rmse" else (m_l, se_l)
                marker, color = pub_style[pub]
                ax.errorbar(len(labels), m, yerr=se, fmt=marker, color=color, capsize=3,
                            mfc="none", label=f"published {pub}")
                labels.append(pub)
            # keep the scale of BBB and the published rows; an HMC run that failed (see the
            # report) would squash them, so its point is then drawn at the edge and labelled
            lo, hi = [], []
            for method in ("bbb_gaussian", "bbb_mixture"):
                if method in summary[name]:
                    r = summary[name][method]
                    lo.append(r[f"{metric}_mean"] - r[f"{metric}_se"])
                    hi.append(r[f"{metric}_mean"] + r[f"{metric}_se"])
            for pub in PUBLISHED_METHODS if name in PUBLISHED else ():
                m, se = PUBLISHED[name][pub][0 if metric == "rmse" else 1]
                lo.append(m - se)
                hi.append(m + se)
            if "hmc" in summary[name] and lo:
                span = max(hi) - min(lo)
                ymin, ymax = min(lo) - 0.5 * span, max(hi) + 0.5 * span
                r = summary[name]["hmc"]
                m, se = r[f"{metric}_mean"], r[f"{metric}_se"]
                if m + se > ymax or m - se < ymin:
                    lo_h, hi_h = min(ymin, m - se), max(ymax, m + se)
                    if hi_h - lo_h > 3 * (ymax - ymin):
                        ax.set_ylim(ymin, ymax)
                        edge = ymax if m > ymax else ymin if m < ymin else m
                        ax.annotate(f"HMC {m:.3g}\n+- {se:.2g}\n(off scale)", (2, edge),
                                    xytext=(0, -28 if edge == ymax else 8), textcoords="offset points",
                                    ha="center", fontsize=6.5, color="C2")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=6.5)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(name, fontsize=10)
            if j == 0:
                ax.set_ylabel(label + ("\n(lower is better)" if metric == "rmse" else "\n(higher is better)"))
    fig.suptitle("UCI regression, 50 ReLU units, learned noise: mean +- standard error over splits\n"
                 "filled: this run; hollow: published (Gal & Ghahramani 2016, Table 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report ---------------------------------------------------------------------------------
def fmt(m, se, digits=2):
    return f"{m:.{digits}f} +- {se:.{digits}f}"


def digits_for(name):
    return 3 if name == "wine-quality-red" else 2


def converged_splits(cache, name, splits) -> list:
    """The splits on which the HMC reference passed its own convergence check."""
    return [s for s in splits if (cache.get(name, "hmc", s) or {}).get("converged")]


def mean_noise(cache, name, method, splits) -> float:
    rs = [cache.get(name, method, s) for s in splits]
    return float(np.mean([r["noise_mean"] for r in rs if r is not None]))


def results_table(summary, cache, splits_of) -> str:
    rows = []
    for name, res in summary.items():
        k = digits_for(name)
        for method in METHODS:
            if method in res:
                r = res[method]
                label = METHOD_LABELS[method]
                if method == "hmc":
                    k_ok = len(converged_splits(cache, name, splits_of(method)))
                    label += (f" (converged on {k_ok} of {r['n_splits']} splits"
                              + ("" if k_ok == r["n_splits"] else ": not a reference") + ")")
                rows.append([name, label, r["n_splits"], fmt(r["rmse_mean"], r["rmse_se"], k),
                             fmt(r["ll_mean"], r["ll_se"], k),
                             f"{mean_noise(cache, name, method, splits_of(method)):.3g}"])
        for pub in PUBLISHED_METHODS if name in PUBLISHED else ():
            (m_r, se_r), (m_l, se_l) = PUBLISHED[name][pub]
            rows.append([name, f"*published {pub}*", 20, fmt(m_r, se_r), fmt(m_l, se_l), ""])
    return cls.write_markdown_table(
        rows, ["data set", "method", "splits", "test RMSE", "test LL", "noise std (posterior mean)"])


def target_table(targets, summary) -> str:
    rows = []
    for name, t in targets.items():
        r = summary[name][t["best"]]
        (vi_r, _), (vi_l, _) = PUBLISHED[name]["VI"]
        (pbp_r, _), (pbp_l, _) = PUBLISHED[name]["PBP"]
        rows.append([
            name, METHOD_LABELS[t["best"]],
            f"{r['rmse_mean']:.3g} vs {vi_r} ({'yes' if t['beats_vi_rmse'] else 'no'})",
            f"{r['ll_mean']:.3g} vs {vi_l} ({'yes' if t['beats_vi_ll'] else 'no'})",
            f"{r['rmse_mean']:.3g} vs {pbp_r}: {t['pbp_rmse_z']:+.1f} SE",
            f"{r['ll_mean']:.3g} vs {pbp_l}: {t['pbp_ll_z']:+.1f} SE",
            "**met**" if t["beats_vi"] else "not met",
            "**yes**" if t["within_pbp"] else "no",
        ])
    return cls.write_markdown_table(rows, [
        "data set", "better BBB prior (by LL)", "RMSE < VI", "LL > VI",
        "RMSE vs PBP (worse by)", "LL vs PBP (worse by)", "beats VI on both", "within 1 SE of PBP on both",
    ])


def hmc_table(cache, datasets, hmc_splits) -> str:
    rows = []
    for name in datasets:
        rs = [cache.get(name, "hmc", s) for s in hmc_splits]
        rs = [r for r in rs if r is not None]
        if not rs:
            continue

        def med(key, f="{:.2f}"):
            return f.format(float(np.median([r.get(key, math.nan) for r in rs])))

        converged = sum(bool(r.get("converged")) for r in rs)
        rows.append([
            name, f"{converged} of {len(rs)}", med("max_rhat_f", "{:.3f}"), med("median_rhat_f", "{:.3f}"),
            med("max_nested_rhat_f", "{:.3f}"),
            f"{100 * np.mean([r['share_rhat_below_1_1'] for r in rs]):.0f}%",
            med("min_ess_bulk_f", "{:.0f}"), med("min_ess_tail_f", "{:.0f}"),
            sum(r["divergences"] for r in rs), med("step_size", "{:.2g}"),
            med("mean_leapfrog_steps", "{:.0f}"), med("draws_per_chain", "{:.0f}"),
            med("cpu_seconds", "{:.0f}"),
        ])
    return cls.write_markdown_table(rows, [
        "data set", "converged splits", "max R-hat f(x*)", "median R-hat", "max nested R-hat",
        "test points with R-hat < 1.1", "min bulk ESS", "min tail ESS", "divergences (all)",
        "step size", "leapfrog steps / iter", "draws / chain", "CPU s / split",
    ])


def hmc_setup(h, hmc_splits) -> str:
    """The HMC settings in words."""
    start = ("short MAP fits from prior draws, one per superchain" if h.get("init") == "map"
             else "prior draws")
    groups = (f" in {h['num_superchains']} superchains" if h.get("num_superchains") else "")
    budget = (f"then blocks of {h['num_samples']} draws until the reference check passes (max R-hat of "
              f"f(x*) <= 1.01, bulk and tail ESS >= 400 at every test input) or "
              f"{h['time_limit']:.0f} s (warmup included) are up" if h.get("until_converged")
              else f"{h['num_samples']} draws")
    return (f"`run_hmc` on the `bbb_gaussian` model (same N(0,1) prior, same LogNormal(0,1) noise prior), "
            f"splits {hmc_splits[0]}-{hmc_splits[-1]}: {h['num_chains']} chains{groups} started from {start}, "
            f"{h['warmup_steps']} warmup iterations, {budget}; at most {h['max_leapfrog_steps']} leapfrog "
            f"steps per iteration, target acceptance {h['target_accept_prob']}. All draws are pooled for "
            "prediction. Diagnostics on the network output f(x*) at the test inputs: rank-normalised split "
            "R-hat, bulk and tail ESS (ArviZ) and nested R-hat across superchains; the table gives medians "
            "over splits, and CPU time per split includes the MAP fits and warmup. **A split whose "
            "reference did not pass its check has no reference**: its HMC numbers describe the chains, "
            "not the posterior, and nothing below ranks BBB against them.")


def verdict_table(cache, datasets, hmc_splits) -> str:
    """Each split's verdict: max R-hat of f(x*), and a check mark where the reference
    passed (R-hat <= 1.01 as printed, bulk and tail ESS >= 400 at every test input)."""
    rows = []
    for name in datasets:
        row = [name]
        for s_ in hmc_splits:
            r = cache.get(name, "hmc", s_)
            row.append("-" if r is None else
                       f"{'**ok** ' if r.get('converged') else ''}{r['max_rhat_f']:.3f}")
        rows.append(row)
    return cls.write_markdown_table(rows, ["data set"] + [f"split {s_}" for s_ in hmc_splits])


def paired_table(cache, datasets, hmc_splits) -> str:
    """BBB and HMC on the splits where the HMC reference passed its check (the only
    ones on which BBB can be judged against it)."""
    rows = []
    for name in datasets:
        ok = converged_splits(cache, name, hmc_splits)
        row = [name, len(ok)]
        for method in METHODS:
            rs = [cache.get(name, method, s_) for s_ in ok]
            if not rs or any(r is None for r in rs):
                row += ["-", "-"]
                continue
            k = digits_for(name)
            row += [fmt(*cls.mean_se([r["rmse"] for r in rs]), k), fmt(*cls.mean_se([r["ll"] for r in rs]), k)]
        rows.append(row)
    header = ["data set", "converged splits"]
    for method in METHODS:
        header += [f"RMSE {METHOD_LABELS[method]}", f"LL {METHOD_LABELS[method]}"]
    return cls.write_markdown_table(rows, header)


def reference_epochs(root: Path, datasets) -> str:
    parts = []
    for name in datasets:
        path = Path(root) / name / "n_epochs.txt"
        if path.is_file():
            parts.append(f"{name} {path.read_text().split()[0]}")
    return ", ".join(parts)


def hmc_interpretation(cache, datasets, hmc_splits) -> str:
    """What the HMC rows say: on how many splits the reference converged, at what
    cost, why not elsewhere, and BBB against it where it did."""
    runs = {(n, s_): cache.get(n, "hmc", s_) for n in datasets for s_ in hmc_splits}
    runs = {k: r for k, r in runs.items() if r is not None}
    if not runs:
        return ""
    ok = {k: r for k, r in runs.items() if r.get("converged")}
    per_set = ", ".join(f"{n} {len(converged_splits(cache, n, hmc_splits))}/"
                        f"{sum(k[0] == n for k in runs)}" for n in datasets if any(k[0] == n for k in runs))
    cpu = [r.get("cpu_seconds", r["train_seconds"]) for r in runs.values()]
    text = [f"**The HMC reference converged on {len(ok)} of {len(runs)} splits** ({per_set}), at "
            f"{np.median(cpu):.0f} CPU s per split (median; {sum(cpu) / 3600:.2f} CPU hours in all)."]
    bad = [r for k, r in runs.items() if k not in ok]
    if bad:
        spread = [max(r["chain_noise_mean"]) / min(r["chain_noise_mean"]) for r in bad]
        nested = [r["max_nested_rhat_f"] for r in bad if math.isfinite(r.get("max_nested_rhat_f", math.nan))]
        text.append(
            f"Where it did not, the median over those splits of the max R-hat of f(x*) is "
            f"{np.median([r['max_rhat_f'] for r in bad]):.2f}"
            + (f" and of the max nested R-hat across superchains {np.median(nested):.2f}" if nested else "")
            + f"; the chains' posterior-mean noise std differs by a factor of {np.median(spread):.2f} "
            "between the chain with the largest and the one with the smallest (median over splits). The "
            "noise std is one number fixed by a few hundred residuals (its posterior std is a few per cent "
            "of it), so chains that disagree on it by that much have not reached one equilibrium: they "
            "sit in modes of the network's posterior that fit the data differently well, or are still "
            "drifting towards better fits, and nested R-hat says the superchains started from different "
            "MAP fits disagree. These splits have no reference.")
    if ok:
        pairs = [(r, cache.get(n, "bbb_gaussian", s_)) for (n, s_), r in ok.items()]
        pairs = [(h, b) for h, b in pairs if b is not None]
        if pairs:
            text.append(
                f"On the {len(pairs)} splits with a reference, HMC minus BBB (N(0,1) prior): RMSE "
                f"{np.mean([h['rmse'] - b['rmse'] for h, b in pairs]):+.3g}, LL "
                f"{np.mean([h['ll'] - b['ll'] for h, b in pairs]):+.3g} (mean over those splits, original "
                "units).")
    return " ".join(text)


def target_paragraph(targets) -> str:
    """The interpretation's verdict on the target: beats VI everywhere, within one SE of PBP on 3."""
    n_vi = sum(t["beats_vi"] for t in targets.values())
    n_pbp = sum(t["within_pbp"] for t in targets.values())
    verdict = "met" if n_vi == len(targets) and n_pbp >= 3 else "not met"
    return (
        f"**Target ({verdict}).** The better of BBB's two priors beats the published VI row on both "
        f"RMSE and LL on {n_vi} of {len(targets)} data sets "
        f"({', '.join(n for n, t in targets.items() if t['beats_vi']) or 'none'}), and is within one "
        f"standard error of PBP on both metrics on {n_pbp} "
        f"({', '.join(n for n, t in targets.items() if t['within_pbp']) or 'none'}); the target asks "
        f"for all {len(targets)} and at least 3."
    )


def per_dataset_paragraph(summary, targets) -> str:
    """The interpretation's per-data-set line: both priors' RMSE / LL and the better BBB against MC dropout."""
    per = []
    for name, t in targets.items():
        res = summary[name]
        g, m = res["bbb_gaussian"], res["bbb_mixture"]
        dz = (g["ll_mean"] - m["ll_mean"]) / max(math.hypot(g["ll_se"], m["ll_se"]), 1e-12)
        (drop_r, _), (drop_l, _) = PUBLISHED[name]["dropout"]
        best = res[t["best"]]
        per.append(
            f"{name}: N(0,1) {g['rmse_mean']:.3g} / {g['ll_mean']:.3g}, mixture {m['rmse_mean']:.3g} / "
            f"{m['ll_mean']:.3g} (LL difference {dz:+.1f} SE); against MC dropout ({drop_r} / {drop_l}) "
            f"the better BBB is {'better' if best['rmse_mean'] < drop_r else 'worse'} on RMSE and "
            f"{'better' if best['ll_mean'] > drop_l else 'worse'} on LL"
        )
    return "Per data set (RMSE / LL): " + "; ".join(per) + "."


def _better(r, rmse, ll) -> tuple[bool, bool]:
    """Whether a result's mean RMSE is below ``rmse`` and its mean LL above ``ll``."""
    return (r["rmse_mean"] < rmse, r["ll_mean"] > ll)


def versus_dropout_10x(summary, targets) -> list[str]:
    """Per data set with a 10x-epochs dropout rerun: its RMSE / LL against the better BBB's."""
    vs10 = []
    for n, t in targets.items():
        if n in DROPOUT_10X:
            r = summary[n][t["best"]]
            b_rmse, b_ll = _better(r, *DROPOUT_10X[n])
            vs10.append(f"{n} {DROPOUT_10X[n][0]} / {DROPOUT_10X[n][1]} (BBB {r['rmse_mean']:.3g} / "
                        f"{r['ll_mean']:.3g}: {'better' if b_rmse else 'worse'} RMSE, "
                        f"{'better' if b_ll else 'worse'} LL)")
    return vs10


def versus_published_paragraph(summary, targets) -> str:
    """The interpretation's paragraph on where the results disagree with the published table."""
    beat_drop = [n for n, t in targets.items()
                 if all(_better(summary[n][t["best"]], PUBLISHED[n]["dropout"][0][0],
                                PUBLISHED[n]["dropout"][1][0]))]
    vs10 = versus_dropout_10x(summary, targets)
    mixture_best = [n for n, t in targets.items() if t["best"] == "bbb_mixture"]
    gauss_only = target_check(summary, candidates=("bbb_gaussian",))
    g_vi = sum(t["beats_vi"] for t in gauss_only.values())
    g_pbp = sum(t["within_pbp"] for t in gauss_only.values())
    return (
        "Where this disagrees with the published table: the better BBB beats not only VI but also "
        f"MC dropout's published row on both metrics on {len(beat_drop)} of {len(targets)} sets "
        f"({', '.join(beat_drop) or 'none'}), and PBP wherever the 'vs PBP' columns are negative. The "
        "published networks were trained for 40 epochs; the dropout authors' own rerun with 10x the "
        "epochs (README of yaringal/DropoutUncertaintyExps; RMSE / LL) "
        "gives " + "; ".join(vs10) + ". So much of BBB's lead over the published rows is training "
        "budget (600 full-batch Adam steps see every row 600 times), not the method. "
        f"The mixture prior chosen on validation (pi 0.5, sigma1 e^-1, sigma2 e^-7) has the higher test "
        f"LL only on {', '.join(mixture_best) or 'no data set'}; the paper's case for the mixture was "
        "MNIST with 2.4 million weights, not 50-unit regressors on a few hundred rows. Which prior is "
        "'the better' one for the target is read off the test LL of two candidates, a mild selection on "
        f"test data that the target's wording implies; with the N(0,1) prior alone (no such choice) BBB "
        f"beats VI on both metrics on {g_vi} of {len(gauss_only)} sets and is within one SE of PBP on "
        f"both on {g_pbp}."
    )


def caveats_paragraph(epochs_note="") -> str:
    """The interpretation's caveats against the published rows."""
    return (
        "Caveats against the published rows: the VI row is Graves' (2011) method as run by "
        "Hernandez-Lobato & Adams (2015), with their training budget, not BBB as set up here; PBP "
        "learns its noise precision by moment matching, and MC dropout chose its dropout rate and "
        "model precision per data set by grid search (the grids are in the data folders)"
        + (f"; the data folders' n_epochs.txt gives the reference runs' epochs ({epochs_note})" if epochs_note else "")
        + ". Our BBB settings are global (one learning rate, step count, initial "
        "sigma and mixture for all data sets), chosen on validation rows of yacht and bostonHousing "
        "only. Standard errors over splits are large relative to some differences (e.g. boston)."
    )


def interpretation(summary, targets, cache, datasets, hmc_splits, mode, num_chains, epochs_note="") -> str:
    """The report's interpretation: a smoke-test note in quick mode, else its paragraphs."""
    if mode == "quick":
        return ("Quick mode is a smoke test (two data sets, two splits, a few hundred BBB steps, "
                "a few dozen HMC iterations): it checks that training, sampling, scoring and the "
                "report run, not how good the methods are. See the full run.")
    text = [target_paragraph(targets), per_dataset_paragraph(summary, targets)]
    hmc_text = hmc_interpretation(cache, datasets, hmc_splits)
    if hmc_text:
        text.append(hmc_text)
    text.append(versus_published_paragraph(summary, targets))
    text.append(caveats_paragraph(epochs_note))
    return "\n\n".join(text)


def report_header(mode, total, timings, root) -> list[str]:
    """The report's title, command, run times and data folder."""
    return [
        "# UCI regression: Bayes by Backprop and HMC against the published VI / PBP / dropout rows",
        "",
        f"Mode: **{mode}**. Command (from the repository root):",
        "",
        f"```bash\n{cls.command_line()}\n```",
        "",
        f"Total run time of this invocation: {total:.0f} s on {cls.versions()['machine']} "
        f"(cached results reused: {timings['cached']}; compute time summed over all results, "
        f"cached or not: BBB {timings['bbb']:.0f} s, HMC {timings['hmc']:.0f} s; wall time from the "
        f"start of the first result to the end of the last, across resumed runs: {timings['span'] / 60:.1f} min). "
        f"Data: `{root}`.",
        "",
    ]


def results_section(summary, cache, splits_of) -> list[str]:
    """The report's "Results" section: the table against the published rows and the figure."""
    return [
        "## Results",
        "",
        "Test RMSE and test log-likelihood (average log predictive density) in the original units "
        "of the target, mean +- standard error (sample std, ddof 1, / sqrt(splits)) over the "
        "published splits. Published rows: Gal & Ghahramani (2016), Table 1 (VI = Graves 2011, "
        "PBP = Hernandez-Lobato & Adams 2015, dropout = MC dropout), 20 splits each. The last "
        "column is the posterior mean of the learned observation-noise std in original units, "
        "averaged over splits.",
        "",
        results_table(summary, cache, splits_of),
        "",
        "![RMSE and LL per data set](uci.png)",
        "",
        "In the figure an HMC mean far off the scale of BBB and the published rows is written at the "
        "panel's edge instead of drawn (failed HMC runs, see 'What it shows').",
        "",
    ]


def target_section(targets, summary) -> list[str]:
    """The report's "The target" section: its definition, the table and, where computed, the verdict."""
    parts = [
        "## The target",
        "",
        "BBB (the better of its two priors per data set, by mean test LL) should beat the published "
        "VI row on RMSE and LL on every data set, and be within one standard error of PBP on at "
        "least three. 'Within one SE' means BBB's mean is no worse than PBP's by more than the "
        "standard error of the difference, sqrt(se_BBB^2 + se_PBP^2); being better counts. The "
        "columns 'vs PBP' give how many such standard errors BBB is worse (negative: better). "
        "Computed from the numbers above:",
        "",
        target_table(targets, summary) if targets else "(not computed: BBB results missing)",
        "",
    ]
    if targets:
        n_vi = sum(t["beats_vi"] for t in targets.values())
        n_pbp = sum(t["within_pbp"] for t in targets.values())
        met = n_vi == len(targets) and n_pbp >= 3
        parts += [
            f"Beats VI on both metrics: {n_vi}/{len(targets)} data sets. Within one SE of PBP on both: "
            f"{n_pbp}/{len(targets)} (at least 3 wanted). **Target {'met' if met else 'not met'}.**",
            "",
        ]
    return parts


def hmc_section(cache, summary, h, hmc_splits) -> list[str]:
    """The report's "HMC reference and its convergence" section; empty without any HMC result."""
    if not any(cache.get(n, "hmc", s) for n in summary for s in hmc_splits):
        return []
    return [
        "## HMC reference and its convergence",
        "",
        hmc_setup(h, hmc_splits),
        "",
        hmc_table(cache, summary, hmc_splits),
        "",
        "Each split's verdict (max R-hat of f(x*) over the test inputs; **ok**: the reference "
        "passed its check):",
        "",
        verdict_table(cache, summary, hmc_splits),
        "",
        "BBB and HMC on the same splits, those where the reference passed its check only:",
        "",
        paired_table(cache, summary, hmc_splits),
        "",
    ]


def setup_section(cfg) -> list[str]:
    """The report's "Setup" section: data, network, BBB's settings and how they were chosen, seeds."""
    b = cfg["bbb"]
    return [
        "## Setup",
        "",
        f"- Data: the published splits (`pyro_bbb.datasets.load_uci`), inputs and target standardized "
        f"with the training split's mean and std (ddof 0); RMSE is multiplied by y_std and log y_std "
        f"is subtracted from the LL. Splits: {cfg['splits']} per data set (0..{cfg['splits'] - 1}).",
        f"- Network: d-{HIDDEN}-1, ReLU; every weight and bias is a sample site; observation noise std "
        "learned (`BayesianRegressor(noise=\"learned\")`, prior LogNormal(0, 1) on the standardized scale).",
        f"- BBB: `BBBGuide(model, init_scale={b['init_scale']})` (initial sigma; initial means = the "
        f"network's PyTorch init, seeded by the split index), full-batch `fit` with "
        f"num_particles={b['num_particles']}, {b['steps']} Adam steps in three stages at lr "
        f"{b['lr']}, {b['lr'] / 3:.3g} and {b['lr'] / 10:.3g} "
        f"({', '.join(f'{100 * f:.0f}%' for f, _ in LR_STAGES)} of the steps; `fit` has no lr "
        "scheduler, so each stage is a `fit` call continuing from the guide, with a fresh Adam). "
        "N(0,1) prior with the closed-form KL (`kl=\"analytic\"`); scale mixture "
        f"pi = {MIXTURE_PRIOR['pi']}, sigma1 = e^{math.log(MIXTURE_PRIOR['sigma1']):.0f}, sigma2 = "
        f"e^{math.log(MIXTURE_PRIOR['sigma2']):.0f} with the Monte Carlo KL (`kl=\"mc\"`). Prediction "
        f"from {b['num_samples']} posterior draws (weights and noise).",
        "- How the BBB settings were chosen: `python comparisons/uci.py --tune` scores a handful of "
        f"global settings on validation rows ({100 * TUNE_VALIDATION:.0f}% of the training rows, seeded) "
        "carved from splits 0 and 1 of yacht and bostonHousing, by mean validation LL; see "
        "`uci_tuning.md`. Nothing was chosen on test data, and nothing per data set or per split.",
        f"- Seeds: split k uses seed k (network init, weight noise, predictive draws, HMC's chains).",
        "",
    ]


def write_report(path, summary, targets, cache, cfg, mode, total, hmc_splits, root, timings, splits_of):
    """Writes the markdown report to ``path``; returns nothing."""
    h = cfg["hmc"]
    parts = [
        *report_header(mode, total, timings, root),
        *results_section(summary, cache, splits_of),
        *target_section(targets, summary),
        *hmc_section(cache, summary, h, hmc_splits),
        *setup_section(cfg),
        *cls.report_footer(interpretation(summary, targets, cache, list(summary), hmc_splits, mode, h["num_chains"],
                       reference_epochs(root, summary))),
    ]
    path.write_text("\n".join(parts))


# -- tuning on validation rows -----------------------------------------------------------------
def tune(root: Path, out: Path, cfg):
    """Score the candidates of TUNE_GRID on validation rows carved from training splits."""
    b = cfg["bbb"]
    data = {(n, s): load_split(n, s, root) for n, s in TUNE_SETS}
    rows, results = [], []
    chosen_training = None
    for group, candidates in TUNE_GRID.items():
        best = None
        for cand in candidates:
            c = dict(steps=b["steps"], lr=b["lr"], init_scale=b["init_scale"], decay=True)
            if chosen_training and "steps" not in cand:
                c.update(chosen_training)
            c.update(cand)
            per = []
            for (name, split), d in data.items():
                xf, yf, xv, yv = carve_validation(d.x_train, d.y_train)
                prior = c["prior"]
                model, guide, sec = train_bbb(xf, yf, prior, steps=c["steps"], lr=c["lr"],
                                              num_particles=b["num_particles"],
                                              init_scale=c["init_scale"], seed=split, decay=c["decay"])
                draws = guide.sample_posterior(b["num_samples"], generator=torch.Generator().manual_seed(split))
                per.append(scores(model, draws, xv, yv, d.y_std) | {"seconds": sec})
            mean_ll = float(np.mean([p["ll"] for p in per]))
            results.append({"group": group, "candidate": c, "per_set": per, "mean_val_ll": mean_ll})
            desc = ", ".join(f"{k}={v}" for k, v in c.items() if k != "prior") if group.startswith("training") \
                else f"pi={c['prior']['pi']}, -log sigma1={0.0 - math.log(c['prior']['sigma1']):.0f}, " \
                     f"-log sigma2={0.0 - math.log(c['prior']['sigma2']):.0f}"
            rows.append([group, desc] + [f"{p['rmse']:.3f} / {p['ll']:.3f}" for p in per] + [f"{mean_ll:.3f}"])
            print(f"[uci tune] {group}: {desc}: mean validation LL {mean_ll:.3f}", flush=True)
            if best is None or mean_ll > best[0]:
                best = (mean_ll, c)
        if group.startswith("training"):
            chosen_training = {k: best[1][k] for k in ("steps", "lr", "init_scale", "decay")}
        results.append({"group": group, "chosen": best[1], "mean_val_ll": best[0]})
    header = ["group", "candidate"] + [f"{n} split {s} (RMSE / LL)" for n, s in TUNE_SETS] + ["mean LL"]
    chosen = [r for r in results if "chosen" in r]
    text = [
        "# UCI: choosing BBB's global settings on validation rows",
        "",
        f"```bash\n{cls.command_line()}\n```",
        "",
        f"Each candidate is trained on 90% of the training rows of the listed splits and scored on the "
        f"remaining {100 * TUNE_VALIDATION:.0f}% (seeded permutation; the test rows are not touched). "
        f"{b['num_particles']} particles, full batch. Values are validation RMSE / LL in original units. "
        "The training settings are chosen first (N(0,1) prior), then the mixture prior with those settings.",
        "",
        cls.write_markdown_table(rows, header),
        "",
        "Chosen (highest mean validation LL): "
        + "; ".join(f"{r['group']}: {r['chosen']}" for r in chosen),
        "",
    ]
    (out / "uci_tuning.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "uci_tuning.md").write_text("\n".join(text))
    print(f"[uci tune] wrote {out / 'uci_tuning.md'}", flush=True)


# -- main -----------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: 2 data sets x 2 splits, tiny budgets")
    parser.add_argument("--out", type=Path, default=cls.DEFAULT_OUT, help="output folder")
    parser.add_argument("--root", default=None, help="UCI data folder (default: $PYRO_BBB_UCI_ROOT, "
                        "else <repo>/../shared/data/uci)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel processes, each with --threads threads (default 1)")
    parser.add_argument("--tune", action="store_true", help="score BBB settings on validation rows instead")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    cfg = CONFIGS[mode]
    root = resolve_root(args.root)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tune:
        tune(root, args.out, cfg)
        return {}
    start = time.perf_counter()

    datasets = cfg["datasets"]
    num_splits = {n: min(cfg["splits"], bbb.datasets.uci_num_splits(n, root)) for n in datasets}
    hmc_splits = tuple(range(cfg["hmc_splits"]))
    cache = Cache(args.out / f"uci_cache_{mode}.json", config_fingerprint(cfg, root))
    jobs = []
    for split in range(max(num_splits.values())):
        for name in datasets:
            if split >= num_splits[name]:
                continue
            for method in METHODS:
                if method == "hmc" and split not in hmc_splits:
                    continue
                jobs.append((name, method, split))
    cached = sum(cache.get(*j) is not None for j in jobs)
    print(f"[uci] {mode}: {len(jobs)} runs ({cached} cached), data {root}, {args.workers} worker(s)",
          flush=True)
    todo = [j for j in jobs if cache.get(*j) is None]
    for done_count, (job, r) in enumerate(run_jobs(todo, cfg, root, args.workers, args.threads), cached + 1):
        name, method, split = job
        cache.put(name, method, split, r)
        extra = (f", {'converged' if r['converged'] else 'NOT converged'} ({r['stop_reason']}), "
                 f"max R-hat {r['max_rhat_f']:.3f}, min ESS {r['min_ess_bulk_f']:.0f}"
                 if method == "hmc" else "")
        print(f"[uci] {done_count}/{len(jobs)} {name} split {split} {method}: RMSE {r['rmse']:.3f}, "
              f"LL {r['ll']:.3f} ({r['seconds']:.1f} s{extra}; elapsed {time.perf_counter() - start:.0f} s)",
              flush=True)

    def splits_of(method):
        return hmc_splits if method == "hmc" else range(max(num_splits.values()))

    summary = summarize(cache, datasets, splits_of)
    targets = target_check(summary)
    done = [cache.get(*j) for j in jobs]
    stamps = [(r["finished_at"] - r["seconds"], r["finished_at"]) for r in done if "finished_at" in r]
    timings = {
        "span": (max(b for _, b in stamps) - min(a for a, _ in stamps)) if stamps else math.nan,
        "cached": cached,
        "bbb": sum(cache.get(*j)["seconds"] for j in jobs if j[1] != "hmc"),
        "hmc": sum(cache.get(*j)["seconds"] for j in jobs if j[1] == "hmc"),
    }
    total = time.perf_counter() - start
    (args.out / "uci.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "uci.png")
    write_report(args.out / "uci.md", summary, targets, cache, cfg, mode, total, hmc_splits, root, timings,
                 splits_of)
    print(f"[uci] wrote {args.out} in {total:.0f} s", flush=True)
    return summary


if __name__ == "__main__":
    main()
