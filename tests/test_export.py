"""Export a front point, load it with qpruner.load, and reproduce the trial's metrics."""

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

import qpruner
from qpruner.config import load_job
from qpruner.errors import ConfigError, ResultsError
from qpruner.export import export_point, lm_eval
from qpruner.job import run_job
from qpruner.quantize import applied_formats

from helpers import evaluate_export
from test_search_e2e import ROOT


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    job = load_job(ROOT / "tune_jobs" / "tiny_smoke.yaml", [f"results_dir={tmp}", "search.num_trials=4",
                                                           "search.loggers=[tensorboard, csv]"])
    run_job(job)
    return tmp / "tiny_smoke"


def _reproduce(directory, row):
    model, ev = evaluate_export(directory)
    assert ev.perplexity == pytest.approx(row["perplexity"], rel=1e-5)
    assert ev.accuracy == pytest.approx(row["accuracy"], abs=1e-9)
    meta = json.loads((directory / "qpruner_plan.json").read_text())
    assert [f for layer in applied_formats(model) for f in set(layer.values())] == meta["plan"]["formats"]


@pytest.mark.parametrize("point", [0, -1])
def test_exported_points_reproduce_their_trial(searched, point):
    front = pd.read_parquet(searched / "pareto.parquet")
    k = point % len(front)
    out = export_point(searched, k)
    files = {p.name for p in out.iterdir()} | {f"adapter/{p.name}" for p in (out / "adapter").iterdir()}
    assert {"quantized.safetensors", "config.json", "tokenizer.json", "qpruner_plan.json", "README.md",
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
    assert "model.safetensors" not in files                       # the quantized model, not the full-precision one
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    import struct
    weights = (out / "quantized.safetensors").stat().st_size
    header = struct.unpack("<Q", (out / "quantized.safetensors").read_bytes()[:8])[0]
    # the issue's target, 1.15 x weight_bytes (it was 4.3x), met at SmolLM2 size (test_export_smollm2.py); at this
    # toy size each of the 28 linears also carries bitsandbytes' code tables (~1.1 KB) and a header entry
    assert weights - header <= 1.15 * front.iloc[k]["weight_bytes"] + 28 * 1100
    _reproduce(out, front.iloc[k])


def test_an_export_copied_elsewhere_loads_with_no_loftq_and_reproduces(searched, tmp_path, monkeypatch):
    import shutil

    import qpruner.build as build_module
    import qpruner.loftq as loftq_module
    import qpruner.quantize as quantize_module
    front = pd.read_parquet(searched / "pareto.parquet")
    out = export_point(searched, 0, tmp_path / "first")
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    for module, name in ((loftq_module, "loftq_linear"), (build_module, "loftq_linear"),
                         (quantize_module, "convert_linear"), (build_module, "convert_linear")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("loading ran LoftQ or quantized"))
    _reproduce(moved, front.iloc[0])


def test_the_model_card_carries_hub_metadata(searched):
    import yaml
    out = export_point(searched, 0)
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---", 2)[1])
    assert meta["library_name"] == "qpruner" and "quantized" in meta["tags"] and meta["license"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["type"] == "perplexity"
    assert "±" in text                                          # the quality with its standard error
    plan = json.loads((out / "qpruner_plan.json").read_text())
    assert plan["layout"] == "quantized" and plan["quantization_map"]["library"] == "bitsandbytes"


def test_a_local_base_models_license_and_card_metadata_travel_with_the_export(tmp_path):
    from types import SimpleNamespace

    from qpruner.export import _card_metadata, _copy_license
    base = tmp_path / "base"
    base.mkdir()
    (base / "LICENSE.txt").write_text("LLAMA 2 COMMUNITY LICENSE AGREEMENT\n")
    (base / "README.md").write_text("---\nlicense: llama2\nbase_model: meta-llama/Llama-2-7b-hf\n---\n# card\n")
    job = SimpleNamespace(model=SimpleNamespace(source=str(base), revision=None), name="j",
                          data=SimpleNamespace(source="Salesforce/wikitext"))
    out = tmp_path / "out"
    out.mkdir()
    assert _copy_license(job, out) == ["LICENSE.txt"] and "LLAMA 2" in (out / "LICENSE.txt").read_text()
    meta = _card_metadata(job, {"perplexity": 12.0})
    assert meta["license"] == "llama2" and meta["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert meta["datasets"] == ["Salesforce/wikitext"]


def test_without_kept_adapters_the_plan_is_trained_again(searched, tmp_path):
    front = pd.read_parquet(searched / "pareto.parquet")
    trials = pd.read_parquet(searched / "trials.parquet")
    trials["adapter_path"] = None                      # as if the search ran with save_adapters=false
    copy = tmp_path / "tiny_smoke"
    import shutil
    shutil.copytree(searched, copy, ignore=shutil.ignore_patterns("ray", "exports"))
    trials.to_parquet(copy / "trials.parquet")
    front.assign(adapter_path=None).to_parquet(copy / "pareto.parquet")
    with pytest.raises(ResultsError, match="--retrain"):   # never trains unless asked
        export_point(copy, 0)
    assert not (copy / "exports").exists() or not any((copy / "exports").iterdir())
    out = export_point(copy, 0, retrain=True)
    _reproduce(out, front.iloc[0])                      # deterministic training: the same adapter again


def _with_adapter_paths(searched, tmp_path, transform):
    import shutil
    copy = tmp_path / "tiny_smoke"
    shutil.copytree(searched, copy, ignore=shutil.ignore_patterns("exports"))
    front = pd.read_parquet(searched / "pareto.parquet")
    front.assign(adapter_path=front["adapter_path"].map(transform)).to_parquet(copy / "pareto.parquet")
    return copy, front


def test_adapters_kept_in_an_object_store_are_fetched_by_uri(searched, tmp_path, monkeypatch):
    """search.storage_path = s3://... records checkpoint URIs; pyarrow's file:// transport stands in for S3."""
    import qpruner.export as export_module
    copy, front = _with_adapter_paths(searched, tmp_path, lambda p: (searched / p).resolve().as_uri())
    assert front["adapter_path"].notna().all()
    monkeypatch.setattr(export_module, "_retrain_adapter", lambda *a: pytest.fail("fetched, not retrained"))
    out = export_point(copy, 0)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    _reproduce(out, front.iloc[0])


def test_an_unreadable_adapter_uri_fails_unless_retrain_is_asked(searched, tmp_path):
    copy, front = _with_adapter_paths(searched, tmp_path, lambda p: f"file://{tmp_path}/gone/checkpoint_000000")
    with pytest.raises(ResultsError, match="no readable adapter checkpoint"):
        export_point(copy, 0)
    _reproduce(export_point(copy, 0, retrain=True), front.iloc[0])


def test_adapter_paths_are_recorded_relative_and_a_moved_results_directory_exports_without_training(
        searched, tmp_path, monkeypatch):
    import shutil

    import qpruner.export as export_module
    front = pd.read_parquet(searched / "pareto.parquet")
    assert all(isinstance(p, str) and not p.startswith("/") and p.startswith("ray/") for p in front["adapter_path"])
    moved = tmp_path / "elsewhere" / "tiny_smoke"
    shutil.copytree(searched, moved, ignore=shutil.ignore_patterns("exports"))
    monkeypatch.setattr(export_module, "_retrain_adapter", lambda *a: pytest.fail("found, not retrained"))
    for k in range(len(front)):
        _reproduce(export_point(moved, k), front.iloc[k])


def test_an_older_runs_absolute_adapter_paths_are_found_in_the_moved_directory(searched, tmp_path, monkeypatch):
    import qpruner.export as export_module
    copy, front = _with_adapter_paths(searched, tmp_path, lambda p: f"/no/longer/here/tiny_smoke/{p}")
    monkeypatch.setattr(export_module, "_retrain_adapter", lambda *a: pytest.fail("found, not retrained"))
    _reproduce(export_point(copy, 0), front.iloc[0])


def test_export_by_trial_name_or_id(searched, tmp_path):
    from qpruner.pareto import trial_label
    front = pd.read_parquet(searched / "pareto.parquet")
    last = len(front) - 1
    label = trial_label(front.iloc[last])
    assert label.startswith("t0") and len(label) == 5
    out = export_point(searched, trial=label, out=tmp_path / "by-name")
    assert json.loads((out / "qpruner_plan.json").read_text())["trial"]["trial_id"] == front.iloc[last]["trial_id"]
    assert export_point(searched, trial=str(front.iloc[last]["trial_id"]), out=out) == out   # by id: the same export
    with pytest.raises(ConfigError, match="no completed trial"):
        export_point(searched, trial="t9999")


def test_checkpoint_locations_are_uris_for_object_stores():
    from qpruner.search.callbacks import checkpoint_location

    def checkpoint(kind, path):
        return types.SimpleNamespace(filesystem=types.SimpleNamespace(type_name=kind), path=path)
    assert checkpoint_location(checkpoint("local", "/r/ray/tune/t/checkpoint_000000")) == "/r/ray/tune/t/checkpoint_000000"
    assert checkpoint_location(checkpoint("s3", "bucket/qp/tune/t/checkpoint_000000")) == "s3://bucket/qp/tune/t/checkpoint_000000"
    assert checkpoint_location(checkpoint("gcs", "bucket/qp/c")) == "gs://bucket/qp/c"
    assert checkpoint_location(checkpoint("py::fsspec+memory", "qp/c")) == "qp/c"


def test_bad_points_and_directories(searched, tmp_path):
    with pytest.raises(ConfigError, match="the front has"):
        export_point(searched, 99)
    with pytest.raises(ResultsError, match="job.yaml does not exist"):
        export_point(tmp_path, 0)


def test_export_never_deletes_what_it_did_not_write(searched, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ResultsError, match="not empty"):
        export_point(searched, 0, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = export_point(searched, 0, tmp_path / "fresh")
    stamp = (out / "qpruner_plan.json").stat().st_mtime_ns
    assert export_point(searched, 0, out) == out          # the same export again: found, not rewritten
    assert (out / "qpruner_plan.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    with pytest.raises(ConfigError, match="not a QPruner export"):
        qpruner.load(tmp_path)


def test_tracking_loggers_write_their_files(searched):
    trial_dirs = [p for p in (searched / "ray" / "tune").iterdir() if p.name.startswith("trial_")]
    assert trial_dirs and all(list(p.glob("events.out.tfevents*")) and (p / "progress.csv").is_file()
                              for p in trial_dirs)


def test_lm_eval_hands_the_loaded_model_to_the_harness(searched, monkeypatch):
    """The harness faked (the real one is checked below): it records what qpruner passes."""
    out = export_point(searched, 0)
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, **kwargs):
            calls["model"], calls["tokenizer"], calls["hflm"] = pretrained, tokenizer, kwargs

    def simple_evaluate(model, tasks, limit):
        calls["tasks"], calls["limit"] = tasks, limit
        return {"results": {t: {"acc,none": 0.5} for t in tasks}}

    harness = types.SimpleNamespace(simple_evaluate=simple_evaluate)
    monkeypatch.setitem(sys.modules, "lm_eval", harness)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", types.SimpleNamespace(HFLM=HFLM))
    summary = lm_eval(out, ["piqa"], limit=10)
    assert summary == {"piqa": {"acc,none": 0.5}} and calls["tasks"] == ["piqa"] and calls["limit"] == 10
    assert applied_formats(calls["model"])  # the quantized model itself, adapters attached
    assert calls["hflm"] == {"prefix_token_id": 0}  # the byte tokenizer has neither BOS nor EOS
    assert json.loads((out / "lm_eval.json").read_text()) == summary


def test_mlflow_and_wandb_tracking(tmp_path, monkeypatch):
    """Ray Tune's own MLflow and W&B callbacks, offline: a local MLflow store and W&B offline runs."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    job = load_job(ROOT / "tune_jobs" / "tiny_smoke.yaml", [f"results_dir={tmp_path}", "search.num_trials=2",
                                                           "search.loggers=[mlflow, wandb]"])
    run_job(job)
    runs = [p for p in (tmp_path / "tiny_smoke" / "mlruns").glob("*/*") if (p / "meta.yaml").is_file()]
    assert len(runs) == 2 and all((p / "metrics" / "objective").is_file() for p in runs)
    assert len(list((tmp_path / "tiny_smoke" / "ray" / "tune").glob("*/wandb/offline-run-*"))) == 2


MC_ITEMS = [
    {"context": "The module json can encode and", "choices": [" decode data", " fly south", " melt"], "label": 0},
    {"context": "A list in Python is", "choices": [" mutable", " a mountain"], "label": 0},
    {"context": "To read a file, first", "choices": [" open it", " paint it", " eat it", " sing"], "label": 0},
    {"context": "The return value of len() is an", "choices": [" integer", " orange"], "label": 0},
    {"context": "Exceptions are raised with the keyword", "choices": [" banana", " raise"], "label": 1},
    {"context": "A dictionary maps keys to", "choices": [" values", " oceans", " chairs"], "label": 0},
    {"context": "Threads share the same", "choices": [" memory", " birthday"], "label": 0},
    {"context": "The function returns None if", "choices": [" the key is missing", " it rains"], "label": 0},
]

MC_TASK_YAML = """task: qpruner_mc_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


def test_lm_eval_harness_agrees_with_our_multiple_choice_scorer(searched, tmp_path, monkeypatch):
    """The real lm-evaluation-harness, offline, on the exported quantized model, over a local JSON task:
    its per-choice log-likelihoods, acc and acc_norm equal what qpruner's own scorer computes."""
    harness = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qpruner import tasks as mc
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data_file = tmp_path / "mc.jsonl"
    data_file.write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    task_file = tmp_path / "tasks" / "qpruner_mc_check.yaml"
    task_file.parent.mkdir()
    task_file.write_text(MC_TASK_YAML.format(data=data_file))
    out = export_point(searched, 0)

    summary = lm_eval(out, [str(task_file)])["qpruner_mc_check"]
    model, tokenizer = qpruner.load(out, "cpu")
    ours = mc.tokenize_task("mc", mc.load_jsonl(data_file), tokenizer, max_length=1024)
    result = mc.score(model, ours, batch_size=4)
    assert summary["acc,none"] == pytest.approx(result.acc) and summary["acc_norm,none"] == pytest.approx(result.acc_norm)
    assert json.loads((out / "lm_eval.json").read_text())["qpruner_mc_check"]["acc,none"] == summary["acc,none"]
    import yaml
    card = yaml.safe_load((out / "README.md").read_text().split("---", 2)[1])
    harness_rows = [r for r in card["model-index"][0]["results"] if r["dataset"]["name"] == "qpruner_mc_check"]
    assert harness_rows and {"type": "acc", "value": summary["acc,none"]} in harness_rows[0]["metrics"]

    raw = harness.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, prefix_token_id=0),
                                  tasks=["qpruner_mc_check"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_file.parent)))
    samples = sorted(raw["samples"]["qpruner_mc_check"], key=lambda s: s["doc_id"])
    theirs = [float(choice[0][0]) for s in samples for choice in s["resps"]]
    assert theirs == pytest.approx(mc.loglikelihoods(model, ours, batch_size=4), rel=1e-4, abs=1e-4)


def test_lm_eval_task_files_are_checked(searched, tmp_path):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    out = export_point(searched, 0)
    with pytest.raises(ConfigError, match="not found"):
        lm_eval(out, [str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="no 'task' key"):
        lm_eval(out, [str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize("how", ["symlink", "dot"])
def test_export_into_an_empty_directory_by_symlink_or_dot(searched, tmp_path, monkeypatch, how):
    """#25.9: ``--out`` a symlink to an empty directory, or ``--out .`` in one: the export lands there, the
    directory (and the link) stay, and no hidden partial copy is left behind."""
    empty = tmp_path / "empty"
    empty.mkdir()
    if how == "symlink":
        out = tmp_path / "link"
        out.symlink_to(empty, target_is_directory=True)
    else:
        monkeypatch.chdir(empty)
        out = Path(".")
    got = export_point(searched, 0, out)
    assert (empty / "qpruner_plan.json").is_file() and (empty / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in list(tmp_path.iterdir()) + list(empty.iterdir()) if ".partial-" in p.name]
    assert how != "symlink" or (tmp_path / "link").is_symlink()
    assert export_point(searched, 0, got) == got               # found again, not rewritten


def test_an_adapter_saved_as_a_pickle_is_refused_never_unpickled(searched, tmp_path, monkeypatch):
    """#25.11: peft would fall back to adapter_model.bin (torch.load); qpruner.load refuses it instead."""
    import torch
    from safetensors.torch import load_file

    from qpruner.errors import ModelError
    out = export_point(searched, 0, tmp_path / "exp")
    weights = out / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(weights), out / "adapter" / "adapter_model.bin")
    weights.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(ModelError, match="safetensors only"):
        qpruner.load(out)


def test_an_ambiguous_trial_name_is_refused_with_the_ids(searched, tmp_path):
    import shutil
    copy = tmp_path / "tiny_smoke"
    shutil.copytree(searched, copy, ignore=shutil.ignore_patterns("exports"))
    trials = pd.read_parquet(copy / "trials.parquet")
    ok = trials["status"] == "ok"
    trials.loc[ok, "trial_name"] = "t0001-same"          # e.g. numbered again by a fresh Tune experiment
    trials.to_parquet(copy / "trials.parquet")
    with pytest.raises(ConfigError, match="give the trial id"):
        export_point(copy, trial="t0001")


def test_merge_writes_a_plain_bf16_model_with_its_nll_beside_the_trials(searched, tmp_path):
    """--merge: the LoRA folded into dequantized weights, in bf16; transformers loads it (after `import
    qpruner`: the pruned widths); its NLL is recorded next to the trial's, and only bf16 rounding separates them."""
    import torch
    from transformers import AutoModelForCausalLM

    from qpruner.export import merge_export
    front = pd.read_parquet(searched / "pareto.parquet")
    out = export_point(searched, 0, tmp_path / "exp")
    merged, nll, trial_nll = merge_export(out)
    assert trial_nll == pytest.approx(front.iloc[0]["nll"])
    assert abs(nll - trial_nll) < 0.05, (nll, trial_nll)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert {type(m).__name__ for m in model.modules()} & {"Linear4bit", "Linear8bitLt"} == set()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "qpruner_plan.json").read_text())["merged"]["nll"] == nll
    with pytest.raises(ResultsError, match="exists"):
        merge_export(out)                                      # never overwritten


def test_push_to_hub_uploads_the_export_through_the_hub_transport(searched, tmp_path, monkeypatch):
    """--push-to-hub: only the HTTP transport is faked (tests/fake_hub.py); huggingface_hub's create_repo and
    upload_folder run as they do online. Every file of the export arrives, no pickle, the private flag too."""
    from fake_hub import FakeHub

    from qpruner.export import push_to_hub
    out = export_point(searched, 0, tmp_path / "exp")
    hub = FakeHub({})
    hub.install(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_test")
    try:
        url = push_to_hub(out, "someone/tiny-export", private=True)
    finally:
        hub.uninstall()
    assert "someone/tiny-export" in url
    created = hub.created[0]
    assert created.get("visibility", "private" if created.get("private") else "public") == "private"
    local = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    pushed = hub.pushed["someone/tiny-export"]
    assert set(pushed) == local and pushed["quantized.safetensors"] == (out / "quantized.safetensors").read_bytes()
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in pushed)


def test_push_to_hub_offline_says_so(searched, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from qpruner.errors import BackendError
    from qpruner.export import push_to_hub
    out = export_point(searched, 0, tmp_path / "exp")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackendError, match="HF_HUB_OFFLINE"):
        push_to_hub(out, "someone/x")


def test_gguf_export_reads_back_with_the_gguf_library_at_its_recorded_nll(searched, tmp_path, capsys):
    """--format gguf: the merged weights in the plan's GGUF types (nf4 -> Q4_0, int8 -> Q8_0, bf16 -> BF16), the pruned
    per-layer widths as llama.cpp's deci arrays; gguf's own reader and dequantizer give back a model whose NLL on the
    trial's tokens is the recorded one, close to the trial's; the file is never overwritten."""
    import gguf
    import torch

    from qpruner import cli
    from qpruner.data import load_splits
    from qpruner.evaluate import evaluate
    from qpruner.export import evaluation_config
    from qpruner.gguf_export import export_gguf, read_model
    front = pd.read_parquet(searched / "pareto.parquet")
    assert cli.main(["export", str(searched), "--point", str(len(front) - 1), "--out", str(tmp_path / "exp"),
                     "--format", "gguf"]) == 0
    assert "deci architecture" in capsys.readouterr().out
    out = tmp_path / "exp"
    record = json.loads((out / "qpruner_plan.json").read_text())
    entry = record["gguf"]["q4_0"]
    path = out / entry["file"]
    reader = gguf.GGUFReader(str(path))
    widths = json.loads((out / "config.json").read_text())["layer_widths"]
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.attention.head_count"].contents() == [w[0] for w in widths]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [w[1] for w in widths]
    assert reader.fields["deci.feed_forward_length"].contents() == [w[2] for w in widths]
    want = {"nf4": "Q4_0", "int8": "Q8_0", "bf16": "BF16"}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for i, fmt in enumerate(record["plan"]["formats"]):
        assert {types[f"blk.{i}.{n}.weight"] for n in ("attn_q", "attn_output", "ffn_down")} == {want[fmt]}
    model = read_model(path).to(entry["read_device"])
    data_cfg, eval_cfg = evaluation_config(out)
    tokenizer = qpruner.load(out)[1]
    nll = evaluate(model, load_splits(data_cfg, tokenizer).eval, eval_cfg.batch_size, entry["read_device"],
                   eval_cfg.context, eval_cfg.stride).nll
    assert nll == pytest.approx(entry["nll"], abs=1e-6)
    assert abs(nll - front.iloc[-1]["nll"]) < 0.05 and entry["trial_nll"] == pytest.approx(front.iloc[-1]["nll"])
    assert next(model.parameters()).dtype == torch.float32
    assert "## GGUF (q4_0)" in (out / "README.md").read_text()
    assert entry["weights_from"].startswith("the run's full-precision pruned weights")
    with pytest.raises(ResultsError, match="exists"):
        export_gguf(out, results=searched)
    with pytest.raises(ConfigError, match="gguf-4bit"):
        export_gguf(out, "q3_k")
    path8, entry8 = export_gguf(out, "q8_0", results=searched)   # the 4-bit layers at 8 bits
    merged, entry_m = export_gguf(out)                             # no run directory: the merged quantized weights
    assert "quantized twice" in entry_m["weights_from"] and merged.name.endswith("-q4_0-merged.gguf")
    assert set(json.loads((out / "qpruner_plan.json").read_text())["gguf"]) == {"q4_0", "q8_0", "q4_0-merged"}
    assert entry8["bytes"] >= entry["bytes"] == entry_m["bytes"]
    with pytest.raises(ResultsError, match="not at hand"):
        export_gguf(out, "q5_0", source="pruned")


def test_a_uniform_width_gguf_is_llama_and_transformers_reads_the_same_model(tmp_path):
    """Layers of one width are written as llama.cpp's llama architecture; transformers' own GGUF loader (its name
    mapping and rotary un-permutation, independent of ours) gives the same logits as our reader, and both are
    the original model up to the quantizers' rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    from qpruner import models
    from qpruner.gguf_export import permute_rotary, read_model, unpermute_rotary, write_gguf
    model = models.tiny_model()
    cycle = ("nf4", "int8", "bf16")
    formats = {name: cycle[i % 3] for i, (name, m) in enumerate(
        (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)}
    summary = write_gguf(model, formats, models.byte_tokenizer(), tmp_path / "tiny.gguf")
    assert summary["architecture"] == "llama" and summary["fallbacks"] == []
    assert {"Q4_0", "Q8_0", "BF16"} <= set(summary["tensor_types"])
    ours = read_model(tmp_path / "tiny.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = ours(ids).logits, theirs(ids).logits, model(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert 0 < (a - c).abs().max() < 0.25 * c.abs().max()
    w = torch.randn(8 * 16, 5)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 8), 8), w)
    assert not torch.equal(permute_rotary(w, 8), w)


def test_llama_cpp_loads_the_pruned_gguf_and_computes_its_nll(searched, tmp_path):
    """llama.cpp itself (through llama-cpp-python, where installed: it builds llama.cpp from source, so it is not
    in the dev set) loads the deci GGUF with its per-layer widths and, on the trial's evaluation windows, gives the
    NLL our gguf reader gives, up to llama.cpp's 8-bit activation rounding."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from qpruner.data import load_splits
    from qpruner.evaluate import windows
    from qpruner.export import evaluation_config
    from qpruner.gguf_export import export_gguf
    out = export_point(searched, 0, tmp_path / "exp")
    path, entry = export_gguf(out)
    data_cfg, eval_cfg = evaluation_config(out)
    ids = load_splits(data_cfg, qpruner.load(out)[1]).eval
    stream = ids.reshape(-1).tolist()
    context = eval_cfg.context or ids.shape[-1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, n_threads=1,
                          verbose=False)
    total, count = 0.0, 0
    for begin, end, scored in windows(len(stream), context, min(eval_cfg.stride or context, context)):
        tokens = stream[begin:end]
        llm.reset()
        llm.eval(tokens)
        logits = np.array(llm.scores[:len(tokens) - 1], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(tokens) - 1), tokens[1:]]
        total, count = total + nll[-scored:].sum(), count + scored
    assert total / count == pytest.approx(entry["nll"], abs=0.01), (total / count, entry["nll"])


