"""The comparison study: every method on every problem, tidy tables and Pareto indicators.

:func:`run_comparison` runs each problem once with all methods batched together (see
:mod:`mtl_opt.experiments.runner`) and returns a :class:`Comparison` holding

* ``final``: one row per method × problem × start × seed: ``method, problem, start, seed,
  x_0.. (dim ≤ 10), loss_1.., stationarity, front_distance, conflict_share, time_per_step_us``;
* ``summary``: one row per method × problem: the hypervolume and IGD of the method's final set
  (pymoo's indicators), the mean/median distance to the true front, the mean stationarity, the
  share of conflicting steps, the time per step and ``rank`` (the method's mean rank on that
  problem over hypervolume, IGD and mean front distance);
* ``overall``: one row per method, its ranks averaged over the problems;
* ``runs``: the :class:`~mtl_opt.experiments.runner.RunResult` objects (histories included).

Hypervolume reference point, per problem: the component-wise maximum over every method's final
losses and the true front, plus 10 % of that set's range in each loss (so every point counts and
the methods of one problem share one reference). IGD is measured against pymoo's reference
front for ZDT/DTLZ2 and against 2001 points of the analytic front for the others.
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
) -> Comparison:
    """Run every method on every problem (all runs of one problem in one batch).

    Args:
        problems: names/specs (``"quadratic:imbalance=100"``) or problem objects.
        methods: method specs (``"came_grad:kappa=2,nu=0.5"``).
        starts: ``None`` (each problem's protocol starts), one (S, dim) tensor for every
            problem, or a mapping from problem name to its (S, dim) starts.
        seeds: one run per start and seed (the seed drives noisy problems' gradient noise).
        optimizer, steps, lr: as in :func:`~mtl_opt.experiments.runner.run_method`; ``steps``
            and ``lr`` may be per-problem mappings.
        record_every: history interval, or a per-problem mapping (default: ``steps // 200``,
            at least 1).
        progress: ``progress(problem, step, steps)`` as runs advance.
        start_labels: per problem, the label of each start in the ``start`` column (e.g. its
            index in the protocol's list when ``starts`` is a subset of it); default 0..S-1.

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
    plan = []
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
        S = _check_starts(prob, p_starts)
        labels_s = list(range(S.shape[0]))
        if start_labels is not None and name in start_labels:
            labels_s = [int(i) for i in start_labels[name]]
            if len(labels_s) != S.shape[0]:
                raise ValueError(f"{name}: {len(labels_s)} start labels for {S.shape[0]} starts")
        plan.append((name, prob, S, int(p_steps), float(p_lr), rec, labels_s))

    runs: list[RunResult] = []
    for name, prob, S, p_steps, p_lr, rec, labels_s in plan:
        cb = None
        if progress is not None:
            def cb(step: int, _metrics: dict, _name: str = name, _steps: int = p_steps) -> None:
                progress(_name, step, _steps)
        results = run_methods(prob, list(methods), starts=S, seeds=seeds, optimizer=optimizer,
                              lr=p_lr, steps=p_steps, record_every=rec, callback=cb, device=device)
        relabel = torch.tensor(labels_s)
        for r in results:
            r.problem = name
            r.start_index = relabel[r.start_index]
        runs.extend(results)

    final = final_table(runs)
    problems_by_name = {name: prob for name, prob, *_ in plan}
    summary = summary_table(runs, problems_by_name)
    overall = (summary.groupby("method", sort=False)["rank"].mean().rename("mean_rank")
               .reset_index().sort_values("mean_rank", kind="stable").reset_index(drop=True))
    config = {
        "problems": [{"name": name, "options": prob.options(), "steps": s, "lr": l, "record_every": rec,
                      "start_labels": lab, "starts": S.tolist()} for name, prob, S, s, l, rec, lab in plan],
        "methods": labels,
        "seeds": list(seeds),
        "optimizer": optimizer,
        "device": str(device),
    }
    return Comparison(final=final, summary=summary, overall=overall, runs=runs,
                      problems=problems_by_name, config=config)


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


def summary_table(runs: Sequence[RunResult], problems: Mapping[str, ParetoProblem]) -> "pd.DataFrame":
    """One row per method × problem with hypervolume, IGD, front distance, stationarity and rank."""
    import numpy as np
    import pandas as pd
    from pymoo.indicators.hv import HV
    from pymoo.indicators.igd import IGD

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
    df = pd.DataFrame(rows)
    ranks = []
    for _, g in df.groupby("problem", sort=False):
        parts = [g["hypervolume"].rank(ascending=False, method="average")]
        for col in ("igd", "front_distance_mean"):
            if g[col].notna().all():
                parts.append(g[col].rank(ascending=True, method="average"))
        ranks.append(pd.concat(parts, axis=1).mean(axis=1))
    df["rank"] = pd.concat(ranks).reindex(df.index)
    return df
