"""Ray Tune search over per-unit precision.

* The :class:`~qpruner.trial.TrialContext` (where the pruned weights are, token splits, tasks: small) goes
  into Ray's object store once via ``tune.with_parameters``; every trial reads it from there, on any node,
  and reads the pruned weights themselves from their location (:mod:`qpruner.weights`), never through the
  object store.
* Search space: one ``tune.choice(policy.bits)`` per unit (see :mod:`qpruner.policy`); the searcher
  runs behind :class:`~.searchers.BudgetedSearcher` (over-budget plans never trained, repeats cached).
* The objective reported to Tune is ``objective`` (maximised; see :mod:`qpruner.trial`). With
  ``finetune.eval_every`` > 0, trials also report intermediate evaluations, which an ASHA or
  median-stopping scheduler (``search.scheduler``) uses to stop hopeless trials early.
* A driver-side callback (:mod:`.callbacks`) persists every trial to ``trials.parquet``.
* Fault tolerance: a trial lost with its node is retried (``search.max_failures``); after the driver
  dies, ``qpruner search JOB --resume`` restores the experiment from ``<storage>/tune`` — searcher
  state included — and finishes it; trials.parquet keeps one row per trial id.

Local runs (no ``search.ray_address``) start Ray on this machine bound to 127.0.0.1, with usage
stats off and the dashboard (when enabled) on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .. import policy
from ..config import JobConfig
from ..errors import BackendError, ConfigError
from ..pareto import TrialLog
from ..plan import PrecisionPlan, format_for_bits, units_per_layer
from ..trial import Precheck, TrialContext, TrialResult, run_screen, run_trial
from .callbacks import InfeasibleWatch, PersistTrials, recorded_location
from .searchers import BudgetedSearcher, PlanScreen, SearchSpace, is_screen, make_searcher

logger = logging.getLogger(__name__)


def _ray():
    try:
        import ray
        from ray import tune
    except ImportError as exc:  # pragma: no cover - ray[tune] is a required dependency
        raise BackendError("Ray Tune is required: pip install 'ray[tune]==2.60.0'") from exc
    return ray, tune


def in_submitted_job() -> bool:
    """True inside the entrypoint of a Ray job (`ray job submit`): Ray's job supervisor sets these."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and bool(os.environ.get("RAY_ADDRESS"))


def _check_local_resources(cfg, available: dict) -> None:
    """A local Ray never grows: a trial asking for more than this machine has would wait forever."""
    wants = {"CPU": cfg.cpus_per_trial, "GPU": cfg.gpus_per_trial}
    short = {k: v for k, v in wants.items() if v > float(available.get(k, 0.0)) + 1e-9}
    if short:
        raise BackendError("each trial asks for " + ", ".join(f"{v:g} {k}" for k, v in short.items())
                           + " but this machine's Ray has " + ", ".join(f"{available.get(k, 0):g} {k}" for k in short)
                           + ": no trial could ever start. Lower search.gpus_per_trial / cpus_per_trial, or run on "
                           "a cluster that has such nodes (search.ray_address)")


def _provision_dashboard() -> None:
    """QPruner's Grafana dashboard next to Ray's own, in this node's Ray session (best effort)."""
    from ..dashboards import provision
    try:
        from ray._private import worker
        session = worker._global_node.get_session_dir_path() if worker._global_node else None
    except Exception:  # noqa: BLE001 - Ray internals; the dashboard is a convenience
        session = None
    where = provision(session)
    if where:
        logger.info("Grafana dashboard for the qpruner metrics: %s", where)


def submission_id() -> str:
    """The Ray job submission id of this driver (`ray job submit`), else ``local-<Ray job id>``."""
    import json as _json
    try:
        meta = _json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        if meta.get("job_submission_id"):
            return str(meta["job_submission_id"])
    except (ValueError, AttributeError):
        pass
    try:
        import ray
        return f"local-{ray.get_runtime_context().get_job_id()}"
    except Exception:  # noqa: BLE001 - a label, never worth failing for
        return "local"


