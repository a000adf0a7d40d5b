"""The driver-side Tune callback: persist every finished trial, keep the front live, publish metrics.

Ray metrics (Ray's metrics agent exports them to Prometheus with the prefix ``ray_``; labels
``qpruner_job`` = the job name and ``submission_id`` = the Ray job submission id, or ``local-<Ray job id>``):

* ``ray_qpruner_trials{status}``: trials by status (ok, screened, failed, infeasible, cached, stopped, error);
  published as zeros when the search starts;
* ``ray_qpruner_front_size``, ``ray_qpruner_best_quality`` (the front's best value of the quality metric);
* ``ray_qpruner_hypervolume``: against a reference fixed before the first trial (quality of a model that
  knows nothing: 0 accuracy, perplexity = vocabulary size; memory of the largest plan in the space), so
  it only ever grows;
* ``ray_qpruner_hypervolume_normalized``: the same as a share (0-1) of the box between that reference and
  the ideal corner (best quality at no memory), comparable across jobs;
* per trial, labelled ``trial`` (its name, e.g. ``t0007-44448888``) and ``plan`` (the plan code):
  ``ray_qpruner_trial_quality``, ``ray_qpruner_trial_quality_se``, ``ray_qpruner_trial_weight_mb``,
  ``ray_qpruner_trial_avg_bits``; while it trains, ``ray_qpruner_trial_step`` and ``ray_qpruner_trial_train_loss``
  (its progress reports, ``finetune.report_every``).

Running trials. Each progress report also goes to the driver's log (one line: step, loss, tokens/s, ETA) and
to the run directory's ``running.json`` (:meth:`qpruner.rundir.RunDir.write_running`), which ``qpruner status``
lists.

The series live as long as the driver: ``search.metrics_linger_s`` keeps it up after the last trial so
that Prometheus scrapes the final values (default: 30 s when running on a cluster, 0 locally).
"""

from __future__ import annotations

import logging
import math
import time

from ray import tune

from ..pareto import TrialLog, se_column
from ..plan import PrecisionPlan
from ..results import is_progress
from ..trial import TrialResult

logger = logging.getLogger(__name__)
FLUSH_EVERY_S = 5.0   # retry of a failed trial-log write
RUNNING_EVERY_S = 1.0   # running.json: at most this often for progress reports
STATUSES = ("ok", "screened", "failed", "infeasible", "cached", "stopped", "error")
SERIES = {  # name: (description, extra tag keys)
    "qpruner_trials": ("trials by status", ("status",)),
    "qpruner_front_size": ("plans on the Pareto front", ()),
    "qpruner_hypervolume": ("hypervolume of the front against a fixed reference", ()),
    "qpruner_best_quality": ("best value of the front's quality metric", ()),
    "qpruner_hypervolume_normalized": ("hypervolume as a share of the box from the reference to the ideal corner", ()),
    "qpruner_trial_quality": ("a trial's value of the quality metric", ("trial", "plan")),
    "qpruner_trial_quality_se": ("its standard error over evaluation windows", ("trial", "plan")),
    "qpruner_trial_weight_mb": ("a trial's weight memory, MB", ("trial", "plan")),
    "qpruner_trial_avg_bits": ("a trial's average bits per decoder-linear weight", ("trial", "plan")),
    "qpruner_trial_step": ("a running trial's fine-tuning step", ("trial", "plan")),
    "qpruner_trial_train_loss": ("a running trial's training loss", ("trial", "plan")),
}


