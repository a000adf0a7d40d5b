"""Exact weight memory of a quantized model, and memory budgets.

Weight bytes count every tensor a quantized model holds for its weights (bitsandbytes 0.50). For a
weight of ``n`` elements and ``out`` rows:

==========  =====================================================================================
format      bytes
==========  =====================================================================================
``nf4``,    packed ``ceil(n/2)`` + 16-entry fp32 code table (64) + per-block absmax: with double
``fp4``     quantization ``ceil(n/B)`` uint8 + fp32 absmax per 256 blocks + 256-entry fp32 code
            table (1024) + fp32 offset (4); without it ``4 * ceil(n/B)`` (B = block size, 64)
``int8``    ``n`` + fp32 row scale per row ``4 * out`` (``SCB``; LLM.int8() outliers are dynamic)
``bf16``    ``2n``; ``fp32`` ``4n``
==========  =====================================================================================

(1024x1024: nf4 542,020 B with double quantization, 589,888 B without; int8 1,052,672 B; bf16
2,097,152 B.) Biases are stored in the compute dtype for quantized layers and in bf16 for bf16
layers. Embeddings and lm_head follow ``quant.embeddings`` / ``quant.lm_head``: ``rest`` stores
them in ``quant.rest_dtype`` (tied embeddings once), ``int8`` as bitsandbytes ``Embedding8bit`` /
``Linear8bitLt``, ``nf4``/``fp4`` as ``Embedding4bit`` (no double quantization) / ``Linear4bit``; a
tied pair with either quantized is stored as two tensors. Norms and all else are in ``rest_dtype``.

:func:`plan_bytes` predicts these numbers from a :class:`ModelLayout` and a plan without building
anything; :func:`measure_bytes` sums the real tensors of a quantized model. Tests hold them equal to
the byte. Average bits: ``8 * bytes of decoder-linear weights (with quantization statistics, without
biases) / number of those weights`` (nf4 with double quantization 4.13, int8 8.03, bf16 16).
"""

from __future__ import annotations

import math
from typing import Any
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from . import models
from .config import LINEAR_NAMES, QuantConfig
from .errors import PlanError
from .plan import PrecisionPlan

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NESTED_BLOCKSIZE = 256
GB = 1e9


@dataclass(frozen=True)
class LinearShape:
    """Shape of one linear layer (and whether it has a bias)."""
    out_features: int
    in_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelLayout:
    """The shapes that decide weight memory: each decoder layer's seven linears (in
    ``LINEAR_NAMES`` order), the embeddings, the output head and everything else."""
    layers: tuple[tuple[LinearShape, ...], ...]
    vocab: int
    hidden: int
    tied: bool
    head_bias: bool
    other_numel: int  # norms and anything that is neither a decoder linear, nor embeddings, nor lm_head

    @classmethod
    def from_model(cls, model: Any) -> "ModelLayout":   # a Hugging Face causal LM
        layers: list[tuple[LinearShape, ...]] = []
        seen: set[int] = set()
        for layer in models.decoder_layers(model):
            lin: dict[str, Any] = models.layer_linears(layer)
            layers.append(tuple(LinearShape(lin[n].out_features, lin[n].in_features, lin[n].bias is not None)
                                for n in LINEAR_NAMES))
            seen.update(id(p) for m in lin.values() for p in m.parameters())
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        seen.update(id(p) for p in emb.parameters())
        tied = head is not None and head.weight is emb.weight
        if head is not None:
            seen.update(id(p) for p in head.parameters())
        other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen)
        return cls(tuple(layers), emb.num_embeddings, emb.embedding_dim, tied,
                   head is not None and getattr(head, "bias", None) is not None, other)

    def narrowed(self, before, after) -> "ModelLayout":
        """This layout with each decoder layer's heads and MLP channels cut from widths ``before`` to
        ``after`` (:class:`qpruner.models.LayerWidth` per layer; embeddings and norms unchanged)."""
        layers = []
        for shapes, b, a in zip(self.layers, before, after):
            q, k, v, o, gate, up, down = shapes
            h, kv = a.heads / b.heads, a.kv_heads / b.kv_heads
            layers.append((LinearShape(round(q.out_features * h), q.in_features, q.bias),
                           LinearShape(round(k.out_features * kv), k.in_features, k.bias),
                           LinearShape(round(v.out_features * kv), v.in_features, v.bias),
                           LinearShape(o.out_features, round(o.in_features * h), o.bias),
                           LinearShape(a.intermediate, gate.in_features, gate.bias),
                           LinearShape(a.intermediate, up.in_features, up.bias),
                           LinearShape(down.out_features, a.intermediate, down.bias)))
        return replace(self, layers=tuple(layers))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def linear_numel(self) -> int:
        return sum(s.numel for layer in self.layers for s in layer)


