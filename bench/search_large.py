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
            s.set_search_properties("objective", "max", {policy.key(u): tune.choice(list(OPTIONS)) for u in range(U)})
        return s
    return make


def thompson(world, seed, n):
    """Ablation: the default's model, proposals by one posterior draw at a time (Thompson sampling) instead of
    the expected hypervolume improvement over 32 draws."""
    from qpruner.search.additive import AdditiveSearcher
    sp = space_of(world)
    return AdditiveSearcher(sp.keys, sp.options, sp.costs, sp.scores, seeds(world, seed), seed, draws=1, fronts=1)


SEARCHERS = {   # name: (factory(world, seed, n), runs once to the largest N and is read at every prefix?)
    "additive": (product("additive"), True),
    "additive_seeds4": (product("additive", 4), True),          # the previous default's seeds: best guess + 4 sampled
    "additive_chain4": (product("additive", style="chain4"), True),
    "additive_thompson": (thompson, True),
    "hyperopt": (product("hyperopt"), True),
    "greedy_chain": (lambda w, s, n: drivers.greedy_chain(w.scores, w.costs, OPTIONS, n), False),
    "probe_knapsack": (lambda w, s, n: drivers.ProbeKnapsack(w.scores, w.costs, OPTIONS, n), False),
    "score_knapsack": (lambda w, s, n: drivers.score_knapsack(w.scores, w.costs, OPTIONS, n), False),
    "random": (lambda w, s, n: drivers.RandomFeasible(w.costs, OPTIONS, s), True),
}
BASELINES = ("greedy_chain", "probe_knapsack", "score_knapsack", "random")


def perfect_scores(kind: str = "additive"):
    """DIAGNOSTIC, not a searcher: the default given the world's true nf4 -> int8 gains as its scores (a
    ceiling on what better scores could buy; seeded from the truth, so never a result row)."""
    base, _ = SEARCHERS[kind]

    def make(world, seed, n):
        from copy import copy
        told = copy(world)
        told.scores = world.values["demo"][:, 1].copy()
        return base(told, seed, n)
    return make


SEARCHERS["ceiling_true_scores"] = (perfect_scores("additive"), True)
CEILINGS = ("ceiling_true_scores",)
ABLATIONS = ("additive_seeds4", "additive_chain4", "additive_thompson")   # on the demo's space only


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
    cost = np.r_[truth.cost, world.costs.totals(tried)]
    qual = np.r_[truth.quality, world.quality(tried)]
    m = worlds.front_mask(cost, qual)
    worst = float(world.quality(np.zeros(world.costs.weights.shape[0], dtype=int))[0])
    top = float(qual.max())
    ref = (max(truth.ref[0], float(cost.max()) + 1.0), worst - 0.1 * (top - worst))
    front = worlds.Truth(cost[m], qual[m], np.r_[truth.plans, tried][m], ref, worlds.hv(cost[m], qual[m], ref))
    out = {}
    for name, per in runs.items():
        out[name] = {n: worlds.hv(world.costs.totals(np.array(rows)), world.quality(np.array(rows)), ref) / front.hv
                     if rows else 0.0 for n, rows in per.items()}
    out["best_subset"] = {n: worlds.best_subset_hv(front, n) / front.hv for n in checkpoints}
    return {"hv": out, "seconds": seconds, "front_size": int(m.sum()), "world": world, "truth": front}


def median_se(values, boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(len(v), size=(boot, len(v)))], axis=1)
    return float(np.median(v)), float(meds.std())


