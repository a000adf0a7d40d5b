"""Typed job configuration.

A job file is YAML whose keys map 1:1 onto the frozen dataclasses below (one per pipeline stage).
:func:`load_job` reads it, applies ``key=value`` overrides, and validates *everything* before any
work starts: unknown keys (with a did-you-mean), wrong types, out-of-range values, unknown choices
and missing files are all collected and raised together as one :class:`~qpruner.errors.ConfigError`.
No ``assert`` is used for user input.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from .errors import ConfigError
from .validation import _apply_override, _build, _did_you_mean, build_section, check_size, opt, safe_yaml, show  # noqa: F401  (build_section: re-exported)

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUILTIN_MODELS = ("tiny", "builtin:smollm2-135m")
BUILTIN_DATA = ("builtin:pydoc",)
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")  # config.json model_type (models.py adapts these)
PRUNED_PREFIX = "qpruner_"  # model_type of a saved pruned model: qpruner_<base>
MAX_SEED = 2**63 - 1     # torch.Generator.manual_seed takes at most 64 bits
MAX_NAME = 100          # characters of a job name
ONLINE_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


@dataclass(frozen=True)
class ModelConfig:
    """``model:`` which causal LM to load, and in which dtype the driver prunes and scores it."""
    source: str = opt("builtin:smollm2-135m", help="tiny | builtin:smollm2-135m | local HF dir | hub id")
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16"),
                     help="dtype the driver prunes and scores in")
    revision: Optional[str] = opt(None, help="hub revision (online only)")
    trust_remote_code: bool = opt(False, help="only if you trust the hub repository")


@dataclass(frozen=True)
class DataConfig:
    """``data:`` the text source and the sizes of its calibration, fine-tune and evaluation splits."""
    source: str = opt("builtin:pydoc", help="builtin:pydoc | file.txt | file.jsonl | file.parquet | a Hugging Face "
                                            "dataset id (online; e.g. Salesforce/wikitext with dataset_config "
                                            "wikitext-2-raw-v1)")
    dataset_config: Optional[str] = opt(None, help="a Hub dataset's configuration (subset), e.g. wikitext-2-raw-v1, "
                                                   "en (allenai/c4)")
    split: str = opt("train", help="the Hub dataset's split the text comes from (QPruner makes its own disjoint "
                                   "calibration / fine-tune / evaluation splits of it)")
    revision: Optional[str] = opt(None, help="the Hub dataset's revision (a commit pins the text)")
    max_documents: Optional[int] = opt(None, min=1, help="read only the first N documents of the source (e.g. of C4)")
    text_field: str = opt("text", help="field holding the text in .jsonl / .parquet rows and Hub datasets")
    seq_len: int = opt(128, min=8, max=32768, help="tokens per sample (all splits)")
    calib_samples: int = opt(8, min=1, max=10_000_000, help="samples for pruning and layer scoring (LLM-Pruner: 10)")
    calib_seq_len: Optional[int] = opt(None, min=2, help="tokens per calibration sample (<= seq_len; "
                                                         "default seq_len; LLM-Pruner: 64)")
    eval_samples: int = opt(64, min=1, max=10_000_000, help="held-out samples for evaluation (64 x 128 tokens: adjacent front "
                                             "plans separable on SmolLM2, results/bench/landscape.md)")
    seed: int = opt(0, min=0, max=MAX_SEED, help="seed of the deterministic split")


@dataclass(frozen=True)
class PruneConfig:
    """``prune:`` structured pruning (LLM-Pruner style): what is removed, how much, and scored how."""
    ratio: float = opt(0.2, min=0.0, max=0.95,
                       help="fraction of groups removed: KV groups and MLP channels per pruned layer (block), "
                            "hidden channels (channel) or layers in range (layer)")
    param_ratio: Optional[float] = opt(None, min=0.0, max=0.95,
                                       help="instead of ratio: fraction of all parameters to remove")
    param_ratios: Optional[tuple[float, ...]] = opt(None, min=0.0, max=0.95,
                                                    help="joint search: fractions of all parameters to remove that "
                                                         "the search chooses from, e.g. [0.0, 0.1, 0.2, 0.3] (each "
                                                         "pruned once); param_ratio, if set, is the job's fixed "
                                                         "amount the report compares with")
    importance: str = opt("taylor", choices=("l1", "l2", "random", "taylor_vector", "taylor", "param_second",
                                             "param_mix"),
                          help="taylor = LLM-Pruner's element-wise first order (param_first)")
    aggregation: str = opt("sum", choices=("sum", "mean", "max"), help="how a group's parameters combine")
    scope: str = opt("block", choices=("block", "channel", "layer"),
                     help="block: heads + MLP channels; channel: hidden size; layer: whole decoder layers")
    ranking: str = opt("local", choices=("local", "global"), help="same ratio per layer, or ranked across layers")
    attention: bool = opt(True, help="block scope: prune attention heads (whole GQA groups)")
    mlp: bool = opt(True, help="block scope: prune MLP channels")
    layer_start: int = opt(1, help="first pruned layer; negative counts from the end")
    layer_end: int = opt(-1, help="end (exclusive) of pruned layers; negative counts from the end")
    round_to: int = opt(32, min=1, max=4096, help="kept MLP / hidden widths are multiples of this")
    batch_size: int = opt(4, min=1, help="calibration batch size for first-order gradients")


@dataclass(frozen=True)
class ScoreConfig:
    """``score:`` how the importance of each precision unit is estimated."""
    method: str = opt("mutual_information",
                      choices=("fisher", "taylor", "block_influence", "mutual_information", "sensitivity"),
                      help="unit importance estimator (formulas in qpruner/unit_importance.py); "
                           "mutual_information ranks closest to the measured truth of the estimators without a "
                           "quantized forward pass per unit (sensitivity), at about twice fisher's cost")
    samples: Optional[int] = opt(None, min=1, help="calibration samples used (default: all)")


@dataclass(frozen=True)
class QuantConfig:
    """``quant:`` bitsandbytes settings shared by every plan (4-bit format, blocks, embeddings, head)."""
    four_bit: str = opt("nf4", choices=("nf4", "fp4"), help="format used for 4-bit units")
    double_quant: bool = opt(True, help="quantize the 4-bit absmax statistics too")
    blocksize: int = opt(64, choices=(64, 128, 256), help="4-bit quantization block size")
    int8_threshold: float = opt(6.0, min=0.0, help="LLM.int8() outlier threshold (0: no fp16 outlier path)")
    rest_dtype: str = opt("bfloat16", choices=("bfloat16", "float16", "float32"),
                          help="storage of norms, and of embeddings / lm_head when they are 'rest'")
    embeddings: str = opt("rest", choices=("rest", "int8", "nf4", "fp4"),
                          help="input embeddings: rest_dtype, or bitsandbytes Embedding8bit / Embedding4bit")
    lm_head: str = opt("rest", choices=("rest", "int8", "nf4", "fp4"),
                       help="output head: rest_dtype, or bitsandbytes Linear8bitLt / Linear4bit")
    compute_dtype: str = opt("auto", choices=("auto", "float32", "bfloat16", "float16"),
                             help="auto: bfloat16 on CUDA, float32 on CPU")


@dataclass(frozen=True)
class PolicyConfig:
    """``policy:`` the precision options, the unit that gets one, the budget and the seed plans."""
    bits: tuple[int, ...] = opt((4, 8, 16), choices=(4, 8, 16), help="precisions a unit may get")
    unit: str = opt("layer", choices=("layer", "group", "linear"),
                    help="what gets one precision: a decoder layer, its attention/MLP group, or each projection")
    temperature: float = opt(0.5, min=1e-3, max=1e3, help="softness of the probabilistic decision")
    seed_plans: int = opt(0, min=0, max=1000, help="plans sampled from layer scores to seed the search (0: the "
                          "search starts from the uniform plans, the scores act as its prior; "
                          "results/bench/search_large.md)")
    include_uniform: bool = opt(True, help="also seed the uniform lowest/highest plans (when in budget)")
    budget_avg_bits: Optional[float] = opt(None, min=1.0, max=32.0,
                                           help="budget: average bits per decoder-linear weight")
    budget_gb: Optional[float] = opt(None, min=1e-6, help="budget: total weight memory in GB (1e9 B)")

    def _check(self) -> list[str]:
        problems = []
        if len(set(self.bits)) != len(self.bits) or not self.bits:
            problems.append(f"policy.bits: expected distinct values from (4, 8, 16), got {list(self.bits)}")
        if self.budget_avg_bits is not None and self.budget_gb is not None:
            problems.append("policy: give budget_avg_bits or budget_gb, not both")
        return problems


@dataclass(frozen=True)
class FinetuneConfig:
    """``finetune:`` each trial's LoRA recovery fine-tune (and its LoftQ initialisation)."""
    steps: int = opt(10, min=0, help="optimizer steps per trial (0 = evaluate without fine-tuning)")
    batch_size: int = opt(4, min=1, help="sequences per optimizer step")
    micro_batch_size: Optional[int] = opt(None, min=1, help="sequences per forward pass; batch_size must be a "
                                                            "multiple (gradient accumulation); default batch_size")
    lr: float = opt(2e-4, min=0.0, max=1e6)
    lr_schedule: str = opt("constant", choices=("constant", "linear", "cosine"), help="after the warm-up")
    warmup_steps: int = opt(0, min=0, help="linear warm-up from 0")
    min_lr_ratio: float = opt(0.0, min=0.0, max=1.0, help="final lr / lr for linear and cosine schedules")
    weight_decay: float = opt(0.0, min=0.0, max=1.0)
    max_grad_norm: float = opt(1.0, min=0.0, help="0 disables clipping")
    max_seconds: Optional[float] = opt(None, min=0.0, help="time budget: stop fine-tuning after this many seconds")
    gradient_checkpointing: bool = opt(False, help="recompute activations in the backward pass (less memory)")
    autocast: str = opt("auto", choices=("auto", "off"), help="auto: bf16 autocast on CUDA")
    eval_every: int = opt(0, min=0, help="evaluate (and report to the search) every N steps; 0: only at the end")
    report_every: int = opt(10, min=0, help="report progress (step, loss, tokens/s, ETA) to Ray Tune every N steps; "
                                           "0: never. A progress report, not a scheduler signal: it carries no metric")
    init: str = opt("loftq", choices=("loftq", "plain"), help="LoRA initialisation: LoftQ, or QLoRA-style (B = 0)")
    loftq_iters: int = opt(4, min=1, max=20, help="LoftQ alternations of quantization and low-rank SVD (4: better "
                                                   "than 1 after 10, 40 and 120 steps, results/bench/loftq.md)")
    loftq_balance: bool = opt(True, help="rescale LoftQ's factors so lora_A has the plain initialisation's norm")
    loftq_formats: tuple[str, ...] = opt(("nf4", "fp4"), choices=("nf4", "fp4", "int8", "bf16"),
                                         help="layers stored in these formats get LoftQ; the others plain init")
    lora_r: int = opt(8, min=1, max=4096)
    lora_alpha: float = opt(16.0, min=0.0)
    lora_dropout: float = opt(0.0, min=0.0, max=0.99)
    target_modules: tuple[str, ...] = opt(LINEAR_NAMES, choices=LINEAR_NAMES)
    seed: int = opt(0, min=0, max=MAX_SEED)

    def _check(self) -> list[str]:
        problems = []
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            problems.append(f"finetune.batch_size ({self.batch_size}) must be a multiple of finetune.micro_batch_size "
                            f"({micro})")
        if not self.target_modules and _CHECK_FILES.get():   # a new job (see _check_layer_range)
            problems.append(f"finetune.target_modules: empty, so LoRA would train nothing; name one or more of "
                            f"{list(LINEAR_NAMES)}")
        return problems


