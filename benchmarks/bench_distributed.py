"""Distributed multi-task steps: bytes sent and step time, against DDP with plain LS.

    python benchmarks/bench_distributed.py                       # 2 gloo processes on this CPU
    python benchmarks/bench_distributed.py --wide                # factored layers: gathered vs rows
    python benchmarks/bench_distributed.py --rounds 40 --width 256 --local-batch 32

Two processes (gloo, 127.0.0.1) train the same model, an MLP trunk of ``--depth`` linear layers
of ``--width`` (ReLU) shared by three heads (two regressions, one 4-class classification), each
rank on ``--local-batch`` samples (global batch = 2 × that). One step is forward, backward
(with whatever communication the variant needs) and ``torch.optim.SGD.step``:

* ``ddp_ls``: the model wrapped in ``DistributedDataParallel``, ``(L_1 + L_2 + L_3).backward()``:
  plain data parallelism, the baseline. Its bytes are counted by a DDP communication hook
  around the ordinary all-reduce.
* ``<method> global``: :class:`mtl_opt.MultiTaskOptimizer` with ``distributed="global"`` (the
  global batch's Jacobian: the trunk's K × n_j blocks and the heads' gradients all-reduced;
  factored linear layers all-gather their inputs and output gradients instead).
* ``<method> global (rows)`` (``--wide``): the same with ``factor_linear=False``: every layer's
  Jacobian rows all-reduced.
* ``<method> local``: ``distributed="local"`` (each rank's own direction; the gradients
  all-reduced once).
* ``ls global``: the one-backward path (weights from the averaged losses, gradients averaged).
* ``<method> off``: ``distributed="off"``, no communication at all (each rank on its own): the
  step's cost without the collectives, to tell the library's own work from the communication.

Bytes are what this rank put into collectives per step (``mtl_opt.distributed
.communication_stats``: all-reduce buffers and all-gather contributions; for DDP the hook's
count). Step times are the slower rank's, per round; variants alternate within each round so that
a busy machine slows them alike; the table gives the median and the ratio to ``ddp_ls``'s median.

The second table times the two collectives of the factored-layer question alone, per shared
linear layer: all-reducing its Jacobian rows (K · out · in values) against all-gathering its
inputs and output gradients (N · (in + K · out) values from each rank). The last line is one
process on the global batch with ``factor_linear`` on and off (the compute side).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import mtl_opt
from mtl_opt import distributed as mdist

K = 3


class Trunk3Heads(nn.Module):
    def __init__(self, d_in: int, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = d_in
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(width, 1), nn.Linear(width, 1), nn.Linear(width, 4)])

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def losses(self, z: Tensor, y1: Tensor, y2: Tensor, label: Tensor) -> list[Tensor]:
        return [
            nn.functional.mse_loss(self.heads[0](z).squeeze(-1), y1),
            nn.functional.mse_loss(self.heads[1](z).squeeze(-1), y2),
            nn.functional.cross_entropy(self.heads[2](z), label),
        ]


def _batch(n: int, d_in: int, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g), torch.randn(n, generator=g),
            torch.randn(n, generator=g), torch.randint(0, 4, (n,), generator=g))


class _Variant:
    """One way of stepping: its model, optimizer and a step function returning bytes sent."""

    def __init__(self, kind: str, method: str, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.model = Trunk3Heads(args.d_in, args.width, args.depth)
        self.rows = kind == "global_rows"  # the global mode with factor_linear=False
        kind = "global" if self.rows else kind
        self.kind, self.method = kind, method
        self.ddp_bytes = 0
        if kind == "ddp":
            self.ddp = nn.parallel.DistributedDataParallel(self.model)

            def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
                self.ddp_bytes += bucket.buffer().numel() * bucket.buffer().element_size()
                from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                return allreduce_hook(None, bucket)

            self.ddp.register_comm_hook(None, counting_hook)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        else:
            self.opt = mtl_opt.MultiTaskOptimizer(
                torch.optim.SGD(self.model.parameters(), lr=1e-3), mtl_opt.get_aggregator(method),
                shared_params=self.model.trunk, task_params=list(self.model.heads),
                distributed=kind, factor_linear=not self.rows,
            )
        self.factored = 0

    @property
    def name(self) -> str:
        if self.kind == "ddp":
            return "ddp_ls"
        return f"{self.method} {self.kind}" + (" (rows)" if self.rows else "")

    def step(self, batch: tuple[Tensor, ...]) -> int:
        x, *targets = batch
        if self.kind == "ddp":
            before = self.ddp_bytes
            self.opt.zero_grad()
            z = self.ddp(x)
            sum(self.model.losses(z, *targets)).backward()
            self.opt.step()
            return self.ddp_bytes - before
        mdist.reset_communication_stats()
        self.opt.zero_grad()
        result = self.opt.step(self.model.losses(self.model(x), *targets))
        self.factored = result.factored_params if result is not None else 0
        return mdist.communication_stats()["bytes"]


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _time_collective(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(_slowest(time.perf_counter() - start))
    return statistics.median(times)


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))
    last = args.methods[-1]
    if args.wide:  # the factored-layer question: gathered (X, Δ) against all-reduced rows
        variants = [_Variant("ddp", "ls", args), _Variant("global", last, args),
                    _Variant("global_rows", last, args), _Variant("off", last, args)]
    else:
        variants = [_Variant("ddp", "ls", args), _Variant("off", "ls", args),
                    _Variant("global", "ls", args)]
        variants += [_Variant("global", m, args) for m in args.methods]
        variants += [_Variant("local", last, args), _Variant("off", last, args)]
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    sent: dict[str, int] = {}
    for r in range(args.warmup + args.rounds):
        batch = _batch(args.local_batch, args.d_in, seed=1000 * r + rank)
        for v in variants:
            dist.barrier()
            start = time.perf_counter()
            nbytes = v.step(batch)
            elapsed = _slowest(time.perf_counter() - start)
            if r >= args.warmup:
                times[v.name].append(elapsed)
                sent[v.name] = nbytes
    # The factored-layer question: rows all-reduced vs inputs and output gradients gathered.
    layer_rows = []
    sizes = [(args.d_in, args.width)] + [(args.width, args.width)] * (args.depth - 1)
    N = args.local_batch
    for fan_in, fan_out in sizes:
        rows = torch.randn(K, fan_out * fan_in)
        X, D = torch.randn(N, fan_in), torch.randn(K, N, fan_out)
        gx = [torch.empty_like(X) for _ in range(world)]
        gd = [torch.empty_like(D) for _ in range(world)]
        t_rows = _time_collective(lambda: dist.all_reduce(rows), args.comm_rounds)
        t_gather = _time_collective(
            lambda: (dist.all_gather(gx, X), dist.all_gather(gd, D)), args.comm_rounds)
        layer_rows.append((f"{fan_out}×{fan_in}", rows.numel() * 4, (X.numel() + D.numel()) * 4,
                           t_rows, t_gather))
    if rank == 0:
        base = statistics.median(times["ddp_ls"])
        d_shared = sum(p.numel() for p in variants[0].model.trunk.parameters())
        d_all = sum(p.numel() for p in variants[0].model.parameters())
        print(f"2 gloo processes on {os.cpu_count()} CPU core(s), 1 thread each; trunk "
              f"{args.depth}×{args.width} ({d_shared} shared of {d_all} parameters), K = {K}, "
              f"global batch {2 * args.local_batch}; {args.rounds} rounds (median)\n")
        print("| variant | factored layers | bytes sent / step | × DDP | step ms (median) | × DDP |")
        print("|---|---:|---:|---:|---:|---:|")
        for v in variants:
            med = statistics.median(times[v.name])
            factored = "—" if v.kind == "ddp" else str(v.factored)
            print(f"| {v.name} | {factored} | {sent[v.name]:,} | "
                  f"{sent[v.name] / max(sent['ddp_ls'], 1):.2f} | {1e3 * med:.2f} | {med / base:.2f} |")
        print("\nShared linear layers under the global mode (per layer, float32, this rank's share):\n")
        print("| layer (out×in) | rows all-reduced: bytes | ms | inputs + output grads gathered: bytes | ms |")
        print("|---|---:|---:|---:|---:|")
        for name, b_rows, b_gather, t_rows, t_gather in layer_rows:
            print(f"| {name} | {b_rows:,} | {1e3 * t_rows:.2f} | {b_gather:,} | {1e3 * t_gather:.2f} |")
    dist.barrier()
    dist.destroy_process_group()


def _single_process_factoring(args: argparse.Namespace) -> None:
    """The compute side: one process, the global batch, factor_linear on and off."""
    torch.set_num_threads(1)
    batch = _batch(2 * args.local_batch, args.d_in, seed=0)
    opts = {}
    for factor in (True, False):
        torch.manual_seed(0)
        model = Trunk3Heads(args.d_in, args.width, args.depth)
        opts[factor] = (model, mtl_opt.MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=1e-3), mtl_opt.get_aggregator(args.methods[-1]),
            shared_params=model.trunk, task_params=list(model.heads), factor_linear=factor))
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.warmup + args.rounds):
        for factor, (model, opt) in opts.items():
            start = time.perf_counter()
            opt.zero_grad()
            opt.step(model.losses(model(batch[0]), *batch[1:]))
            if r >= args.warmup:
                times[factor].append(time.perf_counter() - start)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"\nOne process, global batch {2 * args.local_batch}, {args.methods[-1]}: step "
          f"{1e3 * on:.2f} ms with factored linear layers, {1e3 * off:.2f} ms with their rows "
          f"(rows / factored = {off / on:.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["mgda", "nash_mtl", "came_grad"])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--local-batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--comm-rounds", type=int, default=30)
    parser.add_argument("--wide", action="store_true",
                        help="the factored-layer comparison only (defaults: width 1024, depth 2, "
                        "local batch 8)")
    args = parser.parse_args(argv)
    if args.wide:
        given = set(argv if argv is not None else sys.argv[1:])
        if "--width" not in given:
            args.width = 1024
        if "--depth" not in given:
            args.depth = 2
        if "--local-batch" not in given:
            args.local_batch = 8
    for name in args.methods:
        mtl_opt.get_aggregator(name)  # unknown names fail here, before any process starts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, args), nprocs=2, join=True)
    _single_process_factoring(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