def reference_point(job: JobConfig, context: TrialContext, memory_of_largest: float) -> tuple[float, float]:
    """The fixed hypervolume reference ``(q_ref, cost_ref)`` of a search: the quality of a model that knows
    nothing (0 accuracy; perplexity = vocabulary size, i.e. -log(vocab) as quality) and the memory of the
    largest plan in the space (+1 byte)."""
    import math
    vocab = float(context.config_dict.get("vocab_size") or 32000)

    def worst(metric: str) -> float:
        return -math.log(vocab) if metric == "perplexity" else 0.0

    if job.search.objective:
        q_ref = sum(w * worst(k) for k, w in job.search.objective.items())
    else:
        q_ref = worst(job.search.metric)
    return q_ref, float(memory_of_largest) + 1.0


DASHBOARD_URL: str | None = None   # of the local Ray this process started, when search.dashboard is on


def hold_dashboard() -> None:
    """Keep the local Ray this process started (and its dashboard) up until Ctrl-C, then stop it."""
    import signal
    import time
    ray, _ = _ray()
    if not ray.is_initialized():
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Tune's own handler stays installed after fit
    where = f"at http://{DASHBOARD_URL}" if DASHBOARD_URL else "(its dashboard did not start)"
    print(f"the local Ray stays up {where} (search.keep_dashboard); press Ctrl-C to stop it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()


def token_file() -> str:
    """Where Ray keeps its authentication token (``RAY_AUTH_TOKEN_PATH``, default ``~/.ray/auth_token``)."""
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")


def tighten_token_file() -> None:
    """Ray writes its token file readable by every local user (0644); a local Ray started by qpruner makes it
    owner-only (0600). A file of another user is left alone."""
    path = token_file()
    try:
        st = os.stat(path)
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(path, 0o600)
            logger.info("made Ray's token file %s readable by its owner only", path)
    except (FileNotFoundError, AttributeError):   # no token (the default: no auth), or no getuid (Windows)
        return
    except OSError as exc:
        logger.warning("could not restrict Ray's token file %s to its owner (%s)", path, exc)


def init_ray(job: JobConfig) -> bool:
    """Connect to (or start) Ray. Returns True when this call started it (and should stop it)."""
    ray, _ = _ray()
    if ray.is_initialized():
        return False
    cfg = job.search
    address = cfg.ray_address or ("auto" if in_submitted_job() else None)
    if address:  # a submitted job (`ray job submit`) runs on its cluster even without search.ray_address
        ray.init(address=address, log_to_driver=True)
        return True
    # keep a local Ray on 127.0.0.1 (unless the user set the variable). Ray reads it when it is imported,
    # which has happened by now, so the flag it derived is set too; its child processes read the variable.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")
    # address="local": always a new local instance, never a `ray start` cluster found on this machine
    context = ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard,
                       dashboard_host="127.0.0.1", log_to_driver=True)
    tighten_token_file()
    global DASHBOARD_URL
    DASHBOARD_URL = getattr(context, "dashboard_url", None) if cfg.dashboard else None
    if cfg.dashboard and getattr(context, "dashboard_url", None):
        token = token_file()
        auth = (f"; it asks for the token in {token}" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
                else "")
        logger.warning("Ray dashboard of this search: http://%s (127.0.0.1 only%s). It stops with the search "
                       "(search.keep_dashboard=true holds it until Ctrl-C); for one that outlives searches, start "
                       "`ray start --head --dashboard-host=127.0.0.1` and set "
                       "search.ray_address=auto", context.dashboard_url, auth)
    return True


class PlanDecoder:
    """Search-space point -> PrecisionPlan (small and picklable: Tune pickles what holds it)."""

    def __init__(self, n_units: int, four_bit: str, unit: str):
        self.n_units, self.four_bit, self.unit = n_units, four_bit, unit

    def __call__(self, config: dict) -> PrecisionPlan:
        return policy.decode(config, self.n_units, self.four_bit, self.unit)


class OverBudget:
    """The infeasible result of a plan over the budget, or ``None`` (memory is computed, not trained).
    ``precheck``: one :class:`Precheck`, or a mapping pruning amount -> Precheck (joint search)."""

    def __init__(self, precheck: Precheck | dict, device: str):
        self.prechecks = precheck if isinstance(precheck, dict) else {None: precheck}
        self.device = device

    def __call__(self, plan: PrecisionPlan) -> TrialResult | None:
        check = self.prechecks.get(plan.pruned)
        if check is None:
            raise ValueError(f"plan {plan.code()} names pruning amount {plan.pruned!r}, not one of this search's "
                             f"{sorted(self.prechecks, key=lambda a: a or 0.0)}")
        return check(plan, self.device)[1]


