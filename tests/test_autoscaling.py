"""A cloud autoscaling run, on this machine: Ray's fake multi-node provider (the autoscaler the cluster
launcher and KubeRay run, with nodes started as local processes) under a head with 0 CPUs for trials.

Checks that the search's resource requests make the autoscaler launch worker nodes, that the trials run
on them, that the nodes go back to 0 after the idle timeout, and that a search asking for more than any
node type offers fails fast with a clear message. Everything on 127.0.0.1, token auth on."""

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import kill_session

pytestmark = pytest.mark.ray   # extra Ray processes: `pytest -m 'not ray'` skips them

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER_TYPE = "ray.worker.cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(port: int) -> dict:
    """The launcher's cluster config for the fake provider: a head with 0 CPUs, 0..2 one-CPU workers."""
    return {"cluster_name": "qpruner_autoscaling_test", "max_workers": 2,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                WORKER_TYPE: {"resources": {"CPU": 1, "object_store_memory": 200_000_000}, "node_config": {},
                              "min_workers": 0, "max_workers": 2}},
            "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1, "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


@pytest.fixture
def cluster(tmp_path):
    # a short temp dir: Ray's unix sockets live under it (the path limit is ~107 characters)
    temp = Path(tempfile.mkdtemp(prefix="qas", dir="/tmp"))
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    port = _free_port()
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(_config(port)))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    agent, runtime_env, metrics = (_free_port() for _ in range(3))
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
                             f"--autoscaling-config={config}", "--include-dashboard=false", f"--temp-dir={temp}",
                             f"--dashboard-agent-listen-port={agent}", f"--runtime-env-agent-port={runtime_env}",
                             f"--metrics-export-port={metrics}"],
                            env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=tmp_path)
    try:
        info = {"address": f"127.0.0.1:{port}", "env": env, "temp": temp}
        deadline = time.time() + 120
        while not _alive(info):   # the head answers after a few seconds
            assert time.time() < deadline, "the head did not come up"
            time.sleep(1)
        yield info
    finally:
        kill_session(proc.pid)   # the head, its autoscaler and every node that launched (all in its session)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def _alive(cluster) -> list[dict] | None:
    """The cluster's live nodes (id, CPUs), read in a separate process (no Ray state in the test's)."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
            "for n in ray.nodes() if n['Alive']]))" % cluster["address"])
    out = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None


def _search(cluster, results: Path, *overrides: str, timeout: int = 300):
    return subprocess.run([str(BIN / "qpruner"), "search", "tune_jobs/tiny_smoke.yaml", f"results_dir={results}",
                           f"search.ray_address={cluster['address']}", "search.num_cpus=null", "search.num_trials=3",
                           "search.metrics_linger_s=0", "search.storage_shared=true", *overrides],
                          cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=timeout)


def test_the_autoscaler_launches_nodes_for_the_trials_and_scales_back(cluster, tmp_path):
    before = _alive(cluster)
    assert len(before) == 1 and before[0]["cpus"] == 0   # only the head, which holds no trial
    head = before[0]["id"]
    run = _search(cluster, tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Adding" in run.stdout + run.stderr and WORKER_TYPE in run.stdout + run.stderr   # the autoscaler's events
    trials = pd.read_parquet(tmp_path / "results" / "tiny_smoke" / "trials.parquet")
    trained = trials[trials["status"] == "ok"]
    assert len(trained) == 3
    assert trained["node_id"].notna().all() and head not in set(trained["node_id"])   # all ran on launched nodes
    deadline = time.time() + 120   # idle_timeout_minutes 0.1: the workers go back to 0
    while len(nodes := _alive(cluster) or []) > 1:
        assert time.time() < deadline, f"the worker nodes did not scale back to 0: {nodes}"
        time.sleep(2)
    assert [n["id"] for n in nodes] == [head]


def test_a_search_no_node_type_can_hold_fails_fast(cluster, tmp_path):
    t = time.time()
    run = _search(cluster, tmp_path / "results", "search.cpus_per_trial=4", timeout=240)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no node type can provide 4 CPU" in run.stderr and "search.cpus_per_trial" in run.stderr
    assert "Traceback" not in run.stderr
    assert time.time() - t < 180
