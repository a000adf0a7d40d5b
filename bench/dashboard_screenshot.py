"""Screenshots of the Ray dashboard during a real (tiny) QPruner search submitted as a Ray job.

    .venv/bin/python bench/dashboard_screenshot.py [results/bench]

Starts a head on 127.0.0.1 (its own ports and temp dir; token auth off for this local, loopback-only
head, so that the headless browser needs no token), submits `qpruner search tune_jobs/tiny_smoke.yaml`
with `ray job submit`'s API, and while the head is still up renders with headless Chromium (Debian's
`chromium`, offline): the Jobs page, the job's page (driver log with the named trials and the front)
and the Actors page (the trials as `qpruner_trial` actors). Writes ``ray_dashboard_*.png`` and stops
only the processes it started. No Grafana here: Debian has no Grafana package, so the board is
validated against real Prometheus in tests/test_prometheus.py instead of drawn.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import stamp  # noqa: E402

BIN = Path(sys.executable).parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shoot(chromium: str, url: str, out: Path, profile: str, height: int = 1000) -> None:
    subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size=1500,{height}",
                    "--virtual-time-budget=20000", f"--screenshot={out}", url],
                   capture_output=True, timeout=180, check=True)
    print("wrote", out)


def main(out_dir: str = "results/bench") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt-get install chromium)")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="qdash", dir="/tmp"))
    results = temp / "results"
    port, dash, agent, runtime_env, metrics = (_free_port() for _ in range(5))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", f"--runtime-env-agent-port={runtime_env}",
                             f"--metrics-export-port={metrics}", f"--temp-dir={temp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")})
        from ray.job_submission import JobStatus, JobSubmissionClient
        deadline = time.time() + 180
        while True:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
                job = client.submit_job(
                    entrypoint=f"qpruner search tune_jobs/tiny_smoke.yaml results_dir={results} "
                               "search.num_trials=5 search.metrics_linger_s=0 --overwrite",
                    runtime_env={"working_dir": str(ROOT),
                                 "excludes": [".venv", "results", ".git", "**/__pycache__", "*.whl"]},
                    submission_id=f"qpruner-tiny-smoke-{int(time.time())}")
                break
            except Exception:  # noqa: BLE001 - the head's API and job agent take a while to come up
                if time.time() > deadline:
                    raise
                time.sleep(2)
        deadline = time.time() + 900
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if time.time() > deadline:
                raise SystemExit(f"job {job} did not finish within 15 minutes")
            time.sleep(2)
        print("job", job, client.get_job_status(job))
        if client.get_job_status(job) != JobStatus.SUCCEEDED:
            raise SystemExit(f"job {job} ended {client.get_job_status(job)}: {client.get_job_logs(job)[-2000:]}")
        (out / "ray_dashboard.json").write_text(json.dumps({**stamp(), "job": job, "status": str(
            client.get_job_status(job)), "pages": ["ray_dashboard_jobs.png", "ray_dashboard_job.png",
                                                   "ray_dashboard_actors.png"]}, indent=2) + "\n")
        base = f"http://127.0.0.1:{dash}"
        with tempfile.TemporaryDirectory() as profile:
            _shoot(chromium, f"{base}/#/jobs", out / "ray_dashboard_jobs.png", profile + "/a")
            _shoot(chromium, f"{base}/#/jobs/{job}", out / "ray_dashboard_job.png", profile + "/b", height=2400)
            _shoot(chromium, f"{base}/#/actors", out / "ray_dashboard_actors.png", profile + "/c")
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)   # the head and everything it started (its own session)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)   # its temp dir and the tiny search's results


if __name__ == "__main__":
    main(*sys.argv[1:])
