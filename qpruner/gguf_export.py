"""A front point as one GGUF file: the serving format of llama.cpp (and of what runs on it: Ollama, LM Studio,
llama-cpp-python, llama.cpp's server).

``qpruner export RESULTS --point K --format gguf`` writes ``<export>/gguf/<job>-<trial>-<type>.gguf`` beside
the export. What goes in:

* **The fine-tuned weights, quantized once.** Each decoder linear holds the run's full-precision pruned weight
  plus what fine-tuning changed, ``W + scaling * B @ A - A0 B0`` (LoftQ's initialisation ``A0 B0`` recomputed
  exactly and taken out: :func:`fine_tuned_weights`), quantized to the GGUF type of its plan format: nf4 / fp4
  -> ``Q4_0`` (or ``--gguf-4bit`` q4_1 / q5_0 / q5_1 / q8_0), int8 -> ``Q8_0``, bf16 -> ``BF16``. Without the
  run directory (``--gguf-source merged``) the export's own quantized base with the LoRA merged is quantized
  again instead: two quantization errors on top of each other, measurably worse. GGUF has no nf4, so the 4-bit
  layers change quantizer and lose LoftQ's compensation; a linear whose input width is not a multiple of the
  32-element block is kept in BF16 (listed as a fallback). Embeddings and head stay in the dtype the trial held
  them, norms in F32. The NLL of the file's own weights, on the trial's evaluation tokens, is measured after
  writing and recorded next to the trial's (``qpruner_plan.json["gguf"]``): what the format change costs.
* **The per-layer widths.** A model whose layers all keep the same heads and MLP width is written as
  llama.cpp's ``llama`` architecture (transformers' GGUF loader reads it too). A pruned model whose layers
  differ is written as llama.cpp's ``deci`` architecture (DeciLM / Llama-Nemotron-NAS variable blocks), whose
  ``deci.attention.head_count``, ``head_count_kv`` and ``feed_forward_length`` are per-layer arrays; the
  other GGUF tools that read ``deci`` take it too, transformers does not (it has no ``deci`` model).
* **Attention layout.** Query and key rows are permuted to GGML's rotary layout as llama.cpp's own
  converter does; :func:`read_model` undoes it.
* **The tokenizer.** Copied from the source GGUF when the model came from one (the built-in SmolLM2); else
  built from a byte-level BPE ``tokenizer.json`` (``gpt2`` model: tokens, types, merges, special ids). Any
  other tokenizer is written as ``none`` with a warning (the weights load; llama.cpp then cannot tokenize
  text, which a llama.cpp-native conversion of the base model's tokenizer must supply).

:func:`read_model` reads a file back with the ``gguf`` library (llama.cpp's own Python package) into a
float32 transformers model, from the file's metadata alone; the export measures its NLL through it. The
supported bases are LLaMA and Mistral (no projection biases); Qwen2's biases and rope types other than
default, linear and llama3 are refused with the reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ModelError, ResultsError

logger = logging.getLogger(__name__)

GGUF_DIR = "gguf"
BLOCK = 32   # every GGUF block type used here quantizes rows in blocks of 32 (Q4_0 ... Q8_0)
FOUR_BIT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
BASES = ("llama", "mistral")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("--format gguf needs the gguf package: pip install gguf") from None
    return gguf


def ggml_type(fmt: str, four_bit: str = "q4_0"):
    """The GGUF tensor type of a plan format."""
    g = _gguf().GGMLQuantizationType
    if four_bit not in FOUR_BIT_TYPES:
        raise ConfigError([f"--gguf-4bit {four_bit!r}: one of {', '.join(FOUR_BIT_TYPES)}"])
    table = {"nf4": four_bit.upper(), "fp4": four_bit.upper(), "int8": "Q8_0", "bf16": "BF16"}
    if fmt not in table:
        raise ModelError(f"plan format {fmt!r} has no GGUF type here (nf4, fp4, int8, bf16)")
    return g[table[fmt]]


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Query/key rows from transformers' rotate-half layout to GGML's interleaved pairs (llama.cpp's convention)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rotary`."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope(config) -> tuple[float, dict]:
    """(rope theta, extra metadata/tensors) of a transformers config; refuses rope types llama.cpp would misread."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, {}
    if kind == "linear":
        return theta, {"linear": float(params["factor"])}
    if kind == "llama3":
        dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        factor, low, high = (float(params.get(k, d)) for k, d in
                             (("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0)))
        old = float(params.get("original_max_position_embeddings", 8192))
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        scale = np.where(wavelen < old / high, 1.0,
                         np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        return theta, {"rope_freqs": scale.astype(np.float32)}
    raise ModelError(f"rope type {kind!r} is not written to GGUF here (default, linear and llama3 are)")


def _layer_widths(config) -> list[list[int]]:
    widths = getattr(config, "layer_widths", None)
    if widths:
        return [list(map(int, w)) for w in widths]
    return [[config.num_attention_heads, config.num_key_value_heads, config.intermediate_size]] * \
        config.num_hidden_layers


def _float_array(t: torch.Tensor, qtype) -> np.ndarray:
    """The bytes (or F32 / F16 values) of a float tensor stored as GGUF type ``qtype``."""
    g = _gguf()
    a = t.detach().float().cpu().numpy()
    if qtype == g.GGMLQuantizationType.F32:
        return a.astype(np.float32)
    if qtype == g.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    if qtype == g.GGMLQuantizationType.Q4_0:
        return quantize_q4_0(a)
    return g.quants.quantize(a, qtype)


Q4_0_SCALES = np.linspace(0.70, 1.0, 16, dtype=np.float32)   # block scale as a fraction of absmax / 8


def quantize_q4_0(a: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Standard GGUF Q4_0 blocks (fp16 scale + 32 packed 4-bit values, read by every Q4_0 reader), with each
    block's scale chosen among :data:`Q4_0_SCALES` x the absmax scale for the least squared error, instead of
    the reference absmax scale: 16% less squared weight error over SmolLM2's linears at the same 4.5 bits/weight
    (the absmax scale is one of the candidates, so no block is worse)."""
    rows = a.reshape(-1, 32).astype(np.float32)
    out = np.empty((rows.shape[0], 18), dtype=np.uint8)
    for start in range(0, rows.shape[0], chunk):
        blocks = rows[start:start + chunk]
        signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[:, None], -1)
        best_q = best_d = best_err = None
        for frac in Q4_0_SCALES:
            d = (signed_max * (-frac / 8)).astype(np.float16).astype(np.float32)   # the scale as stored
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(d == 0, 0.0, np.clip(np.rint(blocks / d), -8, 7))
            err = ((q * d - blocks) ** 2).sum(-1, keepdims=True)
            if best_err is None:
                best_q, best_d, best_err = q, d, err
            else:
                better = err < best_err
                best_q, best_d, best_err = np.where(better, q, best_q), np.where(better, d, best_d), \
                    np.minimum(err, best_err)
        nibbles = (best_q + 8).astype(np.uint8).reshape(-1, 2, 16)
        out[start:start + chunk, :2] = best_d.astype(np.float16).view(np.uint8)
        out[start:start + chunk, 2:] = nibbles[:, 0, :] | (nibbles[:, 1, :] << np.uint8(4))
    return out.reshape(*a.shape[:-1], a.shape[-1] // 32 * 18)


def _rest_type(t: torch.Tensor):
    g = _gguf().GGMLQuantizationType
    return {torch.bfloat16: g.BF16, torch.float16: g.F16}.get(t.dtype, g.F32)


def _tokenizer_fields(writer, tokenizer, source_gguf: Path | None, rows: int) -> str:
    """Write the tokenizer metadata; returns where it came from."""
    g = _gguf()
    if source_gguf is not None and source_gguf.is_file():
        reader = g.GGUFReader(str(source_gguf))
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                main = field.types[0]
                if main == g.GGUFValueType.ARRAY:
                    writer.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
                else:
                    writer.add_key_value(key, field.contents(), main)
        return f"copied from {source_gguf.name}"
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre or not model.get("merges"):
        # (a BPE with no merges cannot be written: GGUF has no empty arrays, llama.cpp's gpt2 vocabulary needs them)
        writer.add_tokenizer_model("none")
        logger.warning("the tokenizer (%s) is not a byte-level BPE with merges: the GGUF file carries no "
                       "vocabulary (tokenizer model 'none'); llama.cpp loads the weights and evaluates token ids, "
                       "but cannot tokenize text", model.get("type") or type(tokenizer).__name__)
        return "none (not a byte-level BPE tokenizer with merges)"
    vocab = dict(model.get("vocab") or {})
    special = {}
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        special[added["id"]] = 3 if added.get("special") else 4   # CONTROL / USER_DEFINED
    if max(vocab.values()) >= rows:   # llama.cpp sizes the embedding by the token list: one token per row
        raise ModelError(f"the tokenizer has token ids up to {max(vocab.values())}, the embedding {rows} rows")
    size = rows
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size                                            # UNUSED where the vocabulary has a hole
    for text, i in vocab.items():
        tokens[i], types[i] = text, special.get(i, 1)             # NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    for flag, add in (("add_bos_token", writer.add_add_bos_token), ("add_eos_token", writer.add_add_eos_token)):
        value = getattr(tokenizer, flag, None)
        if isinstance(value, bool):
            add(value)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    return "byte-level BPE from tokenizer.json"


def _plain_float(module: nn.Module, what: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if type(module).__name__ in ("Embedding4bit", "Embedding8bit", "Linear4bit", "Linear8bitLt") or \
            weight is None or not weight.dtype.is_floating_point:
        raise ModelError(f"the {what} is quantized ({type(module).__name__}, quant.embeddings / quant.lm_head): "
                         "GGUF export writes embeddings and head in the rest dtype only")
    return weight


def write_gguf(model: nn.Module, formats: dict[str, str], tokenizer, path: str | Path, *, four_bit: str = "q4_0",
               source_gguf: Path | None = None, name: str | None = None, weight_of=None) -> dict:
    """Write ``model`` (a loaded export, LoRA-wrapped or plain) to the GGUF file ``path``: decoder linear
    ``<qualified name>`` in the GGUF type of ``formats[name]``; returns a summary (architecture, tensor types,
    fallbacks, tokenizer, parameters, bytes). A linear's float weight is ``weight_of(name, module)``, by default
    the merged quantized base (:func:`qpruner.serialize.merged_weight`). Tensors are merged, quantized and written one at a time (the
    header, with every tensor's shape and type, first): the file's data is never held in memory whole."""
    from . import models
    from .pruned_model import base_type
    from .serialize import _linear_names, _unwrap, merged_weight
    g = _gguf()
    T = g.GGMLQuantizationType
    base = _unwrap(model)
    config = base.config
    kind = base_type(str(config.model_type))
    if kind not in BASES:
        raise ModelError(f"GGUF export supports {', '.join(BASES)} bases; this model is {kind!r}")
    widths = _layer_widths(config)
    uniform = all(w == widths[0] for w in widths)
    if any(h == 0 or kv == 0 or ff == 0 for h, kv, ff in widths):
        raise ModelError("a layer with no attention heads or no MLP channels is not written to GGUF here")
    arch = "llama" if uniform else "deci"
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    theta, rope_extra = _rope(config)
    embedding = _plain_float(base.get_input_embeddings(), "embedding")
    head = base.get_output_embeddings()
    untied = not getattr(config, "tie_word_embeddings", False) and head is not None
    if untied:
        _plain_float(head, "head")

    # every tensor: (GGUF name, numpy-order shape, type, producer of its float values)
    plan: list[tuple[str, tuple[int, ...], object, object]] = []
    fallbacks: list[str] = []
    plan.append(("token_embd.weight", tuple(embedding.shape), _rest_type(embedding), lambda: embedding))
    if "rope_freqs" in rope_extra:
        freqs = torch.from_numpy(rope_extra["rope_freqs"])
        plan.append(("rope_freqs.weight", tuple(freqs.shape), T.F32, lambda: freqs))
    names = _linear_names(base)
    for i, layer in enumerate(models.decoder_layers(base)):
        heads, kv, _ = widths[i]
        for short, module in models.layer_linears(layer).items():
            qual = names[id(module)]
            stored = getattr(module, "base_layer", module)
            if getattr(stored, "bias", None) is not None:
                raise ModelError(f"{qual} has a bias: projection biases (Qwen2) are not written to GGUF here")
            qtype = ggml_type(formats.get(qual, "bf16"), four_bit)
            if stored.in_features % BLOCK and qtype not in (T.BF16, T.F16):
                fallbacks.append(f"{qual} ({formats.get(qual)}: input width {stored.in_features} is not a multiple "
                                 f"of {BLOCK}; BF16)")
                qtype = T.BF16
            rotary = heads if short == "q_proj" else kv if short == "k_proj" else None

            def produce(module=module, rotary=rotary, qual=qual):
                weight = merged_weight(module) if weight_of is None else weight_of(qual, module)
                return weight if rotary is None else permute_rotary(weight, rotary)
            plan.append((f"blk.{i}.{LINEARS[short]}.weight", (stored.out_features, stored.in_features), qtype,
                         produce))
        for gname, norm in (("attn_norm", layer.input_layernorm), ("ffn_norm", layer.post_attention_layernorm)):
            plan.append((f"blk.{i}.{gname}.weight", tuple(norm.weight.shape), T.F32, lambda w=norm.weight: w))
    plan.append(("output_norm.weight", tuple(base.model.norm.weight.shape), T.F32, lambda: base.model.norm.weight))
    if untied:
        plan.append(("output.weight", tuple(head.weight.shape), _rest_type(head.weight), lambda: head.weight))

    path = Path(path)
    writer = g.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(name or str(getattr(config, "_name_or_path", "") or "qpruner export"))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(widths))
    if uniform:
        writer.add_head_count(widths[0][0])
        writer.add_head_count_kv(widths[0][1])
        writer.add_feed_forward_length(widths[0][2])
    else:
        writer.add_head_count([w[0] for w in widths])
        writer.add_head_count_kv([w[1] for w in widths])
        writer.add_feed_forward_length([w[2] for w in widths])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if "linear" in rope_extra:
        writer.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_extra["linear"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(embedding.shape[0]))
    writer.add_quantization_version(g.GGML_QUANT_VERSION)
    token_source = _tokenizer_fields(writer, tokenizer, source_gguf, int(embedding.shape[0]))
    for key, shape, qtype, _ in plan:
        nbytes = int(np.prod(g.quants.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(key, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    types: Counter = Counter()
    parameters = 0
    try:
        for key, shape, qtype, produce in plan:
            array = _float_array(produce(), qtype)
            writer.write_tensor_data(array.reshape(-1) if array.ndim == 1 else array)
            types[qtype.name] += 1
            parameters += int(np.prod(shape))
    finally:
        writer.close()
    return {"architecture": arch, "tensor_types": dict(types), "four_bit": four_bit, "fallbacks": fallbacks,
            "tokenizer": token_source, "parameters": parameters, "bytes": path.stat().st_size}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a GGUF file written by :func:`write_gguf` (or by llama.cpp's converter for a LLaMA), read
    with the ``gguf`` library: its config from the file's metadata alone (per-layer widths from the ``deci``
    arrays), every tensor dequantized by ``gguf.quants.dequantize``, query/key rows permuted back."""
    from transformers import LlamaConfig

    from . import models
    from .pruned_model import pruned_config
    g = _gguf()
    reader = g.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "deci"):
        raise ModelError(f"{path}: GGUF architecture {arch!r}; this reader takes llama and deci")

    def key(name, default=None):
        return _field(reader, f"{arch}.{name}", default)
    layers = int(key("block_count"))

    def per_layer(name):
        value = key(name)
        return [int(v) for v in value] if isinstance(value, list) else [int(value)] * layers
    heads, kvs, ffs = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), \
        per_layer("feed_forward_length")
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // heads[0])
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(key("vocab_size") or tensors["token_embd.weight"].shape[1])
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    if key("rope.scaling.type") == "linear":
        rope = {"rope_type": "linear", "rope_theta": rope["rope_theta"], "factor": float(key("rope.scaling.factor"))}
    base = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=max(ffs), num_hidden_layers=layers,
                       num_attention_heads=max(heads), num_key_value_heads=max(kvs), head_dim=head_dim,
                       max_position_embeddings=int(key("context_length", 2048)),
                       rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
                       tie_word_embeddings="output.weight" not in tensors, rope_parameters=rope)
    config = pruned_config(base, list(zip(heads, kvs, ffs)))
    model = models.meta_model(config.to_dict())

    def tensor(name: str) -> torch.Tensor:
        t = tensors[name]
        array = g.quants.dequantize(t.data, t.tensor_type)
        shape = [int(s) for s in reversed(t.shape)]
        return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape)).to(dtype)

    state = {"model.embed_tokens.weight": tensor("token_embd.weight"), "model.norm.weight": tensor("output_norm.weight")}
    if "output.weight" in tensors:
        state["lm_head.weight"] = tensor("output.weight")
    hf_names = {v: k for k, v in LINEARS.items()}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for gname, short in hf_names.items():
            w = tensor(f"blk.{i}.{gname}.weight")
            if short == "q_proj":
                w = unpermute_rotary(w, heads[i])
            elif short == "k_proj":
                w = unpermute_rotary(w, kvs[i])
            parent = "self_attn" if short.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            state[f"{prefix}.{parent}.{short}.weight"] = w
        state[f"{prefix}.input_layernorm.weight"] = tensor(f"blk.{i}.attn_norm.weight")
        state[f"{prefix}.post_attention_layernorm.weight"] = tensor(f"blk.{i}.ffn_norm.weight")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ModelError(f"{path}: tensors do not match its metadata (missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]})")
    model.tie_weights()
    models.reset_rotary(model)
    if "rope_freqs.weight" in tensors:   # llama3 rope: llama.cpp divides the frequencies by these factors
        factors = tensor("rope_freqs.weight").float()
        for module in model.modules():
            if type(module).__name__.endswith("RotaryEmbedding"):
                for buffer in ("inv_freq", "original_inv_freq"):
                    if isinstance(getattr(module, buffer, None), torch.Tensor):
                        setattr(module, buffer, getattr(module, buffer) / factors)
    return model.eval()


def fine_tuned_weights(pruned: Path, rank_of_init: bool):
    """``weight_of`` for :func:`write_gguf`: each linear's full-precision pruned weight plus what fine-tuning
    changed, ``W + scaling * B @ A - A0 B0``, where ``A0 B0`` is LoftQ's initialisation, recomputed exactly as
    LoftQ's last step made it (the same deterministic low-rank SVD of ``W - dequantize(base)``; zero when
    ``rank_of_init`` is false: a LoRA initialised at zero). Quantizing this to the GGUF type costs one
    quantization error, against two for the merged quantized weights (nf4, then the GGUF type on top)."""
    from .loftq import _low_rank
    from .quantize import dequantized
    from .serialize import lora_delta
    from .weights import SafetensorsDir
    source = SafetensorsDir(pruned)

    def weight_of(qual: str, module: nn.Module) -> torch.Tensor:
        w = source[f"{qual}.weight"].float()
        delta = lora_delta(module)
        if delta is None:
            return w
        if rank_of_init:
            rank = min(int(module.lora_A[module.active_adapters[0]].weight.shape[0]), *w.shape)
            stored = getattr(module, "base_layer", module)
            u, s, v = _low_rank(w - dequantized(stored).cpu().to(w.dtype), rank)
            delta = delta - (u * s[None, :]) @ v.T
        return w + delta
    return weight_of


def export_gguf(directory: str | Path, four_bit: str = "q4_0", results: str | Path | None = None,
                source: str = "auto") -> tuple[Path, dict]:
    """``<export>/gguf/<job>-<trial>-<four_bit>[-merged].gguf`` of an export directory, its NLL measured on the
    trial's evaluation tokens through :func:`read_model` and recorded in ``qpruner_plan.json["gguf"]`` beside the
    trial's. Returns (file, record). An existing file is never overwritten.

    ``source`` of the linear weights: ``"pruned"`` — the run's full-precision pruned weights plus the trained
    change (:func:`fine_tuned_weights`; needs ``results``, the run directory, whose pruned model must be the
    export's); ``"merged"`` — the export's own quantized base with the LoRA merged (no run directory needed, but
    quantized twice); ``"auto"`` — pruned when the run's pruned model is at hand, else merged."""
    from .export import PLAN_FILE, eval_nll, load, read_plan
    from .models import resolve_device
    from .models import SMOLLM2_GGUF, smollm2_folder
    from .serialize import _linear_names, _unwrap
    from .quantize import module_format
    directory = Path(directory)
    record = read_plan(directory)
    ggml_type("nf4", four_bit)                  # a bad --gguf-4bit or source fails before any work
    if source not in ("auto", "pruned", "merged"):
        raise ConfigError([f"GGUF weight source {source!r}: auto, pruned or merged"])
    if record.get("layout") == "full-precision":
        raise ModelError(f"{directory}: its embeddings or head are quantized (quant.embeddings / quant.lm_head); "
                         "GGUF export writes them in the rest dtype only")
    trial = record.get("trial", {})
    pruned = _pruned_source(directory, record, results) if source in ("auto", "pruned") else None
    if source == "pruned" and pruned is None:
        raise ResultsError(f"--gguf-source pruned: the run's pruned model for {directory} is not at hand (give the "
                           "results directory of its search)")
    out_dir = directory / GGUF_DIR
    key = four_bit if pruned is not None else f"{four_bit}-merged"
    path = out_dir / f"{record.get('job', 'model')}-{trial.get('trial_id', 'point')}-{key}.gguf"
    if path.exists():
        raise ResultsError(f"{path} exists; nothing was changed (remove it to write it again)")
    tokenizer_gguf = None
    if (record.get("model") or {}).get("source") == "builtin:smollm2-135m":   # the base's own GGUF tokenizer
        try:
            tokenizer_gguf = smollm2_folder() / SMOLLM2_GGUF
        except ModelError:
            tokenizer_gguf = None
    model, tokenizer = load(directory, "cpu")
    base = _unwrap(model)
    names = _linear_names(base)
    formats = {qual: module_format(mod) for mod in base.modules() if (qual := names.get(id(mod)))}
    out_dir.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=out_dir)
    os.close(fd)
    try:
        weight_of = None
        if pruned is not None:
            init = (record.get("finetune") or {}).get("init") == "loftq"
            weight_of = fine_tuned_weights(pruned, init)
        summary = write_gguf(model, formats, tokenizer, tmp, four_bit=four_bit, source_gguf=tokenizer_gguf,
                             name=f"{record.get('job')} {trial.get('trial_id', '')}".strip(), weight_of=weight_of)
        del model, base
        # read back in float32 (bf16 past 3B parameters: the host memory of a 7B-70B model), on the GPU if any
        read_dtype = torch.float32 if summary["parameters"] < 3e9 else torch.bfloat16
        device = resolve_device("auto")
        reread = read_model(tmp, read_dtype).to(device)
        nll = eval_nll(directory, reread, tokenizer, device)
        del reread
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would keep a server running as another user out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    entry = {**summary, "file": f"{GGUF_DIR}/{path.name}", "nll": nll, "trial_nll": trial.get("nll"),
             "weight_bytes": trial.get("weight_bytes"), "read_with": "gguf.GGUFReader + gguf.quants.dequantize",
             "read_dtype": str(read_dtype).removeprefix("torch."), "read_device": str(device),
             "weights_from": ("the run's full-precision pruned weights + the trained LoRA change (minus LoftQ's "
                              "initialisation)" if pruned is not None else
                              "the export's quantized base with the LoRA merged (quantized twice)")}
    record = read_plan(directory)
    record.setdefault("gguf", {})[key] = entry
    (directory / PLAN_FILE).write_text(json.dumps(record, indent=2, default=str))
    _card_with_gguf(directory, entry)
    logger.info("GGUF %s (%s, %.1f MB): NLL %.6f, the trial's %s", path, summary["architecture"],
                summary["bytes"] / 1e6, nll, trial.get("nll"))
    return path, entry