class LiveMetrics:
    """Ray metrics gauges for one search (no-ops where Ray's metrics agent is not running)."""

    def __init__(self, job: str, submission: str = "", metric: str = "perplexity"):
        self.tags = {"qpruner_job": job, "submission_id": submission or "unknown"}
        self.metric = metric
        self.gauges = None

    def _gauges(self) -> dict:
        if self.gauges is None:
            from ray.util.metrics import Gauge
            self.gauges = {name: Gauge(name, desc, tag_keys=("qpruner_job", "submission_id", *extra))
                           for name, (desc, extra) in SERIES.items()}
        return self.gauges

    def _set(self, name: str, value, **tags) -> None:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        self._gauges()[name].set(float(value), tags={**self.tags, **tags})

    def publish(self, summary: dict) -> None:
        try:
            for status in STATUSES:
                self._set("qpruner_trials", summary.get(f"n_{status}", 0), status=status)
            self._set("qpruner_front_size", summary["front_size"])
            self._set("qpruner_hypervolume", summary["hypervolume"])
            self._set("qpruner_best_quality", summary["best"])
            self._set("qpruner_hypervolume_normalized", summary.get("hypervolume_normalized"))
        except Exception as exc:  # metrics are best effort; never break a search for them
            logger.debug("could not publish Ray metrics: %s", exc)

    def progress(self, name: str, plan: str, result: dict) -> None:
        try:
            self._set("qpruner_trial_step", result.get("step"), trial=name, plan=plan)
            self._set("qpruner_trial_train_loss", result.get("train_loss"), trial=name, plan=plan)
        except Exception as exc:
            logger.debug("could not publish Ray metrics: %s", exc)

    def trial(self, name: str, plan: str, result: dict) -> None:
        try:
            tags = {"trial": name, "plan": plan}
            self._set("qpruner_trial_quality", result.get(self.metric), **tags)
            self._set("qpruner_trial_quality_se", result.get(se_column(self.metric)), **tags)
            if result.get("weight_bytes") is not None:
                self._set("qpruner_trial_weight_mb", result["weight_bytes"] / 1e6, **tags)
            self._set("qpruner_trial_avg_bits", result.get("avg_bits"), **tags)
        except Exception as exc:
            logger.debug("could not publish Ray metrics: %s", exc)


