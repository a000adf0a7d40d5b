"""The memory-aware Bayesian searcher (``search.searcher: additive``, the default) as a Ray Tune Searcher.

The model and the proposal rule are in :mod:`qpruner.frontier`. This class adds the Tune plumbing:
``suggest`` / ``on_trial_complete``, trials still running under concurrency (kept out of repeats and
counted at their posterior mean), and ``save`` / ``restore`` for ``--resume``.

Start: the seed plans (``points_to_evaluate``: the probabilistic decision's uniform ends, best guess
and samples spread over memory) in order, skipping any over the budget or repeated. Then model-based
proposals; before two distinct qualities are known the model is the prior alone (the layer scores),
so the first proposals already spread along the memory axis in importance order.
Results the wrapper answers without training (over budget, ``objective <= -1000``) are remembered
as evaluated and never fitted.
"""

from __future__ import annotations

import itertools
import logging
import json

import numpy as np
from ray.tune.search import Searcher

from ..frontier import AdditiveModel, front_points, gap_to_front, hv_improvement, knapsack_front, prior_gain
from ..memory import UnitCosts

logger = logging.getLogger(__name__)
FEASIBLE_FLOOR = -999.0   # objectives at or below this are the wrapper's "not trained" answers


class AdditiveSearcher(Searcher):
    def __init__(self, keys: list[str], options: list, costs: UnitCosts, scores=None,
                 points_to_evaluate: list[dict] | None = None, seed: int = 0, draws: int = 8, bins: int = 2048,
                 metric: str = "objective", mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.keys, self.options = list(keys), list(options)
        self.costs, self.draws, self.bins = costs, draws, bins
        U = len(self.keys)
        if costs.weights.shape != (U, len(self.options)):
            raise ValueError(f"cost table {costs.weights.shape} does not match {U} units x {len(self.options)} options")
        self.prior = prior_gain(np.ones(U) if scores is None else scores, [float(o) for o in self.options])
        self.points = [self._idx(p) for p in (points_to_evaluate or [])]
        self.rng = np.random.default_rng(seed)
        self.observed: dict[tuple, float] = {}     # plan -> quality (trained)
        self.evaluated: set[tuple] = set()         # every plan answered, trained or not
        self.pending: dict[str, tuple] = {}        # trial id -> plan

    # --- encoding -------------------------------------------------------------------------------------
    def _idx(self, config: dict) -> tuple:
        return tuple(self.options.index(config[k]) for k in self.keys)

    def _config(self, idx) -> dict:
        return {k: self.options[int(i)] for k, i in zip(self.keys, idx)}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    # --- proposals ------------------------------------------------------------------------------------
    def _taken(self, idx: tuple) -> bool:
        return idx in self.evaluated or idx in self.pending.values()

    def suggest(self, trial_id: str):
        while self.points:
            idx = self.points.pop(0)
            if not self._taken(idx) and self.costs.fits(np.array(idx)):
                self.pending[trial_id] = idx
                return self._config(idx)
        idx = self._propose()
        if idx is None:
            logger.info("additive searcher: every plan within the budget has been evaluated")
            return Searcher.FINISHED
        self.pending[trial_id] = idx
        return self._config(idx)

    def _model(self) -> AdditiveModel:
        model = AdditiveModel(self.prior)
        if len(set(self.observed.values())) >= 2:
            plans = list(self.observed)
            return model.fit(np.array(plans), np.array([self.observed[p] for p in plans]))
        # the prior alone: quality grows with the prior share of the upgraded units
        return model.prior_only(float(np.mean(list(self.observed.values()))) if self.observed else 0.0)

    def _propose(self):
        model = self._model()
        cost = self.costs.unit_cost
        capacity = self.costs.capacity()
        points = [(self.costs.total(np.array(p)), q) for p, q in self.observed.items()]
        if self.pending:
            running = list(self.pending.values())
            mean, _ = model.predict(np.array(running))
            points += [(self.costs.total(np.array(p)), float(m)) for p, m in zip(running, mean)]
        front = front_points(points)
        qualities = [q for _, q in points] or [0.0]
        spread = (max(qualities) - min(qualities)) or 1.0
        ref = (capacity + float(self.costs.fixed) + 1.0, min(qualities) - 0.1 * spread)
        best, best_key = None, (-np.inf, -np.inf)
        for _ in range(self.draws):
            effects = model.effects(model.sample(self.rng))
            for row in knapsack_front(effects, cost, capacity, self.bins):
                idx = tuple(int(i) for i in row)
                if self._taken(idx) or not self.costs.fits(row):
                    continue
                value = float(model.mean[0] + effects[np.arange(len(row)), row].sum())
                point = (self.costs.total(row), value)
                key = (hv_improvement(front, point, ref), gap_to_front(front, point))
                if key > best_key:
                    best, best_key = idx, key
            if best is not None and best_key[0] > 0:
                return best
        return best if best is not None else self._fallback()

    def _fallback(self):
        """No knapsack plan is new: a random plan, lowered unit by unit (in random order) until it fits,
        that was not evaluated yet; in a small space, the first such plan by enumeration. ``None`` only
        when every feasible plan has been evaluated (small spaces) or 2000 tries found nothing new."""
        U, K = len(self.keys), len(self.options)
        for _ in range(2000):
            row = self.rng.integers(K, size=U)
            for u in self.rng.permutation(U):
                if self.costs.fits(row):
                    break
                row[u] = 0
            idx = tuple(int(i) for i in row)
            if self.costs.fits(row) and not self._taken(idx):
                return idx
        if K ** U <= 200_000:
            for idx in itertools.product(range(K), repeat=U):
                if not self._taken(idx) and self.costs.fits(np.array(idx)):
                    return idx
            return None
        logger.warning("additive searcher: 2000 random feasible plans were all evaluated already")
        return None

    # --- results --------------------------------------------------------------------------------------
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        idx = self.pending.pop(trial_id, None)
        if idx is None:
            return
        self.evaluated.add(idx)
        if error or not result or self.metric not in result:
            return
        value = float(result[self.metric])
        if np.isfinite(value) and value > FEASIBLE_FLOOR:
            self.observed[idx] = value if self.mode == "max" else -value

    # --- checkpointing --------------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        """The searcher's state as JSON (never pickle: a checkpoint may come from shared storage)."""
        def ints(p):
            return [int(i) for i in p]
        state = {"points": [ints(p) for p in self.points], "rng": self.rng.bit_generator.state,
                 "observed": [[ints(p), float(q)] for p, q in self.observed.items()],
                 "evaluated": [ints(p) for p in self.evaluated],
                 "pending": {t: ints(p) for t, p in self.pending.items()}}
        with open(checkpoint_path, "w") as fh:
            json.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            state = json.load(fh)
        self.points = [tuple(p) for p in state["points"]]
        self.observed = {tuple(p): float(q) for p, q in state["observed"]}
        self.evaluated = {tuple(p) for p in state["evaluated"]}
        self.pending = {t: tuple(p) for t, p in state["pending"].items()}
        self.rng.bit_generator.state = state["rng"]
