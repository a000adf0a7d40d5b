"""Synthetic search worlds CALIBRATED from the project's own recorded measurements (a PROXY of real trials).

A world says what every plan of a space would measure: the held-out NLL a real trial of that plan would
report (quality = -NLL), at the demo's fidelity (10 LoRA steps) and at zero steps. Used by
``bench/search_large.py`` (the large-space replay) and ``bench/search_real30.py`` (which checks the demo
world's prediction against real trials). What a world is made of, and where each number comes from:

* **nf4 -> int8 gain per layer** (``g1``): the recorded landscape's per-group gains at 10 steps
  (``results/bench/importance_truth.json`` ``truth.demo``: least squares over the 256 real plans of
  ``results/bench/landscape_smollm2.parquet``), spread over each group's layers in proportion to the
  measured single-layer sensitivity (``importance_truth.json`` ``estimators.sensitivity.layer_scores``:
  KL of quantizing one layer), each layer's share jittered by a lognormal factor (sd ``SPREAD_JITTER``
  in log) per world — how far a layer's gain may stray from its KL — and renormalised so every group
  keeps its measured gain.
* **int8 -> bf16 gain** (``g2``): ``INT8_TO_BF16`` NLL in all (uniform int8 vs bf16, real trials, 3 seeds:
  ``results/bench/memory_claim.md``), spread over the layers in proportion to ``g1`` times a lognormal
  jitter (sd ``BF16_JITTER``).
* **Pairwise interactions:** ``-1/2 d' J d`` with ``d`` each layer's missing share of its gain (1 at nf4,
  ``g2/(g1+g2)`` at int8, 0 at bf16) and ``J`` symmetric Gaussian scaled by ``sqrt(g1 g1')``, sized per
  world so that the 256 plans of the landscape's 8-group x {nf4, int8} space (layers tied by group) give
  an additive least-squares R^2 of ``TARGET_R2`` (the landscape's own: 0.995).
* **Observation noise:** Gaussian, sd ``NOISE`` NLL per trial (same-seed noise between plans).
* **Zero-step fidelity:** the same construction from ``truth.zero`` (gains at 0 steps, 64 windows) with
  the same interaction pattern and spread, each layer's share further jittered by a lognormal factor (sd
  ``ZERO_JITTER``, its own random stream so the demo fidelity is unchanged): the measured group-level
  log-ratio sd between zero-step and fine-tuned gains after their common slope, assumed to hold within
  groups too. A **screen** (zero steps, first ``w`` evaluation windows) observes it with noise
  ``SCREEN_NOISE[w]`` (the residual of the ``w``-window zero-step NLL on the 64-window one over the 256
  landscape plans; at least ``NOISE``). Costs per stage from the landscape's median trial seconds
  (``STAGE_SECONDS``, ``SCREEN_SECONDS``: quantize + evaluation scaled to ``w`` windows).
* **Memory:** exact per-unit tables (``qpruner.policy.unit_costs``) of the demo's pruned SmolLM2 layout
  (the same shapes ``bench/memory_claim.py`` builds), and of a 20%-pruned LLaMA-2-7B for the 7B space.
* **The searchers' prior:** in the demo space the real mutual-information layer scores of the pruned
  model (``importance_truth.json``, never the world's gains). The 7B and linear spaces have no real
  scores: their scores are the world's gains per unit times a lognormal error (sd ``SCORE_ERROR``),
  chosen so that their median Spearman with the gains (0.54 over 20 7B worlds) is about the real MI
  scores' with the demo worlds' gains (0.50).
* **7B space:** 32 layers; the demo's per-layer gain profile resampled to 32 depths, same totals.
* **Linear space** (``policy.unit: linear``, 210 units): each layer's gains split over its 7 linears in
  proportion to their weights' sizes times a lognormal jitter (sd ``LINEAR_JITTER``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

IMPORTANCE_TRUTH = ROOT / "results" / "bench" / "importance_truth.json"
REAL_CHECK = ROOT / "results" / "bench" / "search_real30.json"
LANDSCAPE_JSON = ROOT / "results" / "bench" / "landscape.json"
SOURCES = ["results/bench/importance_truth.json (truth.demo, truth.zero, estimators.sensitivity, "
           "estimators.mutual_information)", "results/bench/landscape_smollm2.parquet (via importance_truth: "
           "group gains; additive R^2; stage seconds)", "results/bench/memory_claim.md (int8 -> bf16 gain)"]
INT8_TO_BF16 = 0.0214        # NLL, uniform int8 vs bf16 (memory_claim.md, 3 seeds, +0.0214 +- 0.0018)
NOISE = 0.0037               # NLL sd of one trial between plans (the measured same-seed noise)
TARGET_R2 = 0.995            # additive R^2 over the landscape's 8 groups (landscape.md: 0.9949)
SPREAD_JITTER = 0.3
BF16_JITTER = 0.5
LINEAR_JITTER = 0.5
SCORE_ERROR = 1.0            # gives a median Spearman ~0.5 with the gains, as the real MI scores have in the demo world
N_GROUPS = 8
STAGE_SECONDS = {"zero": 37.8, "demo": 133.0}   # landscape.md: median seconds per real trial by stage
# zero-step stage of landscape_smollm2.parquet, medians: quantize (+ LoftQ) 4.15 s, evaluation of 64 windows 33.12 s
SCREEN_SECONDS = {w: round(4.15 + 33.12 * w / 64, 2) for w in (16, 32, 64)}
SCREEN_NOISE = {16: 0.0104, 32: 0.0037, 64: 0.0037}   # NLL: w-window zero-step vs 64-window residual sd (floor NOISE)
ZERO_JITTER = 0.25
OPTIONS = (4, 8, 16)
FORMATS = ("nf4", "int8", "bf16")


def _truth() -> dict:
    return json.loads(IMPORTANCE_TRUTH.read_text())


def group_gains(stage: str) -> np.ndarray:
    """Measured nf4 -> int8 NLL gain of each of the landscape's 8 layer groups at ``stage`` (demo | zero)."""
    t = _truth()["truth"][stage]
    return np.array(t["gain_nf4_to_int8"], dtype=float)


