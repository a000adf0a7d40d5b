"""What Ray users see: trial names, the metrics' names, labels and values (Ray's Gauge recorded)."""

import json
import os
import math
from types import SimpleNamespace

import pytest

from qpruner.config import build_job
from qpruner.pareto import TrialLog
from qpruner.search import callbacks
from qpruner.search.run import PlanDecoder, TrialNames, reference_point, submission_id


class FakeGauge:
    values: dict = {}

    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys = name, tuple(tag_keys)

    def set(self, value, tags=None):
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        FakeGauge.values[(self.name, tuple(sorted(tags.items())))] = value


@pytest.fixture
def gauges(monkeypatch):
    import ray.util.metrics
    FakeGauge.values = {}
    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeGauge)
    return FakeGauge.values


def _value(values, name, **tags):
    hits = [v for (n, t), v in values.items() if n == name and tags.items() <= dict(t).items()]
    assert len(hits) == 1, (name, tags, hits)
    return hits[0]


def test_trials_are_named_by_number_and_plan():
    decode = PlanDecoder(4, "nf4", "layer")
    trial = SimpleNamespace(experiment_tag="7_bits_000=4,bits_001=8", trial_id="5570af3b",
                            config={"bits_000": 4, "bits_001": 8, "bits_002": 8, "bits_003": 16})
    assert TrialNames(decode)(trial) == "t0007-488H"
    assert TrialNames(decode, directory=True)(trial) == "trial_0007_5570af3b_488H"


def test_metrics_carry_job_and_submission_labels_zeros_first_and_per_trial_series(tmp_path, gauges, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_X"}}))
    log = TrialLog(tmp_path, "perplexity")
    persist = callbacks.PersistTrials(log, PlanDecoder(2, "nf4", "layer"), "demo", "stale-id", ref=(-10.0, 1e6))
    persist.setup()
    assert _value(gauges, "qpruner_trials", status="ok", qpruner_job="demo", submission_id="raysubmit_X") == 0
    assert _value(gauges, "qpruner_hypervolume") == 0.0
    row = {"trial_id": "a", "status": "ok", "perplexity": 30.0, "perplexity_se": 0.5, "weight_bytes": 2e5,
           "avg_bits": 6.0, "plan_code": "48", "plan_formats": "nf4,int8"}
    log._put(dict(row))
    persist._done()
    persist.metrics.trial("t0001-48", "48", row)
    first = _value(gauges, "qpruner_hypervolume")
    assert first == pytest.approx((1e6 - 2e5) * (-math.log(30.0) + 10.0))   # against the fixed reference
    assert _value(gauges, "qpruner_trial_quality", trial="t0001-48", plan="48") == 30.0
    assert _value(gauges, "qpruner_trial_quality_se", trial="t0001-48") == 0.5
    assert _value(gauges, "qpruner_trial_weight_mb", trial="t0001-48") == pytest.approx(0.2)
    log._put({**row, "trial_id": "b", "perplexity": 40.0, "weight_bytes": 1e5, "plan_formats": "nf4,nf4"})
    persist._done()
    assert _value(gauges, "qpruner_hypervolume") > first                     # never jumps down
    assert _value(gauges, "qpruner_trials", status="ok") == 2


def test_reference_point_is_a_model_that_knows_nothing():
    job = build_job({"model": {"source": "tiny"}})
    context = SimpleNamespace(config_dict={"vocab_size": 49152})
    assert reference_point(job, context, 1000.0) == (pytest.approx(-math.log(49152)), 1001.0)
    acc = build_job({"model": {"source": "tiny"}, "search": {"metric": "accuracy"}})
    assert reference_point(acc, context, 5.0) == (0.0, 6.0)


def test_submission_id_from_the_job_supervisor(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    assert submission_id() == "raysubmit_1"


def test_status_of_a_running_submission_reads_only_the_job_api(monkeypatch, capsys):
    import ray.job_submission
    from qpruner.cli import main
    logs = {"raysubmit_A": "", "raysubmit_B": (
        "10:00:00 INFO qpruner.search.callbacks: progress: 1/7 trained, 1 rows, front 1 plans, hypervolume 3.1\n"
        "10:02:00 INFO qpruner.search.callbacks: trial t0002-4884: ppl 30.1\n"
        "10:02:00 INFO qpruner.search.callbacks: progress: 3/7 trained, 4 rows, front 2 plans, hypervolume 5.2\n")}

    class Client:  # the transport, faked: what the head's job API answers
        def __init__(self, address):
            assert address == "http://head:8265"

        def get_job_status(self, job_id):
            return ray.job_submission.JobStatus.RUNNING

        def get_job_logs(self, job_id):
            return logs[job_id]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert main(["status", "raysubmit_A"]) == 0
    assert "raysubmit_A: RUNNING, 0 trials finished" in capsys.readouterr().out
    assert main(["status", "raysubmit_B"]) == 0
    out = capsys.readouterr().out
    assert "RUNNING, 3 of 7 trials finished; front 2 plans" in out and "about 4 min left" in out and "t0002-4884" in out


def test_keep_dashboard_holds_the_local_dashboard_until_ctrl_c(tmp_path):
    """search.keep_dashboard: after the search the dashboard still answers; Ctrl-C stops it, exit 0."""
    import re
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "qpruner"), "search", "tune_jobs/tiny_smoke.yaml",
                             f"results_dir={tmp_path}", "search.num_trials=2", "search.dashboard=true",
                             "search.keep_dashboard=true"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines, deadline = [], time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines[-40:])
            lines.append(line)
            if "stays up at" in line:
                break
        url = re.search(r"stays up at (http://\S+)", lines[-1]).group(1)
        assert "results:" in "".join(lines)   # the search finished and reported first
        time.sleep(1)
        try:
            status = urllib.request.urlopen(url, timeout=10).status
        except urllib.error.HTTPError as exc:   # token auth on: the dashboard answers, and asks for the token
            status = exc.code
        assert status in (200, 401, 403)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        from helpers import kill_session
        kill_session(proc.pid)


