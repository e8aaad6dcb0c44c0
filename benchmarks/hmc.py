"""HMC references side by side: bulk ESS of f(x*) per CPU second, and CPU time per gradient.

Problems (``--sets``): UCI ``yacht``, ``bostonHousing`` and ``energy`` (split 0 of the
standard splits, ``pyro_bbb.datasets.load_uci``; data from ``$PYRO_BBB_UCI_ROOT``,
default ``../shared/data/uci``), each with a 50-unit tanh network, N(0, 1) priors on
all weights and biases and a known noise (:data:`UCI_NOISE`, standardised units),
f(x*) read at the split's test inputs; and ``curve``: the 1-50-1 tanh BNN on 100
points of the paper's regression curve (noise 0.1, 20 test inputs on [0, 0.5]).

Samplers, one after another in one process, every one on one thread:

* ``run_hmc``   pyro_bbb's ChEES-HMC (torch; the fused MLP potential);
* ``numpyro``   NumPyro NUTS, ``chain_method="vectorized"`` (default 8 chains);
* ``blackjax``  BlackJAX ChEES-HMC: ``blackjax.chees_adaptation`` as its docstring
  shows it (``warmup.run`` with an ``optax.adam`` optimiser, then ``dynamic_hmc``),
  ``mass_matrix_estimation="diagonal"`` (mass-matrix adaptation on);
* ``pyro``      Pyro NUTS (``run_nuts``, 1 chain; only with ``--samplers ... pyro``).

For each: CPU time of the process (``time.process_time``: warmup, setup and JAX
compilation included), the number of chain-gradients (leapfrog steps summed over
chains, warmup included), CPU time per chain-gradient, bulk ESS (ArviZ,
rank-normalised, across all chains) and max split R-hat of f(x*) -- minimum and
median ESS over the test inputs -- and ESS per CPU second.  Before the samplers, a
potential-only timing: the cost of one value-and-gradient per chain of run_hmc's
fused potential (and the general autograd one) against ``jax.jit(jax.value_and_grad)``
of the same log density in NumPyro (one chain, and vmapped over the NUTS chains).

The markdown goes to ``benchmarks/results/hmc_uci.md`` (``--out``), rewritten after
every leg, with the ratios against the targets (run_hmc >= 2x NumPyro's and >= 1x
BlackJAX's ESS per CPU second; run_hmc's CPU time per chain-gradient <= NumPyro's).

NumPyro, JAX and BlackJAX are only needed here: ``pip install -e ".[bench]"``.
Without them their rows are skipped.

Usage::

    python benchmarks/hmc.py                     # the three UCI sets (~15 CPU min)
    python benchmarks/hmc.py --hmc-max-leapfrog-steps 256   # run_hmc's cap in the committed table
    python benchmarks/hmc.py --quick             # smoke run, tiny budgets, table to $TMPDIR
    python benchmarks/hmc.py --sets curve --samplers run_hmc numpyro pyro --out benchmarks/results/hmc.md
    python benchmarks/hmc.py --hmc 64x200x100    # another run_hmc setting

Numbers are single measurements on a shared machine; the ratios are meaningful only
between rows of one run (CPU time, not wall time, so that other work on the machine
costs less of the comparison).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
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
from pyro_bbb.hmc import run_hmc, run_nuts  # noqa: E402
from pyro_bbb.hmc.diagnostics import f_diagnostics  # noqa: E402
from pyro_bbb.hmc.potential import MLPPotential, Potential, batched_potential  # noqa: E402
from pyro_bbb.predict import batched_outputs  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: E402

HIDDEN = 50
#: Known observation noise on the UCI sets, in units of the standardised target
#: (the published RMSEs are 0.05-0.35 of the target's std on these three sets).
UCI_NOISE = 0.25
UCI_SETS = ("yacht", "bostonHousing", "energy")
CURVE_NOISE, CURVE_DATA, CURVE_TEST = 0.1, 100, 20
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "hmc_uci.md"


# ----------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------
@dataclass
class Problem:
    name: str
    model: object
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    noise: float
    description: str


def problem(name: str) -> Problem:
    """The model and data of one set (torch tensors, float32)."""
    if name == "curve":
        x, y = bbb.datasets.regression_curve(CURVE_DATA, seed=0)
        x_test = torch.linspace(0.0, 0.5, CURVE_TEST)[:, None]
        noise = CURVE_NOISE
        text = f"regression curve, {CURVE_DATA} points, f(x*) at {CURVE_TEST} inputs on [0, 0.5]"
    else:
        root = os.environ.get("PYRO_BBB_UCI_ROOT", str(REPO.parent / "shared" / "data" / "uci"))
        data = bbb.datasets.load_uci(name, split=0, root=root)
        x, y, x_test, noise = data.x_train, data.y_train, data.x_test, UCI_NOISE
        text = f"UCI {name} split 0, {x.shape[0]} x {x.shape[1]} train, f(x*) at {x_test.shape[0]} test inputs"
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)
    )
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=noise)
    text += f"; 1 hidden layer of {HIDDEN} tanh units, N(0, 1) priors, noise {noise}"
    return Problem(name, model, x, y, x_test, noise, text)


def ess_of(f: np.ndarray) -> np.ndarray:
    """Bulk ESS of f with shape (chains, draws, m), per test input."""
    return f_diagnostics(np.asarray(f, dtype=np.float64), 0)["ess_bulk_f"]


def rhat_of(f: np.ndarray) -> float:
    """Max R-hat of f with shape (chains, draws, m) over the test inputs."""
    if f.shape[0] < 2:
        return float("nan")
    return f_diagnostics(np.asarray(f, dtype=np.float64), 0)["max_rhat_f"]


# ----------------------------------------------------------------------------
# The same model in JAX (NumPyro and BlackJAX)
# ----------------------------------------------------------------------------
def jax_model(prob: Problem):
    """(numpyro model, flat log density, net(params, x), number of weights) in JAX."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist

    d = prob.x.shape[1]
    shapes = {"w1": (HIDDEN, d), "b1": (HIDDEN,), "w2": (1, HIDDEN), "b2": (1,)}
    sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
    xs, ys = jnp.asarray(prob.x.numpy()), jnp.asarray(prob.y.numpy())

    def net(params, xin):
        h = jnp.tanh(xin @ params["w1"].T + params["b1"])
        return (h @ params["w2"].T + params["b2"])[..., 0]

    def bnn(xin, yobs=None):
        params = {k: numpyro.sample(k, ndist.Normal(0.0, 1.0).expand(list(s)).to_event(len(s)))
                  for k, s in shapes.items()}
        with numpyro.plate("data", xin.shape[0]):
            numpyro.sample("y", ndist.Normal(net(params, xin), prob.noise), obs=yobs)

    def unflatten(w):
        out, start = {}, 0
        for k, s in shapes.items():
            out[k] = w[start : start + sizes[k]].reshape(s)
            start += sizes[k]
        return out

    def log_density(w):
        f = net(unflatten(w), xs)
        lik = ndist.Normal(f, prob.noise).log_prob(ys).sum()
        return lik + ndist.Normal(0.0, 1.0).log_prob(w).sum()

    return bnn, log_density, net, unflatten, sum(sizes.values())


