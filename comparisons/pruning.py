"""Pruning by signal-to-noise ratio (paper Table 2 and Figure 4, in miniature).

Blundell et al. (2015), section 5.1: after Bayes by Backprop, rank the weights by
their signal-to-noise ratio |mu| / sigma and remove the lowest ones; on MNIST 95% of
the weights go at almost no cost in test error (Table 2).  Here a 64-H-H-10 network
with the scale-mixture prior is trained on scikit-learn's digits (the split and
standardization of ``classification.py``), then pruned by ``pyro_bbb.prune`` to
0/50/75/95/98% removed, and scored by the test error of the posterior predictive
mean.  Two baselines remove the same numbers of weights by posterior-mean
magnitude |mu| and at random, to show what the SNR ranking buys.

    python comparisons/pruning.py --quick    # CI: small network, 2 seeds, few epochs
    python comparisons/pruning.py            # full: 400 units, 5 seeds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import classification as cls  # noqa: E402  (same folder: data split, training, versions)

from pyro_bbb.prune import prune  # noqa: E402

FRACTIONS = (0.0, 0.5, 0.75, 0.95, 0.98)
CONFIGS = {
    "quick": dict(width=100, epochs=20, seeds=(0, 1), num_samples=20, lr=3e-3),
    "full": dict(width=400, epochs=300, seeds=(0, 1, 2, 3, 4), num_samples=100, lr=3e-3),
}
# Blundell et al. (2015), Table 2: MNIST, 1200 units, scale mixture prior.
PAPER_TABLE2 = {0.0: 1.24, 0.5: 1.24, 0.75: 1.24, 0.95: 1.29, 0.98: 1.39}


def _mask_draws(draws, sites, score, fraction, generator=None):
    """Zero the lowest ``fraction`` of weights by ``score`` (a dict of tensors) in every draw."""
    flat = torch.cat([score[n].reshape(-1) for n in sites])
    k = math.floor(round(fraction * flat.numel(), 9))
    removed = torch.zeros(flat.numel(), dtype=torch.bool)
    removed[torch.argsort(flat, stable=True)[:k]] = True
    out, counts, start = dict(draws), {}, 0
    for n in sites:
        size = score[n].numel()
        keep = ~removed[start : start + size].reshape(score[n].shape)
        start += size
        out[n] = draws[n] * keep
        counts[n] = int((~keep).sum())
    return out, counts


def run_seed(data, cfg, seed):
    xtr, ytr, xte, yte = data
    model, guide = cls.train_bbb(xtr, ytr, cfg["width"], prior="mixture", epochs=cfg["epochs"],
                                 lr=cfg["lr"], seed=seed)
    sites = model.network.site_names
    snr = guide.snr()
    res = {"snr": snr, "error": [], "error_magnitude": [], "error_random": [], "threshold_snr": [],
           "n_removed": []}
    magnitude = {n: guide.loc.get_parameter(n).detach().abs() for n in sites}
    sigma = guide.scales()
    res["per_site"] = {
        n: {"n": magnitude[n].numel(), "sigma_median": float(sigma[n].median()),
            "abs_mu_median": float(magnitude[n].median()),
            "snr_db_median": float(10 * torch.log10(snr[n].median())),
            "removed_by_snr": [], "removed_by_abs_mu": []}
        for n in sites
    }
    gen = torch.Generator().manual_seed(1000 + seed)
    random_score = {n: torch.rand(magnitude[n].shape, generator=gen) for n in sites}
    for fraction in FRACTIONS:
        pruned = prune(guide, fraction, inplace=False)
        res["error"].append(cls.bbb_error(model, pruned, xte, yte, cfg["num_samples"], seed=seed))
        res["threshold_snr"].append(pruned.prune_summary.threshold_snr)
        res["n_removed"].append(pruned.prune_summary.num_removed)
        res["n_weights"] = pruned.prune_summary.num_weights
        for n in sites:
            res["per_site"][n]["removed_by_snr"].append(
                pruned.prune_summary.removed_per_site[n] / res["per_site"][n]["n"])
        # the baselines: the same draws of the unpruned guide, masked by another ranking
        torch.manual_seed(seed)
        draws = guide.sample_posterior(cfg["num_samples"])
        for key, score in (("error_magnitude", magnitude), ("error_random", random_score)):
            masked, counts = _mask_draws(draws, sites, score, fraction)
            res[key].append(cls.bbb_error(model, masked, xte, yte, cfg["num_samples"], seed=seed))
            if key == "error_magnitude":
                for n in sites:
                    res["per_site"][n]["removed_by_abs_mu"].append(counts[n] / res["per_site"][n]["n"])
    return res


def plot_snr(snr_db, thresholds_db, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    finite = snr_db[np.isfinite(snr_db)]
    ax1.hist(finite, bins=120, density=True, color="C0", alpha=0.8)
    ax1.set_xlabel("signal-to-noise ratio (dB) = 10 log10(|mu| / sigma)")
    ax1.set_ylabel("density")
    ax1.set_title("density (paper Fig. 4, left)")
    xs = np.sort(finite)
    ax2.plot(xs, np.arange(1, xs.size + 1) / xs.size, color="C0")
    ax2.set_xlabel("signal-to-noise ratio (dB)")
    ax2.set_ylabel("CDF")
    ax2.set_title("CDF (paper Fig. 4, right)")
    for ax in (ax1, ax2):
        for (fraction, t), c in zip(thresholds_db, ("C1", "C2", "C3", "C4")):
            ax.axvline(t, color=c, ls="--", lw=1, label=f"{100 * fraction:.0f}% removed below")
    ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: small network, 2 seeds, few epochs")
    parser.add_argument("--out", type=Path, default=cls.DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    cfg = CONFIGS[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    *data, desc = cls.load_dataset("digits")
    runs = []
    for seed in cfg["seeds"]:
        t0 = time.perf_counter()
        runs.append(run_seed(data, cfg, seed))
        print(f"[pruning] seed {seed}: error by fraction "
              + ", ".join(f"{100 * f:.0f}%: {100 * e:.2f}" for f, e in zip(FRACTIONS, runs[-1]["error"]))
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    def stat(key):
        a = np.array([r[key] for r in runs], dtype=float)  # (seeds, fractions)
        se = a.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else np.zeros(a.shape[1])
        return a.mean(0).tolist(), se.tolist(), a.tolist()

    result = {"fractions": list(FRACTIONS), "n_weights": runs[0]["n_weights"],
              "n_kept": [runs[0]["n_weights"] - k for k in runs[0]["n_removed"]]}
    for key in ("error", "error_magnitude", "error_random"):
        mean, se, per_seed = stat(key)
        result[key], result[f"{key}_se"], result[f"{key}_per_seed"] = mean, se, per_seed
    thresholds = np.array([r["threshold_snr"] for r in runs], dtype=float)
    with np.errstate(divide="ignore"):
        result["threshold_snr_db_seed0"] = [
            float(10 * np.log10(t)) if t > 0 else None for t in thresholds[0]
        ]
    result["per_site_seed0"] = runs[0]["per_site"]
    result.update(dataset="digits", width=cfg["width"], epochs=cfg["epochs"], seeds=list(cfg["seeds"]),
                  num_samples=cfg["num_samples"], prior=dict(cls.MIXTURE_PRIOR), mode=mode)

    snr0 = torch.cat([v.reshape(-1) for v in runs[0]["snr"].values()]).double().numpy()
    with np.errstate(divide="ignore"):
        snr_db = 10 * np.log10(snr0)
    q = np.percentile(snr_db[np.isfinite(snr_db)], [5, 50, 95])
    result["snr_db_seed0_percentiles_5_50_95"] = [float(v) for v in q]
    lines = [(f, t) for f, t in zip(FRACTIONS, result["threshold_snr_db_seed0"]) if f > 0 and t is not None]
    plot_snr(snr_db, lines, args.out / "pruning_snr.png",
             f"SNR of {snr0.size:,} weights, BBB scale mixture, digits 64-{cfg['width']}-{cfg['width']}-10, seed {cfg['seeds'][0]}")
    plot_errors(result, args.out / "pruning_error.png")
    total = time.perf_counter() - start
    result["seconds"] = total
    (args.out / "pruning.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.out / "pruning.md", result, desc, cfg, mode, total)
    print(f"[pruning] wrote {args.out} in {total:.0f} s", flush=True)
    return result


def plot_errors(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = np.arange(len(result["fractions"]))
    for key, label in (("error", "by SNR |mu|/sigma (prune)"), ("error_magnitude", "by |mu|"),
                       ("error_random", "at random")):
        ax.errorbar(xs, 100 * np.array(result[key]), yerr=100 * np.array(result[f"{key}_se"]),
                    marker="o", capsize=3, label=label)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{100 * f:.0f}%" for f in result["fractions"]])
    ax.set_xlabel("weights removed")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path, r, desc, cfg, mode, total):
    rows = []
    for i, f in enumerate(r["fractions"]):
        t = r["threshold_snr_db_seed0"][i]
        rows.append([
            f"{100 * f:.0f}%", f"{r['n_kept'][i]:,}",
            f"{100 * r['error'][i]:.2f} +- {100 * r['error_se'][i]:.2f}",
            f"{100 * r['error_magnitude'][i]:.2f} +- {100 * r['error_magnitude_se'][i]:.2f}",
            f"{100 * r['error_random'][i]:.2f} +- {100 * r['error_random_se'][i]:.2f}",
            "-" if t is None else f"{t:.1f}",
            f"{PAPER_TABLE2[f]:.2f}",
        ])
    table = cls.write_markdown_table(rows, [
        "removed", "weights kept", "error % (by SNR)", "error % (by abs(mu))", "error % (random)",
        "SNR threshold dB (seed 0)", "paper Table 2, MNIST 1200 units",
    ])
    w = cfg["width"]
    parts = [
        "# Pruning by signal-to-noise ratio (Blundell et al. 2015, Table 2 and Figure 4, in miniature)",
        "",
        f"Mode: **{mode}**. Command (from the repository root):",
        "",
        f"```bash\n{cls.command_line()}\n```",
        "",
        f"Total run time: {total:.0f} s on {cls.versions()['machine']}.",
        "",
        f"Data: {desc}. Network 64-{w}-{w}-10 (ReLU), {r['n_weights']:,} weights and biases, all "
        "Bayesian and all ranked together. BBB with the scale-mixture prior (pi = 0.5, sigma1 = 1, "
        f"sigma2 = e^-6), `fit(..., batch_size={cls.BATCH_SIZE}, lr={cfg['lr']}, kl=\"mc\")`, "
        f"{cfg['epochs']} epochs, seeds {list(cfg['seeds'])}. Test error of the posterior predictive "
        f"mean over {cfg['num_samples']} draws, mean +- standard error over seeds.",
        "",
        "`pyro_bbb.prune(guide, fraction, inplace=False)` removes the weights with the lowest "
        "|mu| / sigma, ranked across all layers together, by fixing them at exactly 0. The "
        "baselines remove the same number of weights by posterior-mean magnitude |mu|, and at random "
        "(masking the same posterior draws).",
        "",
        table,
        "",
        "![test error against weights removed](pruning_error.png)",
        "",
        "![density and CDF of the signal-to-noise ratio](pruning_snr.png)",
        "",
        "Signal-to-noise ratio of seed 0 in dB (10 log10 |mu|/sigma): 5th / 50th / 95th percentile "
        + " / ".join(f"{v:.1f}" for v in r["snr_db_seed0_percentiles_5_50_95"]) + ".",
        "",
        "Per site (seed 0): medians of the posterior, and the share of each site removed at 95% by "
        "the global SNR ranking and by the global |mu| ranking:",
        "",
        site_table(r),
        "",
        *cls.report_footer(interpretation(r, mode)),
    ]
    path.write_text("\n".join(parts))


def site_table(r) -> str:
    i95 = r["fractions"].index(0.95)
    rows = [
        [f"`{n}`", f"{d['n']:,}", f"{d['sigma_median']:.4f}", f"{d['abs_mu_median']:.4f}",
         f"{d['snr_db_median']:.1f}", f"{100 * d['removed_by_snr'][i95]:.1f}%",
         f"{100 * d['removed_by_abs_mu'][i95]:.1f}%"]
        for n, d in r["per_site_seed0"].items()
    ]
    return cls.write_markdown_table(rows, [
        "site", "weights", "median sigma", "median abs(mu)", "median SNR dB",
        "removed at 95% by SNR", "removed at 95% by abs(mu)",
    ])


def _paired(r, a, b, f):
    """Mean and standard error over seeds of error[a] - error[b] at fraction f, in points."""
    i = r["fractions"].index(f)
    d = 100 * (np.array(r[f"{a}_per_seed"])[:, i] - np.array(r[f"{b}_per_seed"])[:, i])
    se = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else 0.0
    return float(d.mean()), float(se)


def _compare(mean, se, a, b) -> str:
    detail = f"{100 * a:.2f}% vs {100 * b:.2f}%, difference {mean:+.2f} +- {se:.2f} points"
    if se > 0 and abs(mean) < 2 * se or mean == 0:
        return f"indistinguishable ({detail})"
    return f"{'worse' if mean > 0 else 'better'} ({detail})"


def interpretation(r, mode) -> str:
    if mode == "quick":
        return ("Quick mode is a smoke test (a small network, a few epochs): it checks that training, "
                "pruning and scoring run, not the size of the effect. See the full run.")
    e = dict(zip(r["fractions"], r["error"]))
    em = dict(zip(r["fractions"], r["error_magnitude"]))
    er = dict(zip(r["fractions"], r["error_random"]))
    change = ", ".join("{:+.2f} +- {:.2f}".format(*_diff0(r, f)) for f in (0.5, 0.75, 0.95, 0.98))
    text = [
        f"Unpruned, the network's test error is {100 * e[0.0]:.2f}%. Removing 50%, 75%, 95% and 98% of "
        f"the weights by SNR changes it by {change} points (paired over seeds). Removing the same "
        f"numbers at random destroys the network ({100 * er[0.5]:.1f}% error at 50%, "
        f"{100 * er[0.95]:.1f}% at 95%): the SNR ranking is far better than chance. Against the simpler ranking by posterior-mean magnitude |mu|, SNR pruning is "
        + "; ".join(f"at {100 * f:.0f}% {_compare(*_paired(r, 'error', 'error_magnitude', f), e[f], em[f])}"
                    for f in (0.75, 0.95, 0.98))
        + ".",
    ]
    sites = r["per_site_seed0"]
    i95 = r["fractions"].index(0.95)
    weights = {n: d for n, d in sites.items() if d["n"] >= 1000} or sites

    def span(key, fmt):
        vals = [d[key] for d in weights.values()]
        return f"{fmt.format(min(vals))} to {fmt.format(max(vals))}"

    by_snr = [100 * d["removed_by_snr"][i95] for d in weights.values()]
    smallest_mu = min(weights, key=lambda n: weights[n]["abs_mu_median"])
    most = max(weights, key=lambda n: weights[n]["removed_by_snr"][i95] - weights[n]["removed_by_abs_mu"][i95])
    dm = weights[most]
    text.append(
        f"Per site (table, weight matrices of at least 1,000 entries): the median SNR is "
        f"{span('snr_db_median', '{:.1f}')} dB and the median |mu| {span('abs_mu_median', '{:.4f}')}. "
        f"At 95% the global SNR ranking removes {min(by_snr):.0f}-{max(by_snr):.0f}% of each of these "
        f"layers, while the |mu| ranking takes most from the layer of smallest weights (`{smallest_mu}`, "
        f"{100 * weights[smallest_mu]['removed_by_abs_mu'][i95]:.0f}%) and keeps more of the others; the "
        f"largest difference is `{most}` ({dm['n']:,} weights): {100 * dm['removed_by_snr'][i95]:.0f}% "
        f"removed by SNR, {100 * dm['removed_by_abs_mu'][i95]:.0f}% by |mu|."
    )
    p5, p50, p95 = r["snr_db_seed0_percentiles_5_50_95"]
    if p50 - p5 > 1.5 * (p95 - p50):
        text[-1] += (f" The SNR (figure; 5th/50th/95th percentile {p5:.1f} / {p50:.1f} / {p95:.1f} dB) has "
                     "a long tail towards low values and a short one above the median.")
    cost95 = _diff0(r, 0.95)[0]
    verdict = ("agrees: here too 95% go for a cost of {:.2f} points".format(cost95) if cost95 <= 0.5
               else "does not reproduce that: here removing 95% costs {:.2f} points".format(cost95))
    text.append(
        "The paper (Table 2: full MNIST, 1200 units, 2.4 million weights) reports 1.24% unpruned, still "
        "1.24% at 75% removed, 1.29% at 95% and 1.39% at 98%: there 95% of the weights go at almost no "
        f"cost. This miniature {verdict}. It has {r['n_weights']:,} weights "
        f"({2.4e6 / r['n_weights']:.0f} times fewer), 64 inputs instead of 784, 1,347 training images "
        f"instead of 60,000, {r['epochs']} epochs and an untuned prior. A test set of 450 images means "
        "one image is 0.22 points."
    )
    return "\n\n".join(text)


def _diff0(r, f):
    """Paired change from the unpruned error at fraction f (points): mean, SE."""
    a = 100 * np.array(r["error_per_seed"])
    d = a[:, r["fractions"].index(f)] - a[:, 0]
    se = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else 0.0
    return float(d.mean()), float(se)


if __name__ == "__main__":
    main()