@dataclass(frozen=True)
class EvalConfig:
    """``eval:`` how a trial's quantized model is evaluated (perplexity windows, multiple-choice tasks)."""
    batch_size: int = opt(8, min=1)
    before_finetune: bool = opt(False, help="also evaluate right after quantization (with the initial adapters)")
    context: Optional[int] = opt(None, min=2, help="perplexity window in tokens (default data.seq_len)")
    stride: Optional[int] = opt(None, min=1, help="perplexity stride (default: the window; smaller = more context)")
    tasks: tuple[str, ...] = opt((), help="multiple-choice tasks: .jsonl files, or boolq, piqa, hellaswag, winogrande, "
                                          "arc_easy, arc_challenge, openbookqa (online)")
    task_limit: int = opt(500, min=1, help="items per task")


@dataclass(frozen=True)
class SearchConfig:
    """``search:`` the Ray Tune search: trials, searcher, resources, cluster and outputs."""
    num_trials: int = opt(8, min=1, max=100000)
    max_concurrent: int = opt(2, min=1)
    cpus_per_trial: float = opt(1.0, min=0.0)
    gpus_per_trial: float = opt(0.0, min=0.0, help="fractions share a GPU, e.g. 0.5")
    searcher: str = opt("additive", choices=("additive", "hyperopt", "optuna_mo", "optuna_gp", "random", "points"),
                        help="additive: memory-aware Bayesian (additive surrogate, Thompson sampling, knapsack); "
                             "hyperopt: TPE, scored against the nf4-int8 line; optuna_mo / optuna_gp: objective "
                             "and memory; random: baseline; points: only the seed plans")
    random_warmup: int = opt(2, min=0, help="random points after the seed plans before the model-based search")
    screen_share: float = opt(0.0, min=0.0, max=0.9,
                              help="multi-fidelity (additive searcher): share of the trial-seconds spent on screens "
                                   "(zero-step evaluations on screen_windows windows, never on the front) that steer "
                                   "the full trials; 0: off. Pays when a screen costs a few %% of a full trial (long "
                                   "recovery fine-tunes), not at the demo's 10 CPU steps (results/bench/search_large.md)")
    screen_windows: int = opt(32, min=1, help="evaluation windows (rows of the eval split) a screen evaluates")
    scheduler: str = opt("none", choices=("none", "asha", "median"),
                         help="early stopping on intermediate reports (needs finetune.eval_every > 0)")
    grace_period: int = opt(1, min=1, help="reports before a trial may be stopped early")
    reduction_factor: float = opt(2.0, min=1.01, help="ASHA's reduction factor")
    max_failures: int = opt(2, min=0, help="retries of a trial whose worker or node was lost")
    max_rejections: int = opt(1000, min=1, help="proposals in a row over budget or already evaluated "
                                                "before the search ends")
    disk_full_wait_s: float = opt(600.0, min=0.0, help="while trials.parquet cannot be written (a full disk), the "
                                                       "search starts no trial and waits this long for space, keeping "
                                                       "finished results in memory; then it stops (exit 1)")
    memory_per_trial_gb: Optional[float] = opt(None, min=0.0, help="memory one trial may use (GB): a plan whose "
                                               "predicted fine-tuning peak exceeds it is never trained (a screened "
                                               "row with the reason). Default: the GPU's memory x gpus_per_trial on "
                                               "CUDA, 0.7 x the host's RAM x this trial's share of its CPUs on CPU")
    loftq_cache: bool = opt(True, help="keep each unit's LoftQ result per format next to the pruned weights and "
                                       "reuse it in later trials (bit-identical; off: every trial computes LoftQ)")
    save_adapters: bool = opt(True, help="keep every trained trial's LoRA adapter (a Tune checkpoint) for export")
    loggers: tuple[str, ...] = opt((), choices=("tensorboard", "csv", "mlflow", "wandb"),
                                   help="Ray Tune experiment tracking; mlflow logs to results/<job>/mlruns unless "
                                        "MLFLOW_TRACKING_URI is set; wandb needs a login or WANDB_MODE=offline")
    storage_path: Optional[str] = opt(None, help="Ray Tune's experiment storage: shared filesystem or URI "
                                                 "(s3://...) for multi-node runs, one folder per job name under it; "
                                                 "default results/<job>/ray")
    storage_shared: bool = opt(False, help="the local storage (storage_path, or results_dir) is shared by every node "
                                           "though its filesystem is not a known network one (e.g. several Ray nodes "
                                           "on one machine); a multi-node search refuses node-local storage otherwise")
    metric: str = opt("perplexity", help="quality axis of the front and default objective: perplexity (held-out, min; "
                                         "the least noisy signal), accuracy (next token, max), or <task>:acc / "
                                         "<task>:acc_norm for a task in eval.tasks")
    objective: Optional[dict[str, float]] = opt(None, help="weighted mix maximised by the search, e.g. "
                                                           "{accuracy: 1.0, piqa:acc: 0.5}; perplexity enters as -log")
    seed: int = opt(0, min=0, max=MAX_SEED)
    ray_address: Optional[str] = opt(None, help="None: start a local Ray (inside `ray job submit`: join that "
                                         "cluster); 'auto': join a running cluster; or an address")
    num_cpus: Optional[int] = opt(None, min=1, help="CPUs of a local Ray (default: all)")
    dashboard: bool = opt(False, help="start the Ray dashboard of a local Ray (on 127.0.0.1)")
    keep_dashboard: bool = opt(False, help="with dashboard: keep the local Ray and its dashboard up after the "
                                           "search until Ctrl-C (to look at the finished trials)")
    metrics_linger_s: Optional[float] = opt(None, min=0.0, max=3600.0,
                                            help="keep the driver up this long after the last trial so that "
                                                 "Prometheus scrapes the final metrics (default: 30 on a "
                                                 "cluster, 0 locally)")
    verbose: int = opt(1, choices=(0, 1, 2), help="Ray Tune console output")


