"""Structured pruning of LLaMA-family models at LLM-Pruner fidelity.

Method (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023):
parameters that must be removed together form a *group*; each group gets an importance score
(:mod:`qpruner.group_importance`: L1/L2 magnitude, random, vector-wise Taylor, element-wise first and
second order Taylor and their mix, computed on calibration text) and the lowest-scoring groups go.

Scopes (``prune.scope``):

* ``block`` (default): attention heads and MLP channels of the layers in ``[layer_start, layer_end)``
  (first and last layers kept by default, as LLM-Pruner does). Attention is GQA-aware: a KV head goes
  together with the ``heads // kv_heads`` query heads that read it (their q_proj rows and o_proj
  columns, and q/k/v biases where the model has them), so the GQA ratio and rotary dimensions of
  the kept heads are untouched. An MLP channel is a gate/up row with its down_proj column.
* ``channel``: hidden (residual-stream) channels, across embeddings, every projection, every norm
  and lm_head (tied embeddings stay tied). Norm weights and eps are rescaled so the pruned model
  equals the original with those channels zeroed (see :func:`qpruner.surgery.prune_hidden_`).
* ``layer``: whole decoder layers within the range.

Ranking (``prune.ranking``): ``local`` removes the same fraction in every pruned layer;
``global`` ranks the groups of all pruned layers together (at least one KV group and ``round_to``
MLP channels stay in each layer). Kept MLP and hidden widths are rounded to a multiple of
``round_to`` (32 by default: kernel-friendly, and avoids a bitsandbytes CPU repacking restriction).

How much: ``prune.ratio`` is the fraction of groups removed (per layer when local); alternatively
``prune.param_ratio`` asks for a fraction of *all* parameters removed, and the group ratio that
comes closest is found by bisection on the closed-form parameter count.

Where we differ from LLM-Pruner: no dependency-graph library (the groups of these layouts are
written out in :mod:`qpruner.models`), GQA groups are pruned whole, hidden-channel pruning is exact
with respect to masking, and the result is saved as safetensors that plain ``transformers`` loads
(:mod:`qpruner.pruned_model`) instead of a pickled module.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import models, surgery
from .progress import Progress
from .config import PruneConfig
from .errors import ConfigError
from .models import LayerWidth
from .group_importance import SECOND_ORDER, FIRST_ORDER, accumulate_gradients, group_scores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneReport:
    """What pruning did: amounts, widths before and after, parameter counts and time."""
    importance: str
    scope: str
    ranking: str
    ratio: float                            # group ratio used
    layers: tuple[int, int]                 # pruned layer range [start, end)
    params_before: int
    params_after: int
    widths_before: tuple[LayerWidth, ...]
    widths_after: tuple[LayerWidth, ...]
    hidden_before: int = 0
    hidden_after: int = 0
    removed_layers: tuple[int, ...] = ()
    calib_shape: tuple[int, int] = (0, 0)
    seconds: float = 0.0

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def summary(self) -> str:
        what = {"block": f"layers {self.layers[0]}..{self.layers[1] - 1}",
                "channel": f"hidden {self.hidden_before} -> {self.hidden_after}",
                "layer": f"removed layers {list(self.removed_layers)}"}[self.scope]
        return (f"pruned {what} ({self.scope}, {self.ranking}, {self.importance}, group ratio {self.ratio:.3f}): "
                f"{self.params_before:,} -> {self.params_after:,} parameters "
                f"({100 * self.removed_fraction:.1f}% removed{self.removed_parts()}) in {self.seconds:.1f}s")

    def removed_parts(self) -> str:
        """What went, in the units the model has: KV groups (with their query heads) and MLP channels."""
        if self.scope != "block":   # layer scope drops layers (widths no longer pair up); channel scope: hidden
            return ""
        start, end = self.layers
        pairs = list(zip(self.widths_before, self.widths_after))[start:end]
        kv = [(b.kv_heads, a.kv_heads) for b, a in pairs]
        ch = [(b.intermediate, a.intermediate) for b, a in pairs]
        kv_gone, kv_all = sum(b - a for b, a in kv), sum(b for b, _ in kv)
        ch_gone, ch_all = sum(b - a for b, a in ch), sum(b for b, _ in ch)
        if not (kv_gone or ch_gone):
            return ""
        return (f": {kv_gone} of {kv_all} KV groups ({100 * kv_gone / kv_all:.1f}% of attention) and "
                f"{ch_gone:,} of {ch_all:,} MLP channels ({100 * ch_gone / ch_all:.1f}%) in the pruned layers")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneReport":
        d = dict(d)
        for key in ("widths_before", "widths_after"):
            d[key] = tuple(LayerWidth(**w) if isinstance(w, dict) else LayerWidth(*w) for w in d[key])
        for key in ("layers", "removed_layers", "calib_shape"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)


@dataclass
class GroupScores:
    """Scores of every prunable group, by kind (higher = more important)."""
    attention: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [kv_heads]
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)         # layer -> [intermediate]
    hidden: torch.Tensor | None = None                                 # [hidden_size]
    layers: dict[int, float] = field(default_factory=dict)             # layer -> score


@dataclass(frozen=True)
class Selection:
    """What stays. ``None`` / missing layer = unchanged."""
    keep_kv: dict[int, torch.Tensor]
    keep_channels: dict[int, torch.Tensor]
    keep_hidden: torch.Tensor | None = None
    keep_layers: tuple[int, ...] | None = None


def layer_range(cfg: PruneConfig, n_layers: int) -> tuple[int, int]:
    """The pruned layers ``[start, end)`` of ``cfg`` on a model with ``n_layers`` layers."""
    start = cfg.layer_start + n_layers if cfg.layer_start < 0 else cfg.layer_start
    end = cfg.layer_end + n_layers if cfg.layer_end < 0 else cfg.layer_end
    if not 0 <= start <= end <= n_layers:
        raise ConfigError([f"prune.layer_start={cfg.layer_start}, prune.layer_end={cfg.layer_end} give "
                           f"layers [{start}, {end}) but the model has {n_layers} layers"])
    return start, end


# ----------------------------------------------------------------------------------------------
# scoring


def _parts_in_scope(model: nn.Module, cfg: PruneConfig, start: int, end: int):
    layers = models.decoder_layers(model)
    if cfg.scope == "channel":
        return {"hidden": surgery.hidden_parts(model)}
    if cfg.scope == "layer":
        return {f"layer{i}": surgery.layer_parts(layers[i]) for i in range(start, end)}
    out = {}
    for i in range(start, end):
        if cfg.attention:
            out[f"attention{i}"] = surgery.attention_parts(layers[i], model.config)
        if cfg.mlp:
            out[f"mlp{i}"] = surgery.mlp_parts(layers[i])
    return out


def score_groups(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, *, seed: int = 0) -> GroupScores:
    """Importance of every group in scope (gradients computed once, then freed)."""
    start, end = layer_range(cfg, len(models.decoder_layers(model)))
    parts = _parts_in_scope(model, cfg, start, end)
    fisher = None
    if cfg.importance in FIRST_ORDER | SECOND_ORDER:
        params = list({id(p.param): p.param for ps in parts.values() for p in ps}.values())
        fisher = accumulate_gradients(model, calib, cfg.batch_size, params, fisher=cfg.importance in SECOND_ORDER,
                                      what=f"pruning: {cfg.importance} importance, gradient pass")
    gen = torch.Generator().manual_seed(seed)
    scores = GroupScores()
    progress = Progress(logger, f"pruning: {cfg.importance} scores of the groups", len(parts), unit="groups")
    with torch.no_grad():
        for key, ps in parts.items():
            s = group_scores(ps, cfg.importance, cfg.aggregation, fisher, gen)
            progress.step()
            if key == "hidden":
                scores.hidden = s
            elif key.startswith("attention"):
                scores.attention[int(key[9:])] = s
            elif key.startswith("mlp"):
                scores.mlp[int(key[3:])] = s
            else:
                scores.layers[int(key[5:])] = float(s[0])
    model.zero_grad(set_to_none=True)
    return scores


# ----------------------------------------------------------------------------------------------
# selecting


def _round(count: float, multiple: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, multiple * math.floor(count / multiple + 0.5)))


def kept_counts(width: LayerWidth, cfg: PruneConfig, ratio: float | None = None) -> tuple[int, int]:
    """(KV groups, MLP channels) kept in a layer under local ranking."""
    ratio = cfg.ratio if ratio is None else ratio
    kv = width.kv_heads
    if cfg.attention and ratio > 0:
        kv = max(1, width.kv_heads - math.floor(ratio * width.kv_heads + 0.5))
    ch = width.intermediate
    if cfg.mlp and ratio > 0:
        ch = _round(width.intermediate * (1.0 - ratio), cfg.round_to, min(cfg.round_to, width.intermediate),
                    width.intermediate)
    return kv, ch


def narrowest_widths(widths: tuple[LayerWidth, ...], cfg: PruneConfig) -> tuple[LayerWidth, ...] | None:
    """The narrowest layers pruning with ``cfg`` can leave, known before any scoring: exact under local
    ranking with a fixed ``ratio``; a floor otherwise (global ranking and ``param_ratio`` keep at least
    one KV group and ``round_to`` channels per layer). ``None`` where pruning can narrow the hidden size
    or drop whole layers (``scope`` channel / layer): no floor on the layer shapes then."""
    if cfg.scope != "block":
        return None
    start, end = layer_range(cfg, len(widths))
    out = []
    for i, w in enumerate(widths):
        if not start <= i < end:
            out.append(w)
            continue
        if cfg.param_ratio == 0:
            kv, ch = w.kv_heads, w.intermediate
        elif cfg.ranking == "local" and cfg.param_ratio is None:
            kv, ch = kept_counts(w, cfg)
        else:
            kv = 1 if cfg.attention else w.kv_heads
            ch = min(cfg.round_to, w.intermediate) if cfg.mlp else w.intermediate
        out.append(LayerWidth(heads=w.heads // w.kv_heads * kv, kv_heads=kv, intermediate=ch))
    return tuple(out)


def attention_rounding(widths: tuple[LayerWidth, ...], cfg: PruneConfig, ratio: float) -> str | None:
    """A note when a model's KV-group count cannot meet ``ratio`` in attention (GQA: e.g. 3 groups, so
    0.2 removes 1 = 33%): what it removes, and the amounts it can meet exactly. ``None`` when exact."""
    if not cfg.attention or cfg.scope != "block" or ratio <= 0 or cfg.param_ratio is not None:
        return None   # param_ratio: the solved ratio aims at the share of all parameters, not of the groups
    start, end = layer_range(cfg, len(widths))
    counts = sorted({w.kv_heads for w in widths[start:end]})
    notes = []
    for kv in counts:
        removed = kv - max(1, kv - math.floor(ratio * kv + 0.5)) if cfg.ranking == "local" else None
        if removed is not None and abs(removed / kv - ratio) > 1e-9:
            exact = ", ".join(f"{100 * k / kv:.1f}%" for k in range(kv))
            notes.append(f"{kv} KV groups per layer cannot lose {100 * ratio:.1f}%: ratio {ratio:g} removes "
                         f"{removed} ({100 * removed / kv:.1f}% of attention); exact amounts: {exact}")
    return "; ".join(notes) or None


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def _global_counts(per_layer: dict[int, torch.Tensor], ratio: float, minimum: int, multiple: int) -> dict[int, int]:
    """Kept counts per layer when the lowest ``ratio`` of all groups (pooled) are removed."""
    pooled = sorted((float(v), layer) for layer, s in per_layer.items() for v in s)
    counts = {layer: len(s) for layer, s in per_layer.items()}
    budget = math.floor(ratio * len(pooled) + 0.5)
    for _, layer in pooled:
        if budget == 0:
            break
        if counts[layer] > minimum:
            counts[layer] -= 1
            budget -= 1
    return {layer: _round(c, multiple, min(minimum, len(per_layer[layer])), len(per_layer[layer]))
            for layer, c in counts.items()}


def select(scores: GroupScores, model: nn.Module, cfg: PruneConfig, ratio: float) -> Selection:
    """The groups to keep for a group ``ratio``."""
    widths = models.layer_widths(model)
    keep_kv, keep_ch = {}, {}
    if cfg.scope == "block" and ratio > 0:
        if cfg.ranking == "global":
            kv_counts = _global_counts(scores.attention, ratio, 1, 1)
            ch_counts = _global_counts(scores.mlp, ratio, cfg.round_to, cfg.round_to)
        else:
            kv_counts = {i: kept_counts(widths[i], cfg, ratio)[0] for i in scores.attention}
            ch_counts = {i: kept_counts(widths[i], cfg, ratio)[1] for i in scores.mlp}
        keep_kv = {i: _top(scores.attention[i], k) for i, k in kv_counts.items() if k < widths[i].kv_heads}
        keep_ch = {i: _top(scores.mlp[i], k) for i, k in ch_counts.items() if k < widths[i].intermediate}
        return Selection(keep_kv, keep_ch)
    if cfg.scope == "channel" and ratio > 0:
        h = scores.hidden.numel()
        kept = _round(h * (1.0 - ratio), cfg.round_to, min(cfg.round_to, h), h)
        return Selection({}, {}, keep_hidden=_top(scores.hidden, kept) if kept < h else None)
    if cfg.scope == "layer" and ratio > 0:
        ranked = sorted(scores.layers, key=lambda i: scores.layers[i])
        drop = set(ranked[: math.floor(ratio * len(ranked) + 0.5)])
        return Selection({}, {}, keep_layers=tuple(i for i in range(len(widths)) if i not in drop))
    return Selection({}, {})


def params_after(model: nn.Module, sel: Selection) -> int:
    """Closed-form parameter count of ``model`` after applying ``sel``."""
    widths = []
    for i, w in enumerate(models.layer_widths(model)):
        if sel.keep_layers is not None and i not in sel.keep_layers:
            continue
        kv = len(sel.keep_kv[i]) if i in sel.keep_kv else w.kv_heads
        heads = kv * (w.heads // w.kv_heads)
        inter = len(sel.keep_channels[i]) if i in sel.keep_channels else w.intermediate
        widths.append(LayerWidth(heads, kv, inter))
    hidden = len(sel.keep_hidden) if sel.keep_hidden is not None else None
    return models.param_count(model, widths, hidden)


def solve_ratio(scores: GroupScores, model: nn.Module, cfg: PruneConfig, target: float) -> float:
    """The group ratio whose selection removes the fraction of parameters closest to ``target``."""
    total = models.count_params(model)
    removed = lambda r: 1.0 - params_after(model, select(scores, model, cfg, r)) / total
    lo, hi = 0.0, 0.99
    best = min((lo, hi), key=lambda r: abs(removed(r) - target))
    for _ in range(40):
        mid = (lo + hi) / 2
        got = removed(mid)
        if abs(got - target) < abs(removed(best) - target):
            best = mid
        lo, hi = (mid, hi) if got < target else (lo, mid)
    return best


def apply_(model: nn.Module, sel: Selection) -> None:
    """Physically remove what ``sel`` does not keep; the model gets its pruned config class."""
    layers = models.decoder_layers(model)
    for i in sorted(set(sel.keep_kv) | set(sel.keep_channels)):
        surgery.prune_layer_(layers[i], model.config, sel.keep_kv.get(i), sel.keep_channels.get(i))
    if sel.keep_hidden is not None:
        surgery.prune_hidden_(model, sel.keep_hidden)
    if sel.keep_layers is not None:
        surgery.drop_layers_(model, list(sel.keep_layers))
    surgery.to_pruned_(model)


def prune_(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, *, seed: int = 0) -> PruneReport:
    """Score, select and remove groups of ``model`` in place; return a report."""
    t0 = time.perf_counter()
    n_layers = len(models.decoder_layers(model))
    start, end = layer_range(cfg, n_layers)
    widths_before = models.layer_widths(model)
    params_before = models.count_params(model)
    hidden_before = model.config.hidden_size
    nothing = cfg.param_ratio == 0 or (cfg.param_ratio is None and cfg.ratio == 0)
    if nothing or cfg.scope == "block" and not (cfg.attention or cfg.mlp):
        sel, ratio = Selection({}, {}), 0.0
    else:
        scores = score_groups(model, calib, cfg, seed=seed)
        ratio = cfg.ratio if cfg.param_ratio is None else solve_ratio(scores, model, cfg, cfg.param_ratio)
        sel = select(scores, model, cfg, ratio)
        note = attention_rounding(widths_before, cfg, ratio)
        if note:
            logger.warning("prune.ratio: %s (MLP channels follow the ratio; prune.param_ratio sets the share "
                           "of all parameters instead)", note)
    predicted = params_after(model, sel)
    apply_(model, sel)
    report = PruneReport(
        importance=cfg.importance, scope=cfg.scope, ranking=cfg.ranking, ratio=ratio, layers=(start, end),
        params_before=params_before, params_after=models.count_params(model),
        widths_before=widths_before, widths_after=models.layer_widths(model),
        hidden_before=hidden_before, hidden_after=model.config.hidden_size,
        removed_layers=tuple(i for i in range(n_layers) if sel.keep_layers is not None and i not in sel.keep_layers),
        calib_shape=tuple(calib.shape), seconds=time.perf_counter() - t0)
    if report.params_after != predicted:  # the closed form is part of the contract; say so if it breaks
        logger.warning("pruned model has %d parameters, closed form predicted %d", report.params_after, predicted)
    logger.info(report.summary())
    return report
