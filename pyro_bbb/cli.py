"""The ``pyro-bbb`` command.

``pyro-bbb compare`` (the main job) fits Bayes by Backprop and an HMC reference
on the same Pyro model, and writes a report folder: ``report.md``,
``report.html``, ``metrics.json`` and pictures.  With no options it runs on the
paper's regression curve, sized for a 2-core CPU.

The arguments are parsed before torch, Pyro or ArviZ is imported, so ``--help``
and a bad option answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

__all__ = ["main"]


def _number(text, kind, what):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive_int(text):
    value = _number(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text):
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text):
    value = _number(text, float, "a finite number > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _probability(text):
    value = _number(text, float, "a number strictly between 0 and 1")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _noise(text):
    if text == "learned":
        return text
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'learned' or a finite number > 0, got {text!r}") from None


def _hidden(text):
    if text.strip() in ("", "0"):
        return []  # no hidden layer: a linear model, whose weights are identifiable
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 16 or 50,50, got {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


# The names of pyro_bbb.schemes.SCHEMES, listed here so that parsing needs no torch.
METHODS = ("bbb", "bbb-mixture", "diagonal", "lowrank", "fullrank", "flow", "laplace", "ensemble", "dropout")


def _methods(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(METHODS)}, got {text!r}")
    return list(dict.fromkeys(names))  # in order, once each


class _HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: ...)" where there is a default worth saying and the help does not
    already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default" in text:
            return text
        default = action.default
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "0"
        elif isinstance(default, float):
            default = f"{default:.4g}"
        return f"{text} (default: {default})" if text else f"default: {default}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-bbb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    c = sub.add_parser(
        "compare",
        help="fit BBB and an HMC reference on one model; write a report",
        description="Fit Bayes by Backprop and an HMC reference (ChEES-HMC, or Pyro's NUTS) on the "
        "same model and priors, then compare them in function space (and weight space where identifiable).",
        formatter_class=_HelpFormatter,
    )
    d = c.add_argument_group("data")
    d.add_argument("--dataset", default="curve", choices=["curve", "diabetes", "breast_cancer", "uci", "uci-gap"],
                   help="the paper's regression curve, a scikit-learn set, 'uci' (a published split of "
                   "--data-dir) or 'uci-gap' (a gap split of --data-dir, Foong et al. 2019)")
    d.add_argument("--data-dir", type=Path,
                   help="a UCI dataset folder in the standard split layout (data.txt, index_*.txt); "
                   "needed by --dataset uci and uci-gap, no default")
    d.add_argument("--split", type=_nonnegative_int, default=0,
                   help="uci: the published split's index; uci-gap: the input feature (0-based, as in "
                   "index_features.txt) whose middle third of rows, sorted by it, is held out as the test set")
    d.add_argument("--num-data", type=_positive_int, default=100, help="points on the regression curve")
    m = c.add_argument_group("model")
    m.add_argument("--hidden", type=_hidden, default=[16], help="hidden layer sizes, e.g. 16 or 50,50; 0 for none")
    m.add_argument("--activation", default="relu", choices=["relu", "tanh"], help="hidden-layer activation")
    m.add_argument("--prior", default="gaussian", choices=["gaussian", "mixture"],
                   help="N(0, prior-sigma^2) on every weight, or the paper's scale mixture")
    m.add_argument("--prior-sigma", type=_positive_float, default=1.0, help="std of the Gaussian prior")
    m.add_argument("--pi", type=_probability, default=0.5, help="mixture weight of the wide component")
    m.add_argument("--sigma1", type=_positive_float, default=1.0, help="wide component std")
    m.add_argument("--sigma2", type=_positive_float, default=math.exp(-6), help="narrow component std")
    m.add_argument("--noise", type=_noise, default=None,
                   help="regression noise std, or 'learned' (LogNormal(0, 1) prior); "
                   "default 0.1 on the curve, 'learned' on standardized data sets")
    m.add_argument("--methods", type=_methods, default=["bbb"],
                   help="comma-separated schemes to compare with the reference: " + ", ".join(METHODS)
                   + " (default: bbb; bbb-mixture uses the scale-mixture prior, the others the --prior model)")
    b = c.add_argument_group("Bayes by Backprop")
    b.add_argument("--epochs", type=_positive_int, default=1500, help="passes over the training data")
    b.add_argument("--lr", type=_positive_float, default=0.01, help="Adam's learning rate")
    b.add_argument("--batch-size", type=_positive_int, default=None, help="minibatch size (default: full batch)")
    b.add_argument("--particles", type=_positive_int, default=8, help="weight samples per step")
    b.add_argument("--kl", default="analytic", choices=["analytic", "mc"],
                   help="closed-form KL where the prior has one, or the paper's Monte Carlo estimate")
    b.add_argument("--kl-weighting", default="uniform", choices=["uniform", "blundell"],
                   help="KL weight per minibatch: 1/M, or the paper's 2^(M-i)/(2^M-1)")
    b.add_argument("--vi-samples", type=_positive_int, default=1000, help="draws from q for the report")
    h = c.add_argument_group("HMC reference")
    h.add_argument("--reference", default="hmc", choices=["hmc", "nuts"],
                   help="hmc: pyro_bbb's ChEES-HMC, many chains in lockstep; nuts: Pyro's NUTS")
    h.add_argument("--warmup", type=_nonnegative_int, default=None,
                   help="warmup iterations per chain (default: hmc 200, nuts 200)")
    h.add_argument("--samples", type=_positive_int, default=None, help="draws per chain (default: hmc 400, nuts 200)")
    h.add_argument("--chains", type=_positive_int, default=None,
                   help="number of chains (default: hmc 32, in lockstep; nuts 2, one after another)")
    h.add_argument("--max-tree-depth", type=_positive_int, default=7,
                   help="nuts: caps each trajectory at 2^depth - 1 leapfrog steps (~1.5 ms a step)")
    h.add_argument("--max-leapfrog-steps", type=_positive_int, default=500,
                   help="hmc: caps each trajectory's leapfrog steps (the adapted length otherwise runs into it)")
    h.add_argument("--target-accept", type=_probability, default=None, help=f"target acceptance probability (default: hmc {HMC_TARGET_ACCEPT:g}, nuts 0.8)")
    o = c.add_argument_group("run")
    o.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of data, training and sampling")
    o.add_argument("--out", type=Path, default=Path("out"),
                   help="report folder: a new or empty folder, or a report folder pyro-bbb wrote, "
                   "which is replaced atomically; nothing else is ever replaced")
    o.add_argument("--force", action="store_true",
                   help="replace a previous report folder even if files were added to it "
                   "(never a folder pyro-bbb did not write)")
    o.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads; one is fastest for networks this small")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _load(args):
    from . import datasets

    if args.dataset == "curve":
        return datasets.curve(args.num_data, seed=args.seed)
    if args.dataset in ("uci", "uci-gap"):
        if args.data_dir is None:
            raise ValueError(f"--dataset {args.dataset} needs --data-dir (a folder in the standard UCI layout)")
        folder = str(args.data_dir.resolve()) + os.sep  # a path, never a name under PYRO_BBB_UCI_ROOT
        if args.dataset == "uci":
            return datasets.load_uci(folder, split=args.split)
        num = datasets.uci_num_gap_splits(folder)
        if args.split >= num:
            raise ValueError(f"--split {args.split} is out of range for --dataset uci-gap: {args.data_dir} has "
                             f"{num} input features, so --split must be in 0..{num - 1}")
        return datasets.load_uci_gap(folder, feature=args.split)
    return datasets.load_sklearn(args.dataset, seed=args.seed)


def _in_data(args, data):
    """Which test inputs count as in the data: none on a gap split (its test set is the gap);
    elsewhere None, compare's nearest-neighbour rule."""
    if args.dataset == "uci-gap":
        import numpy as np

        return np.zeros(len(data.x_test), dtype=bool)
    return None


