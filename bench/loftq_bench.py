"""LoftQ against plain (QLoRA, B = 0) initialisation on real nf4/int8 mixes of the demo's pruned SmolLM2.

Plans: the landscape's 8 contiguous layer groups, with 25%, 50% and 75% of them in nf4 (the least
important first by the project's Fisher scores, as the searcher's prior would choose) and the rest
int8 — real mixes, where LoftQ changes the nf4 layers and leaves the int8 ones alone.
Variants: ``plain``; ``loftq`` (1 iteration, balanced: the default when recording began); ``loftq x4`` (4 iterations,
balanced: the default since this benchmark); ``loftq unbalanced`` (1 iteration, no rescaling of the factors).
Steps: held-out NLL (64 x 128 tokens) at 0 steps, the demo's 10, 4x that (40) and a long run
(``--long``, 120), every 10 steps in between; 3 fine-tuning seeds each.

Every run is a real trial (``qpruner.trial.run_trial``: bitsandbytes quantization, peft LoRA, the
demo's fine-tuning settings) and is appended to ``results/bench/loftq_runs.jsonl`` when it ends, so
the benchmark is resumable: run it again and it trains only what is missing (hours on 2 cores).
``--report`` (also run at the end) writes ``results/bench/loftq.{md,json}`` from what is recorded:
the mean NLL per variant and step, and the paired difference to ``plain`` (same plan, same seed)
with its standard error.

    python bench/loftq_bench.py                    # record (resumable), then report
    python bench/loftq_bench.py --shard 0/2 & python bench/loftq_bench.py --shard 1/2   # two at once: ~2x on 2 cores
    python bench/loftq_bench.py --report           # only the report
    python bench/loftq_bench.py --model tiny --steps 2 --long 4 --seeds 1 --out /tmp/b   # seconds
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

DEMO = ROOT / "tune_jobs" / "smollm2_demo.yaml"
N_GROUPS = 8
SHARES = (0.25, 0.5, 0.75)
VARIANTS = {"plain": dict(init="plain"),
            "loftq": dict(init="loftq", loftq_iters=1, loftq_balance=True),
            "loftq x4": dict(init="loftq", loftq_iters=4, loftq_balance=True),
            "loftq unbalanced": dict(init="loftq", loftq_iters=1, loftq_balance=False)}


def bench_job(model: str, work: Path):
    from qpruner.config import load_job
    # score.method=fisher: the plans (least important groups first) were chosen by Fisher scores when the
    # benchmark started recording; a resumed run must train the very same plans
    overrides = ["name=loftq_bench", f"results_dir={work}", "eval.before_finetune=true", "score.method=fisher"]
    if model == "tiny":
        overrides += ["model.source=tiny", "data.seq_len=64", "data.calib_samples=4", "data.eval_samples=8",
                      "prune.ratio=0.5", "finetune.batch_size=2", "finetune.lora_r=4"]
    return load_job(DEMO, overrides)


def plans(scores, n_layers: int) -> dict[str, object]:
    """Group mixes: the ``share`` least important groups (summed layer scores) in nf4, the rest int8."""
    from qpruner.plan import PrecisionPlan
    groups = [list(map(int, g)) for g in np.array_split(np.arange(n_layers), min(N_GROUPS, n_layers))]
    order = sorted(range(len(groups)), key=lambda g: sum(scores[i] for i in groups[g]))
    out = {}
    for share in SHARES:
        low = set(order[: max(1, round(share * len(groups)))])
        formats = [None] * n_layers
        for g, layers in enumerate(groups):
            for i in layers:
                formats[i] = "nf4" if g in low else "int8"
        plan = PrecisionPlan(tuple(formats))
        out[f"{int(share * 100)}% nf4"] = plan
    return out


def recorded(runs_file: Path, long: int) -> set:
    if not runs_file.is_file():
        return set()
    return {(r["code"], r["variant"], r["seed"], r.get("long")) for r in map(json.loads, runs_file.read_text().splitlines())
            if r.get("long") == long}


def record(model: str, steps: int, long: int, seeds: int, runs_file: Path, work: Path, shard=(0, 1)) -> int:
    """Train this shard's missing runs; returns how many runs of the whole design are still unrecorded."""
    import fcntl

    import torch

    from qpruner import job as driver
    from qpruner import models
    from qpruner.memory import Budget, ModelLayout
    from qpruner.trial import TrialContext, run_trial

    torch.manual_seed(0)
    if shard[1] > 1:   # N processes share the machine's cores (as Ray trials do, cpus_per_trial each)
        import os
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // shard[1]))
    started = stamp()   # the code this process runs: commits made while it runs did not change it
    job = bench_job(model, work)   # its pruned model and scores are cached in <work>/loftq_bench/
    out = job.results_path
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "w") as lock:   # shards started together: one prunes and scores, the rest wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        pruned = driver.load_or_prune(job, torch.device("cpu"))
        scores = driver.load_or_score(job, pruned.model, pruned.splits.calib, out / "layer_scores.json").scores
    layout = ModelLayout.from_model(pruned.model)
    config_dict, state = models.model_state(pruned.model)
    every = max(1, min(steps, 10))
    ft = replace(job.finetune, steps=long, eval_every=every)
    base = TrialContext(config_dict, state, layout, pruned.splits.train, pruned.splits.eval, job.quant, ft,
                        replace(job.eval, before_finetune=True), Budget(), metric="perplexity")
    done = recorded(runs_file, long)
    # seed-major: every finished seed adds one paired difference per plan and variant to the report;
    # --shard K/N takes every N-th run of this fixed order (N processes share the 2 cores better than one)
    every_run = [(label, plan, variant, seed) for seed in range(seeds) for label, plan in plans(scores, layout.n_layers).items()
                 for variant in VARIANTS]
    todo = [r for i, r in enumerate(every_run) if i % shard[1] == shard[0] and (r[1].code(), r[2], r[3], long) not in done]
    print(f"{len(done)} runs recorded, {len(todo)} to train in shard {shard[0]}/{shard[1]} ({pruned.report.summary()})",
          flush=True)
    for label, plan, variant, seed in todo:
        if (plan.code(), variant, seed, long) in recorded(runs_file, long):   # e.g. by another process meanwhile
            continue
        ctx = replace(base, finetune=replace(ft, seed=seed, **VARIANTS[variant]))
        reports, t = [], time.perf_counter()
        r = run_trial(ctx, plan, "cpu", on_report=reports.append)
        if r.status != "ok":
            print(f"{label} {variant} seed {seed}: {r.status} {r.error}", flush=True)
            continue
        nll = {0: r.nll_before, **{x["step"]: math.log(x["perplexity"]) for x in reports}, r.train_steps: r.nll}
        row = {"plan": label, "code": plan.code(), "avg_bits": round(r.avg_bits, 3), "variant": variant,
               "seed": seed, "long": long, "nll": {str(k): round(v, 5) for k, v in sorted(nll.items())},
               "nll_se_final": round(r.nll_se, 5), "seconds": round(time.perf_counter() - t, 1), **started}
        with runs_file.open("a") as f:   # one line per finished run: a kill loses at most the run in progress
            f.write(json.dumps(row) + "\n")
        print(f"{label} {variant} seed {seed}: NLL {row['nll']}", flush=True)
    have = recorded(runs_file, long)
    return sum((plan.code(), variant, seed, long) not in have for _, plan, variant, seed in every_run)


