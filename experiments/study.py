"""The comparison study: every method on every problem, tidy tables and Pareto indicators.

:func:`run_comparison` runs each problem once with all methods batched together (see
:mod:`mtl_opt.experiments.runner`) and returns a :class:`Comparison` holding

* ``final``: one row per method × problem × start × seed: ``method, problem, start, seed,
  x_0.. (dim ≤ 10), loss_1.., stationarity, front_distance, conflict_share, time_per_step_us``;
* ``summary``: one row per method × problem: the hypervolume and IGD of the method's final set
  (pymoo's indicators), the mean/median distance to the true front, the mean stationarity, the
  share of conflicting steps, the time per step and ``rank`` (the method's mean rank on that
  problem over hypervolume, IGD and mean front distance). With more than one seed, hypervolume,
  IGD and the mean front distance are computed per seed (on that seed's final set) and the table
  gives their mean over seeds and, in ``<column>_ci``, the half-width of its 95 % Student-t
  interval. Ranks treat values within ``max(RANK_RTOL · largest magnitude, RANK_ATOL)`` of that
  metric on that problem as ties, which share the average of their positions;
  ``DIRECTIONS`` says which way each column is better;
* ``overall``: one row per method, its ranks averaged over the problems;
* ``runs``: the :class:`~mtl_opt.experiments.runner.RunResult` objects (histories included).

Hypervolume reference point, per problem: the component-wise maximum over every method's final
losses and the true front, plus 10 % of that set's range in each loss (so every point counts and
the methods of one problem share one reference). IGD is measured against pymoo's reference
front for ZDT/DTLZ2 and against 2001 points of the analytic front for the others.

Seeds are replicates. ``start`` is the index of a run's start in the problem's list; a seed
drives (a) the gradient noise of noisy problems and (b), with ``start_jitter = σ > 0``, a
perturbation of every start, ``x₀ = start + σ ε`` with ``ε ~ N(0, I)`` drawn per seed
(:func:`~mtl_opt.experiments.runner.jittered_starts`). On a problem without gradient noise and
without jitter the methods are deterministic, so several seeds would be identical copies of
one run: :func:`run_comparison` refuses them before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtl_opt.experiments.runner import (
    MAX_RECORDED_DIM,
    RunResult,
    _check_settings,
    _check_starts,
    check_run_dtype,
    jittered_starts,
    method_from_spec,
    run_methods,
)
from mtl_opt.problems import ParetoProblem, problem_from_spec

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["Comparison", "indicator_front", "run_comparison"]

_PYMOO_FRONTS = {"zdt1", "zdt2", "zdt3", "dtlz2"}


@dataclass
class Comparison:
    final: "pd.DataFrame"
    summary: "pd.DataFrame"
    overall: "pd.DataFrame"
    runs: list[RunResult]
    problems: dict[str, ParetoProblem]
    config: dict[str, Any] = field(default_factory=dict)


def indicator_front(problem: ParetoProblem) -> Tensor | None:
    """The reference front for IGD and hypervolume: pymoo's for ZDT/DTLZ2 at default sizes,
    else 2001 points of the problem's own analytic front (``None`` when unknown)."""
    if not problem.has_known_front:
        return None
    if problem.name in _PYMOO_FRONTS:
        from pymoo.problems import get_problem as pymoo_problem

        kwargs = {"n_var": problem.dim}
        if problem.name == "dtlz2":
            kwargs["n_obj"] = problem.n_tasks
        pf = pymoo_problem(problem.name, **kwargs).pareto_front()
        return torch.as_tensor(pf, dtype=torch.float64)
    return problem.pareto_front(2001)


