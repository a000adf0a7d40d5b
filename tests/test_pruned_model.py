"""Pruned models saved as safetensors that plain transformers loads after `import qpruner`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import qpruner  # noqa: F401  (registers the pruned classes)
from qpruner import models, prune
from qpruner.config import PruneConfig, build_job
from qpruner.job import load_or_prune, prune_key
from qpruner.pruned_model import load_pruned, save_pruned

LOAD_IN_FRESH_PYTHON = """
import sys, numpy as np, torch, qpruner, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], use_safetensors=True).eval()
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
x = torch.tensor(tok.encode(sys.argv[2], add_special_tokens=False))[None]
with torch.no_grad():
    np.save(sys.argv[3], model(x).logits.numpy())
print(type(model).__name__)
"""


@pytest.mark.parametrize("scope", ["block", "channel", "layer"])
def test_saved_pruned_model_loads_with_plain_transformers(tmp_path, tiny, tiny_splits, scope):
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(scope=scope, ratio=0.5, round_to=16))
    save_pruned(tiny, models.byte_tokenizer(), tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for f in files)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qpruner_llama"
    text = "def f(x):\n    return x"
    out = tmp_path / "logits.npy"
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PYTHON, str(tmp_path / "m"), text, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "QPrunerLlamaForCausalLM"
    with torch.no_grad():
        expected = tiny(torch.tensor(list(text.encode()))[None]).logits.numpy()
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


def test_load_pruned_keeps_ties_and_widths(tmp_path, tiny, tiny_splits):
    report = prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    save_pruned(tiny, models.byte_tokenizer(), tmp_path)
    model, tok = load_pruned(tmp_path)
    assert models.layer_widths(model) == report.widths_after
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.encode("ab", add_special_tokens=False) == [97, 98]


def _job(tmp_path, name="j", **prune_kw):
    return build_job({"name": name, "results_dir": str(tmp_path), "device": "cpu", "model": {"source": "tiny"},
                      "data": {"seq_len": 64, "calib_samples": 4, "eval_samples": 8},
                      "prune": {"ratio": 0.5, **prune_kw}})


def test_search_reuses_a_matching_pruned_model(tmp_path, monkeypatch):
    job = _job(tmp_path)
    first = load_or_prune(job, torch.device("cpu"))
    assert not first.reused and (tmp_path / "j" / "pruned" / "qpruner_prune.json").is_file()
    import qpruner.job as job_mod
    monkeypatch.setattr(job_mod.prune, "prune_", lambda *a, **k: pytest.fail("pruned again"))
    second = load_or_prune(job, torch.device("cpu"))
    assert second.reused and second.report == first.report
    x = first.splits.eval[:2]
    with torch.no_grad():
        assert torch.allclose(second.model(x).logits, first.model(x).logits)
    assert torch.equal(second.splits.train, first.splits.train)
    bigger_eval = build_job({"name": "j", "results_dir": str(tmp_path), "device": "cpu", "model": {"source": "tiny"},
                             "data": {"seq_len": 64, "calib_samples": 4, "eval_samples": 12}, "prune": {"ratio": 0.5}})
    third = load_or_prune(bigger_eval, torch.device("cpu"))   # only the evaluation size changed: no re-prune
    assert third.reused and third.splits.eval.shape[0] == 12 and torch.equal(third.splits.calib, first.splits.calib)


def test_a_different_config_or_an_interrupted_save_prunes_again(tmp_path):
    job = _job(tmp_path)
    load_or_prune(job, torch.device("cpu"))
    other = _job(tmp_path, ratio=0.25)
    assert prune_key(other) != prune_key(job)
    assert not load_or_prune(other, torch.device("cpu")).reused
    pruned = tmp_path / "j" / "pruned"
    (pruned / "qpruner_prune.json").unlink()  # as an interrupted save leaves it: no record, the partial marker
    (pruned / "qpruner_prune.partial").write_text("")
    assert not load_or_prune(other, torch.device("cpu")).reused
    assert load_or_prune(other, torch.device("cpu")).reused


def test_pruning_again_never_deletes_a_file_qpruner_did_not_write(tmp_path):
    from qpruner.errors import ResultsError
    job = _job(tmp_path)
    load_or_prune(job, torch.device("cpu"))
    mine = tmp_path / "j" / "pruned" / "notes.txt"
    mine.write_text("my notes")
    with pytest.raises(ResultsError, match="notes.txt"):
        load_or_prune(job, torch.device("cpu"), force=True)
    assert mine.read_text() == "my notes" and (mine.parent / "model.safetensors").is_file()
    foreign = tmp_path / "k" / "pruned"   # a directory with no qpruner record at all
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_text("not ours")
    with pytest.raises(ResultsError, match="did not write"):
        load_or_prune(_job(tmp_path, name="k"), torch.device("cpu"))
    assert (foreign / "model.safetensors").read_text() == "not ours"


@pytest.mark.parametrize("prune_kw", [{"ratio": 0.5}, {"ratio": 0.3, "ranking": "global"}, {"param_ratio": 0.2}])
def test_layout_before_pruning_is_exact_or_a_floor(prune_kw):
    """The budget check before pruning prices the narrowest layers the config can leave: exactly the
    pruned model's shapes under local ranking with a fixed ratio, never more than them otherwise."""
    from qpruner import prune
    from qpruner.config import PruneConfig
    from qpruner.memory import ModelLayout
    loaded = models.load_model(build_job({"model": {"source": "tiny"}}).model, torch.device("cpu"))
    before, layout = models.layer_widths(loaded.model), ModelLayout.from_model(loaded.model)
    cfg = PruneConfig(**prune_kw)
    predicted = layout.narrowed(before, prune.narrowest_widths(before, cfg))
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    prune.prune_(loaded.model, calib, cfg)
    actual = ModelLayout.from_model(loaded.model)
    if prune_kw == {"ratio": 0.5}:
        assert predicted == actual
    else:
        assert all(p.numel <= a.numel for lp, la in zip(predicted.layers, actual.layers) for p, a in zip(lp, la))
        assert predicted.linear_numel < actual.linear_numel


