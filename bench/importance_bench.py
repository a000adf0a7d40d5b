"""Layer-importance benchmark on the pruned SmolLM2 of the demo.

1. Rank correlation (Spearman) of every estimator's per-layer scores with the measured per-layer
   quantization sensitivity (KL of the model's predictions when only that layer is nf4).
2. Held-out perplexity right after quantization (no fine-tuning) of the deterministic best-guess
   plan each estimator proposes, against uniform nf4 / int8 and random plans of the same budget:
   (a) bits {4, 8} at 6.0 average bits; (b) bits {4, 16} at the memory of uniform int8.
3. Fine-tuning peak memory: the estimate of qpruner.finetune_memory against the measured peak,
   for uniform nf4, uniform int8 and a mixed plan (CPU: RSS-based; CUDA: allocator peak).

    python bench/importance_bench.py                       # writes results/bench/importance.{md,json}
    python bench/importance_bench.py --model tiny --out /tmp/b   # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from provenance import commit_label  # noqa: E402
from stats import spearman  # noqa: E402

from qpruner import data, finetune_memory, models, policy, prune, unit_importance  # noqa: E402
from qpruner.config import FinetuneConfig, QuantConfig, ScoreConfig, build_job  # noqa: E402
from qpruner.evaluate import evaluate  # noqa: E402
from qpruner.finetune import attach_lora, finetune_  # noqa: E402
from qpruner.memory import Budget, ModelLayout, adapter_bytes, measure_bytes  # noqa: E402
from qpruner.plan import PrecisionPlan  # noqa: E402
from qpruner.quantize import quantize_  # noqa: E402

MODELS = {"smollm2": "builtin:smollm2-135m", "tiny": "tiny"}
ESTIMATORS = ["fisher", "taylor", "block_influence", "mutual_information", "sensitivity"]


def quantized_ppl(base, plan, quant, splits) -> float:
    model = copy.deepcopy(base)
    quantize_(model, plan, quant, "cpu")
    return evaluate(model, splits.eval, batch_size=8).perplexity


def finetune_peak(base, plan, quant, ft, splits, layout, seq_len) -> dict:
    model = copy.deepcopy(base)
    quantize_(model, plan, quant, "cpu")
    model = attach_lora(model, ft)
    resident = measure_bytes(model).total_bytes + adapter_bytes(model)
    with finetune_memory.measure_peak(torch.device("cpu"), resident) as peak:
        finetune_(model, splits.train, ft, "cpu")
    est = finetune_memory.estimate(layout, plan, quant, ft, seq_len)
    return {"plan": plan.code(), "estimate": est.total, "estimate_parts": est.__dict__, "measured": peak.peak_bytes,
            "measured_kind": peak.kind, "ratio": round(est.total / peak.peak_bytes, 3) if peak.peak_bytes else None}


def run(model_name: str, random_plans: int) -> dict:
    job = build_job({"model": {"source": MODELS[model_name]},
                     "data": {"seq_len": 128, "calib_samples": 8, "eval_samples": 16},
                     "prune": {"ratio": 0.2, "importance": "param_second"}})
    loaded = models.load_model(job.model)
    splits = data.load_splits(job.data, loaded.tokenizer)
    base = loaded.model
    pruned = prune.prune_(base, splits.calib, job.prune).removed_parts()
    layout = ModelLayout.from_model(base)
    quant = QuantConfig()
    memory = policy.PlanMemory(layout, quant, "float32")
    n = layout.n_layers

    scores, seconds = {}, {}
    for method in ESTIMATORS:
        t = time.perf_counter()
        scores[method] = unit_importance.score_units(base, splits.calib, ScoreConfig(method=method), "layer", quant)
        seconds[method] = round(time.perf_counter() - t, 2)
        print(f"scored {method:<20} {seconds[method]:6.1f}s  top layers {scores[method].ranking()[:5]}", flush=True)
    reference = scores["sensitivity"].scores
    correlation = {m: round(spearman(scores[m].scores, reference), 3) for m in ESTIMATORS}

    uniform = {f: quantized_ppl(base, PrecisionPlan.uniform(f, n), quant, splits) for f in ("nf4", "int8")}
    int8_memory = memory(PrecisionPlan.uniform("int8", n))
    settings = [("bits {4,8} at 6.0 avg bits", [4, 8], Budget(avg_bits=6.0)),
                ("bits {4,16} at uniform int8 memory", [4, 16], Budget(total_bytes=int8_memory.total_bytes))]
    plans = []
    rng = np.random.default_rng(0)
    for label, bits, budget in settings:
        formats = ["nf4" if b == 4 else "int8" if b == 8 else "bf16" for b in bits]
        costs = policy.unit_costs(memory, "layer", formats, budget)
        for method in ESTIMATORS:
            idx = policy.best_guess(scores[method], costs, bits)
            plan = PrecisionPlan(tuple(formats[i] for i in idx))
            mem = memory(plan)
            plans.append({"setting": label, "estimator": method, "plan": plan.code(), "avg_bits": round(mem.avg_bits, 3),
                          "weight_mb": round(mem.total_bytes / 1e6, 2),
                          "perplexity": round(quantized_ppl(base, plan, quant, splits), 3)})
            print(f"{label:<36} {method:<20} {plan.code()} ppl {plans[-1]['perplexity']}", flush=True)
        random_ppl = []
        for _ in range(random_plans):  # random importance scores -> the same greedy, the same budget
            fake = unit_importance.UnitScores("random", tuple(rng.random(n)))
            idx = policy.best_guess(fake, costs, bits)
            plan = PrecisionPlan(tuple(formats[i] for i in idx))
            random_ppl.append(quantized_ppl(base, plan, quant, splits))
        plans.append({"setting": label, "estimator": f"random scores (median of {random_plans})", "plan": "",
                      "avg_bits": None, "weight_mb": None, "perplexity": round(float(np.median(random_ppl)), 3)})

    ft = FinetuneConfig(steps=3, batch_size=4)
    mixed = PrecisionPlan(tuple(("nf4", "int8", "bf16")[i % 3] for i in range(n)))
    peaks = [finetune_peak(base, plan, quant, ft, splits, layout, job.data.seq_len)
             for plan in (PrecisionPlan.uniform("nf4", n), PrecisionPlan.uniform("int8", n), mixed)]
    return {"model": loaded.name, "pruned": "group ratio 0.2" + pruned, "layers": n, "calibration": list(splits.calib.shape),
            "eval_tokens": int(splits.eval[:, 1:].numel()), "score_seconds": seconds, "spearman_vs_sensitivity": correlation,
            "scores": {m: list(scores[m].scores) for m in ESTIMATORS},
            "uniform": {f: {"perplexity": round(p, 3), "avg_bits": round(memory(PrecisionPlan.uniform(f, n)).avg_bits, 3),
                            "weight_mb": round(memory(PrecisionPlan.uniform(f, n)).total_bytes / 1e6, 2)}
                        for f, p in uniform.items()},
            "plans": plans, "finetune_memory": peaks,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "date": time.strftime("%Y-%m-%d"),
            "command": "python " + " ".join(sys.argv), "commit": commit_label()}


def to_markdown(r: dict) -> str:
    out = [f"# Layer importance benchmark: {r['model']} "
           f"(pruned as the demo: {r.get('pruned', 'group ratio 0.2')}, {r['layers']} layers)", "",
           f"Calibration {r['calibration'][0]} x {r['calibration'][1]} tokens; perplexity on {r['eval_tokens']} held-out "
           f"tokens right after quantization (no fine-tuning). {r['machine']}, {r['date']}.", "",
           f"Command: `{r['command']}` at commit `{r['commit']}`", "", "## Rank correlation with measured sensitivity", "",
           "| estimator | Spearman vs sensitivity | scoring time (s) |", "|---|---:|---:|"]
    out += [f"| {m} | {c} | {r['score_seconds'][m]} |" for m, c in r["spearman_vs_sensitivity"].items()]
    out += ["", "## Proposed plans (greedy best guess) vs uniform and random", "",
            f"Uniform nf4: ppl {r['uniform']['nf4']['perplexity']} at {r['uniform']['nf4']['avg_bits']} avg bits "
            f"({r['uniform']['nf4']['weight_mb']} MB); uniform int8: ppl {r['uniform']['int8']['perplexity']} at "
            f"{r['uniform']['int8']['avg_bits']} avg bits ({r['uniform']['int8']['weight_mb']} MB).", "",
            "| setting | estimator | avg bits | weights MB | perplexity | plan |", "|---|---|---:|---:|---:|---|"]
    out += [f"| {p['setting']} | {p['estimator']} | {p['avg_bits'] or ''} | {p['weight_mb'] or ''} | {p['perplexity']} | "
            f"`{p['plan']}` |" for p in r["plans"]]
    out += ["", "## Fine-tuning peak memory: estimate vs measured", "",
            "On a CPU the measurement is the growth of the process's resident set, which allocator reuse inside one "
            "process makes unreliable (plans measured later can look smaller); the CUDA allocator numbers in "
            "finetune_memory_cuda_*.md are the ones to trust.", "",
            "| plan | estimate MB | measured MB | kind | estimate / measured |", "|---|---:|---:|---|---:|"]
    out += [f"| `{p['plan']}` | {p['estimate'] / 1e6:.1f} | {(p['measured'] or 0) / 1e6:.1f} | {p['measured_kind']} | "
            f"{p['ratio']} |" for p in r["finetune_memory"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--random-plans", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    res = run(args.model, args.random_plans)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "importance.json").write_text(json.dumps(res, indent=2))
    (args.out / "importance.md").write_text(to_markdown(res))
    print(f"wrote {args.out / 'importance.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
