"""Exact weight memory, memory budgets, and measured fine-tuning peaks.

Weight bytes count every tensor a quantized model holds for its weights (bitsandbytes 0.50):

* ``nf4``/``fp4`` (``Linear4bit``, block size B=64): packed weights ``ceil(n/2)`` B, a 16-entry fp32
  code table (64 B), and the per-block absmax: with double quantization ``ceil(n/B)`` uint8 absmax
  + their fp32 absmax per 256 blocks + a 256-entry fp32 code table (1024 B) + one fp32 offset;
  without it, ``ceil(n/B)`` fp32 absmax. (1024x1024: 542,020 B with, 590,912 B without.)
* ``int8`` (``Linear8bitLt``): ``n`` int8 + one fp32 scale per output row (``SCB``).
* ``bf16``: ``2n``. Biases are stored in the compute dtype for quantized layers, in bf16 otherwise.
* everything outside the decoder linears (embeddings — once if tied —, norms, lm_head) in
  ``quant.rest_dtype``.

:func:`plan_bytes` predicts these numbers from a :class:`ModelLayout` and a plan without building
anything; :func:`measure_bytes` sums the real tensors of a quantized model. Tests hold them equal.

Average bits: ``8 * bytes of decoder-linear weights (with quantization statistics, without
biases) / number of those weights`` — nf4 with double quant 4.13, int8 8.03, bf16 16.

Fine-tuning peak: on CUDA ``torch.cuda.max_memory_allocated`` during fine-tuning (``cuda_allocated``);
on Linux CPUs the growth of the process's peak resident set (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) during fine-tuning plus the model's tensor bytes (``cpu_rss``). Elsewhere
no measurement is made (``none``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import models
from .plan import PrecisionPlan

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NESTED_BLOCKSIZE = 256
GB = 1e9


@dataclass(frozen=True)
class LinearShape:
    out_features: int
    in_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelLayout:
    """The shapes that decide weight memory: each decoder layer's linears, and the rest."""
    layers: tuple[tuple[LinearShape, ...], ...]
    rest_numel: int   # parameters outside decoder linears (tied embeddings counted once)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelLayout":
        layers, linear_ids = [], set()
        for layer in models.decoder_layers(model):
            shapes = []
            for lin in models.layer_linears(layer).values():
                shapes.append(LinearShape(lin.out_features, lin.in_features, lin.bias is not None))
                linear_ids.update(id(p) for p in lin.parameters())
            layers.append(tuple(shapes))
        unique = {id(p): p for p in model.parameters()}
        rest = sum(p.numel() for i, p in unique.items() if i not in linear_ids)
        return cls(tuple(layers), rest)

    @property
    def n_units(self) -> int:
        return len(self.layers)

    def unit_numel(self, i: int) -> int:
        return sum(s.numel for s in self.layers[i])

    @property
    def linear_numel(self) -> int:
        return sum(self.unit_numel(i) for i in range(self.n_units))


def format_bytes(shape: LinearShape, fmt: str, *, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one linear layer's weight (without bias) stored in ``fmt``."""
    n = shape.numel
    if fmt in ("nf4", "fp4"):
        blocks = math.ceil(n / blocksize)
        packed = (n + 1) // 2
        code = 16 * 4
        if double_quant:
            nested = math.ceil(blocks / NESTED_BLOCKSIZE)
            return packed + code + blocks + nested * 4 + 256 * 4 + 4
        return packed + code + blocks * 4
    if fmt == "int8":
        return n + shape.out_features * 4
    if fmt == "bf16":
        return 2 * n
    raise ValueError(f"unknown format {fmt!r}")


def bias_bytes(shape: LinearShape, fmt: str, compute_dtype: str) -> int:
    if not shape.bias:
        return 0
    return shape.out_features * (2 if fmt == "bf16" else DTYPE_BYTES[compute_dtype])


@dataclass(frozen=True)
class MemoryBreakdown:
    linear_weight_bytes: int   # decoder-linear weights incl. quantization statistics, no biases
    bias_bytes: int
    rest_bytes: int
    linear_numel: int

    @property
    def total_bytes(self) -> int:
        return self.linear_weight_bytes + self.bias_bytes + self.rest_bytes

    @property
    def avg_bits(self) -> float:
        return 8.0 * self.linear_weight_bytes / self.linear_numel


def plan_bytes(layout: ModelLayout, plan: PrecisionPlan, *, blocksize: int = 64, double_quant: bool = True,
               rest_dtype: str = "bfloat16", compute_dtype: str = "float32") -> MemoryBreakdown:
    """Predicted weight memory of ``layout`` quantized with ``plan`` (no model is built)."""
    plan.check_units(layout.n_units)
    weights = biases = 0
    for shapes, fmt in zip(layout.layers, plan.formats):
        for s in shapes:
            weights += format_bytes(s, fmt, blocksize=blocksize, double_quant=double_quant)
            biases += bias_bytes(s, fmt, compute_dtype)
    return MemoryBreakdown(weights, biases, layout.rest_numel * DTYPE_BYTES[rest_dtype], layout.linear_numel)


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
    for name, b in module.named_buffers():
        out.append(b)
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


def measure_bytes(model: nn.Module) -> MemoryBreakdown:
    """Sum the bytes of the real tensors of a (quantized) model, split like :func:`plan_bytes`.

    LoRA adapters, if attached, are excluded (see :func:`adapter_bytes`); non-persistent buffers
    (rotary ``inv_freq``) are derived values and excluded too.
    """
    seen: set = set()
    weights = biases = numel = 0
    skip = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    for layer in models.decoder_layers(model):
        for lin in models.layer_linears(layer).values():
            base = getattr(lin, "base_layer", lin)  # a peft LoRA wrapper keeps the original as base_layer
            skip.update(id(p) for p in lin.parameters())
            if base.bias is not None:
                biases += _unique_bytes([base.bias.data], seen)
            weights += _unique_bytes(_tensor_list(base), seen)
            numel += base.in_features * base.out_features
    rest_tensors = [p.data for p in model.parameters() if id(p) not in skip]
    persistent = {n for n, _ in model.state_dict().items()}
    rest_tensors += [b for n, b in model.named_buffers() if n in persistent and "lora_" not in n]
    return MemoryBreakdown(weights, biases, _unique_bytes(rest_tensors, seen), numel)


def adapter_bytes(model: nn.Module) -> int:
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

    def describe(self) -> str:
        parts = []
        if self.avg_bits is not None:
            parts.append(f"<= {self.avg_bits:g} average bits")
        if self.total_bytes is not None:
            parts.append(f"<= {self.total_bytes / GB:.3f} GB of weights")
        return " and ".join(parts) or "no budget"


# ----------------------------------------------------------------------------------------------
# peak memory during fine-tuning


def _proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PeakReading:
    kind: str = "none"     # cuda_allocated | cpu_rss | none
    peak_bytes: int | None = None


@contextmanager
def measure_peak(device: torch.device, resident_bytes: int = 0):
    """Measure the peak memory of the enclosed block (see module docstring for what is measured).
    ``resident_bytes``: tensor bytes already resident before the block (CPU reading only)."""
    reading = PeakReading()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield reading
        torch.cuda.synchronize(device)
        reading.kind, reading.peak_bytes = "cuda_allocated", int(torch.cuda.max_memory_allocated(device))
        return
    rss_before = _proc_status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        can_reset = True
    except OSError:
        can_reset = False
    yield reading
    hwm = _proc_status("VmHWM")
    if can_reset and rss_before is not None and hwm is not None:
        reading.kind, reading.peak_bytes = "cpu_rss", resident_bytes + max(0, hwm - rss_before)