def qpruner_trial(config: dict, context: TrialContext | None, decode: PlanDecoder, threads: int,
                  save_adapters: bool = True, done: dict | None = None, variants: dict | None = None,
                  memory: "TrialMemory | None" = None, progress: bool = True):
    """The Ray Tune trainable: one trial of ``config``'s plan on its pruned model, reported to Tune."""
    import tempfile

    import ray
    from ray import tune

    from ..finetune import save_adapter
    import logging as _logging
    _logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)  # this worker's own output: a harmless CPU notice
    sys.unraisablehook = _quiet_shutdown
    trial_id = tune.get_context().get_trial_id()
    if done and trial_id in done:
        # finished and recorded before the driver died, but Tune's last checkpoint still had it running:
        # hand back the recorded result instead of training it again (the callback keeps the row as it is)
        tune.report({**done[trial_id], "replayed": True})
        return
    torch.set_num_threads(threads)
    from ..finetune_memory import process_peak, reset_process_peak
    reset_process_peak()   # this trial's own peak, not an earlier trial's of this reused actor
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    limit = memory.limit(device) if memory is not None else None   # what this trial has, on its own node
    plan = decode(config)
    if variants is not None:   # joint search: only this plan's pruned variant leaves the object store
        context = ray.get(variants[plan.pruned])
    rounds = EvalRounds(tune.report)   # intermediate evaluations, numbered for the scheduler
    with tempfile.TemporaryDirectory() as tmp:
        if is_screen(config):   # multi-fidelity: a zero-step evaluation on a few windows (no adapter to keep)
            result = run_screen(context, plan, device, memory_limit=limit)
        else:
            result = run_trial(context, plan, device, on_report=rounds,
                               on_trained=(lambda model: _keep_adapter(model, tmp, save_adapter)) if save_adapters
                               else None, memory_limit=limit, on_progress=tune.report if progress else None)
        peak = process_peak()
        release_memory()
        _note_training(trial_id, result)
        metrics = {**result.to_metrics(), EVAL_ROUND: rounds.n + 1,
                   "node_id": ray.get_runtime_context().get_node_id(),
                   "worker_rss_bytes": _rss_bytes(), "worker_peak_rss_bytes": peak}
        # the result (and the adapter) become a Tune checkpoint, persisted by this worker before the driver
        # hears of it: `qpruner export` finds the adapter there, and a resumed driver the result (recover_results)
        try:
            with open(os.path.join(tmp, RESULT_FILE), "w") as fh:
                json.dump({"trial_id": trial_id, "metrics": metrics}, fh)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        except OSError as exc:
            # no room for the checkpoint (a full disk): the result still goes to the driver, which keeps it,
            # instead of failing a trial that trained fine (Tune would train it again); export retrains the adapter
            logging.getLogger(__name__).error("trial %s: could not write its checkpoint (%s); reporting its result "
                                              "without one", trial_id, exc.strerror or exc)
            tune.report({**metrics, "checkpoint_error": str(exc.strerror or exc)})


@contextlib.contextmanager
def _progress_reports_allowed():
    """Tune refuses a reported result without the search's metric; a trial's progress reports have none, on
    purpose (finetune.report_every: no scheduler or searcher acts on them), so that check is off during the
    fit. The product's own results are checked by its tests."""
    name = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    old = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


EVAL_ROUND = "eval_round"   # the schedulers' clock: 1, 2, ... over a trial's evaluations (the final one included)


def final_round(ft) -> int:
    """The ``eval_round`` of a trial's final result: its intermediate evaluations, plus one."""
    return (len(range(ft.eval_every, ft.steps, ft.eval_every)) if ft.eval_every else 0) + 1


def _trainable(tune, params: dict, cfg):
    trainable = tune.with_parameters(qpruner_trial, **params)
    return tune.with_resources(trainable, {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})


def _counts_iterations(tuner) -> bool:
    """Whether a restored Tuner's scheduler counts time in Tune's ``training_iteration`` (made before
    ``eval_round``). Ray internals: where they are not found, False."""
    config = getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None)
    return getattr(getattr(config, "scheduler", None), "_time_attr", None) == "training_iteration"