def test_keep_dashboard_needs_a_local_dashboard():
    from qpruner.errors import ConfigError
    with pytest.raises(ConfigError, match="search.keep_dashboard"):
        build_job({"model": {"source": "tiny"}, "search": {"keep_dashboard": True}})
    build_job({"model": {"source": "tiny"}, "search": {"keep_dashboard": True, "dashboard": True}})


def test_infeasible_events_are_matched_to_the_trials_request():
    watch = callbacks.InfeasibleWatch(cpus=4, gpus=0)
    watch.on_log({"pid": "autoscaler", "lines": [":event_summary:Error: No available node types can fulfill "
                                                 "resource request {'CPU': 2.0}. Add suitable node types"]})
    assert watch.problem is None   # someone else's request
    watch.on_log({"pid": 123, "lines": ["No available node types can fulfill resource request {'CPU': 4.0}"]})
    assert watch.problem is None   # not the autoscaler's event
    watch.on_log({"pid": "autoscaler", "lines": ["Error: No available node types can fulfill resource request "
                                                 "{'CPU': 4.0}. Add suitable node types to this cluster"]})
    assert "each asks for 4 CPU" in watch.problem
    watch.on_step_begin(0, [SimpleNamespace(status="PENDING")])   # once: perhaps a node restarting
    watch.on_trial_start(0, [], None)                              # a trial started: forgotten
    assert watch.problem is None
    event = {"pid": "autoscaler", "lines": ["No available node types can fulfill resource request {'CPU': 4.0}"]}
    watch.on_log(event)
    watch.on_log(event)
    watch.on_step_begin(0, [SimpleNamespace(status="RUNNING")])   # one is running: the cluster can hold trials
    with pytest.raises(callbacks.Infeasible):
        watch.on_step_begin(0, [SimpleNamespace(status="PENDING")])
    watch.on_log({"pid": "autoscaler", "lines": None})             # malformed: ignored, never raised into Ray
    gpu = callbacks.InfeasibleWatch(cpus=1, gpus=0.5)
    assert gpu.matches({"CPU": 1.0, "GPU": 0.5}) and not gpu.matches({"CPU": 1.0})
    assert not gpu.matches({"CPU": 1.0, "GPU": 0.5, "memory": 1e12})   # someone else's request
    import pickle
    assert pickle.loads(pickle.dumps(watch))._listening is False


def test_a_local_ray_makes_its_token_file_owner_only(tmp_path, monkeypatch):
    """#25.12: Ray writes ~/.ray/auth_token as 0644; qpruner's local Ray tightens it to 0600."""
    import os
    import stat

    from qpruner.search.run import tighten_token_file
    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    tighten_token_file()
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    tighten_token_file()                                   # no token: nothing to do, no error
