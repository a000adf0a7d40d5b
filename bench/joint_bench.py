"""Prune more or quantize more? The joint search against single-amount searches, on real trials.

Three searches get the same number of trained trials (``--trials``), each as the product runs it
(``qpruner.search.run_search``: the memory-aware additive searcher, seeded by the probabilistic
decision, every trial a real one — bitsandbytes quantization, peft LoRA fine-tuning, held-out
evaluation of the quantized model):

* ``joint``: pruning amount and per-layer precision together, amounts ``--amounts`` of all parameters
  (default 0, 10, 20 and 30%);
* ``fixed``: precision only, at the fixed ``--fixed`` amount (20% of the parameters);
* ``quantize_only``: precision only, unpruned (0%).

Each runs with ``--seeds`` searcher seeds (different seed plans and proposals; the trials themselves
are deterministic). Every pruned variant is pruned and scored once (``results/joint_bench/pruned-p*``)
and shared by all searches. Hypervolumes of each search's front (quality = -log perplexity, memory =
weight bytes) are computed against one common reference point (the worst quality and the largest
memory of any trial of any search), and reported as a fraction of the hypervolume of the front of all
trials together (the best front known). ``results/bench/joint.json`` holds the ``"hypervolume"``
mapping (mean over seeds) for ``joint``, ``fixed`` and ``quantize_only``, per-seed values and standard
errors; ``joint.md`` says what the combined front recommends at each memory level.

Resumable: each (search, seed) lives in ``results/joint_bench/<search>_seed<k>/``; a finished one is
read back, an unfinished one is moved aside (renamed, not deleted) and run again.

    python bench/joint_bench.py                          # SmolLM2, 10 LoRA steps per trial: ~1 hour on 2 cores
    python bench/joint_bench.py --steps 0 --work results/joint_bench_steps0   # no fine-tuning: ~35 minutes
    python bench/joint_bench.py --report                 # only the summary, from what is recorded
    python bench/joint_bench.py --model tiny --trials 4 --seeds 1 --out /tmp/j    # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

DEMO = ROOT / "tune_jobs" / "smollm2_demo.yaml"
SEARCHES = ("joint", "fixed", "quantize_only")


def bench_job(model: str, work: Path, amounts: list[float], fixed: float, trials: int, steps: int | None):
    from qpruner.config import load_job
    overrides = ["name=joint_bench", f"results_dir={work}", f"prune.param_ratios={json.dumps(amounts)}",
                 f"prune.param_ratio={fixed}", "policy.bits=[4, 8]", "policy.budget_avg_bits=null",
                 f"search.num_trials={trials}", "search.save_adapters=false", "search.metric=perplexity",
                 "search.max_concurrent=2", "search.cpus_per_trial=1", "search.num_cpus=2", "search.verbose=0",
                 "score.method=fisher", "finetune.init=loftq", "finetune.loftq_iters=1"]   # as recorded
    if steps is not None:
        overrides.append(f"finetune.steps={steps}")
    if model == "tiny":
        overrides += ["model.source=tiny", "data.seq_len=64", "data.calib_samples=4", "data.eval_samples=8",
                      "finetune.batch_size=2", "finetune.lora_r=4"]
    return load_job(DEMO, overrides)


def search_amounts(kind: str, amounts: list[float], fixed: float) -> list[float]:
    return {"joint": amounts, "fixed": [fixed], "quantize_only": [0.0]}[kind]


def _finished(directory: Path, trials: int) -> bool:
    path = directory / "trials.parquet"
    if not path.is_file():
        return False
    frame = pd.read_parquet(path)
    return int(frame["status"].isin(["ok", "failed"]).sum()) >= trials


def record(job, out: Path, kinds: tuple[str, ...], seeds: list[int], amounts: list[float], fixed: float) -> None:
    from qpruner import job as driver, policy
    from qpruner.memory import Budget
    from qpruner.pareto import TrialLog
    from qpruner.rundir import trial_compute_dtype
    from qpruner.search import run_search
    prepared = driver.prepare(job, out)        # every amount pruned and scored once (reused when present)
    budget = Budget.from_policy(job.policy)
    for seed in seeds:
        for kind in kinds:
            directory = out / f"{kind}_seed{seed}"
            if _finished(directory, job.search.num_trials):
                print(f"{directory.name}: recorded", flush=True)
                continue
            if directory.exists():
                aside = directory.with_name(f"{directory.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}")
                directory.rename(aside)
                print(f"{directory.name}: unfinished run moved to {aside.name}; running it again", flush=True)
            variants = {a: prepared.variants[a] for a in search_amounts(kind, amounts, fixed)}
            per_variant = []
            for a, v in variants.items():
                memory = policy.PlanMemory(v.context.layout, job.quant, trial_compute_dtype(job))
                per_variant.append(driver.variant_seeds(v.scores, memory, a, job, budget, seed))
            seed_plans = driver.merge_seeds(per_variant, job.search.num_trials)
            sjob = replace(job, search=replace(job.search, seed=seed))
            log = TrialLog(directory, "perplexity", {s.plan: f"seed:{s.origin}" for s in seed_plans})
            t0 = time.perf_counter()
            run_search(sjob, {a: v.context for a, v in variants.items()}, seed_plans, log,
                       scores={a: v.scores for a, v in variants.items()})
            print(f"{directory.name}: {len(log.trained())} trained in {time.perf_counter() - t0:.0f}s", flush=True)


def _points(frame: pd.DataFrame) -> list[tuple[float, float]]:
    ok = frame[(frame["status"] == "ok") & frame["perplexity"].notna()]
    return [(float(m), -math.log(float(p))) for m, p in zip(ok["weight_bytes"], ok["perplexity"])]


def summarize(out: Path, kinds: tuple[str, ...], seeds: list[int], settings: dict, dest: Path) -> dict:
    from qpruner.frontier import hypervolume
    from qpruner.pareto import pareto_front
    from qpruner.report import choice_table, front_table
    frames = {}
    for kind in kinds:
        for seed in seeds:
            path = out / f"{kind}_seed{seed}" / "trials.parquet"
            if path.is_file():
                frames[(kind, seed)] = pd.read_parquet(path).assign(search=kind, search_seed=seed)
    if not frames:
        raise SystemExit(f"nothing recorded under {out}; run without --report first")
    every = pd.concat(frames.values(), ignore_index=True)
    points = _points(every)
    q = [p[1] for p in points]
    ref = (max(p[0] for p in points) + 1.0, min(q) - 1e-9)          # (memory, quality): common to all
    best = hypervolume(points, ref)
    by_seed = {kind: {str(seed): hypervolume(_points(frames[(kind, seed)]), ref) / best
                      for seed in seeds if (kind, seed) in frames} for kind in kinds}
    trained = {kind: {str(seed): int(frames[(kind, seed)]["status"].isin(["ok", "failed"]).sum())
                      for seed in seeds if (kind, seed) in frames} for kind in kinds}

    def mean_se(values):
        v = np.array(list(values), dtype=float)
        return float(v.mean()) if len(v) else float("nan"), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1
                                                              else float("nan"))
    hv = {kind: mean_se(by_seed[kind].values()) for kind in kinds}
    # the combined front (one row per distinct plan: all searches share the trials' determinism)
    union = every.drop_duplicates("plan_key", keep="first")
    front = pareto_front(union, "perplexity")
    result = {**stamp(), "settings": settings,
              "hypervolume": {k: hv[k][0] for k in kinds},
              "hypervolume_se": {k: hv[k][1] for k in kinds},
              "hypervolume_by_seed": by_seed, "trained": trained,
              "reference": {"weight_bytes": ref[0], "quality": ref[1], "quality_is": "-log(perplexity)",
                            "normalised_by": "hypervolume of the front of all trials of all searches"},
              "front": [{"plan": r["plan_code"], "pruned": float(r["prune_param_ratio"]),
                         "weight_mb": float(r["weight_bytes"]) / 1e6, "perplexity": float(r["perplexity"]),
                         "nll_se": float(r["nll_se"]) if pd.notna(r.get("nll_se")) else None,
                         "separable_from_cheaper": None if r.get("separable") is None or pd.isna(r.get("separable"))
                         else bool(r["separable"])} for _, r in front.iterrows()]}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "joint.json").write_text(json.dumps(result, indent=2, default=str))
    best_single = max((k for k in kinds if k != "joint"), key=lambda k: hv[k][0], default=None)
    lines = ["# Prune more or quantize more? Joint search vs single-amount searches (real trials)", "",
             f"commit `{result['commit']}`{' (dirty)' if result['dirty'] else ''}, `{result['command']}`, "
             f"{result['machine']}, {result['date']}.", "",
             f"Settings: {json.dumps(settings)}", "",
             *([("**These trials are not fine-tuned (`finetune.steps=0`): quantize and evaluate only.** On the recorded "
                 "landscape 0 steps ranks precision plans like the demo's 10 (Spearman 0.976 over 256 plans), but "
                 "a recovery fine-tune may help a more pruned model more, which this run cannot show; the 10-step "
                 "run is `python bench/joint_bench.py` (resumable)."), ""] if settings["finetune_steps"] == 0 else []),
             "Every trial is real: the pruned variant quantized with bitsandbytes to its plan, LoRA fine-tuned for "
             f"{settings['finetune_steps']} steps, and its held-out perplexity measured on the quantized model. "
             "Hypervolume: quality = -log(perplexity), memory = weight bytes, one reference point for all searches "
             "(the worst quality and the largest memory of any "
             "trial), as a fraction of the hypervolume of the front of all trials of all searches together.", "",
             "| search | amounts | hypervolume (mean ± SE over seeds) | per seed | trained trials per seed |",
             "|---|---|---|---|---|"]
    for kind in kinds:
        lines.append(f"| {kind} | {', '.join(f'{100 * a:g}%' for a in search_amounts(kind, settings['amounts'], settings['fixed']))} "
                     f"| {hv[kind][0]:.4f} ± {hv[kind][1]:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in by_seed[kind].values())} | "
                     f"{', '.join(str(v) for v in trained[kind].values())} |")
    if "joint" in kinds and best_single:
        diff = [by_seed["joint"][s] - by_seed[best_single][s] for s in by_seed["joint"] if s in by_seed[best_single]]
        d, dse = mean_se(diff)
        verdict = ("meets the target" if d >= 0 else "falls short of the target")
        lines += ["", f"**Joint vs the best single-amount search ({best_single})**: {d:+.4f} ± {dse:.4f} "
                      f"(paired by seed) — the joint front {verdict} (at least the best single amount's hypervolume "
                      f"at the same trial count)."
                      + ("" if not math.isfinite(dse) or abs(d) > 2 * dse else
                         " The difference is within two standard errors: not a result either way.")]
    lines += ["", "## The front of all trials together", "", "```", front_table(front, "perplexity"), "```", "",
              "## What it recommends at each memory level", "",
              "The best plan within each memory (six levels, evenly spaced from the smallest to the largest trial), overall and per "
              "pruning amount (* the fixed amount). Perplexity ± one standard error over evaluation windows; "
              "adjacent front points that are not separable by more than 2 paired SE are marked ~ in the table above.",
              "", "```", choice_table(union, "perplexity", settings["fixed"]), "```", ""]
    (dest / "joint.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--amounts", default="0,0.1,0.2,0.3", help="joint search: fractions of parameters removed")
    ap.add_argument("--fixed", type=float, default=0.2, help="the fixed-amount search's fraction")
    ap.add_argument("--trials", type=int, default=10, help="trained trials per search")
    ap.add_argument("--seeds", type=int, default=3, help="searcher seeds per search")
    ap.add_argument("--steps", type=int, default=None, help="LoRA steps per trial (default: the demo's)")
    ap.add_argument("--out", default=None, help="where results/bench/joint.* go (default results/bench)")
    ap.add_argument("--work", default=None, help="the searches' directory (default results/joint_bench)")
    ap.add_argument("--report", action="store_true", help="only summarize what is recorded")
    args = ap.parse_args(argv)
    amounts = sorted(float(a) for a in args.amounts.split(","))
    if 0.0 not in amounts or not any(abs(a - args.fixed) < 1e-9 for a in amounts):
        raise SystemExit("--amounts must include 0 and the --fixed amount (the single-amount searches use them)")
    dest = Path(args.out) if args.out else ROOT / "results" / "bench"
    work = Path(args.work) if args.work else (dest.parent if args.out is None else dest) / "joint_bench"
    job = bench_job(args.model, work.parent, amounts, args.fixed, args.trials, args.steps)
    job = replace(job, name=work.name)
    seeds = list(range(args.seeds))
    settings = {"model": args.model, "amounts": amounts, "fixed": args.fixed, "trials": args.trials,
                "seeds": seeds, "bits": list(job.policy.bits), "finetune_steps": job.finetune.steps,
                "eval_tokens": job.data.eval_samples * job.data.seq_len, "searcher": job.search.searcher,
                "budget": None}
    settings = recorded_settings(job.results_path, settings, report=args.report)
    if not args.report:
        record(job, job.results_path, SEARCHES, seeds, amounts, args.fixed)
    summarize(job.results_path, SEARCHES, settings["seeds"], settings, dest)


def recorded_settings(work: Path, settings: dict, report: bool) -> dict:
    """The settings the searches under ``work`` were recorded with (``settings.json`` there).

    A run refuses to add trials under other settings to a recorded work directory (they would be
    mixed into one comparison); ``--report`` summarizes with the recorded settings, whatever the
    invoking arguments say."""
    path = work / "settings.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if report:
            if recorded != settings:
                print(f"--report: using the settings recorded in {path}", flush=True)
            return recorded
        if recorded != settings:
            raise SystemExit(f"{work} was recorded with other settings:\n  recorded {json.dumps(recorded)}\n"
                             f"  asked    {json.dumps(settings)}\nrun with the recorded arguments to resume, "
                             "or give another --work directory (nothing recorded is changed)")
        return settings
    if not report:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))
    return settings


if __name__ == "__main__":
    main()
