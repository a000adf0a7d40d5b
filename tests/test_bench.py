"""The benchmark scripts keep working (run on the tiny model, in seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)  # ~2 min alone, 6 under load
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "trial.json").read_text())
    assert [c["init"] for c in res["curves"]][:3] == ["plain", "loftq (4 iterations, default)",
                                                      "loftq, all formats, unbalanced"]
    (code,) = {c["code"] for c in res["curves"] if c["plan"].startswith("mixed")}
    assert "4" in code and set(code) != {"4"}, code  # a real mix: some nf4 layers, some wider
    assert all(set(c["perplexity"]) == {"0", "1", "2"} for c in res["curves"])
    assert {t["format"] for t in res["throughput"]} == {"nf4", "int8", "bf16"}


def _synthetic_landscape(path):
    """A SYNTHETIC 8-group landscape in the recorded file format (additive NLL), to test the replay machinery."""
    import itertools
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    w = np.array([[6e6, 11.6e6]] + [[5.5e6, 10.8e6]] * 7)
    fixed, numel = 5e7, int(w[:, 0].sum() * 8 / 4.15)
    sens = np.random.default_rng(0).lognormal(0, 0.7, 8) * 0.03
    rows = []
    rng = np.random.default_rng(1)
    difficulty = np.array([-0.5, 0.3, 0.1, 0.1])              # per-window offsets (cancel when paired)
    for p in itertools.product((0, 1), repeat=8):
        idx = np.array(p)
        nll = 3.8 + float(sum(sens[u] for u in range(8) if p[u] == 0))
        code = "".join("48"[i] for i in p)
        windows = 100 * (nll + difficulty + rng.normal(0, 0.002, 4))
        rows.append({"stage": "zero", "group_code": code, "plan_code": code, "nll": float(windows.sum() / 400),
                     "nll_se": 0.05, "weight_bytes": int(fixed + w[np.arange(8), idx].sum()),
                     "avg_bits": 8 * w[np.arange(8), idx].sum() / numel, "perplexity": float(np.exp(nll)),
                     "accuracy": 0.3, "accuracy_se": 0.01, "seconds_total": 1.0,
                     "eval_window_nll": windows.tolist(), "eval_window_tokens": [100] * 4})
    meta = {"commit": "synthetic", "group_costs": {"weights": w.tolist(), "biases": np.zeros_like(w).tolist(),
                                                   "fixed": fixed, "numel": numel},
            "layer_scores": {"method": "fisher", "scores": [1.0] * 30}, "group_scores": [1.0] * 8}
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"qpruner": json.dumps(meta).encode()}), path)
    return sens


def test_search_benchmark_replays_a_landscape_through_tune(tmp_path):
    """The replay benchmark end to end on a synthetic landscape: exact front, real Tune loop, result file."""
    _synthetic_landscape(tmp_path / "land.parquet")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "search_bench.py"), "--landscape",
                           str(tmp_path / "land.parquet"), "--seeds", "1", "--trials", "8", "--searchers", "additive",
                           "random", "--scores", "landscape", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "search.json").read_text())
    assert res["source"].endswith("land.parquet") and res["default_searcher"] == "additive"
    assert res["prior_scores"] == {"method": "fisher", "source": "recorded with the landscape"}
    assert "REPLAY" in res["what"] and res["plans"] == 256 and 0 < res["feasible"] < 256
    for kind in ("additive", "random"):
        hv = res["searchers"][kind]["hv_ratio_median"]["8"]
        assert 0 < hv <= 1 + 1e-9
    assert res["searchers"]["additive"]["trained_over_budget"] == 0
    assert res["searchers"]["additive"]["wasted_proposals_median"] == 0
    assert "replay of recorded real trials" in (tmp_path / "search.md").read_text()
    assert {"greedy_chain", "probe_knapsack", "score_knapsack"} <= set(res["searchers"])   # the simple baselines
    assert all(0 < res["searchers"][b]["hv_ratio_median"]["8"] <= 1 + 1e-9 for b in ("greedy_chain", "score_knapsack"))
    assert 0.5 < res["noise_ceiling"]["p10"] <= res["noise_ceiling"]["median"] <= 1.0
    assert not (tmp_path / ".search.partial.json").exists()          # the scratch file goes with success
    # resumable: a searcher finished by an earlier run of the same code and settings is not run again
    sys.path.insert(0, str(ROOT / "bench"))
    import search_bench as sb
    earlier = dict(res["searchers"]["additive"], label="from the earlier run")
    (tmp_path / ".search.partial.json").write_text(json.dumps({"key": sb.partial_key(res),
                                                               "searchers": {"additive": earlier}}))
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "search_bench.py"), "--landscape",
                            str(tmp_path / "land.parquet"), "--seeds", "1", "--trials", "8", "--searchers", "additive",
                            "--scores", "landscape", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing 1 searchers" in again.stdout, again.stderr[-2000:]
    assert json.loads((tmp_path / "search.json").read_text())["searchers"]["additive"]["label"] == "from the earlier run"


def test_search_benchmark_prior_scores_come_from_the_same_pruned_model():
    """--scores: the landscape's recorded scores, or another estimator's scores of the same model; else refused."""
    sys.path.insert(0, str(ROOT / "bench"))
    import search_bench as sb
    meta = {"layer_scores": {"method": "fisher"}, "group_scores": [1.0] * 8}
    assert sb.prior_scores(meta, "landscape") == ("fisher", [1.0] * 8, "recorded with the landscape")
    truth = json.loads(sb.IMPORTANCE_TRUTH.read_text())   # every estimator from one file: one calibration split
    assert sb.prior_scores(meta, "fisher")[1] == truth["estimators"]["fisher"]["group_scores"]
    method, scores, source = sb.prior_scores(meta, "mutual_information")
    assert scores == truth["estimators"]["mutual_information"]["group_scores"] and "importance_truth" in source
    with pytest.raises(SystemExit, match="no bogus scores"):
        sb.prior_scores(meta, "bogus")
    with pytest.raises(SystemExit):   # scores of another model (another group count) are never used
        sb.prior_scores({"layer_scores": {"method": "fisher"}, "group_scores": [1.0] * 5}, "mutual_information")


def test_search_benchmark_seed_count_ablation_names():
    """<searcher>_seeds<K> runs that searcher with K sampled seed plans; unknown names are refused."""
    sys.path.insert(0, str(ROOT / "bench"))
    import argparse

    import search_bench as sb
    from qpruner.config import PolicyConfig
    assert sb.parse_kind("additive_seeds3") == ("additive", 3)
    assert sb.parse_kind("additive_ends") == ("additive", 0)
    assert sb.parse_kind("random_seeded") == ("random", None) and sb.parse_kind("additive") == ("additive", None)
    assert "3 sampled seed plans" in sb.label("additive_seeds3")
    assert f"[{PolicyConfig().seed_plans} sampled seed plans]" in sb.label("additive")
    with pytest.raises(argparse.ArgumentTypeError):
        sb.searcher_kind("bogus_seeds2")


def test_landscape_report_on_a_synthetic_landscape(tmp_path):
    """Additivity, paired noise and the exact front come out right on a landscape whose truth is known."""
    sens = _synthetic_landscape(tmp_path / "land.parquet")
    sys.path.insert(0, str(ROOT / "bench"))
    import landscape_report as lr
    import landscape as rec
    table, meta = rec.load(tmp_path / "land.parquet")
    res = lr.analyse(table, meta)
    assert res["additivity"]["r2"] > 0.99
    gains = res["additivity"]["group_gain_int8_over_nf4"]
    assert max(abs(g - s) for g, s in zip(gains, sens)) < 0.005            # the true per-group effects
    assert res["noise"]["paired_nll_se_random_pairs_median"] < res["noise"]["nll_se_one_trial_median"] / 5
    assert res["front_all"][0]["group_code"] == "44444444" and res["front_all"][-1]["group_code"] == "88888888"
    assert res["vs_line"]["mixed_plans"] == 254
    assert "## Noise" in lr.to_markdown({**res, **{"source": "x", "landscape_commit": "synthetic", "command": "c",
                                                   "commit": "0" * 10, "dirty": False, "machine": "m", "date": "d"}})


def test_loftq_benchmark_records_resumably_and_reports_paired_differences(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "loftq_bench.py"), "--model", "tiny", "--steps", "1", "--long", "2",
           "--seeds", "1", "--out", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "loftq_runs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and {r["variant"] for r in rows} == {"plain", "loftq", "loftq x4", "loftq unbalanced"}
    assert all(set(r["nll"]) == {"0", "1", "2"} and r["commit"] for r in rows)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)   # everything recorded: nothing trained
    assert again.returncode == 0 and "12 runs recorded, 0 to train" in again.stdout
    res = json.loads((tmp_path / "loftq.json").read_text())
    assert set(res["paired_vs_plain"]) == {"loftq", "loftq x4", "loftq unbalanced"}
    assert res["paired_vs_plain"]["loftq"]["0"]["n"] == 3 and "REAL trials" in res["what"]


def test_loftq_benchmark_shards_split_the_runs_and_the_last_one_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "loftq_bench.py"), "--model", "tiny", "--steps", "1", "--long", "1",
           "--seeds", "2", "--out", str(tmp_path)]
    first = subprocess.run(cmd + ["--shard", "0/2"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "12 runs of other shards still missing" in first.stdout, first.stderr[-3000:]
    assert not (tmp_path / "loftq.json").exists()                    # half a design: no report yet
    second = subprocess.run(cmd + ["--shard", "1/2"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "loftq_runs.jsonl").read_text().splitlines()]
    keys = {(r["code"], r["variant"], r["seed"]) for r in rows}
    assert len(rows) == len(keys) == 3 * 4 * 2                          # every run once, none twice
    res = json.loads((tmp_path / "loftq.json").read_text())
    by_plan = res["paired_by_plan"]["loftq"]
    assert len(by_plan) == 3 and all(d["1"]["n"] == 2 for d in by_plan.values())
    bad = subprocess.run(cmd + ["--shard", "2/2"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--shard" in bad.stderr


def test_memory_claim_prices_the_pruned_shapes(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_claim.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "memory_claim.json").read_text())
    llama = res["shapes"]["LLaMA-2-7B, 20% of parameters"]
    assert abs(llama["params_removed"] - 0.20) < 0.005 and "ESTIMATES" in res["what"] and res["commit"]
    rows = {(r["plan"], r["batch"]): r for r in llama["rows"]}
    assert rows[("all bf16 (baseline)", 1)]["saving_vs_bf16"] == 0.0
    assert rows[("all nf4", 1)]["weights_gb"] < rows[("all int8", 1)]["weights_gb"] < rows[("all bf16 (baseline)", 1)]["weights_gb"]


def test_memory_claim_quality_pairs_real_trials_with_bf16(tmp_path):
    """--quality on the tiny model: real trials per plan and seed, resumable, paired with the bf16 baseline."""
    cmd = [sys.executable, str(ROOT / "bench" / "memory_claim.py"), "--quality", "--model", "tiny", "--seeds", "2",
           "--out", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    runs = [json.loads(x) for x in (tmp_path / "memory_claim_runs.jsonl").read_text().splitlines()]
    assert {(r["label"], r["seed"]) for r in runs} == {(p, s) for p in ("all bf16 (baseline)", "all int8", "all nf4")
                                                       for s in (0, 1)}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "6 trials recorded, 0 to train" in again.stdout
    q = {r["plan"]: r for r in json.loads((tmp_path / "memory_claim.json").read_text())["quality"]["rows"]}
    assert q["all bf16 (baseline)"]["saving_vs_bf16"] == 0.0 and "dnll_vs_bf16" not in q["all bf16 (baseline)"]
    assert q["all nf4"]["seeds"] == 2 and q["all nf4"]["dnll_se"] > 0
    assert q["all nf4"]["weight_mb"] < q["all int8"]["weight_mb"] < q["all bf16 (baseline)"]["weight_mb"]
    assert "Quality side by side" in (tmp_path / "memory_claim.md").read_text()


@pytest.mark.slow   # over a minute: the slow suite (CI runs it)
def test_joint_benchmark_compares_three_searches_on_one_reference(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "joint_bench.py"), "--model", "tiny", "--trials", "3", "--seeds", "1",
           "--steps", "1", "--out", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((tmp_path / "joint.json").read_text())
    assert set(res["hypervolume"]) == {"joint", "fixed", "quantize_only"} and res["commit"]
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in res["hypervolume"].values())
    assert res["trained"] == {k: {"0": 3} for k in ("joint", "fixed", "quantize_only")}
    import pandas as pd
    fixed = pd.read_parquet(tmp_path / "joint_bench" / "fixed_seed0" / "trials.parquet")
    assert set(fixed["prune_param_ratio"]) == {0.2}                  # the fixed search stays at its amount
    joint = pd.read_parquet(tmp_path / "joint_bench" / "joint_seed0" / "trials.parquet")
    assert joint["prune_param_ratio"].nunique() >= 2
    md = (tmp_path / "joint.md").read_text()
    assert "| joint |" in md and "What it recommends" in md and res["command"] in md
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)   # recorded: nothing trained again
    assert again.returncode == 0 and again.stdout.count(": recorded") == 3
    base = [sys.executable, str(ROOT / "bench" / "joint_bench.py"), "--model", "tiny", "--out", str(tmp_path)]
    report = subprocess.run(base + ["--report"], capture_output=True, text=True, timeout=900)
    assert report.returncode == 0, report.stderr[-3000:]                # other args: the recorded settings are used
    assert json.loads((tmp_path / "joint.json").read_text())["settings"] == res["settings"]
    other = subprocess.run(base + ["--trials", "4", "--seeds", "1", "--steps", "1"], capture_output=True, text=True,
                           timeout=900)
    assert other.returncode != 0 and "recorded with other settings" in other.stderr     # refuses to mix


def test_importance_truth_refits_the_truth_with_recorded_scores(tmp_path):
    """--reuse-scores: the committed landscape and the committed estimator scores, no model needed."""
    script = [sys.executable, str(ROOT / "bench" / "importance_truth.py"), "--reuse-scores"]
    proc = subprocess.run(script + ["--out", str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no recorded scores to reuse" in proc.stderr   # nothing invented
    recorded = json.loads((ROOT / "results" / "bench" / "importance_truth.json").read_text())
    (tmp_path / "it.json").write_text(json.dumps(recorded))
    proc = subprocess.run(script + ["--out", str(tmp_path / "it")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "it.json").read_text())
    assert res["scores_commit"] == recorded.get("scores_commit", recorded["commit"])
    assert {"zero", "demo"} <= set(res["truth"]) and res["truth"]["zero"]["plans"] >= 16
    for method, e in res["estimators"].items():
        assert e["group_scores"] == recorded["estimators"][method]["group_scores"]
        lo, hi = e["spearman_ci95"]["zero"]
        assert -1 <= lo <= e["spearman"]["zero"] <= hi <= 1
    assert "**Scores reused** from the run at commit" in (tmp_path / "it.md").read_text()
    # the refit is a real computation: the Spearman values follow from the scores and the recorded landscape
    sys.path.insert(0, str(ROOT / "bench"))
    from stats import spearman
    fisher = res["estimators"]["fisher"]
    assert fisher["spearman"]["zero"] == round(spearman(fisher["group_scores"], res["truth"]["zero"]["gain_nf4_to_int8"]), 3)
    # scores recorded for another landscape model are refused, not reused
    (tmp_path / "other.json").write_text(json.dumps({**recorded, "landscape_model": "0" * 16}))
    proc = subprocess.run(script + ["--out", str(tmp_path / "other")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "another landscape model" in proc.stderr


def test_landscape_export_never_drops_recorded_trials(tmp_path, monkeypatch):
    """A checkout with fewer run directories than the exported file: refused, the file untouched."""
    import pandas as pd
    sys.path.insert(0, str(ROOT / "bench"))
    import landscape
    out = tmp_path / "bench" / "land"
    out.parent.mkdir()
    _synthetic_landscape(out.with_suffix(".parquet"))           # 256 "zero" trials recorded
    before = out.with_suffix(".parquet").read_bytes()
    monkeypatch.setattr(landscape, "ROOT", tmp_path)
    assert landscape.export(out) == out.with_suffix(".parquet")   # no run directories here: kept as it is
    run = tmp_path / "results" / "landscape_smollm2_zero"
    run.mkdir(parents=True)
    pd.DataFrame({"status": ["ok"] * 2, "plan_formats": ["a", "b"], "plan_code": ["4" * 30, "8" * 30],
                  "nll": [3.9, 3.8]}).to_parquet(run / "trials.parquet")
    with pytest.raises(SystemExit, match=r"would drop recorded trials .*'zero': 254"):
        landscape.export(out)
    assert out.with_suffix(".parquet").read_bytes() == before


def test_provenance_dirty_means_changed_code_not_a_growing_result_file(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import provenance

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert provenance.stamp()["dirty"] is False
    (tmp_path / "results" / "runs.jsonl").write_text("{}\n{}\n")      # a benchmark appended a row
    assert provenance.stamp()["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")                       # the code changed
    assert provenance.stamp()["dirty"] is True


def test_large_space_worlds_are_calibrated_and_their_front_is_exact():
    """The synthetic worlds: additive R^2 by group as the landscape's, the Pareto DP equals brute force on a
    small space, and the benchmark's driver answers over-budget and repeated proposals without training."""
    sys.path.insert(0, str(ROOT / "bench"))
    import itertools

    import numpy as np
    import search_drivers as drivers
    import search_worlds as sw
    space = sw.make_space("30x3")
    world = sw.make_world(space, 3)
    assert abs(sw._additive_r2(world, "demo") - sw.TARGET_R2) < 1e-3
    assert world.values["demo"][:, 1].sum() == __import__("pytest").approx(sw.group_gains("demo").sum())
    rng = np.random.default_rng(0)
    vals, costs = rng.uniform(0, 1, (6, 3)).cumsum(axis=1), rng.uniform(1, 2, (6, 3)).cumsum(axis=1)
    cost, val, plans = sw.pareto_dp(vals, costs, capacity=9.0)
    every = np.array(list(itertools.product(range(3), repeat=6)))
    c_all, v_all = costs[np.arange(6), every].sum(1), vals[np.arange(6), every].sum(1)
    ok = c_all <= 9.0
    m = sw.front_mask(c_all[ok], v_all[ok])
    assert sorted(np.round(cost, 9)) == sorted(np.round(c_all[ok][m], 9))
    assert np.allclose(costs[np.arange(6), plans].sum(1), cost)
    truth = sw.best_front(world, local_plans=10)
    assert sw.best_subset_hv(truth, 8) <= truth.hv + 1e-9 and sw.best_subset_hv(truth, 10 ** 4) == truth.hv

    class Repeats:   # proposes all-int8+bf16 (over the budget), then all-nf4 twice, then all-int8
        def __init__(self):
            self.queue = [[2] * 30, [0] * 30, [0] * 30, [1] * 30]
            self.told = []

        def suggest(self, tid):
            return drivers.config_of(self.queue.pop(0), (4, 8, 16)) if self.queue else drivers.FINISHED

        def on_trial_complete(self, tid, result=None, error=False):
            self.told.append(result["objective"])
    searcher = Repeats()
    trained = drivers.drive(world, searcher, 5)
    assert trained == [tuple([0] * 30), tuple([1] * 30)]
    assert searcher.told[0] < -999 and searcher.told[2] == searcher.told[1]   # over budget; repeat answered


