"""One search trial: plan -> (LoftQ) -> quantize -> LoRA fine-tune -> evaluate -> measure. No Ray here.

The driver builds a :class:`TrialContext` once (where the pruned weights are, token splits, tokenized
tasks, configs); it is small, and Ray ships it to workers through the object store. :func:`run_trial`
builds the plan's quantized model from the pruned weights one linear at a time (:mod:`qpruner.build`), so
no trial loads or prunes the original model again or holds it in full precision, and it evaluates the model
it trained — the bitsandbytes modules with their adapters, never a de-quantized stand-in.

Objective (maximised by the searcher): ``sum_m w_m * f_m`` over the weights of ``search.objective``
(default: weight 1 on ``search.metric``), with ``f = -log(perplexity)`` for perplexity and the value
itself for accuracies (next-token ``accuracy``, ``<task>:acc``, ``<task>:acc_norm``).

* plans over the memory budget are **not trained**: their weight memory is known exactly before
  building anything, so they return at once with ``objective = -1000 - excess`` (``excess`` = relative
  overshoot of the budget) — below every feasible value, still ordered by distance to the budget;
* trials that fail on their own (non-finite loss, out of memory) report ``objective = -2000`` and their
  reason; any other error propagates and is recorded by the search as an errored trial.

Multi-fidelity (``search.screen_share > 0``): a **screen** (:func:`run_screen`) builds the plan's model as a
trial does (quantized, LoRA LoftQ-initialised) but does not fine-tune it, and evaluates it on the first
``screen_windows`` evaluation windows only; its result has ``status = "screened"``, ``fidelity = "screen"``
and never stands on the front. A full trial then also evaluates its own screen before fine-tuning
(``objective_screen``), which tells the searcher how the two fidelities relate.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .config import EvalConfig, FinetuneConfig, QuantConfig
from .errors import TrialFailed
from .evaluate import EvalMetrics, evaluate
from .finetune import StepProgress, finetune_
from .finetune_memory import ADMISSION_MARGIN, estimate as estimate_finetune_memory, measure_peak, trim_heap
from .build import build_quantized, quantized_with_lora  # noqa: F401  (re-exported)
from .loftq import LoftQCache
from .memory import Budget, ModelLayout, adapter_bytes, plan_bytes
from .plan import PrecisionPlan
from .quantize import resolve_compute_dtype
from .results import FAILED_OBJECTIVE, INFEASIBLE_OBJECTIVE, TrialResult  # noqa: F401  (re-exported)
from .tasks import TokenizedTask, score

logger = logging.getLogger(__name__)



NODE_CACHE = "node"   # TrialContext.loftq_cache: the LoftQ cache in each node's local cache (weights at a URI)


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs, built once by the driver."""
    config_dict: dict
    model_weights: object                         # PrunedWeights (by location), or a state dict (tests, benchmarks)
    layout: ModelLayout
    train: torch.Tensor
    eval: torch.Tensor
    quant: QuantConfig
    finetune: FinetuneConfig
    evaluation: EvalConfig
    budget: Budget
    metric: str = "accuracy"
    unit: str = "layer"
    objective: dict | None = None                 # metric -> weight; None: {metric: 1}
    tasks: tuple[TokenizedTask, ...] = ()
    screen_windows: int = 0                       # > 0: the search screens plans on this many evaluation windows
    loftq_cache: str | None = None                # LoftQ cache folder (weights by location only), NODE_CACHE, or None (off)

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def weights(self) -> dict:
        return dict(self.objective) if self.objective else {self.metric: 1.0}


def metric_values(ev: EvalMetrics, tasks: dict[str, float]) -> dict[str, float]:
    """The metrics a trial reports, by name."""
    return {"accuracy": ev.accuracy, "perplexity": ev.perplexity, **tasks}


def metric_ses(ev: EvalMetrics, tasks: dict[str, float]) -> dict[str, float]:
    """Standard error of each objective term (perplexity's term is -log(perplexity) = -nll)."""
    return {"accuracy": ev.accuracy_se, "perplexity": ev.nll_se,
            **{k[:-3]: v for k, v in tasks.items() if k.endswith("_se")}}


def objective_of(values: dict[str, float], weights: dict[str, float]) -> float:
    """The searcher's objective: the weighted sum of the metric terms (see the module docstring)."""
    total = 0.0
    for name, w in weights.items():
        v = values[name]
        total += w * (-math.log(v) if name == "perplexity" else v)
    return total


