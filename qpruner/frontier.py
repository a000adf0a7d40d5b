"""Memory-aware Bayesian search over per-unit formats: a Bayesian linear surrogate over format steps,
expected hypervolume improvement, and an exact knapsack over the (additive, exactly known) memory.
Pure numpy, no Ray.

The method, after BOCS (Baptista & Poloczek, *Bayesian Optimization of Combinatorial Structures*,
ICML 2018) and noisy expected hypervolume improvement (Daulton et al., NeurIPS 2021), adapted to two
objectives where one of them (memory) is known exactly in advance:

* **Surrogate** (:class:`StepModel`). A plan's quality is a Bayesian linear model over the steps each
  unit takes up the format ladder (nf4 -> int8 -> bf16): per step, one total gain spread by the layer
  scores (the *probabilistic decision's prior*) and one spread evenly over the weights, both learnt, so
  the data decide how far to trust the scores; a prior that each step above gains ``step_ratio`` of the
  one below (measured 0.12 on the pruned SmolLM2); per-unit deviations with a prior sized by the unit's
  expected gain. BOCS uses a pairwise model with a horseshoe prior; on the recorded SmolLM2 landscape
  NLL is close to additive over units (R^2 0.995, ``results/bench/landscape.md``), so first order with
  a Gaussian prior is enough, exact to fit and to sample from.
* **Candidates.** Under the posterior mean and a few posterior draws, the best plan at every memory
  capacity is an exact multiple-choice knapsack (:func:`knapsack_fronts`: a dynamic programme over
  memory discretised into ``bins`` steps, all draws in one pass; re-checked against the exact budget).
* **Proposal.** Of the candidates not evaluated and not running, the one with the largest expected
  hypervolume improvement (:func:`hv_improvements`) over posterior draws, where each draw's front is
  that draw's values of every trained *and running* plan — so a running trial counts as what it would
  likely measure, and concurrent proposals spread out instead of piling onto one region. Until then
  the previous default drew one posterior sample per proposal (Thompson sampling): 0.05 lower at
  N = 8-10 on the large-space replay (``results/bench/search_large.md``).
* **Joint pruning and precision** (``prune.param_ratios``): the plan also picks one of ``V`` pruned
  variants of the model. Memory stays exactly additive *within* a variant, so the knapsack runs per
  variant (with that variant's tables) and the candidates of all variants compete on the same
  improvement; the surrogate adds one offset per variant.
* Where BOCS optimises one objective with simulated annealing, we need a whole front and have an
  additive constraint, so the knapsack replaces annealing and hypervolume improvement replaces the
  plain maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def prior_gain(scores, bits) -> np.ndarray:
    """``[U, K]`` share of the all-upgrade gain that each unit in each option carries, a priori.

    A unit's share is half its positive-shifted score's share and half an equal share (scores are
    noisy; ``results/bench/importance.md``); an option's fraction of the unit's gain is its reduction
    of quantization noise power, ``(4^-b0 - 4^-b) / (4^-b0 - 4^-bmax)``."""
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    s = s - s.min() if np.any(s < 0) else s
    share = 0.5 * (s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / len(s))) + 0.5 / len(s)
    noise = 4.0 ** -np.asarray(bits, dtype=np.float64)
    frac = (noise[0] - noise) / (noise[0] - noise[-1]) if len(bits) > 1 else np.zeros(1)
    return share[:, None] * frac[None, :]


def score_shares(scores) -> np.ndarray:
    """Scores as shares that sum to 1 (shifted to be positive; equal shares when they carry nothing)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    s = s - s.min() if np.any(s < 0) else s
    return s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / len(s))


