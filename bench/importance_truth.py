"""Unit-importance estimators against the truth measured on the recorded landscape.

The truth: on the recorded landscape (results/bench/landscape_smollm2.parquet: SmolLM2-135M pruned as
the demo, 8 layer groups x {nf4, int8}, every plan a real trial), held-out NLL is close to additive
over the groups, so a least-squares fit gives each group's effect: the NLL it costs to store that group
in nf4 instead of int8. Fitted per stage: ``zero`` (no fine-tuning, all 256 plans) and ``demo`` (the
demo's 10 LoRA steps; as many plans as are recorded).

The estimators: every ``score.method`` of qpruner (fisher, taylor, block_influence,
mutual_information, sensitivity) scores the 30 layers of the very same pruned model on the job's
calibration split; a group's score is the sum over its layers. Reported: Spearman correlation with the
truth, with a bootstrap interval over the groups (8 points: wide intervals, said plainly), and the
seconds each estimator took.

    python bench/importance_truth.py                  # writes results/bench/importance_truth.{md,json}
    python bench/importance_truth.py --reuse-scores   # refit the truth only, with the scores recorded there
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

import landscape  # noqa: E402
from stats import bootstrap_spearman, bootstrap_spearman_diff, spearman  # noqa: E402

METHODS = ("fisher", "taylor", "block_influence", "mutual_information", "sensitivity")
OUT = ROOT / "results" / "bench" / "importance_truth"


def truth(table, stage: str) -> dict | None:
    rows = table[table["stage"] == stage].drop_duplicates("group_code")
    if len(rows) < 2 * landscape.N_GROUPS:   # too few plans to fit 9 coefficients with any precision
        return None
    x = np.array([[1.0] + [float(ch == "8") for ch in code] for code in rows["group_code"]])
    y = rows["nll"].to_numpy()
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    # standard errors of the fitted effects (ordinary least squares)
    cov = np.linalg.inv(x.T @ x) * float(resid @ resid) / max(1, len(y) - x.shape[1])
    return {"plans": int(len(rows)), "gain_nf4_to_int8": [round(-float(c), 5) for c in coef[1:]],
            "gain_se": [round(float(s), 5) for s in np.sqrt(np.diag(cov))[1:]],
            "r2": round(1 - float(resid.var() / y.var()), 4)}


def correlate(group_scores: list[float], truths: dict) -> dict:
    return {"spearman": {s: round(spearman(group_scores, t["gain_nf4_to_int8"]), 3) for s, t in truths.items()},
            "spearman_ci95": {s: bootstrap_spearman(group_scores, t["gain_nf4_to_int8"]) for s, t in truths.items()}}


def score_estimators(pruned: Path, job) -> tuple[dict, str]:
    """Every estimator on the landscape's own pruned model: ``{method: {seconds, layer_scores, group_scores}}``."""
    import torch

    from qpruner import data, unit_importance
    from qpruner.config import ScoreConfig
    from qpruner.pruned_model import load_pruned

    torch.manual_seed(0)
    model, tokenizer = load_pruned(pruned)
    model.eval()
    calib = data.load_splits(job.data, tokenizer).calib
    parts = landscape.groups(len(model.model.layers))
    estimators = {}
    for method in METHODS:
        t = time.perf_counter()
        scores = unit_importance.score_units(model, calib, ScoreConfig(method=method), "layer", job.quant).scores
        estimators[method] = {"seconds": round(time.perf_counter() - t, 1), "layer_scores": [float(x) for x in scores],
                              "group_scores": [float(sum(scores[i] for i in g)) for g in parts]}
        print(method, f"{estimators[method]['seconds']}s", flush=True)
    return estimators, (f"{calib.shape[0]} x {calib.shape[1]} tokens (the job's calibration split as this commit "
                        "draws it; the landscape's model was pruned on the split of its recording commit)")


