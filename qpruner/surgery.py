"""Pruning surgery: the coupled parameter groups of a decoder layer (KV groups with their query heads,
MLP channels, hidden channels, whole layers) and the in-place cuts that remove them. Scoring and
selecting what to cut is :mod:`qpruner.prune`'s job; :mod:`qpruner.models` knows where Hugging Face
keeps each module (this file asks it, never the attribute names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import LayerWidth, decoder_layers, head_dim, layer_linears, layer_widths, set_layer_linear


@dataclass(frozen=True)
class Coupled:
    """A parameter's share in a grouping: ``n`` equal blocks along ``dim``; block ``j`` is group ``j``'s."""
    param: nn.Parameter
    dim: int
    n: int


def to_pruned_(model: nn.Module, **config_changes) -> nn.Module:
    """Give ``model`` the pruned config/model class (:mod:`qpruner.pruned_model`) describing its
    current per-layer widths, so it can be saved, reloaded and rebuilt by :func:`build_model`."""
    from .pruned_model import adopt_, pruned_config
    widths = [[w.heads, w.kv_heads, w.intermediate] for w in layer_widths(model)]
    return adopt_(model, pruned_config(model.config, widths, **config_changes))


def _with_bias(parts: list[Coupled], lin: nn.Module, dim: int, n: int) -> list[Coupled]:
    return parts + ([Coupled(lin.bias, 0, n)] if dim == 0 and lin.bias is not None else [])


def attention_parts(layer: nn.Module, config) -> list[Coupled]:
    """KV groups of a layer: q/k/v rows (and biases) and o_proj columns of each KV head's group."""
    lin = layer_linears(layer)
    kv = lin["k_proj"].out_features // head_dim(config)
    parts: list[Coupled] = []
    for name in ("q_proj", "k_proj", "v_proj"):
        parts = _with_bias(parts + [Coupled(lin[name].weight, 0, kv)], lin[name], 0, kv)
    return parts + [Coupled(lin["o_proj"].weight, 1, kv)]


def mlp_parts(layer: nn.Module) -> list[Coupled]:
    """MLP channels of a layer: gate/up rows (and biases) and down_proj columns."""
    lin = layer_linears(layer)
    n = lin["gate_proj"].out_features
    parts: list[Coupled] = []
    for name in ("gate_proj", "up_proj"):
        parts = _with_bias(parts + [Coupled(lin[name].weight, 0, n)], lin[name], 0, n)
    return parts + [Coupled(lin["down_proj"].weight, 1, n)]


def hidden_parts(model: nn.Module) -> list[Coupled]:
    """Hidden channels: every parameter that reads or writes the residual stream, sliced per channel."""
    h = model.config.hidden_size
    emb = model.get_input_embeddings()
    parts = [Coupled(emb.weight, 1, h)]
    for layer in decoder_layers(model):
        for name, lin in layer_linears(layer).items():
            writes = name in ("o_proj", "down_proj")
            parts = _with_bias(parts + [Coupled(lin.weight, 0 if writes else 1, h)], lin, 0 if writes else 1, h)
    parts += [Coupled(norm.weight, 0, h) for norm in _norms(model)]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        parts.append(Coupled(head.weight, 1, h))
    return parts


def layer_parts(layer: nn.Module) -> list[Coupled]:
    """A whole decoder layer as one group."""
    return [Coupled(p, 0, 1) for p in layer.parameters()]








def _sliced_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.data if rows is None else lin.bias.data.index_select(0, rows.to(w.device))
        new.bias.data.copy_(b)
    return new


