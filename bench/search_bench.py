"""Search benchmark: REPLAYS RECORDED REAL TRIALS. How fast does each searcher find the real front?

The landscape (``results/bench/landscape_smollm2.parquet``, recorded by ``bench/landscape.py``) holds
every plan of a 256-plan space — SmolLM2-135M pruned as in the demo, 8 groups of layers x {nf4, int8}
— each trained and evaluated as a real trial. Here every searcher runs through the real search loop
(Ray Tune, the budget/cache wrapper, the tracker's Tune callback, 2 trials at a time) against a
trainable that looks each plan's result up in that recording instead of training it again.

* Quality: ``-nll`` (mean held-out NLL per token; the objective of ``search.metric: perplexity``),
  at the recorded stage (``--stage``: ``demo`` = 10 LoRA steps when complete, else ``zero``).
* Budget: ``--budget`` average bits (default 6.5): some plans are over it; they are never trained.
* What searchers know before a trial: the exact per-group memory tables (stored with the landscape) and
  layer scores of that pruned model summed per group (``--scores``: the product's default estimator,
  mutual_information, from ``results/bench/importance_truth.json``; ``landscape``: the Fisher scores
  recorded with it) — never the recorded qualities. Every searcher starts from the same seed plans
  (:func:`qpruner.policy.seed_indices` on those scores), except ``random``: uniform random plans, no
  seeds — the baseline of what the search buys at all.
* Also a seed-count ablation: ``additive_seeds<K>`` is the default searcher with K sampled seed plans
  (``policy.seed_plans``; ``additive_ends`` = 0) — what the default of that setting is chosen from.
* Scores, per searcher, median (and mean ± SE) over ``--seeds`` seeds: hypervolume of the front found after N trained
  trials / hypervolume of the exact front of the feasible plans (reference point: the budget's
  largest feasible memory, and the worst feasible quality minus 10% of the quality range); regret of
  the best quality found within the budget, ``(best - found) / (best - worst)``; proposals wasted
  (over the budget or repeats: answered without training).

    python bench/search_bench.py                       # writes results/bench/search.{md,json} (~40 min alone on 2 cores;
                                                       # resumable: a killed run keeps its finished searchers)
    python bench/search_bench.py --seeds 2 --trials 8 --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import setup, stamp  # noqa: E402

setup()
from qpruner import policy  # noqa: E402
from qpruner.config import PolicyConfig, ScoreConfig  # noqa: E402
from qpruner.frontier import hypervolume  # noqa: E402
from qpruner.unit_importance import UnitScores  # noqa: E402
from qpruner.memory import Budget, UnitCosts  # noqa: E402
from qpruner.pareto import TrialLog  # noqa: E402
from qpruner.plan import PrecisionPlan  # noqa: E402
from qpruner.search.callbacks import PersistTrials  # noqa: E402
from qpruner.search.searchers import BudgetedSearcher, PlanScreen, SearchSpace, make_searcher  # noqa: E402
from qpruner.trial import INFEASIBLE_OBJECTIVE, TrialResult  # noqa: E402

LANDSCAPE = ROOT / "results" / "bench" / "landscape_smollm2.parquet"
SEARCHERS = {"additive": "additive (memory-aware Bayesian)",
             "additive_ends": "additive, seeded with uniform plans + best guess only", "hyperopt": "TPE above the line",
             "optuna_mo": "Optuna multi-objective TPE", "optuna_gp": "Optuna GP",
             "random_seeded": "seed plans, then random", "random": "random (no seeds)"}
# <searcher>_seeds<K>: that searcher with K sampled seed plans instead of the default (the seed-count ablation)
ABLATION = ["additive_seeds2", "additive_seeds3", "additive_seeds4", "additive_seeds6"]
OPTIONS = [4, 8]
FORMATS = {4: "nf4", 8: "int8"}


IMPORTANCE_TRUTH = ROOT / "results" / "bench" / "importance_truth.json"


def prior_scores(meta: dict, method: str) -> tuple[str, list[float], str]:
    """(method, per-group scores, where from) of the searchers' prior: an estimator's scores of the
    landscape's pruned model from ``importance_truth.json`` (every estimator there on the same calibration
    split, so that two priors differ by the estimator only), or ``landscape``: the scores recorded with the
    landscape itself (also the fallback for their own method)."""
    recorded = meta["layer_scores"]["method"]
    if method != "landscape" and IMPORTANCE_TRUTH.is_file():
        truth = json.loads(IMPORTANCE_TRUTH.read_text())
        est = truth.get("estimators", {}).get(method)
        if est and len(est["group_scores"]) == len(meta["group_scores"]):
            at = (truth.get("scores_commit") or truth["commit"])[:10]
            return method, list(est["group_scores"]), f"results/bench/importance_truth.json (scored at {at})"
    if method in ("landscape", recorded):
        return recorded, list(meta["group_scores"]), "recorded with the landscape"
    raise SystemExit(f"--scores {method}: the landscape recorded {recorded} scores and {IMPORTANCE_TRUTH} has no "
                     f"{method} scores of its pruned model; run bench/importance_truth.py, or use --scores landscape")


class Landscape:
    """The recorded plans of one stage, their exact memory tables, budget and exact front."""

    def __init__(self, path: Path, stage: str | None, budget_bits: float, scores: str = "landscape"):
        import landscape as rec
        table, meta = rec.load(path)
        self.scores_method, self.group_scores, self.scores_source = prior_scores(meta, scores)
        counts = table.groupby("stage").size().to_dict()
        self.stage = stage or ("demo" if counts.get("demo", 0) == 256 else "zero")
        rows = table[table["stage"] == self.stage]
        self.n_groups = len(meta["group_scores"])
        self.rows = {r["group_code"]: r for r in rows.to_dict("records")}
        self.meta, self.path = meta, path
        c = meta["group_costs"]
        self.costs = UnitCosts(np.array(c["weights"]), np.array(c["biases"]), float(c["fixed"]), int(c["numel"]),
                               Budget(avg_bits=budget_bits))
        self.budget_bits = budget_bits
        for code, r in self.rows.items():  # memory is known before training: the tables give it to the byte
            if self.costs.total(self.idx(code)) != r["weight_bytes"]:
                raise SystemExit(f"memory table disagrees with the recorded plan {code}")
        feasible = [code for code in self.rows if self.costs.fits(self.idx(code))]
        pts = [self.point(code) for code in feasible]
        qs = [q for _, q in pts]
        self.ref = (max(m for m, _ in pts) + 1.0, min(qs) - 0.1 * (max(qs) - min(qs)))
        self.exact_hv = hypervolume(pts, self.ref)
        self.best, self.worst = max(qs), min(qs)
        self.n_plans, self.n_feasible = len(self.rows), len(feasible)
        from qpruner.frontier import front_points
        self.front = front_points(pts)

    def idx(self, code: str) -> np.ndarray:
        return np.array(["48".index(ch) for ch in code])

    def point(self, code: str) -> tuple[float, float]:
        r = self.rows[code]
        return float(r["weight_bytes"]), -float(r["nll"])

    def seeds(self, seed: int, sampled: int | None = None) -> list[dict]:
        """Uniform plans, the best guess and ``sampled`` sampled plans (default: the product's ``policy.seed_plans``)."""
        scores = UnitScores(self.scores_method, tuple(self.group_scores), "layer")
        n = PolicyConfig().seed_plans if sampled is None else sampled
        cfg = PolicyConfig(bits=tuple(OPTIONS), seed_plans=n)
        return [{policy.key(u): OPTIONS[k] for u, k in enumerate(idx)}
                for idx, _ in policy.seed_indices(scores, self.costs, OPTIONS, cfg, seed)]

    def space(self) -> SearchSpace:
        return SearchSpace([policy.key(u) for u in range(self.n_groups)], OPTIONS, self.costs,
                           tuple(self.group_scores))


class GroupDecoder:
    def __init__(self, n: int):
        self.n = n

    def __call__(self, config: dict) -> PrecisionPlan:
        return PrecisionPlan(tuple(FORMATS[config[policy.key(u)]] for u in range(self.n)))


class GroupPrecheck:
    """Over-budget plans answered at once (their memory is exact), as the product's precheck does."""

    def __init__(self, costs: UnitCosts, budget_bits: float):
        self.costs, self.budget_bits = costs, budget_bits

    def __call__(self, plan: PrecisionPlan) -> TrialResult | None:
        idx = np.array([0 if f == "nf4" else 1 for f in plan.formats])
        if self.costs.fits(idx):
            return None
        bits, total = self.costs.avg_bits(idx), int(self.costs.total(idx))
        excess = bits / self.budget_bits - 1.0
        return TrialResult(plan=plan, status="infeasible", objective=INFEASIBLE_OBJECTIVE - excess, weight_bytes=total,
                           weight_bytes_predicted=total, avg_bits=bits, budget_excess=excess)


def replay_trainable(config: dict, rows: dict, n: int):
    """The recorded result of this plan (no training: a lookup in the real landscape)."""
    from ray import tune
    plan = GroupDecoder(n)(config)
    r = rows[plan.code()]
    result = TrialResult(plan=plan, status="ok", objective=-float(r["nll"]), objective_se=float(r["nll_se"]),
                         weight_bytes=int(r["weight_bytes"]), weight_bytes_predicted=int(r["weight_bytes"]),
                         avg_bits=float(r["avg_bits"]), accuracy=float(r["accuracy"]), perplexity=float(r["perplexity"]),
                         nll=float(r["nll"]), nll_se=float(r["nll_se"]))
    tune.report(result.to_metrics())


def run_searcher(land: Landscape, kind: str, seed: int, n_trials: int, concurrent: int = 2) -> dict:
    """One search: the trained plans in completion order, and the proposals answered without training."""
    from ray import tune
    with tempfile.TemporaryDirectory() as tmp:
        log = TrialLog(tmp, "perplexity")
        decode = GroupDecoder(land.n_groups)
        base, sampled = parse_kind(kind)
        points = [] if kind == "random" else land.seeds(seed, sampled)
        inner = make_searcher(base, points, seed, random_warmup=2, space=land.space())
        searcher = BudgetedSearcher(inner, PlanScreen(decode, GroupPrecheck(land.costs, land.budget_bits), log), 2000)
        multi = isinstance(inner.metric, list)
        space = {policy.key(u): tune.choice(OPTIONS) for u in range(land.n_groups)}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(replay_trainable, rows=land.rows, n=land.n_groups), {"cpu": 0.5}),
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=n_trials, max_concurrent_trials=concurrent,
                                        metric=None if multi else "objective", mode=None if multi else "max",
                                        reuse_actors=True),
            run_config=tune.RunConfig(name="bench", storage_path=tmp, callbacks=[PersistTrials(log, decode, "bench")],
                                      verbose=0))
        tuner.fit()
        frame = log.frame().sort_values("number")
    trained = frame[frame["status"] == "ok"]["plan_code"].tolist()
    wasted = int(frame["status"].isin(["infeasible", "cached"]).sum())
    over = int(sum(not land.costs.fits(land.idx(c)) for c in trained))
    return {"trained": trained, "wasted": wasted, "trained_over_budget": over,
            "trained_repeats": len(trained) - len(set(trained))}


