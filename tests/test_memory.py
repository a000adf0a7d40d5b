import pytest
import torch
from hypothesis import given, settings, strategies as st

from qpruner import models, quantize
from qpruner.config import QuantConfig
from qpruner.memory import Budget, LinearShape, MemoryBreakdown, ModelLayout, format_bytes, measure_bytes, plan_bytes
from qpruner.plan import PrecisionPlan

PLANS = [("nf4",) * 4, ("fp4",) * 4, ("int8",) * 4, ("bf16",) * 4, ("nf4", "int8", "bf16", "fp4")]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("formats", PLANS, ids=["nf4", "fp4", "int8", "bf16", "mixed"])
def test_predicted_bytes_equal_real_tensor_bytes(tiny, formats, double_quant):
    layout = ModelLayout.from_model(tiny)
    plan = PrecisionPlan(formats)
    cfg = QuantConfig(double_quant=double_quant)
    quantize.quantize_(tiny, plan, cfg)
    predicted = plan_bytes(layout, plan, double_quant=double_quant)
    assert measure_bytes(tiny) == predicted
    with torch.no_grad():  # an eval forward moves int8 statistics around; the count must not change
        tiny(torch.randint(0, 256, (1, 8)))
    assert measure_bytes(tiny) == predicted


def test_bytes_of_one_linear_layer_by_hand():
    from qpruner.quantize import _convert
    lin = torch.nn.Linear(1024, 1024, bias=False)
    shape = LinearShape(1024, 1024, False)
    # nf4 + double quant: packed 524288 + code 64 + absmax 16384 + nested absmax 64*4 + nested code 1024 + offset 4
    assert format_bytes(shape, "nf4") == 524288 + 64 + 16384 + 256 + 1024 + 4
    assert format_bytes(shape, "nf4", double_quant=False) == 524288 + 64 + 16384 * 4
    assert format_bytes(shape, "int8") == 1048576 + 4096
    assert format_bytes(shape, "bf16") == 2 * 1048576
    for fmt, dq in (("nf4", True), ("nf4", False), ("int8", True)):
        module = _convert(lin, fmt, QuantConfig(double_quant=dq), "cpu", torch.float32)
        from qpruner.memory import _tensor_list, _unique_bytes
        assert _unique_bytes(_tensor_list(module), set()) == format_bytes(shape, fmt, double_quant=dq)


def test_biases_are_counted(tiny):
    """Qwen2-style q/k/v biases: stored in the compute dtype (quantized) or bf16 (16-bit layers)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    layout = ModelLayout.from_model(model)
    assert any(s.bias for s in layout.layers[0])
    plan = PrecisionPlan(("nf4", "int8", "bf16"))
    quantize.quantize_(model, plan, QuantConfig())
    predicted = plan_bytes(layout, plan)
    assert predicted.bias_bytes > 0
    assert measure_bytes(model) == predicted
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 6))).logits).all()


# realistic layer shapes; for very small layers the fixed 4-bit code tables (1,092 B) dominate
shapes = st.builds(LinearShape, st.integers(64, 4096), st.integers(64, 4096), st.booleans())


@given(shapes, st.booleans(), st.sampled_from([64, 128, 256]))
def test_bytes_are_monotone_in_bits(shape, dq, blocksize):
    nf4, int8, bf16 = (format_bytes(shape, f, double_quant=dq, blocksize=blocksize) for f in ("nf4", "int8", "bf16"))
    assert nf4 < int8 < bf16


@settings(max_examples=50)
@given(st.lists(st.sampled_from([4, 8, 16]), min_size=4, max_size=4), st.integers(0, 3))
def test_raising_one_layer_never_lowers_memory(bits, which):
    layout = ModelLayout.from_model(models.tiny_model())
    low = plan_bytes(layout, PrecisionPlan.from_bits(bits))
    raised = list(bits)
    raised[which] = {4: 8, 8: 16, 16: 16}[raised[which]]
    high = plan_bytes(layout, PrecisionPlan.from_bits(raised))
    assert high.total_bytes >= low.total_bytes and high.avg_bits >= low.avg_bits


def test_budget_excess_and_fit():
    mem = MemoryBreakdown(linear_weight_bytes=1000, bias_bytes=0, rest_bytes=1000, linear_numel=1000)  # 8 bits
    assert Budget().fits(mem)
    assert Budget(avg_bits=8.0).fits(mem)
    assert Budget(avg_bits=4.0).excess(mem) == pytest.approx(1.0)
    assert Budget(total_bytes=1000).excess(mem) == pytest.approx(1.0)
    assert "average bits" in Budget(avg_bits=4.0).describe()