# ----------------------------------------------------------------------------
# Potential-only timing: CPU time of one value and gradient per chain
# ----------------------------------------------------------------------------
def _cpu_per_call(fn, calls: int, rounds: int = 5) -> float:
    """Median over rounds of CPU seconds per call (the machine's load drifts)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - start) / calls)
    return float(np.median(times))


def gradient_timing(prob: Problem, args) -> dict:
    """Microseconds per chain-gradient: run_hmc's fused and general potentials (for the
    first run_hmc setting's chains), NumPyro's log density under jitted value_and_grad
    for one chain and vmapped over the NUTS chains."""
    out = {}
    x, y = prob.x, prob.y
    chains = args.hmc[0][0]
    with pyro.validation_enabled(False):
        fused, general = batched_potential(prob.model, x, y), Potential(prob.model, x, y)
        u = 0.5 * torch.randn(chains, fused.dim, generator=torch.Generator().manual_seed(0))
        out["fused"] = 1e6 * _cpu_per_call(lambda: fused.value_and_grad(u), args.timing_calls) / chains
        out["general"] = 1e6 * _cpu_per_call(lambda: general.value_and_grad(u), args.timing_calls) / chains
    out["fused_kind"] = type(fused).__name__
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return out
    _, log_density, _, _, _ = jax_model(prob)
    grad1 = jax.jit(jax.value_and_grad(lambda w: -log_density(w)))
    gradv = jax.jit(jax.vmap(jax.value_and_grad(lambda w: -log_density(w))))
    w = jnp.asarray(u.numpy()[: args.numpyro_chains])
    out["jax_1"] = 1e6 * _cpu_per_call(lambda: jax.block_until_ready(grad1(w[0])), args.timing_calls)
    out["jax_vmap"] = 1e6 * _cpu_per_call(
        lambda: jax.block_until_ready(gradv(w)), args.timing_calls) / w.shape[0]
    return out


# ----------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def counting_gradients():
    """Counts chain-gradients (rows of ``u``) of every pyro_bbb potential while open."""
    count = [0]
    originals = {cls: cls.value_and_grad for cls in (Potential, MLPPotential)}

    def wrap(original):
        def counted(self, u):
            count[0] += u.shape[0] if u.dim() > 1 else 1
            return original(self, u)
        return counted

    for cls, original in originals.items():
        cls.value_and_grad = wrap(original)
    try:
        yield count
    finally:
        for cls, original in originals.items():
            cls.value_and_grad = original


def bench_run_hmc(prob: Problem, args, chains, warmup, samples):
    start = time.process_time()
    with counting_gradients() as count:
        ref = run_hmc(
            prob.model, prob.x, prob.y,
            num_chains=chains, num_samples=samples, warmup_steps=warmup,
            x_test=prob.x_test, seed=args.seed, progress=args.progress,
            max_leapfrog_steps=args.hmc_max_leapfrog_steps, **args.hmc_options,
        )
    cpu = time.process_time() - start
    f = batched_outputs(prob.model, ref.flat_samples(), prob.x_test)
    f = f.reshape(ref.num_chains, ref.num_samples, -1).cpu().numpy()
    nested = ref.diagnostics.get("max_nested_rhat_f", float("nan"))
    return {
        "sampler": "pyro_bbb run_hmc (ChEES-HMC)",
        "settings": (
            f"{chains} chains x ({warmup} warmup + {samples} draws), max_leapfrog_steps "
            f"{args.hmc_max_leapfrog_steps}" + "".join(f", {k}={v!r}" for k, v in args.hmc_options.items())
            + f"; step {ref.adaptation['step_size']:.2g}, T {ref.adaptation['trajectory_length']:.2g} "
            f"(mean {ref.sample_stats['n_steps'].mean():.0f} steps/draw); nested R-hat {nested:.3f}"
        ),
        "cpu": cpu, "gradients": count[0], "f": f, "divergences": ref.num_divergences(),
    }


def _hmc_config(text: str) -> tuple[int, int, int]:
    try:
        chains, warmup, samples = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected CHAINSxWARMUPxSAMPLES, got {text!r}") from err
    return chains, warmup, samples


def bench_numpyro(prob: Problem, args):
    import jax
    import jax.numpy as jnp
    from numpyro.infer import MCMC, NUTS

    bnn, _, net, _, _ = jax_model(prob)
    xs, ys = jnp.asarray(prob.x.numpy()), jnp.asarray(prob.y.numpy())
    chains = args.numpyro_chains
    start = time.process_time()
    kernel = NUTS(bnn, max_tree_depth=args.numpyro_max_tree_depth, target_accept_prob=0.8)
    mcmc = MCMC(kernel, num_warmup=args.nuts_warmup, num_samples=args.nuts_samples,
                num_chains=chains, chain_method="vectorized", progress_bar=args.progress)
    mcmc.warmup(jax.random.PRNGKey(args.seed), xs, ys, collect_warmup=True,
                extra_fields=("num_steps",))
    warm_steps = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
    mcmc.run(mcmc.post_warmup_state.rng_key, xs, ys, extra_fields=("num_steps", "diverging"))
    samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    cpu = time.process_time() - start
    extra = mcmc.get_extra_fields(group_by_chain=True)
    num_steps = np.asarray(extra["num_steps"])
    xt = jnp.asarray(prob.x_test.numpy())
    f = np.asarray(jax.vmap(jax.vmap(lambda p: net(p, xt)))(samples))
    return {
        "sampler": f"NumPyro NUTS ({chains} vectorized chains)",
        "settings": (
            f"{chains} chains x ({args.nuts_warmup} warmup + {args.nuts_samples} draws), "
            f"chain_method='vectorized', max_tree_depth {args.numpyro_max_tree_depth}; "
            f"mean {num_steps.mean():.0f} steps/draw"
        ),
        "cpu": cpu, "gradients": warm_steps + int(num_steps.sum()), "f": f,
        "divergences": int(np.asarray(extra["diverging"]).sum()),
    }


def bench_blackjax(prob: Problem, args):
    import blackjax
    import jax
    import jax.numpy as jnp
    import optax

    _, log_density, net, unflatten, dim = jax_model(prob)
    chains, warmup, samples = args.blackjax
    key_init, key_warm, key_sample = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    start = time.process_time()
    positions = jax.random.normal(key_init, (chains, dim))  # prior draws, as run_hmc's
    adaptation = blackjax.chees_adaptation(
        log_density, chains, mass_matrix_estimation="diagonal",
        max_leapfrog_steps=args.max_leapfrog_steps,
    )
    (state, parameters), warm_info = adaptation.run(
        key_warm, positions, args.blackjax_step_size, optax.adam(args.blackjax_learning_rate), warmup,
    )
    kernel = jax.vmap(blackjax.dynamic_hmc(log_density, **parameters).step)

    @jax.jit
    def sample(state, key):
        def one(state, key):
            state, info = kernel(jax.random.split(key, chains), state)
            return state, (state.position, info.num_integration_steps, info.is_divergent)
        return jax.lax.scan(one, state, jax.random.split(key, samples))

    _, (draws, steps, divergent) = sample(state, key_sample)
    draws = jax.block_until_ready(draws)  # (samples, chains, dim)
    cpu = time.process_time() - start
    warm_steps = int(np.asarray(warm_info.info.num_integration_steps).sum())
    xt = jnp.asarray(prob.x_test.numpy())
    f = np.asarray(jax.vmap(jax.vmap(lambda w: net(unflatten(w), xt)))(draws)).transpose(1, 0, 2)
    step_size = float(np.asarray(parameters["step_size"]))
    return {
        "sampler": "BlackJAX ChEES-HMC",
        "settings": (
            f"{chains} chains x ({warmup} warmup + {samples} draws), chees_adaptation "
            f"(mass_matrix_estimation='diagonal', optax.adam({args.blackjax_learning_rate}), "
            f"initial step {args.blackjax_step_size}); step {step_size:.2g}, "
            f"mean {np.asarray(steps).mean():.0f} steps/draw"
        ),
        "cpu": cpu, "gradients": warm_steps + int(np.asarray(steps).sum()), "f": f,
        "divergences": int(np.asarray(divergent).sum()),
    }


def bench_pyro_nuts(prob: Problem, args):
    start = time.process_time()
    ref = run_nuts(
        prob.model, prob.x, prob.y,
        num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup, num_chains=1,
        jit_compile=True, seed=args.seed, progress=args.progress,
    )
    cpu = time.process_time() - start
    f = batched_outputs(prob.model, ref.flat_samples(), prob.x_test)
    f = f.reshape(ref.num_chains, ref.num_samples, -1).cpu().numpy()
    return {
        "sampler": "Pyro NUTS (run_nuts)",
        "settings": f"1 chain x ({args.nuts_warmup} warmup + {args.nuts_samples} draws)",
        "cpu": cpu, "gradients": None, "f": f, "divergences": ref.num_divergences(),
    }


SAMPLERS = {"numpyro": bench_numpyro, "blackjax": bench_blackjax, "pyro": bench_pyro_nuts}
PEER_MODULES = {"numpyro": ("jax", "numpyro"), "blackjax": ("jax", "blackjax", "optax")}


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
           "arviz": az.__version__}
    for name in ("jax", "numpyro", "blackjax"):
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


def _rate(row, stat=np.min) -> float:
    return float(stat(row["ess"]) / row["cpu"])


def _per_gradient(row) -> float:
    return 1e6 * row["cpu"] / row["gradients"] if row.get("gradients") else float("nan")


def _ratio_text(value: float, target: float, higher_is_better: bool = True) -> str:
    if not np.isfinite(value):
        return "n/a"
    met = value >= target if higher_is_better else value <= target
    return f"{value:.3g}x ({'met' if met else 'NOT met'})"


def timing_table(timings: dict) -> list[str]:
    lines = [
        "## Potential only: CPU time of one value and gradient, per chain",
        "",
        "Median of 5 rounds; u ~ N(0, 0.5^2) in every coordinate.  run_hmc's fused potential "
        "(`hmc.potential.MLPPotential`) and the general one (`hmc.potential.Potential`, autograd) for "
        "the run_hmc row's number of chains; NumPyro's log density under "
        "`jax.jit(jax.value_and_grad)`, for one chain and `vmap`-ed over the NUTS chains "
        "(what `chain_method='vectorized'` evaluates).",
        "",
        "| set | fused (us) | general (us) | JAX 1 chain (us) | JAX vmap (us per chain) | "
        "fused / JAX 1 chain | fused / JAX vmap |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in timings.items():
        j1, jv = t.get("jax_1", float("nan")), t.get("jax_vmap", float("nan"))
        lines.append(
            f"| {name} | {t['fused']:.1f} | {t['general']:.1f} | {j1:.1f} | {jv:.1f} | "
            f"{t['fused'] / j1:.2f} | {t['fused'] / jv:.2f} |"
        )
    return lines + [""]


def sampler_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Samplers: bulk ESS of f(x*) per CPU second",
        "",
        "| set | sampler | settings | CPU (s) | chain-gradients | CPU per chain-gradient (us) | "
        "ESS min | ESS median | ESS/CPU-s min | ESS/CPU-s median | max R-hat f | divergences |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        grads = f"{r['gradients']:,}" if r.get("gradients") else "n/a"
        lines.append(
            f"| {r['set']} | {r['sampler']} | {r['settings']} | {r['cpu']:.1f} | {grads} | "
            f"{_per_gradient(r):.1f} | {np.min(r['ess']):.0f} | {np.median(r['ess']):.0f} | "
            f"{_rate(r):.2f} | {_rate(r, np.median):.2f} | {_fmt_rhat(r['rhat'])} | {r['divergences']} |"
        )
    return lines + [""]


def target_table(rows: list[dict], timings: dict) -> list[str]:
    lines = [
        "## Targets",
        "",
        "Ratios of run_hmc's row (the first run_hmc setting) to the peers' rows of the same set; "
        "ESS per CPU second on the minimum (and median) bulk ESS over the test inputs.",
        "",
        "| set | ESS/CPU-s vs NumPyro (min; median), target >= 2x | ESS/CPU-s vs BlackJAX (min; "
        "median), target >= 1x | CPU per chain-gradient vs NumPyro, target <= 1x (whole run; "
        "potential only vs JAX vmap) |",
        "|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = next((r for r in rows if r["set"] == name and r["sampler"].startswith("pyro_bbb")), None)
        if mine is None:
            continue
        peers = {key: next((r for r in rows if r["set"] == name and r["sampler"].startswith(label)), None)
                 for key, label in (("numpyro", "NumPyro"), ("blackjax", "BlackJAX"))}
        cells = []
        for key, target in (("numpyro", 2.0), ("blackjax", 1.0)):
            peer = peers[key]
            if peer is None:
                cells.append("n/a")
                continue
            cells.append(f"{_ratio_text(_rate(mine) / _rate(peer), target)}; "
                         f"{_rate(mine, np.median) / _rate(peer, np.median):.2f}x")
        peer = peers["numpyro"]
        whole = _per_gradient(mine) / _per_gradient(peer) if peer is not None else float("nan")
        t = timings.get(name, {})
        alone = t.get("fused", float("nan")) / t.get("jax_vmap", float("nan"))
        cells.append(f"{_ratio_text(whole, 1.0, higher_is_better=False)}; "
                     f"{_ratio_text(alone, 1.0, higher_is_better=False)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _fmt_rhat(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) and value < 100 else f"{value:.3g}"


def markdown(problems, timings, rows, args, command) -> str:
    lines = [
        "# HMC references on UCI regression: ESS of f(x*) per CPU second",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs (shared with other work), "
        f"{platform.system()} {platform.machine()}; every sampler on 1 thread "
        "(`torch.set_num_threads(1)`, XLA single-threaded via `XLA_FLAGS`).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".",
        "",
        f"Command: `{command}`",
        "",
        "Problems: " + "; ".join(f"**{p.name}**: {p.description}" for p in problems) + ".",
        "",
        "CPU time is the process's (`time.process_time`), setup, warmup and JAX compilation "
        "included; chain-gradients are leapfrog steps summed over chains, warmup included "
        "(NumPyro: the trees' steps of each chain; vectorized chains wait for the longest tree, "
        "so the work done is larger than the count).  ESS is ArviZ's bulk ESS across all chains "
        "of the run.",
        "",
        *timing_table(timings),
        *(sampler_table(rows) + target_table(rows, timings) if rows else []),
        *args.notes,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny budgets")
    parser.add_argument("--sets", nargs="+", default=list(UCI_SETS), choices=[*UCI_SETS, "curve"])
    parser.add_argument("--samplers", nargs="*", default=["run_hmc", "numpyro", "blackjax"],
                        choices=["run_hmc", "numpyro", "blackjax", "pyro"],
                        help="samplers to run; none (a bare --samplers): the potential timing only")
    parser.add_argument("--hmc", type=_hmc_config, action="append", metavar="CxWxS",
                        help="a run_hmc setting: chains x warmup x draws (repeatable; default 64x200x100: on the curve 64 chains gave 1.15x the ESS per CPU second of 32, 1.36x that of 128; benchmarks/results/hmc_chains_curve.md)")
    parser.add_argument("--blackjax", type=_hmc_config, default=(32, 400, 200), metavar="CxWxS",
                        help="BlackJAX ChEES chains x warmup x draws (default 32x400x200)")
    parser.add_argument("--blackjax-learning-rate", type=float, default=0.025,
                        help="Adam's rate on log T (0.025: TFP's and the ChEES paper's)")
    parser.add_argument("--blackjax-step-size", type=float, default=0.01)
    parser.add_argument("--max-leapfrog-steps", type=int, default=1000, help="BlackJAX's cap")
    parser.add_argument("--hmc-max-leapfrog-steps", type=int, default=1000, help="run_hmc's cap")
    parser.add_argument("--hmc-init", choices=["prior", "map"], default=None,
                        help="run_hmc's init (default: run_hmc's own)")
    parser.add_argument("--numpyro-chains", type=int, default=8)
    parser.add_argument("--numpyro-max-tree-depth", type=int, default=10)
    parser.add_argument("--nuts-warmup", type=int, default=200)
    parser.add_argument("--nuts-samples", type=int, default=200)
    parser.add_argument("--timing-calls", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    args = parser.parse_args(argv)
    if args.hmc is None:
        args.hmc = [(64, 200, 100)]
    if args.quick:
        args.sets = args.sets[:1]
        args.hmc = [(4, 10, 10)]
        args.blackjax = (4, 10, 10)
        args.numpyro_chains, args.numpyro_max_tree_depth = 2, 3
        args.nuts_warmup = args.nuts_samples = 10
        args.max_leapfrog_steps = args.hmc_max_leapfrog_steps = 16
        args.timing_calls = 2
        if args.out == DEFAULT_OUT:  # never over the real table
            args.out = Path(tempfile.gettempdir()) / "pyro_bbb_hmc_quick.md"
    args.notes = list(args.note)
    args.hmc_options = {} if args.hmc_init is None else {"init": args.hmc_init}
    torch.set_num_threads(1)
    command = "python benchmarks/hmc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    samplers = []
    for name in args.samplers:
        missing = [m for m in PEER_MODULES.get(name, ()) if not _importable(m)]
        if missing:
            print(f"{name} skipped: {', '.join(missing)} not installed", file=sys.stderr)
        else:
            samplers.append(name)

    def log(text):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def write():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(problems, timings, rows, args, command))

    problems = [problem(name) for name in args.sets]
    timings, rows = {}, []
    for prob in problems:  # the per-gradient ratio first: it is known in seconds
        timings[prob.name] = gradient_timing(prob, args)
        log(f"{prob.name} potential: " + ", ".join(
            f"{k} {v:.1f} us" for k, v in timings[prob.name].items() if isinstance(v, float)))
        write()
    for prob in problems:
        legs = [(f"run_hmc {c}x{w}x{n}", lambda p, a, c=c, w=w, n=n: bench_run_hmc(p, a, c, w, n))
                for c, w, n in args.hmc] if "run_hmc" in samplers else []
        legs += [(name, SAMPLERS[name]) for name in samplers if name != "run_hmc"]
        for name, fn in legs:
            log(f"{prob.name}: {name} ...")
            row = fn(prob, args)
            row["set"] = prob.name
            row["ess"], row["rhat"] = ess_of(row["f"]), rhat_of(row["f"])
            log(f"{prob.name}: {name}: {row['cpu']:.1f} CPU s, {_per_gradient(row):.1f} us/chain-grad, "
                f"ESS min/median {np.min(row['ess']):.0f}/{np.median(row['ess']):.0f}, "
                f"R-hat {row['rhat']:.3f}")
            rows.append(row)
            write()  # after every leg
    print(markdown(problems, timings, rows, args, command))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()