class LandscapeWorld:
    """The recorded landscape as a world for the Tune-free driver (``bench/search_drivers.py``): a plan's
    quality is its recorded ``-nll`` (one real measurement; no noise is added)."""

    def __init__(self, land: Landscape):
        self.land, self.costs, self.options = land, land.costs, tuple(OPTIONS)
        self.scores = np.array(land.group_scores, dtype=float)

    def quality(self, rows, stage: str = "demo") -> np.ndarray:
        rows = np.atleast_2d(rows)
        return np.array([self.land.point("".join("48"[int(i)] for i in r))[1] for r in rows])

    def observe(self, row, rng, stage: str = "demo") -> float:
        return float(self.quality(row)[0])


BASELINES = {"greedy_chain": "greedy chain from the scores, no feedback (baseline; Tune-free driver)",
             "probe_knapsack": "all-nf4, single-unit probes, knapsack on the measured gains (baseline; Tune-free)",
             "score_knapsack": "knapsack on the scores alone, no feedback (baseline; Tune-free driver)"}


def baseline_rows(land: Landscape, checkpoints) -> dict:
    """The simple baselines of ``bench/search_large.py`` on the recorded landscape (deterministic: one run
    per N, each told its N in advance)."""
    import search_drivers as drivers
    world = LandscapeWorld(land)
    make = {"greedy_chain": lambda n: drivers.greedy_chain(world.scores, land.costs, OPTIONS, n),
            "probe_knapsack": lambda n: drivers.ProbeKnapsack(world.scores, land.costs, OPTIONS, n),
            "score_knapsack": lambda n: drivers.score_knapsack(world.scores, land.costs, OPTIONS, n)}
    out = {}
    for kind, factory in make.items():
        per_n = {}
        for n in checkpoints:
            trained = ["".join("48"[i] for i in r) for r in drivers.drive(world, factory(n), n)]
            per_n[n] = scores_after(land, trained, n)
        out[kind] = {"label": BASELINES[kind],
                     "hv_ratio_median": {str(n): round(h, 4) for n, (h, _) in per_n.items()},
                     "hv_ratio_min": {str(n): round(h, 4) for n, (h, _) in per_n.items()},
                     "hv_ratio_mean": {str(n): round(h, 4) for n, (h, _) in per_n.items()},
                     "hv_ratio_se": {str(n): None for n in per_n},
                     "regret_median": {str(n): round(g, 4) for n, (_, g) in per_n.items()},
                     "wasted_proposals_median": 0, "trained_over_budget": 0, "trained_repeats": 0,
                     "deterministic": True}
    return out


