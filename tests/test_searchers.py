"""The budget/cache wrapper and the random searcher, driven directly (no Ray runtime needed)."""

import pytest
from ray import tune

from qpruner import models, policy
from qpruner.config import FinetuneConfig, QuantConfig
from qpruner.memory import Budget, ModelLayout
from qpruner.pareto import TrialLog, hypervolume
from qpruner.plan import PrecisionPlan
from qpruner.search.run import OverBudget, PlanDecoder
from qpruner.search.searchers import BudgetedSearcher, PlanScreen, RandomPlanSearcher
from qpruner.trial import Precheck, TrialResult

SPACE = {policy.key(i): tune.choice([4, 8, 16]) for i in range(4)}


class Scripted(RandomPlanSearcher):
    """Proposes a fixed list of plans and remembers what it was told."""

    def __init__(self, plans):
        super().__init__([policy.encode(PrecisionPlan.from_bits(b)) for b in plans])
        self.told = {}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told[trial_id] = (result, error)

    def suggest(self, trial_id):
        return self.points.pop(0) if self.points else tune.search.Searcher.FINISHED


def _wrapper(tmp_path, plans, avg_bits=9.0, max_rejections=50):
    layout = ModelLayout.from_model(models.tiny_model())
    pre = Precheck(layout, QuantConfig(), FinetuneConfig(), Budget(avg_bits=avg_bits), 64)
    log = TrialLog(tmp_path, "accuracy")
    inner = Scripted(plans)
    searcher = BudgetedSearcher(inner, PlanScreen(PlanDecoder(4, "nf4", "layer"), OverBudget(pre, "cpu"), log),
                                max_rejections)
    searcher.set_search_properties("objective", "max", SPACE)
    return searcher, inner, log, pre


def _finish(searcher, log, trial_id, config, pre, objective=0.5):
    plan = PlanDecoder(4, "nf4", "layer")(config)
    common, _ = pre(plan)
    result = TrialResult(status="ok", objective=objective, weight_bytes=common["weight_bytes_predicted"],
                         accuracy=objective, perplexity=2.0, **{k: v for k, v in common.items()})
    metrics = result.to_metrics()
    log.add(trial_id, result)
    searcher.on_trial_complete(trial_id, metrics)


def test_over_budget_plans_are_answered_not_trained(tmp_path):
    searcher, inner, log, pre = _wrapper(tmp_path, [[16, 16, 16, 16], [4, 4, 4, 4]])
    config = searcher.suggest("t1")
    assert PlanDecoder(4, "nf4", "layer")(config).code() == "4444"
    rows = log.frame()
    assert list(rows["status"]) == ["infeasible"] and rows.loc[0, "plan_code"] == "HHHH"
    told = [r for r, _ in inner.told.values()]
    assert len(told) == 1 and told[0]["objective"] < -1000 and "weight_bytes" in told[0]


def test_repeats_are_cached_and_duplicates_wait_for_the_running_trial(tmp_path):
    plans = [[4, 4, 4, 4], [4, 4, 4, 4], [8, 4, 4, 4], [8, 4, 4, 4]]
    searcher, inner, log, pre = _wrapper(tmp_path, plans)
    c1 = searcher.suggest("t1")                 # 4444 -> trained
    c2 = searcher.suggest("t2")                 # 4444 again while t1 runs -> waits; 8444 -> trained
    assert PlanDecoder(4, "nf4", "layer")(c2).code() == "8444"
    _finish(searcher, log, "t1", c1, pre, objective=0.3)
    rows = log.frame()
    cached = rows[rows["status"] == "cached"]
    assert list(cached["cached_from"]) == ["t1"] and cached.iloc[0]["objective"] == pytest.approx(0.3)
    assert sum(1 for r, _ in inner.told.values() if r and r["objective"] == pytest.approx(0.3)) == 2
    _finish(searcher, log, "t2", c2, pre)
    assert searcher.suggest("t3") == tune.search.Searcher.FINISHED  # the last 8444 is answered from t2
    rows = log.frame()
    assert (rows["status"] == "cached").sum() == 2 and "t2" in set(rows["cached_from"].dropna())