def report(runs_file: Path, out: Path, demo_steps: int) -> dict:
    rows = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    if not rows:
        raise SystemExit(f"nothing recorded in {runs_file} yet: run `python bench/loftq_bench.py` first")
    steps = sorted({int(k) for r in rows for k in r["nll"]})
    marks = [s for s in steps if s in (0, demo_steps, 4 * demo_steps) or s == steps[-1]]
    def diff(variant: str, base: str, step: int, plan: str | None = None) -> dict | None:
        """Mean ± SE of ``variant - base`` NLL at ``step``, paired by plan and fine-tuning seed."""
        d = [r["nll"][str(step)] - b["nll"][str(step)] for r in rows for b in rows
             if r["variant"] == variant and b["variant"] == base and r["plan"] == b["plan"] and r["seed"] == b["seed"]
             and (plan is None or r["plan"] == plan) and str(step) in r["nll"] and str(step) in b["nll"]]
        if len(d) < 2:
            return None
        return {"mean": round(float(np.mean(d)), 4), "se": round(float(np.std(d, ddof=1) / math.sqrt(len(d))), 4),
                "n": len(d)}

    table = {}
    for variant in VARIANTS:
        for s in marks:
            vals = [r["nll"][str(s)] for r in rows if r["variant"] == variant and str(s) in r["nll"]]
            if vals:
                table.setdefault(variant, {})[str(s)] = {"mean": round(float(np.mean(vals)), 4), "n": len(vals)}
    plans_ = sorted({r["plan"] for r in rows})
    others = [v for v in VARIANTS if v != "plain"]
    paired = {v: {str(s): d for s in marks if (d := diff(v, "plain", s))} for v in others}
    # the same paired differences, plan by plan: does LoftQ's effect grow with the nf4 share?
    by_plan = {v: {p: {str(s): d for s in marks if (d := diff(v, "plain", s, p))} for p in plans_} for v in others}
    # LoftQ's settings against each other: more iterations, the rescaling off
    vs_loftq = {v: {str(s): d for s in marks if (d := diff(v, "loftq", s))} for v in others if v != "loftq"}
    paired, vs_loftq = {k: v for k, v in paired.items() if v}, {k: v for k, v in vs_loftq.items() if v}
    by_plan = {k: {p: x for p, x in v.items() if x} for k, v in by_plan.items() if any(v.values())}
    result = {**stamp(), "what": "REAL trials (bitsandbytes nf4/int8 mixes, peft LoRA): LoftQ vs plain "
              "initialisation on the demo's pruned SmolLM2", "runs": len(rows), "plans": sorted({r["plan"] for r in rows}),
              "steps": marks, "nll": table, "paired_vs_plain": paired, "paired_by_plan": by_plan,
              "paired_vs_loftq": vs_loftq, "seeds": sorted({r["seed"] for r in rows}),
              "source": str(runs_file.relative_to(ROOT)) if runs_file.is_relative_to(ROOT) else str(runs_file)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print("wrote", out.with_suffix(".md"))
    return result


def to_markdown(r: dict) -> str:
    lines = ["# LoftQ vs plain initialisation on real nf4/int8 mixes", "",
             f"**What this measures:** {r['what']}. Plans: {', '.join(r['plans'])} of the 8 layer groups "
             f"(least important first), the rest int8. {r['runs']} runs recorded (`{r['source']}`), fine-tuning seeds "
             f"{r.get('seeds')}.", "",
             f"Command: `{r['command']}` at commit `{r['commit'][:10]}`{' (uncommitted changes)' if r.get('dirty') else ''}; "
             f"{r['machine']}, {r['date']}.", "",
             "Held-out NLL per token, mean over plans and seeds (n runs):", "",
             "| variant | " + " | ".join(f"step {s}" for s in r["steps"]) + " |", "|---|" + "---:|" * len(r["steps"])]
    for variant, by_step in r["nll"].items():
        lines.append(f"| {variant} | " + " | ".join(f"{by_step[str(s)]['mean']} ({by_step[str(s)]['n']})"
                                                   if str(s) in by_step else "" for s in r["steps"]) + " |")
    lines += ["", "Paired difference to plain, same plan and seed (negative = LoftQ better), mean ± SE:", "",
              "| variant | " + " | ".join(f"step {s}" for s in r["steps"]) + " |", "|---|" + "---:|" * len(r["steps"])]
    for variant, by_step in r["paired_vs_plain"].items():
        cells = []
        for s in r["steps"]:
            d = by_step.get(str(s))
            cells.append("" if d is None else f"{d['mean']:+.4f} ± {d['se']:.4f}"
                         + ("" if abs(d["mean"]) > 2 * d["se"] else " (within noise)"))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if r.get("paired_vs_loftq"):
        lines += ["", "LoftQ's settings against each other: paired difference to `loftq` (1 iteration, balanced), "
                  "same plan and seed (negative = better than 1 iteration), mean ± SE:", "",
                  "| variant | " + " | ".join(f"step {s}" for s in r["steps"]) + " |", "|---|" + "---:|" * len(r["steps"])]
        for variant, by_step in r["paired_vs_loftq"].items():
            lines.append(f"| {variant} | " + " | ".join(
                "" if (d := by_step.get(str(s))) is None else f"{d['mean']:+.4f} ± {d['se']:.4f}"
                + ("" if abs(d["mean"]) > 2 * d["se"] else " (within noise)") for s in r["steps"]) + " |")
    if r.get("paired_by_plan"):
        lines += ["", "The same, plan by plan (mean ± SE over seeds):", "",
                  "| variant | plan | " + " | ".join(f"step {s}" for s in r["steps"]) + " |",
                  "|---|---|" + "---:|" * len(r["steps"])]
        for variant, plans_ in r["paired_by_plan"].items():
            for plan, by_step in plans_.items():
                lines.append(f"| {variant} | {plan} | " + " | ".join(
                    "" if (d := by_step.get(str(s))) is None else f"{d['mean']:+.4f} ± {d['se']:.4f}"
                    for s in r["steps"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--steps", type=int, default=10, help="the demo's step count")
    parser.add_argument("--long", type=int, default=120, help="the long run's step count")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--report", action="store_true", help="only write the report from what is recorded")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="train every N-th run from the K-th (0-based): run N of these at once, e.g. 0/2 and 1/2")
    args = parser.parse_args(argv)
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard: expected K/N with 0 <= K < N, e.g. 0/2; got {args.shard!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "loftq_runs.jsonl"
    if not args.report:
        work = ROOT / "results" if args.out == ROOT / "results" / "bench" else args.out   # never in results/bench
        missing = record(args.model, args.steps, args.long, args.seeds, runs, work, shard)
        if missing:
            print(f"shard {args.shard} done, {missing} runs of other shards still missing; the report is written by "
                  "the shard that finishes last, or by --report")
            return 0
    report(runs, args.out / "loftq", args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
