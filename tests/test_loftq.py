"""LoftQ for mixed plans: lower residual than plain init, with the LoRA scaling accounted for."""

import pytest
import torch

from qpruner import models
from qpruner.config import EvalConfig, FinetuneConfig, QuantConfig
from qpruner.loftq import loftq_linear
from qpruner.memory import Budget, ModelLayout
from qpruner.plan import PrecisionPlan
from qpruner.quantize import convert_linear, dequantized
from qpruner.trial import TrialContext, _build_quantized


def _residuals(fmt, iters=1, rank=8, alpha=16.0):
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 96, bias=False)
    w = lin.weight.detach()
    plain = (w - dequantized(convert_linear(lin, fmt, QuantConfig(), "cpu", torch.float32))).norm()
    base, a, b = loftq_linear(lin, fmt, QuantConfig(), rank, alpha / rank, iters, "cpu", torch.float32)
    probe = torch.nn.Linear(192, 96, bias=False)
    probe.weight.data = base
    q = dequantized(convert_linear(probe, fmt, QuantConfig(), "cpu", torch.float32))
    return float(plain), float((w - q - (alpha / rank) * b @ a).norm())


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "bf16"])
def test_loftq_lowers_the_quantization_residual(fmt):
    plain, loftq = _residuals(fmt)
    assert loftq < 0.95 * plain
    _, more = _residuals(fmt, iters=4)
    assert more <= loftq * 1.001  # more alternations never hurt much, usually help


def test_the_model_holds_exactly_the_loftq_decomposition(tiny, tiny_splits):
    """Through the real trial path: dequantized base + scaling * B @ A of every peft module is closer to
    the original weight than the plain quantization, for nf4 and int8 layers."""
    original = {(i, n): m.weight.detach().clone() for i, layer in enumerate(models.decoder_layers(tiny))
                for n, m in models.layer_linears(layer).items()}
    config_dict, state = models.model_state(tiny)
    plan = PrecisionPlan(("nf4", "int8", "nf4", "int8"))
    ft = FinetuneConfig(lora_r=4, lora_alpha=8.0, init="loftq", loftq_formats=("nf4", "int8"))
    ctx = TrialContext(config_dict, state, ModelLayout.from_model(tiny), tiny_splits.train, tiny_splits.eval,
                       QuantConfig(), ft, EvalConfig(), Budget())
    model, _ = _build_quantized(ctx, plan, torch.device("cpu"))
    for i, layer in enumerate(models.decoder_layers(model)):
        for name, module in models.layer_linears(layer).items():
            assert module.scaling["default"] == pytest.approx(8.0 / 4)
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            loftq = (original[(i, name)] - dequantized(module) - delta).norm()
            plain_lin = torch.nn.Linear(1, 1)
            plain_lin.weight = torch.nn.Parameter(original[(i, name)])
            plain = (original[(i, name)] - dequantized(convert_linear(plain_lin, plan.formats[i], QuantConfig(), "cpu",
                                                                      torch.float32))).norm()
            assert loftq < plain, (i, name)


def test_plain_init_starts_from_zero_adapters(tiny, tiny_splits):
    config_dict, state = models.model_state(tiny)
    ctx = TrialContext(config_dict, state, ModelLayout.from_model(tiny), tiny_splits.train, tiny_splits.eval,
                       QuantConfig(), FinetuneConfig(lora_r=4, init="plain"), EvalConfig(), Budget())
    model, _ = _build_quantized(ctx, PrecisionPlan(("nf4",) * 4), torch.device("cpu"))
    lin = models.layer_linears(models.decoder_layers(model)[0])["q_proj"]
    assert float(lin.lora_B["default"].weight.detach().abs().sum()) == 0.0


def test_balancing_keeps_the_product_and_sets_the_scale_of_a():
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 96, bias=False)
    _, a0, b0 = loftq_linear(lin, "int8", QuantConfig(), 8, 2.0, 1, "cpu", torch.float32, balanced=False)
    _, a1, b1 = loftq_linear(lin, "int8", QuantConfig(), 8, 2.0, 1, "cpu", torch.float32, balanced=True)
    assert torch.allclose(b0 @ a0, b1 @ a1, atol=1e-7)
    assert float(a1.norm()) == pytest.approx((8 / 3) ** 0.5, rel=1e-5)
    assert float(a0.norm()) < 0.1 * float(a1.norm())  # int8's residual is tiny: unbalanced factors start tiny


def test_loftq_only_where_asked(tiny, tiny_splits):
    config_dict, state = models.model_state(tiny)
    ctx = TrialContext(config_dict, state, ModelLayout.from_model(tiny), tiny_splits.train, tiny_splits.eval,
                       QuantConfig(), FinetuneConfig(lora_r=4), EvalConfig(), Budget())  # default: 4-bit only
    model, _ = _build_quantized(ctx, PrecisionPlan(("nf4", "int8", "bf16", "fp4")), torch.device("cpu"))
    b_norms = [float(models.layer_linears(layer)["q_proj"].lora_B["default"].weight.detach().abs().sum())
               for layer in models.decoder_layers(model)]
    assert b_norms[0] > 0 and b_norms[3] > 0 and b_norms[1] == 0 and b_norms[2] == 0


def test_loftq_on_cpu_runs_on_one_thread_whatever_the_caller_uses(tiny, monkeypatch):
    """LoftQ's base weights decide the quantized model: with multi-threaded BLAS their rounding (and so the
    quantization bins) would depend on the thread count, and a reloaded export on a bigger machine would differ
    from its trial (seen on SmolLM2: perplexity 77.86 against 77.73). So it runs on one thread, then restores."""
    import qpruner.loftq as loftq_mod
    seen = []
    real = loftq_mod.loftq_linear

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(loftq_mod, "loftq_linear", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loftq_mod.loftq_model_(tiny, PrecisionPlan(("nf4",) * 4), QuantConfig(), FinetuneConfig(lora_r=2), "cpu",
                               torch.float32)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
