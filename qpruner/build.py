"""A plan's quantized model with LoRA, built one linear at a time from the pruned weights.

:func:`build_quantized` is what a trial runs: the model's modules are created on the meta device, the
embeddings, norms and head are read from the pruned weights, and then each decoder linear in turn is read,
LoftQ-initialised (when its format is in ``finetune.loftq_formats``), quantized to its format and put in
place, before the next is read. The full-precision model never exists in the trial's memory: its peak is the
quantized model plus one full-precision linear and LoftQ's temporaries.

With a :class:`~qpruner.loftq.LoftQCache`, a linear whose LoftQ result in its format is cached is neither
LoftQ-initialised nor quantized: its quantized module and the adapter's initial (A, B) come from the cache,
bit-identical to computing them (``tests/test_build.py``).

:func:`quantized_with_lora` does the same to a model already in memory (an export being loaded, tests).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from . import models
from .config import FinetuneConfig, QuantConfig
from .errors import ModelError
from .finetune import attach_lora, load_adapter
from .finetune_memory import trim_heap
from .loftq import LoftQCache, _one_thread, load_adapters_, loftq_linear
from .memory import measure_bytes
from .plan import PrecisionPlan
from .quantize import DTYPES, _quantize_ends_, check_applied, convert_linear, resolve_compute_dtype

logger = logging.getLogger(__name__)

Fetch = Callable[[int, str, nn.Module], nn.Linear]   # (layer, linear name, module in place) -> a materialised Linear


def quantized_with_lora(model: nn.Module, plan: PrecisionPlan, quant: QuantConfig, ft: FinetuneConfig,
                        device: torch.device, adapter_dir: str | None = None, cache: LoftQCache | None = None):
    """Quantize the pruned ``model`` (in memory) to ``plan`` and attach LoRA: LoftQ-initialised (if configured),
    or the trained adapter in ``adapter_dir``. LoftQ decides the quantized base weights, so it runs either way:
    a reloaded export gets exactly the base its adapters were trained on. Returns (model, measured bytes)."""
    return _quantize_and_attach(model, plan, quant, ft, torch.device(device), lambda i, name, lin: lin,
                                adapter_dir, cache)


def build_quantized(config_dict: dict, weights, plan: PrecisionPlan, quant: QuantConfig, ft: FinetuneConfig,
                    device: torch.device, cache: LoftQCache | None = None, adapter_dir: str | None = None,
                    seconds: dict | None = None):
    """The pruned model of ``config_dict`` quantized to ``plan`` with LoRA attached, read from ``weights`` (a
    name -> tensor mapping, e.g. :class:`~qpruner.weights.SafetensorsDir`) one linear at a time. ``seconds``
    (optional) receives the time spent reading (``load``) and in LoftQ (``loftq``, cache reads included)."""
    seconds = {} if seconds is None else seconds
    t = time.perf_counter()
    model, names = skeleton(config_dict, weights)
    seconds["load"] = seconds.get("load", 0.0) + time.perf_counter() - t

    def fetch(i: int, name: str, module: nn.Module) -> nn.Linear:
        t = time.perf_counter()
        try:
            return _read_linear(i, name, module)
        finally:
            seconds["load"] = seconds.get("load", 0.0) + time.perf_counter() - t

    def _read_linear(i: int, name: str, module: nn.Module) -> nn.Linear:
        prefix = names[id(module)]
        has_bias = f"{prefix}.bias" in weights
        tensors = (weights.read([f"{prefix}.weight", f"{prefix}.bias"] if has_bias else [f"{prefix}.weight"])
                   if hasattr(weights, "read") else
                   {k: weights[k] for k in ([f"{prefix}.weight", f"{prefix}.bias"] if has_bias else [f"{prefix}.weight"])})
        w = tensors[f"{prefix}.weight"]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(tensors[f"{prefix}.bias"], requires_grad=False)
        return lin

    return _quantize_and_attach(model, plan, quant, ft, torch.device(device), fetch, adapter_dir, cache, seconds)


def skeleton(config_dict: dict, weights) -> tuple[nn.Module, dict[int, str]]:
    """The model of ``config_dict`` with everything but its decoder linears read from ``weights``; the linears
    stay on the meta device. Also returns each linear module's qualified name (by ``id``)."""
    model = models.meta_model(config_dict)
    layers = models.decoder_layers(model)
    linear_ids = {id(m) for layer in layers for m in models.layer_linears(layer).values()}
    names = {id(m): qual for qual, m in model.named_modules() if id(m) in linear_ids}
    linear_keys = {f"{q}.{p}" for q in names.values() for p in ("weight", "bias")}
    rest = [k for k in weights.keys() if k not in linear_keys]
    tensors = weights.read(rest) if hasattr(weights, "read") else {k: weights[k] for k in rest}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied - linear_keys or unexpected:
        raise ModelError(f"weights do not match the config: missing {sorted(set(missing) - tied - linear_keys)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    absent = [k for k in (f"{q}.weight" for q in names.values()) if k not in weights]
    if absent:
        raise ModelError(f"weights do not match the config: missing {absent[:5]}")
    model.tie_weights()
    models.reset_rotary(model)
    return model.eval(), names


def _quantize_and_attach(model, plan, quant, ft, device, fetch: Fetch, adapter_dir, cache, seconds=None):
    layers = models.decoder_layers(model)
    plan.check_units(len(layers))
    compute = resolve_compute_dtype(quant, device)
    scaling = ft.lora_alpha / ft.lora_r
    init = {}
    for i, (layer, formats) in enumerate(zip(layers, plan.per_linear())):
        for name, module in models.layer_linears(layer).items():
            lin, fmt = fetch(i, name, module), formats[name]
            if ft.init == "loftq" and name in ft.target_modules and fmt in ft.loftq_formats:
                t = time.perf_counter()
                q, init[(i, name)] = _loftq_quantized(i, name, lin, fmt, quant, ft, scaling, device, compute, cache)
                if seconds is not None:
                    seconds["loftq"] = seconds.get("loftq", 0.0) + time.perf_counter() - t
            else:
                q = convert_linear(lin, fmt, quant, device, compute)
            models.set_layer_linear(layer, name, q)
            del lin
        trim_heap()   # this layer's full-precision tensors are gone: give their pages back before the next layer
    _quantize_ends_(model, quant, device, compute, DTYPES[quant.rest_dtype])
    model.to(device)
    check_applied(model, plan)
    measured = measure_bytes(model)
    if adapter_dir is not None:
        return load_adapter(model, adapter_dir), measured
    torch.manual_seed(ft.seed)  # same plan -> same adapters -> same result, in any worker
    model = attach_lora(model, ft)
    if init:
        load_adapters_(model, init)
    return model, measured


def _loftq_quantized(i, name, lin, fmt, quant, ft, scaling, device, compute, cache):
    """(quantized module, (A, B)) of one linear's LoftQ initialisation: from the cache, or computed (and kept)."""
    if cache is not None:
        hit = cache.load(i, name, fmt, lin, quant, device, compute)
        if hit is not None:
            module, a, b = hit
            return module, (a, b)
    with _one_thread(device):
        base, a, b = loftq_linear(lin, fmt, quant, ft.lora_r, scaling, ft.loftq_iters, device, compute,
                                  ft.loftq_balance)
    lin.weight = nn.Parameter(base.to(lin.weight.device), requires_grad=False)
    module = convert_linear(lin, fmt, quant, device, compute)
    if cache is not None:
        cache.store(i, name, fmt, module, a, b)
    return module, (a, b)
