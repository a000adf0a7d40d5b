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

Joint search (``variants``: the pruning amounts of ``prune.param_ratios``, under ``variant_key``):
``costs`` and ``scores`` are then lists, one per variant, and a plan is ``(variant, *unit options)``.

Multi-fidelity (``screen_share > 0``, ``search.screen_share``): some proposals are **screens**, marked
``{FIDELITY_KEY: "screen"}`` in the config: the plan's zero-step evaluation on a few windows
(:func:`qpruner.trial.run_screen`), a fraction of a trial's cost. The searcher screens while screens (done
and running, at their measured mean trial-seconds) stay within ``screen_share`` of the compute; the first
screens (one per unit) are a random design that teaches the model the units' effects, later ones go to the
most uncertain plan that may still move the front. Screens enter the model as measurements of another
fidelity (:class:`qpruner.frontier.Screens`: a slope, estimated from the full trials' own screens, and a
discrepancy of their own); they are never "observed" plans and never stand on a full trial's front, so
full trials go where the screened model says the front can move. Measured: it pays when a screen costs a
few % of a full trial, not at the demo's 10 CPU steps (``results/bench/search_large.md``, Multi-fidelity).
"""

from __future__ import annotations

import itertools
import logging
import json

import numpy as np
from ray.tune.search import Searcher

from ..frontier import Screens, StepModel, hv_improvements, knapsack_fronts, score_shares
from ..memory import UnitCosts

logger = logging.getLogger(__name__)
FEASIBLE_FLOOR = -999.0   # objectives at or below this are the wrapper's "not trained" answers
FAILED_OBJECTIVE = -2000.0  # a trial (or screen) that failed on its own (qpruner.results)
FIDELITY_KEY = "fidelity"  # in a proposal's config: "screen" for a screening trial (absent: a full trial)
SCREEN = "screen"
SCREEN_COST_WARNING = 0.08  # screen / full trial-seconds: 0.05 paid (+0.02 HV at equal compute), 0.09 did not


def screen_relative_noise(windows: int) -> float:
    """A screen's noise relative to the front's quality range, by its evaluation windows: measured on the SmolLM2
    landscape (zero-step NLL on the first w of 64 windows against all 64: residual sd 0.0104 at 16, 0.0036 at 32,
    over a front range of ~0.17), with a margin at 32 and above."""
    return 0.06 if windows < 32 else 0.025


class AdditiveSearcher(Searcher):
    """Ray Tune searcher: the memory-aware Bayesian proposals of :mod:`qpruner.frontier`."""
    def __init__(self, keys: list[str], options: list, costs: UnitCosts | list[UnitCosts], scores=None,
                 points_to_evaluate: list[dict] | None = None, seed: int = 0, draws: int = 32, fronts: int = 8,
                 bins: int = 2048, max_candidates: int = 1024, metric: str = "objective", mode: str = "max",
                 variants: list | None = None, variant_key: str | None = None, screen_share: float = 0.0,
                 screen_noise: float = 0.04, screen_discrepancy: float = 0.5):
        super().__init__(metric=metric, mode=mode)
        if not 0.0 <= screen_share < 1.0:
            raise ValueError(f"screen_share must be in [0, 1), got {screen_share}")
        self.screen_share, self.screen_noise = float(screen_share), float(screen_noise)
        self.screen_discrepancy = float(screen_discrepancy)
        self.keys, self.options = list(keys), list(options)
        self.variants, self.variant_key = (list(variants), variant_key) if variants else (None, None)
        self.tables = list(costs) if self.variants else [costs]          # one UnitCosts per variant
        self.costs, self.draws, self.fronts, self.bins = self.tables[0], draws, fronts, bins
        self.max_candidates = max_candidates
        self._cached = None      # (observations it was fitted on, model, draws, candidates): see _posterior
        self._hash_w = np.random.default_rng(12345).integers(1, 2 ** 62, size=len(self.keys) + 1, dtype=np.int64)
        U = len(self.keys)
        if self.variants and (variant_key is None or len(self.tables) != len(self.variants)):
            raise ValueError("a joint search needs variant_key and one cost table per variant")
        for table in self.tables:
            if table.weights.shape != (U, len(self.options)):
                raise ValueError(f"cost table {table.weights.shape} does not match {U} units x {len(self.options)} options")
        per_variant = scores if self.variants else [scores]
        self.shares = np.stack([score_shares(np.ones(U) if s is None else s)
                                for s in (per_variant if per_variant is not None else [None] * len(self.tables))])
        self.sizes = np.stack([t.weights[:, -1] for t in self.tables])   # bytes in the widest format ~ weights
        self.points = [self._idx(p) for p in (points_to_evaluate or [])]
        self.rng = np.random.default_rng(seed)
        self.observed: dict[tuple, float] = {}     # plan -> quality (trained)
        self.evaluated: set[tuple] = set()         # every plan answered, trained or not
        self.pending: dict[str, tuple] = {}        # trial id -> plan
        self.pending_screens: set[str] = set()     # those of the pending trials that are screens
        self.screened: dict[tuple, float] = {}     # plan -> screening measurement (screens, and full trials' own)
        self.unscreenable: set[tuple] = set()      # plans whose screen failed or errored
        self.seconds = {"screen": [0.0, 0], "full": [0.0, 0]}   # trial-seconds and trials completed, by fidelity
        self._warned_cost = False

    def __setstate__(self, state: dict) -> None:
        """A searcher pickled by an earlier version (Ray Tune's experiment state) lacks the multi-fidelity state."""
        self.__dict__.update(state)
        for name, default in (("screen_share", 0.0), ("screen_noise", 0.04), ("screen_discrepancy", 0.5),
                              ("_warned_cost", False)):
            self.__dict__.setdefault(name, default)
        for name, make in (("pending_screens", set), ("screened", dict), ("unscreenable", set),
                           ("seconds", lambda: {"screen": [0.0, 0], "full": [0.0, 0]})):
            if name not in self.__dict__:
                self.__dict__[name] = make()

    # --- encoding -------------------------------------------------------------------------------------
    def _idx(self, config: dict) -> tuple:
        """A plan's id: its option indices, led by its variant's index in a joint search."""
        idx = tuple(self.options.index(config[k]) for k in self.keys)
        return (self._variant_index(config[self.variant_key]),) + idx if self.variants else idx

    def _variant_index(self, value) -> int:
        return min(range(len(self.variants)), key=lambda v: abs(float(self.variants[v]) - float(value)))

    def _config(self, plan) -> dict:
        v, idx = self._split(plan)
        config = {k: self.options[int(i)] for k, i in zip(self.keys, idx)}
        if self.variants:
            config[self.variant_key] = self.variants[v]
        return config

    def _split(self, plan) -> tuple[int, np.ndarray]:
        """(variant index, option indices) of a plan id."""
        return (int(plan[0]), np.array(plan[1:])) if self.variants else (0, np.array(plan))

    def _total(self, plan) -> float:
        v, idx = self._split(plan)
        return self.tables[v].total(idx)

    def _fits(self, plan) -> bool:
        v, idx = self._split(plan)
        return self.tables[v].fits(idx)

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
            if not self._taken(idx) and self._fits(idx):
                self.pending[trial_id] = idx
                return self._config(idx)
        screen = self._screen_next()
        idx = None
        if screen and len(self.screened) + len(self.pending_screens) < len(self.keys):
            idx = self._random_plan(screen=True)    # the first screens: a random design (one per unit)
        if idx is None:
            idx = self._propose(screen)
        if idx is None and screen:          # nothing left worth screening: train instead
            screen = False
            idx = self._propose(False)
        if idx is None:
            logger.info("additive searcher: every plan within the budget has been evaluated")
            return Searcher.FINISHED
        self.pending[trial_id] = idx
        if screen:
            self.pending_screens.add(trial_id)
            return {**self._config(idx), FIDELITY_KEY: SCREEN}
        return self._config(idx)

    def _cost(self, fidelity: str) -> float:
        """Mean trial-seconds of a trial of ``fidelity`` so far (before any: a screen is 0.1 of a full trial)."""
        spent, n = self.seconds[fidelity]
        other, m = self.seconds["full" if fidelity == "screen" else "screen"]
        if n:
            return spent / n
        if m:
            return other / m * (0.1 if fidelity == "screen" else 10.0)
        return 1.0 if fidelity == "screen" else 10.0

    def _check_screen_cost(self) -> None:
        """Warn once when screens cost so much of a full trial that screening was measured not to pay."""
        if self.screen_share <= 0 or self._warned_cost or not (self.seconds["screen"][1] and self.seconds["full"][1]):
            return
        ratio = self._cost("screen") / self._cost("full")
        if ratio > SCREEN_COST_WARNING:
            self._warned_cost = True
            logger.warning("a screen costs %.0f%% of a full trial; above ~%.0f%% screening was measured not to pay on "
                           "the large-space replay (results/bench/search_large.md, Multi-fidelity): consider "
                           "search.screen_share: 0, fewer search.screen_windows, or longer fine-tunes",
                           100 * ratio, 100 * SCREEN_COST_WARNING)

    def _screen_next(self) -> bool:
        """Multi-fidelity (``screen_share > 0``): screen while screens (done and running, at their mean cost)
        stay within ``screen_share`` of the compute spent, counting the screen about to start."""
        if self.screen_share <= 0:
            return False
        screen, full = self._cost("screen"), self._cost("full")
        n_screens = len(self.pending_screens)
        s = self.seconds["screen"][0] + n_screens * screen + screen
        f = self.seconds["full"][0] + (len(self.pending) - n_screens) * full
        return s / (s + f) <= self.screen_share

    def _model(self) -> StepModel:
        model = StepModel(self.shares, len(self.options), sizes=self.sizes)
        screens = self._screens()
        if len(set(self.observed.values())) >= 2 or (screens is not None and len(set(screens.y)) >= 2):
            plans = list(self.observed)
            rows, variants = self._rows(plans)
            return model.fit(rows, np.array([self.observed[p] for p in plans], dtype=float), variants, screen=screens)
        # the prior alone: quality grows with the score shares of the upgraded units
        return model.prior_only(float(np.mean(list(self.observed.values()))) if self.observed else 0.0)

    def _screens(self) -> Screens | None:
        """The screening measurements, with the slope between fidelities estimated from the plans measured at
        both (least squares, kept within [0.5, 3]; 1 until two such plans differ)."""
        if not self.screened:
            return None
        plans = list(self.screened)
        rows, variants = self._rows(plans)
        both = [p for p in plans if p in self.observed]
        slope = 1.0
        if len(both) >= 2:
            f = np.array([self.observed[p] for p in both])
            sc = np.array([self.screened[p] for p in both])
            if np.ptp(f) > 0:
                slope = float(np.clip(np.polyfit(f, sc, 1)[0], 0.5, 3.0))
        return Screens(rows, np.array([self.screened[p] for p in plans], dtype=float), variants, slope=slope,
                       discrepancy=self.screen_discrepancy, relative_noise=self.screen_noise)

    def _rows(self, plans: list) -> tuple[np.ndarray, np.ndarray]:
        """(option rows ``[n, U]``, variant of each) of plan ids."""
        if not plans:
            return np.zeros((0, len(self.keys)), dtype=int), np.zeros(0, dtype=int)
        arr = np.array(plans, dtype=int)
        return (arr[:, 1:], arr[:, 0]) if self.variants else (arr, np.zeros(len(arr), dtype=int))

    def _hash(self, rows: np.ndarray, variants: np.ndarray) -> np.ndarray:
        """A 64-bit key per plan (random linear hash; wraps around on overflow) for fast set tests."""
        with np.errstate(over="ignore"):
            return (rows.astype(np.int64) + 1) @ self._hash_w[:-1] + variants.astype(np.int64) * self._hash_w[-1]

    def _candidates(self, model: StepModel, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, variants, hash keys) of the feasible plans that are best at some memory under the posterior
        mean or one of the first ``fronts`` draws (one exact knapsack per variant and coefficient vector),
        distinct, sorted by memory."""
        rows, variants = [], []
        fronts = self.fronts if len(self.pending) < 64 else min(self.fronts, 2)   # many running: they spread it
        for v, table in enumerate(self.tables):
            effects = np.stack([model.effects(theta, v) for theta in [model.mean, *thetas[:fronts]]])
            for r in knapsack_fronts(effects, table.unit_cost, table.capacity(), self.bins):
                r = r[table.fits_rows(r)] if len(r) else r
                rows.append(r)
                variants.append(np.full(len(r), v))
        rows, variants = np.concatenate(rows), np.concatenate(variants)
        keys = self._hash(rows, variants)
        _, first = np.unique(keys, return_index=True)
        rows, variants, keys = rows[first], variants[first], keys[first]
        order = np.argsort(self._costs_of(rows, variants), kind="stable")    # by memory (for _new's spread)
        return rows[order], variants[order], keys[order]

    def _posterior(self):
        """(model, draws, candidates), refitted when new qualities arrived: at once when few trials run, after
        ``len(pending) // 8`` new ones when many do (one more result changes little next to hundreds of
        running trials, and a refit at 210 units costs ~0.1-0.3 s). Proposals between refits share one set
        of draws, as batch expected improvement does; the running trials keep them apart."""
        key = len(self.observed) + len(self.screened)
        cached = self._cached
        if cached is None or key - cached[0] >= max(1, len(self.pending) // 8):
            model = self._model()
            thetas = model.samples(self.rng, self.draws)
            self._cached = (key, model, thetas, *self._candidates(model, thetas))
        return self._cached[1:]

    def _new(self, rows: np.ndarray, variants: np.ndarray, keys: np.ndarray, screen: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Those of the candidates not evaluated or running (nor screened, for a screen), at most
        ``max_candidates`` (spread over memory). A full trial's candidates also include every screened plan
        not trained yet (its screen may put it on the front though no posterior draw's knapsack does)."""
        if not screen and self.screened:
            extra = [p for p in self.screened if p not in self.observed]
            if extra:
                er, ev = self._rows(extra)
                rows, variants = np.concatenate([rows, er]), np.concatenate([variants, ev])
                keys = np.concatenate([keys, self._hash(er, ev)])
                keys, first = np.unique(keys, return_index=True)
                rows, variants = rows[first], variants[first]
        done = list(self.evaluated) + list(self.pending.values()) + (
            list(self.screened) + list(self.unscreenable) if screen else [])
        taken = self._hash(*self._rows(done))
        new = np.flatnonzero(~np.isin(keys, taken))
        if len(new) > self.max_candidates:
            new = new[np.linspace(0, len(new) - 1, self.max_candidates).round().astype(int)]
        return rows[new], variants[new]

    def _costs_of(self, rows: np.ndarray, variants: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows))
        for v, table in enumerate(self.tables):
            on = variants == v
            if on.any():
                out[on] = table.totals(rows[on])
        return out

    def _propose(self, screen: bool = False):
        """The candidate with the largest expected hypervolume improvement (Monte Carlo over ``draws`` posterior
        draws; in each draw the front is that draw's values of every trained and running plan, so running
        trials count as what they would likely measure and proposals under concurrency spread out). For a
        screen, screened plans count as known too (at their posterior values), and of the candidates with a
        positive improvement the screen goes to the most uncertain one (information where the front may move);
        a full trial's front holds full-fidelity plans only (screens never stand on the front)."""
        model, thetas, rows, variants, keys = self._posterior()
        cand_rows, cand_var = self._new(rows, variants, keys, screen)
        if not len(cand_rows):
            return None if screen else self._fallback()
        full_pending = [p for t, p in self.pending.items() if t not in self.pending_screens]
        known = list(self.observed) + (list(self.pending.values()) + list(self.screened) if screen else full_pending)
        known_rows, known_var = self._rows(list(dict.fromkeys(known)))
        known_values = model.features(known_rows, known_var) @ thetas.T if len(known_rows) else np.zeros((0, len(thetas)))
        cand_values = model.features(cand_rows, cand_var) @ thetas.T
        known_cost, cand_cost = self._costs_of(known_rows, known_var), self._costs_of(cand_rows, cand_var)
        means = np.r_[known_values.mean(axis=1), cand_values.mean(axis=1)]
        spread = float(np.ptp(means)) or 1.0
        top = max(t.capacity() + float(t.fixed) for t in self.tables)
        ref = (top + 1.0, float(means.min()) - 0.1 * spread)
        gain = np.zeros(len(cand_rows))
        for d in range(len(thetas)):
            gain += hv_improvements(known_cost, known_values[:, d], cand_cost, cand_values[:, d], ref)
        best = int(np.argmax(gain))
        if screen and gain[best] > 0:   # a screen: the most uncertain of the plans that may move the front
            best = int(np.argmax(np.where(gain > 0, cand_values.std(axis=1), -np.inf)))
        if gain[best] <= 0:   # no draw sees any improvement: the plan that comes closest to the known front
            level = np.where(known_cost[None, :] <= cand_cost[:, None], known_values.mean(axis=1)[None, :], -np.inf)
            best = int(np.argmax(cand_values.mean(axis=1) - level.max(axis=1, initial=-np.inf)))
        idx = tuple(int(i) for i in cand_rows[best])
        return (int(cand_var[best]),) + idx if self.variants else idx

    def _random_plan(self, screen: bool = False):
        """A random plan (of a random variant; each unit's option uniform), lowered unit by unit (in random order)
        until it fits, not evaluated or running yet (nor screened, for a screen); ``None`` after 2000 tries."""
        U, K, V = len(self.keys), len(self.options), len(self.tables)
        for _ in range(2000):
            v = int(self.rng.integers(V))
            table = self.tables[v]
            row = self.rng.integers(K, size=U)
            for u in self.rng.permutation(U):
                if table.fits(row):
                    break
                row[u] = 0
            idx = tuple(int(i) for i in row)
            plan = (v,) + idx if self.variants else idx
            if table.fits(row) and not self._taken(plan) and not (
                    screen and (plan in self.screened or plan in self.unscreenable)):
                return plan
        return None

    def _fallback(self):
        """No knapsack plan is new: a random plan (:meth:`_random_plan`); in a small space, the first new plan by
        enumeration. ``None`` only when every feasible plan has been evaluated (small spaces) or 2000 tries
        found nothing new."""
        plan = self._random_plan()
        if plan is not None:
            return plan
        U, K, V = len(self.keys), len(self.options), len(self.tables)
        if V * K ** U <= 200_000:
            for v in range(V):
                for idx in itertools.product(range(K), repeat=U):
                    plan = (v,) + idx if self.variants else idx
                    if not self._taken(plan) and self.tables[v].fits(np.array(idx)):
                        return plan
            return None
        logger.warning("additive searcher: 2000 random feasible plans were all evaluated already")
        return None

    # --- results --------------------------------------------------------------------------------------
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        idx = self.pending.pop(trial_id, None)
        if idx is None:
            return
        screen = trial_id in self.pending_screens
        self.pending_screens.discard(trial_id)
        took = float(result.get("seconds_total") or 0.0) if result and not error else 0.0
        if took > 0:
            tally = self.seconds["screen" if screen else "full"]
            tally[0] += took
            tally[1] += 1
            self._check_screen_cost()
        value = float(result[self.metric]) if result and not error and self.metric in result else float("nan")
        feasible = np.isfinite(value) and value > FEASIBLE_FLOOR
        sign = 1.0 if self.mode == "max" else -1.0
        if screen:
            if feasible:
                self.screened[idx] = sign * value
            elif FAILED_OBJECTIVE < value <= FEASIBLE_FLOOR:    # over the budget: never proposed again, at all
                self.evaluated.add(idx)
            else:                            # the screen failed or errored: not screened again (may be trained)
                self.unscreenable.add(idx)
            return
        self.evaluated.add(idx)
        if feasible:
            self.observed[idx] = sign * value
            own = result.get(f"{self.metric}_screen") if result else None   # the full trial's own screen
            if own is not None and np.isfinite(float(own)):
                self.screened[idx] = sign * float(own)

    # --- checkpointing --------------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        """The searcher's state as JSON (never pickle: a checkpoint may come from shared storage)."""
        def ints(p):
            return [int(i) for i in p]
        state = {"points": [ints(p) for p in self.points], "rng": self.rng.bit_generator.state,
                 "observed": [[ints(p), float(q)] for p, q in self.observed.items()],
                 "evaluated": [ints(p) for p in self.evaluated],
                 "pending": {t: ints(p) for t, p in self.pending.items()},
                 "pending_screens": sorted(self.pending_screens),
                 "screened": [[ints(p), float(q)] for p, q in self.screened.items()],
                 "seconds": self.seconds, "unscreenable": [ints(p) for p in self.unscreenable]}
        with open(checkpoint_path, "w") as fh:
            json.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            state = json.load(fh)
        self.points = [tuple(p) for p in state["points"]]
        self.observed = {tuple(p): float(q) for p, q in state["observed"]}
        self.evaluated = {tuple(p) for p in state["evaluated"]}
        self.pending = {t: tuple(p) for t, p in state["pending"].items()}
        self.pending_screens = set(state.get("pending_screens", []))
        self.screened = {tuple(p): float(q) for p, q in state.get("screened", [])}
        self.seconds = state.get("seconds", {"screen": [0.0, 0], "full": [0.0, 0]})
        self.unscreenable = {tuple(p) for p in state.get("unscreenable", [])}
        self.rng.bit_generator.state = state["rng"]
        self._cached = None
