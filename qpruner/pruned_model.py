"""Pruned models as ordinary Hugging Face models: config/model classes registered with the Auto API.

A pruned Llama/Mistral/Qwen2 differs from the stock model only in its widths: each decoder layer may
keep its own number of query heads, KV heads and MLP channels, the hidden size may be smaller
(channel-wise pruning) and layers may be gone (layer-wise pruning). The config classes below add one
field, ``layer_widths`` (``[heads, kv_heads, intermediate]`` per layer); the model classes build
each decoder layer from a copy of the config with that layer's widths, so every module is the stock
transformers module with the right shape. ``head_dim`` is always explicit, so the hidden size need
not be a multiple of the head count.

``import qpruner`` registers ``qpruner_llama``, ``qpruner_mistral`` and ``qpruner_qwen2`` with
``AutoConfig`` / ``AutoModelForCausalLM``; after that, ``AutoModelForCausalLM.from_pretrained(dir)``
loads a directory written by :func:`save_pruned` (safetensors weights, no pickle, no remote code).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from .config import PRUNED_PREFIX as PREFIX

logger = logging.getLogger(__name__)

META_FILE = "qpruner_prune.json"
PARTIAL_FILE = "qpruner_prune.partial"  # present while save_pruned writes
_CLASSES: dict[str, tuple[type, type]] = {}


def _make_classes(base: str):
    from huggingface_hub.dataclasses import strict
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    config_base, model_base, layer_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer),
        "mistral": (MistralConfig, MistralForCausalLM, MistralDecoderLayer),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer),
    }[base]

    @strict
    class PrunedConfig(config_base):
        model_type = PREFIX + base
        layer_widths: list | None = None

        def validate_architecture(self):
            """Per-layer widths replace the global head/width checks of the base config."""
            if self.layer_widths is not None and len(self.layer_widths) != self.num_hidden_layers:
                raise ValueError(f"layer_widths has {len(self.layer_widths)} entries for "
                                 f"{self.num_hidden_layers} layers")

    class PrunedForCausalLM(model_base):
        config_class = PrunedConfig

        def __init__(self, config):
            super().__init__(config)
            if config.layer_widths:
                for i, widths in enumerate(config.layer_widths):
                    self.model.layers[i] = layer_cls(layer_config(config, widths), i)
                self.post_init()

    PrunedConfig.__name__ = PrunedConfig.__qualname__ = f"QPruner{config_base.__name__}"
    PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = f"QPruner{model_base.__name__}"
    return PrunedConfig, PrunedForCausalLM


def layer_config(config, widths):
    """A copy of ``config`` describing one decoder layer of the given ``[heads, kv_heads, intermediate]``."""
    heads, kv, inter = widths
    c = copy.copy(config)
    c.num_attention_heads, c.num_key_value_heads, c.intermediate_size = int(heads), int(kv), int(inter)
    return c


def register() -> None:
    """Register the pruned config/model classes with the transformers Auto API (idempotent)."""
    if _CLASSES:
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    for base in ("llama", "mistral", "qwen2"):
        cfg_cls, model_cls = _make_classes(base)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
        _CLASSES[base] = (cfg_cls, model_cls)


def base_type(model_type: str) -> str:
    """The base architecture of a (pruned) ``model_type``."""
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def classes_for(model_type: str) -> tuple[type, type]:
    """The pruned (config, model) classes for a ``model_type``."""
    register()
    return _CLASSES[base_type(model_type)]


def pruned_config(config, widths, **changes):
    """The pruned config class for ``config`` with per-layer ``widths`` and other fields changed."""
    cfg_cls, _ = classes_for(config.model_type)
    d = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "layer_widths"):
        d.pop(key, None)
    d.update(changes)
    d["head_dim"] = d.get("head_dim") or config.hidden_size // config.num_attention_heads
    d["layer_widths"] = [list(map(int, w)) for w in widths]
    d["num_hidden_layers"] = len(widths)
    return cfg_cls(**d)


def adopt_(model: nn.Module, config) -> nn.Module:
    """Make ``model`` an instance of the pruned class with ``config`` (modules are unchanged)."""
    _, model_cls = classes_for(config.model_type)
    model.config = config
    model.model.config = config
    model.__class__ = model_cls
    return model


# ----------------------------------------------------------------------------------------------
# save / load


def save_pruned(model: nn.Module, tokenizer, directory: str | Path, meta: dict | None = None,
                digest: bool = False) -> Path:
    """Write ``model`` (safetensors + config), its tokenizer and ``meta`` (the pruning record; with ``digest``, the
    weights' content digest too, :func:`qpruner.weights.digest`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in directory.iterdir()}
    # names what was here before, so that after an interrupted save only what this save wrote counts as ours
    (directory / PARTIAL_FILE).write_text(json.dumps({"note": "a qpruner save in progress (or interrupted)",
                                                      "present_before": sorted(before)}) + "\n")
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
    if meta is not None:  # the record, written last, lists the files written (what clear_pruned may delete)
        if digest:
            from .weights import digest as weights_digest
            meta = {**meta, "weights_sha256": weights_digest(directory)}
        files = sorted({p.name for p in directory.iterdir()} - before | {META_FILE})
        (directory / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2, default=str))
    (directory / PARTIAL_FILE).unlink()
    return directory


