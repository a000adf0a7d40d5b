"""Recovery fine-tuning of a quantized model with LoRA (the only module that imports peft).

LoRA (Hu et al., 2021) adapters of rank ``r`` and scaling ``alpha / r`` are attached to every
targeted projection of every decoder layer, over whatever storage the layer has (bitsandbytes 4-bit,
8-bit or 16-bit): base weights frozen, adapters in float32. They start from LoftQ
(:mod:`qpruner.loftq`, default) or from the plain QLoRA initialisation (``A`` random, ``B = 0``).

Optimisation: AdamW on the adapters; ``batch_size`` sequences per step, split into micro-batches of
``micro_batch_size`` with gradient accumulation; linear warm-up then a constant, linear or cosine
learning rate; gradient clipping; bf16 autocast on CUDA; optional gradient checkpointing; a step
budget and an optional time budget; batches drawn without replacement from the fine-tune split in a
seeded order (same seed, same data order, same adapters' initialisation — same result). Every
``eval_every`` steps an evaluation callback can report intermediate metrics (for early stopping);
every ``report_every`` steps a :class:`StepProgress` can report how far it is (step, loss, tokens/s,
ETA) — a progress report for people and dashboards, which carries no metric a scheduler could act on.
A non-finite loss stops the trial with :class:`~qpruner.errors.TrialFailed`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import models
from .config import FinetuneConfig
from .errors import BackendError, TrialFailed
from .results import PROGRESS_STATUS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneStats:
    """What a fine-tune did: losses, steps taken and why it stopped."""
    steps: int
    first_loss: float | None
    final_loss: float | None
    tokens: int
    seconds: float
    stopped: str = ""            # why training ended before cfg.steps ("time budget"), else ""
    losses: tuple[float, ...] = ()


class StepProgress:
    """``on_step`` for :func:`finetune_`: every ``every`` optimizer steps (and at the last), calls ``report``
    with ``{"status": "training", "step", "steps", "train_loss", "tokens_per_s", "finetune_s", "eta_s"}``.
    The ETA is the mean step time so far times the steps left (capped by ``max_seconds``)."""

    def __init__(self, report: Callable[[dict], None], cfg: FinetuneConfig, tokens_per_step: int,
                 extra: dict | None = None):
        self.report, self.every, self.steps = report, cfg.report_every, cfg.steps
        self.max_seconds, self.tokens_per_step, self.extra = cfg.max_seconds, tokens_per_step, extra or {}
        self.t0 = time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1
        if not self.every or (done % self.every and done != self.steps):
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.steps - done)
        if self.max_seconds is not None:
            eta = min(eta, max(0.0, self.max_seconds - elapsed))
        self.report({"status": PROGRESS_STATUS, "step": done, "steps": self.steps, "train_loss": loss,
                     "tokens_per_s": self.tokens_per_step * done / elapsed if elapsed > 0 else None,
                     "finetune_s": elapsed, "eta_s": eta, **self.extra})


def attach_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``cfg.target_modules``; only adapters are trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a required dependency
        raise BackendError("peft is required: pip install peft==0.21.2") from exc
    _mark_quantized(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, lora)


def _mark_quantized(model: nn.Module) -> None:
    kinds = {type(getattr(m, "base_layer", m)).__name__ for layer in models.decoder_layers(model)
             for m in models.layer_linears(layer).values()}
    # peft picks its bitsandbytes-aware LoRA layers only when the model says it is quantized
    model.is_loaded_in_4bit = "Linear4bit" in kinds
    model.is_loaded_in_8bit = "Linear8bitLt" in kinds


def save_adapter(model: nn.Module, directory) -> None:
    """The LoRA adapter only (adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(directory, safe_serialization=True)


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Wrap a quantized model with a LoRA adapter saved by :func:`save_adapter` (safetensors only)."""
    from pathlib import Path

    from peft import PeftModel

    from .errors import ModelError
    weights = Path(directory) / "adapter_model.safetensors"
    if not weights.is_file():   # peft would fall back to adapter_model.bin, a pickle: never load one
        found = sorted(p.name for p in Path(directory).glob("adapter_model*")) if Path(directory).is_dir() else []
        raise ModelError(f"no adapter_model.safetensors in {directory}" + (f" (found {', '.join(found)}: qpruner loads "
                         "adapters as safetensors only, never pickles)" if found else "") +
                         "; export the point again (qpruner export) or convert the adapter to safetensors")
    _mark_quantized(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(directory), is_trainable=False).eval()


def _batches(train: torch.Tensor, batch_size: int, seed: int):
    """Endless epochs over ``train`` in a seeded order, without replacement inside an epoch."""
    gen = torch.Generator().manual_seed(seed)
    n = train.shape[0]
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield train[order[i:i + size]]


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def finetune_(model: nn.Module, train: torch.Tensor, cfg: FinetuneConfig, device: str | torch.device,
              on_step: Callable[[int, float], None] | None = None,
              on_eval: Callable[[int], None] | None = None) -> FinetuneStats:
    """Train the trainable parameters of ``model`` on ``train`` [N, L] for ``cfg.steps`` steps (or until
    ``cfg.max_seconds``). ``on_eval(step)`` is called every ``cfg.eval_every`` steps (not after the last)."""
    t0 = time.perf_counter()
    if cfg.steps == 0:
        return FinetuneStats(0, None, None, 0, 0.0)
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrialFailed("nothing to fine-tune: no trainable parameters (check finetune.target_modules)")
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    micro = cfg.micro_batch_size or cfg.batch_size
    accumulation = cfg.batch_size // micro
    batches = _batches(train, micro, cfg.seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.autocast == "auto" and device.type == "cuda"
                else nullcontext())
    model.train()
    losses: list[float] = []
    tokens, stopped = 0, ""
    for step in range(cfg.steps):
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
            stopped = "time budget"
            break
        total = 0.0
        for _ in range(accumulation):
            batch = next(batches).to(device)
            with autocast:
                loss = model(input_ids=batch, labels=batch).loss / accumulation
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrialFailed(f"non-finite training loss ({value * accumulation}) at step {step}")
            loss.backward()
            total += value
            tokens += batch.numel()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if on_step is not None:
            on_step(step, total)
        if on_eval is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            on_eval(step + 1)
            model.train()
    model.eval()
    return FinetuneStats(len(losses), losses[0] if losses else None, losses[-1] if losses else None, tokens,
                         time.perf_counter() - t0, stopped, tuple(losses))
