"""Memory-aware Bayesian search over per-unit formats: an additive Bayesian surrogate, Thompson
sampling, and an exact knapsack over the (additive, exactly known) memory. Pure numpy, no Ray.

The method, after BOCS (Baptista & Poloczek, *Bayesian Optimization of Combinatorial Structures*,
ICML 2018), adapted to two objectives where one of them (memory) is known exactly in advance:

* **Surrogate.** The quality of a plan that puts unit ``u`` in option ``k_u`` is modelled as
  ``y = b0 + g * p(plan) + sum_u d[u, k_u] + noise``, a Bayesian linear model. ``p(plan) =
  sum_u prior[u, k_u]`` is the *probabilistic decision's prior*: the layer scores say how much of the
  total gain from upgrading every unit each unit should carry (see :func:`prior_gain`), and ``g``
  (the size of that total gain) is learnt. The deviations ``d`` (option 0 of every unit is the
  baseline, ``d = 0``) let the data overrule the scores unit by unit; their prior scale is set
  empirically from ``g``. BOCS uses a second-order (pairwise) model with a horseshoe prior; on the
  recorded SmolLM2 landscape log-perplexity is close to additive over units
  (``results/bench/landscape.md``), so first order with a Gaussian prior is enough and is exact to
  sample from.
* **Proposals.** Draw ``theta`` from the posterior (Thompson sampling). Under that draw, the best
  plan at every memory capacity is an exact multiple-choice knapsack (dynamic programme over
  memory discretised into ``bins`` steps; candidates are re-checked against the exact budget). Of
  those plans, not evaluated and not running, propose the one that adds the most hypervolume to the
  current front (observed trials plus running ones at their posterior mean). So proposals spread
  along the memory axis wherever the front can still grow, never exceed the budget, and never repeat.
* **Joint pruning and precision** (``prune.param_ratios``): the plan also picks one of ``V`` pruned
  variants of the model. Memory stays exactly additive *within* a variant, so the knapsack runs once
  per variant (with that variant's tables) and the candidates of all variants compete on hypervolume
  improvement; the surrogate adds one offset per variant (:class:`AdditiveModel`).
* Where BOCS optimises one objective with simulated annealing, we need a whole front and have an
  additive constraint, so the knapsack replaces annealing and hypervolume improvement replaces the
  plain maximum.
"""

from __future__ import annotations

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


class AdditiveModel:
    """Bayesian linear model ``y = b0 + g * p + sum_u d[u, k_u] (+ c[v])`` (see the module docstring).

    ``prior`` is ``[U, K]``, or ``[V, U, K]`` in a joint search over ``V`` pruned variants of the model:
    each variant has its own prior shares (from its own layer scores) and a quality offset ``c[v]``
    (``c[0] = 0``), and the deviations ``d`` are shared (a unit's sensitivity to its format changes
    little with how much was pruned around it)."""

    def __init__(self, prior: np.ndarray, relative_noise: float = 0.02, deviation_scale: float = 0.5):
        priors = np.asarray(prior, dtype=np.float64)
        self.priors = priors if priors.ndim == 3 else priors[None]  # [V, U, K]
        self.V, self.U, self.K = self.priors.shape
        self.prior = self.priors.mean(axis=0)                       # [U, K]: sizes the deviations' prior
        self.relative_noise, self.deviation_scale = relative_noise, deviation_scale
        self.mean = np.zeros(self.dim)
        self.cov = np.eye(self.dim)
        self.fitted = False

    @property
    def n_deviations(self) -> int:
        return self.U * (self.K - 1)

    @property
    def dim(self) -> int:
        return 2 + self.n_deviations + (self.V - 1)

    def features(self, idx_rows: np.ndarray, variants=None) -> np.ndarray:
        idx_rows = np.atleast_2d(idx_rows)
        n = idx_rows.shape[0]
        v = np.zeros(n, dtype=int) if variants is None else np.asarray(variants, dtype=int).reshape(n)
        x = np.zeros((n, self.dim))
        x[:, 0] = 1.0
        x[:, 1] = self.priors[v[:, None], np.arange(self.U)[None, :], idx_rows].sum(axis=1)
        cols = 2 + np.arange(self.U)[None, :] * (self.K - 1) + idx_rows - 1
        rows = np.repeat(np.arange(n)[:, None], self.U, axis=1)
        on = idx_rows > 0
        x[rows[on], cols[on]] = 1.0
        pruned = np.flatnonzero(v > 0)
        x[pruned, 2 + self.n_deviations + v[pruned] - 1] = 1.0
        return x

    def _posterior(self, x, y, prior_mean, prior_var, noise_var):
        precision = np.diag(1.0 / prior_var) + x.T @ x / noise_var
        cov = np.linalg.inv(precision)
        cov = (cov + cov.T) / 2
        mean = cov @ (prior_mean / prior_var + x.T @ y / noise_var)
        return mean, cov

    def _deviation_sd(self, g: float) -> np.ndarray:
        """Prior sd of each deviation: ``deviation_scale * g`` times the unit's prior share (at least equal)."""
        share = np.maximum(self.prior[:, 1:], 1.0 / (self.U * max(1, self.K - 1)))
        return self.deviation_scale * g * share.reshape(-1)

    def prior_only(self, center: float = 0.0) -> "AdditiveModel":
        """The model before two distinct qualities are known: quality grows by ``g = 1`` (arbitrary units)
        over the prior shares, deviations of the same relative size as after fitting; a variant's offset
        is unknown (sd 1, the size of the whole precision gain)."""
        self.mean = np.zeros(self.dim)
        self.mean[0], self.mean[1] = center, 1.0
        self.cov = np.diag(np.r_[1.0, 0.25, np.maximum(self._deviation_sd(1.0), 1e-9) ** 2, np.ones(self.V - 1)])
        return self

    def fit(self, idx_rows, y, variants=None) -> "AdditiveModel":
        x = self.features(np.asarray(idx_rows), variants)
        y = np.asarray(y, dtype=np.float64)
        scale = float(np.ptp(y)) if len(y) > 1 and np.ptp(y) > 0 else max(abs(float(y.mean())), 1.0) if len(y) else 1.0
        center = float(y.mean()) if len(y) else 0.0
        noise_var = (self.relative_noise * scale) ** 2
        prior_mean = np.zeros(self.dim)
        prior_mean[0], prior_mean[1] = center, scale      # more bits help, by about the spread seen
        wide = (10.0 * scale) ** 2
        deviations = slice(2, 2 + self.n_deviations)
        # pass 1: deviations held near 0, to size the shared gain g (variant offsets free)
        var = np.full(self.dim, wide)
        var[deviations] = (1e-3 * scale) ** 2
        mean, _ = self._posterior(x, y, prior_mean, var, noise_var)
        g = max(abs(float(mean[1])), 0.1 * scale)
        # pass 2: deviations may carry a unit's share of g (at least an equal share), times deviation_scale
        var[deviations] = np.maximum(self._deviation_sd(g), 1e-9 * scale) ** 2
        self.mean, self.cov = self._posterior(x, y, prior_mean, var, noise_var)
        self.fitted = True
        return self

    def effects(self, theta: np.ndarray, variant: int = 0) -> np.ndarray:
        """``[U, K]`` quality contributed by each unit option of ``variant`` under coefficients ``theta``
        (add ``theta[0]`` and :meth:`offset` for a plan's quality)."""
        d = np.zeros((self.U, self.K))
        d[:, 1:] = theta[2:2 + self.n_deviations].reshape(self.U, self.K - 1)
        return theta[1] * self.priors[variant] + d

    def offset(self, theta: np.ndarray, variant: int = 0) -> float:
        """Quality of pruned variant ``variant`` relative to variant 0, under ``theta``."""
        return 0.0 if variant == 0 else float(theta[2 + self.n_deviations + variant - 1])

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        return rng.multivariate_normal(self.mean, self.cov, method="cholesky")

    def predict(self, idx_rows, variants=None) -> tuple[np.ndarray, np.ndarray]:
        x = self.features(np.asarray(idx_rows), variants)
        return x @ self.mean, np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, self.cov, x), 0.0))


