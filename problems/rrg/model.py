"""The multi-task radiology report generation model: one image encoder, two (or three) heads.

A chest X-ray study (one or more views) goes in; a report and 14 CheXpert observation states come
out. The layout follows R2Gen (Chen et al., EMNLP 2020) and PromptMRG (Jin et al., AAAI 2024), the
backbones of "The Double Dilemma in Multi-Task Radiology Report Generation" (ICML 2026):

* **shared image encoder** ``E``: a residual convolutional network (GroupNorm, GELU) turns each
  view ``(1, H, W)`` into an ``h × w`` grid of ``d``-dimensional features; a fixed 2-D sinusoidal
  position code and a learned view embedding are added and the views' grids are concatenated into
  one sequence of ``N = V·h·w`` visual tokens ``m`` (optionally refined by transformer encoder
  layers). Both tasks read ``m``: it is where their gradients meet and conflict.
* **task 1, report decoder**: a pre-norm transformer decoder (causal self-attention,
  cross-attention to ``m``) with tied input/output embeddings, trained with the language-modelling
  loss ``L_lm = -(1/|T|) Σ_t log p(y_t | y_<t, m)`` over the report tokens up to and including
  the end-of-sequence token.
* **task 2, classification head**: the mean visual token, then a small MLP to ``14 × 4`` logits,
  one 4-way softmax per CheXpert observation over (blank, positive, negative, uncertain), trained
  with the cross-entropy ``L_cls = -(1/14B) Σ_{b,o} log softmax(z_{b,o})[c_{b,o}]`` as PromptMRG does.
* **task 3 (optional), image–report contrastive alignment**: the mean visual token and a bag of
  report-word embeddings are projected to a unit sphere and aligned by the symmetric InfoNCE loss
  ``L_con = ½ [CE(S, I) + CE(Sᵀ, I)]`` with ``S_ij = s · ⟨u_i, v_j⟩`` (CLIP, Radford et al. 2021).

Everything is plain torch (no torchvision). :meth:`RRGModel.shared_parameters` and
:meth:`RRGModel.task_parameters` give the parameter groups a multi-task optimizer needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MODEL_SIZES",
    "N_OBSERVATIONS",
    "N_STATES",
    "ModelConfig",
    "RRGModel",
    "classification_loss",
    "info_nce_loss",
    "model_config_for_size",
    "report_loss",
    "report_target_mask",
]

N_OBSERVATIONS = 14  # the CheXpert observations
N_STATES = 4  # blank, positive, negative, uncertain


@dataclass
class ModelConfig:
    """Sizes of :class:`RRGModel`. Use :func:`model_config_for_size` for the named presets.

    Attributes:
        vocab_size, pad_id, bos_id, eos_id: from the report tokenizer.
        image_channels: channels of an input view (1 for radiographs).
        stem_channels: channels of the stride-2 stem convolution (0: no stem).
        stage_channels: channels of each encoder stage; every stage halves the resolution.
        blocks_per_stage: residual blocks per stage (the first one strides).
        d_model: width of the visual tokens and of the decoder.
        encoder_layers: transformer encoder layers over the visual tokens (shared).
        decoder_layers, n_heads, ffn_dim: the report decoder.
        cls_hidden: hidden width of the classification MLP (0: a single linear layer).
        max_positions: longest token sequence the decoder accepts.
        max_views: most views per study (size of the view embedding).
        contrastive: build the task-3 projection heads.
        proj_dim, text_dim: contrastive embedding width and report bag-of-words width.
        init_temperature: initial InfoNCE temperature (``s = 1/temperature``, learned).
        dropout: dropout in the transformer layers.
    """

    vocab_size: int
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    image_channels: int = 1
    stem_channels: int = 0
    stage_channels: tuple[int, ...] = (16, 32, 48)
    blocks_per_stage: int = 1
    d_model: int = 64
    encoder_layers: int = 0
    decoder_layers: int = 1
    n_heads: int = 4
    ffn_dim: int = 128
    cls_hidden: int = 0
    max_positions: int = 128
    max_views: int = 2
    contrastive: bool = False
    proj_dim: int = 32
    text_dim: int = 32
    init_temperature: float = 0.07
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.stage_channels = tuple(int(c) for c in self.stage_channels)
        if self.vocab_size < 4:
            raise ValueError(f"vocab_size must be at least 4 (special tokens), got {self.vocab_size}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if not self.stage_channels or min(self.stage_channels) < 1:
            raise ValueError(f"stage_channels must be positive, got {self.stage_channels}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 4:
            raise ValueError(f"d_model={self.d_model} must be a multiple of 4 (2-D sine positions)")
        if self.blocks_per_stage < 1 or self.decoder_layers < 1:
            raise ValueError("blocks_per_stage and decoder_layers must be at least 1")
        if self.max_views < 1 or self.max_positions < 2:
            raise ValueError("max_views must be >= 1 and max_positions >= 2")
        if not 0.0 < self.init_temperature:
            raise ValueError(f"init_temperature must be positive, got {self.init_temperature}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage_channels"] = list(self.stage_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        return cls(**d)


# Named presets: (encoder, decoder) sizes. "tiny" ≈ 1e5 parameters for CPU tests at 32 px;
# "small" a few million for quick GPU runs; "base" tens of millions at 224 px.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(stem_channels=0, stage_channels=(16, 32, 48), blocks_per_stage=1, d_model=64,
                 encoder_layers=0, decoder_layers=1, n_heads=4, ffn_dim=128, cls_hidden=0,
                 proj_dim=32, text_dim=32, dropout=0.0),
    "small": dict(stem_channels=32, stage_channels=(64, 128, 256), blocks_per_stage=2,
                  d_model=256, encoder_layers=1, decoder_layers=3, n_heads=8, ffn_dim=1024,
                  cls_hidden=256, proj_dim=128, text_dim=128, dropout=0.1),
    "base": dict(stem_channels=64, stage_channels=(64, 128, 256, 512), blocks_per_stage=2,
                 d_model=512, encoder_layers=1, decoder_layers=3, n_heads=8, ffn_dim=2048,
                 cls_hidden=512, proj_dim=256, text_dim=256, dropout=0.1),
}


def model_config_for_size(size: str, **overrides: Any) -> ModelConfig:
    """The preset ``size`` ("tiny", "small", "base") with ``overrides`` (vocab_size, ids, ...)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return ModelConfig(**{**MODEL_SIZES[size], **overrides})