def noise_ceiling(land: Landscape, noise: float = 0.0037, draws: int = 1000, seed: int = 0) -> dict:
    """Every feasible plan's NLL drawn again with the measured same-seed noise (``noise``): the exact front's
    plans, at the re-drawn values, against the front of all re-drawn plans (median, 10th percentile). Two
    hypervolume ratios closer than this gap cannot be told apart on one measurement per plan."""
    rng = np.random.default_rng(seed)
    codes = [c for c in land.rows if land.costs.fits(land.idx(c))]
    cost = np.array([land.point(c)[0] for c in codes])
    q = np.array([land.point(c)[1] for c in codes])
    on = np.isin(codes, [c for c in codes if land.point(c) in set(land.front)])
    ratios = []
    for _ in range(draws):
        noisy = q + rng.normal(0, noise, len(q))
        ratios.append(hypervolume(list(zip(cost[on], noisy[on])), land.ref) / hypervolume(list(zip(cost, noisy)), land.ref))
    return {"noise_sd_nll": noise, "median": round(float(np.median(ratios)), 4),
            "p10": round(float(np.percentile(ratios, 10)), 4), "draws": draws,
            "what": "exact front's plans at re-drawn NLL / front of every re-drawn feasible plan"}


def parse_kind(kind: str) -> tuple[str, int | None]:
    """``additive_seeds2`` -> (``additive``, 2 sampled seed plans); ``additive_ends`` -> 0; else the default."""
    m = re.fullmatch(r"(\w+?)_seeds(\d+)", kind)
    if m:
        return m.group(1), int(m.group(2))
    if kind.endswith("_ends"):
        return kind.removesuffix("_ends"), 0
    return kind.removesuffix("_seeded"), None