class EvalRounds:
    """Numbers a trial's intermediate evaluations (``eval_round``) before reporting them. The schedulers count
    time in evaluations, not in Tune's ``training_iteration``, which progress reports also advance."""

    def __init__(self, report):
        self.report, self.n = report, 0

    def __call__(self, metrics: dict) -> None:
        self.n += 1
        self.report({**metrics, EVAL_ROUND: self.n})


class TrialMemory:
    """How a trial decides the memory it has (small and picklable: it travels with the trainable).

    ``search.memory_per_trial_gb`` when set, else the rule of :func:`qpruner.finetune_memory.trial_memory_limit` on
    the trial's own node; on a GPU shared by fractional trials the process is also held to its share
    (``torch.cuda.set_per_process_memory_fraction``), so that one trial cannot take its neighbour's memory."""

    def __init__(self, explicit_gb: float | None, gpus_per_trial: float, cpus_per_trial: float):
        self.explicit_gb, self.gpus, self.cpus = explicit_gb, gpus_per_trial, cpus_per_trial

    def limit(self, device: str) -> int | None:
        from ..finetune_memory import cap_gpu_memory, local_memory_limit
        limit = local_memory_limit(self.explicit_gb, device, self.gpus, self.cpus, _node_cpus())
        if device == "cuda" and self.gpus < 1:
            cap_gpu_memory(limit, torch.device("cuda", torch.cuda.current_device()))
        return limit


def _node_cpus() -> float | None:
    """The CPUs Ray gives this worker's node (its share of RAM follows its share of them), or None."""
    try:
        import ray
        node = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info.get("NodeID") == node:
                return float(info.get("Resources", {}).get("CPU") or 0) or None
    except Exception:  # noqa: BLE001 - a best-effort figure: the process's own CPU count stands in
        return None
    return None


def driver_memory_limit(job: JobConfig) -> int | None:
    """The trial memory the driver can know before the search: ``search.memory_per_trial_gb``, or for a local Ray
    this machine's rule. None on a cluster without the setting: each trial then decides on its own node."""
    from ..finetune_memory import local_memory_limit
    cfg = job.search
    if cfg.memory_per_trial_gb is None and (cfg.ray_address or in_submitted_job()):
        return None
    return local_memory_limit(cfg.memory_per_trial_gb, "cuda" if cfg.gpus_per_trial > 0 else "cpu",
                              cfg.gpus_per_trial, cfg.cpus_per_trial, cfg.num_cpus)


def check_memory(job: JobConfig, contexts: dict, limit: int | None) -> None:
    """Refuse a search none of whose plans fits a trial's memory (exit 2), before anything is trained: the uniform
    plan with the smallest fine-tuning peak (usually all-lowest-bit; an int8 layer keeps a copy of its inputs, so
    not always), priced on every pruned variant."""
    from ..errors import PlanError
    from ..trial import over_memory_reason
    if limit is None:
        return
    device = "cuda" if job.search.gpus_per_trial > 0 else "cpu"
    peaks = {}
    for amount, ctx in contexts.items():
        for bits in job.policy.bits:
            plan = PrecisionPlan.uniform(format_for_bits(bits, job.quant.four_bit),
                                         ctx.n_layers * units_per_layer(ctx.unit), ctx.unit)
            peaks[(amount, bits)] = Precheck.of(ctx).peak(plan, device)
    (_, best_bits), smallest = min(peaks.items(), key=lambda kv: kv[1])
    from ..finetune_memory import ADMISSION_MARGIN
    if smallest * ADMISSION_MARGIN > limit:
        raise PlanError(f"no plan fits in a trial's memory: the smallest, all-{best_bits}-bit, "
                        f"{over_memory_reason(smallest, limit).removeprefix('over memory: fine-tuning this plan ')}. "
                        "Nothing was trained. Give trials more memory (search.memory_per_trial_gb, gpus_per_trial, "
                        "cpus_per_trial on CPU), or lower finetune.batch_size / data.seq_len, or prune more")


