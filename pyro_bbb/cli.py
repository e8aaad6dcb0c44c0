"""The ``pyro-bbb`` command.

``pyro-bbb compare`` (the main job) fits Bayes by Backprop and an HMC reference
on the same Pyro model, and writes a report folder: ``report.md``,
``report.html``, ``metrics.json`` and pictures.  With no options it runs on the
paper's regression curve, sized for a 2-core CPU.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _probability(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _noise(text):
    return text if text == "learned" else _positive_float(text)


def _hidden(text):
    if text.strip() in ("", "0"):
        return []  # no hidden layer: a linear model, whose weights are identifiable
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 16 or 50,50, got {text!r}")
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-bbb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compare",
        help="fit BBB and an HMC reference on one model; write a report",
        description="Fit Bayes by Backprop and an HMC reference (ChEES-HMC, or Pyro's NUTS) on the "
        "same model and priors, then compare them in function space (and weight space where identifiable).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = c.add_argument_group("data")
    d.add_argument("--dataset", default="curve", choices=["curve", "diabetes", "breast_cancer", "uci"],
                   help="'uci' reads --data-dir in the standard UCI split layout")
    d.add_argument("--data-dir", type=Path, help="a UCI dataset folder (data.txt, index_*.txt)")
    d.add_argument("--split", type=_nonnegative_int, default=0, help="UCI split index")
    d.add_argument("--num-data", type=_positive_int, default=100, help="points on the regression curve")
    m = c.add_argument_group("model")
    m.add_argument("--hidden", type=_hidden, default=[16], help="hidden layer sizes, e.g. 16 or 50,50; 0 for none")
    m.add_argument("--activation", default="relu", choices=["relu", "tanh"])
    m.add_argument("--prior", default="gaussian", choices=["gaussian", "mixture"])
    m.add_argument("--prior-sigma", type=_positive_float, default=1.0, help="std of the Gaussian prior")
    m.add_argument("--pi", type=_probability, default=0.5, help="mixture weight of the wide component")
    m.add_argument("--sigma1", type=_positive_float, default=1.0, help="wide component std")
    m.add_argument("--sigma2", type=_positive_float, default=math.exp(-6), help="narrow component std")
    m.add_argument("--noise", type=_noise, default=None,
                   help="regression noise std, or 'learned' (LogNormal(0, 1) prior); "
                   "default 0.1 on the curve, 'learned' on standardized data sets")
    b = c.add_argument_group("Bayes by Backprop")
    b.add_argument("--epochs", type=_positive_int, default=1500)
    b.add_argument("--lr", type=_positive_float, default=0.01)
    b.add_argument("--batch-size", type=_positive_int, default=None, help="default: full batch")
    b.add_argument("--particles", type=_positive_int, default=8, help="weight samples per step")
    b.add_argument("--kl", default="analytic", choices=["analytic", "mc"])
    b.add_argument("--kl-weighting", default="uniform", choices=["uniform", "blundell"])
    b.add_argument("--vi-samples", type=_positive_int, default=1000, help="draws from q for the report")
    h = c.add_argument_group("HMC reference")
    h.add_argument("--reference", default="hmc", choices=["hmc", "nuts"],
                   help="hmc: pyro_bbb's ChEES-HMC, many chains in lockstep; nuts: Pyro's NUTS")
    h.add_argument("--warmup", type=_nonnegative_int, default=200)
    h.add_argument("--samples", type=_positive_int, default=None, help="per chain (default: hmc 100, nuts 200)")
    h.add_argument("--chains", type=_positive_int, default=None,
                   help="default: hmc 32 (in lockstep), nuts 2 (one after another)")
    h.add_argument("--max-tree-depth", type=_positive_int, default=7,
                   help="nuts: caps each trajectory at 2^depth - 1 leapfrog steps (~1.5 ms a step)")
    h.add_argument("--target-accept", type=_probability, default=None, help="default: hmc 0.65, nuts 0.8")
    o = c.add_argument_group("run")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", type=Path, default=Path("out"), help="report folder (replaced atomically)")
    o.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads; one is fastest for networks this small")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _load(args):
    from . import datasets

    if args.dataset == "curve":
        return datasets.curve(args.num_data, seed=args.seed)
    if args.dataset == "uci":
        if args.data_dir is None:
            raise ValueError("--dataset uci needs --data-dir (a folder in the standard UCI layout)")
        return datasets.load_uci(str(args.data_dir.resolve()) + os.sep, split=args.split)
    return datasets.load_sklearn(args.dataset, seed=args.seed)


def _network(in_features, hidden, out_features, activation):
    import torch

    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[activation]
    layers, width = [], in_features
    for size in hidden:
        layers += [torch.nn.Linear(width, size), act()]
        width = size
    layers.append(torch.nn.Linear(width, out_features))
    return torch.nn.Sequential(*layers)


def run_compare(args) -> Path:
    import pyro.distributions as dist
    import torch

    import pyro_bbb as bbb

    torch.set_num_threads(args.threads)
    data = _load(args)
    if args.noise is None:
        args.noise = 0.1 if args.dataset == "curve" else "learned"
    torch.manual_seed(args.seed)
    if args.prior == "gaussian":
        prior = dist.Normal(0.0, args.prior_sigma)
        prior_text = f"Gaussian N(0, {args.prior_sigma:g}^2)"
    else:
        prior = bbb.ScaleMixtureNormal(args.pi, args.sigma1, args.sigma2)
        prior_text = f"scale mixture (pi {args.pi:g}, sigma1 {args.sigma1:.3g}, sigma2 {args.sigma2:.3g})"
    if data.task == "classification":
        net = _network(data.x_train.shape[1], args.hidden, data.num_classes, args.activation)
        model = bbb.BayesianClassifier(net, prior=prior)
    else:
        net = _network(data.x_train.shape[1], args.hidden, 1, args.activation)
        model = bbb.BayesianRegressor(net, prior=prior, noise=args.noise)
    progress = not args.quiet
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))

    say(f"[1/3] Bayes by Backprop: {args.epochs} epochs, {args.particles} particles")
    guide = bbb.BBBGuide(model)
    t0 = time.perf_counter()
    history = bbb.fit(model, guide, data.x_train, data.y_train, epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, num_particles=args.particles, kl=args.kl,
                      kl_weighting=args.kl_weighting, seed=args.seed, progress=progress)
    vi_seconds = time.perf_counter() - t0

    nuts = args.reference == "nuts"
    chains = args.chains or (2 if nuts else 32)
    samples = args.samples or (200 if nuts else 100)
    accept = args.target_accept or (0.8 if nuts else 0.65)
    name = "Pyro NUTS" if nuts else "ChEES-HMC"
    say(f"[2/3] HMC reference: {name}, {chains} chains x ({args.warmup} warmup + {samples} draws)")
    if nuts:
        reference = bbb.run_nuts(model, data.x_train, data.y_train, num_samples=samples,
                                 warmup_steps=args.warmup, num_chains=chains,
                                 max_tree_depth=args.max_tree_depth, target_accept_prob=accept,
                                 seed=args.seed, progress=progress)
    else:
        reference = bbb.run_hmc(model, data.x_train, data.y_train, num_samples=samples,
                                warmup_steps=args.warmup, num_chains=chains, target_accept_prob=accept,
                                x_test=data.x_test, seed=args.seed, progress=progress)

    say("[3/3] InferenceData and comparison")
    common = dict(x_test=data.x_test, y_test=data.y_test, seed=args.seed)
    vi = bbb.to_inference_data(model, guide, data.x_train, data.y_train,
                               num_samples=args.vi_samples, history=history, **common)
    hmc = bbb.to_inference_data(model, reference, data.x_train, data.y_train, **common)
    report = bbb.compare(vi, hmc)

    settings = {
        "command": "pyro-bbb " + " ".join(sys.argv[1:]) if sys.argv and "pyro-bbb" in sys.argv[0] else None,
        "dataset": data.name,
        "task": data.task,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "network": f"{data.x_train.shape[1]}-" + "-".join(map(str, args.hidden)) + f"-{net[-1].out_features}"
                   + f" {args.activation}",
        "prior": prior_text,
        "noise": args.noise if data.task == "regression" else None,
        "bbb": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "particles": args.particles, "kl": args.kl, "kl_weighting": args.kl_weighting,
                "seconds": round(vi_seconds, 2), "final_elbo": float(history.elbo[-1])},
        "reference": {"sampler": reference.sampler, **{k: v for k, v in reference.settings.items()},
                      "seconds": round(reference.wall_time, 2)},
        "seed": args.seed,
        "versions": _versions(),
    }
    return _write_report(args.out, report, settings, vi, hmc)


def _versions():
    import arviz
    import pyro
    import torch

    import pyro_bbb

    return {"pyro_bbb": pyro_bbb.__version__, "torch": torch.__version__, "pyro": pyro.__version__,
            "arviz": arviz.__version__, "python": sys.version.split()[0]}


def _write_report(out: Path, report, settings, vi, hmc) -> Path:
    """Write everything into a fresh temporary folder beside ``out``, then swap it in:
    an interrupted run never leaves a folder that looks complete."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the report is not
    try:
        pictures = [Path(p).name for p in report.plot(tmp)]
        metrics = {"settings": settings, **report.to_dict()}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable))
        md = _markdown(report, settings, pictures)
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(_html(report, settings, pictures))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _settings_lines(settings):
    ref = settings["reference"]
    bbb = settings["bbb"]
    return [
        f"- data: {settings['dataset']} ({settings['task']}), {settings['n_train']} training points, "
        f"{settings['n_test']} test inputs",
        f"- model: {settings['network']} network, prior {settings['prior']}"
        + (f", noise {settings['noise']}" if settings["noise"] is not None else ""),
        f"- BBB: {bbb['epochs']} epochs, lr {bbb['lr']}, {bbb['particles']} particles, KL {bbb['kl']}, "
        f"weighting {bbb['kl_weighting']}; {bbb['seconds']} s",
        f"- reference: {ref['sampler']}, {ref.get('num_chains')} chains x ({ref.get('warmup_steps')} warmup + "
        f"{ref.get('num_samples')} draws), target acceptance {ref.get('target_accept_prob')}"
        + (f", max tree depth {ref['max_tree_depth']}" if "max_tree_depth" in ref else "")
        + (f", at most {ref['max_leapfrog_steps']} leapfrog steps" if "max_leapfrog_steps" in ref else "")
        + f"; {ref['seconds']} s",
        f"- seed {settings['seed']}; " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items()),
    ]


