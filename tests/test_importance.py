import pytest
import torch

from qpruner import models, unit_importance
from qpruner.config import QuantConfig, ScoreConfig, build_job
from qpruner.errors import ConfigError
from qpruner.unit_importance import ESTIMATORS, score_units


_TRAINED = {}


def _one_layer_matters(model, splits=None):
    """Silence every layer but layer 2 (zero, and freeze, what they write to the residual stream), then
    train briefly so that layer 2 — the only layer the prediction depends on — does something useful."""
    frozen = []
    with torch.no_grad():
        for i, layer in enumerate(models.decoder_layers(model)):
            if i != 2:
                for name in ("o_proj", "down_proj"):
                    w = models.layer_linears(layer)[name].weight
                    w.zero_()
                    frozen.append(w)
    if "state" not in _TRAINED:
        from qpruner import data
        from qpruner.config import DataConfig
        train = data.load_splits(DataConfig(seq_len=64, calib_samples=4, eval_samples=8), models.byte_tokenizer()).train
        for w in frozen:
            w.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(120):
            batch = train[torch.randint(0, len(train), (8,), generator=gen)]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        for w in frozen:
            w.requires_grad_(True)
        _TRAINED["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_TRAINED["state"])
    return model


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_every_estimator_ranks_the_layer_that_matters_first(tiny, tiny_splits, method):
    _one_layer_matters(tiny)
    scores = score_units(tiny, tiny_splits.calib, ScoreConfig(method=method), "layer", QuantConfig())
    assert len(scores) == 4 and scores.unit == "layer"
    assert scores.ranking()[0] == 2, scores.scores
    others = [s for i, s in enumerate(scores.scores) if i != 2]
    assert scores.scores[2] > max(abs(s) for s in others)


@pytest.mark.parametrize("method", ["fisher", "taylor", "block_influence", "mutual_information", "sensitivity"])
def test_group_units(tiny, tiny_splits, method):
    _one_layer_matters(tiny)
    scores = score_units(tiny, tiny_splits.calib, ScoreConfig(method=method), "group", QuantConfig())
    assert len(scores) == 8 and scores.ranking()[0] in (4, 5)  # layer 2's attention or MLP


@pytest.mark.parametrize("method", ["fisher", "taylor", "sensitivity"])
def test_linear_units(tiny, tiny_splits, method):
    _one_layer_matters(tiny)
    scores = score_units(tiny, tiny_splits.calib[:2], ScoreConfig(method=method), "linear", QuantConfig())
    assert len(scores) == 28 and 14 <= scores.ranking()[0] < 21


def test_residual_estimators_refuse_linear_units(tiny, tiny_splits):
    with pytest.raises(ConfigError, match="not 'linear' units"):
        score_units(tiny, tiny_splits.calib, ScoreConfig(method="block_influence"), "linear")
    with pytest.raises(Exception, match="policy.unit=linear"):
        build_job({"score": {"method": "block_influence"}, "policy": {"unit": "linear"}})
    build_job({"score": {"method": "mutual_information"}, "policy": {"unit": "linear"}})


def test_sensitivity_leaves_the_model_as_it_was(tiny, tiny_splits):
    x = tiny_splits.eval[:2]
    with torch.no_grad():
        before = tiny(x).logits
    score_units(tiny, tiny_splits.calib[:2], ScoreConfig(method="sensitivity"), "group", QuantConfig())
    with torch.no_grad():
        assert torch.equal(tiny(x).logits, before)
    assert all(type(m) is torch.nn.Linear for layer in models.decoder_layers(tiny)
               for m in models.layer_linears(layer).values())


def test_mutual_information_is_the_information_lost_by_4_instead_of_8_bits(tiny, tiny_splits):
    """The second-order estimate tracks the measured loss: E KL(p || p~) with a unit at 4 bits minus
    with it at int8, measured by quantizing each group for real (one forward pass each)."""
    import numpy as np
    calib = tiny_splits.calib
    quant = QuantConfig()
    mi = unit_importance._mutual_information(tiny, calib, "group", quant=quant)
    with torch.no_grad():
        ref = tiny(input_ids=calib).logits.float().log_softmax(-1)
    measured = []
    from qpruner.quantize import convert_linear
    for layer in models.decoder_layers(tiny):
        originals = models.layer_linears(layer)
        for names in unit_importance.UNIT_MEMBERS["group"]:
            kls = []
            for fmt in (quant.four_bit, "int8"):
                for n in names:
                    models.set_layer_linear(layer, n, convert_linear(originals[n], fmt, quant, "cpu", torch.float32))
                with torch.no_grad():
                    q = tiny(input_ids=calib).logits.float().log_softmax(-1)
                kls.append(float((ref.exp() * (ref - q)).sum(-1).mean()))
                for n in names:
                    models.set_layer_linear(layer, n, originals[n])
            measured.append(kls[0] - kls[1])
    per_token = [m / calib.numel() for m in mi]   # the estimate sums over a sequence's tokens
    assert all(m > 0 for m in mi)
    rank = lambda v: np.argsort(np.argsort(v))
    assert np.corrcoef(rank(per_token), rank(measured))[0, 1] > 0.7, (per_token, measured)
    assert 0.2 < sum(per_token) / sum(measured) < 5.0   # the right size, not only the right order


def test_scores_are_cached_per_model_data_method_and_unit(tmp_path, monkeypatch, tiny, tiny_splits):
    from qpruner import job as job_mod
    job = build_job({"name": "j", "results_dir": str(tmp_path), "model": {"source": "tiny"}})
    path = tmp_path / "scores.json"
    first = job_mod.load_or_score(job, tiny, tiny_splits.calib, path)
    monkeypatch.setattr(job_mod.unit_importance, "score_units", lambda *a, **k: pytest.fail("scored again"))
    again = job_mod.load_or_score(job, tiny, tiny_splits.calib, path)
    assert again.scores == first.scores and again.method == first.method
    monkeypatch.undo()
    other = build_job({"name": "j", "results_dir": str(tmp_path), "model": {"source": "tiny"},
                       "policy": {"unit": "group"}})
    assert len(job_mod.load_or_score(other, tiny, tiny_splits.calib, path)) == 8
