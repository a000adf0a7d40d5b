"""Export a front point, load it with qpruner.load, and reproduce the trial's metrics."""

import json
import sys
import types

import pandas as pd
import pytest

import qpruner
from qpruner import data
from qpruner.config import load_job
from qpruner.errors import ConfigError
from qpruner.evaluate import evaluate
from qpruner.export import evaluation_config, export_point, lm_eval
from qpruner.job import run_job
from qpruner.quantize import applied_formats

from test_search_e2e import ROOT


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    job = load_job(ROOT / "tune_jobs" / "tiny_smoke.yaml", [f"results_dir={tmp}", "search.num_trials=4",
                                                           "search.loggers=[tensorboard, csv]"])
    run_job(job)
    return tmp / "tiny_smoke"


def _reproduce(directory, row):
    model, tokenizer = qpruner.load(directory, "cpu")
    data_cfg, eval_cfg = evaluation_config(directory)
    splits = data.load_splits(data_cfg, tokenizer)
    ev = evaluate(model, splits.eval, eval_cfg.batch_size, "cpu", eval_cfg.context, eval_cfg.stride)
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
    assert {"model.safetensors", "config.json", "tokenizer.json", "qpruner_plan.json", "README.md",
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    _reproduce(out, front.iloc[k])


def test_without_kept_adapters_the_plan_is_trained_again(searched, tmp_path):
    front = pd.read_parquet(searched / "pareto.parquet")
    trials = pd.read_parquet(searched / "trials.parquet")
    trials["adapter_path"] = None                      # as if the search ran with save_adapters=false
    copy = tmp_path / "tiny_smoke"
    import shutil
    shutil.copytree(searched, copy, ignore=shutil.ignore_patterns("ray", "exports"))
    trials.to_parquet(copy / "trials.parquet")
    front.assign(adapter_path=None).to_parquet(copy / "pareto.parquet")
    out = export_point(copy, 0)
    _reproduce(out, front.iloc[0])                      # deterministic training: the same adapter again


def test_bad_points_and_directories(searched, tmp_path):
    with pytest.raises(ConfigError, match="the front has"):
        export_point(searched, 99)
    with pytest.raises(ConfigError, match="no pareto.parquet"):
        export_point(tmp_path, 0)
    with pytest.raises(ConfigError, match="not a QPruner export"):
        qpruner.load(tmp_path)


def test_tracking_loggers_write_their_files(searched):
    trial_dirs = [p for p in (searched / "ray" / "tune").iterdir() if p.name.startswith("_trainable")]
    assert trial_dirs and all(list(p.glob("events.out.tfevents*")) and (p / "progress.csv").is_file()
                              for p in trial_dirs)


def test_lm_eval_hands_the_loaded_model_to_the_harness(searched, monkeypatch):
    """Only the harness is faked: it records what qpruner passes (model object, tasks, limit)."""
    out = export_point(searched, 0)
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["tokenizer"] = pretrained, tokenizer

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
