"""Fault injection: SIGKILL the search driver at random moments, resume, and count what was lost.

Each round is one tiny search (``tune_jobs/tiny_smoke.yaml``: the tiny random Llama, real Ray Tune,
7 trained trials, 2 at a time) in a fresh directory:

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

    python bench/reliability.py --rounds 10 --kills 2      # 20 kills; resumable (re-run: more rounds)

Writes results/bench/reliability.{json,md} (commit and command in both).
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
    cmd = [sys.executable, "-m", "qpruner.cli", "search", str(JOB), f"results_dir={results}"]
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
                deadline = time.time() + rng.uniform(6.0, 45.0)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per round before the last resume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/qpruner_reliability", help="scratch directory of the rounds")
    args = parser.parse_args(argv)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    path = OUT.with_suffix(".json")
    done = json.loads(path.read_text())["rounds"] if path.is_file() else []
    work = Path(args.work)
    for index in range(len(done), args.rounds):
        rng = random.Random(args.seed * 1000 + index)
        done.append(one_round(index, args.kills, work, rng))
        print(json.dumps(done[-1]), flush=True)
        write(done)


def write(rounds: list[dict]) -> None:
    total = {k: sum(r[k] for r in rounds) for k in ("kills", "rows_lost", "rows_duplicated", "extra_trainings",
                                                    "reads", "failed_reads", "raw_path_reads", "raw_path_failures",
                                                    "status_calls", "launches")}
    total["short_trials"] = sum(r["short"] for r in rounds)
    record = {"source": "real tiny searches (tune_jobs/tiny_smoke.yaml, real Ray Tune), driver SIGKILLed",
              **stamp(), "rounds_done": len(rounds), **total, "num_trials": NUM_TRIALS, "rounds": rounds}
    OUT.with_suffix(".json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Reliability: SIGKILL the driver, resume, count", "",
        f"Commit `{record['commit']}`, `{record['command']}`, {record['machine']}, {record['date']}.", "",
        f"{len(rounds)} tiny searches (tiny_smoke: {NUM_TRIALS} trained trials each, real Ray Tune), "
        f"{total['kills']} SIGKILLs of the driver's process group at random moments, each followed by "
        f"`qpruner search --resume` ({total['launches']} launches).", "",
        "| measure | count |", "|---|---|",
        f"| kills | {total['kills']} |",
        f"| rows lost (seen before a kill, gone or changed at the end) | {total['rows_lost']} |",
        f"| rows duplicated (same trial id or same plan trained twice) | {total['rows_duplicated']} |",
        f"| extra trainings (completed trainings beyond {NUM_TRIALS} per search) | {total['extra_trainings']} |",
        f"| searches ending short of {NUM_TRIALS} trained trials | {total['short_trials']} |",
        f"| failed reads (read_table + `qpruner status`, of {total['reads']} + {total['status_calls']}) | "
        f"{total['failed_reads']} |",
        f"| for comparison: `pd.read_parquet(path)` failures (of {total['raw_path_reads']}) | "
        f"{total['raw_path_failures']} |", "",
        "A trial whose training completed before a kill is not trained again: the worker stores its result in "
        "the trial's checkpoint before the driver hears of it, and the resumed driver recovers it from there "
        "(`qpruner.search.run.recover_results`; local storage, as here — under an `s3://` storage_path such a "
        "trial is trained again). An extra training happens only when a kill lands before that checkpoint is "
        "written (the interrupted trial starts over).", "",
    ]
    OUT.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