def _network(in_features, hidden, out_features, activation):
    import torch

    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation]
    layers, width = [], in_features
    for size in hidden:
        layers += [torch.nn.Linear(width, size), act()]
        width = size
    layers.append(torch.nn.Linear(width, out_features))
    return torch.nn.Sequential(*layers)


def _model(args, data, prior_kind=None):
    """The network, prior and pyro_bbb model the options describe (``prior_kind`` overrides
    --prior); and the prior in words.  The network's initial weights come from --seed."""
    import pyro.distributions as dist
    import torch

    import pyro_bbb as bbb

    torch.manual_seed(args.seed)
    if (prior_kind or args.prior) == "gaussian":
        prior = dist.Normal(0.0, args.prior_sigma)
        prior_text = f"Gaussian N(0, {args.prior_sigma:g}^2)"
    else:
        prior = bbb.ScaleMixtureNormal(args.pi, args.sigma1, args.sigma2)
        prior_text = f"scale mixture (pi {args.pi:g}, sigma1 {args.sigma1:.3g}, sigma2 {args.sigma2:.3g})"
    if data.task == "classification":
        net = _network(data.x_train.shape[1], args.hidden, data.num_classes, args.activation)
        return bbb.BayesianClassifier(net, prior=prior), net, prior_text
    net = _network(data.x_train.shape[1], args.hidden, 1, args.activation)
    return bbb.BayesianRegressor(net, prior=prior, noise=args.noise), net, prior_text


