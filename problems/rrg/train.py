"""Training and evaluation of the multi-task RRG model with any registered aggregation method.

``train_rrg(RRGConfig(...))`` builds the data, the tokenizer and :class:`RRGModel`, trains it with
:class:`mtl_opt.MultiTaskOptimizer` (shared parameters: the image encoder; task parameters: the
report decoder, the classification head and, with ``contrastive=True``, the contrastive head),
logs the task losses and the two symptoms of "The Double Dilemma in Multi-Task Radiology Report
Generation" (ICML 2026) as it goes, evaluates the generated reports with NLG and clinical-efficacy
metrics and writes a run folder:

* ``config.json``: the exact :class:`RRGConfig` (and the resolved model config);
* ``metrics.csv``: one row per logged step: losses, ``drift_cos``, ``diffusion``, the task
  gradient norms, ``conflict_share`` (the running share of steps whose two task gradients had a
  negative inner product, counted at every step from the step's Gramian), timing;
* ``epochs.csv``: one row per validation (every epoch, or every ``eval_every`` steps): the mean
  training losses, mean cosine and conflict share since the previous row, and the validation
  losses, NLG and CE metrics;
* ``eval.json``: the test report: NLG metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr), clinical
  efficacy (the full CE grid, see :mod:`.metrics`), on synthetic data CE against the
  generator's true labels (``CEtrue_*``), the classification head's accuracy, the losses;
* ``checkpoint.pt``: model, tokenizer, configs, optimizer and aggregator state, the data position
  and every random generator: written at each validation, a run resumes from it
  (``train_rrg(cfg, resume=run_dir)``) and ends with the same weights as an uninterrupted run;
* ``samples.md`` / ``samples.csv``: generated reports next to their references (a few / all).

``drift_cos`` (the cosine between the report and classification gradients on the shared encoder)
and ``diffusion`` (‖applied update‖ / ‖Σ ω_i g_i‖) are defined in :mod:`.diagnostics`.

The module imports only torch and the library; pandas and plotly are never needed here.
"""

from __future__ import annotations

import collections
import csv
import functools
import sys
import json
import math
import numbers
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mtl_opt.loss_weighting import LossWeighting

from .diagnostics import (
    AUTHORS_TASK_WEIGHTS,
    conflict_figures,
    conflict_of_gradients,
    measure_conflict,
    shared_grad,
    task_gradients,
    to_device,
)
from .model import MODEL_SIZES, RRGModel, model_config_for_size

__all__ = [
    "RRGConfig",
    "RRGSetup",
    "TrainState",
    "build_datasets",
    "build_model",
    "conflict_figures",
    "conflict_of_gradients",
    "conflict_study",
    "evaluate_rrg",
    "load_checkpoint",
    "load_run",
    "measure_conflict",
    "prepare_run",
    "task_gradients",
    "train_rrg",
    "train_steps",
]

OPTIMIZERS = ("adamw", "adam", "sgd")
AGGREGATE_AT = ("parameters", "representation")
DEFAULT_IMAGE_SIZE = {"tiny": 32, "small": 128, "base": 224}
DEFAULT_STEPS = 200
#: Defaults that let each size learn both tasks (measured for tiny: at lr 1e-3 the tiny model is
#: still far from learning after 400 steps; at 3e-3 it learns both tasks in 400).
DEFAULT_STEPS_BY_SIZE = {"tiny": 400, "small": DEFAULT_STEPS, "base": DEFAULT_STEPS}
DEFAULT_LR_BY_SIZE = {"tiny": 3e-3, "small": 1e-3, "base": 1e-3}
CHECKPOINT_FORMAT = "mtl_opt.rrg/1"


