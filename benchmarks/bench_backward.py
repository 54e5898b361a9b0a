"""Cost of mtl_backward against a plain ``.backward()`` of the summed loss.

Times one training step's backward work (forward excluded) on a shared encoder with K linear
heads: the plain ``sum(losses).backward()``, ``mtl_backward`` with the batched Jacobian and with
the per-task loop, and the graph walk that finds the non-shared parameters. Run::

    python benchmarks/bench_backward.py [--device cuda] [--repeats 20]

Prints a Markdown table (median milliseconds over the repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import mtl_opt
from mtl_opt.backward import _reachable_leaves


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.LayerNorm(width), nn.GELU(),
        nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 64),
    )


def transformer(width: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(64, 4, width, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def timed_interleaved(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median milliseconds of each function, run round-robin so that load on a shared machine
    affects every variant alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def bench(name: str, trunk: nn.Module, x: torch.Tensor, K: int, repeats: int, device: str) -> dict:
    heads = nn.ModuleList([nn.Linear(64, 1) for _ in range(K)]).to(device)
    trunk = trunk.to(device)
    params = [*trunk.parameters(), *heads.parameters()]

    def losses():
        z = trunk(x)
        z = z.mean(dim=1) if z.dim() == 3 else z
        return [h(z).pow(2).mean() for h in heads]

    def clear():
        for p in params:
            p.grad = None

    def plain():
        clear()
        torch.stack(losses()).sum().backward()

    def forward_only():
        losses()

    def ours(parallel, agg):
        def run():
            clear()
            mtl_opt.mtl_backward(losses(), trunk, agg, task_params=list(heads), parallel=parallel)
        return run

    def walk():
        ls = losses()
        t0 = time.perf_counter()
        _reachable_leaves(ls)
        return time.perf_counter() - t0

    ls, came = mtl_opt.get_aggregator("ls"), mtl_opt.get_aggregator("came_grad")
    t = timed_interleaved(
        {
            "forward": forward_only,
            "plain backward": plain,
            "LS batched": ours(True, ls),
            "LS loop": ours(False, ls),
            "CAME-Grad batched": ours(True, came),
            "CAME-Grad loop": ours(False, came),
        },
        repeats,
        device,
    )
    row = {"model": name, "K": K, "d_shared": sum(p.numel() for p in trunk.parameters())}
    for key, value in t.items():
        if key != "forward":
            row[key] = value - t["forward"]
    row["graph walk"] = 1e3 * statistics.median(walk() for _ in range(repeats))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for K in (2, 4, 8):
        rows.append(bench("mlp-256", mlp(256), torch.randn(128, 64, device=args.device), K,
                          args.repeats, args.device))
        rows.append(bench("transformer-2x64", transformer(128), torch.randn(16, 32, 64, device=args.device),
                          K, args.repeats, args.device))
    from mtl_opt.experiments.markdown_table import to_markdown

    print(to_markdown([{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]))
    print(f"\nbackward-only milliseconds (median of {args.repeats}, forward time subtracted), "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
