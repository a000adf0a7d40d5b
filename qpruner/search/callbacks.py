"""The driver-side Tune callback: persist every finished trial, keep the front live, publish metrics.

Ray metrics (visible in the Ray dashboard's metrics view / Prometheus when the dashboard runs):
``qpruner_trials{job, status}`` (ok, failed, infeasible, cached, stopped, error), ``qpruner_front_size``,
``qpruner_hypervolume`` and ``qpruner_best_quality``, all tagged with the job name, updated after
every trial.
"""

from __future__ import annotations

import logging

from ray import tune

from ..pareto import TrialLog
from ..plan import PrecisionPlan
from ..trial import TrialResult

logger = logging.getLogger(__name__)
STATUSES = ("ok", "failed", "infeasible", "cached", "stopped", "error")


class LiveMetrics:
    """Ray metrics gauges for one job (no-ops where Ray's metrics agent is not running)."""

    def __init__(self, job: str):
        self.job = job
        self.gauges = None

    def publish(self, summary: dict) -> None:
        try:
            if self.gauges is None:
                from ray.util.metrics import Gauge
                self.gauges = {
                    "trials": Gauge("qpruner_trials", "trials by status", tag_keys=("job", "status")),
                    "front": Gauge("qpruner_front_size", "plans on the Pareto front", tag_keys=("job",)),
                    "hv": Gauge("qpruner_hypervolume", "hypervolume of the front (live reference)", tag_keys=("job",)),
                    "best": Gauge("qpruner_best_quality", "best value of the front's quality metric", tag_keys=("job",)),
                }
            tags = {"job": self.job}
            for status in STATUSES:
                self.gauges["trials"].set(summary.get(f"n_{status}", 0), tags={**tags, "status": status})
            self.gauges["front"].set(summary["front_size"], tags=tags)
            self.gauges["hv"].set(summary["hypervolume"], tags=tags)
            if summary["best"] is not None:
                self.gauges["best"].set(summary["best"], tags=tags)
        except Exception as exc:  # metrics are best effort; never break a search for them
            logger.debug("could not publish Ray metrics: %s", exc)


class PersistTrials(tune.Callback):
    def __init__(self, log: TrialLog, decode, job: str):
        self.log, self.decode = log, decode
        self.metrics = LiveMetrics(job)

    def _plan(self, trial) -> PrecisionPlan | None:
        try:
            return self.decode(trial.config)
        except Exception:  # a malformed config is itself worth recording
            return None

    def _done(self) -> None:
        summary = self.log.summary()
        self.metrics.publish(summary)
        logger.info("trials %d, front %d plans, hypervolume %.4g", summary["trials"], summary["front_size"],
                    summary["hypervolume"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        node = {"node_ip": result.get("node_ip"), "node_id": result.get("node_id"), "failures": trial.num_failures,
                "worker_rss_bytes": result.get("worker_rss_bytes")}
        if result.get("replayed"):  # recorded before a driver restart (see run._trainable): the row stands
            logger.info("trial %s: already recorded before the restart, not trained again", trial.trial_id)
        elif result.get("status") == "running":  # stopped early by the scheduler: keep its last evaluation
            self.log.add_partial(trial.trial_id, self._plan(trial), "stopped", result, **node)
            logger.info("trial %s stopped early at step %s (objective %.4g)", trial.trial_id, result.get("step"),
                        result.get("objective", float("nan")))
        elif "objective" in result:
            checkpoint = getattr(trial, "checkpoint", None)
            adapter = {"adapter_path": checkpoint_location(checkpoint)} if checkpoint is not None else {}
            self.log.add(trial.trial_id, TrialResult.from_metrics(result), **node, **adapter)
            logger.info("trial %s: %s", trial.trial_id, describe(result))
        self._done()

    def on_trial_error(self, iteration, trials, trial, **info):
        err = trial.get_error()
        reason = str(err).strip().splitlines()[-1] if err else "unknown error"
        self.log.add_error(trial.trial_id, self._plan(trial), reason)
        logger.warning("trial %s errored: %s", trial.trial_id, reason)
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


def describe(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')} ({result.get('error') or 'over budget'})"
    return (f"ppl {result['perplexity']:.2f}, acc {result['accuracy']:.4f}, "
            f"{result['weight_bytes'] / 1e6:.1f} MB, {result['avg_bits']:.2f} bits")
