"""Timing of the comparison runner: the published Toy protocol for all six methods.

    python benchmarks/bench_compare.py                 # 35 000 steps, 5 starts, 6 methods
    python benchmarks/bench_compare.py --steps 5000    # shorter
    python benchmarks/bench_compare.py --suite         # also time `mtl-opt compare`'s default suite

Reports wall-clock and process CPU time (on a shared machine the CPU time is the steadier
figure), the load average before and after, and each method's share of a step. Run with
``OMP_NUM_THREADS=1``: the tensors are tiny and threads only add overhead.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=35000)
    parser.add_argument("--methods", nargs="+", default=["ls", "pcgrad", "mgda", "cagrad", "nash_mtl", "came_grad"])
    parser.add_argument("--suite", action="store_true", help="also time the default compare suite")
    args = parser.parse_args()

    import torch

    from mtl_opt.experiments.runner import run_methods

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average before {os.getloadavg()[0]:.2f}")
    run_methods("toy", args.methods, steps=20, record_every=10)  # warm-up: imports, caches
    t0, c0 = time.perf_counter(), time.process_time()
    runs = run_methods("toy", args.methods, steps=args.steps, lr=1e-3, record_every=100)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_runs = sum(r.n_runs for r in runs)
    print(f"Toy protocol: {len(runs)} methods x {runs[0].n_runs} starts = {n_runs} runs, {args.steps} steps, "
          f"Adam lr 1e-3")
    print(f"  total {wall:.1f} s wall, {cpu:.1f} s CPU; {wall / args.steps * 1e6:.0f} us wall "
          f"({cpu / args.steps * 1e6:.0f} us CPU) per step of all runs")
    for r in runs:
        print(f"  {r.method:10s} {r.time_per_step * 1e6:7.1f} us/step (own aggregation + 1/{len(runs)} of the "
              f"shared Jacobian/optimizer work), front distance from each start "
              + " ".join(f"{v:.3g}" for v in r.front_distance.tolist()))
    print(f"load average after {os.getloadavg()[0]:.2f}")

    if args.suite:
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "mtl_opt.cli", "compare", "--out", f"{tmp}/suite",
                                  "--quiet"], capture_output=True, text=True, check=True)
            print(f"default suite (`mtl-opt compare`): {time.perf_counter() - t0:.1f} s wall, process included")
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