class PersistTrials(tune.Callback):
    """Tune callback: every finished, failed or stopped trial into the trial log, with progress."""
    ref = None          # class-level defaults: a callback unpickled from an older experiment lacks them
    num_trials = None
    storage: str | None = None       # search.storage_path: adapter paths are recorded relative to it
    running: dict | None = None      # trial id -> what `qpruner status` shows of a running trial
    evaluations: dict | None = None  # trial id -> its last intermediate evaluation (kept if the scheduler stops it)

    def __init__(self, log: TrialLog, decode, job: str, submission: str = "", ref: tuple | None = None,
                 num_trials: int | None = None, storage: str | None = None):
        self.log, self.decode, self.ref, self.num_trials = log, decode, ref, num_trials
        self.storage = storage
        self.metrics = LiveMetrics(job, submission, log.metric)

    def setup(self, **info):
        import os

        from .run import submission_id
        # Tune's controller refuses a result without the search's metric; progress reports have none on purpose.
        # Under Ray Client the controller runs on the cluster, where this callback runs too (see run.py)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        self.metrics.tags["submission_id"] = submission_id()  # this driver's: a resumed one is a new submission
        if self.ref is not None:
            from ..rundir import RunDir
            RunDir(self.log.directory).write_reference(self.ref)   # `qpruner status` uses the same reference
        self._done()  # zeros (or, after a restart, the counts so far) before the first trial ends
        self.running, self.evaluations = {}, {}
        self._write_running()   # an earlier driver's running trials are not this one's

    def _write_running(self, throttle: bool = False) -> None:
        """running.json for `qpruner status`: on every start and end, at most once a second for progress."""
        if throttle:
            if time.time() - (getattr(self, "_running_at", None) or 0.0) < RUNNING_EVERY_S:
                return
            self._running_at = time.time()
        from ..rundir import RunDir
        RunDir(self.log.directory).write_running(list((self.running or {}).values()))

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.running is None:
            self.running, self.evaluations = {}, {}
        self.running[trial.trial_id] = {"trial_id": trial.trial_id, "trial": str(trial), "started": time.time()}
        self._write_running()
        logger.info("trial %s: started (%s)", trial, trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.running is None:
            self.running, self.evaluations = {}, {}
        if is_progress(result):
            entry = self.running.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "trial": str(trial),
                                                             "started": time.time()})
            entry.update({k: result.get(k) for k in ("step", "steps", "train_loss", "tokens_per_s", "eta_s")},
                         updated=time.time())
            self._write_running(throttle=True)
            self.metrics.progress(str(trial), str(result.get("plan_code")), result)
            logger.info("trial %s: %s", trial, describe_progress(result))
        elif result.get("status") == "running" and "objective" in result:
            self.evaluations[trial.trial_id] = dict(result)
            entry = self.running.get(trial.trial_id)
            if entry is not None:
                entry["objective"] = result.get("objective")
                self._write_running(throttle=True)

    def _ended(self, trial) -> None:
        (self.evaluations or {}).pop(trial.trial_id, None)
        if self.running and self.running.pop(trial.trial_id, None) is not None:
            self._write_running()

    def on_step_end(self, iteration, trials, **info):
        """While the trial log cannot be written (a full disk), try again every few seconds."""
        if self.log.unsaved and time.time() - getattr(self, "_flushed_at", 0.0) > FLUSH_EVERY_S:
            self._flushed_at = time.time()
            if self.log.flush():
                self._done()

    def _plan(self, trial) -> PrecisionPlan | None:
        try:
            return self.decode(trial.config)
        except Exception:  # a malformed config is itself worth recording
            return None

    def _done(self) -> None:
        summary = self.log.summary(self.ref)
        self.metrics.publish(summary)
        # `qpruner status <submission id>` reads this line from the job's log (PROGRESS in cli.py)
        logger.info("progress: %d/%s trained, %d rows, front %d plans, hypervolume %.4g", len(self.log.trained()),
                    self.num_trials or "?", summary["trials"], summary["front_size"], summary["hypervolume"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        evaluation = (self.evaluations or {}).get(trial.trial_id)
        self._ended(trial)
        result = trial.last_result or {}
        if is_progress(result):   # stopped between a progress report and its next evaluation: keep the evaluation
            if evaluation is None:
                logger.warning("trial %s: ended after a progress report with no evaluation; nothing recorded", trial)
            result = {**result, **(evaluation or {"status": "stopped"})}
        node = {"node_ip": result.get("node_ip"), "node_id": result.get("node_id"), "failures": trial.num_failures,
                "worker_rss_bytes": result.get("worker_rss_bytes"),
                "worker_peak_rss_bytes": result.get("worker_peak_rss_bytes")}
        if result.get("replayed"):  # recorded before a driver restart (see run._trainable): the row stands
            logger.info("trial %s: already recorded before the restart, not trained again (%s)", trial, trial.trial_id)
        elif result.get("status") == "running":  # stopped early by the scheduler: keep its last evaluation
            self.log.add_partial(trial.trial_id, self._plan(trial), "stopped", result, **node)
            logger.info("trial %s: stopped early at step %s (objective %.4g)", trial, result.get("step"),
                        result.get("objective", float("nan")))
        elif "objective" in result:
            checkpoint = getattr(trial, "checkpoint", None)
            adapter = ({"adapter_path": recorded_location(checkpoint_location(checkpoint), self.log.directory,
                                                          self.storage)} if checkpoint is not None else {})
            self.log.add(trial.trial_id, TrialResult.from_metrics(result), **node, **adapter, trial_name=str(trial))
            if result.get("status") != "screened":   # a screen's quality is of another fidelity
                self.metrics.trial(str(trial), str(result.get("plan_code")), result)
            logger.info("trial %s: %s", trial, describe(result))
        self._done()

    def on_trial_error(self, iteration, trials, trial, **info):
        from .searchers import is_screen
        self._ended(trial)
        err = trial.get_error()
        reason = str(err).strip().splitlines()[-1] if err else "unknown error"
        if is_screen(trial.config):   # a screen that errored is still no trained trial (never counts as one)
            plan = self._plan(trial)
            self.log.add_partial(trial.trial_id, plan, "screened", {"error": reason[-2000:]}, fidelity="screen")
        else:
            self.log.add_error(trial.trial_id, self._plan(trial), reason)
        logger.warning("trial %s: errored (%s): %s", trial, trial.trial_id, reason)
        self._done()


def checkpoint_location(checkpoint) -> str:
    """Where a trial's checkpoint lives, readable later by `qpruner export`: a local path, or a URI
    (``s3://bucket/...``, ``gs://bucket/...``) when ``search.storage_path`` is an object store."""
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    if kind == "local":
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(kind, kind)
    if not scheme.isalnum():  # e.g. an fsspec-backed filesystem: no URI pyarrow could open again
        logger.warning("trial checkpoint on a %s filesystem: recording its path only", kind)
        return checkpoint.path
    return f"{scheme}://{checkpoint.path}"


def recorded_location(location: str, run_dir, storage: str | None) -> str:
    """A checkpoint location as ``trials.parquet`` records it: relative to the run directory when under it (the
    default storage, ``results/<job>/ray``), else relative to a local ``search.storage_path`` when under that, so
    that a copied results directory (or a storage mounted elsewhere) still finds it; a URI as it is.
    :func:`qpruner.export.adapter_source` resolves it again."""
    import os
    if "://" in location:   # an object store: readable from anywhere with access
        return location
    path = os.path.realpath(location)
    for root in (str(run_dir), storage):
        if root and "://" not in root:
            root = os.path.realpath(os.path.expanduser(root))
            if path == root or path.startswith(root + os.sep):
                return os.path.relpath(path, root)
    return location


def describe_progress(result: dict) -> str:
    """One line on a running trial's progress report: ``step 12/40, loss 2.314, 1450 tokens/s, ETA 3.2 min``."""
    speed = result.get("tokens_per_s")
    eta = result.get("eta_s")
    return (f"step {result.get('step')}/{result.get('steps')}, loss {result.get('train_loss', float('nan')):.4g}"
            + (f", {speed:.0f} tokens/s" if speed else "") + (f", ETA {eta / 60:.1f} min" if eta is not None else ""))


def describe(result: dict) -> str:
    """One line on a trial's result for the driver's log."""
    if result.get("status") == "screened" and not result.get("error"):
        return (f"screened: ppl {result['perplexity']:.2f} before fine-tuning on a few windows, "
                f"{result['weight_bytes'] / 1e6:.1f} MB")
    if result.get("status") != "ok":
        return f"{result.get('status')} ({result.get('error') or 'over budget'})"
    return (f"ppl {result['perplexity']:.2f}, acc {result['accuracy']:.4f}, "
            f"{result['weight_bytes'] / 1e6:.1f} MB, {result['avg_bits']:.2f} bits")


INFEASIBLE = "No available node types can fulfill resource request"


class InfeasibleWatch(tune.Callback):
    """Fail fast on a cluster that can never run a trial, instead of waiting forever.

    Ray's autoscaler (the cluster launcher's, KubeRay's, or the read-only one of a fixed cluster) tells
    every driver, about every 30 s, when no node type can hold a resource request; Tune itself only
    keeps waiting. This listens for that event about exactly the trials' own request (e.g.
    ``{'CPU': 4.0}``) on Ray's driver log stream (``global_worker_stdstream_dispatcher``, where those
    events arrive) and stops the search once the event has come ``sightings`` times with no trial
    starting in between and none running — a node that is only restarting does not stop it. Where the
    stream is unavailable the search simply waits, as Tune does. Not active after ``--resume`` (Tune
    restores its own pickled callbacks)."""

    sightings = 2

    def __init__(self, cpus: float, gpus: float):
        self.request = {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
        self.problem: str | None = None
        self.seen = 0
        self._listening = False

    def listen(self) -> "InfeasibleWatch":
        try:
            from ray._private.worker import global_worker_stdstream_dispatcher
            global_worker_stdstream_dispatcher.add_handler("qpruner_infeasible", self.on_log)
            self._listening = True
        except Exception as exc:  # noqa: BLE001 - Ray internals: without them the search waits as Tune does
            logger.debug("cannot watch the autoscaler's events: %s", exc)
        return self

    def close(self) -> None:
        if self._listening:
            from ray._private.worker import global_worker_stdstream_dispatcher
            global_worker_stdstream_dispatcher.remove_handler("qpruner_infeasible")
            self._listening = False

    def __getstate__(self):   # Tune pickles its callbacks into the experiment state: no live listener there
        return {**self.__dict__, "_listening": False}

    def on_log(self, data: dict) -> None:
        try:   # an exception here would end Ray's log thread for the whole driver
            if data.get("pid") != "autoscaler":
                return
            for line in data.get("lines", []):
                shape = parse_infeasible(line)
                if shape is not None and self.matches(shape):
                    self.seen += 1
                    self.problem = (f"the cluster cannot run a trial: each asks for {_shape(self.request)}, and Ray's "
                                    f"autoscaler reports that no node type can provide {_shape(shape)}. Lower "
                                    "search.cpus_per_trial / gpus_per_trial, or add such a node type to the cluster")
        except Exception as exc:  # noqa: BLE001 - a malformed event is ignored
            logger.debug("ignored an autoscaler event: %s", exc)

    def matches(self, shape: dict) -> bool:
        """The event is about a trial's request: exactly the trial's CPU/GPU."""
        return set(shape) == set(self.request) and all(abs(shape[k] - v) < 1e-9 for k, v in self.request.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        self.problem, self.seen = None, 0   # a trial could start: whatever was reported has passed

    def on_step_begin(self, iteration, trials, **info):
        if self.problem and self.seen >= self.sightings and not any(t.status == "RUNNING" for t in trials):
            raise Infeasible(self.problem)


class Infeasible(RuntimeError):
    """Raised inside Tune's loop; the search turns it into a BackendError."""


def parse_infeasible(line: str) -> dict | None:
    """The resource request of an autoscaler 'cannot fulfill' line, or None."""
    import ast
    at = line.find(INFEASIBLE)
    if at < 0:
        return None
    start, end = line.find("{", at), line.find("}", at)
    try:
        shape = ast.literal_eval(line[start:end + 1])
        return {str(k): float(v) for k, v in shape.items()}
    except (ValueError, SyntaxError, AttributeError, TypeError):
        return None


def _shape(request: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in request.items()) or "no resources"