def summarize(per_world: list[dict], names: list[str], checkpoints, default: str) -> dict:
    table = {}
    for s in names + ["best_subset"]:
        meds = {str(n): median_se([pw["hv"][s][n] for pw in per_world]) for n in checkpoints}
        table[s] = {"hv_ratio_median": {n: round(m, 4) for n, (m, _) in meds.items()},
                    "hv_ratio_median_se": {n: round(se, 4) for n, (_, se) in meds.items()}}
        if s in per_world[0]["seconds"]:
            table[s]["seconds_per_world"] = round(float(np.mean([pw["seconds"][s] for pw in per_world])), 2)
        if s != default and s in names:   # paired over the same worlds: default minus this row
            diff = {str(n): median_se([pw["hv"][default][n] - pw["hv"][s][n] for pw in per_world]) for n in checkpoints}
            table[s]["default_minus_this_median"] = {n: round(m, 4) for n, (m, _) in diff.items()}
            table[s]["default_minus_this_se"] = {n: round(se, 4) for n, (_, se) in diff.items()}
    base = [b for b in BASELINES if b in names and b != "random"]
    if base:
        table["_best_simple_baseline"] = {str(n): max(base, key=lambda b: table[b]["hv_ratio_median"][str(n)])
                                          for n in checkpoints}
    return table


def concurrency(space, n_worlds: int, pendings=(1, 8, 64, 256), n_trials: int = 128) -> dict:
    """The default searcher with ``pending`` trials running at once (completed in random order), against
    sequential; and how far apart its proposals stay (mean Hamming distance between trained plans)."""
    make, _ = SEARCHERS["additive"]
    checkpoints = [n for n in (16, 32, 64, 128) if n <= n_trials]
    res: dict = {}
    per: dict = {p: [] for p in pendings}
    for w in range(n_worlds):
        world = worlds.make_world(space, w)
        truth = worlds.best_front(world)
        runs = {p: drivers.drive(world, make(world, w, n_trials), n_trials, seed=w, pending=p) for p in pendings}
        tried = np.unique(np.array([r for rows in runs.values() for r in rows]), axis=0)
        cost = np.r_[truth.cost, world.costs.totals(tried)]
        qual = np.r_[truth.quality, world.quality(tried)]
        m = worlds.front_mask(cost, qual)
        ref = (max(truth.ref[0], float(cost.max()) + 1.0), truth.ref[1])
        best = worlds.hv(cost[m], qual[m], ref)
        for p, rows in runs.items():
            arr = np.array(rows)
            hvs = {n: worlds.hv(world.costs.totals(arr[:n]), world.quality(arr[:n]), ref) / best for n in checkpoints}
            ham = float(np.mean([(arr[i] != arr[j]).sum() for i in range(len(arr)) for j in range(i)])) if len(arr) > 1 else 0.0
            per[p].append({"hv": hvs, "distinct": len({tuple(r) for r in rows}), "trained": len(rows), "hamming": ham})
        print(f"concurrency world {w}: " + ", ".join(f"{p}: {per[p][-1]['hv'][checkpoints[-1]]:.3f}" for p in pendings),
              flush=True)
    for p in pendings:
        hv_med = {str(n): round(median_se([r["hv"][n] for r in per[p]])[0], 4) for n in checkpoints}
        diff = {str(n): median_se([r["hv"][n] - s["hv"][n] for r, s in zip(per[p], per[pendings[0]])]) for n in checkpoints}
        res[str(p)] = {"hv_ratio_median": hv_med,
                       "minus_sequential_median": {n: round(m, 4) for n, (m, _) in diff.items()},
                       "minus_sequential_se": {n: round(se, 4) for n, (_, se) in diff.items()},
                       "distinct_of_trained": f"{sum(r['distinct'] for r in per[p])}/{sum(r['trained'] for r in per[p])}",
                       "mean_hamming_between_trained": round(float(np.mean([r["hamming"] for r in per[p]])), 2)}
    return {"space": space.name, "worlds": n_worlds, "n_trials": n_trials, "by_pending": res}


def latency(space, pending: int = 256, extra: int = 128) -> dict:
    """``suggest`` wall time of the default searcher with ``pending`` trials running (one world; the steady
    state: every suggest made while at least ``pending - 1`` trials run)."""
    make, _ = SEARCHERS["additive"]
    world = worlds.make_world(space, 0)
    timings: list = []
    drivers.drive(world, make(world, 0, pending + extra), pending + extra, seed=0, pending=pending, timings=timings)
    steady = np.array([t for n, t in timings if n >= pending - 1])
    return {"space": space.name, "units": int(space.costs.weights.shape[0]), "pending": pending,
            "suggest_calls": int(len(steady)), "p50_ms": round(1e3 * float(np.percentile(steady, 50)), 1),
            "p99_ms": round(1e3 * float(np.percentile(steady, 99)), 1), "max_ms": round(1e3 * float(steady.max()), 1),
            "first_suggest_ms": round(1e3 * float(timings[0][1]), 1)}


