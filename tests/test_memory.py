import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qpruner import finetune_memory, models, quantize
from qpruner.config import FinetuneConfig, QuantConfig
from qpruner.finetune import attach_lora
from qpruner.memory import (Budget, LinearShape, MemoryBreakdown, ModelLayout, _tensor_list, _unique_bytes,
                            UnitCosts, format_bytes, measure_bytes, plan_bytes)
from qpruner.plan import PrecisionPlan

PLANS = [("nf4",) * 4, ("fp4",) * 4, ("int8",) * 4, ("bf16",) * 4, ("nf4", "int8", "bf16", "fp4")]


def _check(model, plan, cfg, compute="float32"):
    layout = ModelLayout.from_model(model)
    quantize.quantize_(model, plan, cfg)
    predicted = plan_bytes(layout, plan, cfg, compute)
    assert measure_bytes(model) == predicted
    with torch.no_grad():  # an eval forward moves int8 statistics around; the count must not change
        model(torch.randint(0, 256, (1, 8)))
    assert measure_bytes(model) == predicted
    return predicted


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("formats", PLANS, ids=["nf4", "fp4", "int8", "bf16", "mixed"])
def test_predicted_bytes_equal_real_tensor_bytes(tiny, formats, double_quant):
    _check(tiny, PrecisionPlan(formats), QuantConfig(double_quant=double_quant))


@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("rest_dtype", ["bfloat16", "float32"])
def test_block_sizes_and_rest_dtypes(tiny, blocksize, rest_dtype):
    _check(tiny, PrecisionPlan(("nf4", "fp4", "int8", "nf4")), QuantConfig(blocksize=blocksize, rest_dtype=rest_dtype))


@pytest.mark.parametrize("unit", ["group", "linear"])
def test_finer_units(tiny, unit):
    n = {"group": 8, "linear": 28}[unit]
    formats = tuple(itertools.islice(itertools.cycle(["nf4", "int8", "bf16", "fp4"]), n))
    plan = PrecisionPlan(formats, unit)
    _check(tiny, plan, QuantConfig())
    layer0 = quantize.applied_formats(tiny)[0]
    if unit == "group":
        assert [layer0[n] for n in ("q_proj", "o_proj", "gate_proj", "down_proj")] == ["nf4", "nf4", "int8", "int8"]
    else:
        assert list(layer0.values()) == list(formats[:7])


@pytest.mark.parametrize("embeddings,lm_head", [("int8", "rest"), ("nf4", "rest"), ("fp4", "int8"),
                                                ("rest", "int8"), ("rest", "nf4"), ("int8", "nf4")])
def test_embedding_and_head_formats_tied(tiny, embeddings, lm_head):
    cfg = QuantConfig(embeddings=embeddings, lm_head=lm_head)
    mem = _check(tiny, PrecisionPlan(("int8",) * 4), cfg)
    assert mem.head_bytes > 0  # a tied pair with either side quantized is stored twice
    assert tiny.lm_head.weight is not tiny.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.isfinite(tiny(torch.randint(0, 256, (1, 8))).logits).all()


