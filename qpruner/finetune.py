"""Brief LoRA recovery fine-tuning of a quantized model (the only module that imports peft).

LoRA (Hu et al., 2021) adapters of rank ``r`` and scaling ``alpha / r`` are attached to every
targeted projection of every decoder layer, over whatever storage the layer has (bitsandbytes 4-bit,
8-bit or 16-bit) — QLoRA-style: base weights frozen, adapters in float32. Plain init (A random,
B = 0) for now; LoftQ initialisation for mixed plans is issue 5.

Optimisation: AdamW on the adapters, linear warm-up then constant learning rate, gradient clipping,
batches drawn without replacement from the fine-tune split in a seeded order. A non-finite loss
stops the trial with :class:`~qpruner.errors.TrialFailed`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import models
from .config import FinetuneConfig
from .errors import BackendError, TrialFailed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneStats:
    steps: int
    first_loss: float | None
    final_loss: float | None
    tokens: int
    seconds: float


def attach_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``cfg.target_modules``; only adapters are trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a required dependency
        raise BackendError("peft is required: pip install peft==0.21.2") from exc
    kinds = {type(getattr(m, "base_layer", m)).__name__ for layer in models.decoder_layers(model)
             for m in models.layer_linears(layer).values()}
    # peft picks its bitsandbytes-aware LoRA layers only when the model says it is quantized
    model.is_loaded_in_4bit = "Linear4bit" in kinds
    model.is_loaded_in_8bit = "Linear8bitLt" in kinds
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, lora)


def _batches(train: torch.Tensor, batch_size: int, seed: int):
    """Endless epochs over ``train`` in a seeded order, without replacement inside an epoch."""
    gen = torch.Generator().manual_seed(seed)
    n = train.shape[0]
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield train[order[i:i + size]]


def finetune_(model: nn.Module, train: torch.Tensor, cfg: FinetuneConfig, device: str | torch.device,
              on_step: Callable[[int, float], None] | None = None) -> FinetuneStats:
    """Train the trainable parameters of ``model`` for ``cfg.steps`` steps on ``train`` [N, L]."""
    t0 = time.perf_counter()
    if cfg.steps == 0:
        return FinetuneStats(0, None, None, 0, 0.0)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrialFailed("nothing to fine-tune: no trainable parameters (check finetune.target_modules)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    batches = _batches(train, cfg.batch_size, cfg.seed)
    model.train()
    first = last = None
    tokens = 0
    for step in range(cfg.steps):
        batch = next(batches).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrialFailed(f"non-finite training loss ({value}) at step {step}")
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        first = value if first is None else first
        last = value
        tokens += batch.numel()
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return FinetuneStats(cfg.steps, first, last, tokens, time.perf_counter() - t0)
