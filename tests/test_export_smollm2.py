"""Real model: a short SmolLM2 search, export of a front point, `qpruner.load` reproduces the trial.

Unlike the tiny model (byte tokenizer), the export carries SmolLM2's real tokenizer: the evaluation text
is re-tokenized from the export, so this also checks the tokenizer's save/load round trip."""

import pandas as pd
import pytest

from qpruner.config import load_job
from qpruner.export import export_point
from qpruner.job import run_job

from helpers import evaluate_export
from test_search_e2e import ROOT

pytestmark = pytest.mark.slow


def test_exported_smollm2_point_reproduces_its_trial(tmp_path):
    job = load_job(ROOT / "tune_jobs" / "smollm2_demo.yaml",
                   [f"results_dir={tmp_path}", "search.num_trials=2", "finetune.steps=2", "policy.seed_plans=2",
                    "data.eval_samples=8"])
    run_job(job)
    results = tmp_path / "smollm2_demo"
    front = pd.read_parquet(results / "pareto.parquet")
    row = front.iloc[0]
    out = export_point(results, 0)
    assert (out / "quantized.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "quantized.safetensors").stat().st_size <= 1.15 * row["weight_bytes"]
    import yaml
    meta = yaml.safe_load((out / "README.md").read_text().split("---", 2)[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    _, ev = evaluate_export(out)
    assert ev.perplexity == pytest.approx(row["perplexity"], rel=1e-4)
    assert ev.accuracy == pytest.approx(row["accuracy"], abs=1e-6)
    from qpruner.export import merge_export
    _, merged_nll, trial_nll = merge_export(out)     # --merge: bf16, LoRA folded in; only rounding between them
    print(f"SmolLM2 merged bf16 NLL {merged_nll:.5f} vs the trial's {trial_nll:.5f}")
    assert abs(merged_nll - trial_nll) < 0.05
    from qpruner.gguf_export import export_gguf   # --format gguf: the base's GGUF tokenizer, deci per-layer widths
    import gguf
    path, entry = export_gguf(out, results=results)
    print(f"SmolLM2 GGUF (q4_0) NLL {entry['nll']:.5f} vs the trial's {trial_nll:.5f}, {entry['bytes'] / 1e6:.1f} MB")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
    assert entry["architecture"] == "deci" and entry["fallbacks"] == []
    assert abs(entry["nll"] - trial_nll) < 0.25   # Q4_0 for nf4: +0.13 on the demo's point (results/bench/gguf.md)
    assert entry["bytes"] <= 1.3 * row["weight_bytes"]