def objective_se_of(ses: dict[str, float], weights: dict[str, float]) -> float:
    """Standard error of the objective, treating its terms as independent (exact for one term)."""
    return math.sqrt(sum((w * ses.get(name, float("nan"))) ** 2 for name, w in weights.items()))


def _release(device: torch.device) -> None:
    gc.collect()
    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _evaluate(ctx: TrialContext, model, device, windows: int | None = None) -> EvalMetrics:
    e = ctx.evaluation
    ids = ctx.eval if windows is None else ctx.eval[:windows]
    return evaluate(model, ids, e.batch_size, device, context=e.context, stride=e.stride)


def _screen_objective(ctx: TrialContext, ev: EvalMetrics) -> float:
    """The objective of a screen's evaluation (its terms must be evaluation metrics: JobConfig checks)."""
    return objective_of(metric_values(ev, {}), ctx.weights)


def _build_quantized(ctx: TrialContext, plan: PrecisionPlan, device: torch.device, seconds: dict | None = None):
    """The pruned model quantized to ``plan`` with LoRA attached (LoftQ-initialised if configured), read from the
    context's weights one linear at a time; LoftQ results come from (and go to) the pruned model's cache."""
    from .weights import PrunedWeights, open_weights
    source = open_weights(ctx.model_weights)
    cache = None
    if isinstance(ctx.model_weights, PrunedWeights) and ctx.finetune.init == "loftq" and ctx.loftq_cache:
        compute = resolve_compute_dtype(ctx.quant, device)
        from .weights import cache_root
        root = cache_root() / "loftq" if ctx.loftq_cache == NODE_CACHE else ctx.loftq_cache
        cache = LoftQCache(LoftQCache.folder(root, ctx.model_weights.key, ctx.quant, ctx.finetune, device, compute))
    model, measured = build_quantized(ctx.config_dict, source, plan, ctx.quant, ctx.finetune, device, cache,
                                      seconds=seconds)
    if cache is not None and (cache.hits or cache.misses):
        logger.info("LoftQ cache: %d linears reused, %d computed (%s)", cache.hits, cache.misses, cache.directory)
    return model, measured


@dataclass(frozen=True)
class Precheck:
    """What a plan costs, known before building anything (small: the driver keeps one per search). A plan over
    the weight budget, or whose predicted fine-tuning peak exceeds ``memory_limit`` (bytes; None: no limit),
    is answered at once with an ``infeasible`` result and its reason: never built, never trained."""
    layout: ModelLayout
    quant: QuantConfig
    finetune: FinetuneConfig
    budget: Budget
    seq_len: int
    memory_limit: int | None = None

    @classmethod
    def of(cls, ctx: TrialContext, memory_limit: int | None = None) -> "Precheck":
        return cls(ctx.layout, ctx.quant, ctx.finetune, ctx.budget, ctx.train.shape[1], memory_limit)

    def peak(self, plan: PrecisionPlan, device: str | torch.device = "cpu") -> int:
        """The predicted fine-tuning peak of ``plan`` (bytes; :func:`qpruner.finetune_memory.estimate`)."""
        compute = str(resolve_compute_dtype(self.quant, torch.device(device))).removeprefix("torch.")
        return estimate_finetune_memory(self.layout, plan, self.quant, self.finetune, self.seq_len, compute).total

    def __call__(self, plan: PrecisionPlan, device: str | torch.device = "cpu") -> tuple[dict, TrialResult | None]:
        """(fields every result of ``plan`` shares, the result itself when the plan is over budget or memory)."""
        device = torch.device(device)
        plan.check_units(self.layout.n_layers)
        compute = str(resolve_compute_dtype(self.quant, device)).removeprefix("torch.")
        predicted = plan_bytes(self.layout, plan, self.quant, compute)
        excess = self.budget.excess(predicted)
        peak = self.peak(plan, device)
        common = dict(plan=plan, weight_bytes_predicted=predicted.total_bytes, avg_bits=predicted.avg_bits,
                      budget_excess=excess, device=str(device), peak_bytes_estimate=peak)
        if excess > 0:
            return common, TrialResult(status="infeasible", objective=INFEASIBLE_OBJECTIVE - excess,
                                       weight_bytes=predicted.total_bytes, seconds={"total": 0.0}, **common)
        if self.memory_limit is not None and peak * ADMISSION_MARGIN > self.memory_limit:
            over = peak * ADMISSION_MARGIN / self.memory_limit - 1.0
            return common, TrialResult(status="infeasible", objective=INFEASIBLE_OBJECTIVE - over,
                                       weight_bytes=predicted.total_bytes, seconds={"total": 0.0},
                                       error=over_memory_reason(peak, self.memory_limit), **common)
        return common, None


