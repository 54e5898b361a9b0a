"""Batched optimisation runs of aggregation methods on synthetic Pareto problems.

Every run (method × start × seed) is one row of a single parameter tensor ``x`` of shape
``(runs, dim)``. Adam and SGD are element-wise, so one torch optimizer over that tensor *is* the
independent runs; one call of the problem's (closed-form or autograd) Jacobian gives every run's
``(K, dim)`` Jacobian, one batched matmul gives the Gramians, and each method turns its slice of
Gramians into weights with its vectorised ``_batch_weights``. The Python cost of a step is
therefore paid once for all runs, not once per run.

One step, for every run at once::

    F, J = problem.losses_and_jacobian(x)          # (N, K), (N, K, dim)
    J[blocked] = 0                                  # coordinates an active bound blocks
    J += σ ε                                        # noisy problems, ε seeded per run's seed
    M = J Jᵀ                                        # (N, K, K)
    β = method.batch_weights(M)                     # per method slice, float64
    x.grad = βᵀ J;  optimizer.step();  x ← clamp(x, bounds)

Starts and seeds: by default every start is run with every seed (run ``s·R + r`` starts at
``starts[s]`` with ``seeds[r]``), and a seed drives only the run's gradient noise and the random
stream of methods with seeded randomness (PCGrad: one instance per run seed, see
:func:`_per_seed_instances`), so on a problem without gradient noise (``gradient_noise_std == 0``:
toy, ZDT, DTLZ2, quadratic) the seeds of one start are identical copies for deterministic methods. For seeds that are replicates there, give per-seed starts: a
``(S, R, dim)`` tensor whose ``[s, r]`` entry is the start of run ``s·R + r``, e.g.
:func:`seeded_starts` (seed ``r`` draws its own ``S`` starts) or :func:`jittered_starts` (each
start perturbed per seed).

Loss weightings (UW, DWA, RLW, GLS, FAMO, STCH, IMTL-L, SI) run in the same batch: their
weights come from the losses alone, ``β = method.batch_weights(F − floor)`` with
``floor = problem.loss_floor()`` (a point below every attainable loss, so that logarithms and
ratios are defined; the gradients are unchanged). Each step evaluates the whole objective, so
every step is one epoch for DWA and STCH (``end_epoch()`` after each step), and FAMO gets its
post-step losses ``F(x_{t+1}) − floor`` (one extra evaluation of the losses) after each step.

Recorded (every ``record_every`` steps and at the end): the losses, Pareto stationarity
``‖α*ᵀ J‖`` with ``α* = argmin_{α∈Δ} ‖αᵀJ‖`` (the min-norm element of the convex hull of the
task gradients, on the coordinates no active bound blocks, from the clean gradients), the
distance of ``F`` to the true front (where known) and ``x`` (for ``dim ≤ 10``). Counted at every
step: whether some pair of task gradients conflicts (``g_i·g_j < 0``, an off-diagonal entry of
``M`` below zero).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mtl_opt.aggregator import GradientAggregator, GramianAggregator, is_gramian_weighting
from mtl_opt.loss_weighting import LossWeighting
from mtl_opt.problems import ParetoProblem, problem_from_spec

__all__ = [
    "OPTIMIZERS",
    "RunResult",
    "SEEDED_STARTS_OFFSET",
    "jittered_starts",
    "method_from_spec",
    "pareto_stationarity",
    "run_method",
    "run_methods",
    "seeded_starts",
]

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
MAX_RECORDED_DIM = 10
#: :func:`seeded_starts` draws seed ``r``'s starts as ``initial_points(S, seed=OFFSET + r)``, away
#: from the seeds behind the problems' protocol starts (``seed=0``) and ``--starts random:N``
#: (``seed=1``).
SEEDED_STARTS_OFFSET = 1000
#: :func:`jittered_starts` seeds seed ``r``'s perturbation generator with ``OFFSET + r``.
JITTER_SEED_OFFSET = 2000

Callback = Callable[[int, dict[str, float]], Any]


@dataclass
class RunResult:
    """The outcome of one method on one problem over ``S`` starts × ``R`` seeds.

    Runs are ordered start-major: run ``s·R + r`` started from ``starts[s]`` (or ``starts[s, r]``
    when the starts were given per seed, shape ``(S, R, dim)``) with ``seeds[r]``.

    Attributes:
        problem: the problem's name; ``problem_options`` its constructor options.
        method: the method's label (its spec string, e.g. ``"came_grad:kappa=2"``).
        start_index, seed: (runs,) the start's index in ``starts`` and the run's seed.
        x: (runs, dim) final points; losses: (runs, K) final losses.
        stationarity: (runs,) final Pareto stationarity.
        front_distance: (runs,) final distance to the true front, or ``None`` when unknown.
        conflict_share: (runs,) share of steps whose task gradients conflicted.
        time_per_step: seconds per optimisation step of this method (its own aggregation time
            plus an equal share of the batch's common work).
        history: ``{"step": [..], "losses": (T, runs, K), "stationarity": (T, runs),
            "front_distance": (T, runs) or None, "x": (T, runs, dim) or None}``.
    """

    problem: str
    problem_options: dict[str, Any]
    method: str
    starts: Tensor
    seeds: tuple[int, ...]
    start_index: Tensor
    seed: Tensor
    x: Tensor
    losses: Tensor
    stationarity: Tensor
    front_distance: Tensor | None
    conflict_share: Tensor
    time_per_step: float
    steps: int
    optimizer: str
    lr: float
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        return int(self.x.shape[0])

    def summary(self) -> dict[str, float]:
        """Means over runs: ``loss_1..loss_K``, ``stationarity``, ``front_distance``."""
        return _mean_metrics(self.losses, self.stationarity, self.front_distance)


def _mean_metrics(F: Tensor, stat: Tensor, dist: Tensor | None) -> dict[str, float]:
    means = F.mean(0).tolist()
    out = {f"loss_{i + 1}": float(v) for i, v in enumerate(means)}
    out["stationarity"] = float(stat.mean())
    if dist is not None:
        out["front_distance"] = float(dist.mean())
    return out


# ---------------------------------------------------------------------------------- validation
def method_from_spec(method: str | GradientAggregator) -> tuple[str, GradientAggregator]:
    """``(label, aggregator)`` from a spec string like ``"cagrad:c=0.4"`` or an aggregator."""
    if isinstance(method, GradientAggregator):
        return _label_of(method), method
    if not isinstance(method, str):
        raise TypeError(f"a method must be a spec string like 'mgda' or a GradientAggregator, got {type(method).__name__}")
    import mtl_opt

    name, hyper = mtl_opt.parse_method_spec(method)
    # Built with torch's global generator seeded 0 (and restored after), so that methods
    # whose randomness is seeded from it at construction (PCGrad without seed=) draw the same
    # orders in every study; pass e.g. "pcgrad:seed=3" to vary them. (The runner itself gives
    # such methods one instance per run seed, seeded from their seed and the run's seed.)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        agg = mtl_opt.get_aggregator(name, **hyper)
    label = name if not hyper else name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in hyper.items())
    return label, agg


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(i) for i in v) + "]"
    return str(v)


def _label_of(agg: GradientAggregator) -> str:
    name = getattr(type(agg), "method_name", type(agg).__name__)
    try:
        import inspect

        sig = inspect.signature(type(agg).__init__).parameters
        changed = {k: v for k, v in agg.hyperparameters().items()
                   if k in sig and sig[k].default is not inspect.Parameter.empty and _differs(v, sig[k].default)}
    except Exception:  # pragma: no cover - hyperparameters are plain attributes
        changed = {}
    return name if not changed else name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in changed.items())


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:
        return True


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_settings(optimizer: str, lr: float, steps: int, record_every: int,
                    seeds: Sequence[int], device: str | torch.device) -> tuple[torch.device, tuple[int, ...]]:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    _check_int("steps", steps, 1)
    _check_int("record_every", record_every, 1)
    if isinstance(seeds, (int, str)) or not isinstance(seeds, Sequence) or len(seeds) == 0:
        raise ValueError(f"seeds must be a non-empty sequence of integers, got {seeds!r}")
    seeds_t = tuple(_check_int("each seed", s, 0) for s in seeds)
    if len(set(seeds_t)) != len(seeds_t):
        raise ValueError(f"seeds must be distinct, got {list(seeds_t)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    return dev, seeds_t


#: Precisions a run may use (``--dtype``).
RUN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_run_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32``/``torch.float64`` (or their names) as a torch dtype; anything else raises."""
    if isinstance(dtype, str) and dtype in RUN_DTYPES:
        return RUN_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in RUN_DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {list(RUN_DTYPES)}, got {dtype!r}")


def _check_starts(problem: ParetoProblem, starts: Tensor | Sequence | None,
                  n_seeds: int | None = None) -> Tensor:
    """``(S, dim)`` starts shared by every seed, or ``(S, R, dim)`` per-seed starts."""
    if starts is None:
        return problem.protocol_starts().to(torch.float64)
    S = torch.as_tensor(starts, dtype=torch.float64)
    if S.dim() == 1 and S.numel() == problem.dim:
        S = S.unsqueeze(0)
    if S.dim() == 3:
        if S.shape[2] != problem.dim or S.shape[0] == 0 or (n_seeds is not None and S.shape[1] != n_seeds):
            raise ValueError(f"per-seed starts must have shape (S, {n_seeds if n_seeds is not None else 'R'}, "
                             f"{problem.dim}) for {problem.name}, got {tuple(S.shape)}")
    elif S.dim() != 2 or S.shape[1] != problem.dim or S.shape[0] == 0:
        raise ValueError(f"starts must have shape (S, {problem.dim}) or per seed (S, R, {problem.dim}) "
                         f"for {problem.name}, got {tuple(S.shape)}")
    if not bool(torch.isfinite(S).all()):
        raise ValueError("starts must be finite")
    if problem.bounds is not None:
        lo, hi = problem.bounds
        if bool(((S < lo) | (S > hi)).any()):
            raise ValueError(f"starts must lie inside {problem.name}'s bounds [{float(lo.min())}, {float(hi.max())}]")
    return S


def seeded_starts(problem: ParetoProblem | str, seeds: Sequence[int], n: int | None = None) -> Tensor:
    """Per-seed starts ``(n, R, dim)``: seed ``r`` draws its own ``n`` starts,
    ``problem.initial_points(n, seed=SEEDED_STARTS_OFFSET + r)`` (uniform in the box for ZDT and
    DTLZ2, uniform in ``[−10, 10]²`` for the toy, ``N(0, 3²)`` per coordinate for the quadratics).

    A seed's starts depend on that seed only (not on the other seeds), and every method run
    with the same seeds starts from the same points, so comparisons stay paired per seed.
    ``n`` defaults to the number of the problem's protocol starts.
    """
    prob = problem_from_spec(problem)
    seeds_t = tuple(_check_int("each seed", s, 0) for s in seeds)
    if not seeds_t:
        raise ValueError("seeds must be a non-empty sequence of integers")
    n = len(prob.protocol_starts()) if n is None else _check_int("n", n, 1)
    draws = [prob.initial_points(n, seed=SEEDED_STARTS_OFFSET + s).to(torch.float64) for s in seeds_t]
    return torch.stack(draws, dim=1)


def jittered_starts(problem: ParetoProblem | str, starts: Tensor | Sequence | None, seeds: Sequence[int],
                    sigma: float) -> Tensor:
    """Per-seed starts ``(S, R, dim)``: start ``s`` of seed ``r`` is ``starts[s] + σ ε`` with
    ``ε ~ N(0, I)`` drawn from a generator seeded ``JITTER_SEED_OFFSET + r`` (one ``(S, dim)``
    draw per seed, so a run's start depends only on its start and its seed), clamped into the
    problem's bounds where it has them. ``σ`` is in the problem's own units (ZDT/DTLZ2 live in
    ``[0, 1]``, the toy's published starts span ``[−8.5, 9]``). ``σ = 0`` repeats every start per
    seed unchanged.
    """
    prob = problem_from_spec(problem)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"the start jitter must be a finite number >= 0, got {sigma!r}")
    seeds_t = tuple(_check_int("each seed", s, 0) for s in seeds)
    if not seeds_t:
        raise ValueError("seeds must be a non-empty sequence of integers")
    S0 = _check_starts(prob, starts)
    if S0.dim() != 2:
        raise ValueError("jittered_starts takes starts shared by every seed, shape (S, dim)")
    out = []
    for s in seeds_t:
        g = torch.Generator().manual_seed(JITTER_SEED_OFFSET + s)
        out.append(S0 + float(sigma) * torch.randn(S0.shape, generator=g, dtype=torch.float64))
    X = torch.stack(out, dim=1)
    if prob.bounds is not None:
        lo, hi = (b.to(torch.float64) for b in prob.bounds)
        X = torch.maximum(torch.minimum(X, hi), lo)
    return X


