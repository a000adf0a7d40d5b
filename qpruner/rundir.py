"""One owner for a run's directory, ``<results_dir>/<name>/``: its paths, its ``job.yaml``, its identity,
its lock, and safe reads of its tables. The CLI, the driver, the search, export and report all go
through this module; nothing else decides where a run's files live or whether it may write there.

Layout of a run directory::

    .qpruner-run.json  marker: written by qpruner, {"identity", "trial_key", "created", "version"}
    .lock              exclusive lock while a search or a prune writes here (holder: pid, host, command)
    job.yaml           the resolved job (every default filled in); validated whenever it is read
    trials.parquet     every trial (one row per trial id)      pareto.parquet   the front
    pruned/            the pruned model (with its own marker, ``qpruner_prune.json``)
    layer_scores.json, prune.json, seeds.json, report.html, *.png, ray/ (Ray Tune's experiment), exports/
    running.json       the trials a live search is running (their last step, loss, ETA), for `qpruner status`
    pruned-p<percent>/, layer_scores-p<percent>.json, prune-p<percent>.json
                       a joint search's variants, one per ``prune.param_ratios`` amount (e.g. ``pruned-p20/``)

Identity. ``identity(job)`` hashes every setting of the job except those that only say where and how
visibly it runs (:data:`RUNTIME_KEYS`). A search into a directory holding a run of another identity
refuses (use ``--resume`` only for the same job, a new ``name``, or ``--overwrite``, which moves the old
run aside and never deletes it). ``trial_key(job)`` hashes what changes one trial's result (model, data,
pruning, quantization, fine-tuning, evaluation, metric, trial compute dtype); every row of
``trials.parquet`` carries it, and the cache answers a proposal only from rows with the same key.

Lock. ``RunDir.lock()`` takes an exclusive ``flock`` on ``.lock`` for the whole search (or prune); a
second writer fails at once with a message naming the holder. Readers never need it: every table is
replaced atomically (temp file + rename) and :func:`read_table` reads through one open file handle, so
it sees either the old or the new file, never a mix.

This module imports no torch: ``qpruner status`` and ``validate`` stay light.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import yaml

from .errors import ConfigError, ResultsError

MARKER = ".qpruner-run.json"
LOCK = ".lock"
JOB_FILE = "job.yaml"
TRIALS_FILE = "trials.parquet"
PARETO_FILE = "pareto.parquet"
RUNNING_FILE = "running.json"   # the trials a live search is running: name, start, last step/loss/ETA (driver-written)
DRIVER_FILE = "driver.json"   # what the driver measured of itself: peak resident memory, bytes shipped per trial
LOFTQ_DIR = "loftq"   # the LoftQ cache of the run's pruned models (qpruner.loftq.LoftQCache; derived, safe to delete)
# settings that change where and how visibly a run executes, never what it computes
logger = logging.getLogger(__name__)
RUNTIME_KEYS = ("name", "results_dir", "search.ray_address", "search.num_cpus", "search.dashboard", "search.keep_dashboard",
                "search.verbose", "search.loggers", "search.metrics_linger_s", "search.storage_path", "search.max_failures",
                "search.disk_full_wait_s", "search.loftq_cache", "search.memory_per_trial_gb",
                "finetune.report_every", "search.storage_shared")
# keys added after runs were recorded: left out of a run's identity while at these defaults, so that those runs
# (which ran with the default) keep their identity and are continued, not refused as "a different run"
ADDED_KEYS = {"search.screen_share": 0.0, "search.screen_windows": 32, "data.dataset_config": None,
              "data.split": "train", "data.revision": None, "data.max_documents": None}
# of these sections, every key changes a trained trial's result
TRIAL_SECTIONS = ("model", "data", "prune", "quant", "finetune", "eval")


def variant_suffix(amount: float | None) -> str:
    """File-name suffix of a joint search's pruned variant: ``-p20`` for 0.2 (``""``: the one pruned model)."""
    return "" if amount is None else f"-p{100 * float(amount):g}"


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as one level with dotted keys."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "objective":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(job) -> list | None:
    """Size and modification time of a local data file (its content changes the splits); for a Hub dataset, how
    its rows are read (blank rows dropped: a run that read them another way never mixes with this one)."""
    from .config import is_hub_dataset
    if is_hub_dataset(job.data.source):
        return ["hub", "non-blank rows"]
    path = Path(job.data.source).expanduser()
    try:
        stat = path.stat() if path.is_file() else None
    except OSError:
        stat = None
    return [stat.st_size, stat.st_mtime_ns] if stat else None


