"""A Tune-free driver of the product's searchers, and the simple baselines, over a synthetic world.

The driver does what the product's search loop does around a Ray Tune ``Searcher`` (``BudgetedSearcher``
and Tune itself), without Ray: it asks ``suggest`` for plans, answers a plan over the budget at once
(``objective <= -1000``, never trained, not counted), answers a repeat of an evaluated plan from that
result (not counted), holds a proposal of a plan that is still running until that trial completes, keeps
up to ``pending`` trials running, and completes them in random order (a cluster finishes trials out of
order). ``n_trials`` counts trained trials, as ``search.num_trials`` does.

Baselines (each gets the same scores and memory tables as the searchers, never the world's gains):

* ``greedy_chain``: the seed rule's greedy chain from the scores (``qpruner.policy.greedy_chain``), N plans
  evenly spaced along it; no feedback.
* ``score_knapsack``: the exact knapsack on the scores alone (``qpruner.frontier.prior_gain`` values),
  N plans evenly spaced over its front; no feedback.
* ``probe_knapsack``: all-lowest, then the most important units probed one at a time (one step up from
  all-lowest; at most (N - 1) / 2 of them), then an exact knapsack on the measured gains (unprobed units:
  their score times the median measured gain per score; the step to the top format: ``TOP_STEP_RATIO``
  of the first step, the measured ratio) evaluated at evenly spaced capacities.
* ``random``: uniformly random options per unit, drawn again when over the budget.
"""

from __future__ import annotations

import time

import numpy as np

from qpruner import policy
from qpruner.frontier import knapsack_front, prior_gain

TOP_STEP_RATIO = 0.12   # int8 -> bf16 gain / nf4 -> int8 gain, uniform plans (memory_claim.md 0.0214 / landscape.md 0.174)
FINISHED = "FINISHED"


def config_of(row, options) -> dict:
    return {policy.key(u): options[int(k)] for u, k in enumerate(row)}


def row_of(config: dict, options, n_units: int) -> tuple:
    return tuple(options.index(config[policy.key(u)]) for u in range(n_units))


def drive(world, searcher, n_trials: int, seed: int = 0, pending: int = 1, stage: str = "demo",
          max_rejections: int = 2000, timings: list | None = None) -> list[tuple]:
    """Trained plans (option-index tuples) in completion order. ``timings``: gets ``(trials running, seconds)``
    of every ``suggest`` call."""
    from ray.tune.search import Searcher
    rng = np.random.default_rng(seed)
    costs = world.costs
    U = costs.weights.shape[0]
    options = list(world_options(world))
    results: dict[tuple, float] = {}
    running: dict[str, tuple] = {}
    waiting: dict[tuple, list[str]] = {}
    trained: list[tuple] = []
    counter = 0
    finished = False
    while len(trained) < n_trials:
        while not finished and len(running) < pending and len(trained) + len(running) < n_trials:
            for _ in range(max_rejections):
                counter += 1
                tid = f"t{counter}"
                t0 = time.perf_counter()
                config = searcher.suggest(tid)
                if timings is not None:
                    timings.append((len(running), time.perf_counter() - t0))
                if config is None or config == Searcher.FINISHED or config == FINISHED:
                    finished = True
                    break
                row = row_of(config, options, U)
                if not costs.fits(np.array(row)):
                    excess = costs.avg_bits(np.array(row)) / max(costs.budget.avg_bits or 1.0, 1e-9) - 1.0
                    searcher.on_trial_complete(tid, {"objective": -1000.0 - excess, "weight_bytes": costs.total(row)})
                    continue
                if row in results:
                    searcher.on_trial_complete(tid, {"objective": results[row], "weight_bytes": costs.total(row)})
                    continue
                if row in running.values():
                    waiting.setdefault(row, []).append(tid)
                    continue
                running[tid] = row
                break
            else:
                finished = True
        if not running:
            break
        tid = list(running)[int(rng.integers(len(running)))] if pending > 1 else next(iter(running))
        row = running.pop(tid)
        y = world.observe(np.array(row), rng, stage)
        results[row] = y
        answer = {"objective": y, "weight_bytes": costs.total(row)}
        searcher.on_trial_complete(tid, answer)
        for other in waiting.pop(row, []):
            searcher.on_trial_complete(other, answer)
        trained.append(row)
    return trained


def drive_screened(world, searcher, compute: float, windows: int, seed: int = 0, max_rejections: int = 2000,
                   with_own_screen: bool = True, screen_seconds: float | None = None) -> list[tuple]:
    """Sequential multi-fidelity drive until ``compute`` trial-seconds are spent: a proposal whose config says
    ``fidelity: screen`` is a screen (``world.screen``: zero steps, ``windows`` windows; costs
    ``SCREEN_SECONDS[windows]``), any other a full trial (``STAGE_SECONDS['demo']``, plus its own screen before
    fine-tuning when ``with_own_screen``, reported as ``objective_screen``). Returns ``(row, fidelity, seconds
    spent when it finished)`` for every trial run (answers without training cost nothing)."""
    import search_worlds as worlds
    rng = np.random.default_rng(seed)
    costs = world.costs
    U = costs.weights.shape[0]
    options = list(world_options(world))
    screen_s = worlds.SCREEN_SECONDS[windows] if screen_seconds is None else screen_seconds
    full_s = worlds.STAGE_SECONDS["demo"] + (max(0.0, screen_s - 4.15) if with_own_screen else 0.0)
    done: dict[tuple, dict] = {}
    log: list[tuple] = []
    spent, counter = 0.0, 0
    while spent < compute:
        for _ in range(max_rejections):
            counter += 1
            tid = f"t{counter}"
            config = searcher.suggest(tid)
            if config is None or config == FINISHED:
                return log
            fidelity = config.pop("fidelity", "full")
            row = row_of(config, options, U)
            if not costs.fits(np.array(row)):
                searcher.on_trial_complete(tid, {"objective": -1000.5, "weight_bytes": costs.total(row)})
                continue
            if fidelity == "full" and row in done:
                searcher.on_trial_complete(tid, done[row])
                continue
            break
        else:
            return log
        if fidelity == "screen":
            spent += screen_s
            answer = {"objective": world.screen(np.array(row), rng, windows), "fidelity": "screen",
                      "seconds_total": screen_s}
        else:
            spent += full_s
            answer = {"objective": world.observe(np.array(row), rng, "demo"), "weight_bytes": costs.total(row),
                      "seconds_total": full_s}
            if with_own_screen:
                answer["objective_screen"] = world.screen(np.array(row), rng, windows)
            done[row] = answer
        searcher.on_trial_complete(tid, answer)
        log.append((row, fidelity, spent))
    return log


