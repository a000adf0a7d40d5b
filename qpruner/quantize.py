"""Apply a PrecisionPlan with bitsandbytes: every decoder layer's seven linears get the layer's format.

* ``nf4`` / ``fp4`` -> ``bnb.nn.Linear4bit`` (block size and double quantization from the job),
* ``int8``          -> ``bnb.nn.Linear8bitLt(has_fp16_weights=False)`` (LLM.int8(), outlier threshold
  from the job),
* ``bf16``          -> :class:`Linear16`: bf16 storage, computed in the activations' dtype.

``BitsAndBytesConfig`` cannot mix 4- and 8-bit layers in one model, so modules are swapped here
directly. Everything else (embeddings, norms, lm_head) is stored in ``quant.rest_dtype``; on CPUs the
model computes in float32 (bf16 matmuls are slower there) and on CUDA in bfloat16.

CPU trap handled here: bitsandbytes 0.50 repacks 4-bit weights for avx512-bf16 CPUs on the first
no-grad forward, which fails for widths not divisible by 32 and breaks gradient flow afterwards;
``support_avx512bf16_for_cpu`` is switched off on every ``Linear4bit`` before its first forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from . import models
from .config import QuantConfig
from .errors import BackendError, PlanError
from .plan import PrecisionPlan

logger = logging.getLogger(__name__)

from .models import DTYPES  # noqa: E402  (one definition: dtype names -> torch dtypes)


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a required dependency
        raise BackendError("bitsandbytes is required: pip install bitsandbytes==0.50.2") from exc
    return bitsandbytes


class Linear16(nn.Linear):
    """A linear layer stored in 16 bits that computes in its input's dtype (upcasting on the fly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)


