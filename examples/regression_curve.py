"""The paper's regression curve (Blundell et al. 2015, Figure 5): BBB vs a plain network.

Fits y = x + 0.3 sin(2 pi (x + e)) + 0.3 sin(4 pi (x + e)) + e on x in [0, 0.5]
with Bayes by Backprop and with an ordinary network, then draws the predictive
median and interquartile range over x in [-0.2, 1.2]: BBB widens its band away
from the data, the plain network is equally sure everywhere.

    python examples/regression_curve.py --out curve.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

import pyro_bbb as bbb  # noqa: E402


def make_net(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))


def fit_plain(net, x, y, epochs: int, lr: float) -> torch.nn.Module:
    """Ordinary least squares training of the same architecture (the paper's baseline)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = (net(x).squeeze(-1) - y).pow(2).mean()
        loss.backward()
        opt.step()
    return net


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("regression_curve.png"))
    parser.add_argument("--epochs", type=int, default=1500)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y = bbb.datasets.regression_curve(100, seed=args.seed)
    grid = torch.linspace(-0.2, 1.2, 300)[:, None]
    torch.manual_seed(args.seed)
    net = make_net(args.hidden)

    priors = {
        "BBB, Gaussian prior N(0, 1)": dist.Normal(0.0, 1.0),
        "BBB, scale mixture (pi 1/2, sigma1 1, sigma2 e^-6)": bbb.ScaleMixtureNormal(0.5, 1.0, math.exp(-6)),
    }
    bands = {}
    for label, prior in priors.items():
        model = bbb.BayesianRegressor(net, prior=prior, noise=0.1)
        guide = bbb.BBBGuide(model)
        bbb.fit(model, guide, x, y, epochs=args.epochs, lr=0.01, num_particles=8, kl="analytic",
                seed=args.seed, progress=True)
        pred = bbb.predict(model, guide, grid, num_samples=1000, seed=args.seed)
        bands[label] = pred.quantiles([0.25, 0.5, 0.75])
        at = bbb.predict(model, guide, torch.tensor([[0.25], [1.0]]), num_samples=2000, seed=args.seed)
        print(f"{label}: predictive std of f at x=0.25: {at.f_std[0]:.3f}, at x=1.0: {at.f_std[1]:.3f} "
              f"(ratio {at.f_std[1] / at.f_std[0]:.1f})")
    plain = fit_plain(make_net(args.hidden), x, y, epochs=args.epochs, lr=0.01)
    with torch.no_grad():
        plain_line = plain(grid).squeeze(-1)

    fig, axes = plt.subplots(1, len(bands) + 1, figsize=(5 * (len(bands) + 1), 4), sharey=True)
    truth = bbb.datasets.curve_function(grid[:, 0])
    for ax, (label, q) in zip(axes, bands.items()):
        ax.fill_between(grid[:, 0], q[0], q[2], color="tab:blue", alpha=0.3, label="interquartile range")
        ax.plot(grid[:, 0], q[1], color="tab:blue", label="median")
        ax.set_title(label, fontsize=9)
    axes[-1].plot(grid[:, 0], plain_line, color="tab:red", label="plain network")
    axes[-1].set_title("plain network (no uncertainty)", fontsize=9)
    for ax in axes:
        ax.plot(grid[:, 0], truth, color="gray", lw=0.8, ls="--", label="noise-free curve")
        ax.scatter(x[:, 0], y, s=6, color="k", label="data")
        ax.set_ylim(-1.0, 1.6)
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(args.out)
    plt.close(fig)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
