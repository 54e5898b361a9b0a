"""Time one training step of a shared encoder with two heads: plain LS versus each method.

    python benchmarks/bench_train_step.py                         # every method, both levels
    python benchmarks/bench_train_step.py --methods cagrad nash_mtl --steps 20 --threads 1

The model is an MLP encoder (``--width``/``--depth``; the defaults give ≈ 10⁷ shared
parameters) with a classification head (cross-entropy over 10 classes) and a regression head
(mean squared error); ``--model conv`` replaces the MLP by a small convolutional encoder
(three 3 × 3 convolutions with batch norm on 3 × 32 × 32 inputs, then a linear layer to the
representation). One step is forward, backward and ``torch.optim.SGD.step``:

* ``baseline``: ``(L_1 + L_2).backward()``, the step every ratio is quoted against, and
  ``(w * losses).sum().backward()`` with a constant ``w`` (``ratio_to_weighted_sum``, the median
  of per-round ratios): what LS and the loss weightings (UW, DWA, RLW, GLS, FAMO, STCH, IMTL-L,
  SI) are equal to. They read no Jacobian and are timed at the parameters only (one backward
  pass of the weighted sum at any level); FAMO's step excludes its post-step forward pass
  (``update(losses_after)``), which the training loop pays separately;
* ``parameters``: :func:`mtl_opt.mtl_backward` over the encoder's parameters, the heads trained
  by their own task; the linear layers' Gramian and update come from their inputs and output
  gradients (``factor_linear=True``, the default), the LayerNorm's from its Jacobian rows;
* ``rows``: the same with ``factor_linear=False``: the full Jacobian, K × d with d ≈ 10⁷;
* ``features``: :func:`mtl_opt.mtl_backward` with ``features=z`` (the encoder's output;
  representation-level aggregation, MGDA-UB): the Jacobian is K × (batch · width) and the
  encoder is traversed once.

Reports per (method, level): median / min / max step time, the ratio to the baseline's median,
whether the batched (vmap) Jacobian was used, and the peak extra memory of one step (CUDA:
``max_memory_allocated``; Linux CPU: growth of the resident set, see
:func:`mtl_opt.experiments.bench.measure_peak_memory`). Writes ``train_step.csv`` and
``train_step.md`` under ``--out`` and prints the table.

Allocator (Linux CPU): glibc serves every allocation of 32 MiB or more (here each K-row Jacobian
block of a 2048 × 2048 layer) from a fresh mapping, whose pages fault in again at every step.
With the default allocator the parameter-level step paid about a third of its time in those
faults; run with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch backs large CPU tensors with transparent
huge pages) or ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4000000000
MALLOC_TOP_PAD_=268435456`` (or a caching allocator such as jemalloc) to time the arithmetic. Both
must be in the environment before Python starts; the header line says whether THP was on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import mtl_opt
from mtl_opt.experiments.bench import (
    _fix_glibc_mmap_threshold,
    _synchronize,
    measure_peak_memory,
)
from mtl_opt.experiments.markdown_table import to_markdown


class SharedEncoderTwoHeads(nn.Module):
    """MLP encoder ``in → width (× depth) → rep`` shared by a 10-class and a regression head."""

    def __init__(self, d_in: int = 512, width: int = 2048, depth: int = 3, rep: int = 512,
                 n_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, width), nn.LayerNorm(width), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU()]
        layers += [nn.Linear(width, rep)]
        self.encoder = nn.Sequential(*layers)
        self.head_cls = nn.Linear(rep, n_classes)
        self.head_reg = nn.Linear(rep, 1)

    def losses_from(self, z: Tensor, y_cls: Tensor, y_reg: Tensor) -> list[Tensor]:
        return [
            nn.functional.cross_entropy(self.head_cls(z), y_cls),
            nn.functional.mse_loss(self.head_reg(z).squeeze(-1), y_reg),
        ]


class SharedConvEncoderTwoHeads(SharedEncoderTwoHeads):
    """Convolutional encoder ``3 × 32 × 32 → 32 → 64 → 64 channels → rep`` with the same heads."""

    def __init__(self, rep: int = 256, n_classes: int = 10, channels: int = 64) -> None:
        nn.Module.__init__(self)
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, padding=1), nn.BatchNorm2d(c // 2), nn.ReLU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Flatten(), nn.Linear(c * 8 * 8, rep),
        )
        self.head_cls = nn.Linear(rep, n_classes)
        self.head_reg = nn.Linear(rep, 1)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _needs_jacobian(method: str) -> bool:
    return mtl_opt.aggregator_class(mtl_opt.parse_method_spec(method)[0]).needs_jacobian


def _make_step(model: SharedEncoderTwoHeads, opt: torch.optim.Optimizer, batch, method: str | None,
               level: str, parallel):
    x, y_cls, y_reg = batch
    agg = None
    if method is not None:
        name, hyper = mtl_opt.parse_method_spec(method)
        agg = mtl_opt.get_aggregator(name, **hyper)
    info: dict = {}
    weights = torch.tensor([0.7, 1.3], device=x.device)

    def step():
        opt.zero_grad(set_to_none=True)
        z = model.encoder(x)
        losses = model.losses_from(z, y_cls, y_reg)
        if agg is None:
            if level == "weighted":  # the plain weighted-sum step, w a constant
                (weights * torch.stack(losses)).sum().backward()
            else:
                (losses[0] + losses[1]).backward()
        else:
            res = mtl_opt.mtl_backward(
                losses, model.encoder, agg, task_params=[model.head_cls, model.head_reg],
                features=z if level == "features" else None, parallel=parallel,
                factor_linear=level != "rows",
            )
            info["batched"] = res.batched
            info["factored"] = res.factored_params
        opt.step()

    return step, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=None, help="method specs (default: every registered method)")
    p.add_argument("--levels", nargs="+", default=["parameters", "rows", "features"],
                   choices=["parameters", "rows", "features"],
                   help="parameters: mtl_backward at the parameters (linear layers factored); rows: "
                        "the same with factor_linear=False (every Jacobian row); features: "
                        "features=z (default: all three)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", choices=["mlp", "conv"], default="mlp",
                   help="mlp: the MLP encoder (--width, --depth); conv: the convolutional one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parallel", choices=["auto", "batched", "loop"], default="auto",
                   help="mtl_backward's Jacobian: auto (batched with fallback), batched or loop")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="bench_results/train_step")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    # No allocator setting before the timed rounds: _fix_glibc_mmap_threshold (needed by the
    # memory pass below) serves every allocation above 64 KiB from a fresh mapping, whose page
    # faults would be timed as well (they doubled the cost of large fresh tensors here).
    parallel = {"auto": "auto", "batched": True, "loop": False}[args.parallel]
    model = (SharedEncoderTwoHeads(width=args.width, depth=args.depth) if args.model == "mlp"
             else SharedConvEncoderTwoHeads()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x_shape = (512,) if args.model == "mlp" else (3, 32, 32)
    batch = (torch.randn(args.batch, *x_shape, generator=g).to(device),
             torch.randint(0, 10, (args.batch,), generator=g).to(device),
             torch.randn(args.batch, generator=g).to(device))
    methods = args.methods or mtl_opt.available_aggregators()
    print(f"{args.model} shared encoder: {_count(model.encoder):,} parameters; heads: "
          f"{_count(model.head_cls) + _count(model.head_reg):,}; batch {args.batch}; "
          f"{args.threads} thread(s); {device}; THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}", flush=True)

    configs = [("baseline (L1+L2).backward()", None, "-"),
               ("baseline (w * L).sum().backward()", None, "weighted")]
    # Methods that read no Jacobian (LS, loss weightings) take one backward pass at any level:
    # timed once, at the parameters.
    configs += [(m, m, level) for level in args.levels for m in methods
                if level == "parameters" or _needs_jacobian(m)]
    steps = [_make_step(model, opt, batch, method, level, parallel) for _, method, level in configs]
    # Warm up, then interleave: one step of every configuration per round, so load spikes on a
    # shared machine hit all of them alike.
    for step, _ in steps:
        for _ in range(args.warmup):
            step()
    times: list[list[float]] = [[] for _ in configs]
    for r in range(args.steps):
        for i, (step, _) in enumerate(steps):
            _synchronize(device)
            t0 = time.perf_counter()
            step()
            _synchronize(device)
            times[i].append(1e3 * (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.steps} done", flush=True)
    peaks: list[float | None] = [None] * len(configs)
    if not args.no_memory:  # separate pass: the allocator setting it needs must not touch timings
        _fix_glibc_mmap_threshold()
        for i, (step, _) in enumerate(steps):
            step()
            peak = measure_peak_memory(step, device)
            peaks[i] = None if peak is None else peak / 2**20
    rows = []
    base_ms = statistics.median(times[0])
    weighted_ms = statistics.median(times[1])
    for (label, method, level), (_, info), ts, peak in zip(configs, steps, times, peaks):
        med = statistics.median(ts)
        # Per-round ratios to the weighted-sum step of the same round, then their median: the
        # interleaved rounds see the same load.
        per_round = statistics.median(t / b for t, b in zip(ts, times[1]))
        rows.append({"method": label, "level": level, "steps": args.steps, "median_ms": med,
                     "min_ms": min(ts), "max_ms": max(ts), "ratio_to_baseline": med / base_ms,
                     "ratio_to_weighted_sum": per_round,
                     "batched_jacobian": info.get("batched"),
                     "factored_params": info.get("factored"), "peak_mem_mb": peak})

    import pandas as pd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "train_step.csv", index=False)
    head = (f"Produced by `python benchmarks/bench_train_step.py {' '.join(sys.argv[1:])}`: "
            f"{args.model} shared encoder {_count(model.encoder):,} parameters, batch {args.batch}, "
            f"{args.threads} thread(s), {device}, THP_MEM_ALLOC_ENABLE="
            f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, median of {args.steps} steps.\n\n")
    (out / "train_step.md").write_text(head + to_markdown(df) + "\n")
    print(to_markdown(df))
    print(f"wrote {out / 'train_step.csv'} and {out / 'train_step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
