"""The Pareto front of quality vs. memory, its hypervolume, and the trial log that persists every trial.

A trial ``a`` dominates ``b`` when it is at least as good on both objectives — quality (accuracy
and the objective: higher is better; perplexity: lower is better) and total weight bytes (lower is
better) — and strictly better on one. The front is the set of completed (``status == "ok"``) trials
that no other completed trial dominates; of several trials with the same plan only the first counts.

Telling neighbours apart: every front point (after the first) carries ``gain`` — how much better its
quality is than the next cheaper front point's (NLL saved for perplexity, accuracy gained) — with
``gain_se`` and ``separable = gain > 2 * gain_se``. All trials are evaluated on the same held-out
tokens, so for perplexity and next-token accuracy the difference is *paired* over evaluation windows
(:func:`qpruner.results.paired_diff`): the text's own difficulty cancels and the standard error is far
smaller than either trial's own. Other metrics (multiple-choice tasks, mixed objectives) use the
unpaired ``sqrt(se_a^2 + se_b^2)``. This is evaluation-sample noise only: a trial is deterministic for
its fine-tuning seed, and the seed-to-seed spread is measured in ``results/bench/landscape.md``.

Hypervolume: the area dominated by the front and bounded by a reference point ``(q_ref, m_ref)``
(worse than every point: quality ``q_ref``, memory ``m_ref``), with quality as ``-log(perplexity)``
when the metric is perplexity. A search fixes its reference before the first trial
(``qpruner.search.run.reference_point``, kept in the run's marker): its log, Tune metrics,
``qpruner status`` and ``report.html`` all use it. Without one (e.g. a table written by hand),
:meth:`TrialLog.summary` falls back to the lowest quality and the largest memory seen; benchmarks pass
their own fixed reference.

:class:`TrialLog` is pure (no Ray). The search's Tune callback and searcher wrapper feed it. Every
change re-reads ``trials.parquet`` if it changed on disk, applies the change (a row per trial id:
a re-run trial replaces its row) and rewrites ``trials.parquet`` and ``pareto.parquet`` atomically
(temp file + rename), so a reader — or a crash, or a resumed driver — never sees a half-written or
stale file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
from pathlib import Path

import pandas as pd

from .plan import PrecisionPlan
from .results import TrialResult, plan_columns, plan_of_row

from .rundir import PARETO_FILE, TRIALS_FILE, read_table  # noqa: F401  (re-exported: the files' one definition)

logger = logging.getLogger(__name__)
TRAINED = ("ok", "failed", "stopped", "error")   # statuses of trials that ran (not answered without training)
SCREENED = ("infeasible", "cached")              # answered without training; ids "<status>-<n>"


def maximize(metric: str) -> bool:
    """Whether higher is better for ``metric`` (all but perplexity)."""
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


def hypervolume(quality: list[float], cost: list[float], ref: tuple[float, float]) -> float:
    """2-D hypervolume (quality maximised, cost minimised) w.r.t. ``ref = (q_ref, cost_ref)``."""
    from .frontier import hypervolume as area
    return area(list(zip(cost, quality)), (ref[1], ref[0]))


def trial_label(row) -> str:
    """The short name people see for a trial row: ``t0007`` (its number in the search, as in the logs and the Tune
    table, from ``trial_name`` ``t0007-<plan code>``), else its trial id (e.g. a result answered from the cache)."""
    name = row.get("trial_name") if hasattr(row, "get") else None
    if isinstance(name, str) and name[:1] == "t" and name[1:5].isdigit():
        return name.split("-", 1)[0]
    return str(row.get("trial_id") if hasattr(row, "get") else row)


def ideal_quality(metric: str) -> float:
    """The best value the quality axis can take: 0 for perplexity (``-log 1``), else 1 (accuracies)."""
    return 0.0 if metric == "perplexity" else 1.0


def normalized_hypervolume(hv: float, ref: tuple[float, float], metric: str) -> float | None:
    """``hv`` as a share of the box between the reference ``(q_ref, cost_ref)`` and the ideal corner (the best
    quality at no memory): 0 for an empty front, 1 for the unreachable ideal; comparable across jobs and models.
    None for a weighted ``objective`` (its ideal depends on the weights and terms: not given here)."""
    if metric == "objective":
        return None
    box = (ideal_quality(metric) - ref[0]) * ref[1]
    return hv / box if box > 0 else 0.0


def quality_values(frame: pd.DataFrame, metric: str) -> list[float]:
    """The quality axis of the front: ``-log(perplexity)`` for perplexity, else the metric."""
    values = frame[metric].astype(float).tolist()
    return [-math.log(v) for v in values] if metric == "perplexity" else values


def atomic_write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` through a temporary file and a rename (the temporary file never stays: a
    write that fails, e.g. on a full disk, leaves ``path`` as it was)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


WRITE_FAILURES: dict[str, tuple[float, str]] = {}   # results directory -> (since, why): its log cannot be written


def write_failure(directory) -> tuple[float, str] | None:
    """``(since, why)`` while a search's trial log in ``directory`` cannot be written (e.g. a full disk)."""
    return WRITE_FAILURES.get(str(Path(directory)))


