"""Evaluation of the model as it is (quantized and adapted): perplexity and next-token accuracy.

Over the evaluation split (``N`` independent windows of ``seq_len`` tokens), every token after the
first of each window is predicted from its prefix within the window:

* ``perplexity = exp(sum NLL / predicted tokens)``;
* ``accuracy`` = fraction of predicted tokens whose argmax prediction is the true next token.

Strided long-context perplexity and lm-eval-style multiple choice come with issue 5.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class EvalMetrics:
    perplexity: float
    accuracy: float
    nll: float
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor, batch_size: int = 8,
             device: str | torch.device = "cpu") -> EvalMetrics:
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    nll_sum, correct, count = 0.0, 0, 0
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        nll_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    if was_training:
        model.train()
    nll = nll_sum / count
    return EvalMetrics(perplexity=math.exp(min(nll, 700.0)), accuracy=correct / count, nll=nll,
                       tokens=count, seconds=time.perf_counter() - t0)
