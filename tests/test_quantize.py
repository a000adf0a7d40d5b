import pytest
import torch

from qpruner import models, quantize, surgery
from qpruner.config import FinetuneConfig, QuantConfig
from qpruner.errors import PlanError
from qpruner.finetune import attach_lora
from qpruner.plan import PrecisionPlan


def test_plan_is_applied_exactly(tiny):
    plan = PrecisionPlan(("nf4", "int8", "bf16", "fp4"))
    quantize.quantize_(tiny, plan, QuantConfig())
    import bitsandbytes as bnb
    expected = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt,
                "bf16": quantize.Linear16}
    for layer, fmt in zip(models.decoder_layers(tiny), plan.formats):
        for name, module in models.layer_linears(layer).items():
            assert type(module) is expected[fmt], (name, fmt)
            assert quantize.module_format(module) == fmt
    assert quantize.applied_formats(tiny) == plan.per_linear()
    assert tiny.model.embed_tokens.weight.dtype == torch.bfloat16
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight  # still tied


def test_quantized_model_is_close_to_the_original(tiny):
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = tiny(x).logits
    quantize.quantize_(tiny, PrecisionPlan(("int8",) * 4), QuantConfig())
    with torch.no_grad():
        out = tiny(x).logits
    assert out.dtype == torch.float32
    assert (out - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_wrong_length_plan_is_refused(tiny):
    with pytest.raises(PlanError, match="3 entries but the pruned model has 4"):
        quantize.quantize_(tiny, PrecisionPlan(("nf4",) * 3), QuantConfig())


def test_gradients_flow_to_lora_after_an_eval_forward_on_odd_widths(tiny):
    """The bitsandbytes CPU trap: widths not divisible by 32 after a no-grad forward."""
    layers = models.decoder_layers(tiny)
    surgery.prune_layer_(layers[1], tiny.config, torch.tensor([0]), torch.arange(40))  # MLP width 40
    surgery.to_pruned_(tiny)
    quantize.quantize_(tiny, PrecisionPlan(("nf4",) * 4), QuantConfig())
    model = attach_lora(tiny, FinetuneConfig(lora_r=2))
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        model(input_ids=x)
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert len(grads) == 2 * 7 * 4 and all(g is not None for g in grads.values())
    # lora_B starts at zero, so the gradient reaching the adapters shows up in lora_B
    for layer in range(4):
        assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if f"layers.{layer}." in n and "lora_B" in n)
