"""End to end through a real local Ray (127.0.0.1): `qpruner search tune_jobs/tiny_smoke.yaml`."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qpruner.pareto import front_mask

ROOT = Path(__file__).resolve().parents[1]


def test_qpruner_search_tiny_smoke(tmp_path):
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # as a user runs it
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "tiny_smoke"
    for name in ("trials.parquet", "pareto.parquet", "pareto.png", "job.yaml", "prune.json", "seeds.json",
                 "pruned/model.safetensors", "pruned/qpruner_prune.json"):
        assert (out / name).is_file(), name
    trials = pd.read_parquet(out / "trials.parquet")
    trained = trials[trials["status"] == "ok"]
    assert len(trained) == 7
    assert set(trials["status"]) == {"ok"}       # the default (additive) searcher proposes no over-budget plan, no repeat
    assert (trained["weight_bytes"] == trained["weight_bytes_predicted"]).all()
    assert (trained["node_ip"] == "127.0.0.1").all()               # a local Ray stays on loopback
    assert trained["plan_formats"].is_unique                    # no plan trained twice
    assert (trained["avg_bits"] <= 10.0).all()                   # no trained plan over the budget
    # 2 uniform plans that fit + the best guess + 2 sampled, then the searcher's own
    assert sorted(trained["origin"]) == ["searcher"] * 2 + ["seed:best_guess"] + ["seed:sampled"] * 2 + ["seed:uniform"] * 2
    assert (trained["nll_se"] > 0).all() and (trained["objective_se"] > 0).all()
    assert (trained["worker_rss_bytes"] > 0).all()              # recorded per trial (leak watch)
    assert (trained["worker_peak_rss_bytes"] >= trained["worker_rss_bytes"]).all()
    import json
    driver = json.loads((out / "driver.json").read_text())      # the weights go by location, not by value
    assert 0 < driver["object_store_bytes_per_trial"] < 5e6 and driver["driver_peak_rss_bytes"] > 0
    assert list((out / "loftq").glob("*/L000.*.nf4.safetensors"))   # LoftQ results kept for later trials
    front = pd.read_parquet(out / "pareto.parquet")
    assert len(front) >= 1 and set(front["trial_id"]) <= set(trained["trial_id"])
    assert all(front_mask(front["accuracy"].tolist(), front["weight_bytes"].tolist()))
    assert "Pareto front" in proc.stdout and "finished in" in proc.stdout

    # the same job again: found finished, reported, nothing trained, nothing rewritten
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "continued and finished" in again.stdout
    assert pd.read_parquet(out / "trials.parquet").equals(trials)
    # a changed job into the same directory: refused, naming the key; nothing written
    changed = subprocess.run(cmd + ["finetune.steps=4"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert changed.returncode == 2 and "finetune.steps: 3 -> 4" in changed.stderr and "Traceback" not in changed.stderr
    assert pd.read_parquet(out / "trials.parquet").equals(trials)
    # --overwrite: the old run moves aside, whole, and the new one starts in its place
    fresh = subprocess.run(cmd + ["search.num_trials=1", "--overwrite"], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path, env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("tiny_smoke.replaced-")]
    assert len(aside) == 1 and pd.read_parquet(aside[0] / "trials.parquet").equals(trials)
    assert len(pd.read_parquet(out / "trials.parquet")) == 1


def test_weights_published_to_a_uri_reach_trials_through_the_node_cache(tmp_path):
    """search.storage_path as a URI (pyarrow's file:// stands in for s3://): the driver publishes the pruned model
    there once, each node downloads it once into its cache, trials read it from that copy."""
    store, cache = tmp_path / "bucket", tmp_path / "node-cache"
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path / 'r'}", f"search.storage_path={store.as_uri()}", "search.num_trials=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "QPRUNER_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [published] = list((store / "pruned").iterdir())
    assert (published / "qpruner_weights.complete").is_file() and (published / "model.safetensors").is_file()
    assert (cache / "weights" / published.name / "model.safetensors").is_file()      # the node's own copy
    assert list((cache / "loftq").glob(f"{published.name}-*/L*.safetensors"))        # its LoftQ cache beside it
    trials = pd.read_parquet(tmp_path / "r" / "tiny_smoke" / "trials.parquet")
    assert (trials["status"] == "ok").sum() == 2


def test_killed_driver_resumes_with_nothing_lost_and_no_trial_trained_twice(tmp_path):
    """SIGKILL of the driver's process group mid-search, then --resume (bench/reliability.py, one round)."""
    import random
    sys.path.insert(0, str(ROOT / "bench"))
    import reliability
    r = reliability.one_round(0, 1, tmp_path, random.Random(4))
    assert r["kills"] == 1 and r["rows_lost"] == 0 and r["rows_duplicated"] == 0 and r["failed_reads"] == 0
    assert r["trained"] == 7 and r["extra_trainings"] == 0


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


def _search(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return pd.read_parquet(tmp_path / "tiny_smoke" / "trials.parquet"), proc


@pytest.mark.parametrize("searcher", ["optuna_mo", pytest.param("optuna_gp", marks=pytest.mark.slow),
                                      pytest.param("random", marks=pytest.mark.slow)])
def test_other_searchers(tmp_path, searcher):
    trials, _ = _search(tmp_path, f"search.searcher={searcher}", "search.num_trials=6")
    trained = trials[trials["status"] == "ok"]
    assert len(trained) == 6 and trained["plan_formats"].is_unique and (trained["avg_bits"] <= 10.0).all()
    assert (trained["origin"] == "searcher").sum() == 1  # the 5 seed plans first


def test_asha_stops_hopeless_trials_early(tmp_path):
    trials, _ = _search(tmp_path, "search.scheduler=asha", "search.metric=perplexity", "finetune.steps=8",
                        "finetune.eval_every=2", "search.num_trials=7", "search.max_concurrent=1")
    stopped = trials[trials["status"] == "stopped"]
    assert len(stopped) >= 1 and (stopped["step"] < 8).all() and stopped["perplexity"].notna().all()
    assert len(trials[trials["status"].isin(["ok", "stopped"])]) == 7


def test_status_command(tmp_path):
    _, _ = _search(tmp_path, "search.num_trials=5")
    proc = subprocess.run([sys.executable, "-m", "qpruner.cli", "status", str(tmp_path / "tiny_smoke")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "hypervolume" in proc.stdout and "5 ok" in proc.stdout
    assert "plan (4=nf4" in proc.stdout
    from qpruner.pareto import TrialLog
    from qpruner.rundir import RunDir
    ref = RunDir(tmp_path / "tiny_smoke").reference()   # the search's fixed reference, kept for status
    assert ref is not None and ref[1] > 0
    hv = TrialLog(tmp_path / "tiny_smoke", "accuracy").summary(ref)["hypervolume"]
    assert f"hypervolume {hv:.4g}" in proc.stdout and "worst trial so far" not in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "qpruner.cli", "status", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a results/<job>/ directory" in bad.stderr


def test_a_local_search_asking_for_resources_this_machine_lacks_fails_at_once(tmp_path):
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path}", "search.cpus_per_trial=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "64 CPU" in proc.stderr and "no trial could ever start" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_joint_search_over_pruning_amount_and_precision(tmp_path):
    """prune.param_ratios: each amount pruned and scored once, trials on every variant, rows carry the amount,
    the report answers "prune or quantize?", any point exports with its amount and loads; a second run
    reuses every variant."""
    import json
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path}", "name=joint", "prune.param_ratios=[0.0, 0.3]", "prune.param_ratio=0.3",
           "search.num_trials=6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "joint"
    for name in ("pruned-p0/model.safetensors", "pruned-p30/model.safetensors", "layer_scores-p0.json",
                 "layer_scores-p30.json", "prune-p0.json", "prune-p30.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "prune-p0.json").read_text())["params_after"] == \
        json.loads((out / "prune-p0.json").read_text())["params_before"]
    trials = pd.read_parquet(out / "trials.parquet")
    ok = trials[trials["status"] == "ok"]
    assert len(ok) == 6 and ok["plan_key"].is_unique and set(ok["prune_param_ratio"]) == {0.0, 0.3}
    assert all(code.startswith(("p0-", "p30-")) for code in ok["plan_code"])
    assert (ok["avg_bits"] <= 10.0).all() and (ok["weight_bytes"] == ok["weight_bytes_predicted"]).all()
    assert "Prune more or quantize more?" in proc.stdout and "pruned 30%*" in proc.stdout
    assert "Prune more or quantize more?" in (out / "report.html").read_text()

    front = pd.read_parquet(out / "pareto.parquet")
    export = subprocess.run([sys.executable, "-m", "qpruner.cli", "export", str(out), "--point", "0"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    exported = next((out / "exports").iterdir())
    record = json.loads((exported / "qpruner_plan.json").read_text())
    amount = float(front.iloc[0]["prune_param_ratio"])
    assert record["plan"]["pruned"] == amount and record["trial"]["prune_param_ratio"] == amount
    variant = "pruned-p0" if amount == 0 else "pruned-p30"
    assert record["prune"] == json.loads((out / variant / "qpruner_prune.json").read_text())["report"]
    from qpruner import load, models
    model, _ = load(exported)
    assert models.layer_widths(model.base_model.model) == tuple(
        models.LayerWidth(**w) for w in record["prune"]["widths_after"])

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "continued and finished" in again.stdout, again.stderr[-3000:]
    assert again.stderr.count("reusing the pruned model") == 2 and "saved the pruned model" not in again.stderr


@pytest.mark.slow   # about a minute: the slow suite (CI runs it)
def test_multi_fidelity_screens_steer_the_search_and_never_reach_the_front(tmp_path):
    trials, _ = _search(tmp_path, "search.screen_share=0.4", "search.screen_windows=3", "search.num_trials=5",
                        "policy.seed_plans=0",
                          "search.metric=perplexity")
    trained = trials[trials["status"] == "ok"]
    screened = trials[trials["status"] == "screened"]
    assert len(trained) == 5 and len(screened) >= 1                   # num_trials counts full trials only
    assert set(trained["fidelity"]) == {"full"} and set(screened["fidelity"]) == {"screen"}
    assert trained["objective_screen"].notna().all()                   # every full trial screened itself too
    assert (screened["train_steps"] == 0).all() and screened["error"].isna().all()
    assert screened["eval_window_tokens"].map(len).eq(3).all()
    assert trained["eval_window_tokens"].map(len).gt(3).all()
    out = tmp_path / "tiny_smoke"
    front = pd.read_parquet(out / "pareto.parquet")
    assert set(front["trial_id"]) <= set(trained["trial_id"])
    assert "screens: zero-step evaluations" in (out / "report.html").read_text()


def _rows(path):
    try:
        return pd.read_parquet(path)
    except Exception:  # noqa: BLE001 - not written yet
        return pd.DataFrame()


def _search_until_trained(cwd, results, n: int, *extra: str):
    """Start a slow-ish tiny search (1 at a time, 12 steps) and return once ``n`` trials are recorded (or it
    ended): (its command line, its trials.parquet, the running process)."""
    import time
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={results}", "search.max_concurrent=1", "finetune.steps=12", *extra]
    trials_file = Path(results) / "tiny_smoke" / "trials.parquet"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    deadline = time.time() + 300
    while time.time() < deadline and len(_rows(trials_file)) < n and proc.poll() is None:
        time.sleep(0.2)
    return cmd, trials_file, proc


@pytest.mark.slow   # about a minute: the slow suite (CI runs it)
def test_ctrl_c_is_not_a_finished_run_and_the_rerun_completes_it(tmp_path):
    """#25.4: SIGINT after 2 trained trials: exit 130, "interrupted", no "finished" and no front printed; the
    same command again trains the rest, each plan once."""
    import signal
    cmd, trials_file, proc = _search_until_trained(tmp_path, tmp_path, 2)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "interrupted after" in err and "finished in" not in out and "Traceback" not in err
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    trials = pd.read_parquet(trials_file)
    trained = trials[trials["status"] == "ok"]
    assert len(trained) == 7 and trained["plan_formats"].is_unique and trials["trial_id"].is_unique


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs to fill (needs root to mount; skipped, with its reason, elsewhere)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (the disk-full test fills one)")
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def _fill(fs):
    filler = fs / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 20))
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("frees_in_time", [True, pytest.param(False, marks=pytest.mark.slow)])   # False: the slow suite
def test_a_full_disk_loses_no_result_and_never_ends_a_run_as_finished(small_disk, tmp_path, frees_in_time):
    """#25.1: the disk fills after 2 trained trials. Freed within search.disk_full_wait_s: the search waits,
    keeps the finished results in memory, writes them, and completes (no trial trained twice). Still full: it
    stops with exit 1 and says why; after freeing, the same command completes it. No temporary file stays."""
    import time
    cmd, trials_file, proc = _search_until_trained(tmp_path, small_disk, 2,
                                                   f"search.disk_full_wait_s={60 if frees_in_time else 4}")
    assert proc.poll() is None, "the search ended before the disk filled"
    filler = _fill(small_disk)
    if frees_in_time:
        time.sleep(8)
        filler.unlink()
    out, err = proc.communicate(timeout=400)
    assert "Traceback" not in err and "could not write" in err
    if not frees_in_time:
        assert proc.returncode == 1 and "could not be written" in err and "finished in" not in out
        filler.unlink()
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        out, err = again.stdout, again.stderr
        assert again.returncode == 0, out[-2000:] + err[-2000:]
    else:
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
        assert "written after all" in err
    trials = pd.read_parquet(trials_file)
    trained = trials[trials["status"] == "ok"]
    assert len(trained) == 7 and trained["plan_formats"].is_unique and trials["trial_id"].is_unique
    assert not [p for p in trials_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_trials_report_every_step_and_status_lists_the_running_ones(tmp_path, capsys):
    """finetune.report_every: 1 puts one progress line per training step into each trial's result.json (no
    metric in it: the search and its searcher go on as before), and `qpruner status` lists running trials."""
    import json
    import time

    from qpruner.cli import main
    from qpruner.rundir import RunDir
    steps = 40
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
           f"results_dir={tmp_path}", "finetune.report_every=1", f"finetune.steps={steps}", "search.num_trials=3",
           "search.max_concurrent=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    run, seen, shown = RunDir(tmp_path / "tiny_smoke"), [], ""
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        running = run.running() if run.path.is_dir() else []
        if any(t.get("step") for t in running) and not shown:
            seen = running
            main(["status", str(run.path)])
            shown = capsys.readouterr().out
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert seen and seen[0]["trial"].startswith("t0") and 0 < seen[0]["step"] <= steps
    assert "running: t0" in shown and f"/{steps}" in shown and "loss" in shown, shown
    assert "step 40/40" in err and "tokens/s" in err            # the driver's log line per progress report
    trials = pd.read_parquet(tmp_path / "tiny_smoke" / "trials.parquet")
    trained = trials[trials["status"] == "ok"]
    assert len(trained) == 3
    dirs = [p for p in (tmp_path / "tiny_smoke" / "ray" / "tune").iterdir() if p.name.startswith("trial_")]
    assert len(dirs) == 3
    for d in dirs:
        lines = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        progress = [r for r in lines if r.get("status") == "training"]
        assert [r["step"] for r in progress] == list(range(1, steps + 1))
        assert all("objective" not in r and r["train_loss"] > 0 and r["eta_s"] >= 0 for r in progress)
        assert lines[-1]["status"] == "ok" and lines[-1]["eval_round"] == 1
    assert not run.running()                                    # nothing is listed once the search is over