# (screen share of the compute, windows per screen, screen cost as a fraction of a full trial: None = measured)
MF_SETTINGS = ((0.15, 16, None), (0.3, 16, None), (0.15, 32, None), (0.3, 32, None),
               (0.15, 32, 0.05), (0.15, 32, 0.02), (0.3, 32, 0.02))
MF_FRACTIONS = (0.25, 0.4, 0.6, 1.0)          # of the compute of 16 full-fidelity trials of the default


def _mf_name(share, windows, cost) -> str:
    return f"share{share:g}_w{windows}" + ("" if cost is None else f"_cost{cost:g}")


def multi_fidelity(space, n_worlds: int, settings=MF_SETTINGS, n_full: int = 16, target_fraction: float = 0.4) -> dict:
    """The default searcher with screening (``search.screen_share``: the share of the compute spent on screens,
    each a zero-step evaluation on ``windows`` windows) against the full-fidelity default, by compute:
    trial-seconds from the landscape's measured stage costs (``search_worlds.STAGE_SECONDS`` /
    ``SCREEN_SECONDS``; a full trial under screening also screens itself before fine-tuning), and, labelled
    HYPOTHETICAL, with a screen costing 5% or 2% of a full trial (a recovery fine-tune of hundreds of steps, where a
    short evaluation is seconds). Hypervolume of the full-fidelity plans only (the front never holds a screen),
    over the best-known front (exact + local search + every plan trained here)."""
    from qpruner.search.additive import AdditiveSearcher, screen_relative_noise
    full_s = worlds.STAGE_SECONDS["demo"]
    reference = n_full * full_s
    names = ["default"] + [_mf_name(*st) for st in settings]
    per: dict = {n: {f: [] for f in MF_FRACTIONS} for n in names}
    spent: dict = {n: {f: [] for f in MF_FRACTIONS} for n in names}
    fulls: dict = {n: {f: [] for f in MF_FRACTIONS} for n in names}
    bound = {f: [] for f in MF_FRACTIONS}
    for w in range(n_worlds):
        world = worlds.make_world(space, w)
        make, _ = SEARCHERS["additive"]
        logs = {"default": [(r, "full", (i + 1) * full_s) for i, r in
                            enumerate(drivers.drive(world, make(world, w, n_full), n_full, seed=w))]}
        for (share, win, cost), name in zip(settings, names[1:]):
            sp = space_of(world)
            s = AdditiveSearcher(sp.keys, sp.options, sp.costs, sp.scores, seeds(world, w), w, screen_share=share,
                                 screen_noise=screen_relative_noise(win))
            logs[name] = drivers.drive_screened(world, s, reference, win, seed=w,
                                                screen_seconds=None if cost is None else cost * full_s)
        truth = worlds.best_front(world)
        tried = np.unique(np.array([row for log in logs.values() for row, f, _ in log if f == "full"]), axis=0)
        cost = np.r_[truth.cost, world.costs.totals(tried)]
        qual = np.r_[truth.quality, world.quality(tried)]
        m = worlds.front_mask(cost, qual)
        ref = (max(truth.ref[0], float(cost.max()) + 1.0), truth.ref[1])
        best = worlds.hv(cost[m], qual[m], ref)
        front = worlds.Truth(cost[m], qual[m], np.r_[truth.plans, tried][m], ref, best)
        for name, log in logs.items():
            for f in MF_FRACTIONS:
                rows = [row for row, fid, t in log if fid == "full" and t <= f * reference + 1e-9]
                arr = np.array(rows)
                per[name][f].append(worlds.hv(world.costs.totals(arr), world.quality(arr), ref) / best if rows else 0.0)
                spent[name][f].append(max([t for _, _, t in log if t <= f * reference + 1e-9], default=0.0) / reference)
                fulls[name][f].append(len(rows))
        for f in MF_FRACTIONS:
            bound[f].append(worlds.best_subset_hv(front, int(np.floor(f * n_full))) / best)
        print(f"multi-fidelity world {w}: " + ", ".join(f"{n} {per[n][target_fraction][-1]:.3f}" for n in names), flush=True)
    table = {}
    for name in names:
        table[name] = {"hv_ratio_median": {str(f): round(median_se(per[name][f])[0], 4) for f in MF_FRACTIONS},
                       "hv_ratio_median_se": {str(f): round(median_se(per[name][f])[1], 4) for f in MF_FRACTIONS},
                       "compute_fraction_median": {str(f): round(float(np.median(spent[name][f])), 3) for f in MF_FRACTIONS},
                       "full_trials_median": {str(f): float(np.median(fulls[name][f])) for f in MF_FRACTIONS}}
        if name != "default":
            d = {str(f): median_se(np.array(per[name][f]) - np.array(per["default"][f])) for f in MF_FRACTIONS}
            table[name]["minus_default_median"] = {k: round(v[0], 4) for k, v in d.items()}
            table[name]["minus_default_se"] = {k: round(v[1], 4) for k, v in d.items()}
    key = str(target_fraction)
    measured = [n for n, st in zip(names[1:], settings) if st[2] is None]
    best_name = max(measured, key=lambda n: table[n]["hv_ratio_median"][key])
    full16 = table["default"]["hv_ratio_median"]["1.0"]
    got = table[best_name]["hv_ratio_median"][key]
    bound_med = {str(f): round(float(np.median(v)), 4) for f, v in bound.items()}
    cheap = [n for n in names[1:] if "_cost" in n]
    return {"searcher": f"additive with search.screen_share / search.screen_windows = {best_name} (the best setting at "
                        f"the measured stage costs, compute fraction {key})",
            "compute_fraction": table[best_name]["compute_fraction_median"][key], "hv_ratio_median": got,
            "full_fidelity_default_at_16": full16, "target_met": bool(got >= full16 - 0.005),
            "space": space.name, "worlds": n_worlds, "reference_compute_s": reference,
            "stage_seconds": {"full": full_s, **{f"screen_w{k}": v for k, v in worlds.SCREEN_SECONDS.items()}},
            "screen_noise_nll": worlds.SCREEN_NOISE, "by_setting": table,
            "hypothetical_rows": cheap,
            "best_any_strategy_hv_ratio_median": bound_med,
            "why": f"at compute fraction {key} the best screening setting at the measured costs ({best_name}) reaches "
                   f"{got:.3f} against {full16:.3f} for 16 full-fidelity trials of the default (target: within 0.005); "
                   f"the best floor({key} x 16) plans of the best-known front reach {bound_med[key]:.3f}, and the "
                   f"full-fidelity default at that compute {table['default']['hv_ratio_median'][key]:.3f}. Rows "
                   f"{', '.join(cheap)} are HYPOTHETICAL stage costs (a screen at 5% or 2% of a full trial), not measured"}


