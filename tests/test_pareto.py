import pandas as pd
import pytest
from hypothesis import given, strategies as st

from qpruner.pareto import PARETO_FILE, TRIALS_FILE, TrialLog, front_mask, pareto_front
from qpruner.plan import PrecisionPlan
from qpruner.trial import TrialResult


def dominates(a, b, maximize=True):
    qa, qb = (a[0], b[0]) if maximize else (-a[0], -b[0])
    return qa >= qb and a[1] <= b[1] and (qa > qb or a[1] < b[1])


points = st.lists(st.tuples(st.integers(0, 20).map(float), st.integers(1, 20).map(float)), min_size=1, max_size=25)


@given(points, st.booleans())
def test_front_is_exactly_the_non_dominated_set(pts, maximize):
    mask = front_mask([p[0] for p in pts], [p[1] for p in pts], maximize)
    for i, p in enumerate(pts):
        dominated = any(dominates(q, p, maximize) for j, q in enumerate(pts) if j != i)
        assert mask[i] == (not dominated)
    assert any(mask)


def _result(code, acc, mb, status="ok"):
    plan = PrecisionPlan.from_bits([{"4": 4, "8": 8, "H": 16}[c] for c in code])
    return TrialResult(plan=plan, status=status, objective=acc, weight_bytes=int(mb * 1e6),
                       weight_bytes_predicted=int(mb * 1e6), avg_bits=8.0, accuracy=acc if status == "ok" else None,
                       perplexity=1.0 / acc if status == "ok" else None, seconds={"total": 1.0})


def test_trial_log_persists_every_trial_and_the_front(tmp_path):
    log = TrialLog(tmp_path, "accuracy", {("nf4", "nf4"): "seed:uniform"})
    log.add("a", _result("44", 0.20, 1.0))
    log.add("b", _result("88", 0.30, 2.0))
    log.add("c", _result("48", 0.19, 1.5))          # dominated by a
    log.add("d", _result("HH", 0.0, 9.0, status="infeasible"))
    log.add_error("e", PrecisionPlan.from_bits([8, 16]), "Traceback ...\nRuntimeError: boom")
    trials = pd.read_parquet(tmp_path / TRIALS_FILE)
    front = pd.read_parquet(tmp_path / PARETO_FILE)
    assert list(trials["trial_id"]) == ["a", "b", "c", "d", "e"]
    assert list(trials["status"]) == ["ok", "ok", "ok", "infeasible", "error"]
    assert trials.loc[0, "origin"] == "seed:uniform" and trials.loc[1, "origin"] == "searcher"
    assert "boom" in trials.loc[4, "error"]
    assert list(front["trial_id"]) == ["a", "b"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_front_uses_perplexity_lower_is_better(tmp_path):
    log = TrialLog(tmp_path, "perplexity")
    log.add("a", _result("44", 0.25, 1.0))  # ppl 4
    log.add("b", _result("88", 0.20, 2.0))  # ppl 5 and bigger: dominated
    assert list(log.front()["trial_id"]) == ["a"]


def test_repeated_plans_appear_once_on_the_front(tmp_path):
    log = TrialLog(tmp_path, "accuracy")
    log.add("a", _result("44", 0.2, 1.0))
    log.add("b", _result("44", 0.2, 1.0))
    assert list(log.front()["trial_id"]) == ["a"]
    assert pareto_front(pd.DataFrame(), "accuracy").empty