def _quiet_shutdown(unraisable) -> None:
    """A trial worker stopped by Ray (Ctrl-C, end of search) raises SystemExit in its SIGTERM handler, which Python
    prints as an 'Exception ignored' traceback from a weakref callback: noise, not an error. Others go on."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def _keep_adapter(model, directory: str, save) -> None:
    """Save the trained adapter for export; with no room for it (a full disk) the trial's result still counts
    (`qpruner export` trains the plan's adapter again, deterministically)."""
    try:
        save(model, directory)
    except OSError as exc:
        logging.getLogger(__name__).error("could not save the trained adapter (%s); the result is kept without it",
                                          exc.strerror or exc)
        for name in os.listdir(directory):   # a half-written adapter must not look like one
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)


RESULT_FILE = "qpruner_result.json"
MAX_SCREENS_PER_TRIAL = 100   # Tune's trial cap under screening: num_trials x (this + 1)


def recover_results(experiment: str, log: TrialLog, storage: str | None = None) -> list[str]:
    """Trials whose result a worker persisted (``RESULT_FILE`` in their checkpoint) but that the driver
    died before recording: added to ``log`` (so they are neither lost nor trained again). Local storage
    only; returns the recovered trial ids."""
    if "://" in experiment or not os.path.isdir(experiment):
        return []
    recorded, out = {str(r.get("trial_id")) for r in (log.refresh(), log.rows)[1]}, []   # every row, screens too
    for path in sorted(Path(experiment).glob(f"*/checkpoint_*/{RESULT_FILE}")):
        try:
            saved = json.loads(path.read_text())
            trial_id, metrics = str(saved["trial_id"]), saved["metrics"]
            result = TrialResult.from_metrics(metrics)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("could not read %s (%s); that trial may be trained again", path, exc)
            continue
        if trial_id in recorded:
            continue
        log.add(trial_id, result, node_id=metrics.get("node_id"), worker_rss_bytes=metrics.get("worker_rss_bytes"),
                worker_peak_rss_bytes=metrics.get("worker_peak_rss_bytes"),
                adapter_path=recorded_location(str(path.parent), log.directory, storage), recovered=True)
        recorded.add(trial_id)
        out.append(trial_id)
        logger.warning("trial %s finished before the driver died but was not recorded: recovered from %s",
                       trial_id, path.parent)
    return out


def _record_shipped(directory, params: dict, contexts: dict) -> None:
    """Bytes a trial fetches from Ray's object store (the serialized trainable parameters, and in a joint search its
    own variant's context), into the run's driver record: small, since the weights travel by location."""
    from ray import cloudpickle

    from ..rundir import record_driver
    size = sum(len(cloudpickle.dumps(v)) for k, v in params.items() if k != "variants")
    if "variants" in params:
        size += max(len(cloudpickle.dumps(c)) for c in contexts.values())
    logger.info("each trial fetches %.2f MB from the object store (the pruned weights go by location)", size / 1e6)
    record_driver(directory, object_store_bytes_per_trial=size)


def _note_training(trial_id: str, result: TrialResult) -> None:
    """Diagnostics: with ``QPRUNER_TRAINING_LOG`` set (bench/reliability.py does), append one line per
    completed training, so that a benchmark can count trainings independently of trials.parquet."""
    path = os.environ.get("QPRUNER_TRAINING_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{trial_id} {result.plan.code()} {result.status}\n")


def release_memory() -> None:
    """Hand freed heap memory back to the operating system after a trial (glibc only; a no-op elsewhere).

    Every trial runs in a fresh thread of a reused Ray actor, and glibc gives threads their own malloc
    arenas: the model a trial built and freed stays resident in its arena. Measured on SmolLM2 (steps 0,
    one actor): worker RSS grew 1.9 -> 4.3 GB over 5 trials and reached 8.4 GB per worker in a long
    search, until Ray's OOM killer ended it; with this call it stayed at 1.58 GB over 6 trials. Every
    trial records its worker's resident memory (``worker_rss_bytes``)."""
    import gc

    from ..finetune_memory import trim_heap
    gc.collect()
    trim_heap()


