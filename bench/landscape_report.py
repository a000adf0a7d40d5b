"""What the recorded real landscape says: noise, additivity, mixed plans vs. the uniform line, fidelity.

Reads ``results/bench/landscape_smollm2.parquet`` (``bench/landscape.py``) and writes
``results/bench/landscape.{md,json}``. Every figure comes from recorded real trials:

* **noise** — evaluation-sample standard error of one trial's NLL and accuracy (windows as the
  resampling unit), the *paired* standard error of the difference between two plans on the same
  tokens, how it shrinks with the evaluation size (first 16 / 32 / 64 windows), and the
  seed-to-seed spread of repeated plans (stages ``seed1``/``seed2`` against ``demo``);
* **signal vs noise** — the spread of quality across plans divided by the noise, for NLL and accuracy;
* **additivity** — least-squares fit of NLL on one indicator per layer group (int8 vs nf4): R^2 and
  the residual, compared with the noise; the fitted per-group gains are the ground truth for unit
  importance, and their Spearman correlation with the project's Fisher group scores is reported;
* **mixed vs. line** — each plan's NLL against the straight line between uniform nf4 and uniform
  int8 at equal memory, with the paired standard error of that difference;
* **fidelity** — Spearman rank correlation of plan quality at 0 vs 10 fine-tuning steps, and 10 vs 40.

    python bench/landscape_report.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import landscape as rec  # noqa: E402
from provenance import stamp  # noqa: E402
from qpruner.evaluate import paired_diff, ratio_se  # noqa: E402
from qpruner.frontier import front_points  # noqa: E402
from qpruner.memory import Budget, UnitCosts  # noqa: E402
from stats import bootstrap_spearman, spearman  # noqa: E402


def windows(row):
    return np.asarray(row["eval_window_nll"], dtype=float), np.asarray(row["eval_window_tokens"], dtype=float)


def line_gap(row, low, high) -> tuple[float, float]:
    """NLL of the nf4-int8 line at ``row``'s memory minus ``row``'s NLL (> 0: better than the line), with its
    paired standard error (the line is the same mix of the two uniform plans' per-window sums)."""
    a = (row["weight_bytes"] - low["weight_bytes"]) / (high["weight_bytes"] - low["weight_bytes"])
    w_low, tok = windows(low)
    w_high, _ = windows(high)
    w_row, _ = windows(row)
    line = (1 - a) * w_low + a * w_high
    return paired_diff(line, w_row, tok)


def analyse(table, meta) -> dict:
    out: dict = {"counts": table.groupby("stage").size().to_dict()}
    stage_times = table.groupby("stage")["seconds_total"].median().round(1).to_dict()
    out["median_seconds_per_trial"] = stage_times
    main_stage = "demo" if out["counts"].get("demo", 0) == 256 else "zero"
    main = table[table["stage"] == main_stage].set_index("group_code")
    out["main_stage"] = main_stage
    low, high = main.loc["4" * 8], main.loc["8" * 8]

    # --- noise ------------------------------------------------------------------------------------------
    d, se = paired_diff(*[windows(low)[0], windows(high)[0]], windows(low)[1])
    sizes = {}
    for n in (16, 32, 64):
        wl, tok = windows(low)
        wh, _ = windows(high)
        if len(tok) >= n:
            sizes[str(n)] = {"nll_se_one_trial": round(ratio_se(wl[:n], tok[:n]), 4),
                             "paired_se_nf4_vs_int8": round(paired_diff(wl[:n], wh[:n], tok[:n])[1], 4)}
    rng = np.random.default_rng(0)
    codes = list(main.index)
    pair_se = []
    for _ in range(200):
        i, j = rng.choice(len(codes), 2, replace=False)
        pair_se.append(paired_diff(windows(main.loc[codes[i]])[0], windows(main.loc[codes[j]])[0],
                                   windows(main.loc[codes[i]])[1])[1])
    has_correct = [c for c in codes if "eval_window_correct" in main and main.loc[c, "eval_window_correct"] is not None
                   and len(main.loc[c, "eval_window_correct"]) > 0]
    acc_pair_se = []
    for _ in range(200 if len(has_correct) >= 2 else 0):
        i, j = rng.choice(len(has_correct), 2, replace=False)
        ri, rj = main.loc[has_correct[i]], main.loc[has_correct[j]]
        acc_pair_se.append(paired_diff(np.asarray(ri["eval_window_correct"], float),
                                       np.asarray(rj["eval_window_correct"], float), windows(ri)[1])[1])
    out["noise"] = {
        "nll_se_one_trial_median": round(float(main["nll_se"].median()), 4),
        "accuracy_se_one_trial_median": round(float(main["accuracy_se"].median()), 4),
        "paired_nll_se_random_pairs_median": round(float(np.median(pair_se)), 4),
        "paired_accuracy_se_random_pairs_median": round(float(np.median(acc_pair_se)), 4) if acc_pair_se else None,
        "paired_accuracy_plans": len(has_correct),
        "nf4_vs_int8": {"nll_diff": round(d, 4), "paired_se": round(se, 4),
                        "accuracy_diff": round(float(high["accuracy"] - low["accuracy"]), 4),
                        "accuracy_unpaired_se": round(math.hypot(low["accuracy_se"], high["accuracy_se"]), 4)},
        "by_eval_windows": sizes,
    }
    seeds = table[table["stage"].isin(["seed1", "seed2"])]
    if len(seeds):
        demo = table[table["stage"] == "demo"].set_index("group_code")
        spreads = []
        for code, part in seeds.groupby("group_code"):
            vals = list(part["nll"]) + ([demo.loc[code, "nll"]] if code in demo.index else [])
            if len(vals) >= 2:
                spreads.append(float(np.std(vals, ddof=1)))
        out["noise"]["seed_to_seed_nll_sd_median"] = round(float(np.median(spreads)), 4) if spreads else None
        out["noise"]["seed_to_seed_plans"] = len(spreads)

    # --- signal vs noise ---------------------------------------------------------------------------------
    out["signal"] = {"nll_range": round(float(np.ptp(main["nll"])), 4), "nll_sd": round(float(main["nll"].std()), 4),
                     "accuracy_range": round(float(np.ptp(main["accuracy"])), 4),
                     "accuracy_sd": round(float(main["accuracy"].std()), 4)}
    out["signal"]["nll_sd_over_paired_se"] = round(out["signal"]["nll_sd"] / out["noise"]["paired_nll_se_random_pairs_median"], 1)
    acc_noise = out["noise"]["paired_accuracy_se_random_pairs_median"]
    out["signal"]["accuracy_noise_kind"] = "paired" if acc_noise else "unpaired (no per-window counts recorded)"
    acc_noise = acc_noise or math.sqrt(2) * out["noise"]["accuracy_se_one_trial_median"]
    out["signal"]["accuracy_sd_over_se"] = round(out["signal"]["accuracy_sd"] / acc_noise, 1)

    # --- additivity and per-group effects ----------------------------------------------------------------
    x = np.array([[1.0] + [float(ch == "8") for ch in code] for code in main.index])
    y = main["nll"].to_numpy()
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    out["additivity"] = {"r2": round(1 - float(resid.var() / y.var()), 4), "residual_sd": round(float(resid.std()), 4),
                         "group_gain_int8_over_nf4": [round(-float(c), 4) for c in coef[1:]]}
    scores = meta.get("group_scores")
    if scores:
        gains = -coef[1:]
        costs = np.array(meta["group_costs"]["weights"])
        per_byte = gains / (costs[:, 1] - costs[:, 0])
        out["additivity"]["spearman_fisher_vs_gain"] = round(spearman(scores, gains), 3)
        out["additivity"]["spearman_fisher_vs_gain_ci95"] = bootstrap_spearman(scores, gains)
        out["additivity"]["spearman_fisher_vs_gain_per_byte"] = round(spearman(scores, per_byte), 3)

    # --- mixed plans vs the uniform line -----------------------------------------------------------------
    gaps = []
    for code, row in main.iterrows():
        if code in ("4" * 8, "8" * 8):
            continue
        g, gse = line_gap(row, low, high)
        gaps.append((code, g, gse, float(row["avg_bits"])))
    above = [g for g in gaps if g[1] > 2 * g[2]]
    below = [g for g in gaps if g[1] < -2 * g[2]]
    best = max(gaps, key=lambda g: g[1])
    out["vs_line"] = {"mixed_plans": len(gaps), "above_by_2se": len(above), "below_by_2se": len(below),
                      "best": {"group_code": best[0], "nll_below_line": round(best[1], 4), "paired_se": round(best[2], 4),
                               "avg_bits": round(best[3], 2)},
                      "median_gap": round(float(np.median([g[1] for g in gaps])), 4)}
    # the front of the whole space (no budget) and of the benchmark's 6.5-bit budget
    c = meta["group_costs"]
    for budget in (None, 6.5):
        costs = UnitCosts(np.array(c["weights"]), np.array(c["biases"]), float(c["fixed"]), int(c["numel"]),
                          Budget(avg_bits=budget))
        feasible = [code for code in main.index if costs.fits(np.array(["48".index(ch) for ch in code]))]
        pts = front_points([(float(main.loc[k, "weight_bytes"]), -float(main.loc[k, "nll"])) for k in feasible])
        by_point = {(float(main.loc[k, "weight_bytes"]), -float(main.loc[k, "nll"])): k for k in feasible}
        out[f"front_{'all' if budget is None else budget}"] = [
            {"group_code": by_point[p], "mb": round(p[0] / 1e6, 2), "nll": round(-p[1], 4)} for p in pts]

    # --- fidelity: does a brief fine-tune rank plans like a longer one? ----------------------------------
    fid = {}
    for a_stage, b_stage in (("zero", "demo"), ("demo", "long"), ("zero", "long")):
        a = table[table["stage"] == a_stage].set_index("group_code")["nll"]
        b = table[table["stage"] == b_stage].set_index("group_code")["nll"]
        common = a.index.intersection(b.index)
        if len(common) >= 5:
            fid[f"{a_stage}_vs_{b_stage}"] = {"plans": len(common), "spearman": round(spearman(a[common], b[common]), 4),
                                              "ci95": bootstrap_spearman(a[common].to_numpy(), b[common].to_numpy()),
                                              "mean_nll_drop": round(float((a[common] - b[common]).mean()), 4)}
    out["fidelity"] = fid
    return out


def to_markdown(r: dict) -> str:
    n, s, a, v = r["noise"], r["signal"], r["additivity"], r["vs_line"]
    lines = ["# The recorded landscape: SmolLM2-135M, 8 layer groups x {nf4, int8} (real trials)", "",
             f"Source: `{r['source']}` (recorded at commit `{str(r['landscape_commit'])[:10]}`; trials per stage: "
             f"{r['counts']}; median seconds per trial by stage: {r['median_seconds_per_trial']}). "
             f"Figures below are for the **{r['main_stage']}** stage unless named.", "",
             f"Command: `{r['command']}` at commit `{r['commit'][:10]}`{' (uncommitted changes)' if r['dirty'] else ''}; "
             f"{r['machine']}, {r['date']}.", "",
             "## Noise", "",
             f"* One trial's held-out NLL: standard error **{n['nll_se_one_trial_median']}** (64 windows x 128 tokens; "
             f"windows resampled). Next-token accuracy: **{n['accuracy_se_one_trial_median']}**.",
             f"* Two plans on the same tokens: the *paired* standard error of their NLL difference is "
             f"**{n['paired_nll_se_random_pairs_median']}** (median over random pairs) — the text's difficulty cancels.",
             f"* Uniform nf4 vs uniform int8: NLL {n['nf4_vs_int8']['nll_diff']} ± {n['nf4_vs_int8']['paired_se']} "
             f"(paired); accuracy {n['nf4_vs_int8']['accuracy_diff']} ± {n['nf4_vs_int8']['accuracy_unpaired_se']} "
             f"(unpaired).",
             ]
    if n.get("seed_to_seed_nll_sd_median") is not None:
        lines.append(f"* Fine-tuning seed to seed (same plan, seeds 0/1/2, {n['seed_to_seed_plans']} plans): NLL standard "
                     f"deviation **{n['seed_to_seed_nll_sd_median']}** (median).")
    lines += ["", "Evaluation size (uniform nf4 and int8, first N windows):", "",
              "| windows | tokens | one trial's NLL SE | paired SE nf4 vs int8 |", "|---:|---:|---:|---:|"]
    for k, x in n["by_eval_windows"].items():
        lines.append(f"| {k} | {int(k) * 128} | {x['nll_se_one_trial']} | {x['paired_se_nf4_vs_int8']} |")
    lines += ["", "## Signal vs noise: which objective can rank plans?", "",
              f"* NLL: spread across the {r['counts'].get(r['main_stage'])} plans (SD) {s['nll_sd']}, range {s['nll_range']} — "
              f"**{s['nll_sd_over_paired_se']} x** the paired noise.",
              f"* Accuracy: SD {s['accuracy_sd']}, range {s['accuracy_range']} — **{s['accuracy_sd_over_se']} x** its "
              f"{s['accuracy_noise_kind']} noise"
              + (f" (paired over {n['paired_accuracy_plans']} plans that kept per-window counts)."
                 if n.get('paired_accuracy_se_random_pairs_median') else "."),
              "", "So the default objective is held-out perplexity (`search.metric: perplexity`).", "",
              "## Additivity over layer groups", "",
              f"Least squares of NLL on one int8 indicator per group: R^2 = **{a['r2']}**, residual SD {a['residual_sd']}.",
              f"Fitted gain of int8 over nf4 per group (NLL): {a['group_gain_int8_over_nf4']}."]
    if "spearman_fisher_vs_gain" in a:
        lines.append(f"Spearman correlation of the project's Fisher group scores with these gains: "
                     f"{a['spearman_fisher_vs_gain']} (95% bootstrap {a['spearman_fisher_vs_gain_ci95']}); with the gain "
                     f"per extra byte: {a['spearman_fisher_vs_gain_per_byte']}.")
    b = v["best"]
    lines += ["", "## Do mixed plans beat the straight line between uniform nf4 and uniform int8?", "",
              f"Of {v['mixed_plans']} mixed plans, **{v['above_by_2se']}** have a lower NLL than the line at equal memory "
              f"by more than 2 paired standard errors, **{v['below_by_2se']}** a higher one; median gap {v['median_gap']}. "
              f"The best, `{b['group_code']}` (group order; {b['avg_bits']} average bits), is {b['nll_below_line']} ± "
              f"{b['paired_se']} NLL below the line.", "",
              "Exact front of the whole space (group code: 4 = nf4, 8 = int8, layers 0-3, 4-7, ..., 24-26, 27-29):", "",
              "| plan | MB | NLL |", "|---|---:|---:|"]
    lines += [f"| `{p['group_code']}` | {p['mb']} | {p['nll']} |" for p in r["front_all"]]
    lines += ["", "## Does a brief fine-tune rank plans like a longer one?", ""]
    if r["fidelity"]:
        lines += ["| stages | plans | Spearman | 95% bootstrap | mean NLL drop |", "|---|---:|---:|---|---:|"]
        lines += [f"| {k.replace('_vs_', ' vs ')} | {f['plans']} | {f['spearman']} | {f['ci95']} | {f['mean_nll_drop']} |"
                  for k, f in r["fidelity"].items()]
    else:
        lines.append("(not recorded yet: stages `demo` and `long` of `bench/landscape.py`)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landscape", type=Path, default=rec.OUT.with_suffix(".parquet"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    table, meta = rec.load(args.landscape)
    res = {**stamp(), "source": str(args.landscape.relative_to(ROOT)) if args.landscape.is_relative_to(ROOT)
           else str(args.landscape), "landscape_commit": meta.get("commit"), **analyse(table, meta)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "landscape.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "landscape.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
