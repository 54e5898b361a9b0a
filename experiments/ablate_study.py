"""``mtl-opt ablate``: CAME-Grad's stage ablation, with the cell that tests synergy.

The seed paper ablates CAME-Grad stage by stage (linear scalarization; + conflict-averse
rectification; + energy injection; + adaptive fusion) and argues that the stages together beat the
sum of their parts. That claim needs one more cell, energy injection alone on the linear
direction, so that the 2 × 2 design {rectify, inject} is complete:

=====================  ==========  ========  ======  ===========================================
variant                 rectify     inject    fuse    direction
=====================  ==========  ========  ======  ===========================================
``linear``              off         off       off     ``g_joint = Σ ω_i g_i`` (the baseline)
``+rectify``            on          off       off     ``(Σ ω_i) u_rect``
``+rectify+inject``     on          on        off     ``u_en`` from ``u_rect``
``full``                on          on        on      ``(1 − ν) u_en + ν κ g_joint`` (CAME-Grad)
``inject only``         off         on        off     ``u_en`` from ``g_joint``
=====================  ==========  ========  ======  ===========================================

Every variant is the registered ``came_grad`` with the same ``ρ, κ, ν, ω`` and the stage switches
above, trained on the same seeds. A seed is a replicate: on a synthetic problem, seed ``r``
draws its own starting points, ``problem.initial_points(S, seed=1000 + r)`` with ``S`` the
number of the problem's protocol starts (:func:`~mtl_opt.experiments.runner.seeded_starts`),
and the seed's metric is the mean over those ``S`` runs; on a noisy problem the seed also drives
the gradient noise. Every variant of a seed starts from the same points with the same noise,
so the comparison is paired per seed. (Other workloads, e.g. ``rrg``, seed their own training.)
For a metric value ``m`` per seed, the summary gives
mean ± std per variant, the paired difference to ``linear`` with a Student-t confidence interval
(:mod:`mtl_opt.experiments.paired_stats`), and the interaction

    I_s = m(+rectify+inject) − m(+rectify) − m(inject only) + m(linear)

with its own interval: the joint effect minus the sum of the two single effects. For a metric to
minimise, ``I < 0`` means the stages together beat the sum of their parts.

``optimizer`` matters here: Adam divides by a running gradient scale, so a pure rescaling (energy
injection on the linear direction is ``κ`` times ``g_joint``, up to ``ε``) can vanish under Adam
while it changes the step under SGD.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl_opt.experiments.environment import environment_stamp
from mtl_opt.experiments.html_pages import write_figure
from mtl_opt.experiments.shared_args import (
    add_out_argument,
    add_seeds_argument,
    add_workload_argument,
    out_target,
    parse_seeds,
    study_target,
)
from mtl_opt.experiments.workloads import SyntheticWorkload, TrainingSettings, Workload, get_workload

__all__ = ["INTERACTION", "VARIANTS", "ablate", "configure", "run"]

COMMAND = "ablate"
COMMAND_HELP = "CAME-Grad stage ablation over seeds, with paired confidence intervals"

# name -> (stage switches, description)
VARIANTS: dict[str, tuple[dict[str, bool], str]] = {
    "linear": ({"rectify": False, "inject": False, "fuse": False}, "linear scalarization"),
    "+rectify": ({"rectify": True, "inject": False, "fuse": False}, "+ conflict-averse rectification"),
    "+rectify+inject": ({"rectify": True, "inject": True, "fuse": False}, "+ energy injection"),
    "full": ({"rectify": True, "inject": True, "fuse": True}, "+ adaptive fusion (CAME-Grad)"),
    "inject only": ({"rectify": False, "inject": True, "fuse": False},
                    "energy injection alone on the linear direction"),
}
BASELINE = "linear"
INTERACTION = "interaction rectify x inject"
INTERACTION_DEFINITION = "(+rectify+inject) - (+rectify) - (inject only) + linear"
STAGE_FLAGS = ("rectify", "inject", "fuse")


def summarise(runs: Any, *, metric: str, confidence: float) -> Any:
    """The summary table from the per-seed runs table (columns variant, seed, metric)."""
    import pandas as pd

    from mtl_opt.experiments.paired_stats import mean_std, paired_difference

    values = runs.pivot(index="seed", columns="variant", values=metric)
    if values.isna().any().any():
        missing = values.columns[values.isna().any()].tolist()
        raise ValueError(f"{metric!r} is missing for some seeds of {missing}")
    base = values[BASELINE].tolist()
    rows = []
    for name, (flags, description) in VARIANTS.items():
        if name not in values.columns:
            continue
        mean, std = mean_std(values[name].tolist())
        diff = paired_difference(values[name].tolist(), base, confidence=confidence)
        rows.append({"variant": name, "description": description, **flags, "n_seeds": diff.n,
                     "mean": mean, "std": std, "diff_vs_linear": diff.mean, "diff_std": diff.std,
                     "ci_low": diff.ci_low, "ci_high": diff.ci_high, "p_value": diff.p_value,
                     "note": _note(name, diff.std)})
    summary = pd.DataFrame(rows)
    summary.attrs["interaction"] = interaction_table(values, confidence=confidence)
    return summary


def interaction_table(values: Any, *, confidence: float) -> Any:
    """The rectify × inject interaction as its own one-row table (empty without the four cells).

    Per seed ``I_s = m(+rectify+inject) − m(+rectify) − m(inject only) + m(linear)``; the row
    gives its mean, its standard deviation over seeds, the Student-t interval of the mean and the
    paired t-test's p-value (``joint`` = (+rectify+inject) + linear against ``parts`` =
    (+rectify) + (inject only)).
    """
    import pandas as pd

    from mtl_opt.experiments.paired_stats import paired_difference

    columns = ["effect", "definition", "n_seeds", "estimate", "std", "ci_low", "ci_high",
               "p_value", "note"]
    needed = ("+rectify+inject", "+rectify", "inject only", BASELINE)
    if not all(n in values.columns for n in needed):
        return pd.DataFrame(columns=columns)
    joint = (values["+rectify+inject"] + values[BASELINE]).tolist()
    parts = (values["+rectify"] + values["inject only"]).tolist()
    diff = paired_difference(joint, parts, confidence=confidence)
    return pd.DataFrame([{
        "effect": INTERACTION, "definition": INTERACTION_DEFINITION, "n_seeds": diff.n,
        "estimate": diff.mean, "std": diff.std, "ci_low": diff.ci_low, "ci_high": diff.ci_high,
        "p_value": diff.p_value, "note": _note(INTERACTION, diff.std),
    }], columns=columns)


DEGENERATE_NOTE = "no spread over seeds: the interval is a point and the p-value a limit"


def _note(name: str, diff_std: float) -> str:
    if name == BASELINE:
        return "baseline"
    return DEGENERATE_NOTE if diff_std == 0.0 else ""


def bar_figure(summary: Any, *, metric: str, confidence: float, title: str) -> Any:
    """Left: mean ± std per variant. Middle: paired difference to ``linear`` with its interval.
    Right: the rectify × inject interaction with its interval (its own quantity, its own axis)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    inter = summary.attrs.get("interaction")
    has_inter = inter is not None and len(inter) > 0
    fig = make_subplots(rows=1, cols=3 if has_inter else 2, column_widths=[0.4, 0.4, 0.2][: 3 if has_inter else 2],
                        subplot_titles=(
        f"{metric}: mean ± std over seeds",
        f"paired difference to linear ({confidence:.0%} CI)",
        *(["interaction rectify × inject"] if has_inter else []),
    ))
    fig.add_trace(go.Bar(x=summary["variant"], y=summary["mean"],
                         error_y={"type": "data", "array": summary["std"].tolist()},
                         name="mean ± std", showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(
        x=summary["variant"], y=summary["diff_vs_linear"],
        error_y={"type": "data", "symmetric": False,
                 "array": (summary["ci_high"] - summary["diff_vs_linear"]).tolist(),
                 "arrayminus": (summary["diff_vs_linear"] - summary["ci_low"]).tolist()},
        marker_color="#1f77b4", name="difference", showlegend=False), row=1, col=2)
    if has_inter:
        row = inter.iloc[0]
        fig.add_trace(go.Bar(
            x=["I"], y=[row["estimate"]], marker_color="#d62728", showlegend=False,
            hovertext=[INTERACTION_DEFINITION],
            error_y={"type": "data", "symmetric": False, "array": [row["ci_high"] - row["estimate"]],
                     "arrayminus": [row["estimate"] - row["ci_low"]]}), row=1, col=3)
        fig.update_yaxes(title_text=f"I ({metric})", row=1, col=3)
        fig.update_xaxes(title_text="(+r+i) − (+r) − (i) + linear", row=1, col=3)
    fig.update_yaxes(title_text=f"{metric} (unitless)", exponentformat="power", row=1, col=1)
    fig.update_yaxes(title_text=f"Δ {metric} vs linear", exponentformat="power", row=1, col=2)
    fig.update_xaxes(title_text="variant", row=1, col=1)
    fig.update_xaxes(title_text="variant", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", height=520)
    return fig


def ablate(
    problem: str | Workload = "toy",
    method: str = "came_grad",
    *,
    seeds: int | Sequence[int] = 3,
    metric: str | None = None,
    mode: str = "min",
    steps: int | None = None,
    record_every: int | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    device: str = "cpu",
    problem_options: Mapping[str, Any] | None = None,
    variants: Sequence[str] | None = None,
    confidence: float = 0.95,
    out: str | Path | None = None,
    unique_out: bool = False,
    verbose: bool = True,
) -> Any:
    """Run the stage ablation and return the summary table (pandas); ``.attrs["runs"]`` holds the
    per-seed table. ``method`` fixes the shared hyperparameters, e.g. ``"came_grad:kappa=2"``;
    it must take the stage switches ``rectify``, ``inject`` and ``fuse``.

    ``out``: a new or empty folder for the tables, figure and config, claimed (see
    :mod:`mtl_opt._output_folder`) once every option is checked and before any run;
    ``unique_out=True`` moves a taken default name on to ``out-2``, ``out-3``, ..."""

    from mtl_opt.experiments.sweep_study import parse_spec
    from mtl_opt.registry import parse_method_spec

    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if isinstance(problem, Workload):
        workload = get_workload(problem)
    else:
        name, spec_options = parse_spec(problem)
        workload = get_workload(name, **{**spec_options, **dict(problem_options or {})})
    method_name, method_options = parse_method_spec(method)
    switches = [f for f in STAGE_FLAGS if f in method_options]
    if switches:
        raise ValueError(f"the ablation sets the stage switches itself; drop {switches} from {method!r}")
    takes = workload.tunable_names(method_name)
    if not all(f in takes for f in STAGE_FLAGS):
        raise ValueError(f"{method_name!r} has no stage switches rectify/inject/fuse; ablate came_grad")
    chosen = list(variants) if variants is not None else list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    seed_list = parse_seeds(seeds)
    if len(seed_list) < 2:
        raise ValueError("an ablation needs at least 2 seeds for its confidence intervals")
    steps, lr = workload.resolve_budget(steps, lr)
    if record_every is None:
        record_every = max(1, min(100, steps // 10))
    metric = metric or workload.default_metric()

    settings = TrainingSettings(method=method_name, method_options=method_options, seeds=seed_list,
                                optimizer=optimizer, lr=lr, steps=steps, record_every=record_every,
                                device=device)
    cells = {v: {**method_options, **VARIANTS[v][0]} for v in chosen}
    from mtl_opt.registry import get_aggregator

    for v, hyper in cells.items():  # every cell's method, built before the folder and the runs
        get_aggregator(method_name, **hyper)
    if out is None:
        return _ablate(workload, settings, cells, chosen, method_options, metric, mode, confidence,
                       None, verbose)
    from mtl_opt._output_folder import claim_output_folder

    with claim_output_folder(out, command="mtl-opt ablate", unique=unique_out) as folder:
        return _ablate(workload, settings, cells, chosen, method_options, metric, mode, confidence,
                       folder.path.resolve(), verbose)


def _ablate(workload: Workload, settings: TrainingSettings, cells: dict[str, dict[str, Any]],
            chosen: list[str], method_options: dict[str, Any], metric: str, mode: str,
            confidence: float, out: Path | None, verbose: bool) -> Any:
    import pandas as pd

    method_name, seed_list, steps, lr = settings.method, settings.seeds, settings.steps, settings.lr
    optimizer, record_every, device = settings.optimizer, settings.record_every, settings.device
    started = time.perf_counter()
    if verbose:
        print(f"ablate: {method_name} on {workload.name}, {len(chosen)} variants x {len(seed_list)} "
              f"seeds, {steps} steps, {optimizer} lr={lr:g}, metric {metric} ({mode})", flush=True)
    if out is not None and workload.run_root is None:
        workload.run_root = str(out / "runs")
    if isinstance(workload, SyntheticWorkload):
        finals = _synthetic_finals(workload, settings, cells)
    else:
        finals = workload.finals_per_seed(settings, cells)
    rows = []
    for variant in chosen:
        for seed in seed_list:
            final = finals[variant][seed]
            if metric not in final:
                raise KeyError(f"metric {metric!r} is not reported by {workload.name!r}; "
                               f"it reports {sorted(final)}")
            rows.append({"variant": variant, "seed": seed, **final})
    runs = pd.DataFrame(rows)
    summary = summarise(runs, metric=metric, confidence=confidence)
    if verbose and (runs.groupby("variant")[metric].nunique() == 1).all():
        print(f"ablate: warning: every variant gave the same {metric} on every seed: the "
              "intervals below have no spread to measure", flush=True)
    elapsed = time.perf_counter() - started
    how = (f"{method_name} ({', '.join(f'{k}={v}' for k, v in method_options.items()) or 'defaults'}) "
           f"on {workload.name}, {steps} steps, {optimizer} lr={lr:g}, seeds {list(seed_list)}, "
           f"metric {metric} ({'lower' if mode == 'min' else 'higher'} is better), "
           f"{confidence:.0%} paired t intervals vs linear")
    summary.attrs.update({"runs": runs, "metric": metric, "mode": mode, "produced_by": how})
    if out is not None:
        _write(out, summary, runs, how, metric, confidence, {
            "problem": workload.describe(), "method": method_name, "method_options": method_options,
            "variants": {v: VARIANTS[v][0] for v in chosen}, "seeds": list(seed_list),
            "starts": _starts_note(workload),
            "metric": metric, "mode": mode, "steps": steps, "record_every": record_every,
            "optimizer": optimizer, "lr": lr, "device": device, "confidence": confidence,
            "elapsed_s": round(elapsed, 2), "environment": environment_stamp(),
        }, verbose)
    if verbose:
        from mtl_opt.experiments.markdown_table import to_markdown

        cols = ["variant", "mean", "std", "diff_vs_linear", "ci_low", "ci_high", "p_value"]
        print(to_markdown(summary[cols]))
        print(_interaction_md(summary), end="")
        print(f"ablate: done in {elapsed:.1f} s")
    return summary


def _starts_note(workload: Workload) -> str:
    """How the runs' starting points were chosen (for config.json)."""
    if not isinstance(workload, SyntheticWorkload):
        return "set by the workload"
    from mtl_opt.experiments.runner import SEEDED_STARTS_OFFSET

    n = len(workload._build().protocol_starts())
    return f"per seed r: problem.initial_points({n}, seed={SEEDED_STARTS_OFFSET} + r), shared by every variant"


def _synthetic_finals(workload: SyntheticWorkload, settings: TrainingSettings,
                      variants: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Final metrics per variant and seed on a synthetic problem, all variants and seeds in one
    batch; seed ``r`` runs from its own starts (:func:`seeded_starts`), shared by every variant.
    A seed's metrics are the means over its starts."""
    from mtl_opt.experiments.runner import run_methods, seeded_starts
    from mtl_opt.experiments.workloads import normalise_metrics
    from mtl_opt.registry import get_aggregator

    problem = workload._build()
    seeds = tuple(settings.seeds)
    aggs = [get_aggregator(settings.method, **dict(h)) for h in variants.values()]
    results = run_methods(problem, aggs, starts=seeded_starts(problem, seeds), seeds=seeds,
                          optimizer=settings.optimizer, lr=float(settings.lr), steps=settings.steps,
                          record_every=settings.record_every, device=settings.device)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, res in zip(variants, results):
        out[name] = {}
        for seed in seeds:
            mask = res.seed == seed
            metrics: dict[str, Any] = {f"loss_{k + 1}": res.losses[mask, k].mean()
                                       for k in range(res.losses.shape[1])}
            metrics["stationarity"] = res.stationarity[mask].mean()
            if res.front_distance is not None:
                metrics["front_distance"] = res.front_distance[mask].mean()
            out[name][int(seed)] = normalise_metrics(settings.steps, metrics)
    return out


def _interaction_md(summary: Any) -> str:
    """The interaction's own Markdown section ("" without the four cells)."""
    from mtl_opt.experiments.markdown_table import to_markdown

    inter = summary.attrs.get("interaction")
    if inter is None or not len(inter):
        return ""
    return (f"\nInteraction I = {INTERACTION_DEFINITION}, per seed (below zero, for a metric to "
            f"minimise: the stages together beat the sum of their parts):\n\n"
            f"{to_markdown(inter.drop(columns=['definition']))}\n")


def _write(out: Path, summary: Any, runs: Any, how: str, metric: str, confidence: float,
           config: dict[str, Any], verbose: bool) -> None:
    from mtl_opt.experiments.markdown_table import to_markdown

    summary.to_csv(out / "ablation.csv", index=False)
    inter = summary.attrs.get("interaction")
    if inter is not None and len(inter):
        inter.to_csv(out / "interaction.csv", index=False)
    runs.to_csv(out / "runs.csv", index=False)
    (out / "ablation.md").write_text(f"Stage ablation: {how}.\n\n{to_markdown(summary)}\n"
                                     + _interaction_md(summary))
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    fig = bar_figure(summary, metric=metric, confidence=confidence, title=f"Stage ablation: {how}")
    write_figure(fig, out / "ablation.html")
    if verbose:
        print(f"outputs in {out}")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtl-opt ablate`` (no heavy imports here)."""
    parser.add_argument("--problem", default="toy",
                        help="problem name, optionally with options: toy, zdt1:n_var=10, quadratic:imbalance=100, rrg:n_train=256, ... (default: toy)")
    add_workload_argument(parser)
    parser.add_argument("--method", default="came_grad",
                        help="CAME-Grad with the shared hyperparameters, e.g. 'came_grad:kappa=2,rho=0.3'")
    add_seeds_argument(
        parser, default="5x", more="At least 2. A seed is a replicate: on a synthetic problem seed r runs from its "
                        "own starts, initial_points(S, seed=1000+r), shared by every variant (paired), "
                        "and drives the gradient noise of noisy problems")
    parser.add_argument("--metric", default=None,
                        help="metric compared (default: front_distance where the front is known, else loss_mean)")
    parser.add_argument("--mode", choices=["min", "max"], default="min")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the problem's budget in mtl-opt compare's suite, e.g. toy 3000; else 1000)")
    parser.add_argument("--record-every", type=int, default=None)
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam",
                        help="Adam normalises gradient scale; compare with sgd to see energy injection")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the problem's in mtl-opt compare's suite, e.g. toy 1e-2; else 1e-3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--confidence", type=float, default=0.95)
    add_out_argument(parser, prefix="ablate")
    parser.add_argument("--config", default=None, metavar="CONFIG_JSON",
                        help="rerun the study a config.json written by mtl-opt ablate describes "
                        "(only --out may be given with it)")


def run(args: argparse.Namespace) -> int:
    """``mtl-opt ablate``."""
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    try:
        _ablate_cli(args, variants)
    except KeyError as exc:  # a metric the workload does not report
        print(f"mtl-opt ablate: error: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


def _ablate_cli(args: argparse.Namespace, variants: list[str] | None) -> None:
    if args.config is not None:
        _rerun(args)
        return
    ablate(study_target(args), args.method, seeds=parse_seeds(args.seeds), metric=args.metric,
           mode=args.mode, steps=args.steps, record_every=args.record_every,
           optimizer=args.optimizer, lr=args.lr, device=args.device, variants=variants,
           confidence=args.confidence, **_out(args))


def _rerun(args: argparse.Namespace) -> None:
    """``mtl-opt ablate --config CONFIG_JSON``: the study that config.json describes, again."""
    from mtl_opt._spec import format_spec

    defaults = argparse.ArgumentParser()
    configure(defaults)
    base = defaults.parse_args([])
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if k not in ("config", "out", "_run", "command") and hasattr(base, k) and getattr(base, k) != v]
    if given:
        raise ValueError(f"--config fixes the study; drop {', '.join(given)}")
    path = Path(args.config)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        problem = config["problem"]
        kwargs = dict(
            problem_options=problem.get("options") or None,
            seeds=[int(s) for s in config["seeds"]], metric=config["metric"], mode=config["mode"],
            steps=int(config["steps"]), record_every=int(config["record_every"]),
            optimizer=config["optimizer"], lr=float(config["lr"]), device=config["device"],
            variants=list(config["variants"]), confidence=float(config["confidence"]),
        )
        method = format_spec(config["method"], dict(config["method_options"]))
        name = problem["name"]
        if problem.get("kind") == "training":  # a --workload study: the same workload again
            from mtl_opt.experiments.workloads import TrainedWorkload

            name = TrainedWorkload(problem["spec"])
            kwargs["problem_options"] = None
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a config.json written by mtl-opt ablate: {exc!r}") from None
    ablate(name, method, **_out(args), **kwargs)


def _out(args: argparse.Namespace) -> dict[str, Any]:
    """``out`` and ``unique_out`` of :func:`ablate` from ``--out`` (the shared policy)."""
    out, unique = out_target(args.out, prefix="ablate")
    return {"out": out, "unique_out": unique}
