"""The paper's memory claim, estimated: fine-tuning the pruned, mixed-quantized model against LoRA on
the pruned 16-bit model.

The paper says the pruned + mixed-precision model fine-tunes in at least 30% less memory than LoRA on
the pruned bf16 model. This prices both with ``qpruner.finetune_memory.estimate`` (weights, LoRA
adapters with their gradients and Adam state, activations), which matched the CUDA allocator's peak
within 0.87-0.98 on SmolLM2's shape and on LLaMA-7B layers (results/bench/finetune_memory_cuda_*.md).
These are ESTIMATES, not measurements of the full 7B model (no GPU measured it here); on a CPU the
peak RSS is too noisy to settle a 30% question, so none is quoted.

Shapes: the demo's pruned SmolLM2-135M (group ratio 0.2 on layers 1-28, local ranking) and LLaMA-2-7B
with 20% of all parameters removed from layers 4-29 (``tune_jobs/llama2_7b_20pct.yaml``; the group
ratio that removes 20% is solved here on the exact shapes). Plans: all bf16 (the baseline), all
int8, all nf4, and 25/50/75% of the layers in nf4 with the rest int8.

Quality side by side (``--quality``, SmolLM2 only): REAL trials of the demo's recipe on the demo's pruned
SmolLM2 (bitsandbytes quantization, peft LoRA, 10 steps, held-out NLL on the same 64 x 128 tokens) for
all bf16 (the baseline: plain LoRA, nothing to initialise), all int8, all nf4 and the front plans of the
recorded landscape with 2, 4 and 6 of its 8 layer groups in nf4, ``--seeds`` fine-tuning seeds each.
Each finished trial is appended to ``results/bench/memory_claim_runs.jsonl`` (resumable: a second run
trains only what is missing). The table pairs each plan's estimated fine-tuning peak at the demo's
batch (4 x 128) with its NLL and its paired difference to bf16 (same seed, same evaluation windows).

    python bench/memory_claim.py              # the estimates: writes results/bench/memory_claim.{md,json}
    python bench/memory_claim.py --quality    # + the real trials (~25 min on 2 cores, resumable)
"""

from __future__ import annotations

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

from qpruner import prune  # noqa: E402
from qpruner.config import FinetuneConfig, PruneConfig, QuantConfig  # noqa: E402
from qpruner.finetune_memory import estimate  # noqa: E402
from qpruner.memory import LinearShape, ModelLayout  # noqa: E402
from qpruner.models import LayerWidth  # noqa: E402
from qpruner.plan import PrecisionPlan  # noqa: E402

OUT = ROOT / "results" / "bench" / "memory_claim"
SHAPES = {  # name: (layers, hidden, intermediate, heads, kv heads, head dim, vocab, tied, prune config, seq, batches)
    "SmolLM2-135M, demo pruning": (30, 576, 1536, 9, 3, 64, 49152, True, PruneConfig(ratio=0.2), 128, (1, 4, 16)),
    "LLaMA-2-7B, 20% of parameters": (32, 4096, 11008, 32, 32, 128, 32000, False,
                                      PruneConfig(param_ratio=0.2, importance="taylor", layer_start=4, layer_end=30),
                                      512, (1, 4, 8)),
}


def layout_of(n, hidden, inter, heads, kv, hd, vocab, tied) -> tuple[ModelLayout, tuple[LayerWidth, ...]]:
    layer = (LinearShape(heads * hd, hidden, False), LinearShape(kv * hd, hidden, False),
             LinearShape(kv * hd, hidden, False), LinearShape(hidden, heads * hd, False),
             LinearShape(inter, hidden, False), LinearShape(inter, hidden, False), LinearShape(hidden, inter, False))
    return (ModelLayout((layer,) * n, vocab, hidden, tied, False, (2 * n + 1) * hidden),
            (LayerWidth(heads, kv, inter),) * n)


def params(layout: ModelLayout) -> int:
    return layout.linear_numel + layout.vocab * layout.hidden * (1 if layout.tied else 2) + layout.other_numel


