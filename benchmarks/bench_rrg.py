"""Time the RRG workload: one training step per method and aggregation level, and decoding.

    python benchmarks/bench_rrg.py                                  # tiny, 32 px, CPU
    python benchmarks/bench_rrg.py --size base --image-size 224 --device cuda --amp --batch-size 16

One step is the forward pass of :class:`~mtl_opt.problems.rrg.model.RRGModel` on a fixed batch
of the synthetic set, the task losses and ``MultiTaskOptimizer.step`` (AdamW). Rows:

* ``baseline``: ``(L_report + 4 L_cls).backward()`` and ``AdamW.step()``: the single-loss step
  every ratio is quoted against;
* ``<method>/parameters``: the Jacobian over the encoder's parameters, aggregated by the method
  (linear layers and convolutions factored where they qualify: no Jacobian rows for them, see
  :func:`mtl_opt.mtl_backward`'s ``factor_linear``; the row says how many parameters were);
* ``<method>/parameters-linear``: the same with linear layers factored, convolutions not;
* ``<method>/parameters-unsplit``: the same with the batched pass run through every task's head
  too (as before :mod:`mtl_opt._task_split`);
* ``<method>/rows``: the same with ``factor_linear=False`` (every Jacobian row);
* ``<method>/representation``: the Jacobian over the encoder's output (MGDA-UB), one backward
  pass per task through the heads; ``representation-batched`` (``--levels``) the same with the
  batched call (``parallel=True``), which runs every head K times;
* ``<method>/autogram (TorchJD)`` (``--autogram``, Gramian weightings): TorchJD's
  ``torchjd.autogram.Engine`` over the encoder computes the Gramian of the two losses, the same
  method's weights ``β`` come from it, and ``(β · losses).backward()`` gives the update (run on a
  copy of the model with the same weights, since the engine hooks every module it is given);
* ``greedy`` / ``beam3``: decoding the batch (per study).

Reports median, min and max over ``--steps`` timed rounds after ``--warmup``; within a round every
row takes one step in turn (interleaved, so that a loaded machine slows all rows alike). CUDA
timings synchronise; ``--clock cpu`` times the process's CPU time instead of the wall clock
(steadier on a shared CPU). ``--memory`` adds each step's extra peak memory over the baseline
step: on CUDA ``max_memory_allocated``; on the CPU the peak resident set of a fresh process that
runs only that row, minus the baseline's. Prints a Markdown table; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import mtl_opt
import mtl_opt._layerwise as layerwise
import mtl_opt._task_split as task_split
from mtl_opt.aggregator import is_gramian_weighting
from mtl_opt.problems.rrg.r2gen import collate_rrg
from mtl_opt.problems.rrg.synthetic import SyntheticCXR
from mtl_opt.problems.rrg.tokenizer import ReportTokenizer
from mtl_opt.problems.rrg.model import RRGModel, model_config_for_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(rows: list[tuple[str, object]], device: torch.device, steps: int, warmup: int,
                 clock=time.perf_counter) -> list[tuple[str, list[float]]]:
    """Times of each row's step over ``steps`` rounds; every round runs each row once in turn."""
    for _ in range(warmup):
        for _, fn in rows:
            fn()
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(steps):
        for k, (_, fn) in enumerate(rows):
            _sync(device)
            t = clock()
            fn()
            _sync(device)
            times[k].append(clock() - t)
    return [(label, ts) for (label, _), ts in zip(rows, times)]


