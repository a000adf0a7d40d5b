"""Any point of the front -> a directory you can load, evaluate and serve.

``qpruner export RESULTS_DIR --point K`` (or ``--trial t0007``) writes ``results/<job>/exports/point<K>-<trial>/``:

* the pruned model — ``model.safetensors``, ``config.json`` (with its per-layer widths), tokenizer;
* ``adapter/`` — the trial's trained LoRA adapter (``adapter_model.safetensors``), taken from the
  trial's Tune checkpoint (recorded relative to the run directory or ``search.storage_path``, so a copied
  results directory still finds it); with none readable the export fails unless ``--retrain`` trains the
  plan again, which gives the same adapter (trials are deterministic);
* ``qpruner_plan.json`` — the precision plan, the quantization, LoRA and evaluation settings, and the
  trial's metrics;
* ``README.md`` — a model card.

:func:`load` rebuilds the quantized model exactly as the trial had it — same LoftQ base weights, same
bitsandbytes modules — with the adapter attached; evaluating it reproduces the trial's metrics.
``--lm-eval TASKS`` additionally runs lm-evaluation-harness on the export (optional extra ``lm-eval``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml

from .config import EvalConfig, FinetuneConfig, QuantConfig, build_section, to_dict
from .errors import BackendError, ConfigError, ResultsError
from .pareto import PARETO_FILE
from .plan import PrecisionPlan
from .models import resolve_device
from .pruned_model import read_meta
from .results import plan_of_row
from . import serialize

logger = logging.getLogger(__name__)
PLAN_FILE = "qpruner_plan.json"


def _front(run) -> pd.DataFrame:
    if not run.pareto_file.is_file():
        raise ResultsError(f"{run.path} has no {PARETO_FILE}; run `qpruner search` first")
    front = run.front()
    if front.empty:
        raise ResultsError(f"the front of {run.path} is empty: no completed trial to export")
    return front


def _existing_export(out: Path, job_name: str, trial_id: str) -> bool:
    """True when ``out`` already holds this very export; raises when it holds anything else (never deleted)."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ResultsError(f"--out {out} is a file; choose a new directory")
    for stale in out.resolve().glob(f".{out.resolve().name}.partial-*"):   # ours: an export killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    if not any(out.iterdir()):
        return False
    try:
        record = json.loads((out / PLAN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        record = None
    if record and record.get("job") == job_name and record.get("trial", {}).get("trial_id") == trial_id:
        return True
    raise ResultsError(f"--out {out} is not empty and does not hold this export (job '{job_name}', trial "
                       f"{trial_id}); nothing was changed. Choose a new or empty directory")


def adapter_source(recorded, run, job) -> str | None:
    """Where a row's ``adapter_path`` is readable now. Recorded paths are relative to the run directory (the
    default storage, ``results/<job>/ray``) or to ``search.storage_path``, so a results directory copied elsewhere
    still finds its adapters; URIs (``s3://``, ``gs://``) stay as they are. An absolute path of an older run that
    no longer exists is looked for again under the run directory (its ``ray/...`` part)."""
    if not isinstance(recorded, str) or not recorded:
        return None
    if "://" in recorded:
        return recorded
    path = Path(recorded)
    storage = job.search.storage_path if job is not None else None
    if not path.is_absolute():
        candidates = [run.path / path]
        if storage and "://" not in storage:
            candidates.append(Path(storage).expanduser() / path)
    else:
        candidates = [path]
        marker = f"{os.sep}ray{os.sep}"
        if marker in recorded:   # results/<job>/ray/... of a run directory that has since moved
            candidates.append(run.path / recorded[recorded.rindex(marker) + 1:])
    for candidate in candidates:
        if (candidate / "adapter_model.safetensors").is_file():
            return str(candidate)
    return str(candidates[0])


def _fetch_adapter(source: str, into: Path) -> bool:
    """Copy a trial's adapter checkpoint (a local path, or a URI such as ``s3://`` / ``gs://`` when the
    search kept its checkpoints in an object store) into ``into``. False when it is not readable here."""
    if "://" not in source:
        if not (Path(source) / "adapter_model.safetensors").is_file():
            logger.warning("the trial's adapter checkpoint %s is not readable from here", source)
            return False
        shutil.copytree(source, into)
        return True
    from pyarrow import fs as pafs
    try:
        remote, path = pafs.FileSystem.from_uri(source)
        if remote.get_file_info(f"{path}/adapter_model.safetensors").type != pafs.FileType.File:
            logger.warning("the trial's adapter checkpoint %s has no adapter_model.safetensors", source)
            return False
        into.mkdir(parents=True)
        pafs.copy_files(path, str(into.resolve()), source_filesystem=remote,
                        destination_filesystem=pafs.LocalFileSystem())
        return True
    except (OSError, ValueError) as exc:  # no credentials, no such bucket, unsupported scheme
        logger.warning("could not read the trial's adapter checkpoint %s (%s)", source, exc)
        if into.exists():
            shutil.rmtree(into)
        return False


def _retrain_adapter(directory: Path, job, plan: PrecisionPlan, into: Path) -> None:
    """Train ``plan`` again (deterministic: same seeds, same data order) and keep its adapter."""
    from .finetune import save_adapter
    from .job import prepare
    from .trial import run_trial
    logger.warning("no adapter checkpoint for this plan here: training it again (same seeds, same result)")
    prepared = prepare(job, directory)
    run_trial(prepared.context_for(plan), plan, resolve_device("auto"),
              on_trained=lambda model: save_adapter(model, into))


def find_trial(run, front: pd.DataFrame, trial: str) -> tuple[int | None, pd.Series]:
    """(front point or None, row) of ``trial``: its label ``t0007`` (or name ``t0007-<plan code>``), or its trial id;
    a completed trial off the front can be exported too."""
    from .pareto import trial_label
    want = str(trial).split("-", 1)[0] if str(trial)[:1] == "t" and str(trial)[1:5].isdigit() else str(trial)
    trials = run.trials()
    ok = trials[trials["status"] == "ok"] if "status" in trials else trials.iloc[0:0]
    matches = {str(r["trial_id"]): r for _, r in ok.iterrows() if want in (trial_label(r), str(r["trial_id"]))}
    if len(matches) > 1:   # e.g. a search continued in a fresh Tune experiment numbers its trials from 1 again
        raise ConfigError([f"--trial {trial}: {len(matches)} completed trials have that name ({', '.join(matches)}); "
                           "give the trial id"])
    points = {str(r["trial_id"]): i for i, (_, r) in enumerate(front.iterrows())}
    for tid, row in matches.items():
        return points.get(tid), (front.iloc[points[tid]] if tid in points else row)
    shown = ", ".join(f"{i}: {trial_label(r)}" for i, (_, r) in enumerate(front.iterrows()))
    raise ConfigError([f"--trial {trial}: no completed trial of {run.path} has that name or id (the front: {shown})"])


def export_point(directory: str | Path, point: int = 0, out: str | Path | None = None, trial: str | None = None,
                 retrain: bool = False) -> Path:
    """Export front point ``point`` (0 = the smallest model) of the search in ``directory``, or the completed trial
    named ``trial`` (``t0007`` or its trial id). Its adapter comes from the trial's checkpoint; with none readable
    the export fails, unless ``retrain`` trains the plan again (same seeds: the same adapter)."""
    from .rundir import RunDir
    run = RunDir(directory)
    directory = run.path
    job = run.read_job()
    front = _front(run)
    if trial is not None:
        found, row = find_trial(run, front, trial)
        name = f"point{found}-{row['trial_id']}" if found is not None else f"trial-{row['trial_id']}"
        point = found if found is not None else -1
    else:
        if not 0 <= point < len(front):
            raise ConfigError([f"--point {point}: the front has {len(front)} plans (0..{len(front) - 1}, smallest "
                               "first; `qpruner status` shows them)"])
        row = front.iloc[point]
        name = f"point{point}-{row['trial_id']}"
    plan = plan_of_row(row)
    final = Path(out) if out else directory / "exports" / name
    if _existing_export(final, job.name, str(row["trial_id"])):
        logger.info("trial %s is already exported to %s", row["trial_id"], final)
        return final
    pruned = run.pruned_at(plan.pruned)
    if not (pruned / "model.safetensors").is_file():
        raise ResultsError(f"{pruned} has no pruned model; run `qpruner prune` or `qpruner search` for this job")
    # written to a temporary directory, moved into place when complete: no half-written export survives. Into an
    # empty directory named by --out (also through a symlink, or `.`) the files move; the directory itself stays
    target = final.resolve()
    into_existing = target.is_dir()
    if not into_existing:
        target.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target if into_existing else target.parent))
    moved: list[Path] = []
    quantized = serialize.supported(job.quant)
    try:
        skip = ("qpruner_prune.json",) + (("model*.safetensors", "model.safetensors.index.json") if quantized else ())
        shutil.copytree(pruned, out, ignore=shutil.ignore_patterns(*skip), dirs_exist_ok=True)
        adapter = out / "adapter"
        source = adapter_source(row.get("adapter_path"), run, job)
        if not (source and _fetch_adapter(source, adapter)):
            if not retrain:
                raise ResultsError(
                    f"no readable adapter checkpoint for trial {row['trial_id']} "
                    f"({source or 'the search kept none'}); nothing was exported. Copy the run's storage "
                    f"(search.storage_path, or results/<job>/ray) along with the results, give read access to it, or "
                    "pass --retrain to train this plan again here (same seeds: the same adapter, at a trial's cost)")
            with run.lock("export (training a front plan's adapter again)"):  # prepare() writes in the run
                _retrain_adapter(directory, job, plan, adapter)
        if quantized:   # the quantized model itself: what the trial ran, loadable with no SVD, no quantization
            qmap = _write_quantized(run, job, plan, pruned, out)
        else:
            logger.warning("quant.embeddings / quant.lm_head are quantized: this export keeps the full-precision "
                           "pruned weights, and qpruner.load rebuilds the quantized model (LoftQ runs again)")
            qmap = None
        _copy_license(job, out)
        metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()
                   if k in ("trial_id", "perplexity", "accuracy", "objective", "weight_bytes", "avg_bits", "peak_bytes",
                            "nll", "nll_se", "perplexity_se", "accuracy_se", "objective_se", "prune_param_ratio")
                   or ":" in k}
        (out / PLAN_FILE).write_text(json.dumps({
            "plan": plan.to_dict(), "quant": to_dict(job.quant), "finetune": to_dict(job.finetune),
            "eval": to_dict(job.eval), "data": to_dict(job.data), "metric": job.search.metric, "trial": metrics,
            "job": job.name, "model": to_dict(job.model), "prune": (read_meta(pruned) or {}).get("report", {}),
            "layout": "quantized" if quantized else "full-precision", "quantization_map": qmap},
            indent=2, default=str))
        (out / "README.md").write_text(_model_card(job, plan, metrics, point, quantized))
        if into_existing:
            for entry in sorted(out.iterdir(), key=lambda p: p.name == PLAN_FILE):   # the record last
                os.replace(entry, target / entry.name)
                moved.append(target / entry.name)
            out.rmdir()
        else:
            os.replace(out, target)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # only our own temporary directory
        for path in moved:                      # and what of it had already moved into the empty --out
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    logger.info("exported %s (trial %s) to %s", f"front point {point}" if point >= 0 else "a trial off the front",
                row["trial_id"], final)
    return final


