"""Searchers, and the wrapper that keeps them from wasting trials.

Every searcher runs behind :class:`BudgetedSearcher`, which looks at each proposal *before* Ray Tune
turns it into a trial:

* a plan over the memory budget is never trained: its memory is computed exactly, the searcher is
  told ``objective = -1000 - relative excess`` at once, the proposal is logged as ``infeasible``, and
  the searcher is asked again;
* a plan identical to one already evaluated — in this run or, after ``--resume``, in an earlier one —
  is answered from ``trials.parquet`` and logged as ``cached`` (``cached_from`` names the trial); one
  identical to a trial still running waits for that trial's result;
* after ``max_rejections`` consecutive answered proposals the search ends (the space is exhausted).

So ``search.num_trials`` counts trained trials only. The wrapper keeps the wrapped searcher in its
``searcher`` attribute, which is how Ray Tune checkpoints and restores wrapper chains.

Searchers (``search.searcher``): ``additive`` (the default: the memory-aware Bayesian searcher of
:mod:`.additive`), ``hyperopt`` (TPE, seeded with the probabilistic-decision plans, scored above the
uniform-quantization line by :class:`AboveTheLine`),
``optuna_mo`` (Optuna's multivariate TPE on two objectives: objective up, weight bytes down),
``optuna_gp`` (Optuna's Gaussian-process sampler, same two objectives) and ``random`` (uniform per
unit, the baseline; seeded plans first as well).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from ray.tune.search import Searcher

from ..memory import UnitCosts
from ..pareto import TrialLog, write_failure
from ..plan import PrecisionPlan
from ..results import is_progress
from ..trial import TrialResult

logger = logging.getLogger(__name__)


@dataclass
class Verdict:
    """A proposal answered without training."""
    status: str                # "infeasible" | "cached"
    result: TrialResult
    cached_from: str | None = None


class PlanScreen:
    """Decides whether a proposed config needs training (``None``) or can be answered now."""

    def __init__(self, decode: Callable[[dict], PrecisionPlan], precheck: Callable[[PrecisionPlan], TrialResult | None],
                 log: TrialLog):
        self.decode, self.precheck, self.log = decode, precheck, log

    def __call__(self, config: dict) -> tuple[PrecisionPlan, Verdict | None]:
        plan = self.decode(config)
        infeasible = self.precheck(plan)
        if infeasible is not None:
            return plan, Verdict("infeasible", infeasible)
        if is_screen(config):     # cheap, and a trained result of the plan is not a screen: always run
            return plan, None
        row = self.log.lookup(plan)
        if row is not None:
            return plan, Verdict("cached", TrialResult.from_metrics(row), str(row["trial_id"]))
        return plan, None


def is_screen(config: dict) -> bool:
    """Whether a proposal is a screen (multi-fidelity: see :mod:`.additive`)."""
    from .additive import FIDELITY_KEY, SCREEN
    return config.get(FIDELITY_KEY) == SCREEN


def _answer(result: TrialResult) -> dict:
    """What the wrapped searcher is told about a trial (every metric a multi-objective searcher uses)."""
    return {"objective": result.objective, "objective_se": result.objective_se, "weight_bytes": result.weight_bytes}


class _Wrapper(Searcher):
    """A searcher wrapping another one. Ray Tune checkpoints wrapper chains through the ``searcher``
    attribute: each wrapper's ``get_state`` / ``set_state``, and the innermost searcher's ``save`` /
    ``restore``."""

    def __init__(self, searcher: Searcher):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


EXHAUSTED = "the search space is exhausted (every plan the searcher could propose was evaluated)"
ENDED: dict[str, str] = {}   # results directory -> why its searcher ended before num_trials trained trials
DISK_WAIT_S = 600.0          # how long a search waits for its trial log to become writable again


class BudgetedSearcher(_Wrapper):
    """Wraps a searcher: over-budget and repeated proposals are answered without training."""
    num_trials = None  # (an instance unpickled from an older experiment lacks it)
    disk_wait_s = None

    def __init__(self, searcher: Searcher, screen: PlanScreen, max_rejections: int = 1000,
                 num_trials: int | None = None):
        super().__init__(searcher)
        self.screen = screen
        self.max_rejections = max_rejections
        # trained trials wanted in all: trials.parquet is the truth, so that a driver killed after a trial
        # finished but before Tune's next experiment checkpoint does not train one more after --resume
        self.num_trials = num_trials
        self.live: dict[str, str] = {}            # Tune trial id -> id the wrapped searcher knows it by
        self.in_flight: dict[str, str] = {}       # Tune trial id -> plan key
        self.waiting: dict[str, list[str]] = {}   # plan key of a running trial -> duplicate proposals' ids
        self.screens: set[str] = set()            # Tune trial ids of running screens (never counted as trials)
        self.counter = 0

    def __setstate__(self, state: dict) -> None:   # pickled by an earlier version: no running screens known
        self.__dict__.update(state)
        self.__dict__.setdefault("screens", set())

    # --- state (the wrapped searcher saves its own) ------------------------------------------------------
    def get_state(self) -> dict:
        return {"live": self.live, "in_flight": self.in_flight, "waiting": self.waiting, "counter": self.counter,
                "screens": sorted(self.screens)}

    def set_state(self, state: dict) -> None:
        self.live, self.in_flight = dict(state["live"]), dict(state["in_flight"])
        self.waiting, self.counter = {k: list(v) for k, v in state["waiting"].items()}, state["counter"]
        self.screens = set(state.get("screens", []))

    # --- the screening ---------------------------------------------------------------------------------
    def _record(self, plan: PrecisionPlan, verdict: Verdict) -> None:
        extra = {"cached_from": verdict.cached_from} if verdict.cached_from else {}
        self.screen.log.add_screened(verdict.status, verdict.result, **extra)

    def _enough(self) -> bool:
        if self.num_trials is None:
            return False
        return len(set(self.screen.log.trained()) | (set(self.live) - self.screens)) >= self.num_trials

    def suggest(self, trial_id: str):
        if self._enough():
            return Searcher.FINISHED
        failure = write_failure(self.screen.log.directory)
        if failure is not None:       # results cannot be written (a full disk): start nothing that could be lost
            time.sleep(1.0)           # Tune asks again at once when nothing runs: try the write about once a second
            if self.screen.log.flush():
                failure = None
        if failure is not None:
            since, why = failure
            if time.time() - since < (self.disk_wait_s if self.disk_wait_s is not None else DISK_WAIT_S):
                return None           # no trial now; Tune asks again
            logger.error("the trial log could not be written for %.0f s (%s): ending the search", time.time() - since, why)
            ENDED[str(self.screen.log.directory)] = f"its results could not be written: {why}"
            return Searcher.FINISHED
        for _ in range(self.max_rejections):
            self.counter += 1
            inner_id = f"{trial_id}~{self.counter}"
            config = self.searcher.suggest(inner_id)
            if config == Searcher.FINISHED:
                ENDED.setdefault(str(self.screen.log.directory), EXHAUSTED)
            if config is None or config == Searcher.FINISHED:
                return config
            plan, verdict = self.screen(config)
            key = plan.key() + ("#screen" if is_screen(config) else "")
            if verdict is not None:
                self.searcher.on_trial_complete(inner_id, result=_answer(verdict.result))
                self._record(plan, verdict)
                continue
            if key in self.in_flight.values():
                self.waiting.setdefault(key, []).append(inner_id)
                continue
            self.live[trial_id], self.in_flight[trial_id] = inner_id, key
            if is_screen(config):
                self.screens.add(trial_id)
            return config
        logger.warning("the searcher proposed %d plans in a row that were over budget or already evaluated; "
                       "ending the search", self.max_rejections)
        ENDED.setdefault(str(self.screen.log.directory), EXHAUSTED)
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # progress reports (finetune.report_every) carry no metric: no searcher hears of them (Optuna's would fail)
        if trial_id in self.live and not is_progress(result):
            self.searcher.on_trial_result(self.live[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self.live.pop(trial_id, None)
        self.screens.discard(trial_id)
        if inner_id is not None:
            self.searcher.on_trial_complete(inner_id, result=result, error=error)
        key = self.in_flight.pop(trial_id, None)
        for waiting_id in self.waiting.pop(key, []) if key else []:
            self.searcher.on_trial_complete(waiting_id, result=result, error=error or not result)
            if result and "plan_formats" in result and result.get("status") in ("ok", "failed"):
                self.counter += 1
                cached = TrialResult.from_metrics(result)
                self._record(cached.plan, Verdict("cached", cached, trial_id))


class AboveTheLine(_Wrapper):
    """Makes a single-objective searcher (HyperOpt's TPE) memory-aware: it is told each plan's quality
    *above the straight line* through the smallest and the largest plan of the seed phase,
    ``y - y_small - slope * (memory - memory_small)``, instead of the quality itself.

    Told the quality alone, TPE piles its proposals against the budget (more bits always help). Above
    the line, a plan is good when it buys more quality per byte than uniform quantization does, at any
    memory — which is what a mixed plan on the front is for. The line is fixed once ``freeze_after``
    trials (the seed plans, which include both uniform ends) have completed, whatever their result, and
    two trained plans of different memory are known; results until then are held back and handed over
    together, so the wrapped searcher sees one consistent objective.
    Answers without training (over budget, ``objective <= -999``) pass through unchanged."""

    def __init__(self, searcher: Searcher, freeze_after: int = 2):
        super().__init__(searcher)
        self.freeze_after = max(2, freeze_after)
        self.slope: float | None = None
        self.anchor = self.base = 0.0            # the line: base + slope * (memory - anchor)
        self.held: list[tuple[str, dict]] = []

    def get_state(self) -> dict:
        return {"slope": self.slope, "anchor": self.anchor, "base": self.base, "held": self.held}

    def set_state(self, state: dict) -> None:
        self.slope, self.anchor, self.base = state["slope"], state["anchor"], state["base"]
        self.held = list(state["held"])

    def suggest(self, trial_id: str):
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.slope is not None:
            self.searcher.on_trial_result(trial_id, self._scored(result))

    def _scored(self, result: dict) -> dict:
        y = result.get("objective")
        if y is None or y <= -999 or "weight_bytes" not in result:
            return result
        return {**result, "objective": y - self.base - self.slope * (float(result["weight_bytes"]) - self.anchor)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.slope is not None:
            self.searcher.on_trial_complete(trial_id, result=self._scored(result) if result else result, error=error)
            return
        self.held.append((trial_id, {"result": result, "error": error}))
        trained = [r["result"] for _, r in self.held if r["result"] and r["result"].get("objective", -1e9) > -999
                   and "weight_bytes" in r["result"]]
        memories = {float(r["weight_bytes"]) for r in trained}
        if len(self.held) >= self.freeze_after and len(memories) >= 2:   # the seed phase is over
            small = min(trained, key=lambda r: float(r["weight_bytes"]))
            large = max(trained, key=lambda r: float(r["weight_bytes"]))
            self.anchor, self.base = float(small["weight_bytes"]), float(small["objective"])
            self.slope = (large["objective"] - small["objective"]) / (float(large["weight_bytes"]) - self.anchor)
            logger.info("TPE scores plans above the line through %s and %s (slope %.3g per MB)",
                        small.get("plan_code"), large.get("plan_code"), self.slope * 1e6)
            held, self.held = self.held, []
            for tid, r in held:
                self.searcher.on_trial_complete(tid, result=self._scored(r["result"]) if r["result"] else None,
                                                error=r["error"])


class RandomPlanSearcher(Searcher):
    """Uniformly random precision per unit (the baseline); ``points_to_evaluate`` first. With
    ``points_only`` it proposes exactly those points and then finishes (``search.searcher: points``:
    evaluate a given list of plans, e.g. to record a landscape)."""

    def __init__(self, points_to_evaluate: list[dict] | None = None, seed: int = 0, metric=None, mode=None,
                 points_only: bool = False):
        super().__init__(metric=metric, mode=mode)
        self.points_only = points_only
        self.points = list(points_to_evaluate or [])
        self.rng = np.random.default_rng(seed)
        self.choices: dict[str, list] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        self.choices = {k: list(v.categories) for k, v in config.items() if hasattr(v, "categories")}
        return True

    def suggest(self, trial_id: str):
        if self.points:
            return self.points.pop(0)
        if self.points_only:
            return Searcher.FINISHED
        return {k: v[int(self.rng.integers(len(v)))] for k, v in self.choices.items()}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:  # JSON, never pickle (see AdditiveSearcher.save)
        with open(checkpoint_path, "w") as fh:
            json.dump({"points": self.points, "rng": self.rng.bit_generator.state, "choices": self.choices}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            state = json.load(fh)
        self.points, self.choices = state["points"], state["choices"]
        self.rng.bit_generator.state = state["rng"]


@dataclass(frozen=True)
class SearchSpace:
    """What a memory-aware searcher knows before any trial: the space's keys and options (bits, in
    increasing order), the exact per-unit memory tables and budget, and the unit scores (its prior).
    A joint search (``prune.param_ratios``) also has ``variants`` (the pruning amounts, chosen under
    ``policy.PRUNE_KEY``), each with its own tables and scores; ``costs`` / ``scores`` are then the first's."""
    keys: list[str]
    options: list
    costs: UnitCosts
    scores: tuple | None = None
    variants: tuple = ()
    variant_costs: tuple = ()
    variant_scores: tuple = ()


