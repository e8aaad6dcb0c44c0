"""HMC references side by side: bulk ESS of f(x*) per second of wall time.

The issue's setting: a 1-50-1 tanh BNN, N(0, 1) priors on all weights and biases,
known noise 0.1, 100 points of the paper's regression curve
(``pyro_bbb.datasets.regression_curve(100)``), one CPU thread.  Three samplers on
the same data, in one process, one after another:

* ``pyro_bbb.run_hmc``   ChEES-HMC, many chains in lockstep (torch);
* ``pyro_bbb.run_nuts``  Pyro's NUTS, 1 chain (``jit_compile=True`` is asked for;
  ``torch.jit.trace`` fails on this model's vmapped forward, and ``run_nuts`` then
  runs without it, which the table says);
* NumPyro NUTS           1 chain (JAX; compilation included).

For each: wall time (warmup, compilation and setup included), leapfrog steps, and
the bulk ESS (ArviZ, rank-normalised, across all chains) of the network output
f(x*) at 20 test inputs spread over the data range [0, 0.5] -- minimum and median
over the 20 inputs -- per second.  The markdown table goes to
``benchmarks/results/hmc.md`` (``--out``).

NumPyro and JAX are only needed here: ``pip install -e ".[bench]"`` (never a
runtime dependency of pyro_bbb).  Without them the NumPyro row is skipped.

Usage::

    python benchmarks/hmc.py                  # the full run (~30-40 min on 2 shared cores)
    python benchmarks/hmc.py --quick          # smoke run, tiny budgets, table to $TMPDIR
    python benchmarks/hmc.py --hmc 64x200x100 --hmc 32x150x200   # run_hmc settings
    python benchmarks/hmc.py --pyro-max-tree-depth 8   # a reduced (stated) Pyro budget
    python benchmarks/hmc.py --skip pyro      # leave a sampler out

Numbers are single measurements on a shared machine; repeat them before drawing
fine conclusions.  The ratios are meaningful only between rows of one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

# One thread everywhere, set before torch / JAX start their thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

import pyro_bbb as bbb  # noqa: E402
from pyro_bbb.fast_hmc import run_hmc  # noqa: E402
from pyro_bbb.hmc import run_nuts  # noqa: E402
from pyro_bbb.predict import batched_outputs  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: E402

HIDDEN = 50
NOISE = 0.1
NUM_DATA = 100
NUM_TEST = 20
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# Problem
# ----------------------------------------------------------------------------
def problem():
    x, y = bbb.datasets.regression_curve(NUM_DATA, seed=0)
    x_test = torch.linspace(0.0, 0.5, NUM_TEST)[:, None]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=NOISE)
    return model, x, y, x_test


def ess_of(f: np.ndarray) -> np.ndarray:
    """Bulk ESS of f with shape (chains, draws, m), per test input."""
    data = az.convert_to_dataset({"f": np.asarray(f, dtype=np.float64)})
    return np.asarray(az.ess(data, method="bulk")["f"].values)


def rhat_of(f: np.ndarray) -> float:
    if f.shape[0] < 2:
        return float("nan")
    data = az.convert_to_dataset({"f": np.asarray(f, dtype=np.float64)})
    return float(np.nanmax(az.rhat(data)["f"].values))


def f_of_reference(model, ref, x_test) -> np.ndarray:
    draws = ref.flat_samples()
    f = batched_outputs(model, draws, x_test)
    return f.reshape(ref.num_chains, ref.num_samples, -1).cpu().numpy()


# ----------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------
def bench_run_hmc(model, x, y, x_test, args, chains, warmup, samples):
    ref = run_hmc(
        model, x, y,
        num_chains=chains, num_samples=samples, warmup_steps=warmup,
        x_test=x_test, seed=args.seed, progress=args.progress,
    )
    f = f_of_reference(model, ref, x_test)
    return {
        "sampler": "pyro_bbb run_hmc (ChEES-HMC)",
        "settings": (
            f"{chains} chains x ({warmup} warmup + {samples} draws); "
            f"step {ref.adaptation['step_size']:.2g}, T {ref.adaptation['trajectory_length']:.2g} "
            f"(mean {ref.sample_stats['n_steps'].mean():.0f} steps/draw); "
            f"nested R-hat {ref.diagnostics.get('max_nested_rhat_f', float('nan')):.3f}"
        ),
        "wall": ref.wall_time,
        "f": f,
        "divergences": ref.num_divergences(),
    }


def _hmc_config(text: str) -> tuple[int, int, int]:
    try:
        chains, warmup, samples = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected CHAINSxWARMUPxSAMPLES, got {text!r}") from err
    return chains, warmup, samples


def bench_pyro_nuts(model, x, y, x_test, args):
    ref = run_nuts(
        model, x, y,
        num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup, num_chains=1,
        max_tree_depth=args.pyro_max_tree_depth, jit_compile=True, seed=args.seed,
        progress=args.progress,
    )
    f = f_of_reference(model, ref, x_test)
    return {
        "sampler": "Pyro NUTS (run_nuts, jit_compile=True)",
        "settings": (
            f"1 chain x ({args.nuts_warmup} warmup + {args.nuts_samples} draws), "
            f"max_tree_depth {args.pyro_max_tree_depth}"
            + (" (JIT failed: ran without)" if ref.settings.get("jit_fallback") else "")
            + f"; step {np.median(ref.sample_stats['step_size']):.2g}, "
            f"mean {ref.sample_stats['n_steps'].mean():.0f} steps/draw"
        ),
        "wall": ref.wall_time,
        "f": f,
        "divergences": ref.num_divergences(),
    }


def bench_numpyro(model, x, y, x_test, args):
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.infer import MCMC, NUTS
    except ImportError as err:  # the optional `bench` extra is not installed
        print(f"NumPyro row skipped: {err}", file=sys.stderr)
        return None
    numpyro.set_platform("cpu")
    xs = jnp.asarray(x.numpy())
    ys = jnp.asarray(y.numpy())

    def net(params, xin):
        h = jnp.tanh(xin @ params["w1"].T + params["b1"])
        return (h @ params["w2"].T + params["b2"])[..., 0]

    def bnn(xin, yobs=None):
        params = {
            "w1": numpyro.sample("w1", ndist.Normal(0.0, 1.0).expand([HIDDEN, 1]).to_event(2)),
            "b1": numpyro.sample("b1", ndist.Normal(0.0, 1.0).expand([HIDDEN]).to_event(1)),
            "w2": numpyro.sample("w2", ndist.Normal(0.0, 1.0).expand([1, HIDDEN]).to_event(2)),
            "b2": numpyro.sample("b2", ndist.Normal(0.0, 1.0).expand([1]).to_event(1)),
        }
        with numpyro.plate("data", xin.shape[0]):
            numpyro.sample("y", ndist.Normal(net(params, xin), NOISE), obs=yobs)

    kernel = NUTS(bnn, max_tree_depth=10, target_accept_prob=0.8)
    mcmc = MCMC(
        kernel, num_warmup=args.nuts_warmup, num_samples=args.nuts_samples, num_chains=1,
        progress_bar=args.progress,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(args.seed), xs, ys, extra_fields=("num_steps", "diverging"))
    jax.block_until_ready(mcmc.get_samples())
    wall = time.perf_counter() - start
    samples = mcmc.get_samples()
    f = np.asarray(jax.vmap(lambda p: net(p, jnp.asarray(x_test.numpy())))(samples))[None]
    num_steps = np.asarray(mcmc.get_extra_fields()["num_steps"])
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    # A second run on the compiled kernel: the cost without compilation.
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(args.seed + 1), xs, ys)
    jax.block_until_ready(mcmc.get_samples())
    rerun = time.perf_counter() - start
    return {
        "sampler": "NumPyro NUTS",
        "settings": (
            f"1 chain x ({args.nuts_warmup} warmup + {args.nuts_samples} draws), max_tree_depth 10; "
            f"mean {num_steps.mean():.0f} steps/draw; compiled rerun {rerun:.1f} s"
        ),
        "wall": wall,
        "f": f,
        "divergences": divergences,
    }


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
           "arviz": az.__version__}
    for name in ("jax", "numpyro"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fmt_rhat(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) and value < 100 else f"{value:.3g}"


def markdown(rows, args, command) -> str:
    ref = next((r for r in rows if r["sampler"] == "NumPyro NUTS"), None)
    lines = [
        "# HMC references: bulk ESS of f(x*) per second",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs (shared with other work), "
        f"{platform.system()} {platform.machine()}; every sampler on 1 thread "
        "(`torch.set_num_threads(1)`, XLA single-threaded).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".",
        "",
        f"Command: `{command}`",
        "",
        f"Problem: 1-{HIDDEN}-1 tanh BNN, N(0, 1) priors on all weights and biases, known noise "
        f"{NOISE}, {NUM_DATA} points of `regression_curve({NUM_DATA})`; f(x*) at {NUM_TEST} inputs "
        "evenly spaced on [0, 0.5] (the data range).  Wall time includes warmup, setup and "
        "compilation; ESS is ArviZ's bulk ESS across all chains of the run, minimum and median "
        "over the test inputs.",
        "",
        "| sampler | settings | wall (s) | ESS min | ESS median | ESS/s min | ESS/s median | "
        "ESS/s vs NumPyro (min, median) | max R-hat f | divergences |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        ess = r["ess"]
        rate_min, rate_med = np.min(ess) / r["wall"], np.median(ess) / r["wall"]
        if ref is not None:
            ratio = (f"{rate_min / (np.min(ref['ess']) / ref['wall']):.2f}x, "
                     f"{rate_med / (np.median(ref['ess']) / ref['wall']):.2f}x")
        else:
            ratio = "n/a"
        lines.append(
            f"| {r['sampler']} | {r['settings']} | {r['wall']:.1f} | {np.min(ess):.0f} | "
            f"{np.median(ess):.0f} | {rate_min:.2f} | {rate_med:.2f} | {ratio} | "
            f"{_fmt_rhat(r['rhat'])} | {r['divergences']} |"
        )
    lines += ["", *args.notes]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny budgets")
    parser.add_argument("--skip", nargs="*", default=[], choices=["run_hmc", "pyro", "numpyro"])
    parser.add_argument(
        "--hmc", type=_hmc_config, action="append", metavar="CxWxS",
        help="a run_hmc setting: chains x warmup x draws per chain (repeatable; "
        "default 32x150x200 and 64x200x100, run_hmc's defaults)",
    )
    parser.add_argument("--nuts-warmup", type=int, default=200)
    parser.add_argument("--nuts-samples", type=int, default=200)
    parser.add_argument("--pyro-max-tree-depth", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hmc.md")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    args = parser.parse_args(argv)
    if args.hmc is None:
        args.hmc = [(32, 150, 200), (64, 200, 100)]
    if args.quick:
        args.hmc = [(8, 30, 20)]
        args.nuts_warmup, args.nuts_samples, args.pyro_max_tree_depth = 20, 20, 5
        if args.out == REPO / "benchmarks" / "results" / "hmc.md":  # never over the real table
            args.out = Path(tempfile.gettempdir()) / "pyro_bbb_hmc_quick.md"
    args.notes = list(args.note)
    torch.set_num_threads(1)
    command = "python benchmarks/hmc.py " + " ".join(argv if argv is not None else sys.argv[1:])

    model, x, y, x_test = problem()
    rows = []
    legs = [
        *((f"run_hmc {c}x{w}x{n}", partial(bench_run_hmc, chains=c, warmup=w, samples=n))
          for c, w, n in args.hmc),
        ("numpyro", bench_numpyro),
        ("pyro", bench_pyro_nuts),
    ]
    for name, fn in legs:
        if name.split()[0] in args.skip:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        row = fn(model, x, y, x_test, args)
        if row is None:
            continue
        row["ess"] = ess_of(row["f"])
        row["rhat"] = rhat_of(row["f"])
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: {row['wall']:.1f} s, ESS min/median "
            f"{np.min(row['ess']):.0f}/{np.median(row['ess']):.0f}",
            file=sys.stderr, flush=True,
        )
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(rows, args, command))  # written after every leg
    print(markdown(rows, args, command))


if __name__ == "__main__":
    main()