def layer_groups(n_layers: int, n_groups: int = N_GROUPS) -> list[np.ndarray]:
    return np.array_split(np.arange(n_layers), n_groups)


@dataclass
class Space:
    """A search space: unit tables and the layer of every unit."""
    name: str
    costs: object                 # qpruner.memory.UnitCosts
    layer_of: np.ndarray          # [U] layer index of each unit
    n_layers: int
    numel_share: np.ndarray       # [U] share of its layer's weights (1 for layer units)
    description: str = ""
    gain_scale: float = 1.0       # every gain times this (30x3_today: the real check's measured scale)
    group_gains: np.ndarray | None = None   # nf4 -> int8 gain per group at the demo fidelity (None: the landscape's)
    int8_to_bf16: float = INT8_TO_BF16      # int8 -> bf16 NLL in all, at the same recipe as group_gains


def _layout(shape: str):
    import memory_claim
    spec = memory_claim.SHAPES["SmolLM2-135M, demo pruning" if shape == "smollm2" else "LLaMA-2-7B, 20% of parameters"]
    return memory_claim.pruned_layout(spec)[0]


def make_space(name: str, budget_bits: float = 8.5) -> Space:
    """``30x3`` (the demo: 30 layers), ``7b`` (32 layers of a 20%-pruned LLaMA-2-7B), ``linear210``;
    ``30x3_today``: the demo's space with every gain scaled to today's recipe (the slope of real NLL on the
    replay's prediction, ``results/bench/search_real30.json``; the landscape was recorded with 1 LoftQ
    iteration, the demo now runs 4, which shrinks the cost of nf4) at the same trial noise."""
    from qpruner import policy
    from qpruner.config import QuantConfig
    from qpruner.memory import Budget
    scale, today = 1.0, None
    if name == "30x3_today":
        real = json.loads(REAL_CHECK.read_text()) if REAL_CHECK.is_file() else {}
        today = real.get("today", {}).get("calibration")
        if today is None and "slope" not in real:
            raise SystemExit(f"30x3_today needs the real check's calibration: run bench/search_real30.py first ({REAL_CHECK})")
        name, scale = "30x3", (1.0 if today else float(real["slope"]))
    shape, unit = {"30x3": ("smollm2", "layer"), "7b": ("llama7b", "layer"), "linear210": ("smollm2", "linear")}[name]
    layout = _layout(shape)
    memory = policy.PlanMemory(layout, QuantConfig(), "float32")
    costs = policy.unit_costs(memory, unit, list(FORMATS), Budget(avg_bits=budget_bits))
    per = 7 if unit == "linear" else 1
    layer_of = np.repeat(np.arange(layout.n_layers), per)
    share = np.ones(len(layer_of))
    if unit == "linear":
        numel = np.array([s.out_features * s.in_features for layer in layout.layers for s in layer], dtype=float)
        share = numel / np.repeat(numel.reshape(-1, 7).sum(axis=1), 7)
    desc = {"30x3": "SmolLM2-135M pruned as the demo: 30 layers x {nf4, int8, bf16}",
            "7b": "LLaMA-2-7B pruned 20% (layers 4-29): 32 layers x {nf4, int8, bf16}",
            "linear210": "SmolLM2-135M pruned as the demo, policy.unit linear: 210 linears x {nf4, int8, bf16}"}[name]
    if today:
        name, desc = "30x3_today", (f"{desc}; group gains and int8 -> bf16 from {today['probes']} calibration probes at "
                                    "today's recipe (search_real30.json today.calibration)")
        return Space(name, costs, layer_of, layout.n_layers, share, f"{desc}, budget {budget_bits} average bits", 1.0,
                     np.clip(np.array(today["group_gains_nf4_to_int8"], dtype=float), 1e-6, None),   # a probe's noise
                     max(float(today["int8_to_bf16_total"]), 1e-6))                                  # is no negative gain
    if scale != 1.0:
        name, desc = "30x3_today", f"{desc}; every gain x {scale:.3f} (today's recipe, measured on real trials)"
    return Space(name, costs, layer_of, layout.n_layers, share, f"{desc}, budget {budget_bits} average bits", scale)


