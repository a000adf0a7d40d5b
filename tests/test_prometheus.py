"""QPruner's Ray metrics, scraped by a real Prometheus (Debian's package, on 127.0.0.1) from Ray's own
service-discovery file during a tiny search; the shipped Grafana dashboard's queries run against them."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from qpruner.dashboards import expressions

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus)")
def test_metrics_reach_prometheus_and_every_dashboard_query_finds_them():
    work = Path(tempfile.mkdtemp(prefix="/tmp/qpm"))  # short: Ray's socket paths live under it
    port = _port()
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n  - job_name: ray\n    file_sd_configs:\n"
        f"      - files: ['{work}/ray/prom_metrics_service_discovery.json']\n        refresh_interval: 1s\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    env = {**os.environ, "RAY_TMPDIR": str(work)}  # Ray writes its files under <RAY_TMPDIR>/ray
    search = subprocess.Popen([sys.executable, "-m", "qpruner.cli", "search", str(ROOT / "tune_jobs" / "tiny_smoke.yaml"),
                               f"results_dir={work / 'results'}", "search.dashboard=true", "search.metrics_linger_s=40"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)
    try:
        ok = []
        deadline = time.time() + 420
        while time.time() < deadline and search.poll() is None:
            try:
                ok = _query(port, 'ray_qpruner_trials{status="ok", qpruner_job="tiny_smoke"}')
            except OSError:
                ok = []
            if ok and float(ok[0]["value"][1]) == 7:
                break
            time.sleep(2)
        assert ok and float(ok[0]["value"][1]) == 7, "the final trial count never reached Prometheus"
        assert ok[0]["metric"]["submission_id"].startswith("local-") and ok[0]["metric"]["job"] == "ray"
        per_trial = _query(port, 'ray_qpruner_trial_weight_mb{qpruner_job="tiny_smoke"}')
        assert len(per_trial) == 7 and all(s["metric"]["trial"].startswith("t000") for s in per_trial)
        assert float(_query(port, "ray_qpruner_hypervolume")[0]["value"][1]) > 0
        for expr in expressions():
            assert _query(port, expr), f"dashboard query finds no series: {expr}"
    finally:
        for proc in (search, prom):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