def _rss_bytes() -> int | None:
    """Resident memory of this worker process (Linux), recorded with every trial: a growing value over
    reused actors would be a leak."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class TrialNames:
    """Names people can read, in the Tune table, the dashboard and the experiment directory: the trial's
    number and its plan code (``t0007-44448888``; directory ``trial_0007_<id>_44448888``)."""

    def __init__(self, decode: PlanDecoder, directory: bool = False):
        self.decode, self.directory = decode, directory

    def __call__(self, trial) -> str:
        number = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
        number = int(number) if number.isdigit() else 0
        try:
            code = self.decode(trial.config).code()
        except Exception:  # a malformed config still needs a name
            code = "plan"
        if self.directory:
            return f"trial_{number:04d}_{trial.trial_id}_{code[:64]}"
        return f"t{number:04d}-{code}"


class _NoParameterColumns(dict):
    """An empty column mapping that Tune does not replace by one column per unit (it tests truth)."""

    def __bool__(self):
        return True


def _reporter():
    """Ray Tune's trial table with the plan code and our metrics instead of one column per unit."""
    from ray.tune import CLIReporter

    class FrontReporter(CLIReporter):
        def _current_best_trial(self, trials):  # no "best trial ... parameters={}": a front has no single best
            return None, None

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # a custom table needs Tune's classic output
    return FrontReporter(
        metric_columns={"plan_code": "plan", "status": "result", "avg_bits": "bits", "weight_bytes": "weight B",
                        "perplexity": "ppl", "accuracy": "acc", "objective": "objective"},
        parameter_columns=_NoParameterColumns(), max_report_frequency=30, max_column_length=48)


def _scheduler(job: JobConfig, own_metric: bool):
    """Early stopping on ``objective``; the scheduler names the metric itself only when the Tuner
    does not (multi-objective searchers leave the Tuner without one)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule
    cfg = job.search
    metric = {"metric": "objective", "mode": "max"} if own_metric else {}
    if cfg.scheduler == "asha":
        reports = max(1, job.finetune.steps // max(1, job.finetune.eval_every)) + 1
        return AsyncHyperBandScheduler(time_attr=EVAL_ROUND, grace_period=cfg.grace_period,
                                       reduction_factor=cfg.reduction_factor, max_t=reports, **metric)
    if cfg.scheduler == "median":
        return MedianStoppingRule(time_attr=EVAL_ROUND, grace_period=cfg.grace_period,
                                  min_samples_required=3, **metric)
    return FIFOScheduler()


def tracking_callbacks(job: JobConfig, directory: Path) -> list:
    """Ray Tune's own experiment-tracking callbacks named in ``search.loggers``."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # only the loggers the job asks for ...
    from ray.tune.logger import JsonLoggerCallback
    out = [JsonLoggerCallback()]                            # ... and result.json, which Tune reads back
    for name in job.search.loggers:
        if name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback
            out.append(TBXLoggerCallback())
        elif name == "csv":
            from ray.tune.logger import CSVLoggerCallback
            out.append(CSVLoggerCallback())
        elif name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # a local store next to the results; MLflow 3 wants this opt-in for file stores
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (directory.resolve() / "mlruns").as_uri()
            out.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=job.name, save_artifact=False))
        elif name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback
            out.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "qpruner"), group=job.name))
    return out


def storage_path(job: JobConfig, log: TrialLog) -> str:
    """Where Tune keeps its experiment (:func:`qpruner.rundir.storage_dir`)."""
    from ..rundir import storage_dir
    return storage_dir(job, log.directory)