@dataclass
class World:
    """One synthetic world over a space: true qualities (-NLL relative to all-nf4) at two fidelities."""
    space: Space
    values: dict                  # stage -> [U, K] additive quality of each unit option
    J: dict                       # stage -> [U, U] interaction matrix
    scores: np.ndarray            # [U] what the searchers know (never the gains)
    scores_source: str
    noise: float = NOISE
    seconds: dict = field(default_factory=lambda: dict(STAGE_SECONDS))

    @property
    def costs(self):
        return self.space.costs

    def degradation(self, stage: str, rows: np.ndarray) -> np.ndarray:
        v = self.values[stage]
        full = v[:, -1]
        d = 1.0 - v / np.where(full > 0, full, 1.0)[:, None]
        return d[np.arange(v.shape[0])[None, :], rows]

    def quality(self, rows, stage: str = "demo") -> np.ndarray:
        rows = np.atleast_2d(np.asarray(rows, dtype=int))
        v = self.values[stage]
        add = v[np.arange(v.shape[0])[None, :], rows].sum(axis=1)
        d = self.degradation(stage, rows)
        return add - 0.5 * np.einsum("nu,uv,nv->n", d, self.J[stage], d)

    def observe(self, row, rng: np.random.Generator, stage: str = "demo") -> float:
        return float(self.quality(row, stage)[0] + rng.normal(0.0, self.noise))

    def screen(self, row, rng: np.random.Generator, windows: int) -> float:
        """A screen: the zero-step quality on the first ``windows`` evaluation windows."""
        return float(self.quality(row, "zero")[0] + rng.normal(0.0, SCREEN_NOISE[windows]))


def _lognormal(rng, sd, n):
    return np.exp(rng.normal(0.0, sd, n))


def layer_gains(stage_gains: np.ndarray, sensitivity: np.ndarray, jitter: np.ndarray | float = 1.0) -> np.ndarray:
    """nf4 -> int8 gain per layer: each group's measured gain spread over its layers by sensitivity x jitter."""
    n = len(sensitivity)
    w = sensitivity * jitter
    g1 = np.zeros(n)
    for g, layers in enumerate(layer_groups(n)):
        g1[layers] = stage_gains[g] * w[layers] / w[layers].sum()
    return g1