def test_merge_to_the_plan_quantizes_the_merged_weights_again_and_loads_without_an_adapter(searched, tmp_path):
    """--merge plan: the LoRA folded in, each linear quantized again to its plan format; qpruner.load reads it with no
    adapter, in the plan's formats; its NLL is recorded beside the trial's and only re-quantization separates them."""
    from qpruner.export import MERGED_PLAN_DIR, merge_export
    front = pd.read_parquet(searched / "pareto.parquet")
    out = export_point(searched, len(front) - 1, tmp_path / "exp")
    merged, nll, trial_nll = merge_export(out, "plan")
    assert merged == out / MERGED_PLAN_DIR and not (merged / "adapter").exists()
    assert trial_nll == pytest.approx(front.iloc[-1]["nll"]) and abs(nll - trial_nll) < 0.1, (nll, trial_nll)
    model, _ = qpruner.load(merged)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    plan = json.loads((out / "qpruner_plan.json").read_text())["plan"]["formats"]
    assert [f for layer in applied_formats(model) for f in set(layer.values())] == plan
    _, ev = evaluate_export(merged)
    assert ev.nll == pytest.approx(nll, abs=1e-9)
    assert json.loads((out / "qpruner_plan.json").read_text())["merged_quantized"]["nll"] == nll
    with pytest.raises(ResultsError, match="exists"):
        merge_export(out, "plan")