def model_fingerprint(meta: dict) -> str:
    """The landscape's pruned model, as its metadata pins it: exact per-group memory tables and the layer
    scores recorded with it."""
    import hashlib
    return hashlib.sha256(json.dumps([meta["group_costs"], meta["layer_scores"]], sort_keys=True).encode()).hexdigest()[:16]


def recorded_estimators(out: Path, fingerprint: str) -> tuple[dict, str, str, str | None]:
    """The scores of the last full run (``importance_truth.json``): the estimators' scores depend only on the
    landscape's pruned model, so a refit of the truth on a grown landscape can reuse them."""
    path = out.with_suffix(".json")
    if not path.is_file():
        raise SystemExit(f"--reuse-scores: {path} is not here, so there are no recorded scores to reuse; score the "
                         "landscape's pruned model instead (python bench/importance_truth.py without the flag)")
    old = json.loads(path.read_text())
    scored_at = old.get("scores_commit") or old["commit"]
    if old.get("landscape_model") not in (None, fingerprint):
        raise SystemExit(f"--reuse-scores: the scores in {path} were computed for another landscape model "
                         f"({old['landscape_model']} != {fingerprint}: its memory tables or recorded scores "
                         "differ); score the current one instead (without the flag)")
    estimators = {m: {k: e[k] for k in ("seconds", "layer_scores", "group_scores")} for m, e in old["estimators"].items()}
    return estimators, old["calibration"], scored_at, old.get("landscape_model")


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reuse-scores", action="store_true",
                        help="refit the truth on the current landscape with the estimator scores recorded in "
                             "results/bench/importance_truth.json (no scoring; for a checkout without the "
                             "landscape's pruned model)")
    parser.add_argument("--out", type=Path, default=OUT, help="output path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    table, meta = landscape.load()
    fingerprint = model_fingerprint(meta)
    truths = {s: t for s in ("zero", "demo") if (t := truth(table, s))}
    if not truths:
        raise SystemExit("no landscape stage has enough recorded plans: run bench/landscape.py record first")
    job = landscape.stage_job("zero")
    pruned = job.results_path / "pruned"
    if not args.reuse_scores and not (pruned / "config.json").is_file():
        raise SystemExit(f"{pruned} is not here: this benchmark scores the landscape's own pruned model, which "
                         "`python bench/landscape.py record --stage zero` writes. Run it where the landscape was "
                         "recorded, or recreate that model from a git worktree at the commit that recorded the "
                         "stage's first trials (code after the calibration-split change prunes differently); "
                         "or refit the truth with the recorded scores: python bench/importance_truth.py --reuse-scores")
    if args.reuse_scores:
        estimators, calibration, scored_at, scored_for = recorded_estimators(args.out, fingerprint)
    else:
        (estimators, calibration), scored_at, scored_for = score_estimators(pruned, job), None, fingerprint
    parts = landscape.groups(len(next(iter(estimators.values()))["layer_scores"]))
    measured = estimators["sensitivity"]["layer_scores"]   # each layer alone in nf4: KL of the predictions
    for method, e in estimators.items():
        e.update(correlate(e["group_scores"], truths))
        # a second, finer reference: all 30 layers against their measured single-layer sensitivity
        e["spearman_layers_vs_sensitivity"] = round(spearman(e["layer_scores"], measured), 3)
        print(method, e["spearman"], e["spearman_layers_vs_sensitivity"], flush=True)
    from qpruner.config import ScoreConfig
    default = ScoreConfig().method
    versus = {m: {**{s: bootstrap_spearman_diff(estimators[m]["group_scores"], estimators[default]["group_scores"],
                                                t["gain_nf4_to_int8"]) for s, t in truths.items()},
                  "layers_vs_sensitivity": bootstrap_spearman_diff(estimators[m]["layer_scores"],
                                                                   estimators[default]["layer_scores"], measured)}
              for m in estimators if m != default}
    first = next(iter(truths))   # "zero" once that stage is recorded
    ranked = sorted(estimators, key=lambda m: -estimators[m]["spearman"][first])
    result = {**stamp(), "what": "qpruner's unit-importance estimators against the per-group effects fitted on the "
              "recorded real landscape (not a proxy)", "source": "results/bench/landscape_smollm2.parquet",
              "model": "SmolLM2-135M-Instruct pruned as tune_jobs/smollm2_demo.yaml (the landscape's own pruned model)",
              "calibration": calibration, "groups": parts, "truth": truths, "estimators": estimators,
              "ranked_by": first, "ranked": ranked, "default": default,
              "paired_diff_vs_default_ci95": versus}
    # the model the scores belong to (None: scores recorded before this was kept; not checked)
    result["landscape_model"] = scored_for
    if scored_at:
        result["scores_commit"] = scored_at   # the scores were computed then, on the same pruned model
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(result))
    print("wrote", args.out.with_suffix(".md"))
    return 0