def world_options(world) -> tuple:
    return tuple(world.options) if hasattr(world, "options") else (4, 8, 16)[: world.costs.weights.shape[1]]


class _Fixed:
    """A no-feedback list of plans (Searcher interface)."""

    def __init__(self, rows, options):
        self.rows, self.options = [tuple(int(i) for i in r) for r in rows], list(options)

    def suggest(self, trial_id):
        return config_of(self.rows.pop(0), self.options) if self.rows else FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def _spaced(rows: np.ndarray, n: int) -> np.ndarray:
    if n >= len(rows):
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, n).round().astype(int))]


def greedy_chain(scores, costs, options, n: int) -> _Fixed:
    return _Fixed(policy.chain_points(policy.greedy_chain(scores, costs, list(options)), n), options)


def score_knapsack(scores, costs, options, n: int) -> _Fixed:
    values = prior_gain(scores, [float(o) for o in options])
    rows = knapsack_front(values, costs.unit_cost, costs.capacity())
    rows = np.array([r for r in rows if costs.fits(r)])
    return _Fixed(_spaced(rows, n), options)


class ProbeKnapsack:
    """All-lowest, probes of single units, then a knapsack on the measured gains (see the module docstring)."""

    def __init__(self, scores, costs, options, n: int):
        self.costs, self.options, self.n = costs, list(options), n
        self.s = np.asarray(scores, dtype=float)
        self.s = self.s - self.s.min() + 1e-12 if np.any(self.s <= 0) else self.s
        U = len(self.s)
        self.n_probe = int(min(U, max(0, (n - 1) // 2)))
        order = np.argsort(-self.s, kind="stable")[: self.n_probe]
        low = np.zeros(U, dtype=int)
        self.queue = [low] + [np.where(np.arange(U) == u, 1, 0) for u in order]
        self.probed = list(order)
        self.answers: dict[str, float] = {}
        self.issued: dict[str, tuple] = {}
        self.plan_rows: list | None = None

    def suggest(self, trial_id):
        if self.queue:
            row = tuple(int(i) for i in self.queue.pop(0))
            self.issued[trial_id] = row
            return config_of(row, self.options)
        if self.plan_rows is None:
            if len(self.answers) < 1 + self.n_probe:
                return None   # waiting for the probes (the driver completes them first when pending == 1)
            self.plan_rows = self._knapsack()
        if not self.plan_rows:
            return FINISHED
        return config_of(self.plan_rows.pop(0), self.options)

    def _knapsack(self):
        U, K = self.costs.weights.shape
        by_row = {self.issued[t]: y for t, y in self.answers.items()}
        base = by_row.get(tuple([0] * U), 0.0)
        gain = np.full(U, np.nan)
        for u in self.probed:
            row = tuple(1 if i == u else 0 for i in range(U))
            if row in by_row:
                gain[u] = by_row[row] - base
        known = ~np.isnan(gain)
        per_score = float(np.median(gain[known] / self.s[known])) if known.any() else 1.0
        if per_score <= 0:   # the probes measured noise only: scale the scores by the probes' mean size
            per_score = float(np.abs(gain[known]).mean() / self.s[known].mean()) if known.any() else 1.0
        gain[~known] = self.s[~known] * per_score
        # a measured loss is noise (more bits never hurt here): keep every gain positive, ordered by score
        gain = np.maximum(gain, 1e-3 * per_score * self.s)
        values = np.zeros((U, K))
        if K > 1:
            values[:, 1] = gain
        for k in range(2, K):
            values[:, k] = values[:, k - 1] + gain * TOP_STEP_RATIO ** (k - 1)
        rows = knapsack_front(values, self.costs.unit_cost, self.costs.capacity())
        rows = [tuple(int(i) for i in r) for r in rows if self.costs.fits(r)]
        left = self.n - 1 - self.n_probe
        done = set(by_row)
        rows = [r for r in rows if r not in done]
        return [tuple(r) for r in _spaced(np.array(rows), left)] if rows and left > 0 else []

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self.issued and result and result.get("objective", -1e9) > -999:
            self.answers[trial_id] = float(result["objective"])


class RandomFeasible:
    def __init__(self, costs, options, seed: int):
        self.costs, self.options = costs, list(options)
        self.rng = np.random.default_rng(seed)

    def suggest(self, trial_id):
        U, K = self.costs.weights.shape
        for _ in range(10_000):
            row = self.rng.integers(K, size=U)
            if self.costs.fits(row):
                return config_of(row, self.options)
        return FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass
