"""Training and evaluation of the multi-task RRG model with any registered aggregation method.

``train_rrg(RRGConfig(...))`` builds the data, the tokenizer and :class:`RRGModel`, trains it with
:class:`mtl_opt.MultiTaskOptimizer` (shared parameters: the image encoder; task parameters: the
report decoder, the classification head and, with ``contrastive=True``, the contrastive head),
logs the task losses and the two symptoms of "The Double Dilemma in Multi-Task Radiology Report
Generation" (ICML 2026) as it goes, evaluates the generated reports with NLG and clinical-efficacy
metrics and writes a run folder:

* ``config.json``: the exact :class:`RRGConfig` (and the resolved model config);
* ``metrics.csv``: one row per logged step: losses, ``drift_cos``, ``diffusion``, timing;
* ``eval.json``: NLG metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr), clinical efficacy (CE P/R/F1),
  the classification head's accuracy, and the evaluation losses;
* ``checkpoint.pt``: model, tokenizer, configs, aggregator and optimizer state;
* ``samples.md``: a few generated reports next to their references.

The two symptoms (measured on the shared encoder's parameters, with ``g_i = ∇_θ L_i`` the task
gradients and ``ω`` the task weights):

* **drift** ``cos(g_report, g_cls) = ⟨g_1, g_2⟩ / (‖g_1‖ ‖g_2‖)``: negative when the tasks
  conflict, i.e. their joint update moves the shared encoder against one task;
* **diffusion** ``‖g_combined‖ / ‖g_joint‖`` with ``g_joint = Σ ω_i g_i`` and ``g_combined`` the
  update the method actually applied to the encoder: below 1 when conflict-averse aggregation
  shrinks the update (the magnitude loss CAME-Grad's energy injection counters).

The module imports only torch and the library; pandas and plotly are never needed here.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .model import MODEL_SIZES, RRGModel, model_config_for_size

__all__ = [
    "RRGConfig",
    "RRGSetup",
    "build_datasets",
    "build_model",
    "conflict_figures",
    "conflict_of_gradients",
    "conflict_study",
    "evaluate_rrg",
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
#: The CAME-Grad authors' task weights: report loss 1, classification loss ``cls_weight = 4``.
AUTHORS_TASK_WEIGHTS = (1.0, 4.0)
DEFAULT_STEPS = 200
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
        steps / epochs: training length (give at most one; default 200 steps).
        batch_size, lr, weight_decay, optimizer, grad_clip: the torch optimizer.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...).
        amp: mixed precision (CUDA only): autocast in ``amp_dtype`` (bfloat16 where supported).
        model_size: ``"tiny"`` (≈1e5 parameters), ``"small"``, ``"base"`` (tens of millions).
        contrastive: add the image–report contrastive task (K = 3).
        aggregate_at: ``"parameters"`` (the Jacobian over the encoder's parameters) or
            ``"representation"`` (over the encoder's output, MGDA-UB style).
        log_every: log (and measure drift/diffusion) every this many steps.
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
    lr: float = 1e-3
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
        if not (self.lr > 0 and math.isfinite(self.lr)):
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
        device = torch.device(self.device)
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
        ds, batch_size=cfg.batch_size, shuffle=shuffle, generator=g if shuffle else None,
        collate_fn=functools.partial(collate_rrg, tokenizer=tokenizer),
        num_workers=cfg.num_workers, pin_memory=torch.device(cfg.device).type == "cuda",
        drop_last=False,
    )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v) for k, v in batch.items()}


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
# Drift and diffusion
# ------------------------------------------------------------------------------------------------
def task_gradients(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """The Jacobian ``G`` (K, d): row i is ``∇_θ L_i`` flattened over ``params`` (float32)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, params)
        ]))
    return torch.stack(rows)


