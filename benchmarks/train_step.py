"""Time per training step of pyro_bbb.fit against a deterministic step and hand-written BBB.

Every method runs in this one process, alternating in rounds, and each round
times a block of steps; the table reports the median per-step time over rounds
and ratios to the deterministic step (and to the hand-written torch BBB step),
which are what the targets are stated in: the median over rounds of each round's
ratio, so that the load of a shared machine, drifting over minutes, cancels.  The machines are shared and noisy:
read ratios, not absolute times.

    python benchmarks/train_step.py                 # one thread (the targets' setting)
    python benchmarks/train_step.py --threads 0     # torch's default thread count
    python benchmarks/train_step.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

import pyro_bbb as bbb
from pyro_bbb.train import TrainStep

RESULTS = Path(__file__).parent / "results"


# -- the two networks of the targets ------------------------------------------------------------
def big_problem():
    """784-400-400-10 ReLU classifier, batch 128 (MNIST-shaped random data: timing only)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 784, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    net = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))
    return "784-400-400-10 ReLU, batch 128, categorical", net, x, y, 60000, "classification"


def small_problem():
    """1-50-1 tanh regressor on the 100-point regression curve, full batch."""
    x, y = bbb.datasets.regression_curve(100, seed=0)
    net = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    return "1-50-1 tanh, 100 points, Gaussian likelihood", net, x, y, 100, "regression"


# -- steps ---------------------------------------------------------------------------------------
def _nll(out, y, task):
    if task == "classification":
        return F.cross_entropy(out, y, reduction="sum")
    return -torch.distributions.Normal(out.squeeze(-1), 0.1).log_prob(y).sum()


def _update(opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def deterministic_step(net, x, y, num_data, task):
    net = _copy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def step():
        loss = _nll(net(x), y, task) * (num_data / x.shape[0])
        _update(opt, loss)

    return step


def handwritten_bbb_step(net, x, y, num_data, task, prior):
    """A naive torch BBB step as people write it: sample weights, log q - log p by
    torch.distributions, functional forward."""
    net = _copy(net)
    names = [n for n, _ in net.named_parameters()]
    mus = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    rhos = {n: torch.full_like(p, math.log(math.expm1(0.01)), requires_grad=True) for n, p in net.named_parameters()}
    opt = torch.optim.Adam(list(mus.values()) + list(rhos.values()), lr=1e-3, fused=True)

    def step():
        w, kl = {}, 0.0
        for n in names:
            sigma = F.softplus(rhos[n])
            w[n] = mus[n] + sigma * torch.randn_like(sigma)
            kl = kl + (torch.distributions.Normal(mus[n], sigma).log_prob(w[n]).sum()
                       - prior.expand(w[n].shape).log_prob(w[n]).sum())
        out = torch.func.functional_call(net, w, (x,))
        loss = kl + _nll(out, y, task) * (num_data / x.shape[0])
        _update(opt, loss)

    return step


def noise_floor_step(net, x, y, num_data, task):
    """A floor for weight sampling: the deterministic step plus one ``randn`` per weight,
    added to the weights (w = mu + 0.01 eps); no sigma parameters, no KL.  Any weight-
    sampling BBB step does at least this."""
    net = _copy(net)
    names = [n for n, _ in net.named_parameters()]
    mus = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(list(mus.values()), lr=1e-3, fused=True)

    def step():
        w = {n: torch.add(mus[n], torch.randn_like(mus[n]), alpha=0.01) for n in names}
        loss = _nll(torch.func.functional_call(net, w, (x,)), y, task) * (num_data / x.shape[0])
        _update(opt, loss)

    return step


def local_reparam_floor_step(net, x, y, num_data, task):
    """A floor for local reparameterization: every Linear computes
    ``x W^T + b + sqrt(x^2 V^T + c) z`` with plain parameters W, b, V, c (V, c kept
    positive by construction, not by a transform) and fresh z; no sigma map, no KL.
    These are the estimator's matrix products (twice the deterministic ones, forward
    and backward); any local-reparameterization step does at least this."""
    net = _copy(net)
    layers = [m for m in net if isinstance(m, nn.Linear)]
    params = []
    for m in layers:
        m.var_weight = nn.Parameter(torch.full_like(m.weight, 1e-4))
        m.var_bias = nn.Parameter(torch.full_like(m.bias, 1e-4))
        params += [m.weight, m.bias, m.var_weight, m.var_bias]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)

    def forward(h):
        for m in net:
            if isinstance(m, nn.Linear):
                mean = F.linear(h, m.weight, m.bias)
                var = F.linear(h.square(), m.var_weight, m.var_bias)
                h = torch.addcmul(mean, var.clamp_min(1e-30).sqrt(), torch.randn_like(mean))
            else:
                h = m(h)
        return h

    def step():
        loss = _nll(forward(x), y, task) * (num_data / x.shape[0])
        _update(opt, loss)

    return step


