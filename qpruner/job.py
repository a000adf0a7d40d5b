"""The driver: run one job end to end.

    JobConfig -> load_model -> prune_ -> score_units -> seed plans -> search (Ray Tune trials)
              -> TrialLog (trials.parquet, pareto.parquet) -> pareto.png

Everything expensive that every trial shares (loading, pruning, scoring, tokenizing) happens here,
once; the trials receive the result through Ray's object store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from itertools import zip_longest
from pathlib import Path

import pandas as pd
import torch

from . import __version__, data, models, policy, prune, report, tasks, unit_importance
from .config import JobConfig, to_dict
from .models import resolve_device  # noqa: F401  (re-exported: the driver's device)
from .pruned_model import clear_pruned, foreign_files, load_pruned, read_meta, save_pruned
from .unit_importance import UnitScores
from .memory import Budget, ModelLayout, plan_bytes
from .pareto import TrialLog
from .prune import PruneReport
from .rundir import RUNNING_FILE, front_metric, open_for_search, set_aside_experiment, trial_compute_dtype, trial_key
from .trial import TrialContext

logger = logging.getLogger(__name__)


@dataclass
class Variant:
    """One pruned model of a job, ready for trials: its context, pruning report, scores and seed plans."""
    amount: float | None            # prune.param_ratios entry; None: the job's one pruned model
    context: TrialContext
    prune: PruneReport
    scores: UnitScores
    seeds: list[policy.SeedPlan]
    uniform: list[dict]


@dataclass
class Prepared:
    """What the driver hands the search: every pruned variant (one, unless ``prune.param_ratios``), the
    merged seed plans, and ``fixed``, the amount the report compares with (the job's ``param_ratio``)."""
    variants: dict
    seeds: list[policy.SeedPlan]
    fixed: float | None = None

    @property
    def joint(self) -> bool:
        return None not in self.variants

    @property
    def main(self) -> Variant:
        """The job's own pruned model: the single one, or in a joint search the fixed amount's (else the first)."""
        return self.variants.get(self.fixed) or next(iter(self.variants.values()))

    @property
    def context(self) -> TrialContext:
        return self.main.context

    @property
    def prune(self) -> PruneReport:
        return self.main.prune

    @property
    def scores(self) -> UnitScores:
        return self.main.scores

    @property
    def uniform(self) -> list[dict]:
        return self.main.uniform

    @property
    def contexts(self) -> dict:
        """amount -> TrialContext (key ``None`` for a single pruned model)."""
        return {a: v.context for a, v in self.variants.items()}

    def context_for(self, plan) -> TrialContext:
        """The context of the pruned variant ``plan`` applies to (:attr:`PrecisionPlan.pruned`)."""
        from .errors import PlanError
        if plan.pruned not in self.variants:
            have = ", ".join("the job's pruned model" if a is None else f"{a:g}" for a in self.variants)
            raise PlanError(f"plan {plan.code()} is for pruning amount {plan.pruned!r}; this job has {have}")
        return self.variants[plan.pruned].context


@dataclass
class JobOutcome:
    """What :func:`run_job` returns: the directory, the prepared variants, the trials and the front."""
    directory: Path
    prepared: Prepared
    trials: pd.DataFrame
    front: pd.DataFrame
    seconds: float
    continued: bool = False
    moved_aside: Path | None = None



def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


def prune_key(job: JobConfig) -> str:
    """Identity of the pruned model: model, pruning config, the calibration data and this version.
    Local data files enter with their size and modification time."""
    d = job.data
    calib = {"source": d.source, "text_field": d.text_field, "seq_len": d.seq_len, "calib_samples": d.calib_samples,
             "calib_seq_len": d.calib_seq_len, "seed": d.seed}  # not eval_samples: see data.make_splits
    path = Path(d.source).expanduser()
    if path.is_file():
        stat = path.stat()
        calib["file"] = [stat.st_size, stat.st_mtime_ns]
    blob = json.dumps({"model": to_dict(job.model), "prune": to_dict(job.prune), "data": calib,
                       "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def amounts(job: JobConfig) -> list[float | None]:
    """The pruning amounts a job's search chooses from: ``prune.param_ratios`` (sorted), else ``[None]``
    (the job's one pruned model, as ``prune`` describes it)."""
    if job.prune.param_ratios is None:
        return [None]
    return sorted(round(float(a), 6) for a in job.prune.param_ratios)


def variant_job(job: JobConfig, amount: float | None) -> JobConfig:
    """The job as it prunes one variant: ``prune.param_ratio = amount`` (``None``: the job itself)."""
    if amount is None:
        return job
    return replace(job, prune=replace(job.prune, param_ratio=amount, param_ratios=None))


def pruned_dir(job: JobConfig, amount: float | None = None) -> Path:
    """Where a job's pruned model (of one amount, in a joint search) is saved (:meth:`RunDir.pruned_at`)."""
    from .rundir import RunDir
    return RunDir(job.results_path).pruned_at(amount)


@dataclass
class LoadedPruned:
    """A pruned model in memory (reused from its directory, or just pruned), with what made it."""
    model: torch.nn.Module
    tokenizer: object
    splits: data.Splits
    report: prune.PruneReport
    reused: bool


def load_or_prune(job: JobConfig, device: torch.device, force: bool = False, check_budget: bool = True,
                  amount: float | None = None) -> LoadedPruned:
    """The pruned model of ``job`` (of its variant at ``amount`` in a joint search): read from
    ``results/<job>/pruned/`` (``pruned-p<percent>/``) when it was written for the same model, pruning
    config and calibration data, else pruned now and saved there (safetensors). A directory holding
    files qpruner did not write is refused before any work (nothing is deleted)."""
    directory = pruned_dir(job, amount)
    job = variant_job(job, amount)
    key = prune_key(job)
    meta = read_meta(directory)
    reuse = not force and meta is not None and meta.get("key") == key
    if not reuse and foreign_files(directory):
        clear_pruned(directory)  # raises: names the files, deletes nothing
    if reuse:
        t = time.perf_counter()
        model, tokenizer = load_pruned(directory, models.DTYPES[job.model.dtype], device)
        logger.info("reusing the pruned model in %s (key %s, %.1fs)", directory, key, time.perf_counter() - t)
        splits = data.load_splits(job.data, tokenizer)
        return LoadedPruned(model, tokenizer, splits, prune.PruneReport.from_dict(meta["report"]), True)
    check_driver_memory(job, device)
    t = time.perf_counter()
    loaded = models.load_model(job.model, device)
    logger.info("loaded %s (%s parameters) in %.1fs", loaded.name, f"{models.count_params(loaded.model):,}",
                time.perf_counter() - t)
    if check_budget:
        check_budget_before_pruning(job, loaded.model)
    splits = data.load_splits(job.data, loaded.tokenizer)
    prune_report = prune.prune_(loaded.model, splits.calib, job.prune,
                           seed=job.data.seed)
    from .finetune_memory import trim_heap
    trim_heap()   # the unpruned tensors are freed: hand their pages back (glibc keeps them otherwise)
    clear_pruned(directory)  # only the files an earlier save_pruned wrote
    # save_pruned writes the record last: a directory without it (an interrupted save) is never reused
    save_pruned(loaded.model, loaded.tokenizer, directory,
                {"key": key, "source": loaded.name, "report": prune_report.to_dict(),
                 "job": {"model": to_dict(job.model), "prune": to_dict(job.prune), "data": to_dict(job.data)}},
                digest=True)
    logger.info("saved the pruned model to %s", directory)
    return LoadedPruned(loaded.model, loaded.tokenizer, splits, prune_report, False)


GRADIENT_PRUNING = ("taylor", "taylor_vector", "param_second", "param_mix")   # prune.importance with gradients
GRADIENT_SCORES = ("fisher", "taylor", "mutual_information")                 # score.method with gradients


def driver_memory_need(params: int, job: JobConfig) -> int:
    """What the driver holds on its device to prune and score a model of ``params`` parameters: the weights in
    ``model.dtype``, and as much again for their gradients when an estimator takes gradients (activations of the
    small calibration batches not counted)."""
    weights = params * models.DTYPES[job.model.dtype].itemsize
    gradients = job.prune.importance in GRADIENT_PRUNING or job.score.method in GRADIENT_SCORES
    return weights * (2 if gradients else 1)


def check_driver_memory(job: JobConfig, device: torch.device) -> None:
    """The driver prunes and scores the whole model on one device (layer-by-layer pruning and offload are not
    implemented): refuse, before loading anything, a model that cannot fit there, with what would fit."""
    from .errors import ModelError
    from .finetune_memory import host_memory
    params = models.source_params(job.model)
    if params is None:
        return
    if device.type == "cuda":
        have, where = int(torch.cuda.get_device_properties(device).total_memory), f"{device} has"
    else:
        have, where = host_memory(), "this machine's RAM is"
    need = driver_memory_need(params, job)
    if have is None or need <= have:
        return
    gradient_free = need // 2 if job.prune.importance in GRADIENT_PRUNING or job.score.method in GRADIENT_SCORES else need
    raise ModelError(f"the driver prunes and scores on one device: this {params / 1e9:.1f}B-parameter model needs about "
                     f"{need / 1e9:.1f} GB there (weights in {job.model.dtype}"
                     f"{' and their gradients' if gradient_free < need else ''}) and {where} {have / 1e9:.1f} GB. "
                     + (f"Gradient-free estimators (prune.importance: l2, score.method: block_influence) need "
                        f"{gradient_free / 1e9:.1f} GB; " if gradient_free < need else "")
                     + "or run the driver on a larger device (device: cpu uses the host's RAM). Pruning layer by "
                       "layer, or with offload, is not implemented")


def check_budget_before_pruning(job: JobConfig, model: torch.nn.Module) -> None:
    """Refuse a ``policy.budget_gb`` that no plan can meet, before the pruning and scoring work: the
    all-lowest-bit plan priced on the narrowest layers this pruning config can leave (exact for a fixed
    ratio with local ranking, a floor otherwise). ``budget_avg_bits`` is checked by ``validate``."""
    from .errors import PlanError
    from .plan import PrecisionPlan, format_for_bits
    if job.policy.budget_gb is None:
        return
    before = models.layer_widths(model)
    after = prune.narrowest_widths(before, job.prune)
    if after is None:
        return
    layout = ModelLayout.from_model(model).narrowed(before, after)
    bits = min(job.policy.bits)
    plan = PrecisionPlan.uniform(format_for_bits(bits, job.quant.four_bit), layout.n_layers)
    mem = plan_bytes(layout, plan, job.quant, trial_compute_dtype(job))
    budget = Budget.from_policy(job.policy)
    if not budget.fits(mem):
        exact = job.prune.param_ratio == 0 or job.prune.ranking == "local" and job.prune.param_ratio is None
        raise PlanError(f"no plan fits policy.budget_gb={job.policy.budget_gb:g}: the smallest, all-{bits}-bit, "
                        f"{'needs' if exact else 'needs at least'} {mem.total_bytes / 1e9:.4f} GB on this model "
                        f"pruned with these settings (checked before pruning); raise policy.budget_gb or prune more")


def score_key(job: JobConfig) -> str:
    """Identity of a job's unit scores: the pruned model, the scoring method and the unit."""
    blob = json.dumps({"pruned": prune_key(job), "score": to_dict(job.score), "unit": job.policy.unit,
                       "quant": [job.quant.four_bit, job.quant.blocksize, job.quant.double_quant]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_score(job: JobConfig, model: torch.nn.Module, calib: torch.Tensor, path: Path) -> UnitScores:
    """Unit scores, read from ``path`` when computed for the same pruned model, data, method and unit
    (``job``: the variant's job in a joint search, :func:`variant_job`)."""
    key = score_key(job)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            logger.info("reusing %s unit scores (%s) from %s", saved["unit"], saved["method"], path)
            return UnitScores(saved["method"], tuple(saved["scores"]), saved["unit"], saved.get("seconds", 0.0))
    scores = unit_importance.score_units(model, calib, job.score, job.policy.unit, job.quant)
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


def uniform_plans(memory: policy.PlanMemory, budget: Budget, n_units: int, unit: str, job: JobConfig) -> list[dict]:
    """Every uniform plan of ``policy.bits`` with its exact memory and whether the budget admits it."""
    from .plan import PrecisionPlan, format_for_bits
    out = []
    for bits in sorted(job.policy.bits):
        mem = memory(PrecisionPlan.uniform(format_for_bits(bits, job.quant.four_bit), n_units, unit))
        out.append({"bits": bits, "avg_bits": mem.avg_bits, "weight_bytes": mem.total_bytes,
                    "fits": budget.fits(mem)})
    return out


def describe_uniform(plans: list[dict], budget: Budget) -> str:
    """One line on the uniform plans: their bits, memory and whether the budget admits them."""
    parts = [f"all-{p['bits']}-bit {p['avg_bits']:.2f} bits / {p['weight_bytes'] / 1e6:.1f} MB "
             f"({'admitted' if p['fits'] else 'over budget'})" for p in plans]
    return f"budget {budget.describe()}: " + "; ".join(parts)


def prepare(job: JobConfig, out: Path) -> Prepared:
    """Driver stages, once per pruning amount: prune (or reuse), score units, sample seed plans. The most
    pruned variant goes first: an impossible ``policy.budget_gb`` is refused before any pruning."""
    from .errors import PlanError
    device = resolve_device(job.device)
    budget = Budget.from_policy(job.policy)
    order = sorted(amounts(job), key=lambda a: -(a or 0.0))
    variants, tokenized = {}, None
    for amount in order:
        variant, tokenized = _prepare_variant(job, out, amount, device, budget, amount == order[0], tokenized)
        variants[amount] = variant
    fitting = {a: v for a, v in variants.items() if v.uniform[0]["fits"]}
    if not fitting:
        low = variants[order[0]].uniform[0]
        raise PlanError(f"no plan fits: the smallest, all-{low['bits']}-bit, needs {low['avg_bits']:.3f} average bits / "
                        f"{low['weight_bytes'] / 1e9:.4f} GB on the {'most ' if len(order) > 1 else ''}pruned model, over "
                        f"the {budget.describe()}; raise policy.budget_avg_bits / budget_gb")
    for amount in variants.keys() - fitting.keys():
        logger.warning("pruned %g%%: no plan of this variant fits the budget (%s); the search leaves it out",
                       100 * amount, budget.describe())
    variants = {a: fitting[a] for a in sorted(fitting, key=lambda a: a or 0.0)}
    seeds = merge_seeds([v.seeds for v in variants.values()], job.search.num_trials)
    memory_of = {a: policy.PlanMemory(v.context.layout, job.quant, trial_compute_dtype(job)) for a, v in variants.items()}
    _write_json(out / "seeds.json", [{"origin": s.origin, "code": s.plan.code(), "plan": s.plan.to_dict(),
                                      "avg_bits": memory_of[s.plan.pruned](s.plan).avg_bits,
                                      "weight_bytes": memory_of[s.plan.pruned](s.plan).total_bytes} for s in seeds])
    logger.info("%d seed plans (budget: %s)", len(seeds), budget.describe())
    fixed = job.prune.param_ratio if job.prune.param_ratios is not None else None
    return Prepared(variants, seeds, round(fixed, 6) if fixed is not None else None)


def _prepare_variant(job: JobConfig, out: Path, amount: float | None, device, budget: Budget, check_budget: bool,
                     tokenized=None) -> tuple[Variant, tuple]:
    from .plan import units_per_layer
    from .rundir import variant_suffix
    suffix = variant_suffix(amount)
    pruned = load_or_prune(job, device, check_budget=check_budget, amount=amount)
    vjob = variant_job(job, amount)
    model, splits, prune_report = pruned.model, pruned.splits, pruned.report
    layout = ModelLayout.from_model(model)
    memory = policy.PlanMemory(layout, job.quant, trial_compute_dtype(job))
    uniform = uniform_plans(memory, budget, layout.n_layers * units_per_layer(job.policy.unit), job.policy.unit, job)
    logger.info("%s%s", f"pruned {100 * amount:g}%: " if amount is not None else "", describe_uniform(uniform, budget))
    _write_json(out / f"prune{suffix}.json", prune_report.to_dict())
    if not uniform[0]["fits"]:
        return Variant(amount, None, prune_report, None, [], uniform), tokenized
    scores = load_or_score(vjob, model, splits.calib, out / f"layer_scores{suffix}.json")
    seeds = variant_seeds(scores, memory, amount, job, budget, job.search.seed)
    if tokenized is None:
        tokenized = load_tasks(job, pruned.tokenizer, model)
    weights, loftq_root = trial_weights(job, out, pruned_dir(job, amount), weights_key(vjob, pruned_dir(job, amount)))
    context = TrialContext(config_dict=model.config.to_dict(), model_weights=weights, layout=layout,
                           train=splits.train, eval=splits.eval, quant=job.quant, finetune=job.finetune,
                           evaluation=job.eval, budget=budget, metric=job.search.metric, unit=job.policy.unit,
                           objective=job.search.objective, tasks=tokenized, screen_windows=screen_windows(job, splits.eval),
                           loftq_cache=loftq_root if job.search.loftq_cache else None)
    return Variant(amount, context, prune_report, scores, seeds, uniform), tokenized


def weights_key(job: JobConfig, directory: Path) -> str:
    """Identity of the pruned weights trials read: the prune key and the content digest of the files (recorded by the
    prune that wrote them; computed here for a record of an earlier version)."""
    from .weights import digest
    meta = read_meta(directory) or {}
    return f"{prune_key(job)}-{meta.get('weights_sha256') or digest(directory)}"


def trial_weights(job: JobConfig, out: Path, directory: Path, key: str):
    """Where trials read the pruned model in ``directory`` from, and where their LoftQ cache lives.

    * no ``search.storage_path``: the run's own ``pruned/`` directory (one machine, or results_dir on shared
      storage), LoftQ cache in ``results/<job>/loftq/``;
    * ``search.storage_path`` a shared path or a URI: the pruned model is published there once
      (``<storage_path>/pruned/<key>``) for every node; the LoftQ cache is ``<storage_path>/loftq`` on a shared
      path, each node's local cache for a URI."""
    from .rundir import LOFTQ_DIR
    from .trial import NODE_CACHE
    from .weights import PrunedWeights, publish
    storage = job.search.storage_path
    if not storage:
        return PrunedWeights(str(directory.resolve()), key), str((out / LOFTQ_DIR).resolve())
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    weights = publish(directory, storage, key)
    if weights.is_uri:
        return weights, NODE_CACHE
    return weights, str(Path(storage) / LOFTQ_DIR)


def screen_windows(job: JobConfig, eval_ids) -> int:
    """Evaluation windows of a screen (0: no screens); all of them, with a warning, when the split has no more."""
    if job.search.screen_share <= 0:
        return 0
    rows = int(eval_ids.shape[0])
    if job.search.screen_windows >= rows:
        logger.warning("search.screen_windows (%d) covers the whole evaluation split (%d windows): screens save "
                       "only the fine-tuning; lower it or evaluate on more text", job.search.screen_windows, rows)
    return min(job.search.screen_windows, rows)


def variant_seeds(scores: UnitScores, memory: policy.PlanMemory, amount: float | None, job: JobConfig, budget: Budget,
                  seed: int) -> list[policy.SeedPlan]:
    """The probabilistic decision's seed plans of one pruned variant, each naming the variant's amount."""
    return [policy.SeedPlan(replace(s.plan, pruned=amount), s.origin)
            for s in policy.seed_plans(scores, memory, job.policy, budget, seed=seed)]


def merge_seeds(per_variant: list[list[policy.SeedPlan]], num_trials: int) -> list[policy.SeedPlan]:
    """One variant: its seeds. Several (joint search): round robin over the variants (each one's uniform
    ends first), at most half of ``num_trials`` but at least every variant's first two seeds."""
    if len(per_variant) == 1:
        return list(per_variant[0])
    merged = [s for rank in zip_longest(*per_variant) for s in rank if s is not None]
    return merged[: max(2 * len(per_variant), num_trials // 2)]


def run_job(job: JobConfig, resume: bool = False, overwrite: bool = False) -> JobOutcome:
    """Prune (or reuse), score (or reuse), seed and search, holding the results directory's lock.

    The directory is checked before any work (:func:`qpruner.rundir.open_for_search`): a different run
    there is refused (``overwrite`` moves it aside, never deletes it); the same job found unfinished is
    continued, as with ``resume``."""
    from .config import preflight
    from .errors import ConfigError
    from .search.run import in_submitted_job
    if preflight(job):
        raise ConfigError(preflight(job), job.name)
    t0 = time.perf_counter()
    run, continuing = open_for_search(job, resume=resume, overwrite=overwrite)
    moved = None
    if overwrite and not run.is_empty():
        with run.lock("overwrite"):
            moved = run.move_aside()
        logger.warning("moved the earlier run in %s aside to %s (nothing was deleted)", run.path, moved)
    out = run.path
    if in_submitted_job() and not out.is_absolute():
        logger.warning("results go to %s, inside the job's temporary working directory, which Ray may delete; "
                       "pass results_dir=/an/absolute/path (shared storage on a multi-node cluster)", out.resolve())
    created = not run.path.exists()   # only a directory this run creates may be removed again
    try:
        return _search_locked(job, run, resume, t0, moved)
    except BaseException:
        if created and run.discard_unstarted():   # failed before any work: leave no marker, lock or directory
            logger.info("removed %s again: the search failed before writing anything there", run.path)
        raise


def _search_locked(job: JobConfig, run, resume: bool, t0: float, moved) -> JobOutcome:
    from .search.searchers import ENDED   # keeps `qpruner validate` free of the Ray import
    out = run.path
    ENDED.pop(str(out), None)   # an earlier search of this directory in this process says nothing about this one
    with run.lock("search"):
        run, continuing = open_for_search(job, resume=resume)  # again, now that no one else can write here
        finished = continuing and run.has_trials() and len(TrialLog(out, front_metric(job)).trained()) >= \
            job.search.num_trials
        if finished:
            logger.warning("%s holds this same job, finished (%d trained trials): reporting it, training nothing",
                           out, job.search.num_trials)
        elif continuing and not resume:
            logger.warning("%s holds this same job, unfinished: continuing it (as with --resume)", out)
        if not continuing:
            aside = set_aside_experiment(job, run)
            if aside:
                logger.warning("an earlier Ray Tune experiment of this directory was moved to %s", aside)
        run.write_marker(job, searched=True, continuing=continuing)
        run.write_job(job)
        if (run.path / RUNNING_FILE).is_file():
            run.write_running([])   # a dead driver's running trials are not this search's
        from .search.storage import preflight
        connected = preflight(job, out)   # on a cluster: storage every trial reaches, checked before pruning
        try:
            return _prepare_and_search(job, run, out, resume, continuing, finished, t0, moved)
        finally:
            if connected:
                import ray
                ray.shutdown()


def _prepare_and_search(job: JobConfig, run, out: Path, resume: bool, continuing: bool, finished: bool, t0: float,
                        moved) -> JobOutcome:
    from .search import run_search  # keeps `qpruner validate` free of the Ray import
    prepared = prepare(job, out)
    origins = {s.plan: f"seed:{s.origin}" for s in prepared.seeds}
    log = TrialLog(out, front_metric(job), origins, run_key=trial_key(job))
    if not finished:
        contexts = prepared.contexts if prepared.joint else prepared.context
        scores = {a: v.scores for a, v in prepared.variants.items()} if prepared.joint else prepared.scores
        run_search(job, contexts, prepared.seeds, log, resume=continuing, scores=scores)
        if _short(job, log, out) and continuing:
            # Tune's restored experiment had nothing left to run (e.g. trials it gave up on counted as
            # done), though fewer trials are trained than asked: go on in a fresh one from trials.parquet
            logger.warning("the resumed Ray Tune experiment ended with %d of %d trials trained: continuing in a "
                           "fresh experiment (trained plans are answered from trials.parquet)",
                           len(log.trained()), job.search.num_trials)
            set_aside_experiment(job, run)
            run_search(job, contexts, prepared.seeds, log, resume=False, scores=scores)
    trials, front = log.frame(), log.front()
    from .pareto import write_failure
    if not log.unsaved and write_failure(out) is None:
        try:
            report.write_report(out, front_metric(job))
        except OSError as exc:   # e.g. the disk filled again: the trials are safe, the report is not essential
            logger.error("could not write the report (%s); `qpruner report %s` writes it later", exc, out)
    _record_driver_peak(out)
    _check_complete(job, log, out)
    return JobOutcome(out, prepared, trials, front, time.perf_counter() - t0, continuing, moved)


def _record_driver_peak(out: Path) -> None:
    """The driver's peak resident memory over the whole job (load, prune, score, search), into driver.json."""
    from .finetune_memory import process_peak
    from .rundir import record_driver
    peak = process_peak()
    if peak:
        logger.info("driver peak resident memory: %.2f GB", peak / 1e9)
        record_driver(out, driver_peak_rss_bytes=peak)


def _short(job: JobConfig, log: TrialLog, out) -> bool:
    """Fewer trained trials than asked, for no reason the search gave (interrupt, unwritable log, exhausted space)."""
    from .pareto import write_failure
    from .search.searchers import ENDED
    return (len(log.trained()) < job.search.num_trials and not log.interrupted and not log.unsaved
            and write_failure(out) is None and str(out) not in ENDED)


def _check_complete(job: JobConfig, log: TrialLog, out) -> None:
    """The one rule: a search is finished when ``num_trials`` trials are trained (counted in trials.parquet),
    or when its searcher had nothing left to propose. Otherwise it says why it stopped, and how to go on."""
    from .errors import SearchIncomplete
    from .pareto import write_failure
    from .search.searchers import ENDED, EXHAUSTED
    trained, wanted = len(log.trained()), job.search.num_trials
    why = ENDED.pop(str(out), None)
    if trained >= wanted or why == EXHAUSTED:
        if why == EXHAUSTED and trained < wanted:
            logger.warning("%s: %d of %d trials trained", why, trained, wanted)
        return
    again = "run the same command again to continue it (with or without --resume; nothing recorded is trained again)"
    failure = write_failure(out)
    if log.unsaved or failure is not None:
        raise SearchIncomplete(f"the search stopped after {trained} of {wanted} trained trials: {log.path} could "
                               f"not be written ({failure[1] if failure else 'write failed'}); "
                               f"{len(log.unsaved) or 'some'} finished result(s) could not be saved and will be trained "
                               "again. "
                               f"Free space, then {again}")
    if log.interrupted:
        raise SearchIncomplete(f"interrupted after {trained} of {wanted} trained trials (each recorded in "
                               f"{log.path}); {again}", exit_code=130)
    raise SearchIncomplete(f"the search ended after {trained} of {wanted} trained trials"
                           f"{': ' + why if why else ' (see the trials that failed or errored above)'}; {again}")