@dataclass(frozen=True)
class JobConfig:
    """A whole job: one section per pipeline stage, validated as a whole by :func:`build_job`."""
    name: str = opt("job", help="results go to <results_dir>/<name>/")
    results_dir: str = opt("results")
    device: str = opt("auto", choices=("auto", "cpu", "cuda"), help="device of the driver stages")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def _check(self) -> list[str]:
        problems = []
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.name):
            problems.append(f"name: expected one directory name (letters, digits, '_', '-', '.'; not starting "
                            f"with '.'), got {show(self.name)}")
        elif len(self.name) > MAX_NAME:
            problems.append(f"name: {len(self.name)} characters; at most {MAX_NAME} (it names directories, with "
                            "suffixes such as .replaced-<time>, under a 255-byte file-name limit)")
        problems += _check_budget(self)
        if self.data.calib_seq_len is not None and self.data.calib_seq_len > self.data.seq_len:
            problems.append(f"data.calib_seq_len: {self.data.calib_seq_len} is longer than data.seq_len "
                            f"({self.data.seq_len}); calibration samples are cut from seq_len blocks")
        if _CHECK_FILES.get():
            problems += _check_model_source(self.model.source)
            problems += _check_data_source(self.data.source)
            if not problems and Path(self.data.source).expanduser().is_file():
                from .sources import check_text
                problems += check_text(self.data)   # readable, UTF-8, right rows and columns, enough of it

        if self.score.method == "block_influence" and self.policy.unit == "linear":
            problems.append("score.method: block_influence scores layers or module groups; with "
                            "policy.unit=linear use fisher, taylor, mutual_information or sensitivity")
        problems += _check_metrics(self)
        problems += _check_joint(self)
        problems += _check_layer_range(self)
        if self.search.scheduler != "none" and self.finetune.eval_every == 0:
            problems.append(f"search.scheduler: {self.search.scheduler} stops trials on intermediate evaluations; "
                            "set finetune.eval_every > 0 (e.g. steps / 4)")
        if self.search.gpus_per_trial > 1:
            problems.append(f"search.gpus_per_trial: {self.search.gpus_per_trial:g} would reserve that many GPUs "
                            "while a trial places its model on one (multi-GPU trials are not implemented yet); use "
                            "1, or a fraction such as 0.5 to share a GPU")
        if self.search.screen_share > 0:
            problems += _check_screens(self)
        if self.search.keep_dashboard and not (self.search.dashboard and self.search.ray_address is None):
            problems.append("search.keep_dashboard: keeps a local search's dashboard up; set search.dashboard: true "
                            "(on a cluster, the head's dashboard stays up by itself)")
        return problems

    @property
    def results_path(self) -> Path:
        """``<results_dir>/<name>``, with ``~`` expanded (as for ``model.source`` and ``data.source``)."""
        return Path(self.results_dir).expanduser() / self.name


