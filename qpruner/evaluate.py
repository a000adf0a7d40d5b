"""Evaluation of the model as it is (quantized and adapted): perplexity and next-token accuracy.

Strided-window perplexity (as Hugging Face's perplexity guide describes it): the evaluation split is
one contiguous token stream of ``N`` tokens. Windows of ``context`` tokens start every ``stride``
tokens; in each window only the tokens not already scored by the previous window are scored (the
first window scores all but its first token), each predicted from everything before it in the
window. With ``stride == context`` the windows do not overlap; a smaller stride gives every scored
token at least ``context - stride`` tokens of left context, and costs ``context / stride`` times more.

* ``perplexity = exp(sum NLL / scored tokens)``;
* ``accuracy`` = fraction of scored tokens whose argmax prediction is the true next token.

Standard errors. Tokens of one window are not independent, so the unit of resampling is the window:
with per-window sums ``s_i`` (NLL, or correct predictions) over ``c_i`` scored tokens and the mean
``m = sum s / sum c``, the ratio-estimator variance is
``n / (n - 1) * sum_i (s_i - m c_i)^2 / (sum c)^2`` (the delta-method form of the block bootstrap).
The per-window sums are kept (``window_nll``, ``window_tokens``), so two evaluations on the same
tokens give a *paired* difference with its own, much smaller, standard error (:func:`paired_diff`).

Zero-shot multiple choice, computed as lm-evaluation-harness does, lives in :mod:`qpruner.tasks`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .results import paired_diff, ratio_se  # noqa: F401  (window statistics live with the results: no torch)


@dataclass(frozen=True)
class EvalMetrics:
    """Held-out perplexity and next-token accuracy with their standard errors and per-window sums."""
    perplexity: float
    accuracy: float
    nll: float
    tokens: int
    seconds: float
    nll_se: float = float("nan")
    accuracy_se: float = float("nan")
    window_nll: tuple[float, ...] = ()      # NLL summed over each window's scored tokens
    window_tokens: tuple[int, ...] = ()     # scored tokens per window
    window_correct: tuple[int, ...] = ()    # correct next-token predictions per window

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window: tokens ``[begin, end)`` go in, the last ``scored`` are scored."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        scored = end - max(prev_end, begin + 1)  # the very first token has no prediction
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, device: str | torch.device = "cpu",
             context: int | None = None, stride: int | None = None) -> EvalMetrics:
    """Strided perplexity and next-token accuracy over ``ids`` (a [N, L] split, read as one stream)."""
    t0 = time.perf_counter()
    stream = ids.reshape(-1)
    context = context or ids.shape[-1]
    stride = min(stride or context, context)
    was_training = model.training
    model.eval()
    w_nll: list[float] = []
    w_correct: list[int] = []
    w_count: list[int] = []
    spans = windows(stream.numel(), context, stride)
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        by_length.setdefault(span[1] - span[0], []).append(span)
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            batch = torch.stack([stream[b:e] for b, e, _ in chunk]).to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            target = batch[:, 1:]
            mask = torch.zeros_like(target, dtype=torch.bool)
            for row, (_, _, scored) in enumerate(chunk):
                mask[row, length - 1 - scored:] = True
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            nll = torch.where(mask, nll.view(target.shape), 0.0)   # an unscored position never poisons a sum
            w_nll += nll.double().sum(1).tolist()
            w_correct += ((logits.argmax(-1) == target) & mask).sum(1).tolist()
            w_count += mask.sum(1).tolist()
    if was_training:
        model.train()
    count = sum(w_count)
    nll = sum(w_nll) / count
    return EvalMetrics(perplexity=math.exp(min(nll, 700.0)), accuracy=sum(w_correct) / count, nll=nll,
                       tokens=count, seconds=time.perf_counter() - t0, nll_se=ratio_se(w_nll, w_count),
                       accuracy_se=ratio_se(w_correct, w_count), window_nll=tuple(w_nll),
                       window_tokens=tuple(int(c) for c in w_count), window_correct=tuple(int(c) for c in w_correct))