def to_markdown(res: dict) -> str:
    lines = [f"# Large-space search benchmark: {res['what']}", "",
             f"Command: `{res['command']}` at commit `{res['commit'][:10]}`{' (uncommitted changes)' if res['dirty'] else ''}; "
             f"{res['machine']}, {res['date']}.", "", "Calibration sources: " + "; ".join(res["source"]) + ".", "",
             "Hypervolume ratio of the plans trained after N trials (their true qualities) to the best-known front's, "
             "median over worlds ± bootstrap SE. `best_subset`: the best any N plans can do (the front's best N). "
             "`ceiling_true_scores`: the default told the true gains as scores — a diagnostic ceiling, seeded from the "
             "truth, not a searcher. Paired: the default minus the row, per world, median ± SE.", ""]
    for name, sp in res["spaces"].items():
        t = sp["searchers"]
        ns = list(next(iter(t.values()))["hv_ratio_median"])
        by = sp.get("made_by", {})
        lines += [f"## {name}: {sp['description']} ({sp['worlds']} worlds)", "",
                  f"Made by `{by.get('command', res['command'])}` at commit `{str(by.get('commit', res['commit']))[:10]}`.", "",
                  "| searcher | " + " | ".join(f"N={n}" for n in ns) + " | default minus this (paired) at N=" + "/".join(ns) + " |",
                  "|---|" + "---:|" * len(ns) + "---|"]
        for s, row in t.items():
            if s.startswith("_"):
                continue
            cells = [f"{row['hv_ratio_median'][n]:.3f} ± {row['hv_ratio_median_se'][n]:.3f}" for n in ns]
            paired = " / ".join(f"{row['default_minus_this_median'][n]:+.3f}±{row['default_minus_this_se'][n]:.3f}"
                                for n in ns) if "default_minus_this_median" in row else ""
            label = f"**{s}** (default)" if s == res["default_searcher"] else s
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {paired} |")
        nc = sp["noise_ceiling_world0"]
        lines += ["", f"Noise ceiling (world 0, {nc['plans_remeasured']} near-front plans re-measured with the trial noise): "
                  f"the exact front against the best re-measured front {nc['exact_front_vs_best_remeasured']['median']:.3f} "
                  f"(10th pct {nc['exact_front_vs_best_remeasured']['p10']:.3f}); the exact front's own ratio at one "
                  f"re-measurement {nc['exact_front_remeasured_vs_true']['median']:.3f} "
                  f"[{nc['exact_front_remeasured_vs_true']['p10']:.3f}, {nc['exact_front_remeasured_vs_true']['p90']:.3f}].", ""]
    if "concurrency" in res:
        c = res["concurrency"]
        lines += [f"## Concurrency ({c['space']}, {c['worlds']} worlds, N up to {c['n_trials']}, trials completed in random order)", "",
                  "| running at once | " + " | ".join(f"N={n}" for n in c["by_pending"]["1"]["hv_ratio_median"]) +
                  " | minus sequential at the largest N | distinct/trained | mean Hamming distance |", "|---|" +
                  "---:|" * (len(c["by_pending"]["1"]["hv_ratio_median"]) + 3)]
        for p, row in c["by_pending"].items():
            last = list(row["hv_ratio_median"])[-1]
            lines.append(f"| {p} | " + " | ".join(f"{v:.3f}" for v in row["hv_ratio_median"].values()) +
                         f" | {row['minus_sequential_median'][last]:+.4f} ± {row['minus_sequential_se'][last]:.4f} | "
                         f"{row['distinct_of_trained']} | {row['mean_hamming_between_trained']} |")
        lines.append("")
    if "latency" in res:
        la = res["latency"]
        lines += [f"`suggest` latency, {la['units']} units, {la['pending']} running: p50 {la['p50_ms']} ms, p99 {la['p99_ms']} ms, "
                  f"max {la['max_ms']} ms over {la['suggest_calls']} calls (first call {la['first_suggest_ms']} ms).", ""]
    if "multi_fidelity" in res:
        mf = res["multi_fidelity"]
        lines += ["## Multi-fidelity (screens: zero-step evaluations on a few windows)", "", mf["why"] + ".", ""]
        if "by_setting" in mf:
            fr = list(mf["by_setting"]["default"]["hv_ratio_median"])
            lines += [f"Space {mf['space']}, {mf['worlds']} worlds; compute as a fraction of 16 full trials "
                      f"({mf['reference_compute_s']:.0f} trial-seconds; stage seconds {mf['stage_seconds']}).", "",
                      "| setting | " + " | ".join(f"compute {f}" for f in fr) + " | minus default (paired) |",
                      "|---|" + "---:|" * len(fr) + "---|"]
            for name, row in mf["by_setting"].items():
                cells = [f"{row['hv_ratio_median'][f]:.3f} ± {row['hv_ratio_median_se'][f]:.3f} "
                         f"({row['full_trials_median'][f]:g} full)" for f in fr]
                diff = " / ".join(f"{row['minus_default_median'][f]:+.3f}±{row['minus_default_se'][f]:.3f}"
                                  for f in fr) if "minus_default_median" in row else ""
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {diff} |")
            lines += ["| best any N full plans | " + " | ".join(f"{mf['best_any_strategy_hv_ratio_median'][f]:.3f}"
                                                          for f in fr) + " | |", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="*", default=["30x3", "7b", "linear210"])
    parser.add_argument("--worlds", type=int, default=20)
    parser.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=list(SEARCHERS))
    parser.add_argument("--checkpoints", nargs="+", type=int, default=list(CHECKPOINTS))
    parser.add_argument("--concurrency-worlds", type=int, default=8, help="0: skip the concurrency section")
    parser.add_argument("--multi-fidelity-worlds", type=int, default=20, help="0: skip the multi-fidelity section")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--latency-only", action="store_true", help="only the suggest-latency measurement (with --merge: "
                        "into the existing output; run it on an idle machine)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the spaces and sections of an existing output that this run does not redo "
                             "(each section carries the commit and command that made it)")
    args = parser.parse_args(argv)
    default = "additive"
    here = stamp()
    res = {**here, "what": "REPLAY ON CALIBRATED SYNTHETIC WORLDS (a proxy of real trials; see calibration)",
           "source": worlds.SOURCES, "calibration": worlds.__doc__, "default_searcher": default,
           "noise_sd_nll": worlds.NOISE, "spaces": {}}
    old = args.out / "search_large.json"
    if args.merge and old.is_file():
        before = json.loads(old.read_text())
        res["spaces"] = before.get("spaces", {})
        for key in ("multi_fidelity", "concurrency", "latency"):
            if key in before:
                res[key] = before[key]
    made_by = {"commit": here["commit"], "dirty": here["dirty"], "command": here["command"]}
    if args.latency_only:
        res["latency"] = {**latency(worlds.make_space("linear210")), "made_by": made_by}
        write(res, args.out)
        return 0
    for name in args.spaces:
        space = worlds.make_space(name)
        names = [s for s in args.searchers if not (s in CEILINGS + ABLATIONS and name != "30x3")]
        per_world = []
        for w in range(args.worlds):
            t0 = time.perf_counter()
            per_world.append(run_world(space, w, names, args.checkpoints))
            print(f"{name} world {w}: " + ", ".join(f"{s} {per_world[-1]['hv'][s][16]:.3f}" for s in names
                                                     if 16 in per_world[-1]['hv'][s]) + f" ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
        res["spaces"][name] = {"description": space.description, "units": int(space.costs.weights.shape[0]),
                               "worlds": args.worlds, "searchers": summarize(per_world, names, args.checkpoints, default),
                               "noise_ceiling_world0": worlds.noise_ceiling(per_world[0]["world"], per_world[0]["truth"]),
                               "per_world_hv_ratio": {s: {str(n): [round(pw["hv"][s][n], 5) for pw in per_world]
                                                          for n in args.checkpoints} for s in names + ["best_subset"]},
                               "front_size_median": float(np.median([pw["front_size"] for pw in per_world])),
                               "made_by": made_by}
        write(res, args.out)
    if args.multi_fidelity_worlds:
        res["multi_fidelity"] = {**multi_fidelity(worlds.make_space("30x3"), args.multi_fidelity_worlds), "made_by": made_by}
        write(res, args.out)
    if args.concurrency_worlds:
        res["concurrency"] = {**concurrency(worlds.make_space("30x3"), args.concurrency_worlds), "made_by": made_by}
        write(res, args.out)
        res["latency"] = {**latency(worlds.make_space("linear210")), "made_by": made_by}
        write(res, args.out)
    return 0


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_large.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "search_large.md").write_text(to_markdown(res))


if __name__ == "__main__":
    sys.exit(main())
