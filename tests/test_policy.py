import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qpruner import models, policy
from qpruner.config import PolicyConfig, QuantConfig
from qpruner.errors import PlanError
from qpruner.importance import LayerScores
from qpruner.memory import Budget, ModelLayout


def test_probabilities_are_distributions_and_follow_importance():
    p = policy.probabilities([1.0, 10.0, 100.0], 3, temperature=1.0)
    assert np.allclose(p.sum(1), 1.0)
    assert p[2, 2] > p[1, 2] > p[0, 2]  # more important -> more likely 16 bits
    assert p[0, 0] > p[1, 0] > p[2, 0]


def test_two_options_reduce_to_a_sigmoid():
    scores = np.array([1.0, 4.0, 16.0])
    z = (np.log(scores) - np.log(scores).mean()) / np.log(scores).std()
    for t in (0.5, 1.0, 3.0):
        p = policy.probabilities(scores, 2, t)
        assert np.allclose(p[:, 1], 1.0 / (1.0 + np.exp(-z / t)))


def test_equal_scores_give_uniform_choices():
    assert np.allclose(policy.probabilities([2.0] * 5, 3), 1.0 / 3)


def _memory():
    return policy.PlanMemory(ModelLayout.from_model(models.tiny_model()), QuantConfig(), "float32")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=4, max_size=4), st.floats(5.5, 16.0), st.integers(0, 10**6))
def test_every_seed_plan_meets_the_budget_and_is_distinct(scores, avg_bits, seed):
    memory = _memory()
    budget = Budget(avg_bits=avg_bits)
    seeds = policy.seed_plans(LayerScores("x", tuple(scores)), memory, PolicyConfig(seed_plans=4), budget, seed)
    assert seeds
    assert all(budget.fits(memory(s.plan)) for s in seeds)
    assert len({s.plan.formats for s in seeds}) == len(seeds)


def test_uniform_seeds_only_when_they_fit():
    memory = _memory()
    all8 = memory(policy.PrecisionPlan.uniform("int8", 4)).avg_bits
    seeds = policy.seed_plans(LayerScores("x", (1, 2, 3, 4)), memory, PolicyConfig(seed_plans=2),
                              Budget(avg_bits=all8), 0)
    uniform = [s.plan.code() for s in seeds if s.origin == "uniform"]
    assert uniform == ["4444", "8888"]


def test_impossible_budget_is_an_error():
    with pytest.raises(PlanError, match="exceeds the budget"):
        policy.seed_plans(LayerScores("x", (1, 2, 3, 4)), _memory(), PolicyConfig(), Budget(avg_bits=2.0), 0)


def test_scores_must_match_layers():
    with pytest.raises(PlanError, match="3 layer scores but the pruned model has 4"):
        policy.seed_plans(LayerScores("x", (1, 2, 3)), _memory(), PolicyConfig(), Budget(), 0)
