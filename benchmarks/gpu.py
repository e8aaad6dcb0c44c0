"""GPU timings: run_hmc from 32 to 4,096 chains, and fit's step against a deterministic step.

Writes ``benchmarks/results/gpu.md`` (machine, versions, command, tables).  On a GPU the
clock is wall time with ``torch.cuda.synchronize()`` around each timed block (CPU time says
nothing about a GPU's work).  ``benchmarks/gpu.sh`` runs this after the CUDA tests.

    python benchmarks/gpu.py                       # on a CUDA machine, ~5 minutes
    python benchmarks/gpu.py --device cpu --quick  # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch
from torch import nn

import pyro_bbb as bbb

sys.path.insert(0, str(Path(__file__).parent))
from train_step import big_problem, deterministic_step, fit_step  # noqa: E402  (the same steps as on CPU)

RESULTS = Path(__file__).parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict, device, rounds: int, block: int) -> dict:
    """Median seconds per step of each step function, methods alternating within rounds."""
    for step in steps.values():  # warm-up: kernels loaded, caches filled
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(block):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - start) / block)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step_table(device, quick: bool) -> list[str]:
    label, net, x, y, num_data, task = big_problem()
    net, x, y = net.to(device), x.to(device), y.to(device)
    prior = dist.Normal(torch.tensor(0.0, device=device), torch.tensor(1.0, device=device))
    mixture = bbb.ScaleMixtureNormal(0.5, 1.0, float(np.exp(-6)))
    steps = {
        "deterministic": deterministic_step(net, x, y, num_data, task),
        "fit, N(0,1), kl=mc": fit_step(net, x, y, num_data, task, prior),
        "fit, scale mixture, kl=mc": fit_step(net, x, y, num_data, task, mixture),
        "fit local_reparam, N(0,1), kl=analytic": fit_step(net, x, y, num_data, task, prior, kl="analytic",
                                                           estimator="local_reparam"),
    }
    seconds = time_steps(steps, device, rounds=3 if quick else 15, block=2 if quick else 20)
    base = seconds["deterministic"]
    lines = [f"### fit's step, {label}", "", "| step | ms / step | x deterministic |", "|---|---:|---:|"]
    lines += [f"| {name} | {1e3 * s:.3f} | {s / base:.2f} |" for name, s in seconds.items()]
    return lines + [""]


def hmc_table(device, chain_counts, quick: bool) -> list[str]:
    x, y = bbb.datasets.regression_curve(100, seed=0)
    x_test = torch.linspace(-0.2, 1.2, 50)[:, None]
    warmup, samples = (20, 10) if quick else (200, 100)
    lines = [f"### run_hmc, 1-50-1 tanh on the regression curve, {warmup} warmup + {samples} draws", "",
             "| chains | seconds | chain-gradients / s | us / chain-gradient | min bulk ESS f(x*) | ESS / s | max R-hat |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for chains in chain_counts:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
        model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1).to(device)
        _sync(device)
        start = time.perf_counter()
        ref = bbb.run_hmc(model, x.to(device), y.to(device), num_chains=chains, num_samples=samples,
                          warmup_steps=warmup, x_test=x_test.to(device), seed=0, progress=False)
        _sync(device)
        seconds = time.perf_counter() - start
        steps = float(np.sum(ref.adaptation["warmup_n_steps"]) + np.sum(np.mean(ref.sample_stats["n_steps"], 0)))
        grads = steps * chains  # every chain takes every leapfrog step: one gradient each
        ess, rhat = ref.diagnostics["min_ess_bulk_f"], ref.diagnostics["max_rhat_f"]
        lines.append(f"| {chains} | {seconds:.1f} | {grads / seconds:.3g} | {1e6 * seconds / grads:.2f} | "
                     f"{ess:.0f} | {ess / seconds:.1f} | {rhat:.4f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, times nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.md", help="the results file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    chain_counts = [32, 128] if args.quick else [32, 128, 512, 1024, 4096]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = ["# GPU timings", "",
             f"Command: `python benchmarks/gpu.py{' --quick' if args.quick else ''} --device {args.device}`", "",
             f"Device: {name}; torch {torch.__version__}, pyro_bbb {bbb.__version__}, python {platform.python_version()}."
             " Wall time with the device synchronized around each timed block.", ""]
    lines += hmc_table(device, chain_counts, args.quick)
    lines += train_step_table(device, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
