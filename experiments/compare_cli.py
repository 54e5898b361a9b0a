"""``mtl-opt compare``: every method on synthetic Pareto problems with known fronts.

Default suite: all registered methods on ``toy``, ``zdt1``, ``dtlz2`` and ``quadratic``, from
each problem's protocol starts, sized to finish in about a minute on two cores. Writes a folder
(default ``runs/compare-<UTC timestamp>``) with ``config.json``, ``final.csv``, ``summary.csv``,
``summary.md``, plotly figures and ``index.html``.

``--protocol nash-toy`` runs the published Toy protocol (Nash-MTL, Navon et al. 2022): the toy
with the first loss × 0.1, the five starts, Adam with lr 1e-3, 35 000 steps.

Seeds are replicates: a seed drives the gradient noise of noisy problems (``quadratic_noisy``),
PCGrad's random projection orders (one instance per seed) and, with ``--start-jitter SIGMA``,
its own Gaussian perturbation of every start (``start`` in
``final.csv`` stays the index of the unperturbed start). The default problems have no gradient
noise and the methods are deterministic there, so more than one seed without ``--start-jitter``
would give identical copies: the command refuses that before any work. ``--protocol nash-toy``
runs the published starts unperturbed (one seed).

``--workload NAME`` compares the methods on a training workload instead (Multi-MNIST, ...):
per-task metrics, Δm% against single-task baselines, mean rank and the gradient-conflict
statistics, mean ± 95 % CI over seeds (:mod:`mtl_opt.experiments.workload_compare`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mtl_opt.experiments.shared_args import (
    add_methods_argument,
    add_out_argument,
    add_seeds_argument,
    claim_out,
    parse_methods,
    parse_seeds,
)

COMMAND = "compare"
COMMAND_HELP = ("compare methods on synthetic Pareto problems with known fronts, or on a training "
                "workload (--workload)")

DEFAULT_PROBLEMS = ("toy", "zdt1", "dtlz2", "quadratic")

#: Per-problem defaults of the default suite (``--steps``/``--lr`` override them for all problems).
SUITE_DEFAULTS: dict[str, dict[str, float]] = {
    "toy": {"steps": 3000, "lr": 1e-2},
    "zdt1": {"steps": 1000, "lr": 5e-3},
    "zdt2": {"steps": 1000, "lr": 5e-3},
    "zdt3": {"steps": 1000, "lr": 5e-3},
    "dtlz2": {"steps": 400, "lr": 1e-2},
    "quadratic": {"steps": 1000, "lr": 2e-2},
    "quadratic_imbalanced": {"steps": 1000, "lr": 2e-2},
    "quadratic_noisy": {"steps": 1000, "lr": 2e-2},
    "quadratic_many": {"steps": 300, "lr": 2e-2},
}
FALLBACK = {"steps": 1000, "lr": 1e-3}

PROTOCOLS: dict[str, dict[str, Any]] = {
    # float32: the published Nash-MTL toy code runs in torch's default precision, and runs that
    # stall on the toy's plateau end where that precision leaves them (see the README)
    "nash-toy": {"problems": ["toy"], "steps": 35000, "lr": 1e-3, "optimizer": "adam", "starts": "all",
                 "record_every": 100, "dtype": "float32"},
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problems", nargs="+", metavar="PROBLEM", default=None,
                        help="problem specs, e.g. toy zdt1 'quadratic:imbalance=1000' "
                        f"(default: {' '.join(DEFAULT_PROBLEMS)})")
    add_methods_argument(parser, default_text="every registered method that does not require "
                         "the task losses")
    parser.add_argument("--starts", default="all",
                        help="which starts: 'all' (each problem's protocol list), indices into "
                        "that list such as '0,2,4', or 'random:N' for N seeded uniform starts")
    add_seeds_argument(
        parser, more="A seed is a replicate: it drives a noisy problem's gradient noise, PCGrad's random "
                        "projection orders and, with --start-jitter, its own perturbation of every start. On problems without "
                        "gradient noise (toy, zdt*, dtlz2, quadratic) several seeds need --start-jitter, "
                        "else they would be identical copies and the command stops before any work")
    parser.add_argument("--start-jitter", type=float, default=0.0, metavar="SIGMA",
                        help="perturb every start per seed: x0 = start + SIGMA * N(0, I), drawn from a "
                        "generator seeded by the seed, clamped into the problem's bounds; SIGMA is in the "
                        "problem's units (zdt/dtlz2 live in [0,1], the toy's starts span [-8.5, 9]) "
                        "(default 0: the starts as listed)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimisation steps for every problem (default per problem: toy 3000, "
                        "zdt 1000, dtlz2 400, quadratic 1000, quadratic_many 300)")
    parser.add_argument("--optimizer", default=None,
                        help="adam (default) or sgd; with --workload also adamw (default: the workload's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate for every problem "
                        "(default per problem: toy 1e-2, zdt 5e-3, dtlz2 1e-2, quadratic 2e-2)")
    parser.add_argument("--device", default="cpu", help="torch device for x and the Jacobians (default cpu)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="precision of x, the losses, the Jacobians, the direction and Adam's state "
                        "(the KxK solves stay in float64). Default float64; --protocol nash-toy defaults "
                        "to float32, the precision of the published code")
    add_out_argument(parser, prefix="compare")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes to spread the batches over (default 1); results do not depend "
                        "on it; pays off only for long studies on idle cores")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                        help="run a published protocol exactly (fixes problems, starts, steps, lr, optimizer)")
    parser.add_argument("--config", type=Path, default=None,
                        help="rerun a study from the config.json it wrote (only --out, --workers, --quiet, --progress and "
                        "--no-figures may be given with it)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--progress", action="store_true",
                        help="redraw a progress bar in place even when stderr is not a terminal "
                             "(by default: a bar on a terminal, one line per problem otherwise)")
    workload = parser.add_argument_group(
        "training workloads", "--workload NAME compares the methods on a training workload: per-task "
        "metrics, Δm% against single-task baselines (trained once per seed and cached), mean rank and "
        "gradient conflict, with 95% intervals over seeds. --methods may include single_task to show "
        "the baselines' row; --steps, --lr, --optimizer, --device, --seeds, --out apply too")
    workload.add_argument("--workload", default=None, metavar="SPEC",
                          help="training workload spec, e.g. multimnist or 'multimnist:n_train=2000' "
                               "(default methods: ls mgda pcgrad cagrad nash_mtl came_grad)")
    workload.add_argument("--baseline-cache", default="runs/single-task-cache", metavar="DIR",
                          help="folder of the cached single-task baselines (default runs/single-task-cache)")
    from mtl_opt.experiments.train_cli import add_training_options

    add_training_options(workload)


def _from_options(args: argparse.Namespace) -> tuple:
    import mtl_opt
    from mtl_opt.experiments.runner import OPTIMIZERS, method_from_spec
    from mtl_opt.problems import problem_from_spec

    protocol = PROTOCOLS.get(args.protocol) if args.protocol else None
    args.optimizer = args.optimizer or "adam"  # None: not given (the workloads' default differs)
    if protocol is not None:
        clashes = [opt for opt, given in (("--problems", args.problems), ("--steps", args.steps),
                                          ("--lr", args.lr), ("--starts", args.starts != "all"),
                                          ("--optimizer", args.optimizer not in (None, "adam")),
                                          ("--start-jitter", args.start_jitter != 0.0)) if given]
        if clashes:
            raise ValueError(f"--protocol {args.protocol} fixes {', '.join(clashes)}; drop them or drop --protocol")
    problem_specs = protocol["problems"] if protocol else (args.problems or list(DEFAULT_PROBLEMS))
    method_specs = parse_methods(args.methods) or default_methods()[0]
    labels = [method_from_spec(m)[0] for m in method_specs]  # raises on unknown names / bad values
    problems = {}
    for spec in problem_specs:
        prob = problem_from_spec(spec)
        problems[spec if ":" in spec else prob.name] = prob
    if len(problems) != len(problem_specs):
        raise ValueError(f"--problems lists a problem twice: {problem_specs}")
    if args.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {args.optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not (args.lr > 0 and args.lr < float("inf")):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    seeds = list(parse_seeds(args.seeds))
    starts, start_labels = _resolve_starts(args.starts, problems)
    steps, lrs, record_every = {}, {}, None
    for name, prob in problems.items():
        d = SUITE_DEFAULTS.get(prob.name, FALLBACK)
        steps[name] = protocol["steps"] if protocol else (args.steps if args.steps is not None else int(d["steps"]))
        lrs[name] = protocol["lr"] if protocol else (args.lr if args.lr is not None else float(d["lr"]))
    if protocol:
        record_every = protocol["record_every"]
    if args.dtype is None:
        args.dtype = protocol["dtype"] if protocol else "float64"
    return problems, method_specs, labels, seeds, starts, start_labels, steps, lrs, record_every


def _from_config(args: argparse.Namespace) -> tuple:
    """The study a config.json describes: problems with their options, starts, steps and lr."""
    import torch

    from mtl_opt.experiments.runner import method_from_spec
    from mtl_opt.problems import get_problem

    given = [name for name, value in (("--problems", args.problems), ("--methods", args.methods),
                                      ("--steps", args.steps), ("--lr", args.lr), ("--protocol", args.protocol),
                                      ("--starts", args.starts != "all"), ("--seeds", args.seeds != "0"),
                                      ("--optimizer", args.optimizer not in (None, "adam")), ("--device", args.device != "cpu"),
                                      ("--start-jitter", args.start_jitter != 0.0),
                                      ("--dtype", args.dtype is not None))
             if value]
    if given:
        raise ValueError(f"--config fixes the study; drop {', '.join(given)}")
    try:
        config = json.loads(Path(args.config).read_text(encoding="utf-8"))
        entries = config["problems"]
        problems, starts, start_labels, steps, lrs = {}, {}, {}, {}, {}
        for e in entries:
            prob = get_problem(e["name"] if ":" not in e["spec"] else e["spec"].split(":", 1)[0], **e["options"])
            key = e["spec"]
            problems[key] = prob
            starts[key] = torch.tensor(e["starts"], dtype=torch.float64)
            start_labels[key] = list(e["start_labels"])
            steps[key] = int(e["steps"])
            lrs[key] = float(e["lr"])
        method_specs = list(config["methods"])
        seeds = [int(v) for v in config["seeds"]]
        args.optimizer = config["optimizer"]
        args.device = config["device"]
        args.protocol = config.get("protocol")
        args.starts = config.get("starts", "all")
        args.start_jitter = float(config.get("start_jitter", 0.0))
        args.dtype = config.get("dtype", "float64")  # configs without it ran in float64
        record_every = {e["spec"]: int(e["record_every"]) for e in entries}
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{args.config} is not a config.json written by mtl-opt compare: {exc!r}") from None
    labels = [method_from_spec(m)[0] for m in method_specs]
    return problems, method_specs, labels, seeds, starts, start_labels, steps, lrs, record_every


def _resolve_starts(text: str, problems: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Starts per problem and their labels (indices into the protocol's list)."""
    import torch

    text = str(text).strip()
    out, labels = {}, {}
    for name, prob in problems.items():
        base = prob.protocol_starts()
        if text == "all":
            out[name] = base
            labels[name] = list(range(len(base)))
        elif text.startswith("random:"):
            raw = text.split(":", 1)[1]
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"--starts {text!r}: expected random:N with N >= 1")
            out[name] = prob.initial_points(int(raw), seed=1)
            labels[name] = list(range(int(raw)))
        else:
            try:
                idx = [int(i) for i in text.split(",") if i.strip()]
            except ValueError:
                raise ValueError(f"--starts must be 'all', indices like '0,2' or 'random:N', got {text!r}") from None
            if not idx:
                raise ValueError("--starts is empty")
            bad = [i for i in idx if not 0 <= i < len(base)]
            if bad:
                raise ValueError(f"--starts: indices {bad} are out of range for {name}'s {len(base)} protocol starts")
            out[name] = base[torch.tensor(idx)]
            labels[name] = idx
    return out, labels


