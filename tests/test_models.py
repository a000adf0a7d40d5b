import pytest
import torch
from transformers import PreTrainedTokenizerFast

from qpruner import models, surgery
from qpruner.config import ModelConfig
from qpruner.errors import ModelError


def _word_tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the a of to and is in it".split())}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def test_tiny_model_is_seeded_and_runs(tiny):
    again = models.tiny_model()
    x = torch.randint(0, 256, (2, 12))
    assert torch.equal(tiny(x).logits, again(x).logits)
    assert len(models.decoder_layers(tiny)) == 4


def test_local_directory_loads_with_safetensors(tmp_path, tiny):
    tiny.save_pretrained(tmp_path, safe_serialization=True)
    _word_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = models.load_model(ModelConfig(source=str(tmp_path)))
    x = torch.randint(0, 256, (1, 8))
    assert torch.allclose(loaded.model(x).logits, tiny(x).logits)
    assert loaded.tokenizer.encode("the a of", add_special_tokens=False) == [2, 3, 4]


def reference_config(directory):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(directory)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_local_checkpoint_is_read_into_own_memory_exactly_as_from_pretrained(tmp_path, tiny, dtype):
    from transformers import AutoModelForCausalLM
    tiny.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")   # sharded, like a 7B checkpoint
    _word_tokenizer().save_pretrained(tmp_path)
    import qpruner.models as models_mod
    assert models_mod._load_local(tmp_path, reference_config(tmp_path), models_mod.DTYPES[dtype], False) is not None
    loaded = models.load_model(ModelConfig(source=str(tmp_path), dtype=dtype))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=models_mod.DTYPES[dtype])
    ours, theirs = loaded.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight     # tied, as the config says
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded.model(x).logits, reference.eval()(x).logits)


def test_a_checkpoint_with_other_keys_is_left_to_from_pretrained(tmp_path, tiny, monkeypatch):
    from safetensors.torch import load_file, save_file
    tiny.save_pretrained(tmp_path, safe_serialization=True)
    _word_tokenizer().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)   # a legacy key, as old checkpoints carry
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    import qpruner.models as models_mod
    assert models_mod._load_local(tmp_path, tiny.config, torch.float32, False) is None
    loaded = models.load_model(ModelConfig(source=str(tmp_path)))
    x = torch.randint(0, 256, (1, 8))
    assert torch.allclose(loaded.model(x).logits, tiny(x).logits)


def test_unsupported_architecture_is_refused_with_the_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="gpt2.*supported: llama, mistral, qwen2"):
        models.load_model(ModelConfig(source=str(tmp_path)))


def test_hub_id_downloads_through_the_hub_transport(monkeypatch, tmp_path, tiny):
    """Online hub ids: only the HTTP transport is faked; huggingface_hub and transformers run as is."""
    from fake_hub import FakeHub
    repo = tmp_path / "repo"
    tiny.save_pretrained(repo, safe_serialization=True)
    _word_tokenizer().save_pretrained(repo)
    hub = FakeHub({"someone/tiny-llama": repo})
    hub.install(monkeypatch, tmp_path / "cache")
    try:
        loaded = models.load_model(ModelConfig(source="someone/tiny-llama"))
    finally:
        hub.uninstall()
    fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if "/resolve/" in p}
    assert {"config.json", "model.safetensors"} <= fetched
    assert not any(p.endswith((".bin", ".pt", ".pkl")) for _, p in hub.requests if "/resolve/" in p and "GET" in _)
    assert list((tmp_path / "cache").glob("models--someone--tiny-llama/snapshots/*/model.safetensors"))
    x = torch.randint(0, 256, (1, 8))
    assert torch.allclose(loaded.model(x).logits, tiny(x).logits)


def test_build_model_round_trips_a_pruned_model(tiny):
    layers = models.decoder_layers(tiny)
    surgery.prune_layer_(layers[1], tiny.config, torch.tensor([1]), torch.arange(0, 192, 3))
    surgery.to_pruned_(tiny)
    config_dict, state = models.model_state(tiny)
    rebuilt = models.build_model(config_dict, state)
    x = torch.randint(0, 256, (2, 10))
    assert torch.allclose(rebuilt(x).logits, tiny(x).logits, atol=1e-6)
    assert models.layer_widths(rebuilt)[1] == models.LayerWidth(heads=2, kv_heads=1, intermediate=64)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight


def test_build_model_rejects_mismatched_widths(tiny):
    surgery.to_pruned_(tiny)
    config_dict, state = models.model_state(tiny)
    config_dict["layer_widths"] = config_dict["layer_widths"][:3]
    with pytest.raises(Exception, match="layer_widths has 3 entries for 4 layers"):
        models.build_model(config_dict, state)


def test_byte_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer
    tok = models.byte_tokenizer()
    ids = tok.encode("héllo\n  x", add_special_tokens=False)
    assert ids == list("héllo\n  x".encode()) and tok.decode(ids) == "héllo\n  x"
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).encode("héllo", add_special_tokens=False) == ids[:6]
