"""How much each decoder layer matters: one score per layer (higher = keep more bits).

Estimators (all on the pruned, unquantized model and the calibration split):

* ``fisher`` (default): ``S_l = sum_b sum_{w in layer l} (w * g_b(w))**2`` with ``g_b`` the gradient
  of sample ``b``'s loss. A second-order (diagonal empirical Fisher) estimate of the loss increase
  ``0.5 * sum F_ww * dw**2`` when every weight gets relative noise ``dw ~ w`` — which is what
  block-wise absmax quantization does — up to a constant per precision.
* ``taylor``: ``S_l = sum_{w in layer l} |w * g(w)|`` with ``g`` the gradient of the mean loss
  (first order; same element importance as the pruning stage).
* ``block_influence``: ``S_l = 1 - mean_tokens cos(x_in, x_out)`` (ShortGPT's Block Influence):
  how much layer ``l`` changes its residual stream. No gradients.

The QPruner paper uses mutual information between a layer's output and the prediction; that
estimator, per-module granularity and measured quantization sensitivity come with issue 4.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .config import ScoreConfig
from .prune_importance import accumulate_gradients

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerScores:
    method: str
    scores: tuple[float, ...]   # one per decoder layer
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.scores)

    def ranking(self) -> list[int]:
        """Layer indices, most important first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])


def _linear_weights(layer: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in models.layer_linears(layer).values()]


def _fisher(model: nn.Module, calib: torch.Tensor) -> list[float]:
    layers = models.decoder_layers(model)
    scores = torch.zeros(len(layers), dtype=torch.float64)
    for sample in calib.split(1):
        accumulate_gradients(model, sample, batch_size=1)
        for i, layer in enumerate(layers):
            scores[i] += sum(float(((w.data.float() * w.grad.float()) ** 2).sum()) for w in _linear_weights(layer))
    model.zero_grad(set_to_none=True)
    return scores.tolist()


def _taylor(model: nn.Module, calib: torch.Tensor) -> list[float]:
    accumulate_gradients(model, calib)
    out = [sum(float((w.data.float() * w.grad.float()).abs().sum()) for w in _linear_weights(layer))
           for layer in models.decoder_layers(model)]
    model.zero_grad(set_to_none=True)
    return out


def _block_influence(model: nn.Module, calib: torch.Tensor) -> list[float]:
    layers = models.decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(idx):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            captured[idx] = (x_in.detach(), x_out.detach())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in calib.split(4):
                model(input_ids=batch.to(device))
                for i, (x_in, x_out) in captured.items():
                    cos = nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
                    sums[i] += float((1.0 - cos).sum())
                count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / count).tolist()


ESTIMATORS = {"fisher": _fisher, "taylor": _taylor, "block_influence": _block_influence}


def score_layers(model: nn.Module, calib: torch.Tensor, cfg: ScoreConfig) -> LayerScores:
    t0 = time.perf_counter()
    samples = calib if cfg.samples is None else calib[: cfg.samples]
    scores = ESTIMATORS[cfg.method](model, samples)
    result = LayerScores(cfg.method, tuple(float(s) for s in scores), time.perf_counter() - t0)
    logger.info("layer scores (%s, %.1fs): most important layers %s", cfg.method, result.seconds,
                result.ranking()[:5])
    return result
