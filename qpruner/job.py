"""The driver: run one job end to end.

    JobConfig -> load_model -> prune_ -> score_layers -> seed plans -> search (Ray Tune trials)
              -> TrialLog (trials.parquet, pareto.parquet) -> pareto.png

Everything expensive that every trial shares (loading, pruning, scoring, tokenizing) happens here,
once; the trials receive the result through Ray's object store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from . import __version__, data, importance, models, policy, prune, report, tasks
from .config import JobConfig, save_job, to_dict
from .pruned_model import load_pruned, read_meta, save_pruned
from .errors import ConfigError
from .importance import LayerScores
from .memory import Budget, ModelLayout
from .pareto import TrialLog
from .prune import PruneReport
from .trial import TrialContext

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    context: TrialContext
    seeds: list[policy.SeedPlan]
    prune: PruneReport
    scores: LayerScores


@dataclass
class JobOutcome:
    directory: Path
    prepared: Prepared
    trials: pd.DataFrame
    front: pd.DataFrame
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device: 'cuda' was asked for but no CUDA device is visible; use auto or cpu"])
    return torch.device(name)


def trial_compute_dtype(job: JobConfig) -> str:
    """The compute dtype trials will use (it decides bias storage in the memory model)."""
    if job.quant.compute_dtype != "auto":
        return job.quant.compute_dtype
    return "bfloat16" if job.search.gpus_per_trial > 0 else "float32"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


def prune_key(job: JobConfig) -> str:
    """Identity of the pruned model: model, pruning config, the calibration data and this version.
    Local data files enter with their size and modification time."""
    d = job.data
    calib = {"source": d.source, "text_field": d.text_field, "seq_len": d.seq_len, "calib_samples": d.calib_samples,
             "calib_seq_len": d.calib_seq_len, "eval_samples": d.eval_samples, "seed": d.seed}
    path = Path(d.source).expanduser()
    if path.is_file():
        stat = path.stat()
        calib["file"] = [stat.st_size, stat.st_mtime_ns]
    blob = json.dumps({"model": to_dict(job.model), "prune": to_dict(job.prune), "data": calib,
                       "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pruned_dir(job: JobConfig) -> Path:
    return job.results_path / "pruned"


@dataclass
class PrunedModel:
    model: torch.nn.Module
    tokenizer: object
    splits: data.Splits
    report: prune.PruneReport
    reused: bool


def load_or_prune(job: JobConfig, device: torch.device, force: bool = False) -> PrunedModel:
    """The pruned model of ``job``: read from ``results/<job>/pruned/`` when it was written for the same
    model, pruning config and calibration data, else pruned now and saved there (safetensors)."""
    directory, key = pruned_dir(job), prune_key(job)
    meta = read_meta(directory)
    if not force and meta is not None and meta.get("key") == key:
        t = time.perf_counter()
        model, tokenizer = load_pruned(directory, models.DTYPES[job.model.dtype], device)
        logger.info("reusing the pruned model in %s (key %s, %.1fs)", directory, key, time.perf_counter() - t)
        splits = data.load_splits(job.data, tokenizer)
        return PrunedModel(model, tokenizer, splits, prune.PruneReport.from_dict(meta["report"]), True)
    t = time.perf_counter()
    loaded = models.load_model(job.model, device)
    logger.info("loaded %s (%s parameters) in %.1fs", loaded.name, f"{models.count_params(loaded.model):,}",
                time.perf_counter() - t)
    splits = data.load_splits(job.data, loaded.tokenizer)
    report_ = prune.prune_(loaded.model, splits.calib, job.prune, batch_size=job.prune.batch_size,
                           seed=job.data.seed)
    if directory.exists():
        shutil.rmtree(directory)
    # save_pruned writes the record last: a directory without it (an interrupted save) is never reused
    save_pruned(loaded.model, loaded.tokenizer, directory,
                {"key": key, "source": loaded.name, "report": report_.to_dict(),
                 "job": {"model": to_dict(job.model), "prune": to_dict(job.prune), "data": to_dict(job.data)}})
    logger.info("saved the pruned model to %s", directory)
    return PrunedModel(loaded.model, loaded.tokenizer, splits, report_, False)


def score_key(job: JobConfig) -> str:
    blob = json.dumps({"pruned": prune_key(job), "score": to_dict(job.score), "unit": job.policy.unit,
                       "quant": [job.quant.four_bit, job.quant.blocksize, job.quant.double_quant]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_score(job: JobConfig, model: torch.nn.Module, calib: torch.Tensor, path: Path) -> LayerScores:
    """Unit scores, read from ``path`` when computed for the same pruned model, data, method and unit."""
    key = score_key(job)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            logger.info("reusing %s unit scores (%s) from %s", saved["unit"], saved["method"], path)
            return LayerScores(saved["method"], tuple(saved["scores"]), saved["unit"], saved.get("seconds", 0.0))
    scores = importance.score_units(model, calib, job.score, job.policy.unit, job.quant)
    _write_json(path, {"key": key, **asdict(scores)})
    return scores


def load_tasks(job: JobConfig, tokenizer, model) -> tuple[tasks.TokenizedTask, ...]:
    """The multiple-choice tasks of ``eval.tasks``, tokenized once here so trials need no tokenizer."""
    max_length = min(int(getattr(model.config, "max_position_embeddings", 2048)), 2048)
    out = []
    for spec in job.eval.tasks:
        items = tasks.load_task(spec, job.eval.task_limit)
        out.append(tasks.tokenize_task(tasks.task_name(spec), items, tokenizer, max_length))
        logger.info("task %s: %d items", out[-1].name, len(items))
    return tuple(out)


def front_metric(job: JobConfig) -> str:
    """The quality axis of the front: the objective when it mixes metrics, else ``search.metric``."""
    return "objective" if job.search.objective else job.search.metric


def prepare(job: JobConfig, out: Path) -> Prepared:
    """Driver stages: prune once (or reuse), score layers, sample seed plans."""
    device = resolve_device(job.device)
    pruned = load_or_prune(job, device)
    model, splits, prune_report = pruned.model, pruned.splits, pruned.report
    scores = load_or_score(job, model, splits.calib, out / "layer_scores.json")
    layout = ModelLayout.from_model(model)
    budget = Budget.from_policy(job.policy)
    memory = policy.PlanMemory(layout, job.quant, trial_compute_dtype(job))
    seeds = policy.seed_plans(scores, memory, job.policy, budget, seed=job.search.seed)
    config_dict, state_dict = models.model_state(model)
    context = TrialContext(config_dict=config_dict, state_dict=state_dict, layout=layout,
                           train=splits.train, eval=splits.eval, quant=job.quant, finetune=job.finetune,
                           evaluation=job.eval, budget=budget, metric=job.search.metric, unit=job.policy.unit,
                           objective=job.search.objective, tasks=load_tasks(job, pruned.tokenizer, model))
    _write_json(out / "prune.json", prune_report.to_dict())
    _write_json(out / "seeds.json", [{"origin": s.origin, "code": s.plan.code(), "plan": s.plan.to_dict(),
                                      "avg_bits": memory(s.plan).avg_bits,
                                      "weight_bytes": memory(s.plan).total_bytes} for s in seeds])
    logger.info("%d seed plans (budget: %s)", len(seeds), budget.describe())
    return Prepared(context, seeds, prune_report, scores)


def run_job(job: JobConfig, resume: bool = False) -> JobOutcome:
    """Prune (or reuse), score (or reuse), seed and search; with ``resume`` continue an interrupted search."""
    from .search import run_search  # keeps `qpruner validate` free of the Ray import
    t0 = time.perf_counter()
    out = job.results_path
    from .search.run import in_submitted_job
    if in_submitted_job() and not out.is_absolute():
        logger.warning("results go to %s, inside the job's temporary working directory, which Ray may delete; "
                       "pass results_dir=/an/absolute/path (shared storage on a multi-node cluster)", out.resolve())
    out.mkdir(parents=True, exist_ok=True)
    save_job(job, out / "job.yaml")
    prepared = prepare(job, out)
    origins = {s.plan.formats: f"seed:{s.origin}" for s in prepared.seeds}
    log = TrialLog(out, front_metric(job), origins)
    run_search(job, prepared.context, prepared.seeds, log, resume=resume, scores=prepared.scores)
    trials, front = log.frame(), log.front()
    report.write_report(out, front_metric(job))
    return JobOutcome(out, prepared, trials, front, time.perf_counter() - t0)