def _settings(job) -> dict:
    from .config import to_dict
    out = {k: v for k, v in flatten(to_dict(job)).items()
           if k not in RUNTIME_KEYS and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    out["data.file"] = data_fingerprint(job)
    return out


def identity(job) -> str:
    """Hash of every setting except :data:`RUNTIME_KEYS` (and this package's version)."""
    from . import __version__
    return _hash({"settings": _settings(job), "version": __version__})


def trial_compute_dtype(job) -> str:
    """The compute dtype trials will use (it decides bias storage in the memory model and the result)."""
    from .config import compute_dtype_name
    return compute_dtype_name(job.quant.compute_dtype, job.search.gpus_per_trial > 0)


def trial_key(job) -> str:
    """Hash of what changes one trained trial's result: the cache's key, next to the plan."""
    from . import __version__
    from .config import to_dict
    d = to_dict(job)
    d["finetune"].pop("report_every", None)   # how often a trial says how far it is: not what it computes
    for key, default in ADDED_KEYS.items():   # added later: at their defaults, the rows recorded before still match
        section, _, name = key.partition(".")
        if section in TRIAL_SECTIONS and name in d[section] and d[section][name] == default:
            del d[section][name]
    return _hash({"sections": {s: d[s] for s in TRIAL_SECTIONS}, "data_file": data_fingerprint(job),
                  "metric": job.search.metric,
                  "objective": job.search.objective, "unit": job.policy.unit, "device": job.device,
                  "compute_dtype": trial_compute_dtype(job), "version": __version__})


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (runtime keys ignored)."""
    a = {k: v for k, v in flatten(old).items() if k not in RUNTIME_KEYS}
    b = {k: v for k, v in flatten(new).items() if k not in RUNTIME_KEYS}
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def front_metric(job) -> str:
    """The quality axis of the front: the objective when it mixes metrics, else ``search.metric``."""
    return "objective" if job.search.objective else job.search.metric


def read_table(path: str | os.PathLike, what: str = "results table"):
    """A parquet table read through one open file handle (consistent under concurrent atomic
    replacement). A missing or corrupt file raises :class:`ResultsError` with the path and a way out."""
    import pandas as pd
    import pyarrow as pa
    path = Path(path)
    last = None
    for attempt in range(3):
        try:
            with open(path, "rb") as fh:
                return pd.read_parquet(fh)
        except FileNotFoundError:
            raise ResultsError(f"{path} does not exist (is {path.parent} a results/<job>/ directory of a "
                               "search that has finished at least one trial?)") from None
        except (pa.ArrowException, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.05 * (attempt + 1))
    raise ResultsError(f"{path} ({what}) is unreadable: {type(last).__name__}: {last}. It may be truncated "
                       f"(a full disk, a copy cut short). Restore it from a backup, or move the run aside and "
                       "search again") from None


class RunDir:
    """``<results_dir>/<name>/`` of one run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # paths ---------------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def job_file(self) -> Path:
        return self.path / JOB_FILE

    @property
    def trials_file(self) -> Path:
        return self.path / TRIALS_FILE

    @property
    def pareto_file(self) -> Path:
        return self.path / PARETO_FILE

    @property
    def pruned(self) -> Path:
        """The job's one pruned model (``pruned_at(None)``)."""
        return self.pruned_at(None)

    def pruned_at(self, amount: float | None) -> Path:
        """The pruned model of one variant of a joint search (``None``: the job's one pruned model)."""
        return self.path / f"pruned{variant_suffix(amount)}"

    # what is in it -------------------------------------------------------------------------------
    def read_marker(self) -> dict | None:
        try:
            return json.loads(self.marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write_marker(self, job, searched: bool, continuing: bool = True) -> None:
        from . import __version__
        old = self.read_marker() or {}
        # run_id names the run's folder under a shared search.storage_path: a fresh search gets a new one, so
        # it never writes into (or resumes) the Tune experiment of another run, even one of the same name; a
        # continued run keeps its own; a run searched before run ids (identity, no run_id) keeps none, i.e.
        # its name-only folder, and so stays resumable
        run_id: str | None
        if searched and not continuing:
            run_id = uuid.uuid4().hex[:12]
        else:
            run_id = old.get("run_id") or (None if old.get("identity") else uuid.uuid4().hex[:12])
        record = {"version": __version__, "created": old.get("created", time.time()), "job": job.name,
                  "identity": identity(job) if searched else old.get("identity"),
                  "trial_key": trial_key(job) if searched else old.get("trial_key"),
                  **({"run_id": run_id} if run_id else {}),
                  **({"hv_reference": old["hv_reference"]} if "hv_reference" in old and continuing else {})}
        _atomic_text(self.marker, json.dumps(record, indent=2))

    def write_reference(self, ref: tuple[float, float]) -> None:
        """The search's fixed hypervolume reference (q_ref, cost_ref), kept in the marker so that
        `qpruner status` reports the same hypervolume as the search's metrics and log."""
        record = self.read_marker()
        if record is not None:
            _atomic_text(self.marker, json.dumps({**record, "hv_reference": [float(ref[0]), float(ref[1])]}, indent=2))

    def reference(self) -> tuple[float, float] | None:
        ref = (self.read_marker() or {}).get("hv_reference")
        try:
            return (float(ref[0]), float(ref[1])) if ref else None
        except (TypeError, ValueError, IndexError):
            return None

    def is_ours(self) -> bool:
        """Written by qpruner: the marker, or (runs of earlier versions) a job.yaml that parses as a job."""
        if self.marker.is_file():
            return True
        if self.job_file.is_file():
            try:
                self.read_job()
                return True
            except QPrunerErrorTypes:
                return False
        return False

    def is_empty(self) -> bool:
        """Absent, or holding nothing but the lock file."""
        return not self.path.exists() or (self.path.is_dir() and all(p.name == LOCK for p in self.path.iterdir()))

    def discard_unstarted(self) -> bool:
        """After a run that created this directory and failed before any work: remove the bookkeeping it wrote
        (marker, job.yaml), its lock file and the directory, so the failure leaves nothing behind. Only while no
        one else holds the lock (taken here, non-blocking), and only when the directory holds nothing but that
        bookkeeping: a pruned model, trials or any other file keeps the directory whole. True when removed."""
        bookkeeping = {LOCK, MARKER, JOB_FILE, ".trials.lock", RUNNING_FILE}
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:       # another process holds it: the directory is theirs now
                return False
            names = {p.name for p in self.path.iterdir()}
            if not names <= bookkeeping:
                return False
            for name in sorted(names - {LOCK}) + [LOCK]:
                (self.path / name).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:   # someone wrote in the meantime: leave it
                return False
            return True
        finally:
            os.close(fd)

    def read_job(self):
        """The run's job.yaml, validated (an error names the file)."""
        from .config import build_job
        if not self.job_file.is_file():
            raise ResultsError(f"{self.job_file} does not exist: {self.path} is not a results/<job>/ directory "
                               "written by `qpruner search` (or it was not finished setting up)")
        try:
            data = yaml.safe_load(self.job_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ResultsError(f"{self.job_file} is not readable YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ResultsError(f"{self.job_file} does not hold a job (got {type(data).__name__})")
        return build_job(data, source=str(self.job_file), check_files=False)

    def write_job(self, job) -> None:
        from .config import save_job
        save_job(job, self.job_file)

    def front_metric(self) -> str:
        return front_metric(self.read_job())

    def trials(self):
        return read_table(self.trials_file, "the trial log")

    def front(self):
        return read_table(self.pareto_file, "the Pareto front")

    def has_trials(self) -> bool:
        return self.trials_file.is_file()

    # the lock ------------------------------------------------------------------------------------
    def write_running(self, trials: list[dict]) -> None:
        """Replace :data:`RUNNING_FILE` with ``trials`` (best effort: a view for `qpruner status`, never worth
        failing a search for)."""
        try:
            _atomic_text(self.path / RUNNING_FILE, json.dumps({"updated": time.time(), "trials": trials}) + "\n")
        except OSError as exc:
            logger.debug("could not write %s (%s)", self.path / RUNNING_FILE, exc)

    def running(self) -> list[dict]:
        """The running trials the live search last wrote, or [] when no search holds the run (a file left by a
        driver that died is not a running search)."""
        path = self.path / RUNNING_FILE
        if not path.is_file() or self.holder() is None:
            return []
        try:
            return list(json.loads(path.read_text()).get("trials") or [])
        except (OSError, ValueError, AttributeError):
            return []

    @contextlib.contextmanager
    def lock(self, purpose: str):
        """Hold the directory's exclusive lock (creating the directory) for the ``with`` block."""
        self.path.mkdir(parents=True, exist_ok=True)
        for attempt in range(20):  # ~2 s: rides over a `qpruner status` probing the lock (holder())
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                try:   # a reader's shared lock (`qpruner status` probing) blocks us too, but holds nothing
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    writer = False
                except BlockingIOError:
                    writer = True
                os.close(fd)
                if (writer and holder) or attempt == 19:   # text left by a killed writer names no one
                    raise ResultsError(f"{self.path} is in use by {holder or 'another process'}; wait for it to "
                                       "finish, or stop it (then `qpruner search JOB --resume`)") from None
                time.sleep(0.1)
                continue
            try:  # the file locked must still be this directory's (not one moved aside meanwhile)
                same = os.fstat(fd).st_ino == os.stat(self.path / LOCK).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self.path.mkdir(parents=True, exist_ok=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"qpruner {purpose} (pid {os.getpid()} on {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:300]})\n").encode(), 0)
        self._lock_fd = fd
        try:
            yield self
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> str | None:
        """Who holds the lock (e.g. a running search), or None: a check that writes nothing."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    # moving a run aside --------------------------------------------------------------------------
    def move_aside(self) -> Path:
        """Rename the directory to ``<name>.replaced-<timestamp>`` (never deletes); returns the new path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}")
        os.rename(self.path, target)
        return target


QPrunerErrorTypes = (ConfigError, ResultsError)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def storage_dir(job, run_path: str | os.PathLike) -> str:
    """Where Ray Tune keeps the run's experiment: ``<search.storage_path>/<name>-<run id>`` (a shared
    filesystem or a URI such as s3://bucket/prefix for multi-node runs; the run id is in the run's marker,
    new for every fresh search), else ``results/<job>/ray``."""
    if job.search.storage_path:  # shared by many jobs and runs: one folder each, <name>-<run id>
        run_id = (RunDir(run_path).read_marker() or {}).get("run_id")
        return f"{job.search.storage_path.rstrip('/')}/{job.name}" + (f"-{run_id}" if run_id else "")
    return str(Path(run_path).resolve() / "ray")


def experiment_dir(job, run: RunDir) -> str:
    """Ray Tune's experiment of the run: ``<storage_dir>/tune``."""
    return storage_dir(job, run.path).rstrip("/") + "/tune"


def can_restore(job, run: RunDir) -> bool:
    """Whether a Tune experiment to resume exists: its ``tuner.pkl`` and an ``experiment_state-*.json``. A
    driver killed while the search was starting can leave the first without the second, which Tune cannot
    restore (it would start over inside the old folder); such a run continues from trials.parquet instead."""
    names = _experiment_files(experiment_dir(job, run))
    return "tuner.pkl" in names and any(n.startswith("experiment_state-") and n.endswith(".json") for n in names)


def _experiment_files(where: str) -> set[str]:
    """Names of the files directly in the experiment folder (local path or URI); empty when absent."""
    if "://" not in where:
        return {p.name for p in Path(where).iterdir()} if Path(where).is_dir() else set()
    import pyarrow.fs as pafs
    fs, path = pafs.FileSystem.from_uri(where)
    return {info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}


def open_for_search(job, resume: bool = False, overwrite: bool = False) -> tuple[RunDir, bool]:
    """Decide, before any work, how a search of ``job`` may use its directory. Returns the RunDir and
    whether the search continues an earlier one (``--resume``, or the same job found unfinished).

    * absent or empty: a new run;
    * the same run (same identity): continued when a Tune experiment exists, else started afresh;
      ``--resume`` with nothing to resume is an error;
    * another run, or files qpruner did not write: refused, naming the differences, unless
      ``overwrite`` (the old directory is moved aside, never deleted)."""
    from .config import to_dict
    run = RunDir(job.results_path)
    if run.path.exists() and not run.path.is_dir():
        raise ResultsError(f"{run.path} is a file, not a results directory; choose another name or results_dir")
    if overwrite and resume:
        raise ResultsError("--overwrite and --resume contradict each other: --resume continues the run in "
                           f"{run.path}, --overwrite moves it aside and starts a new one")
    if run.is_empty():
        if resume:
            raise ResultsError(f"--resume: {run.path} holds no search to resume; run without --resume")
        return run, False
    if overwrite:
        return run, False  # moved aside under the lock by the caller (see RunDir.move_aside)
    if not run.is_ours():
        raise ResultsError(f"{run.path} exists and was not written by qpruner (no {MARKER}, no valid {JOB_FILE}); "
                           "nothing was changed. Choose another name (name=...) or results_dir, or pass "
                           "--overwrite to move that directory aside (it is never deleted)")
    marker = run.read_marker()
    old_identity = (marker or {}).get("identity")
    legacy = marker is None  # written by a qpruner before run markers: its Tune state cannot be restored
    if old_identity is None and run.job_file.is_file() and (run.has_trials() or can_restore(job, run)):
        old_identity = identity(run.read_job())
    started = run.has_trials() or can_restore(job, run)
    same = old_identity is None or old_identity == identity(job) or not started  # never trained: start afresh
    if not same:
        try:
            diff = differences(to_dict(run.read_job()), to_dict(job))
        except QPrunerErrorTypes:
            diff = []
        shown = "\n".join(f"    {d}" for d in diff[:20]) or "    (the data file's content, or the qpruner version)"
        what = "--resume: the job changed since" if resume else "holds a different run than"
        raise ResultsError(f"{run.path} {what} this one; settings that differ (stored -> asked):\n{shown}\n"
                           "  Keep both: give this job a new name (name=...). Or continue the stored run with its "
                           f"own settings: qpruner search {run.job_file} --resume. Or pass --overwrite to move the "
                           "old run aside (it is never deleted) and start this one")
    restorable = can_restore(job, run) and not legacy
    if resume and not restorable:
        if not legacy and (run.has_trials() or "tuner.pkl" in _experiment_files(experiment_dir(job, run))):
            # killed while the search was starting (Tune's state incomplete) or its state lost: the run goes
            # on from trials.parquet in a fresh Tune experiment (the old folder is set aside, not deleted)
            logger.warning("--resume: %s has no complete Ray Tune state to restore (%s); continuing from its "
                           "trials.parquet with a fresh Tune experiment", run.path, experiment_dir(job, run))
            return run, False
        why = ("was written by an earlier qpruner, whose Tune state this one cannot restore; run without --resume: "
               "a fresh search continues from its trials.parquet (trained plans are answered from it)") if legacy \
            else f"has no Ray Tune experiment to resume ({experiment_dir(job, run)}); run without --resume"
        raise ResultsError(f"--resume: {run.path} {why}")
    return run, restorable


def set_aside_experiment(job, run: RunDir) -> str | None:
    """Before a fresh Tuner: rename an existing local experiment folder (``results/<job>/ray/tune``) aside,
    never deleted. Under a shared ``search.storage_path`` nothing is moved: every fresh search has a folder
    of its own there (``<name>-<run id>``), and the folders there may belong to other runs."""
    where = experiment_dir(job, run)
    if job.search.storage_path or "://" in where or not os.path.isdir(where):
        return None
    target = f"{where}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{where}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    os.rename(where, target)
    return target



def record_driver(run_path: str | os.PathLike, **fields) -> None:
    """Merge ``fields`` into the run's :data:`DRIVER_FILE` (best effort: a measurement, never worth failing for)."""
    path = Path(run_path) / DRIVER_FILE
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    try:
        _atomic_text(path, json.dumps({**old, **fields}, indent=2) + "\n")
    except OSError as exc:
        logger.warning("could not write %s (%s)", path, exc)