@dataclass
class RRGConfig:
    """Everything that defines one RRG training run (saved as ``config.json``).

    Attributes:
        method: a method spec, ``"came_grad"`` or ``"came_grad:kappa=1.5,nu=0.2"``.
        task_weights: ω per task (report, classification[, contrastive]); ``None`` means the
            authors' ``[1, 4]`` (and 1 for the contrastive task). Methods that take task weights
            (``ls``, ``came_grad``) receive them at every step; for the others the task losses
            are scaled by ω before differentiation (``task_weights_mode`` in ``config.json``).
        data: ``"synthetic"`` or a folder in the R2Gen layout (``annotation.json`` + images).
        dataset: ``"iu_xray"`` or ``"mimic_cxr"`` for a folder (ignored for synthetic data).
        labels_file: CheXpert labels of the folder's reports (default: label them on the fly).
        skip_bad: skip unreadable/malformed dataset entries (listed in the log) instead of failing.
        synthetic: extra keywords of the synthetic data set (its disagreement knobs).
        n_train, n_val, n_test: synthetic split sizes.
        views: views per synthetic study.
        image_size: pixels per side (default 32 tiny, 128 small, 224 base).
        steps / epochs: training length (give at most one; default 400 steps for tiny, 200 else).
        batch_size, lr, weight_decay, optimizer, grad_clip: the torch optimizer (``lr`` defaults
            to 3e-3 for tiny and 1e-3 for the larger sizes).
        device: ``"cpu"``, ``"cuda"`` (``"cuda:1"``...) or ``"auto"`` (CUDA when available).
        amp: mixed precision (CUDA only): autocast in ``amp_dtype`` (bfloat16 where supported).
        model_size: ``"tiny"`` (≈1e5 parameters), ``"small"``, ``"base"`` (tens of millions).
        contrastive: add the image–report contrastive task (K = 3).
        aggregate_at: ``"parameters"`` (the Jacobian over the encoder's parameters) or
            ``"representation"`` (over the encoder's output, MGDA-UB style).
        log_every: log (and measure drift/diffusion) every this many steps.
        eval_every: validate (and checkpoint) every this many steps; ``None``: once per epoch;
            ``0``: only at the end. Validation runs on at most ``val_max_samples`` studies.
        eval_split: split evaluated after training (``"val"`` or ``"test"``).
        eval_max_samples: evaluate on at most this many studies (``None``: all).
        beam_size, max_gen_length: decoding (``max_gen_length`` defaults to the tokenizer's).
        meteor: compute METEOR (needs Java).
        n_report_samples: generated reports written to ``samples.md``.
        seed, out, num_workers: reproducibility, run folder (default ``runs/rrg-<time>``), loaders.
    """

    method: str = "came_grad"
    task_weights: list[float] | None = None
    data: str = "synthetic"
    dataset: str = "iu_xray"
    labels_file: str | None = None
    skip_bad: bool = False
    synthetic: dict[str, Any] = field(default_factory=dict)
    n_train: int = 512
    n_val: int = 64
    n_test: int = 64
    views: int = 1
    image_size: int | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    grad_clip: float = 0.0
    device: str = "cpu"
    amp: bool = False
    amp_dtype: str = "auto"
    model_size: str = "tiny"
    contrastive: bool = False
    aggregate_at: str = "parameters"
    log_every: int = 10
    eval_every: int | None = None
    val_max_samples: int | None = None
    eval_split: str = "test"
    eval_max_samples: int | None = None
    beam_size: int = 1
    max_gen_length: int | None = None
    meteor: bool = True
    n_report_samples: int = 5
    seed: int = 0
    out: str | None = None
    num_workers: int = 0

    # ---- checks before any work -------------------------------------------------------------
    def validate(self) -> None:
        """Raise one clear error for a bad option (unknown method, missing folder, ...)."""
        import mtl_opt

        name, hyper = mtl_opt.parse_method_spec(self.method)  # unknown names/keys raise here
        mtl_opt.get_aggregator(name, **hyper)  # bad values raise here
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.model_size!r}; choose {', '.join(MODEL_SIZES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}")
        if self.aggregate_at not in AGGREGATE_AT:
            raise ValueError(f"aggregate_at must be one of {AGGREGATE_AT}, got {self.aggregate_at!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        for key in ("steps", "epochs"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ValueError(f"{key} must be >= 0, got {v}")
        for key in ("batch_size", "log_every", "beam_size", "n_train", "n_val", "n_test", "views"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test', got {self.eval_split!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.amp_dtype not in ("auto", "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be auto, bfloat16 or float16, got {self.amp_dtype!r}")
        if self.task_weights is not None:
            k = self.n_tasks
            if len(self.task_weights) != k:
                raise ValueError(f"task_weights has {len(self.task_weights)} entries for {k} tasks "
                                 f"(report, classification{', contrastive' if self.contrastive else ''})")
            if not all(math.isfinite(w) and w > 0 for w in self.task_weights):
                raise ValueError(f"task_weights must be finite and > 0, got {self.task_weights}")
        if self.eval_every is not None and self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for key in ("num_workers", "n_report_samples"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_gen_length is not None and self.max_gen_length < 1:
            raise ValueError(f"max_gen_length must be >= 1, got {self.max_gen_length}")
        for key in ("eval_max_samples", "val_max_samples"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"{key} must be >= 1, got {v}")
        device = torch.device(self.resolved_device())
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.amp and device.type != "cuda":
            raise ValueError("--amp needs a CUDA device (no mixed precision on the CPU)")
        if self.data == "synthetic":
            import inspect

            from .synthetic import SyntheticCXR

            knobs = set(inspect.signature(SyntheticCXR.__init__).parameters) - {"self", "n", "image_size", "views", "seed"}
            unknown = sorted(set(self.synthetic) - knobs)
            if unknown:
                raise ValueError(f"unknown synthetic data option(s) {unknown}; the synthetic set takes "
                                 f"{', '.join(sorted(knobs))}")
            if self.views not in (1, 2):
                raise ValueError(f"synthetic studies have 1 or 2 views, got {self.views}")
        else:
            if self.synthetic:
                raise ValueError(f"synthetic data options {sorted(self.synthetic)} were given but "
                                 f"--data is a folder ({self.data!r})")
            root = Path(self.data)
            if not root.is_dir():
                raise FileNotFoundError(f"data folder {self.data!r} does not exist")
            if not (root / "annotation.json").is_file():
                raise FileNotFoundError(f"data folder {self.data!r} has no annotation.json (R2Gen layout)")
            if self.dataset not in ("iu_xray", "mimic_cxr"):
                raise ValueError(f"dataset must be iu_xray or mimic_cxr, got {self.dataset!r}")
            if self.labels_file is not None and not Path(self.labels_file).is_file():
                raise FileNotFoundError(f"labels file {self.labels_file!r} does not exist")

    # ---- derived values ---------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return 3 if self.contrastive else 2

    def resolved_task_weights(self) -> list[float]:
        if self.task_weights is not None:
            return [float(w) for w in self.task_weights]
        return [*AUTHORS_TASK_WEIGHTS, *([1.0] if self.contrastive else [])]

    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR_BY_SIZE[self.model_size]

    def resolved_steps(self, steps_per_epoch: int) -> int:
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        return DEFAULT_STEPS_BY_SIZE[self.model_size] if self.steps is None else self.steps

    def resolved_device(self) -> str:
        """``device``, with ``"auto"`` resolved to ``"cuda"`` when a GPU is found, else ``"cpu"``."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_image_size(self) -> int:
        return self.image_size or DEFAULT_IMAGE_SIZE[self.model_size]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RRGConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RRG config keys {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def build_datasets(cfg: RRGConfig) -> dict[str, Any]:
    """The train/val/test datasets of ``cfg`` (synthetic splits use distinct seeds)."""
    size = cfg.resolved_image_size()
    if cfg.data == "synthetic":
        from .synthetic import SyntheticCXR

        splits = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
        return {
            split: SyntheticCXR(n, image_size=size, views=cfg.views, seed=cfg.seed * 1000 + i,
                                **cfg.synthetic)
            for i, (split, n) in enumerate(splits.items())
        }
    from .r2gen import R2GenDataset

    return {
        split: R2GenDataset(cfg.data, dataset=cfg.dataset, split=split, image_size=size,
                            labels_file=cfg.labels_file, skip_bad=cfg.skip_bad)
        for split in ("train", "val", "test")
    }


def dataset_reports(ds: Any) -> list[str]:
    """The report texts of a dataset (its ``reports`` attribute when it has one)."""
    reports = getattr(ds, "reports", None)
    if callable(reports):
        reports = reports()
    if reports is not None:
        return list(reports)
    return [ds[i]["report"] for i in range(len(ds))]


def make_loader(ds: Any, tokenizer: Any, cfg: RRGConfig, *, shuffle: bool, seed: int = 0):
    from torch.utils.data import DataLoader

    from .r2gen import collate_rrg

    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=shuffle, generator=g,
        collate_fn=functools.partial(collate_rrg, tokenizer=tokenizer),
        num_workers=cfg.num_workers, pin_memory=torch.device(cfg.resolved_device()).type == "cuda",
        drop_last=False,
    )


def _autocast(cfg: RRGConfig, device: torch.device):
    if not cfg.amp:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_amp_dtype(cfg, device))


def _amp_dtype(cfg: RRGConfig, device: torch.device) -> torch.dtype:
    """bfloat16 (the default, where the GPU supports it) or float16 when asked for explicitly.

    float16 autocast runs without loss scaling here (a loss scale would have to pass through the
    aggregator, and not every method is scale-equivariant), so small gradients may underflow;
    it is therefore never chosen automatically.
    """
    if cfg.amp_dtype == "float16":
        return torch.float16
    if cfg.amp_dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16 autocast: drop --amp, or pass "
                         "--amp-dtype float16 (no loss scaling: small gradients may underflow)")
    return torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _make_optimizer(cfg: RRGConfig, model: RRGModel) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.resolved_lr(), momentum=0.9, weight_decay=cfg.weight_decay)


def build_model(cfg: RRGConfig, tokenizer: Any) -> RRGModel:
    """The :class:`RRGModel` of ``cfg.model_size`` for ``tokenizer``'s vocabulary."""
    model_cfg = model_config_for_size(
        cfg.model_size, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, contrastive=cfg.contrastive,
        max_views=max(2, cfg.views), max_positions=max(128, tokenizer.max_length + 2),
    )
    return RRGModel(model_cfg)


@dataclass
class RRGSetup:
    """Everything a run is made of, built by :func:`prepare_run`."""

    cfg: RRGConfig
    device: torch.device
    datasets: dict[str, Any]
    tokenizer: Any
    model: RRGModel
    method: str
    hyperparameters: dict[str, Any]
    aggregator: Any
    task_weights: list[float]
    task_weights_mode: str
    optimizer: torch.optim.Optimizer
    mto: Any
    loader: Any
    total_steps: int
    state: TrainState = field(default_factory=lambda: TrainState())
    shuffle_generator: torch.Generator | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)


@dataclass
class TrainState:
    """Where a run is: everything besides the model and optimizer a resumed run needs.

    ``epoch_generator_state`` is the shuffling generator's state at the start of the current
    epoch: the epoch's order is redrawn from it and its first ``batch_in_epoch`` batches skipped.
    ``n_conflict`` / ``n_measured``: steps whose task gradients had a negative inner product /
    steps whose Gramian was seen (the running conflict share is their ratio). ``interval`` sums
    the per-step figures since the last validation (for ``epochs.csv``).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_generator_state: torch.Tensor | None = None
    n_conflict: int = 0
    n_measured: int = 0
    interval: dict[str, Any] = field(default_factory=dict)

    def conflict_share(self) -> float:
        return self.n_conflict / self.n_measured if self.n_measured else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "epoch_generator_state": self.epoch_generator_state,
                "n_conflict": self.n_conflict, "n_measured": self.n_measured}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


def prepare_run(cfg: RRGConfig) -> RRGSetup:
    """Validate ``cfg`` and build data, tokenizer, model, method and optimizers (seeded)."""
    import mtl_opt

    from .tokenizer import ReportTokenizer

    cfg.validate()
    _seed_everything(cfg.seed)
    device = torch.device(cfg.resolved_device())
    if cfg.amp:
        _amp_dtype(cfg, device)  # raises before any work when the GPU cannot do it
    datasets = build_datasets(cfg)
    if len(datasets["train"]) == 0:
        raise ValueError("the training split is empty")
    tok_dataset = "synthetic" if cfg.data == "synthetic" else cfg.dataset
    tokenizer = ReportTokenizer.fit(dataset_reports(datasets["train"]), dataset=tok_dataset)
    model = build_model(cfg, tokenizer).to(device)
    name, hyper = mtl_opt.parse_method_spec(cfg.method)
    aggregator = mtl_opt.get_aggregator(name, **hyper)
    weights = cfg.resolved_task_weights()
    mode = "aggregator" if aggregator.accepts_task_weights else "loss_scale"
    optimizer = _make_optimizer(cfg, model)
    mto = mtl_opt.MultiTaskOptimizer(optimizer, aggregator, model.shared_parameters(),
                                     task_params=model.task_parameters())
    loader = make_loader(datasets["train"], tokenizer, cfg, shuffle=True, seed=cfg.seed)
    total = cfg.resolved_steps(len(loader))
    return RRGSetup(cfg, device, datasets, tokenizer, model, name, hyper, aggregator, weights, mode,
                    optimizer, mto, loader, total, TrainState(),
                    torch.Generator().manual_seed(cfg.seed))


def _epoch_batches(setup: RRGSetup):
    """The remaining batches of the current epoch: its order is drawn from the shuffling
    generator's state at the epoch's start (as ``DataLoader(shuffle=True)`` draws it) and the
    ``batch_in_epoch`` batches already taken are skipped without being loaded."""
    from torch.utils.data import DataLoader

    state, loader = setup.state, setup.loader
    g = setup.shuffle_generator
    if state.epoch_generator_state is None:
        state.epoch_generator_state = g.get_state()
    g.set_state(state.epoch_generator_state)
    order = torch.randperm(len(loader.dataset), generator=g).tolist()
    rest = order[state.batch_in_epoch * setup.cfg.batch_size:]
    # Its own generator, so that starting an iterator leaves the global RNG alone (a resumed run
    # starts one mid-epoch where an uninterrupted run does not).
    seeds = torch.Generator().manual_seed(setup.cfg.seed * 100_003 + state.epoch)
    return DataLoader(loader.dataset, batch_size=setup.cfg.batch_size, sampler=rest,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, generator=seeds)


def _add_interval(state: TrainState, loss_vals: torch.Tensor, cos: float | None) -> None:
    iv = state.interval
    iv["steps"] = iv.get("steps", 0) + 1
    iv["loss_sum"] = loss_vals.detach() + iv["loss_sum"] if "loss_sum" in iv else loss_vals.detach().clone()
    if cos is not None:
        iv["n_cos"] = iv.get("n_cos", 0) + 1
        iv["cos_sum"] = iv.get("cos_sum", 0.0) + cos
        iv["n_conflict"] = iv.get("n_conflict", 0) + (cos < 0)


def _step_cosine(M: torch.Tensor | None, state: TrainState) -> float | None:
    """The report/classification cosine of this step's Gramian (no extra pass); counts it."""
    if M is None:
        return None
    m = M.detach().to("cpu", torch.float64)
    denom = math.sqrt(max(float(m[0, 0]), 0.0) * max(float(m[1, 1]), 0.0))
    state.n_measured += 1
    if float(m[0, 1]) < 0:
        state.n_conflict += 1
    return float(m[0, 1]) / denom if denom > 0 else None


def train_steps(setup: RRGSetup, n_steps: int, *,
                on_log: Callable[[dict[str, float]], None] | None = None,
                on_boundary: Callable[[TrainState], None] | None = None,
                boundary_every: int | None = None) -> list[dict[str, float]]:
    """Run ``n_steps`` more optimisation steps from ``setup.state``; returns the logged rows
    (every ``log_every`` steps, the run's first step and the last step of this call).

    Each step: forward under autocast (CUDA + ``amp``), the K task losses, then
    ``MultiTaskOptimizer.step`` (the method aggregates the encoder's Jacobian; the heads get
    their own task's gradient). Methods that read no Jacobian (LS and the loss weightings) take
    one backward pass of the weighted sum; the encoder's Jacobian is then computed separately on
    logged steps only (their conflict share counts logged steps). A method that learns from the
    losses after the step (FAMO) gets them from one more forward pass of the same batch, without
    gradients; loss weightings are told where the data's epochs end (DWA, STCH). Every step's Gramian ``M`` gives the sign of ``⟨g_1, g_2⟩``
    for the running conflict share at no extra cost (at representation level it is the Gramian
    of the feature gradients). At parameter level the logged drift/diffusion come from the same
    Gramian; at representation level the encoder's Jacobian is computed separately on logged
    steps. ``on_boundary(state)`` runs after every ``boundary_every``-th step (global count) and
    after the last one (validation and checkpoints hook in there).
    """
    cfg, model, mto, device = setup.cfg, setup.model, setup.mto, setup.device
    state = setup.state
    weights = setup.task_weights
    w_t = torch.tensor(weights, dtype=torch.float64)
    scale_losses = setup.task_weights_mode == "loss_scale"
    shared = model.shared_parameters()
    jacobian_free = not setup.aggregator.needs_jacobian
    wants_after = isinstance(setup.aggregator, LossWeighting) and setup.aggregator.wants_losses_after_step
    rows: list[dict[str, float]] = []
    model.train()
    end = state.step + n_steps
    t0 = time.perf_counter()
    while state.step < end:
        for batch in _epoch_batches(setup):
            step = state.step
            batch = to_device(batch, device)
            # The run's first step, every log_every-th and this call's last: a resumed run logs
            # the same steps as an uninterrupted one.
            log_now = step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == end
            with _autocast(cfg, device):
                out = model(batch["images"], batch["tokens"], batch["classes"])
            losses = [out[n] for n in model.task_names]
            G_enc = None
            if log_now and (cfg.aggregate_at == "representation" or jacobian_free):
                # Methods without a Jacobian (LS, loss weightings) take one backward pass of the
                # weighted sum: the conflict figures need the encoder's Jacobian on logged steps.
                G_enc = task_gradients(losses, shared)
            step_losses = [w * l for w, l in zip(weights, losses)] if scale_losses else losses
            kwargs: dict[str, Any] = {}
            if not scale_losses:
                kwargs["task_weights"] = w_t
            if cfg.aggregate_at == "representation":
                kwargs["features"] = out["memory"]
            mto.zero_grad()
            if cfg.grad_clip > 0:
                result = mto.backward(step_losses, **kwargs)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                combined = float(shared_grad(shared).double().norm()) if log_now else None
                mto.step()
            else:
                # Without clipping the encoder's .grad is the method's direction (parameter
                # level) or its pull-back through the features (representation level).
                result = mto.step(step_losses, **kwargs)
                combined = float(shared_grad(shared).double().norm()) if log_now else None
            if wants_after:  # FAMO: the same batch's losses after the step (one more forward)
                with torch.no_grad(), _autocast(cfg, device):
                    after = model(batch["images"], batch["tokens"], batch["classes"])
                after_vals = torch.stack([after[n].detach().double().cpu() for n in model.task_names])
                setup.aggregator.update(after_vals * w_t if scale_losses else after_vals)
            state.step += 1
            state.batch_in_epoch += 1
            M_step = result.gramian
            if M_step is None and G_enc is not None:  # Jacobian-free methods: logged steps only
                M_step = G_enc.detach().double() @ G_enc.detach().double().T
            cos = _step_cosine(M_step, state)
            loss_vals = result.losses.detach().to("cpu", torch.float64) / (w_t if scale_losses else 1.0)
            _add_interval(state, loss_vals, cos)
            if log_now:
                row: dict[str, float] = {"step": state.step, "epoch": state.epoch,
                                         "time_s": round(time.perf_counter() - t0, 4)}
                for n, v in zip(model.task_names, loss_vals.tolist()):
                    row[f"loss_{n}"] = v
                row["loss_weighted"] = float((w_t * loss_vals).sum())
                if G_enc is None:
                    row.update(conflict_figures(result.gramian, weights,
                                                row_scale=weights if scale_losses else None,
                                                combined_norm=combined))
                else:
                    row.update(conflict_of_gradients(G_enc, weights))
                    row["combined_norm"] = combined
                    row["diffusion"] = combined / row["joint_norm"] if row["joint_norm"] > 0 else float("nan")
                row["conflict_share"] = state.conflict_share()
                if result.weights is not None:
                    for i, b in enumerate(result.weights.tolist()):
                        row[f"beta_{i + 1}"] = b
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
            if isinstance(setup.aggregator, LossWeighting):
                setup.aggregator.end_epoch()  # DWA's and STCH's epochs are the data's
            state.epoch_generator_state = setup.shuffle_generator.get_state()
    return rows


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every global random generator's state as tensors and plain data (a checkpoint loads with
    ``torch.load(weights_only=True)``, which refuses NumPy arrays)."""
    import numpy as np

    name, key, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def save_checkpoint(setup: RRGSetup, path: str | os.PathLike) -> None:
    """Write everything a run needs to resume (atomically: a crash mid-write keeps the old file)."""
    model, state = setup.model, setup.state
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": setup.cfg.to_dict(),
        "model_config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "tokenizer": setup.tokenizer.state_dict(),
        "optimizer": setup.mto.state_dict(),
        "step": state.step,
        "total_steps": setup.total_steps,
        "train_state": state.to_dict(),
        "shuffle_generator": setup.shuffle_generator.get_state(),
        "rng": _rng_state(setup.device),
    }
    ckpt = _plain_data(ckpt)
    _check_plain(ckpt, "checkpoint")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


#: Plain data that ``torch.load(weights_only=True)`` rebuilds (besides tensors, lists, tuples and
#: dicts of them); exact types: a subclass such as ``numpy.float64`` would be refused at load.
_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)
#: The entries every checkpoint has (a resumable one has those of :func:`restore_checkpoint` too).
_CHECKPOINT_KEYS = ("config", "model_config", "model", "tokenizer")


def _plain_data(value: Any) -> Any:
    """``value`` with NumPy scalars (e.g. a hyperparameter drawn by a sweep) made Python numbers,
    through dicts, lists and tuples."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (dict, list, tuple)):
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        plain = [(k, _plain_data(v)) for k, v in items]
        if all(p is v for (_, p), (_, v) in zip(plain, items)):
            return value  # unchanged: keep the object (a state dict keeps its metadata)
        if isinstance(value, dict):
            return dict(plain)
        return type(value)(v for _, v in plain)
    return value


def _check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first entry of ``value`` that is not a tensor or plain data
    (such an entry would make the checkpoint unloadable with ``weights_only=True``)."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES:
        return
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; checkpoints hold "
                                "only tensors and plain data")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints "
                    "hold only tensors and plain data (str, int, float, bool, None, and lists, "
                    "tuples and dicts of them)")


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read an RRG checkpoint file without running code from it.

    The file is loaded with ``torch.load(weights_only=True)``: tensors and plain data only, so a
    file that asks to import anything else (a crafted pickle whose objects would run code when
    rebuilt) is refused before anything in it runs. Every failure is one ``ValueError`` naming the
    file: refused content, a corrupt or truncated file, another kind of file, or a checkpoint
    without the entries of :func:`save_checkpoint`.
    """
    import pickle
    import re
    import warnings

    where = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle protocol notes: the error below says it all
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise ValueError(f"checkpoint {where} is corrupt or not a checkpoint ({_first_line(text)})") from None
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = (f"it asks to import {found.group(1)}" if found else
                "it holds pickle instructions that a checkpoint of tensors and plain data never has")
        raise ValueError(f"checkpoint {where} refused: {what}; only tensors and plain data are loaded "
                         "(torch.load with weights_only=True), so nothing in it ran. mtl-opt "
                         "checkpoints hold nothing else: do not load this file with other tools") from None
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise ValueError(f"checkpoint {where} is corrupt, truncated or not a checkpoint "
                         f"({type(exc).__name__}: {_first_line(str(exc))})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where!r} is not an mtl-opt RRG checkpoint")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {where} lacks {missing}: it is incomplete or not written by mtl-opt")
    for key in ("config", "model_config", "model", "tokenizer"):
        if not isinstance(ckpt[key], dict):
            raise ValueError(f"checkpoint {where}: {key!r} is a {type(ckpt[key]).__name__}, not a dict")
    return ckpt


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no details"
    return line if len(line) <= 200 else line[:197] + "..."


def restore_checkpoint(setup: RRGSetup, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint of :func:`save_checkpoint` into a fresh :func:`prepare_run` setup."""
    if "train_state" not in ckpt:
        raise ValueError("this checkpoint predates resumable checkpoints (no training state in it)")
    missing = [k for k in ("optimizer", "shuffle_generator", "rng") if k not in ckpt]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing}: it is incomplete or not written by mtl-opt")
    setup.model.load_state_dict(ckpt["model"])
    setup.mto.load_state_dict(ckpt["optimizer"])
    setup.state = TrainState.from_dict(ckpt["train_state"])
    setup.shuffle_generator.set_state(ckpt["shuffle_generator"])
    _set_rng_state(ckpt["rng"], setup.device)