def _markdown(report, settings, pictures):
    lines = ["# BBB vs HMC: comparison report", ""]
    if settings.get("command"):
        lines += [f"Command: `{settings['command']}`", ""]
    lines += _settings_lines(settings) + [""]
    body = report.to_markdown().splitlines()
    if body and body[0].startswith("# "):  # the report's own title: ours stands above
        body = body[1:]
    lines += body + [""]
    lines += [f"![{p}]({p})" for p in pictures]
    return "\n".join(lines) + "\n"


def _html(report, settings, pictures):
    warn = "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in report.warnings)
    items = "".join(f"<li>{html.escape(s[2:])}</li>" for s in _settings_lines(settings))
    imgs = "".join(f"<figure><img src='{p}' alt='{p}'><figcaption>{p}</figcaption></figure>" for p in pictures)
    cmd = f"<p>Command: <code>{html.escape(settings['command'])}</code></p>" if settings.get("command") else ""
    weights = report.weight_space.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>BBB vs HMC</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}.warn{{background:#fff3cd;border:1px solid #e0c060;padding:.6em}}
img{{max-width:100%}}figure{{display:inline-block;margin:.5em;max-width:48%}}</style></head>
<body><h1>BBB vs HMC: comparison report</h1>{cmd}<ul>{items}</ul>{warn}
<h2>Metrics</h2>{report.table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, na_rep="")}
<h2>Weight space</h2>{weights}
<h2>Pictures</h2>{imgs}</body></html>
"""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            out = run_compare(args)
            print(f"report written to {out}")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"pyro-bbb: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-bbb: interrupted; no report was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