def test_the_search_ends_when_only_answered_plans_remain(tmp_path):
    searcher, inner, log, pre = _wrapper(tmp_path, [[4, 4, 4, 4]], max_rejections=5)
    config = searcher.suggest("t1")
    _finish(searcher, log, "t1", config, pre)
    inner.points = [policy.encode(PrecisionPlan.from_bits([4, 4, 4, 4]))] * 10
    assert searcher.suggest("t2") == tune.search.Searcher.FINISHED
    assert (log.frame()["status"] == "cached").sum() == 5


def test_wrapper_state_round_trips(tmp_path):
    searcher, inner, log, pre = _wrapper(tmp_path, [[4, 4, 4, 4], [8, 8, 8, 8]])
    searcher.suggest("t1")
    state = searcher.get_state()
    other, *_ = _wrapper(tmp_path / "b", [])
    other.set_state(state)
    assert other.get_state() == state and "t1" in other.live


def test_random_searcher_is_seeded_and_restorable(tmp_path):
    a, b = RandomPlanSearcher(seed=3), RandomPlanSearcher(seed=3)
    for s in (a, b):
        s.set_search_properties("objective", "max", SPACE)
    assert [a.suggest(str(i)) for i in range(5)] == [b.suggest(str(i)) for i in range(5)]
    a.save(str(tmp_path / "s.pkl"))
    c = RandomPlanSearcher(seed=99)
    c.restore(str(tmp_path / "s.pkl"))
    assert [a.suggest(str(i)) for i in range(3)] == [c.suggest(str(i)) for i in range(3)]


def test_hypervolume_by_hand():
    # points (quality, cost): (1, 1), (2, 3); reference (0, 4): 1*3 + (2-1)*1 = ... area = 1*(3-1) + 2*(4-3)
    assert hypervolume([1.0, 2.0], [1.0, 3.0], (0.0, 4.0)) == pytest.approx(1 * 2 + 2 * 1)
    assert hypervolume([1.0, 0.5], [1.0, 2.0], (0.0, 4.0)) == pytest.approx(1 * 3)  # dominated point adds nothing
    assert hypervolume([], [], (0.0, 1.0)) == 0.0


class Recorder(RandomPlanSearcher):
    def __init__(self):
        super().__init__([])
        self.told = []

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result))


def test_tpe_is_told_quality_above_the_uniform_line():
    """Results are held until the seed phase fixes the line, then every result is scored against it."""
    from qpruner.search.searchers import AboveTheLine
    inner = Recorder()
    wrapper = AboveTheLine(inner, freeze_after=2)
    wrapper.on_trial_complete("small", {"objective": -4.0, "weight_bytes": 100e6, "plan_code": "44"})
    assert inner.told == []                                      # the line is not known yet
    wrapper.on_trial_complete("over", {"objective": -1000.2, "weight_bytes": 200e6})   # over budget: no anchor
    assert inner.told == []
    wrapper.on_trial_complete("large", {"objective": -3.8, "weight_bytes": 140e6, "plan_code": "88"})
    told = dict(inner.told)
    assert told["small"]["objective"] == pytest.approx(0.0) and told["large"]["objective"] == pytest.approx(0.0)
    assert told["over"]["objective"] == -1000.2                  # not-trained answers pass unchanged
    wrapper.on_trial_complete("mixed", {"objective": -3.85, "weight_bytes": 120e6})
    assert dict(inner.told)["mixed"]["objective"] == pytest.approx(0.05)   # 0.05 above the line at 120 MB
    state = wrapper.get_state()
    again = AboveTheLine(Recorder(), 2)
    again.set_state(state)
    assert again.slope == pytest.approx(wrapper.slope) and again.anchor == wrapper.anchor