# ------------------------------------------------------------------------------------------------
# Losses (module-level so they can be checked by hand)
# ------------------------------------------------------------------------------------------------
def report_target_mask(targets: Tensor, pad_id: int, eos_id: int) -> Tensor:
    """Which target positions count in the language-modelling loss: every token up to and
    including the first end-of-sequence token, and no padding after it (works when
    ``pad_id == eos_id`` too, as in R2Gen's tokenizer)."""
    T = targets.shape[1]
    is_eos = targets == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, T, dtype=torch.long))
    positions = torch.arange(T, device=targets.device).unsqueeze(0)
    mask = positions <= first_eos.unsqueeze(1)
    if pad_id != eos_id:
        mask = mask & (targets != pad_id)
    return mask


def report_loss(logits: Tensor, targets: Tensor, pad_id: int, eos_id: int) -> Tensor:
    """Mean token cross-entropy ``-(1/|T|) Σ_t log p(y_t | y_<t)`` over :func:`report_target_mask`.

    ``logits`` (B, T, V) predict ``targets`` (B, T) (the report shifted left by one token).
    """
    mask = report_target_mask(targets, pad_id, eos_id)
    if not bool(mask.any()):
        raise ValueError("the report batch has no target tokens")
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    mask_f = mask.reshape(-1).to(nll.dtype)
    return (nll * mask_f).sum() / mask_f.sum()


