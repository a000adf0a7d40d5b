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


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_gradient_accumulation_equals_the_full_batch(tiny_splits):
    train = tiny_splits.train[:16]
    states = []
    for micro in (4, 2, 1):
        model = _quantized_lora(models.tiny_model(), r=4)
        finetune_(model, train, FinetuneConfig(steps=1, batch_size=4, micro_batch_size=micro, lr=1e-2), "cpu")
        states.append(_lora_state(model))
    for other in states[1:]:
        for name in states[0]:
            assert torch.allclose(states[0][name], other[name], atol=1e-5), name   # Adam step: +-lr, float sums


def test_learning_rate_schedules():
    from qpruner.finetune import lr_factor
    cfg = FinetuneConfig(steps=10, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.1)
    assert [round(lr_factor(s, cfg), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.55, 0.1]
    cos = FinetuneConfig(steps=10, warmup_steps=0, lr_schedule="cosine")
    assert lr_factor(0, cos) == pytest.approx(1.0) and lr_factor(5, cos) == pytest.approx(0.5)
    assert lr_factor(10, cos) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(7, FinetuneConfig(steps=10)) == 1.0


def test_time_budget_and_intermediate_evaluations(tiny, tiny_splits):
    model = _quantized_lora(tiny)
    stats = finetune_(model, tiny_splits.train[:8], FinetuneConfig(steps=5, batch_size=2, max_seconds=0.0), "cpu")
    assert stats.steps == 0 and stats.stopped == "time budget"
    seen = []
    stats = finetune_(model, tiny_splits.train[:8], FinetuneConfig(steps=5, batch_size=2, eval_every=2), "cpu",
                      on_eval=seen.append)
    assert seen == [2, 4] and stats.steps == 5 and stats.stopped == "" and len(stats.losses) == 5


def test_gradient_checkpointing_gives_the_same_training(tiny_splits):
    train = tiny_splits.train[:8]
    states = []
    for checkpointing in (False, True):
        model = _quantized_lora(models.tiny_model(), r=4)
        finetune_(model, train, FinetuneConfig(steps=2, batch_size=2, lr=1e-2, gradient_checkpointing=checkpointing),
                  "cpu")
        states.append(_lora_state(model))
    for name in states[0]:
        assert torch.allclose(states[0][name], states[1][name], atol=1e-5), name


def test_real_nan_from_float16_overflow_fails_the_trial(tiny_splits):
    """Not a mock: float16 compute with an absurd learning rate overflows to inf/NaN within two steps."""
    model = models.tiny_model()
    quantize.quantize_(model, PrecisionPlan(("nf4",) * 4), QuantConfig(compute_dtype="float16", rest_dtype="float16"))
    model = attach_lora(model, FinetuneConfig(lora_r=4))
    with pytest.raises(TrialFailed, match="non-finite training loss"):
        finetune_(model, tiny_splits.train[:16], FinetuneConfig(steps=6, batch_size=2, lr=1e4, max_grad_norm=0), "cpu")


def test_step_progress_reports_every_n_steps_and_the_last_without_a_metric():
    from qpruner.config import FinetuneConfig
    from qpruner.finetune import StepProgress
    from qpruner.results import is_progress
    got = []
    progress = StepProgress(got.append, FinetuneConfig(steps=7, report_every=3), tokens_per_step=128,
                            extra={"plan_code": "4848"})
    for step in range(7):
        progress(step, 2.0 - 0.1 * step)
    assert [r["step"] for r in got] == [3, 6, 7]                 # every 3 steps, and the last
    assert all(is_progress(r) and "objective" not in r and r["steps"] == 7 and r["plan_code"] == "4848" for r in got)
    assert got[-1]["eta_s"] == 0.0 and got[0]["eta_s"] >= 0.0 and got[0]["train_loss"] == pytest.approx(1.8)
    silent = []
    off = StepProgress(silent.append, FinetuneConfig(steps=7, report_every=0), tokens_per_step=128)
    for step in range(7):
        off(step, 1.0)
    assert silent == []                                          # report_every: 0 reports nothing
