"""Structured pruning of attention heads and MLP channels (LLM-Pruner style).

Method (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023):
parameters that must be removed together form a *group*; a group is scored by the sum of the
importance of its elements and the lowest-scoring groups are removed. Element importance:

* ``taylor`` (default; LLM-Pruner's element-wise first order, ``param_first``):
  ``I(w) = |w * dL/dw|``, the first-order estimate of the loss change when ``w`` is set to zero,
  with ``dL/dw`` the gradient of the mean language-modelling loss over the calibration samples;
* ``l2``: ``w**2`` (magnitude baseline);
* ``random``: a seeded random score per group (baseline).

Groups, per decoder layer in ``[layer_start, layer_end)`` (first and last layers are kept by
default, as LLM-Pruner does):

* attention, GQA-aware: one KV head together with the ``heads // kv_heads`` query heads that read it
  (their q_proj rows, the KV head's k_proj/v_proj rows, and the matching o_proj columns), so the GQA
  ratio and the rotary dimensions of the kept heads are untouched;
* MLP channel ``c``: row ``c`` of gate_proj and up_proj and column ``c`` of down_proj.

Ratio (local, the same in every pruned layer): ``round(ratio * kv_heads)`` KV groups and
``ratio * intermediate`` channels are removed; the kept MLP width is rounded to a multiple of
``round_to`` (32 by default: kernel-friendly, and avoids a bitsandbytes CPU repacking restriction).
At least one KV group and ``round_to`` channels stay.

Where we differ from LLM-Pruner: no dependency graph library (the groups of a Llama layer are
written out explicitly), GQA groups are pruned whole, and the result keeps the stock Hugging Face
classes with per-layer widths in the config instead of a pickled module.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .config import PruneConfig
from .errors import ConfigError
from .models import LayerWidth

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneReport:
    importance: str
    ratio: float
    layers: tuple[int, int]                 # pruned layer range [start, end)
    params_before: int
    params_after: int
    widths_before: tuple[LayerWidth, ...]
    widths_after: tuple[LayerWidth, ...]
    seconds: float

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def summary(self) -> str:
        return (f"pruned layers {self.layers[0]}..{self.layers[1] - 1} with {self.importance} importance: "
                f"{self.params_before:,} -> {self.params_after:,} parameters "
                f"({100 * self.removed_fraction:.1f}% removed) in {self.seconds:.1f}s")


def layer_range(cfg: PruneConfig, n_layers: int) -> tuple[int, int]:
    start = cfg.layer_start + n_layers if cfg.layer_start < 0 else cfg.layer_start
    end = cfg.layer_end + n_layers if cfg.layer_end < 0 else cfg.layer_end
    if not 0 <= start <= end <= n_layers:
        raise ConfigError([f"prune.layer_start={cfg.layer_start}, prune.layer_end={cfg.layer_end} give "
                           f"layers [{start}, {end}) but the model has {n_layers} layers"])
    return start, end


def _batches(calib: torch.Tensor, batch_size: int):
    return calib.split(batch_size)


def accumulate_gradients(model: nn.Module, calib: torch.Tensor, batch_size: int = 4,
                         params: list[nn.Parameter] | None = None) -> None:
    """Fill ``.grad`` of ``params`` (default: all decoder-linear weights) with the gradient of the
    mean LM loss over ``calib``. Other parameters do not get gradients (saves memory and time)."""
    device = next(model.parameters()).device
    wanted = {id(p) for p in params} if params is not None else {
        id(m.weight) for layer in models.decoder_layers(model) for m in models.layer_linears(layer).values()}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    try:
        n = calib.shape[0]
        for batch in _batches(calib, batch_size):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch).loss * (batch.shape[0] / n)
            loss.backward()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


def _salience(weight: torch.Tensor, method: str) -> torch.Tensor:
    if method == "taylor":
        if weight.grad is None:
            raise RuntimeError("taylor importance needs gradients; call accumulate_gradients first")
        return (weight.data.float() * weight.grad.float()).abs()
    return weight.data.float() ** 2  # l2


def group_scores(layer: nn.Module, config, method: str, gen: torch.Generator | None = None):
    """(KV-group scores [kv_heads], MLP-channel scores [intermediate]) of one decoder layer."""
    lin = models.layer_linears(layer)
    hd = models.head_dim(config)
    kv = lin["k_proj"].out_features // hd
    inter = lin["gate_proj"].out_features
    if method == "random":
        return torch.rand(kv, generator=gen), torch.rand(inter, generator=gen)
    s = {name: _salience(m.weight, method) for name, m in lin.items()}
    attn = (s["q_proj"].reshape(kv, -1).sum(1) + s["k_proj"].reshape(kv, -1).sum(1)
            + s["v_proj"].reshape(kv, -1).sum(1)
            + s["o_proj"].reshape(s["o_proj"].shape[0], kv, -1).sum((0, 2)))
    mlp = s["gate_proj"].sum(1) + s["up_proj"].sum(1) + s["down_proj"].sum(0)
    return attn.cpu(), mlp.cpu()


def kept_counts(width: LayerWidth, cfg: PruneConfig) -> tuple[int, int]:
    """(KV groups, MLP channels) kept in a pruned layer for the configured ratio and rounding."""
    kv = width.kv_heads
    if cfg.attention:
        kv = max(1, width.kv_heads - math.floor(cfg.ratio * width.kv_heads + 0.5))
    ch = width.intermediate
    if cfg.mlp and cfg.ratio > 0:
        target = width.intermediate * (1.0 - cfg.ratio)
        ch = cfg.round_to * max(1, math.floor(target / cfg.round_to + 0.5))
        ch = min(ch, width.intermediate)
    return kv, ch


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def prune_(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, *, batch_size: int = 4,
           seed: int = 0) -> PruneReport:
    """Prune ``model`` in place; record the new widths in its config; return a report."""
    t0 = time.perf_counter()
    layers = models.decoder_layers(model)
    start, end = layer_range(cfg, len(layers))
    widths_before = models.layer_widths(model)
    params_before = models.count_params(model)
    if cfg.importance == "taylor" and cfg.ratio > 0:
        accumulate_gradients(model, calib, batch_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(start, end):
            if cfg.ratio == 0 or not (cfg.attention or cfg.mlp):
                break
            kv_keep, ch_keep = kept_counts(widths_before[i], cfg)
            attn, mlp = group_scores(layers[i], model.config, cfg.importance, gen)
            keep_kv = _top(attn, kv_keep) if kv_keep < widths_before[i].kv_heads else None
            keep_ch = _top(mlp, ch_keep) if ch_keep < widths_before[i].intermediate else None
            models.prune_layer_(layers[i], model.config, keep_kv, keep_ch)
    model.zero_grad(set_to_none=True)
    models.record_widths(model)
    report = PruneReport(importance=cfg.importance, ratio=cfg.ratio, layers=(start, end),
                         params_before=params_before, params_after=models.count_params(model),
                         widths_before=widths_before, widths_after=models.layer_widths(model),
                         seconds=time.perf_counter() - t0)
    logger.info(report.summary())
    return report