def metric_names(job: "JobConfig") -> list[str]:
    """Every metric name the job's trials report (perplexity, accuracy, and each task's)."""
    from pathlib import PurePath
    names = ["accuracy", "perplexity"]
    for task in job.eval.tasks:
        stem = PurePath(task).stem if task.endswith(".jsonl") else task
        names += [f"{stem}:acc", f"{stem}:acc_norm"]
    return names


def _check_screens(job: "JobConfig") -> list[str]:
    """Screens (``search.screen_share``) are steered by the additive searcher and measure evaluation metrics only."""
    problems = []
    if job.search.searcher != "additive":
        problems.append(f"search.screen_share: screening is a mode of the additive searcher; set search.searcher: "
                        f"additive or search.screen_share: 0 (got searcher {job.search.searcher!r})")
    if job.search.scheduler != "none":
        problems.append(f"search.screen_share: screens report once, at zero steps, and would move the "
                        f"{job.search.scheduler} scheduler's cut-offs for full trials; use one of the two "
                        "(search.scheduler: none, or search.screen_share: 0)")
    terms = list(job.search.objective or {job.search.metric: 1.0})
    tasks = [t for t in terms if t not in ("accuracy", "perplexity")]
    if tasks:
        problems.append(f"search.screen_share: a screen evaluates perplexity and next-token accuracy only, but the "
                        f"objective uses {tasks}; use search.metric perplexity or accuracy, or search.screen_share: 0")
    return problems


