"""One rank of the distributed tests (tests/test_distributed.py), and the single-process
reference they compare with.

Run as ``python _distributed_worker.py SCENARIO RANK WORLD PORT OUT``: it joins a gloo process
group on 127.0.0.1:PORT, runs SCENARIO and writes what it observed to OUT (``torch.save`` of
plain data and tensors).
"""

from __future__ import annotations

import datetime
import sys
import time
import traceback

import torch
from torch import Tensor, nn

import mtl_opt
from mtl_opt import distributed as mdist

N_GLOBAL = 8  # samples of the global batch (each of 2 ranks holds 4)
STEPS = 3
LR = 0.1


class ThreeTaskNet(nn.Module):
    """A shared three-layer trunk and three heads (two regressions, one 3-class classification).

    Sized for the factored linear layers (``factor_linear``): the last trunk layer (64 × 64) is
    factored over 4 rows (one rank's shard) and over 8 (both ranks' gathered rows, or one process
    on the global batch); the middle one (64 × 32) only over 4, so the global mode gives it its
    Jacobian rows; the first (32 × 4) never."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 64), nn.Tanh(),
                                   nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(64, 1), nn.Linear(64, 1), nn.Linear(64, 3)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)


def global_batch() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_GLOBAL, 4, generator=g, dtype=torch.float64)
    y1 = torch.randn(N_GLOBAL, generator=g, dtype=torch.float64)
    y2 = torch.randn(N_GLOBAL, generator=g, dtype=torch.float64) + 1.0
    labels = torch.randint(0, 3, (N_GLOBAL,), generator=g)
    return x, y1, y2, labels


def shard(batch: tuple[Tensor, ...], rank: int, world: int) -> tuple[Tensor, ...]:
    n = N_GLOBAL // world
    return tuple(t[rank * n: (rank + 1) * n] for t in batch)


def task_losses(model: nn.Module, batch: tuple[Tensor, ...], with_features: bool = False):
    """The three losses (and the trunk's output, with ``with_features``)."""
    x, y1, y2, labels = batch
    z = model(x)
    heads = model.module.heads if isinstance(model, nn.parallel.DistributedDataParallel) else model.heads
    losses = [
        (heads[0](z).squeeze(-1) - y1).pow(2).mean(),
        (heads[1](z).squeeze(-1) - y2).pow(2).mean(),
        nn.functional.cross_entropy(heads[2](z), labels),
    ]
    return (losses, z) if with_features else losses


def make_aggregator(name: str, torch_seed: int) -> mtl_opt.GradientAggregator:
    """The registered method with its defaults; random methods draw their seed from torch's
    global generator, seeded here with ``torch_seed`` (different per rank in the tests, so that
    only the broadcast of rank 0's state can make them agree)."""
    torch.manual_seed(torch_seed)
    return mtl_opt.get_aggregator(name)


def train(
    name: str, batch: tuple[Tensor, ...], *, steps: int = STEPS, distributed: str = "off",
    torch_seed: int = 100, ddp: str | None = None, features: bool = False,
) -> tuple[Tensor, mtl_opt.GradientAggregator, list[object]]:
    """``steps`` SGD steps of method ``name`` on ``batch``; the flat parameters afterwards, the
    aggregator and each step's result. With ``ddp`` the model is wrapped in
    DistributedDataParallel (``"sync"``: plain forward; ``"no_sync"``: forward under no_sync;
    ``"unused"``: find_unused_parameters=True); ``features``: representation-level
    aggregation at the trunk's output."""
    model = ThreeTaskNet()
    agg = make_aggregator(name, torch_seed)
    wrapped: nn.Module = model
    if ddp is not None:
        wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=ddp == "unused")
    opt = mtl_opt.MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), agg, shared_params=model.trunk,
        task_params=list(model.heads), distributed=distributed,
    )
    results = []
    for _ in range(steps):
        opt.zero_grad()
        if ddp == "no_sync":
            with wrapped.no_sync():  # type: ignore[operator]
                losses = task_losses(wrapped, batch)
        else:
            losses, z = task_losses(wrapped, batch, with_features=True)
        results.append(opt.step(losses, features=z if features else None))
        if getattr(agg, "wants_losses_after_step", False):
            with torch.no_grad():
                after = torch.stack(task_losses(model, batch))
            agg.update(mdist.mean_over_ranks(after) if distributed == "global" else after)
        if hasattr(agg, "end_epoch"):
            agg.end_epoch()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat, agg, results