def _qwen2(tied: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


@pytest.mark.parametrize("lm_head", ["rest", "int8", "nf4"])
def test_biases_and_untied_heads(lm_head):
    """Qwen2-style q/k/v biases: stored in the compute dtype (quantized) or bf16 (16-bit layers)."""
    model = _qwen2(tied=False)
    layout = ModelLayout.from_model(model)
    assert any(s.bias for s in layout.layers[0]) and not layout.tied
    mem = _check(model, PrecisionPlan(("nf4", "int8", "bf16")), QuantConfig(lm_head=lm_head))
    assert mem.bias_bytes > 0 and mem.head_bytes > 0


def test_bytes_of_one_linear_layer_by_hand():
    lin = torch.nn.Linear(1024, 1024, bias=False)
    shape = LinearShape(1024, 1024, False)
    # nf4 + double quant: packed 524288 + code 64 + absmax 16384 + nested absmax 64*4 + nested code 1024 + offset 4
    assert format_bytes(shape, "nf4") == 524288 + 64 + 16384 + 256 + 1024 + 4 == 542020
    assert format_bytes(shape, "nf4", double_quant=False) == 524288 + 64 + 16384 * 4 == 589888
    assert format_bytes(shape, "int8") == 1048576 + 4096
    assert format_bytes(shape, "bf16") == 2 * 1048576 and format_bytes(shape, "fp32") == 4 * 1048576
    for fmt, dq in (("nf4", True), ("nf4", False), ("fp4", True), ("int8", True)):
        module = quantize.convert_linear(lin, fmt, QuantConfig(double_quant=dq), "cpu", torch.float32)
        assert _unique_bytes(_tensor_list(module), set()) == format_bytes(shape, fmt, double_quant=dq)


def test_lora_parameters_are_counted_exactly(tiny):
    layout = ModelLayout.from_model(tiny)
    quantize.quantize_(tiny, PrecisionPlan(("nf4", "int8", "bf16", "nf4")), QuantConfig())
    ft = FinetuneConfig(lora_r=4, target_modules=("q_proj", "v_proj", "down_proj"))
    model = attach_lora(tiny, ft)
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 4 * finetune_memory.lora_numel(layout, 4, ft.target_modules)
    est = finetune_memory.estimate(layout, PrecisionPlan(("nf4", "int8", "bf16", "nf4")), QuantConfig(), ft, 64)
    assert est.adapters == est.gradients == lora and est.optimizer == 2 * lora


def test_finetune_estimate_grows_with_batch_and_bits(tiny):
    layout = ModelLayout.from_model(tiny)
    small = finetune_memory.estimate(layout, PrecisionPlan(("nf4",) * 4), QuantConfig(), FinetuneConfig(batch_size=2), 64)
    big = finetune_memory.estimate(layout, PrecisionPlan(("nf4",) * 4), QuantConfig(), FinetuneConfig(batch_size=4), 64)
    wide = finetune_memory.estimate(layout, PrecisionPlan(("bf16",) * 4), QuantConfig(), FinetuneConfig(batch_size=2), 64)
    assert big.activations == 2 * small.activations and big.weights == small.weights
    assert wide.weights > small.weights and wide.total > small.total
    assert small.weights == plan_bytes(layout, PrecisionPlan(("nf4",) * 4)).total_bytes


# realistic layer shapes; for very small layers the fixed 4-bit code tables (1,092 B) dominate
shapes = st.builds(LinearShape, st.integers(64, 4096), st.integers(64, 4096), st.booleans())


@given(shapes, st.booleans(), st.sampled_from([64, 128, 256]))
def test_bytes_are_monotone_in_bits(shape, dq, blocksize):
    nf4, int8, bf16 = (format_bytes(shape, f, double_quant=dq, blocksize=blocksize) for f in ("nf4", "int8", "bf16"))
    assert nf4 < int8 < bf16 < format_bytes(shape, "fp32")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([4, 8, 16]), min_size=8, max_size=8), st.integers(0, 7))
def test_raising_one_unit_never_lowers_memory(bits, which):
    layout = ModelLayout.from_model(models.tiny_model())
    low = plan_bytes(layout, PrecisionPlan.from_bits(bits, unit="group"))
    raised = list(bits)
    raised[which] = {4: 8, 8: 16, 16: 16}[raised[which]]
    high = plan_bytes(layout, PrecisionPlan.from_bits(raised, unit="group"))
    assert high.total_bytes >= low.total_bytes and high.avg_bits >= low.avg_bits


def test_budget_excess_and_fit():
    mem = MemoryBreakdown(1000, 0, 1000, 0, 0, 1000)  # 8 bits
    assert Budget().fits(mem) and Budget().unlimited
    assert Budget(avg_bits=8.0).fits(mem)
    assert Budget(avg_bits=4.0).excess(mem) == pytest.approx(1.0)
    assert Budget(total_bytes=1000).excess(mem) == pytest.approx(1.0)
    assert "average bits" in Budget(avg_bits=4.0).describe()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, 5.0, 7.5]), st.sampled_from([None, 0.9, 1.0]))
def test_vectorised_plan_tables_agree_with_one_plan_at_a_time(seed, avg_bits, gb_fraction):
    """UnitCosts.totals / fits_rows (the searcher's fast path) give exactly total / fits, plan by plan."""
    rng = np.random.default_rng(seed)
    w = np.sort(rng.uniform(1e5, 3e6, (9, 3)), axis=1)
    b = rng.uniform(0, 1e3, (9, 3))
    numel = int(w[:, 0].sum() * 2)
    total = None if gb_fraction is None else int(gb_fraction * (w[:, 1].sum() + b[:, 1].sum() + 1e6))
    costs = UnitCosts(w, b, 1e6, numel, Budget(avg_bits=avg_bits, total_bytes=total))
    rows = rng.integers(0, 3, (50, 9))
    assert np.allclose(costs.totals(rows), [costs.total(r) for r in rows], rtol=0, atol=1e-6)
    assert costs.fits_rows(rows).tolist() == [costs.fits(r) for r in rows]
