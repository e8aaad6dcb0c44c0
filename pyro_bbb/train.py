"""Training by Bayes by Backprop: the minibatch ELBO as a module, and ``fit``.

For minibatch i of M the paper minimizes (Blundell et al. 2015, eq. 8-9)

    F_i = pi_i KL[q(w) || P(w)] - E_q[log P(D_i | w)],   sum_i pi_i = 1,

with pi_i = 1/M ("uniform") or pi_i = 2^(M-i) / (2^M - 1) ("blundell": early
minibatches weigh the prior more).  :func:`fit` optimizes M * F_i with the
likelihood scaled from the minibatch to the whole data set (the data plate's
subsampling), so that a "uniform" step is the usual unbiased estimate of the
negative ELBO and the losses read on one scale whatever the batch size.  The
KL weight M * pi_i multiplies every latent site, in model and guide alike, so
the closed-form and the Monte Carlo KL are weighted the same way.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from . import _checks

__all__ = ["BBBLoss", "History", "NonFiniteLossError", "fit", "kl_weights"]


class NonFiniteLossError(FloatingPointError):
    """The loss or a gradient went NaN/inf; the message names the step and the culprit."""


def kl_weights(num_batches: int, scheme: str = "uniform") -> Tensor:
    """The paper's KL weights pi_1..pi_M of one epoch (they sum to 1).

    Examples
    --------
    >>> kl_weights(3, "blundell")
    tensor([0.5714, 0.2857, 0.1429], dtype=torch.float64)
    """
    m = _checks.positive_int("num_batches", num_batches)
    _checks.choice("kl_weighting", scheme, ("uniform", "blundell"))
    if scheme == "uniform":
        return torch.full((m,), 1.0 / m, dtype=torch.float64)
    # 2^(M-i) / (2^M - 1) for i = 1..M, computed in log space so large M cannot overflow.
    i = torch.arange(1, m + 1, dtype=torch.float64)
    log_num = (m - i) * math.log(2.0)
    log_den = m * math.log(2.0) + math.log(-math.expm1(-m * math.log(2.0)))
    return torch.exp(log_num - log_den)


class _ScaleSites(Messenger):
    """Multiply the log density of the latent (``observed=False``) or the observed
    sample sites by ``scale``."""

    def __init__(self, scale: float, observed: bool):
        super().__init__()
        self.scale, self.observed = scale, observed

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"] == self.observed:
            msg["scale"] = self.scale * msg["scale"]


def _scale_latents(scale: float) -> _ScaleSites:
    return _ScaleSites(scale, observed=False)


def _scale_observed(scale: float) -> _ScaleSites:
    """For models that take no ``num_data`` argument: the N / B scaling of the likelihood."""
    return _ScaleSites(scale, observed=True)


def _takes_num_data(model) -> bool:
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "num_data" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class BBBLoss(nn.Module):
    """Negative ELBO of Bayes by Backprop, as a module over the guide's parameters.

    ``loss(*args, kl_scale=1.0, **kwargs)`` draws ``num_particles`` weight samples
    (vectorized in one pass), and returns

        mean over particles of  kl_scale * [log q(w) - log p(w)] - log p(y | w)

    with the closed-form KL in place of the bracket where ``kl="analytic"`` and the
    prior has one (Gaussian priors), Monte Carlo otherwise.  After a call,
    ``last_terms`` holds the detached expected log-likelihood and KL.  Being an
    ``nn.Module`` it can be wrapped in ``DistributedDataParallel``.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> from pyro_bbb import BayesianRegressor, BBBGuide
    >>> model = BayesianRegressor(torch.nn.Linear(2, 1), prior=dist.Normal(0.0, 1.0))
    >>> guide = BBBGuide(model)
    >>> loss = BBBLoss(model, guide, num_particles=4)
    >>> loss(torch.randn(8, 2), torch.randn(8)).shape
    torch.Size([])
    """

    def __init__(self, model, guide, num_particles: int = 1, kl: str = "mc", max_plate_nesting=None):
        super().__init__()
        self.model = model
        self.guide = guide
        self.num_particles = _checks.positive_int("num_particles", num_particles)
        self.kl = _checks.choice("kl", kl, ("mc", "analytic"))
        self.max_plate_nesting = max_plate_nesting
        self.last_terms: dict[str, Tensor] = {}

    def traces(self, *args, kl_scale: float = 1.0, **kwargs):
        """Guide and model traces for one (vectorized) draw of the weights."""
        if self.max_plate_nesting is None:
            self.max_plate_nesting = _max_plate_nesting(self.model, self.guide, args, kwargs)
        with contextlib.ExitStack() as stack:
            if self.num_particles > 1:
                stack.enter_context(
                    pyro.plate("particles", self.num_particles, dim=-1 - self.max_plate_nesting)
                )
            stack.enter_context(_scale_latents(kl_scale))
            guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        return guide_trace, model_trace

    def site_terms(self, guide_trace, model_trace) -> dict[str, Tensor]:
        """Each site's contribution to the negative ELBO, summed over particles."""
        terms = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["infer"].get("_do_not_trace"):
                continue
            if site["is_observed"]:
                terms[name] = -_scaled(site["fn"].log_prob(site["value"]), site).sum()
            elif name in guide_trace.nodes:
                q = guide_trace.nodes[name]
                terms[name] = _scaled(self._kl(q["fn"], site["fn"], site["value"]), site).sum()
        return terms

    def _kl(self, q, p, value):
        if self.kl == "analytic":
            try:
                return kl_divergence(q, p)
            except NotImplementedError:
                pass
        return q.log_prob(value) - p.log_prob(value)

    def forward(self, *args, kl_scale: float = 1.0, **kwargs) -> Tensor:
        guide_trace, model_trace = self.traces(*args, kl_scale=kl_scale, **kwargs)
        terms = self.site_terms(guide_trace, model_trace)
        nll = sum(t for n, t in terms.items() if model_trace.nodes[n]["is_observed"])
        kl = sum(t for n, t in terms.items() if not model_trace.nodes[n]["is_observed"])
        p = self.num_particles
        self.last_terms = {
            "log_likelihood": -nll.detach() / p,
            "kl": kl.detach() / p / kl_scale if kl_scale else kl.detach() * 0,
        }
        self._last_traces = (guide_trace, model_trace, terms)
        return (nll + kl) / p

    def diagnose(self) -> str:
        """Name the first site of the last call whose value or term is not finite."""
        guide_trace, model_trace, terms = self._last_traces
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if not torch.isfinite(site["value"]).all():
                return f"site {name!r} has a non-finite value"
            if name in terms and not torch.isfinite(terms[name]).all():
                return f"site {name!r} has a non-finite log density / KL term"
        return "no site is non-finite (check the model's deterministic computations)"