def test_screens_run_even_when_the_plan_is_known_and_never_count_as_trials(tmp_path):
    from qpruner.search.additive import FIDELITY_KEY, SCREEN
    searcher, inner, log, pre = _wrapper(tmp_path, [])
    searcher.num_trials = 1
    screen = {**policy.encode(PrecisionPlan.from_bits([4, 4, 4, 4])), FIDELITY_KEY: SCREEN}
    full = policy.encode(PrecisionPlan.from_bits([4, 4, 4, 4]))
    inner.points = [dict(screen), dict(full), dict(screen)]
    assert searcher.suggest("s1") == screen and "s1" in searcher.screens
    assert not searcher._enough()                      # a running screen is not a trial
    plan = PlanDecoder(4, "nf4", "layer")(screen)
    common, _ = pre(plan)
    result = TrialResult(status="screened", fidelity="screen", objective=0.1, weight_bytes=common["weight_bytes_predicted"],
                         **common)
    log.add("s1", result)
    searcher.on_trial_complete("s1", result.to_metrics())
    assert searcher.suggest("f1") == full               # not answered from the screen's row
    _finish(searcher, log, "f1", full, pre, objective=0.4)
    assert searcher._enough() and searcher.suggest("x") == tune.search.Searcher.FINISHED
    rows = log.frame()
    assert sorted(rows["status"]) == ["ok", "screened"] and set(rows["fidelity"]) == {"full", "screen"}


def test_a_screen_that_errors_is_recorded_as_a_screen_not_a_trained_trial(tmp_path):
    from types import SimpleNamespace

    from qpruner.search.additive import FIDELITY_KEY, SCREEN
    from qpruner.search.callbacks import PersistTrials
    log = TrialLog(tmp_path, "accuracy")
    callback = PersistTrials(log, PlanDecoder(4, "nf4", "layer"), "job")
    config = {**policy.encode(PrecisionPlan.from_bits([4, 8, 4, 8])), FIDELITY_KEY: SCREEN}
    trial = SimpleNamespace(trial_id="s1", config=config, get_error=lambda: RuntimeError("worker died"))
    callback.on_trial_error(0, [], trial)
    rows = log.frame()
    assert list(rows["status"]) == ["screened"] and list(rows["fidelity"]) == ["screen"]
    assert "worker died" in rows.loc[0, "error"] and log.trained() == {}


def test_the_schedulers_clock_and_a_restored_experiments_clock():
    """eval_round counts evaluations (the final one included); a Tuner restored from before progress reports
    counts Tune's iterations, and its trials then report no progress (run._counts_iterations)."""
    import types

    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    from qpruner.config import FinetuneConfig
    from qpruner.search.run import EVAL_ROUND, _counts_iterations, final_round
    assert final_round(FinetuneConfig(steps=10)) == 1
    assert final_round(FinetuneConfig(steps=8, eval_every=2)) == 4        # at 2, 4, 6, then the final one
    assert final_round(FinetuneConfig(steps=9, eval_every=2)) == 5
    tuner = lambda sched: types.SimpleNamespace(_local_tuner=types.SimpleNamespace(
        _tune_config=types.SimpleNamespace(scheduler=sched)))
    assert _counts_iterations(tuner(AsyncHyperBandScheduler(time_attr="training_iteration")))
    assert not _counts_iterations(tuner(AsyncHyperBandScheduler(time_attr=EVAL_ROUND)))
    assert not _counts_iterations(tuner(FIFOScheduler())) and not _counts_iterations(object())


def test_progress_reports_never_reach_the_inner_searcher():
    from qpruner.search.searchers import BudgetedSearcher
    seen = []
    fake = BudgetedSearcher.__new__(BudgetedSearcher)
    fake.live = {"t1": "t1~1"}
    fake.searcher = type("S", (), {"on_trial_result": lambda self, tid, r: seen.append(r)})()
    fake.on_trial_result("t1", {"status": "training", "step": 3, "train_loss": 2.0})
    fake.on_trial_result("t1", {"status": "running", "objective": -3.0, "eval_round": 1})
    assert seen == [{"status": "running", "objective": -3.0, "eval_round": 1}]