def pyro_autonormal_step(net, x, y, num_data, task, prior):
    """Pyro's stock route: AutoNormal + Trace_ELBO on the same pyro_bbb model."""
    model = _model(net, prior, task)
    guide = pyro.infer.autoguide.AutoNormal(model, init_scale=0.01)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    return lambda: svi.step(x, y, num_data=num_data)


COMPILE_SECONDS: dict[str, float] = {}  # one-off cost of fit(compile=True), per step name


def fit_step(net, x, y, num_data, task, prior, kl="mc", particles=1, estimator="weights", compile=False,
             name=None):
    """What pyro_bbb.fit runs per step (TrainStep is fit's own step).  With ``compile``, the
    first step (which compiles) runs here and its wall time is kept in COMPILE_SECONDS."""
    model = _model(net, prior, task)
    guide = bbb.BBBGuide(model)
    train_step = TrainStep(model, guide, x, y, num_data=num_data, lr=1e-3, num_particles=particles, kl=kl,
                           estimator=estimator, compile=compile)
    if compile:
        start = time.perf_counter()
        train_step(x, y)
        COMPILE_SECONDS[name] = time.perf_counter() - start
    return lambda: train_step(x, y)


def _model(net, prior, task):
    if task == "classification":
        return bbb.BayesianClassifier(_copy(net), prior=prior)
    return bbb.BayesianRegressor(_copy(net), prior=prior, noise=0.1)


def _copy(net):
    import copy

    return copy.deepcopy(net)


# -- measurement ---------------------------------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


class Timings(dict):
    """Per clock, per method: seconds per step in each round (rounds aligned across methods)."""

    def median(self, clock: str, name: str) -> float:
        return statistics.median(self[clock][name])

    def ratio(self, clock: str, name: str, ref: str) -> float:
        """Median over rounds of the within-round ratio: the methods of a round run seconds
        apart, so a shared machine's drifting load cancels out of each round's ratio."""
        return statistics.median(a / b for a, b in zip(self[clock][name], self[clock][ref]))


