"""GPU checks (CUDA): the same trial on the device, with the allocator's peak."""

import pytest
import torch

from qpruner import memory, models, prune, quantize
from qpruner.config import EvalConfig, FinetuneConfig, PruneConfig, QuantConfig
from qpruner.plan import PrecisionPlan
from qpruner.trial import TrialContext, run_trial

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_mixed_plan_trial_on_cuda(tiny, tiny_splits):
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    config_dict, state = models.model_state(tiny)
    ctx = TrialContext(config_dict, state, memory.ModelLayout.from_model(tiny), tiny_splits.train[:64],
                       tiny_splits.eval, QuantConfig(), FinetuneConfig(steps=3, batch_size=2, lora_r=2),
                       EvalConfig(), memory.Budget())
    r = run_trial(ctx, PrecisionPlan(("nf4", "int8", "bf16", "fp4")), "cuda")
    assert r.status == "ok", r.error
    assert r.device.startswith("cuda") and r.peak_kind == "cuda_allocated" and r.peak_bytes > r.weight_bytes
    assert r.weight_bytes == r.weight_bytes_predicted


def test_quantized_modules_live_on_cuda(tiny):
    quantize.quantize_(tiny, PrecisionPlan(("nf4", "int8", "bf16", "nf4")), QuantConfig(), "cuda")
    assert quantize.applied_formats(tiny) == PrecisionPlan(("nf4", "int8", "bf16", "nf4")).per_linear()
    x = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(tiny(x).logits).all()
    layout = memory.ModelLayout.from_model(models.tiny_model())
    assert memory.measure_bytes(tiny) == memory.plan_bytes(layout, PrecisionPlan(("nf4", "int8", "bf16", "nf4")),
                                                           QuantConfig(), "bfloat16")


@pytest.mark.parametrize("unit,embeddings,lm_head", [("group", "int8", "nf4"), ("linear", "nf4", "int8")])
def test_units_and_quantized_ends_on_cuda(tiny, unit, embeddings, lm_head):
    n = {"group": 8, "linear": 28}[unit]
    plan = PrecisionPlan(tuple(("nf4", "int8", "bf16", "fp4")[i % 4] for i in range(n)), unit)
    quant = QuantConfig(embeddings=embeddings, lm_head=lm_head)
    layout = memory.ModelLayout.from_model(tiny)
    quantize.quantize_(tiny, plan, quant, "cuda")
    assert quantize.applied_formats(tiny) == plan.per_linear()
    x = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(tiny(x).logits).all()
    assert memory.measure_bytes(tiny) == memory.plan_bytes(layout, plan, quant, "bfloat16")


def test_sensitivity_scores_on_cuda(tiny, tiny_splits):
    from qpruner.config import ScoreConfig
    from qpruner.unit_importance import score_units
    scores = score_units(tiny.to("cuda"), tiny_splits.calib, ScoreConfig(method="sensitivity"), "layer", QuantConfig())
    assert len(scores) == 4 and all(s >= 0 for s in scores.scores)


def test_saved_adapter_reloads_and_reproduces_the_trial_on_cuda(tiny, tiny_splits, tmp_path):
    """What `qpruner.load` does with an export, on CUDA: same LoftQ base, same bnb modules, same metrics."""
    from qpruner.evaluate import evaluate
    from qpruner.finetune import save_adapter
    from qpruner.trial import quantized_with_lora
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    config_dict, state = models.model_state(tiny)
    ft = FinetuneConfig(steps=3, batch_size=2, lora_r=2)
    ctx = TrialContext(config_dict, state, memory.ModelLayout.from_model(tiny), tiny_splits.train[:64],
                       tiny_splits.eval, QuantConfig(), ft, EvalConfig(), memory.Budget())
    plan = PrecisionPlan(("nf4", "int8", "bf16", "fp4"))
    r = run_trial(ctx, plan, "cuda", on_trained=lambda m: save_adapter(m, tmp_path / "adapter"))
    assert r.status == "ok", r.error
    model, _ = quantized_with_lora(models.build_model(config_dict, state), plan, QuantConfig(), ft,
                                   torch.device("cuda"), adapter_dir=str(tmp_path / "adapter"))
    assert quantize.applied_formats(model) == plan.per_linear()
    ev = evaluate(model.eval(), tiny_splits.eval, EvalConfig().batch_size, "cuda", EvalConfig().context,
                  EvalConfig().stride)
    assert ev.perplexity == pytest.approx(r.perplexity, rel=1e-4) and ev.accuracy == pytest.approx(r.accuracy, abs=1e-6)