def prune_layer_(layer: nn.Module, config, keep_kv: torch.Tensor | None,
                 keep_channels: torch.Tensor | None) -> LayerWidth:
    """Physically remove KV groups (with their query heads and o_proj columns) and MLP channels.

    ``keep_kv`` lists the KV heads to keep (sorted); each keeps its ``heads // kv_heads`` query
    heads, so the GQA ratio of the layer is unchanged. ``keep_channels`` lists MLP channels to keep.
    """
    hd = head_dim(config)
    lin = layer_linears(layer)
    if keep_kv is not None:
        kv = lin["k_proj"].out_features // hd
        group = (lin["q_proj"].out_features // hd) // kv
        kv_rows = (keep_kv[:, None] * hd + torch.arange(hd)).reshape(-1)
        q_heads = (keep_kv[:, None] * group + torch.arange(group)).reshape(-1)
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        set_layer_linear(layer, "q_proj", _sliced_linear(lin["q_proj"], q_rows, None))
        set_layer_linear(layer, "k_proj", _sliced_linear(lin["k_proj"], kv_rows, None))
        set_layer_linear(layer, "v_proj", _sliced_linear(lin["v_proj"], kv_rows, None))
        set_layer_linear(layer, "o_proj", _sliced_linear(lin["o_proj"], None, q_rows))
    if keep_channels is not None:
        set_layer_linear(layer, "gate_proj", _sliced_linear(lin["gate_proj"], keep_channels, None))
        set_layer_linear(layer, "up_proj", _sliced_linear(lin["up_proj"], keep_channels, None))
        set_layer_linear(layer, "down_proj", _sliced_linear(lin["down_proj"], None, keep_channels))
    lin = layer_linears(layer)
    return LayerWidth(lin["q_proj"].out_features // hd, lin["k_proj"].out_features // hd,
                      lin["gate_proj"].out_features)


def _norms(model: nn.Module) -> list[nn.Module]:
    """Every RMSNorm that normalises the residual stream (two per layer, and the final one)."""
    out = []
    for layer in decoder_layers(model):
        out += [layer.input_layernorm, layer.post_attention_layernorm]
    return out + [model.model.norm]


def prune_hidden_(model: nn.Module, keep: torch.Tensor) -> int:
    """Remove hidden (residual-stream) channels not in ``keep`` from every module that reads or writes
    them: embeddings, every projection, every norm and lm_head. Returns the new hidden size.

    RMSNorm averages over the hidden size, so the norms of the pruned model would see a mean over
    fewer channels than the original model with those channels zeroed. Scaling each norm weight by
    ``sqrt(H / H')`` and ``rms_norm_eps`` by ``H / H'`` makes the pruned model compute exactly what
    the masked original computes.
    """
    keep = keep.sort().values
    model.config.head_dim = head_dim(model.config)  # explicit from now on: H' need not divide by heads
    old, new = model.config.hidden_size, int(keep.numel())
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight.data.index_select(1, keep.to(emb.weight.device)).clone())
    emb.embedding_dim = new
    for layer in decoder_layers(model):
        for name, lin in layer_linears(layer).items():
            rows, cols = (keep, None) if name in ("o_proj", "down_proj") else (None, keep)
            set_layer_linear(layer, name, _sliced_linear(lin, rows, cols))
    scale = (old / new) ** 0.5
    for norm in _norms(model):
        norm.weight = nn.Parameter(norm.weight.data.index_select(0, keep.to(norm.weight.device)) * scale)
        if hasattr(norm, "variance_epsilon"):
            norm.variance_epsilon = norm.variance_epsilon * old / new
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(head.weight.data.index_select(1, keep.to(head.weight.device)).clone())
        head.in_features = new
    model.config.hidden_size = new
    model.config.rms_norm_eps = model.config.rms_norm_eps * old / new
    return new


def drop_layers_(model: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep`` (in order); re-index them for the KV cache."""
    layers = decoder_layers(model)
    kept = [layers[i] for i in keep]
    types = getattr(model.config, "layer_types", None)
    for new_idx, layer in enumerate(kept):
        for module in (layer, layer.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    model.model.layers = nn.ModuleList(kept)
    model.config.num_hidden_layers = len(kept)
    if types is not None:
        model.config.layer_types = [types[i] for i in keep]