def measure(steps: dict, rounds: int, block: int, warmup: int = 3) -> Timings:
    """Seconds per step in each of ``rounds`` rounds, by wall clock and by the CPU time of
    this thread (with one torch thread the work runs on it; CPU time does not count the
    time other jobs on a shared machine take the core away).  Methods alternate within
    each round, ``block`` steps each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {clock: {name: [] for name in steps} for clock in CLOCKS}
    for _ in range(rounds):
        for name, step in steps.items():
            start = {clock: fn() for clock, fn in CLOCKS.items()}
            for _ in range(block):
                step()
            for clock, fn in CLOCKS.items():
                times[clock][name].append((fn() - start[clock]) / block)
    return Timings(times)


# (problem, step, reference, target): the targets, as ratios of step times.
TARGETS = [
    ("big", "fit, N(0,1), kl=mc", "deterministic", 2.5),
    ("big", "fit, N(0,1), kl=analytic", "deterministic", 2.5),
    ("big", "fit, scale mixture, kl=mc", "deterministic", 3.5),
    ("small", "fit, N(0,1), kl=mc", "hand-written torch BBB, N(0,1)", 1.2),
    ("big", "fit local_reparam, N(0,1), kl=analytic", "deterministic", 2.6),
    ("big", "fit compiled, N(0,1), kl=mc", "deterministic", 2.5),
    ("big", "fit compiled, scale mixture, kl=mc", "deterministic", 3.5),
    ("small", "fit compiled, N(0,1), kl=mc", "hand-written torch BBB, N(0,1)", 1.2),
    ("big", "fit compiled local_reparam, N(0,1), kl=analytic", "deterministic", 2.6),
]


def header_lines(args, rounds: int) -> list[str]:
    """The report's title, command, machine, versions and the notes on method, estimators and floors."""
    one_thread = torch.get_num_threads() == 1
    return [
        "# Training step: pyro_bbb.fit vs a deterministic step and a hand-written torch BBB step",
        "",
        f"Command: `{' '.join(['python benchmarks/train_step.py'] + sys.argv[1:])}`",
        "",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} logical CPUs "
        f"(shared with other jobs), torch threads {torch.get_num_threads()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"pyro_bbb {bbb.__version__}",
        f"- method: all steps in one process, alternating; {rounds} rounds of {args.block} steps each "
        "(after warm-up steps); ms/step: median over rounds; ratios: median over rounds of the "
        "ratio within the round; fused Adam for every method (what fit uses); "
        "the fit steps include fit's finiteness checks.  `wall`: elapsed time; `cpu`: CPU time of "
        "the benchmark thread" + (" (= all the work with one torch thread; robust to other jobs "
        "taking the core)" if one_thread else " (not all the work with several threads: read wall)"),
        "- estimators: `fit` = weight sampling (the paper); `local_reparam` = Kingma et al. 2015 for "
        "the Linear layers (the weights are not drawn: the KL is the closed form, or with kl=mc / the "
        "scale mixture a Monte Carlo KL on an independent weight draw); `flipout` = Wen et al. 2018; "
        "`fit compiled` = `fit(compile=True)`: the elementwise work per weight (softplus, the draw, "
        "the KL, their gradients) as torch.compile'd kernels, the noise still drawn by torch.randn",
        "- floors (not BBB, lower bounds on any implementation of it): `deterministic + randn per "
        "weight` draws one normal per weight and adds it to the weights (no sigma, no KL): what every "
        "weight-sampling step does at least; `local-reparam matrix products` runs each Linear as "
        "`x W^T + b + sqrt(x^2 V^T + c) z` with plain parameters (no sigma map, no KL): the estimator's "
        "matrix products, twice the deterministic ones",
        "",
    ]


def problem_steps(key, net, x, y, num_data, task, gauss, mix, no_compile: bool) -> dict:
    """The step functions timed on one problem, by row name, in the table's order."""
    steps = {"deterministic": deterministic_step(net, x, y, num_data, task)}
    steps["floor: deterministic + randn per weight"] = noise_floor_step(net, x, y, num_data, task)
    steps["floor: local-reparam matrix products"] = local_reparam_floor_step(net, x, y, num_data, task)
    steps["hand-written torch BBB, N(0,1)"] = handwritten_bbb_step(net, x, y, num_data, task, gauss)
    steps["Pyro AutoNormal + Trace_ELBO, N(0,1)"] = pyro_autonormal_step(net, x, y, num_data, task, gauss)
    steps["fit, N(0,1), kl=mc"] = fit_step(net, x, y, num_data, task, gauss, "mc")
    steps["fit, N(0,1), kl=analytic"] = fit_step(net, x, y, num_data, task, gauss, "analytic")
    steps["fit, scale mixture, kl=mc"] = fit_step(net, x, y, num_data, task, mix, "mc")
    for est in ("local_reparam", "flipout"):
        steps[f"fit {est}, N(0,1), kl=analytic"] = fit_step(net, x, y, num_data, task, gauss, "analytic",
                                                            estimator=est)
        steps[f"fit {est}, N(0,1), kl=mc"] = fit_step(net, x, y, num_data, task, gauss, "mc", estimator=est)
        steps[f"fit {est}, scale mixture, kl=mc"] = fit_step(net, x, y, num_data, task, mix, "mc",
                                                             estimator=est)
    if not no_compile:  # fit(compile=True): the elementwise work as compiled kernels
        for name, prior, kl, est in (("fit compiled, N(0,1), kl=mc", gauss, "mc", "weights"),
                                     ("fit compiled, scale mixture, kl=mc", mix, "mc", "weights"),
                                     ("fit compiled local_reparam, N(0,1), kl=analytic", gauss, "analytic",
                                      "local_reparam")):
            steps[name] = fit_step(net, x, y, num_data, task, prior, kl, estimator=est, compile=True,
                                   name=f"{key}: {name}")
    return steps


