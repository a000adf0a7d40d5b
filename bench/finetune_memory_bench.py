"""Fine-tuning peak memory: qpruner.finetune_memory's estimate against the measured peak.

Weights do not matter for memory, so the model is a randomly initialised Llama with SmolLM2-135M's
shape (or LLaMA-7B's layer shape with fewer layers), quantized to several plans; each runs a few LoRA
steps at several batch sizes. On CUDA the measurement is the allocator's peak; on CPU the RSS growth.

    python bench/finetune_memory_bench.py --device cuda        # writes results/bench/finetune_memory_<device>.{md,json}
    python bench/finetune_memory_bench.py --shape tiny --device cpu --out /tmp/b
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from provenance import commit_label  # noqa: E402

from qpruner import finetune_memory, models  # noqa: E402
from qpruner.config import FinetuneConfig, QuantConfig  # noqa: E402
from qpruner.finetune import attach_lora, finetune_  # noqa: E402
from qpruner.memory import ModelLayout, adapter_bytes, measure_bytes  # noqa: E402
from qpruner.plan import PrecisionPlan  # noqa: E402
from qpruner.quantize import quantize_, resolve_compute_dtype  # noqa: E402

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "llama7b-4layers": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                            num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False),
    "tiny": None,
}


def build(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    if SHAPES[shape] is None:
        return models.tiny_model()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).eval()


def run(shape: str, device: str, batches: list[int], seq_len: int, steps: int) -> dict:
    dev = torch.device(device)
    quant = QuantConfig()
    compute = str(resolve_compute_dtype(quant, dev)).removeprefix("torch.")
    rows = []
    base = build(shape)
    n = base.config.num_hidden_layers
    plans = [PrecisionPlan.uniform("nf4", n), PrecisionPlan.uniform("int8", n), PrecisionPlan.uniform("bf16", n),
             PrecisionPlan(tuple(("nf4", "int8", "bf16")[i % 3] for i in range(n)))]
    for plan in plans:
        for batch in batches:
            model = copy.deepcopy(base)
            layout = ModelLayout.from_model(model)
            quantize_(model, plan, quant, dev)
            ft = FinetuneConfig(steps=steps, batch_size=batch)
            model = attach_lora(model, ft)
            vocab = layout.vocab
            train = torch.randint(0, vocab, (max(batch * steps, batch), seq_len))
            resident = measure_bytes(model).total_bytes + adapter_bytes(model)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            with finetune_memory.measure_peak(dev, resident) as peak:
                finetune_(model, train, ft, dev)
            est = finetune_memory.estimate(layout, plan, quant, ft, seq_len, compute)
            rows.append({"plan": plan.code()[:12] + ("..." if n > 12 else ""), "batch": batch, "seq_len": seq_len,
                         "estimate": est.total, "weights": est.weights, "activations": est.activations,
                         "measured": peak.peak_bytes, "kind": peak.kind,
                         "ratio": round(est.total / peak.peak_bytes, 3) if peak.peak_bytes else None})
            print(rows[-1], flush=True)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine()
    return {"shape": shape, "device": name, "compute_dtype": compute, "rows": rows, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "commit": commit_label()}


def to_markdown(r: dict) -> str:
    out = [f"# Fine-tuning peak memory, estimate vs measured ({r['shape']} shape, {r['device']}, "
           f"{r['compute_dtype']} compute)", "", f"torch {r['torch']}, {r['date']}. Command: `{r['command']}`", "",
           "| plan | batch x seq | estimate MB | of which weights | of which activations | measured MB | kind | estimate/measured |",
           "|---|---|---:|---:|---:|---:|---|---:|"]
    for x in r["rows"]:
        out.append(f"| `{x['plan']}` | {x['batch']} x {x['seq_len']} | {x['estimate'] / 1e6:.1f} | {x['weights'] / 1e6:.1f} | "
                   f"{x['activations'] / 1e6:.1f} | {(x['measured'] or 0) / 1e6:.1f} | {x['kind']} | {x['ratio']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    res = run(args.shape, args.device, args.batches, args.seq_len, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"finetune_memory_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{stem}.md").write_text(to_markdown(res))
    print(f"wrote {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
