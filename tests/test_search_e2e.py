"""End to end through a real local Ray (127.0.0.1): `qpruner search tune_jobs/tiny_smoke.yaml`."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

from qpruner.pareto import front_mask

ROOT = Path(__file__).resolve().parents[1]


def test_qpruner_search_tiny_smoke(tmp_path):
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "tiny_smoke"
    for name in ("trials.parquet", "pareto.parquet", "pareto.png", "job.yaml", "prune.json", "seeds.json",
                 "pruned/model.safetensors", "pruned/qpruner_prune.json"):
        assert (out / name).is_file(), name
    trials = pd.read_parquet(out / "trials.parquet")
    trained = trials[trials["status"] == "ok"]
    assert len(trained) == 7 and set(trials["status"]) <= {"ok", "infeasible", "cached"}
    assert (trained["weight_bytes"] == trained["weight_bytes_predicted"]).all()
    assert trained["plan_formats"].is_unique                    # no plan trained twice
    assert (trained["avg_bits"] <= 10.0).all()                   # no trained plan over the budget
    # 2 uniform plans that fit + the best guess + 2 sampled, then the searcher's own
    assert sorted(trained["origin"]) == ["searcher"] * 2 + ["seed:best_guess"] + ["seed:sampled"] * 2 + ["seed:uniform"] * 2
    infeasible = trials[trials["status"] == "infeasible"]
    assert (infeasible["avg_bits"] > 10.0).all() and infeasible["seconds_quantize"].isna().all()  # never built
    cached = trials[trials["status"] == "cached"]
    assert set(cached["cached_from"]) <= set(trained["trial_id"])
    front = pd.read_parquet(out / "pareto.parquet")
    assert len(front) >= 1 and set(front["trial_id"]) <= set(trained["trial_id"])
    assert all(front_mask(front["accuracy"].tolist(), front["weight_bytes"].tolist()))
    assert "Pareto front" in proc.stdout and "finished in" in proc.stdout


def test_trials_that_diverge_are_failed_and_the_search_completes(tmp_path):
    """Real divergence (float16 overflow with an absurd learning rate), through real Ray."""
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path}", "quant.compute_dtype=float16", "quant.rest_dtype=float16", "finetune.lr=1e4",
           "finetune.max_grad_norm=0", "finetune.steps=6", "search.num_trials=3", "policy.include_uniform=false",
           "policy.seed_plans=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_parquet(tmp_path / "tiny_smoke" / "trials.parquet")
    assert len(trials) == 3
    failed = trials[trials["status"] == "failed"]
    assert len(failed) >= 2 and failed["error"].str.contains("non-finite training loss").all()
    assert (failed["objective"] == -2000.0).all()
    front = pd.read_parquet(tmp_path / "tiny_smoke" / "pareto.parquet")
    assert not set(front.get("trial_id", [])) & set(failed["trial_id"])  # failed trials never reach the front
    assert "Pareto front (" in proc.stdout
