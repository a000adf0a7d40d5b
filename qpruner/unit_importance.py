"""How much each unit (decoder layer, module group or projection) matters: one score per unit,
higher = keep more bits. All estimators run on the pruned, unquantized model and the calibration
split. ``W_u`` is the set of weights of unit ``u``; ``g_b`` the gradient of sample ``b``'s loss, ``g``
that of the mean loss.

* ``fisher``: ``S_u = sum_b sum_{w in W_u} (w * g_b(w))**2`` — the diagonal empirical Fisher
  estimate of the loss increase ``0.5 * sum F_ww * dw**2`` when every weight gets relative noise
  ``dw ~ w``, which is what block-wise absmax quantization does (up to a constant per precision).
* ``taylor``: ``S_u = sum_{w in W_u} |w * g(w)|`` (first order, as the pruning stage).
* ``block_influence``: ``S_u = 1 - mean_t cos(x_t, x'_t)`` with ``x``/``x'`` the residual stream before
  and after the unit (ShortGPT's Block Influence). Layer and group units. No gradients.
* ``mutual_information`` (default): the information about the model's output that quantizing the unit loses.
  With the model's own predictive distribution ``p`` as the decoder, the Barber-Agakov bound
  ``I(X; Y) >= H(Y) - E_t[CE(p_t, q_t)]`` is tight for ``q = p``; with unit ``u`` quantized the model
  predicts ``p~`` and the bound drops by exactly ``E_t KL(p_t || p~_t)`` nats. To second order that is
  ``0.5 * sum_{w in W_u} F_ww * (d4(w)**2 - d8(w)**2)``: ``F`` the model's Fisher information
  (gradients of the log-likelihood of tokens *sampled from the model's own predictions*, per
  calibration sequence) and ``d4`` / ``d8`` each weight's real bitsandbytes round-trip error in the
  4-bit format and in int8 — so the score is the information lost by storing the unit in 4 instead of
  8 bits, the choice the search makes. The paper's own MI estimator is not public; ours differs from a
  "layer output vs model output" MI (which is the same for every layer of a deterministic network)
  in measuring what quantization destroys, and it needs the gradients of a few sequences, no probes.
  The default because it ranks units closest to the measured truth of all but ``sensitivity`` (which costs
  about 5x as much): ``results/bench/importance_truth.md`` and ``results/bench/importance.md``.
* ``sensitivity``: measured, one forward pass per unit: ``S_u = mean_t KL(p_t || p~_t)``, with
  ``p~`` the predictive distribution of the model with only unit ``u`` quantized to the 4-bit format.
  This is the increase of the loss against the model's own predictions (the distillation loss) — it
  cannot be negative and, unlike the loss against the text's next tokens, is not drowned in the
  noise of a few hundred calibration tokens. The ground truth the other estimators approximate.

Scores are cached by the driver per (model, pruning, data, method, unit) so a resumed search does not
recompute them (:mod:`qpruner.job`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import models
from .config import LINEAR_NAMES, QuantConfig, ScoreConfig
from .errors import ConfigError, ModelError
from .plan import UNIT_MEMBERS, units_per_layer
from .group_importance import accumulate_gradients
from .progress import Progress

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class UnitScores:
    """One importance score per precision unit, with the method and the time taken."""
    method: str
    scores: tuple[float, ...]   # one per unit, layer by layer
    unit: str = "layer"
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.scores)

    def ranking(self) -> list[int]:
        """Unit indices, most important first."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])


def _by_unit(per_linear: list[dict[str, float]], unit: str) -> list[float]:
    """Sum per-linear scores into units."""
    return [sum(layer[name] for name in names) for layer in per_linear for names in UNIT_MEMBERS[unit]]


def _weights(model: nn.Module) -> list[dict[str, nn.Parameter]]:
    return [{n: m.weight for n, m in models.layer_linears(layer).items()} for layer in models.decoder_layers(model)]


def _fisher(model, calib, unit, **_) -> list[float]:
    weights = _weights(model)
    per_linear = [{n: 0.0 for n in LINEAR_NAMES} for _ in weights]
    progress = Progress(logger, "layer scores (fisher)", calib.shape[0])
    for sample in calib.split(1):
        accumulate_gradients(model, sample, batch_size=1)
        progress.step()
        for acc, layer in zip(per_linear, weights):
            for name, w in layer.items():
                acc[name] += float(((w.data.float() * w.grad.float()) ** 2).sum())
    model.zero_grad(set_to_none=True)
    return _by_unit(per_linear, unit)


