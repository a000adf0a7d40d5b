"""Fault injection: SIGKILL the search driver at random moments, resume, and count what was lost.

Each round is one tiny search (``tune_jobs/tiny_smoke.yaml``: the tiny random Llama, real Ray Tune,
7 trained trials, 2 at a time, 12 LoRA steps each) in a fresh directory:

    start `qpruner search` -> SIGKILL its whole process group (driver + the Ray it started) at a random
    moment -> `qpruner search --resume` -> SIGKILL again -> ... -> a last `--resume` that runs to the end

While it runs, a reader polls ``trials.parquet`` and ``pareto.parquet`` the way users and tools do
(:func:`qpruner.rundir.read_table`, and ``qpruner status`` in-process) and counts failed reads; plain
``pd.read_parquet(path)`` is counted apart (pyarrow stats the path, then opens it: a file replaced in
between can be misread; readers should open the file first, as read_table does).

Counted, over all rounds:
    kills            SIGKILLs delivered while the driver was running
    rows_lost        rows seen in trials.parquet before a kill and missing (or changed status) at the end
    rows_duplicated  trained rows beyond one per trial id and one per plan
    extra_trainings  completed trainings beyond num_trials (QPRUNER_TRAINING_LOG counts each one)
    short_trials     rounds that ended with fewer than num_trials trained trials
    failed_reads     reads by read_table / `qpruner status` that raised

    python bench/reliability.py --rounds 10 --kills 2      # ~20 kills; resumable (re-run: more rounds)

Further faults (``--disk-rounds``, ``--sigint-rounds``, ``--worker-rounds``, ``--bad-inputs``; each section
resumable, kept when a later run adds another):

* **disk full** (needs root: a 64 MB tmpfs holds the results): after a random 1-4 trained trials the disk is
  filled; after a random 2-10 s it is freed. The search must wait, keep its finished results in memory,
  write them and complete: exit 0, 7 trained, nothing lost, duplicated or trained twice;
* **SIGINT** (Ctrl-C, to the driver's whole process group as a terminal sends it) after a random 1-4 trained
  trials: exit 130 and "interrupted", never "finished"; the same command again completes the search;
* **worker kills**: SIGKILL of a trial's worker process, found in the driver's own process tree
  (``ray::ImplicitFunc.train`` under the raylet the driver started), mid-trial: Tune retries it; the search
  completes with no trial trained twice;
* **bad inputs**: job files, overrides, data files and model directories a careless or hostile user gives,
  through the CLI in-process (``validate``, then ``search``): each must exit 2 with one message — no
  traceback — and write nothing.

``false_finished``: a run that exited 0 with fewer than ``num_trials`` trained trials, or printed "finished"
when it was interrupted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

import pandas as pd  # noqa: E402

JOB = ROOT / "tune_jobs" / "tiny_smoke.yaml"
OUT = ROOT / "results" / "bench" / "reliability"
NUM_TRIALS = 7


class Reader(threading.Thread):
    """Polls a run's tables as a user's tools would, counting failed reads."""

    def __init__(self, directory: Path):
        super().__init__(daemon=True)
        self.directory, self.stop = directory, threading.Event()
        self.reads = self.failed = self.raw_reads = self.raw_failed = self.status_calls = self.status_failed = 0

    def run(self) -> None:
        from qpruner.cli import main
        from qpruner.errors import ResultsError
        from qpruner.rundir import read_table
        n = 0
        while not self.stop.is_set():
            for name in ("trials.parquet", "pareto.parquet"):
                path = self.directory / name
                if not path.is_file():
                    continue
                try:
                    read_table(path)
                except ResultsError:
                    self.failed += 1
                self.reads += 1
                try:
                    pd.read_parquet(path)
                except Exception:  # noqa: BLE001 - counting pyarrow's path-read races, whatever they raise
                    self.raw_failed += 1
                self.raw_reads += 1
            n += 1
            if n % 20 == 0 and (self.directory / "trials.parquet").is_file():
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                    code = main(["status", str(self.directory)])
                self.status_calls += 1
                self.status_failed += code != 0
            time.sleep(0.01)


def _launch(results: Path, resume: bool, training_log: Path, log) -> subprocess.Popen:
    # 12 LoRA steps: long enough (~40 s a search on 2 cores) that kills land among the trials as well
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(JOB), f"results_dir={results}", "finetune.steps=12"]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "QPRUNER_TRAINING_LOG": str(training_log), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=results)


def _rows(path: Path) -> dict:
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError):
        return {}
    return {str(r["trial_id"]): str(r["status"]) for r in frame.to_dict("records")}


def one_round(index: int, kills: int, work: Path, rng: random.Random) -> dict:
    results = work / f"round{index:02d}"
    results.mkdir(parents=True, exist_ok=True)
    run_dir = results / "tiny_smoke"
    training_log = results / "trainings.log"
    reader = Reader(run_dir)
    reader.start()
    seen: dict[str, str] = {}
    delivered, launches, resume = 0, 0, False
    t0 = time.time()
    with open(results / "driver.log", "a") as log:
        while True:
            proc = _launch(results, resume, training_log, log)
            launches += 1
            if delivered < kills:
                # a random moment: during set-up (pruning, Ray start) or among the trials
                deadline = time.time() + rng.uniform(3.0, 18.0)   # a search here takes ~20-40 s
                while time.time() < deadline and proc.poll() is None:
                    time.sleep(0.2)
                if proc.poll() is None:
                    seen.update(_rows(run_dir / "trials.parquet"))
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    delivered += 1
                    time.sleep(1.0)
                    resume = (run_dir / "ray" / "tune" / "tuner.pkl").is_file()
                    continue
            code = proc.wait(timeout=900)
            if code != 0:
                raise RuntimeError(f"round {index}: the last run exited {code}; see {results / 'driver.log'}")
            break
    reader.stop.set()
    reader.join()
    final = pd.read_parquet(run_dir / "trials.parquet")
    rows = {str(r["trial_id"]): str(r["status"]) for r in final.to_dict("records")}
    trained = final[final["status"].isin(["ok", "failed", "stopped", "error"])]
    trainings = training_log.read_text().splitlines() if training_log.is_file() else []
    return {
        "round": index, "kills": delivered, "launches": launches, "seconds": round(time.time() - t0, 1),
        "rows_lost": sum(1 for tid, status in seen.items() if rows.get(tid) != status),
        "rows_duplicated": int((len(trained) - trained["trial_id"].nunique())
                               + (len(trained) - trained["plan_formats"].nunique())),
        "trained": int(len(trained)), "trainings": len(trainings),
        "extra_trainings": max(0, len(trainings) - NUM_TRIALS),
        "short": int(len(trained) < NUM_TRIALS),
        "reads": reader.reads, "failed_reads": reader.failed + reader.status_failed,
        "status_calls": reader.status_calls, "raw_path_reads": reader.raw_reads, "raw_path_failures": reader.raw_failed,
    }


def _launch_cmd(cmd: list[str], training_log: Path, log, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "QPRUNER_TRAINING_LOG": str(training_log), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)


def _search_cmd(results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qpruner.cli", "search", str(JOB), f"results_dir={results}", *extra]


def _wait_rows(path: Path, n: int, proc, timeout: float = 300.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(_rows(path)) >= n:
            return True
        time.sleep(0.2)
    return False


def _outcome(run_dir: Path, training_log: Path, seen: dict) -> dict:
    final = pd.read_parquet(run_dir / "trials.parquet")
    rows = {str(r["trial_id"]): str(r["status"]) for r in final.to_dict("records")}
    trained = final[final["status"].isin(["ok", "failed", "stopped", "error"])]
    trainings = training_log.read_text().splitlines() if training_log.is_file() else []
    return {"rows_lost": sum(1 for tid, status in seen.items() if rows.get(tid) != status),
            "rows_duplicated": int((len(trained) - trained["trial_id"].nunique())
                                   + (len(trained) - trained["plan_formats"].nunique())),
            "trained": int(len(trained)), "trainings": len(trainings),
            "extra_trainings": max(0, len(trainings) - NUM_TRIALS), "short": int(len(trained) < NUM_TRIALS),
            "leftover_tmp": len([p for p in run_dir.iterdir() if p.name.endswith(".tmp")])}


def disk_round(index: int, work: Path, rng: random.Random) -> dict:
    """The disk fills after 1-4 trained trials and is freed 2-10 s later (see the module docstring)."""
    results = work / f"disk{index:02d}"
    results.mkdir(parents=True, exist_ok=True)
    fs = results / "fs"
    fs.mkdir(exist_ok=True)
    subprocess.run(["umount", "-l", str(fs)], capture_output=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)], capture_output=True).returncode:
        raise RuntimeError("the disk-full rounds need root (they mount a 64 MB tmpfs)")
    training_log = results / "trainings.log"
    training_log.unlink(missing_ok=True)
    run_dir = fs / "tiny_smoke"
    after, free_after = rng.randint(1, 4), rng.uniform(2.0, 10.0)
    t0 = time.time()
    try:
        with open(results / "driver.log", "w") as log:
            proc = _launch_cmd(_search_cmd(fs, "search.disk_full_wait_s=120"), training_log, log, results)
            if not _wait_rows(run_dir / "trials.parquet", after, proc):
                raise RuntimeError(f"disk round {index}: the search ended before {after} trials")
            seen = _rows(run_dir / "trials.parquet")
            filler = fs / "filler"
            with open(filler, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * (1 << 20))
                except OSError:
                    pass
            time.sleep(free_after)
            filler.unlink()
            code = proc.wait(timeout=900)
        text = (results / "driver.log").read_text()
        out = _outcome(run_dir, training_log, seen)
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)
    return {"round": index, "filled_after_trained": after, "freed_after_s": round(free_after, 1), "exit": code,
            "seconds": round(time.time() - t0, 1), "waited_for_space": "could not write" in text,
            "tracebacks": text.count("Traceback"),
            "false_finished": int(code == 0 and out["short"] == 1), **out}


def sigint_round(index: int, work: Path, rng: random.Random) -> dict:
    """Ctrl-C after 1-4 trained trials, then the same command again (see the module docstring)."""
    results = work / f"sigint{index:02d}"
    results.mkdir(parents=True, exist_ok=True)
    run_dir = results / "tiny_smoke"
    training_log = results / "trainings.log"
    after = rng.randint(1, 4)
    t0 = time.time()
    with open(results / "driver.log", "w") as log:
        proc = _launch_cmd(_search_cmd(results, "finetune.steps=8"), training_log, log, results)
        if not _wait_rows(run_dir / "trials.parquet", after, proc):
            raise RuntimeError(f"sigint round {index}: the search ended before {after} trials")
        seen = _rows(run_dir / "trials.parquet")
        os.killpg(proc.pid, signal.SIGINT)
        first = proc.wait(timeout=600)
    first_text = (results / "driver.log").read_text()
    with open(results / "driver2.log", "w") as log:
        again = _launch_cmd(_search_cmd(results, "finetune.steps=8"), training_log, log, results).wait(timeout=900)
    out = _outcome(run_dir, training_log, seen)
    interrupted_short = len(seen) < NUM_TRIALS
    false_finished = int(interrupted_short and (first == 0 or "finished in" in first_text)) + int(again == 0 and out["short"])
    return {"round": index, "interrupted_after_trained": after, "exit": first, "exit_rerun": again,
            "said_interrupted": "interrupted after" in first_text, "seconds": round(time.time() - t0, 1),
            "tracebacks": first_text.count("Traceback (most recent call last)"), "false_finished": false_finished, **out}


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under ``pid`` (read from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                cmd = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out.append((child, cmd))
            stack.append(child)
    return out


def worker_round(index: int, work: Path, rng: random.Random) -> dict:
    """SIGKILL a trial worker of the driver's own Ray, mid-trial (see the module docstring)."""
    results = work / f"worker{index:02d}"
    results.mkdir(parents=True, exist_ok=True)
    run_dir = results / "tiny_smoke"
    training_log = results / "trainings.log"
    after = rng.randint(0, 4)
    t0 = time.time()
    killed = 0
    with open(results / "driver.log", "w") as log:
        proc = _launch_cmd(_search_cmd(results, "finetune.steps=12", "search.max_concurrent=1"), training_log, log,
                           results)
        _wait_rows(run_dir / "trials.parquet", after, proc) if after else None
        seen = _rows(run_dir / "trials.parquet")
        deadline = time.time() + 120
        while not killed and time.time() < deadline and proc.poll() is None:
            workers = [p for p, cmd in _descendants(proc.pid) if cmd.startswith("ray::ImplicitFunc")]
            if workers:
                time.sleep(rng.uniform(0.5, 2.0))   # somewhere inside the trial
                try:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        code = proc.wait(timeout=900)
    out = _outcome(run_dir, training_log, seen)
    return {"round": index, "killed_workers": killed, "exit": code, "seconds": round(time.time() - t0, 1),
            "false_finished": int(code == 0 and out["short"] == 1), **out}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per round before the last resume")
    parser.add_argument("--disk-rounds", type=int, default=0)
    parser.add_argument("--sigint-rounds", type=int, default=0)
    parser.add_argument("--worker-rounds", type=int, default=0)
    parser.add_argument("--bad-inputs", action="store_true", help="run the table of bad inputs (again)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/qpruner_reliability", help="scratch directory of the rounds")
    args = parser.parse_args(argv)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    path = OUT.with_suffix(".json")
    record = json.loads(path.read_text()) if path.is_file() else {}
    sections = {k: record.get(k, []) for k in ("rounds", "disk_rounds_detail", "sigint_rounds_detail",
                                               "worker_rounds_detail")}
    bad = record.get("bad_inputs_detail", [])
    work = Path(args.work)
    plan = [("rounds", args.rounds, lambda i, rng: one_round(i, args.kills, work, rng)),
            ("disk_rounds_detail", args.disk_rounds, lambda i, rng: disk_round(i, work, rng)),
            ("sigint_rounds_detail", args.sigint_rounds, lambda i, rng: sigint_round(i, work, rng)),
            ("worker_rounds_detail", args.worker_rounds, lambda i, rng: worker_round(i, work, rng))]
    for key, wanted, run in plan:
        for index in range(len(sections[key]), wanted):
            entry = run(index, random.Random(args.seed * 1000 + index + 7919 * len(key)))
            sections[key].append({**entry, "commit": stamp()["commit"][:10]})
            print(key, json.dumps(sections[key][-1]), flush=True)
            write(sections, bad)
    if args.bad_inputs:
        import bad_inputs
        bad = bad_inputs.run_all(work / "bad_inputs")
    write(sections, bad)