def default_methods() -> tuple[list[str], list[str]]:
    """The methods ``compare`` runs without ``--methods``: every registered method except the
    gradient methods that require positive task losses (DB-MTL's log losses, GradNorm's loss
    ratios), which the synthetic problems do not guarantee. The loss weightings stay: the runner
    gives them the losses above the problem's floor (``problem.loss_floor()``). Returns (kept,
    left out)."""
    import mtl_opt
    from mtl_opt.loss_weighting import LossWeighting
    from mtl_opt.registry import aggregator_class

    names = mtl_opt.available_aggregators()
    left_out = [name for name in names if aggregator_class(name).requires_losses
                and not issubclass(aggregator_class(name), LossWeighting)]
    return [name for name in names if name not in left_out], left_out


_WORKLOAD_ONLY = (("--epochs", "epochs", None), ("--batch-size", "batch_size", None),
                  ("--weight-decay", "weight_decay", None), ("--grad-clip", "grad_clip", 0.0),
                  ("--task-weights", "task_weights", None), ("--aggregate-at", "aggregate_at", "parameters"),
                  ("--amp", "amp", False), ("--amp-dtype", "amp_dtype", "auto"),
                  ("--eval-every", "eval_every", None),
                  ("--subset", "subset", None),
                  ("--baseline-cache", "baseline_cache", "runs/single-task-cache"))