def problem_table(title: str, steps: dict, result: Timings) -> list[str]:
    """One problem's section: ms per step and the ratios to the deterministic and hand-written steps."""
    lines = [
        f"## {title}",
        "",
        "| step | ms/step wall | ms/step cpu | x deterministic (wall) | x deterministic (cpu) "
        "| x hand-written BBB (wall) | x hand-written BBB (cpu) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base, hand = "deterministic", "hand-written torch BBB, N(0,1)"
    for name in steps:
        lines.append(
            f"| {name} | {result.median('wall', name) * 1e3:.2f} | {result.median('cpu', name) * 1e3:.2f} | "
            + " | ".join(f"{result.ratio(clock, name, ref):.2f}" for ref in (base, hand) for clock in CLOCKS)
            + " |"
        )
    lines.append("")
    return lines


def targets_lines(results: dict) -> list[str]:
    """The "Targets" section: each target's ratio by wall and cpu time and whether it is met."""
    lines = [
        "## Targets",
        "",
        "| problem | step | vs | target | ratio (wall) | ratio (cpu) | met |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    names = {"big": "784-400-400-10", "small": "1-50-1"}
    for key, step, ref, target in TARGETS:
        if step not in results[key]["wall"]:
            continue
        r_wall, r_cpu = (results[key].ratio(clock, step, ref) for clock in ("wall", "cpu"))
        both = r_wall <= target and r_cpu <= target
        met = "yes" if both else ("by cpu time only" if r_cpu <= target else
                                  ("by wall time only" if r_wall <= target else "no"))
        lines.append(f"| {names[key]} | {step} | {ref} | <= {target} | {r_wall:.2f} | {r_cpu:.2f} | {met} |")
    lines.append("")
    return lines


def compile_lines() -> list[str]:
    """The one-off compilation times of the compile=True rows; empty when none ran."""
    if not COMPILE_SECONDS:
        return []
    lines = ["One-off compilation (wall time of the first `compile=True` step; an empty compilation "
             "cache unless TORCHINDUCTOR_CACHE_DIR was set; later rows reuse what the first compiled):",
             ""]
    lines += [f"- {name}: {seconds:.1f} s" for name, seconds in COMPILE_SECONDS.items()]
    lines.append("")
    return lines


def run(args) -> str:
    """Times every step on both problems, printing each table as it is done; returns the markdown report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    gauss = dist.Normal(0.0, 1.0)
    mix = bbb.ScaleMixtureNormal(0.5, 1.0, math.exp(-6))
    rounds = 3 if args.quick else args.rounds
    lines = header_lines(args, rounds)
    results = {}
    for key, problem in (("big", big_problem), ("small", small_problem)):
        title, net, x, y, num_data, task = problem()
        pyro.clear_param_store()  # AutoNormal keeps its parameters there, by name
        steps = problem_steps(key, net, x, y, num_data, task, gauss, mix, args.no_compile)
        result = results[key] = measure(steps, rounds=rounds, block=args.block)
        lines += problem_table(title, steps, result)
        print("\n".join(lines[-len(steps) - 5:]), flush=True)
    lines += targets_lines(results)
    lines += compile_lines()
    print("\n".join(lines[-len(TARGETS) - 4 - len(COMPILE_SECONDS) - 2:]), flush=True)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--block", type=int, default=6, help="steps per timed block")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="leave out the fit(compile=True) rows")
    parser.add_argument("--out", type=Path, default=None, help="markdown output (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    # A fresh compilation cache: the compile=True rows report the cold one-off cost.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="pyro_bbb_inductor_"))
    text = run(args)
    if not args.quick:
        name = "train_step.md" if args.threads == 1 else "train_step_default_threads.md"
        out = args.out or RESULTS / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
