"""Record a real accuracy/memory landscape: every plan of a small search space, trained as a real trial.

Model and space: SmolLM2-135M pruned exactly as the demo (`tune_jobs/smollm2_demo.yaml`: same model,
data and pruning settings, so the same pruned weights). The 30 decoder layers are tied into 8
contiguous groups (4,4,4,4,4,4,3,3 layers); each group is nf4 or int8, so the space has 2^8 = 256
plans — small enough to record completely, large enough that the order of the groups matters.
Contiguous groups keep neighbouring layers (which behave alike) together and give every group a
similar share of the memory.

Every plan runs as a real trial through QPruner's own Ray Tune search (2 at a time, 1 CPU each):
quantize with bitsandbytes, LoftQ-initialised LoRA, fine-tune, evaluate the quantized model on the
held-out split (64 x 128 tokens, per-window NLL kept for paired differences). Stages:

    zero     all 256 plans, 0 fine-tuning steps (LoftQ initialisation, evaluated as quantized)
    demo     all 256 plans, the demo's 10 steps
    seed1/2  8 plans again at 10 steps with fine-tuning seeds 1 and 2 (trial-to-trial noise)
    long     24 plans at 40 steps (does the brief fine-tune rank plans like a 4x longer one?)

Each stage is its own job under results/landscape_smollm2_<stage>/; re-running a stage trains only
the plans it has not recorded yet (resumable). ``export`` merges what is recorded into
results/bench/landscape_smollm2.parquet (one row per trained trial; commit, command and settings in
the file's metadata and in landscape_smollm2.json).

    python bench/landscape.py record --stage zero
    python bench/landscape.py record --stage demo --limit 24     # a prefix first (resumable: re-run for more)
    python bench/landscape.py export
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

DEMO = ROOT / "tune_jobs" / "smollm2_demo.yaml"
N_GROUPS = 8
FORMATS = ("nf4", "int8")
STAGES = {  # name: (fine-tuning steps, fine-tuning seed, how many plans of the recording order)
    "zero": (0, 0, 256),
    "demo": (10, 0, 256),
    "seed1": (10, 1, 8),
    "seed2": (10, 2, 8),
    "long": (40, 0, 24),
}
OUT = ROOT / "results" / "bench" / "landscape_smollm2"
logger = logging.getLogger("landscape")


def groups(n_layers: int, n_groups: int = N_GROUPS) -> list[list[int]]:
    return [list(map(int, g)) for g in np.array_split(np.arange(n_layers), n_groups)]


def group_code(choice: tuple[int, ...]) -> str:
    return "".join("48"[c] for c in choice)


def layer_plan(choice: tuple[int, ...], n_layers: int):
    from qpruner.plan import PrecisionPlan
    formats = [None] * n_layers
    for g, layers in zip(choice, groups(n_layers, len(choice))):
        for layer in layers:
            formats[layer] = FORMATS[g]
    return PrecisionPlan(tuple(formats))


def recording_order(seed: int = 0) -> list[tuple[int, ...]]:
    """Uniform nf4, uniform int8, then the other 254 plans in a seeded random order (so that any
    prefix of a partial recording is a random sample of the space)."""
    every = [tuple((i >> (N_GROUPS - 1 - k)) & 1 for k in range(N_GROUPS)) for i in range(2 ** N_GROUPS)]
    ends = [every[0], every[-1]]
    rest = [every[i] for i in np.random.default_rng(seed).permutation(range(1, 2 ** N_GROUPS - 1))]
    return ends + rest


def stage_job(stage: str):
    from qpruner.config import load_job
    steps, seed, _ = STAGES[stage]
    return load_job(DEMO, [f"name=landscape_smollm2_{stage}", f"finetune.steps={steps}", f"finetune.seed={seed}",
                           "policy.bits=[4, 8]", "policy.budget_avg_bits=null", "policy.budget_gb=null",
                           "search.searcher=points", "search.save_adapters=false", "search.metric=perplexity",
                           "search.objective=null", "search.max_concurrent=2", "search.cpus_per_trial=1",
                           "search.num_cpus=2", "search.scheduler=none", "eval.before_finetune=false",
                           # recorded with Fisher scores and LoftQ initialisation (the defaults when it was
                           # recorded): pinned, so that the stages keep their run identity and stay reproducible
                           "score.method=fisher", "finetune.init=loftq", "finetune.loftq_iters=1"])


def record(stage: str, limit: int | None = None) -> None:
    import pandas as pd

    from qpruner import job as driver
    from qpruner.config import save_job
    from qpruner.pareto import TrialLog
    from qpruner.policy import SeedPlan
    from qpruner.search import run_search

    job = stage_job(stage)
    out = job.results_path
    out.mkdir(parents=True, exist_ok=True)
    _same_pruned_model(job, out)
    save_job(job, out / "job.yaml")
    prepared = driver.prepare(job, out)
    n_layers = prepared.context.n_layers
    wanted = [layer_plan(c, n_layers) for c in recording_order()[: min(STAGES[stage][2], limit or 10 ** 9)]]
    done = set()
    if (out / "trials.parquet").is_file():
        frame = pd.read_parquet(out / "trials.parquet")
        done = set(frame.loc[frame["status"].isin(["ok", "failed"]), "plan_formats"])   # failed: not retried
    todo = [p for p in wanted if ",".join(p.formats) not in done]
    logger.info("stage %s: %d of %d plans recorded, %d to train", stage, len(wanted) - len(todo), len(wanted), len(todo))
    if not todo:
        return
    log = TrialLog(out, "perplexity", {p.formats: "landscape" for p in wanted})
    # num_trials counts every trained row of the log (trials.parquet is the searcher's truth), not the new ones
    job = _with(job, num_trials=len(log.trained()) + len(todo))
    run_search(job, prepared.context, [SeedPlan(p, "landscape") for p in todo], log)
    # the recording searcher proposes its points only (search.searcher=points): nothing but the listed plans


def _same_pruned_model(job, out: Path) -> None:
    """A stage that has trials continues only on the pruned model it was recorded on: code that prunes
    differently (e.g. the calibration split changed at the commit after f65bbb3) would prune again and
    mix two models in one landscape. Continue such a stage from a git worktree at its recording commit."""
    from qpruner.job import prune_key
    from qpruner.pruned_model import read_meta
    meta = read_meta(out / "pruned")
    if (out / "trials.parquet").is_file() and meta is not None and meta.get("key") != prune_key(job):
        sys.exit(f"{out} was recorded on a pruned model this code would not reuse (key {meta.get('key')} != "
                 f"{prune_key(job)}); continue it from a git worktree at the commit that recorded it "
                 f"(`git worktree add --detach DIR f65bbb3`, PYTHONPATH=DIR), or record into a new stage directory")


def _with(job, **search):
    from dataclasses import replace
    return replace(job, search=replace(job.search, **search))


COLUMNS = ["stage", "steps", "ft_seed", "group_code", "plan_code", "weight_bytes", "avg_bits", "nll", "nll_se",
           "perplexity", "accuracy", "accuracy_se", "train_loss_first", "train_loss_final", "seconds_quantize",
           "seconds_finetune", "seconds_eval", "seconds_total", "eval_window_nll", "eval_window_tokens",
           "eval_window_correct", "worker_rss_bytes", "trial_id"]


def export(out: Path = OUT) -> Path:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    frames = []
    settings = {}
    for stage, (steps, seed, _) in STAGES.items():
        path = ROOT / "results" / f"landscape_smollm2_{stage}" / "trials.parquet"
        if not path.is_file():
            continue
        frame = pd.read_parquet(path)
        frame = frame[frame["status"] == "ok"].drop_duplicates("plan_formats", keep="first").copy()
        n_layers = len(frame["plan_code"].iloc[0]) if len(frame) else 0
        parts = groups(n_layers) if n_layers else []
        tied = frame["plan_code"].map(lambda code: all(len({code[i] for i in g}) == 1 for g in parts))
        if not tied.all():
            logger.warning("stage %s: %d recorded plans are not tied by layer group; left out", stage, int((~tied).sum()))
        frame = frame[tied].copy()
        frame["group_code"] = frame["plan_code"].map(lambda code: "".join(code[g[0]] for g in parts))
        frame["stage"], frame["steps"], frame["ft_seed"] = stage, steps, seed
        frames.append(frame[[c for c in COLUMNS if c in frame]])
        job_yaml = path.parent / "job.yaml"
        settings[stage] = job_yaml.read_text() if job_yaml.is_file() else None
    if not frames:
        if out.with_suffix(".parquet").is_file():   # e.g. a fresh clone: the committed file stays as it is
            logger.info("no run directories here (results/landscape_smollm2_<stage>/): %s kept as it is",
                        out.with_suffix(".parquet"))
            return out.with_suffix(".parquet")
        raise SystemExit("nothing recorded yet: run `python bench/landscape.py record --stage zero` first")
    table = pd.concat(frames, ignore_index=True)
    _refuse_losing_rows(table, out.with_suffix(".parquet"))
    meta = {**stamp(), **space_tables(), "what": "REAL trials (not a proxy): every plan trained and evaluated by qpruner.trial.run_trial "
                               "through Ray Tune", "model": "SmolLM2-135M-Instruct pruned as tune_jobs/smollm2_demo.yaml",
            "groups": groups(30), "formats": {"4": "nf4", "8": "int8"},
            "counts": table.groupby("stage").size().to_dict(), "job_yaml_by_stage": settings}
    out.parent.mkdir(parents=True, exist_ok=True)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"qpruner": json.dumps(meta).encode()})
    pq.write_table(arrow, out.with_suffix(".parquet"))
    out.with_suffix(".json").write_text(json.dumps({k: v for k, v in meta.items() if k != "job_yaml_by_stage"}, indent=2)
                                        + "\n")
    logger.info("wrote %s (%s)", out.with_suffix(".parquet"), meta["counts"])
    return out.with_suffix(".parquet")


def _refuse_losing_rows(table, path: Path) -> None:
    """An export replaces the file: never with fewer trials of a stage than it holds (a checkout that has
    only some stages' run directories, or a stage recorded anew, would silently drop recorded trials)."""
    import pandas as pd
    if not path.is_file():
        return
    old = pd.read_parquet(path, columns=["stage"]).groupby("stage").size()
    new = table.groupby("stage").size()
    lost = {str(s): int(n - new.get(s, 0)) for s, n in old.items() if new.get(s, 0) < n}
    if lost:
        raise SystemExit(f"export would drop recorded trials from {path} (per stage: {lost}); the run directories "
                         "here (results/landscape_smollm2_<stage>/) hold fewer. Nothing written: record the "
                         "missing trials here first, or export to another file (--out)")


def space_tables() -> dict:
    """What a searcher may know before any trial, from the recorded job's own pruned model and scores:
    exact per-group memory tables (nf4, int8) and the project's layer scores summed per group."""
    import torch

    from qpruner import policy
    from qpruner.memory import Budget, ModelLayout
    from qpruner.pruned_model import load_pruned
    job = stage_job("zero")
    model, _ = load_pruned(job.results_path / "pruned", torch.float32, "cpu")
    layout = ModelLayout.from_model(model)
    costs = policy.unit_costs(policy.PlanMemory(layout, job.quant, "float32"), "layer", list(FORMATS), Budget())
    scores = json.loads((job.results_path / "layer_scores.json").read_text())
    parts = groups(layout.n_layers)
    return {"group_costs": {"weights": [costs.weights[g].sum(axis=0).tolist() for g in parts],
                            "biases": [costs.biases[g].sum(axis=0).tolist() for g in parts],
                            "fixed": costs.fixed, "numel": costs.numel},
            "layer_scores": {"method": scores["method"], "scores": scores["scores"]},
            "group_scores": [float(sum(scores["scores"][i] for i in g)) for g in parts]}


def load(path: Path = OUT.with_suffix(".parquet")):
    """(table, metadata) of a recorded landscape."""
    import pandas as pd
    import pyarrow.parquet as pq
    meta = json.loads(pq.read_schema(path).metadata[b"qpruner"])
    return pd.read_parquet(path), meta


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--stage", choices=list(STAGES), action="append", required=True)
    rec.add_argument("--limit", type=int, default=None, help="only the first N plans of each stage's order")
    exp = sub.add_parser("export")
    exp.add_argument("--out", type=Path, default=OUT, help="output path without suffix (.parquet and .json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.cmd == "record":
        for stage in args.stage:
            record(stage, args.limit)
        export()
    else:
        export(args.out)


if __name__ == "__main__":
    main()