def label(kind: str) -> str:
    base, sampled = parse_kind(kind)
    if kind in SEARCHERS:
        return SEARCHERS[kind] + (f" [{PolicyConfig().seed_plans} sampled seed plans]" if kind == "additive" else "")
    return f"{SEARCHERS[base]}, {sampled} sampled seed plan{'s' * (sampled != 1)}"


def searcher_kind(kind: str) -> str:
    if kind not in SEARCHERS and parse_kind(kind)[0] not in SEARCHERS:
        raise argparse.ArgumentTypeError(f"unknown searcher {kind!r}: one of {', '.join(SEARCHERS)}, "
                                         "optionally with _seeds<K>")
    return kind


def scores_after(land: Landscape, trained: list[str], n: int) -> tuple[float, float]:
    pts = [land.point(c) for c in trained[:n] if land.costs.fits(land.idx(c))]
    hv = hypervolume(pts, land.ref) / land.exact_hv
    best = max((q for _, q in pts), default=land.worst)
    return hv, (land.best - best) / (land.best - land.worst)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landscape", type=Path, default=LANDSCAPE)
    parser.add_argument("--stage", default=None, help="landscape stage (default: demo when complete, else zero)")
    parser.add_argument("--budget", type=float, default=6.5, help="average-bit budget")
    parser.add_argument("--seeds", type=int, default=30, help="searcher seeds (30: a median's noise ~0.01)")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--searchers", nargs="+", type=searcher_kind,
                        default=[*SEARCHERS, *(k for k in ABLATION if parse_kind(k)[1] != PolicyConfig().seed_plans)],
                        help="searchers to run; <searcher>_seeds<K> runs one with K sampled seed plans")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--scores", default=ScoreConfig().method,
                        help="layer scores of the searchers' prior: the product's default estimator (default), "
                             "another estimator's name, or 'landscape' (the scores recorded with it)")
    args = parser.parse_args(argv)
    import ray
    land = Landscape(args.landscape, args.stage, args.budget, args.scores)
    if land.n_plans < 2 ** land.n_groups:
        raise SystemExit(f"the {land.stage} stage of {args.landscape} has {land.n_plans} of {2 ** land.n_groups} "
                         "plans; the exact front needs all of them (finish the recording first)")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    checkpoints = [n for n in (8, 16, 32) if n <= args.trials]
    res = {**stamp(), "what": "REPLAY of recorded real trials (each result looked up in the landscape, "
                               "not retrained); searchers run through the real Ray Tune loop",
           "source": str(land.path.relative_to(ROOT)) if land.path.is_relative_to(ROOT) else str(land.path),
           "landscape_commit": land.meta.get("commit"), "stage": land.stage, "quality": "-nll (held-out, per token)",
           "budget_avg_bits": args.budget, "plans": land.n_plans, "feasible": land.n_feasible,
           "front_size": len(land.front), "default_seed_plans": PolicyConfig().seed_plans, "seeds": args.seeds,
           "prior_scores": {"method": land.scores_method, "source": land.scores_source},
           "trials": args.trials, "searchers": {}}
    t0 = time.time()
    partial = args.out / ".search.partial.json"   # resumable: a killed run keeps every finished searcher
    key = partial_key(res)
    done = {}
    if partial.is_file():
        saved = json.loads(partial.read_text())
        if saved.get("key") == key:
            done = saved["searchers"]
            print(f"reusing {len(done)} searchers finished by an earlier run with the same code and settings "
                  f"({partial})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.searchers:
        if kind in done:
            res["searchers"][kind] = done[kind]
            continue
        runs = [run_searcher(land, kind, seed, args.trials) for seed in range(args.seeds)]
        per_n = {n: [scores_after(land, r["trained"], n) for r in runs] for n in checkpoints}
        res["searchers"][kind] = {
            "label": label(kind),
            "hv_ratio_median": {str(n): round(statistics.median(h for h, _ in v), 4) for n, v in per_n.items()},
            "hv_ratio_min": {str(n): round(min(h for h, _ in v), 4) for n, v in per_n.items()},
            "hv_ratio_mean": {str(n): round(float(np.mean([h for h, _ in v])), 4) for n, v in per_n.items()},
            "hv_ratio_se": {str(n): round(float(np.std([h for h, _ in v], ddof=1) / np.sqrt(len(v))), 4) if len(v) > 1
                            else None for n, v in per_n.items()},
            "regret_median": {str(n): round(statistics.median(g for _, g in v), 4) for n, v in per_n.items()},
            "wasted_proposals_median": statistics.median(r["wasted"] for r in runs),
            "trained_over_budget": sum(r["trained_over_budget"] for r in runs),
            "trained_repeats": sum(r["trained_repeats"] for r in runs),
        }
        print(kind, res["searchers"][kind], f"{time.time() - t0:.0f}s", flush=True)
        done[kind] = res["searchers"][kind]
        partial.write_text(json.dumps({"key": key, "searchers": done}, indent=1) + "\n")
    ray.shutdown()
    res["searchers"].update(baseline_rows(land, checkpoints))
    res["noise_ceiling"] = noise_ceiling(land)
    ranked = sorted(res["searchers"], key=lambda k: (res["searchers"][k]["hv_ratio_median"].get("16", 0),
                                                     res["searchers"][k]["hv_ratio_median"].get("8", 0)), reverse=True)
    res["ranking_by_hv_at_16"] = ranked
    res["default_searcher"] = _default_searcher()
    (args.out / "search.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "search.md").write_text(to_markdown(res, checkpoints))
    partial.unlink(missing_ok=True)   # this run's own scratch file, superseded by search.json
    print(f"wrote {args.out / 'search.md'}")
    return 0


def partial_key(res: dict) -> dict:
    """What a finished searcher's result depends on: the landscape, the settings and the code."""
    return {k: res[k] for k in ("source", "landscape_commit", "stage", "budget_avg_bits", "seeds", "trials",
                                "default_seed_plans", "prior_scores")} | {"code": code_fingerprint()}


def code_fingerprint() -> str:
    """Hash of the code a result depends on (qpruner/ and this benchmark): a partial run is reused only by
    the same code."""
    import hashlib
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "qpruner").rglob("*.py"), Path(__file__).resolve(), ROOT / "bench" / "landscape.py"]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _default_searcher() -> str:
    from qpruner.config import SearchConfig
    return SearchConfig().searcher


