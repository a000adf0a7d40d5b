"""The run directory's owner (qpruner.rundir): identity, refusals, lock, consistent reads, and the CLI's
hard edges (every bad input: exit code 2, one message naming the key or file, nothing written)."""

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from qpruner import rundir
from qpruner.cli import main
from qpruner.config import build_job
from qpruner.errors import ConfigError, ResultsError
from qpruner.pareto import TrialLog

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "tune_jobs" / "tiny_smoke.yaml")


def _job(tmp_path, **changes):
    data = {"name": "r", "results_dir": str(tmp_path), "model": {"source": "tiny"},
            "finetune": {"steps": 2}, "search": {"num_trials": 3}}
    for key, value in changes.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return build_job(data)


def _started(job):
    """A directory as a search of ``job`` leaves it after its first trial."""
    run = rundir.RunDir(job.results_path)
    run.path.mkdir(parents=True)
    run.write_marker(job, searched=True)
    run.write_job(job)
    (run.path / "ray" / "tune").mkdir(parents=True)
    (run.path / "ray" / "tune" / "tuner.pkl").write_bytes(b"")
    (run.path / "ray" / "tune" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    pd.DataFrame([{"trial_id": "a", "status": "ok"}]).to_parquet(run.trials_file)
    return run


def test_identity_ignores_where_a_run_executes_but_not_what_it_computes(tmp_path):
    job = _job(tmp_path)
    assert rundir.identity(job) == rundir.identity(_job(tmp_path, **{"search.num_cpus": 7, "search.verbose": 0}))
    assert rundir.identity(job) != rundir.identity(_job(tmp_path, **{"finetune.steps": 3}))
    assert rundir.trial_key(job) == rundir.trial_key(_job(tmp_path, **{"search.num_trials": 9}))
    assert rundir.trial_key(job) != rundir.trial_key(_job(tmp_path, **{"data.eval_samples": 8}))


def test_search_refuses_a_different_run_and_names_the_keys(tmp_path):
    job = _job(tmp_path)
    run = _started(job)
    changed = _job(tmp_path, **{"finetune.steps": 5, "policy.budget_avg_bits": 6.0})
    for resume in (False, True):
        with pytest.raises(ResultsError) as err:
            rundir.open_for_search(changed, resume=resume)
        assert "finetune.steps: 2 -> 5" in str(err.value) and "policy.budget_avg_bits: None -> 6.0" in str(err.value)
        assert "--overwrite" in str(err.value)
    assert rundir.open_for_search(job)[1] is True  # the same job, unfinished: continued
    assert run.path.is_dir()
    assert rundir.open_for_search(changed, overwrite=True)[1] is False


def test_resume_with_nothing_to_resume_fails_before_any_work(tmp_path):
    with pytest.raises(ResultsError, match="no search to resume"):
        rundir.open_for_search(_job(tmp_path), resume=True)
    assert not (tmp_path / "r").exists()
    run = rundir.RunDir(tmp_path / "r")
    run.path.mkdir()
    run.write_marker(_job(tmp_path), searched=False)  # pruned only
    with pytest.raises(ResultsError, match="no Ray Tune experiment"):
        rundir.open_for_search(_job(tmp_path), resume=True)


def test_a_directory_qpruner_did_not_write_is_refused_and_untouched(tmp_path):
    mine = tmp_path / "r"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(ResultsError, match="not written by qpruner"):
        rundir.open_for_search(_job(tmp_path))
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = _started(_job(tmp_path))
    moved = run.move_aside()
    assert moved.name.startswith("r.replaced-") and (moved / "trials.parquet").is_file() and not run.path.exists()


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    run = rundir.RunDir(tmp_path / "r")
    with run.lock("search"):
        with pytest.raises(ResultsError, match=r"in use by qpruner search \(pid \d+"):
            with rundir.RunDir(tmp_path / "r").lock("search"):
                pass
    with run.lock("search"):  # released: free again
        pass


def _rewrite(path, n, stop_after):
    from qpruner.pareto import atomic_write_parquet
    frame = pd.DataFrame({"x": list(range(n))})
    end = time.time() + stop_after
    while time.time() < end:
        atomic_write_parquet(frame.sample(frac=1.0), Path(path))


def test_readers_never_fail_while_the_writer_replaces_the_file(tmp_path):
    path = tmp_path / "trials.parquet"
    pd.DataFrame({"x": [0]}).to_parquet(path)
    writer = mp.get_context("spawn").Process(target=_rewrite, args=(str(path), 5000, 4.0))
    writer.start()
    reads = failures = 0
    try:
        deadline = time.time() + 3.5
        while time.time() < deadline:
            try:
                assert len(rundir.read_table(path)) in (1, 5000)
            except ResultsError:
                failures += 1
            reads += 1
    finally:
        writer.join()
    assert reads > 50 and failures == 0


def test_a_truncated_table_is_one_clear_error(tmp_path, capsys):
    run = _started(_job(tmp_path))
    run.trials_file.write_bytes(run.trials_file.read_bytes()[:40])
    with pytest.raises(ResultsError, match="unreadable.*truncated"):
        rundir.read_table(run.trials_file)
    for argv in (["status", str(run.path)], ["report", str(run.path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "trials.parquet" in err and "Traceback" not in err


def _append(directory, who, n):
    log = TrialLog(directory, "accuracy")
    for i in range(n):
        log._put({"trial_id": f"{who}-{i}", "status": "ok"})


def test_two_writers_of_one_log_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(str(tmp_path), w, 40)) for w in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(pd.read_parquet(tmp_path / "trials.parquet")) == 80


def test_screened_rows_get_fresh_ids_even_after_a_restart(tmp_path):
    from qpruner.plan import PrecisionPlan
    from qpruner.trial import TrialResult
    plan = PrecisionPlan(("nf4", "int8"))
    result = TrialResult(plan=plan, status="infeasible", objective=-1000.5, weight_bytes=10,
                         weight_bytes_predicted=10, avg_bits=6.0, budget_excess=0.5)
    first = [TrialLog(tmp_path, "accuracy").add_screened("infeasible", result) for _ in range(2)]
    again = TrialLog(tmp_path, "accuracy").add_screened("infeasible", result)  # a new driver, same log
    assert first == ["infeasible-00001", "infeasible-00002"] and again == "infeasible-00003"


def test_the_cache_answers_only_from_rows_of_the_same_trial_key(tmp_path):
    from qpruner.plan import PrecisionPlan
    plan = PrecisionPlan(("nf4", "int8"))
    log = TrialLog(tmp_path, "accuracy", run_key="k1")
    log._put({"trial_id": "t1", "status": "ok", "plan_formats": "nf4,int8"})
    assert log.lookup(plan)["trial_id"] == "t1"
    assert TrialLog(tmp_path, "accuracy", run_key="k2").lookup(plan) is None


# --- bad inputs: exit code 2, one message naming the key or file, nothing written -----------------------

BAD_JOBS = [
    ("prune:\n  ratio: .nan\n", "prune.ratio"),
    ("finetune:\n  lr: .inf\n", "finetune.lr"),
    ("name: ..\n", "name"),
    ("policy:\n  budget_avg_bits: 3.5\n", "policy.budget_avg_bits"),
    ("", "empty"),
]


@pytest.mark.parametrize("text,named", BAD_JOBS)
def test_bad_job_files_exit_2_name_the_key_and_write_nothing(tmp_path, capsys, monkeypatch, text, named):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(text)
    for verb in ("validate", "search", "prune"):
        assert main([verb, str(job), f"results_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_undecodable_job_file(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"name: caf\xe9\n")
    assert main(["validate", str(job)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_unsupported_model_type_is_caught_from_config_json(tmp_path, capsys):
    model = tmp_path / "gpt2dir"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["validate", SMOKE, f"model.source={model}"]) == 2
    err = capsys.readouterr().err
    assert "model.source" in err and "'gpt2'" in err


def test_trust_remote_code_warns(capsys):
    assert main(["validate", SMOKE, "model.trust_remote_code=true"]) == 0
    assert "trust_remote_code is on" in capsys.readouterr().err


def test_results_commands_on_bad_directories_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv in (["export", str(tmp_path / "empty")], ["report", str(tmp_path / "empty")],
                 ["status", str(tmp_path / "nothing")], ["search", SMOKE, f"results_dir={tmp_path}", "--resume"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_status_before_the_first_trial_says_so(tmp_path, capsys):
    job = _job(tmp_path)
    run = rundir.RunDir(job.results_path)
    run.path.mkdir()
    run.write_job(job)
    assert main(["status", str(run.path)]) == 0
    assert "no trial finished yet" in capsys.readouterr().out


def test_build_job_does_not_write_into_the_callers_dict():
    data = {"finetune": {"steps": 2}}
    build_job(data, ["finetune.steps=7"])
    assert data == {"finetune": {"steps": 2}}


def test_config_error_is_a_config_error():
    with pytest.raises(ConfigError, match="finite"):
        build_job({"prune": {"ratio": float("nan")}})
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"


def test_prune_does_not_swap_the_model_under_a_searched_run(tmp_path, capsys):
    from qpruner.config import load_job
    assert main(["prune", SMOKE, f"results_dir={tmp_path}"]) == 0
    run = rundir.RunDir(tmp_path / "tiny_smoke")
    job = load_job(SMOKE, [f"results_dir={tmp_path}"])
    run.write_marker(job, searched=True)   # as a search leaves it
    run.write_job(job)
    before = (run.pruned / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["prune", SMOKE, f"results_dir={tmp_path}", "prune.ratio=0.25", "--force"]) == 2
    assert "pruned with other settings" in capsys.readouterr().err
    assert (run.pruned / "model.safetensors").read_bytes() == before


def test_status_says_whether_a_search_is_running(tmp_path, capsys):
    job = _job(tmp_path)
    run = _started(job)
    assert run.holder() is None
    with run.lock("search"):
        assert "qpruner search (pid" in run.holder()
        assert main(["status", str(run.path)]) == 0
        assert "running: qpruner search" in capsys.readouterr().out
    assert main(["status", str(run.path)]) == 0
    assert "not running" in capsys.readouterr().out


def test_a_run_that_never_trained_can_be_started_again_with_other_settings(tmp_path):
    job = _job(tmp_path)
    run = rundir.RunDir(job.results_path)
    run.path.mkdir()
    run.write_marker(job, searched=True)   # as a search that failed during set-up (e.g. no plan fits) leaves it
    run.write_job(job)
    fixed = _job(tmp_path, **{"policy.budget_avg_bits": 9.0})
    assert rundir.open_for_search(fixed)[1] is False  # not refused: nothing was trained


def test_a_run_of_an_earlier_version_is_continued_afresh_not_restored(tmp_path):
    job = _job(tmp_path)
    run = _started(job)
    run.marker.unlink()                     # earlier versions wrote no marker
    assert rundir.open_for_search(job)[1] is False
    with pytest.raises(ResultsError, match="earlier qpruner"):
        rundir.open_for_search(job, resume=True)
    aside = rundir.set_aside_experiment(job, run)
    assert aside and Path(aside).is_dir() and not (run.path / "ray" / "tune").exists()


def test_a_stored_job_is_read_even_where_its_files_are_not(tmp_path, monkeypatch):
    data = tmp_path / "text.txt"
    data.write_text("hello " * 2000)
    job = _job(tmp_path, **{"data.source": str(data)})
    run = _started(job)
    data.unlink()                           # the run was copied elsewhere: its data file is not here
    assert run.read_job().data.source == str(data)
    assert run.is_ours()


def test_jobs_sharing_a_storage_path_get_one_folder_each(tmp_path):
    a = _job(tmp_path, **{"search.storage_path": "s3://bucket/q"})
    b = build_job({"name": "other", "search": {"storage_path": "s3://bucket/q"}, "model": {"source": "tiny"}})
    # runs from before run ids (no run_id in their marker) keep their name-only folder, so they still resume
    assert rundir.storage_dir(a, tmp_path) == "s3://bucket/q/r" and rundir.storage_dir(b, tmp_path) == "s3://bucket/q/other"


def test_runs_of_one_name_sharing_a_storage_path_never_share_an_experiment(tmp_path):
    """Same job name, two results directories (or a run and the one that --overwrite replaced): each fresh
    search gets its own <name>-<run id> folder; a continued run keeps its folder."""
    folders = []
    for where in ("one", "two"):
        job = _job(tmp_path / where, **{"search.storage_path": "s3://bucket/q"})
        run = rundir.RunDir(job.results_path)
        run.path.mkdir(parents=True)
        run.write_marker(job, searched=True, continuing=False)      # a fresh search
        folders.append(rundir.storage_dir(job, run.path))
        run.write_marker(job, searched=True, continuing=True)       # resumed: same folder
        assert rundir.storage_dir(job, run.path) == folders[-1]
        run.write_marker(job, searched=False)                       # `qpruner prune` keeps it too
        assert rundir.experiment_dir(job, run) == folders[-1] + "/tune"
    assert folders[0] != folders[1] and all(f.startswith("s3://bucket/q/r-") for f in folders)


def test_a_fresh_search_never_resumes_or_moves_another_runs_experiment(tmp_path):
    """A legacy run of the same name (folder <storage>/<name>/tune, from before run ids) sits in a shared
    storage_path; this directory was only pruned so far: its search starts its own experiment."""
    storage = tmp_path / "shared"
    (storage / "r" / "tune").mkdir(parents=True)
    (storage / "r" / "tune" / "tuner.pkl").write_bytes(b"")          # another machine's run of 'r'
    job = _job(tmp_path / "mine", **{"search.storage_path": str(storage)})
    run = rundir.RunDir(job.results_path)
    run.path.mkdir(parents=True)
    run.write_marker(job, searched=False)                              # `qpruner prune` wrote the directory
    assert rundir.storage_dir(job, run.path) != str(storage / "r")
    opened, continuing = rundir.open_for_search(job)
    assert not continuing
    assert rundir.set_aside_experiment(job, opened) is None
    assert (storage / "r" / "tune" / "tuner.pkl").is_file()            # untouched
    # a run searched before run ids (identity, no run_id) keeps its name-only folder: still resumable
    legacy = _job(tmp_path / "old", **{"search.storage_path": str(storage)})
    old = rundir.RunDir(legacy.results_path)
    old.path.mkdir(parents=True)
    old.marker.write_text(json.dumps({"job": "r", "identity": rundir.identity(legacy)}))
    old.write_marker(legacy, searched=True, continuing=True)
    assert rundir.storage_dir(legacy, old.path) == str(storage / "r")


def test_resume_after_a_kill_during_start_up_continues_from_the_trials(tmp_path):
    """Killed between Tune's tuner.pkl and its first experiment state: Tune cannot restore that (it would
    start over in the old folder); --resume goes on from trials.parquet with a fresh experiment instead."""
    job = _job(tmp_path)
    run = _started(job)
    for state in (run.path / "ray" / "tune").glob("experiment_state-*.json"):
        state.unlink()
    assert not rundir.can_restore(job, run)
    opened, continuing = rundir.open_for_search(job, resume=True)
    assert not continuing and opened.path == run.path
    moved = rundir.set_aside_experiment(job, opened)                   # the partial folder is kept, aside
    assert moved and (Path(moved) / "tuner.pkl").is_file()


def test_a_reader_probing_a_dead_writers_lock_never_makes_it_look_held(tmp_path):
    """#25.10: a SIGKILLed search leaves its text in .lock; a reader (as `qpruner status` probes) holds a
    shared lock for a moment. A new writer waits for the reader instead of naming the dead process."""
    import fcntl
    import threading
    run = rundir.RunDir(tmp_path / "r")
    run.path.mkdir()
    (run.path / rundir.LOCK).write_text("qpruner search (pid 999999 on gone, since 2026-01-01 00:00:00: killed)\n")
    fd = os.open(run.path / rundir.LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)                      # the reader, mid-probe
    threading.Timer(0.3, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd))).start()
    with run.lock("search"):
        assert "pid 999999" not in (run.path / rundir.LOCK).read_text()


def test_a_failed_start_never_removes_a_directory_another_process_holds(tmp_path):
    """Review of #25: a run that failed (e.g. refused because another search holds the directory) removes
    the directory it created only when no one holds its lock and it holds nothing but bookkeeping."""
    run = rundir.RunDir(tmp_path / "r")
    with run.lock("search"):
        (run.path / rundir.MARKER).write_text("{}")
        assert not rundir.RunDir(tmp_path / "r").discard_unstarted()
        assert (run.path / rundir.MARKER).is_file()
    (run.path / "notes.txt").write_text("mine")
    assert not run.discard_unstarted() and (run.path / "notes.txt").is_file()
    (run.path / "notes.txt").unlink()
    assert run.discard_unstarted() and not run.path.exists()


def test_new_settings_at_their_defaults_keep_an_earlier_runs_identity():
    """Keys added later (screening) leave the identity of runs recorded before them alone while at their
    defaults; the wait for a full disk is a runtime setting (raising it on resume continues the same run)."""
    base = build_job({})
    assert rundir.identity(build_job({"search": {"disk_full_wait_s": 5.0}})) == rundir.identity(base)
    assert "search.screen_share" not in rundir._settings(base)
    assert rundir.identity(build_job({"search": {"screen_share": 0.2}})) != rundir.identity(base)


def test_an_unsaved_replacement_wins_over_the_row_on_disk(tmp_path):
    from qpruner.plan import PrecisionPlan
    from qpruner.trial import TrialResult
    log = TrialLog(tmp_path, "accuracy")
    result = TrialResult(plan=PrecisionPlan.from_bits([4, 8]), status="ok", objective=0.3, weight_bytes=10,
                         weight_bytes_predicted=10, avg_bits=6.0, accuracy=0.3, perplexity=3.0)
    log.add("t1", result)
    log.unsaved = [{**log.rows[0], "accuracy": 0.8}]      # a newer version of t1 that a write could not save
    log._stamp = None                                     # the file "changed": re-read, then merge
    log.refresh()
    assert len(log.rows) == 1 and log.rows[0]["accuracy"] == 0.8
