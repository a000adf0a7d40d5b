"""The GGUF writer and reader at 1.1B parameters: time and peak host memory (a random-weight TinyLlama-shaped
model, 22 layers, hidden 2048, 32 heads / 4 KV heads, FFN 5632, SmolLM2's vocabulary; bf16; its quality means
nothing). Every linear is written as Q4_0 (the nf4 layers' GGUF type), as ``--format gguf`` writes an all-nf4
point; then read back by ``qpruner.gguf_export.read_model`` in bf16 and, with ``--llama-cpp-python PY``, loaded by
llama.cpp, which evaluates one 128-token window (its logits checked against the read-back model's).

    python bench/gguf_scale.py [--llama-cpp-python PY]      # -> results/bench/gguf_scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()
OUT = ROOT / "results" / "bench" / "gguf_scale"

LLAMA_CPP = r'''
import json, sys, time
import numpy as np
from llama_cpp import Llama
t = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)
load = time.perf_counter() - t
tokens = json.loads(sys.argv[2])
llm.eval(tokens)
np.save(sys.argv[3], np.array(llm.scores[:len(tokens)], dtype=np.float32))
print(json.dumps({"load_s": load}))
'''


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # kilobytes on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-python", default=None)
    args = parser.parse_args(argv)
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner import models
    from qpruner.gguf_export import read_model, write_gguf
    started = stamp()
    tokenizer = models.byte_tokenizer()
    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    formats = {n: "nf4" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    rss_model = peak_gb()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.gguf"
        t = time.perf_counter()
        summary = write_gguf(model, formats, tokenizer, path)
        write_s = time.perf_counter() - t
        rss_write = peak_gb()
        ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            original = model(ids).logits[0].float()
        del model
        t = time.perf_counter()
        back = read_model(path, torch.bfloat16)
        read_s = time.perf_counter() - t
        with torch.no_grad():
            ours = back(ids).logits[0].float()
        rss_read = peak_gb()
        result = {"stamp": started, "what": "GGUF writer/reader at 1.1B (random weights: time and memory only)",
                  "parameters": params, "file_bytes": summary["bytes"], "tensor_types": summary["tensor_types"],
                  "bf16_model_bytes": params * 2, "write_s": round(write_s, 1), "read_s": round(read_s, 1),
                  "peak_rss_gb_after_model": round(rss_model, 2), "peak_rss_gb_after_write": round(rss_write, 2),
                  "peak_rss_gb_after_read": round(rss_read, 2),
                  "read_vs_original_logit_corr": round(float(np.corrcoef(ours.numpy().ravel(),
                                                                         original.numpy().ravel())[0, 1]), 4)}
        if args.llama_cpp_python:
            npy = Path(tmp) / "lc.npy"
            got = subprocess.run([args.llama_cpp_python, "-c", LLAMA_CPP, str(path), json.dumps(ids[0].tolist()),
                                  str(npy)], check=True, capture_output=True, text=True, timeout=1800)
            lc = torch.from_numpy(np.load(npy))
            result["llama_cpp_load_s"] = round(json.loads(got.stdout.strip().splitlines()[-1])["load_s"], 1)
            result["llama_cpp_vs_read_max_abs_logit_diff"] = round(float((lc - ours).abs().max()), 4)
            result["read_max_abs_logit"] = round(float(ours.abs().max()), 4)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"# {result['what']}", "", f"`{started['command']}` at {started['commit'][:10]}, {started['date']}, "
             f"{started['machine']}.", ""] + [f"- {k}: {v}" for k, v in result.items() if k not in ("stamp", "what")]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