def _resample(profile: np.ndarray, n: int) -> np.ndarray:
    x_old = np.linspace(0, 1, len(profile))
    return np.interp(np.linspace(0, 1, n), x_old, profile)


def _additive_r2(world: World, stage: str) -> float:
    """R^2 of an additive-by-group fit over the 256 plans of the landscape's 8 groups x {nf4, int8}."""
    groups = layer_groups(world.space.n_layers)
    codes = np.array([[(i >> (N_GROUPS - 1 - g)) & 1 for g in range(N_GROUPS)] for i in range(2 ** N_GROUPS)])
    unit_group = np.zeros(len(world.space.layer_of), dtype=int)
    for g, layers in enumerate(groups):
        unit_group[np.isin(world.space.layer_of, layers)] = g
    rows = codes[:, unit_group]
    y = world.quality(rows, stage)
    x = np.c_[np.ones(len(codes)), codes]
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    return 1.0 - float(resid.var() / y.var())


def _calibrate_interactions(world: World, raw: np.ndarray, stage: str) -> np.ndarray:
    """Scale ``raw`` so that the world's additive-by-group R^2 is ``TARGET_R2`` (bisection on the scale)."""
    lo, hi = 0.0, 1.0
    world.J[stage] = raw * hi
    while _additive_r2(world, stage) > TARGET_R2 and hi < 1e6:
        hi *= 2.0
        world.J[stage] = raw * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        world.J[stage] = raw * mid
        lo, hi = (mid, hi) if _additive_r2(world, stage) > TARGET_R2 else (lo, mid)
    return raw * (lo + hi) / 2


def make_world(space: Space, seed: int) -> World:
    rng = np.random.default_rng(10_000 + seed)
    truth = _truth()
    sens30 = np.array(truth["estimators"]["sensitivity"]["layer_scores"], dtype=float)
    mi30 = np.array(truth["estimators"]["mutual_information"]["layer_scores"], dtype=float)
    n = space.n_layers
    sens = sens30 if n == len(sens30) else _resample(sens30, n)
    jitter = _lognormal(rng, SPREAD_JITTER, n)
    bf16_jitter = _lognormal(rng, BF16_JITTER, n)
    U = len(space.layer_of)
    linear_jitter = _lognormal(rng, LINEAR_JITTER, U) if U != n else np.ones(U)
    raw = rng.normal(0.0, 1.0, (U, U))
    raw = np.triu(raw, 1)
    raw = raw + raw.T
    values, Js = {}, {}
    zero_jitter = _lognormal(np.random.default_rng(20_000 + seed), ZERO_JITTER, n)
    demo = group_gains("demo") if space.group_gains is None else space.group_gains
    for stage in ("demo", "zero"):
        # the zero-step gains keep the landscape's shape, scaled like the demo fidelity's total
        stage_gains = demo if stage == "demo" else group_gains("zero") * demo.sum() / group_gains("demo").sum()
        g1_layer = layer_gains(stage_gains, sens, jitter * (zero_jitter if stage == "zero" else 1.0))
        g2_layer = g1_layer * bf16_jitter
        g2_layer *= space.int8_to_bf16 * (g1_layer.sum() / demo.sum()) / g2_layer.sum()
        split = space.numel_share * linear_jitter
        split = split / np.bincount(space.layer_of, split)[space.layer_of]
        g1, g2 = g1_layer[space.layer_of] * split, g2_layer[space.layer_of] * split
        values[stage] = np.stack([np.zeros(U), g1, g1 + g2], axis=1)
        Js[stage] = raw * np.sqrt(np.outer(g1, g1))
    world = World(space, values, Js, np.zeros(U), "")
    for stage in ("demo", "zero"):
        world.J[stage] = _calibrate_interactions(world, Js[stage], stage)
        world.values[stage] = world.values[stage] * space.gain_scale   # R^2 is scale-free: calibrated first
        world.J[stage] = world.J[stage] * space.gain_scale
    if space.name.startswith("30x3"):
        world.scores, world.scores_source = mi30.copy(), "mutual_information layer scores (importance_truth.json)"
    else:
        g1 = world.values["demo"][:, 1]
        world.scores = g1 * _lognormal(rng, SCORE_ERROR, U)
        world.scores_source = f"synthetic: the world's nf4->int8 gain per unit x lognormal(sd {SCORE_ERROR})"
    return world