def _scaled(log_prob: Tensor, site) -> Tensor:
    if site["mask"] is not None:
        log_prob = torch.where(site["mask"], log_prob, torch.zeros_like(log_prob))
    return log_prob * site["scale"]


ESTIMATORS = ("weights", "local_reparam", "flipout")


def make_loss(model, guide, num_particles: int = 1, kl: str = "mc", estimator: str = "weights",
              compile: bool = False) -> nn.Module:
    """The loss module ``fit`` uses.  ``estimator="weights"``: the lean
    :class:`~pyro_bbb.estimators.WeightSamplingLoss` for pyro_bbb models with a BBBGuide
    (same objective, no Pyro tracing), else :class:`BBBLoss` on Pyro traces.
    ``"local_reparam"`` / ``"flipout"``: the variance-reduced estimators of
    :mod:`pyro_bbb.estimators`.  ``compile``: the lean losses' elementwise work per weight
    as ``torch.compile``'d kernels.  The guide must be set up."""
    from . import estimators

    _checks.choice("estimator", estimator, ESTIMATORS)
    lean = estimators.supports_lean_step(model, guide)
    if not lean and (estimator != "weights" or compile):
        what = f"estimator={estimator!r}" if estimator != "weights" else "compile=True"
        raise ValueError(f"{what} needs a pyro_bbb model and a BBBGuide")
    if estimator != "weights":
        cls = estimators.LocalReparamLoss if estimator == "local_reparam" else estimators.FlipoutLoss
        return cls(model, guide, num_particles=num_particles, kl=kl, compile=compile)
    if lean:
        return estimators.WeightSamplingLoss(model, guide, num_particles=num_particles, kl=kl, compile=compile)
    return BBBLoss(model, guide, num_particles=num_particles, kl=kl)