def write(sections: dict, bad: list[dict]) -> None:
    rounds = sections["rounds"]
    faults = [r for key in ("disk_rounds_detail", "sigint_rounds_detail", "worker_rounds_detail") for r in sections[key]]
    total = {k: sum(r[k] for r in rounds) for k in ("kills", "rows_lost", "rows_duplicated", "extra_trainings",
                                                    "reads", "failed_reads", "raw_path_reads", "raw_path_failures",
                                                    "status_calls", "launches")}
    total["short_trials"] = sum(r["short"] for r in rounds)
    for k in ("rows_lost", "rows_duplicated", "extra_trainings"):
        total[k] += sum(r[k] for r in faults)
    total["short_trials"] += sum(r["short"] for r in faults)
    record = {"source": "real tiny searches (tune_jobs/tiny_smoke.yaml, real Ray Tune): driver SIGKILLed, disk "
                        "filled, Ctrl-C, trial workers killed; bad inputs through the CLI",
              **stamp(), "rounds_done": len(rounds), **total, "num_trials": NUM_TRIALS,
              "disk_full_rounds": len(sections["disk_rounds_detail"]),
              "sigint_rounds": len(sections["sigint_rounds_detail"]),
              "worker_kill_rounds": len(sections["worker_rounds_detail"]),
              "false_finished": sum(r["false_finished"] for r in faults),
              "fault_tracebacks": sum(r.get("tracebacks", 0) for r in faults),
              "bad_inputs": len(bad), "bad_input_tracebacks": sum(not b["clean"] for b in bad),
              "bad_input_writes": sum(bool(b["wrote"]) for b in bad),
              "bad_input_not_refused": sum(b["exit"] != 2 for b in bad),
              "rounds": rounds, **{k: v for k, v in sections.items() if k != "rounds"}, "bad_inputs_detail": bad}
    OUT.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Reliability: kill, fill the disk, interrupt, break the input; count what was lost", "",
        f"Commit `{record['commit']}`, `{record['command']}`, {record['machine']}, {record['date']}.", "",
        f"{len(rounds)} tiny searches (tiny_smoke: {NUM_TRIALS} trained trials each, real Ray Tune), "
        f"{total['kills']} SIGKILLs of the driver's process group at random moments, each followed by "
        f"`qpruner search --resume` ({total['launches']} launches); {record['disk_full_rounds']} disk-full rounds, "
        f"{record['sigint_rounds']} Ctrl-C rounds, {record['worker_kill_rounds']} trial-worker kills.", "",
        "| measure | count |", "|---|---|",
        f"| kills of the driver | {total['kills']} |",
        f"| disk-full rounds (disk filled, freed 2-10 s later) | {record['disk_full_rounds']} |",
        f"| Ctrl-C rounds (SIGINT to the process group, then the same command) | {record['sigint_rounds']} |",
        f"| trial workers killed (found in the driver's process tree) | {record['worker_kill_rounds']} |",
        f"| rows lost (seen before a fault, gone or changed at the end) | {total['rows_lost']} |",
        f"| rows duplicated (same trial id or same plan trained twice) | {total['rows_duplicated']} |",
        f"| extra trainings (completed trainings beyond {NUM_TRIALS} per search) | {total['extra_trainings']} |",
        f"| false \"finished\" (exit 0 short of {NUM_TRIALS}, or \"finished\" when interrupted) | "
        f"{record['false_finished']} |",
        f"| searches ending short of {NUM_TRIALS} trained trials | {total['short_trials']} |",
        f"| tracebacks printed in the fault rounds | {record['fault_tracebacks']} |",
        f"| failed reads (read_table + `qpruner status`, of {total['reads']} + {total['status_calls']}) | "
        f"{total['failed_reads']} |",
        f"| for comparison: `pd.read_parquet(path)` failures (of {total['raw_path_reads']}) | "
        f"{total['raw_path_failures']} |",
        f"| bad inputs tried / refused with exit 2 / tracebacks / left files behind | {record['bad_inputs']} / "
        f"{record['bad_inputs'] - record['bad_input_not_refused']} / {record['bad_input_tracebacks']} / "
        f"{record['bad_input_writes']} |", "",
        "A trial whose training completed before a kill is not trained again: the worker stores its result in "
        "the trial's checkpoint before the driver hears of it, and the resumed driver recovers it from there "
        "(`qpruner.search.run.recover_results`; local storage, as here — under an `s3://` storage_path such a "
        "trial is trained again). An extra training happens only when a kill lands before that checkpoint is "
        "written (the interrupted trial starts over). On a full disk the driver keeps finished results in "
        "memory, starts no trial until they are written (`search.disk_full_wait_s`, 600 s by default, then it "
        "stops with exit 1), and a trial whose checkpoint cannot be written reports its result without one.", "",
    ]
    if bad:
        lines += ["## Bad inputs", "", "| input | kind | exit | clean (no traceback) | wrote | message |",
                  "|---|---|---:|---|---|---|"]
        for b in bad:
            lines.append(f"| {b['name']} | {b['kind']} | {b['exit']} | {'yes' if b['clean'] else 'NO'} | "
                         f"{b['wrote'] or 'nothing'} | {b['message'][:110].replace('|', '/')} |")
        lines.append("")
    OUT.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