def to_markdown(r: dict) -> str:
    stages = list(r["truth"])
    lines = ["# Unit importance against the measured truth (recorded real landscape)", "",
             f"**What this measures:** {r['what']}. Truth: least-squares effect of storing each of the 8 layer "
             "groups in nf4 instead of int8, on held-out NLL, from `" + r["source"] + "` "
             + "; ".join(f"{s}: {t['plans']} plans, R^2 {t['r2']}" for s, t in r["truth"].items())
             + f". Scores: each estimator on {r['model']}, {r['calibration']}, summed per group.", "",
             f"Command: `{r['command']}` at commit `{r['commit'][:10]}`{' (uncommitted changes)' if r.get('dirty') else ''}; "
             f"{r['machine']}, {r['date']}.", ""]
    if r.get("scores_commit"):
        lines += [f"**Scores reused** from the run at commit `{r['scores_commit'][:10]}` (`--reuse-scores`; "
                  + ("checked to be the landscape's model" if r.get("landscape_model") else
                     "scored on the landscape's own pruned model, recorded before the check of the model's "
                     "fingerprint existed") + "): this run refitted the truth on the current landscape only.", ""]
    lines += ["| estimator | " + " | ".join(f"Spearman vs {s} [95% bootstrap over groups]" for s in stages)
             + " | Spearman, 30 layers vs measured sensitivity | seconds |", "|---|" + "---:|" * (len(stages) + 2)]
    for m in r["ranked"]:
        e = r["estimators"][m]
        lines.append(f"| {m}{' (default)' if m == r.get('default') else ''} | "
                     + " | ".join(f"{e['spearman'][s]} {e['spearman_ci95'][s]}" for s in stages)
                     + f" | {e.get('spearman_layers_vs_sensitivity', '')}{' (the reference)' if m == 'sensitivity' else ''}"
                     + f" | {e['seconds']} |")
    if r.get("paired_diff_vs_default_ci95"):
        refs = [*stages, "layers_vs_sensitivity"]
        lines += ["", f"Paired bootstrap of the difference in Spearman to the default ({r['default']}), the same "
                  "resampled units for both, 95% interval (an interval holding 0: not a difference):", "",
                  "| estimator | " + " | ".join(f"vs {x}" for x in refs) + " |", "|---|" + "---:|" * len(refs)]
        for m, d in r["paired_diff_vs_default_ci95"].items():
            lines.append(f"| {m} | " + " | ".join("(the reference)" if m == "sensitivity" and x == "layers_vs_sensitivity"
                                                  else str(d.get(x)) for x in refs) + " |")
    lines += ["", "Per-group truth (NLL cost of nf4 instead of int8, ± standard error of the fit):", ""]
    for s, t in r["truth"].items():
        lines.append(f"* {s}: " + ", ".join(f"{g:.4f} ± {e:.4f}" for g, e in zip(t["gain_nf4_to_int8"], t["gain_se"])))
    lines += ["", "With 8 groups a rank correlation has wide intervals: a difference between two estimators "
              "inside them is not a result.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