def _max_plate_nesting(model, guide, args, kwargs) -> int:
    # A dry run, under a forked RNG so that it leaves the random stream untouched.
    with poutine.block(), torch.random.fork_rng(devices=[]):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        -f.dim
        for tr in (guide_trace, model_trace)
        for site in tr.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized
    ]
    return max(dims, default=0)


@dataclass
class History:
    """Per-step training record returned by :func:`fit`.

    ``loss`` is the minimized objective (KL weighted for the step), ``kl`` the
    unweighted KL estimate, ``log_likelihood`` the expected log-likelihood scaled
    to the whole data set; ``elbo = log_likelihood - kl``.  ``interrupted`` is True
    when Ctrl-C stopped training early, after ``steps`` completed steps (of
    ``epochs`` x batches asked for); ``seconds`` is the training time.

    Examples
    --------
    >>> h = History(epoch=[0, 0], loss=[3.0, 2.0], log_likelihood=[-2.5, -1.5], kl=[0.5, 0.5],
    ...             kl_weight=[1.0, 1.0], interrupted=True)
    >>> h.steps, h.to_dict()["interrupted"], h.elbo.tolist()
    (2, True, [-3.0, -2.0])
    """

    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    log_likelihood: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    kl_weight: list[float] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def elbo(self) -> np.ndarray:
        return np.asarray(self.log_likelihood) - np.asarray(self.kl)

    @property
    def steps(self) -> int:
        """Optimization steps completed (fewer than asked for when ``interrupted``)."""
        return len(self.loss)

    def __len__(self) -> int:
        return self.steps

    def to_dict(self) -> dict:
        return {
            "epoch": list(self.epoch),
            "loss": list(self.loss),
            "log_likelihood": list(self.log_likelihood),
            "kl": list(self.kl),
            "kl_weight": list(self.kl_weight),
            "elbo": self.elbo.tolist(),
            "interrupted": self.interrupted,
            "steps": self.steps,
            "seconds": self.seconds,
        }