def _write_quantized(run, job, plan: PrecisionPlan, pruned: Path, out: Path) -> dict:
    """Build the trained model as the trial did (the pruned weights read linear by linear, LoftQ from the run's
    cache when it is there, the trial's adapter) and write its quantized tensors; returns the quantization map."""
    from .build import build_quantized
    from .job import variant_job, weights_key
    from .loftq import LoftQCache
    from .quantize import resolve_compute_dtype
    from .rundir import LOFTQ_DIR
    from .weights import SafetensorsDir, cache_root
    device = resolve_device("auto")
    config_dict = json.loads((pruned / "config.json").read_text())
    cache = None
    if job.finetune.init == "loftq":
        storage = job.search.storage_path
        root = (run.path / LOFTQ_DIR if not storage else
                cache_root() / "loftq" if "://" in storage else Path(storage).expanduser() / LOFTQ_DIR)
        key = weights_key(variant_job(job, plan.pruned), pruned)
        cache = LoftQCache(LoftQCache.folder(root, key, job.quant, job.finetune, device,
                                             resolve_compute_dtype(job.quant, device)))
    seconds: dict = {}
    model, measured = build_quantized(config_dict, SafetensorsDir(pruned), plan, job.quant, job.finetune, device,
                                      cache, adapter_dir=str(out / "adapter"), seconds=seconds)
    if cache is not None:
        logger.info("export: LoftQ of %d linears from the run's cache, %d computed", cache.hits, cache.misses)
    path = serialize.save_quantized(model, job.quant, out)
    qmap = serialize.read_quantization_map(path)
    logger.info("export: %s, %.1f MB (the trial's weights: %.1f MB)", path.name, path.stat().st_size / 1e6,
                measured.total_bytes / 1e6)
    return {**qmap, "modules": f"{len(qmap['modules'])} decoder linears (in {serialize.QUANTIZED_FILE})"}