def format_bytes(shape: LinearShape, fmt: str, *, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one weight of ``shape`` (without bias) stored in ``fmt``."""
    n = shape.numel
    if fmt in ("nf4", "fp4"):
        blocks = math.ceil(n / blocksize)
        packed, code = (n + 1) // 2, 16 * 4
        if double_quant:
            return packed + code + blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4
        return packed + code + blocks * 4
    if fmt == "int8":
        return n + shape.out_features * 4
    if fmt in ("bf16", "fp16"):
        return 2 * n
    if fmt == "fp32":
        return 4 * n
    raise ValueError(f"unknown format {fmt!r}")


def bias_bytes(shape: LinearShape, fmt: str, compute_dtype: str) -> int:
    """Bytes of a linear's bias in format ``fmt`` (bf16 storage, else the compute dtype)."""
    if not shape.bias:
        return 0
    return shape.out_features * (2 if fmt == "bf16" else DTYPE_BYTES[compute_dtype])


@dataclass(frozen=True)
class MemoryBreakdown:
    """Weight memory of a plan, split into decoder linears, biases, embeddings, head and the rest."""
    linear_weight_bytes: int   # decoder-linear weights incl. quantization statistics, no biases
    bias_bytes: int            # decoder-linear biases
    embedding_bytes: int
    head_bytes: int            # lm_head (0 when it shares the embedding tensor)
    other_bytes: int           # norms etc.
    linear_numel: int

    @property
    def total_bytes(self) -> int:
        return self.linear_weight_bytes + self.bias_bytes + self.embedding_bytes + self.head_bytes + self.other_bytes

    @property
    def avg_bits(self) -> float:
        return 8.0 * self.linear_weight_bytes / self.linear_numel


def embedding_bytes(layout: ModelLayout, quant: QuantConfig) -> int:
    """Bytes of the input embeddings as ``quant.embeddings`` stores them."""
    shape = LinearShape(layout.vocab, layout.hidden, False)
    if quant.embeddings == "rest":
        return shape.numel * DTYPE_BYTES[quant.rest_dtype]
    if quant.embeddings in ("nf4", "fp4"):
        if layout.hidden % 64:
            raise PlanError(f"4-bit embeddings need a hidden size divisible by 64; it is {layout.hidden}")
        return format_bytes(shape, quant.embeddings, blocksize=64, double_quant=False)
    return format_bytes(shape, quant.embeddings)


def head_bytes(layout: ModelLayout, quant: QuantConfig, compute_dtype: str) -> int:
    """Bytes of the output head as ``quant.lm_head`` stores it (0 when tied to the embeddings)."""
    shape = LinearShape(layout.vocab, layout.hidden, layout.head_bias)
    if quant.lm_head == "rest":
        if layout.tied and quant.embeddings == "rest":
            return 0
        return (shape.numel + (layout.vocab if layout.head_bias else 0)) * DTYPE_BYTES[quant.rest_dtype]
    weight = format_bytes(shape, quant.lm_head, blocksize=quant.blocksize, double_quant=quant.double_quant)
    return weight + bias_bytes(shape, quant.lm_head, compute_dtype)


def plan_bytes(layout: ModelLayout, plan: PrecisionPlan, quant: QuantConfig | None = None,
               compute_dtype: str = "float32") -> MemoryBreakdown:
    """Predicted weight memory of ``layout`` quantized with ``plan`` (no model is built)."""
    quant = quant or QuantConfig()
    plan.check_units(layout.n_layers)
    weights = biases = 0
    for shapes, formats in zip(layout.layers, plan.per_linear()):
        for name, s in zip(LINEAR_NAMES, shapes):
            fmt = formats[name]
            weights += format_bytes(s, fmt, blocksize=quant.blocksize, double_quant=quant.double_quant)
            biases += bias_bytes(s, fmt, compute_dtype)
    return MemoryBreakdown(weights, biases, embedding_bytes(layout, quant), head_bytes(layout, quant, compute_dtype),
                           layout.other_numel * DTYPE_BYTES[quant.rest_dtype], layout.linear_numel)


# ----------------------------------------------------------------------------------------------
# measuring real tensors


def _tensor_list(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor holding weights of ``module`` (recursively), incl. bitsandbytes quant states."""
    out = []
    for p in module.parameters():
        out.append(p.data)
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # Params4bit
            out += [qs.absmax, qs.code]
            if getattr(qs, "nested", False):
                out += [qs.offset, qs.state2.absmax, qs.state2.code]
        scb = getattr(p, "SCB", None)
        if scb is not None:  # Int8Params (CB aliases the data)
            out.append(scb)
    for sub in module.modules():  # Linear8bitLt moves SCB/CB to its MatmulLtState after a forward
        state = getattr(sub, "state", None)
        out += [t for t in (getattr(state, "SCB", None), getattr(state, "CB", None)) if torch.is_tensor(t)]
    for sub in module.modules():  # persistent buffers (non-persistent ones, like rotary inv_freq, are derived)
        out += [b for name, b in sub._buffers.items() if b is not None and name not in sub._non_persistent_buffers_set]
    return out


def _unique_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        key = (t.device, t.data_ptr(), t.nbytes)
        if t.nbytes == 0 or key in seen:
            continue
        seen.add(key)
        total += t.nbytes
    return total


def measure_bytes(model: Any) -> MemoryBreakdown:
    """Sum the bytes of the real tensors of a (quantized) model, split like :func:`plan_bytes`.

    LoRA adapters, if attached, are excluded (see :func:`adapter_bytes`); non-persistent buffers
    (rotary ``inv_freq``) are derived values and excluded too.
    """
    seen: set = set()
    weights = biases = numel = 0
    for layer in models.decoder_layers(model):
        for lin in models.layer_linears(layer).values():
            base: Any = getattr(lin, "base_layer", lin)  # a peft LoRA wrapper keeps the original as base_layer
            if base.bias is not None:
                biases += _unique_bytes([base.bias.data], seen)
            weights += _unique_bytes(_tensor_list(base), seen)
            numel += base.in_features * base.out_features
    embedding = _unique_bytes(_tensor_list(model.get_input_embeddings()), seen)
    head = model.get_output_embeddings()
    head_b = _unique_bytes(_tensor_list(head), seen) if head is not None else 0
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    other = _unique_bytes([p.data for p in model.parameters() if id(p) not in lora], seen)
    return MemoryBreakdown(weights, biases, embedding, head_b, other, numel)


def adapter_bytes(model: nn.Module) -> int:
    """Bytes of the LoRA adapters attached to ``model``."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------------------------
# budgets


@dataclass(frozen=True)
class Budget:
    """A weight-memory budget: average bits per decoder-linear weight, or total bytes (or none)."""
    avg_bits: float | None = None
    total_bytes: int | None = None

    @classmethod
    def from_policy(cls, policy) -> "Budget":
        total = None if policy.budget_gb is None else int(policy.budget_gb * GB)
        return cls(policy.budget_avg_bits, total)

    def excess(self, mem: MemoryBreakdown) -> float:
        """0 when ``mem`` fits, else by how much it is over, relative to the budget."""
        over = 0.0
        if self.avg_bits is not None:
            over = max(over, mem.avg_bits / self.avg_bits - 1.0)
        if self.total_bytes is not None:
            over = max(over, mem.total_bytes / self.total_bytes - 1.0)
        return max(0.0, over)

    def fits(self, mem: MemoryBreakdown) -> bool:
        return self.excess(mem) == 0.0

    @property
    def unlimited(self) -> bool:
        return self.avg_bits is None and self.total_bytes is None

    def describe(self) -> str:
        parts = []
        if self.avg_bits is not None:
            parts.append(f"<= {self.avg_bits:g} average bits")
        if self.total_bytes is not None:
            parts.append(f"<= {self.total_bytes / GB:.3f} GB of weights")
        return " and ".join(parts) or "no budget"


@dataclass(frozen=True)
class UnitCosts:
    """Exact memory of plans given as option indices, from per-unit tables (memory is additive)."""
    weights: np.ndarray       # [U, K] bytes of each unit's linear weights in each option
    biases: np.ndarray        # [U, K] bytes of its biases
    fixed: float              # everything else (embeddings, norms, head): the same for every plan
    numel: int                # decoder-linear weights (the denominator of average bits)
    budget: Budget

    def total(self, idx) -> float:
        rows = np.arange(len(idx))
        return float(self.fixed + self.weights[rows, idx].sum() + self.biases[rows, idx].sum())

    def avg_bits(self, idx) -> float:
        return 8.0 * float(self.weights[np.arange(len(idx)), idx].sum()) / self.numel

    def fits_sums(self, weights: float, biases: float) -> bool:
        """Does a plan whose units sum to these weight and bias bytes fit the budget? (:meth:`Budget.fits`
        decides, on the plan's memory breakdown: one test for the tables, the searcher and the trials)"""
        return self.budget.fits(MemoryBreakdown(weights, biases, 0, 0, self.fixed, self.numel))  # type: ignore[arg-type]

    def fits(self, idx) -> bool:
        rows = np.arange(len(idx))
        return self.fits_sums(float(self.weights[rows, idx].sum()), float(self.biases[rows, idx].sum()))

    def totals(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`total` of every plan in ``rows`` ``[n, U]`` at once."""
        rows = np.atleast_2d(rows)
        return self.fixed + self.unit_cost[np.arange(rows.shape[1])[None, :], rows].sum(axis=1)

    def fits_rows(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`fits` of every plan in ``rows`` ``[n, U]`` at once (the same tests as :meth:`Budget.excess`)."""
        rows = np.atleast_2d(rows)
        cols = np.arange(rows.shape[1])[None, :]
        w = self.weights[cols, rows].sum(axis=1)
        ok = np.ones(len(rows), dtype=bool)
        if self.budget.avg_bits is not None:
            ok &= 8.0 * w / self.numel / self.budget.avg_bits - 1.0 <= 0.0
        if self.budget.total_bytes is not None:
            total = w + self.biases[cols, rows].sum(axis=1) + self.fixed
            ok &= total / self.budget.total_bytes - 1.0 <= 0.0
        return ok

    def expected_fits(self, p: np.ndarray) -> bool:
        """Does the expected plan under option probabilities ``p`` ``[U, K]`` fit?"""
        return self.fits_sums(float((p * self.weights).sum()), float((p * self.biases).sum()))

    @property
    def unit_cost(self) -> np.ndarray:
        return self.weights + self.biases

    def capacity(self) -> float:
        """Bound on ``sum(unit_cost)`` that the budget implies (exact without biases)."""
        cap = float(self.unit_cost.max(axis=1).sum())
        if self.budget.total_bytes is not None:
            cap = min(cap, self.budget.total_bytes - self.fixed)
        if self.budget.avg_bits is not None:
            cap = min(cap, self.budget.avg_bits * self.numel / 8.0 + float(self.biases.max(axis=1).sum()))
        return cap