def fit(
    model,
    guide,
    x,
    y,
    *,
    epochs: int = 100,
    batch_size: int | None = None,
    lr: float = 1e-2,
    num_particles: int = 1,
    kl: str = "mc",
    kl_weighting: str = "uniform",
    estimator: str = "weights",
    clip_norm: float | None = None,
    compile: bool = False,
    device=None,
    seed: int | None = None,
    progress: bool = True,
) -> History:
    """Train ``guide`` for ``model`` on (x, y) by Bayes by Backprop.

    Parameters
    ----------
    model : pyro_bbb model or Pyro model
        Called as ``model(x_batch, y_batch, num_data=N)``; its data plate must
        subsample (``pyro.plate("data", size=num_data, subsample=...)``) so the
        minibatch likelihood scales to the data set.  pyro_bbb's models do.
    guide : BBBGuide
    x, y : array-like
        Inputs (n, ...) and targets (n,) / labels, validated (lengths, finite values,
        labels in range).
    epochs, batch_size : int
        Passes over the data, and minibatch size (default: the whole data set).
        Minibatches are reshuffled every epoch with a generator seeded by ``seed``.
    lr, clip_norm : float
        Adam's learning rate; optional clipping of the global gradient norm.
    num_particles : int
        Weight samples per step, drawn in one vectorized pass.
    kl : {"mc", "analytic"}
        Monte Carlo KL on the same weight samples (the paper), or the closed form
        where the prior has one (Gaussian priors; falls back to Monte Carlo for
        the scale mixture).
    kl_weighting : {"uniform", "blundell"}
        pi_i = 1/M, or 2^(M-i) / (2^M - 1), for minibatch i of M in each epoch.
    estimator : {"weights", "local_reparam", "flipout"}
        How a step draws: one weight sample per particle (the paper), local
        reparameterization (Kingma et al. 2015, Linear layers) or Flipout (Wen et al.
        2018, Linear and Conv layers); the last two have lower gradient variance and
        the same expected loss.
    compile : bool
        Run the elementwise work per weight (softplus, the draw, the KL and their
        gradients) as ``torch.compile``'d kernels: one loop over the weights per pass
        instead of one per operation.  Same objective.  On a CPU it pays with the
        scale-mixture prior (5-7 % of the step on a 784-400-400-10 network), not with
        Gaussian priors (``randn`` and the transcendental functions dominate either way;
        see ``benchmarks/``), after a one-off compilation (13-15 s on a cold cache there).
        Needs a C++ compiler on a CPU (Triton on a GPU); pyro_bbb models with a
        BBBGuide only.
    device : str or torch.device, optional
        Where to train; default: where x lives.  Model, guide and data are moved.
    seed : int, optional
        Seeds private generators of the weight noise (torch's CPU generator and the
        training device's, forked for the run) and of the minibatch order: the same
        seed repeats the run, and the global random states of torch, ``random`` and
        numpy are left exactly as they were.  Without a seed both draw from torch's
        global generator, so ``torch.manual_seed(s)`` before ``fit`` repeats the run.
        Under ``torch.distributed`` rank 0's seed (or, without one, a draw from its
        global generator) is used on every rank.
    progress : bool
        Show a progress bar.

    Returns
    -------
    History
        Loss, expected log-likelihood and KL per step.  Ctrl-C during training stops
        after the current step and returns the history so far, with
        ``history.interrupted`` True and ``history.steps`` the steps completed (and a
        warning); the guide keeps what it learned.

    Raises
    ------
    NonFiniteLossError
        When the loss or a gradient is NaN/inf, or a draw leaves its site's support
        (a learned noise whose exp underflowed to 0 after a huge step), naming the step
        and the site or parameter where it first appears.
    KeyboardInterrupt
        Ctrl-C before the first step (while the guide is set up): there is no history
        to return.  The guide is left as it was before ``fit`` (not set up, if ``fit``
        was setting it up), so a later ``fit`` starts cleanly.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> import pyro_bbb as bbb
    >>> x, y = bbb.datasets.regression_curve(100)
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    >>> model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
    >>> guide = bbb.BBBGuide(model)
    >>> hist = bbb.fit(model, guide, x, y, epochs=5, progress=False, seed=0)
    >>> len(hist.loss)
    5
    """
    epochs = _checks.positive_int("epochs", epochs)
    lr = _checks.positive_float("lr", lr)
    if clip_norm is not None:
        clip_norm = _checks.positive_float("clip_norm", clip_norm)
    device, seed = _checks.device(device), _checks.seed(seed)
    x, y = _checks.model_data(model, x, y)
    n = x.shape[0]
    batch_size = n if batch_size is None else _checks.positive_int("batch_size", batch_size)
    if device is not None:
        x, y = x.to(device), y.to(device)
        for m in (model, guide):
            if isinstance(m, nn.Module):
                m.to(device)
    rank, world = _distributed_rank_and_size()
    if world > 1:
        if n < world:
            raise ValueError(f"data: {n} rows cannot be shared by {world} processes")
        seed = _same_seed_everywhere(seed)
        progress = progress and rank == 0
    # The minibatch order has its own generator: seeded by `seed`, else by a draw from
    # torch's global generator, so that torch.manual_seed before fit makes the run repeat.
    order = torch.Generator().manual_seed(seed if seed is not None else _seed_from_global_generator())
    global_batch = min(batch_size * world, n)
    num_batches = len(_global_batches(torch.arange(n), global_batch, world))
    weights = kl_weights(num_batches, kl_weighting)
    with _private_noise(seed, x.device):
        train_step = TrainStep(model, guide, x[:batch_size], y[:batch_size], num_data=n, lr=lr,
                               num_particles=num_particles, kl=kl, estimator=estimator, clip_norm=clip_norm,
                               compile=compile)
        bar = tqdm(total=epochs * len(weights), disable=not progress, desc="BBB", unit="step", leave=False)
        return _train(train_step, x, y, order, weights, epochs, global_batch, bar)


def _train(train_step, x, y, order, weights, epochs, global_batch, bar) -> History:
    """fit's epochs; Ctrl-C stops after the current step and returns the history so far."""
    rank, world = _distributed_rank_and_size()
    history = History()
    start = time.perf_counter()
    step = 0
    try:
        for epoch in range(epochs):
            perm = torch.randperm(x.shape[0], generator=order).to(x.device)
            for i, batch in enumerate(_global_batches(perm, global_batch, world)):
                # DistributedSampler's split: rank r takes every world-th index of the
                # epoch's permutation, so the ranks' i-th batches make up global batch i.
                idx = batch[rank::world]
                kl_scale = float(weights[i] * len(weights))
                value, terms = train_step(x[idx], y[idx], kl_scale, where=f"step {step} (epoch {epoch}, batch {i})",
                                          share=idx.shape[0] * world / batch.shape[0])
                history.epoch.append(epoch)
                history.loss.append(value)
                history.log_likelihood.append(terms[0])
                history.kl.append(terms[1])
                history.kl_weight.append(kl_scale)
                step += 1
                bar.update()
            if not bar.disable:
                bar.set_postfix(loss=f"{value:.4g}", epoch=epoch + 1)
    except KeyboardInterrupt:
        history.interrupted = True
        warnings.warn(f"training interrupted after {step} steps; the guide keeps its state")
    finally:
        bar.close()
        history.seconds = time.perf_counter() - start
    return history


