"""Export benchmark: size on disk and load time of an exported front point, the quantized layout vs the old one.

Takes a finished search (default: the 1.1B all-nf4 run of ``bench/scale_bench.py``, a random-weight
TinyLlama-shaped model: time and size only, its perplexity means nothing) and exports its front point 0. Then,
on the trial's evaluation windows (same tokens):

* ``quantized``: ``qpruner.load`` of the export (``quantized.safetensors``: no LoftQ, no quantization);
* ``rebuilt`` (the layout before issue #28): the full-precision pruned model read in float32, quantized to the
  plan with LoftQ recomputed (no cache), and the same adapter attached, as ``qpruner.load`` did.

Recorded: the export's weight-file bytes against the trial's ``weight_bytes``, the seconds to load each way,
and each way's NLL against the trial's recorded NLL.

    python bench/export_bench.py                              # writes results/bench/export.{json,md}
    python bench/export_bench.py --results /work/scale/results_1.1b_warm/scale_1_1b --out /tmp/export-bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import setup, stamp  # noqa: E402

setup()


def _nll(model, directory: Path) -> float:
    from qpruner import data
    from qpruner.evaluate import evaluate
    from qpruner.export import evaluation_config
    from transformers import AutoTokenizer
    data_cfg, eval_cfg = evaluation_config(directory)
    splits = data.load_splits(data_cfg, AutoTokenizer.from_pretrained(str(directory)))
    return evaluate(model, splits.eval, eval_cfg.batch_size, "cpu", eval_cfg.context, eval_cfg.stride).nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="/work/scale/results_1.1b_warm/scale_1_1b")
    parser.add_argument("--work", default="/work/scale/export_bench")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = parser.parse_args()
    import pandas as pd
    import torch

    import qpruner
    from qpruner.config import FinetuneConfig, QuantConfig, build_section
    from qpruner.export import export_point, read_plan
    from qpruner.plan import PrecisionPlan
    from qpruner.pruned_model import load_pruned
    from qpruner.build import quantized_with_lora
    torch.set_num_threads(2)
    results, work = Path(args.results), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    row = pd.read_parquet(results / "pareto.parquet").iloc[0]
    target = work / f"point0-{row['trial_id']}"
    t = time.perf_counter()
    out = export_point(results, 0, target)
    export_s = time.perf_counter() - t
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    weights = files.get("quantized.safetensors", 0)

    t = time.perf_counter()
    model, _ = qpruner.load(out, "cpu")
    load_quantized_s = time.perf_counter() - t
    nll_quantized = _nll(model, out)
    del model

    meta = read_plan(out)
    pruned = results / "pruned"
    t = time.perf_counter()
    fp, _ = load_pruned(pruned, dtype=torch.float32)
    rebuilt, _ = quantized_with_lora(fp, PrecisionPlan.from_dict(meta["plan"]),
                                     build_section(QuantConfig, meta["quant"], "quant"),
                                     build_section(FinetuneConfig, meta["finetune"], "finetune"), torch.device("cpu"),
                                     adapter_dir=str(out / "adapter"))
    load_rebuilt_s = time.perf_counter() - t
    nll_rebuilt = _nll(rebuilt, out)
    fp_bytes = sum(p.stat().st_size for p in pruned.glob("model*.safetensors"))

    result = {
        "stamp": stamp(), "proxy": "random-weight model: size and time only (its NLL is not a quality)",
        "results": str(results), "trial_id": str(row["trial_id"]), "plan": str(row["plan_code"]),
        "weight_bytes": int(row["weight_bytes"]), "quantized_file_bytes": weights,
        "old_layout_weight_file_bytes (pruned model.safetensors)": fp_bytes,
        "export_s": export_s, "load_quantized_s": load_quantized_s, "load_rebuilt_s": load_rebuilt_s,
        "nll_trial": float(row["nll"]), "nll_quantized": nll_quantized, "nll_rebuilt": nll_rebuilt,
        "targets": {"file <= 1.15 x weight_bytes": weights <= 1.15 * row["weight_bytes"],
                    "load <= 10% of the rebuilt load": load_quantized_s <= 0.1 * load_rebuilt_s,
                    "NLL within 1e-4 of the trial": abs(nll_quantized - float(row["nll"])) <= 1e-4},
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "export.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    st = result["stamp"]
    lines = ["# Export benchmark (`bench/export_bench.py`)", "",
             f"commit {st['commit']}{' (dirty)' if st['dirty'] else ''}, `{st['command']}`, {st['machine']}, "
             f"{st['date']}.", f"{result['proxy']}. Search: `{results}`, front point 0 (trial {result['trial_id']}, "
             f"plan `{result['plan']}`).", "",
             "| layout | weight file(s) MB | / weight_bytes | load s | NLL | NLL - trial's |", "|---|---|---|---|---|---|",
             f"| quantized (`quantized.safetensors`) | {weights / 1e6:.1f} | {weights / row['weight_bytes']:.3f} | "
             f"{load_quantized_s:.1f} | {nll_quantized:.6f} | {nll_quantized - row['nll']:+.2e} |",
             f"| rebuilt (before #28: fp32 pruned model, LoftQ at load) | {fp_bytes / 1e6:.1f} | "
             f"{fp_bytes / row['weight_bytes']:.3f} | {load_rebuilt_s:.1f} | {nll_rebuilt:.6f} | "
             f"{nll_rebuilt - row['nll']:+.2e} |", "",
             f"The trial's weights: {row['weight_bytes'] / 1e6:.1f} MB; its NLL {row['nll']:.6f}. Export took "
             f"{export_s:.1f} s (LoftQ from the run's cache). Load: {load_quantized_s / load_rebuilt_s:.1%} of the "
             "rebuilt load.", "", "Targets (issue #28): " + "; ".join(
                 f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items())]
    (dest / "export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