def _card_with_gguf(directory: Path, entry: dict) -> None:
    """Add the GGUF file, its types and its measured NLL to the export's model card."""
    card = directory / "README.md"
    if not card.is_file():
        return
    trial = entry.get("trial_nll")
    lines = [f"\n## GGUF ({entry['four_bit']})\n",
             f"`{entry['file']}`: llama.cpp architecture `{entry['architecture']}`"
             + (" (per-layer head and MLP widths)" if entry["architecture"] == "deci" else "")
             + f", {entry['bytes'] / 1e6:.1f} MB, tensor types {entry['tensor_types']}, the LoRA adapter merged. "
             f"Held-out NLL of the file's weights {entry['nll']:.4f}"
             + (f" (the trial's {trial:.4f}: the change of quantizer costs {entry['nll'] - trial:+.4f})"
                if isinstance(trial, (int, float)) else "") + "."]
    if entry["fallbacks"]:
        lines.append(f" {len(entry['fallbacks'])} linears are BF16 (input width not a multiple of 32).")
    card.write_text(card.read_text() + "".join(lines) + "\n")


def preflight(results: str | Path) -> None:
    """Refuse, before any export work, a search whose points GGUF export cannot write (base architecture, rope
    type, quantized embeddings or head)."""
    from types import SimpleNamespace

    from .pruned_model import base_type
    from .rundir import RunDir
    from .serialize import supported
    run = RunDir(results)
    job = run.read_job()
    if not supported(job.quant):
        raise ModelError(f"{run.path}: quant.embeddings / quant.lm_head are quantized; GGUF export writes "
                         "embeddings and head in the rest dtype only")
    for config_file in sorted(run.path.glob("pruned*/config.json"))[:1]:
        config = json.loads(config_file.read_text())
        if base_type(str(config.get("model_type"))) not in BASES:
            raise ModelError(f"GGUF export supports {', '.join(BASES)} bases; {config_file} is "
                             f"{config.get('model_type')!r}")
        _rope(SimpleNamespace(**config))


def _pruned_source(directory: Path, record: dict, results) -> Path | None:
    """The run's full-precision pruned model of this export, when it is at hand and is the export's (same config)."""
    if results is None:
        return None
    from .plan import PrecisionPlan
    from .rundir import RunDir
    pruned = RunDir(results).pruned_at(PrecisionPlan.from_dict(record["plan"]).pruned)
    try:
        theirs = json.loads((pruned / "config.json").read_text())
        ours = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    same = all(theirs.get(k) == ours.get(k) for k in ("layer_widths", "hidden_size", "num_hidden_layers", "vocab_size"))
    if not same or not any(pruned.glob("model*.safetensors")):
        logger.warning("%s does not hold this export's pruned model: the GGUF is written from the merged quantized "
                       "weights", pruned)
        return None
    return pruned
