"""One search trial: plan -> quantize -> fine-tune LoRA -> evaluate -> measure. Knows nothing of Ray.

The driver builds a :class:`TrialContext` once (pruned weights, token splits, configs); Ray ships it
to workers through the object store. :func:`run_trial` rebuilds the pruned model from it, so no
trial loads or prunes the original model again.

Objective (higher is better, what the searcher maximises):

* feasible plans: ``accuracy`` (next-token accuracy on held-out text), or ``-log(perplexity)``
  when ``search.metric`` is ``perplexity``;
* plans over the memory budget are **not trained**: their weight memory is known exactly before
  building anything, so they return at once with ``objective = -1000 - excess`` (``excess`` =
  relative overshoot of the budget). That is below every feasible value and still tells the
  searcher which infeasible plans were closer to the budget;
* trials that fail on their own (non-finite loss, out of memory) report ``objective = -2000`` and
  their reason; any other error propagates and is recorded by the search as an errored trial.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import models
from .config import EvalConfig, FinetuneConfig, QuantConfig
from .errors import TrialFailed
from .evaluate import EvalMetrics, evaluate
from .finetune import attach_lora, finetune_
from .finetune_memory import estimate as estimate_finetune_memory, measure_peak
from .memory import Budget, ModelLayout, adapter_bytes, measure_bytes, plan_bytes
from .plan import PrecisionPlan
from .quantize import quantize_, resolve_compute_dtype

logger = logging.getLogger(__name__)

INFEASIBLE_OBJECTIVE = -1000.0
FAILED_OBJECTIVE = -2000.0


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, built once by the driver."""
    config_dict: dict
    state_dict: dict
    layout: ModelLayout
    train: torch.Tensor
    eval: torch.Tensor
    quant: QuantConfig
    finetune: FinetuneConfig
    evaluation: EvalConfig
    budget: Budget
    metric: str = "accuracy"
    unit: str = "layer"

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers


@dataclass(frozen=True)
class TrialResult:
    plan: PrecisionPlan
    status: str                       # ok | infeasible | failed
    objective: float
    weight_bytes: int                 # total weight memory (measured when trained, else predicted)
    weight_bytes_predicted: int
    avg_bits: float
    budget_excess: float = 0.0
    accuracy: float | None = None
    perplexity: float | None = None
    perplexity_before: float | None = None
    accuracy_before: float | None = None
    adapter_bytes: int | None = None
    peak_bytes: int | None = None
    peak_kind: str = "none"
    peak_bytes_estimate: int | None = None
    train_loss_first: float | None = None
    train_loss_final: float | None = None
    eval_tokens_per_s: float | None = None
    seconds: dict = field(default_factory=dict)
    device: str = "cpu"
    error: str | None = None

    def to_metrics(self) -> dict:
        """Flat, scalar-only dict (what the trainable reports to Ray Tune)."""
        d = asdict(self)
        d.pop("plan")
        d["plan_formats"] = ",".join(self.plan.formats)
        d["plan_code"] = self.plan.code()
        d["plan_unit"] = self.plan.unit
        for k, v in d.pop("seconds").items():
            d[f"seconds_{k}"] = v
        return d

    @classmethod
    def from_metrics(cls, d: dict) -> "TrialResult":
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in names and k not in ("plan", "seconds")}
        seconds = {k[len("seconds_"):]: v for k, v in d.items() if k.startswith("seconds_")}
        plan = PrecisionPlan(tuple(d["plan_formats"].split(",")), d.get("plan_unit", "layer"))
        return cls(plan=plan, seconds=seconds, **kwargs)


def objective_of(metrics: EvalMetrics, metric: str) -> float:
    return metrics.accuracy if metric == "accuracy" else -math.log(metrics.perplexity)


def _compute_dtype_name(ctx: TrialContext, device: torch.device) -> str:
    return str(resolve_compute_dtype(ctx.quant, device)).removeprefix("torch.")


def predict_memory(ctx: TrialContext, plan: PrecisionPlan, device: torch.device):
    return plan_bytes(ctx.layout, plan, ctx.quant, _compute_dtype_name(ctx, device))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_trial(ctx: TrialContext, plan: PrecisionPlan, device: str | torch.device = "cpu",
              on_step: Callable[[int, float], None] | None = None) -> TrialResult:
    device = torch.device(device)
    t0 = time.perf_counter()
    plan.check_units(ctx.n_layers)
    predicted = predict_memory(ctx, plan, device)
    excess = ctx.budget.excess(predicted)
    peak_estimate = estimate_finetune_memory(ctx.layout, plan, ctx.quant, ctx.finetune, ctx.train.shape[1],
                                             _compute_dtype_name(ctx, device)).total
    common = dict(plan=plan, weight_bytes_predicted=predicted.total_bytes, avg_bits=predicted.avg_bits,
                  budget_excess=excess, device=str(device), peak_bytes_estimate=peak_estimate)
    if excess > 0:
        return TrialResult(status="infeasible", objective=INFEASIBLE_OBJECTIVE - excess,
                           weight_bytes=predicted.total_bytes, seconds={"total": time.perf_counter() - t0},
                           **common)
    seconds: dict[str, float] = {}
    model = None
    try:
        t = time.perf_counter()
        model = models.build_model(ctx.config_dict, ctx.state_dict)
        quantize_(model, plan, ctx.quant, device)
        seconds["quantize"] = time.perf_counter() - t
        measured = measure_bytes(model)
        if measured.total_bytes != predicted.total_bytes:
            logger.warning("measured weight bytes %d differ from predicted %d", measured.total_bytes,
                           predicted.total_bytes)
        before = None
        if ctx.evaluation.before_finetune:
            before = evaluate(model, ctx.eval, ctx.evaluation.batch_size, device)
        t = time.perf_counter()
        torch.manual_seed(ctx.finetune.seed)  # same plan -> same adapters -> same result, in any worker
        model = attach_lora(model, ctx.finetune)
        resident = measured.total_bytes + adapter_bytes(model)
        with measure_peak(device, resident) as peak:
            stats = finetune_(model, ctx.train, ctx.finetune, device, on_step=on_step)
        seconds["finetune"] = time.perf_counter() - t
        after = evaluate(model, ctx.eval, ctx.evaluation.batch_size, device)
        seconds["eval"] = after.seconds
        seconds["total"] = time.perf_counter() - t0
        return TrialResult(
            status="ok", objective=objective_of(after, ctx.metric), weight_bytes=measured.total_bytes,
            accuracy=after.accuracy, perplexity=after.perplexity,
            perplexity_before=before.perplexity if before else None,
            accuracy_before=before.accuracy if before else None,
            adapter_bytes=adapter_bytes(model), peak_bytes=peak.peak_bytes, peak_kind=peak.kind,
            train_loss_first=stats.first_loss, train_loss_final=stats.final_loss,
            eval_tokens_per_s=after.tokens_per_second, seconds=seconds, **common)
    except (TrialFailed, torch.OutOfMemoryError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning("trial failed: %s", reason)
        seconds["total"] = time.perf_counter() - t0
        return TrialResult(status="failed", objective=FAILED_OBJECTIVE, weight_bytes=predicted.total_bytes,
                           seconds=seconds, error=reason[:2000], **common)
    finally:
        del model
        _release(device)
