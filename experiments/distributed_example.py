"""A multi-task model trained with any aggregator on several processes (torchrun).

    torchrun --nproc_per_node 2 -m mtl_opt.experiments.distributed_example --method nash_mtl
    torchrun --nproc_per_node 2 -m mtl_opt.experiments.distributed_example --method came_grad --distributed local
    python -m mtl_opt.experiments.distributed_example --method nash_mtl        # one process, same numbers

Synthetic data (a seeded regression-and-classification problem with two conflicting regression
targets), a shared MLP trunk and three heads. Every rank reads its own shard of each global batch
(``DistributedSampler``; the global batch is ``--batch-size``, split evenly), the model starts
from rank 0's parameters, and :class:`mtl_opt.MultiTaskOptimizer` aggregates the global batch's
Jacobian (``--distributed global``, the default; see :mod:`mtl_opt.distributed`). Rank 0 prints
the global losses per epoch; at the end every rank's parameters and aggregator state are compared
(hashes), so the run shows that the ranks stayed identical. With ``--distributed global`` the
printed numbers equal those of one process (``python -m ...``) to rounding.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch
from torch import Tensor, nn

import mtl_opt
from mtl_opt import distributed as mdist


def synthetic_tasks(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """``n`` samples of 16 features; targets: two regressions that pull the trunk apart and a
    4-class label, all seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 3, generator=g)
    y1 = torch.tanh(x @ w[:, 0]) + 0.1 * torch.randn(n, generator=g)
    y2 = -torch.tanh(x @ (w[:, 0] + 0.5 * w[:, 1])) + 0.1 * torch.randn(n, generator=g)
    label = torch.bucketize(x @ w[:, 2], torch.tensor([-1.0, 0.0, 1.0]))
    return torch.utils.data.TensorDataset(x, y1, y2, label)


class SharedTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(32, 1), nn.Linear(32, 1), nn.Linear(32, 4)])

    def losses(self, batch: list[Tensor]) -> list[Tensor]:
        x, y1, y2, label = batch
        z = self.trunk(x)
        return [
            nn.functional.mse_loss(self.heads[0](z).squeeze(-1), y1),
            nn.functional.mse_loss(self.heads[1](z).squeeze(-1), y2),
            nn.functional.cross_entropy(self.heads[2](z), label),
        ]


def _digest(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="nash_mtl", help="a method spec, e.g. came_grad:kappa=2")
    parser.add_argument("--distributed", default="global", choices=list(mdist.MODES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch size")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds a collective may wait for another rank before failing")
    args = parser.parse_args(argv)

    import datetime

    import torch.distributed as dist

    launched = mdist.init_process_group_from_env(
        backend="gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    name, hyper = mtl_opt.parse_method_spec(args.method)
    torch.manual_seed(args.seed)  # the model's initialisation and any drawn method seed
    model = SharedTrunk()
    mdist.broadcast_parameters(model)  # every rank starts from rank 0's parameters
    aggregator = mtl_opt.get_aggregator(name, **hyper)
    opt = mtl_opt.MultiTaskOptimizer(  # under torchrun: broadcasts rank 0's aggregator state
        torch.optim.Adam(model.parameters(), lr=args.lr), aggregator,
        shared_params=model.trunk, task_params=list(model.heads), distributed=args.distributed,
    )
    data = synthetic_tasks(args.samples, args.seed)
    sampler = torch.utils.data.DistributedSampler(
        data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size // world, sampler=sampler, drop_last=True)
    if rank == 0:
        print(f"{world} process(es), {aggregator!r}, distributed={args.distributed!r}, "
              f"global batch {args.batch_size}", flush=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        totals = torch.zeros(3, dtype=torch.float64)
        steps = 0
        for batch in loader:
            opt.zero_grad()
            losses = model.losses(batch)
            opt.step(losses)
            if getattr(aggregator, "wants_losses_after_step", False):  # FAMO
                with torch.no_grad():
                    after = torch.stack(model.losses(batch))
                aggregator.update(mdist.mean_over_ranks(after) if args.distributed == "global" else after)
            totals += mdist.mean_over_ranks(torch.stack([loss.detach() for loss in losses])).double()
            steps += 1
        if hasattr(aggregator, "end_epoch"):
            aggregator.end_epoch()
        if rank == 0:
            mean = (totals / max(steps, 1)).tolist()
            print(f"epoch {epoch + 1}: losses " + ", ".join(f"{v:.5f}" for v in mean), flush=True)
    params = _digest(list(model.parameters()))
    state = mdist.state_fingerprint(aggregator)[:16]
    if launched:
        every: list[object] = [None] * world
        dist.all_gather_object(every, (params, state))
        if rank == 0:
            same = all(e == every[0] for e in every)
            print(f"parameters {params}, aggregator state {state}: "
                  f"{'identical on all' if same else 'DIFFERENT across the'} {world} ranks", flush=True)
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()
    else:
        print(f"parameters {params}, aggregator state {state}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
