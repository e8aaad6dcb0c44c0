import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

import pyro_bbb as bbb
from pyro_bbb import BayesianClassifier, BayesianRegressor, ScaleMixtureNormal, bayesianize

N01 = dist.Normal(0.0, 1.0)


class Custom(nn.Module):
    """A user's own module: conv, flatten, nested sequential, a bare parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x))) / self.temperature


def _loop(bnn, weights, x):
    """Reference: the user's own module with each draw loaded by hand."""
    outs = []
    s = next(iter(weights.values())).shape[0]
    for i in range(s):
        net = bnn.net
        with torch.no_grad():
            outs.append(torch.func.functional_call(net, {k: v[i] for k, v in weights.items()}, (x,)))
    return torch.stack(outs)


@pytest.mark.parametrize(
    "module,x",
    [
        (nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), torch.randn(7, 3)),
        (nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 1)), torch.randn(7, 2, 6)),
        (Custom(), torch.randn(7, 1, 4, 4)),
    ],
)
def test_batched_evaluation_equals_per_draw_loop(module, x):
    bnn = bayesianize(module, N01)
    weights = {n: torch.randn(4, *s) for n, s in bnn.site_shapes.items()}
    out = bnn.evaluate(weights, x)
    assert out.shape[0] == 4
    torch.testing.assert_close(out, _loop(bnn, weights, x))
    # Two leading dims (chains x draws) broadcast too.
    two = {n: v.reshape(2, 2, *v.shape[1:]) for n, v in weights.items()}
    torch.testing.assert_close(bnn.evaluate(two, x), out.reshape(2, 2, *out.shape[1:]))


def test_mlp_direct_forward_broadcasts_and_falls_back():
    x = torch.randn(7, 3)
    bnn = bayesianize(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), N01)
    assert bnn.mlp_layers() is not None  # matrix products with a leading draw dimension
    # sites with different leading shapes broadcast as they do through vmap
    weights = {n: torch.randn(*((4,) if n.endswith("weight") else ()), *s) for n, s in bnn.site_shapes.items()}
    expanded = {n: v.expand(4, *bnn.site_shapes[n]) for n, v in weights.items()}
    torch.testing.assert_close(bnn.evaluate(weights, x), _loop(bnn, expanded, x))
    # a deterministic (excluded) layer, or a non-2-D input, takes the general vmap path
    partly = bayesianize(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), N01, exclude=["0"])
    assert partly.mlp_layers() is None
    draws = {n: torch.randn(4, *s) for n, s in partly.site_shapes.items()}
    torch.testing.assert_close(partly.evaluate(draws, x), _loop(partly, draws, x))