# ---------------------------------------------------------------------------------- metrics
def pareto_stationarity(J: Tensor) -> Tensor:
    """``min_{α∈Δ} ‖αᵀ J‖`` for Jacobians ``J`` (B, K, d) -> (B,), float64 CPU.

    The norm of the min-norm element of the convex hull of the task gradients: zero exactly at
    Pareto-stationary points (MGDA's criterion, Désidéri 2012; Sener & Koltun 2018).
    """
    from mtl_opt.solvers import min_norm_weights

    J64 = J.detach().to(device="cpu", dtype=torch.float64)
    M = J64 @ J64.transpose(-1, -2)
    M = 0.5 * (M + M.transpose(-1, -2))
    alpha = min_norm_weights(M)
    d = (alpha.unsqueeze(-2) @ J64).squeeze(-2)
    return torch.linalg.vector_norm(d, dim=-1)


class _Recorder:
    def __init__(self, problem: ParetoProblem, n_methods: int, n_runs: int, record_x: bool) -> None:
        self.problem, self.n_methods, self.n_runs = problem, n_methods, n_runs
        self.record_x = record_x
        self.steps: list[int] = []
        self.losses: list[Tensor] = []
        self.stat: list[Tensor] = []
        self.dist: list[Tensor] = []
        self.xs: list[Tensor] = []
        self.known_front = problem.has_known_front

    def record(self, step: int, x: Tensor) -> None:
        finite_x = torch.isfinite(x.detach()).all(-1)
        if not bool(finite_x.all()):
            raise _NonFinite(step, (~finite_x).nonzero().flatten().tolist())
        F, J = self.problem.losses_and_jacobian(x.detach())
        blocked = self.problem.blocked_coordinates(x.detach(), J)
        if blocked is not None:
            J = J.masked_fill(blocked.unsqueeze(-2), 0.0)
        F = F.to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(F).all()) or not bool(torch.isfinite(J).all()):
            bad = (~torch.isfinite(F).all(-1)).nonzero().flatten().tolist()
            raise _NonFinite(step, bad)
        self.steps.append(step)
        self.losses.append(F)
        self.stat.append(pareto_stationarity(J))
        if self.known_front:
            self.dist.append(self.problem.front_distance(F))
        if self.record_x:
            self.xs.append(x.detach().to(device="cpu", dtype=torch.float64).clone())

    def slice_metrics(self, m: int, t: int = -1) -> dict[str, float]:
        sl = slice(m * self.n_runs, (m + 1) * self.n_runs)
        return _mean_metrics(self.losses[t][sl], self.stat[t][sl], self.dist[t][sl] if self.known_front else None)

    def history(self, m: int) -> dict[str, Any]:
        sl = slice(m * self.n_runs, (m + 1) * self.n_runs)
        return {
            "step": list(self.steps),
            "losses": torch.stack([f[sl] for f in self.losses]),
            "stationarity": torch.stack([s[sl] for s in self.stat]),
            "front_distance": torch.stack([d[sl] for d in self.dist]) if self.known_front else None,
            "x": torch.stack([x[sl] for x in self.xs]) if self.record_x else None,
        }


