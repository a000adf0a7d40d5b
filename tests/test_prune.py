import copy

import pytest
import torch

from qpruner import models, prune, surgery
from qpruner.config import PruneConfig
from qpruner.errors import ConfigError
from qpruner.group_importance import ESTIMATORS, accumulate_gradients, group_scores

from helpers import prune_and_reference

# ----------------------------------------------------------------------------------------------
# helpers


def closed_form_params(config, widths, vocab=256, tied=True) -> int:
    """Parameter count of a Llama with per-layer widths, written out by hand (no biases)."""
    h, hd = config.hidden_size, models.head_dim(config)
    total = vocab * h * (1 if tied else 2) + h  # embeddings (+ head), final norm
    for w in widths:
        total += h * w.heads * hd * 2 + h * w.kv_heads * hd * 2  # q, o and k, v
        total += 3 * h * w.intermediate + 2 * h                  # gate, up, down; two norms
    return total


# ----------------------------------------------------------------------------------------------
# block scope


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
    assert torch.isfinite(tiny(input_ids=x, labels=x).loss)
    assert tiny.config.layer_widths[1] == [2, 1, 96]
    assert type(tiny).__name__ == "QPrunerLlamaForCausalLM"


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


@pytest.mark.parametrize("importance", ESTIMATORS)
@pytest.mark.parametrize("ranking", ["local", "global"])
def test_pruned_logits_equal_masked_original(tiny, tiny_splits, importance, ranking):
    """Physically removing heads/channels == zeroing their contribution in the original model."""
    cfg = PruneConfig(ratio=0.5, importance=importance, ranking=ranking, round_to=16)
    ref, predicted, sel = prune_and_reference(tiny, tiny_splits.calib[:2], cfg)
    assert sel.keep_kv and sel.keep_channels
    assert models.count_params(tiny) == predicted
    x = tiny_splits.eval[:2]
    with torch.no_grad():
        assert torch.allclose(tiny(x).logits, ref(x).logits, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["sum", "mean", "max"])
def test_aggregations_combine_the_coupled_parameters(tiny, tiny_splits, aggregation):
    layer = models.decoder_layers(tiny)[1]
    parts = surgery.attention_parts(layer, tiny.config)
    per_param = torch.stack([(p.param.data.abs().movedim(p.dim, 0).reshape(p.n, -1).sum(1)) for p in parts])
    expected = {"sum": per_param.sum(0), "mean": per_param.mean(0), "max": per_param.amax(0)}[aggregation]
    assert torch.allclose(group_scores(parts, "l1", aggregation), expected)


def test_global_ranking_prunes_the_unimportant_layer_harder(tiny, tiny_splits):
    with torch.no_grad():  # make layer 2's MLP tiny in magnitude: it should lose most channels
        for name in ("gate_proj", "up_proj", "down_proj"):
            models.layer_linears(models.decoder_layers(tiny)[2])[name].weight.mul_(0.01)
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.4, importance="l2", ranking="global",
                                                               attention=False, round_to=16))
    # 40% of the 384 pooled channels = 154, all of them layer 2's weakest: 192 - 154 = 38 -> 32 (multiple of 16)
    assert report.widths_after[1].intermediate == 192
    assert report.widths_after[2].intermediate == 32


def test_param_ratio_is_met(tiny, tiny_splits):
    for target in (0.1, 0.25):
        model = models.tiny_model()
        report = prune.prune_(model, tiny_splits.calib, PruneConfig(param_ratio=target, layer_start=0, layer_end=4,
                                                                    round_to=8, importance="l2", attention=False))
        # one step of 8 channels in all 4 layers is 2.9% of the parameters: within half a step
        assert abs(report.removed_fraction - target) < 0.015, (target, report.removed_fraction)


def test_ratio_zero_changes_nothing(tiny, tiny_splits):
    before = models.count_params(tiny)
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.0))
    assert report.params_after == before and report.removed_fraction == 0.0


def test_param_ratio_zero_changes_nothing_whatever_the_group_ratio(tiny, tiny_splits):
    """A joint search's 0% variant: param_ratio 0 overrides ratio (0.2 by default), it does not fall back to it."""
    before, widths = models.count_params(tiny), models.layer_widths(tiny)
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5, param_ratio=0.0))
    assert report.params_after == before and models.layer_widths(tiny) == widths
    assert prune.narrowest_widths(widths, PruneConfig(ratio=0.5, param_ratio=0.0)) == widths