def _time(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    return _interleaved([("", fn)], device, steps, warmup)[0][1]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_mb(fn, device: torch.device) -> float:
    """Peak memory (MB) of three steps above the memory held before them: allocated on CUDA;
    on the CPU the resident set of this process (which runs nothing else), its high-water mark
    reset before the steps (Linux ``/proc/self/clear_refs``)."""
    fn()  # first step: optimizer state, caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    for _ in range(3):
        fn()
    return _status_mb("VmHWM") - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["ls", "came_grad", "mgda", "pcgrad", "cagrad"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None)
    p.add_argument("--autogram", action="store_true",
                   help="add TorchJD autogram rows (Gramian weightings; needs torchjd)")
    p.add_argument("--levels", nargs="+", default=["parameters", "rows", "representation"],
                   choices=["parameters", "parameters-linear", "parameters-unsplit", "rows",
                            "representation", "representation-batched"],
                   help="representation-batched: the representation level with parallel=True "
                   "(the batched call through every head)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--memory", action="store_true", help="add each row's extra peak memory")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding rows")
    p.add_argument("--memory-row", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    data = SyntheticCXR(max(64, args.batch_size), image_size=args.image_size, views=args.views, seed=0)
    tok = ReportTokenizer.fit(data.reports(), dataset="synthetic")
    batch = collate_rrg([data[i] for i in range(args.batch_size)], tok)
    images, tokens, classes = (batch[k].to(device) for k in ("images", "tokens", "classes"))
    cfg = model_config_for_size(args.size, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                bos_id=tok.bos_id, eos_id=tok.eos_id)
    model = RRGModel(cfg).to(device)
    weights = torch.tensor([1.0, 4.0], dtype=torch.float64)
    amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.amp
           else torch.autocast(device_type=device.type, enabled=False))

    def forward():
        with amp:
            return model(images, tokens, classes)

    steps: list[tuple[str, object]] = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def baseline():
        out = forward()
        opt.zero_grad()
        (out["report"] + 4.0 * out["classification"]).backward()
        opt.step()

    steps.append(("baseline (weighted sum)", baseline))
    jd_model = jd_engine = None
    if args.autogram:
        from torchjd.autogram import Engine

        jd_model = copy.deepcopy(model)  # the engine hooks its modules: a copy, same weights
        jd_engine = Engine(jd_model.encoder, batch_dim=None)
        jd_opt = torch.optim.AdamW(jd_model.parameters(), lr=1e-4)
    factored_of: dict[str, object] = {}
    for name in args.methods:
        agg = mtl_opt.get_aggregator(name)
        tw = weights if agg.accepts_task_weights else None
        scale = [1.0, 1.0] if agg.accepts_task_weights else [1.0, 4.0]
        for level in args.levels:
            mto = mtl_opt.MultiTaskOptimizer(
                torch.optim.AdamW(model.parameters(), lr=1e-4), agg, model.shared_parameters(),
                task_params=model.task_parameters(), factor_linear=level != "rows",
                parallel=True if level == "representation-batched" else "auto",
            )

            def step(level=level, mto=mto, tw=tw, scale=scale):
                out = forward()
                losses = [scale[0] * out["report"], scale[1] * out["classification"]]
                mto.zero_grad()
                layerwise._FACTOR_CONV = level != "parameters-linear"  # linear layers only
                task_split._SPLIT_HEADS = level != "parameters-unsplit"  # batched through heads
                try:
                    mto.step(losses, task_weights=tw,
                             features=out["memory"] if level.startswith("representation") else None)
                finally:
                    layerwise._FACTOR_CONV = task_split._SPLIT_HEADS = True
            label = f"{name}/{level}"
            steps.append((label, step))
            if level.startswith("parameters"):
                factored_of[label] = mto
        if args.autogram and is_gramian_weighting(agg):
            def autogram_step(agg=agg, tw=tw, scale=scale):
                with amp:
                    out = jd_model(images, tokens, classes)
                L = torch.stack([scale[0] * out["report"], scale[1] * out["classification"]])
                M = jd_engine.compute_gramian(L)
                beta = agg.weights(M.double().cpu(), losses=L.detach().double().cpu(),
                                   task_weights=tw)
                jd_opt.zero_grad()
                L.backward(beta.to(dtype=L.dtype, device=L.device))
                jd_opt.step()
            steps.append((f"{name}/autogram (TorchJD)", autogram_step))

    if args.memory_row is not None:  # a fresh process measuring one row's peak memory
        print(f"PEAK_MB {_peak_mb(steps[args.memory_row][1], device):.1f}")
        return
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = _interleaved(steps, device, args.steps, args.warmup, clock)
    for k, (label, ts) in enumerate(rows):
        mto = factored_of.get(label)
        if mto is not None:
            factored = mto.last_result.factored_params if mto.last_result is not None else 0
            rows[k] = (f"{label} ({factored} factored)", ts)
    peaks: list[float | None] = [None] * len(rows)
    if args.memory:
        for k in range(len(steps)):
            argv = [a for a in sys.argv[1:] if a not in ("--memory",)]
            done = subprocess.run([sys.executable, __file__, *argv, "--memory-row", str(k)],
                                  capture_output=True, text=True, check=True, env=os.environ)
            peaks[k] = float(done.stdout.split("PEAK_MB")[-1].split()[0])

    model.eval()
    B = images.shape[0]
    for label, beam in () if args.no_decode else (("greedy (per study)", 1), ("beam3 (per study)", 3)):
        def dec(beam=beam):
            with amp:
                model.generate(images, max_length=tok.max_length - 1, beam_size=beam)
        ts = _time(dec, device, max(1, args.steps // 5), 1)
        rows.append((label, [t / B for t in ts]))

    n = model.n_parameters()
    base = statistics.median(rows[0][1])
    lines = [
        f"RRG step times: size {args.size} ({n['total']:,} parameters, {n['encoder']:,} shared), "
        f"{args.image_size} px, batch {args.batch_size}, {args.views} view(s), device {device}, "
        f"amp {args.amp}, torch threads {torch.get_num_threads()}, {args.steps} timed steps, "
        f"clock {args.clock}, rounds interleaved",
        "",
        "| row | median ms | min ms | max ms | × baseline | extra peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for k, (label, ts) in enumerate(rows):
        med = statistics.median(ts)
        ratio = f"{med / base:.2f}" if "per study" not in label else "-"
        extra = (f"{peaks[k] - peaks[0]:.0f}" if k < len(peaks) and peaks[k] is not None
                 and peaks[0] is not None else "-")
        lines.append(f"| {label} | {1e3 * med:.1f} | {1e3 * min(ts):.1f} | {1e3 * max(ts):.1f} | {ratio} | {extra} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
