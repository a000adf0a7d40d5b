"""Large-space search benchmark: a REPLAY ON CALIBRATED SYNTHETIC WORLDS (a proxy of real trials).

How close does each searcher get to the best-known accuracy/memory front after N trained trials, in the
spaces users search: the demo's 30 layers x {nf4, int8, bf16} (``30x3``), a 7B-shaped 32 layers x 3
(``7b``), and ``policy.unit: linear`` on the demo's model (``linear210``)? Worlds: ``bench/search_worlds.py``
(every number's source is in its docstring and in the output's ``"calibration"``). Searchers run through a
Tune-free driver of the product's search loop (``bench/search_drivers.py``), against the simple baselines.

* Score: hypervolume of the trained plans' TRUE qualities (the world without noise: what the user gets)
  over the best-known front's (exact Pareto DP where the world is additive, local search for the
  interactions, and every plan any searcher trained); reference point: the largest feasible memory + 1
  byte, the all-lowest plan's quality minus 10% of the front's quality range. Searchers observe noisy
  qualities (the trial noise).
* Rows: every searcher and the baselines (greedy chain from the scores, probe-then-knapsack, knapsack on
  the scores alone, random feasible), median over worlds with a bootstrap standard error.
* Noise ceiling per space: see ``search_worlds.noise_ceiling``.

    python bench/search_large.py                                  # all spaces, 20 worlds (writes results/bench/search_large.{json,md})
    python bench/search_large.py --spaces 30x3 --worlds 4 --out /tmp/sl     # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

import search_drivers as drivers  # noqa: E402
import search_worlds as worlds  # noqa: E402
from qpruner import policy  # noqa: E402
from qpruner.config import PolicyConfig  # noqa: E402
from qpruner.unit_importance import UnitScores  # noqa: E402

CHECKPOINTS = (8, 10, 16, 32, 64)
OPTIONS = (4, 8, 16)


def seeds(world, seed: int, sampled: int | None = None, style: str = "product") -> list[dict]:
    """The product's seed plans (``qpruner.policy.seed_indices``) from the world's scores; ``ends``: the
    uniform plans that fit only; ``chain<K>``: those and K plans evenly spaced inside the greedy chain."""
    U = world.costs.weights.shape[0]
    ends = [np.full(U, k) for k in range(len(OPTIONS)) if world.costs.fits(np.full(U, k))]
    if style == "ends":
        return [drivers.config_of(r, OPTIONS) for r in ends]
    if style.startswith("chain"):
        chain = policy.greedy_chain(world.scores, world.costs, list(OPTIONS))
        inner = policy.chain_points(chain, int(style[5:]) + 2)[1:]
        return [drivers.config_of(r, OPTIONS) for r in ends + inner]
    scores = UnitScores("bench", tuple(float(s) for s in world.scores), "layer")
    n = PolicyConfig().seed_plans if sampled is None else sampled
    cfg = PolicyConfig(bits=OPTIONS, seed_plans=n)
    return [drivers.config_of(idx, OPTIONS) for idx, _ in policy.seed_indices(scores, world.costs, list(OPTIONS), cfg, seed)]


def space_of(world):
    from qpruner.search.searchers import SearchSpace
    U = world.costs.weights.shape[0]
    return SearchSpace([policy.key(u) for u in range(U)], list(OPTIONS), world.costs, tuple(float(s) for s in world.scores))


def product(kind: str, sampled: int | None = None, style: str = "product", **kw):
    """A factory for one of the product's searchers (``make_searcher``), seeded as the product seeds it."""
    def make(world, seed, n):
        from qpruner.search.searchers import make_searcher
        s = make_searcher(kind, seeds(world, seed, sampled, style), seed, 2, space_of(world), **kw)
        if kind not in ("additive",):
            from ray import tune
            U = world.costs.weights.shape[0]
            s.set_search_properties(None, None, {policy.key(u): tune.choice(list(OPTIONS)) for u in range(U)})
        return s
    return make


