"""``mtl-opt compare --workload NAME``: methods on a training workload, reported as the field does.

Every method (``--methods``, the grammar of ``mtl-opt compare``) is trained by
:func:`mtl_opt.experiments.trainer.train` on every seed (``--seeds``: ``0,1,2`` or ``3x``), and
so are the **single-task baselines**: for each seed and each task, one model trained on that
task alone (linear scalarization on its one loss, the same settings otherwise). Each task's
metrics of the baseline come from the model of that task. ``single_task`` in ``--methods`` only
decides whether the baselines also appear in the printed table; they are always trained (or
reused), because Δm% needs them.

**Baseline cache.** A baseline depends only on the workload (name and options), the task, the
seed and the training settings (epochs or steps, batch size, learning rate, optimizer, weight
decay, gradient clipping, task weights, aggregation level, device type, AMP), not on the
methods. Each is kept in a cache folder (``--baseline-cache``, default
``runs/single-task-cache``) under a name that holds those settings' hash: a second compare with
the same settings reuses it, and says so. An entry is trained in a private temporary folder and
moved into place with one rename, so two studies never share a half-written entry.

The study folder (``runs/compare-<UTC time>`` by default, claimed before any work) holds
``config.json`` (how to rerun it), ``runs.csv`` (one row per method and seed: every metric,
Δm%, the conflict statistics, times), ``baselines.csv``, ``summary.csv`` / ``summary.md`` (mean
± 95 % CI over seeds, Δm%, mean rank; :mod:`mtl_opt.experiments.field_tables`), ``field.html``
(plotly) and ``runs/<method>-seed<s>/``, each method's run folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_WORKLOAD_METHODS", "baseline_key", "run_workload_compare", "single_task_baseline"]

#: The methods of ``compare --workload`` without ``--methods``: the core six.
DEFAULT_WORKLOAD_METHODS = ("ls", "mgda", "pcgrad", "cagrad", "nash_mtl", "came_grad")
_BASELINE_SETTINGS = ("workload", "seed", "epochs", "steps", "batch_size", "lr", "optimizer",
                      "weight_decay", "grad_clip", "task_weights", "aggregate_at", "amp", "amp_dtype")
_CACHE_FORMAT = 1


def baseline_key(cfg: Any, task: str) -> str:
    """The cache name of a single-task baseline: workload, task, seed and a hash of every
    setting it depends on (see the module docstring)."""
    import torch

    settings = {k: getattr(cfg, k) for k in _BASELINE_SETTINGS}
    settings["task"] = task
    settings["device_type"] = torch.device(cfg.resolved_device()).type
    settings["format"] = _CACHE_FORMAT
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.workload.split(":", 1)[0])
    return f"{name}-{task}-seed{cfg.seed}-{digest}"


def single_task_baseline(cfg: Any, task: str, cache: Path) -> tuple[dict[str, Any], bool]:
    """``(result, reused)``: the run of ``cfg`` on ``task`` alone, from ``cache`` when it holds
    it, else trained and stored there (atomically)."""
    from mtl_opt.experiments.trainer import train

    entry = cache / baseline_key(cfg, task)
    result_file = entry / "run" / "result.json"
    if result_file.is_file():
        try:
            return json.loads(result_file.read_text(encoding="utf-8")), True
        except (OSError, ValueError) as exc:
            raise ValueError(f"single-task cache entry {result_file} is unreadable ({exc}); "
                             f"delete {entry} to retrain it") from None
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache))
    try:
        result = train(dataclasses.replace(cfg, method="ls", task=task, out=str(tmp / "run")))
        result = {k: v for k, v in result.items() if k not in ("history", "epochs", "run_dir")}
        try:
            os.rename(tmp, entry)  # atomic; fails if another study stored it first
        except OSError:
            if not (entry / "run" / "result.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result, False


def _label_dir(label: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label) + f"-seed{seed}"


def check_workload_args(args: Any) -> None:
    """Refuse the options of Pareto-problem studies given with ``--workload`` (one line)."""
    given = [opt for opt, value in (("--problems", args.problems), ("--protocol", args.protocol),
                                    ("--config", args.config), ("--dtype", args.dtype),
                                    ("--starts", args.starts != "all"),
                                    ("--start-jitter", args.start_jitter != 0.0),
                                    ("--workers", args.workers != 1)) if value]
    if given:
        raise ValueError(f"{', '.join(given)} belong to Pareto-problem studies; drop them with --workload")


def run_workload_compare(args: Any) -> int:
    import mtl_opt
    from mtl_opt.experiments.shared_args import claim_out, parse_methods, parse_seeds
    from mtl_opt.experiments.field_tables import BASELINE
    from mtl_opt.experiments.trainer import TrainConfig
    from mtl_opt.problems.workload import training_workload_from_spec, workload_spec_with

    check_workload_args(args)
    workload = training_workload_from_spec(workload_spec_with(args.workload, subset=args.subset))
    seeds = list(parse_seeds(args.seeds))
    specs = parse_methods(args.methods) or list(DEFAULT_WORKLOAD_METHODS)
    show_baseline = BASELINE in specs
    methods = [s for s in specs if s != BASELINE]  # only single_task: the baselines alone
    if len(set(specs)) != len(specs):
        raise ValueError(f"--methods lists a method twice: {specs}")
    for spec in methods:
        name, hyper = mtl_opt.parse_method_spec(spec)
        mtl_opt.get_aggregator(name, **hyper)  # unknown names and bad values raise here
    base = TrainConfig(
        workload=workload.spec(), method="ls", seed=seeds[0], epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, task_weights=args.task_weights,
        aggregate_at=args.aggregate_at, device=args.device, amp=args.amp, amp_dtype=args.amp_dtype,
        log_every=1, eval_every=args.eval_every,
    )
    base.validate()
    for seed in seeds:
        dataclasses.replace(base, seed=seed).validate()
    cache = Path(args.baseline_cache)
    with claim_out(args.out, prefix="compare", command="mtl-opt compare") as folder:
        return _run_and_write(args, folder.path, workload, base, methods, seeds, cache, show_baseline)


def _run_and_write(args: Any, out: Path, workload: Any, base: Any, methods: list[str], seeds: list[int],
                   cache: Path, show_baseline: bool) -> int:
    import pandas as pd

    from mtl_opt.experiments.environment import environment_stamp
    from mtl_opt.experiments.field_tables import (
        BASELINE,
        delta_m,
        field_display,
        field_figure,
        field_summary,
    )
    from mtl_opt.experiments.markdown_table import to_markdown
    from mtl_opt.experiments.trainer import train

    say = (lambda *a: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    baseline_rows, baseline_runs = [], []
    for seed in seeds:
        cfg = dataclasses.replace(base, seed=seed)
        row: dict[str, Any] = {"seed": seed}
        for task in workload.task_names:
            t = time.perf_counter()
            result, reused = single_task_baseline(cfg, task, cache)
            entry = cache / baseline_key(cfg, task)
            baseline_runs.append(str(entry))
            say(f"single_task {task} seed {seed}: "
                + ("reused " + str(entry) if reused else f"trained in {time.perf_counter() - t:.1f} s"))
            for m in workload.metrics_of(task):
                row[m.name] = result["test"][m.name]
            row[f"train_time_s_{task}"] = result["train_time_s"]
            row[f"cached_{task}"] = reused
        baseline_rows.append(row)
    baselines = pd.DataFrame(baseline_rows)
    base_by_seed = {int(r["seed"]): r for r in baseline_rows}
    run_rows = []
    for label in methods:
        for seed in seeds:
            t = time.perf_counter()
            run_dir = out / "runs" / _label_dir(label, seed)
            result = train(dataclasses.replace(base, method=label, seed=seed, out=str(run_dir)))
            row = {"method": label, "seed": seed}
            row.update({m.name: result["test"][m.name] for m in workload.metrics})
            row["delta_m"] = delta_m(result["test"], base_by_seed[seed], workload.metrics)
            row.update({"cos_mean": result["cos_mean"], "conflict_share": result["conflict_share"],
                        "conflict_steps": result["conflict_steps"], "steps": result["steps"],
                        "train_time_s": result["train_time_s"], "run_dir": str(run_dir.relative_to(out))})
            run_rows.append(row)
            say(f"{label} seed {seed}: " + " ".join(f"{m.name}={row[m.name]:.4f}" for m in workload.metrics)
                + f" Δm%={row['delta_m']:+.2f} conflict share {row['conflict_share']:.2f} "
                f"({time.perf_counter() - t:.1f} s)")
    elapsed = time.perf_counter() - t0
    runs = pd.DataFrame(run_rows, columns=["method", "seed", *(m.name for m in workload.metrics), "delta_m",
                                           "cos_mean", "conflict_share", "conflict_steps", "steps",
                                           "train_time_s", "run_dir"])
    summary = field_summary(runs, baselines, workload.metrics)
    if not show_baseline:
        summary = summary[summary["method"] != BASELINE].reset_index(drop=True)
    shown = field_display(summary, workload.metrics)
    rerun = _rerun_command(args, workload, methods + ([BASELINE] if show_baseline else []), seeds)
    config = {
        "workload": workload.spec(), "workload_options": dict(workload.options),
        "methods": methods, "show_single_task": show_baseline, "seeds": seeds,
        "training": {k: v for k, v in base.to_dict().items() if k not in ("method", "seed", "task", "out")},
        "baseline_cache": str(cache), "baseline_runs": baseline_runs,
        "elapsed_seconds": round(elapsed, 3), "environment": environment_stamp(), "rerun": rerun,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    runs.to_csv(out / "runs.csv", index=False)
    baselines.to_csv(out / "baselines.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    note = _table_note(workload, len(seeds))
    md = [f"# mtl-opt compare --workload {workload.name}", "",
          f"Produced by `{rerun}` in {elapsed:.1f} s (mtl_opt {config['environment']['mtl_opt']}, "
          f"torch {config['environment']['torch']}).", "", to_markdown(shown), "", note, ""]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
    if not args.no_figures:
        field_figure(summary, workload.metrics, out / "field.html")
    print(shown.to_string(index=False))
    print("\n" + note)
    print(f"\n{len(run_rows)} runs and {len(seeds) * workload.n_tasks} single-task baselines in "
          f"{elapsed:.1f} s; outputs in {out}")
    return 0


def _table_note(workload: Any, n_seeds: int) -> str:
    return (
        "↑ higher is better, ↓ lower is better. Test-split metrics of the final model. Δm%: the mean "
        "over the metrics of the signed relative change against the single-task baseline of the same "
        "seed (Maninis et al. 2019), ×100, lower is better. mean_rank: each method's rank per metric "
        "(on the mean over seeds), averaged over metrics; the single-task baseline is not ranked. "
        "cos_mean: mean cosine between the task gradients on the shared parameters; conflict_share: "
        "share of steps whose task gradients had a negative inner product (every step measured). "
        + (f"Mean ± half-width of the 95 % Student-t interval over {n_seeds} seeds."
           if n_seeds > 1 else "One seed: no intervals.")
    )


def _rerun_command(args: Any, workload: Any, methods: list[str], seeds: list[int]) -> str:
    q = lambda s: f"'{s}'" if re.search(r"[^A-Za-z0-9_.=,/-]", s) else s  # noqa: E731
    parts = ["mtl-opt compare", f"--workload {q(workload.spec())}",
             "--methods " + " ".join(q(m) for m in methods), "--seeds " + ",".join(map(str, seeds))]
    for flag, value in (("--epochs", args.epochs), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--lr", args.lr), ("--optimizer", args.optimizer),
                        ("--weight-decay", args.weight_decay), ("--eval-every", args.eval_every)):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.grad_clip:
        parts.append(f"--grad-clip {args.grad_clip}")
    if args.task_weights is not None:
        parts.append("--task-weights " + ",".join(map(str, args.task_weights)))
    if args.aggregate_at != "parameters":
        parts.append(f"--aggregate-at {args.aggregate_at}")
    if args.amp:
        parts.append(f"--amp --amp-dtype {args.amp_dtype}")
    parts.append(f"--device {args.device}")
    return " ".join(parts)