def run_comparison(
    problems: Sequence[str | ParetoProblem],
    methods: Sequence[str],
    starts: Mapping[str, Tensor] | Tensor | None = None,
    seeds: Sequence[int] = (0,),
    optimizer: str = "adam",
    steps: int | Mapping[str, int] = 1000,
    *,
    lr: float | Mapping[str, float] = 1e-3,
    record_every: int | Mapping[str, int] | None = None,
    device: str = "cpu",
    progress: Callable[[str, int, int], Any] | None = None,
    start_labels: Mapping[str, Sequence[int]] | None = None,
    workers: int = 1,
    start_jitter: float = 0.0,
    dtype: torch.dtype | str = torch.float64,
) -> Comparison:
    """Run every method on every problem (all runs of one problem in one batch).

    Args:
        problems: names/specs (``"quadratic:imbalance=100"``) or problem objects.
        methods: method specs (``"came_grad:kappa=2,nu=0.5"``).
        starts: ``None`` (each problem's protocol starts), one (S, dim) tensor for every
            problem, or a mapping from problem name to its (S, dim) starts.
        seeds: one run per start and seed. A seed drives noisy problems' gradient noise and,
            with ``start_jitter > 0``, its own perturbation of every start. More than one seed
            on a problem without gradient noise needs ``start_jitter > 0`` (or per-seed starts
            of shape (S, R, dim)): otherwise the seeds would be identical copies and a
            ``ValueError`` says so before any run.
        optimizer, steps, lr: as in :func:`~mtl_opt.experiments.runner.run_method`; ``steps``
            and ``lr`` may be per-problem mappings.
        record_every: history interval, or a per-problem mapping (default: ``steps // 200``,
            at least 1).
        progress: ``progress(problem, step, steps)`` as runs advance.
        start_labels: per problem, the label of each start in the ``start`` column (e.g. its
            index in the protocol's list when ``starts`` is a subset of it); default 0..S-1.
        workers: processes to spread the work over. With ``workers > 1`` each problem's methods
            are split into groups of similar cost, every (problem, group) batch runs in a spawned
            process, and the results are identical to ``workers=1`` (runs are independent and
            their noise depends only on their seed). Each process pays torch's import (seconds),
            so it only pays off for long studies on otherwise idle cores.
        start_jitter: σ ≥ 0 of the per-seed Gaussian perturbation of every start, in the
            problem's units (clamped into the bounds where the problem has them); 0 (default)
            runs the starts as given.
        dtype: ``"float64"`` (default) or ``"float32"``, the precision of every run (see
            :func:`~mtl_opt.experiments.runner.run_method`).

    Every option is checked (problems built, methods parsed, starts shaped) before any run.
    """
    import pandas as pd

    if isinstance(problems, (str, ParetoProblem)) or not problems:
        raise ValueError("problems must be a non-empty list of problem names or objects")
    probs = [problem_from_spec(p) for p in problems]
    names = [p.name if isinstance(src, ParetoProblem) or ":" not in str(src) else str(src)
             for p, src in zip(probs, problems)]
    if len(set(names)) != len(names):
        raise ValueError(f"problems must be distinct, got {names}")
    if isinstance(methods, str) or not methods:
        raise ValueError("methods must be a non-empty list of method specs")
    labels = [method_from_spec(m)[0] for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods must be distinct, got {labels}")
    run_dtype = check_run_dtype(dtype)
    if (isinstance(start_jitter, bool) or not isinstance(start_jitter, (int, float))
            or not math.isfinite(start_jitter) or start_jitter < 0):
        raise ValueError(f"start_jitter must be a finite number >= 0, got {start_jitter!r}")
    plan = []
    copies = []
    for name, prob in zip(names, probs):
        p_steps = steps[name] if isinstance(steps, Mapping) else steps
        p_lr = lr[name] if isinstance(lr, Mapping) else lr
        p_rec = record_every[name] if isinstance(record_every, Mapping) else record_every
        rec = p_rec if p_rec is not None else (max(1, p_steps // 200) if isinstance(p_steps, int) else 1)
        _check_settings(optimizer, p_lr, p_steps, rec, seeds, device)
        if isinstance(starts, Mapping):
            p_starts = starts.get(name)
        else:
            p_starts = starts
        S = base = _check_starts(prob, p_starts, len(seeds))
        if start_jitter > 0:
            if S.dim() == 3:
                raise ValueError(f"{name}: start_jitter perturbs starts shared by every seed; "
                                 "per-seed starts (S, R, dim) were given")
            S = jittered_starts(prob, S, seeds, float(start_jitter))
        elif len(seeds) > 1 and S.dim() == 2 and prob.gradient_noise_std == 0:
            copies.append(name)
        labels_s = list(range(S.shape[0]))
        if start_labels is not None and name in start_labels:
            labels_s = [int(i) for i in start_labels[name]]
            if len(labels_s) != S.shape[0]:
                raise ValueError(f"{name}: {len(labels_s)} start labels for {S.shape[0]} starts")
        plan.append((name, prob, S, int(p_steps), float(p_lr), rec, labels_s, base))
    if copies:
        raise ValueError(
            f"{len(seeds)} seeds would be {len(seeds)} identical copies of every run on {', '.join(copies)}: "
            "without gradient noise a seed changes nothing there. Use one seed with more starts "
            "(--starts random:N), perturb the starts per seed (--start-jitter SIGMA; "
            "start_jitter= in the API), or a noisy problem such as quadratic_noisy")

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    runs: list[RunResult] = []
    if workers == 1:
        for name, prob, S, p_steps, p_lr, rec, labels_s, _base in plan:
            cb = None
            if progress is not None:
                def cb(step: int, _metrics: dict, _name: str = name, _steps: int = p_steps) -> None:
                    progress(_name, step, _steps)
            results = run_methods(prob, list(methods), starts=S, seeds=seeds, optimizer=optimizer,
                                  lr=p_lr, steps=p_steps, record_every=rec, callback=cb, device=device,
                                  dtype=run_dtype)
            runs.extend(_relabel(results, name, labels_s))
    else:
        runs = _run_parallel(plan, list(methods), seeds, optimizer, device, workers, progress, run_dtype)
    final = final_table(runs)
    problems_by_name = {name: prob for name, prob, *_ in plan}
    summary = summary_table(runs, problems_by_name)
    overall = (summary.groupby("method", sort=False)["rank"].mean().rename("mean_rank")
               .reset_index().sort_values("mean_rank", kind="stable").reset_index(drop=True))
    config = {
        "problems": [{"name": name, "options": prob.options(), "steps": s, "lr": l, "record_every": rec,
                      "start_labels": lab, "starts": base.tolist()}
                     for name, prob, _S, s, l, rec, lab, base in plan],
        "methods": labels,
        "seeds": list(seeds),
        "optimizer": optimizer,
        "device": str(device),
        "start_jitter": float(start_jitter),
        "dtype": str(run_dtype).replace("torch.", ""),
    }
    return Comparison(final=final, summary=summary, overall=overall, runs=runs,
                      problems=problems_by_name, config=config)


def _relabel(results: list[RunResult], name: str, labels_s: Sequence[int]) -> list[RunResult]:
    relabel = torch.tensor(list(labels_s))
    for r in results:
        r.problem = name
        r.start_index = relabel[r.start_index]
    return results


#: Rough relative cost of a method's step (for splitting methods over workers); others count 2.
_METHOD_COST = {"ls": 1.0, "pcgrad": 1.5, "mgda": 2.0, "nash_mtl": 2.0, "cagrad": 3.0, "came_grad": 4.5}


def _split_methods(methods: list[str], groups: int) -> list[list[int]]:
    """Indices of ``methods`` in ``groups`` bins of similar total cost (greedy, largest first)."""
    cost = [_METHOD_COST.get(str(m).split(":", 1)[0].strip().lower(), 2.0) for m in methods]
    bins: list[list[int]] = [[] for _ in range(min(groups, len(methods)))]
    load = [0.0] * len(bins)
    for i in sorted(range(len(methods)), key=lambda i: -cost[i]):
        b = load.index(min(load))
        bins[b].append(i)
        load[b] += cost[i]
    return [sorted(b) for b in bins if b]


_WORKER_COUNTERS: Any = None


def _init_worker(counters: Any) -> None:
    global _WORKER_COUNTERS
    _WORKER_COUNTERS = counters
    torch.set_num_threads(1)


def _run_task(task_id: int, prob: ParetoProblem, methods: list[str], kwargs: dict[str, Any]) -> list[RunResult]:
    def cb(step: int, _metrics: dict) -> None:
        _WORKER_COUNTERS[task_id] = step

    return run_methods(prob, methods, callback=cb, **kwargs)


def _run_parallel(plan: list, methods: list[str], seeds: Sequence[int], optimizer: str, device: str,
                  workers: int, progress: Callable[[str, int, int], Any] | None,
                  dtype: torch.dtype = torch.float64) -> list[RunResult]:
    import multiprocessing as mp
    import time as _time
    from concurrent.futures import ProcessPoolExecutor

    tasks = []
    for p_index, (name, prob, S, p_steps, p_lr, rec, labels_s, _base) in enumerate(plan):
        groups = _split_methods(methods, workers) if len(plan) < workers * 2 else [list(range(len(methods)))]
        for g in groups:
            tasks.append((p_index, g, dict(starts=S, seeds=tuple(seeds), optimizer=optimizer, lr=p_lr,
                                           steps=p_steps, record_every=rec, device=device, dtype=dtype)))
    # the longest batches first so that the pool finishes together
    order = sorted(range(len(tasks)), key=lambda t: -plan[tasks[t][0]][3] * sum(
        _METHOD_COST.get(methods[i].split(":", 1)[0], 2.0) for i in tasks[t][1]))
    # spawn: safe with torch and BLAS thread pools (the caller's __main__ must be importable)
    ctx = mp.get_context("spawn")
    counters = ctx.Array("q", len(tasks), lock=False)
    total = sum(plan[p][3] for p, _, _ in tasks)
    label = f"{len(tasks)} batches on {workers} processes"
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(counters,)) as pool:
        futures = {t: pool.submit(_run_task, t, plan[tasks[t][0]][1], [methods[i] for i in tasks[t][1]],
                                  tasks[t][2]) for t in order}
        while True:
            done = all(f.done() for f in futures.values())
            if progress is not None:
                progress(label, min(total, sum(counters[t] for t in range(len(tasks)))), total)
            if done:
                break
            _time.sleep(0.25)
        results_by_task = {t: f.result() for t, f in futures.items()}
    runs: list[RunResult] = []
    for p_index, (name, *_rest) in enumerate(plan):
        labels_s = plan[p_index][6]
        by_method: dict[int, RunResult] = {}
        for t, (pi, group, _) in enumerate(tasks):
            if pi == p_index:
                for i, r in zip(group, results_by_task[t]):
                    by_method[i] = r
        runs.extend(_relabel([by_method[i] for i in range(len(methods))], name, labels_s))
    return runs


def final_table(runs: Sequence[RunResult]) -> "pd.DataFrame":
    """One row per run: ``method, problem, start, seed, x_0.., loss_1.., stationarity,
    front_distance, conflict_share, time_per_step_us``."""
    import pandas as pd

    frames = []
    for r in runs:
        cols: dict[str, Any] = {
            "method": [r.method] * r.n_runs,
            "problem": [r.problem] * r.n_runs,
            "start": r.start_index.tolist(),
            "seed": r.seed.tolist(),
        }
        if r.x.shape[1] <= MAX_RECORDED_DIM:
            for j in range(r.x.shape[1]):
                cols[f"x_{j}"] = r.x[:, j].tolist()
        for i in range(r.losses.shape[1]):
            cols[f"loss_{i + 1}"] = r.losses[:, i].tolist()
        cols["stationarity"] = r.stationarity.tolist()
        cols["front_distance"] = (r.front_distance.tolist() if r.front_distance is not None
                                  else [math.nan] * r.n_runs)
        cols["conflict_share"] = r.conflict_share.tolist()
        cols["time_per_step_us"] = [r.time_per_step * 1e6] * r.n_runs
        frames.append(pd.DataFrame(cols))
    df = pd.concat(frames, ignore_index=True, sort=False)
    lead = ["method", "problem", "start", "seed"]
    xs = sorted((c for c in df.columns if c.startswith("x_")), key=lambda c: int(c[2:]))
    ls = sorted((c for c in df.columns if c.startswith("loss_")), key=lambda c: int(c[5:]))
    rest = ["stationarity", "front_distance", "conflict_share", "time_per_step_us"]
    return df[lead + xs + ls + rest]


RANK_RTOL = 1e-3
RANK_ATOL = 1e-5
"""Values of one metric on one problem within ``max(RANK_RTOL · largest magnitude, RANK_ATOL)``
of each other tie (the problems' losses are of order one, so 1e-5 is far below a difference a
reader would act on, and far above the solvers' rounding)."""

DIRECTIONS: dict[str, str] = {
    "hypervolume": "↑", "igd": "↓", "front_distance_mean": "↓", "front_distance_median": "↓",
    "stationarity_mean": "↓", "conflict_share": "", "time_per_step_us": "↓", "rank": "↓",
    "mean_rank": "↓",
}
"""Which way each summary column is better: ↑ higher, ↓ lower, "" neither (a description)."""


def tolerant_rank(values: Sequence[float], *, higher_is_better: bool, rtol: float = RANK_RTOL,
                  atol: float = RANK_ATOL) -> list[float]:
    """Ranks (1 = best) where values within ``max(rtol · max|v|, atol)`` of a group's best tie.

    Sorted best first, a value joins the current group when it lies within the tolerance of the
    group's first (best) value, else it opens a new group; every member of a group gets the
    average of the group's positions (as ``method="average"`` does for exact ties). NaN stays NaN.
    """
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    out = [math.nan] * len(values)
    if not finite:
        return out
    tol = max(rtol * max(abs(v) for v, _ in finite), atol)
    finite.sort(key=lambda t: -t[0] if higher_is_better else t[0])
    pos = 0
    while pos < len(finite):
        end = pos + 1
        while end < len(finite) and abs(finite[end][0] - finite[pos][0]) <= tol:
            end += 1
        shared = (pos + 1 + end) / 2.0  # the mean of positions pos+1 .. end
        for _, i in finite[pos:end]:
            out[i] = shared
        pos = end
    return out


def summary_table(runs: Sequence[RunResult], problems: Mapping[str, ParetoProblem]) -> "pd.DataFrame":
    """One row per method × problem with hypervolume, IGD, front distance, stationarity and rank."""
    import numpy as np
    import pandas as pd
    from pymoo.indicators.hv import HV
    from pymoo.indicators.igd import IGD

    from mtl_opt.experiments.paired_stats import mean_ci

    rows = []
    by_problem: dict[str, list[RunResult]] = {}
    for r in runs:
        by_problem.setdefault(r.problem, []).append(r)
    for pname, prs in by_problem.items():
        prob = problems[pname]
        front = indicator_front(prob)
        pts = [r.losses.numpy() for r in prs]
        allF = np.concatenate(pts + ([front.numpy()] if front is not None else []))
        hi, lo = allF.max(0), allF.min(0)
        ref = hi + 0.1 * np.maximum(hi - lo, 1e-12)
        hv = HV(ref_point=ref)
        igd = IGD(front.numpy()) if front is not None else None
        for r, F in zip(prs, pts):
            fd = r.front_distance
            rows.append({
                "problem": pname,
                "method": r.method,
                "runs": r.n_runs,
                "hypervolume": float(hv(F)),
                "igd": float(igd(F)) if igd is not None else math.nan,
                "front_distance_mean": float(fd.mean()) if fd is not None else math.nan,
                "front_distance_median": float(fd.median()) if fd is not None else math.nan,
                "stationarity_mean": float(r.stationarity.mean()),
                "conflict_share": float(r.conflict_share.mean()),
                "time_per_step_us": r.time_per_step * 1e6,
            })
            seeds = sorted(set(r.seed.tolist()))
            if len(seeds) > 1:  # per-seed indicators: mean over seeds ± a t interval
                per_seed: dict[str, list[float]] = {"hypervolume": [], "igd": [], "front_distance_mean": []}
                for s in seeds:
                    mask = (r.seed == s).numpy()
                    per_seed["hypervolume"].append(float(hv(F[mask])))
                    if igd is not None:
                        per_seed["igd"].append(float(igd(F[mask])))
                    if fd is not None:
                        per_seed["front_distance_mean"].append(float(fd[torch.as_tensor(mask)].mean()))
                for col, vals in per_seed.items():
                    if vals:
                        rows[-1][col], rows[-1][f"{col}_ci"] = mean_ci(vals)
                    else:
                        rows[-1][f"{col}_ci"] = math.nan
    df = pd.DataFrame(rows)
    ranks = []
    for _, g in df.groupby("problem", sort=False):
        parts = [pd.Series(tolerant_rank(g["hypervolume"].tolist(), higher_is_better=True), index=g.index)]
        for col in ("igd", "front_distance_mean"):
            if g[col].notna().all():
                parts.append(pd.Series(tolerant_rank(g[col].tolist(), higher_is_better=False), index=g.index))
        ranks.append(pd.concat(parts, axis=1).mean(axis=1))
    df["rank"] = pd.concat(ranks).reindex(df.index)
    ci_cols = [c for c in df.columns if c.endswith("_ci")]
    if ci_cols:  # each interval beside its mean
        order = [c for c in df.columns if c not in ci_cols]
        for c in ci_cols:
            order.insert(order.index(c[:-3]) + 1, c)
        df = df[order]
    return df


def summary_display(summary: "pd.DataFrame", columns: Sequence[str], digits: int = 4) -> "pd.DataFrame":
    """``columns`` of ``summary`` as text for a reader: each header carries its direction
    (``hypervolume ↑``, ``igd ↓``) and, with seeds, each value reads ``mean ± half-width``."""
    import pandas as pd

    def fmt(v: Any) -> str:
        return f"{v:.{digits}g}" if isinstance(v, float) and math.isfinite(v) else ("" if isinstance(v, float) else str(v))

    shown = {}
    for col in columns:
        arrow = DIRECTIONS.get(col, "")
        head = f"{col} {arrow}" if arrow else col
        ci = f"{col}_ci"
        if ci in summary.columns:
            shown[head + " (± 95% CI)"] = [
                fmt(m) + (f" ± {h:.2g}" if math.isfinite(h) else "")
                for m, h in zip(summary[col], summary[ci])]
        else:
            shown[head] = [fmt(v) for v in summary[col]]
    return pd.DataFrame(shown)