SEARCHERS = {   # name: (factory(world, seed, n), runs once to the largest N and is read at every prefix?)
    "additive": (product("additive"), True),
    "additive_seeds0": (product("additive", 0), True),
    "additive_ends": (product("additive", style="ends"), True),
    "additive_chain2": (product("additive", style="chain2"), True),
    "additive_chain4": (product("additive", style="chain4"), True),
    "greedy_chain": (lambda w, s, n: drivers.greedy_chain(w.scores, w.costs, OPTIONS, n), False),
    "probe_knapsack": (lambda w, s, n: drivers.ProbeKnapsack(w.scores, w.costs, OPTIONS, n), False),
    "score_knapsack": (lambda w, s, n: drivers.score_knapsack(w.scores, w.costs, OPTIONS, n), False),
    "random": (lambda w, s, n: drivers.RandomFeasible(w.costs, OPTIONS, s), True),
}
BASELINES = ("greedy_chain", "probe_knapsack", "score_knapsack", "random")


def run_world(space, w_seed: int, names: list[str], checkpoints, pending: int = 1) -> dict:
    world = worlds.make_world(space, w_seed)
    runs: dict[str, dict[int, list]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        make, prefix = SEARCHERS[name]
        t0 = time.perf_counter()
        if prefix:
            trained = drivers.drive(world, make(world, w_seed, max(checkpoints)), max(checkpoints), seed=w_seed,
                                    pending=pending)
            runs[name] = {n: trained[:n] for n in checkpoints}
        else:
            runs[name] = {n: drivers.drive(world, make(world, w_seed, n), n, seed=w_seed, pending=pending)
                          for n in checkpoints}
        seconds[name] = time.perf_counter() - t0
    truth = worlds.best_front(world)
    # every trained plan joins the best-known front (a searcher may find what the local search missed)
    tried = np.unique(np.array([r for per in runs.values() for rows in per.values() for r in rows]), axis=0)
    q_tried = world.quality(tried)
    c_tried = np.array([world.costs.total(r) for r in tried])
    cost = np.r_[truth.cost, c_tried]
    qual = np.r_[truth.quality, q_tried]
    m = worlds.front_mask(cost, qual)
    worst = float(world.quality(np.zeros(world.costs.weights.shape[0], dtype=int))[0])
    top = float(qual.max())
    ref = (max(truth.ref[0], float(c_tried.max()) + 1.0), worst - 0.1 * (top - worst))
    best_hv = worlds.hv(cost[m], qual[m], ref)
    out = {}
    for name, per in runs.items():
        out[name] = {}
        for n, rows in per.items():
            if not rows:
                out[name][n] = 0.0
                continue
            r = np.array(rows)
            out[name][n] = worlds.hv(np.array([world.costs.total(x) for x in r]), world.quality(r), ref) / best_hv
    return {"hv": out, "seconds": seconds, "front_size": int(m.sum()), "world": world, "truth": truth}


def median_se(values, boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(len(v), size=(boot, len(v)))], axis=1)
    return float(np.median(v)), float(meds.std())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="+", default=["30x3", "7b", "linear210"])
    parser.add_argument("--worlds", type=int, default=20)
    parser.add_argument("--searchers", nargs="+", default=list(SEARCHERS))
    parser.add_argument("--checkpoints", nargs="+", type=int, default=list(CHECKPOINTS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    res = {**stamp(), "what": "REPLAY ON CALIBRATED SYNTHETIC WORLDS (a proxy of real trials; see calibration)",
           "source": worlds.SOURCES, "default_searcher": "additive", "spaces": {}}
    for name in args.spaces:
        space = worlds.make_space(name)
        per_world = []
        for w in range(args.worlds):
            t0 = time.perf_counter()
            per_world.append(run_world(space, w, args.searchers, args.checkpoints))
            print(f"{name} world {w}: " + ", ".join(f"{s} {per_world[-1]['hv'][s][16]:.3f}" for s in args.searchers
                                                     if 16 in per_world[-1]['hv'][s]) + f" ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
        table = {}
        for s in args.searchers:
            meds = {str(n): median_se([pw["hv"][s][n] for pw in per_world]) for n in args.checkpoints}
            table[s] = {"hv_ratio_median": {n: round(m, 4) for n, (m, _) in meds.items()},
                        "hv_ratio_median_se": {n: round(se, 4) for n, (_, se) in meds.items()},
                        "seconds_per_world": round(float(np.mean([pw["seconds"][s] for pw in per_world])), 2)}
        ceiling = worlds.noise_ceiling(per_world[0]["world"], per_world[0]["truth"])
        res["spaces"][name] = {"description": space.description, "units": int(space.costs.weights.shape[0]),
                               "worlds": args.worlds, "searchers": table, "noise_ceiling_world0": ceiling}
        for s in args.searchers:
            print(s, table[s]["hv_ratio_median"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_large.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
