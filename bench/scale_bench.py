"""Scale benchmark: a trial's memory and time at ~135M, 1.1B and 3B parameters, through the real `qpruner search`.

Per size, a randomly initialised LLaMA-shaped model (bf16, SmolLM2's tokenizer; random weights: memory and time
only, never quality) is saved as a local model directory and searched twice with the same job — pruned 20% (l2,
gradient-free), scored with block influence (gradient-free), bits {4, 8}, the all-nf4 plan only (searcher
``points``, one trial), 2 LoRA steps, 8 evaluation windows, one trial at a time on every core:

* ``cold``: a fresh run, LoftQ cache empty;
* ``warm``: the same job in a fresh results directory sharing ``search.storage_path`` with the cold run, so the
  published pruned model and its LoftQ cache are found there (the run prunes and scores again).

Recorded per run, from the run's own records (``trials.parquet``, ``driver.json``): parameters and bf16 bytes
before pruning, the all-nf4 plan's weight bytes and predicted fine-tuning peak (``peak_bytes_estimate``), the
trial worker's peak RSS (kernel high-water mark over the trial), the driver's peak RSS (over the whole job),
the bytes a trial fetches from Ray's object store (serialized size of its parameters) and seconds per stage.
The targets of issue #26 are evaluated per size at >= 1B parameters.

    python bench/scale_bench.py                         # writes results/bench/scale.{json,md}; resumable
    python bench/scale_bench.py --sizes 135m --work /tmp/scale --out /tmp/scale-out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import setup, stamp  # noqa: E402

setup()

SHAPES = {   # hidden, layers, heads, kv heads, FFN; vocabulary of SmolLM2's tokenizer, tied embeddings
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536),                          # SmolLM2-135M's shape
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632),                          # TinyLlama-1.1B's shape
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192),                            # Llama-3.2-3B's shape
}
GB = 1e9


def make_model(size: str, directory: Path) -> dict:
    """Save a random bf16 LLaMA of ``size``'s shape with SmolLM2's tokenizer (once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qpruner.models import SMOLLM2_GGUF, smollm2_folder
    info = directory / "scale_model.json"
    if info.is_file():
        return json.loads(info.read_text())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    shape = SHAPES[size]
    config = LlamaConfig(vocab_size=len(tokenizer), head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                         max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5, **shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    out = {"params": params, "bf16_bytes": 2 * params, "shape": shape}
    info.write_text(json.dumps(out))
    del model
    return out


def job_file(size: str, state: str, model_dir: Path, work: Path) -> Path:
    path = work / f"job_{size}_{state}.yaml"
    path.write_text(f"""# written by bench/scale_bench.py
name: scale_{size.replace('.', '_')}
device: cpu
model:
  source: {model_dir}
  dtype: bfloat16
data:
  source: builtin:pydoc
  seq_len: 128
  calib_samples: 8
  eval_samples: 8
prune:
  ratio: 0.2
  importance: l2
score:
  method: block_influence
policy:
  bits: [4, 8]
finetune:
  steps: 2
  batch_size: 1
search:
  num_trials: 1
  searcher: points
  max_concurrent: 1
  cpus_per_trial: {os.cpu_count()}
  num_cpus: {os.cpu_count()}
  storage_path: {work / f"storage_{size}"}
  metric: perplexity
  verbose: 0
""")
    return path


def run(size: str, state: str, model_dir: Path, work: Path) -> dict:
    """One `qpruner search` of the size's job; its measurements from the run's own records."""
    import pandas as pd
    results = work / f"results_{size}_{state}"
    if results.exists():   # the benchmark's own scratch directory (a rerun of an unfinished measurement)
        shutil.rmtree(results)
    job = job_file(size, state, model_dir, work)
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(job), f"results_dir={results}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_dir = next(p for p in results.iterdir() if p.is_dir())
    row = pd.read_parquet(run_dir / "trials.parquet").iloc[0].to_dict()
    driver = json.loads((run_dir / "driver.json").read_text())
    seconds = {k[len("seconds_"):]: float(v) for k, v in row.items()
               if k.startswith("seconds_") and v is not None and v == v}
    build = seconds.get("quantize", 0.0)
    stages = {"load": seconds.get("load", 0.0), "loftq": seconds.get("loftq", 0.0),
              "quantize": build - seconds.get("load", 0.0) - seconds.get("loftq", 0.0),
              "finetune": seconds.get("finetune", 0.0), "eval": seconds.get("eval", 0.0),
              "trial_total": seconds.get("total", 0.0), "job_wall": wall}
    return {"status": row["status"], "plan": row["plan_code"], "weight_bytes": int(row["weight_bytes"]),
            "ft_peak_estimate_bytes": int(row["peak_bytes_estimate"]),
            "trial_peak_rss_bytes": _int(row.get("worker_peak_rss_bytes")),
            "driver_peak_rss_bytes": _int(driver.get("driver_peak_rss_bytes")),
            "object_store_bytes_per_trial": _int(driver.get("object_store_bytes_per_trial")),
            "nll": float(row["nll"]), "objective": float(row["objective"]), "seconds": stages}


def _int(v):
    return None if v is None or v != v else int(v)


def targets(row: dict) -> dict:
    """Issue #26's targets for one size (>= 1B parameters)."""
    cold, warm = row["cold"], row.get("warm")
    out = {"trial_rss <= 1.5 x estimate + 1 GB": cold["trial_peak_rss_bytes"] <= 1.5 * cold["ft_peak_estimate_bytes"] + GB,
           "driver_rss <= 2 x bf16 + 1 GB": cold["driver_peak_rss_bytes"] <= 2 * row["bf16_bytes"] + GB,
           "object store <= 100 MB per trial": cold["object_store_bytes_per_trial"] <= 100e6}
    if warm:
        c = cold["seconds"]["loftq"] + cold["seconds"]["quantize"]
        w = warm["seconds"]["loftq"] + warm["seconds"]["quantize"]
        out["warm quantize+LoftQ <= 20% of cold"] = w <= 0.2 * c
        out["warm result identical"] = warm["nll"] == cold["nll"] and warm["objective"] == cold["objective"]
    return out


def seven_b() -> dict:
    """The 7B job in tune_jobs/ priced by the product's own models (computed, not measured): LLaMA-2-7B's shape on
    the meta device, pruned as the job asks (the per-layer ratio bisected so that 20% of all parameters go, as
    ``param_ratio`` solves it), every uniform plan's predicted fine-tuning peak and the driver's device need."""
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner import models, prune
    from qpruner.config import load_job
    from qpruner.finetune_memory import ADMISSION_MARGIN, estimate
    from qpruner.job import driver_memory_need
    from qpruner.memory import ModelLayout, plan_bytes
    from qpruner.plan import PrecisionPlan, format_for_bits
    job = load_job(ROOT / "tune_jobs" / "llama2_7b_20pct.yaml")
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    before, total = models.layer_widths(model), models.count_params(model)
    lo, hi = 0.0, 0.95
    for _ in range(40):
        mid = (lo + hi) / 2
        after = prune.narrowest_widths(before, dataclasses.replace(job.prune, param_ratio=None, ratio=mid))
        lo, hi = (mid, hi) if models.param_count(model, after) > (1 - job.prune.param_ratio) * total else (lo, mid)
    after = prune.narrowest_widths(before, dataclasses.replace(job.prune, param_ratio=None, ratio=hi))
    layout = ModelLayout.from_model(model).narrowed(before, after)
    plans = {}
    for bits in sorted(set(job.policy.bits) | {16}):
        plan = PrecisionPlan.uniform(format_for_bits(bits, job.quant.four_bit), layout.n_layers)
        peak = estimate(layout, plan, job.quant, job.finetune, job.data.seq_len, "bfloat16").total
        plans[f"all-{bits}"] = {"weight_bytes": plan_bytes(layout, plan, job.quant, "bfloat16").total_bytes,
                                "ft_peak_estimate_bytes": peak, "admitted_at_bytes": int(peak * ADMISSION_MARGIN)}
    return {"proxy": "computed by the product's estimators, not measured (no GPU in this session)",
            "job": "tune_jobs/llama2_7b_20pct.yaml", "params": total, "bf16_bytes": 2 * total,
            "pruned_params": models.param_count(model, after), "group_ratio": round(hi, 4),
            "driver_device_need_bytes": driver_memory_need(total, job), "plans": plans,
            "micro_batch_tokens": (job.finetune.micro_batch_size or job.finetune.batch_size) * job.data.seq_len}


def markdown(result: dict) -> str:
    s = result["stamp"]
    lines = ["# Scale benchmark (`bench/scale_bench.py`)\n",
             f"commit {s['commit']}{' (dirty)' if s['dirty'] else ''}, `{s['command']}`, {s['machine']}, {s['date']}.",
             "Random-weight LLaMA shapes (bf16): memory and time only, never quality. Pruned 20% (l2), all-nf4 plan, "
             "2 LoRA steps, 8 evaluation windows, one trial at a time on every core, through `qpruner search`. "
             "Object store: serialized size of what a trial fetches (its parameters; the weights go by location). "
             "Trial RSS: the worker's kernel high-water mark over the trial; driver RSS: over the whole job.\n",
             "| size | params | bf16 GB | nf4 weights GB | FT peak est. GB | trial peak RSS GB | driver peak RSS GB "
             "| object store MB/trial | load s | LoftQ s | quantize s | fine-tune s | eval s | trial s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for state in ("cold", "warm"):
            r = row.get(state)
            if not r:
                continue
            sec = r["seconds"]
            lines.append(f"| {row['size']} {state} | {row['params'] / 1e9:.3f} B | {row['bf16_bytes'] / GB:.2f} | "
                         f"{r['weight_bytes'] / GB:.3f} | {r['ft_peak_estimate_bytes'] / GB:.2f} | "
                         f"{(r['trial_peak_rss_bytes'] or 0) / GB:.2f} | {(r['driver_peak_rss_bytes'] or 0) / GB:.2f} | "
                         f"{(r['object_store_bytes_per_trial'] or 0) / 1e6:.2f} | {sec['load']:.1f} | {sec['loftq']:.1f} | "
                         f"{sec['quantize']:.1f} | {sec['finetune']:.1f} | {sec['eval']:.1f} | {sec['trial_total']:.1f} |")
    est = result.get("llama2_7b")
    if est:
        lines.append(f"\n## The 7B job, computed ({est['proxy']})\n")
        lines.append(f"`{est['job']}`: {est['params'] / 1e9:.2f} B parameters ({est['bf16_bytes'] / GB:.1f} GB bf16), pruned "
                     f"to {est['pruned_params'] / 1e9:.2f} B (group ratio {est['group_ratio']}); the driver needs "
                     f"{est['driver_device_need_bytes'] / GB:.1f} GB on its device (weights and gradients). Trials, "
                     f"{est['micro_batch_tokens']} tokens per micro-batch:\n")
        lines.append("| plan | weights GB | FT peak est. GB | admitted at GB (+15%) |\n|---|---|---|---|")
        for name, p in est["plans"].items():
            lines.append(f"| {name} | {p['weight_bytes'] / GB:.2f} | {p['ft_peak_estimate_bytes'] / GB:.2f} | "
                         f"{p['admitted_at_bytes'] / GB:.2f} |")
    lines.append("\n## Targets (issue #26, sizes >= 1B)\n")
    for row in result["rows"]:
        if row.get("targets"):
            lines.append(f"- **{row['size']}**: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}"
                                                              for k, v in row["targets"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="135m,1.1b,3b")
    ap.add_argument("--work", default="/tmp/qpruner-scale", help="models, jobs and runs (GBs; not committed)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--fresh", action="store_true", help="measure again what the output already holds")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scale.json"
    old = {} if args.fresh or not path.is_file() else {r["size"]: r for r in json.loads(path.read_text())["rows"]}
    rows = []
    for size in args.sizes.split(","):
        row = dict(old.get(size) or {"size": size})
        model_dir = work / f"model_{size}"
        model_dir.mkdir(exist_ok=True)
        row.update(make_model(size, model_dir))
        for state in ("cold", "warm"):
            if state not in row:
                if state == "cold" and (work / f"storage_{size}").exists():   # a cold run starts with no cache
                    shutil.rmtree(work / f"storage_{size}")
                print(f"[scale] {size} {state} ...", flush=True)
                row[state] = run(size, state, model_dir, work)
                print(f"[scale] {size} {state}: {json.dumps(row[state])}", flush=True)
                row["targets"] = targets(row) if row["params"] >= 1e9 else {}
                _save(path, rows + [row] + [r for s, r in old.items() if s not in {x["size"] for x in rows + [row]}])
        # the keys at the top of each row are the cold run's
        row.update({k: row["cold"][k] for k in ("ft_peak_estimate_bytes", "trial_peak_rss_bytes",
                                                 "driver_peak_rss_bytes", "object_store_bytes_per_trial", "seconds")})
        row["targets"] = targets(row) if row["params"] >= 1e9 else {}
        rows.append(row)
        _save(path, rows + [r for s, r in old.items() if s not in {x["size"] for x in rows}])
    print(markdown(json.loads(path.read_text())))


def _save(path: Path, rows: list) -> None:
    result = {"stamp": stamp(), "proxy": "random-weight models: memory and time only", "rows": rows,
              "llama2_7b": seven_b()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
