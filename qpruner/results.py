"""What one trial produced (:class:`TrialResult`), and how it travels: a flat, scalar-only dict for Ray
Tune and the trials table (``to_metrics`` / ``from_metrics``), and the statistics of its per-window evaluation sums (standard
errors, paired differences). No torch here: the tracker, the report
and ``qpruner status`` read results without loading the training stack."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .plan import PrecisionPlan

INFEASIBLE_OBJECTIVE = -1000.0
FAILED_OBJECTIVE = -2000.0


PROGRESS_STATUS = "training"   # the ``status`` of a trial's progress report (qpruner.finetune.StepProgress)


def is_progress(result: dict | None) -> bool:
    """Whether a reported result is a progress report: step, loss, tokens/s, ETA, and no ``objective`` (so no
    scheduler or searcher acts on it)."""
    return result is not None and result.get("status") == PROGRESS_STATUS


@dataclass(frozen=True)
class TrialResult:
    """Everything one trial produced: plan, status, quality with standard errors, memory, time."""
    plan: PrecisionPlan
    status: str                       # ok | screened | infeasible | failed
    objective: float
    weight_bytes: int                 # total weight memory (measured when trained, else predicted)
    weight_bytes_predicted: int
    avg_bits: float
    budget_excess: float = 0.0
    accuracy: float | None = None
    perplexity: float | None = None
    nll: float | None = None                      # mean held-out NLL per token (= log perplexity)
    nll_se: float | None = None                   # standard errors over evaluation windows (evaluate.py)
    accuracy_se: float | None = None
    perplexity_se: float | None = None
    objective_se: float | None = None
    perplexity_before: float | None = None
    accuracy_before: float | None = None
    nll_before: float | None = None
    tasks: dict = field(default_factory=dict)     # "<task>:acc" / "<task>:acc_norm" (+ "_se") -> value
    eval_window_nll: tuple = ()                   # per-window NLL sums: paired differences between trials
    eval_window_tokens: tuple = ()
    eval_window_correct: tuple = ()
    adapter_bytes: int | None = None
    peak_bytes: int | None = None
    peak_kind: str = "none"
    peak_bytes_estimate: int | None = None
    train_loss_first: float | None = None
    train_loss_final: float | None = None
    train_steps: int = 0
    train_stopped: str = ""
    eval_tokens_per_s: float | None = None
    seconds: dict = field(default_factory=dict)
    device: str = "cpu"
    error: str | None = None
    fidelity: str = "full"            # full (fine-tuned, evaluated on every window) | screen (see trial.run_screen)
    objective_screen: float | None = None   # a full trial's own screen (before fine-tuning), with search.screen_share

    def to_metrics(self) -> dict:
        """Flat, scalar-only dict (what the trainable reports to Ray Tune)."""
        d = asdict(self)
        d.pop("plan")
        d.update(plan_columns(self.plan))
        for k, v in d.pop("seconds").items():
            d[f"seconds_{k}"] = v
        d.update(d.pop("tasks"))
        return d

    @classmethod
    def from_metrics(cls, d: dict) -> "TrialResult":
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in names and k not in ("plan", "seconds", "tasks")}
        seconds = {k[len("seconds_"):]: v for k, v in d.items() if k.startswith("seconds_")}
        tasks = {k: v for k, v in d.items() if ":" in k}
        for name in ("eval_window_nll", "eval_window_tokens", "eval_window_correct"):
            kwargs[name] = tuple(kwargs[name]) if kwargs.get(name) is not None else ()
        return cls(plan=plan_of_row(d), seconds=seconds, tasks=tasks, **kwargs)


def plan_columns(plan: PrecisionPlan) -> dict:
    """How a plan is written into a result row and the trials table (read back by :func:`plan_of_row`):
    ``plan_key`` is its identity (:meth:`PrecisionPlan.key`), the other columns are for people and queries."""
    out: dict[str, str | float] = {"plan_key": plan.key(), "plan_formats": ",".join(plan.formats),
                                   "plan_code": plan.code(), "plan_unit": plan.unit}
    if plan.pruned is not None:
        out["prune_param_ratio"] = plan.pruned
    return out


def plan_of_row(d) -> PrecisionPlan:
    """The plan of a result row or trials-table row (the inverse of :func:`plan_columns`)."""
    unit = d.get("plan_unit") or "layer"
    if isinstance(unit, float):     # a missing value read back from parquet
        unit = "layer"
    key = d.get("plan_key")
    if isinstance(key, str) and key:
        return PrecisionPlan.from_key(key, unit)
    return PrecisionPlan(tuple(str(d["plan_formats"]).split(",")), unit)


def ratio_se(sums, counts) -> float:
    """Standard error of ``sum(sums) / sum(counts)`` with windows as the resampling unit (nan for < 2)."""
    n = len(sums)
    total = float(sum(counts))
    if n < 2 or total <= 0:
        return float("nan")
    m = float(sum(sums)) / total
    ss = sum((float(s) - m * float(c)) ** 2 for s, c in zip(sums, counts))
    return math.sqrt(n / (n - 1) * ss) / total


def paired_diff(nll_a, nll_b, tokens) -> tuple[float, float]:
    """Mean per-token difference ``a - b`` of two evaluations on the same windows (per-window sums of NLL,
    or of correct predictions), and its standard error (paired: the text's own difficulty cancels)."""
    if not (len(nll_a) == len(nll_b) == len(tokens)) or len(tokens) == 0:
        raise ValueError(f"paired difference needs evaluations on the same windows "
                         f"({len(nll_a)}, {len(nll_b)} and {len(tokens)} windows)")
    diff = [float(a) - float(b) for a, b in zip(nll_a, nll_b)]
    return sum(diff) / float(sum(tokens)), ratio_se(diff, tokens)