def _check_metrics(job: "JobConfig") -> list[str]:
    problems = []
    for i, task in enumerate(job.eval.tasks):
        if task.endswith(".jsonl"):
            if _CHECK_FILES.get() and not Path(task).expanduser().is_file():
                problems.append(f"eval.tasks[{i}]: file {task!r} does not exist")
        elif task not in ONLINE_TASKS:
            problems.append(f"eval.tasks[{i}]: unknown task {task!r}; expected a .jsonl file or one of "
                            f"{list(ONLINE_TASKS)}" + _did_you_mean(task, ONLINE_TASKS))
    known = metric_names(job)
    wanted = [("search.metric", job.search.metric)] + [(f"search.objective.{k}", k) for k in (job.search.objective or {})]
    if job.search.objective and not any(w for w in job.search.objective.values()) and _CHECK_FILES.get():
        problems.append(f"search.objective: every weight is 0 ({job.search.objective}), so every plan would score "
                        "the same; give one metric a non-zero weight, or leave the objective out (search.metric)")
    return problems + [f"{where}: unknown metric {name!r}; known: {', '.join(known)}" + _did_you_mean(name, known)
                       for where, name in wanted if name not in known]


KNOWN_LAYER_COUNTS = {"tiny": 4, "builtin:smollm2-135m": 30}   # decoder layers of the built-in models


