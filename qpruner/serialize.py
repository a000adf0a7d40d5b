"""The quantized model itself on disk: what a trial ran, loadable with no SVD and no re-quantization.

An export's ``quantized.safetensors`` holds, for every decoder linear ``<module>`` (e.g.
``model.layers.3.mlp.down_proj``), the tensors of its stored form under ``<module>.qpruner.*``, exactly as the
trial built them:

* nf4 / fp4: ``data`` (the packed 4-bit weights) and ``qs.*`` (bitsandbytes' packed quantization state:
  absmax, its own quantization when double-quantized, the code, block size, shape);
* int8: ``data`` (int8 weights) and ``SCB`` (per-row scales);
* bf16: ``data``;

the linear's bias as ``<module>.bias``, and everything else (embeddings, norms, head) under its usual name, in
the dtype the trial held it (``quant.rest_dtype``). The safetensors metadata ``qpruner_quantization`` maps
every module to its format with the bitsandbytes settings (in the spirit of optimum-quanto's
``quantization_map``); LoftQ's adjustment of the base weights is in the stored tensors, so loading runs no
LoftQ. The adapter is saved beside it (``adapter/``).

:func:`quantized_state` takes a built (trained) model apart; :func:`load_quantized` puts it together again on a
device, through the same module constructors the LoftQ cache uses (:func:`qpruner.loftq._module_from`), so
the reloaded model is bit-identical to the trial's on the same kind of device (``tests/test_export.py``).

Embeddings or a head quantized by ``quant.embeddings`` / ``quant.lm_head`` are not in this format yet: such a
point is exported with its full-precision pruned weights, rebuilt at load (:func:`supported`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import models
from .config import QuantConfig
from .errors import ModelError
from .loftq import _module_from, _module_tensors
from .plan import PrecisionPlan
from .quantize import DTYPES, _quantize_ends_, check_applied, module_format, resolve_compute_dtype

QUANTIZED_FILE = "quantized.safetensors"
FORMAT_VERSION = 1
STORED = ".qpruner."


def supported(quant: QuantConfig) -> bool:
    """Whether this quantization is stored as such (embeddings and head in the rest dtype: the default)."""
    return quant.embeddings == "rest" and quant.lm_head == "rest"


def _unwrap(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _linear_names(model: nn.Module) -> dict[int, str]:
    """Qualified name of every decoder linear (or its LoRA wrapper), by ``id``."""
    ids = {id(m) for layer in models.decoder_layers(model) for m in models.layer_linears(layer).values()}
    return {id(m): name for name, m in model.named_modules() if id(m) in ids}


def quantized_state(model: nn.Module, quant: QuantConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, quantization map) of a built model, LoRA-wrapped or not (the adapter is not included)."""
    base = _unwrap(model)
    names = _linear_names(base)
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    for layer in models.decoder_layers(base):
        for module in models.layer_linears(layer).values():
            qual, stored = names[id(module)], getattr(module, "base_layer", module)
            fmt = module_format(stored)
            if fmt not in ("nf4", "fp4", "int8", "bf16"):
                raise ModelError(f"{qual} is stored as {fmt}, which the quantized export does not write")
            formats[qual] = fmt
            for key, value in _module_tensors(stored, fmt).items():
                tensors[f"{qual}{STORED}{key}"] = value
            if stored.bias is not None:
                tensors[f"{qual}.bias"] = stored.bias.detach().cpu().contiguous()
    prefixes = tuple(f"{q}." for q in names.values())
    tied = getattr(base.config, "tie_word_embeddings", False)
    for key, value in base.state_dict().items():
        if key.startswith(prefixes) or "lora_" in key or (tied and key == "lm_head.weight"):
            continue
        tensors[key] = value.detach().cpu().contiguous()
    qmap = {"version": FORMAT_VERSION, "modules": formats, "rest_dtype": quant.rest_dtype,
            "blocksize": quant.blocksize, "double_quant": quant.double_quant, "int8_threshold": quant.int8_threshold,
            "library": "bitsandbytes"}
    return tensors, qmap


def save_quantized(model: nn.Module, quant: QuantConfig, directory: str | Path) -> Path:
    """Write :data:`QUANTIZED_FILE` into ``directory``; returns its path."""
    from safetensors.torch import save_file
    tensors, qmap = quantized_state(model, quant)
    path = Path(directory) / QUANTIZED_FILE
    save_file(tensors, str(path), metadata={"format": "pt", "qpruner_quantization": json.dumps(qmap)})
    return path


def read_quantization_map(path: str | Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("qpruner_quantization") or "{}")