def classification_loss(logits: Tensor, classes: Tensor) -> Tensor:
    """PromptMRG's disease loss: the mean 4-way cross-entropy over all ``B × 14`` observations.

    ``logits`` (B, 14, 4), ``classes`` (B, 14) in {0 blank, 1 positive, 2 negative, 3 uncertain}.
    """
    if logits.shape[:-1] != classes.shape:
        raise ValueError(f"classification logits {tuple(logits.shape)} do not match classes {tuple(classes.shape)}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), classes.reshape(-1).long())


def info_nce_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE between matched rows of ``image_emb`` and ``text_emb`` (B, p).

    ``u = image_emb/‖image_emb‖``, ``v = text_emb/‖text_emb‖``, ``S = scale · u vᵀ``;
    ``L = ½ [ -(1/B) Σ_i log softmax(S_i·)_i  -(1/B) Σ_j log softmax(S_·j)_j ]``.
    """
    u = F.normalize(image_emb.float(), dim=-1)
    v = F.normalize(text_emb.float(), dim=-1)
    S = scale * (u @ v.T)
    target = torch.arange(S.shape[0], device=S.device)
    return 0.5 * (F.cross_entropy(S, target) + F.cross_entropy(S.T, target))


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class _ResidualBlock(nn.Module):
    """``y = GELU(x' + GN(conv(GELU(GN(conv_s(x))))))`` with a 1×1 strided shortcut ``x'``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _group_norm(c_out)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _group_norm(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.gelu(h + self.shortcut(x))


def sine_positions_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fixed 2-D sinusoidal position code (h·w, dim): half the channels encode the row, half the
    column, each as ``[sin(p ω_k), cos(p ω_k)]`` with ``ω_k = 10000^{-k/(dim/4)}``."""
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * omega  # (h, q)
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * omega  # (w, q)
    row = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    col = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([row, col], dim=-1).reshape(h * w, 4 * quarter).to(dtype)


class ImageEncoder(nn.Module):
    """The shared encoder: views (B, V, C, H, W) -> visual tokens (B, V·h·w, d)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = cfg.image_channels
        if cfg.stem_channels:
            layers += [nn.Conv2d(c, cfg.stem_channels, 5, stride=2, padding=2, bias=False),
                       _group_norm(cfg.stem_channels), nn.GELU()]
            c = cfg.stem_channels
        for c_out in cfg.stage_channels:
            for b in range(cfg.blocks_per_stage):
                layers.append(_ResidualBlock(c, c_out, stride=2 if b == 0 else 1))
                c = c_out
        self.cnn = nn.Sequential(*layers)
        self.to_tokens = nn.Conv2d(c, cfg.d_model, 1)
        self.view_embedding = nn.Embedding(cfg.max_views, cfg.d_model)
        nn.init.normal_(self.view_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.encoder_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.max_views = cfg.max_views
        self.d_model = cfg.d_model

    def forward(self, images: Tensor) -> Tensor:
        B, V = images.shape[:2]
        if V > self.max_views:
            raise ValueError(f"the model takes at most {self.max_views} views per study, got {V}")
        x = self.to_tokens(self.cnn(images.flatten(0, 1)))  # (B·V, d, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B·V, h·w, d)
        x = x + sine_positions_2d(h, w, self.d_model, x.device, x.dtype)
        x = x.reshape(B, V, h * w, self.d_model)
        x = x + self.view_embedding.weight[:V].to(x.dtype)[None, :, None, :]
        x = x.reshape(B, V * h * w, self.d_model)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class ReportDecoder(nn.Module):
    """Task 1: causal transformer decoder with cross-attention to the visual tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.d_model)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.max_positions = cfg.max_positions
        self.scale = math.sqrt(cfg.d_model)

    def forward(self, memory: Tensor, tokens: Tensor) -> Tensor:
        """Next-token logits (B, T, vocab) for input tokens (B, T) attending to memory (B, N, d)."""
        T = tokens.shape[1]
        if T > self.max_positions:
            raise ValueError(f"token sequence of length {T} exceeds max_positions={self.max_positions}")
        positions = torch.arange(T, device=tokens.device)
        x = self.token_embedding(tokens) * self.scale + self.position_embedding(positions)[None]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tokens.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=causal, tgt_is_causal=True)
        return self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        # Tied output embedding.
        return F.linear(x, self.token_embedding.weight.to(x.dtype), self.output_bias.to(x.dtype))

    # ---- incremental decoding (key/value cache) -----------------------------------------------
    # The same computation as ``forward`` one position at a time: with causal self-attention the
    # keys and values of earlier positions never change, so each layer caches them and a new
    # token costs one query per layer instead of re-running the whole prefix. The cross-attention
    # keys and values of the memory are computed once. Used by generation (eval mode).
    @staticmethod
    def _qkv(mha: nn.MultiheadAttention, x: Tensor, which: slice) -> list[Tensor]:
        d = mha.embed_dim
        w = mha.in_proj_weight[which.start * d: which.stop * d]
        b = None if mha.in_proj_bias is None else mha.in_proj_bias[which.start * d: which.stop * d]
        B, T = x.shape[:2]
        h = mha.num_heads
        out = F.linear(x, w, b).reshape(B, T, which.stop - which.start, h, d // h)
        return [t.transpose(1, 2) for t in out.unbind(dim=2)]  # each (B, h, T, d/h)

    @staticmethod
    def _attend(mha: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        a = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, d/h)
        B, h, T, dh = a.shape
        return mha.out_proj(a.transpose(1, 2).reshape(B, T, h * dh))

    def start_cache(self, memory: Tensor) -> dict[str, Any]:
        """A decoding cache for ``memory`` (B, N, d): cross-attention keys/values per layer."""
        for layer in self.layers:
            if not (layer.norm_first and layer.self_attn._qkv_same_embed_dim and layer.self_attn.batch_first):
                raise RuntimeError("incremental decoding expects pre-norm batch-first decoder layers")
        cross = [self._qkv(layer.multihead_attn, memory, slice(1, 3)) for layer in self.layers]
        return {"t": 0, "cross": cross, "self": [None] * len(self.layers)}

    def step(self, cache: dict[str, Any], tokens: Tensor) -> Tensor:
        """Logits (B, vocab) of the next token after ``tokens`` (B,), the newest input token;
        updates ``cache`` in place."""
        t = cache["t"]
        if t >= self.max_positions:
            raise ValueError(f"token sequence exceeds max_positions={self.max_positions}")
        x = self.token_embedding(tokens[:, None]) * self.scale + self.position_embedding.weight[t]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer.self_attn, layer.norm1(x), slice(0, 3))
            if cache["self"][i] is not None:
                k = torch.cat([cache["self"][i][0], k], dim=2)
                v = torch.cat([cache["self"][i][1], v], dim=2)
            cache["self"][i] = (k, v)
            x = x + layer.dropout1(self._attend(layer.self_attn, q, k, v))
            (qc,) = self._qkv(layer.multihead_attn, layer.norm2(x), slice(0, 1))
            kc, vc = cache["cross"][i]
            x = x + layer.dropout2(self._attend(layer.multihead_attn, qc, kc, vc))
            h = layer.norm3(x)
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(h)))))
        cache["t"] = t + 1
        return self._logits(x)[:, 0]

    @staticmethod
    def reorder_cache(cache: dict[str, Any], index: Tensor) -> None:
        """Keep the cache rows ``index`` (beam search), in place."""
        cache["self"] = [None if kv is None else (kv[0][index], kv[1][index]) for kv in cache["self"]]
        cache["cross"] = [(k[index], v[index]) for k, v in cache["cross"]]


class ClassificationHead(nn.Module):
    """Task 2: mean visual token -> (B, 14, 4) logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        out = N_OBSERVATIONS * N_STATES
        if cfg.cls_hidden:
            self.mlp = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.cls_hidden),
                                     nn.GELU(), nn.Linear(cfg.cls_hidden, out))
        else:
            self.mlp = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, out))

    def forward(self, memory: Tensor) -> Tensor:
        return self.mlp(memory.mean(dim=1)).reshape(-1, N_OBSERVATIONS, N_STATES)