class TrialLog:
    """Every finished or screened trial of one search, persisted as it arrives."""

    run_key = None  # (an instance unpickled from an older experiment lacks it)
    interrupted = False   # set by the search when Ray Tune was stopped by SIGINT

    def __init__(self, directory: str | os.PathLike, metric: str, origins: dict[PrecisionPlan, str] | None = None,
                 run_key: str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metric = metric
        self.origins = dict(origins or {})   # plan -> "seed:uniform" | "seed:best_guess" | "seed:sampled"
        self.run_key = run_key               # rundir.trial_key of the job: stamped on rows, required by lookup
        self.rows: list[dict] = []
        self.unsaved: list[dict] = []        # rows a failed write (a full disk) could not persist yet
        self._stamp: tuple[int, int, int] | None = None
        self.refresh()

    # persistence ---------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.directory / TRIALS_FILE

    def refresh(self) -> None:
        """Re-read trials.parquet when it changed on disk (another writer, or a resumed search)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            frame = read_table(self.path, "the trial log")
            self.rows = [{k: v for k, v in row.items() if not _missing(v)} for row in frame.to_dict("records")]
            self._stamp = stamp
            kept = {r.get("trial_id"): r for r in self.unsaved}   # not yet on disk: the newer version wins
            self.rows = [kept.pop(r.get("trial_id"), r) for r in self.rows] + list(kept.values())

    def write(self) -> None:
        frame = pd.DataFrame(self.rows)
        atomic_write_parquet(frame, self.path)
        atomic_write_parquet(pareto_front(frame, self.metric), self.directory / PARETO_FILE)
        stat = self.path.stat()
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _persist(self, row: dict | None = None) -> bool:
        """Write the log (inside ``_writing``). A failed write (full disk, quota, read-only) raises nothing: the
        rows stay in memory (``unsaved``), ``write_failure`` names the problem, and :meth:`flush` tries again."""
        try:
            self.write()
        except OSError as exc:
            self._unsaved(row, exc)
            return False
        if self.unsaved or str(self.directory) in WRITE_FAILURES:
            logger.warning("%s written after all: %d kept result(s) saved", self.path, len(self.unsaved))
        self.unsaved = []
        WRITE_FAILURES.pop(str(self.directory), None)
        return True

    def _unsaved(self, row: dict | None, exc: OSError) -> None:
        """Keep ``row`` (replacing an unsaved one of the same id) until a write succeeds; name the failure."""
        if row is not None:
            self.unsaved = [r for r in self.unsaved if r.get("trial_id") != row.get("trial_id")] + [row]
        if str(self.directory) not in WRITE_FAILURES:
            logger.error("could not write %s (%s): %d result(s) kept in memory; the search starts no new trial "
                         "until they are written (free space; it tries again every few seconds)", self.path,
                         exc.strerror or exc, len(self.unsaved))
        WRITE_FAILURES.setdefault(str(self.directory), (time.time(), f"{exc.strerror or exc} ({self.path})"))

    def flush(self) -> bool:
        """Try again to write rows a failed write kept in memory; True when nothing is left unsaved."""
        if not self.unsaved and str(self.directory) not in WRITE_FAILURES:
            return True
        try:
            with self._writing():
                self.refresh()
                return self._persist()
        except OSError as exc:   # not even the log's lock file could be opened (read-only, no space for it)
            self._unsaved(None, exc)
            return False

    @contextlib.contextmanager
    def _writing(self):
        """An exclusive lock on the log for one read-modify-write (writers in other processes wait)."""
        fd = os.open(self.directory / ".trials.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __getstate__(self):  # Ray pickles the tuner; after unpickling, the file is the truth
        state = dict(self.__dict__)
        state["rows"], state["_stamp"], state["unsaved"] = [], None, []
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("unsaved", [])   # pickled by an earlier version
        self.refresh()

    # changes ---------------------------------------------------------------------------------------

    def _origin(self, plan: PrecisionPlan | None) -> str:
        return self.origins.get(plan, "searcher") if plan is not None else "searcher"

    def _put(self, row: dict) -> None:
        try:
            self._put_locked(row)
        except OSError as exc:   # the log's lock file could not be opened: keep the row like a failed write
            if row.get("trial_id") is None:   # an answer without training (over budget, cached): nothing is lost
                logger.warning("could not record a %s proposal (%s)", row.get("status"), exc.strerror or exc)
                return
            if all(r is not row for r in self.rows):
                self.rows.append(row)
            self._unsaved(row, exc)

    def _put_locked(self, row: dict) -> None:
        with self._writing():
            self.refresh()
            row["finished_at"] = time.time()
            if self.run_key is not None:
                row.setdefault("run_key", self.run_key)
            if row["trial_id"] is None:  # a screened proposal: the next unused "<status>-<n>"
                used = [int(r["trial_id"].rsplit("-", 1)[1]) for r in self.rows
                        if str(r.get("trial_id", "")).startswith(SCREENED) and r["trial_id"].rsplit("-", 1)[1].isdigit()]
                row["trial_id"] = f"{row['status']}-{max(used, default=0) + 1:05d}"
            for i, existing in enumerate(self.rows):
                if existing.get("trial_id") == row["trial_id"]:
                    row["number"] = existing.get("number", i)
                    self.rows[i] = row
                    break
            else:
                row["number"] = len(self.rows)
                self.rows.append(row)
            self._persist(row)

    def add(self, trial_id: str | None, result: TrialResult, **extra) -> str:
        """A trial's result; ``trial_id=None`` for a proposal answered without training (pass its ``status``):
        it gets the next unused ``<status>-<n>``. Returns the row's id."""
        row = {"trial_id": trial_id, "origin": self._origin(result.plan), "plan_code": result.plan.code(),
               "bits": list(result.plan.bits)}
        row.update(result.to_metrics())
        row.update(extra)
        self._put(row)
        return str(row["trial_id"])

    def add_screened(self, status: str, result: TrialResult, **extra) -> str:
        """A proposal answered without training (``infeasible`` / ``cached``), under a new, never reused id."""
        return self.add(None, result, **extra, status=status)

    def add_partial(self, trial_id: str, plan: PrecisionPlan | None, status: str, metrics: dict, **extra) -> None:
        """A trial without a final result: ``stopped`` early (last intermediate metrics) or ``error``."""
        row = {"trial_id": trial_id, "origin": self._origin(plan), "bits": list(plan.bits) if plan else None,
               **(plan_columns(plan) if plan else {}), "status": status}
        row.update({k: v for k, v in metrics.items() if k in ("perplexity", "accuracy", "objective", "avg_bits",
                                                                "weight_bytes", "step", "error")})
        row.update(extra)
        self._put(row)

    def add_error(self, trial_id: str, plan: PrecisionPlan | None, reason: str) -> None:
        self.add_partial(trial_id, plan, "error", {"error": reason[-2000:]})

    # queries -----------------------------------------------------------------------------------------

    def frame(self) -> pd.DataFrame:
        self.refresh()
        return pd.DataFrame(self.rows)

    def front(self) -> pd.DataFrame:
        return pareto_front(self.frame(), self.metric)

    def lookup(self, plan: PrecisionPlan) -> dict | None:
        """The first trained result (ok or failed) of an identical plan, if any."""
        self.refresh()
        for row in self.rows:
            if (row.get("plan_formats") and plan_of_row(row) == plan and row.get("status") in ("ok", "failed")
                    and not row.get("cached_from")
                    and (self.run_key is None or row.get("run_key", self.run_key) == self.run_key)):
                return row
        return None

    def trained(self) -> dict[str, dict]:
        """Rows of trials that were trained (not screened), by trial id."""
        self.refresh()
        return {str(r["trial_id"]): r for r in self.rows if r.get("status") in TRAINED}

    def summary(self, ref: tuple[float, float] | None = None) -> dict:
        """Counts by status, front size, best quality and hypervolume: against ``ref = (q_ref, cost_ref)``
        when given (fixed, comparable over time), else the live reference (lowest quality, largest memory seen)."""
        frame = self.frame()
        fixed = ref is not None
        counts = frame["status"].value_counts().to_dict() if not frame.empty and "status" in frame else {}
        front = pareto_front(frame, self.metric)
        out = {"trials": len(frame), **{f"n_{k}": int(v) for k, v in counts.items()}, "front_size": len(front),
               "best": None, "hypervolume": 0.0,
               **({"hypervolume_normalized": None if self.metric == "objective" else 0.0} if fixed else {})}
        ok = frame[frame["status"] == "ok"] if counts else frame
        if not front.empty:
            if ref is None:
                ref = (min(quality_values(ok, self.metric)) - 1e-9, float(ok["weight_bytes"].max()) + 1.0)
            hv = hypervolume(quality_values(front, self.metric), front["weight_bytes"].astype(float).tolist(), ref)
            out["hypervolume"] = hv
            if fixed:
                out["hypervolume_normalized"] = normalized_hypervolume(hv, ref, self.metric)
            best = front[self.metric].max() if maximize(self.metric) else front[self.metric].min()
            out["best"] = float(best)
        return out


def _missing(v) -> bool:
    try:
        return v is None or (isinstance(v, float) and math.isnan(v))
    except TypeError:
        return False


def pareto_front(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Non-dominated completed trials, sorted by memory, with ``gain``/``gain_se``/``separable`` (see above)."""
    if trials.empty or "status" not in trials or metric not in trials:
        return trials.iloc[0:0]
    ok = trials[(trials["status"] == "ok") & trials[metric].notna()]
    ok = ok.drop_duplicates("plan_key" if "plan_key" in ok else "plan_formats", keep="first")
    if ok.empty:
        return ok
    mask = front_mask(ok[metric].astype(float).tolist(), ok["weight_bytes"].astype(float).tolist(), maximize(metric))
    front = ok[mask].sort_values("weight_bytes").reset_index(drop=True)
    gains = [neighbour_gain(front.iloc[i - 1], front.iloc[i], metric) if i else (None, None)
             for i in range(len(front))]
    front["gain"] = [g for g, _ in gains]
    front["gain_se"] = [se for _, se in gains]
    front["separable"] = [None if g is None or se is None or not math.isfinite(se) else bool(g > 2 * se)
                          for g, se in gains]
    return front


def se_column(metric: str) -> str:
    """The column holding ``metric``'s standard error (perplexity's is of the perplexity itself)."""
    return f"{metric}_se"


def _windows(row, name: str):
    v = row.get(name) if hasattr(row, "get") else None
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or len(v) == 0 else list(v)


def neighbour_gain(cheaper, dearer, metric: str) -> tuple[float, float | None]:
    """How much better ``dearer``'s quality is than ``cheaper``'s, and its standard error (paired when both
    were evaluated on the same windows)."""
    from .results import paired_diff
    if metric in ("perplexity", "accuracy"):
        name = "eval_window_nll" if metric == "perplexity" else "eval_window_correct"
        a, b = _windows(cheaper, name), _windows(dearer, name)
        ta, tb = _windows(cheaper, "eval_window_tokens"), _windows(dearer, "eval_window_tokens")
        if a and b and ta == tb and len(a) == len(b) == len(ta):
            diff, se = paired_diff(a, b, ta)        # cheaper - dearer
            return (diff, se) if metric == "perplexity" else (-diff, se)
    if metric == "perplexity":
        gain = math.log(float(cheaper["perplexity"])) - math.log(float(dearer["perplexity"]))
        ses = [_num(r, "nll_se") for r in (cheaper, dearer)]
    else:
        gain = float(dearer[metric]) - float(cheaper[metric])
        ses = [_num(r, se_column(metric)) for r in (cheaper, dearer)]
    a, b = ses
    return gain, (math.sqrt(a ** 2 + b ** 2) if a is not None and b is not None else None)


def _num(row, name: str) -> float | None:
    raw = row.get(name) if hasattr(row, "get") else None
    try:
        v = float(raw)  # type: ignore[arg-type]  # None and non-numbers: handled below
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v
