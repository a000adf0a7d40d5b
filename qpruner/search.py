"""Ray Tune search over per-layer precision (the only module that imports ray).

* The :class:`~qpruner.trial.TrialContext` (pruned weights + token splits) goes into Ray's object
  store once via ``tune.with_parameters``; every trial reads it from there.
* Search space: one ``tune.choice(policy.bits)`` per decoder layer (see :mod:`qpruner.policy`).
* Searchers: ``hyperopt`` (TPE, default) with the probabilistic-decision seed plans as
  ``points_to_evaluate`` followed by ``search.random_warmup`` random points before TPE takes over;
  ``random`` (Tune's random search, same seeds) as the baseline.
* The objective reported to Tune is ``objective`` (mode ``max``; see :mod:`qpruner.trial`).
* A driver-side callback hands each finished trial to :class:`~qpruner.pareto.TrialLog`, which
  rewrites ``trials.parquet`` and ``pareto.parquet`` after every trial.

Local runs (no ``search.ray_address``) start Ray on this machine bound to 127.0.0.1, with usage
stats off and the dashboard (when enabled) on 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import policy
from .config import JobConfig
from .errors import BackendError
from .pareto import TrialLog
from .plan import units_per_layer
from .trial import TrialContext, TrialResult, run_trial

logger = logging.getLogger(__name__)


def _ray():
    try:
        import ray
        from ray import tune
    except ImportError as exc:  # pragma: no cover - ray[tune] is a required dependency
        raise BackendError("Ray Tune is required: pip install 'ray[tune]==2.60.0'") from exc
    return ray, tune


def init_ray(job: JobConfig) -> bool:
    """Connect to (or start) Ray. Returns True when this call started it (and should stop it)."""
    ray, _ = _ray()
    if ray.is_initialized():
        return False
    cfg = job.search
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=True)
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, dashboard_host="127.0.0.1",
             log_to_driver=True)
    return True


def _n_units(context: TrialContext) -> int:
    return context.n_layers * units_per_layer(context.unit)


def _trainable(config: dict, context: TrialContext, four_bit: str, threads: int):
    import ray
    from ray import tune
    torch.set_num_threads(threads)
    plan = policy.decode(config, _n_units(context), four_bit, context.unit)
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    result = run_trial(context, plan, device, on_report=tune.report)  # intermediate evaluations, if any
    tune.report(result.to_metrics())


def _make_callback(log: TrialLog, n_units: int, four_bit: str, unit: str):
    _, tune = _ray()

    class PersistTrials(tune.Callback):
        """Driver-side: persist each finished trial and keep the front current."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            if "objective" in result:
                log.add(trial.trial_id, TrialResult.from_metrics(result))
                logger.info("trial %s: %s", trial.trial_id, _describe(result))

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                plan = policy.decode(trial.config, n_units, four_bit, unit)
            except Exception:  # a malformed config is itself worth recording
                plan = None
            err = trial.get_error()
            reason = str(err).strip().splitlines()[-1] if err else "unknown error"
            log.add_error(trial.trial_id, plan, reason)
            logger.warning("trial %s errored: %s", trial.trial_id, reason)

    return PersistTrials()


def _describe(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')} ({result.get('error') or 'over budget'})"
    return (f"ppl {result['perplexity']:.2f}, acc {result['accuracy']:.4f}, "
            f"{result['weight_bytes'] / 1e6:.1f} MB, {result['avg_bits']:.2f} bits")


class _NoParameterColumns(dict):
    """An empty column mapping that Tune does not replace by one column per layer (it tests truth)."""

    def __bool__(self):
        return True


def _reporter():
    """Ray Tune's trial table with the plan code and our metrics instead of one column per layer."""
    from ray.tune import CLIReporter
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # a custom table needs Tune's classic output
    return CLIReporter(
        metric_columns={"plan_code": "plan", "status": "result", "avg_bits": "bits", "weight_bytes": "weight B",
                        "perplexity": "ppl", "accuracy": "acc"},
        parameter_columns=_NoParameterColumns(), max_report_frequency=30, max_column_length=48)


def _searcher(job: JobConfig, points: list[dict]):
    cfg = job.search
    if cfg.searcher == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch
        return HyperOptSearch(points_to_evaluate=points or None, random_state_seed=cfg.seed,
                              n_initial_points=max(1, len(points) + cfg.random_warmup))
    from ray.tune.search import BasicVariantGenerator
    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=cfg.seed)


def run_search(job: JobConfig, context: TrialContext, seeds: list[policy.SeedPlan], log: TrialLog) -> TrialLog:
    """Run ``search.num_trials`` trials; every finished trial lands in ``log``."""
    ray, tune = _ray()
    cfg = job.search
    started = init_ray(job)
    try:
        space = {policy.key(i): tune.choice(sorted(job.policy.bits)) for i in range(_n_units(context))}
        points = [policy.encode(s.plan) for s in seeds][: cfg.num_trials]
        trainable = tune.with_parameters(_trainable, context=context, four_bit=job.quant.four_bit,
                                         threads=max(1, int(cfg.cpus_per_trial)))
        trainable = tune.with_resources(trainable, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=_searcher(job, points), num_samples=cfg.num_trials,
                                        metric="objective", mode="max",
                                        max_concurrent_trials=cfg.max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name="tune", storage_path=str(Path(log.directory).resolve() / "ray"),
                                      callbacks=[_make_callback(log, _n_units(context), job.quant.four_bit,
                                                                context.unit)],
                                      progress_reporter=_reporter(), verbose=cfg.verbose),
        )
        tuner.fit()
    finally:
        if started:
            ray.shutdown()
    return log
