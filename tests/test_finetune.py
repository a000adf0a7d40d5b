import pytest
import torch

from qpruner import models, quantize
from qpruner.config import FinetuneConfig, QuantConfig
from qpruner.errors import TrialFailed
from qpruner.finetune import attach_lora, finetune_
from qpruner.plan import PrecisionPlan


def _quantized_lora(tiny, r=4, targets=None):
    quantize.quantize_(tiny, PrecisionPlan(("nf4", "int8", "bf16", "nf4")), QuantConfig())
    cfg = FinetuneConfig(lora_r=r, **({"target_modules": targets} if targets else {}))
    return attach_lora(tiny, cfg)


def test_lora_wraps_every_target_and_only_adapters_train(tiny):
    model = _quantized_lora(tiny)
    for layer in models.decoder_layers(model):
        for name, module in models.layer_linears(layer).items():
            assert hasattr(module, "lora_A"), name
            assert quantize.module_format(module) in ("nf4", "int8", "bf16")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # peft's bitsandbytes-aware layers were chosen for the quantized bases
    kinds = {type(models.layer_linears(l)["q_proj"]).__module__ for l in models.decoder_layers(model)}
    assert "peft.tuners.lora.bnb" in kinds


def test_target_modules_are_respected(tiny):
    model = _quantized_lora(tiny, targets=("q_proj", "v_proj"))
    lin = models.layer_linears(models.decoder_layers(model)[0])
    assert hasattr(lin["q_proj"], "lora_A") and hasattr(lin["v_proj"], "lora_A")
    assert not hasattr(lin["down_proj"], "lora_A")


def test_finetuning_lowers_the_loss_on_its_data(tiny, tiny_splits):
    model = _quantized_lora(tiny, r=8)
    batch = tiny_splits.train[:4]
    with torch.no_grad():
        before = float(model(input_ids=batch, labels=batch).loss)
    stats = finetune_(model, batch, FinetuneConfig(steps=15, batch_size=4, lr=5e-3), "cpu")
    with torch.no_grad():
        after = float(model(input_ids=batch, labels=batch).loss)
    assert stats.steps == 15 and stats.tokens == 15 * batch.numel()
    assert after < before - 0.05


def test_non_finite_loss_fails_the_trial(tiny, tiny_splits, monkeypatch):
    model = _quantized_lora(tiny)
    original = type(model).forward

    def nan_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(model), "forward", nan_forward)
    with pytest.raises(TrialFailed, match="non-finite training loss"):
        finetune_(model, tiny_splits.train[:8], FinetuneConfig(steps=2, batch_size=2), "cpu")


def test_zero_steps_is_a_no_op(tiny, tiny_splits):
    model = _quantized_lora(tiny)
    assert finetune_(model, tiny_splits.train[:4], FinetuneConfig(steps=0), "cpu").steps == 0