def conflict_figures(M: Tensor, weights: Sequence[float], *, row_scale: Sequence[float] | None = None,
                     combined_norm: float | None = None) -> dict[str, float]:
    """Drift and magnitude figures from the Gramian ``M = G Gᵀ`` (K × K) of the task gradients.

    ``row_scale`` ``s`` says the rows of ``G`` are ``s_i g_i`` (losses scaled before
    differentiation); the figures are of the unscaled ``g_i``. With ``ω = weights``:

    * ``drift_cos = ⟨g_1, g_2⟩ / (‖g_1‖ ‖g_2‖)`` (report vs classification);
    * ``norm_ratio = ‖g_2‖ / ‖g_1‖``; ``grad_norm_i = ‖g_i‖``; ``joint_norm = ‖Σ ω_i g_i‖``;
    * with ``combined_norm = ‖g_combined‖`` (the update applied to the encoder):
      ``diffusion = ‖g_combined‖ / ‖Σ ω_i g_i‖``.

    Undefined ratios (a zero norm) are NaN, on purpose: the log shows that they are undefined.
    """
    M64 = M.detach().to(device="cpu", dtype=torch.float64)
    K = M64.shape[0]
    if K < 2:
        raise ValueError("drift needs at least two tasks")
    if row_scale is not None:
        s = torch.tensor(list(row_scale), dtype=torch.float64)
        if bool((s <= 0).any()):
            raise ValueError(f"row scales must be positive, got {list(row_scale)}")
        M64 = M64 / (s[:, None] * s[None, :])
    w = torch.tensor(list(weights), dtype=torch.float64)
    norms = M64.diagonal().clamp(min=0).sqrt()
    joint = float((w @ M64 @ w).clamp(min=0).sqrt())
    denom = float(norms[0] * norms[1])
    nan = float("nan")
    out = {
        "drift_cos": float(M64[0, 1]) / denom if denom > 0 else nan,
        "norm_ratio": float(norms[1] / norms[0]) if float(norms[0]) > 0 else nan,
    }
    for i, n in enumerate(norms.tolist()):
        out[f"grad_norm_{i + 1}"] = n
    out["joint_norm"] = joint
    if combined_norm is not None:
        out["combined_norm"] = float(combined_norm)
        out["diffusion"] = float(combined_norm) / joint if joint > 0 else nan
    return out


def conflict_of_gradients(G: Tensor, weights: Sequence[float] | None = None,
                          combined: Tensor | None = None) -> dict[str, float]:
    """:func:`conflict_figures` of a Jacobian ``G`` (K, d) of unscaled task gradients; ``combined``
    (d,) is the applied update. ``weights`` default to ones."""
    G64 = G.detach().double()
    M = G64 @ G64.T
    w = [1.0] * G.shape[0] if weights is None else list(weights)
    c = None if combined is None else float(combined.detach().double().norm())
    return conflict_figures(M, w, combined_norm=c)


@torch.no_grad()
def _shared_grad(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])


