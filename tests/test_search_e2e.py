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
    assert len(trials) == 7 and set(trials["status"]) <= {"ok", "infeasible"}
    ok = trials[trials["status"] == "ok"]
    assert len(ok) >= 3
    assert (ok["weight_bytes"] == ok["weight_bytes_predicted"]).all()
    # 2 uniform plans that fit + the best guess + 2 sampled, then the searcher's own
    assert sorted(trials["origin"]) == ["searcher"] * 2 + ["seed:best_guess"] + ["seed:sampled"] * 2 + ["seed:uniform"] * 2
    assert (trials[trials["status"] == "infeasible"]["avg_bits"] > 10.0).all()
    front = pd.read_parquet(out / "pareto.parquet")
    assert len(front) >= 1 and set(front["trial_id"]) <= set(ok["trial_id"])
    assert all(front_mask(front["accuracy"].tolist(), front["weight_bytes"].tolist()))
    assert "Pareto front" in proc.stdout and "finished in" in proc.stdout