class ContrastiveHead(nn.Module):
    """Task 3: image and report projections for InfoNCE, and the learned logit scale."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.image_proj = nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.proj_dim))
        self.word_embedding = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.proj_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.special = (cfg.pad_id, cfg.bos_id, cfg.eos_id)

    def scale(self) -> Tensor:
        """``s = exp(log_scale)`` clamped to at most 100 (as in CLIP)."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def embed_images(self, memory: Tensor) -> Tensor:
        return self.image_proj(memory.mean(dim=1))

    def embed_reports(self, tokens: Tensor) -> Tensor:
        keep = torch.ones_like(tokens, dtype=torch.bool)
        for s in self.special:
            keep &= tokens != s
        w = keep.to(self.word_embedding.weight.dtype).unsqueeze(-1)
        bag = (self.word_embedding(tokens) * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.text_proj(bag)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class RRGModel(nn.Module):
    """Shared image encoder, report decoder (task 1), classification head (task 2) and optional
    contrastive head (task 3). See the module docstring for the equations."""

    task_names_all = ("report", "classification", "contrastive")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.decoder = ReportDecoder(cfg)
        self.classifier = ClassificationHead(cfg)
        self.contrastive = ContrastiveHead(cfg) if cfg.contrastive else None

    # ---- parameter groups ------------------------------------------------------------------
    @property
    def task_names(self) -> tuple[str, ...]:
        return self.task_names_all[: 3 if self.contrastive is not None else 2]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The image encoder: read by every task."""
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """One list per task, in :attr:`task_names` order."""
        groups = [list(self.decoder.parameters()), list(self.classifier.parameters())]
        if self.contrastive is not None:
            groups.append(list(self.contrastive.parameters()))
        return groups

    # ---- forward pieces --------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Views (B, V, C, H, W) (or one view (B, C, H, W)) -> visual tokens (B, N, d)."""
        if images.dim() == 4:
            images = images.unsqueeze(1)
        if images.dim() != 5 or images.shape[2] != self.cfg.image_channels:
            raise ValueError(
                f"images must have shape (B, V, {self.cfg.image_channels}, H, W), got {tuple(images.shape)}"
            )
        return self.encoder(images)

    def report_logits(self, memory: Tensor, tokens: Tensor) -> Tensor:
        return self.decoder(memory, tokens)

    def class_logits(self, memory: Tensor) -> Tensor:
        return self.classifier(memory)

    def task_losses(self, memory: Tensor, tokens: Tensor, classes: Tensor) -> dict[str, Tensor]:
        """The task losses (float32 scalars) given the visual tokens.

        ``tokens`` (B, T) start with the begin-of-sequence token; the decoder reads
        ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``.
        """
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must have shape (B, T >= 2), got {tuple(tokens.shape)}")
        if tokens.shape[0] != memory.shape[0] or classes.shape[0] != memory.shape[0]:
            raise ValueError("images, tokens and classes have different batch sizes")
        logits = self.report_logits(memory, tokens[:, :-1])
        losses = {
            "report": report_loss(logits, tokens[:, 1:], self.cfg.pad_id, self.cfg.eos_id),
            "classification": classification_loss(self.class_logits(memory), classes),
        }
        if self.contrastive is not None:
            losses["contrastive"] = info_nce_loss(
                self.contrastive.embed_images(memory), self.contrastive.embed_reports(tokens),
                self.contrastive.scale(),
            )
        return losses

    def forward(self, images: Tensor, tokens: Tensor, classes: Tensor) -> dict[str, Tensor]:
        """Task losses of a batch; ``out["memory"]`` is the shared representation."""
        memory = self.encode(images)
        out = self.task_losses(memory, tokens, classes)
        out["memory"] = memory
        return out

    # ---- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict_classes(self, images: Tensor) -> Tensor:
        """Most likely state per observation (B, 14) in {0, 1, 2, 3}."""
        return self.class_logits(self.encode(images)).argmax(-1)

    @torch.no_grad()
    def generate(self, images: Tensor, max_length: int = 60, beam_size: int = 1,
                 length_penalty: float = 0.0) -> list[list[int]]:
        """Report token ids per study (without begin/end tokens).

        ``beam_size=1`` is greedy decoding (the arg-max token at every step); larger beams keep
        the ``beam_size`` best partial reports by summed log-probability and return the best
        finished one by ``score / length**length_penalty``.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if max_length + 1 > self.cfg.max_positions:
            raise ValueError(f"max_length={max_length} needs max_positions > {max_length}")
        memory = self.encode(images)
        if beam_size == 1:
            return self._greedy(memory, max_length)
        return self._beam(memory, max_length, beam_size, length_penalty)

    def _strip(self, seq: list[int]) -> list[int]:
        out = []
        for t in seq:
            if t == self.cfg.eos_id:
                break
            out.append(t)
        return out

    def _greedy(self, memory: Tensor, max_length: int) -> list[list[int]]:
        B = memory.shape[0]
        cache = self.decoder.start_cache(memory)
        last = torch.full((B,), self.cfg.bos_id, dtype=torch.long, device=memory.device)
        out = []
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        for _ in range(max_length):
            nxt = self.decoder.step(cache, last).float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.cfg.eos_id), nxt)
            out.append(nxt)
            last = nxt
            done |= nxt == self.cfg.eos_id
            if bool(done.all()):
                break
        seqs = torch.stack(out, dim=1).tolist()
        return [self._strip(row) for row in seqs]

    def _beam(self, memory: Tensor, max_length: int, k: int, alpha: float) -> list[list[int]]:
        B, dev, V = memory.shape[0], memory.device, self.cfg.vocab_size
        eos = self.cfg.eos_id
        cache = self.decoder.start_cache(memory.repeat_interleave(k, dim=0))
        seqs = torch.full((B * k, 1), self.cfg.bos_id, dtype=torch.long, device=dev)
        scores = torch.full((B, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: keep one
        done = torch.zeros(B * k, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B * k, device=dev)
        base = (torch.arange(B, device=dev) * k)[:, None]
        for _ in range(max_length):
            logp = F.log_softmax(self.decoder.step(cache, seqs[:, -1]).float(), dim=-1)
            # A finished beam only extends with end tokens at no cost.
            frozen = torch.full_like(logp, float("-inf"))
            frozen[:, eos] = 0.0
            logp = torch.where(done[:, None], frozen, logp)
            cand = (scores.reshape(B * k, 1) + logp).reshape(B, k * V)
            scores, idx = cand.topk(k, dim=1)
            src = (base + idx // V).reshape(-1)
            tok = (idx % V).reshape(-1)
            seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
            self.decoder.reorder_cache(cache, src)
            lengths = lengths[src] + (~done[src]).float()
            done = done[src] | (tok == eos)
            if bool(done.all()):
                break
        final = scores.reshape(-1) / lengths.clamp(min=1.0) ** alpha if alpha else scores.reshape(-1)
        best = final.reshape(B, k).argmax(dim=1)
        chosen = seqs[(base[:, 0] + best)]
        return [self._strip(row[1:]) for row in chosen.tolist()]

    def n_parameters(self) -> dict[str, int]:
        """Parameter counts per part and in total."""
        parts = {"encoder": self.encoder, "decoder": self.decoder, "classifier": self.classifier}
        if self.contrastive is not None:
            parts["contrastive"] = self.contrastive
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        counts["total"] = sum(counts.values())
        return counts