def _seed_from_global_generator() -> int:
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@contextlib.contextmanager
def _private_noise(seed: int | None, device: torch.device):
    """With a seed: the weight noise from torch's generators of the CPU and ``device``
    seeded by it, their global states put back afterwards (no other device's state nor
    Python's or numpy's is touched).  Without: the global generators, as they are."""
    if seed is None:
        yield
        return
    accelerator = device.type != "cpu"
    devices = [device.index if device.index is not None else 0] if accelerator else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if accelerator else None):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
        elif accelerator:
            torch.get_device_module(device.type).manual_seed(seed)
        yield


def _global_batches(perm: Tensor, size: int, world: int = 1) -> list[Tensor]:
    """Split an epoch's permutation into batches of ``size``; a remainder smaller than the
    number of processes joins the previous batch, so that every process gets a share."""
    batches = list(perm.split(size))
    if len(batches) > 1 and batches[-1].shape[0] < world:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def _distributed_rank_and_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _same_seed_everywhere(seed):
    """All processes need one seed: the same weight noise and minibatch order on every rank
    is what makes data-parallel training equal to one process with the global batch."""
    import torch.distributed as dist

    box = [seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()))]
    dist.broadcast_object_list(box, src=0)
    if seed is not None and box[0] != seed:
        raise ValueError(f"seed differs across processes (rank 0 has {box[0]}, this rank {seed})")
    return box[0]