#: The main job's ChEES target acceptance.  At run_hmc's 0.65 ChEES diverged on the
#: default ReLU curve (7 of 12,800 transitions; 1 at 0.8, none at 0.9), and a reference
#: with divergences fails its check; at 0.9 the step (0.0022) and time are what they
#: were at 0.65 before dual averaging met its target (it overshot to ~0.93).
HMC_TARGET_ACCEPT = 0.9


def _reference_settings(args):
    """Sampler, chains, warmup, draws and target acceptance, with each sampler's defaults."""
    nuts = args.reference == "nuts"
    return {
        "nuts": nuts,
        "name": "Pyro NUTS" if nuts else "ChEES-HMC",
        "num_chains": args.chains or (2 if nuts else 32),
        "warmup_steps": args.warmup if args.warmup is not None else 200,
        "num_samples": args.samples or (200 if nuts else 400),
        "target_accept_prob": args.target_accept or (0.8 if nuts else HMC_TARGET_ACCEPT),
    }


def _run_reference(args, model, data, progress):
    import pyro_bbb as bbb

    ref = _reference_settings(args)
    common = dict(num_samples=ref["num_samples"], warmup_steps=ref["warmup_steps"],
                  num_chains=ref["num_chains"], target_accept_prob=ref["target_accept_prob"],
                  seed=args.seed, progress=progress)
    if ref["nuts"]:
        return bbb.run_nuts(model, data.x_train, data.y_train, max_tree_depth=args.max_tree_depth, **common)
    return bbb.run_hmc(model, data.x_train, data.y_train, x_test=data.x_test,
                       max_leapfrog_steps=args.max_leapfrog_steps, **common)


def run_compare(args, written: list | None = None):
    """Run the main job the options describe; write the report folder; return the comparison.

    ``written`` gets the report folder's path once it is in place."""
    from .report import check_out, write_report

    out = check_out(args.out, args.force)  # a refused --out costs nothing
    import torch

    import pyro_bbb as bbb

    torch.set_num_threads(args.threads)
    data = _load(args)
    if args.noise is None:
        args.noise = 0.1 if args.dataset == "curve" else "learned"
    model, net, prior_text = _model(args, data)
    progress = not args.quiet
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    if args.methods != ["bbb"]:
        report, posteriors = _compare_methods(args, data, model, progress, say)
        settings = _settings(args, data, net, prior_text, None, posteriors.pop("_reference"))
        write_report(out, report, settings, force=args.force, written=written, posteriors=posteriors)
        return report
    say(f"[1/3] Bayes by Backprop: {args.epochs} epochs, {args.particles} particles")
    guide = bbb.BBBGuide(model)
    history = bbb.fit(model, guide, data.x_train, data.y_train, epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, num_particles=args.particles, kl=args.kl,
                      kl_weighting=args.kl_weighting, seed=args.seed, progress=progress)
    if history.interrupted:  # a partly trained posterior is not what the report would claim
        raise KeyboardInterrupt(f"during Bayes by Backprop (epoch {len(history)} of {args.epochs})")

    ref = _reference_settings(args)
    say(f"[2/3] HMC reference: {ref['name']}, {ref['num_chains']} chains x "
        f"({ref['warmup_steps']} warmup + {ref['num_samples']} draws)")
    reference = _run_reference(args, model, data, progress)

    say("[3/3] InferenceData and comparison")
    common = dict(x_test=data.x_test, y_test=data.y_test, seed=args.seed)
    vi = bbb.to_inference_data(model, guide, data.x_train, data.y_train,
                               num_samples=args.vi_samples, history=history, **common)
    hmc = bbb.to_inference_data(model, reference, data.x_train, data.y_train, **common)
    report = bbb.compare(vi, hmc, in_data=_in_data(args, data))
    settings = _settings(args, data, net, prior_text, history, reference)
    write_report(out, report, settings, force=args.force, written=written)
    return report