class _NonFinite(RuntimeError):
    def __init__(self, step: int, rows: list[int]) -> None:
        super().__init__(step, rows)
        self.step, self.rows = step, rows


# ---------------------------------------------------------------------------------- the runs
def run_method(
    problem: ParetoProblem | str,
    method: GradientAggregator | str,
    *,
    starts: Tensor | Sequence | None = None,
    seeds: Sequence[int] = (0,),
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    record_every: int = 100,
    callback: Callback | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float64,
) -> RunResult:
    """Run one method from every start with every seed, all runs batched; see the module doc.

    Args:
        problem: a problem object or a spec such as ``"zdt1"`` or ``"quadratic:imbalance=100"``.
        method: a :class:`~mtl_opt.GradientAggregator` or a spec such as ``"came_grad:kappa=2"``.
        starts: (S, dim) starting points shared by every seed, or (S, R, dim) per-seed starts
            (run ``s·R + r`` starts at ``starts[s, r]``; see :func:`seeded_starts` and
            :func:`jittered_starts`); ``None`` uses the problem's protocol starts.
        seeds: one run per start and seed. A seed drives the run's gradient noise on noisy
            problems (``gradient_noise_std > 0``) and the random stream of methods with seeded
            randomness (PCGrad's orders: one instance per run seed, seeded from the method's
            ``seed`` and the run seed); nothing else. With shared starts on a deterministic
            problem the seeds of a start are identical copies for deterministic methods (pass
            per-seed starts to make them replicates).
        optimizer: ``"adam"`` or ``"sgd"``: torch's updates with their default settings but
            ``lr`` (Adam ``betas=(0.9, 0.999)``, ``eps=1e-8``; SGD without momentum).
        lr: learning rate > 0.
        steps: number of optimisation steps ≥ 1.
        record_every: history interval (the start and the end are always recorded).
        callback: ``callback(step, metrics)`` at every record, with the means over runs of
            ``loss_1..loss_K``, ``stationarity`` and (when the front is known) ``front_distance``.
        device: where ``x`` and the Jacobians live (the K×K solves run on the CPU).
        dtype: ``float64`` (default) or ``float32``: the precision of ``x``, the losses, the
            Jacobians, the direction and the optimizer's state (the Gramian and the K×K solves
            stay in float64;
            the recorded metrics are computed in float64 from ``x``). The published Nash-MTL toy
            code ran in float32, and runs that stall on a plateau end at points that depend on it.

    Everything is validated before the first step.
    """
    wrapped = None
    if callback is not None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")

        def wrapped(step: int, by_method: dict[str, dict[str, float]]) -> None:
            callback(step, next(iter(by_method.values())))

    return run_methods(problem, [method], starts=starts, seeds=seeds, optimizer=optimizer, lr=lr,
                       steps=steps, record_every=record_every, callback=wrapped, device=device,
                       dtype=dtype)[0]


