"""Trial fidelity benchmark on the demo's pruned SmolLM2.

1. Held-out perplexity after 0, K/2 and K fine-tuning steps, for uniform nf4 with plain (QLoRA) vs
   LoftQ initialisation (the default: balanced, 4-bit layers only; and as in the paper: every layer,
   unbalanced), and for a real nf4/int8 mix (the greedy best guess at 6.5 average bits over {4, 8, 16}
   from the default layer scores) with the same three. One seed each: the paired, multi-seed
   comparison of the initialisations is bench/loftq_bench.py (results/bench/loftq.md).
2. Evaluation throughput (tokens per second of strided perplexity, items per second of
   multiple-choice scoring) of the quantized model per format, median of 3 runs.

    python bench/trial_bench.py                       # writes results/bench/trial.{md,json}
    python bench/trial_bench.py --model tiny --steps 2 --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from provenance import commit_label  # noqa: E402

from qpruner import data, models, policy, prune, tasks, unit_importance  # noqa: E402
from qpruner.config import EvalConfig, FinetuneConfig, QuantConfig, ScoreConfig, build_job  # noqa: E402
from qpruner.evaluate import evaluate  # noqa: E402
from qpruner.memory import Budget, ModelLayout  # noqa: E402
from qpruner.plan import PrecisionPlan  # noqa: E402
from qpruner.trial import TrialContext, _build_quantized, run_trial  # noqa: E402

MODELS = {"smollm2": "builtin:smollm2-135m", "tiny": "tiny"}
MIXED_BITS = 6.5  # between all-nf4 and all-int8 (4.15 and 8.05 bits on the demo's model): a real nf4/int8 mix


def synthetic_task(splits, tokenizer, n: int = 40):
    """Pick the true continuation of a text window among it and three windows from elsewhere."""
    stream = splits.eval.reshape(-1).tolist()
    items = []
    for i in range(n):
        start = (i * 97) % max(1, len(stream) - 64)
        ctx = tokenizer.decode(stream[start:start + 32])
        true = tokenizer.decode(stream[start + 32:start + 48])
        others = [tokenizer.decode(stream[(start + 500 * k) % (len(stream) - 16):][:16]) for k in (1, 2, 3)]
        items.append(tasks.MCItem((ctx,) * 4, tuple(" " + c.strip() for c in [true] + others), 0))
    return tasks.tokenize_task("synthetic", items, tokenizer, 256)


def run(model_name: str, steps: int) -> dict:
    job = build_job({"model": {"source": MODELS[model_name]},
                     "data": {"seq_len": 128, "calib_samples": 8, "eval_samples": 16},
                     "prune": {"ratio": 0.2, "importance": "param_second"}})
    loaded = models.load_model(job.model)
    splits = data.load_splits(job.data, loaded.tokenizer)
    model = loaded.model
    pruned = prune.prune_(model, splits.calib, job.prune).removed_parts()
    layout = ModelLayout.from_model(model)
    n = layout.n_layers
    scores = unit_importance.score_units(model, splits.calib, ScoreConfig())  # the product's default estimator
    memory = policy.PlanMemory(layout, QuantConfig(), "float32")
    costs = policy.unit_costs(memory, "layer", ["nf4", "int8", "bf16"], Budget(avg_bits=MIXED_BITS))
    mixed = PrecisionPlan(tuple(("nf4", "int8", "bf16")[i] for i in policy.best_guess(scores, costs, [4, 8, 16])))
    config_dict, state = models.model_state(model)
    ft = FinetuneConfig(steps=steps, batch_size=4, lr=3e-4, eval_every=max(1, steps // 2))
    base_ctx = TrialContext(config_dict, state, layout, splits.train, splits.eval, QuantConfig(), ft,
                            EvalConfig(before_finetune=True), Budget(), metric="perplexity")

    curves = []
    for label, plan in (("uniform nf4", PrecisionPlan.uniform("nf4", n)), (f"mixed (best guess, {MIXED_BITS} bits)", mixed)):
        variants = {"plain": dict(init="plain"), f"loftq ({ft.loftq_iters} iterations, default)": dict(init="loftq"),
                    "loftq, all formats, unbalanced": dict(init="loftq", loftq_balance=False,
                                                           loftq_formats=("nf4", "fp4", "int8", "bf16"))}
        for init, change in variants.items():
            ctx = replace(base_ctx, finetune=replace(ft, **change))
            reports = []
            t = time.perf_counter()
            r = run_trial(ctx, plan, "cpu", on_report=reports.append)
            curve = {0: r.perplexity_before, **{x["step"]: x["perplexity"] for x in reports}, r.train_steps: r.perplexity}
            curves.append({"plan": label, "code": plan.code(), "avg_bits": round(r.avg_bits, 3), "init": init,
                           "perplexity": {str(k): round(v, 3) for k, v in sorted(curve.items())},
                           "seconds": round(time.perf_counter() - t, 1)})
            print(curves[-1], flush=True)

    task = synthetic_task(splits, loaded.tokenizer)
    throughput = []
    for fmt in ("nf4", "int8", "bf16"):
        ctx = replace(base_ctx, finetune=replace(ft, init="plain"))
        qmodel, _ = _build_quantized(ctx, PrecisionPlan.uniform(fmt, n), torch.device("cpu"))
        tok_s, item_s = [], []
        for _ in range(3):
            ev = evaluate(qmodel, splits.eval, batch_size=8)
            tok_s.append(ev.tokens_per_second)
            mc = tasks.score(qmodel, task, batch_size=8)
            item_s.append(mc.items / mc.seconds)
        throughput.append({"format": fmt, "eval_tokens_per_s": round(statistics.median(tok_s), 1),
                           "mc_items_per_s": round(statistics.median(item_s), 2), "mc_choices": 4,
                           "synthetic_mc_acc": round(mc.acc, 3)})
        print(throughput[-1], flush=True)
    return {"model": loaded.name, "pruned": "group ratio 0.2" + pruned, "steps": steps, "batch": ft.batch_size, "lr": ft.lr,
            "curves": curves,
            "throughput": throughput, "eval_tokens": int(splits.eval[:, 1:].numel()),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "commit": commit_label()}


def to_markdown(r: dict) -> str:
    steps = sorted({int(k) for c in r["curves"] for k in c["perplexity"]})
    out = [f"# Trial fidelity benchmark: {r['model']} (pruned as the demo: {r.get('pruned', 'group ratio 0.2')})", "",
           f"Held-out perplexity ({r['eval_tokens']} tokens) after k LoRA steps (batch {r['batch']} x 128, lr {r['lr']}), "
           f"quantized model with adapters. {r['machine']}, {r['date']}. One seed per row: for the paired, "
           "multi-seed comparison of the initialisations see `loftq.md`.", "", f"Command: `{r['command']}` at commit `{r['commit']}`", "",
           "| plan | avg bits | init | " + " | ".join(f"k={k}" for k in steps) + " | seconds |",
           "|---|---:|---|" + "---:|" * len(steps) + "---:|"]
    for c in r["curves"]:
        out.append(f"| {c['plan']} | {c['avg_bits']} | {c['init']} | "
                   + " | ".join(str(c["perplexity"].get(str(k), "")) for k in steps) + f" | {c['seconds']} |")
    out += ["", "## Evaluation throughput (median of 3)", "",
            "| format | strided perplexity, tokens/s | multiple choice (4 choices), items/s |", "|---|---:|---:|"]
    out += [f"| {t['format']} | {t['eval_tokens_per_s']} | {t['mc_items_per_s']} |" for t in r["throughput"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    res = run(args.model, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trial.json").write_text(json.dumps(res, indent=2))
    (args.out / "trial.md").write_text(to_markdown(res))
    print(f"wrote {args.out / 'trial.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