BUILTIN_BASES = {"builtin:smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "USE_POLICY.md", "NOTICE")


def _base_model(job) -> tuple[str | None, str | None, Path | None]:
    """(Hub id of the base model, its license id, a local folder holding its files) as far as known offline."""
    source = job.model.source
    if source in BUILTIN_BASES:
        return (*BUILTIN_BASES[source], None)
    folder = Path(source).expanduser()
    hub = None
    if not folder.is_dir():
        hub, folder = source, None
        try:   # the Hub cache's snapshot, if the model was downloaded here: no network
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(source, "config.json", revision=job.model.revision)
            folder = Path(found).parent if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - metadata is best effort
            folder = None
    license_id = None
    card = folder / "README.md" if folder is not None else None
    if card is not None and card.is_file():
        text = card.read_text(errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                license_id = meta.get("license")
                hub = hub or meta.get("base_model")
            except yaml.YAMLError:
                pass
    return hub, license_id, folder


def _copy_license(job, out: Path) -> list[str]:
    """The base model's license files (Llama 2's terms travel with derivatives), where they are on this machine."""
    _, _, folder = _base_model(job)
    copied = []
    for name in LICENSE_FILES if folder is not None else ():
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
            copied.append(name)
    return copied


def _card_metadata(job, metrics: dict) -> dict:
    """The model card's Hub YAML header."""
    from .config import is_hub_dataset
    hub, license_id, _ = _base_model(job)
    meta = {"library_name": "qpruner", "pipeline_tag": "text-generation",
            "tags": ["qpruner", "pruned", "quantized", "mixed-precision", "bitsandbytes", "lora", "llm-pruner"]}
    if hub:
        meta["base_model"] = hub
        meta["base_model_relation"] = "quantized"
    meta["license"] = license_id or "other"
    if is_hub_dataset(job.data.source):
        meta["datasets"] = [job.data.source]
    results = [{"task": {"type": "text-generation"},
                "dataset": {"name": job.data.source, "type": job.data.source},
                "metrics": [{"type": "perplexity", "value": metrics.get("perplexity"), "name": "held-out perplexity"}]}]
    meta["model-index"] = [{"name": job.name, "results": results}]
    return meta


def _model_card(job, plan: PrecisionPlan, metrics: dict, point: int, quantized: bool = True) -> str:
    """README.md: the Hub YAML header (base_model, library_name, license, tags, datasets, model-index), then the
    plan, its memory and its measured quality with standard errors, and how to load it."""
    amount = "" if plan.pruned is None else f" at {100 * plan.pruned:g}% of the parameters (joint search)"
    where = f"front point {point}" if point >= 0 else f"trial {metrics.get('trial_id')} (not on the front)"

    def se(value, err, digits=4):
        if value is None:
            return "n/a"
        return f"{value:.{digits}f}" + (f" ± {err:.{digits}f}" if isinstance(err, (int, float)) and err == err else "")
    files = ((f"`{serialize.QUANTIZED_FILE}` (the quantized weights exactly as the trial ran them: packed 4-bit data "
              "and quantization states, int8 data and scales, bf16 weights; LoftQ's adjustment included) + "
              "`config.json` (the pruned per-layer widths)") if quantized else
             ("`model.safetensors` + `config.json` (the full-precision pruned model; quantized again at load)"))
    lines = ["---", yaml.safe_dump(_card_metadata(job, metrics), sort_keys=False).rstrip(), "---", "",
             f"# {job.name}: QPruner export, {where}", "",
             f"Pruned from `{job.model.source}`{amount} ({job.prune.scope} scope, {job.prune.importance} importance), "
             f"quantized per {plan.unit} with bitsandbytes, LoRA adapter (r={job.finetune.lora_r}) fine-tuned for "
             f"{job.finetune.steps} steps on `{job.data.source}`.", "",
             f"* plan: `{plan.code()}` (4 = nf4, f = fp4, 8 = int8, H = bf16), {metrics.get('avg_bits', 0):.2f} "
             f"average bits, {metrics.get('weight_bytes', 0) / 1e6:.1f} MB of weights",
             f"* held-out perplexity {se(metrics.get('perplexity'), metrics.get('perplexity_se'), 3)}, "
             f"next-token accuracy {se(metrics.get('accuracy'), metrics.get('accuracy_se'))} "
             "(± one standard error over evaluation windows)",
             "", "```python", "import qpruner", "model, tokenizer = qpruner.load('<this directory>')", "```", "",
             f"Files: {files}, tokenizer, `adapter/` (the trained LoRA adapter, safetensors), `qpruner_plan.json` "
             "(plan, quantization, LoRA and evaluation settings, the trial's metrics). No pickled files. Loading "
             "needs qpruner (the per-layer widths are a custom model type, and a per-module mix of bitsandbytes "
             "formats has no `BitsAndBytesConfig`): no serving stack loads this directory as it is; "
             "`qpruner export --format gguf` writes a GGUF file of it that llama.cpp loads."]
    return "\n".join(lines) + "\n"


def read_plan(directory: str | Path) -> dict:
    """The ``qpruner_plan.json`` record of an export directory."""
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise ConfigError([f"{directory} is not a QPruner export (no {PLAN_FILE})"])
    return json.loads(path.read_text())


def load(directory: str | Path, device: str | torch.device | None = None):
    """(quantized model with its trained adapter, tokenizer) from an export directory."""
    from .pruned_model import load_pruned
    from .trial import quantized_with_lora
    directory = Path(directory)
    meta = read_plan(directory)
    device = resolve_device(device)
    where = str(directory / PLAN_FILE)
    ft = build_section(FinetuneConfig, meta.get("finetune"), f"{where} finetune")
    quant = build_section(QuantConfig, meta.get("quant"), f"{where} quant")
    plan = PrecisionPlan.from_dict(meta["plan"])
    if (directory / serialize.QUANTIZED_FILE).is_file():   # the quantized model itself: no LoftQ, no quantization
        from transformers import AutoTokenizer

        from .finetune import load_adapter
        model = serialize.load_quantized(directory, plan, quant, device)
        if "adapter" in meta and meta["adapter"] is None:   # a merged export (--merge plan): the LoRA is inside
            return model.eval(), AutoTokenizer.from_pretrained(str(directory))
        model = load_adapter(model, directory / "adapter")
        return model.eval(), AutoTokenizer.from_pretrained(str(directory))
    model, tokenizer = load_pruned(directory, dtype=torch.float32)   # an export of the full-precision layout
    model, _ = quantized_with_lora(model, plan, quant, ft, device, adapter_dir=str(directory / "adapter"))
    return model.eval(), tokenizer


def evaluation_config(directory: str | Path) -> tuple:
    """(DataConfig, EvalConfig) the trial was evaluated with, to reproduce its metrics."""
    from .config import DataConfig
    meta = read_plan(directory)
    where = str(Path(directory) / PLAN_FILE)
    return (build_section(DataConfig, meta.get("data"), f"{where} data"),
            build_section(EvalConfig, meta.get("eval"), f"{where} eval"))


def _harness_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Task names for the harness, and folders of local task YAML files to include: an entry that is a
    ``.yaml`` file is a custom task (e.g. a local JSON dataset: runs offline), named by its ``task`` key."""
    names, include = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ConfigError([f"--lm-eval: task file {task} not found"])
            doc = yaml.safe_load(path.read_text()) or {}
            if "task" not in doc:
                raise ConfigError([f"--lm-eval: {task} has no 'task' key (an lm-evaluation-harness task YAML)"])
            names.append(str(doc["task"]))
            if str(path.parent.resolve()) not in include:
                include.append(str(path.parent.resolve()))
        else:
            names.append(task)
    return names, include


def lm_eval(directory: str | Path, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """Run lm-evaluation-harness on an export (needs the optional ``lm-eval`` package).

    ``tasks`` are harness task names (their datasets come from the Hugging Face hub: online) or paths to
    task YAML files (custom tasks, e.g. over a local JSON file: offline). The harness gets the quantized
    model with its adapter, as :func:`load` returns it. A tokenizer with neither BOS nor EOS (the ``tiny``
    test model's byte tokenizer) gets token 0 as the harness's prefix token."""
    try:
        import lm_eval as harness
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise BackendError("--lm-eval needs lm-evaluation-harness: pip install 'qpruner[lm-eval]' "
                           "(and network access for the datasets of its built-in tasks)") from None
    names, include = _harness_tasks(list(tasks))
    model, tokenizer = load(directory)
    extra = {}
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        extra["prefix_token_id"] = 0
    kwargs = {}
    if include:
        from lm_eval.tasks import TaskManager
        kwargs["task_manager"] = TaskManager(include_path=include)
    results = harness.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **extra),
                                      tasks=names, limit=limit, **kwargs)
    summary = results.get("results", {})
    (Path(directory) / "lm_eval.json").write_text(json.dumps(summary, indent=2, default=str))
    _card_with_lm_eval(Path(directory), summary)
    return summary


MERGED_PLAN_DIR = "merged-quantized"


def merge_export(directory: str | Path, to: str = "bf16") -> tuple[Path, float, float]:
    """The LoRA-merged pruned model of an export, with its held-out NLL beside the trial's (same tokens), recorded
    in ``qpruner_plan.json["merged"]`` (bf16) or ``["merged_quantized"]`` (plan). Returns (directory, merged NLL,
    the trial's NLL). ``to``:

    * ``"bf16"`` -> ``<export>/merged/``: a plain pruned transformers model in bf16 (loadable with transformers
      after ``import qpruner``);
    * ``"plan"`` -> ``<export>/merged-quantized/``: the merged weights quantized again to the plan (each linear
      in its plan format, bitsandbytes, no adapter), in the export's quantized layout: ``qpruner.load`` reads it.
      The merge loses what the trained LoRA added below the quantizer's resolution; the NLL says how much."""
    directory = Path(directory)
    if to not in ("bf16", "plan"):
        raise ConfigError([f"--merge {to!r}: bf16 or plan"])
    out = directory / (serialize.MERGED_DIR if to == "bf16" else MERGED_PLAN_DIR)
    if out.exists():
        raise ResultsError(f"{out} exists; nothing was changed (remove it to merge again)")
    record = read_plan(directory)
    if to == "plan" and record.get("layout") == "full-precision":
        raise ConfigError([f"--merge plan: {directory} is a full-precision-layout export (quantized embeddings or "
                           "head); only --merge bf16 writes it"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=directory))
    try:
        nll = (_merge_bf16 if to == "bf16" else _merge_plan)(directory, tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = read_plan(directory)
    trial_nll = record.get("trial", {}).get("nll")
    key = "merged" if to == "bf16" else "merged_quantized"
    record[key] = {"directory": out.name, "dtype": "bfloat16" if to == "bf16" else "the plan's formats",
                   "nll": nll, "trial_nll": trial_nll}
    (directory / PLAN_FILE).write_text(json.dumps(record, indent=2, default=str))
    logger.info("merged model (%s) in %s: NLL %.6f (the trial's %.6f)", to, out, nll,
                trial_nll if trial_nll is not None else float("nan"))
    return out, nll, trial_nll


def eval_nll(directory: str | Path, model, tokenizer, device: str | torch.device = "cpu") -> float:
    """Held-out NLL of ``model`` on the evaluation tokens the export's trial was scored on."""
    from .data import load_splits
    from .evaluate import evaluate
    data_cfg, eval_cfg = evaluation_config(directory)
    splits = load_splits(data_cfg, tokenizer)
    return evaluate(model, splits.eval, eval_cfg.batch_size, device, eval_cfg.context, eval_cfg.stride).nll


def _merge_bf16(directory: Path, tmp: Path) -> float:
    import gc

    from .pruned_model import load_pruned, save_pruned
    model, tokenizer = load(directory, "cpu")
    plain = serialize.merged(model)
    del model
    save_pruned(plain, tokenizer, tmp)
    del plain            # one model in memory at a time: the saved one is read back to be measured
    gc.collect()
    _copy_license_files(directory, tmp)
    reloaded, _ = load_pruned(tmp, dtype=torch.bfloat16)
    return eval_nll(directory, reloaded, tokenizer)


def _merge_plan(directory: Path, tmp: Path) -> float:
    """Merged, quantized to the plan linear by linear (one float32 weight at a time: no full-precision copy of the
    model), written as an adapter-free quantized export in ``tmp``."""
    import gc

    from torch import nn

    from . import models
    from .quantize import check_applied, convert_linear, resolve_compute_dtype
    record = read_plan(directory)
    quant = build_section(QuantConfig, record.get("quant"), f"{directory / PLAN_FILE} quant")
    plan = PrecisionPlan.from_dict(record["plan"])
    model, tokenizer = load(directory, "cpu")
    base = serialize._unwrap(model)
    compute = resolve_compute_dtype(quant, torch.device("cpu"))
    for layer, formats in zip(models.decoder_layers(base), plan.per_linear()):
        for name, module in models.layer_linears(layer).items():
            stored = getattr(module, "base_layer", module)
            lin = nn.Linear(stored.in_features, stored.out_features, bias=stored.bias is not None, device="meta")
            lin.weight = nn.Parameter(serialize.merged_weight(module), requires_grad=False)
            if stored.bias is not None:
                lin.bias = nn.Parameter(stored.bias.detach().float().cpu(), requires_grad=False)
            models.set_layer_linear(layer, name, convert_linear(lin, formats[name], quant, "cpu", compute))
    check_applied(base, plan)
    serialize.save_quantized(base, quant, tmp)
    del model, base
    gc.collect()
    for entry in directory.iterdir():   # config, tokenizer, license files (not the weights, adapter or derived dirs)
        if entry.is_file() and entry.name not in (serialize.QUANTIZED_FILE, PLAN_FILE, "README.md") \
                and not entry.name.startswith("."):
            shutil.copyfile(entry, tmp / entry.name)
    own = {k: v for k, v in record.items() if k not in ("merged", "merged_quantized", "gguf")}
    (tmp / PLAN_FILE).write_text(json.dumps({**own, "merged_from": "..", "adapter": None}, indent=2, default=str))
    reloaded, _ = load(tmp, "cpu")
    return eval_nll(directory, reloaded, tokenizer)


def push_to_hub(directory: str | Path, repo: str, private: bool = False) -> str:
    """Upload an export directory to the Hugging Face Hub as model repository ``repo`` (created if missing;
    ``private`` for a new one). Needs the network and a token with write access (``HF_TOKEN`` or
    ``huggingface-cli login``). Returns the commit's URL."""
    from huggingface_hub import HfApi, constants
    directory = Path(directory)
    read_plan(directory)   # only an export goes up
    if constants.HF_HUB_OFFLINE:
        raise BackendError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it (the export "
                           f"stays in {directory})")
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(directory), repo_id=repo, repo_type="model",
                                 commit_message=f"QPruner export ({directory.name})",
                                 ignore_patterns=[".*", "*.partial-*", "**/.*"])
    except Exception as exc:  # noqa: BLE001 - HTTP, auth and naming errors of the Hub: one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"could not push {directory} to the Hub repository {repo!r}: {first[:400]} (a token "
                           "with write access: HF_TOKEN or `huggingface-cli login`)") from None
    return str(getattr(info, "commit_url", info))


def _copy_license_files(source: Path, into: Path) -> None:
    for name in LICENSE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, into / name)


def _card_with_lm_eval(directory: Path, summary: dict) -> None:
    """Rewrite the export's model card with the harness results in its ``model-index``."""
    try:
        record = read_plan(directory)
        card = directory / "README.md"
        text = card.read_text()
        if not text.startswith("---"):
            return
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
        results = meta.setdefault("model-index", [{"name": record.get("job"), "results": []}])[0]["results"]
        for task, values in summary.items():
            results.append({"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task},
                            "metrics": [{"type": k.split(",")[0], "value": v} for k, v in values.items()
                                        if isinstance(v, (int, float)) and not k.startswith("alias")]})
        card.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---" + text.split("---", 2)[2])
    except (OSError, yaml.YAMLError, KeyError, IndexError) as exc:
        logger.warning("could not add the lm-eval results to the model card (%s)", exc)