# ----------------------------------------------------------------------------------------------
# channel and layer scopes


@pytest.mark.parametrize("importance", ["taylor", "l1", "param_mix"])
def test_hidden_channel_pruning_is_exactly_masking(tiny, tiny_splits, importance):
    cfg = PruneConfig(scope="channel", ratio=0.25, round_to=16, importance=importance)
    ref, predicted, sel = prune_and_reference(tiny, tiny_splits.calib[:2], cfg)
    assert tiny.config.hidden_size == 48 and sel.keep_hidden.numel() == 48
    assert models.count_params(tiny) == predicted
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight  # still tied
    x = tiny_splits.eval[:2]
    with torch.no_grad():
        assert torch.allclose(tiny(x).logits, ref(x).logits, atol=1e-4)


def test_layer_pruning_drops_whole_layers(tiny, tiny_splits):
    cfg = PruneConfig(scope="layer", ratio=0.5, importance="taylor")  # layers 1..2 in range: one goes
    ref, predicted, sel = prune_and_reference(tiny, tiny_splits.calib[:2], cfg)
    assert len(sel.keep_layers) == 3 and {0, 3} <= set(sel.keep_layers)
    assert len(models.decoder_layers(tiny)) == 3 and tiny.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in models.decoder_layers(tiny)] == [0, 1, 2]
    assert models.count_params(tiny) == predicted
    x = tiny_splits.eval[:2]
    with torch.no_grad():
        assert torch.allclose(tiny(x).logits, ref(x).logits, atol=1e-5)
        out = tiny.generate(x[:1, :8], max_new_tokens=3, do_sample=False)  # the KV cache indexes the kept layers
    assert out.shape == (1, 11)


# ----------------------------------------------------------------------------------------------
# the estimators against independent computations


def _toy_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def test_taylor_group_score_equals_independent_autograd(tiny, tiny_splits):
    """Element-wise first order: sum |w * dL/dw| over the group's slices, gathered with explicit indices;
    vector-wise: |dL/d alpha| for a scale alpha on the group's weights (w -> alpha * w at alpha = 1)."""
    calib = tiny_splits.calib[:2]
    layer = models.decoder_layers(tiny)[1]
    lin = models.layer_linears(layer)
    hd, group = 16, 2
    accumulate_gradients(tiny, calib, batch_size=2, params=[p.param for p in surgery.attention_parts(layer, tiny.config)])
    parts = surgery.attention_parts(layer, tiny.config)
    ours = group_scores(parts, "taylor")
    ours_vector = group_scores(parts, "taylor_vector")
    tiny.zero_grad(set_to_none=True)
    weights = [lin[n].weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    grads = torch.autograd.grad(_toy_loss(tiny, calib), weights)
    for kv in range(2):
        q_rows = list(range(kv * group * hd, (kv + 1) * group * hd))
        kv_rows = list(range(kv * hd, (kv + 1) * hd))
        slices = [(0, q_rows, 0), (1, kv_rows, 0), (2, kv_rows, 0), (3, q_rows, 1)]
        expected = 0.0
        for idx, rows, dim in slices:
            w, g = weights[idx], grads[idx]
            sel_w, sel_g = (w[rows], g[rows]) if dim == 0 else (w[:, rows], g[:, rows])
            expected += float((sel_w * sel_g).abs().sum().detach())
        assert ours[kv].item() == pytest.approx(expected, rel=1e-4)
        # vector-wise: for each coupled slice, d loss / d alpha with that slice scaled by alpha
        names = {id(p): n for n, p in tiny.named_parameters()}
        expected_vector = 0.0
        for idx, rows, dim in slices:
            w = weights[idx]
            mask = torch.zeros_like(w)
            if dim == 0:
                mask[rows] = 1
            else:
                mask[:, rows] = 1
            alpha = torch.ones((), requires_grad=True)
            scaled = {names[id(w)]: w.detach() * (1 + (alpha - 1) * mask)}
            out = torch.func.functional_call(tiny, scaled, (), {"input_ids": calib, "labels": calib})
            (d_alpha,) = torch.autograd.grad(out.loss, alpha)
            expected_vector += abs(float(d_alpha))
        assert ours_vector[kv].item() == pytest.approx(expected_vector, rel=1e-3)


def test_second_order_uses_per_sample_squared_gradients(tiny, tiny_splits):
    calib = tiny_splits.calib[:3]
    layer = models.decoder_layers(tiny)[1]
    parts = surgery.mlp_parts(layer)
    fisher = accumulate_gradients(tiny, calib, params=[p.param for p in parts], fisher=True)
    ours = group_scores(parts, "param_second", fisher=fisher)
    mix = group_scores(parts, "param_mix", fisher=fisher)
    mean_grads = {id(p.param): p.param.grad.clone() for p in parts}
    tiny.zero_grad(set_to_none=True)
    weights = [p.param for p in parts]
    squares = [torch.zeros_like(w) for w in weights]
    detached = [w.detach() for w in weights]
    for b in range(3):
        for s, g in zip(squares, torch.autograd.grad(_toy_loss(tiny, calib[b:b + 1]), weights)):
            s += g * g
    for c in (0, 7, 100):
        exp2 = sum(float((w * s * w)[c].abs().sum()) if p.dim == 0 else float((w * s * w)[:, c].abs().sum())
                   for p, w, s in zip(parts, detached, squares))
        assert ours[c].item() == pytest.approx(exp2, rel=1e-4)
        expm = 0.0
        for p, w, s in zip(parts, weights, squares):
            term = (-w.detach() * mean_grads[id(w)] + 0.5 * w.detach() * s * w.detach()).abs()
            expm += float(term[c].sum() if p.dim == 0 else term[:, c].sum())
        assert mix[c].item() == pytest.approx(expm, rel=1e-4)


def test_taylor_keeps_a_group_that_matters(tiny, tiny_splits):
    """A KV group whose weights were scaled up carries more first-order importance and is kept."""
    layer = models.decoder_layers(tiny)[1]
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            w = models.layer_linears(layer)[name].weight
            w[w.shape[0] // 2:] *= 8.0  # KV group 1 (and its query heads)
    reference = copy.deepcopy(tiny)
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5, layer_start=1, layer_end=2))
    kept = models.layer_linears(models.decoder_layers(tiny)[1])["k_proj"].weight
    assert torch.equal(kept, models.layer_linears(models.decoder_layers(reference)[1])["k_proj"].weight[16:])


