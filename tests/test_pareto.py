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
    log = TrialLog(tmp_path, "accuracy", {PrecisionPlan(("nf4", "nf4")): "seed:uniform"})
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


def _row(tid, mb, windows, tokens=(10, 10, 10, 10)):
    import math
    nll = sum(windows) / sum(tokens)
    return {"trial_id": tid, "status": "ok", "plan_formats": tid, "plan_code": tid, "weight_bytes": mb * 1e6,
            "avg_bits": 4.0, "perplexity": math.exp(nll), "accuracy": 0.3, "nll_se": 0.5,
            "eval_window_nll": list(windows), "eval_window_tokens": list(tokens)}


def test_front_neighbours_are_told_apart_by_paired_differences():
    """Same tokens: a small but consistent gain is separable although each trial's own SE is large."""
    import pandas as pd
    from qpruner.pareto import pareto_front
    from qpruner.report import front_table
    base = [30.0, 50.0, 20.0, 40.0]                        # windows of very different difficulty
    trials = pd.DataFrame([_row("a", 100, base),
                           _row("b", 110, [w - 1.0 for w in base]),                    # 0.1 NLL better everywhere
                           _row("c", 120, [w - 1.0 - d for w, d in zip(base, (0.3, -0.3, 0.2, -0.1))])])
    front = pareto_front(trials, "perplexity")
    assert list(front["trial_id"]) == ["a", "b", "c"]
    assert front.loc[1, "gain"] == pytest.approx(0.1) and front.loc[1, "gain_se"] == pytest.approx(0.0, abs=1e-12)
    assert bool(front.loc[1, "separable"]) is True
    assert front.loc[2, "gain"] == pytest.approx(0.1 / 40) and bool(front.loc[2, "separable"]) is False
    table = front_table(front, "perplexity")
    assert "~" in table and "1 point(s) not better" in table


def test_front_gain_without_windows_is_unpaired():
    import math
    import pandas as pd
    from qpruner.pareto import pareto_front
    rows = [_row("a", 100, [40, 40, 40, 40]), _row("b", 110, [39, 39, 39, 39])]
    for r in rows:
        r.pop("eval_window_nll")
    front = pareto_front(pd.DataFrame(rows), "perplexity")
    assert front.loc[1, "gain"] == pytest.approx(0.1)
    assert front.loc[1, "gain_se"] == pytest.approx(math.sqrt(0.5))
    assert bool(front.loc[1, "separable"]) is False


def test_a_screen_never_stands_on_the_front_even_when_it_looks_better(tmp_path):
    from dataclasses import replace
    log = TrialLog(tmp_path, "accuracy")
    log.add("a", _result("44", 0.2, 1.0))
    log.add("s", replace(_result("48", 0.9, 1.0), status="screened", fidelity="screen"))
    assert list(log.front()["trial_id"]) == ["a"]
    assert set(log.trained()) == {"a"}                      # not a trained trial: no num_trials count
    assert log.lookup(_result("48", 0.9, 1.0).plan) is None  # and never answers a full proposal


def test_normalized_hypervolume_is_the_share_of_the_box_from_the_reference_to_the_ideal():
    from qpruner.pareto import normalized_hypervolume, trial_label
    # accuracy: ideal 1 at no memory; reference (0, 100): one point at (0.5 quality, 50 bytes) dominates 50 x 0.5
    assert normalized_hypervolume(25.0, (0.0, 100.0), "accuracy") == pytest.approx(25.0 / 100.0)
    # perplexity: the quality axis is -log(ppl), ideal 0; reference -log(V) = -5
    assert normalized_hypervolume(100.0, (-5.0, 100.0), "perplexity") == pytest.approx(100.0 / 500.0)
    assert normalized_hypervolume(1.0, (1.0, 100.0), "accuracy") == 0.0          # an empty box: 0, not a division
    assert trial_label({"trial_name": "t0007-44448888", "trial_id": "a3750c24"}) == "t0007"
    assert trial_label({"trial_name": None, "trial_id": "a3750c24"}) == "a3750c24"   # e.g. answered from the cache
    assert trial_label({"trial_name": float("nan"), "trial_id": "a3750c24"}) == "a3750c24"