# the exact names save_pretrained writes for a model and its tokenizer (a record of an earlier version lists none)
_WRITTEN = re.compile("|".join([
    r"model(-\d{5}-of-\d{5})?\.safetensors", r"model\.safetensors\.index\.json", r"config\.json",
    r"generation_config\.json", r"tokenizer\.json", r"tokenizer_config\.json", r"tokenizer\.model",
    r"special_tokens_map\.json", r"vocab\.json", r"vocab\.txt", r"merges\.txt", r"added_tokens\.json",
    r"chat_template\.(jinja|json)", re.escape(META_FILE), re.escape(PARTIAL_FILE)]))


def foreign_files(directory: str | Path) -> list[str]:
    """Files in ``directory`` that :func:`save_pruned` did not write (all of them when it has no record)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    meta = read_meta(directory)
    present = sorted(p.name for p in directory.iterdir())
    partial = directory / PARTIAL_FILE
    if meta is None and not partial.is_file():
        return present
    listed = set((meta or {}).get("files") or [])
    if listed:
        return [name for name in present if name not in listed]
    # no list (an interrupted save, or a record of an earlier version): only the exact names a save writes,
    # and never a name the interrupted save found already there
    before = set(_present_before(partial))
    return [name for name in present if name in before or not _WRITTEN.fullmatch(name)]


def _present_before(partial: Path) -> list[str]:
    try:
        return list(json.loads(partial.read_text()).get("present_before", []))
    except (OSError, ValueError, AttributeError):   # missing, or the plain-text marker of an earlier version
        return []


def clear_pruned(directory: str | Path) -> None:
    """Delete a pruned model that :func:`save_pruned` wrote, and nothing else: a directory holding any file
    it did not write is refused (:class:`~qpruner.errors.ResultsError`) before anything is deleted."""
    from .errors import ResultsError
    directory = Path(directory)
    if not directory.exists():
        return
    foreign = foreign_files(directory)
    if foreign:
        raise ResultsError(f"{directory} holds files qpruner did not write ({', '.join(foreign[:5])}"
                           f"{' ...' if len(foreign) > 5 else ''}); nothing was deleted. Move them elsewhere, "
                           "then run again")
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()


def read_meta(directory: str | Path) -> dict | None:
    """The ``qpruner_prune.json`` record of a pruned-model directory, or None."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def load_pruned(directory: str | Path, dtype: torch.dtype | None = None, device="cpu"):
    """(model, tokenizer) from a directory written by :func:`save_pruned` (safetensors only)."""
    register()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model.to(device).eval(), tokenizer