def run_search(job: JobConfig, context: TrialContext | dict, seeds: list[policy.SeedPlan], log: TrialLog,
               resume: bool = False, scores=None) -> TrialLog:
    """Run ``search.num_trials`` trained trials; every finished or screened trial lands in ``log``.

    ``context``: the pruned model's :class:`TrialContext`, or in a joint search (``prune.param_ratios``)
    a mapping pruning amount -> context (``scores`` then maps amounts to their unit scores). Each
    variant goes into Ray's object store once; a trial fetches only its own plan's variant."""
    ray, tune = _ray()
    cfg = job.search
    contexts = context if isinstance(context, dict) else {None: context}
    limit = driver_memory_limit(job)
    check_memory(job, contexts, limit)
    release_memory()   # the driver's own model and scratch are gone by now: hand the memory (and GPU cache) back
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    started = init_ray(job)
    on_cluster = not started or bool(cfg.ray_address or in_submitted_job())
    watch = InfeasibleWatch(cfg.cpus_per_trial, cfg.gpus_per_trial).listen() if on_cluster else None
    try:
        if not on_cluster:
            _check_local_resources(cfg, ray.cluster_resources())
        _provision_dashboard()
        first = next(iter(contexts.values()))
        n_units = first.n_layers * units_per_layer(first.unit)
        decode = PlanDecoder(n_units, job.quant.four_bit, first.unit)
        experiment = os.path.join(storage_path(job, log), "tune")
        if resume and not tune.Tuner.can_restore(experiment):
            raise ConfigError([f"--resume: no Ray Tune experiment to resume in {experiment}"])
        if resume:
            recover_results(experiment, log, cfg.storage_path)
        # after a restart, trials Tune's last checkpoint still had running may be finished and recorded
        done = {tid: {**TrialResult.from_metrics(row).to_metrics(), EVAL_ROUND: final_round(job.finetune)}
                for tid, row in log.trained().items()
                if row.get("status") in ("ok", "failed") and not row.get("cached_from")} if resume else {}
        if None in contexts:
            shipped = {"context": contexts[None]}
        else:  # one object per variant: a trial fetches its own (nested references stay references)
            shipped = {"context": None, "variants": {a: ray.put(c) for a, c in contexts.items()}}
        params = dict(decode=decode, done=done, threads=max(1, int(cfg.cpus_per_trial)),
                      save_adapters=cfg.save_adapters,
                      memory=TrialMemory(cfg.memory_per_trial_gb, cfg.gpus_per_trial, cfg.cpus_per_trial), **shipped)
        _record_shipped(log.directory, params, contexts)
        trainable = _trainable(tune, params, cfg)
        if resume:
            logger.info("resuming the search in %s", experiment)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
            if _counts_iterations(tuner):
                # an experiment made before progress reports: its scheduler counts Tune's iterations, which progress
                # reports would advance. Its trials report no progress, so its early stopping stays as it was
                logger.warning("this Ray Tune experiment predates in-trial progress reports: its trials report none")
                trainable = _trainable(tune, {**params, "progress": False}, cfg)
                tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
        else:
            tuner = _new_tuner(job, contexts, seeds, log, decode, trainable, n_units, scores, watch, limit)
        state_log = logging.getLogger(_TUNE_STATE_LOGGER)
        if not any(isinstance(f, _OneLineOSErrors) for f in state_log.filters):
            state_log.addFilter(_OneLineOSErrors())
        interrupted = _SigintProbe(active=not str(cfg.ray_address or "").startswith("ray://"))
        try:
            with interrupted, _progress_reports_allowed():
                tuner.fit()
        except Exception as exc:
            if watch is not None and watch.problem:
                raise BackendError(watch.problem) from exc
            raise
        log.interrupted = interrupted.seen
        if watch is not None and watch.problem:  # in case Tune logged the callback's error and returned
            raise BackendError(watch.problem)
        linger = cfg.metrics_linger_s if cfg.metrics_linger_s is not None else (
            30.0 if (cfg.ray_address or in_submitted_job()) else 0.0)
        if linger:
            logger.info("keeping the final metrics up for %.0f s (search.metrics_linger_s)", linger)
            import time
            time.sleep(linger)
    finally:
        if watch is not None:
            watch.close()
        if started and not (cfg.keep_dashboard and not on_cluster):
            ray.shutdown()   # else the CLI holds it up (search.keep_dashboard) and stops it on Ctrl-C
    return log


class _OneLineOSErrors(logging.Filter):
    """Ray Tune logs a failed save of its experiment state (e.g. on a full disk) with a whole traceback, and goes
    on; qpruner already says what happened (the trial log waits for space): one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None and not isinstance(exc, OSError):
            exc = exc.__cause__ or exc.__context__
        if exc is not None:
            record.msg, record.args = f"{record.getMessage()} {exc.strerror or exc}", ()
            record.exc_info, record.exc_text = None, None
        return True


_TUNE_STATE_LOGGER = "ray.tune.execution.experiment_state"


class _SigintProbe:
    """Whether Ray Tune was interrupted (Ctrl-C / SIGINT) during ``tuner.fit()``. Tune catches the first SIGINT
    itself, checkpoints and returns normally; it then puts back the handler it found, which is ours. So: ours
    in place after ``fit`` means Tune saw a SIGINT (on a normal end Tune's own handler stays)."""

    def __init__(self, active: bool = True):   # inactive under Ray Client (ray://): Tune runs on the cluster
        self.seen, self.wanted = False, active

    @staticmethod
    def _ours(signum, frame):   # what a second Ctrl-C does after Tune handed the signal back: stop now
        raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading
        self.active = self.wanted and threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._ours)
        return self

    def __exit__(self, *exc):
        import signal
        if self.active:
            self.seen = signal.getsignal(signal.SIGINT) is self._ours and exc[0] is None and \
                os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
            signal.signal(signal.SIGINT, self.previous)
        return False