class _Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, silent otherwise)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start = total, start
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, step: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.2 and step < self.total:
            return
        self.last = now
        done = step / max(self.total, 1)
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} {rate:.1f} it/s eta {eta:.0f}s {note}\x1b[K")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        """Print a line above the bar (the bar is redrawn at the next update)."""
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.last = 0.0
        print(text)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _CSVLog:
    """Append rows to a CSV; on resume keep only the rows up to the checkpoint's step."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        self.fieldnames: list[str] | None = None
        kept: list[dict[str, str]] = []
        if keep_until is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.fieldnames = list(reader.fieldnames or []) or None
                kept = [r for r in reader if float(r["step"]) <= keep_until]
        self.file = path.open("w", newline="")
        self.writer: csv.DictWriter | None = None
        if self.fieldnames:
            self._start(self.fieldnames)
            for r in kept:
                self.writer.writerow(r)
            self.file.flush()

    def _start(self, fieldnames: list[str]) -> None:
        self.fieldnames = fieldnames
        self.writer = csv.DictWriter(self.file, fieldnames=fieldnames, extrasaction="ignore")
        self.writer.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            self._start(list(row))
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _default_out() -> Path:
    return Path("runs") / time.strftime("rrg-%Y%m%d-%H%M%S")


def train_rrg(config: RRGConfig | None = None, *,
              callback: Callable[[int, dict[str, float]], None] | None = None,
              verbose: bool = False, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train and evaluate one RRG run; returns ``{"run_dir", "final", "history", "epochs",
    "eval", "n_parameters"}``.

    ``callback(step, metrics)`` is called at every log interval with the logged row (a sweep
    reports from it). Validation (on ``val``, METEOR off) and a checkpoint follow every epoch, or
    every ``eval_every`` steps, and the end of training; then the test report is written. See the
    module docstring for the run folder's contents. All options are checked before any work.

    ``resume``: a run folder (or its ``checkpoint.pt``): continue that run from its last
    checkpoint with its own config (``config`` must be ``None`` or equal to it, except ``device``
    and ``out``); the finished run has the same weights as one that was never interrupted.
    """
    ckpt = None
    if resume is not None:
        ckpt_path = Path(resume)
        if ckpt_path.is_dir():
            ckpt_path = ckpt_path / "checkpoint.pt"
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {str(ckpt_path)!r}")
        ckpt = load_checkpoint(ckpt_path)
        saved = RRGConfig.from_dict(ckpt["config"])
        if config is not None:
            mine, theirs = config.to_dict(), saved.to_dict()
            differ = [f"{k}: given {mine[k]!r}, saved {theirs[k]!r}" for k in sorted(mine)
                      if k not in ("device", "out") and theirs[k] != mine[k]]
            if differ:
                raise ValueError(f"resume from {str(ckpt_path)!r}: the config differs from the "
                                 f"checkpoint's in {'; '.join(differ)}")
            saved.device = config.device
        saved.out = str(ckpt_path.parent)
        config = saved
    if config is None:
        raise ValueError("train_rrg needs a config or a run to resume")
    cfg = config
    cfg.validate()
    out_dir = Path(cfg.out) if cfg.out else _default_out()
    say = print if verbose else (lambda *a, **k: None)
    setup = prepare_run(cfg)
    model, tokenizer = setup.model, setup.tokenizer
    if ckpt is not None:
        try:
            restore_checkpoint(setup, ckpt)
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} cannot be resumed: {_first_line(str(exc))}") from None
        say(f"resuming {out_dir} at step {setup.state.step} of {setup.total_steps}")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = model.n_parameters()
    period = setup.steps_per_epoch if cfg.eval_every is None else cfg.eval_every
    say(f"model {cfg.model_size}: {n_params['total']:,} parameters ({n_params['encoder']:,} shared); "
        f"vocabulary {tokenizer.vocab_size}; method {setup.aggregator!r}; "
        f"task weights {setup.task_weights} ({setup.task_weights_mode}); {setup.total_steps} steps "
        f"({setup.steps_per_epoch} per epoch) on {setup.device}")
    config_record = {
        "rrg": cfg.to_dict(), "model": model.cfg.to_dict(),
        "method": {"name": setup.method, **setup.hyperparameters, "repr": repr(setup.aggregator)},
        "task_weights": setup.task_weights, "task_weights_mode": setup.task_weights_mode,
        "lr": cfg.resolved_lr(),
        "total_steps": setup.total_steps, "steps_per_epoch": setup.steps_per_epoch,
        "validation_every": period or None, "task_names": list(model.task_names),
        "n_parameters": n_params,
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "max_length": tokenizer.max_length},
        "dataset_sizes": {k: len(v) for k, v in setup.datasets.items()},
        "skipped_studies": {k: [list(x) for x in getattr(v, "skipped", [])]
                            for k, v in setup.datasets.items()},
        "device": str(setup.device),
        "torch": torch.__version__,
    }
    if ckpt is None:
        (out_dir / "config.json").write_text(json.dumps(config_record, indent=2, default=str))
    n_skipped = sum(len(v) for v in config_record["skipped_studies"].values())
    if n_skipped:
        say(f"skipped {n_skipped} malformed studies (listed in config.json)")

    keep = setup.state.step if ckpt is not None else None
    step_log = _CSVLog(out_dir / "metrics.csv", keep)
    epoch_log = _CSVLog(out_dir / "epochs.csv", keep)
    progress = _Progress(setup.total_steps, setup.state.step, verbose)
    epoch_rows: list[dict[str, Any]] = []
    val_cfg = RRGConfig.from_dict({**cfg.to_dict(), "meteor": False,
                                   "eval_max_samples": cfg.val_max_samples})
    t_train = [0.0]

    def on_log(row: dict[str, float]) -> None:
        step_log.write(row)
        progress.update(int(row["step"]), f"loss_report={row['loss_report']:.3f}")
        if not progress.enabled:
            say(_format_row(row))
        if callback is not None:
            callback(int(row["step"]), dict(row))

    def on_boundary(state: TrainState) -> None:
        iv, state.interval = state.interval, {}
        row: dict[str, Any] = {"step": state.step,
                               "epoch": round(state.step / setup.steps_per_epoch, 4)}
        if iv:
            means = (iv["loss_sum"] / iv["steps"]).tolist()
            for n, v in zip(model.task_names, means):
                row[f"train_loss_{n}"] = v
            n_cos = iv.get("n_cos", 0)
            row["train_cos_mean"] = iv["cos_sum"] / n_cos if n_cos else float("nan")
            row["train_conflict_share"] = iv["n_conflict"] / n_cos if n_cos else float("nan")
        row["conflict_share_running"] = state.conflict_share()
        if "val" in setup.datasets and len(setup.datasets["val"]) > 0:
            t = time.perf_counter()
            val = evaluate_rrg(model, tokenizer, setup.datasets["val"], val_cfg, split="val")
            model.train()
            m = val["metrics"]
            for k in [*(f"eval_loss_{n}" for n in model.task_names), "BLEU_1", "BLEU_4", "ROUGE_L",
                      "CIDEr", "CE_f1_example", "CE_f1_macro_pos_or_unc", "CE_f1_micro", "cls_accuracy"]:
                if k in m:
                    row[f"val_{k.replace('eval_', '')}"] = m[k]
            row["val_time_s"] = round(time.perf_counter() - t, 3)
        epoch_log.write(row)
        epoch_rows.append(row)
        save_checkpoint(setup, out_dir / "checkpoint.pt")
        if verbose:
            progress.message(f"validation at step {state.step} (epoch {row['epoch']:g}): "
                             + " ".join(f"{k}={v:.4f}" for k, v in row.items()
                                        if k.startswith("val_") and k != "val_time_s"))

    remaining = setup.total_steps - setup.state.step
    try:
        t0 = time.perf_counter()
        rows = train_steps(setup, remaining, on_log=on_log, on_boundary=on_boundary,
                           boundary_every=period or None)
        t_train[0] = time.perf_counter() - t0
    finally:
        progress.close()
        step_log.close()
        epoch_log.close()
    if remaining == 0 and not (out_dir / "checkpoint.pt").exists():
        save_checkpoint(setup, out_dir / "checkpoint.pt")

    eval_ds = setup.datasets[cfg.eval_split]
    t1 = time.perf_counter()
    result = evaluate_rrg(model, tokenizer, eval_ds, cfg, split=cfg.eval_split)
    result["eval_time_s"] = time.perf_counter() - t1
    result["train_time_s"] = t_train[0]
    result["steps"] = setup.total_steps
    result["conflict_share"] = setup.state.conflict_share()
    (out_dir / "eval.json").write_text(json.dumps(_public(result), indent=2))
    _write_samples(out_dir / "samples.md", result["samples"], cfg.n_report_samples)
    write_samples_csv(out_dir / "samples.csv", result["samples"])
    from .metrics import metrics_summary

    say(f"test report ({cfg.eval_split}, {result['n']} studies; all figures in eval.json): "
        + metrics_summary(result["metrics"])
        + f"; conflict share {result['conflict_share']:.3f}")
    say(f"run folder: {out_dir}")
    return {"run_dir": str(out_dir), "final": rows[-1] if rows else {}, "history": rows,
            "epochs": epoch_rows, "eval": _public(result), "n_parameters": n_params}


def write_samples_csv(path: Path, samples: list[dict[str, str]]) -> None:
    """All generated reports beside their references: columns ``id, reference, generated``."""
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "reference", "generated"])
        w.writeheader()
        for s_ in samples:
            w.writerow({k: s_[k] for k in ("id", "reference", "generated")})


def conflict_study(cfg: RRGConfig, n_batches: int = 10) -> dict[str, Any]:
    """Train ``cfg.steps`` steps (0: measure at initialisation) and :func:`measure_conflict` over
    ``n_batches`` training batches. Returns the measurement with the steps and data options."""
    steps = cfg.steps if cfg.steps is not None else 0
    setup = prepare_run(cfg)
    if steps:
        train_steps(setup, steps)
    loader = make_loader(setup.datasets["train"], setup.tokenizer, cfg, shuffle=True, seed=cfg.seed + 1)
    result = measure_conflict(setup.model, loader, n_batches, task_weights=setup.task_weights,
                              device=setup.device)
    setup.model.zero_grad(set_to_none=True)
    return {"steps": steps, "synthetic": dict(cfg.synthetic), **result}


def _format_row(row: dict[str, float]) -> str:
    keys = [k for k in row if k.startswith("loss_")] + ["drift_cos", "diffusion", "conflict_share"]
    return f"step {int(row['step'])}: " + " ".join(f"{k}={row[k]:.4f}" for k in keys if k in row)


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "samples"} | {"n_samples": len(result["samples"])}


def _write_samples(path: Path, samples: list[dict[str, str]], n: int) -> None:
    lines = ["# Generated reports vs references", ""]
    for s in samples[:n]:
        lines += [f"## {s['id']}", "", f"- **reference**: {s['reference']}",
                  f"- **generated**: {s['generated']}", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_rrg(model: RRGModel, tokenizer: Any, dataset: Any, cfg: RRGConfig, *,
                 split: str = "test") -> dict[str, Any]:
    """Generate a report per study of ``dataset`` and score it (:func:`score_batches`).

    Returns ``{"split", "n", "metrics", "samples"}``; ``CEtrue_*`` (the generated reports
    against the generator's true labels) is added when the dataset has them.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if cfg.eval_max_samples is not None and cfg.eval_max_samples < len(dataset):
        from torch.utils.data import Subset

        dataset = Subset(dataset, range(cfg.eval_max_samples))
    if len(dataset) == 0:
        raise ValueError(f"the {split} split is empty: nothing to evaluate")
    loader = make_loader(dataset, tokenizer, cfg, shuffle=False)
    try:
        with torch.no_grad():
            scored = score_batches(model, tokenizer, (to_device(b, device) for b in loader),
                                   max_length=cfg.max_gen_length, beam_size=cfg.beam_size,
                                   meteor=cfg.meteor, autocast=lambda: _autocast(cfg, device),
                                   truth=dataset_true_labels(dataset))
    finally:
        if was_training:
            model.train()
    return {"split": split, **scored}


def dataset_true_labels(dataset: Any) -> Callable[[int], Any] | None:
    """``true_labels(i)`` of a (synthetic) dataset, through a ``Subset``; ``None`` without."""
    base = getattr(dataset, "dataset", dataset)
    truth = getattr(base, "true_labels", None)
    return truth if callable(truth) else None


def score_batches(model: RRGModel, tokenizer: Any, batches: Any, *, max_length: int | None = None,
                  beam_size: int = 1, meteor: bool = False, autocast: Callable[[], Any] = nullcontext,
                  truth: Callable[[int], Any] | None = None,
                  max_samples: int | None = None) -> dict[str, Any]:
    """Generate a report for every study of ``batches`` (collated, on the model's device; the
    model in eval mode, gradients off) and score it.

    References are the tokenizer's view of the ground truth (cleaned, truncated to its maximum
    length, as R2Gen scores them). Returns ``{"n", "metrics", "samples"}`` where metrics hold the
    NLG scores, the clinical-efficacy scores of the generated reports (``CE_*``, the whole grid
    of :func:`~.metrics.clinical_efficacy`; ``CEtrue_*`` against ``truth(i)``, the generator's
    true labels of the i-th study, when given), the classification head's accuracy over the
    14 × 4 states and positive-class F1 (``cls_*``), and the mean evaluation losses
    (``eval_loss_*``). ``max_samples``: score at most this many studies.
    """
    from .metrics import clinical_efficacy, nlg_metrics

    max_len = max_length or (tokenizer.max_length - 1)
    refs, hyps, ids = [], [], []
    tp = fp = fn = correct = total = 0
    loss_sums = {n: 0.0 for n in model.task_names}
    n_studies = 0
    for batch in batches:
        if max_samples is not None:
            room = max_samples - n_studies
            if room <= 0:
                break
            if batch["tokens"].shape[0] > room:  # the last batch: only the studies still wanted
                batch = {k: v[:room] for k, v in batch.items()}
        with autocast():
            out = model(batch["images"], batch["tokens"], batch["classes"])
            pred = model.class_logits(out["memory"]).argmax(-1)
            gen = model.generate(batch["images"], max_length=max_len, beam_size=beam_size)
        B = batch["tokens"].shape[0]
        n_studies += B
        for n in model.task_names:
            loss_sums[n] += float(out[n]) * B
        hyps += [tokenizer.decode(g) for g in gen]
        refs += [tokenizer.decode(t) for t in batch["tokens"].tolist()]
        ids += list(batch["ids"])
        true = batch["classes"]
        correct += int((pred == true).sum())
        total += true.numel()
        tp += int(((pred == 1) & (true == 1)).sum())
        fp += int(((pred == 1) & (true != 1)).sum())
        fn += int(((pred != 1) & (true == 1)).sum())
    if n_studies == 0:
        raise ValueError("no study to evaluate")
    metrics: dict[str, float] = {}
    metrics.update(nlg_metrics(refs, hyps, meteor=meteor))
    metrics.update({f"CE_{k}": v for k, v in clinical_efficacy(refs, hyps).items()})
    if truth is not None:
        # Synthetic data: the generated reports against the generator's noise-free labels.
        import numpy as np

        labels = np.stack([truth(i) for i in range(len(refs))])
        metrics.update({f"CEtrue_{k}": v for k, v in clinical_efficacy(labels, hyps).items()
                        if "/" not in k})
    metrics["cls_accuracy"] = correct / total
    metrics["cls_f1_positive"] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    for n, s in loss_sums.items():
        metrics[f"eval_loss_{n}"] = s / n_studies
    samples = [{"id": str(i), "reference": r, "generated": h} for i, r, h in zip(ids, refs, hyps)]
    return {"n": len(refs), "metrics": metrics, "samples": samples}


def load_run(checkpoint: str | os.PathLike, *, device: str = "cpu") -> tuple[RRGModel, Any, RRGConfig, dict]:
    """Rebuild ``(model, tokenizer, config, checkpoint)`` from a saved ``checkpoint.pt``."""
    from .model import ModelConfig
    from .tokenizer import ReportTokenizer

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = load_checkpoint(path, map_location=device)
    try:
        cfg = RRGConfig.from_dict(ckpt["config"])
        cfg.device = device
        tokenizer = ReportTokenizer.from_state_dict(ckpt["tokenizer"])
        model = RRGModel(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"checkpoint {str(path)!r} cannot be used: {_first_line(str(exc))}") from None
    return model.to(device), tokenizer, cfg, ckpt