def knapsack_front(values: np.ndarray, costs: np.ndarray, capacity: float, bins: int = 2048) -> np.ndarray:
    """Distinct option-index plans that maximise ``sum values`` at each memory capacity up to
    ``capacity`` (multiple-choice knapsack, exact on costs rounded to ``bins`` steps of the room above
    the cheapest plan — so a plan may overshoot ``capacity`` by rounding; callers re-check the exact
    budget), sorted by cost. Rows: ``[n_plans, U]``."""
    values, costs = np.asarray(values, dtype=np.float64), np.asarray(costs, dtype=np.float64)
    U, K = values.shape
    base = costs.argmin(axis=1)
    extra = costs - costs[np.arange(U), base][:, None]
    room = capacity - float(costs[np.arange(U), base].sum())
    if room < 0:
        return np.zeros((0, U), dtype=int)
    if room <= 1e-9 * max(1.0, float(costs.max())):   # no room above the cheapest plan
        return base[None, :].astype(int)
    step = room / bins
    d = np.rint(np.minimum(extra / step, bins + 1.0)).astype(np.int64)   # beyond the room: never taken
    n = bins + 1
    best = np.zeros(n)
    rel = values - values[np.arange(U), base][:, None]
    choice = np.zeros((U, n), dtype=np.int8 if K < 127 else np.int32)
    for u in range(U):
        new = np.full(n, -np.inf)
        pick = np.zeros(n, dtype=choice.dtype)
        for k in range(K):
            if d[u, k] >= n:
                continue
            cand = np.full(n, -np.inf)
            cand[d[u, k]:] = best[: n - d[u, k]] + rel[u, k]
            better = cand > new
            new[better], pick[better] = cand[better], k
        best, choice[u] = new, pick
    caps = np.flatnonzero(np.concatenate([[True], best[1:] > best[:-1] + 1e-15]))
    idx = np.zeros((len(caps), U), dtype=int)
    c = caps.copy()
    for u in range(U - 1, -1, -1):
        k = choice[u, c].astype(int)
        idx[:, u] = k
        c = c - d[u, k]
    _, first = np.unique(idx, axis=0, return_index=True)
    return idx[np.sort(first)]


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


def gap_to_front(front: list[tuple[float, float]], point: tuple[float, float]) -> float:
    """How far ``point``'s quality is above the best front quality at its cost or less (may be < 0)."""
    better = [q for c, q in front if c <= point[0]]
    return point[1] - (max(better) if better else -np.inf)
