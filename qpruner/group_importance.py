"""Importance of prunable groups: LLM-Pruner's estimators, written out.

A *group* is a set of parameter slices removed together (a KV head with its query heads, an MLP
channel, a hidden channel, a whole layer). Each parameter contributes one slice per group; see
:class:`qpruner.surgery.Coupled`. For a weight ``w`` with gradient ``g`` of the mean calibration loss
and ``F = sum_b g_b**2`` (per-sample squared gradients, the diagonal empirical Fisher):

==================  ==========================================  =====================================
``importance``      element salience ``s(w)``                   score of a parameter's slice
==================  ==========================================  =====================================
``l1``              ``|w|``                                     ``sum s``
``l2``              ``w**2``                                    ``sum s``
``random``          —                                           seeded uniform score per group
``taylor_vector``   ``w * g``                                   ``|sum s|``  (vector-wise Taylor)
``taylor``          ``|w * g|``                                 ``sum s``    (LLM-Pruner param_first)
``param_second``    ``|w * F * w|``                             ``sum s``    (LLM-Pruner param_second)
``param_mix``       ``|-w * g + 0.5 * w * F * w|``              ``sum s``    (LLM-Pruner param_mix)
==================  ==========================================  =====================================

``taylor`` is the first-order estimate of the loss change when the slice is zeroed; ``param_second``
its second-order term (the Hessian approximated by the Fisher); ``param_mix`` both. A group's score
aggregates its parameters' slice scores with ``sum`` (default), ``mean`` or ``max`` (LLM-Pruner's
``group_reduction``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import models
from .progress import Progress
from .surgery import Coupled

logger = logging.getLogger(__name__)

ESTIMATORS = ("l1", "l2", "random", "taylor_vector", "taylor", "param_second", "param_mix")
FIRST_ORDER = {"taylor_vector", "taylor", "param_mix"}
SECOND_ORDER = {"param_second", "param_mix"}
AGGREGATIONS = ("sum", "mean", "max")


def accumulate_gradients(model: nn.Module, calib: torch.Tensor, batch_size: int = 4,
                         params: list[nn.Parameter] | None = None, fisher: bool = False,
                         what: str | None = None) -> dict[int, torch.Tensor]:
    """Set ``.grad`` of ``params`` (default: decoder-linear weights) to the gradient of the mean LM loss
    over ``calib``; other parameters get no gradient (saves memory and time). ``what``: log progress with an
    ETA under that name (:class:`qpruner.progress.Progress`).

    With ``fisher=True`` samples go one at a time and ``{id(param): sum_b g_b**2}`` is returned too.
    """
    device = next(model.parameters()).device
    if params is None:
        params = [m.weight for layer in models.decoder_layers(model) for m in models.layer_linears(layer).values()]
    wanted = {id(p) for p in params}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    squares: dict[int, torch.Tensor] = {}
    total: dict[int, torch.Tensor] = {}
    n = calib.shape[0]
    progress = Progress(logger, what, n) if what else None
    try:
        for batch in calib.split(1 if fisher else batch_size):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch).loss
            if not fisher:
                (loss * (batch.shape[0] / n)).backward()
            else:
                loss.backward()
                for p in params:
                    g = p.grad.detach().float()
                    squares[id(p)] = squares.get(id(p), 0) + g * g
                    total[id(p)] = total.get(id(p), 0) + g / n
                    p.grad = None
            if progress is not None:
                progress.step(batch.shape[0])
        for p in params if fisher else ():
            p.grad = total[id(p)].to(p.dtype)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
    return squares


def element_salience(param: nn.Parameter, method: str, fisher: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-element importance of ``param`` under ``method`` (magnitude, Taylor, Fisher)."""
    w = param.data.float()
    if method == "l1":
        return w.abs()
    if method == "l2":
        return w * w
    g = None
    if method in FIRST_ORDER:
        if param.grad is None:
            raise RuntimeError(f"{method} importance needs gradients; call accumulate_gradients first")
        g = param.grad.float()
    if method == "taylor_vector":
        return w * g
    if method == "taylor":
        return (w * g).abs()
    f = fisher[id(param)] if fisher is not None and id(param) in fisher else None
    if f is None:
        raise RuntimeError(f"{method} importance needs per-sample squared gradients (fisher=True)")
    if method == "param_second":
        return (w * f * w).abs()
    if method == "param_mix":
        return (-w * g + 0.5 * w * f * w).abs()
    raise ValueError(f"unknown importance {method!r}; expected one of {ESTIMATORS}")


def slice_scores(salience: torch.Tensor, part: Coupled, vector: bool) -> torch.Tensor:
    """``[part.n]`` scores: the salience summed within each of the ``n`` blocks along ``part.dim``."""
    blocks = salience.movedim(part.dim, 0).reshape(part.n, -1).sum(1)
    return blocks.abs() if vector else blocks


def group_scores(parts: list[Coupled], method: str, aggregation: str = "sum",
                 fisher: dict[int, torch.Tensor] | None = None, gen: torch.Generator | None = None) -> torch.Tensor:
    """Score of each of the ``n`` groups that ``parts`` (all with the same ``n``) describe."""
    n = parts[0].n
    if method == "random":
        return torch.rand(n, generator=gen)
    per_param = torch.stack([slice_scores(element_salience(p.param, method, fisher), p, method == "taylor_vector").cpu()
                             for p in parts])
    if aggregation == "sum":
        return per_param.sum(0)
    if aggregation == "mean":
        return per_param.mean(0)
    if aggregation == "max":
        return per_param.amax(0)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
