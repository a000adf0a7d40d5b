"""The search on a real 2-node Ray cluster (ray.cluster_utils.Cluster on 127.0.0.1), node loss,
driver loss and resume."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from qpruner.config import load_job
from qpruner.job import run_job

from helpers import kill_session

pytestmark = pytest.mark.ray   # extra Ray processes: `pytest -m 'not ray'` skips them

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tune_jobs" / "tiny_smoke.yaml"
SHARED = ["search.storage_shared=true"]   # both nodes run on this machine: its disk is shared by them (and probed)


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def _trials(directory: Path) -> pd.DataFrame:
    return pd.read_parquet(directory / "tiny_smoke" / "trials.parquet")


def _check_consistent(trials: pd.DataFrame, n_trained: int) -> pd.DataFrame:
    ok = trials[trials["status"] == "ok"]
    assert trials["trial_id"].is_unique
    assert len(ok) == n_trained and ok["plan_formats"].is_unique     # every trial once, no plan trained twice
    assert (ok["avg_bits"] <= 10.0).all()                             # nothing over the budget was trained
    assert set(trials["status"]) <= {"ok", "infeasible", "cached"}
    return ok


@pytest.mark.slow   # about a minute on two nodes: the slow suite (CI runs it)
def test_trials_run_on_both_nodes(cluster, tmp_path):
    c, worker = cluster
    job = load_job(JOB, [f"results_dir={tmp_path}", f"search.ray_address={c.address}", "finetune.steps=20",
                         "search.num_trials=4", *SHARED])
    run_job(job)
    ok = _check_consistent(_trials(tmp_path), 4)
    assert worker.node_id in set(ok["node_id"]) and len(set(ok["node_id"])) == 2


def test_node_local_storage_on_two_nodes_is_refused_before_training(cluster, tmp_path, capsys):
    """A disk local to one machine, two nodes: refused with exit code 2 and the fix, before pruning."""
    from qpruner.cli import main
    c, _ = cluster
    code = main(["search", str(JOB), f"results_dir={tmp_path}", f"search.ray_address={c.address}",
                 f"search.storage_path={tmp_path / 'storage'}", "search.num_trials=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "more than one node" in err and "node-local filesystem" in err and "s3://" in err
    assert not (tmp_path / "tiny_smoke" / "pruned").exists()        # refused before pruning, nothing left behind


def test_a_shared_storage_path_on_two_nodes_runs(cluster, tmp_path, monkeypatch):
    """The same search with the storage on a network filesystem (the mount table's answer stands in for an NFS
    mount; the probe is real: a task on each node looks for the driver's file) runs, checkpoints under it."""
    import qpruner.search.storage as storage
    c, worker = cluster
    shared = tmp_path / "nfs"
    real = storage.mounts
    monkeypatch.setattr(storage, "mounts", lambda *a: [*real(*a), (str(shared.resolve()), "nfs4")])
    job = load_job(JOB, [f"results_dir={tmp_path}", f"search.ray_address={c.address}", "finetune.steps=5",
                         f"search.storage_path={shared}", "search.num_trials=2"])
    run_job(job)
    ok = _check_consistent(_trials(tmp_path), 2)
    assert all(not str(p).startswith("/") for p in ok["adapter_path"])          # relative to the storage root
    assert all((shared / p / "adapter_model.safetensors").is_file() for p in ok["adapter_path"])


@pytest.mark.slow   # about a minute on two nodes: the slow suite (CI runs it)
def test_losing_the_worker_node_mid_trial_retries_it(cluster, tmp_path):
    c, worker = cluster
    job = load_job(JOB, [f"results_dir={tmp_path}", f"search.ray_address={c.address}", "finetune.steps=150",
                         "search.num_trials=5", *SHARED])
    killed = threading.Event()

    def kill_worker_when_busy():
        import ray._private.state as state
        deadline = time.time() + 300
        rows = tmp_path / "tiny_smoke" / "trials.parquet"
        while time.time() < deadline and not killed.is_set():
            if ray.is_initialized() and rows.is_file():  # steady state: a trial has finished already
                free = state.state.available_resources_per_node().get(worker.node_id, {})
                if free and free.get("CPU", 0.0) == 0.0:  # a trial holds the worker's CPU (the key goes)
                    time.sleep(2.0)               # well inside a ~10 s trial
                    c.remove_node(worker, allow_graceful=False)
                    killed.set()
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=kill_worker_when_busy, daemon=True)
    thread.start()
    run_job(job)
    thread.join(timeout=5)
    assert killed.is_set()
    ok = _check_consistent(_trials(tmp_path), 5)
    assert ok["failures"].sum() >= 1              # the trial lost with the node ran again, on the head


@pytest.mark.slow   # about a minute on two nodes: the slow suite (CI runs it)
def test_driver_killed_then_resume(tmp_path):
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(JOB), f"results_dir={tmp_path}", "finetune.steps=40",
           "search.num_trials=8"]
    driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            path = tmp_path / "tiny_smoke" / "trials.parquet"
            if path.is_file() and (pd.read_parquet(path)["status"] == "ok").sum() >= 2:
                break
            time.sleep(0.3)
        else:
            pytest.fail("the search made no progress")
        os.kill(driver.pid, signal.SIGKILL)      # the driver dies mid-search
        driver.wait(timeout=30)
    finally:
        kill_session(driver.pid)                 # Ray processes this driver started
    before = _trials(tmp_path)
    assert (before["status"] == "ok").sum() < 8
    proc = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after = _trials(tmp_path)
    _check_consistent(after, 8)
    assert set(before["trial_id"]) <= set(after["trial_id"])  # nothing persisted before the kill was lost
    assert "resuming" in proc.stderr or "Restoring" in proc.stderr




@pytest.mark.slow   # about a minute on two nodes: the slow suite (CI runs it)
def test_a_joint_search_ships_every_pruned_variant_to_both_nodes(cluster, tmp_path):
    """prune.param_ratios on 2 nodes: each variant is one object in the object store; trials of every amount
    run, on both nodes, each on its own variant's weights (predicted memory = measured)."""
    c, worker = cluster
    job = load_job(JOB, [f"results_dir={tmp_path}", f"search.ray_address={c.address}", "finetune.steps=20",
                         "search.num_trials=6", "prune.param_ratios=[0.0, 0.3]", "policy.budget_avg_bits=null",
                         *SHARED])
    run_job(job)
    ok = _trials(tmp_path)
    ok = ok[ok["status"] == "ok"]
    assert len(ok) == 6 and ok["plan_key"].is_unique and set(ok["prune_param_ratio"]) == {0.0, 0.3}
    assert worker.node_id in set(ok["node_id"]) and len(set(ok["node_id"])) == 2
    assert (ok["weight_bytes"] == ok["weight_bytes_predicted"]).all()