def search_space(job: JobConfig, context: TrialContext | dict, n_units: int, scores=None) -> SearchSpace:
    """Keys, options and exact memory tables of the search space (what memory-aware searchers use); in a
    joint search (``context`` and ``scores`` map pruning amounts to each variant's) one table per variant."""
    from ..rundir import trial_compute_dtype
    options = sorted(job.policy.bits)
    formats = [format_for_bits(b, job.quant.four_bit) for b in options]

    def costs_of(ctx):
        memory = policy.PlanMemory(ctx.layout, job.quant, trial_compute_dtype(job))
        return policy.unit_costs(memory, ctx.unit, formats, ctx.budget)

    def scores_of(s):
        return tuple(s.scores) if s is not None else None

    keys = [policy.key(i) for i in range(n_units)]
    if not isinstance(context, dict) or None in context:
        ctx = context[None] if isinstance(context, dict) else context
        one = scores.get(None) if isinstance(scores, dict) else scores
        return SearchSpace(keys, options, costs_of(ctx), scores_of(one))
    amounts = sorted(context)
    tables = tuple(costs_of(context[a]) for a in amounts)
    per = tuple(scores_of((scores or {}).get(a)) for a in amounts)
    return SearchSpace(keys, options, tables[0], per[0], tuple(amounts), tables, per)


def _new_tuner(job, contexts: dict, seeds, log, decode, trainable, n_units, scores=None, watch=None, limit=None):
    _, tune = _ray()
    cfg = job.search
    param_space = {policy.key(i): tune.choice(sorted(job.policy.bits)) for i in range(n_units)}
    if None not in contexts:   # joint search: the pruning amount is one more choice
        param_space[policy.PRUNE_KEY] = tune.choice(sorted(contexts))
    points = [policy.encode(s.plan) for s in seeds][: cfg.num_trials]
    space = search_space(job, contexts, n_units, scores)
    inner = make_searcher(cfg.searcher, points, cfg.seed, cfg.random_warmup, space, cfg.screen_share, cfg.screen_windows)
    device = "cuda" if cfg.gpus_per_trial > 0 else "cpu"
    screen = PlanScreen(decode, OverBudget({a: Precheck.of(c, limit) for a, c in contexts.items()}, device), log)
    searcher = BudgetedSearcher(inner, screen, cfg.max_rejections, num_trials=cfg.num_trials)
    searcher.disk_wait_s = cfg.disk_full_wait_s
    top = len(space.options) - 1
    largest = max(table.total(np.full(n_units, top)) for table in (space.variant_costs or (space.costs,)))
    ref = reference_point(job, next(iter(contexts.values())), largest)
    multi = isinstance(inner.metric, list)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        # screens are Tune trials too, but only full trials count (BudgetedSearcher ends the search at num_trials)
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(job, multi),
                                    num_samples=cfg.num_trials * (MAX_SCREENS_PER_TRIAL + 1) if cfg.screen_share > 0
                                    else cfg.num_trials,
                                    metric=None if multi else "objective", mode=None if multi else "max",
                                    max_concurrent_trials=cfg.max_concurrent, reuse_actors=True,
                                    trial_name_creator=TrialNames(decode),
                                    trial_dirname_creator=TrialNames(decode, directory=True)),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path(job, log),
                                  callbacks=[PersistTrials(log, decode, job.name, submission_id(), ref, cfg.num_trials,
                                                                cfg.storage_path),
                                             *tracking_callbacks(job, Path(log.directory)),
                                             *([watch] if watch is not None else [])],
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  progress_reporter=_reporter(), verbose=cfg.verbose),
    )