def _bpe_tokenizer(vocab: int = 300):
    """A byte-level BPE with merges and two special tokens, trained here on the built-in text."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pydoc_data.topics import topics
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_llama3_rope_an_untied_head_and_a_bpe_tokenizer_round_trip_through_gguf(tmp_path):
    """A Llama-3-style model (llama3 rope scaling: rope_freqs factors; untied head; padded vocabulary; a BPE
    tokenizer with merges): the read-back model is the original up to bf16 rounding, which it is not without the
    rope factors; the vocabulary is one token per embedding row with the tokenizer's merges, types and ids."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner.gguf_export import read_model, write_gguf
    tokenizer = _bpe_tokenizer()
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=False, rope_parameters={
                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    formats = {n: "bf16" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    summary = write_gguf(model, formats, tokenizer, tmp_path / "l3.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "l3.gguf"))
    names = {t.name for t in reader.tensors}
    assert {"rope_freqs.weight", "output.weight"} <= names and summary["tokenizer"].startswith("byte-level BPE")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[tokenizer.bos_token_id] == "<s>" and tokens[310] == "[PAD310]"
    assert reader.fields["tokenizer.ggml.token_type"].contents()[tokenizer.eos_token_id] == 3
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) == len(merges) > 0
    ours = read_model(tmp_path / "l3.gguf")
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, ours(ids).logits
        err = (got - want).abs().max().item()
        for module in ours.modules():      # the same model without the llama3 factors: a different model
            if type(module).__name__.endswith("RotaryEmbedding"):
                module.inv_freq = module.original_inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
        unscaled = (ours(ids).logits - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item() and unscaled > 3 * err, (err, unscaled)


def test_llama_cpp_tokenizes_like_the_tokenizer_it_was_converted_from(tmp_path):
    """Where llama-cpp-python is installed: llama.cpp reads the converted BPE vocabulary and splits text into the
    same ids as the Hugging Face tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qpruner.gguf_export import write_gguf
    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=True))
    write_gguf(model, {}, tokenizer, tmp_path / "t.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "t.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    text = "The quick brown fox: it jumps over the lazy dog, twice (2x)."
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]


@pytest.mark.slow   # its own search (~40 s): the slow suite, which CI also runs
def test_an_untrained_points_gguf_weights_are_the_pruned_weights_exactly(tmp_path):
    """The pruned-weights source: W + (B A - A0 B0), with LoftQ's A0 B0 recomputed as LoftQ made it. At zero
    fine-tuning steps B A is A0 B0, so every linear must come out as the pruned weight itself."""

    from qpruner.gguf_export import fine_tuned_weights
    from qpruner.serialize import _linear_names, _unwrap
    from qpruner.weights import SafetensorsDir
    job = load_job(ROOT / "tune_jobs" / "tiny_smoke.yaml", [f"results_dir={tmp_path}", "search.num_trials=1",
                                                           "finetune.steps=0", "search.max_concurrent=1"])
    run_job(job)
    run = tmp_path / "tiny_smoke"
    out = export_point(run, 0, tmp_path / "exp")
    model, _ = qpruner.load(out)
    base = _unwrap(model)
    names = _linear_names(base)
    weight_of = fine_tuned_weights(run / "pruned", True)
    pruned = SafetensorsDir(run / "pruned")
    worst = 0.0
    for module in base.modules():
        if (qual := names.get(id(module))) is not None:
            w = pruned[f"{qual}.weight"].float()
            worst = max(worst, float((weight_of(qual, module) - w).abs().max() / w.abs().max()))
    assert worst < 1e-5, worst
    assert json.loads((out / "qpruner_plan.json").read_text())["finetune"]["init"] == "loftq"


def test_least_squares_q4_0_blocks_are_standard_and_never_worse_than_absmax():
    """quantize_q4_0 writes standard Q4_0 blocks (gguf's own dequantizer reads them), each block at most the
    reference quantizer's squared error, less over a layer; an all-zero block stays zero."""
    import gguf
    import numpy as np

    from qpruner.gguf_export import quantize_q4_0
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((64, 256)) * rng.gamma(2.0, 0.02, size=(64, 1))).astype(np.float32)
    a[3] = 0.0
    T = gguf.GGMLQuantizationType.Q4_0
    ours, ref = quantize_q4_0(a), gguf.quants.quantize(a, T)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    back, back_ref = gguf.quants.dequantize(ours, T), gguf.quants.dequantize(ref, T)
    per_block = ((back - a) ** 2).reshape(-1, 32).sum(-1)
    per_block_ref = ((back_ref - a) ** 2).reshape(-1, 32).sum(-1)
    assert (per_block <= per_block_ref * (1 + 1e-6) + 1e-12).all()
    assert per_block.sum() < 0.95 * per_block_ref.sum()
    assert np.all(back[3] == 0.0)
