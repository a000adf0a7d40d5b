"""Report of ``bench/search_real30.py``: the replay's prediction against real trials, and two strategies' fronts.

* Prediction: each real plan's NLL against the demo world of ``bench/search_worlds.py`` (``30x3``): its
  central world (no jitter, no interactions: group gains spread by sensitivity, int8 -> bf16 by ``g1``) and
  the 20 jittered worlds of the benchmark. The worlds model quality *differences* (hypervolume ratios do
  not depend on a constant), so the intercept is fitted (one number: the all-nf4 NLL); ``r2`` is then the
  share of the real plans' NLL variance the replay explains. ``r2_slope_fitted`` also fits a scale
  (how far the world's gains are off in size), Spearman needs neither.
* Fronts at N = 16: the default search's 16 trained plans against the greedy chain's 16 (the best simple
  baseline of the replay at N = 16), on the same held-out tokens; hypervolume with a common reference
  point (largest memory + 1 byte, worst NLL + 10% of the range), its paired difference and a bootstrap
  over the 64 evaluation windows (every plan resampled with the same windows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "bench" / "search_real30"


def _load(directory: Path):
    import pandas as pd
    path = directory / "trials.parquet"
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    return frame[frame["status"] == "ok"].sort_values("number")



def _idx(code: str) -> list[int]:
    return [{"4": 0, "f": 0, "8": 1, "H": 2}[ch] for ch in code]


def _r2(y: np.ndarray, pred: np.ndarray, slope: bool) -> float:
    x = np.c_[np.ones(len(pred)), pred] if slope else np.ones((len(pred), 1))
    target = y - (0 if slope else pred)
    coef, *_ = np.linalg.lstsq(x, target, rcond=None)
    fit = x @ coef + (0 if slope else pred)
    return float(1.0 - ((y - fit) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def central_world(space):
    import search_worlds as sw
    saved = (sw.SPREAD_JITTER, sw.BF16_JITTER)
    sw.SPREAD_JITTER = sw.BF16_JITTER = 0.0
    try:
        world = sw.make_world(space, 0)
    finally:
        sw.SPREAD_JITTER, sw.BF16_JITTER = saved
    for stage in world.J:
        world.J[stage] = np.zeros_like(world.J[stage])
    return world


def prediction(frame) -> dict:
    from scipy.stats import spearmanr

    import search_worlds as sw
    space = sw.make_space("30x3")
    rows = np.array([_idx(c) for c in frame["plan_code"]])
    y = frame["nll"].to_numpy(float)
    mem = space.costs.totals(rows)
    if not np.allclose(mem, frame["weight_bytes"].to_numpy(float)):
        raise SystemExit("the 30x3 memory tables disagree with the real trials' measured bytes")
    central = -central_world(space).quality(rows)
    per_world = [-sw.make_world(space, w).quality(rows) for w in range(20)]
    return {"n_plans": int(len(y)), "r2": round(_r2(y, central, slope=False), 4),
            "r2_slope_fitted": round(_r2(y, central, slope=True), 4),
            "slope": round(float(np.polyfit(central, y, 1)[0]), 3),
            "spearman": round(float(spearmanr(central, y).correlation), 4),
            "r2_worlds_median": round(float(np.median([_r2(y, p, slope=False) for p in per_world])), 4),
            "spearman_worlds_median": round(float(np.median([spearmanr(p, y).correlation for p in per_world])), 4),
            "nll_range": round(float(np.ptp(y)), 4), "memory_tables_match_measured_bytes": True}


def _hv(cost, quality, ref) -> float:
    import search_worlds as sw
    return sw.hv(np.asarray(cost, float), np.asarray(quality, float), ref)


def fronts(default, chain, boot: int = 2000, seed: int = 0) -> dict:
    both = [default, chain]
    win_nll = [np.stack(f["eval_window_nll"].to_numpy()) for f in both]       # [plans, windows] sums
    win_tok = [np.stack(f["eval_window_tokens"].to_numpy()).astype(float) for f in both]
    cost = [f["weight_bytes"].to_numpy(float) for f in both]

    def hvs(w):
        q = [-(n[:, w].sum(axis=1) / t[:, w].sum(axis=1)) for n, t in zip(win_nll, win_tok)]
        allq = np.concatenate(q)
        ref = (max(c.max() for c in cost) + 1.0, allq.min() - 0.1 * np.ptp(allq))
        return [_hv(c, qq, ref) for c, qq in zip(cost, q)]

    W = win_nll[0].shape[1]
    base = hvs(np.arange(W))
    rng = np.random.default_rng(seed)
    draws = np.array([hvs(rng.integers(W, size=W)) for _ in range(boot)])
    rel = draws[:, 0] / draws[:, 1] - 1.0
    return {"n_each": [int(len(default)), int(len(chain))], "hv_default": base[0], "hv_greedy_chain": base[1],
            "default_over_chain_minus_1": round(base[0] / base[1] - 1.0, 4),
            "default_over_chain_minus_1_se": round(float(rel.std()), 4),
            "default_front_plans": int(_front_count(cost[0], -win_nll[0].sum(1) / win_tok[0].sum(1))),
            "chain_front_plans": int(_front_count(cost[1], -win_nll[1].sum(1) / win_tok[1].sum(1)))}


def _front_count(cost, q) -> int:
    import search_worlds as sw
    return int(sw.front_mask(np.asarray(cost, float), np.asarray(q, float)).sum())


TRIALS = OUT.parent / "search_real30_trials.parquet"
KEEP = ["stage", "kind", "number", "trial_id", "plan_code", "weight_bytes", "avg_bits", "nll", "nll_se", "perplexity",
        "eval_window_nll", "eval_window_tokens", "seconds_total", "status"]


STAGES = ("plans", "default", "probes")


def recorded(run_dir: Path):
    """Every stage's trials: the committed table, each stage replaced by this run directory's where it holds at
    least as many (a fresh clone has only the committed ones); the union is written back to
    ``results/bench/search_real30_trials.parquet`` (committed: the run directories are not), never with fewer
    trials of a stage than the file holds."""
    import pandas as pd
    table = pd.read_parquet(TRIALS) if TRIALS.is_file() else pd.DataFrame(columns=KEEP)
    stages, changed = {s: table[table["stage"] == s] for s in STAGES}, False
    for stage in STAGES:
        here = _load(run_dir / stage)
        if here is None or len(here) < len(stages[stage]):
            continue
        if stage == "default":
            here = here.assign(kind="default")
        else:
            origin = {p["code"]: p["origin"] for p in json.loads((run_dir / f"{stage}.json").read_text())}
            here = here.assign(kind=here["plan_code"].map(origin).fillna("other"))
        stages[stage], changed = here.assign(stage=stage)[KEEP], True
    if changed:
        pd.concat([f for f in stages.values() if len(f)], ignore_index=True)[KEEP].to_parquet(TRIALS, index=False)
    return {s: (f if len(f) else None) for s, f in stages.items()}


def probe_calibration(probes) -> dict | None:
    """The replay's group gains at TODAY's recipe, from the calibration probes alone: each group's nf4 -> int8
    gain as the mean of its "up" (from all-nf4) and "down" (from all-int8) differences where both are recorded,
    and the int8 -> bf16 total as the sum of the groups' bf16 - int8 probe differences (or, with no bf16 probes,
    the replay's INT8_TO_BF16 scaled like the nf4 -> int8 gains)."""
    import search_worlds as sw
    if probes is None:
        return None
    nll = dict(zip(probes["kind"], probes["nll"].astype(float)))
    if "nf4" not in nll or "int8" not in nll:
        return None
    gains, how = [], []
    for g in range(sw.N_GROUPS):
        est = [nll["nf4"] - nll[f"up:{g}"]] if f"up:{g}" in nll else []
        est += [nll[f"down:{g}"] - nll["int8"]] if f"down:{g}" in nll else []
        if not est:
            return None
        gains.append(float(np.mean(est)))
        how.append(len(est))
    gains_arr = np.array(gains)
    bf16 = [nll[f"up:{g}"] - nll[f"bf16:{g}"] for g in range(sw.N_GROUPS) if f"up:{g}" in nll and f"bf16:{g}" in nll]
    if len(bf16) == sw.N_GROUPS:
        total, source = float(np.sum(bf16)), "sum of the 8 groups' bf16 - int8 probe differences"
    else:
        total = sw.INT8_TO_BF16 * gains_arr.sum() / sw.group_gains("demo").sum()
        source = "INT8_TO_BF16 scaled by today's / the landscape's total nf4 -> int8 gain (bf16 probes incomplete)"
    return {"group_gains_nf4_to_int8": [round(g, 5) for g in gains], "estimates_per_group": how,
            "total_nf4_to_int8": round(float(gains_arr.sum()), 5),
            "landscape_total_nf4_to_int8": round(float(sw.group_gains("demo").sum()), 5),
            "int8_to_bf16_total": round(total, 5), "int8_to_bf16_source": source,
            "probes": int(len(probes)), "all_nf4_nll": round(nll["nf4"], 5), "all_int8_nll": round(nll["int8"], 5)}


