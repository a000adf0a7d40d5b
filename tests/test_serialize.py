"""The quantized model on disk: a built model taken apart and put together again, bit for bit, with no LoftQ."""

import json

import pytest
import torch

from qpruner import models
from qpruner.build import build_quantized
from qpruner.config import FinetuneConfig, QuantConfig
from qpruner.plan import PrecisionPlan
from qpruner.pruned_model import save_pruned
from qpruner.serialize import QUANTIZED_FILE, load_quantized, read_quantization_map, save_quantized
from qpruner.weights import SafetensorsDir

from test_build import _same, _tensors

FT = FinetuneConfig(steps=2, batch_size=2, lora_r=2)


@pytest.fixture
def pruned(tiny, tiny_splits, tmp_path):
    from qpruner import prune
    from qpruner.config import PruneConfig
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    save_pruned(tiny, models.byte_tokenizer(), tmp_path / "pruned", {"key": "k0"})
    return tiny, tmp_path / "pruned"


@pytest.mark.parametrize("formats", [("nf4", "int8", "fp4", "bf16"), ("nf4", "nf4", "nf4", "nf4")])
def test_a_saved_quantized_model_loads_bit_identical_without_loftq(pruned, tmp_path, monkeypatch, formats):
    import qpruner.build as build_module
    import qpruner.loftq as loftq_module
    tiny, directory = pruned
    plan, quant = PrecisionPlan(formats), QuantConfig()
    config = tiny.config.to_dict()
    built, measured = build_quantized(config, SafetensorsDir(directory), plan, quant, FT, torch.device("cpu"))
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    path = save_quantized(built, quant, out)
    qmap = read_quantization_map(path)
    assert set(qmap["modules"].values()) == set(formats) and qmap["library"] == "bitsandbytes"
    assert path.stat().st_size <= 1.05 * measured.total_bytes + 64 * 1024      # what the trial holds, no more
    import qpruner.quantize as quantize_module
    for module, name in ((loftq_module, "loftq_linear"), (build_module, "loftq_linear"),
                         (build_module, "convert_linear"), (quantize_module, "convert_linear")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("no LoftQ, no quantization at load"))
    got = load_quantized(out, plan, quant, "cpu")
    base = built.get_base_model()
    expected = {k: v for k, v in _tensors(base).items() if "lora_" not in k}
    expected = {k.replace(".base_layer", ""): v for k, v in expected.items()}
    _same(expected, _tensors(got))
    assert path.name == QUANTIZED_FILE


def test_a_trained_models_logits_come_back_exactly_with_its_adapter(pruned, tmp_path):
    from qpruner.finetune import load_adapter, save_adapter
    tiny, directory = pruned
    plan, quant = PrecisionPlan(("nf4", "int8", "fp4", "bf16")), QuantConfig()
    config = tiny.config.to_dict()
    built, _ = build_quantized(config, SafetensorsDir(directory), plan, quant, FT, torch.device("cpu"))
    with torch.no_grad():
        for n, p in built.named_parameters():   # a "trained" adapter: moved away from its initialisation
            if "lora_B" in n:
                p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    save_quantized(built, quant, out)
    save_adapter(built, out / "adapter")
    model = load_adapter(load_quantized(out, plan, quant, "cpu"), out / "adapter")
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, built.eval()(x).logits)