def over_memory_reason(peak: int, limit: int) -> str:
    """Why a plan is not trained: its predicted fine-tuning peak (with the admission margin) against the trial's
    memory."""
    return (f"over memory: fine-tuning this plan needs an estimated {peak / 1e9:.2f} GB "
            f"({peak * ADMISSION_MARGIN / 1e9:.2f} GB with the {ADMISSION_MARGIN - 1:.0%} margin for what the estimate "
            f"leaves out), more than the {limit / 1e9:.2f} GB a trial has (search.memory_per_trial_gb)")


def run_trial(ctx: TrialContext, plan: PrecisionPlan, device: str | torch.device = "cpu",
              on_report: Callable[[dict], None] | None = None,
              on_trained: Callable[[torch.nn.Module], None] | None = None,
              memory_limit: int | None = None,
              on_progress: Callable[[dict], None] | None = None) -> TrialResult:
    """Quantize, fine-tune and evaluate ``plan``. ``on_report`` receives intermediate metrics every
    ``finetune.eval_every`` steps (for early stopping); ``on_progress`` a progress report every
    ``finetune.report_every`` steps (:class:`~qpruner.finetune.StepProgress`: no metric); ``on_trained`` receives
    the trained model (e.g. to save its adapters) before it is released; the final result is returned, not
    reported."""
    device = torch.device(device)
    t0 = time.perf_counter()
    common, infeasible = Precheck.of(ctx, memory_limit)(plan, device)
    if infeasible is not None:
        return infeasible
    predicted_total, avg_bits = common["weight_bytes_predicted"], common["avg_bits"]
    seconds: dict[str, float] = {}
    model = None
    try:
        t = time.perf_counter()
        model, measured = _build_quantized(ctx, plan, device, seconds)
        seconds["quantize"] = time.perf_counter() - t   # the whole build: its reads (load) and LoftQ (loftq) included
        trim_heap()
        if measured.total_bytes != predicted_total:
            logger.warning("measured weight bytes %d differ from predicted %d", measured.total_bytes, predicted_total)
        before = _evaluate(ctx, model, device) if ctx.evaluation.before_finetune else None
        own_screen = (_screen_objective(ctx, _evaluate(ctx, model, device, ctx.screen_windows))
                      if ctx.screen_windows > 0 else None)

        def intermediate(step: int) -> None:
            if on_report is None:
                return
            ev = _evaluate(ctx, model, device)  # noqa: F821  (the enclosing run_trial's model, deleted at its end)
            values = metric_values(ev, {})
            weights = {k: w for k, w in ctx.weights.items() if k in values}
            on_report({"status": "running", "step": step, "perplexity": ev.perplexity, "accuracy": ev.accuracy,
                       "objective": objective_of(values, weights or {"accuracy": 1.0}),
                       "plan_code": plan.code(), "avg_bits": avg_bits, "weight_bytes": predicted_total})

        t = time.perf_counter()
        resident = measured.total_bytes + adapter_bytes(model)
        with measure_peak(device, resident) as peak:
            progress = (StepProgress(on_progress, ctx.finetune, ctx.finetune.batch_size * int(ctx.train.shape[-1]),
                                     {"plan_code": plan.code()}) if on_progress is not None else None)
            stats = finetune_(model, ctx.train, ctx.finetune, device, on_step=progress, on_eval=intermediate)
        seconds["finetune"] = time.perf_counter() - t
        trim_heap()
        after = _evaluate(ctx, model, device)
        seconds["eval"] = after.seconds
        task_values = {}
        for task in ctx.tasks:
            r = score(model, task, ctx.evaluation.batch_size, device)
            for name, p in ((f"{task.name}:acc", r.acc), (f"{task.name}:acc_norm", r.acc_norm)):
                task_values[name] = p
                task_values[f"{name}_se"] = math.sqrt(p * (1 - p) / max(1, r.items - 1))  # binomial
            seconds[f"task_{task.name}"] = r.seconds
        if on_trained is not None:
            on_trained(model)
        seconds["total"] = time.perf_counter() - t0
        return TrialResult(
            status="ok", objective=objective_of(metric_values(after, task_values), ctx.weights),
            objective_se=objective_se_of(metric_ses(after, task_values), ctx.weights),
            weight_bytes=measured.total_bytes, accuracy=after.accuracy, perplexity=after.perplexity,
            nll=after.nll, nll_se=after.nll_se, accuracy_se=after.accuracy_se,
            perplexity_se=after.perplexity * after.nll_se,
            eval_window_nll=after.window_nll, eval_window_tokens=after.window_tokens,
            eval_window_correct=after.window_correct,
            perplexity_before=before.perplexity if before else None,
            accuracy_before=before.accuracy if before else None, nll_before=before.nll if before else None,
            tasks=task_values,
            adapter_bytes=adapter_bytes(model), peak_bytes=peak.peak_bytes, peak_kind=peak.kind,
            train_loss_first=stats.first_loss, train_loss_final=stats.final_loss, train_steps=stats.steps,
            train_stopped=stats.stopped, eval_tokens_per_s=after.tokens_per_second, seconds=seconds,
            objective_screen=own_screen, **common)
    except (TrialFailed, torch.OutOfMemoryError) as exc:
        return _failed(exc, "failed", "full", seconds, t0, common)
    finally:
        del model
        _release(device)