# --- the best-known front ---------------------------------------------------------------------------------

def pareto_dp(values: np.ndarray, costs: np.ndarray, capacity: float, max_points: int = 200_000):
    """Exact Pareto front of an additive problem (maximise sum values, minimise sum costs <= capacity):
    a dynamic programme over units keeping non-dominated partial sums. Returns (costs, values, plans)."""
    U, K = values.shape
    cost = np.zeros(1)
    val = np.zeros(1)
    back = []   # per unit: (parent index, option) of every kept point
    base = costs.min(axis=1).sum()
    for u in range(U):
        c = (cost[:, None] + costs[u][None, :]).ravel()
        v = (val[:, None] + values[u][None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), K)
        option = np.tile(np.arange(K), len(cost))
        rest = base - costs[: u + 1].min(axis=1).sum()   # cheapest completion of the remaining units
        ok = c + rest <= capacity + 1e-6
        c, v, parent, option = c[ok], v[ok], parent[ok], option[ok]
        order = np.lexsort((-v, c))
        c, v, parent, option = c[order], v[order], parent[order], option[order]
        keep = v > np.maximum.accumulate(np.r_[-np.inf, v[:-1]])
        c, v, parent, option = c[keep], v[keep], parent[keep], option[keep]
        if len(c) > max_points:   # thin evenly along the cost axis (only for very large spaces)
            pick = np.unique(np.linspace(0, len(c) - 1, max_points).round().astype(int))
            c, v, parent, option = c[pick], v[pick], parent[pick], option[pick]
        cost, val = c, v
        back.append((parent, option))
    plans = np.zeros((len(cost), U), dtype=int)
    idx = np.arange(len(cost))
    for u in range(U - 1, -1, -1):
        parent, option = back[u]
        plans[:, u] = option[idx]
        idx = parent[idx]
    return cost, val, plans