class _CastOutput:
    """Forward hook: cast a module's output (e.g. bf16 embeddings) to the compute dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module, args, output):
        return output.to(self.dtype)


def resolve_compute_dtype(cfg: QuantConfig, device: torch.device) -> torch.dtype:
    """The compute dtype on ``device`` (:func:`qpruner.config.compute_dtype_name` decides)."""
    from .config import compute_dtype_name
    return DTYPES[compute_dtype_name(cfg.compute_dtype, torch.device(device).type == "cuda")]


def _to_linear16(lin: nn.Linear, device, share: bool = False) -> Linear16:
    new = Linear16(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    if share:  # keep the very same Parameter (tied embeddings)
        new.weight = lin.weight
        new.bias = lin.bias
        return new
    new.weight = nn.Parameter(lin.weight.data.to(device=device, dtype=torch.bfloat16), requires_grad=False)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.data.to(device=device, dtype=torch.bfloat16), requires_grad=False)
    return new


def convert_linear(lin: nn.Linear, fmt: str, cfg: QuantConfig, device, compute: torch.dtype) -> nn.Module:
    """A copy of ``lin`` stored in ``fmt`` on ``device`` (the original is left untouched)."""
    if fmt == "bf16":
        return _to_linear16(lin, device)
    bnb = _bnb()
    has_bias = lin.bias is not None
    weight = lin.weight.data.to("cpu", compute, copy=True)  # never alias the source (sensitivity restores it)
    if fmt in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute,
                              compress_statistics=cfg.double_quant, quant_type=fmt, device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=cfg.double_quant,
                                     quant_type=fmt, blocksize=cfg.blocksize)
        q.support_avx512bf16_for_cpu = False
        q.weight.support_avx512bf16_for_cpu = False
    elif fmt == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=cfg.int8_threshold, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise PlanError(f"unknown format {fmt!r}")
    if has_bias:
        q.bias = nn.Parameter(lin.bias.data.to("cpu", compute), requires_grad=False)
    return q.to(device)  # moving a bnb module to its device is what quantizes it


def _convert_embedding(weight: torch.Tensor, fmt: str, device, compute: torch.dtype) -> nn.Module:
    bnb = _bnb()
    vocab, hidden = weight.shape
    w = weight.to("cpu", torch.float32)
    if fmt == "int8":
        emb = bnb.nn.Embedding8bit(vocab, hidden, dtype=compute, device="meta")
        emb.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    elif fmt in ("nf4", "fp4"):
        if hidden % 64:
            raise PlanError(f"4-bit embeddings need a hidden size divisible by 64; it is {hidden}")
        emb = bnb.nn.Embedding4bit(vocab, hidden, dtype=compute, quant_type=fmt, device="meta")
        emb.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=fmt, blocksize=64, compress_statistics=False)
    else:
        raise PlanError(f"unknown embedding format {fmt!r}")
    return emb.to(device)


def _quantize_ends_(model: nn.Module, cfg: QuantConfig, device, compute: torch.dtype, rest: torch.dtype) -> None:
    """Embeddings and lm_head per ``quant.embeddings`` / ``quant.lm_head`` (a tied pair with either
    quantized becomes two tensors); everything else that is not a decoder linear goes to ``rest``."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    originals = {"emb": emb.weight.data.clone(), "head": None if head is None else head.weight.data.clone()}
    layers = models.decoder_layers(model)
    quantized = {id(p) for layer in layers for m in models.layer_linears(layer).values() for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        if id(p) not in quantized:
            p.data = p.data.to(device=device, dtype=rest)
    if cfg.embeddings != "rest":
        model.set_input_embeddings(_convert_embedding(originals["emb"], cfg.embeddings, device, compute))
    model.get_input_embeddings().register_forward_hook(_CastOutput(compute))
    if head is None:
        return
    untie = tied and (cfg.embeddings != "rest" or cfg.lm_head != "rest")
    if untie:
        model.config.tie_word_embeddings = False
    if cfg.lm_head != "rest":
        source = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        source.weight = nn.Parameter(originals["head"], requires_grad=False)
        if head.bias is not None:
            source.bias = head.bias
        model.set_output_embeddings(convert_linear(source, cfg.lm_head, cfg, device, compute))
    elif untie:
        new = _to_linear16(head, device, share=True)
        new.weight = nn.Parameter(originals["head"].to(device=device, dtype=rest), requires_grad=False)
        model.set_output_embeddings(new)
    elif not isinstance(head, Linear16):
        model.set_output_embeddings(_to_linear16(head, device, share=True))


def quantize_(model: nn.Module, plan: PrecisionPlan, cfg: QuantConfig, device: str | torch.device = "cpu") -> nn.Module:
    """Quantize ``model`` in place to ``plan`` and move it to ``device``; returns the model."""
    device = torch.device(device)
    layers = models.decoder_layers(model)
    plan.check_units(len(layers))
    compute = resolve_compute_dtype(cfg, device)
    for layer, formats in zip(layers, plan.per_linear()):
        for name, lin in models.layer_linears(layer).items():
            models.set_layer_linear(layer, name, convert_linear(lin, formats[name], cfg, device, compute))
    _quantize_ends_(model, cfg, device, compute, DTYPES[cfg.rest_dtype])
    model.to(device)
    check_applied(model, plan)
    return model


def dequantized(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly quantized, possibly LoRA-wrapped) linear module multiplies by, in float32."""
    module = getattr(module, "base_layer", module)
    name = type(module).__name__
    if name == "Linear4bit":
        return _bnb().functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if name == "Linear8bitLt":
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return module.weight.data.float() * scb.float()[:, None] / 127.0
    return module.weight.data.float()


def module_format(module: nn.Module) -> str:
    """The storage format of one (possibly LoRA-wrapped) linear module."""
    module = getattr(module, "base_layer", module)
    name = type(module).__name__
    if name == "Linear4bit":
        return module.weight.quant_type
    if name == "Linear8bitLt":
        return "int8" if module.weight.dtype == torch.int8 else "int8-unquantized"
    if isinstance(module, Linear16) and module.weight.dtype == torch.bfloat16:
        return "bf16"
    return f"{name}:{module.weight.dtype}"


def applied_formats(model: nn.Module) -> list[dict[str, str]]:
    """Per decoder layer, the format of each of its seven linears, read from the modules."""
    return [{name: module_format(m) for name, m in models.layer_linears(layer).items()}
            for layer in models.decoder_layers(model)]


def check_applied(model: nn.Module, plan: PrecisionPlan) -> None:
    """Raise :class:`PlanError` unless every linear of ``model`` has its planned format."""
    for i, (got, want) in enumerate(zip(applied_formats(model), plan.per_linear())):
        if got != want:
            raise PlanError(f"layer {i}: planned {want} but its modules are {got}")
