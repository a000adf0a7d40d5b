"""The benchmark scripts keep working (run on the tiny model, in seconds)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prune_benchmark_runs_on_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prune_bench.py"), "--model", "tiny",
                           "--targets", "0.2", "--estimators", "taylor", "random", "--eval-samples", "4",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "prune.json").read_text())
    settings = [r["setting"] for r in res["rows"]]
    assert settings[:2] == ["taylor", "random"] and len(settings) == 5
    assert all(r["params"] <= res["params_unpruned"] and r["perplexity"] > 1 for r in res["rows"])
    assert all(abs(r["removed"] - 0.2) < 0.05 for r in res["rows"][:2])  # block scope reaches the target
    assert "| target | setting |" in (tmp_path / "prune.md").read_text()


def test_importance_benchmark_runs_on_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "importance_bench.py"), "--model", "tiny",
                           "--random-plans", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "importance.json").read_text())
    assert res["spearman_vs_sensitivity"]["sensitivity"] == 1.0
    assert {p["estimator"] for p in res["plans"]} >= {"fisher", "mutual_information", "random scores (median of 1)"}
    assert all(p["estimate"] > 0 for p in res["finetune_memory"])


def test_trial_benchmark_runs_on_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "trial_bench.py"), "--model", "tiny", "--steps", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "trial.json").read_text())
    assert [c["init"] for c in res["curves"]][:3] == ["plain", "loftq", "loftq, all formats, unbalanced"]
    assert all(set(c["perplexity"]) == {"0", "1", "2"} for c in res["curves"])
    assert {t["format"] for t in res["throughput"]} == {"nf4", "int8", "bf16"}


def test_search_benchmark_problem_and_one_searcher():
    """The proxy problem is solved exactly, and a searcher run through Tune yields hypervolume ratios in [0, 1]."""
    sys.path.insert(0, str(ROOT / "bench"))
    import ray
    import search_bench as sb
    problem = sb.Problem()
    assert problem.n_plans == 256 and 0 < problem.n_feasible < 256 and problem.exact_hv > 0
    assert len(problem.seeds(0)) >= 3
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sb)  # workers cannot import bench/ by name
    try:
        ratios = sb.run_searcher(problem, "random", False, 0, 4)
    finally:
        ray.shutdown()
    hv = [r[0] for r in ratios]
    assert len(ratios) == 4 and all(0 <= h <= 1 + 1e-9 for h in hv) and hv == sorted(hv)
    assert all(0 <= r[1] <= 1 for r in ratios)