def measure_conflict(model: RRGModel, batches: Iterable[dict[str, Any]], n_batches: int, *,
                     task_weights: Sequence[float] | None = None,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean and spread of the report/classification gradient conflict on the shared encoder.

    Over ``n_batches`` batches (dicts from ``collate_rrg``), computes per batch the Jacobian of
    the two losses on the encoder's parameters and reports the mean and standard deviation of
    ``drift_cos`` and of ``norm_ratio = ‖g_cls‖/‖g_report‖`` (unweighted gradients), the share
    of conflicting batches (cos < 0) and the mean weighted ratio ``ω_2‖g_cls‖ / (ω_1‖g_report‖)``.
    The model's parameters and ``.grad`` are left unchanged.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    device = torch.device(device)
    w = list(task_weights) if task_weights is not None else list(AUTHORS_TASK_WEIGHTS)
    shared = model.shared_parameters()
    cos, ratio = [], []
    it = iter(batches)
    for _ in range(n_batches):
        try:
            batch = _to_device(next(it), device)
        except StopIteration:
            break
        out = model(batch["images"], batch["tokens"], batch["classes"])
        G = task_gradients([out["report"], out["classification"]], shared)
        c = conflict_of_gradients(G)
        cos.append(c["drift_cos"])
        ratio.append(c["norm_ratio"])
    if not cos:
        raise ValueError("no batches to measure the conflict on")
    cos_t, ratio_t = torch.tensor(cos, dtype=torch.float64), torch.tensor(ratio, dtype=torch.float64)
    return {
        "n_batches": len(cos),
        "cos_mean": float(cos_t.mean()),
        "cos_std": float(cos_t.std()) if len(cos) > 1 else 0.0,
        "frac_conflicting": float((cos_t < 0).double().mean()),
        "norm_ratio_mean": float(ratio_t.mean()),
        "norm_ratio_std": float(ratio_t.std()) if len(ratio) > 1 else 0.0,
        "weighted_norm_ratio_mean": float(ratio_t.mean() * w[1] / w[0]),
    }


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
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


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


def prepare_run(cfg: RRGConfig) -> RRGSetup:
    """Validate ``cfg`` and build data, tokenizer, model, method and optimizers (seeded)."""
    import mtl_opt

    from .tokenizer import ReportTokenizer

    cfg.validate()
    _seed_everything(cfg.seed)
    device = torch.device(cfg.device)
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
    if cfg.epochs is not None:
        total = cfg.epochs * len(loader)
    else:
        total = DEFAULT_STEPS if cfg.steps is None else cfg.steps
    return RRGSetup(cfg, device, datasets, tokenizer, model, name, hyper, aggregator, weights, mode,
                    optimizer, mto, loader, total)


def train_steps(setup: RRGSetup, n_steps: int, *,
                on_log: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run ``n_steps`` optimisation steps; returns the logged rows (every ``log_every`` steps,
    the first and the last).

    Each step: forward under autocast (CUDA + ``amp``), the K task losses, then
    ``MultiTaskOptimizer.step`` (the method aggregates the encoder's Jacobian; the heads get
    their own task's gradient). At parameter level the logged drift/diffusion come from the
    step's own Gramian at no extra cost; at representation level the encoder's Jacobian is
    computed separately on logged steps.
    """
    cfg, model, mto, device = setup.cfg, setup.model, setup.mto, setup.device
    weights = setup.task_weights
    w_t = torch.tensor(weights, dtype=torch.float64)
    scale_losses = setup.task_weights_mode == "loss_scale"
    shared = model.shared_parameters()
    rows: list[dict[str, float]] = []
    model.train()
    step, t0 = 0, time.perf_counter()
    epoch = 0
    while step < n_steps:
        for batch in setup.loader:
            if step >= n_steps:
                break
            batch = _to_device(batch, device)
            log_now = step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == n_steps
            with _autocast(cfg, device):
                out = model(batch["images"], batch["tokens"], batch["classes"])
            losses = [out[n] for n in model.task_names]
            G_enc = None
            if log_now and cfg.aggregate_at == "representation":
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
                combined = float(_shared_grad(shared).double().norm()) if log_now else None
                mto.step()
            else:
                # Without clipping the encoder's .grad is the method's direction (parameter
                # level) or its pull-back through the features (representation level).
                result = mto.step(step_losses, **kwargs)
                combined = float(_shared_grad(shared).double().norm()) if log_now else None
            step += 1
            if not log_now:
                continue
            loss_vals = result.losses / (w_t if scale_losses else 1.0)
            row: dict[str, float] = {"step": step, "epoch": epoch,
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
            if result.weights is not None:
                for i, b in enumerate(result.weights.tolist()):
                    row[f"beta_{i + 1}"] = b
            rows.append(row)
            if on_log is not None:
                on_log(row)
        epoch += 1
    return rows


def _default_out() -> Path:
    return Path("runs") / time.strftime("rrg-%Y%m%d-%H%M%S")


def train_rrg(config: RRGConfig, *, callback: Callable[[int, dict[str, float]], None] | None = None,
              verbose: bool = False) -> dict[str, Any]:
    """Train and evaluate one RRG run; returns ``{"run_dir", "final", "history", "eval",
    "n_parameters"}``.

    ``callback(step, metrics)`` is called at every log interval with the logged row (a sweep
    reports from it). See the module docstring for the run folder's contents. All options are
    checked before any work starts.
    """
    cfg = config
    cfg.validate()
    out_dir = Path(cfg.out) if cfg.out else _default_out()
    say = print if verbose else (lambda *a, **k: None)
    setup = prepare_run(cfg)
    model, tokenizer = setup.model, setup.tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = model.n_parameters()
    say(f"model {cfg.model_size}: {n_params['total']:,} parameters ({n_params['encoder']:,} shared); "
        f"vocabulary {tokenizer.vocab_size}; method {setup.aggregator!r}; "
        f"task weights {setup.task_weights} ({setup.task_weights_mode}); {setup.total_steps} steps "
        f"on {setup.device}")
    config_record = {
        "rrg": cfg.to_dict(), "model": model.cfg.to_dict(),
        "method": {"name": setup.method, **setup.hyperparameters, "repr": repr(setup.aggregator)},
        "task_weights": setup.task_weights, "task_weights_mode": setup.task_weights_mode,
        "total_steps": setup.total_steps, "task_names": list(model.task_names),
        "n_parameters": n_params,
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "max_length": tokenizer.max_length},
        "dataset_sizes": {k: len(v) for k, v in setup.datasets.items()},
        "skipped_studies": {k: [list(x) for x in getattr(v, "skipped", [])]
                            for k, v in setup.datasets.items()},
        "torch": torch.__version__,
    }
    (out_dir / "config.json").write_text(json.dumps(config_record, indent=2, default=str))
    n_skipped = sum(len(v) for v in config_record["skipped_studies"].values())
    if n_skipped:
        say(f"skipped {n_skipped} malformed studies (listed in config.json)")

    csv_path = out_dir / "metrics.csv"
    with csv_path.open("w", newline="") as csv_file:
        writer: list[csv.DictWriter] = []

        def on_log(row: dict[str, float]) -> None:
            if not writer:
                writer.append(csv.DictWriter(csv_file, fieldnames=list(row)))
                writer[0].writeheader()
            writer[0].writerow(row)
            csv_file.flush()
            say(_format_row(row))
            if callback is not None:
                callback(int(row["step"]), dict(row))

        t0 = time.perf_counter()
        rows = train_steps(setup, setup.total_steps, on_log=on_log)
        train_time = time.perf_counter() - t0

    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "model_config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "tokenizer": tokenizer.state_dict(),
        "optimizer": setup.mto.state_dict(),
        "step": setup.total_steps,
    }
    torch.save(ckpt, out_dir / "checkpoint.pt")
    eval_ds = setup.datasets[cfg.eval_split]
    t1 = time.perf_counter()
    result = evaluate_rrg(model, tokenizer, eval_ds, cfg, split=cfg.eval_split)
    result["eval_time_s"] = time.perf_counter() - t1
    result["train_time_s"] = train_time
    result["steps"] = setup.total_steps
    (out_dir / "eval.json").write_text(json.dumps(_public(result), indent=2))
    _write_samples(out_dir / "samples.md", result["samples"], cfg.n_report_samples)
    say(f"eval ({cfg.eval_split}, {result['n']} studies): "
        + ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if "/" not in k))
    say(f"run folder: {out_dir}")
    return {"run_dir": str(out_dir), "final": rows[-1] if rows else {}, "history": rows,
            "eval": _public(result), "n_parameters": n_params}


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
    keys = [k for k in row if k.startswith("loss_")] + ["drift_cos", "diffusion"]
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
    """Generate a report per study and score it.

    References are the tokenizer's view of the ground truth (cleaned, truncated to its maximum
    length, as R2Gen scores them). Returns ``{"split", "n", "metrics", "samples"}`` where metrics
    hold the NLG scores, the clinical-efficacy scores of the generated reports (``CE_*``), the
    classification head's accuracy over the 14 × 4 states and positive-class F1 (``cls_*``), and
    the mean evaluation losses (``eval_loss_*``).
    """
    from .metrics import clinical_efficacy, nlg_metrics

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if cfg.eval_max_samples is not None and cfg.eval_max_samples < len(dataset):
        from torch.utils.data import Subset

        dataset = Subset(dataset, range(cfg.eval_max_samples))
    if len(dataset) == 0:
        raise ValueError(f"the {split} split is empty: nothing to evaluate")
    loader = make_loader(dataset, tokenizer, cfg, shuffle=False)
    max_len = cfg.max_gen_length or (tokenizer.max_length - 1)
    refs, hyps, ids = [], [], []
    tp = fp = fn = correct = total = 0
    loss_sums = {n: 0.0 for n in model.task_names}
    n_studies = 0
    for batch in loader:
        batch = _to_device(batch, device)
        with _autocast(cfg, device):
            out = model(batch["images"], batch["tokens"], batch["classes"])
            pred = model.class_logits(out["memory"]).argmax(-1)
            gen = model.generate(batch["images"], max_length=max_len, beam_size=cfg.beam_size)
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
    metrics: dict[str, float] = {}
    metrics.update(nlg_metrics(refs, hyps, meteor=cfg.meteor))
    metrics.update({f"CE_{k}": v for k, v in clinical_efficacy(refs, hyps).items()})
    metrics["cls_accuracy"] = correct / total
    metrics["cls_f1_positive"] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    for n, s in loss_sums.items():
        metrics[f"eval_loss_{n}"] = s / n_studies
    if was_training:
        model.train()
    samples = [{"id": str(i), "reference": r, "generated": h} for i, r, h in zip(ids, refs, hyps)]
    return {"split": split, "n": len(refs), "metrics": metrics, "samples": samples}


def load_run(checkpoint: str | os.PathLike, *, device: str = "cpu") -> tuple[RRGModel, Any, RRGConfig, dict]:
    """Rebuild ``(model, tokenizer, config, checkpoint)`` from a saved ``checkpoint.pt``."""
    from .model import ModelConfig
    from .tokenizer import ReportTokenizer

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not an mtl-opt RRG checkpoint")
    cfg = RRGConfig.from_dict(ckpt["config"])
    cfg.device = device
    tokenizer = ReportTokenizer.from_state_dict(ckpt["tokenizer"])
    model = RRGModel(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), tokenizer, cfg, ckpt