def _check_layer_range(job: "JobConfig") -> list[str]:
    """``prune.layer_start`` / ``layer_end`` give a range ``start <= end``: always checked when both count from
    the same end, exactly when the model's layer count is known before loading (built-ins, a local
    config.json). Like the other checks added after runs were recorded (empty finetune.target_modules, an
    all-zero objective), only for a new job: a stored job.yaml of an earlier run (check_files=False) is
    still read, so that its status, report and export keep working."""
    if not _CHECK_FILES.get():
        return []
    start, end = job.prune.layer_start, job.prune.layer_end
    where = f"prune.layer_start={start}, prune.layer_end={end}"
    if (start < 0) == (end < 0) and start > end:
        return [f"{where}: the pruned layers [start, end) run backwards; start must not be after end"]
    n = KNOWN_LAYER_COUNTS.get(job.model.source)
    config = Path(job.model.source).expanduser() / "config.json"
    if n is None and _CHECK_FILES.get() and config.is_file():
        try:
            n = int(json.loads(config.read_text(encoding="utf-8"))["num_hidden_layers"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            n = None   # _check_model_dir reports an unreadable config
    if n is None:
        return []
    lo, hi = (start + n if start < 0 else start), (end + n if end < 0 else end)
    if not 0 <= lo <= hi <= n:
        return [f"{where}: give layers [{lo}, {hi}) but {job.model.source} has {n} decoder layers; "
                f"expected 0 <= start <= end <= {n} (negative values count from the end)"]
    return []


def _check_joint(job: "JobConfig") -> list[str]:
    """``prune.param_ratios`` (the joint search over pruning amounts and precision)."""
    amounts = job.prune.param_ratios
    if amounts is None:
        return []
    problems = []
    if len(amounts) < 2 or len({round(a, 6) for a in amounts}) != len(amounts):
        problems.append(f"prune.param_ratios: expected two or more distinct amounts (one amount is prune.param_ratio), "
                        f"got {list(amounts)}")
    if job.prune.scope == "layer":
        problems.append("prune.param_ratios: a joint search needs every amount to keep the same decoder layers "
                        "(one precision per unit); use prune.scope block or channel")
    if job.prune.param_ratio is not None and all(abs(a - job.prune.param_ratio) > 1e-6 for a in amounts):
        problems.append(f"prune.param_ratio: {job.prune.param_ratio:g} is the joint search's fixed amount (the "
                        f"report's comparison) and must be one of prune.param_ratios {list(amounts)}")
    return problems


def _check_model_source(source: str) -> list[str]:
    if source in BUILTIN_MODELS:
        return []
    if source.startswith("builtin:"):
        return [f"model.source: unknown built-in model {source!r}; expected one of {list(BUILTIN_MODELS)}"
                + _did_you_mean(source, BUILTIN_MODELS)]
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            return [f"model.source: {source!r} is a file; expected a directory saved by save_pretrained"]
        return _check_model_dir(path, source)
    if source.startswith((".", "/", "~")):
        return [f"model.source: directory {source!r} does not exist"]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return []  # hub id: resolved at load time (online only)
    return [f"model.source: {source!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}), "
            "an existing directory, nor a hub id like 'org/name'"]


def _check_model_dir(path: Path, source: str) -> list[str]:
    """The architecture named in a local model directory's config.json (read without loading weights)."""
    config = path / "config.json"
    if not config.is_file():
        return [f"model.source: {source!r} has no config.json; expected a directory saved by save_pretrained"]
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        return [f"model.source: {config} is not a readable JSON config ({exc})"]
    base = str(model_type).removeprefix(PRUNED_PREFIX)
    if base not in SUPPORTED_ARCHITECTURES:
        return [f"model.source: {source!r} is a {model_type!r} model (config.json model_type); supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"]
    from .sources import check_model_dir
    return check_model_dir(path, source, json.loads(config.read_text(encoding="utf-8")))


def preflight(job: "JobConfig") -> list[str]:
    """What this machine must offer to run ``job`` here (not part of a job file's validity: a job for a GPU
    cluster validates on a laptop): checked by `search` and `prune` before they write anything."""
    if job.device == "cuda" and not cuda_available():
        return ["device: cuda, but this machine has no CUDA device torch can use; run it where there is one, or "
                "set device: auto (or cpu)"]
    return []


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch: only asked when a job names device: cuda)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def lowest_avg_bits(bits: int, quant: "QuantConfig") -> float:
    """A lower bound, for any layer shapes, of the average bits of a weight stored at ``bits``: nf4/fp4
    packs 4 bits plus one absmax per block (1 byte with double quantization, else 4); int8 keeps one
    float32 scale per row on top of 8 bits (not counted here); 16 is 16."""
    if bits == 4:
        return 4.0 + (8.0 if quant.double_quant else 32.0) / quant.blocksize
    return float(bits)


def _check_budget(job: "JobConfig") -> list[str]:
    avg = job.policy.budget_avg_bits
    if avg is None or not job.policy.bits:   # empty bits: PolicyConfig already says so
        return []
    floor = lowest_avg_bits(min(job.policy.bits), job.quant)
    if avg < floor:
        return [f"policy.budget_avg_bits: {avg:g} is below what the all-{min(job.policy.bits)}-bit plan needs "
                f"(at least {floor:.3f} average bits with quant.blocksize={job.quant.blocksize}, double_quant="
                f"{str(job.quant.double_quant).lower()}; the exact value, a little higher, depends on the pruned "
                "shapes: 4.15 on the demo's pruned SmolLM2): no plan would fit"]
    return []


def is_hub_dataset(source: str) -> bool:
    """Whether ``data.source`` names a Hugging Face Hub dataset (read over the network, or from its cache)."""
    return (source not in BUILTIN_DATA and not source.startswith(("builtin:", ".", "/", "~"))
            and not source.endswith(TEXT_SUFFIXES) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None)


def _check_data_source(source: str) -> list[str]:
    if source in BUILTIN_DATA:
        return []
    if source.startswith("builtin:"):
        return [f"data.source: unknown built-in data {source!r}; expected one of {list(BUILTIN_DATA)}"
                + _did_you_mean(source, BUILTIN_DATA)]
    path = Path(source).expanduser()
    if source.endswith(TEXT_SUFFIXES) or source.startswith((".", "/", "~")):
        if not path.is_file():
            return [f"data.source: file {source!r} does not exist"]
        if not source.endswith(TEXT_SUFFIXES):
            return [f"data.source: {source!r} must end in one of {list(TEXT_SUFFIXES)}"]
        return []
    if is_hub_dataset(source):
        return []  # Hugging Face dataset name (online only)
    return [f"data.source: {source!r} is neither built-in ({', '.join(BUILTIN_DATA)}), "
            f"a {'/'.join(TEXT_SUFFIXES)} file, nor a dataset name"]


def compute_dtype_name(setting: str, on_gpu: bool) -> str:
    """The one rule for ``quant.compute_dtype: auto``: bfloat16 on a GPU, float32 on a CPU."""
    if setting != "auto":
        return setting
    return "bfloat16" if on_gpu else "float32"


_CHECK_FILES = contextvars.ContextVar("qpruner_check_files", default=True)


def build_job(data: dict | None, overrides: list[str] | tuple[str, ...] = (), source: str = "job config",
              check_files: bool = True) -> JobConfig:
    """Validate a job given as a dict (after YAML parsing). Raises ConfigError listing all problems.
    ``check_files=False`` checks the structure only, not that the model, data and task files exist here
    (a stored job.yaml read by status / report / export, possibly on another machine or directory)."""
    import copy
    problems: list[str] = check_size(data)     # before anything recurses into it
    if problems:
        raise ConfigError(problems, source)
    data = copy.deepcopy(dict(data or {}))  # overrides must not write into the caller's nested dicts
    for ov in overrides:
        _apply_override(data, ov, problems)
    size = check_size(data)                   # an override's value may nest too (parsed as YAML)
    if size:
        raise ConfigError(problems + size, source)
    token = _CHECK_FILES.set(check_files)
    try:
        job = _build(JobConfig, data, "", problems)
    finally:
        _CHECK_FILES.reset(token)
    if problems:
        raise ConfigError(problems, source)
    return job


def load_job(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read, override and validate a job file. The job name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"job file {str(path)!r} does not exist"], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text ({exc.reason} at byte {exc.start}); save the job file as UTF-8"],
                          str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the job file ({exc.strerror})"], str(path)) from None
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if data is None:
        raise ConfigError(["the job file is empty; start from tune_jobs/smollm2_demo.yaml (every key is optional, "
                           "but an empty file is more likely a mistake than a request for all defaults)"], str(path))
    if not isinstance(data, dict):
        raise ConfigError([f"expected a mapping at the top level, got {type(data).__name__}"], str(path))
    data.setdefault("name", path.stem)
    return build_job(data, overrides, source=str(path))


def to_dict(cfg) -> dict:
    """A plain, YAML-safe dict of a config (tuples become lists)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def save_job(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (every default filled in) as YAML, atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
