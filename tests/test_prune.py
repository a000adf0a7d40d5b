import pytest
import torch

from qpruner import models, prune
from qpruner.config import PruneConfig
from qpruner.errors import ConfigError


def closed_form_params(config, widths) -> int:
    """Parameter count of a Llama with per-layer widths, written out by hand."""
    h, hd, v = config.hidden_size, models.head_dim(config), config.vocab_size
    total = v * h * (1 if config.tie_word_embeddings else 2) + h  # embeddings (+ head), final norm
    for w in widths:
        total += h * w.heads * hd * 2 + h * w.kv_heads * hd * 2  # q, o and k, v
        total += 3 * h * w.intermediate + 2 * h                  # gate, up, down; two norms
    return total


def test_prune_reports_true_counts_and_model_runs(tiny, tiny_splits):
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    assert report.layers == (1, 3)  # first and last layers kept by default
    assert report.params_after == models.count_params(tiny)
    assert report.params_after == closed_form_params(tiny.config, report.widths_after)
    assert report.params_after < report.params_before
    w = report.widths_after
    assert w[0] == w[3] == models.LayerWidth(4, 2, 192)
    assert w[1] == w[2] == models.LayerWidth(2, 1, 96)  # half the KV groups (with their q heads), MLP 96
    x = tiny_splits.eval[:2]
    out = tiny(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    assert tiny.config.qpruner_layer_widths[1] == [2, 1, 96]


def test_widths_are_rounded_to_multiples(tiny, tiny_splits):
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.3, round_to=32, attention=False))
    assert all(w.intermediate % 32 == 0 for w in report.widths_after)
    assert report.widths_after[1].intermediate == 128  # 192 * 0.7 = 134.4 -> 128
    assert report.widths_after[1].kv_heads == 2


def test_layer_range_and_its_validation(tiny, tiny_splits):
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5, layer_start=0, layer_end=4))
    assert all(w.intermediate == 96 for w in report.widths_after)
    with pytest.raises(ConfigError, match="the model has 4 layers"):
        prune.layer_range(PruneConfig(layer_start=3, layer_end=2), 4)


def _mask_(model, layer_idx, keep_kv, keep_ch):
    """Zero the pruned heads' and channels' outgoing weights (o_proj columns, down_proj columns)."""
    layer = models.decoder_layers(model)[layer_idx]
    lin = models.layer_linears(layer)
    hd, cfg = models.head_dim(model.config), model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for kv in range(cfg.num_key_value_heads):
            if kv not in keep_kv:
                cols = slice(kv * group * hd, (kv + 1) * group * hd)
                lin["o_proj"].weight[:, cols] = 0
        drop = [c for c in range(cfg.intermediate_size) if c not in keep_ch]
        lin["down_proj"].weight[:, drop] = 0


@pytest.mark.parametrize("importance", ["taylor", "l2", "random"])
def test_pruned_logits_equal_masked_original(tiny, tiny_splits, importance):
    """Physically removing heads/channels == zeroing their contribution in the original model."""
    reference = models.tiny_model()
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5, importance=importance), seed=1)
    for i in (1, 2):
        # recover which groups/channels were kept by matching rows of the pruned weights
        orig = models.layer_linears(models.decoder_layers(reference)[i])
        new = models.layer_linears(models.decoder_layers(tiny)[i])
        hd = models.head_dim(tiny.config)
        keep_kv = [k for k in range(2) if any(torch.equal(orig["k_proj"].weight[k * hd:(k + 1) * hd],
                                                          new["k_proj"].weight[j * hd:(j + 1) * hd]) for j in range(1))]
        keep_ch = [c for c in range(192) if any(torch.equal(orig["gate_proj"].weight[c], r) for r in new["gate_proj"].weight)]
        assert len(keep_kv) == 1 and len(keep_ch) == 96
        _mask_(reference, i, keep_kv, keep_ch)
    x = tiny_splits.eval[:2]
    with torch.no_grad():
        assert torch.allclose(tiny(x).logits, reference(x).logits, atol=1e-5)


def test_taylor_scores_keep_the_important_group(tiny, tiny_splits):
    """A KV group whose weights were scaled up carries more first-order importance and is kept."""
    layer = models.decoder_layers(tiny)[1]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            w = models.layer_linears(layer)[name].weight
            half = w.shape[0] // 2
            w[half:] *= 8.0  # KV group 1 (and its query heads)
    prune.accumulate_gradients(tiny, tiny_splits.calib)
    attn, _ = prune.group_scores(layer, tiny.config, "taylor")
    assert attn[1] > attn[0]
    tiny.zero_grad(set_to_none=True)
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5, layer_start=1, layer_end=2))
    kept = models.layer_linears(models.decoder_layers(tiny)[1])["k_proj"].weight
    assert kept.abs().mean() > 2.0 * models.layer_linears(models.decoder_layers(models.tiny_model())[1])["k_proj"].weight.abs().mean()


def test_ratio_zero_changes_nothing(tiny, tiny_splits):
    before = models.count_params(tiny)
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.0))
    assert report.params_after == before and report.removed_fraction == 0.0


def _tiny_arch(arch: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=True)).eval()  # q/k/v biases


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_layouts_prune_and_rebuild(arch, tiny_splits):
    model = _tiny_arch(arch)
    report = prune.prune_(model, tiny_splits.calib, PruneConfig(ratio=0.5, layer_start=0, layer_end=3))
    assert report.widths_after == (models.LayerWidth(2, 1, 64),) * 3
    if arch == "qwen2":
        assert models.layer_linears(models.decoder_layers(model)[0])["k_proj"].bias.shape == (16,)
    config_dict, state = models.model_state(model)
    rebuilt = models.build_model(config_dict, state)
    x = tiny_splits.eval[:2]
    with torch.no_grad():
        assert torch.allclose(rebuilt(x).logits, model(x).logits, atol=1e-5)