def today_quality(rows: np.ndarray, cal: dict) -> np.ndarray:
    """Quality (-NLL relative to all-nf4) of each plan in the central world calibrated at today's recipe: the
    probes' group gains spread over each group's layers by the measured single-layer sensitivity (as the
    replay spreads the landscape's), int8 -> bf16 spread in proportion, no interactions."""
    import search_worlds as sw
    sens = np.array(sw._truth()["estimators"]["sensitivity"]["layer_scores"], dtype=float)
    g1 = sw.layer_gains(np.asarray(cal["group_gains_nf4_to_int8"], dtype=float), sens)
    g2 = g1 * cal["int8_to_bf16_total"] / g1.sum()
    return ((rows >= 1) * g1).sum(axis=1) + ((rows >= 2) * g2).sum(axis=1)


def prediction_today(frame, cal: dict) -> dict:
    from scipy.stats import spearmanr
    rows = np.array([_idx(c) for c in frame["plan_code"]])
    y = frame["nll"].to_numpy(float)
    pred = -today_quality(rows, cal)
    return {"n_plans": int(len(y)), "r2": round(_r2(y, pred, slope=False), 4),
            "r2_slope_fitted": round(_r2(y, pred, slope=True), 4),
            "slope": round(float(np.polyfit(pred, y, 1)[0]), 3),
            "spearman": round(float(spearmanr(pred, y).correlation), 4)}