def pruned_layout(spec) -> tuple[ModelLayout, float, float]:
    """(pruned layout, group ratio, fraction of all parameters removed): local ranking, exact shapes."""
    n, hidden, inter, heads, kv, hd, vocab, tied, cfg = spec[:9]
    layout, widths = layout_of(n, hidden, inter, heads, kv, hd, vocab, tied)
    total = params(layout)

    def at(ratio: float) -> ModelLayout:
        return layout.narrowed(widths, prune.narrowest_widths(widths, replace(cfg, ratio=ratio, param_ratio=None)))

    ratio = cfg.ratio
    if cfg.param_ratio:   # bisection on the group ratio, as prune.solve_ratio does on a real model
        lo, hi = 0.0, 0.95
        for _ in range(40):
            ratio = (lo + hi) / 2
            lo, hi = (ratio, hi) if 1 - params(at(ratio)) / total < cfg.param_ratio else (lo, ratio)
    pruned = at(ratio)
    return pruned, ratio, 1 - params(pruned) / total


DEMO = ROOT / "tune_jobs" / "smollm2_demo.yaml"
LANDSCAPE = ROOT / "results" / "bench" / "landscape_smollm2.parquet"


def quality_plans(n_layers: int) -> dict[str, tuple[str, ...]]:
    """Uniform bf16 / int8 / nf4, and the landscape's exact-front plans (10-step stage) with 2, 4 and 6
    of the 8 groups in nf4 (the best NLL of each count; none if the landscape is not there)."""
    import landscape as land
    out = {"all bf16 (baseline)": ("bf16",) * n_layers, "all int8": ("int8",) * n_layers}
    if LANDSCAPE.is_file() and n_layers >= 8:
        from qpruner.frontier import front_points
        table, _ = land.load(LANDSCAPE)
        rows = table[table["stage"] == "demo"]
        pts = {(float(r.weight_bytes), -float(r.nll)): r.group_code for r in rows.itertuples()}
        front = [pts[p] for p in front_points(list(pts))]
        for k in (2, 4, 6):
            with_k = [c for c in front if c.count("4") == k]
            if with_k:
                best = min(with_k, key=lambda c: float(rows.loc[rows["group_code"] == c, "nll"].iloc[0]))
                choice = tuple(0 if ch == "4" else 1 for ch in best)
                out[f"front {best} ({k}/8 groups nf4)"] = land.layer_plan(choice, n_layers).formats
    out["all nf4"] = ("nf4",) * n_layers
    return out


def record_quality(runs_file: Path, work: Path, seeds: int, model: str = "smollm2"):
    """Real trials of every quality plan x seed not yet in ``runs_file`` (one JSON line per trial); returns
    (the pruned model's layout, the job's fine-tuning batch size, sequence length)."""
    import torch

    from qpruner import job as driver
    from qpruner import models
    from qpruner.config import load_job
    from qpruner.memory import Budget, ModelLayout
    from qpruner.trial import TrialContext, run_trial

    torch.manual_seed(0)
    # the initialisation its recorded trials used (memory_claim_runs.jsonl)
    overrides = ["name=memory_claim_quality", f"results_dir={work}", "policy.bits=[4, 8, 16]", "finetune.init=loftq",
                 "finetune.loftq_iters=1"]
    if model == "tiny":   # the tests' seconds-long version
        overrides += ["model.source=tiny", "data.seq_len=64", "data.calib_samples=4", "data.eval_samples=8",
                      "prune.ratio=0.5", "finetune.batch_size=2", "finetune.lora_r=4", "finetune.steps=2"]
    job = load_job(DEMO, overrides)
    pruned = driver.load_or_prune(job, torch.device("cpu"), check_budget=False)
    layout = ModelLayout.from_model(pruned.model)
    config_dict, state = models.model_state(pruned.model)
    base = TrialContext(config_dict, state, layout, pruned.splits.train, pruned.splits.eval, job.quant, job.finetune,
                        job.eval, Budget(), metric="perplexity")
    done = set()
    if runs_file.is_file():
        done = {(r["label"], r["seed"]) for r in map(json.loads, runs_file.read_text().splitlines())}
    todo = [(label, formats, seed) for seed in range(seeds) for label, formats in quality_plans(layout.n_layers).items()
            if (label, seed) not in done]
    print(f"quality: {len(done)} trials recorded, {len(todo)} to train ({pruned.report.summary()})", flush=True)
    for label, formats, seed in todo:
        t = time.perf_counter()
        r = run_trial(replace(base, finetune=replace(job.finetune, seed=seed)), PrecisionPlan(formats), "cpu")
        if r.status != "ok":
            print(f"{label} seed {seed}: {r.status} {r.error}", flush=True)
            continue
        row = {"label": label, "code": r.plan.code(), "key": r.plan.key(), "seed": seed, "steps": r.train_steps, "nll": round(r.nll, 5),
               "nll_se": round(r.nll_se, 5), "weight_bytes": r.weight_bytes, "eval_window_nll": list(r.eval_window_nll),
               "eval_window_tokens": list(r.eval_window_tokens), "seconds": round(time.perf_counter() - t, 1), **stamp()}
        with runs_file.open("a") as f:   # one line per finished trial: a kill loses at most the one in progress
            f.write(json.dumps(row) + "\n")
        print(f"{label} seed {seed}: NLL {r.nll:.4f} ± {r.nll_se:.4f}", flush=True)
    return layout, job.finetune.batch_size, job.data.seq_len