def make_searcher(kind: str, points: list[dict], seed: int, random_warmup: int,
                  space: SearchSpace | None = None, screen_share: float = 0.0, screen_windows: int = 32) -> Searcher:
    """The wrapped searcher for ``search.searcher``; multi-objective ones carry their metrics. ``screen_share``:
    the additive searcher's multi-fidelity mode (see :mod:`.additive`)."""
    startup = max(1, len(points) + random_warmup)
    if screen_share > 0 and kind != "additive":
        raise ValueError(f"screening (screen_share {screen_share}) is a mode of the additive searcher, not {kind!r}")
    if kind == "additive":
        if space is None:
            raise ValueError("the additive searcher needs the search space's memory tables (SearchSpace)")
        from .additive import AdditiveSearcher, screen_relative_noise
        screens = dict(screen_share=screen_share, screen_noise=screen_relative_noise(screen_windows))
        if space.variants:
            from ..policy import PRUNE_KEY
            return AdditiveSearcher(space.keys, space.options, list(space.variant_costs), list(space.variant_scores),
                                    points, seed, variants=list(space.variants), variant_key=PRUNE_KEY, **screens)
        return AdditiveSearcher(space.keys, space.options, space.costs, space.scores, points, seed, **screens)
    if kind == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch
        tpe = HyperOptSearch(points_to_evaluate=points or None, random_state_seed=seed, n_initial_points=startup)
        return AboveTheLine(tpe, freeze_after=len(points))
    if kind in ("random", "points"):
        return RandomPlanSearcher(points, seed, points_only=kind == "points")
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if kind == "optuna_mo":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    elif kind == "optuna_gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    else:
        raise ValueError(f"unknown searcher {kind!r}")
    return OptunaSearch(metric=["objective", "weight_bytes"], mode=["max", "min"], sampler=sampler,
                        points_to_evaluate=points or None)
