"""The probabilistic decision: unit scores -> precision probabilities -> seed plans for the search.

Following QPruner (Zhou et al., Findings of NAACL 2025), more important units are more likely to
get more bits. Mapping (an ordered-logit / cumulative-link model), for allowed precisions
``b_0 < ... < b_{m-1}`` and unit scores ``s_u``:

    z_u              = standardise(s_u)          (log first when all scores are positive; mean 0, std 1)
    P(b <= b_k | u)  = sigmoid((theta_k - z_u) / T),     theta_k = beta + Phi^-1((k + 1) / m),  k < m-1
    P(b_k | u)       = P(b <= b_k | u) - P(b <= b_{k-1} | u)

``T`` is ``policy.temperature`` (default 0.5; ``T -> 0``: a deterministic threshold rule that gives
each precision an equal share of normally distributed scores; large ``T``: uniform). With two
precisions this is ``P(high) = sigmoid((z_u - beta) / T)``. Unlike a softmax over ranks, every
precision is the most likely one for some range of importance. ``beta`` is 0 without a budget; with
one it is set by bisection so that the *expected* memory of a sampled plan equals the budget.

Seed plans (:func:`seed_plans`): the uniform plans that fit the budget; a deterministic best guess
(only with sampled seeds, or when fewer than two uniform plans fit: by default the search starts from
the ends of the memory range and the scores act through its prior, which won at N = 8-16 on the
large-space replay, ``results/bench/search_large.md``)
(greedy multiple-choice knapsack: starting from the lowest precision everywhere, repeatedly take the
upgrade with the largest ``s'_u * (4**-b - 4**-b') / extra bytes`` that still fits — ``4**-b`` is the
relative noise power of ``b``-bit quantization and ``s'_u`` the score shifted to be positive); and
``policy.seed_plans`` distinct plans sampled from ``P``, each repaired to fit by lowering the least
important units first. Sampled seed ``j`` of ``n`` gets its own ``beta``: the one whose expected plan
has the memory target ``low + (high - low) (j + 1) / (n + 1)`` between the smallest plan and the
largest other seed, so the seeds cover the memory axis (with a loose budget, calibrating every sample
to the budget gave copies of the uniform high plan). Every seed plan meets the budget exactly (memory
is computed, not estimated).

Search-space encoding: one categorical ``bits_<unit>`` per unit over the allowed precisions, so every
point of the space decodes to a complete, valid plan (:func:`encode` / :func:`decode`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np

from .config import LINEAR_NAMES, PolicyConfig, QuantConfig
from .errors import PlanError
from .unit_importance import UnitScores
from .memory import Budget, ModelLayout, UnitCosts, bias_bytes, format_bytes, plan_bytes
from .plan import UNIT_MEMBERS, PrecisionPlan, format_for_bits, units_per_layer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedPlan:
    """A plan that seeds the search, and where it came from."""
    plan: PrecisionPlan
    origin: str   # "uniform" | "best_guess" | "sampled"


def standardise(scores) -> np.ndarray:
    """Scores as z-scores (of their logarithm when all are positive)."""
    s = np.asarray(scores, dtype=np.float64)
    x = np.log(s) if np.all(s > 0) else s
    std = x.std()
    return (x - x.mean()) / std if std > 0 else np.zeros_like(x)


def probabilities(scores: UnitScores | list[float], n_options: int, temperature: float = 1.0,
                  beta: float = 0.0) -> np.ndarray:
    """``[n_units, n_options]`` probabilities (rows sum to 1), options ordered by increasing bits."""
    z = standardise(scores.scores if isinstance(scores, UnitScores) else scores)
    if n_options == 1:
        return np.ones((len(z), 1))
    theta = beta + np.array([NormalDist().inv_cdf((k + 1) / n_options) for k in range(n_options - 1)])
    cdf = 1.0 / (1.0 + np.exp(-(theta[None, :] - z[:, None]) / temperature))
    cdf = np.concatenate([np.zeros((len(z), 1)), cdf, np.ones((len(z), 1))], axis=1)
    return np.clip(np.diff(cdf, axis=1), 0.0, 1.0)


def key(index: int) -> str:
    """The search-space key of unit ``index``."""
    return f"bits_{index:03d}"


PRUNE_KEY = "prune_amount"   # joint search: the search-space key of the pruning amount


def encode(plan: PrecisionPlan) -> dict:
    """A plan as a search-space point: bits per unit, and the pruning amount in a joint search."""
    point: dict[str, float] = {key(i): b for i, b in enumerate(plan.bits)}
    if plan.pruned is not None:
        point[PRUNE_KEY] = plan.pruned
    return point


def decode(config: dict, n_units: int, four_bit: str = "nf4", unit: str = "layer") -> PrecisionPlan:
    """The plan of a search-space point (inverse of :func:`encode`)."""
    missing = [key(i) for i in range(n_units) if key(i) not in config]
    if missing:
        raise PlanError(f"search point lacks {len(missing)} of {n_units} units (first: {missing[0]})")
    pruned = config.get(PRUNE_KEY)
    return PrecisionPlan.from_bits([config[key(i)] for i in range(n_units)], four_bit, unit,
                                   None if pruned is None else float(pruned))


class PlanMemory:
    """Weight memory of plans for one layout, quantization config and compute dtype, plus per-unit
    cost tables (memory is additive over units, so the tables are exact)."""

    def __init__(self, layout: ModelLayout, quant: QuantConfig, compute_dtype: str):
        self.layout, self.quant, self.compute_dtype = layout, quant, compute_dtype

    def __call__(self, plan: PrecisionPlan):
        return plan_bytes(self.layout, plan, self.quant, self.compute_dtype)

    def unit_costs(self, unit: str, formats: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(weight bytes, bias bytes) of every unit in every format: two ``[n_units, n_formats]`` arrays."""
        members = UNIT_MEMBERS[unit]
        weights = np.zeros((self.layout.n_layers * len(members), len(formats)))
        biases = np.zeros_like(weights)
        for layer_idx, shapes in enumerate(self.layout.layers):
            by_name = dict(zip(LINEAR_NAMES, shapes))
            for k, names in enumerate(members):
                u = layer_idx * len(members) + k
                for j, fmt in enumerate(formats):
                    weights[u, j] = sum(format_bytes(by_name[n], fmt, blocksize=self.quant.blocksize,
                                                     double_quant=self.quant.double_quant) for n in names)
                    biases[u, j] = sum(bias_bytes(by_name[n], fmt, self.compute_dtype) for n in names)
        return weights, biases


