"""Real-model checks on SmolLM2-135M (built in, offline). Minutes on a CPU: marked slow."""

import copy
from dataclasses import replace

import pytest
import torch

from qpruner import data, memory, models, prune, unit_importance
from qpruner.config import build_job
from qpruner.evaluate import evaluate
from qpruner.plan import PrecisionPlan
from qpruner.trial import TrialContext, run_trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned():
    job = build_job({"model": {"source": "builtin:smollm2-135m"},
                     "data": {"seq_len": 128, "calib_samples": 8, "eval_samples": 8},
                     "finetune": {"steps": 4, "batch_size": 2}})
    loaded = models.load_model(job.model)
    splits = data.load_splits(job.data, loaded.tokenizer)
    original = copy.deepcopy(loaded.model)
    report = prune.prune_(loaded.model, splits.calib, job.prune)
    return job, loaded.model, splits, report, original


def test_pruned_smollm2_runs_and_counts(pruned):
    job, model, splits, report, original = pruned
    assert report.params_after == models.count_params(model) < report.params_before
    widths = report.widths_after
    assert widths[0].kv_heads == 3 and widths[-1].kv_heads == 3  # first and last kept
    assert all(w.heads == 3 * w.kv_heads for w in widths)        # GQA ratio preserved
    assert all(w.intermediate % 32 == 0 for w in widths)
    unpruned = evaluate(original, splits.eval).perplexity
    taylor = evaluate(model, splits.eval).perplexity
    randomly = copy.deepcopy(original)
    prune.prune_(randomly, splits.calib, replace(job.prune, importance="random"))
    assert models.count_params(randomly) == report.params_after  # same widths, other heads/channels
    random_ppl = evaluate(randomly, splits.eval).perplexity
    # pruning costs quality, and Taylor importance chooses far better than chance
    assert unpruned < taylor < random_ppl


def test_layer_scores_and_nf4_worse_than_int8(pruned):
    job, model, splits, _, _ = pruned
    scores = unit_importance.score_units(model, splits.calib, job.score)
    assert len(scores) == 30 and all(s > 0 for s in scores.scores)
    config_dict, state = models.model_state(model)
    ctx = TrialContext(config_dict, state, memory.ModelLayout.from_model(model), splits.train, splits.eval,
                       job.quant, job.finetune, job.eval, memory.Budget())
    nf4 = run_trial(ctx, PrecisionPlan.uniform("nf4", 30))
    int8 = run_trial(ctx, PrecisionPlan.uniform("int8", 30))
    assert nf4.status == int8.status == "ok"
    assert nf4.perplexity > int8.perplexity
    assert nf4.weight_bytes < int8.weight_bytes
    assert nf4.weight_bytes == nf4.weight_bytes_predicted and int8.weight_bytes == int8.weight_bytes_predicted


def test_saved_pruned_smollm2_loads_with_transformers(pruned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qpruner.pruned_model import save_pruned
    job, model, splits, _, _ = pruned
    tokenizer = models.load_model(job.model).tokenizer
    save_pruned(model, tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    x = splits.eval[:2]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_smollm2_pruning_equals_masking_and_closed_form(pruned):
    """Block scope on the real model: physically pruned == original with the groups zeroed."""
    from helpers import prune_and_reference
    job, _, splits, _, original = pruned
    model = copy.deepcopy(original)
    ref, predicted, sel = prune_and_reference(model, splits.calib[:4], replace(job.prune, importance="param_mix"))
    assert len(sel.keep_kv) == 28 and len(sel.keep_channels) == 28
    assert models.count_params(model) == predicted == models.param_count(model, models.layer_widths(model))
    x = splits.eval[:2]
    with torch.no_grad():
        out, expected = model(x).logits, ref(x).logits
    assert torch.allclose(out, expected, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("case", ["nf4", "fp4-no-dq", "int8", "bf16", "mixed-group", "ends-quantized"])
def test_smollm2_memory_model_is_exact(pruned, case):
    from qpruner import quantize
    from qpruner.config import QuantConfig
    from qpruner.memory import ModelLayout, measure_bytes, plan_bytes
    job, model, splits, _, _ = pruned
    n = len(models.decoder_layers(model))
    plans = {"nf4": (PrecisionPlan.uniform("nf4", n), QuantConfig()),
             "fp4-no-dq": (PrecisionPlan.uniform("fp4", n), QuantConfig(double_quant=False, blocksize=128)),
             "int8": (PrecisionPlan.uniform("int8", n), QuantConfig()),
             "bf16": (PrecisionPlan.uniform("bf16", n), QuantConfig()),
             "mixed-group": (PrecisionPlan(tuple(("nf4", "int8", "bf16", "fp4")[i % 4] for i in range(2 * n)), "group"),
                             QuantConfig()),
             "ends-quantized": (PrecisionPlan.uniform("int8", n), QuantConfig(embeddings="int8", lm_head="nf4"))}
    plan, quant = plans[case]
    config_dict, state = models.model_state(model)
    fresh = models.build_model(config_dict, state)
    layout = ModelLayout.from_model(fresh)
    quantize.quantize_(fresh, plan, quant)
    with torch.no_grad():
        fresh(input_ids=splits.eval[:1, :16])
    assert measure_bytes(fresh) == plan_bytes(layout, plan, quant, "float32")