def _check_same_parameters(params) -> None:
    """Raise on every rank if the ranks start from different parameters."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in params]).to(torch.float64)
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    differs = torch.tensor([float(not torch.equal(ref, flat))], device=flat.device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if differs.item():
        raise ValueError(
            "model/guide parameters differ across processes at the start of training: build the "
            "network after the same torch.manual_seed on every rank (or load the same weights)"
        )


class TrainStep:
    """One optimization step of :func:`fit`: loss, finiteness checks, backward,
    optional clipping, Adam.  Built once; also what the speed benchmarks time.

    ``x0, y0`` is a first batch: it sets up the guide's parameters (on its device)
    if that has not happened yet.  Under an initialized ``torch.distributed`` process
    group the loss module is wrapped in ``DistributedDataParallel``, which all-reduces
    (averages) the gradients of the guide's and model's parameters.
    """

    def __init__(self, model, guide, x0, y0, *, num_data, lr=1e-2, num_particles=1, kl="mc",
                 estimator="weights", clip_norm=None, compile=False):
        self.model, self.guide, self.num_data, self.clip_norm = model, guide, num_data, clip_norm
        self.takes_num_data = _takes_num_data(model)
        set_up = getattr(guide, "prototype_trace", None) is None
        with _undone_on_failure(guide) if set_up else contextlib.nullcontext():
            if set_up:
                with torch.no_grad():
                    self._call(guide, x0, y0, share=1.0)
            self._build(lr, num_particles, kl, estimator, compile)

    def _build(self, lr, num_particles, kl, estimator, compile):
        model, guide = self.model, self.guide
        self.loss_fn = make_loss(model, guide, num_particles=num_particles, kl=kl, estimator=estimator,
                                 compile=compile)
        self.params = _unique_parameters(guide, model)
        self.world = _distributed_rank_and_size()[1]
        self.forward_fn = self.loss_fn
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            _check_same_parameters(self.params)
            device = self.params[0].device
            self.forward_fn = DistributedDataParallel(
                self.loss_fn, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = _adam(self.params, lr)

    def _call(self, fn, xb, yb, share, **kw):
        # share = this rank's part of the global batch x world size (1 in one process):
        # the likelihood is scaled by N / global batch, so averaging the ranks' gradients
        # gives the gradient of the one-process objective, even for unequal shards.
        if not self.takes_num_data:
            with _scale_observed(self.num_data / xb.shape[0] / share):
                return fn(xb, yb, **kw)
        if share == 1.0:
            return fn(xb, yb, num_data=self.num_data, **kw)
        if not isinstance(self.loss_fn, BBBLoss):  # the lean losses scale by num_data / batch
            return fn(xb, yb, num_data=self.num_data / share, **kw)
        with _scale_observed(1.0 / share):
            return fn(xb, yb, num_data=self.num_data, **kw)

    def __call__(self, xb, yb, kl_scale: float = 1.0, where: str = "this step", share: float = 1.0):
        """One step; returns (loss, (expected log-likelihood, KL)), averaged over processes."""
        try:
            loss = self._call(self.forward_fn, xb, yb, share, kl_scale=kl_scale)
        except ValueError as err:  # torch's validation of a distribution's arguments or value
            error = self._non_finite_error(where)
            if error is None:
                raise
            raise error from err
        terms = self.loss_fn.last_terms
        stats = torch.stack([loss.detach(), terms["log_likelihood"], torch.as_tensor(terms["kl"]).to(loss)])
        if self.world > 1:  # the global objective; and every rank sees a NaN anywhere
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats /= self.world
        value, log_lik, kl = stats.tolist()
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at {where}: {self.loss_fn.diagnose()}. "
                "Lower lr, set clip_norm, or check the data."
            )
        for p in self.params:  # = zero_grad(set_to_none=True), without its per-call overhead
            p.grad = None
        loss.backward()
        if self.clip_norm is None:
            # A NaN or inf in any gradient makes the sum of all gradients non-finite: half
            # the cost of a norm, and no overflow of squares at 1e19.
            norm = _sum_of_gradients(self.params)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if not torch.isfinite(norm):
            bad = _first_non_finite(self.guide, self.model, grad=True)
            raise NonFiniteLossError(f"gradient of {bad!r} is not finite at {where}; loss was {value}")
        self.optimizer.step()
        return value, (log_lik, kl)

    def _non_finite_error(self, where: str) -> NonFiniteLossError | None:
        """What a distribution's ValueError in the forward pass means: a NaN parameter, or
        (lean losses) a draw that left its site's support, e.g. a learned noise whose
        exp underflowed to 0 after a huge step.  None: neither (a genuine error)."""
        bad = _first_non_finite(self.guide, self.model)
        if bad is not None:
            return NonFiniteLossError(f"parameter {bad!r} is not finite at {where}")
        culprit = getattr(self.loss_fn, "culprit", None)
        why = culprit() if culprit is not None else None
        if why is None:
            return None
        return NonFiniteLossError(f"{why} at {where}. Lower lr, set clip_norm, or check the data.")


def _attribute_names(module) -> set[str]:
    names = set(vars(module))
    if isinstance(module, nn.Module):
        names.update(n for n, _ in module.named_children())
        names.update(n for n, _ in module.named_parameters(recurse=False))
        names.update(n for n, _ in module.named_buffers(recurse=False))
    return names


@contextlib.contextmanager
def _undone_on_failure(guide):
    """Run a guide's set-up so that an exception or Ctrl-C inside it leaves the guide not
    set up (no prototype trace, none of the parameters it had begun to make), instead of
    half set up with a prototype trace and no parameters, which every later fit trips on."""
    before = _attribute_names(guide)
    try:
        yield
    except BaseException:
        for name in _attribute_names(guide) - before:
            delattr(guide, name)
        guide.prototype_trace = None
        raise


def _sum_of_gradients(params) -> Tensor:
    sums = [p.grad.sum() for p in params if p.grad is not None]
    if not sums:
        return torch.zeros(())
    if len({t.device for t in sums}) > 1:  # parameters on several devices
        return sum(t.cpu() for t in sums)
    return torch.stack(sums).sum()


def _adam(params, lr):
    """Adam, fused into one pass per tensor where torch supports it (CPU and CUDA floats)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _first_non_finite(*modules, grad=False):
    for name, p in _named(*modules):
        t = p.grad if grad else p
        if t is not None and not torch.isfinite(t).all():
            return name
    return None


def _unique_parameters(*modules) -> list[nn.Parameter]:
    seen, out = set(), []
    for _, p in _named(*modules):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _named(*modules):
    for m in modules:
        if isinstance(m, nn.Module):
            for name, p in m.named_parameters():
                if p.requires_grad:
                    yield name, p