def run(args: argparse.Namespace) -> int:
    if args.workload is not None:
        from mtl_opt.experiments.workload_compare import run_workload_compare

        return run_workload_compare(args)
    given = [flag for flag, dest, default in _WORKLOAD_ONLY if getattr(args, dest) != default]
    if given:
        raise ValueError(f"{', '.join(given)} apply to training workloads; give --workload NAME")

    # ---------------------------------------------------------------- validate everything first
    if args.config is not None:
        problems, method_specs, labels, seeds, starts, start_labels, steps, lrs, record_every = \
            _from_config(args)
    else:
        problems, method_specs, labels, seeds, starts, start_labels, steps, lrs, record_every = \
            _from_options(args)
    workers = args.workers
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not (args.start_jitter >= 0 and args.start_jitter < float("inf")):
        raise ValueError(f"--start-jitter must be a finite number >= 0, got {args.start_jitter}")
    # claimed before any work: a second run aimed at the same folder is refused now
    with claim_out(args.out, prefix="compare", command="mtl-opt compare") as folder:
        return _run_and_write(args, folder.path, problems, method_specs, labels, seeds, starts,
                              start_labels, steps, lrs, record_every)


def _run_and_write(args: argparse.Namespace, out: Path, problems: dict, method_specs: list, labels: list,
                   seeds: list, starts: dict, start_labels: dict, steps: dict, lrs: dict,
                   record_every: Any) -> int:
    from mtl_opt.experiments.environment import environment_stamp
    from mtl_opt.experiments.markdown_table import to_markdown
    from mtl_opt.experiments.study import run_comparison, summary_display

    progress = None if args.quiet else _Progress(steps, live=True if args.progress else None)
    t0 = time.perf_counter()
    comp = run_comparison(list(problems), method_specs, starts=starts, seeds=seeds,
                          optimizer=args.optimizer, steps=steps, lr=lrs, record_every=record_every,
                          device=args.device, progress=progress, start_labels=start_labels,
                          workers=args.workers, start_jitter=float(args.start_jitter), dtype=args.dtype)
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.done()

    config = {
        "protocol": args.protocol,
        "problems": [{"spec": spec, **entry} for spec, entry in zip(problems, comp.config["problems"])],
        "methods": labels,
        "starts": args.starts,
        "seeds": seeds,
        "start_jitter": float(args.start_jitter),
        "optimizer": args.optimizer,
        "device": args.device,
        "dtype": args.dtype,
        "elapsed_seconds": round(elapsed, 3),
        "environment": environment_stamp(),
        "rerun": _rerun_command(args, list(problems), labels, seeds, steps, lrs),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    comp.final.to_csv(out / "final.csv", index=False)
    comp.summary.to_csv(out / "summary.csv", index=False)
    md = ["# mtl-opt compare", "", f"Produced by `{config['rerun']}` in {elapsed:.1f} s "
          f"(mtl_opt {config['environment']['mtl_opt']}, torch {config['environment']['torch']}).", "",
          "## Mean rank per method (over hypervolume, IGD and front distance; lower is better)", "",
          to_markdown(summary_display(comp.overall, list(comp.overall.columns), 3)), "",
          "## Per problem", "",
          to_markdown(summary_display(comp.summary, [c for c in comp.summary.columns
                                                        if not c.endswith("_ci")])), "",
          _TABLE_NOTE, ""]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
    if not args.no_figures:
        from mtl_opt.experiments.figures import write_figures

        write_figures(comp, out)
    cols = ["problem", "method", "hypervolume", "igd", "front_distance_mean", "stationarity_mean",
            "conflict_share", "time_per_step_us", "rank"]
    print(summary_display(comp.summary, cols).to_string(index=False))
    print()
    print(summary_display(comp.overall, list(comp.overall.columns), 3).to_string(index=False))
    print("\n" + _TABLE_NOTE)
    left_out = default_methods()[1] if args.config is None and not args.methods else []
    if left_out:  # said with the results: errors before any work stay one line
        print(f"note: the default methods leave out {', '.join(left_out)}: these gradient methods "
              "need positive task losses, which the synthetic problems do not guarantee (the toy's "
              "losses go negative); name them with --methods on problems whose losses stay positive",
              file=sys.stderr)
    print(f"\n{len(comp.final)} runs in {elapsed:.1f} s; outputs in {out}"
          + ("" if args.no_figures else f" (open {out / 'index.html'})"))
    return 0


_TABLE_NOTE = (
    "↑ higher is better, ↓ lower is better; conflict_share (the share of steps whose task "
    "gradients conflicted) describes a run. With several seeds, hypervolume, IGD and the mean "
    "front distance are per-seed values: mean ± the half-width of a 95 % Student-t interval. "
    "Hypervolume reference point per problem: the component-wise maximum of every method's final "
    "losses and the true front plus 10 % of their range. IGD against pymoo's reference front "
    "(ZDT, DTLZ2) or 2001 points of the analytic front. rank: the mean of the method's ranks on "
    "that problem over hypervolume, IGD and mean front distance; values within 0.1 % of the "
    "largest magnitude (at least 1e-5) tie and share a rank."
)


class _Progress:
    """Progress on stderr: on a terminal (or with ``live=True``) one bar per problem redrawn in
    place at most every 0.1 s; otherwise one compact line per problem when it is done, so a log
    file holds no carriage-return redraws."""

    def __init__(self, steps: dict[str, int], live: bool | None = None) -> None:
        self.current: str | None = None
        self.live = sys.stderr.isatty() if live is None else live
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.last_step = 0

    def __call__(self, problem: str, step: int, steps: int) -> None:
        if problem != self.current:
            self._finish()
            self.current = problem
            self.t0 = time.perf_counter()
            self.last_draw = 0.0
        self.last_step, self.steps = step, steps
        now = time.perf_counter()
        if not self.live or (now - self.last_draw < 0.1 and step < steps):
            return
        self.last_draw = now
        width = 30
        filled = int(width * step / max(steps, 1))
        sys.stderr.write(f"\r{problem:>22s} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{step}/{steps} steps {now - self.t0:6.1f}s")
        sys.stderr.flush()

    def _finish(self) -> None:
        if self.current is None:
            return
        if self.live:
            sys.stderr.write("\n")
        else:
            sys.stderr.write(f"{self.current}: {self.last_step}/{self.steps} steps in "
                             f"{time.perf_counter() - self.t0:.1f} s\n")
        sys.stderr.flush()

    def done(self) -> None:
        self._finish()
        self.current = None


def _rerun_command(args: argparse.Namespace, problems: list[str], labels: list[str], seeds: list[int],
                   steps: dict[str, int], lrs: dict[str, float]) -> str:
    if args.protocol:
        parts = ["mtl-opt compare", f"--protocol {args.protocol}", "--methods " + " ".join(labels),
                 "--seeds " + ",".join(map(str, seeds)), f"--device {args.device}", f"--dtype {args.dtype}"]
        return " ".join(parts)
    parts = ["mtl-opt compare", "--problems " + " ".join(f"'{p}'" if ":" in p else p for p in problems),
             "--methods " + " ".join(f"'{m}'" if ":" in m else m for m in labels),
             f"--starts {args.starts}", "--seeds " + ",".join(map(str, seeds)), f"--optimizer {args.optimizer}",
             f"--device {args.device}", f"--dtype {args.dtype}"]
    if args.start_jitter:
        parts.append(f"--start-jitter {args.start_jitter}")
    if len(set(steps.values())) == 1:
        parts.append(f"--steps {next(iter(steps.values()))}")
    if len(set(lrs.values())) == 1:
        parts.append(f"--lr {next(iter(lrs.values()))}")
    return " ".join(parts)
