"""fit's randomness (global generators untouched with a seed, followed without one) and what
it leaves behind when interrupted or when a huge step breaks a learned noise."""

import random

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_bbb as bbb
import pyro_bbb.guide
from pyro_bbb.train import TrainStep

FIT = dict(epochs=3, batch_size=4, lr=0.02, progress=False)


def _problem(noise=0.2, n=12):
    """The same data and initial network every call, whatever the global state was."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=noise)
    return model, bbb.BBBGuide(model, init_scale=0.1), x, y


def _run(**kw):
    model, guide, x, y = _problem(noise=kw.pop("noise", 0.2))
    hist = bbb.fit(model, guide, x, y, **{**FIT, **kw})
    return hist, {n: p.detach().clone() for n, p in guide.named_parameters()}


def _same(a, b) -> bool:
    (hist_a, params_a), (hist_b, params_b) = a, b
    return hist_a.loss == hist_b.loss and all(torch.equal(params_a[n], params_b[n]) for n in params_a)


def _global_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _assert_states_equal(before, after):
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)
    assert before[1] == after[1]
    np_before, np_after = before[2], after[2]
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]


# -- randomness ------------------------------------------------------------------------------
def test_without_seed_torch_manual_seed_repeats_the_run():
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(_run(noise="learned"))
    assert _same(*runs)
    torch.manual_seed(8)  # and the global state is what it draws from
    assert not _same(runs[0], _run(noise="learned"))


def test_seed_leaves_torch_random_and_numpy_global_states_as_they_were():
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = _global_states()
    _run(seed=0, noise="learned")
    _assert_states_equal(before, _global_states())


def test_same_seed_repeats_the_run_whatever_the_global_state_and_another_seed_differs():
    torch.manual_seed(1)
    first = _run(seed=0, noise="learned")
    torch.manual_seed(2)  # a different global state must not matter
    again = _run(seed=0, noise="learned")
    other = _run(seed=1, noise="learned")
    assert _same(first, again)
    assert not _same(first, other)
    # Different seeds give different minibatch orders and noise from the same start: the
    # very first losses already differ (equal floats would need identical draws).
    assert first[0].loss[0] != other[0].loss[0]


@pytest.mark.cuda
def test_seed_on_cuda_repeats_the_run_and_leaves_the_cuda_generator_as_it_was():
    torch.cuda.manual_seed(5)
    before = torch.cuda.get_rng_state(), torch.get_rng_state()
    runs = [_run(seed=0, device="cuda") for _ in range(2)]
    after = torch.cuda.get_rng_state(), torch.get_rng_state()
    assert _same(*runs)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


# -- interruption ----------------------------------------------------------------------------
def _interrupt_once(monkeypatch, owner, name, at_call):
    """Make ``owner.name`` raise KeyboardInterrupt on its ``at_call``-th call, once."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupting)


@pytest.mark.parametrize(
    "owner,name,at_call",
    [
        (pyro_bbb.guide, "deep_setattr", 3),  # mid-way through the guide's parameters
        (torch.optim, "Adam", 1),  # the guide is set up, the optimizer not yet made
    ],
    ids=["guide-parameters", "optimizer"],
)
def test_ctrl_c_during_set_up_raises_and_leaves_the_guide_not_set_up(monkeypatch, owner, name, at_call):
    model, guide, x, y = _problem()
    _interrupt_once(monkeypatch, owner, name, at_call)
    with pytest.raises(KeyboardInterrupt):
        bbb.fit(model, guide, x, y, seed=0, **FIT)
    assert guide.prototype_trace is None
    assert list(guide.parameters()) == []
    hist = bbb.fit(model, guide, x, y, seed=0, **FIT)
    # The retry is exactly a clean run: nothing of the interrupted set-up is left.
    assert _same((hist, dict(guide.named_parameters())), _run(seed=0))
    assert len(hist) == 3 * 3 and not hist.interrupted


def test_ctrl_c_during_training_returns_a_history_flagged_interrupted(monkeypatch):
    model, guide, x, y = _problem()
    _interrupt_once(monkeypatch, TrainStep, "__call__", at_call=3)
    with pytest.warns(UserWarning, match="interrupted after 2 steps"):
        hist = bbb.fit(model, guide, x, y, **FIT)
    assert hist.interrupted and hist.steps == 2 == len(hist.loss)
    record = hist.to_dict()
    assert record["interrupted"] is True and record["steps"] == 2
    assert bbb.fit(model, guide, x, y, **FIT).to_dict()["interrupted"] is False  # the guide trains on


# -- a huge step on a learned noise ------------------------------------------------------------
@pytest.mark.parametrize("kl", ["mc", "analytic"])
def test_huge_lr_on_learned_noise_raises_non_finite_loss_error_naming_step_and_site(kl):
    # The report's setting: lr=1e4 sends the noise's mu to about -1e4, whose exp is 0 (or,
    # upwards, inf): torch's support check of LogNormal / Normal(scale=0) raised ValueError.
    x, y = bbb.datasets.regression_curve(100, seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise="learned")
    guide = bbb.BBBGuide(model)
    with pytest.raises(bbb.NonFiniteLossError, match=r"site 'noise'.* at step \d+ \(epoch \d+, batch \d+\)"):
        bbb.fit(model, guide, x, y, epochs=50, lr=1e4, kl=kl, progress=False, seed=0)


def test_a_value_error_that_is_not_numerical_is_raised_as_it_is(monkeypatch):
    model, guide, x, y = _problem()

    def broken(f, latents):
        raise ValueError("a likelihood bug")

    monkeypatch.setattr(model, "likelihood", broken)
    with pytest.raises(ValueError, match="a likelihood bug"):
        bbb.fit(model, guide, x, y, **FIT)
