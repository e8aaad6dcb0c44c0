"""Data-parallel fit on torch.distributed (gloo, 2 processes spawned here) equals one process
with the global batch."""

import os
import traceback

import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

import pyro_bbb as bbb

WORLD = 2
FIT = dict(epochs=3, lr=0.02, num_particles=2, kl="mc", seed=3, progress=False)


def _problem(n=42, seed=0):
    """Same data and initial network on every rank (built after the same manual_seed)."""
    torch.manual_seed(seed)
    x = torch.randn(n, 2)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    model = bbb.BayesianRegressor(net, prior=bbb.ScaleMixtureNormal(0.5, 1.0, 0.05), noise="learned")
    return model, bbb.BBBGuide(model, init_scale=0.1), x, y


def _worker(rank, init_file, out_dir, case):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        if case == "equivalence":
            model, guide, x, y = _problem()
            hist = bbb.fit(model, guide, x, y, batch_size=4, **FIT)
            state = {k: v.detach().clone() for k, v in guide.named_parameters()}
            torch.save({"params": state, "loss": hist.loss}, os.path.join(out_dir, f"rank{rank}.pt"))
        elif case == "too_little_data":
            model, guide, x, y = _problem(n=1)
            bbb.fit(model, guide, x, y, batch_size=1, **FIT)
        elif case == "different_start":
            model, guide, x, y = _problem(seed=rank)  # each rank builds its own network
            bbb.fit(model, guide, x, y, batch_size=4, **FIT)
    except Exception as err:  # the test reads what each rank raised
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    finally:
        torch_dist.destroy_process_group()


def _spawn(tmp_path, case):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), case), nprocs=WORLD, join=True)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    _spawn(tmp_path, "equivalence")
    assert not list(tmp_path.glob("error*.txt")), [p.read_text() for p in tmp_path.glob("error*.txt")]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, guide, x, y = _problem()
    hist = bbb.fit(model, guide, x, y, batch_size=4 * WORLD, **FIT)  # one process, global batch 8
    single = dict(guide.named_parameters())
    # 42 rows in global batches of 8: the last has 2, one per rank, so unequal shards
    # (4 vs 1 row per rank across steps) are covered too.  Float32 sums in another order:
    # agreement to ~1e-5 after 18 Adam steps.
    largest = 0.0
    for name, value in single.items():
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r]["params"][name], value.detach(), rtol=1e-4, atol=1e-5)
            largest = max(largest, (ranks[r]["params"][name] - value.detach()).abs().max().item())
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name])  # identical ranks
    assert len(ranks[0]["loss"]) == len(hist.loss) == 3 * 6
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(hist.loss), rtol=1e-4, atol=1e-3)
    print(f"largest parameter difference, 2 processes vs 1: {largest:.3g}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "case,message",
    [("too_little_data", "cannot be shared by 2 processes"), ("different_start", "differ across processes")],
)
def test_bad_distributed_setups_raise_clear_errors_on_every_rank(tmp_path, case, message):
    _spawn(tmp_path, case)
    for r in range(WORLD):
        text = (tmp_path / f"error{r}.txt").read_text()
        assert text.startswith("ValueError") and message in text, text
