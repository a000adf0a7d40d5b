"""What the GGUF serving format costs, measured on the demo's real model: NLL and size of ``--format gguf`` per
4-bit GGUF type, next to the trial's (bitsandbytes nf4/int8 + LoRA), and what llama.cpp itself computes.

A short run of the demo's job (``tune_jobs/smollm2_demo.yaml``, SmolLM2-135M pruned 20%, ``--trials`` trained
trials; resumable) in ``results/gguf_bench/``; every point of its front is exported and written as GGUF with
each of ``--types``. Per point and type, on the trial's own held-out tokens (the demo's evaluation windows):

* ``trial_nll`` the trial's recorded NLL; ``reload_nll`` the export reloaded by ``qpruner.load`` (must be equal);
* ``<type>`` from the run's full-precision pruned weights + the trained LoRA change (quantized once, the default
  where the run is at hand), ``<type>-merged`` from the export's quantized base with the LoRA merged (quantized
  twice: nf4, then the GGUF type);
* ``gguf_nll`` the GGUF file read back with the ``gguf`` library (``qpruner.gguf_export.read_model``) and
  evaluated by the same code, with the standard error of its paired per-window difference from the reload;
* ``llama_cpp_nll`` (with ``--llama-cpp-python PY``: a Python that has ``llama_cpp``, e.g. a venv where
  ``pip install llama-cpp-python`` built llama.cpp) the same windows evaluated by llama.cpp on the GGUF file
  (its CPU kernels quantize activations to 8 bits for quantized weights: a small difference is expected),
  with its paired SE against ``gguf_nll``;
* ``bytes`` of the GGUF file against the plan's ``weight_bytes``.

    python bench/gguf_bench.py [--trials 4] [--types q4_0,q4_0-merged,q5_0,q8_0] [--llama-cpp-python PY]

-> ``results/bench/gguf.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

RUN_NAME = "gguf_bench"
OUT = ROOT / "results" / "bench" / "gguf"
logger = logging.getLogger("gguf_bench")

LLAMA_CPP_SCRIPT = r'''
import json, sys
import numpy as np
from llama_cpp import Llama
spec = json.load(open(sys.argv[1]))
llm = Llama(model_path=spec["gguf"], n_ctx=spec["context"], logits_all=True, n_threads=2, n_batch=spec["context"],
            verbose=False)
stream = spec["stream"]
out = []
for begin, end, scored in spec["spans"]:
    tokens = stream[begin:end]
    llm.reset()
    llm.eval(tokens)
    logits = np.array(llm.scores[:len(tokens) - 1], dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = np.array(tokens[1:])
    nll = -logp[np.arange(len(target)), target]
    out.append(float(nll[len(target) - scored:].sum()))
json.dump({"window_nll": out, "version": __import__("llama_cpp").__version__}, open(sys.argv[2], "w"))
'''


def run_search(trials: int) -> Path:
    from qpruner.config import load_job
    from qpruner.job import run_job
    job = load_job(ROOT / "tune_jobs" / "smollm2_demo.yaml", [f"name={RUN_NAME}", f"search.num_trials={trials}"])
    run = ROOT / "results" / RUN_NAME
    if (run / "pareto.parquet").is_file():
        import pandas as pd
        done = pd.read_parquet(run / "trials.parquet")
        if int(done["status"].isin(["ok"]).sum()) >= trials:
            return run
    run_job(job)
    return run


def llama_cpp_windows(python: str, gguf_path: Path, stream: list[int], spans, context: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, result, script = Path(tmp) / "spec.json", Path(tmp) / "out.json", Path(tmp) / "eval.py"
        spec.write_text(json.dumps({"gguf": str(gguf_path), "stream": stream, "spans": spans, "context": context}))
        script.write_text(LLAMA_CPP_SCRIPT)
        subprocess.run([python, str(script), str(spec), str(result)], check=True, timeout=3600)
        return json.loads(result.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--types", default="q4_0,q4_0-merged,q5_0,q8_0",
                        help="GGUF 4-bit types; <type>-merged: from the export's merged quantized weights")
    parser.add_argument("--points", default="0,-1", help="front points (default the smallest and the largest)")
    parser.add_argument("--llama-cpp-types", default="q4_0", help="types also evaluated by llama.cpp")
    parser.add_argument("--llama-cpp-python", default=None, help="a Python interpreter with llama_cpp installed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import qpruner
    from qpruner.data import load_splits
    from qpruner.evaluate import evaluate, windows
    from qpruner.export import evaluation_config, export_point, read_plan
    from qpruner.gguf_export import export_gguf, read_model
    from qpruner.results import paired_diff
    from qpruner.rundir import RunDir

    started = stamp()   # the code that ran: stamped before it runs
    run = run_search(args.trials)
    front = RunDir(run).front()
    rows = []
    points = sorted({int(p) % len(front) for p in args.points.split(",") if p})
    for k in points:
        out = run / "exports" / f"point{k}"
        export_point(run, k, out)
        model, tokenizer = qpruner.load(out)
        data_cfg, eval_cfg = evaluation_config(out)
        ids = load_splits(data_cfg, tokenizer).eval
        ev_args = (eval_cfg.batch_size, "cpu", eval_cfg.context, eval_cfg.stride)
        reload = evaluate(model, ids, *ev_args)
        del model
        record = read_plan(out)
        stream = ids.reshape(-1).tolist()
        context = eval_cfg.context or ids.shape[-1]
        spans = windows(len(stream), context, min(eval_cfg.stride or context, context))
        for qtype in [t for t in args.types.split(",") if t]:
            entry = (record.get("gguf") or {}).get(qtype)
            if entry is None:
                four_bit, merged = qtype.removesuffix("-merged"), qtype.endswith("-merged")
                _, entry = export_gguf(out, four_bit, results=run, source="merged" if merged else "pruned")
                record = read_plan(out)
            gguf_path = out / entry["file"]
            ev = evaluate(read_model(gguf_path), ids, *ev_args)
            diff, diff_se = paired_diff(ev.window_nll, reload.window_nll, reload.window_tokens)
            row = {"point": k, "trial_id": record["trial"]["trial_id"], "plan": record["plan"]["formats"],
                   "type": qtype, "architecture": entry["architecture"], "tensor_types": entry["tensor_types"],
                   "fallbacks": len(entry["fallbacks"]), "bytes": entry["bytes"],
                   "weight_bytes": record["trial"].get("weight_bytes"), "trial_nll": record["trial"].get("nll"),
                   "reload_nll": reload.nll, "gguf_nll": ev.nll, "gguf_minus_trial": diff, "gguf_minus_trial_se": diff_se,
                   "tokens": reload.tokens}
            row["weights_from"] = entry.get("weights_from")
            if args.llama_cpp_python and qtype in args.llama_cpp_types.split(","):
                got = llama_cpp_windows(args.llama_cpp_python, gguf_path, stream, spans, context)
                n = sum(reload.window_tokens)
                row["llama_cpp_nll"] = sum(got["window_nll"]) / n
                row["llama_cpp_minus_gguf"], row["llama_cpp_minus_gguf_se"] = paired_diff(
                    got["window_nll"], ev.window_nll, reload.window_tokens)
                row["llama_cpp_version"] = got["version"]
            rows.append(row)
            logger.info("point %d %s: %s", k, qtype, {k2: v for k2, v in row.items() if "nll" in k2 or k2 == "bytes"})
    result = {"stamp": started, "source": f"results/{RUN_NAME} (tune_jobs/smollm2_demo.yaml, {args.trials} trials)",
              "what": "NLL of the GGUF export's own weights (read back with the gguf library; with llama.cpp where "
                      "given) against the trial's, on the trial's held-out tokens; SE over evaluation windows",
              "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["# GGUF export: what the serving format costs (SmolLM2-135M demo, pruned 20%)", "",
             f"`{result['stamp']['command']}` at {result['stamp']['commit'][:10]}, {result['stamp']['date']}, "
             f"{result['stamp']['machine']}.", "", result["what"] + ".", "",
             "| point | plan (nf4/int8/bf16 layers) | GGUF 4-bit type | arch | file MB (plan's weight MB) | trial NLL "
             "| GGUF NLL | GGUF - trial (SE) | llama.cpp NLL | llama.cpp - GGUF (SE) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        counts = "/".join(str(sum(1 for f in r["plan"] if f == x)) for x in ("nf4", "int8", "bf16"))
        lc = (f"{r['llama_cpp_nll']:.4f} | {r['llama_cpp_minus_gguf']:+.4f} ({r['llama_cpp_minus_gguf_se']:.4f})"
              if "llama_cpp_nll" in r else "n/a | n/a")
        lines.append(f"| {r['point']} | {counts} | {r['type']} | {r['architecture']} | {r['bytes'] / 1e6:.1f} "
                     f"({(r['weight_bytes'] or 0) / 1e6:.1f}) | {r['trial_nll']:.4f} | {r['gguf_nll']:.4f} | "
                     f"{r['gguf_minus_trial']:+.4f} ({r['gguf_minus_trial_se']:.4f}) | {lc} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
