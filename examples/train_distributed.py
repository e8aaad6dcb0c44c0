"""Data-parallel Bayes by Backprop on torch.distributed, launched with torchrun.

One machine, two processes on the CPU:

    torchrun --standalone --nproc_per_node=2 examples/train_distributed.py

One machine, four GPUs (NCCL):

    torchrun --standalone --nproc_per_node=4 examples/train_distributed.py --device cuda

Two machines (run on each; --node_rank 0 on the first, 1 on the second):

    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST_OF_NODE_0:29500 \\
        examples/train_distributed.py --device cuda

Every process builds the same network (same seed), sees a disjoint shard of each
epoch, and ends with the same guide: the objective is that of one process with the
global batch (--batch-size per process x number of processes).  Rank 0 alone shows
progress and writes the result.
"""

from __future__ import annotations

import argparse
import os

import pyro.distributions as dist
import torch
import torch.distributed as torch_dist

import pyro_bbb as bbb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=25, help="per process")
    parser.add_argument("--out", default="guide_distributed.pt")
    args = parser.parse_args(argv)

    backend = "nccl" if args.device == "cuda" else "gloo"
    torch_dist.init_process_group(backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank = torch_dist.get_rank()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else "cpu"
    try:
        x, y = bbb.datasets.regression_curve(100, seed=0)
        torch.manual_seed(0)  # the same initial network on every rank
        net = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.ReLU(), torch.nn.Linear(50, 1))
        model = bbb.BayesianRegressor(net, prior=dist.Normal(0.0, 1.0), noise=0.1)
        guide = bbb.BBBGuide(model)
        history = bbb.fit(model, guide, x, y, epochs=args.epochs, batch_size=args.batch_size, lr=0.01,
                          num_particles=4, kl="analytic", seed=0, device=device)
        if rank == 0:
            torch.save(guide.state_dict(), args.out)
            print(f"{torch_dist.get_world_size()} processes: final ELBO {history.elbo[-1]:.1f}; wrote {args.out}")
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
