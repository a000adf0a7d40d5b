"""Search-efficiency benchmark: how fast each searcher finds the accuracy/memory front.

Proxy problem, small enough to solve exactly: 8 decoder layers of different widths, each nf4 or int8
(256 plans). Memory is QPruner's exact memory model of those layers; quality is a deterministic proxy,
``-sum_l w_l n(b_l) - 0.5 sum_l sqrt(w_l n(b_l) w_{l+1} n(b_{l+1}))`` with lognormal layer sensitivities
``w`` and relative noise ``n(4) = 1``, ``n(8) = 0.05`` (adjacent noisy layers compound). A budget of
6.5 average bits makes some plans infeasible, as in a real job. The exact front of the feasible plans
is found by enumeration; each searcher then runs through the real search stack (Ray Tune, the
budget/cache wrapper, the same seed plans) with a trainable that returns the proxy, and we report the
hypervolume of the front it found after N = 8, 16, 32 trained trials relative to the exact front's
(reference point: the worst quality and the largest feasible memory), median over seeds.

Also measured: per-trial overhead of going through Ray Tune vs calling the trial function directly,
and throughput of real trials (tiny model, 20 LoRA steps) with 1 vs 2 concurrent trials.

    python bench/search_bench.py                  # writes results/bench/search.{md,json}
    python bench/search_bench.py --quick --out /tmp/b
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qpruner import policy  # noqa: E402
from qpruner.config import FinetuneConfig, PolicyConfig, QuantConfig  # noqa: E402
from qpruner.importance import LayerScores  # noqa: E402
from qpruner.memory import Budget, LinearShape, ModelLayout  # noqa: E402
from qpruner.pareto import TrialLog, front_mask, hypervolume  # noqa: E402
from qpruner.plan import PrecisionPlan  # noqa: E402
from qpruner.search.run import OverBudget, PlanDecoder  # noqa: E402
from qpruner.search.searchers import BudgetedSearcher, PlanScreen, make_searcher  # noqa: E402
from qpruner.trial import Precheck, TrialResult  # noqa: E402

N_LAYERS, BITS, BUDGET_BITS = 8, (4, 8), 6.5
NOISE = {4: 1.0, 8: 0.05}


def proxy_layout() -> ModelLayout:
    h = 256
    layers = []
    for i in range(N_LAYERS):
        inter = 256 * (1 + i % 3)
        kv = 64 * (1 + i % 2)
        layers.append((LinearShape(h, h, False), LinearShape(kv, h, False), LinearShape(kv, h, False),
                       LinearShape(h, h, False), LinearShape(inter, h, False), LinearShape(inter, h, False),
                       LinearShape(h, inter, False)))
    return ModelLayout(tuple(layers), vocab=1000, hidden=h, tied=True, head_bias=False, other_numel=h * 17)


SENSITIVITY = np.random.default_rng(123).lognormal(0.0, 1.0, N_LAYERS)


def proxy_quality(bits) -> float:
    e = [SENSITIVITY[i] * NOISE[b] for i, b in enumerate(bits)]
    return -(sum(e) + 0.5 * sum(np.sqrt(e[i] * e[i + 1]) for i in range(len(e) - 1)))


class Problem:
    def __init__(self):
        self.layout = proxy_layout()
        self.quant = QuantConfig()
        self.memory = policy.PlanMemory(self.layout, self.quant, "float32")
        self.budget = Budget(avg_bits=BUDGET_BITS)
        self.precheck = Precheck(self.layout, self.quant, FinetuneConfig(), self.budget, 64)
        feasible = []
        for bits in itertools.product(BITS, repeat=N_LAYERS):
            mem = self.memory(PrecisionPlan.from_bits(bits))
            if self.budget.fits(mem):
                feasible.append((proxy_quality(bits), mem.total_bytes))
        self.n_plans, self.n_feasible = 2 ** N_LAYERS, len(feasible)
        q, m = [f[0] for f in feasible], [f[1] for f in feasible]
        mask = front_mask(q, m)
        self.ref = (min(q) - 1e-9, max(m) + 1.0)
        self.front = [(qq, mm) for qq, mm, k in zip(q, m, mask) if k]
        self.exact_hv = hypervolume([f[0] for f in self.front], [f[1] for f in self.front], self.ref)

    def seeds(self, seed: int) -> list[policy.SeedPlan]:
        scores = LayerScores("proxy", tuple(float(s) for s in SENSITIVITY))
        return policy.seed_plans(scores, self.memory, PolicyConfig(bits=BITS, seed_plans=4), self.budget, seed)


def proxy_trainable(config, memory: dict | None = None):
    from ray import tune
    bits = tuple(config[policy.key(i)] for i in range(N_LAYERS))
    q = proxy_quality(bits)
    tune.report({"objective": q, "accuracy": q, "perplexity": float(np.exp(-q)), "status": "ok",
                 "weight_bytes": (memory or {}).get(bits, 0)})


def run_searcher(problem: Problem, kind: str, seeded: bool, seed: int, n_trials: int) -> list[tuple[float, float]]:
    """(hypervolume ratio, normalised regret of the best quality) after each trained trial."""
    from ray import tune
    with tempfile.TemporaryDirectory() as tmp:
        log = TrialLog(tmp, "accuracy")
        decode = PlanDecoder(N_LAYERS, "nf4", "layer")
        points = [policy.encode(s.plan) for s in problem.seeds(seed)] if seeded else []
        inner = make_searcher(kind, points, seed, random_warmup=2)
        searcher = BudgetedSearcher(inner, PlanScreen(decode, OverBudget(problem.precheck, "cpu"), log), 2000)
        multi = isinstance(inner.metric, list)
        results = []

        class Collect(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                bits = [trial.config[policy.key(i)] for i in range(N_LAYERS)]
                plan = PrecisionPlan.from_bits(bits)
                common, _ = problem.precheck(plan)
                r = dict(trial.last_result)
                log.add(trial.trial_id, TrialResult(status="ok", objective=r["objective"], accuracy=r["objective"],
                                                    perplexity=r["perplexity"],
                                                    weight_bytes=common["weight_bytes_predicted"], **common))
                results.append((r["objective"], common["weight_bytes_predicted"]))

        space = {policy.key(i): tune.choice(list(BITS)) for i in range(N_LAYERS)}
        memory = {bits: problem.memory(PrecisionPlan.from_bits(bits)).total_bytes
                  for bits in itertools.product(BITS, repeat=N_LAYERS)}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(proxy_trainable, memory=memory), {"cpu": 0.5}),
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=n_trials, max_concurrent_trials=1,
                                        metric=None if multi else "objective", mode=None if multi else "max",
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="bench", storage_path=tmp, callbacks=[Collect()], verbose=0))
        tuner.fit()
    out = []
    best_possible = max(f[0] for f in problem.front)
    for n in range(1, len(results) + 1):
        q, m = [r[0] for r in results[:n]], [r[1] for r in results[:n]]
        regret = (best_possible - max(q)) / (best_possible - problem.ref[0])
        out.append((hypervolume(q, m, problem.ref) / problem.exact_hv, regret))
    return out


def ray_overhead(n: int = 20) -> dict:
    from ray import tune
    config = {policy.key(i): 4 for i in range(N_LAYERS)}
    t = time.perf_counter()
    for _ in range(n):
        proxy_quality([4] * N_LAYERS)
    direct = (time.perf_counter() - t) / n
    with tempfile.TemporaryDirectory() as tmp:
        times = []

        class Timer(tune.Callback):
            def __init__(self):
                self.start = None

            def on_trial_start(self, iteration, trials, trial, **info):
                self.start = time.perf_counter()

            def on_trial_complete(self, iteration, trials, trial, **info):
                times.append(time.perf_counter() - self.start)

        t0 = time.perf_counter()
        tune.Tuner(tune.with_resources(proxy_trainable, {"cpu": 1}), param_space=config,
                   tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=1, reuse_actors=True),
                   run_config=tune.RunConfig(name="overhead", storage_path=tmp, callbacks=[Timer()], verbose=0)).fit()
        wall = (time.perf_counter() - t0) / n
    return {"direct_ms": direct * 1e3, "tune_trial_median_ms": statistics.median(times) * 1e3,
            "tune_wall_per_trial_ms": wall * 1e3, "trials": n}


def concurrency_throughput(n_trials: int) -> dict:
    from qpruner.config import load_job
    from qpruner.job import run_job
    out = {}
    for concurrent in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            job = load_job(ROOT / "tune_jobs" / "tiny_smoke.yaml",
                           [f"results_dir={tmp}", "finetune.steps=20", f"search.num_trials={n_trials}",
                            f"search.max_concurrent={concurrent}", "search.cpus_per_trial=1", "search.verbose=0",
                            "search.searcher=random", "policy.bits=[4, 8]", "policy.budget_avg_bits=null"])
            outcome = run_job(job)
            ok = outcome.trials[outcome.trials["status"] == "ok"]
            # the search phase only: from the first trial's start to the last trial's end
            seconds = float(ok["finished_at"].max() - (ok["finished_at"] - ok["seconds_total"]).min())
            trained = len(ok)
        out[concurrent] = {"seconds": round(seconds, 1), "trained": trained,
                           "trials_per_minute": round(60 * trained / seconds, 2)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 8 trials, fewer concurrency trials")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.trials = 2, 8
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    problem = Problem()
    searchers = [("hyperopt", True, "TPE, seeded"), ("hyperopt", False, "TPE, unseeded"),
                 ("optuna_mo", False, "Optuna multi-objective"), ("random", False, "random")]
    checkpoints = [n for n in (8, 16, 32) if n <= args.trials]
    table, regret = {}, {}
    for kind, seeded, label in searchers:
        runs = [run_searcher(problem, kind, seeded, seed, args.trials) for seed in range(args.seeds)]
        table[label] = {str(n): round(float(statistics.median(r[min(n, len(r)) - 1][0] for r in runs)), 3)
                        for n in checkpoints}
        regret[label] = {str(n): round(float(statistics.median(r[min(n, len(r)) - 1][1] for r in runs)), 4)
                         for n in checkpoints}
        print(label, table[label], regret[label], flush=True)
    overhead = ray_overhead(10 if args.quick else 30)
    print("overhead", overhead, flush=True)
    ray.shutdown()
    throughput = concurrency_throughput(3 if args.quick else 8)
    print("throughput", throughput, flush=True)
    res = {"plans": problem.n_plans, "feasible": problem.n_feasible, "front_size": len(problem.front),
           "budget_avg_bits": BUDGET_BITS, "seeds": args.seeds, "hv_ratio_median": table, "regret_median": regret, "overhead": overhead,
           "throughput": throughput, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(res, indent=2))
    (args.out / "search.md").write_text(to_markdown(res, checkpoints))
    print(f"wrote {args.out / 'search.md'}")
    return 0


def to_markdown(r: dict, checkpoints) -> str:
    out = [f"# Search efficiency: {r['plans']} plans ({r['feasible']} within {r['budget_avg_bits']} average bits), "
           f"exact front {r['front_size']} plans", "",
           f"Hypervolume of the front found after N trained trials / hypervolume of the exact front; median over "
           f"{r['seeds']} seeds. {r['machine']}, {r['date']}.", "", f"Command: `{r['command']}`", "",
           "| searcher | " + " | ".join(f"N={n}" for n in checkpoints) + " |", "|---|" + "---:|" * len(checkpoints)]
    for label, row in r["hv_ratio_median"].items():
        out.append(f"| {label} | " + " | ".join(str(row[str(n)]) for n in checkpoints) + " |")
    out += ["", "Regret of the best quality found within the budget, (best possible - best found) / (best possible - "
            "worst), median over seeds (0 = the feasible optimum was found):", "",
            "| searcher | " + " | ".join(f"N={n}" for n in checkpoints) + " |", "|---|" + "---:|" * len(checkpoints)]
    for label, row in r["regret_median"].items():
        out.append(f"| {label} | " + " | ".join(str(row[str(n)]) for n in checkpoints) + " |")
    o = r["overhead"]
    out += ["", "## Ray Tune overhead per trial", "",
            f"Direct call of the trial function: {o['direct_ms']:.3f} ms. Through Ray Tune (1 CPU, actors reused, one at "
            f"a time, {o['trials']} trials): median {o['tune_trial_median_ms']:.0f} ms from trial start to completion, "
            f"{o['tune_wall_per_trial_ms']:.0f} ms of wall time per trial including scheduling.", "",
            "## Throughput of real trials (tiny model, 20 LoRA steps, 1 CPU per trial)", "",
            "| concurrent trials | trained | seconds (first start to last end) | trials / minute |", "|---:|---:|---:|---:|"]
    for k, v in r["throughput"].items():
        out.append(f"| {k} | {v['trained']} | {v['seconds']} | {v['trials_per_minute']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