@pytest.mark.slow   # over a minute: the slow suite (CI runs it)
def test_large_space_benchmark_runs_and_the_default_beats_random(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "search_large.py"), "--spaces", "30x3", "--worlds", "2",
                           "--checkpoints", "8", "16", "--concurrency-worlds", "0", "--searchers", "additive",
                           "greedy_chain", "probe_knapsack", "score_knapsack", "random", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "search_large.json").read_text())
    table = res["spaces"]["30x3"]["searchers"]
    assert res["default_searcher"] == "additive" and "greedy_chain" in table and res["source"]
    assert table["additive"]["hv_ratio_median"]["16"] > table["random"]["hv_ratio_median"]["16"] + 0.3
    assert all(0 < table[s]["hv_ratio_median"]["16"] <= table["best_subset"]["hv_ratio_median"]["16"] + 1e-9
               for s in ("additive", "greedy_chain", "probe_knapsack", "score_knapsack", "random"))
    assert "| **additive** (default) |" in (tmp_path / "search_large.md").read_text()


def test_real_check_report_reads_the_committed_trials(tmp_path):
    """The real-trial check's report from the committed trials (no run directory): the replay's prediction,
    and both strategies' fronts at N = 16 on the same tokens with a bootstrap SE."""
    sys.path.insert(0, str(ROOT / "bench"))
    import search_real30_report as rep
    if not rep.TRIALS.is_file():
        pytest.skip("no recorded real trials in this checkout")
    rep.main(tmp_path / "no-run-here", {"commit": "x" * 40, "command": "test", "date": "now"}, out=tmp_path / "r")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n_trials"] >= 48 and res["n_plans"] >= 40 and "r2" in res and -1 <= res["spearman"] <= 1
    f = res["fronts_at_16"]
    assert f["n_each"] == [16, 16] and f["default_over_chain_minus_1_se"] > 0


