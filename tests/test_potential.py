"""Tests of the fused MLP potential, ``pyro_bbb.hmc.potential``.

Two independent references: the general :class:`pyro_bbb.hmc.potential.Potential` (the
model's batched ``log_joint`` and one autograd gradient), and Pyro's own trace log
density with the weights conditioned plus the log-Jacobian of the map to
unconstrained space.  Everything runs in float64, where the two routes differ by
rounding only (~1e-15 relative): the tolerances (1e-10) leave five orders of
magnitude for a correct implementation and catch any wrong term (a missing
constant, a wrong sign or factor changes the value at the 1e-3 level or worse).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_bbb as bbb
from pyro_bbb.hmc import run_hmc
from pyro_bbb.hmc.potential import (CPU_BLOCK_ELEMENTS, MLPPotential, Potential, batched_potential,
                                    mlp_layout)

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid}
PRIORS = {
    "normal": dist.Normal(0.0, 1.0),
    "mixture": bbb.ScaleMixtureNormal(0.5, 1.0, math.exp(-2)),
}
NUM_DATA, NUM_FEATURES, HIDDEN = 25, 3, 6


def mlp(activation, hidden_layers, outputs=1, bias=True, seed=0):
    torch.manual_seed(seed)
    layers, width = [], NUM_FEATURES
    for _ in range(hidden_layers):
        layers += [torch.nn.Linear(width, HIDDEN, bias=bias), ACTIVATIONS[activation]()]
        width = HIDDEN
    layers.append(torch.nn.Linear(width, outputs, bias=bias))
    return torch.nn.Sequential(*layers).double()


def make_model(likelihood, net, prior):
    if likelihood == "fixed":
        return bbb.BayesianRegressor(net, prior=prior, noise=0.3)
    if likelihood == "learned":
        return bbb.BayesianRegressor(net, prior=prior, noise="learned",
                                     noise_prior=dist.LogNormal(-0.5, 0.8))
    return bbb.BayesianClassifier(net, prior=prior)


def data(likelihood, outputs=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_DATA, NUM_FEATURES, generator=g, dtype=torch.float64)
    if likelihood in ("fixed", "learned"):
        shape = (NUM_DATA,) if outputs == 1 else (NUM_DATA, outputs)
        return x, torch.randn(shape, generator=g, dtype=torch.float64)
    return x, torch.randint(0, max(outputs, 2), (NUM_DATA,), generator=g)


def positions(dim, chains=4, seed=1):
    # Spread out (scale 1.5) so that ReLUs switch, sigmoids saturate partly and the
    # mixture prior's two components both matter.
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(chains, dim, generator=g, dtype=torch.float64)


def assert_matches_general(model, x, y, u):
    general, fused = Potential(model, x, y), batched_potential(model, x, y)
    assert type(fused) is MLPPotential
    with pyro.validation_enabled(False):
        v0, g0 = general.value_and_grad(u)
        v1, g1 = fused.value_and_grad(u)
    torch.testing.assert_close(v1, v0, rtol=1e-10, atol=0.0)
    # atol relative to the gradient's scale: entries that are exactly 0 (dead ReLUs)
    # can come out as 1e-17 on one route.
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12 * float(g0.abs().max()))
    return fused


# ----------------------------------------------------------------------------
# 1. Value and gradient equal the general path's
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("likelihood", ["fixed", "learned", "categorical", "bernoulli"])
@pytest.mark.parametrize("hidden_layers", [0, 1, 2])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_equals_general_potential(activation, hidden_layers, likelihood, prior):
    outputs = 3 if likelihood == "categorical" else 1
    model = make_model(likelihood, mlp(activation, hidden_layers, outputs), PRIORS[prior])
    x, y = data(likelihood, outputs)
    u = positions(Potential(model, x, y).dim)
    assert_matches_general(model, x, y, u)


@pytest.mark.parametrize("likelihood", ["fixed", "learned", "categorical"])
def test_sigmoid_equals_general_potential(likelihood):
    outputs = 3 if likelihood == "categorical" else 1
    model = make_model(likelihood, mlp("sigmoid", 2, outputs), PRIORS["mixture"])
    x, y = data(likelihood, outputs)
    assert_matches_general(model, x, y, positions(Potential(model, x, y).dim))


def test_mixed_priors_with_locations_and_scales_per_weight():
    # Normal with a non-zero mean and a different scale per weight on the first layer,
    # the scale mixture on the rest: both closed forms, side by side in one vector.
    net = mlp("tanh", 1)
    loc = torch.linspace(-0.5, 0.5, HIDDEN * NUM_FEATURES, dtype=torch.float64).reshape(HIDDEN, -1)
    prior = {
        "0.weight": dist.Normal(loc, 0.5 + loc.abs()).to_event(2),
        "*": bbb.ScaleMixtureNormal(0.25, 2.0, 0.1),
    }
    model = make_model("learned", net, prior)
    x, y = data("learned")
    assert_matches_general(model, x, y, positions(Potential(model, x, y).dim))


def test_multi_output_regression_and_layers_without_bias():
    model = make_model("learned", mlp("relu", 2, outputs=2, bias=False), PRIORS["normal"])
    x, y = data("learned", outputs=2)
    assert_matches_general(model, x, y, positions(Potential(model, x, y).dim))


@pytest.mark.parametrize("likelihood", ["fixed", "learned", "categorical"])
def test_blocks_of_chains_equal_the_whole_batch_and_the_general_path(likelihood):
    # 7 chains in blocks of 3 (3 + 3 + 1: a remainder block, work arrays of two sizes),
    # one of them out of the support, so the non-finite rule runs per block.
    outputs = 3 if likelihood == "categorical" else 1
    model = make_model(likelihood, mlp("tanh", 1, outputs), PRIORS["normal"])
    x, y = data(likelihood, outputs)
    u = positions(Potential(model, x, y).dim, chains=7)
    u[4, 0] = math.nan
    fused = batched_potential(model, x, y)
    assert fused.block_chains is not None and fused.block_chains >= 7  # CPU, small data: one block
    whole = fused.value_and_grad(u)
    fused.block_chains = 3
    blocks = fused.value_and_grad(u)
    for a, b in zip(blocks, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    assert blocks[0][4] == math.inf and not blocks[1][4].any()
    keep = torch.arange(7) != 4  # the general path's value on the finite rows
    with pyro.validation_enabled(False):
        v0, g0 = Potential(model, x, y).value_and_grad(u[keep])
    torch.testing.assert_close(blocks[0][keep], v0, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(blocks[1][keep], g0, rtol=1e-10, atol=1e-12 * float(g0.abs().max()))


def test_cpu_blocks_follow_the_size_of_the_largest_work_array():
    net = torch.nn.Sequential(torch.nn.Linear(8, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
    model = bbb.BayesianRegressor(net, prior=PRIORS["normal"], noise=0.25)
    for n, expected in ((100, CPU_BLOCK_ELEMENTS // 5000), (700, CPU_BLOCK_ELEMENTS // 35000),
                        (10**6, 1)):
        x, y = torch.zeros(n, 8), torch.zeros(n)
        assert batched_potential(model, x, y).block_chains == expected


def test_float32_close_to_general_potential():
    # float32: the two routes round differently (tanh as 2 sigmoid(2z) - 1, other
    # summation orders); 1e-4 relative is ~1000 float32 epsilons over sums of ~100 terms.
    net = mlp("tanh", 1).float()
    model = bbb.BayesianRegressor(net, prior=PRIORS["normal"], noise=0.3)
    x, y = (t.float() for t in data("fixed"))
    u = positions(Potential(model, x, y).dim).float()
    v0, g0 = Potential(model, x, y).value_and_grad(u)
    v1, g1 = batched_potential(model, x, y).value_and_grad(u)
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-4 * float(g0.abs().max()))


# ----------------------------------------------------------------------------
# 2. The potential is minus Pyro's trace log density plus the log-Jacobian
# ----------------------------------------------------------------------------
def trace_log_density(model, values, x, y) -> float:
    conditioned = pyro.poutine.condition(model, data=values)
    return float(pyro.poutine.trace(conditioned).get_trace(x, y).log_prob_sum())


@pytest.mark.parametrize(
    "likelihood, prior", [("fixed", "mixture"), ("learned", "normal"), ("learned", "mixture"),
                          ("categorical", "mixture"), ("bernoulli", "normal")],
)
def test_equals_minus_pyro_trace_log_density(likelihood, prior):
    outputs = 3 if likelihood == "categorical" else 1
    model = make_model(likelihood, mlp("tanh", 1, outputs), PRIORS[prior])
    x, y = data(likelihood, outputs)
    pot = batched_potential(model, x, y)
    u = positions(pot.dim, chains=3)
    value, _ = pot.value_and_grad(u)
    values, _ = pot.unflatten(u)
    for c in range(3):
        draw = {name: v[c] for name, v in values.items()}
        expected = trace_log_density(model, draw, x, y)
        if likelihood == "learned":  # noise = exp(v): log |d noise / dv| = v
            expected += float(u[c, -1])
        assert float(value[c]) == pytest.approx(-expected, rel=1e-10)


# ----------------------------------------------------------------------------
# 3. Which models qualify; the rest keep the general path
# ----------------------------------------------------------------------------
class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(NUM_FEATURES, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


@pytest.mark.parametrize(
    "build",
    [
        lambda: bbb.BayesianRegressor(TwoLayer().double(), prior=PRIORS["normal"]),
        lambda: bbb.BayesianRegressor(
            torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 4), torch.nn.GELU(),
                                torch.nn.Linear(4, 1)).double(), prior=PRIORS["normal"]),
        lambda: bbb.BayesianRegressor(mlp("tanh", 1), prior=PRIORS["normal"], exclude=["0.bias"]),
        lambda: bbb.BayesianRegressor(mlp("tanh", 1), prior=dist.Laplace(0.0, 1.0)),
        lambda: bbb.BayesianRegressor(mlp("tanh", 1), prior=PRIORS["normal"], noise="learned",
                                      noise_prior=dist.InverseGamma(2.0, 1.0)),
        lambda: bbb.BayesianRegressor(
            torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 1), torch.nn.Tanh()).double(),
            prior=PRIORS["normal"]),
    ],
    ids=["custom-module", "gelu", "excluded-bias", "laplace-prior", "inverse-gamma-noise",
         "activation-last"],
)
def test_other_models_keep_the_general_path(build):
    model = build()
    x, y = data("fixed")
    assert mlp_layout(model) is None
    pot = batched_potential(model, x, y)
    assert type(pot) is Potential
    with pytest.raises(ValueError, match="model"):
        MLPPotential(model, x, y)


def test_layout_reads_the_sequential():
    model = make_model("fixed", mlp("relu", 2), PRIORS["normal"])
    layers = mlp_layout(model)
    assert [(l.fan_out, l.fan_in, l.activation) for l in layers] == [
        (HIDDEN, NUM_FEATURES, "relu"), (HIDDEN, HIDDEN, "relu"), (1, HIDDEN, None)]
    pot = Potential(model, *data("fixed"))
    starts = {site.name: site.start for site in pot.sites}
    assert [l.weight[0] for l in layers] == [starts["0.weight"], starts["2.weight"], starts["4.weight"]]
    assert [l.bias[0] for l in layers] == [starts["0.bias"], starts["2.bias"], starts["4.bias"]]


# ----------------------------------------------------------------------------
# 4. Divergent rows, fresh results, and run_hmc's use of it
# ----------------------------------------------------------------------------
def test_non_finite_and_out_of_support_rows_are_divergent():
    model = make_model("learned", mlp("tanh", 1), PRIORS["normal"])
    x, y = data("learned")
    pot = batched_potential(model, x, y)
    u = torch.zeros(5, pot.dim, dtype=torch.float64)
    u[1, 0] = math.nan
    u[2, 3] = math.inf
    u[3, -1] = 800.0  # exp(800) overflows float64: noise = inf, outside the support
    u[4, -1] = -800.0  # exp(-800) = 0
    value, grad = pot.value_and_grad(u)
    assert math.isfinite(float(value[0])) and torch.all(torch.isinf(value[1:]))
    assert torch.all(grad[1:] == 0) and torch.all(torch.isfinite(grad))
    # The finite row is unaffected by its neighbours.
    v0, g0 = Potential(model, x, y).value_and_grad(u[:1])
    torch.testing.assert_close(value[:1], v0, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(grad[:1], g0, rtol=1e-10, atol=1e-12)


def test_results_are_fresh_tensors_across_calls():
    # The kernel keeps a state's gradient while it evaluates the next point: a result
    # that lived in a reused work array would change under it.
    model = make_model("fixed", mlp("tanh", 1), PRIORS["normal"])
    pot = batched_potential(model, *data("fixed"))
    u1, u2 = positions(pot.dim, seed=1), positions(pot.dim, seed=2)
    v1, g1 = pot.value_and_grad(u1)
    kept = v1.clone(), g1.clone()
    pot.value_and_grad(u2)
    pot.value_and_grad(u2[:2])  # another number of chains: its own work arrays
    torch.testing.assert_close((v1, g1), kept, rtol=0.0, atol=0.0)
    torch.testing.assert_close(pot.value_and_grad(u1), kept, rtol=0.0, atol=0.0)


def test_run_hmc_uses_the_fused_potential(monkeypatch):
    calls = []
    original = MLPPotential.value_and_grad

    def counting(self, u):
        calls.append(u.shape[0])
        return original(self, u)

    monkeypatch.setattr(MLPPotential, "value_and_grad", counting)
    model = bbb.BayesianRegressor(mlp("tanh", 1).float(), prior=PRIORS["normal"], noise=0.3)
    x, y = (t.float() for t in data("fixed"))
    ref = run_hmc(model, x, y, num_chains=4, num_samples=5, warmup_steps=5, progress=False)
    assert calls and set(calls) == {4}
    assert ref.samples["0.weight"].shape == (4, 5, HIDDEN, NUM_FEATURES)