def unit_costs(memory: PlanMemory, unit: str, formats: list[str], budget: Budget) -> UnitCosts:
    """Exact per-unit cost tables of ``memory`` for plans over ``formats`` (option indices), under ``budget``."""
    weights, biases = memory.unit_costs(unit, formats)
    probe = memory(PrecisionPlan.uniform(formats[0], weights.shape[0], unit))
    fixed = probe.total_bytes - probe.linear_weight_bytes - probe.bias_bytes
    return UnitCosts(weights, biases, float(fixed), int(probe.linear_numel), budget)


def _calibrated_beta(z_scores: UnitScores, m: int, temperature: float, costs: UnitCosts) -> float:
    """Smallest shift of the thresholds whose expected plan fits the budget (0 without a budget)."""
    if costs.budget.unlimited:
        return 0.0
    lo, hi = -30.0, 30.0   # beta = hi puts (almost) all mass on the lowest precision
    if costs.expected_fits(probabilities(z_scores, m, temperature, lo)):
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if costs.expected_fits(probabilities(z_scores, m, temperature, mid)) else (mid, hi)
    return hi


def _repair(idx: np.ndarray, low_first: list[int], costs: UnitCosts) -> np.ndarray | None:
    """Lower the least important units one precision step at a time until the plan fits."""
    idx = idx.copy()
    while not costs.fits(idx):
        for u in low_first:
            if idx[u] > 0:
                idx[u] -= 1
                break
        else:
            return None
    return idx


def greedy_chain(scores: UnitScores, costs: UnitCosts, bits: list[int]) -> list[np.ndarray]:
    """The greedy multiple-choice knapsack on importance x noise reduction per extra byte, step by step:
    from the lowest precision everywhere, repeatedly take the upgrade with the largest
    ``s'_u * (4**-b - 4**-b') / extra bytes`` that still fits. Returns every plan on the way (the first is
    the lowest plan, the last the best guess). Spaced along it (:func:`chain_points`) it is also the
    search's simplest baseline: no feedback from any trial."""
    s = np.asarray(scores.scores if isinstance(scores, UnitScores) else scores, dtype=np.float64)
    s = s - s.min() + 1e-12 * (abs(s).max() + 1.0) if np.any(s <= 0) else s
    noise = np.array([4.0 ** -b for b in bits])
    idx = np.zeros(len(s), dtype=int)
    w_sum, b_sum = costs.weights[:, 0].sum(), costs.biases[:, 0].sum()
    chain = [idx.copy()]
    while True:
        best, best_ratio = None, -1.0
        for u in np.flatnonzero(idx < len(bits) - 1):
            k = idx[u]
            dw = costs.weights[u, k + 1] - costs.weights[u, k]
            db = costs.biases[u, k + 1] - costs.biases[u, k]
            if not costs.fits_sums(w_sum + dw, b_sum + db):
                continue
            ratio = s[u] * (noise[k] - noise[k + 1]) / max(dw + db, 1.0)
            if ratio > best_ratio:
                best, best_ratio = u, ratio
        if best is None:
            return chain
        k = idx[best]
        w_sum += costs.weights[best, k + 1] - costs.weights[best, k]
        b_sum += costs.biases[best, k + 1] - costs.biases[best, k]
        idx[best] += 1
        chain.append(idx.copy())


