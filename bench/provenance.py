"""Provenance stamp for every benchmark output: commit, command, machine, date."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup() -> None:
    """What every benchmark needs first: Ray on loopback without usage stats, the classic Tune output, and
    the repository (and bench/) importable."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for path in (str(ROOT), str(ROOT / "bench")):
        if path not in sys.path:
            sys.path.insert(0, path)
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every int8 forward on CPU
    # (thousands of lines a minute in a long benchmark); the CLI and the Ray workers quiet it the same way
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def stamp(argv: list[str] | None = None) -> dict:
    """``{commit, dirty, command, machine, cpus, date}``: write it into every result file."""
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT) if argv else "?"
    return {
        "commit": _git("rev-parse", "HEAD") or "unknown",
        # changed code, not changed results: a benchmark that appends to a committed result file
        # (e.g. results/bench/loftq_runs.jsonl) still runs the committed code
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")),
        "command": " ".join(["python", script, *argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def commit_label() -> str:
    """The commit that made an output, ``+dirty`` with uncommitted changes (for result dicts)."""
    st = stamp()
    return st["commit"] + ("+dirty" if st["dirty"] else "")
