"""Multi-task aggregation under ``torch.distributed``: the global batch's Jacobian, exactly.

Plain data parallelism averages ONE gradient per parameter over the ranks. A gradient method
needs more: its direction ``d = A(G)`` is not linear in the batch, so the average of the ranks'
directions is not the direction of the global batch. Under an initialised process group
:func:`mtl_opt.mtl_backward` and :class:`mtl_opt.MultiTaskOptimizer` therefore take one of three
``distributed=`` modes (``R`` ranks, rank ``r`` holding an equal shard of the global batch, every
task loss a mean over its samples, so the global loss is ``L_i = (1/R) Σ_r L_i^r``):

``"global"`` (default)
    The per-task gradient blocks ``G_j^r`` (K × n_j per shared parameter, as the batched
    Jacobian call returns them) are all-reduced and averaged, ``G = (1/R) Σ_r G^r``: the Jacobian
    of the global batch. The blocks travel in buckets of at most :data:`BUCKET_BYTES` (blocks
    larger than that go alone, in place), never as one concatenated ``K × d`` copy. The losses
    are averaged too (``L = (1/R) Σ_r L^r``, K numbers), so every rank gives the method the same
    ``(G, L)``, computes the same weights and writes the same update. Task parameters and every
    other parameter receive ``h_i ∇L_i`` and ``Σ h_i ∇L_i`` of the global batch, i.e. their
    ordinary averaged gradients (averaged in the same buckets). What "global" means per kind:

    * Gramian weightings (MGDA, CAGrad, Nash-MTL, CAME-Grad, PCGrad, ...): ``β`` from the Gramian
      of the averaged ``G``, ``d = βᵀG``.
    * general methods (GradDrop, DB-MTL, MoCo): the direction from the averaged ``G`` itself.
    * loss weightings and LS (one backward pass, no Jacobian): the weights ``w`` come from the
      averaged losses, each rank runs its one backward pass of ``Σ w_i L_i^r`` and the
      resulting gradients are averaged; since ``w`` is the same on every rank,
      ``(1/R) Σ_r Σ_i w_i ∇L_i^r = Σ_i w_i ∇L_i`` exactly. Methods that learn from the losses
      after the step (FAMO's ``update``) must be given the global losses as well:
      ``agg.update(mean_over_ranks(losses_after))`` (:func:`mean_over_ranks`).

    The result equals one process on the concatenated global batch to rounding (the tests check
    every registered method to 1e-6 in float64). Cost: the traffic of data parallelism times K
    for the shared parameters (``K · d`` values instead of ``d``).

    Shared linear layers (``factor_linear``, where one process would factor them) stay
    factored: a weight's Gramian share ``Σ_ab (Δ_i Δ_jᵀ)_ab (X Xᵀ)_ab`` runs over the samples of
    ALL ranks, cross-rank terms included, so every rank's layer inputs ``X^r`` and output
    gradients ``Δ^r`` are all-gathered (``N · (in + K·out)`` values from each rank, one packed
    all-gather per step) and the share and the update are computed on the ``R · N`` stacked rows.
    The alternative, materialising the weight's Jacobian rows and all-reducing them with the
    other blocks (``K · out · in`` values), is what a layer gets when factoring does not pay over
    ``R · N`` rows (the single-process cost rule, applied to the gathered size). Where factoring pays, the gathered message is the smaller one too
    (the rule implies ``R·N·(in + K·out) < K·out·in / 2``); ``benchmarks/bench_distributed.py``
    measures both.

    Representation-level aggregation (``features=z``, MGDA-UB) is exact in this mode too. Each
    rank's features belong to its own samples, so the global representation Jacobian is not an
    average: its rows are the ranks' ``Z^r / R`` side by side, and its Gramian is
    ``M = Σ_r Z^r Z^rᵀ / R²``. That Gramian is all-reduced (K × K numbers, with the losses), the
    weights ``β`` come from it, each rank passes ``βᵀZ^r`` through its encoder and the resulting
    gradients (and the heads') are averaged. The result's ``gramian``, ``grad_norms`` and
    ``cosines`` are then this rank's (of ``Z^r``); its ``weights`` are the global ones.

``"local"``
    Each rank aggregates ITS OWN Jacobian and losses, ``d_r = A(G^r, L^r)``; the update is the
    average of the directions, ``(1/R) Σ_r d_r`` (task and other parameters get the same
    averaged gradients as in ``"global"``). One all-reduce of ``d`` values for the shared
    parameters, as cheap as data parallelism, but a DIFFERENT method: ``(1/R) Σ_r A(G^r) ≠
    A((1/R) Σ_r G^r)`` for every method that is not linear (all but LS and the loss weightings
    with fixed weights); it is the aggregation of a batch R times smaller, averaged. Stateful
    methods then track their own rank's quantities: their states differ across ranks, and a
    checkpoint from rank 0 holds rank 0's.

``"off"``
    The process group is ignored: each rank trains on its own (nothing is communicated).

Outside an initialised process group (or with one rank) the three modes are the same.

DistributedDataParallel
-----------------------
Do not rely on DDP's gradient all-reduce: the Jacobian is taken with ``torch.autograd.grad``,
which does not fire DDP's hooks, so DDP does not communicate on that path (the modes above do the
averaging), and on the one-backward path of the loss weightings DDP's average is followed by the
mode's own (the same numbers, twice the traffic). A DDP-wrapped model is therefore accepted, best
with its forward under ``ddp_model.no_sync()`` (DDP then only keeps its broadcast of the initial
parameters and buffers). DDP with ``find_unused_parameters=True`` or ``static_graph=True`` puts a
node in the graph whose backward schedules DDP's own reduction in the middle of the Jacobian
call; a step whose losses hold such a node outside ``no_sync()`` is refused with an error saying
so.

Same state on every rank
------------------------
In the global mode every rank's method sees the same inputs, so a stateful method (Nash-MTL's
warm start, GradVac's, MoCo's, DB-MTL's, GradNorm's or FAMO's tracked quantities) stays identical
as long as it starts identical. Random methods (PCGrad, GradDrop, RGW, RLW, GradVac) draw from
their own seeded generator; :func:`broadcast_aggregator_state` copies rank 0's state (generators
included) to every rank, and :class:`mtl_opt.MultiTaskOptimizer` calls it when it is built
under a process group. Give random methods an explicit ``seed=`` so that ``reset()`` re-seeds
every rank alike. :func:`state_fingerprint` hashes a state and :func:`check_same_state` compares
the hashes of all ranks. Save checkpoints on rank 0 only (every rank holds the same).

Failures
--------
Every collective here runs under the process group's timeout (``init_process_group(...,
timeout=...)``; :func:`init_process_group_from_env` sets 5 minutes by default, gloo's own
default is 30): a rank that raised or was killed makes the others fail with
:class:`DistributedStepError`, naming the rank and the collective, as soon as the connection
drops or at the latest when the timeout expires, never a silent hang. A step that fails on one
rank only (a non-finite loss or gradient there, e.g. a ``GradScaler`` overflow) fails on every
rank: the global mode checks the losses and the Jacobian after averaging them; the local mode and
the representation level exchange one flag per step (and a rank that fails before the
representation Gramian's all-reduce joins it with NaN), so that no rank waits in a collective
that another will never reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from mtl_opt._layerwise import _FLOAT64_COST, LayerPlan
from mtl_opt.aggregator import GradientAggregator, GramianAggregator

if TYPE_CHECKING:
    from mtl_opt.backward import MTLBackwardResult, _TaskGrads

__all__ = [
    "BUCKET_BYTES",
    "DistributedMode",
    "DistributedStepError",
    "Synchroniser",
    "broadcast_aggregator_state",
    "broadcast_parameters",
    "check_same_state",
    "communication_stats",
    "init_process_group_from_env",
    "mean_over_ranks",
    "reset_communication_stats",
    "state_fingerprint",
    "synchroniser",
]

DistributedMode = Literal["global", "local", "off"]
MODES: tuple[str, ...] = ("global", "local", "off")

#: Largest all-reduce bucket: small blocks are packed into buckets up to this size; a block
#: larger than it is all-reduced alone, in place.
BUCKET_BYTES = 16 * 2**20

_STATS = {"bytes": 0, "calls": 0}


class DistributedStepError(RuntimeError):
    """A collective of a distributed multi-task step failed (another rank failed, was killed or
    exceeded the process group's timeout)."""


def communication_stats() -> dict[str, int]:
    """Bytes this process put into the collectives of multi-task steps (all-reduce buffers,
    all-gather contributions) and how many collectives, since :func:`reset_communication_stats`
    (for benchmarks)."""
    return dict(_STATS)


def reset_communication_stats() -> None:
    _STATS["bytes"] = 0
    _STATS["calls"] = 0


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def check_mode(mode: object) -> DistributedMode:
    if mode not in MODES or not isinstance(mode, str):
        raise ValueError(f"distributed must be one of {list(MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _group_active() -> bool:
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _collective_device(fallback: torch.device) -> torch.device:
    """Where small CPU-side values (losses) travel: the current CUDA device under NCCL."""
    dist = _dist()
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and fallback.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _failed(what: str, exc: BaseException, op: str = "all-reduce") -> DistributedStepError:
    dist = _dist()
    rank = dist.get_rank() if dist.is_initialized() else "?"
    first = str(exc).strip().splitlines()
    reason = first[0][:300] if first else type(exc).__name__
    return DistributedStepError(
        f"rank {rank}: the {op} of {what} failed: another rank failed, was killed or did "
        f"not reach this step within the process group's timeout ({type(exc).__name__}: "
        f"{reason})"
    )


def _all_reduce_mean(tensors: list[Tensor], what: str, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``tensors`` over the ranks, in place, in buckets of at most ``bucket_bytes``.

    Tensors of one dtype and device are packed (in order) into flat buckets; a contiguous tensor
    larger than a bucket is all-reduced alone without a copy. All all-reduces are issued before
    any is waited for, so they overlap.
    """
    dist = _dist()
    world = dist.get_world_size()
    pending: list[tuple[Any, Tensor, list[Tensor]]] = []  # (work, buffer, tensors it holds)

    def launch(buffer: Tensor, members: list[Tensor]) -> None:
        try:
            work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True)
        except Exception as exc:  # noqa: BLE001 - any backend error is reported the same way
            raise _failed(what, exc) from exc
        _STATS["bytes"] += buffer.numel() * buffer.element_size()
        _STATS["calls"] += 1
        pending.append((work, buffer, members))

    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}

    def flush(key: tuple[torch.dtype, torch.device]) -> None:
        members = buckets.pop(key, [])
        sizes.pop(key, None)
        if members:
            launch(torch.cat([t.reshape(-1) for t in members]), members)

    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            continue
        if nbytes > bucket_bytes and t.is_contiguous():
            launch(t, [t])
            continue
        key = (t.dtype, t.device)
        if sizes.get(key, 0) + nbytes > bucket_bytes:
            flush(key)
        buckets.setdefault(key, []).append(t)
        sizes[key] = sizes.get(key, 0) + nbytes
    for key in list(buckets):
        flush(key)
    for work, buffer, members in pending:
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001
            raise _failed(what, exc) from exc
        buffer.div_(world)
        if len(members) == 1 and members[0] is buffer:
            continue
        offset = 0
        for t in members:
            n = t.numel()
            t.copy_(buffer[offset: offset + n].view_as(t))
            offset += n


def mean_over_ranks(values: Tensor | Iterable[Tensor]) -> Tensor:
    """The average over the ranks of ``values`` (e.g. the K losses), detached; ``values``
    itself outside a process group. Use it for the losses given to ``agg.update`` (FAMO) in the
    global mode."""
    if not isinstance(values, Tensor):
        values = torch.stack([torch.as_tensor(v) for v in values])
    out = values.detach().clone()
    if not _group_active():
        return out
    device = _collective_device(out.device)
    moved = out.to(device)
    _all_reduce_mean([moved], "the losses")
    return moved.to(out.device)


class Synchroniser:
    """What one :func:`mtl_opt.mtl_backward` call communicates, in the ``"global"`` or
    ``"local"`` mode under an active process group (see the module docstring)."""

    def __init__(self, mode: DistributedMode) -> None:
        self.mode = mode

    # -- global mode -----------------------------------------------------------------------
    def losses(self, L: Tensor) -> Tensor:
        """The losses averaged over the ranks (detached, float64; checked by the caller, after
        the all-reduce, so that a non-finite loss on one rank stops every rank alike)."""
        values = L.detach().to(dtype=torch.float64)
        device = _collective_device(values.device)
        moved = values.to(device, copy=True)
        _all_reduce_mean([moved], "the task losses")
        return moved

    def check_step(self, loss_list: list[Tensor]) -> None:
        """Refuse, before any communication, what cannot be done exactly."""
        refuse_ddp_reduction(loss_list)

    def layer_plan(self, plan: LayerPlan | None, n_tasks: int) -> LayerPlan | None:
        """The factored linear layers of the global mode: those of ``plan`` for which factoring
        still pays over the ``R · N`` rows of all ranks (the single-process rule of
        :func:`mtl_opt._layerwise.plan_linear_layers`, applied to the gathered size); the others
        take their Jacobian rows (all-reduced with the other blocks)."""
        if plan is None:
            return None
        world = _dist().get_world_size()
        K = n_tasks
        keep = []
        for f in plan.factored:
            if not all(_plain_linear(plan.uses[u]) for u in f.uses):
                continue  # only ``Y = X Wᵀ`` uses are gathered row-wise; others take rows
            N = world * sum(plan.uses[u].X.shape[0] for u in f.uses)
            first = plan.uses[f.uses[0]]
            fan_in, fan_out = first.X.shape[1], first.out
            if _FLOAT64_COST * (N * N * fan_in + K * K * N * N * fan_out) <= K * N * fan_in * fan_out:
                keep.append(f)
        if len(keep) == len(plan.factored):
            return plan
        if not keep:
            return None
        kept_uses = sorted(u for f in keep for u in f.uses)
        position = {u: i for i, u in enumerate(kept_uses)}
        dropped = [f.index for f in plan.factored if f not in keep]
        return dataclasses.replace(
            plan,
            uses=[plan.uses[u] for u in kept_uses],
            factored=[dataclasses.replace(f, uses=[position[u] for u in f.uses]) for f in keep],
            rest=sorted([*plan.rest, *dropped]),
            checks=[
                dataclasses.replace(c, uses=[position[u] for u in c.uses])
                for c in plan.checks if all(u in position for u in c.uses)
            ],
        )

    def task_grads(self, grads: _TaskGrads, level: str) -> None:
        """Average the per-task gradient blocks (or the flat ``G`` of the per-task loop) and
        the head updates over the ranks, in place; gather the factored layers' inputs and
        output gradients."""
        assert level == "parameters", "features= runs through averaged_call"
        if grads.plan is not None and grads.deltas is not None:
            _gather_layers(grads)
        rows = grads.blocks if grads.blocks is not None else ([grads.G] if grads.G is not None else [])
        heads = [g for g in grads.head if g is not None]
        _all_reduce_mean([*rows, *heads], "the task Jacobian")

    @contextlib.contextmanager
    def new_grads_averaged(self, loss_list: list[Tensor]) -> Iterator[list[Any]]:
        """Average over the ranks what the body adds to the ``.grad`` of every leaf the losses
        reach (gradients held before stay as they were, added back afterwards). Yields a list
        into which the body may put its :class:`MTLBackwardResult`, whose direction is then
        kept readable."""
        from mtl_opt.backward import _reachable_leaves

        leaves = _reachable_leaves(loss_list)
        held = [p.grad for p in leaves]
        for p in leaves:
            p.grad = None
        out: list[Any] = []
        try:
            yield out
        except BaseException:
            for p, g in zip(leaves, held):
                p.grad = g
            raise
        written = [p.grad for p in leaves if p.grad is not None]
        dense = [g for g in written if not g.is_sparse]
        for p in leaves:
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()
                dense.append(p.grad)
        _all_reduce_mean(dense, "the gradients")
        for p, g in zip(leaves, held):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad = g + p.grad.to(g.dtype) if g.is_sparse else g.add_(p.grad)
        for result in out:
            _refresh_direction(result)

    def averaged_call(
        self, run: Callable[[GradientAggregator], MTLBackwardResult],
        aggregator: GradientAggregator, loss_list: list[Tensor],
    ) -> MTLBackwardResult:
        """``run(aggregator)`` (the un-synchronised call) under :meth:`new_grads_averaged`: the
        local mode, and (global mode, ``features=``) representation-level aggregation with the
        weights of the global Gramian (:class:`_GlobalGramian`)."""
        if self.mode == "global":
            assert isinstance(aggregator, GramianAggregator), "mtl_backward checks features="
            aggregator = _GlobalGramian(aggregator)
        with self.new_grads_averaged(loss_list) as out:
            failed: Exception | None = None
            try:
                result = run(aggregator)
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                failed = exc
                if isinstance(aggregator, _GlobalGramian) and not aggregator.exchanged:
                    # This rank failed before the Gramian's all-reduce, which the others are
                    # in: join it with NaN, so that they fail too (their weights refuse it).
                    aggregator.poison(len(loss_list))
            _all_succeeded(failed)  # every rank learns whether all succeeded
            out.append(result)
        return result


def _all_succeeded(failed: Exception | None) -> None:
    """One all-reduce of a flag per rank: when any rank's local step failed, every rank raises
    (that rank its own error, the others a ``ValueError`` naming it), so that no rank goes on
    to a collective that the failed rank will never join, and a ``GradScaler`` overflow on one
    rank skips the step on all of them (the message says "not finite")."""
    dist = _dist()
    flags = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    flags[dist.get_rank()] = 0.0 if failed is None else 1.0
    moved = flags.to(_collective_device(flags.device))
    try:
        dist.all_reduce(moved)
    except Exception as exc:  # noqa: BLE001
        raise _failed("the step's outcome", exc) from exc
    _STATS["bytes"] += moved.numel() * moved.element_size()
    _STATS["calls"] += 1
    bad = [r for r, v in enumerate(moved.cpu().tolist()) if v]
    if failed is not None:
        raise failed
    if bad:
        raise ValueError(
            f"rank(s) {bad} could not complete this step (a loss or gradient that is not finite, "
            "or another error reported there); the step is abandoned on every rank"
        )


def _plain_linear(use: Any) -> bool:
    """Whether a factored use is a plain ``Y = X Wᵀ`` over the rows of ``X`` (N × in), whose
    rows can be stacked across ranks; any other kind of use (a convolution, an embedding, a
    grouped product) keeps its weight's Jacobian rows in the global mode."""
    return (
        isinstance(use.X, Tensor) and use.X.dim() == 2 and use.X.is_floating_point()
        and getattr(use, "conv", None) is None and not getattr(use, "table", 0)
        and getattr(use, "groups", 1) == 1
    )


def _gather_layers(grads: _TaskGrads) -> None:
    """Replace the factored layers' ``(X, Δ)`` by those of the global batch: every rank's
    inputs ``X^r`` (N × in) stacked, and ``Δ^r / R`` (the gradients of the global loss, the mean
    of the ranks') stacked along the rows. One all-gather of all of them, packed.

    Then the weight's Gramian share ``Σ_ab (Δ_i Δ_jᵀ)_ab (X Xᵀ)_ab`` runs over all ``R · N``
    rows, cross-rank terms included, and its update ``(Σ_k β_k Δ_k)ᵀ X`` is the global batch's;
    a bias that checks a layer's ``Δ`` (its rows, averaged with the other blocks, are
    ``(1/R) Σ_r Σ_rows Δ^r``) still equals the gathered ``Σ_rows Δ``.
    """
    dist = _dist()
    world = dist.get_world_size()
    plan, deltas = grads.plan, grads.deltas
    assert plan is not None and deltas is not None
    dtype = deltas[0].dtype
    parts = [t.reshape(-1).to(dtype) for u, D in zip(plan.uses, deltas) for t in (u.X, D)]
    flat = torch.cat(parts)
    every = [torch.empty_like(flat) for _ in range(world)]
    try:
        dist.all_gather(every, flat)
    except Exception as exc:  # noqa: BLE001
        raise _failed("the linear layers' inputs and output gradients", exc, "all-gather") from exc
    _STATS["bytes"] += flat.numel() * flat.element_size()
    _STATS["calls"] += 1
    sizes = [t.numel() for t in parts]
    pieces = [list(torch.split(buffer, sizes)) for buffer in every]
    uses, new_deltas = [], []
    for i, (u, D) in enumerate(zip(plan.uses, deltas)):
        Xs = [pieces[r][2 * i].view(u.X.shape).to(u.X.dtype) for r in range(world)]
        Ds = [pieces[r][2 * i + 1].view(D.shape) for r in range(world)]
        uses.append(dataclasses.replace(u, X=torch.cat(Xs)))
        new_deltas.append(torch.cat(Ds, dim=1).div_(world))
    grads.plan = dataclasses.replace(plan, uses=uses)
    grads.deltas = new_deltas


class _GlobalGramian(GramianAggregator):
    """``inner``'s weights from the Gramian and losses of the GLOBAL batch, given this rank's.

    Representation-level aggregation (``features=z``): rank ``r``'s rows ``Z^r`` are the
    gradients of its own loss at its own samples' features. In the global batch (loss
    ``L = (1/R) Σ_r L^r``) those features' rows are ``Z^r / R`` and the rows of different
    ranks occupy different columns, so ``M = Σ_r Z^r Z^rᵀ / R²``: an all-reduce of K × K
    numbers (with the K losses, averaged). The direction at rank ``r``'s features is then
    ``βᵀZ^r`` (``R`` times the global batch's share, which the average over ranks of the
    pass through the encoder divides back out).
    """

    def __init__(self, inner: GramianAggregator) -> None:
        self.inner = inner
        self.exchanged = False  # whether this call's all-reduce took place
        self.uses_losses = inner.uses_losses
        self.requires_losses = inner.requires_losses
        self.accepts_task_weights = inner.accepts_task_weights

    def loss_weights(self, n_tasks: int) -> Tensor | None:
        return self.inner.loss_weights(n_tasks)

    def __repr__(self) -> str:
        return f"{self.inner!r} on the global Gramian"

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        dist = _dist()
        world = dist.get_world_size()
        K = M.shape[0]
        parts = [M.reshape(-1) * world] + ([] if losses is None else [losses.to(torch.float64)])
        both = torch.cat(parts).to(_collective_device(M.device))
        self.exchanged = True
        _all_reduce_mean([both], "the representation Gramian")
        both = both.cpu()
        M_global = both[: K * K].view(K, K) / float(world * world)
        M_global = (M_global + M_global.T) / 2
        L_global = None if losses is None else both[K * K:]
        if not bool(torch.isfinite(both).all()):
            raise ValueError(
                "the representation Gramian or the losses of another rank are not finite "
                "(that rank could not complete this step)"
            )
        return self.inner._checked_weights(M_global, L_global, task_weights)

    def poison(self, n_tasks: int) -> None:
        """Join the all-reduce that the other ranks are in with NaN (this rank failed first)."""
        n = n_tasks * n_tasks + (n_tasks if self.uses_losses else 0)
        nan = torch.full((n,), float("nan"), dtype=torch.float64)
        self.exchanged = True
        _all_reduce_mean([nan.to(_collective_device(nan.device))], "the representation Gramian")


def _refresh_direction(result: object) -> None:
    """After averaging, the result's direction pieces (the new ``.grad`` tensors, averaged in
    place) hold the averaged update: keep them readable."""
    from mtl_opt.backward import MTLBackwardResult, _BlockedAggregationResult

    if not isinstance(result, MTLBackwardResult):
        return
    agg = result.aggregation
    if isinstance(agg, _BlockedAggregationResult) and agg._flat is None and agg._pieces:
        agg._freeze_versions()


def synchroniser(mode: object) -> Synchroniser | None:
    """The :class:`Synchroniser` of ``mode``, or ``None`` when nothing is communicated (mode
    ``"off"``, no initialised process group, or a group of one rank)."""
    mode = check_mode(mode)
    if mode == "off" or not _group_active():
        return None
    return Synchroniser(mode)


def refuse_ddp_reduction(loss_list: list[Tensor]) -> None:
    """Raise when the losses' graph holds DDP's own reduction node (``_DDPSink``, added by a
    DDP forward with ``find_unused_parameters=True`` or ``static_graph=True`` outside
    ``no_sync()``), whose backward would start DDP's reduction in the middle of the Jacobian."""
    stack = [loss.grad_fn for loss in loss_list if loss.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "_DDPSinkBackward":
            raise RuntimeError(
                "the losses come from a DistributedDataParallel forward with "
                "find_unused_parameters=True or static_graph=True that ran outside no_sync(): "
                "DDP would start its own gradient reduction inside the Jacobian computation. "
                "Run the forward under `with ddp_model.no_sync():` (mtl_opt averages the task "
                "gradients itself; see mtl_opt.distributed)"
            )
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                stack.append(nxt)


# --------------------------------------------------------------------------------------------
# Same parameters and state on every rank
# --------------------------------------------------------------------------------------------
def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does when built);
    nothing outside a process group."""
    if not _group_active():
        return
    dist = _dist()
    for t in [*module.parameters(), *module.buffers()]:
        with torch.no_grad():
            try:
                dist.broadcast(t.data, src=src)
            except Exception as exc:  # noqa: BLE001
                raise _failed("the initial parameters", exc, "broadcast") from exc


def broadcast_aggregator_state(aggregator: GradientAggregator, src: int = 0) -> None:
    """Give every rank rank ``src``'s aggregator state (random generators, tracked quantities).

    First checks that every rank built the same method with the same hyperparameters
    (``repr``): otherwise every rank raises ``ValueError`` naming the ranks that differ.
    Nothing outside a process group.
    """
    if not _group_active():
        return
    dist = _dist()
    every: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(every, repr(aggregator))
    except Exception as exc:  # noqa: BLE001
        raise _failed("the aggregators' descriptions", exc, "all-gather") from exc
    differ = [r for r, text in enumerate(every) if text != every[src]]
    if differ:
        raise ValueError(
            f"every rank must use the same method and hyperparameters: rank {src} built "
            f"{every[src]}, rank {differ[0]} built {every[differ[0]]}"
            + (f" (and {len(differ) - 1} more ranks differ)" if len(differ) > 1 else "")
        )
    payload = [_state_bytes(aggregator.state_dict())]
    try:
        dist.broadcast_object_list(payload, src=src)
    except Exception as exc:  # noqa: BLE001
        raise _failed("the aggregator state", exc, "broadcast") from exc
    if dist.get_rank() != src:
        aggregator.load_state_dict(_state_from_bytes(payload[0]))


def _state_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _state_from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), weights_only=True)


def state_fingerprint(aggregator: GradientAggregator) -> str:
    """A SHA-256 of the aggregator's ``state_dict()`` (tensors by dtype, shape and bytes; other
    values by ``repr``), equal on two ranks exactly when their states are equal."""
    digest = hashlib.sha256()

    def feed(obj: object) -> None:
        if isinstance(obj, Tensor):
            t = obj.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            digest.update(b"{")
            for key in sorted(obj, key=repr):
                digest.update(repr(key).encode())
                feed(obj[key])
            digest.update(b"}")
        elif isinstance(obj, (list, tuple)):
            digest.update(b"[")
            for item in obj:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr(obj).encode())

    feed(aggregator.state_dict())
    return digest.hexdigest()


def check_same_state(aggregator: GradientAggregator) -> str:
    """Raise ``RuntimeError`` naming the ranks whose aggregator state differs from rank 0's;
    returns the common :func:`state_fingerprint`."""
    mine = state_fingerprint(aggregator)
    if not _group_active():
        return mine
    dist = _dist()
    every: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(every, mine)
    except Exception as exc:  # noqa: BLE001
        raise _failed("the aggregator state fingerprints", exc, "all-gather") from exc
    differ = [r for r, h in enumerate(every) if h != every[0]]
    if differ:
        raise RuntimeError(
            f"{type(aggregator).__name__}: the aggregator state of rank(s) {differ} differs from "
            "rank 0's"
        )
    return mine


def init_process_group_from_env(
    backend: str | None = None, timeout: datetime.timedelta = datetime.timedelta(minutes=5)
) -> bool:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with a timeout; ``False`` (nothing done)
    when the process was not started by a launcher. The backend defaults to NCCL on CUDA
    machines and gloo otherwise."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    dist = _dist()
    if dist.is_initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True