def _scenario_methods(rank: int, world: int) -> dict[str, object]:
    """Every registered method in the global mode; local mode; DDP; state agreement."""
    batch = shard(global_batch(), rank, world)
    out: dict[str, object] = {"global": {}, "fingerprints": {}, "factored": {}}
    for name in mtl_opt.available_aggregators():
        flat, agg, results = train(name, batch, distributed="global", torch_seed=100 + rank)
        out["global"][name] = flat  # type: ignore[index]
        out["factored"][name] = results[-1].factored_params  # type: ignore[index,union-attr]
        try:
            mdist.check_same_state(agg)
            agree: object = True
        except RuntimeError as exc:
            agree = str(exc)
        out["fingerprints"][name] = (mdist.state_fingerprint(agg), agree)  # type: ignore[index]
    for name in ("mgda", "nash_mtl"):
        out[f"local_{name}"] = train(name, batch, steps=1, distributed="local", torch_seed=100 + rank)[0]
    # Without the broadcast (distributed="off" on different shards) states differ, and the
    # check says so.
    _, agg, _ = train("nash_mtl", batch, steps=1, distributed="off", torch_seed=100 + rank)
    try:
        mdist.check_same_state(agg)
        out["diverged_check"] = "no error"
    except RuntimeError as exc:
        out["diverged_check"] = str(exc)
    # Local mode, a non-finite loss on rank 1 only: both ranks raise, nothing hangs, and the
    # next collective still pairs up.
    model = ThreeTaskNet()
    opt = mtl_opt.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                     mtl_opt.get_aggregator("mgda"), model.trunk,
                                     task_params=list(model.heads), distributed="local")
    bad = tuple(t.clone() for t in batch)
    if rank == 1:
        bad[1][0] = float("nan")
    try:
        opt.step(task_losses(model, bad))
        out["local_nan"] = "no error"
    except ValueError as exc:
        out["local_nan"] = str(exc)
    out["local_nan_grads"] = [p.grad is None for p in model.parameters()]
    out["after_local_nan"] = mdist.mean_over_ranks(torch.tensor([float(rank)])).item()
    # The same in the global mode at the representation (rank 1 fails before the Gramian's
    # all-reduce, which rank 0 is in).
    opt = mtl_opt.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                     mtl_opt.get_aggregator("mgda"), model.trunk,
                                     task_params=list(model.heads))
    losses, z = task_losses(model, bad, with_features=True)
    try:
        opt.step(losses, features=z)
        out["features_nan"] = "no error"
    except ValueError as exc:
        out["features_nan"] = str(exc)
    out["features_nan_grads"] = [p.grad is None for p in model.parameters()]
    out["after_features_nan"] = mdist.mean_over_ranks(torch.tensor([float(rank)])).item()
    # Ranks that built different hyperparameters: every rank refuses, naming both.
    try:
        train("came_grad", batch, steps=1, distributed="global") if rank == 0 else None
        if rank == 1:
            model = ThreeTaskNet()
            mtl_opt.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                       mtl_opt.get_aggregator("came_grad", kappa=2.0), model.trunk)
        out["mismatch"] = "no error"
    except ValueError as exc:
        out["mismatch"] = str(exc)
    for mode in ("sync", "no_sync"):
        for name in ("mgda", "ls"):
            out[f"ddp_{mode}_{name}"] = train(name, batch, distributed="global", ddp=mode)[0]
    try:
        train("mgda", batch, steps=1, distributed="global", ddp="unused")
        out["ddp_unused"] = "no error"
    except RuntimeError as exc:
        out["ddp_unused"] = str(exc)
    for name in ("mgda", "nash_mtl", "came_grad"):
        flat, agg, _ = train(name, batch, distributed="global", features=True)
        out[f"features_{name}"] = (flat, mdist.state_fingerprint(agg))
    return out


def _scenario_rank1_raises(rank: int, world: int) -> dict[str, object]:
    """Both ranks build the optimizer (a collective); rank 1 then raises before its step, and
    rank 0, in the step's all-reduce, must fail with a clear error."""
    batch = shard(global_batch(), rank, world)
    model = ThreeTaskNet()
    opt = mtl_opt.MultiTaskOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), mtl_opt.get_aggregator("mgda"),
        shared_params=model.trunk, task_params=list(model.heads),
    )
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    start = time.monotonic()
    try:
        opt.step(task_losses(model, batch))
        return {"error": None, "seconds": time.monotonic() - start}
    except mdist.DistributedStepError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}


def _scenario_rank1_hangs(rank: int, world: int) -> dict[str, object]:
    """Rank 1 never reaches the step (it sleeps); rank 0 must fail by the group's timeout."""
    batch = shard(global_batch(), rank, world)
    if rank == 1:
        time.sleep(60)
        return {}
    start = time.monotonic()
    try:
        train("came_grad", batch, steps=1, distributed="global")
        return {"error": None, "seconds": time.monotonic() - start}
    except mdist.DistributedStepError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}


SCENARIOS = {
    "methods": (_scenario_methods, 60),
    "rank1_raises": (_scenario_rank1_raises, 60),
    "rank1_hangs": (_scenario_rank1_hangs, 3),
}


def main(argv: list[str]) -> int:
    scenario, rank, world, port, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    fn, timeout_s = SCENARIOS[scenario]
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world)
    except Exception:  # noqa: BLE001 - reported to the test through the output file
        torch.save({"crashed": traceback.format_exc()}, out)
        return 1
    torch.save(result, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