def load_quantized(directory: str | Path, plan: PrecisionPlan, quant: QuantConfig, device) -> nn.Module:
    """The quantized model (no adapter) of an export directory, on ``device``, from :data:`QUANTIZED_FILE` and
    ``config.json``: no SVD, no quantization."""
    from safetensors import safe_open
    directory, device = Path(directory), torch.device(device)
    path = directory / QUANTIZED_FILE
    config_dict = json.loads((directory / "config.json").read_text())
    compute = resolve_compute_dtype(quant, device)
    model = models.meta_model(config_dict)
    names = _linear_names(model)
    with safe_open(str(path), framework="pt") as f:
        qmap = json.loads((f.metadata() or {}).get("qpruner_quantization") or "{}")
        if qmap.get("version") != FORMAT_VERSION:
            raise ModelError(f"{path}: quantized format version {qmap.get('version')!r}, this qpruner reads "
                             f"{FORMAT_VERSION}")
        keys = list(f.keys())
        biases = {f"{q}.bias" for q in names.values()}
        rest = {k: f.get_tensor(k) for k in keys if STORED not in k and k not in biases}
        missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
        linear_keys = {f"{q}.{p}" for q in names.values() for p in ("weight", "bias")}
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if set(missing) - linear_keys - tied or unexpected:
            raise ModelError(f"{path} does not match {directory / 'config.json'}: missing "
                             f"{sorted(set(missing) - linear_keys - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        model.tie_weights()
        models.reset_rotary(model)
        for i, layer in enumerate(models.decoder_layers(model)):
            for name, module in models.layer_linears(layer).items():
                qual = names[id(module)]
                fmt = qmap["modules"].get(qual)
                if fmt is None:
                    raise ModelError(f"{path} has no stored form of {qual}")
                prefix = f"{qual}{STORED}"
                tensors = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
                bias = f"{qual}.bias" in keys
                lin = nn.Linear(module.in_features, module.out_features, bias=bias, device="meta")
                if bias:
                    lin.bias = nn.Parameter(f.get_tensor(f"{qual}.bias"), requires_grad=False)
                models.set_layer_linear(layer, name, _module_from(tensors, fmt, lin, quant, device, compute))
    _quantize_ends_(model, quant, device, compute, DTYPES[quant.rest_dtype])
    model.to(device)
    check_applied(model, plan)
    return model.eval()


MERGED_DIR = "merged"


def lora_delta(module: nn.Module) -> torch.Tensor | None:
    """``scaling * B @ A`` of a LoRA-wrapped linear's active adapters, in float32 on the CPU (None without LoRA)."""
    delta = None
    for adapter in getattr(module, "active_adapters", ()) if hasattr(module, "lora_A") else ():
        if adapter in module.lora_A:
            a = module.lora_A[adapter].weight.detach().float().cpu()
            b = module.lora_B[adapter].weight.detach().float().cpu()
            term = module.scaling[adapter] * (b @ a)
            delta = term if delta is None else delta + term
    return delta


def merged_weight(module: nn.Module) -> torch.Tensor:
    """``dequantize(base) + scaling * B @ A`` of one (LoRA-wrapped, quantized) linear, in float32 on the CPU."""
    from .quantize import dequantized
    weight = dequantized(getattr(module, "base_layer", module)).cpu()
    delta = lora_delta(module)
    return weight if delta is None else weight + delta


def merged(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The LoRA-merged model of a loaded export: each decoder linear becomes a plain ``nn.Linear`` in ``dtype``
    holding ``dequantize(base) + scaling * B @ A`` (computed in float32, rounded once); the rest as it was. A
    plain (pruned) transformers model: ``save_pretrained`` writes it, ``from_pretrained`` reads it back."""
    base = _unwrap(model)
    for layer in models.decoder_layers(base):
        for name, module in models.layer_linears(layer).items():
            stored = getattr(module, "base_layer", module)
            weight = merged_weight(module)
            lin = nn.Linear(stored.in_features, stored.out_features, bias=stored.bias is not None, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(weight.to(dtype))
                if stored.bias is not None:
                    lin.bias.copy_(stored.bias.detach().cpu().to(dtype))
            models.set_layer_linear(layer, name, lin.requires_grad_(False))
    head = base.get_output_embeddings()
    if head is not None and type(head) is not nn.Linear:   # Linear16 -> nn.Linear (a plain model saves and loads)
        plain = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        plain.weight = head.weight
        if head.bias is not None:
            plain.bias = head.bias
        base.set_output_embeddings(plain)
    emb = base.get_input_embeddings()
    emb._forward_hooks.clear()   # the compute-dtype cast of the quantized model: a plain model needs none
    for p in base.parameters():
        p.data = p.data.to("cpu", dtype)
        p.requires_grad_(False)
    base.config.torch_dtype = dtype
    return base.eval()