class StepModel:
    """Bayesian linear model of a plan's quality over the *steps* it takes up the format ladder.

    A plan puts unit ``u`` at option ``k_u`` (options in increasing bits); ``up[u, j] = 1`` when
    ``k_u >= j``. Its quality is modelled as

        y = b0 + sum_j [ G_j * sum_u share[u] up[u, j]  +  E_j * sum_u size[u] up[u, j] ]  +  sum_{u,j} d[u, j] up[u, j]  (+ c[v])

    ``share`` are the layer scores as shares (the probabilistic decision's prior), so ``G_j`` says how much
    step ``j`` gains in total where the scores point and ``E_j`` how much it gains spread evenly over the
    weights (``size``: each unit's share of the weights, i.e. ``mean_u`` above when units are alike): the data
    decide how far to trust the scores (measured: their rank agreement with the true gains is only ~0.5-0.8,
    ``results/bench/importance_truth.md``). The step sizes are learnt per step, with a prior that each step
    up gains ``step_ratio`` of the one below (measured: int8 -> bf16 is ~0.12 of nf4 -> int8 on the pruned
    SmolLM2, ``results/bench/memory_claim.md``; the noise-power rule of :func:`prior_gain` says 0.004).
    ``d`` lets the data overrule the shares unit by unit (prior sd ``deviation_scale`` times the unit's
    fitted gain). Joint search over ``V`` pruned variants: one share table per variant (its own scores)
    and an offset ``c[v]`` (``c[0] = 0``); ``d`` is shared.

    Fitting is empirical Bayes in two passes (as before): the global terms with ``d`` held near 0, to size
    the units' expected gains, then everything with ``d`` at its prior. Noise: ``relative_noise`` of the
    observed quality range (measured plan-to-plan noise / range on the landscape: 0.0037 / 0.17 ~ 0.02).
    """

    def __init__(self, shares: np.ndarray, n_options: int, step_ratio: float = 0.12, relative_noise: float = 0.02,
                 deviation_scale: float = 0.5, sizes: np.ndarray | None = None):
        sh = np.asarray(shares, dtype=np.float64)
        self.shares = sh if sh.ndim == 2 else sh[None]            # [V, U]
        self.V, self.U = self.shares.shape
        # the uninformed spread: every weight gains alike (a unit's share of the weights; equal by default)
        sz = np.full((self.V, self.U), 1.0 / self.U) if sizes is None else np.asarray(sizes, dtype=np.float64)
        sz = sz if sz.ndim == 2 else np.broadcast_to(sz[None], (self.V, self.U))
        self.sizes = sz / sz.sum(axis=1, keepdims=True)
        self.K, self.J = n_options, max(0, n_options - 1)        # options, steps
        self.step_ratio, self.relative_noise, self.deviation_scale = step_ratio, relative_noise, deviation_scale
        self.mean = np.zeros(self.dim)
        self.cov = np.eye(self.dim)
        self.fitted = False

    # --- layout of the coefficient vector: [b0, G_1..G_J, E_1..E_J, d[u, j] (u-major), c[1..V-1]] ---
    @property
    def n_global(self) -> int:
        return 1 + 2 * self.J

    @property
    def dim(self) -> int:
        return self.n_global + self.U * self.J + (self.V - 1)

    def _devs(self) -> slice:
        return slice(self.n_global, self.n_global + self.U * self.J)

    def features(self, idx_rows: np.ndarray, variants=None) -> np.ndarray:
        rows = np.atleast_2d(np.asarray(idx_rows, dtype=int))
        n = rows.shape[0]
        v = np.zeros(n, dtype=int) if variants is None else np.asarray(variants, dtype=int).reshape(n)
        x = np.zeros((n, self.dim))
        x[:, 0] = 1.0
        share = self.shares[v]                                     # [n, U]
        for j in range(1, self.K):
            up = (rows >= j).astype(np.float64)
            x[:, j] = (share * up).sum(axis=1)
            x[:, self.J + j] = (self.sizes[v] * up).sum(axis=1)
            x[:, self.n_global + np.arange(self.U) * self.J + j - 1] = up
        pruned = np.flatnonzero(v > 0)
        x[pruned, self.n_global + self.U * self.J + v[pruned] - 1] = 1.0
        return x

    def _posterior(self, x, y, prior_mean, prior_var, noise_var):
        precision = np.diag(1.0 / prior_var) + x.T @ x / noise_var
        cov = np.linalg.inv(precision)
        cov = (cov + cov.T) / 2
        return cov @ (prior_mean / prior_var + x.T @ y / noise_var), cov

    def _global_prior(self, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Prior means and variances of ``b0, G, E``: step 1 gains ``scale`` in all, half where the scores
        point and half evenly; each step above ``step_ratio`` of the one below; sd as large as the mean."""
        mean, var = np.zeros(self.n_global), np.zeros(self.n_global)
        for j in range(1, self.K):
            size = scale * self.step_ratio ** (j - 1)
            mean[j] = mean[self.J + j] = 0.5 * size
            var[j] = var[self.J + j] = size ** 2
        return mean, var

    def _deviation_sd(self, g: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Prior sd of ``d[u, j]``: ``deviation_scale`` times the unit's expected gain at step ``j`` (mean share
        over variants), at least half an equal share of that step's total."""
        share = self.shares.mean(axis=0)[:, None]                   # [U, 1]
        gain = np.abs(g)[None, :] * share + np.abs(e)[None, :] * self.sizes.mean(axis=0)[:, None]
        floor = 0.5 * (np.abs(g) + np.abs(e))[None, :] / self.U
        return self.deviation_scale * np.maximum(gain, floor).reshape(-1)

    def prior_only(self, center: float = 0.0) -> "StepModel":
        """The model before two distinct qualities are known (arbitrary unit scale: step 1 gains 1)."""
        gm, gv = self._global_prior(1.0)
        gm[0], gv[0] = center, 1.0
        dev = np.maximum(self._deviation_sd(gm[1:1 + self.J], gm[1 + self.J:]), 1e-9) ** 2
        self.mean = np.r_[gm, np.zeros(self.U * self.J + self.V - 1)]
        self.cov = np.diag(np.r_[gv, dev, np.ones(self.V - 1)])
        return self

    def fit(self, idx_rows, y, variants=None, screen: "Screens | None" = None) -> "StepModel":
        """Fit on full-fidelity qualities ``y`` of plans ``idx_rows`` (and, with ``screen``, on cheap screening
        measurements too: see :class:`Screens`). The model afterwards describes the full fidelity only."""
        x = self.features(np.asarray(idx_rows), variants)
        y = np.asarray(y, dtype=np.float64)
        if screen is not None and len(screen.y):
            xs = self.features(np.asarray(screen.rows), screen.variants)
            ys = np.asarray(screen.y, dtype=np.float64)
            # the screens on the full scale: what sizes the prior when few full results are known
            scale_y = np.r_[y, (ys - ys.mean()) / screen.slope + (y.mean() if len(y) else 0.0)]
        else:
            xs, ys, scale_y = None, None, y
        scale = float(np.ptp(scale_y)) if len(scale_y) > 1 and np.ptp(scale_y) > 0 else max(abs(float(scale_y.mean())), 1.0)
        noise_var = (self.relative_noise * scale) ** 2
        gm, gv = self._global_prior(scale)
        gm[0], gv[0] = float(scale_y.mean()), (10.0 * scale) ** 2
        prior_mean = np.r_[gm, np.zeros(self.U * self.J), np.zeros(self.V - 1)]
        var = np.r_[gv, np.full(self.U * self.J, (1e-3 * scale) ** 2), np.full(self.V - 1, (10.0 * scale) ** 2)]
        mean, _ = self._joint(x, y, xs, ys, screen, prior_mean, var, noise_var, scale)   # pass 1: d held near 0
        var[self._devs()] = np.maximum(self._deviation_sd(mean[1:1 + self.J], mean[1 + self.J:self.n_global]),
                                       1e-9 * scale) ** 2
        self.mean, self.cov = self._joint(x, y, xs, ys, screen, prior_mean, var, noise_var, scale)
        self.fitted = True
        return self

    def _joint(self, x, y, xs, ys, screen, prior_mean, var, noise_var, scale):
        """Posterior of the full-fidelity coefficients; with screens, of ``[theta, delta]`` jointly, where a
        screen measures ``slope * x.theta + x.delta`` (``delta``: the screen's own discrepancy, prior sd
        ``screen.discrepancy`` of ``theta``'s, its intercept free), marginalised to ``theta``."""
        if xs is None:
            return self._posterior(x, y, prior_mean, var, noise_var)
        D = self.dim
        dvar = (screen.discrepancy ** 2) * var.copy()
        dvar[0] = (10.0 * scale * max(1.0, screen.slope)) ** 2
        big_x = np.block([[x, np.zeros_like(x)], [screen.slope * xs, xs]])
        noise = np.r_[np.full(len(y), noise_var), np.full(len(ys), (screen.relative_noise * scale * screen.slope) ** 2)]
        pm, pv = np.r_[prior_mean, np.zeros(D)], np.r_[var, dvar]
        precision = np.diag(1.0 / pv) + big_x.T @ (big_x / noise[:, None])
        cov = np.linalg.inv(precision)
        cov = (cov + cov.T) / 2
        mean = cov @ (pm / pv + big_x.T @ (np.r_[y, ys] / noise))
        return mean[:D], cov[:D, :D]

    # --- what the proposals use ------------------------------------------------------------------------
    def effects(self, theta: np.ndarray, variant: int = 0) -> np.ndarray:
        """``[U, K]`` quality each unit contributes in each option under coefficients ``theta`` (option 0: 0;
        add ``theta[0]`` and :meth:`offset` for a plan's quality)."""
        steps = np.zeros((self.U, self.K))
        d = theta[self._devs()].reshape(self.U, self.J)
        for j in range(1, self.K):
            steps[:, j] = theta[j] * self.shares[variant] + theta[self.J + j] * self.sizes[variant] + d[:, j - 1]
        return np.cumsum(steps, axis=1)

    def offset(self, theta: np.ndarray, variant: int = 0) -> float:
        return 0.0 if variant == 0 else float(theta[self.n_global + self.U * self.J + variant - 1])

    def samples(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``[n, dim]`` draws from the posterior."""
        chol = np.linalg.cholesky(self.cov + 1e-15 * np.eye(self.dim) * max(1.0, float(np.abs(self.cov).max())))
        return self.mean[None, :] + rng.standard_normal((n, self.dim)) @ chol.T

    def predict(self, idx_rows, variants=None) -> tuple[np.ndarray, np.ndarray]:
        x = self.features(np.asarray(idx_rows), variants)
        return x @ self.mean, np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, self.cov, x), 0.0))


@dataclass(frozen=True)
class Screens:
    """Cheap screening measurements of plans (zero-step evaluations on a few windows) for :meth:`StepModel.fit`.

    A screen is modelled as ``slope * (the plan's full-fidelity quality) + delta(plan)``: ``slope`` is how much
    larger quality differences look before fine-tuning (measured 1.42 on the SmolLM2 landscape; the searcher
    estimates it from plans measured at both fidelities), ``delta`` a discrepancy with the same additive form
    (prior sd ``discrepancy`` of the quality model's; on the landscape the zero-step group gains stray from
    the fine-tuned ones by a log-ratio sd of ~0.25 after the common slope), and ``relative_noise`` the screen's
    own noise relative to the quality range (16 windows: 0.0104 / 0.17 ~ 0.06; 32 windows ~0.02)."""
    rows: np.ndarray
    y: np.ndarray
    variants: np.ndarray | None = None
    slope: float = 1.0
    discrepancy: float = 0.5
    relative_noise: float = 0.04


def staircase(cost: np.ndarray, quality: np.ndarray, ref: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The dominated region of ``(cost, quality)`` points as segments ``[start, end)`` of the cost axis with the
    best quality at that cost or less (``ref[1]`` before the cheapest point)."""
    order = np.lexsort((-quality, cost))
    c, q = cost[order], quality[order]
    keep = q > np.maximum.accumulate(np.r_[-np.inf, q[:-1]])
    keep &= q > ref[1]
    c, q = c[keep], q[keep]
    starts = np.r_[-np.inf, c]
    ends = np.r_[c, ref[0]]
    levels = np.r_[ref[1], q]
    return starts, ends, levels


def hv_improvements(known_cost, known_quality, cand_cost, cand_quality, ref) -> np.ndarray:
    """Hypervolume each candidate ``(cost, quality)`` would add to the known points (vectorised over candidates)."""
    starts, ends, levels = staircase(np.asarray(known_cost, float), np.asarray(known_quality, float), ref)
    c = np.asarray(cand_cost, float)[:, None]
    q = np.asarray(cand_quality, float)[:, None]
    width = np.clip(np.minimum(ends[None, :], ref[0]) - np.maximum(starts[None, :], c), 0.0, None)
    return (width * np.clip(q - np.maximum(levels[None, :], ref[1]), 0.0, None)).sum(axis=1)


def knapsack_front(values: np.ndarray, costs: np.ndarray, capacity: float, bins: int = 2048) -> np.ndarray:
    """Distinct option-index plans that maximise ``sum values`` at each memory capacity up to
    ``capacity`` (multiple-choice knapsack, exact on costs rounded to ``bins`` steps of the room above
    the cheapest plan — so a plan may overshoot ``capacity`` by rounding; callers re-check the exact
    budget), sorted by cost. Rows: ``[n_plans, U]``."""
    return knapsack_fronts(np.asarray(values, dtype=np.float64)[None], costs, capacity, bins)[0]


def knapsack_fronts(values: np.ndarray, costs: np.ndarray, capacity: float, bins: int = 2048) -> list[np.ndarray]:
    """:func:`knapsack_front` for ``T`` value tables ``[T, U, K]`` over the same costs at once (one pass over
    the units for all of them: the searcher solves one per posterior draw)."""
    values, costs = np.asarray(values, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    T, U, K = values.shape
    base = costs.argmin(axis=1)
    extra = costs - costs[np.arange(U), base][:, None]
    room = capacity - float(costs[np.arange(U), base].sum())
    if room < 0:
        return [np.zeros((0, U), dtype=int) for _ in range(T)]
    if room <= 1e-9 * max(1.0, float(costs.max())):   # no room above the cheapest plan
        return [base[None, :].astype(int) for _ in range(T)]
    step = room / bins
    d = np.rint(np.minimum(extra / step, bins + 1.0)).astype(np.int64)   # beyond the room: never taken
    n = bins + 1
    best = np.zeros((T, n))
    rel = values - values[:, np.arange(U), base][:, :, None]
    choice = np.zeros((U, T, n), dtype=np.int8 if K < 127 else np.int32)
    new, cand, better = np.empty((T, n)), np.empty((T, n)), np.empty((T, n), dtype=bool)
    for u in range(U):
        new.fill(-np.inf)
        pick = choice[u]
        for k in range(K):
            dk = int(d[u, k])
            if dk >= n:
                continue
            cand[:, :dk] = -np.inf
            np.add(best[:, : n - dk], rel[:, u, k][:, None], out=cand[:, dk:])
            np.greater(cand, new, out=better)
            np.copyto(new, cand, where=better)
            pick[better] = k
        best, new = new, best
    weights = np.random.default_rng(7).integers(1, 2 ** 62, size=U, dtype=np.int64)
    out = []
    for t in range(T):
        caps = np.flatnonzero(np.concatenate([[True], best[t, 1:] > best[t, :-1] + 1e-15]))
        idx = np.zeros((len(caps), U), dtype=int)
        c = caps.copy()
        for u in range(U - 1, -1, -1):
            k = choice[u, t, c].astype(int)
            idx[:, u] = k
            c = c - d[u, k]
        with np.errstate(over="ignore"):   # distinct rows by a random 64-bit linear hash (np.unique(axis=0) is slow)
            keys = (idx.astype(np.int64) + 1) @ weights
        _, first = np.unique(keys, return_index=True)
        out.append(idx[np.sort(first)])
    return out


def front_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated ``(cost, quality)`` points (cost down, quality up), sorted by cost."""
    out: list[tuple[float, float]] = []
    for c, q in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or q > out[-1][1]:
            out.append((c, q))
    return out


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``(cost, quality)`` points and bounded by ``ref = (cost_ref, quality_ref)``."""
    pts = [(c, q) for c, q in front_points(points) if c < ref[0] and q > ref[1]]
    area = 0.0
    for i, (c, q) in enumerate(pts):
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (nxt - c) * (q - ref[1])
    return area


def hv_improvement(front: list[tuple[float, float]], point: tuple[float, float], ref: tuple[float, float]) -> float:
    """Hypervolume that ``point`` adds to ``front`` (0 when dominated)."""
    return hypervolume(front + [point], ref) - hypervolume(front, ref)