def _failed(exc: Exception, status: str, fidelity: str, seconds: dict, t0: float, common: dict) -> TrialResult:
    """The result of a trial or screen that failed on its own (non-finite loss, out of memory), with its reason."""
    reason = f"{type(exc).__name__}: {exc}"
    logger.warning("%s failed: %s", "screen" if fidelity == "screen" else "trial", reason)
    seconds["total"] = time.perf_counter() - t0
    return TrialResult(status=status, fidelity=fidelity, objective=FAILED_OBJECTIVE,
                       weight_bytes=common["weight_bytes_predicted"], seconds=seconds, error=reason[:2000], **common)


def run_screen(ctx: TrialContext, plan: PrecisionPlan, device: str | torch.device = "cpu",
               memory_limit: int | None = None) -> TrialResult:
    """A screen of ``plan``: built as a trial builds it (quantized, LoRA attached and LoftQ-initialised when
    configured), not fine-tuned, evaluated on the first ``ctx.screen_windows`` evaluation windows. Cheap
    (no training, a fraction of the evaluation); the searcher uses it to decide which plans to train."""
    if ctx.screen_windows <= 0:
        raise ValueError("run_screen needs a context with screen_windows > 0 (search.screen_share > 0)")
    device = torch.device(device)
    t0 = time.perf_counter()
    common, infeasible = Precheck.of(ctx, memory_limit)(plan, device)
    if infeasible is not None:
        return infeasible
    seconds: dict[str, float] = {}
    model = None
    try:
        t = time.perf_counter()
        model, measured = _build_quantized(ctx, plan, device, seconds)
        seconds["quantize"] = time.perf_counter() - t   # the whole build: its reads (load) and LoftQ (loftq) included
        ev = _evaluate(ctx, model, device, ctx.screen_windows)
        seconds["eval"] = ev.seconds
        seconds["total"] = time.perf_counter() - t0
        return TrialResult(status="screened", fidelity="screen", objective=_screen_objective(ctx, ev),
                           objective_se=objective_se_of(metric_ses(ev, {}), ctx.weights),
                           weight_bytes=measured.total_bytes, accuracy=ev.accuracy, perplexity=ev.perplexity,
                           nll=ev.nll, nll_se=ev.nll_se, accuracy_se=ev.accuracy_se,
                           perplexity_se=ev.perplexity * ev.nll_se, eval_window_nll=ev.window_nll,
                           eval_window_tokens=ev.window_tokens, eval_window_correct=ev.window_correct,
                           eval_tokens_per_s=ev.tokens_per_second, seconds=seconds, **common)
    except (TrialFailed, torch.OutOfMemoryError) as exc:
        # still "screened" (a screen never counts as a trained trial); the objective tells the searcher it failed
        return _failed(exc, "screened", "screen", seconds, t0, common)
    finally:
        del model
        _release(device)