def _taylor(model, calib, unit, **_) -> list[float]:
    accumulate_gradients(model, calib, what="layer scores (taylor)")
    per_linear = [{n: float((w.data.float() * w.grad.float()).abs().sum()) for n, w in layer.items()}
                  for layer in _weights(model)]
    model.zero_grad(set_to_none=True)
    return _by_unit(per_linear, unit)


def _residual_streams(model: nn.Module, batch: torch.Tensor, unit: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residual stream before the first unit and after every unit ([tokens, hidden] each), and
    the model's logits, from one forward pass."""
    layers = models.decoder_layers(model)
    inputs, attn_out, outputs = {}, {}, {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, args, output, i=i: attn_out.__setitem__(i, output[0] if isinstance(output, tuple) else output)))
        handles.append(layer.register_forward_hook(
            lambda m, args, output, i=i: outputs.__setitem__(i, output[0] if isinstance(output, tuple) else output)))
    try:
        logits = model(input_ids=batch).logits
    finally:
        for h in handles:
            h.remove()
    flat = lambda t: t.reshape(-1, t.shape[-1]).float()
    streams = [flat(inputs[0])]
    for i in range(len(layers)):
        if unit == "group":
            streams.append(flat(inputs[i] + attn_out[i]))
        streams.append(flat(outputs[i]))
    return streams, logits


def _check_residual_unit(method: str, unit: str) -> None:
    if unit not in ("layer", "group"):
        raise ConfigError([f"score.method: {method} scores layers or module groups, not {unit!r} units; "
                           "with policy.unit=linear use fisher, taylor, mutual_information or sensitivity"])


@torch.no_grad()
def _block_influence(model, calib, unit, **_) -> list[float]:
    _check_residual_unit("block_influence", unit)
    device = next(model.parameters()).device
    sums, count = None, 0
    progress = Progress(logger, "layer scores (block influence)", calib.shape[0])
    for batch in calib.split(4):
        streams, _ = _residual_streams(model, batch.to(device), unit)
        values = torch.stack([(1.0 - F.cosine_similarity(a, b, dim=-1)).sum() for a, b in zip(streams, streams[1:])])
        sums = values if sums is None else sums + values
        count += streams[0].shape[0]
        progress.step(batch.shape[0])
    return (sums / count).tolist()