def test_a_budget_no_plan_can_meet_fails_before_pruning(tmp_path, monkeypatch):
    from qpruner.errors import PlanError
    import qpruner.job as job_mod
    monkeypatch.setattr(job_mod.prune, "prune_", lambda *a, **k: pytest.fail("pruned before the budget check"))
    job = build_job({"name": "j", "results_dir": str(tmp_path), "device": "cpu", "model": {"source": "tiny"},
                     "data": {"seq_len": 64, "calib_samples": 4, "eval_samples": 8}, "prune": {"ratio": 0.5},
                     "policy": {"budget_gb": 1e-5}})
    with pytest.raises(PlanError, match=r"budget_gb=1e-05.*all-4-bit, needs .* GB .*before pruning"):
        load_or_prune(job, torch.device("cpu"))
    assert not (tmp_path / "j" / "pruned").exists()


@pytest.mark.parametrize("how", ["old_record", "interrupted"])
def test_without_a_file_list_only_the_exact_names_a_save_writes_are_ours(tmp_path, how):
    """#25.2: a record of an earlier version (no ``files``) or an interrupted save: ``*.safetensors`` and
    ``tokenizer*`` of the user's are not taken for ours, nor is anything present before the save began."""
    import json

    from qpruner.errors import ResultsError
    from qpruner.pruned_model import foreign_files
    job = _job(tmp_path)
    load_or_prune(job, torch.device("cpu"))
    pruned = tmp_path / "j" / "pruned"
    record = pruned / "qpruner_prune.json"
    if how == "old_record":
        meta = json.loads(record.read_text())
        meta.pop("files")
        record.write_text(json.dumps(meta))
    else:
        record.unlink()
        (pruned / "qpruner_prune.partial").write_text(json.dumps({"present_before": ["config.json"]}))
    (pruned / "my_finetuned_lora.safetensors").write_text("mine")
    (pruned / "tokenizer_notes.md").write_text("mine too")
    foreign = foreign_files(pruned)
    assert {"my_finetuned_lora.safetensors", "tokenizer_notes.md"} <= set(foreign)
    assert ("config.json" in foreign) == (how == "interrupted") and "model.safetensors" not in foreign
    with pytest.raises(ResultsError, match="nothing was deleted"):
        load_or_prune(job, torch.device("cpu"), force=True)
    assert (pruned / "my_finetuned_lora.safetensors").read_text() == "mine"
    assert (pruned / "tokenizer_notes.md").read_text() == "mine too"