def _mean_se(s: dict, n: int) -> str:
    mean, se = s.get("hv_ratio_mean", {}).get(str(n)), s.get("hv_ratio_se", {}).get(str(n))
    return "" if mean is None else f"{mean:.3f}" + ("" if se is None else f" ± {se:.3f}")


def _prior(r: dict) -> str:
    p = r.get("prior_scores") or {"method": "fisher", "source": "recorded with the landscape"}
    return f"{p['method']}, {p['source']}"


def to_markdown(r: dict, checkpoints) -> str:
    head = "| searcher | " + " | ".join(f"N={n}" for n in checkpoints) + " |"
    rule = "|---|" + "---:|" * len(checkpoints)
    out = [f"# Search benchmark — replay of recorded real trials ({r['stage']} stage)", "",
           f"**What this measures:** every searcher runs through the real Ray Tune search loop (budget/cache wrapper, "
           f"tracker callback, 2 trials at a time) against a trainable that looks each plan's result up in "
           f"`{r['source']}` — {r['plans']} plans of SmolLM2-135M pruned as in the demo, 8 layer groups x "
           f"{{nf4, int8}}, each recorded as a real trial. Nothing is retrained here; no searcher sees the "
           f"recorded qualities before proposing (they get the exact memory tables and the layer scores: "
           f"{_prior(r)}). Quality: {r['quality']}. Budget {r['budget_avg_bits']} average bits: "
           f"{r['feasible']} plans fit; the exact front of those has {r['front_size']} plans.", "",
           f"Command: `{r['command']}` at commit `{r['commit'][:10]}`{' (uncommitted changes)' if r['dirty'] else ''}; "
           f"landscape recorded at `{str(r['landscape_commit'])[:10]}`. {r['machine']}, {r['date']}. "
           f"Default searcher: `{r['default_searcher']}`.", "",
           f"## Hypervolume of the front found after N trained trials / exact front's (median over {r['seeds']} seeds)",
           "", head, rule]
    for kind, s in r["searchers"].items():
        out.append(f"| {s['label']} | " + " | ".join(f"{s['hv_ratio_median'][str(n)]:.3f}" for n in checkpoints) + " |")
    if "noise_ceiling" in r:
        nc = r["noise_ceiling"]
        out += ["", f"Noise ceiling: with every plan's NLL drawn again with the same-seed noise ({nc['noise_sd_nll']}), the "
                f"exact front's plans reach {nc['median']:.3f} of the re-drawn front (10th percentile {nc['p10']:.3f}): "
                "ratios closer together than that are not told apart. Baseline rows are deterministic (one run per N, "
                "Tune-free driver `bench/search_drivers.py`)."]
    out += ["", "Mean ± standard error over the seeds (two searchers whose means differ by less than about twice "
            "their SEs are not told apart):", "", head, rule]
    for kind, s in r["searchers"].items():
        out.append(f"| {s['label']} | " + " | ".join(_mean_se(s, n) for n in checkpoints) + " |")
    out += ["", "Worst seed:", "", head, rule]
    for kind, s in r["searchers"].items():
        out.append(f"| {s['label']} | " + " | ".join(f"{s['hv_ratio_min'][str(n)]:.3f}" for n in checkpoints) + " |")
    out += ["", "## Regret of the best quality within the budget, (best - found) / (best - worst), median", "",
            head, rule]
    for kind, s in r["searchers"].items():
        out.append(f"| {s['label']} | " + " | ".join(f"{s['regret_median'][str(n)]:.4f}" for n in checkpoints) + " |")
    out += ["", "## Wasted proposals (answered without training: over the budget or a repeat)", "",
            "| searcher | median per search | trained over budget (all seeds) | trained repeats (all seeds) |",
            "|---|---:|---:|---:|"]
    for kind, s in r["searchers"].items():
        out.append(f"| {s['label']} | {s['wasted_proposals_median']} | {s['trained_over_budget']} | "
                   f"{s['trained_repeats']} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
