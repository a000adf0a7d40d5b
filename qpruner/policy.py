"""The probabilistic decision: layer scores -> precision probabilities -> seed plans for the search.

Following QPruner (Zhou et al., Findings of NAACL 2025), more important layers are more likely to
get more bits. Our mapping, for ``m`` allowed precisions ``b_0 < ... < b_{m-1}`` and layer scores
``s_l``:

    z_l    = standardise(log s_l)                       (mean 0, std 1 over layers; 0 if all equal)
    c_k    = k - (m - 1) / 2                            (centred rank of precision k)
    p_lk   = softmax_k(c_k * z_l / T)                   (T = policy.temperature)

With two precisions this is ``P(high) = sigmoid(z_l / T)``. Logs are taken because score estimators
(Fisher in particular) spread over orders of magnitude. ``T -> 0`` gives a deterministic
threshold on importance; ``T -> inf`` uniform sampling.

Seed plans: each layer's precision is sampled from ``p_l``; a plan over the memory budget is
repaired by lowering the least important layers that are above the lowest precision, one step at a
time, until it fits; duplicates are rejected. The uniform plans that fit the budget are seeded too
(``policy.include_uniform``), which anchors both ends of the front.

Search-space encoding: one categorical ``bits_<layer>`` per layer over the allowed precisions, so
every point of the space decodes to a complete, valid plan (:func:`encode` / :func:`decode`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .config import PolicyConfig, QuantConfig
from .errors import PlanError
from .importance import LayerScores
from .memory import Budget, ModelLayout, plan_bytes
from .plan import PrecisionPlan, format_for_bits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedPlan:
    plan: PrecisionPlan
    origin: str   # "uniform" | "sampled"


def probabilities(scores: LayerScores | list[float], n_options: int, temperature: float = 1.0) -> np.ndarray:
    """``[n_layers, n_options]`` probabilities (rows sum to 1), options ordered by increasing bits."""
    s = np.asarray(scores.scores if isinstance(scores, LayerScores) else scores, dtype=np.float64)
    log_s = np.log(np.maximum(s, 1e-300))
    std = log_s.std()
    z = (log_s - log_s.mean()) / std if std > 0 else np.zeros_like(log_s)
    c = np.arange(n_options) - (n_options - 1) / 2.0
    logits = np.outer(z, c) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def key(layer: int) -> str:
    return f"bits_{layer:03d}"


def encode(plan: PrecisionPlan) -> dict[str, int]:
    return {key(i): b for i, b in enumerate(plan.bits)}


def decode(config: dict, n_units: int, four_bit: str = "nf4") -> PrecisionPlan:
    missing = [key(i) for i in range(n_units) if key(i) not in config]
    if missing:
        raise PlanError(f"search point lacks {len(missing)} of {n_units} layers (first: {missing[0]})")
    return PrecisionPlan.from_bits([config[key(i)] for i in range(n_units)], four_bit)


class PlanMemory:
    """Predicts weight memory of plans for one layout and quantization config."""

    def __init__(self, layout: ModelLayout, quant: QuantConfig, compute_dtype: str):
        self.layout, self.quant, self.compute_dtype = layout, quant, compute_dtype

    def __call__(self, plan: PrecisionPlan):
        return plan_bytes(self.layout, plan, blocksize=self.quant.blocksize, double_quant=self.quant.double_quant,
                          rest_dtype=self.quant.rest_dtype, compute_dtype=self.compute_dtype)


def _repair(idx: np.ndarray, order_low_first: list[int], bits: list[int], four_bit: str,
            memory: PlanMemory, budget: Budget) -> PrecisionPlan | None:
    """Lower the least important layers one precision step at a time until the plan fits."""
    idx = idx.copy()
    plan = PrecisionPlan.from_bits([bits[i] for i in idx], four_bit)
    while not budget.fits(memory(plan)):
        for layer in order_low_first:
            if idx[layer] > 0:
                idx[layer] -= 1
                break
        else:
            return None  # everything already at the lowest precision and still over budget
        plan = PrecisionPlan.from_bits([bits[i] for i in idx], four_bit)
    return plan


def seed_plans(scores: LayerScores, memory: PlanMemory, policy: PolicyConfig, budget: Budget,
               seed: int = 0) -> list[SeedPlan]:
    """Uniform plans that fit (if enabled) followed by ``policy.seed_plans`` distinct sampled plans."""
    bits = sorted(policy.bits)
    four_bit = memory.quant.four_bit
    n = len(scores)
    if n != memory.layout.n_units:
        raise PlanError(f"{n} layer scores but the pruned model has {memory.layout.n_units} decoder layers; "
                        "re-run scoring after pruning")
    out: list[SeedPlan] = []
    seen: set[tuple[str, ...]] = set()
    if policy.include_uniform:
        for b in bits:
            plan = PrecisionPlan.uniform(format_for_bits(b, four_bit), n)
            if budget.fits(memory(plan)):
                out.append(SeedPlan(plan, "uniform"))
                seen.add(plan.formats)
    lowest = PrecisionPlan.uniform(format_for_bits(bits[0], four_bit), n)
    if not budget.fits(memory(lowest)):
        raise PlanError(f"even the all-{bits[0]}-bit plan ({memory(lowest).avg_bits:.2f} average bits, "
                        f"{memory(lowest).total_bytes / 1e9:.3f} GB) exceeds the budget ({budget.describe()}); "
                        "raise the budget or allow fewer bits")
    probs = probabilities(scores, len(bits), policy.temperature)
    rng = np.random.default_rng(seed)
    order_low_first = [int(i) for i in np.argsort(scores.scores, kind="stable")]
    wanted = policy.seed_plans
    for _ in range(50 * max(1, wanted)):
        if sum(s.origin == "sampled" for s in out) >= wanted:
            break
        idx = np.array([rng.choice(len(bits), p=row) for row in probs])
        plan = _repair(idx, order_low_first, bits, four_bit, memory, budget)
        if plan is not None and plan.formats not in seen:
            seen.add(plan.formats)
            out.append(SeedPlan(plan, "sampled"))
    got = sum(s.origin == "sampled" for s in out)
    if got < wanted:
        logger.warning("only %d distinct sampled seed plans of %d requested fit the budget", got, wanted)
    return out
