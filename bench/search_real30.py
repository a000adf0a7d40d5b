"""Does the large-space replay predict REAL trials? Real trials in the demo's own 30 layers x {4, 8, 16} space.

Every trial here is real (bitsandbytes quantization, LoftQ-initialised LoRA, the demo's 10 steps, the
demo's 64 x 128 held-out tokens): the demo's job (`tune_jobs/smollm2_demo.yaml`) pruned and scored once
in ``results/search_real30/``, then these strategies, each its own trial log under that directory:

    plans     the replay check's plan set: the greedy chain from the layer scores at N = 16 (evenly
              spaced; also the "greedy_chain" baseline on real trials) and 32 random feasible plans spread
              over memory (per plan a Dirichlet(1,1,1) mix of nf4/int8/bf16 drawn layer by layer; over the
              budget: drawn again) — 48 plans, interleaved so that any prefix mixes both kinds
    default   the product's default search (``search.searcher`` as in the demo) at N = 16 trained trials
    probes    the CALIBRATION of the replay at today's recipe (never the plans above): all-nf4, all-int8, and
              for each of the replay's 8 layer groups the group raised to int8 from all-nf4 ("up"), lowered
              to nf4 from all-int8 ("down") and raised to bf16 from all-nf4 ("bf16") — 26 plans; the report
              calibrates a "today" world from them and checks it against the 48 plans above (out of sample)

Each stage is resumable: run it again and it trains only what it has not recorded. ``report`` compares
the replay's prediction (``bench/search_large.py``'s calibrated demo world, no noise) with every real
plan's NLL (R^2, Spearman) and the two strategies' fronts at N = 16 on the same tokens (hypervolume, with a
bootstrap over evaluation windows), into ``results/bench/search_real30.{json,md}``.

    python bench/search_real30.py record --stage plans [--concurrent 1]     # ~80 s per trial per core
    python bench/search_real30.py record --stage default
    python bench/search_real30.py record --stage probes
    python bench/search_real30.py report
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()

DEMO = ROOT / "tune_jobs" / "smollm2_demo.yaml"
OUT = ROOT / "results" / "search_real30"
N_CHAIN, N_RANDOM, N_DEFAULT = 16, 32, 16   # 48 plans: the committed check set
logger = logging.getLogger("search_real30")


def base_job(concurrent: int):
    from qpruner.config import load_job
    return load_job(DEMO, ["name=search_real30", "search.save_adapters=false", f"search.max_concurrent={concurrent}",
                           f"search.num_cpus={max(concurrent, 1)}", "search.cpus_per_trial=1"])


def plan_set(prepared, job) -> list[tuple[str, np.ndarray]]:
    """(origin, option indices) of the replay check's plans: chain at N = 16, then random spread feasible."""
    from qpruner import policy
    from qpruner.search.run import search_space
    space = search_space(job, prepared.context, prepared.context.n_layers, prepared.scores)
    bits = sorted(job.policy.bits)
    chain = policy.chain_points(policy.greedy_chain(prepared.scores, space.costs, bits), N_CHAIN)
    rng = np.random.default_rng(0)
    seen = {tuple(int(i) for i in c) for c in chain}
    rand = []
    while len(rand) < N_RANDOM:
        mix = rng.dirichlet(np.ones(len(bits)))
        idx = rng.choice(len(bits), size=len(space.keys), p=mix)
        if space.costs.fits(idx) and tuple(int(i) for i in idx) not in seen:
            seen.add(tuple(int(i) for i in idx))
            rand.append(idx)
    out = [("chain", chain[0]), ("chain", chain[-1])]
    rest_chain, rest_rand = list(chain[1:-1]), list(rand)
    while rest_chain or rest_rand:
        for kind, pool in (("random", rest_rand), ("random", rest_rand), ("chain", rest_chain)):
            if pool:
                out.append((kind, pool.pop(0)))
    return out


def probe_set(n_layers: int) -> list[tuple[str, np.ndarray]]:
    """(origin, option indices) of the calibration probes, in recording order (see the module docstring)."""
    import search_worlds as sw
    groups = sw.layer_groups(n_layers)
    out = [("nf4", np.zeros(n_layers, int)), ("int8", np.ones(n_layers, int))]
    for kind, base, value in (("up", 0, 1), ("down", 1, 0), ("bf16", 0, 2)):
        for g, layers in enumerate(groups):
            idx = np.full(n_layers, base)
            idx[layers] = value
            out.append((f"{kind}:{g}", idx))
    return out


def record(stage: str, concurrent: int) -> None:
    import pandas as pd

    from qpruner import job as driver
    from qpruner.config import save_job
    from qpruner.pareto import TrialLog
    from qpruner.plan import PrecisionPlan, format_for_bits
    from qpruner.policy import SeedPlan
    from qpruner.search import run_search

    job = base_job(concurrent)
    OUT.mkdir(parents=True, exist_ok=True)
    save_job(job, OUT / "job.yaml")
    prepared = driver.prepare(job, OUT)
    logdir = OUT / stage
    logdir.mkdir(exist_ok=True)
    trained = 0
    if (logdir / "trials.parquet").is_file():
        frame = pd.read_parquet(logdir / "trials.parquet")
        trained = int(frame["status"].isin(["ok", "failed"]).sum())
    if stage in ("plans", "probes"):
        bits = sorted(job.policy.bits)
        formats = [format_for_bits(b, job.quant.four_bit) for b in bits]
        chosen = plan_set(prepared, job) if stage == "plans" else probe_set(prepared.context.n_layers)
        wanted = [(o, PrecisionPlan(tuple(formats[i] for i in idx))) for o, idx in chosen]
        (OUT / f"{stage}.json").write_text(json.dumps([{"origin": o, "code": p.code()} for o, p in wanted], indent=1))
        done = set()
        if (logdir / "trials.parquet").is_file():
            done = set(frame.loc[frame["status"].isin(["ok", "failed"]), "plan_formats"])
        todo = [(o, p) for o, p in wanted if ",".join(p.formats) not in done]
        logger.info("plans: %d of %d recorded, %d to train", len(wanted) - len(todo), len(wanted), len(todo))
        if not todo:
            return
        log = TrialLog(logdir, "perplexity", {p.formats: o for o, p in wanted})
        sjob = replace(job, search=replace(job.search, searcher="points", num_trials=len(log.trained()) + len(todo)))
        run_search(sjob, prepared.context, [SeedPlan(p, o) for o, p in todo], log)
    else:
        if trained >= N_DEFAULT:
            logger.info("default: %d trials recorded", trained)
            return
        log = TrialLog(logdir, "perplexity", {s.plan.formats: f"seed:{s.origin}" for s in prepared.seeds})
        sjob = replace(job, search=replace(job.search, num_trials=N_DEFAULT))
        # a fresh search each time: repeats of what is recorded are answered from the log (cached), so a
        # deterministic searcher retraces its recorded steps and continues where it stopped
        run_search(sjob, prepared.context, prepared.seeds, log, scores=prepared.scores)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--stage", choices=["plans", "default", "probes"], required=True)
    rec.add_argument("--concurrent", type=int, default=1, help="trials at a time (1 CPU each)")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.cmd == "record":
        record(args.stage, args.concurrent)
    else:
        import search_real30_report
        search_real30_report.main(OUT, stamp())


if __name__ == "__main__":
    main()
