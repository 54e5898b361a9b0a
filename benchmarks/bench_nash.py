"""Nash-MTL: time per weight solve of the exact solver vs the original's cvxpy formulation.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_nash.py [--calls-exact 2000] [--calls-cvxpy 40]

For K = 2, 4, 8 both solvers get the same slowly drifting sequence of Gramians (as in training:
every call re-solves, warm-started from the previous weights; the directions drift by a random
walk and the gradient norms shrink by 1% per step, see ``drifting_gramians``). Printed, as medians over calls:

* ``solve``: the Nash solve alone (``nash_weights`` on one Gramian vs the cvxpy SCA ``nash_cvxpy`` with
  its compiled Problem; same regularised equations);
* ``call``: a whole ``NashMTL.weights(M)`` call (input checks, state, clipping), the Gramian
  given (no matmul timed);
* ``batched``: ``NashMTL.batch_weights`` on a (B, K, K) stack (the studies' vectorised path),
  and the part of it spent in the method's own ``_batch_weights`` (solve, state, clipping);
* the SCA iterations per solve and the largest relative difference of the two solvers' weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from mtl_opt.methods import NashMTL
from mtl_opt.solvers.nash import NashSCAProblem, nash_cvxpy, nash_weights


def drifting_gramians(K: int, n: int, d: int = 64, seed: int = 0, shrink: float = 0.99) -> list[torch.Tensor]:
    """Gramians of a Jacobian that drifts as in training: every step each gradient gets an
    independent random change of 5% of its size (a random walk: the directions drift) and the
    whole Jacobian shrinks by ``shrink`` (1% per step by default: the gradient norms decay as the
    loss goes down, so the Gramian's scale changes between solves)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, d, generator=gen, dtype=torch.float64)
    out = []
    for step in range(n):
        G = G + 0.05 * torch.randn(K, d, generator=gen, dtype=torch.float64)
        J = G * shrink**step
        out.append(J @ J.T)
    return out


def median_time(fn, inputs) -> tuple[float, list]:
    """Median CPU time of ``fn(x)`` over ``inputs`` (process time: robust on a shared machine)."""
    results, times = [], []
    for x in inputs:
        t0 = time.process_time()
        results.append(fn(x))
        times.append(time.process_time() - t0)
    return statistics.median(times), results


def chained(solve):
    """Warm-start each solve from the previous one's weights, as the aggregator does."""
    state = {"alpha": None}

    def run(M):
        alpha, info = solve(M, state["alpha"])
        state["alpha"] = alpha
        return alpha, info

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls-exact", type=int, default=2000)
    parser.add_argument("--calls-cvxpy", type=int, default=40)
    parser.add_argument("--batch", type=int, default=5, help="B of the batched timing")
    args = parser.parse_args()

    print(f"# Nash-MTL solve time: {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| K | exact solve (us) | cvxpy solve (ms) | speedup | exact call (us) | cvxpy call (ms) "
          f"| batched exact, B={args.batch} (us) | of which the solve (us) | SCA iters | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for K in (2, 4, 8):
        gramians = drifting_gramians(K, max(args.calls_exact, args.calls_cvxpy))
        arrays = [M.numpy() for M in gramians]

        t_exact, exact_out = median_time(chained(nash_weights), arrays[: args.calls_exact])
        problems: dict[int, NashSCAProblem] = {}
        nash_cvxpy(arrays[0], None, 20, problems)  # compile the Problem once (not timed)
        t_sca, sca_out = median_time(
            chained(lambda M, warm: nash_cvxpy(M, warm, 20, problems)), arrays[: args.calls_cvxpy]
        )
        diff = max(
            float(np.max(np.abs(a - b) / np.abs(b)))
            for (a, _), (b, _) in zip(sca_out, exact_out[: args.calls_cvxpy])
        )
        iters = statistics.mean(info["iterations"] for _, info in sca_out)

        exact_agg = NashMTL()
        t_call_exact, _ = median_time(exact_agg.weights, gramians[: args.calls_exact])
        sca_agg = NashMTL(solver="cvxpy")
        sca_agg.weights(gramians[0])
        sca_agg.reset()
        t_call_sca, _ = median_time(sca_agg.weights, gramians[: args.calls_cvxpy])

        stack = torch.stack(gramians[: args.batch])
        stacks = [stack * (1 + 1e-3 * i) for i in range(args.calls_exact)]
        batched = NashMTL()
        t_batch, _ = median_time(batched.batch_weights, stacks)
        batched.reset()
        t_batch_own, _ = median_time(
            lambda S: batched._batch_weights(S, losses=None, task_weights=None), stacks
        )
        print(f"| {K} | {t_exact * 1e6:.1f} | {t_sca * 1e3:.2f} | {t_sca / t_exact:.0f}x "
              f"| {t_call_exact * 1e6:.1f} | {t_call_sca * 1e3:.2f} | {t_batch * 1e6:.1f} "
              f"| {t_batch_own * 1e6:.1f} "
              f"| {iters:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
