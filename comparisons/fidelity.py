"""How close does each inference scheme come to HMC? Every scheme of ``pyro_bbb.schemes``
scored against one ChEES-HMC reference on the same model, data set by data set.

Problems: the five small UCI regression sets (yacht, bostonHousing, energy, concrete,
wine-quality-red) on the published splits 0-4 and on every "gap" split of Foong et al.
(2019) (the test set is the middle third of one feature's range, so it all lies in a gap of
the training inputs); the regression curve; logistic regression on breast_cancer.

Model: one hidden layer of 50 tanh units, N(0, 1) priors on every weight and bias, a fixed
Gaussian noise of 0.25 on the standardized UCI targets (0.1 on the curve); breast_cancer is
logistic regression (no hidden layer).  bbb-mixture fits the same network under a
scale-mixture prior (its own model, so its row compares a different posterior).  Every
scheme has one shared setting (steps, learning rate, seed) on every problem.

Reference: ``pyro_bbb.run_hmc(until_converged=True, time_limit=...)``.  Rows count (are
averaged, ranked) only where the reference passed its convergence check; elsewhere they are
stored with ``reference_converged: false`` and shown as "reference not converged".

Every problem's result is cached in ``fidelity_cache_<mode>.json`` in the output folder as
soon as it is done, so an interrupted run resumes (a different configuration starts afresh).
The full run's cache is committed in ``comparisons/results``: rerunning the full command
computes only the problems it does not hold yet.

    python comparisons/fidelity.py --quick   # CI: yacht split 0 + gap 0 + curve, 3 schemes
    python comparisons/fidelity.py --workers 2   # everything (hours on a CPU)
    python comparisons/fidelity.py --datasets yacht,curve --splits 0,gap2
    python comparisons/fidelity.py --report-only   # the report of what the cache holds so far
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
from pyro_bbb import schemes  # noqa: E402
from pyro_bbb.fidelity import DEFINITIONS, OVERCONFIDENT_BELOW, confidence_word  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "uci"
UCI_SETS = ("yacht", "bostonHousing", "energy", "concrete", "wine-quality-red")
ALL_DATASETS = UCI_SETS + ("curve", "breast_cancer")
HIDDEN = 50
PRIOR_SCALE = 1.0
UCI_NOISE, CURVE_NOISE = 0.25, 0.1
MIXTURE = dict(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))
LAPLACE_JITTERS = (None, 1.0, 10.0, 100.0, 1e3, 1e4)
NOT_CONVERGED = "reference not converged"

# The one departure from the shared setting: a full-rank Gaussian's learning rate decays
# 100x over the run (at a constant 0.01 Adam random-walks its covariance entries: see
# ``schemes.fit_autoguide``).
SCHEME_OPTIONS = {"fullrank": {"lr_decay": 0.01}}

CONFIGS = {
    "full": dict(schemes=list(schemes.SCHEMES), splits="0,1,2,3,4,gaps", datasets=",".join(ALL_DATASETS),
                 epochs=2000, lr=1e-2, vi_samples=400, seed=0, scheme_options=SCHEME_OPTIONS,
                 # 500 warmup iterations of up to 1000 steps took 450 s on yacht, past any useful
                 # limit; 300 of up to 512 (the curve needs ~500) fit in a few minutes.
                 hmc=dict(num_chains=32, warmup_steps=300, num_samples=200, max_leapfrog_steps=512),
                 time_limit=600.0, curve_points=100),
    "quick": dict(schemes=["bbb", "ensemble", "dropout"], splits="0,gap0", datasets="yacht,curve",
                  epochs=60, lr=2e-2, vi_samples=100, seed=0, scheme_options=SCHEME_OPTIONS,
                  hmc=dict(num_chains=8, warmup_steps=40, num_samples=40, max_leapfrog_steps=30),
                  time_limit=4.0, curve_points=40),
}


class DataMissing(RuntimeError):
    pass


# -- problems --------------------------------------------------------------------------------
def root_path(arg) -> Path:
    """The UCI data folder named by ``--root``, the environment or the default (unchecked)."""
    return Path(arg or os.environ.get(bbb.datasets.UCI_ROOT_ENV) or DEFAULT_ROOT).expanduser()


def resolve_root(arg) -> Path:
    root = root_path(arg)
    if not root.is_dir():
        raise DataMissing(f"fidelity.py: UCI data folder {str(root)!r} not found. Pass --root DIR or set "
                          f"{bbb.datasets.UCI_ROOT_ENV} to a folder holding yacht/, bostonHousing/, ...")
    return root


def problem_keys(datasets, splits, root) -> list[str]:
    """``"yacht/split0"``, ``"yacht/gap3"``, ``"curve"``, ``"breast_cancer"`` as selected."""
    keys = []
    for name in datasets:
        if name not in UCI_SETS:
            keys.append(name)
            continue
        for token in splits:
            if token == "gaps":
                keys += [f"{name}/gap{g}" for g in range(bbb.datasets.uci_num_gap_splits(name, root))]
            elif token.startswith("gap"):
                keys.append(f"{name}/{token}")
            else:
                keys.append(f"{name}/split{int(token)}")
    return list(dict.fromkeys(keys))


def group_of(key: str) -> str:
    if "/gap" in key:
        return "UCI gap splits (Foong et al. 2019)"
    if "/split" in key:
        return "UCI standard splits"
    return {"curve": "Regression curve", "breast_cancer": "breast_cancer (logistic regression)"}[key]


def load_problem(key: str, root, cfg):
    """The data set of ``key`` (UCI targets standardized with training statistics)."""
    if key == "curve":
        return bbb.datasets.curve(cfg["curve_points"], seed=cfg["seed"])
    if key == "breast_cancer":
        return bbb.datasets.load_sklearn("breast_cancer", seed=cfg["seed"])
    name, part = key.split("/")
    try:
        if part.startswith("gap"):
            return bbb.datasets.load_uci_gap(name, feature=int(part[3:]), root=root)
        return bbb.datasets.load_uci(name, split=int(part[5:]), root=root)
    except (ValueError, OSError) as err:
        raise DataMissing(f"fidelity.py: cannot load {key!r} from {str(root)!r}: {err}")


def make_model(data, prior_kind: str, seed: int):
    """The study's model: 50 tanh units (logistic regression for a classifier), N(0, 1) or
    scale-mixture priors; the network's initial weights come from ``seed``."""
    torch.manual_seed(seed)
    prior = (dist.Normal(0.0, PRIOR_SCALE) if prior_kind == "gaussian"
             else bbb.ScaleMixtureNormal(MIXTURE["pi"], MIXTURE["sigma1"], MIXTURE["sigma2"]))
    d_in = data.x_train.shape[1]
    if data.task == "classification":
        return bbb.BayesianClassifier(nn.Linear(d_in, data.num_classes), prior=prior)
    net = nn.Sequential(nn.Linear(d_in, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    noise = CURVE_NOISE if data.name == "curve" else UCI_NOISE
    return bbb.BayesianRegressor(net, prior=prior, noise=noise)


# -- schemes and reference -------------------------------------------------------------------
def fit_laplace(model, data, options):
    """Laplace with the smallest jitter that makes H + jitter * I positive definite; and that jitter."""
    for jitter in LAPLACE_JITTERS:
        try:
            return schemes.fit_scheme("laplace", model, data.x_train, data.y_train, jitter=jitter, **options), jitter
        except ValueError as err:
            if "positive definite" not in str(err):
                raise
    raise ValueError(f"laplace: the precision stayed indefinite up to jitter {LAPLACE_JITTERS[-1]:g}")


def fit_one(name, data, cfg):
    """(model, posterior, notes) of scheme ``name`` with the study's one shared setting."""
    model = make_model(data, "mixture" if name == "bbb-mixture" else "gaussian", cfg["seed"])
    options = dict(epochs=cfg["epochs"], lr=cfg["lr"], seed=cfg["seed"], progress=False,
                   **cfg["scheme_options"].get(name, {}))
    if name == "laplace":
        posterior, jitter = fit_laplace(model, data, options)
        return model, posterior, {"laplace_jitter": jitter or 0.0}
    return model, schemes.fit_scheme(name, model, data.x_train, data.y_train, **options), {}


def run_problem(key, data, cfg) -> dict:
    """Every scheme and the reference on one problem: the fidelity table and the verdict."""
    common = dict(x_test=data.x_test, y_test=data.y_test, seed=cfg["seed"])
    approximations, notes, seconds = {}, {}, {}
    for name in cfg["schemes"]:
        t0 = time.perf_counter()
        model, posterior, notes[name] = fit_one(name, data, cfg)
        approximations[name] = bbb.to_inference_data(model, posterior, data.x_train, data.y_train,
                                                     num_samples=cfg["vi_samples"], **common)
        seconds[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = make_model(data, "gaussian", cfg["seed"])
    reference = bbb.run_hmc(model, data.x_train, data.y_train, until_converged=True,
                            time_limit=cfg["time_limit"], seed=cfg["seed"], progress=False,
                            **cfg["hmc"], x_test=data.x_test)
    hmc = bbb.to_inference_data(model, reference, data.x_train, data.y_train, **common)
    seconds["reference"] = time.perf_counter() - t0
    # a gap split's test set is the gap itself: every test input counts as away from the data
    in_data = np.zeros(len(data.x_test), dtype=bool) if "/gap" in key else None
    report = bbb.compare(hmc, approximations, in_data=in_data)
    out = report.to_dict()
    converged = bool(report.reference_converged)
    for name, row in out["schemes"].items():
        row.update(notes.get(name, {}), reference_converged=converged)
    return {"schemes": out["schemes"], "summary": out["summary"], "reference_converged": converged,
            "stop_reason": str(reference.stop_reason), "metric": report.fidelity_metric,
            "seconds": seconds, "report": report}


# -- the cache -------------------------------------------------------------------------------
class Cache:
    """Results by problem key, written to disk after every problem.  The fingerprint
    leaves out which problems were selected (``datasets``, ``splits``): a problem's
    result does not depend on them, so runs over different selections share a cache."""

    def __init__(self, path: Path, cfg: dict):
        self.path = path
        settings = {k: v for k, v in cfg.items() if k not in ("datasets", "splits")}
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        self.results = {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == self.fingerprint:
                self.results = saved["results"]
                print(f"[fidelity] resuming from {path} ({len(self.results)} problems cached)", flush=True)

    def put(self, key, value):
        self.results[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "results": self.results}, indent=1))
        tmp.replace(self.path)


# -- report ----------------------------------------------------------------------------------
def verdict(r) -> str:
    return "reference converged" if r["reference_converged"] else f"{NOT_CONVERGED} ({r['stop_reason']})"


def fmt(v, flagged=False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    text = f"{v:.3g}"
    return f"({text})" if flagged else text


def group_table(keys, results, scheme_names) -> str:
    """One row per problem: the reference's verdict and each scheme's fidelity metric
    (in parentheses, and never ranked, where the reference did not converge)."""
    rows = []
    for key in keys:
        r = results[key]
        flagged = not r["reference_converged"]
        cells = [fmt(r["schemes"].get(s, {}).get(r["metric"]), flagged) for s in scheme_names]
        rows.append([key, verdict(r), r["metric"], *cells])
    metrics = {results[k]["metric"] for k in keys}
    if len(keys) > 1 and len(metrics) == 1:
        converged = sum(results[k]["reference_converged"] for k in keys)
        means = [fmt(mean_over(results, keys, s, *metrics)) for s in scheme_names]
        rows.append([f"mean of {converged} converged", "", *metrics, *means])
    return cls.write_markdown_table(rows, ["problem", "verdict", "metric", *scheme_names])


def finite_values(results, keys, scheme, metric) -> dict:
    """``{key: value}`` of ``metric`` for ``scheme`` where the reference converged and it is finite."""
    out = {}
    for k in keys:
        v = results[k]["schemes"].get(scheme, {}).get(metric)
        if results[k]["reference_converged"] and v is not None and math.isfinite(v):
            out[k] = v
    return out


def mean_over(results, keys, scheme, metric) -> float:
    """Mean of ``metric`` for ``scheme`` over the problems whose reference converged."""
    vals = list(finite_values(results, keys, scheme, metric).values())
    return float(np.mean(vals)) if vals else float("nan")


def literature(results, scheme_names) -> str:
    """What the table shows, read from the numbers, beside Foong et al. and Izmailov et al."""
    ok = [k for k in results if results[k]["reference_converged"]]
    parts = [f"The reference converged on {len(ok)} of {len(results)} problems; only those count below."]
    gaps = finite_values(results, [k for k in ok if "/gap" in k], "bbb", "std_ratio_median_away")
    if gaps:
        ratio = float(np.median(list(gaps.values())))
        side = "agrees with" if ratio < 1 else "disagrees with"
        parts.append(f"On the gap splits, mean-field BBB's predictive std is a median {ratio:.2f} times "
                     f"HMC's in the gap, which {side} Foong et al. (2019, 2020): mean-field VI is "
                     "overconfident in between the data.")
    else:
        parts.append("No converged gap split with BBB: Foong et al.'s prediction is not tested here.")
    for label, subset in (("standard UCI splits", [k for k in ok if "/split" in k]),
                          ("UCI gap splits", [k for k in ok if "/gap" in k])):
        ens_w1, vi_w1 = (finite_values(results, subset, s, "w1_mean") for s in ("ensemble", "bbb"))
        both = sorted(set(ens_w1) & set(vi_w1))
        if not both:
            parts.append(f"No converged {label} with both BBB and the ensemble: Izmailov et al.'s "
                         "finding is not tested there.")
            continue
        ens, vi = (float(np.mean([w[k] for k in both])) for w in (ens_w1, vi_w1))
        wins = sum(ens_w1[k] < vi_w1[k] for k in both)
        side = "agrees with" if ens < vi else "disagrees with"
        parts.append(f"On the {len(both)} converged {label} the deep ensemble's mean w1 distance to HMC is "
                     f"{ens:.3g} against BBB's {vi:.3g} (the ensemble closer on {wins} of {len(both)}), which "
                     f"{side} Izmailov et al. (2021): deep ensembles closer to HMC than mean-field VI.")
    return " ".join(parts)


def reading(ratio: float) -> str:
    """A median std ratio read as over-confident, under-confident or about right."""
    return f"{ratio:.2f} ({confidence_word(ratio)})" if math.isfinite(ratio) else "–"


def median_over(results, keys, scheme, metric) -> float:
    vals = list(finite_values(results, keys, scheme, metric).values())
    return float(np.median(vals)) if vals else float("nan")


def problem_groups(keys) -> dict:
    """Where each headline figure is read: ``{label: (problems, metric, std ratio field)}``."""
    return {label: (subset, metric, field) for label, subset, metric, field in (
        ("the standard UCI splits", [k for k in keys if "/split" in k], "w1_mean", "std_ratio_median_in"),
        ("the UCI gap splits", [k for k in keys if "/gap" in k], "w1_mean", "std_ratio_median_away"),
        ("the curve", [k for k in keys if k == "curve"], "w1_mean", None),
        ("breast_cancer", [k for k in keys if k == "breast_cancer"], "tv", None)) if subset}


def headline(results, keys, scheme_names) -> str:
    """The report's opening: did the reference converge, which scheme is closest to it on
    each group of problems and by how much, and which schemes are over-confident."""
    ok = [k for k in keys if results[k]["reference_converged"]]
    bad = [k for k in keys if k not in ok]
    parts = [f"The reference converged on {len(ok)} of {len(keys)} problems"
             + (f" (not on {by_data_set(bad)}, which are never averaged or ranked)." if bad else ".")]
    for label, (subset, metric, _) in problem_groups(keys).items():
        means = {s: mean_over(results, subset, s, metric) for s in scheme_names}
        ranked = sorted((v, s) for s, v in means.items() if math.isfinite(v))
        counted = sum(results[k]["reference_converged"] for k in subset)
        if len(ranked) < 2:
            parts.append(f"On {label}: no converged problem to rank schemes on.")
            continue
        (v1, s1), (v2, s2) = ranked[:2]
        bbb_part = f"; BBB {means['bbb']:.3g}" if s1 != "bbb" and "bbb" in means and s2 != "bbb" else ""
        parts.append(f"On {label} ({counted} converged), {s1} is closest to the reference (mean {metric} "
                     f"{v1:.3g}), then {s2} ({v2:.3g}, {v2 / v1:.2f}x farther){bbb_part}; farthest: "
                     f"{ranked[-1][1]} ({ranked[-1][0]:.3g}).")
    over = {label: [s for s in scheme_names if median_over(results, subset, s, field) < OVERCONFIDENT_BELOW]
            for label, (subset, _, field) in problem_groups(keys).items() if field}
    parts += [f"Over-confident on {label} (median std ratio below {OVERCONFIDENT_BELOW:g}): "
              f"{', '.join(names) or 'none'}." for label, names in over.items()]
    return " ".join(parts)


def confidence_table(results, keys, scheme_names) -> str:
    """Median over converged problems of each scheme's median std ratio, in the data
    (standard splits) and in the gap (gap splits)."""
    groups = {label: v for label, v in problem_groups(keys).items() if v[2]}
    rows = [[s, *(reading(median_over(results, subset, s, field)) for subset, _, field in groups.values())]
            for s in scheme_names]
    return cls.write_markdown_table(rows, ["scheme", *(f"std ratio on {label}" for label in groups)])


def plot_w1(results, scheme_names, path: Path) -> bool:
    """Bars of w1_mean per scheme averaged over the converged standard and gap UCI
    problems, one panel each (log scale where the schemes differ by more than 20x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {label: subset for label, (subset, metric, _) in problem_groups(list(results)).items()
              if "UCI" in label}
    means = {label: [mean_over(results, subset, s, "w1_mean") for s in scheme_names]
             for label, subset in panels.items()}
    means = {label: m for label, m in means.items() if any(math.isfinite(v) for v in m)}
    if not means:
        return False
    fig, axes = plt.subplots(1, len(means), figsize=(1.0 + 0.8 * len(scheme_names) * len(means), 3.4),
                             squeeze=False)
    for ax, (label, m) in zip(axes[0], means.items()):
        values = [v if math.isfinite(v) else np.nan for v in m]
        ax.bar(scheme_names, values, color="tab:blue")
        if np.nanmax(values) > 20 * np.nanmin(values):  # a failed scheme would flatten the rest
            ax.set_yscale("log")
        ax.set_ylabel("mean w1 to HMC (standardized f)")
        counted = sum(results[k]["reference_converged"] for k in panels[label])
        ax.set_title(f"{label} ({counted} converged)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def settings_text(cfg, mode, wall) -> list[str]:
    """The command, the notes, the model and every scheme's and the reference's settings."""
    names = cfg["schemes"]
    return [f"Mode: {mode}. Command: `{cls.command_line()}`. Wall time {wall:.0f} s "
            "(cached problems count zero).", "", *(f"{note}\n" for note in cfg.get("notes", ())),
            f"Model: one hidden layer of {HIDDEN} tanh units, N(0, {PRIOR_SCALE:g}) priors on every weight "
            f"and bias, fixed noise {UCI_NOISE:g} on the standardized UCI targets ({CURVE_NOISE:g} on the "
            "curve); breast_cancer is logistic regression (no hidden layer). bbb-mixture uses a scale-mixture "
            f"prior (pi {MIXTURE['pi']:g}, sigma1 {MIXTURE['sigma1']:g}, sigma2 e^-6). Every scheme: "
            f"{cfg['epochs']} steps, lr {cfg['lr']:g}, seed {cfg['seed']}, {cfg['vi_samples']} draws"
            + "".join(f"; {name} also {', '.join(f'{k} {v:g}' for k, v in opts.items())}"
                      for name, opts in cfg["scheme_options"].items() if name in names) + ". "
            f"Reference: ChEES-HMC, {cfg['hmc']['num_chains']} chains, until converged or "
            f"{cfg['time_limit']:g} s. On gap splits every test input counts as away from the data.", ""]


def by_data_set(keys) -> str:
    """``"yacht split0, gap1; curve"``: problem keys grouped by data set."""
    parts = {}
    for key in keys:
        name, _, part = key.partition("/")
        parts.setdefault(name, []).append(part)
    return "; ".join(f"{name} {', '.join(p)}" if any(p) else name for name, p in parts.items())


def not_run_text(missing) -> list[str]:
    """The selected problems without a cached result."""
    if not missing:
        return []
    return [f"Not run yet (no cached result; they count nowhere): {by_data_set(missing)}.", ""]


def tables_text(results, keys, names) -> list[str]:
    """The confidence table, then one fidelity table per group of problems, and the
    definitions of what they show."""
    lines = []
    if any(field for _, _, field in problem_groups(keys).values()):
        lines += ["## Confidence", "", "Median over converged problems of each scheme's median std ratio "
                  "to HMC (1 is right; below it over-confident).", "", confidence_table(results, keys, names), ""]
    lines += ["Values below are the fidelity metric (w1_mean for regression, tv for classification; ideal 0). "
              f"In parentheses: {NOT_CONVERGED}, stored but never averaged or ranked.", ""]
    for group in dict.fromkeys(group_of(k) for k in keys):
        lines += [f"## {group}", "", group_table([k for k in keys if group_of(k) == group], results, names), ""]
    jitters = [f"{k} {results[k]['schemes']['laplace']['laplace_jitter']:g}" for k in keys
               if "laplace" in results[k]["schemes"]]
    if jitters:
        lines += ["Laplace needs a positive definite precision: the jitter added to the Hessian "
                  "(H + jitter * I, the smallest of 0, 1, 10, ..., 1e4 that works): " + "; ".join(jitters) + ".", ""]
    used = ("w1_mean", "tv", "std_ratio_median_in", "std_ratio_median_away")
    lines += ["## Definitions", "", *(f"- `{m}`: {DEFINITIONS[m]}" for m in used),
              "- every metric of `fidelity.json`: [docs/metrics.md](../../docs/metrics.md)", ""]
    return lines


def write_report(out: Path, results, keys, cfg, mode, figures, wall, missing=()) -> None:
    """fidelity.md: headline, settings, pictures, tables and definitions, per-problem
    summaries, versions and what the table shows beside the literature."""
    names = cfg["schemes"]
    lines = ["# Inference schemes against HMC", "", headline(results, keys, names), "",
             *not_run_text(missing), *settings_text(cfg, mode, wall),
             "## Figures", "", *(f"![{f}]({f})" for f in figures), "",
             *tables_text(results, keys, names), "## Summaries", "",
             *(f"- **{k}** ({verdict(results[k])}): {results[k]['summary']}" for k in keys), ""]
    lines += cls.report_footer(literature({k: results[k] for k in keys}, names))
    text = "\n".join(lines).replace("## What it shows", "## What the table shows")
    (out / "fidelity.md").write_text(text)


# -- main ------------------------------------------------------------------------------------
def parse(argv):
    """``(args, cfg, datasets)`` from the command line; a bad option exits with status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: yacht split 0 + gap 0 + curve, 3 schemes")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument("--root", help="UCI data folder (default ../shared/data/uci or $PYRO_BBB_UCI_ROOT)")
    parser.add_argument("--datasets", help=f"comma-separated among {', '.join(ALL_DATASETS)}")
    parser.add_argument("--schemes", help=f"comma-separated among {', '.join(schemes.SCHEMES)}")
    parser.add_argument("--splits", help="comma-separated standard splits (0-19), gap splits (gap0, ...) "
                                         "or 'gaps' for every gap split")
    parser.add_argument("--time-limit", type=float,
                        help="seconds for each reference, warmup included (default: 600 in full mode)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per worker (default: the CPUs over the workers, at most 4)")
    parser.add_argument("--workers", type=int, default=1,
                        help="problems run side by side in this many processes (default 1)")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the report, under its command (repeatable)")
    parser.add_argument("--report-only", action="store_true",
                        help="compute nothing: report the selected problems already in the cache "
                             "and list the others as not run")
    args = parser.parse_args(argv)
    cfg = dict(CONFIGS["quick" if args.quick else "full"])
    if args.time_limit is not None:
        if not args.time_limit > 0:
            parser.error("--time-limit must be a positive number of seconds")
        cfg["time_limit"] = args.time_limit
    cfg["datasets"] = args.datasets or cfg["datasets"]
    cfg["splits"] = args.splits or cfg["splits"]
    cfg["schemes"] = [s.strip() for s in args.schemes.split(",")] if args.schemes else cfg["schemes"]
    bad = sorted(set(cfg["schemes"]) - set(schemes.SCHEMES))
    if bad:
        parser.error(f"--schemes: unknown {', '.join(bad)} (choose among {', '.join(schemes.SCHEMES)})")
    datasets = [d.strip() for d in cfg["datasets"].split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(ALL_DATASETS))
    if unknown:
        parser.error(f"--datasets: unknown {', '.join(unknown)} (choose among {', '.join(ALL_DATASETS)})")
    if (args.threads is not None and args.threads < 1) or args.workers < 1:
        parser.error("--threads and --workers must be at least 1")
    return args, cfg, datasets


def solve(key, root, cfg, out: Path, threads: int) -> tuple[str, dict]:
    """One problem from its data to its cacheable result: the unit a worker does."""
    torch.set_num_threads(threads)
    r = run_problem(key, load_problem(key, root, cfg), cfg)
    if key == "curve":
        r["report"].plot(out / "fidelity_curve")
    del r["report"]
    return key, r


def solved(todo, root, cfg, out: Path, workers: int, threads: int):
    """Yield ``(key, result)`` as problems finish: in this process, or in ``workers``
    processes (the caller caches each at once: an interruption loses only those in flight)."""
    if workers <= 1:
        print(f"[fidelity] running {', '.join(todo)} in turn", flush=True)
    yield from cls.in_processes(solve, [(key, root, cfg, out, threads) for key in todo], workers)


def compute(keys, cache, root, cfg, out: Path, workers: int = 1, threads: int = 1) -> None:
    """Run every selected problem not yet in the cache, caching each as it ends."""
    todo = [k for k in keys if k not in cache.results]
    print(f"[fidelity] {len(todo)} of {len(keys)} problems to run, {workers} worker(s)", flush=True)
    try:
        for n, (key, r) in enumerate(solved(todo, root, cfg, out, workers, threads), 1):
            cache.put(key, r)
            print(f"[fidelity] {n}/{len(todo)} done: {key}", flush=True)
    except DataMissing as err:
        sys.exit(str(err))


def render(out: Path, results, keys, cfg, mode, wall, missing) -> dict:
    """fidelity.json, the bar chart and fidelity.md for the problems ``keys``."""
    table = {k: results[k]["schemes"] for k in keys}
    (out / "fidelity.json").write_text(json.dumps(table, indent=1))
    curve_dir = out / "fidelity_curve"
    figures = ([str(p.relative_to(out)) for p in sorted(curve_dir.glob("*.png"))]
               if "curve" in keys and curve_dir.is_dir() else [])
    if plot_w1({k: results[k] for k in keys}, cfg["schemes"], out / "fidelity_w1.png"):
        figures.append("fidelity_w1.png")
    write_report(out, results, keys, cfg, mode, figures, wall, missing)
    print(f"[fidelity] wrote {out / 'fidelity.md'} and {out / 'fidelity.json'}", flush=True)
    return table


def main(argv=None) -> dict:
    args, cfg, datasets = parse(argv)
    mode = "quick" if args.quick else "full"
    threads = args.threads or max(1, min(4, (os.cpu_count() or 1) // args.workers))
    torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        root = resolve_root(args.root) if set(datasets) & set(UCI_SETS) else None
        keys = problem_keys(datasets, [s.strip() for s in cfg["splits"].split(",")], root)
    except DataMissing as err:
        sys.exit(str(err))
    # the data folder as named, whether or not this selection reads it: runs over different
    # selections (with and without UCI sets) share one cache
    cache = Cache(args.out / f"fidelity_cache_{mode}.json", {**cfg, "root": str(root_path(args.root))})
    t0 = time.perf_counter()
    if not args.report_only:
        compute(keys, cache, root, cfg, args.out, args.workers, threads)
    done = [k for k in keys if k in cache.results]
    if not done:
        sys.exit("fidelity.py: no selected problem is in the cache yet; run without --report-only")
    missing = [k for k in keys if k not in cache.results]
    return render(args.out, cache.results, done, {**cfg, "notes": args.note}, mode,
                  time.perf_counter() - t0, missing)


if __name__ == "__main__":
    main()