def _fisher_weighted(model: nn.Module, calib: torch.Tensor, weights, weight_by, draws: int = 2,
                     seed: int = 0, what: str = "empirical Fisher") -> list[dict[str, float]]:
    """``sum_w F_ww * weight_by[w]`` per linear, with ``F`` the diagonal Fisher information of the
    decoder-linear weights: per calibration sequence, the squared gradient of the log-likelihood of tokens
    sampled from the model's own predictions (``draws`` per sequence), averaged. ``weights``:
    :func:`_weights` of ``model``; ``weight_by``: one tensor per weight, of its shape, on any device.

    Only one scalar per linear is accumulated: no per-weight copy of the Fisher on the model's device
    (LLaMA-7B's would be 20 GB in float32 next to the weights and their gradients). ``weight_by`` may
    live on the CPU; each linear's tensor is brought to the gradient's device for its product."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = [w for layer in weights for w in layer.values()]
    wanted = {id(p) for p in params}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    sums = [{n: 0.0 for n in layer} for layer in weights]
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        progress = Progress(logger, f"layer scores ({what})", calib.shape[0])
        for sample in calib.split(1):
            sample = sample.to(device)
            logits = model(input_ids=sample).logits.float()
            probs = logits.detach().softmax(-1).reshape(-1, logits.shape[-1]).cpu()
            for d in range(draws):
                labels = torch.multinomial(probs, 1, generator=gen).reshape(sample.shape).to(device)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
                loss.backward(retain_graph=d < draws - 1)
                with torch.no_grad():
                    for acc, layer, by in zip(sums, weights, weight_by):
                        for name, w in layer.items():
                            acc[name] += float((w.grad.float() ** 2 * by[name].to(w.grad.device)).sum())
                            w.grad = None
                count += 1
            progress.step()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
    return [{n: v / count for n, v in layer.items()} for layer in sums]


def _round_trip_error(lin: nn.Linear, fmt: str, quant: QuantConfig) -> torch.Tensor:
    """``w - dequantize(quantize(w))`` of a linear stored in ``fmt`` with bitsandbytes (real kernels)."""
    from .quantize import convert_linear, dequantized   # the bitsandbytes boundary
    device = lin.weight.device
    stored = convert_linear(lin, fmt, quant, device, torch.float32)
    return lin.weight.data.float() - dequantized(stored).to(device)


def _mutual_information(model, calib, unit, quant: QuantConfig | None = None, **_) -> list[float]:
    quant = quant or QuantConfig()
    weights = _weights(model)
    # each weight's extra squared round-trip error in 4 bits over int8, d4(w)^2 - d8(w)^2: on the CPU
    # (float32), so that the GPU holds only the model, its gradients and one linear's factor at a time
    extra = []
    layers = models.decoder_layers(model)
    progress = Progress(logger, "layer scores (mutual information): round-trip errors", len(layers), unit="layers")
    with torch.no_grad():
        for layer in layers:
            extra.append({name: (_round_trip_error(lin, quant.four_bit, quant) ** 2
                                 - _round_trip_error(lin, "int8", quant) ** 2).cpu()
                          for name, lin in models.layer_linears(layer).items()})
            progress.step()
    per_linear = [{n: 0.5 * v for n, v in layer.items()}
                  for layer in _fisher_weighted(model, calib, weights, extra, what="mutual information: Fisher pass")]
    return _by_unit(per_linear, unit)


@torch.no_grad()
def _log_probs(model: nn.Module, calib: torch.Tensor) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=batch.to(device)).logits.float().log_softmax(-1) for batch in calib.split(4)]


@torch.no_grad()
def _sensitivity(model, calib, unit, quant: QuantConfig | None = None, **_) -> list[float]:
    from .quantize import convert_linear  # the bitsandbytes boundary
    quant = quant or QuantConfig()
    device = next(model.parameters()).device
    compute = next(model.parameters()).dtype
    reference = _log_probs(model, calib)
    tokens = sum(r.shape[0] * r.shape[1] for r in reference)
    scores = []
    layers = models.decoder_layers(model)
    progress = Progress(logger, "layer scores (sensitivity)", len(layers), unit="layers")
    for layer in layers:
        originals = models.layer_linears(layer)
        for names in UNIT_MEMBERS[unit]:
            for name in names:
                models.set_layer_linear(layer, name, convert_linear(originals[name], quant.four_bit, quant, device, compute))
            try:
                kl = sum(float((ref.exp() * (ref - q)).sum()) for ref, q in zip(reference, _log_probs(model, calib)))
                scores.append(kl / tokens)
            finally:
                for name in names:
                    models.set_layer_linear(layer, name, originals[name])
        progress.step()
    return scores


ESTIMATORS = {"fisher": _fisher, "taylor": _taylor, "block_influence": _block_influence,
              "mutual_information": _mutual_information, "sensitivity": _sensitivity}


def score_units(model: nn.Module, calib: torch.Tensor, cfg: ScoreConfig, unit: str = "layer",
                quant: QuantConfig | None = None) -> UnitScores:
    """One score per unit (``layer`` | ``group`` | ``linear``) with ``cfg.method``."""
    t0 = time.perf_counter()
    units_per_layer(unit)
    samples = calib if cfg.samples is None else calib[: cfg.samples]
    scores = ESTIMATORS[cfg.method](model, samples, unit, quant=quant)
    if any(not math.isfinite(s) for s in scores):
        raise ModelError(f"score.method {cfg.method} produced non-finite layer scores on this model; check the "
                         "calibration data (data.source) and model.dtype (float32 is the safe choice)")
    result = UnitScores(cfg.method, tuple(float(s) for s in scores), unit, time.perf_counter() - t0)
    logger.info("%s scores (%s, %.1fs): most important units %s", unit, cfg.method, result.seconds,
                result.ranking()[:5])
    return result
