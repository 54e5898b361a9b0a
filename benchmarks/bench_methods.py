"""Timing of the Gramian aggregators' K × K work (LS, PCGrad, MGDA, CAGrad, CAME-Grad).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_methods.py [--methods ...] [--batch 1 64 1024]

Measures ``_batch_weights`` (what one batched study step costs on top of the two matmuls) for
B independent problems at K = 2 and 3 (the vectorised solvers), and single problems at larger K,
taking the minimum over repeats (robust to a shared machine). Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import timeit

import torch

import mtl_opt


def time_batch_weights(name: str, B: int, K: int, d: int = 16, seed: int = 0,
                       number: int = 20, repeat: int = 7) -> float:
    """Microseconds per ``_batch_weights`` call of method ``name`` on B random Gramians (B, K, K)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(B, K, d, generator=gen, dtype=torch.float64)
    M = G @ G.transpose(1, 2)
    agg = mtl_opt.get_aggregator(name, **({"seed": 0} if name == "pcgrad" else {}))
    if not isinstance(agg, mtl_opt.GramianAggregator):
        raise ValueError(f"{name} is not a Gramian weighting")
    losses = torch.ones(B, K, dtype=torch.float64) if agg.uses_losses else None

    def step() -> None:
        agg._batch_weights(M, losses=losses, task_weights=None)

    return min(timeit.repeat(step, number=number, repeat=repeat)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["ls", "pcgrad", "mgda", "cagrad", "came_grad"])
    parser.add_argument("--batch", nargs="*", type=int, default=[1, 64, 1024])
    parser.add_argument("--tasks", nargs="*", type=int, default=[4, 8],
                        help="numbers of tasks timed on a single problem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'method':<10} {'K':>2} {'B':>5} {'us/call':>9}")
    for name in args.methods:
        for K in (2, 3):
            for B in args.batch:
                print(f"{name:<10} {K:>2} {B:>5} {time_batch_weights(name, B, K):9.1f}")
        for K in args.tasks:
            print(f"{name:<10} {K:>2} {1:>5} {time_batch_weights(name, 1, K, number=5, repeat=5):9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
