"""Posterior predictive: pyro_bbb.predict / to_inference_data vs Pyro's Predictive.

1,000 posterior draws x 10,000 inputs on the 1-50-1 regressor, with tanh and with
ReLU hidden units (a guide fitted briefly to the paper's curve).  Timing: every
method in this one process, alternating in rounds, median seconds per call.  Peak
memory: each method once in a fresh subprocess, peak resident set size during the
call (VmHWM, reset just before it) minus the resident size before it, i.e. what the
call itself adds.  A last table repeats the timing at 100 and 1,000 inputs per draw.

    python benchmarks/predict.py                 # one thread, then torch's default count
    python benchmarks/predict.py --threads 1     # one setting only (0: torch's default)
    python benchmarks/predict.py --quick         # a smoke run (100 draws x 1,000 inputs)

Both settings go into one file, benchmarks/results/predict.md.

Methods
-------
- ``pyro_bbb.predict``: draws from q, then one vmapped forward pass per chunk of draws
  (default chunk: 2^14 rows of draws x inputs, i.e. 1 draw of 10,000 inputs: the hidden
  activations of a chunk stay in the CPU's caches), returns f and y draws.
- ``pyro_bbb.to_inference_data`` (x_test = the 10,000 inputs; the 100 training points
  as x, y): the same plus the training set's predictive draws, pointwise
  log-likelihoods, log p and log q per draw, packed into ArviZ groups.
- ``Predictive(parallel=False)``: Pyro's default, a Python loop over draws, each a
  guide and a model trace.
- ``Predictive(parallel=True)``: one vectorized trace over all draws (no chunking:
  memory grows with draws x inputs x hidden units).
- Floors (time only): the network's own arithmetic on weights drawn beforehand in a
  plain torch loop over draws (no Pyro, no y draws), and the hidden activation alone.
  At 10,000 inputs per draw the arithmetic dominates, so loop time / floor time bounds
  the speed-up any implementation can reach on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from torch import nn

import pyro_bbb as bbb

RESULTS = Path(__file__).parent / "results"
DEFAULT_THREADS = torch.get_num_threads()
METHODS = ("pyro_bbb.predict", "pyro_bbb.to_inference_data",
           "Predictive(parallel=False)", "Predictive(parallel=True)")


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def setup(num_draws: int, num_inputs: int, activation: str = "tanh"):
    """The model, a guide fitted briefly to the curve, the training data and test inputs."""
    torch.manual_seed(0)
    x, y = bbb.datasets.regression_curve(100, seed=0)
    net = nn.Sequential(nn.Linear(1, 50), ACTIVATIONS[activation](), nn.Linear(50, 1))
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
    guide = bbb.BBBGuide(model)
    bbb.fit(model, guide, x, y, epochs=200, lr=0.01, progress=False, seed=0)
    x_test = torch.linspace(-0.5, 1.5, num_inputs)[:, None]
    return model, guide, x, y, x_test


def methods(model, guide, x, y, x_test, num_draws):
    to_idata = getattr(bbb, "to_inference_data", None)
    if to_idata is None:
        from pyro_bbb.inference_data import to_inference_data as to_idata
    loop = Predictive(model, guide=guide, num_samples=num_draws, parallel=False)
    vectorized = Predictive(model, guide=guide, num_samples=num_draws, parallel=True)

    def run_predict():
        pred = bbb.predict(model, guide, x_test, num_samples=num_draws)
        return pred.y

    def run_idata():
        return to_idata(model, guide, x, y, x_test=x_test, num_samples=num_draws)

    def run_loop():
        with torch.no_grad():
            return loop(x_test)["y"]

    def run_vectorized():
        with torch.no_grad():
            return vectorized(x_test)["y"]

    return {
        "pyro_bbb.predict": run_predict,
        "pyro_bbb.to_inference_data": run_idata,
        "Predictive(parallel=False)": run_loop,
        "Predictive(parallel=True)": run_vectorized,
    }


def floors(model, guide, x_test, num_draws, activation):
    """Lower bounds on any implementation (time only): the network's own arithmetic on
    weights drawn beforehand, in a plain loop over draws (no Pyro, no y), and the
    hidden activation alone over draws x inputs x 50 units, in place."""
    draws = guide.sample_posterior(num_draws)
    w1, b1, w2, b2 = (draws[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    act = {"tanh": torch.tanh_, "relu": torch.relu_}[activation]

    def forward_loop():
        with torch.no_grad():
            return torch.stack([torch.addmm(b2[i], act(torch.addmm(b1[i], x_test, w1[i].T)), w2[i].T)
                                for i in range(num_draws)])

    def activation_alone():
        h = torch.zeros(x_test.shape[0], w1.shape[1])
        for _ in range(num_draws):
            act(h)

    return {"floor: the network's arithmetic alone, loop over draws": forward_loop,
            "floor: the hidden activation alone": activation_alone}


def check_shapes(fns, num_draws, num_inputs):
    """The methods compute the same thing: y draws of shape (draws, inputs)."""
    for name in ("pyro_bbb.predict", "Predictive(parallel=False)", "Predictive(parallel=True)"):
        shape = tuple(fns[name]().reshape(num_draws, -1).shape)
        assert shape == (num_draws, num_inputs), (name, shape)


def time_methods(fns, rounds: int, skip=()) -> dict[str, float]:
    for name, fn in fns.items():  # warm-up
        if name not in skip:
            fn()
    times = {name: [] for name in fns if name not in skip}
    for _ in range(rounds):
        for name in times:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(args):
    """Subprocess: one call of one method; prints the memory the call added (MiB) and seconds.

    The peak resident size (VmHWM) is reset just before the call (``clear_refs`` 5, Linux),
    so the set-up's own peak (the brief fit) does not hide the call's."""
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    model, guide, x, y, x_test = setup(args.draws, args.inputs, args.activation)
    fn = methods(model, guide, x, y, x_test, args.draws)[args.worker]
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024, "seconds": seconds}))


def peak_memory(args, name, activation, threads) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--threads", str(threads),
           "--draws", str(args.draws), "--inputs", str(args.inputs), "--activation", activation]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def header(args, rounds) -> list[str]:
    return [
        "# Posterior predictive: pyro_bbb vs Pyro's Predictive",
        "",
        f"Command: `{' '.join(['python benchmarks/predict.py'] + sys.argv[1:])}`",
        "",
        f"- machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} logical CPUs "
        f"(shared with other jobs), CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"pyro_bbb {bbb.__version__}",
        "- problem: 1-50-1 BayesianRegressor (N(0,1) prior, noise 0.1) with tanh (as in "
        "benchmarks/train_step.py) and with ReLU (as in the regression-curve test), BBBGuide fitted "
        f"200 epochs to the 100-point regression curve; {args.draws:,} draws x {args.inputs:,} inputs",
        f"- time: all methods in one process, alternating, median of {rounds} calls each (after one "
        "warm-up call); memory: each method called once in a fresh subprocess, peak resident set "
        "size during the call (VmHWM, reset before it) minus the resident size before it",
        "- what each returns: predict: f and y draws; to_inference_data: an ArviZ InferenceData "
        "(posterior, predictive and log-likelihood on the 100 training points, predictions f and y "
        f"at the {args.inputs:,} inputs, lp/log_q); Predictive: y (and weight) draws",
        "",
    ]


def run(args, threads: int) -> str:
    torch.set_num_threads(threads or DEFAULT_THREADS)
    rounds = 2 if args.quick else args.rounds
    label = f"torch threads {torch.get_num_threads()}" + (" (torch's default)" if not threads else "")
    lines = [f"## {label}", ""]
    speedups, bounds = {}, {}
    for activation in ACTIVATIONS:
        model, guide, x, y, x_test = setup(args.draws, args.inputs, activation)
        fns = methods(model, guide, x, y, x_test, args.draws)
        check_shapes(fns, args.draws, args.inputs)
        floor_fns = floors(model, guide, x_test, args.draws, activation)
        seconds = time_methods({**fns, **floor_fns}, rounds)
        memory = {name: peak_memory(args, name, activation, threads) for name in METHODS}
        loop = seconds["Predictive(parallel=False)"]
        speedups[activation, "pyro_bbb.predict"] = loop / seconds["pyro_bbb.predict"]
        speedups[activation, "pyro_bbb.to_inference_data"] = loop / seconds["pyro_bbb.to_inference_data"]
        lines += [
            f"### 1-50-1 {activation}, {args.draws:,} draws x {args.inputs:,} inputs, {label}",
            "",
            "| method | seconds | x faster than Predictive(parallel=False) | peak memory added (MiB) |",
            "|---|---:|---:|---:|",
        ]
        for name in METHODS:
            lines.append(f"| {name} | {seconds[name]:.3f} | {loop / seconds[name]:.1f} "
                         f"| {memory[name]['peak_mib']:.0f} |")
        for name in floor_fns:
            lines.append(f"| {name} | {seconds[name]:.3f} | {loop / seconds[name]:.1f} | - |")
        floor = seconds["floor: the network's arithmetic alone, loop over draws"]
        bounds[activation] = loop / floor
        lines += ["", f"The network's own arithmetic, in a plain torch loop over weights drawn beforehand, "
                  f"takes {floor:.3f} s, {loop / floor:.1f}x less than Pyro's loop: at this size that is "
                  "about all any implementation can gain on this machine (with one thread; several threads "
                  "split a batched call better than a loop of small ones).", ""]
        print("\n".join(lines[-len(METHODS) - len(floor_fns) - 7:]), flush=True)
    # Where the per-draw overhead of the loop stops dominating: fewer inputs per draw.
    sweep = [n for n in (100, 1000) if n < args.inputs]
    if sweep:
        lines += [
            f"### The same at fewer inputs per draw ({args.draws:,} draws, tanh; time only), {label}",
            "",
            "| inputs | predict (s) | Predictive(parallel=False) (s) | Predictive(parallel=True) (s) "
            "| predict x faster than the loop |",
            "|---:|---:|---:|---:|---:|",
        ]
        for n in sweep:
            model, guide, x, y, x_test = setup(args.draws, n, "tanh")
            fns = methods(model, guide, x, y, x_test, args.draws)
            sec = time_methods(fns, rounds, skip=("pyro_bbb.to_inference_data",))
            lines.append(f"| {n:,} | {sec['pyro_bbb.predict']:.3f} | {sec['Predictive(parallel=False)']:.3f} "
                         f"| {sec['Predictive(parallel=True)']:.3f} "
                         f"| {sec['Predictive(parallel=False)'] / sec['pyro_bbb.predict']:.1f} |")
        lines.append("")
    lines += [
        f"### Target, {label}",
        "",
        "| target | net | measured | met | loop / arithmetic alone |",
        "|---|---|---:|---|---:|",
    ]
    for (activation, variant), speedup in speedups.items():
        lines.append(f"| {variant} >= 20x faster than Predictive(parallel=False), "
                     f"{args.draws:,} x {args.inputs:,} | 1-50-1 {activation} | {speedup:.1f}x "
                     f"| {'yes' if speedup >= 20 else 'no'} | {bounds[activation]:.1f}x |")
    lines.append("")
    text = "\n".join(lines) + "\n"
    print("\n".join(lines[-len(speedups) - 5:]), flush=True)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (0: torch's default); default: 1, then torch's default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--inputs", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--activation", choices=list(ACTIVATIONS), default="tanh", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="markdown output (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    args.draws = args.draws or (100 if args.quick else 1000)
    args.inputs = args.inputs or (1000 if args.quick else 10_000)
    if args.worker:
        worker(args)
        return
    settings = [1, 0] if args.threads is None else [args.threads]
    sections = [run(args, threads) for threads in settings]
    text = "\n".join(header(args, 2 if args.quick else args.rounds)) + "\n" + "\n".join(sections)
    if not args.quick:
        out = args.out or RESULTS / "predict.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