def main(run_dir: Path, stamp: dict, out: Path = OUT) -> None:
    stages = recorded(run_dir)
    plans, default, probes = stages["plans"], stages["default"], stages["probes"]
    if plans is None:
        raise SystemExit(f"nothing recorded in {run_dir}/plans yet: run `record --stage plans` first")
    every = plans if default is None else __import__("pandas").concat([plans, default.assign(kind="default")])
    every = every.drop_duplicates("plan_code")
    res = {**stamp, "what": "REAL trials (the demo's recipe and tokens) against the large-space replay's demo world",
           "source": ["results/bench/search_real30_trials.parquet (from results/search_real30/{plans,default}/trials.parquet)",
                      "bench/search_worlds.py (30x3)"],
           "n_trials": int(len(plans) + (0 if default is None else len(default))),
           "plans_by_kind": every["kind"].value_counts().to_dict(), **prediction(every),
           "median_trial_seconds": round(float(every["seconds_total"].median()), 1)}
    cal = probe_calibration(probes)
    if cal is not None:
        res["today"] = {"what": "the replay's central world calibrated at TODAY's recipe from the calibration probes "
                                "only (never the plans it is checked on), checked on the plans above",
                        "calibration": cal, **prediction_today(every, cal)}
        res["r2_landscape_world"] = res["r2"]
        res["r2"] = res["today"]["r2"]
    elif probes is not None:
        res["today"] = {"probes": int(len(probes)), "what": "calibration probes incomplete: no today world yet"}
    chain = plans[plans["kind"] == "chain"]
    if default is not None and len(default) >= 16 and len(chain) >= 16:
        res["fronts_at_16"] = fronts(default.head(16), chain.head(16))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    lines = [f"# {res['what']}", "", f"Command: `{res['command']}` at commit `{res['commit'][:10]}`; {res['date']}.", "",
             f"Real trials: {res['n_trials']}; distinct plans: {res['n_plans']} ({res['plans_by_kind']}); "
             f"median {res['median_trial_seconds']} s per trial.", "",
             f"* Replay's central demo world (landscape calibration) vs the real NLL: R^2 "
             f"**{res.get('r2_landscape_world', res['r2'])}** (intercept fitted), "
             f"{res['r2_slope_fitted']} with a fitted scale (slope {res['slope']}), Spearman {res['spearman']}; over the "
             f"20 benchmark worlds: R^2 median {res['r2_worlds_median']}, Spearman {res['spearman_worlds_median']}. "
             f"NLL range of the real plans {res['nll_range']}."]
    if "fronts_at_16" in res:
        f = res["fronts_at_16"]
        lines.append(f"* Fronts at N = 16 on the same tokens: default / greedy chain hypervolume - 1 = "
                     f"**{f['default_over_chain_minus_1']:+.4f} ± {f['default_over_chain_minus_1_se']:.4f}** (bootstrap over "
                     f"windows); front plans {f['default_front_plans']} vs {f['chain_front_plans']}.")
    if "calibration" in res.get("today", {}):
        t, c = res["today"], res["today"]["calibration"]
        lines.append(f"* Replay recalibrated at today's recipe from {c['probes']} probe trials (group up/down/bf16 "
                     f"probes, disjoint from the plans checked): R^2 **{t['r2']}** (intercept fitted), "
                     f"{t['r2_slope_fitted']} with a fitted scale (slope {t['slope']}), Spearman {t['spearman']}; total "
                     f"nf4 -> int8 gain {c['total_nf4_to_int8']} NLL (landscape: {c['landscape_total_nf4_to_int8']}), "
                     f"int8 -> bf16 {c['int8_to_bf16_total']} ({c['int8_to_bf16_source']}).")
    elif "today" in res:
        lines.append(f"* Calibration probes recorded: {res['today']['probes']} (incomplete: every group needs an "
                     "up or a down probe).")
    which = "today's recipe" if "calibration" in res.get("today", {}) else "the landscape"
    lines.append(f"* Verdict: the replay {'can' if res['r2'] >= 0.9 else 'can NOT'} be trusted to predict a plan's NLL "
                 f"(target R^2 >= 0.9 with the intercept fitted, for the world calibrated at {which}). "
                 f"The landscape world (recorded with 1 LoftQ iteration, the demo now runs 4) ranks real plans with "
                 f"Spearman {res['spearman']}, its gains {res['slope']:.2f}x too large. Its comparisons between searchers are "
                 "what to trust; the real fronts above are the check of those.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