def summarize_quality(runs_file: Path, layout: ModelLayout, quant, batch: int, seq: int) -> dict:
    """Per plan: estimated fine-tuning peak at (batch, seq), saving vs bf16, mean NLL over seeds and the paired
    difference to bf16 (per seed on the same windows; SE = window SE of the seed-averaged difference combined
    with the seed-to-seed SE)."""
    from qpruner.results import paired_diff, ratio_se
    rows = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.is_file() else []
    base_label = "all bf16 (baseline)"
    by = {}
    for r in rows:
        by.setdefault(r["label"], {})[r["seed"]] = r
    ft = FinetuneConfig(batch_size=batch)
    base_est = estimate(layout, PrecisionPlan.uniform("bf16", layout.n_layers), quant, ft, seq, "bfloat16").total
    out = []
    for label, seeds in by.items():
        any_row = next(iter(seeds.values()))
        est = estimate(layout, PrecisionPlan.from_key(any_row["key"]), quant, ft, seq, "bfloat16").total
        nlls = [r["nll"] for r in seeds.values()]
        entry = {"plan": label, "code": any_row["code"], "seeds": len(nlls), "est_peak_gb": round(est / 1e9, 3),
                 "saving_vs_bf16": round(1 - est / base_est, 3), "weight_mb": round(any_row["weight_bytes"] / 1e6, 1),
                 "nll_mean": round(float(sum(nlls) / len(nlls)), 4)}
        common = [s for s in seeds if s in by.get(base_label, {})]
        if label != base_label and common:
            diffs = [paired_diff(seeds[s]["eval_window_nll"], by[base_label][s]["eval_window_nll"],
                                 seeds[s]["eval_window_tokens"])[0] for s in common]
            tokens = seeds[common[0]]["eval_window_tokens"]
            window_diff = [sum(seeds[s]["eval_window_nll"][w] - by[base_label][s]["eval_window_nll"][w]
                               for s in common) / len(common) for w in range(len(tokens))]
            se_w = ratio_se(window_diff, tokens)
            se_s = (float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))) if len(diffs) > 1 else 0.0
            entry.update(dnll_vs_bf16=round(float(np.mean(diffs)), 4), dnll_se=round(math.sqrt(se_w ** 2 + se_s ** 2), 4))
        out.append(entry)
    return {"batch": batch, "seq_len": seq, "rows": out, "source": str(runs_file.relative_to(ROOT))
            if runs_file.is_relative_to(ROOT) else str(runs_file)}


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT.parent)
    parser.add_argument("--quality", action="store_true", help="also record/read the real trials (SmolLM2)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per quality plan")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2", help="tiny: the tests' quick run")
    args = parser.parse_args(argv)
    out = args.out / OUT.name
    out.parent.mkdir(parents=True, exist_ok=True)
    quant = QuantConfig()
    result = {**stamp(), "what": "ESTIMATES (qpruner.finetune_memory, validated against the CUDA allocator at "
              "0.87-0.98 of the measured peak) of LoRA fine-tuning peak memory, bf16 compute", "shapes": {}}
    for name, spec in SHAPES.items():
        layout, ratio, removed = pruned_layout(spec)
        n = layout.n_layers
        plans = {"all bf16 (baseline)": PrecisionPlan.uniform("bf16", n), "all int8": PrecisionPlan.uniform("int8", n),
                 **{f"{int(s * 100)}% nf4, rest int8": PrecisionPlan(tuple("nf4" if i < round(s * n) else "int8"
                                                                          for i in range(n))) for s in (0.25, 0.5, 0.75)},
                 "all nf4": PrecisionPlan.uniform("nf4", n)}
        rows = []
        for batch in spec[10]:
            ft = FinetuneConfig(batch_size=batch)
            base = estimate(layout, plans["all bf16 (baseline)"], quant, ft, spec[9], "bfloat16").total
            for label, plan in plans.items():
                est = estimate(layout, plan, quant, ft, spec[9], "bfloat16")
                rows.append({"plan": label, "batch": batch, "seq_len": spec[9], "total_gb": round(est.total / 1e9, 3),
                             "weights_gb": round(est.weights / 1e9, 3), "activations_gb": round(est.activations / 1e9, 3),
                             "saving_vs_bf16": round(1 - est.total / base, 3)})
        result["shapes"][name] = {"group_ratio": round(ratio, 4), "params_removed": round(removed, 4), "rows": rows}
        print(name, f"ratio {ratio:.3f}, removed {removed:.3f}", flush=True)
    runs = args.out / "memory_claim_runs.jsonl"
    spec = SHAPES["SmolLM2-135M, demo pruning"]
    shape = (pruned_layout(spec)[0], 4, spec[9])   # the demo's pruned SmolLM2 at the demo's batch
    if args.quality:
        shape = record_quality(runs, ROOT / "results" if args.out == OUT.parent else args.out, args.seeds, args.model)
    if runs.is_file():   # the table from what is recorded (also without --quality)
        result["quality"] = summarize_quality(runs, shape[0], quant, shape[1], shape[2])
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print("wrote", out.with_suffix(".md"))
    return 0


