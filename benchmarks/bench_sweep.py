"""Overhead of a Ray Tune sweep: Ray start-up, and a small grid with and without actor reuse.

Starts an embedded Ray once, then runs the same 9-trial grid (κ × ν on the toy problem, short runs,
so the time is Ray's and the workers', not the training's) with ``reuse_actors=True`` (the
default of :func:`mtl_opt.experiments.sweep`) and ``False`` (a fresh worker per trial, which
re-imports torch). Run::

    python benchmarks/bench_sweep.py [--steps 100] [--cpus 2]

Prints a Markdown table of wall-clock seconds.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the embedded Ray (default all)")
    args = parser.parse_args()

    from mtl_opt.experiments import sweep
    from mtl_opt.experiments.ray_session import quiet_ray_environment

    quiet_ray_environment()
    t0 = time.perf_counter()
    import ray

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    rows = [("embedded ray.init (incl. import)", time.perf_counter() - t0)]
    space = {"kappa": [1.0, 1.5, 2.0], "nu": [0.0, 0.2, 0.5]}
    try:
        for reuse in (True, False):
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                table = sweep("toy", "came_grad", space, steps=args.steps, out=out,
                              reuse_actors=reuse, verbose=False)
                elapsed = time.perf_counter() - t
            assert (table["status"] == "COMPLETED").all(), table[["trial_id", "status", "error"]]
            rows.append((f"9-trial grid, {args.steps} steps, reuse_actors={reuse}", elapsed))
    finally:
        ray.shutdown()
    from mtl_opt.experiments.markdown_table import to_markdown

    print(to_markdown([(name, f"{seconds:.1f}") for name, seconds in rows], columns=["what", "seconds"]))


if __name__ == "__main__":
    main()