def chain_points(chain: list[np.ndarray], n: int) -> list[np.ndarray]:
    """``n`` plans evenly spaced along ``chain`` (both ends included; all of it when it is shorter)."""
    if n >= len(chain):
        return list(chain)
    if n <= 1:
        return [chain[-1]][:n]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(chain) - 1, n)})
    return [chain[i] for i in picks]


def best_guess(scores: UnitScores, costs: UnitCosts, bits: list[int]) -> np.ndarray:
    """Greedy multiple-choice knapsack on importance x noise reduction per extra byte (the end of
    :func:`greedy_chain`)."""
    return greedy_chain(scores, costs, bits)[-1]


def memory_targets(costs: UnitCosts, feasible: list[np.ndarray], n: int) -> list[float]:
    """``n`` total-memory targets evenly inside (lowest plan, largest feasible seed): the sampled seeds
    cover the whole memory range, not just the budget (where a loose budget would make every sample
    the same uniform plan)."""
    low = costs.total(np.zeros(costs.weights.shape[0], dtype=int))
    high = max([costs.total(idx) for idx in feasible] + [low])
    return [low + (high - low) * (j + 1) / (n + 1) for j in range(n)]


def seed_indices(scores: UnitScores, costs: UnitCosts, bits: list[int], policy: PolicyConfig,
                 seed: int = 0) -> list[tuple[tuple[int, ...], str]]:
    """The seed plans as option indices over ``costs`` (any unit tables: layers, groups, tied layers)."""
    n = costs.weights.shape[0]
    out: list[tuple[tuple[int, ...], str]] = []

    def add(idx, origin) -> bool:
        key = tuple(int(i) for i in idx)
        if any(key == k for k, _ in out):
            return False
        out.append((key, origin))
        return True

    if policy.include_uniform:
        for k in range(len(bits)):
            if costs.fits(np.full(n, k)):
                add(np.full(n, k), "uniform")
    if policy.seed_plans > 0 or len(out) < 2:   # the seeds span the memory range: ends, else the best guess
        add(best_guess(scores, costs, bits), "best_guess")
    rng = np.random.default_rng(seed)
    low_first = [int(i) for i in np.argsort(scores.scores, kind="stable")]
    targets = memory_targets(costs, [np.array(k) for k, _ in out], policy.seed_plans)
    sampled = 0
    for target in targets:  # one sampled plan per memory target, spread low to high
        aimed = replace(costs, budget=Budget(total_bytes=int(target)))
        probs = probabilities(scores, len(bits), policy.temperature,
                              _calibrated_beta(scores, len(bits), policy.temperature, aimed))
        for _ in range(50):
            idx = _repair(np.array([rng.choice(len(bits), p=row / row.sum()) for row in probs]), low_first, costs)
            if idx is not None and add(idx, "sampled"):
                sampled += 1
                break
    if sampled < policy.seed_plans:
        logger.warning("only %d distinct sampled seed plans of %d requested fit the budget", sampled, policy.seed_plans)
    return out


def seed_plans(scores: UnitScores, memory: PlanMemory, policy: PolicyConfig, budget: Budget,
               seed: int = 0) -> list[SeedPlan]:
    """Uniform plans that fit (if enabled), the best guess, then ``policy.seed_plans`` distinct sampled plans,
    each aimed at its own memory target between the smallest plan and the largest of the others."""
    bits = sorted(policy.bits)
    four_bit, unit = memory.quant.four_bit, scores.unit
    formats = [format_for_bits(b, four_bit) for b in bits]
    n = len(scores)
    want_units = memory.layout.n_layers * units_per_layer(unit)
    if n != want_units:
        raise PlanError(f"{n} unit scores but the pruned model has {want_units} {unit} units; "
                        "re-run scoring after pruning")
    costs = unit_costs(memory, unit, formats, budget)
    if not costs.fits(np.zeros(n, dtype=int)):
        low = memory(PrecisionPlan.uniform(formats[0], n, unit))
        raise PlanError(f"even the all-{bits[0]}-bit plan ({low.avg_bits:.2f} average bits, "
                        f"{low.total_bytes / 1e9:.3f} GB) exceeds the budget ({budget.describe()}); "
                        "raise the budget or allow fewer bits")
    out = [SeedPlan(PrecisionPlan(tuple(formats[i] for i in idx), unit), origin)
           for idx, origin in seed_indices(scores, costs, bits, policy, seed)]
    for s in out:  # the tables are exact; this is the contract, checked on the real memory model
        if not budget.fits(memory(s.plan)):
            raise PlanError(f"internal: seed plan {s.plan.code()} breaks the budget")
    return out