def run_methods(
    problem: ParetoProblem | str,
    methods: Sequence[GradientAggregator | str],
    *,
    starts: Tensor | Sequence | None = None,
    seeds: Sequence[int] = (0,),
    optimizer: str = "adam",
    lr: float = 1e-3,
    steps: int = 1000,
    record_every: int = 100,
    callback: Callable[[int, dict[str, dict[str, float]]], Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float64,
) -> list[RunResult]:
    """:func:`run_method` for several methods in one batch (one parameter tensor, one optimizer).

    ``callback(step, {label: metrics})`` receives every method's means. Methods are reset
    before the run; a method given twice must be given as two objects (or two specs).
    """
    prob = problem_from_spec(problem)
    if isinstance(methods, (str, GradientAggregator)) or not isinstance(methods, Sequence) or not methods:
        raise ValueError("methods must be a non-empty list of method specs or aggregators")
    parsed = [method_from_spec(m) for m in methods]
    labels = [lab for lab, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods must be distinct, got {labels}")
    aggs = [agg for _, agg in parsed]
    if len({id(a) for a in aggs}) != len(aggs):
        raise ValueError("the same aggregator object was given twice; pass separate objects")
    dev, seeds_t = _check_settings(optimizer, lr, steps, record_every, seeds, device)
    run_dtype = check_run_dtype(dtype)
    S0 = _check_starts(prob, starts, len(seeds_t))
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")

    n_m, n_s, n_r = len(aggs), S0.shape[0], len(seeds_t)
    n_runs = n_s * n_r  # per method
    N, K, d = n_m * n_runs, prob.n_tasks, prob.dim
    for agg in aggs:
        agg.reset()
    per_seed = [_per_seed_instances(agg, seeds_t) for agg in aggs]

    # (S*R, d), start-major
    x0 = S0.reshape(n_s * n_r, d) if S0.dim() == 3 else S0.repeat_interleave(n_r, dim=0)
    x = x0.repeat(n_m, 1).to(device=dev, dtype=run_dtype).clone()
    opt = _make_optimizer(optimizer, x, float(lr))
    noise_std = float(prob.gradient_noise_std)
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds_t] if noise_std > 0 else []
    bounded = prob.bounds is not None
    if bounded:
        lo, hi = (b.to(device=dev, dtype=x.dtype) for b in prob.bounds)
    gram_groups: list[tuple[int, GramianAggregator, bool]] = []
    general: list[tuple[int, GradientAggregator]] = []
    loss_groups: list[tuple[int, list[LossWeighting]]] = []  # instances: one, or one per seed
    for m, agg in enumerate(aggs):
        if isinstance(agg, LossWeighting):
            loss_groups.append((m, per_seed[m] or [agg]))  # type: ignore[list-item]
        elif is_gramian_weighting(agg):
            gram_groups.append((m, agg, agg.uses_losses))
        else:
            general.append((m, agg))
    any_losses = any(agg.uses_losses for agg in aggs)
    floor = prob.loss_floor().to(torch.float64) if loss_groups else None

    def weigh_losses(instances: list[LossWeighting], Fm: Tensor, after: bool = False) -> Tensor | None:
        """A loss weighting's weights (or, ``after``, its post-step update) for its runs
        ``Fm`` (n_runs, K), given ``F − floor``; per-seed instances take runs r, R + r, ..."""
        shifted = Fm.to(torch.float64) - floor
        if len(instances) == 1:
            if after:
                instances[0].batch_update(shifted)
                return None
            return instances[0].batch_weights(shifted)
        by_seed = shifted.reshape(n_s, n_r, K)
        out = torch.empty((n_s, n_r, K), dtype=torch.float64)
        for r, inst in enumerate(instances):
            if after:
                inst.batch_update(by_seed[:, r].contiguous())
            else:
                out[:, r] = inst.batch_weights(by_seed[:, r].contiguous())
        return None if after else out.reshape(n_runs, K)

    recorder = _Recorder(prob, n_m, n_runs, d <= MAX_RECORDED_DIM)
    conflicts = torch.zeros(N, dtype=torch.long, device=dev)
    agg_time = [0.0] * n_m
    record_time = 0.0
    zero_beta = torch.zeros((n_runs, K), dtype=torch.float64)
    perf = time.perf_counter
    on_cpu = dev.type == "cpu"

    def do_record(step: int) -> None:
        try:
            recorder.record(step, x)
        except _NonFinite as exc:
            who = sorted({labels[r // n_runs] for r in exc.rows}) or labels
            raise RuntimeError(
                f"{prob.name}: runs of {', '.join(who)} diverged (non-finite losses or gradients) "
                f"by step {exc.step}; lower the learning rate"
            ) from None
        if callback is not None:
            callback(step, {lab: recorder.slice_metrics(m) for m, lab in enumerate(labels)})

    t_start = time.perf_counter()
    for k in range(steps):
        if k % record_every == 0:
            t0 = time.perf_counter()
            do_record(k)
            record_time += time.perf_counter() - t0
        # x carries no autograd graph: the problems return detached Jacobians
        F, J = prob.losses_and_jacobian(x)
        if bounded:
            blocked = ((x <= lo) & (J >= 0).all(dim=-2)) | ((x >= hi) & (J <= 0).all(dim=-2))
            J = J.masked_fill(blocked.unsqueeze(-2), 0.0)
        if gens:
            eps = torch.stack([torch.randn((n_s, K, d), generator=g, device=dev, dtype=J.dtype)
                               for g in gens], dim=1).reshape(1, n_runs, K, d)
            J = (J.reshape(n_m, n_runs, K, d) + noise_std * eps).reshape(N, K, d)
        J64 = J.to(torch.float64)  # the Gramian in float64 whatever the run's precision
        M = J64 @ J64.transpose(-1, -2)
        conflicts += (M < 0).flatten(1).any(1)
        M64 = M if on_cpu else M.to("cpu")
        F64 = (F if on_cpu else F.to("cpu")) if any_losses else None
        Ms = M64.split(n_runs) if n_m > 1 else (M64,)
        Fs = (F64.split(n_runs) if n_m > 1 else (F64,)) if any_losses else None
        betas: dict[int, Tensor] = {}
        for m, instances in loss_groups:
            t0 = perf()
            betas[m] = weigh_losses(instances, Fs[m])  # type: ignore[index,assignment]
            agg_time[m] += perf() - t0
        for m, agg, uses_losses in gram_groups:
            t0 = perf()
            # The methods' vectorised weights, unchecked in the loop: a non-finite weight
            # makes x non-finite, which the next record reports naming the method.
            if per_seed[m] is None:
                betas[m] = agg._batch_weights(Ms[m], losses=Fs[m] if uses_losses else None, task_weights=None)
            else:  # one instance (own random stream) per run seed: runs r, R + r, 2R + r, ...
                Mm = Ms[m].reshape(n_s, n_r, K, K)
                Fm = Fs[m].reshape(n_s, n_r, K) if uses_losses else None
                bm = torch.empty((n_s, n_r, K), dtype=torch.float64)
                for r, inst in enumerate(per_seed[m]):
                    bm[:, r] = inst._batch_weights(Mm[:, r].contiguous(), task_weights=None,
                                                   losses=Fm[:, r].contiguous() if uses_losses else None)
                betas[m] = bm.reshape(n_runs, K)
            agg_time[m] += perf() - t0
        for m, _agg in general:
            betas[m] = zero_beta
        b = torch.cat([betas[m] for m in range(n_m)]) if n_m > 1 else betas[0]
        if not on_cpu:
            b = b.to(dev, non_blocking=True)
        b = b.to(J.dtype)  # float64 coefficients, applied in the run's precision
        direction = (b.unsqueeze(-2) @ J).squeeze(-2)
        for m, agg in general:
            sl = slice(m * n_runs, (m + 1) * n_runs)
            t0 = perf()
            if per_seed[m] is None:
                direction[sl] = agg.aggregate_batch(J[sl], losses=F[sl] if agg.uses_losses else None)
            else:  # one instance (own random stream) per run seed, as for Gramian methods
                Jm = J[sl].reshape(n_s, n_r, K, d)
                Fm = F[sl].reshape(n_s, n_r, K) if agg.uses_losses else None
                dm = direction[sl].view(n_s, n_r, d)
                for r, inst in enumerate(per_seed[m]):
                    dm[:, r] = inst.aggregate_batch(
                        Jm[:, r].contiguous(), losses=Fm[:, r].contiguous() if Fm is not None else None
                    )
            agg_time[m] += perf() - t0
        opt.step(direction)
        if bounded:
            x.clamp_(min=lo, max=hi)
        for m, instances in loss_groups:
            t0 = perf()
            if instances[0].wants_losses_after_step:  # FAMO: the losses after the step
                sl = slice(m * n_runs, (m + 1) * n_runs)
                weigh_losses(instances, prob.losses(x[sl].detach()).cpu(), after=True)
            for inst in instances:  # each step evaluates the whole objective: one epoch
                inst.end_epoch()
            agg_time[m] += perf() - t0
    t0 = time.perf_counter()
    do_record(steps)
    record_time += time.perf_counter() - t0
    total = time.perf_counter() - t_start - record_time
    shared = max(total - sum(agg_time), 0.0)

    conflict_share = conflicts.to("cpu", torch.float64) / steps
    start_index = torch.arange(n_s).repeat_interleave(n_r)
    seed_col = torch.tensor(seeds_t).repeat(n_s)
    x_final = x.detach().to("cpu", torch.float64)
    results = []
    for m, label in enumerate(labels):
        sl = slice(m * n_runs, (m + 1) * n_runs)
        results.append(RunResult(
            problem=prob.name,
            problem_options=prob.options(),
            method=label,
            starts=S0.clone(),
            seeds=seeds_t,
            start_index=start_index.clone(),
            seed=seed_col.clone(),
            x=x_final[sl].clone(),
            losses=recorder.losses[-1][sl].clone(),
            stationarity=recorder.stat[-1][sl].clone(),
            front_distance=recorder.dist[-1][sl].clone() if recorder.known_front else None,
            conflict_share=conflict_share[sl].clone(),
            time_per_step=(shared / n_m + agg_time[m]) / steps,
            steps=steps,
            optimizer=optimizer,
            lr=float(lr),
            history=recorder.history(m),
        ))
    return results


def _per_seed_instances(agg: GradientAggregator, seeds: tuple[int, ...]) -> list[GradientAggregator] | None:
    """For a method with seeded randomness (its constructor takes ``seed``, e.g. PCGrad's
    random projection orders, RLW's random weights, GradDrop's sign draws), one fresh instance per run seed ``r``, seeded with
    ``SeedSequence((method seed, r))`` (NumPy's seed mixing; a method seed of ``None`` counts as
    0), so that a seed is a replicate of the method's randomness too and a run's random stream
    depends only on its method seed and its run seed. ``None`` for every other method."""
    import inspect

    if "seed" not in inspect.signature(type(agg).__init__).parameters:
        return None
    import numpy as np

    hyper = agg.hyperparameters()
    if hyper.get("order") == "fixed":  # PCGrad in index order draws nothing
        return None
    base = hyper.get("seed")
    base = 0 if base is None else int(base)
    out = []
    for r in seeds:
        derived = int(np.random.SeedSequence((base, int(r))).generate_state(1, dtype=np.uint64)[0] >> 2)
        inst = type(agg)(**{**hyper, "seed": derived})
        inst.reset()
        out.append(inst)
    return out


class _Adam:
    """torch.optim.Adam's update (``betas=(0.9, 0.999)``, ``eps=1e-8``, no weight decay), written
    out as its six element-wise tensor ops so that a step over all runs costs a few microseconds
    instead of the optimizer framework's per-call overhead. Same operations in the same order as
    ``torch.optim.Adam(foreach=False)``; a test checks the two agree bit for bit::

        m ← β₁ m + (1 − β₁) g;  v ← β₂ v + (1 − β₂) g²
        x ← x − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
    """

    def __init__(self, x: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.x, self.lr, self.betas, self.eps = x, lr, betas, eps
        self.m = torch.zeros_like(x)
        self.v = torch.zeros_like(x)
        self.t = 0

    def step(self, g: Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = self.lr / (1 - b1 ** self.t)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
        self.x.addcdiv_(self.m, denom, value=-step_size)


class _SGD:
    """torch.optim.SGD's update without momentum: ``x ← x − lr · g``."""

    def __init__(self, x: Tensor, lr: float) -> None:
        self.x, self.lr = x, lr

    def step(self, g: Tensor) -> None:
        self.x.add_(g, alpha=-self.lr)


def _make_optimizer(name: str, x: Tensor, lr: float) -> _Adam | _SGD:
    return _Adam(x, lr) if name == "adam" else _SGD(x, lr)