def front_mask(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    order = np.lexsort((-quality, cost))
    best = np.maximum.accumulate(np.r_[-np.inf, quality[order][:-1]])
    mask = np.zeros(len(cost), dtype=bool)
    mask[order[quality[order] > best]] = True
    return mask


def hv(cost: np.ndarray, quality: np.ndarray, ref: tuple[float, float]) -> float:
    """Hypervolume of (cost down, quality up) points above ``ref``."""
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    ok = (cost < ref[0]) & (quality > ref[1])
    cost, quality = cost[ok], quality[ok]
    if not len(cost):
        return 0.0
    m = front_mask(cost, quality)
    c, q = cost[m], quality[m]
    order = np.argsort(c)
    c, q = c[order], q[order]
    widths = np.r_[c[1:], ref[0]] - c
    return float((widths * (q - ref[1])).sum())


@dataclass
class Truth:
    """The best-known front of a world (exact where additive, local search for the interactions)."""
    cost: np.ndarray
    quality: np.ndarray
    plans: np.ndarray
    ref: tuple[float, float]
    hv: float


def best_front(world: World, stage: str = "demo", local_plans: int = 150, rng_seed: int = 0) -> Truth:
    costs = world.costs
    unit = costs.unit_cost
    cap = costs.capacity()
    cost, _, plans = pareto_dp(world.values[stage], unit, cap)
    feasible = np.array([costs.fits(p) for p in plans])
    plans = plans[feasible]
    quality = world.quality(plans, stage)
    pool_plans, pool_q = [plans], [quality]
    # local search from plans spread over memory: single-unit moves that raise quality without raising cost
    pick = np.unique(np.linspace(0, len(plans) - 1, min(local_plans, len(plans))).round().astype(int))
    U, K = unit.shape
    for i in pick:
        row = plans[i].copy()
        q = float(quality[i])
        for _ in range(4):
            moves = []
            for u in range(U):
                for k in range(K):
                    if k != row[u] and unit[u, k] <= unit[u, row[u]] + 1e-9 * unit[u].max():
                        r = row.copy()
                        r[u] = k
                        moves.append(r)
            # moves that keep cost: also swaps (one unit up, one down) are costly to enumerate; singles only
            if not moves:
                break
            moves = np.array(moves)
            mq = world.quality(moves, stage)
            j = int(mq.argmax())
            if mq[j] <= q + 1e-12:
                break
            row, q = moves[j], float(mq[j])
            pool_plans.append(row[None, :])
            pool_q.append(np.array([q]))
    plans = np.concatenate(pool_plans)
    quality = np.concatenate(pool_q)
    cost = np.array([costs.total(p) for p in plans])
    low = np.zeros(U, dtype=int)
    worst = float(world.quality(low, stage)[0])
    top = float(quality.max())
    ref = (float(cost.max()) + 1.0, worst - 0.1 * (top - worst))
    m = front_mask(cost, quality)
    return Truth(cost[m], quality[m], plans[m], ref, hv(cost[m], quality[m], ref))


def noise_ceiling(world: World, truth: Truth, draws: int = 200, seed: int = 0) -> dict:
    """How precisely a hypervolume ratio near 1 can be read at all. Every plan near the front (the front and
    all its single-unit neighbours) is measured again with the trial noise. ``exact_front_vs_best_remeasured``:
    the true front's plans, at those measurements, against the front of all re-measured plans (noise alone
    makes other plans look better: below this a front cannot be told from the exact one on measured
    values); ``exact_front_remeasured_vs_true``: the true front's hypervolume at the measurements over its
    true hypervolume (the spread one measurement puts on a ratio). Median, 10th and 90th percentile."""
    rng = np.random.default_rng(seed)
    U, K = world.costs.unit_cost.shape
    rows = [truth.plans]
    for u in range(U):
        for k in range(K):
            r = truth.plans.copy()
            r[:, u] = k
            rows.append(r)
    pool = np.unique(np.concatenate(rows), axis=0)
    pool = pool[[world.costs.fits(p) for p in pool]]
    cost = np.array([world.costs.total(p) for p in pool])
    q = world.quality(pool)
    on_front = np.zeros(len(pool), dtype=bool)
    keys = {tuple(p) for p in truth.plans}
    on_front[[i for i, p in enumerate(pool) if tuple(p) in keys]] = True
    against_best, measured = [], []
    for _ in range(draws):
        noisy = q + rng.normal(0, world.noise, len(q))
        against_best.append(hv(cost[on_front], noisy[on_front], truth.ref) / hv(cost, noisy, truth.ref))
        measured.append(hv(cost[on_front], noisy[on_front], truth.ref) / truth.hv)

    def summary(r):
        return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90))}
    return {"exact_front_vs_best_remeasured": summary(against_best), "exact_front_remeasured_vs_true": summary(measured),
            "plans_remeasured": int(len(pool))}


def best_subset_hv(truth: Truth, n: int) -> float:
    """The largest hypervolume any ``n`` plans can have: the best ``n`` points of the best-known front
    (exact dynamic programme over the front sorted by cost; the ceiling of a search with ``n`` trials)."""
    order = np.argsort(truth.cost)
    c, q = truth.cost[order], truth.quality[order]
    F = len(c)
    if n >= F:
        return truth.hv
    ref_c, ref_q = truth.ref
    # best[i, m]: largest area of m points whose cheapest is point i (area right of c_i up to ref_c)
    best = np.full((F, n + 1), -np.inf)
    best[:, 1] = (ref_c - c) * (q - ref_q)
    for m in range(2, n + 1):
        for i in range(F - 1):
            nxt = np.arange(i + 1, F)
            # point i covers [c_i, c_j) at level q_i; the rest is the best m-1 set starting at j
            cand = (c[nxt] - c[i]) * (q[i] - ref_q) + best[nxt, m - 1]
            best[i, m] = cand.max()
    return float(best[:, n].max())