# ----------------------------------------------------------------------------------------------
# other layouts


def _tiny_arch(arch: str):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=True)).eval()  # q/k/v biases


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("scope", ["block", "channel", "layer"])
def test_other_layouts_prune_mask_and_rebuild(arch, scope, tiny_splits):
    model = _tiny_arch(arch)
    cfg = PruneConfig(ratio=0.5, layer_start=0, layer_end=3, scope=scope, round_to=16)
    ref, predicted, _ = prune_and_reference(model, tiny_splits.calib[:2], cfg)
    assert models.count_params(model) == predicted
    if scope == "block":
        assert models.layer_widths(model) == (models.LayerWidth(2, 1, 64),) * 3
        if arch == "qwen2":
            assert models.layer_linears(models.decoder_layers(model)[0])["k_proj"].bias.shape == (16,)
    x = tiny_splits.eval[:2]
    config_dict, state = models.model_state(model)
    rebuilt = models.build_model(config_dict, state)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x).logits, atol=1e-4)
        assert torch.allclose(rebuilt(x).logits, model(x).logits, atol=1e-5)


def test_report_round_trips(tiny, tiny_splits):
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    assert prune.PruneReport.from_dict(report.to_dict()) == report
    assert "block" in report.summary()


def test_a_ratio_the_kv_groups_cannot_meet_is_said_with_the_exact_amounts(tiny, tiny_splits, caplog):
    """GQA: with 2 KV groups per layer, ratio 0.3 can only remove 1 group (50%) or none; say which, and
    what amounts are exact. The report states what went in the model's own units."""
    import logging
    widths = models.layer_widths(tiny)
    assert prune.attention_rounding(widths, PruneConfig(ratio=0.5), 0.5) is None
    with caplog.at_level(logging.WARNING, logger="qpruner.prune"):
        report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.3))
    assert "2 KV groups per layer cannot lose 30.0%: ratio 0.3 removes 1 (50.0% of attention); " \
           "exact amounts: 0.0%, 50.0%" in caplog.text
    assert "2 of 4 KV groups (50.0% of attention)" in report.summary()
    assert "MLP channels" in report.summary()