def test_every_bad_input_of_the_reliability_table_is_refused_cleanly_and_writes_nothing(tmp_path):
    """#25: the >= 100 bad inputs of bench/reliability.py --bad-inputs, through the real CLI: exit 2, no
    traceback, nothing written."""
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import bad_inputs
    results = bad_inputs.run_all(tmp_path)
    assert len(results) >= 100
    problems = [r for r in results if r["exit"] != 2 or not r["clean"] or r["wrote"]]
    assert not problems, problems[:5]


def test_real_check_calibration_probes_recover_a_known_world():
    """#24: the today-calibration reads each layer group's gain back from its up/down probes (the mean of both)
    and the int8 -> bf16 total from the bf16 probes; a plan set drawn from that world is then predicted exactly,
    and a missing group leaves no calibration rather than a wrong one."""
    import numpy as np
    import pandas as pd
    sys.path.insert(0, str(ROOT / "bench"))
    import search_real30 as s30
    import search_real30_report as rep
    truth = {"group_gains_nf4_to_int8": [0.02, 0.01, 0.005, 0.03, 0.0, 0.012, 0.007, 0.015], "int8_to_bf16_total": 0.011}
    base = 3.7
    rows = [(o, idx) for o, idx in s30.probe_set(30)]
    nll = [base - rep.today_quality(np.array([idx]), truth)[0] for _, idx in rows]
    probes = pd.DataFrame({"kind": [o for o, _ in rows], "nll": nll})
    cal = rep.probe_calibration(probes)
    assert np.allclose(cal["group_gains_nf4_to_int8"], truth["group_gains_nf4_to_int8"], atol=1e-5)
    assert abs(cal["int8_to_bf16_total"] - 0.011) < 1e-5 and cal["estimates_per_group"] == [2] * 8
    plans = np.random.default_rng(0).integers(0, 3, (40, 30))
    frame = pd.DataFrame({"plan_code": ["".join("48H"[i] for i in p) for p in plans],
                          "nll": base - rep.today_quality(plans, truth)})
    assert rep.prediction_today(frame, cal)["r2"] > 0.9999
    assert rep.probe_calibration(probes[~probes["kind"].isin(["up:3", "down:3"])]) is None
