"""`ray job submit` path: Ray's JobSubmissionClient against a local head on 127.0.0.1 (token auth on)."""

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import kill_session

pytestmark = pytest.mark.ray   # extra Ray processes: `pytest -m 'not ray'` skips them

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    port, dash, agent, runtime_env, metrics = (_free_port() for _ in range(5))
    # every port of its own: another Ray on this machine (e.g. a benchmark) holds the default agent ports
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}",
                             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=tmp_path)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    # Ray caches its config (auth mode included) and the token per process; an earlier Ray in this process
    # (a local ray.init() turns token auth on with ~/.ray/auth_token, a test Cluster may run without) would
    # otherwise leave its mode or token in the caches. Refresh both from the environment, as Ray itself does.
    from ray._raylet import AuthenticationTokenLoader, Config
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        from ray.job_submission import JobSubmissionClient
        deadline = time.time() + 120
        while True:  # the head takes a few seconds to serve its API
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield client
    finally:
        kill_session(proc.pid)  # the head and every process it started (all ours)
        monkeypatch.undo()
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def test_ray_job_submit_runs_a_search_and_results_land(head, tmp_path, capsys):
    from ray.job_submission import JobStatus
    results = tmp_path / "results"
    submit = dict(
        # no search.ray_address: a submitted job joins the cluster it was submitted to by itself
        entrypoint=f"qpruner search tune_jobs/tiny_smoke.yaml results_dir={results} search.num_trials=3 "
                   "search.metrics_linger_s=0",
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv", "results", ".git", ".whl", "**/__pycache__"]})
    agent_deadline = time.time() + 120
    while True:  # the API can answer before the head's job agent has registered (slow on a loaded machine)
        try:
            job_id = head.submit_job(**submit)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > agent_deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 400
    while head.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, "the job did not finish"
        time.sleep(1)
    logs = head.get_job_logs(job_id)
    assert head.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "Pareto front" in logs
    assert "Connecting to existing Ray cluster" in logs  # the head's Ray, not a private local one
    for name in ("trials.parquet", "pareto.parquet", "report.html", "pruned/model.safetensors"):
        assert (results / "tiny_smoke" / name).is_file(), name
    # `qpruner status <submission id>` from "a laptop": only the job API and the token, no files
    from qpruner.cli import main
    assert main(["status", job_id, "--address", head.get_address()]) == 0
    out = capsys.readouterr().out
    assert f"{job_id}: SUCCEEDED, 3 of 3 trials finished" in out and "trial t000" in out