def to_markdown(r: dict) -> str:
    lines = ["# The paper's memory claim (>= 30% less fine-tuning memory than LoRA on the pruned bf16 model), estimated",
             "", f"**What this is:** {r['what']}. Not a measurement of these full models.", "",
             f"Command: `{r['command']}` at commit `{r['commit'][:10]}`{' (uncommitted changes)' if r.get('dirty') else ''}; "
             f"{r['date']}.", ""]
    for name, s in r["shapes"].items():
        lines += [f"## {name} (group ratio {s['group_ratio']}, {100 * s['params_removed']:.1f}% of parameters removed)", "",
                  "| plan | batch x seq | total GB | weights GB | activations GB | saving vs bf16 |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {x['plan']} | {x['batch']} x {x['seq_len']} | {x['total_gb']} | {x['weights_gb']} | "
                  f"{x['activations_gb']} | {100 * x['saving_vs_bf16']:.1f}% |" for x in s["rows"]]
        lines.append("")
    q = r.get("quality")
    if q:
        lines += ["## Quality side by side: SmolLM2, real trials (the demo's recipe: 10 LoRA steps, batch "
                  f"{q['batch']} x {q['seq_len']})", "",
                  f"REAL trials (`{q['source']}`): each plan quantized with bitsandbytes, LoRA-fine-tuned (bf16 "
                  "baseline: plain LoRA on the unquantized pruned model) and evaluated on the same held-out windows. "
                  "Fine-tuning peak: the estimate above at this batch. NLL: mean over fine-tuning seeds; "
                  "difference to bf16 paired by seed and window, ± its standard error (window and seed noise "
                  "combined); within 2 SE = not told apart.", "",
                  "| plan | weights MB | est. fine-tuning peak GB | saving vs bf16 | NLL (seeds) | NLL - bf16 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for x in q["rows"]:
            diff = ""
            if "dnll_vs_bf16" in x:
                d, se = x["dnll_vs_bf16"], x["dnll_se"]
                diff = f"{d:+.4f} ± {se:.4f}" + (" (within noise)" if abs(d) <= 2 * se else "")
            lines.append(f"| {x['plan']} | {x['weight_mb']} | {x['est_peak_gb']} | {100 * x['saving_vs_bf16']:.1f}% | "
                         f"{x['nll_mean']} ({x['seeds']}) | {diff} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
