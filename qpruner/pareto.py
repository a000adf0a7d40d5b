"""The Pareto front of accuracy vs. memory, and the trial log that persists every trial.

A trial ``a`` dominates ``b`` when it is at least as good on both objectives — the quality metric
(accuracy: higher is better; perplexity: lower is better) and total weight bytes (lower is better) —
and strictly better on one. The front is the set of completed (``status == "ok"``) trials that no
other completed trial dominates; of several trials with the same plan only the first is kept.

:class:`TrialLog` is pure (no Ray): the search's Tune callback feeds it one finished trial at a time.
After every trial it rewrites ``trials.parquet`` (one row per trial: plan, metrics, memories,
timings, status, error) and ``pareto.parquet``, each atomically (temp file + rename), so a reader —
or a crash — never sees a half-written file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from .plan import PrecisionPlan
from .trial import TrialResult

TRIALS_FILE = "trials.parquet"
PARETO_FILE = "pareto.parquet"


def maximize(metric: str) -> bool:
    return metric != "perplexity"


def front_mask(quality: list[float], cost: list[float], maximize_quality: bool = True) -> list[bool]:
    """``True`` for every point that no other point dominates (O(n^2); n is a trial count)."""
    q = [v if maximize_quality else -v for v in quality]
    mask = []
    for i in range(len(q)):
        dominated = any(q[j] >= q[i] and cost[j] <= cost[i] and (q[j] > q[i] or cost[j] < cost[i])
                        for j in range(len(q)) if j != i)
        mask.append(not dominated)
    return mask


def atomic_write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class TrialLog:
    """Every finished trial of one search, persisted as it arrives."""

    def __init__(self, directory: str | os.PathLike, metric: str, origins: dict[tuple, str] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metric = metric
        self.origins = dict(origins or {})   # plan formats -> "seed:uniform" | "seed:sampled"
        self.rows: list[dict] = []

    def _origin(self, plan: PrecisionPlan | None) -> str:
        return self.origins.get(plan.formats, "searcher") if plan is not None else "searcher"

    def add(self, trial_id: str, result: TrialResult) -> None:
        row = {"trial_id": trial_id, "number": len(self.rows), "origin": self._origin(result.plan),
               "plan_code": result.plan.code(), "bits": list(result.plan.bits)}
        row.update(result.to_metrics())
        row["finished_at"] = time.time()
        self.rows.append(row)
        self.write()

    def add_error(self, trial_id: str, plan: PrecisionPlan | None, reason: str) -> None:
        row = {"trial_id": trial_id, "number": len(self.rows), "origin": self._origin(plan),
               "plan_code": plan.code() if plan else None, "bits": list(plan.bits) if plan else None,
               "plan_formats": ",".join(plan.formats) if plan else None,
               "status": "error", "error": reason[-2000:], "finished_at": time.time()}
        self.rows.append(row)
        self.write()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def front(self) -> pd.DataFrame:
        return pareto_front(self.frame(), self.metric)

    def write(self) -> None:
        frame = self.frame()
        atomic_write_parquet(frame, self.directory / TRIALS_FILE)
        atomic_write_parquet(pareto_front(frame, self.metric), self.directory / PARETO_FILE)


def pareto_front(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Non-dominated completed trials, sorted by memory."""
    if trials.empty or "status" not in trials:
        return trials.iloc[0:0]
    ok = trials[trials["status"] == "ok"].drop_duplicates("plan_formats", keep="first")
    if ok.empty:
        return ok
    mask = front_mask(ok[metric].astype(float).tolist(), ok["weight_bytes"].astype(float).tolist(),
                      maximize(metric))
    return ok[mask].sort_values("weight_bytes").reset_index(drop=True)