@pytest.mark.parametrize("lead", [(4,), ()])
def test_mlp_forward_in_place_activations_leave_inputs_and_gradients_intact(lead):
    """The direct MLP forward (one baddbmm per Linear, activations in place on its own
    intermediates) against the user's module: same outputs, same gradients in the
    weights, and an input that an activation reads first is not overwritten."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Tanh(), nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.Sigmoid(),
                           nn.Linear(4, 2))
    bnn = bayesianize(module, N01)
    assert bnn.mlp_layers() is not None
    x = torch.randn(7, 3)
    x_before = x.clone()
    weights = {n: torch.randn(*lead, *s, requires_grad=True) for n, s in bnn.site_shapes.items()}
    out = bnn.evaluate(weights, x)
    assert torch.equal(x, x_before)
    if lead:
        ref = torch.stack([torch.func.functional_call(bnn.net, {k: v[i] for k, v in weights.items()}, (x,))
                           for i in range(lead[0])])
    else:
        ref = torch.func.functional_call(bnn.net, dict(weights), (x,))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(weights.values()), g)
    ref_grads = torch.autograd.grad(ref, list(weights.values()), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_site_names_are_module_paths_and_original_untouched():
    net = Custom()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bnn = bayesianize(net, N01)
    assert bnn.site_names == ("temperature", "conv.weight", "conv.bias", "head.1.weight", "head.1.bias")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert len(list(net.parameters())) == 5  # the user's module keeps its parameters
    # Initial values are the module's own weights (the guide starts there).
    torch.testing.assert_close(bnn.initial_values()["conv.weight"], net.conv.weight.detach())


def test_exclude_keeps_modules_deterministic():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    bnn = bayesianize(net, N01, exclude=["0"])
    assert bnn.site_names == ("2.weight", "2.bias")
    assert [n for n, _ in bnn.net.named_parameters()] == ["0.weight", "0.bias"]
    with pytest.raises(ValueError, match="match no parameter"):
        bayesianize(net, N01, exclude=["nope"])
    with pytest.raises(ValueError, match="no parameter left"):
        bayesianize(net, N01, exclude=["*"])


def test_per_parameter_priors_in_the_trace():
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    mix = ScaleMixtureNormal(0.5, 1.0, math.exp(-6))
    model = BayesianRegressor(net, prior={"*.bias": dist.Normal(0.0, 5.0), "*": mix}, noise=0.1)
    tr = poutine.trace(model).get_trace(torch.randn(3, 2))
    assert isinstance(tr.nodes["0.weight"]["fn"].base_dist, ScaleMixtureNormal)
    assert tr.nodes["2.bias"]["fn"].base_dist.scale.flatten()[0].item() == 5.0
    assert tr.nodes["0.weight"]["fn"].event_shape == (4, 2)


def _trace_log_joint(model, latents, x, y):
    tr = poutine.trace(poutine.condition(model, data=latents)).get_trace(x, y)
    return tr.log_prob_sum()


@pytest.mark.parametrize("noise", [0.3, "learned"])
def test_log_joint_equals_pyro_trace(noise):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    model = BayesianRegressor(net, prior=ScaleMixtureNormal(0.5, 1.0, 0.05), noise=noise)
    x, y = torch.randn(6, 2), torch.randn(6)
    draws = {n: torch.randn(3, *s) for n, s in model.network.site_shapes.items()}
    if noise == "learned":
        draws["noise"] = torch.rand(3) + 0.1
    batched = model.log_joint(draws, x, y)
    expected = torch.stack([_trace_log_joint(model, {k: v[i] for k, v in draws.items()}, x, y) for i in range(3)])
    torch.testing.assert_close(batched, expected)


def test_classifier_log_joint_equals_pyro_trace_and_bernoulli():
    torch.manual_seed(2)
    x = torch.randn(5, 3)
    for out, y in [(3, torch.tensor([0, 2, 1, 1, 0])), (1, torch.tensor([0, 1, 1, 0, 1]))]:
        model = BayesianClassifier(nn.Linear(3, out), prior=N01)
        draws = {n: torch.randn(2, *s) for n, s in model.network.site_shapes.items()}
        expected = torch.stack([_trace_log_joint(model, {k: v[i] for k, v in draws.items()}, x, y) for i in range(2)])
        torch.testing.assert_close(model.log_joint(draws, x, y), expected)
        # Independent reference for the likelihood: logsumexp-normalized logits.
        f = model.output(draws, x)
        logits = f if out > 1 else torch.stack([torch.zeros_like(f[..., 0]), f[..., 0]], -1)
        ref = torch.log_softmax(logits, -1).gather(-1, y.expand(2, 5)[..., None])[..., 0]
        torch.testing.assert_close(model.log_likelihood(draws, x, y), ref)


def test_data_plate_scales_minibatch_to_dataset_size():
    model = BayesianRegressor(nn.Linear(1, 1), prior=N01, noise=0.5)
    x, y = torch.randn(4, 1), torch.randn(4)
    tr = poutine.trace(model).get_trace(x, y, num_data=100)
    assert tr.nodes["y"]["scale"] == pytest.approx(25.0)


def test_vectorized_particles_and_parallel_predictive():
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    model = BayesianRegressor(net, prior=N01, noise="learned")
    x = torch.randn(5, 1)
    pred = pyro.infer.Predictive(model, num_samples=11, parallel=True)(x)
    assert pred["y"].shape == (11, 5)
    assert pred["0.weight"].shape == (11, 1, 8, 1)  # Pyro keeps the data dim as 1
    assert pred["noise"].shape == (11, 1)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="noise"):
        BayesianRegressor(nn.Linear(1, 1), prior=N01, noise=-1.0)
    with pytest.raises(ValueError, match="noise"):
        BayesianRegressor(nn.Linear(1, 1), prior=N01, noise="big")
    with pytest.raises(ValueError, match="prior"):
        BayesianRegressor(nn.Linear(1, 1), prior=None)
    with pytest.raises(ValueError, match="module"):
        bayesianize("not a module", N01)
