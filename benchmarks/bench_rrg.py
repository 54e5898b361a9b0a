"""Time the RRG workload: one training step per method and aggregation level, and decoding.

    python benchmarks/bench_rrg.py                                  # tiny, 32 px, CPU
    python benchmarks/bench_rrg.py --size base --image-size 224 --device cuda --amp --batch-size 16

One step is the forward pass of :class:`~mtl_opt.problems.rrg.model.RRGModel` on a fixed batch
of the synthetic set, the task losses and ``MultiTaskOptimizer.step`` (AdamW). Rows:

* ``baseline``: ``(L_report + 4 L_cls).backward()`` and ``AdamW.step()``: the single-loss step
  every ratio is quoted against;
* ``<method>/parameters``: the Jacobian over the encoder's parameters, aggregated by the method
  (linear layers factored where they qualify: no Jacobian rows for them, see
  :func:`mtl_opt.mtl_backward`'s ``factor_linear``; the row says how many parameters were);
* ``<method>/rows``: the same with ``factor_linear=False`` (every Jacobian row);
* ``<method>/representation``: the Jacobian over the encoder's output (MGDA-UB), one backward
  pass per task through the heads; ``representation-batched`` (``--levels``) the same with the
  batched call (``parallel=True``), which runs every head K times;
* ``greedy`` / ``beam3``: decoding the batch (per study).

The training-step rows are timed in interleaved rounds (each round runs every row once, so
a load change on a shared machine hits all rows alike): median, min and max over ``--steps``
rounds after ``--warmup`` calls of each row (CUDA timings synchronise); ``--clock cpu`` times
the process's CPU time (all threads) instead of the wall clock, steadier on a loaded machine
with ``--threads 1``. ``--levels`` picks the levels. Each step row also gets its peak memory
above the state before the call (:func:`mtl_opt.experiments.bench.measure_peak_memory`: CUDA
``max_memory_allocated``; Linux CPU: growth of the resident set) and that peak minus the
baseline's. Prints a Markdown table; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import mtl_opt
from mtl_opt.experiments.bench import measure_peak_memory
from mtl_opt.problems.rrg.r2gen import collate_rrg
from mtl_opt.problems.rrg.synthetic import SyntheticCXR
from mtl_opt.problems.rrg.tokenizer import ReportTokenizer
from mtl_opt.problems.rrg.model import RRGModel, model_config_for_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    return _time_rounds([fn], device, steps, warmup)[0]


def _time_rounds(fns, device: torch.device, rounds: int, warmup: int,
                 clock=time.perf_counter) -> list[list[float]]:
    """Times of each of ``fns`` over ``rounds`` interleaved rounds (every fn once per round)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            t = clock()
            fn()
            _sync(device)
            ts.append(clock() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["ls", "came_grad", "mgda", "pcgrad", "cagrad"])
    p.add_argument("--levels", nargs="+", default=["parameters", "rows", "representation"],
                   choices=["parameters", "rows", "representation", "representation-batched"],
                   help="representation-batched: the representation level with parallel=True "
                        "(the batched call through the heads), for comparison")
    p.add_argument("--steps", type=int, default=10, help="timed rounds")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall clock or the process's CPU time (all threads)")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding rows")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None)
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

    rows: list[tuple[str, list[float]]] = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def baseline():
        out = forward()
        opt.zero_grad()
        (out["report"] + 4.0 * out["classification"]).backward()
        opt.step()

    steps: list[tuple[str, object, object]] = [("baseline (weighted sum)", baseline, None)]
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
                mto.step(losses, task_weights=tw,
                         features=out["memory"] if level.startswith("representation") else None)
            steps.append((f"{name}/{level}", step, mto))
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times = _time_rounds([fn for _, fn, _ in steps], device, args.steps, args.warmup, clock)
    peaks = [measure_peak_memory(fn, device) for _, fn, _ in steps]
    for (label, _, mto), ts in zip(steps, times):
        if label.endswith("/parameters"):
            res = mto.last_result
            label += f" ({res.factored_params if res is not None else 0} factored)"
        rows.append((label, ts))

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
    mib = 1 << 20
    base_peak = peaks[0]
    lines = [
        f"RRG step times: size {args.size} ({n['total']:,} parameters, {n['encoder']:,} shared), "
        f"{args.image_size} px, batch {args.batch_size}, {args.views} view(s), device {device}, "
        f"amp {args.amp}, torch threads {torch.get_num_threads()}, {args.steps} interleaved "
        f"rounds, {args.clock} clock; peak memory: "
        + ("CUDA max_memory_allocated" if device.type == "cuda" else "resident-set growth"),
        "",
        "| row | median ms | min ms | max ms | × baseline | peak MiB | extra peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (label, ts) in enumerate(rows):
        med = statistics.median(ts)
        ratio = f"{med / base:.2f}" if "per study" not in label else "-"
        peak = peaks[i] if i < len(peaks) else None
        pk = "-" if peak is None else f"{peak / mib:.1f}"
        extra = "-" if peak is None or base_peak is None else f"{(peak - base_peak) / mib:+.1f}"
        lines.append(f"| {label} | {1e3 * med:.1f} | {1e3 * min(ts):.1f} | {1e3 * max(ts):.1f} "
                     f"| {ratio} | {pk} | {extra} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
