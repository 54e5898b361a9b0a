"""The one trainer: any training workload, any registered method.

``train(TrainConfig(workload="multimnist", method="came_grad", seed=0, out="runs/x"))`` builds
the workload's data and model (:mod:`mtl_opt.problems.workload`), trains it with
:class:`mtl_opt.MultiTaskOptimizer` — the shared parameters receive the method's aggregated
direction, each task's own parameters its task's gradient — validates after every epoch (or every
``eval_every`` steps), evaluates the test split at the end and writes a run folder, claimed
atomically before any work (:mod:`mtl_opt._output_folder`):

* ``config.json``: the exact :class:`TrainConfig`, the resolved settings, the workload's spec;
* ``steps.csv``: every ``log_every``-th step: task losses, the method's weights β, the task
  gradient norms, this step's mean cosine between task gradients and whether they conflicted,
  the running conflict share (:mod:`mtl_opt.experiments.conflict`), ``joint_norm = ‖Σ ω_i g_i‖``,
  ``update_norm`` (the shared parameters' ``.grad`` the step applied) and their ratio
  ``diffusion`` (CAME-Grad's diagnostic: below 1 when aggregation shrinks the update), time;
* ``epochs.csv``: one row per validation: mean training losses, mean cosine and conflict share
  since the previous row, and every validation metric (``val_*``);
* ``checkpoint.pt``: model, optimizer and aggregator state, the data position and every random
  generator, as tensors and plain data (:mod:`mtl_opt.experiments.checkpoint`), written at each
  validation; ``train(cfg, resume=run_dir)`` continues from it and ends with the same parameters,
  bit for bit, as a run that was never interrupted;
* ``result.json``: the test metrics, the last validation's, the conflict statistics, the times;
  and whatever the workload writes after the test (:meth:`TrainingWorkload.write_test_outputs`:
  generated samples, say), listed in ``result.json``.

**Methods of every kind**, written once here: a Gramian or general method aggregates the
Jacobian of the shared parameters; a loss weighting (and linear scalarization) takes one backward
pass of the weighted sum (no Jacobian), is told where the data's epochs end (DWA, STCH) and, when
it learns from the losses after the step (FAMO), gets them from one more forward pass of the same
batch without gradients. Task weights ω (``task_weights``, else the workload's): methods that take
them (``ls``, ``came_grad``) receive them at every step; for the others the losses are scaled by ω
before differentiation (``task_weights_mode`` in ``config.json``; nothing is done when ω is all
ones). ``aggregate_at="representation"`` aggregates at the shared representation (MGDA-UB).

**Conflict diagnostics** on the shared parameters: a Gramian method's step computes ``G Gᵀ``, so
every step is measured for free; for methods without a Jacobian, and at the representation level,
the parameters' Gramian is measured on logged steps only, and the statistics count those steps:
taken from the step itself where it computed one (a loss weighting whose task groups other tasks'
losses reach takes the Jacobian path), else with one more backward pass, batched over the K tasks
(:func:`mtl_opt.experiments.conflict.task_gramian`).

**Single-task runs**: ``task="left"`` trains that task alone (its loss only, K = 1): the
single-task baseline of Δm% (:mod:`mtl_opt.experiments.field_tables`).

**Several processes** (``torchrun --nproc_per_node R ... mtl-opt train``): every global batch is
split over the ranks, the method aggregates the global batch's Jacobian (``distributed="global"``)
or each rank's (``"local"``), rank 0 alone writes the run folder; see :func:`train`.

AMP: ``amp=True`` on CUDA runs the forward passes under bfloat16 autocast (float16 on request,
without loss scaling). Progress: a bar on a terminal with ``verbose=True``.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mtl_opt.experiments.checkpoint import (
    first_line,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mtl_opt.experiments.conflict import ConflictTally, step_conflict, task_gramian
from mtl_opt.experiments.environment import environment_stamp
from mtl_opt.experiments.run_log import CSVLog, Progress

__all__ = [
    "CHECKPOINT_FORMAT",
    "Run",
    "TrainConfig",
    "TrainState",
    "evaluate_split",
    "load_run_checkpoint",
    "prepare",
    "restore",
    "resume_config",
    "run_checkpoint",
    "train",
    "train_steps",
]

CHECKPOINT_FORMAT = "mtl_opt.train/1"
OPTIMIZERS = ("adam", "adamw", "sgd")
AGGREGATE_AT = ("parameters", "representation")
_CHECKPOINT_KEYS = ("config", "model", "optimizer", "train_state", "shuffle_generator", "rng")


@dataclass
class TrainConfig:
    """Everything that defines one training run (saved as ``config.json``).

    Attributes:
        workload: a workload spec, ``"multimnist"`` or ``"multimnist:n_train=2000"``.
        method: a method spec, ``"came_grad"`` or ``"cagrad:c=0.4"``.
        task: train this task alone (a name of the workload's ``task_names``): a single-task
            baseline. ``None``: every task, with ``method``.
        seed: the run's seed (model initialisation, data order, random methods, the workload's
            data when it draws it per seed).
        epochs / steps: training length (at most one; default: the workload's).
        batch_size, lr, optimizer, weight_decay: the torch optimizer (default: the workload's);
            ``optimizer`` is ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
        grad_clip: clip the total gradient norm after aggregation (0: off).
        task_weights: ω per task (default: the workload's, else ones).
        aggregate_at: ``"parameters"`` or ``"representation"`` (MGDA-UB).
        device: ``"cpu"``, ``"cuda"`` (``"cuda:1"``, ...) or ``"auto"``.
        amp, amp_dtype: mixed precision on CUDA (``auto``: bfloat16).
        log_every: a ``steps.csv`` row every this many steps (and the first and last step).
        eval_every: validate (and checkpoint) every this many steps; ``None``: every epoch;
            ``0``: only at the end.
        eval_batch_size: batch size of validation and test (default: ``batch_size``).
        num_workers: data-loader worker processes (0: load in the training process).
        out: the run folder (default ``runs/train-<UTC time>``).
        distributed: under a process group of several ranks (``torchrun``), how the method
            aggregates: ``"global"`` (the global batch's Jacobian, equal to one process),
            ``"local"`` (each rank's own, directions averaged) or ``"off"`` (refused with
            several ranks: they would train independent copies). See :mod:`mtl_opt.distributed`.
    """

    workload: str = "multimnist"
    method: str = "ls"
    task: str | None = None
    seed: int = 0
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    grad_clip: float = 0.0
    task_weights: list[float] | None = None
    aggregate_at: str = "parameters"
    device: str = "cpu"
    amp: bool = False
    amp_dtype: str = "auto"
    log_every: int = 10
    eval_every: int | None = None
    eval_batch_size: int | None = None
    num_workers: int = 0
    out: str | None = None
    distributed: str = "global"

    def validate(self) -> None:
        """Raise one clear error for a bad option, before any work."""
        import mtl_opt
        from mtl_opt.problems.workload import training_workload_from_spec

        workload = training_workload_from_spec(self.workload)
        name, hyper = mtl_opt.parse_method_spec(self.method)
        mtl_opt.get_aggregator(name, **hyper)
        if self.task is not None and self.task not in workload.task_names:
            raise ValueError(f"task {self.task!r} is not a task of workload {workload.name!r} "
                             f"({', '.join(workload.task_names)})")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        for key in ("steps", "epochs"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{key} must be an integer >= 0, got {v!r}")
        for key in ("batch_size", "eval_batch_size"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {self.log_every!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                        and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be a finite number >= 0, got {self.grad_clip!r}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}")
        if self.aggregate_at not in AGGREGATE_AT:
            raise ValueError(f"aggregate_at must be one of {AGGREGATE_AT}, got {self.aggregate_at!r}")
        if self.amp_dtype not in ("auto", "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be auto, bfloat16 or float16, got {self.amp_dtype!r}")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or self.eval_every < 0):
            raise ValueError(f"eval_every must be an integer >= 0, got {self.eval_every!r}")
        if self.distributed not in ("global", "local", "off"):
            raise ValueError(f"distributed must be global, local or off, got {self.distributed!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.task_weights is not None:
            w = list(self.task_weights)
            if len(w) != workload.n_tasks:
                raise ValueError(f"task_weights has {len(w)} entries for the {workload.n_tasks} tasks "
                                 f"{', '.join(workload.task_names)}")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in w):
                raise ValueError(f"task_weights must be finite numbers > 0, got {w}")
        device = torch.device(self.resolved_device())
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if self.amp and device.type != "cuda":
            raise ValueError("amp needs a CUDA device (no mixed precision on the CPU)")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}")
        return cls(**d)


@dataclass
class TrainState:
    """Where a run is, besides the model and optimizer: the step, the epoch and the batches of
    it already taken, the shuffling generator's state at the epoch's start (the epoch's order is
    redrawn from it), the conflict tally of the whole run and of the current validation interval,
    and the interval's summed training losses."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_generator_state: torch.Tensor | None = None
    tally: ConflictTally = field(default_factory=ConflictTally)
    interval_tally: ConflictTally = field(default_factory=ConflictTally)
    interval_steps: int = 0
    interval_loss_sum: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "epoch_generator_state": self.epoch_generator_state, "tally": self.tally.to_dict(),
                "interval_tally": self.interval_tally.to_dict(), "interval_steps": self.interval_steps,
                "interval_loss_sum": self.interval_loss_sum}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(int(d["step"]), int(d["epoch"]), int(d["batch_in_epoch"]), d["epoch_generator_state"],
                   ConflictTally.from_dict(d["tally"]), ConflictTally.from_dict(d["interval_tally"]),
                   int(d["interval_steps"]),
                   None if d["interval_loss_sum"] is None else [float(v) for v in d["interval_loss_sum"]])


@dataclass
class Run:
    """Everything a run is made of, built by :func:`prepare`."""

    cfg: TrainConfig
    workload: Any
    device: torch.device
    data: Any
    model: torch.nn.Module
    method: str
    hyperparameters: dict[str, Any]
    aggregator: Any
    tasks: list[int]  # indices of the trained tasks in the workload's task_names
    task_weights: list[float]
    task_weights_mode: str  # "none" (all ones), "aggregator" or "loss_scale"
    optimizer: torch.optim.Optimizer
    mto: Any
    shared: list[torch.nn.Parameter]
    batch_size: int
    eval_batch_size: int
    lr: float
    total_steps: int
    steps_per_epoch: int
    state: TrainState
    shuffle_generator: torch.Generator
    rank: int = 0  # this process's rank and the number of ranks sharing each global batch
    world: int = 1

    @property
    def task_names(self) -> list[str]:
        return [self.workload.task_names[i] for i in self.tasks]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    import numpy as np

    np.random.seed(seed % 2**32)


def _make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """bfloat16 (default, where the GPU supports it) or float16 when asked for explicitly
    (without loss scaling: small gradients may underflow, so it is never chosen automatically)."""
    if cfg.amp_dtype == "float16":
        return torch.float16
    if cfg.amp_dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16 autocast: drop amp, or ask for "
                         "amp_dtype float16 (no loss scaling: small gradients may underflow)")
    return torch.bfloat16


def _autocast(run: Run):
    if not run.cfg.amp:
        return nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=_amp_dtype(run.cfg, run.device))


def prepare(cfg: TrainConfig) -> Run:
    """Validate ``cfg`` and build the data, model, method and optimizers (seeded)."""
    import mtl_opt
    from mtl_opt.problems.workload import check_model, training_workload_from_spec

    cfg.validate()
    device = torch.device(cfg.resolved_device())
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this rank's GPU
    if cfg.amp:
        _amp_dtype(cfg, device)  # raises before any work when the GPU cannot do it
    workload = training_workload_from_spec(cfg.workload)
    data = workload.data(cfg.seed)
    if len(data.train) == 0:
        raise ValueError(f"workload {workload.name!r}: the training split is empty")
    _seed_everything(cfg.seed)
    model = workload.build_model(data).to(device)
    shared, task_groups = check_model(model, workload)
    tasks = list(range(workload.n_tasks)) if cfg.task is None else [workload.task_names.index(cfg.task)]
    name, hyper = mtl_opt.parse_method_spec(cfg.method)
    aggregator = mtl_opt.get_aggregator(name, **hyper)
    all_weights = ([float(w) for w in cfg.task_weights] if cfg.task_weights is not None
                   else workload.resolved_task_weights())
    weights = [all_weights[i] for i in tasks]
    if all(w == 1.0 for w in weights):
        mode = "none"
    else:
        mode = "aggregator" if aggregator.accepts_task_weights else "loss_scale"
    d = workload.defaults
    batch_size = cfg.batch_size or d.batch_size
    lr = float(cfg.lr if cfg.lr is not None else d.lr)
    optimizer = _make_optimizer(cfg.optimizer or d.optimizer, list(model.parameters()), lr,
                                cfg.weight_decay if cfg.weight_decay is not None else d.weight_decay)
    rank, world = _ranks(cfg)
    if world > 1:
        if batch_size < world:
            raise ValueError(f"batch size {batch_size} is smaller than the {world} processes: each "
                             "rank needs a share of every global batch")
        from mtl_opt.distributed import broadcast_parameters

        broadcast_parameters(model)  # every rank starts from rank 0's parameters
    mto = mtl_opt.MultiTaskOptimizer(optimizer, aggregator, shared,
                                     task_params=[task_groups[i] for i in tasks],
                                     distributed=cfg.distributed)
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    if cfg.steps is not None:
        total = cfg.steps
    elif cfg.epochs is not None:
        total = cfg.epochs * steps_per_epoch
    else:
        total = d.steps if d.steps is not None else d.epochs * steps_per_epoch
    return Run(cfg, workload, device, data, model, name, hyper, aggregator, tasks, weights, mode,
               optimizer, mto, shared, batch_size, cfg.eval_batch_size or batch_size, lr, total,
               steps_per_epoch, TrainState(), torch.Generator().manual_seed(cfg.seed), rank, world)


def _ranks(cfg: TrainConfig) -> tuple[int, int]:
    """``(rank, world)`` of this process: ``(0, 1)`` outside a process group of several ranks.
    Under one, ``distributed="off"`` is refused: each rank would train its own copy."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, 1
    if cfg.distributed == "off":
        raise ValueError(f"distributed='off' under a process group of {dist.get_world_size()} ranks "
                         "would train that many independent copies into one folder: launch one "
                         "process, or use distributed='global' (or 'local')")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def _batches(run: Run, dataset: Any, batches: list[list[int]], *, seed: int) -> Iterator[Any]:
    """``dataset``'s items, one batch per list of indices in ``batches``, collated and on the device.

    A ``TensorDataset`` with the default collation is indexed directly (the same batches as a
    ``DataLoader`` gives, without per-item work); anything else goes through a ``DataLoader``
    with its own generator, so that starting it leaves the global generators alone (a resumed
    run starts one mid-epoch where an uninterrupted run does not)."""
    from mtl_opt.problems.workload import to_device

    collate = run.data.collate
    if isinstance(dataset, torch.utils.data.TensorDataset) and collate is None and run.cfg.num_workers == 0:
        for indices in batches:
            idx = torch.as_tensor(indices, dtype=torch.long)
            yield to_device([t[idx] for t in dataset.tensors], run.device)
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=run.cfg.num_workers, pin_memory=run.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        yield to_device(batch, run.device)


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def rank_shard(batch: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This rank's share of one global batch and the factor ``c_r`` its task losses are scaled by.

    The ``N`` indices are split into ``world`` consecutive shards whose sizes differ by at most
    one; with ``n_r`` samples, ``c_r = R n_r / N``, so that the ranks' average of the scaled
    mean losses, ``(1/R) Σ_r c_r L_i^r = (1/N) Σ_samples``, is the global batch's mean loss
    (``c_r = 1`` exactly when ``R`` divides ``N``). A rank left without samples (``N < R``, an
    epoch's last batch) takes the batch's first sample with ``c_r = 0``: it contributes nothing."""
    n = len(batch)
    lo, hi = rank * n // world, (rank + 1) * n // world
    if hi == lo:
        return batch[:1], 0.0
    if n % world == 0:
        return batch[lo:hi], 1.0
    return batch[lo:hi], world * (hi - lo) / n


def _epoch_batches(run: Run) -> tuple[Iterator[Any], list[float]]:
    """The rest of the current epoch: its order is drawn from the shuffling generator's state at
    the epoch's start, and the ``batch_in_epoch`` batches already taken are skipped unloaded.
    Under several ranks each global batch of ``batch_size`` is sharded (:func:`rank_shard`);
    returns the batches and their loss factors."""
    state, g = run.state, run.shuffle_generator
    if state.epoch_generator_state is None:
        state.epoch_generator_state = g.get_state()
    g.set_state(state.epoch_generator_state)
    order = torch.randperm(len(run.data.train), generator=g).tolist()
    rest = _chunks(order[state.batch_in_epoch * run.batch_size:], run.batch_size)
    shards = [rank_shard(b, run.rank, run.world) for b in rest] if run.world > 1 else [(b, 1.0) for b in rest]
    return (_batches(run, run.data.train, [b for b, _ in shards], seed=run.cfg.seed * 100_003 + state.epoch),
            [c for _, c in shards])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _losses(run: Run, batch: Any, *, features: bool):
    out = run.workload.task_losses(run.model, batch, features=features)
    losses = list(out.losses)
    if len(losses) != run.workload.n_tasks:
        raise ValueError(f"workload {run.workload.name!r}: task_losses returned {len(losses)} losses "
                         f"for {run.workload.n_tasks} tasks")
    if features and out.features is None:
        raise ValueError(f"workload {run.workload.name!r} returns no shared representation: "
                         "aggregate_at='representation' needs one")
    return [losses[i] for i in run.tasks], out.features


def train_steps(run: Run, n_steps: int, *,
                on_log: Callable[[dict[str, float]], None] | None = None,
                on_boundary: Callable[[TrainState], None] | None = None,
                boundary_every: int | None = None) -> list[dict[str, float]]:
    """Run ``n_steps`` more optimisation steps from ``run.state``; returns the logged rows (every
    ``log_every``-th step, the run's first and this call's last). ``on_boundary(state)`` runs
    after every ``boundary_every``-th step (global count) and after the last one."""
    from mtl_opt.loss_weighting import LossWeighting

    cfg, model, mto, state = run.cfg, run.model, run.mto, run.state
    K = len(run.tasks)
    w_t = torch.tensor(run.task_weights, dtype=torch.float64)
    scale_losses = run.task_weights_mode == "loss_scale"
    representation = cfg.aggregate_at == "representation"
    jacobian_free = not run.aggregator.needs_jacobian
    is_loss_weighting = isinstance(run.aggregator, LossWeighting)
    wants_after = is_loss_weighting and run.aggregator.wants_losses_after_step
    rows: list[dict[str, float]] = []
    model.train()
    end = state.step + n_steps
    t0 = time.perf_counter()
    sharded = run.world > 1
    reduce_blocks = None
    if sharded and cfg.distributed == "global":
        from mtl_opt.distributed import mean_over_ranks as reduce_blocks
    while state.step < end:
        batches, factors = _epoch_batches(run)
        for batch, factor in zip(batches, factors):
            log_now = state.step == 0 or (state.step + 1) % cfg.log_every == 0 or state.step + 1 == end
            with _autocast(run):
                losses, feats = _losses(run, batch, features=representation)
            if factor != 1.0:  # an uneven shard of the global batch (rank_shard)
                losses = [loss * factor for loss in losses]
            if sharded:  # (uneven on one rank is uneven on all: the global batch's size decides)
                # factored linear layers gather equal row counts from every rank: an uneven
                # batch takes their Jacobian rows instead (the same numbers, to rounding)
                mto.factor_linear = factor == 1.0
            M_params = None
            if log_now and K > 1 and representation:
                M_params = task_gramian(losses, run.shared, reduce=reduce_blocks)
            step_losses = [w * l for w, l in zip(run.task_weights, losses)] if scale_losses else losses
            kwargs: dict[str, Any] = {}
            if run.task_weights_mode == "aggregator":
                kwargs["task_weights"] = w_t
            if representation:
                kwargs["features"] = feats
            mto.zero_grad()
            if log_now and K > 1 and jacobian_free and not representation:
                # Measured on the step's own Gramian where the step takes the Jacobian (a task
                # group that other tasks' losses reach), else with one more backward pass on the
                # kept graph, before the optimizer moves the parameters.
                result = mto.backward(step_losses, retain_graph=True, **kwargs)
                if result.gramian is None:
                    M_params = task_gramian(losses, run.shared, reduce=reduce_blocks)
                mto.step(clip_norm=cfg.grad_clip or None)
            else:
                result = mto.step(step_losses, clip_norm=cfg.grad_clip or None, **kwargs)
            if wants_after:  # FAMO: the same batch's losses after the step (one more forward)
                with torch.no_grad(), _autocast(run):
                    after, _ = _losses(run, batch, features=False)
                after_vals = torch.stack([a.detach().double().cpu() for a in after]) * factor
                if reduce_blocks is not None:
                    after_vals = reduce_blocks(after_vals)
                run.aggregator.update(after_vals * w_t if scale_losses else after_vals)
            state.step += 1
            state.batch_in_epoch += 1
            M = M_params
            if M is None and not representation and result.gramian is not None:
                M = result.gramian.detach().to("cpu", torch.float64)
                if scale_losses:  # rows were ω_i g_i: the figures are of the g_i
                    M = M / (w_t[:, None] * w_t[None, :])
            figures = step_conflict(M) if M is not None else None
            state.tally.add(figures)
            state.interval_tally.add(figures)
            step_vals = result.losses.detach().to("cpu", torch.float64)
            if sharded and cfg.distributed == "local":  # the log shows the global batch's losses
                from mtl_opt.distributed import mean_over_ranks

                step_vals = mean_over_ranks(step_vals)
            loss_vals = (step_vals / (w_t if scale_losses else 1.0)).tolist()
            state.interval_steps += 1
            state.interval_loss_sum = (loss_vals if state.interval_loss_sum is None else
                                       [a + b for a, b in zip(state.interval_loss_sum, loss_vals)])
            if log_now:
                row: dict[str, float] = {"step": state.step, "epoch": state.epoch,
                                         "time_s": round(time.perf_counter() - t0, 4)}
                for n, v in zip(run.task_names, loss_vals):
                    row[f"loss_{n}"] = v
                if result.weights is not None:
                    for n, b in zip(run.task_names, result.weights.tolist()):
                        row[f"beta_{n}"] = b
                if M is not None:
                    for n, v in zip(run.task_names, M.diagonal().clamp(min=0).sqrt().tolist()):
                        row[f"grad_norm_{n}"] = v
                    # diffusion (CAME-Grad's diagnostic): ‖applied update‖ / ‖Σ ω_i g_i‖
                    joint = math.sqrt(max(float(w_t @ M @ w_t), 0.0))
                    update = _grad_norm(run.shared)
                    row["joint_norm"], row["update_norm"] = joint, update
                    row["diffusion"] = update / joint if joint > 0 else float("nan")
                if figures is not None:
                    row["cos"] = figures[0]
                    row["conflict"] = int(figures[1])
                row["conflict_share"] = state.tally.conflict_share()
                rows.append(row)
                if on_log is not None:
                    on_log(row)
            if on_boundary is not None and (
                    state.step == end or (boundary_every and state.step % boundary_every == 0)):
                on_boundary(state)
            if state.step >= end:
                break
        else:
            # The epoch ran out: the next one draws a new order from where the generator is now.
            state.epoch += 1
            state.batch_in_epoch = 0
            if is_loss_weighting:
                run.aggregator.end_epoch()  # DWA's and STCH's epochs are the data's
            state.epoch_generator_state = run.shuffle_generator.get_state()
    return rows


@torch.no_grad()
def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    """‖.grad‖ over ``params`` (the update the step applied to the shared parameters)."""
    total = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
    return math.sqrt(total)


@torch.no_grad()
def evaluate_split(run: Run, split: str) -> dict[str, float]:
    """Every metric the workload reports, on ``split`` (in order, eval mode, autocast on AMP)."""
    dataset = run.data.split(split)
    if len(dataset) == 0:
        raise ValueError(f"workload {run.workload.name!r}: the {split} split is empty: nothing to evaluate")
    was_training = run.model.training
    run.model.eval()
    try:
        with _autocast(run):
            metrics = run.workload.evaluate(run.model, _batches(
                run, dataset, _chunks(list(range(len(dataset))), run.eval_batch_size), seed=0))
    finally:
        if was_training:
            run.model.train()
    missing = [m.name for m in run.workload.metrics if m.name not in metrics]
    if missing:
        raise ValueError(f"workload {run.workload.name!r}: evaluate() did not report {missing}")
    return {str(k): float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def run_checkpoint(run: Run, rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything a run needs to resume, as tensors and plain data (``rng_ranks``: under several
    ranks, every rank's generators, each rank's restored on a resume with as many ranks)."""
    extra = {} if rng_ranks is None else {"rng_ranks": rng_ranks}
    return {**extra,
        "format": CHECKPOINT_FORMAT,
        "config": run.cfg.to_dict(),
        "workload": {"spec": run.workload.spec(), "options": dict(run.workload.options)},
        "workload_state": run.workload.checkpoint_state(run.data),
        "model": run.model.state_dict(),
        "optimizer": run.mto.state_dict(),
        "total_steps": run.total_steps,
        "train_state": run.state.to_dict(),
        "shuffle_generator": run.shuffle_generator.get_state(),
        "rng": rng_state(run.device),
    }


def load_run_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a trainer checkpoint without running code from it (``weights_only=True``; see
    :func:`mtl_opt.experiments.checkpoint.load_checkpoint`): one ``ValueError`` naming the file
    for refused, damaged or incomplete files."""
    return load_checkpoint(path, fmt=CHECKPOINT_FORMAT, required=_CHECKPOINT_KEYS,
                           dicts=("config", "model", "optimizer", "train_state", "rng"),
                           map_location=map_location)


def restore(run: Run, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint of :func:`run_checkpoint` into a fresh :func:`prepare` run."""
    run.model.load_state_dict(ckpt["model"])
    run.mto.load_state_dict(ckpt["optimizer"])
    run.state = TrainState.from_dict(ckpt["train_state"])
    run.shuffle_generator.set_state(ckpt["shuffle_generator"])
    by_rank = ckpt.get("rng_ranks")
    mine = by_rank[run.rank] if isinstance(by_rank, list) and len(by_rank) == run.world else ckpt["rng"]
    set_rng_state(mine, run.device)


def _save_run_checkpoint(run: Run, out_dir: Path | None) -> None:
    """Rank 0 writes the checkpoint; under several ranks every rank takes part (its generators
    are gathered into it)."""
    rng_ranks = None
    if run.world > 1:
        import torch.distributed as dist

        rng_ranks = [None] * run.world
        dist.all_gather_object(rng_ranks, rng_state(run.device))
    if out_dir is not None:
        save_checkpoint(run_checkpoint(run, rng_ranks), out_dir / "checkpoint.pt")


# ------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------
def resume_config(resume: str | os.PathLike, config: TrainConfig | None) -> tuple[TrainConfig, dict, Path]:
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {str(path)!r}")
    ckpt = load_run_checkpoint(path)
    try:
        saved = TrainConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} cannot be resumed: {first_line(str(exc))}") from None
    if config is not None:
        mine, theirs = config.to_dict(), saved.to_dict()
        differ = [f"{k}: given {mine[k]!r}, saved {theirs[k]!r}" for k in sorted(mine)
                  if k not in ("device", "out") and theirs[k] != mine[k]]
        if differ:
            raise ValueError(f"resume from {str(path)!r}: the config differs from the checkpoint's in "
                             + "; ".join(differ))
        saved.device = config.device
    saved.out = str(path.parent)
    return saved, ckpt, path


def train(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None,
          callback: Callable[[int, dict[str, float]], None] | None = None,
          verbose: bool = False) -> dict[str, Any]:
    """Train, validate and test one run; returns ``{"run_dir", "test", "val", "cos_mean",
    "conflict_share", "conflict_steps", "train_time_s", "steps", "history", "epochs"}``.

    ``callback(step, row)`` is called at every logged step. ``resume``: a run folder (or its
    ``checkpoint.pt``): continue that run with its own config (``config`` must be ``None`` or
    equal to it, except ``device`` and ``out``); the finished run has the same parameters as one
    that was never interrupted. The run folder is claimed before any work (a resume takes its own
    folder back and is refused while another process holds it).

    **Several processes** (``torchrun --nproc_per_node R``): when the environment names more than
    one rank and no process group is initialised, the run initialises one (NCCL on CUDA, gloo
    otherwise; :data:`GROUP_TIMEOUT`) and destroys it at the end. Each global batch of
    ``batch_size`` is split into R shards, one per rank (:func:`rank_shard`), and the method
    aggregates in the ``distributed`` mode of the config (``"global"``: the same update as one
    process on the whole batch). Rank 0 alone claims the run folder and writes the logs,
    validations, checkpoints and the test (the other ranks wait for it); every rank returns
    rank 0's result, calls ``callback`` and, on resume, reads the same checkpoint."""
    ckpt = None
    if resume is not None:
        config, ckpt, ckpt_path = resume_config(resume, config)
    if config is None:
        raise ValueError("train needs a config or a run to resume")
    cfg = config
    cfg.validate()
    launched = _init_process_group(cfg)
    try:
        return _train_claimed(cfg, ckpt, ckpt_path if ckpt is not None else None,
                              callback=callback, verbose=verbose)
    finally:
        if launched:
            import torch.distributed as dist

            dist.destroy_process_group()


#: How long a rank waits for the others in one collective (rank 0 validates and tests alone
#: while the others wait): a rank that died makes the others fail at the latest after this.
GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def _init_process_group(cfg: TrainConfig) -> bool:
    """Initialise the process group from torchrun's environment when it names several ranks and
    none is initialised; ``True`` when this call did it (the caller then destroys it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    from mtl_opt.distributed import init_process_group_from_env

    cuda = torch.device(cfg.resolved_device()).type == "cuda"
    return init_process_group_from_env(backend="nccl" if cuda else "gloo", timeout=GROUP_TIMEOUT)


def _train_claimed(cfg: TrainConfig, ckpt: dict | None, ckpt_path: Path | None, *,
                   callback: Callable[[int, dict[str, float]], None] | None, verbose: bool) -> dict[str, Any]:
    from mtl_opt._output_folder import reclaim_output_folder
    from mtl_opt.experiments.shared_args import claim_out

    rank, world = _ranks(cfg)
    folder, failure = None, None
    if rank == 0:
        try:
            if ckpt is not None:
                folder = reclaim_output_folder(cfg.out, command="mtl-opt train --resume")
            else:
                folder = claim_out(cfg.out, prefix="train", command="mtl-opt train")
        except Exception as exc:  # noqa: BLE001 - told to every rank, then raised as it was
            failure = exc
    if world > 1:  # the other ranks learn whether rank 0 holds the folder
        import torch.distributed as dist

        told = [None if failure is None else f"{type(failure).__name__}: {first_line(str(failure))}"]
        dist.broadcast_object_list(told, src=0)
        if rank != 0 and told[0] is not None:
            raise RuntimeError(f"rank 0 could not claim the run folder: {told[0]}")
    if failure is not None:
        raise failure
    with folder if folder is not None else nullcontext():  # a failed start gives a fresh folder back
        run = prepare(cfg)
        if ckpt is not None:
            try:
                restore(run, ckpt)
            except (KeyError, TypeError, RuntimeError, ValueError) as exc:
                raise ValueError(f"checkpoint {str(ckpt_path)!r} cannot be resumed: "
                                 f"{first_line(str(exc))}") from None
        return _train_in(run, folder.path if folder is not None else None, resumed=ckpt is not None,
                         callback=callback, verbose=verbose)


def _train_in(run: Run, out_dir: Path | None, *, resumed: bool,
              callback: Callable[[int, dict[str, float]], None] | None, verbose: bool) -> dict[str, Any]:
    """The run in its folder; ``out_dir`` is ``None`` on the ranks other than 0 (they train, and
    take part in the checkpoints' and the result's collectives, but write nothing)."""
    cfg, model = run.cfg, run.model
    lead = out_dir is not None
    verbose = verbose and lead
    say = print if verbose else (lambda *a, **k: None)
    n_shared = sum(p.numel() for p in run.shared)
    n_total = sum(p.numel() for p in model.parameters())
    period = run.steps_per_epoch if cfg.eval_every is None else cfg.eval_every
    say(f"{run.workload.spec()}: {n_total:,} parameters ({n_shared:,} shared); method "
        f"{run.aggregator!r}; tasks {', '.join(run.task_names)}; {run.total_steps} steps "
        f"({run.steps_per_epoch} per epoch) on {run.device}"
        + (f", {run.world} processes ({cfg.distributed} aggregation)" if run.world > 1 else ""))
    if lead and not resumed:
        record = {
            "train": cfg.to_dict(), "workload": run.workload.spec(),
            "workload_options": dict(run.workload.options),
            "method": {"name": run.method, **run.hyperparameters, "repr": repr(run.aggregator)},
            "tasks": run.task_names, "task_weights": run.task_weights,
            "task_weights_mode": run.task_weights_mode,
            "batch_size": run.batch_size, "lr": run.lr, "optimizer": type(run.optimizer).__name__,
            "total_steps": run.total_steps, "steps_per_epoch": run.steps_per_epoch,
            "validation_every": period or None, "n_parameters": {"total": n_total, "shared": n_shared},
            "dataset_sizes": run.data.sizes(), "device": str(run.device), "environment": environment_stamp(),
            "processes": run.world,
        }
        (out_dir / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    keep = run.state.step if resumed else None
    step_log = CSVLog(out_dir / "steps.csv", keep) if lead else None
    epoch_log = CSVLog(out_dir / "epochs.csv", keep) if lead else None
    progress = Progress(run.total_steps, run.state.step, verbose)
    epoch_rows: list[dict[str, Any]] = []
    last_val: dict[str, float] = {}

    def on_log(row: dict[str, float]) -> None:
        if step_log is not None:
            step_log.write(row)
        progress.update(int(row["step"]))
        if callback is not None:
            callback(int(row["step"]), dict(row))

    def on_boundary(state: TrainState) -> None:
        row: dict[str, Any] = {"step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4)}
        if state.interval_steps:
            for n, v in zip(run.task_names, state.interval_loss_sum or []):
                row[f"train_loss_{n}"] = v / state.interval_steps
            row["train_cos_mean"] = state.interval_tally.cos_mean()
            row["train_conflict_share"] = state.interval_tally.conflict_share()
        state.interval_steps, state.interval_loss_sum = 0, None
        state.interval_tally = ConflictTally()
        if len(run.data.val) > 0 and lead:
            t = time.perf_counter()
            val = evaluate_split(run, "val")
            last_val.clear()
            last_val.update(val)
            row.update({f"val_{k}": v for k, v in val.items()})
            row["val_time_s"] = round(time.perf_counter() - t, 3)
        if epoch_log is not None:
            epoch_log.write(row)
        epoch_rows.append(row)
        _save_run_checkpoint(run, out_dir)
        if verbose:
            progress.message(f"validation at step {state.step} (epoch {row['epoch']:g}): "
                             + " ".join(f"{k}={v:.4f}" for k, v in row.items()
                                        if k.startswith("val_") and k != "val_time_s"))

    remaining = run.total_steps - run.state.step
    t0 = time.perf_counter()
    try:
        rows = train_steps(run, remaining, on_log=on_log, on_boundary=on_boundary,
                           boundary_every=period or None)
    finally:
        progress.close()
        for log in (step_log, epoch_log):
            if log is not None:
                log.close()
    train_time = time.perf_counter() - t0
    if remaining == 0 and (run.world > 1 or not (out_dir / "checkpoint.pt").exists()):
        _save_run_checkpoint(run, out_dir)
    if not lead:  # rank 0 tests and writes; every rank returns its result
        return _from_rank_0(run, None, rows, epoch_rows)
    t1 = time.perf_counter()
    test = evaluate_split(run, "test")
    tally = run.state.tally
    result = {
        "workload": run.workload.spec(), "method": cfg.method, "task": cfg.task, "seed": cfg.seed,
        "tasks": run.task_names, "test": test, "val": dict(last_val),
        "cos_mean": tally.cos_mean(), "conflict_share": tally.conflict_share(),
        "conflict_steps": tally.n, "steps": run.total_steps,
        "train_time_s": train_time, "test_time_s": time.perf_counter() - t1,
    }
    result["test_outputs"] = list(run.workload.write_test_outputs(out_dir))
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    say("test: " + " ".join(f"{k}={v:.4f}" for k, v in test.items())
        + f"; mean cosine {result['cos_mean']:.3f}, conflict share {result['conflict_share']:.3f}")
    say(f"run folder: {out_dir}")
    return _from_rank_0(run, {**result, "run_dir": str(out_dir)}, rows, epoch_rows)


def _from_rank_0(run: Run, result: dict[str, Any] | None, rows: list, epoch_rows: list) -> dict[str, Any]:
    """Rank 0's result on every rank (with this rank's own logged rows)."""
    if run.world > 1:
        import torch.distributed as dist

        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return {**result, "history": rows, "epochs": epoch_rows}