def test_a_cached_loftq_build_on_cuda_is_bit_identical(tiny, tiny_splits, tmp_path):
    from qpruner.build import build_quantized
    from qpruner.loftq import LoftQCache
    from qpruner.pruned_model import save_pruned
    from qpruner.weights import SafetensorsDir
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    save_pruned(tiny, models.byte_tokenizer(), tmp_path / "pruned", {"key": "k0"})
    plan, ft, cuda = PrecisionPlan(("nf4", "int8", "fp4", "nf4")), FinetuneConfig(lora_r=2), torch.device("cuda")
    from test_build import _same, _tensors
    source = SafetensorsDir(tmp_path / "pruned")
    uncached, _ = build_quantized(tiny.config.to_dict(), source, plan, QuantConfig(), ft, cuda)
    cache = LoftQCache(tmp_path / "c")
    cold, _ = build_quantized(tiny.config.to_dict(), source, plan, QuantConfig(), ft, cuda, cache)
    again = LoftQCache(tmp_path / "c")
    warm, _ = build_quantized(tiny.config.to_dict(), source, plan, QuantConfig(), ft, cuda, again)
    assert again.hits == cache.misses > 0 and again.misses == 0
    _same(_tensors(uncached), _tensors(cold))     # every tensor: data, 4-bit statistics, int8 scales, LoRA
    _same(_tensors(uncached), _tensors(warm))


def test_a_fractional_trial_cannot_take_its_neighbours_memory():
    import subprocess
    import sys
    code = ("import torch\n"
            "from qpruner.finetune_memory import cap_gpu_memory\n"
            "d = torch.device('cuda', 0)\n"
            "total = torch.cuda.get_device_properties(d).total_memory\n"
            "assert cap_gpu_memory(total // 4, d) == 0.25\n"
            "try:\n"
            "    x = torch.empty(int(total * 0.3), dtype=torch.uint8, device=d)\n"
            "    print('allocated')\n"
            "except torch.OutOfMemoryError:\n"
            "    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "refused", out.stdout + out.stderr


def test_a_cpu_export_reloads_on_cuda_within_rounding(tmp_path):
    """#28: an export made from a CPU search, loaded by qpruner.load on CUDA (the stored tensors, no LoftQ), gives the
    trial's NLL up to CPU<->GPU rounding (printed: the measured difference is the number to state)."""
    import json

    import qpruner
    from qpruner.config import load_job
    from qpruner.data import load_splits
    from qpruner.evaluate import evaluate
    from qpruner.export import evaluation_config, export_point
    from qpruner.job import run_job
    from test_search_e2e import ROOT
    job = load_job(ROOT / "tune_jobs" / "tiny_smoke.yaml", [f"results_dir={tmp_path}", "search.num_trials=2",
                                                           "device=cpu"])
    run_job(job)
    out = export_point(tmp_path / "tiny_smoke", 0, tmp_path / "exp")
    trial_nll = json.loads((out / "qpruner_plan.json").read_text())["trial"]["nll"]
    model, tokenizer = qpruner.load(out, "cuda")
    data_cfg, eval_cfg = evaluation_config(out)
    nll = evaluate(model, load_splits(data_cfg, tokenizer).eval, eval_cfg.batch_size, "cuda", eval_cfg.context,
                   eval_cfg.stride).nll
    print(f"export reloaded on CUDA: NLL {nll:.6f}, the CPU trial's {trial_nll:.6f}, difference {nll - trial_nll:+.2e}")
    assert abs(nll - trial_nll) < 5e-3