def _fit_method(name, args, data, model, progress):
    """The posterior of scheme ``name`` on ``model`` (bbb-mixture on the mixture-prior model)."""
    import pyro_bbb as bbb
    from pyro_bbb import schemes

    common = dict(epochs=args.epochs, lr=args.lr, seed=args.seed, progress=progress)
    if name in ("bbb", "bbb-mixture"):
        target = model if name == "bbb" else _model(args, data, "mixture")[0]
        guide = bbb.BBBGuide(target)
        history = bbb.fit(target, guide, data.x_train, data.y_train, batch_size=args.batch_size,
                          num_particles=args.particles, kl=args.kl, kl_weighting=args.kl_weighting, **common)
        if history.interrupted:
            raise KeyboardInterrupt(f"during {name} (epoch {len(history)} of {args.epochs})")
        return target, guide
    if name in ("diagonal", "lowrank", "fullrank", "flow"):
        common["num_particles"] = args.particles
    if name == "laplace":  # a BNN's Hessian at the MAP is rarely positive definite
        return model, _laplace_with_jitter(schemes, model, data, common)
    return model, schemes.fit_scheme(name, model, data.x_train, data.y_train, **common)


def _laplace_with_jitter(schemes, model, data, common):
    """Laplace with the smallest jitter in 0, 1, 10, ..., 1e4 that makes the precision
    H + jitter * I positive definite (the report's settings do not hide it: see the warning)."""
    for jitter in (None, 1.0, 10.0, 100.0, 1e3, 1e4):
        try:
            guide = schemes.laplace(model, data.x_train, data.y_train, jitter=jitter, **common)
        except ValueError as err:
            if "positive definite" not in str(err):
                raise
            continue
        if jitter:
            print(f"pyro-bbb: laplace needed jitter {jitter:g} (precision H + jitter * I)", file=sys.stderr)
        return guide
    raise ValueError("laplace: the precision stayed indefinite up to jitter 1e4; leave laplace out of --methods")


def _compare_methods(args, data, model, progress, say):
    """Every --methods scheme and the reference, in InferenceData, and the fidelity report."""
    import pyro_bbb as bbb

    ref = _reference_settings(args)
    steps = len(args.methods) + 2
    posteriors = {}
    common = dict(x_test=data.x_test, y_test=data.y_test, seed=args.seed)
    for i, name in enumerate(args.methods, 1):
        say(f"[{i}/{steps}] {name}: {args.epochs} steps")
        target, posterior = _fit_method(name, args, data, model, progress)
        posteriors[name] = bbb.to_inference_data(target, posterior, data.x_train, data.y_train,
                                                 num_samples=args.vi_samples, **common)
    say(f"[{steps - 1}/{steps}] HMC reference: {ref['name']}, {ref['num_chains']} chains x "
        f"({ref['warmup_steps']} warmup + {ref['num_samples']} draws)")
    reference = _run_reference(args, model, data, progress)
    say(f"[{steps}/{steps}] InferenceData and comparison")
    hmc = bbb.to_inference_data(model, reference, data.x_train, data.y_train, **common)
    report = bbb.compare(hmc, dict(posteriors), in_data=_in_data(args, data))
    return report, {**posteriors, "reference": hmc, "_reference": reference}


def _settings(args, data, net, prior_text, history, reference) -> dict:
    """What the report says about the run (JSON-ready)."""
    return {
        "command": "pyro-bbb " + " ".join(sys.argv[1:]) if sys.argv and "pyro-bbb" in sys.argv[0] else None,
        "dataset": data.name + (f" (gap split on input feature {args.split}: every test input counts as away "
                                "from the data)" if args.dataset == "uci-gap" else ""),
        "task": data.task,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "network": f"{data.x_train.shape[1]}-" + "-".join(map(str, args.hidden)) + f"-{net[-1].out_features}"
                   + f" {args.activation}",
        "prior": prior_text,
        "noise": args.noise if data.task == "regression" else None,
        "methods": args.methods,
        "bbb": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "particles": args.particles, "kl": args.kl, "kl_weighting": args.kl_weighting,
                "seconds": round(history.seconds, 2) if history else None,
                "final_elbo": float(history.elbo[-1]) if history else None},
        "reference": {"sampler": reference.sampler, **dict(reference.settings),
                      "seconds": round(reference.wall_time, 2)},
        "seed": args.seed,
        "versions": _versions(),
    }


def _versions():
    import arviz
    import pyro
    import torch

    import pyro_bbb

    return {"pyro_bbb": pyro_bbb.__version__, "torch": torch.__version__, "pyro": pyro.__version__,
            "arviz": arviz.__version__, "python": sys.version.split()[0]}


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    written: list[Path] = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "compare":
            report = run_compare(args, written)
            from .report import headline

            print(f"report: {written[0] / 'report.html'}  ({headline(report)})")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"pyro-bbb: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if written:
            print(f"pyro-bbb: interrupted after the report was written to {written[0]}", file=sys.stderr)
        else:
            reason = f" {stop}" if str(stop) else ""
            print(f"pyro-bbb: interrupted{reason}; no report was written (a previous one is left as it was)",
                  file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
