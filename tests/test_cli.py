from pathlib import Path

from qpruner.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_validate_ok(capsys):
    assert main(["validate", str(ROOT / "tune_jobs" / "smollm2_demo.yaml")]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_reports_every_problem_and_exits_2(tmp_path, capsys):
    job = tmp_path / "bad.yaml"
    job.write_text("finetune:\n  stpes: 3\nsearch:\n  num_trials: 0\n")
    assert main(["validate", str(job), "prune.ratio=3"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "finetune.stpes" in err and "search.num_trials" in err and "prune.ratio" in err


def test_prune_command_saves_then_reuses(tmp_path, capsys):
    job = str(ROOT / "tune_jobs" / "tiny_smoke.yaml")
    assert main(["prune", job, f"results_dir={tmp_path}"]) == 0
    first = capsys.readouterr().out
    assert "pruned layers 1..2" in first and not first.startswith("reused")
    assert (tmp_path / "tiny_smoke" / "pruned" / "model.safetensors").is_file()
    assert main(["prune", job, f"results_dir={tmp_path}"]) == 0
    assert capsys.readouterr().out.startswith("reused: ")
    assert main(["prune", job, f"results_dir={tmp_path}", "--force"]) == 0
    assert not capsys.readouterr().out.startswith("reused")


def test_import_qpruner_and_validate_load_no_torch():
    """`import qpruner` stays light (validate, and status with pandas, start in about a second); the pruned
    classes still reach transformers' Auto API the moment transformers is imported."""
    import subprocess
    import sys
    code = ("import sys, qpruner, qpruner.cli, qpruner.config, qpruner.rundir, qpruner.pareto, qpruner.report; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "assert 'qpruner_llama' in CONFIG_MAPPING and 'qpruner_qwen2' in CONFIG_MAPPING; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_status_of_a_bare_job_name_reads_its_results_directory(tmp_path, monkeypatch, capsys):
    """`qpruner status smollm2_demo` in the project root means results/smollm2_demo, not a Ray submission."""
    import json

    from qpruner.pareto import TrialLog
    from qpruner.plan import PrecisionPlan
    from qpruner.rundir import MARKER
    from qpruner.trial import TrialResult
    run = tmp_path / "results" / "myjob"
    log = TrialLog(run, "accuracy")
    log.add("t0", TrialResult(plan=PrecisionPlan.from_bits([4, 8]), status="ok", objective=0.3, weight_bytes=10,
                              weight_bytes_predicted=10, avg_bits=6.0, accuracy=0.3, perplexity=3.0,
                              seconds={"total": 1.0}))
    (run / MARKER).write_text(json.dumps({"job": "myjob"}))
    monkeypatch.chdir(tmp_path)
    assert main(["status", "myjob"]) == 0
    out = capsys.readouterr().out
    assert "results/myjob: 1 trials" in out


def test_a_tilde_in_results_dir_means_home_not_a_directory_named_tilde(tmp_path, monkeypatch, capsys):
    """#25.8: ``results_dir=~/qp`` writes under $HOME (as model.source and data.source already do)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    job = str(ROOT / "tune_jobs" / "tiny_smoke.yaml")
    assert main(["validate", job, "results_dir=~/qp"]) == 0
    assert f"results -> {home / 'qp' / 'tiny_smoke'}" in capsys.readouterr().out
    assert main(["prune", job, "results_dir=~/qp"]) == 0
    assert (home / "qp" / "tiny_smoke" / "pruned" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()


def test_running_trials_are_read_from_a_jobs_log():
    """`qpruner status <submission id>` lists running trials from the driver's log lines."""
    from qpruner.cli import format_running, running_from_logs
    logs = "\n".join([
        "10:00:00 INFO qpruner.search.callbacks: trial t0001-4444: started (aaa)",
        "10:00:01 INFO qpruner.search.callbacks: trial t0002-8888: started (bbb)",
        "10:00:30 INFO qpruner.search.callbacks: trial t0001-4444: step 10/40, loss 2.314, 1450 tokens/s, ETA 1.5 min",
        "10:01:00 INFO qpruner.search.callbacks: trial t0002-8888: ppl 20.1, acc 0.4, 99.0 MB, 4.15 bits",
        "10:01:05 WARNING qpruner.search.callbacks: trial t0003-4848: errored (ccc): boom",
        "10:02:00 INFO qpruner.search.callbacks: progress: 1/4 trained, 1 rows, front 1 plans, hypervolume 0.1",
        "garbage line: trial t0009 something",
        "10:02:30 INFO qpruner.search.callbacks: trial t0001-4444: step 20/40, loss nan",
    ])
    running = running_from_logs(logs)
    assert [r["trial"] for r in running] == ["t0001-4444"]                  # the others ended
    assert running[0]["step"] == 20 and running[0]["steps"] == 40 and running[0]["elapsed_s"] == 150
    line = format_running(running)
    assert line.startswith("running: t0001-4444") and "2.5 min" in line and "step 20/40" in line
    assert running_from_logs("") == [] and format_running([]) == ""
