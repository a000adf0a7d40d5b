"""Trials read the pruned model by location, one linear at a time, with LoftQ cached per unit x format."""

import dataclasses
import os

import pytest
import torch

from qpruner import models
from qpruner.build import build_quantized, quantized_with_lora
from qpruner.config import EvalConfig, FinetuneConfig, QuantConfig
from qpruner.errors import ModelError
from qpruner.loftq import LoftQCache
from qpruner.memory import Budget, ModelLayout
from qpruner.plan import PrecisionPlan
from qpruner.pruned_model import save_pruned
from qpruner.trial import TrialContext, run_trial
from qpruner.weights import COMPLETE_FILE, PrunedWeights, SafetensorsDir, node_copy, open_weights, publish

PLAN = PrecisionPlan(("nf4", "int8", "fp4", "bf16"))
FT = FinetuneConfig(steps=2, batch_size=2, lora_r=2, loftq_formats=("nf4", "fp4", "int8", "bf16"))


@pytest.fixture
def pruned(tiny, tiny_splits, tmp_path):
    """The tiny model pruned by half, in memory and saved as a pruned-model directory."""
    from qpruner import prune
    from qpruner.config import PruneConfig
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    save_pruned(tiny, models.byte_tokenizer(), tmp_path / "pruned", {"key": "k0"})
    return tiny, tmp_path / "pruned"


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor of a built model (quantized data, quantization statistics, LoRA), by name."""
    out = {}
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            out[f"{name}.{pname}"] = p.detach().clone()
            state = getattr(p, "quant_state", None)
            if state is not None:
                for k, v in state.as_dict(packed=True).items():
                    out[f"{name}.{pname}.qs.{k}"] = v.clone()
            if getattr(p, "SCB", None) is not None:
                out[f"{name}.{pname}.SCB"] = p.SCB.clone()
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _context(tiny, tiny_splits, weights, cache=None, ft=FT):
    return TrialContext(tiny.config.to_dict(), weights, ModelLayout.from_model(tiny), tiny_splits.train[:64],
                        tiny_splits.eval, QuantConfig(), ft, EvalConfig(), Budget(avg_bits=16.5), loftq_cache=cache)


def test_a_model_read_linear_by_linear_equals_the_one_built_in_memory(pruned):
    tiny, directory = pruned
    config, state = models.model_state(tiny)
    ref, ref_bytes = quantized_with_lora(models.build_model(config, state), PLAN, QuantConfig(), FT, torch.device("cpu"))
    got, got_bytes = build_quantized(config, SafetensorsDir(directory), PLAN, QuantConfig(), FT, torch.device("cpu"))
    _same(_tensors(ref), _tensors(got))
    assert got_bytes == ref_bytes


def test_the_linear_by_linear_build_equals_the_whole_model_loftq_then_quantize_it_replaced(pruned):
    """The earlier path (LoftQ over the whole model, then quantize_ over the whole model) gives the same tensors."""
    from qpruner.finetune import attach_lora
    from qpruner.loftq import load_adapters_, loftq_model_
    from qpruner.quantize import quantize_
    tiny, directory = pruned
    config, state = models.model_state(tiny)
    old = models.build_model(config, state)
    init = loftq_model_(old, PLAN, QuantConfig(), FT, "cpu", torch.float32)
    quantize_(old, PLAN, QuantConfig(), "cpu")
    torch.manual_seed(FT.seed)
    old = attach_lora(old, FT)
    load_adapters_(old, init)
    new, _ = build_quantized(config, SafetensorsDir(directory), PLAN, QuantConfig(), FT, torch.device("cpu"))
    _same(_tensors(old), _tensors(new))


def test_a_cached_loftq_build_is_bit_identical_and_runs_no_loftq(pruned, tmp_path, monkeypatch):
    tiny, directory = pruned
    config = tiny.config.to_dict()
    cpu = torch.device("cpu")
    cache = LoftQCache(tmp_path / "cache")
    cold, _ = build_quantized(config, SafetensorsDir(directory), PLAN, QuantConfig(), FT, cpu, cache)
    assert cache.misses == 4 * 7 and cache.hits == 0 and len(os.listdir(tmp_path / "cache")) == 28
    import qpruner.build as build_mod
    monkeypatch.setattr(build_mod, "loftq_linear", lambda *a, **k: pytest.fail("LoftQ ran on a warm cache"))
    monkeypatch.setattr(build_mod, "convert_linear", lambda *a, **k: pytest.fail("quantized again on a warm cache"))
    warm_cache = LoftQCache(tmp_path / "cache")
    warm, _ = build_quantized(config, SafetensorsDir(directory), PLAN, QuantConfig(), FT, cpu, warm_cache)
    assert warm_cache.hits == 28 and warm_cache.misses == 0
    _same(_tensors(cold), _tensors(warm))


def test_trials_by_location_cold_warm_and_uncached_give_the_same_result(pruned, tiny_splits, tmp_path):
    tiny, directory = pruned
    config, state = models.model_state(tiny)
    weights = PrunedWeights(str(directory), "k0")
    by_value = run_trial(_context(tiny, tiny_splits, state), PLAN)
    cold = run_trial(_context(tiny, tiny_splits, weights, str(tmp_path / "loftq")), PLAN)
    warm = run_trial(_context(tiny, tiny_splits, weights, str(tmp_path / "loftq")), PLAN)
    assert by_value.status == cold.status == warm.status == "ok"
    for r in (cold, warm):
        assert r.objective == by_value.objective and r.nll == by_value.nll and r.weight_bytes == by_value.weight_bytes
        assert r.train_loss_final == by_value.train_loss_final
    assert len(list((tmp_path / "loftq").glob("k0-*/L*.safetensors"))) == 28


def test_the_cache_is_keyed_by_every_setting_that_changes_its_result(tmp_path):
    cpu, f32 = torch.device("cpu"), torch.float32
    base = LoftQCache.folder(tmp_path, "k0", QuantConfig(), FT, cpu, f32)
    assert base == LoftQCache.folder(tmp_path, "k0", QuantConfig(), FT, cpu, f32)
    others = [LoftQCache.folder(tmp_path, "k1", QuantConfig(), FT, cpu, f32),
              LoftQCache.folder(tmp_path, "k0", QuantConfig(blocksize=128), FT, cpu, f32),
              LoftQCache.folder(tmp_path, "k0", QuantConfig(double_quant=False), FT, cpu, f32),
              LoftQCache.folder(tmp_path, "k0", QuantConfig(), dataclasses.replace(FT, lora_r=4), cpu, f32),
              LoftQCache.folder(tmp_path, "k0", QuantConfig(), dataclasses.replace(FT, loftq_iters=1), cpu, f32),
              LoftQCache.folder(tmp_path, "k0", QuantConfig(), dataclasses.replace(FT, lora_alpha=32), cpu, f32),
              LoftQCache.folder(tmp_path, "k0", QuantConfig(), FT, cpu, torch.bfloat16)]
    assert len({base, *others}) == 1 + len(others)


def test_a_damaged_cache_entry_is_computed_again(pruned, tmp_path):
    tiny, directory = pruned
    config = tiny.config.to_dict()
    cpu = torch.device("cpu")
    plan = PrecisionPlan(("nf4",) * 4)
    cold, _ = build_quantized(config, SafetensorsDir(directory), plan, QuantConfig(), FT, cpu, LoftQCache(tmp_path / "c"))
    entry = sorted((tmp_path / "c").iterdir())[0]
    entry.write_bytes(b"not a safetensors file")
    again = LoftQCache(tmp_path / "c")
    warm, _ = build_quantized(config, SafetensorsDir(directory), plan, QuantConfig(), FT, cpu, again)
    assert again.misses == 1 and again.hits == 27
    _same(_tensors(cold), _tensors(warm))


def test_an_unwritable_cache_costs_only_the_time(pruned, tmp_path):
    tiny, directory = pruned
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = LoftQCache(blocker / "cache")   # a folder under a file: cannot be created
    model, _ = build_quantized(tiny.config.to_dict(), SafetensorsDir(directory), PLAN, QuantConfig(), FT,
                               torch.device("cpu"), cache)
    assert cache.misses == 28 and model is not None


def test_sharded_weights_are_read_too(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    source = SafetensorsDir(tmp_path / "sharded")
    config, state = models.model_state(tiny)
    assert set(source.keys()) == set(state)
    for k in state:
        assert torch.equal(source[k], state[k])


def test_weights_a_node_cannot_see_fail_with_what_to_do(tmp_path):
    with pytest.raises(ModelError, match="not at .* on this node.*storage_path"):
        open_weights(PrunedWeights(str(tmp_path / "elsewhere"), "k0"))


def test_published_weights_reach_a_node_through_its_local_cache(pruned, tmp_path, monkeypatch):
    _, directory = pruned
    monkeypatch.setenv("QPRUNER_CACHE_DIR", str(tmp_path / "node"))
    uri = (tmp_path / "bucket").as_uri()
    weights = publish(directory, uri, "k0")
    assert weights.is_uri and weights.location == f"{uri}/pruned/k0"
    assert (tmp_path / "bucket" / "pruned" / "k0" / COMPLETE_FILE).is_file()
    local = node_copy(weights)
    assert local == tmp_path / "node" / "weights" / "k0" and (local / COMPLETE_FILE).is_file()
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in local.iterdir() if p.name != COMPLETE_FILE)
    (tmp_path / "bucket" / "pruned" / "k0" / "model.safetensors").unlink()   # a second call reads nothing remote
    assert node_copy(weights) == local
    assert publish(directory, uri, "k0") == weights                         # published once per pruned model


def test_an_incomplete_publication_is_never_read(pruned, tmp_path, monkeypatch):
    monkeypatch.setenv("QPRUNER_CACHE_DIR", str(tmp_path / "node"))
    (tmp_path / "bucket" / "pruned" / "k9").mkdir(parents=True)
    with pytest.raises(ModelError, match="no complete pruned model"):
        node_copy(PrunedWeights((tmp_path / "bucket").as_uri() + "/pruned/k9", "k9"))


def test_a_pruned_model_written_again_gets_a_new_identity_and_never_meets_old_cache_entries(pruned, tiny_splits,
                                                                                          tmp_path):
    from qpruner.pruned_model import read_meta
    from qpruner.weights import digest
    tiny, directory = pruned
    first = digest(directory)
    assert first == digest(directory) and len(first) == 16
    with torch.no_grad():
        models.decoder_layers(tiny)[0].self_attn.q_proj.weight.add_(1.0)   # the same key, other weights
    save_pruned(tiny, models.byte_tokenizer(), tmp_path / "again", {"key": "k0"}, digest=True)
    assert digest(tmp_path / "again") != first
    assert read_meta(tmp_path / "again")["weights_sha256"] == digest(tmp_path / "again")


def test_a_cache_entry_of_another_shape_is_a_miss(pruned, tmp_path):
    tiny, directory = pruned
    config, cpu, plan = tiny.config.to_dict(), torch.device("cpu"), PrecisionPlan(("nf4",) * 4)
    build_quantized(config, SafetensorsDir(directory), plan, QuantConfig(), FT, cpu, LoftQCache(tmp_path / "c"))
    q, k = tmp_path / "c" / "L000.q_proj.nf4.safetensors", tmp_path / "c" / "L000.k_proj.nf4.safetensors"
    q.write_bytes(k.read_bytes())                       # another linear's entry under this one's name
    again = LoftQCache(tmp_path / "c")
    build_quantized(config, SafetensorsDir(directory), plan, QuantConfig(), FT, cpu, again)
    assert again.misses == 1 and again.hits == 27          # q_proj and k_proj differ in shape (GQA)


def test_without_the_pread_backend_tensors_are_still_read(pruned, monkeypatch):
    import safetensors

    import qpruner.weights as weights_mod
    _, directory = pruned
    real = safetensors.safe_open

    def old_safe_open(path, framework, **kw):
        if "backend" in kw:
            raise TypeError("safe_open() got an unexpected keyword argument 'backend'")
        return real(path, framework=framework, **kw)

    monkeypatch.setattr(safetensors, "safe_open", old_safe_open)
    source = weights_mod.SafetensorsDir(directory)
    name = next(iter(source.keys()))
    assert source[name].numel() > 0
