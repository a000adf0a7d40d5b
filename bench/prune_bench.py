"""Pruning benchmark: every importance estimator at 20% and 50% of parameters removed.

For each (target, estimator): parameters after pruning, pruning wall time (gradients + scoring +
surgery), and held-out perplexity *without* any recovery fine-tuning. Calibration follows
LLM-Pruner's default (10 samples of 64 tokens); block scope, local ranking, first and last layers
kept. A few extra rows show the other scopes and global ranking with the default estimator.

    python bench/prune_bench.py                      # SmolLM2-135M, writes results/bench/prune.{md,json}
    python bench/prune_bench.py --model tiny --out /tmp/b   # seconds; what the tests run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from provenance import commit_label  # noqa: E402

from qpruner import data, models, prune  # noqa: E402
from qpruner.config import build_job  # noqa: E402
from qpruner.evaluate import evaluate  # noqa: E402
from qpruner.group_importance import ESTIMATORS  # noqa: E402

MODELS = {"smollm2": "builtin:smollm2-135m", "tiny": "tiny"}


def run(model_name: str, targets: list[float], estimators: list[str], eval_samples: int) -> dict:
    job = build_job({"model": {"source": MODELS[model_name]},
                     "data": {"seq_len": 128, "calib_samples": 10, "calib_seq_len": 64,
                              "eval_samples": eval_samples}})
    loaded = models.load_model(job.model)
    splits = data.load_splits(job.data, loaded.tokenizer)
    base = loaded.model
    params0 = models.count_params(base)
    ppl0 = evaluate(base, splits.eval, batch_size=8).perplexity
    rows = []

    def one(target, cfg, label):
        model = copy.deepcopy(base)
        t = time.perf_counter()
        report = prune.prune_(model, splits.calib, replace(cfg, param_ratio=target), seed=0)
        seconds = time.perf_counter() - t
        ppl = evaluate(model, splits.eval, batch_size=8).perplexity
        rows.append({"target": target, "setting": label, "importance": cfg.importance, "scope": cfg.scope,
                     "ranking": cfg.ranking, "params": report.params_after,
                     "removed": round(report.removed_fraction, 4), "seconds": round(seconds, 2),
                     "perplexity": round(ppl, 3)})
        print(f"{target:.0%} {label:<28} params {report.params_after:>12,} ({report.removed_fraction:.1%}) "
              f"{seconds:6.1f}s  ppl {ppl:10.2f}", flush=True)
        del model

    block = job.prune
    for target in targets:
        for est in estimators:
            one(target, replace(block, importance=est), est)
        one(target, replace(block, ranking="global"), "taylor, global ranking")
        one(target, replace(block, scope="channel"), "taylor, channel scope")
        one(target, replace(block, scope="layer"), "taylor, layer scope")
    return {"model": loaded.name, "params_unpruned": params0, "perplexity_unpruned": round(ppl0, 3),
            "calibration": list(splits.calib.shape), "eval_tokens": int(splits.eval[:, 1:].numel()),
            "rows": rows, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv), "commit": commit_label()}


def to_markdown(res: dict) -> str:
    lines = [f"# Pruning benchmark: {res['model']}", "",
             f"Unpruned: {res['params_unpruned']:,} parameters, held-out perplexity {res['perplexity_unpruned']} "
             f"({res['eval_tokens']} tokens). Calibration {res['calibration'][0]} x {res['calibration'][1]} "
             f"tokens. No recovery fine-tuning. {res['machine']}, {res['date']}.", "",
             f"Command: `{res['command']}` at commit `{res['commit']}`", "",
             "| target | setting | parameters | removed | time (s) | perplexity |",
             "|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['target']:.0%} | {r['setting']} | {r['params']:,} | {r['removed']:.1%} | "
                     f"{r['seconds']} | {r['perplexity']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    res = run(args.model, args.targets, args.estimators, args.eval_samples)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune.json").write_text(json.dumps(res, indent=2))
    (args.out / "prune.md").write_text(to_markdown(res))
    print(f"wrote {args.out / 'prune.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
