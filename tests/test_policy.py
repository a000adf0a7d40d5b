import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qpruner import models, policy
from qpruner.config import PolicyConfig, QuantConfig
from qpruner.errors import PlanError
from qpruner.unit_importance import UnitScores
from qpruner.memory import Budget, ModelLayout
from qpruner.plan import PrecisionPlan


def test_probabilities_are_distributions_and_follow_importance():
    p = policy.probabilities([1.0, 10.0, 100.0, 1000.0], 3, temperature=1.0)
    assert np.allclose(p.sum(1), 1.0) and (p >= 0).all()
    assert np.all(np.diff(p[:, 2]) > 0)   # more important -> more likely 16 bits
    assert np.all(np.diff(p[:, 0]) < 0)   # ... and less likely 4 bits


def test_every_precision_is_the_mode_somewhere():
    """The ordered-logit mapping makes the middle precision the most likely one for middling scores."""
    p = policy.probabilities(np.linspace(-3, 3, 61), 3, temperature=0.3)
    assert set(p.argmax(1)) == {0, 1, 2}


def test_two_options_reduce_to_a_sigmoid():
    scores = np.array([1.0, 4.0, 16.0])
    z = (np.log(scores) - np.log(scores).mean()) / np.log(scores).std()
    for t, beta in ((0.5, 0.0), (1.0, 0.3), (3.0, -1.0)):
        p = policy.probabilities(scores, 2, t, beta)
        assert np.allclose(p[:, 1], 1.0 / (1.0 + np.exp(-(z - beta) / t)))


def test_equal_scores_give_the_same_row_everywhere():
    p = policy.probabilities([2.0] * 5, 3, temperature=0.5)
    assert np.allclose(p, p[0]) and p[0, 0] == pytest.approx(p[0, 2])
    assert p[0, 1] > p[0, 0]  # at the default temperature the middle precision is the mode for z = 0


def test_negative_scores_are_standardised_without_log():
    p = policy.probabilities([-1.0, 0.0, 2.0], 2)
    assert p[2, 1] > p[1, 1] > p[0, 1]


def _memory():
    return policy.PlanMemory(ModelLayout.from_model(models.tiny_model()), QuantConfig(), "float32")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=8, max_size=8), st.floats(5.6, 16.0), st.integers(0, 10**6),
       st.sampled_from([(4, 8), (4, 8, 16), (8, 16)]))
def test_every_seed_plan_meets_the_budget_and_is_distinct(scores, avg_bits, seed, bits):
    memory = _memory()
    budget = Budget(avg_bits=avg_bits)
    try:
        seeds = policy.seed_plans(UnitScores("x", tuple(scores), "group"), memory,
                                  PolicyConfig(seed_plans=4, bits=bits), budget, seed)
    except PlanError as exc:  # only when even the all-lowest plan is over budget
        assert "exceeds the budget" in str(exc) and min(bits) == 8
        return
    assert seeds and all(s.plan.unit == "group" and len(s.plan) == 8 for s in seeds)
    assert all(budget.fits(memory(s.plan)) for s in seeds)
    assert len({s.plan.formats for s in seeds}) == len(seeds)
    assert sum(s.origin == "best_guess" for s in seeds) <= 1


def test_uniform_seeds_only_when_they_fit():
    memory = _memory()
    all8 = memory(PrecisionPlan.uniform("int8", 4)).avg_bits
    seeds = policy.seed_plans(UnitScores("x", (1, 2, 3, 4)), memory, PolicyConfig(seed_plans=2), Budget(avg_bits=all8), 0)
    assert [s.plan.code() for s in seeds if s.origin == "uniform"] == ["4444", "8888"]


def test_best_guess_spends_the_budget_on_the_important_units():
    memory = _memory()
    scores = UnitScores("x", (1.0, 100.0, 1.0, 1.0))
    # all-nf4 is 5.46 average bits on the tiny model, each int8 layer adds ~0.74: room for one upgrade
    costs = policy.unit_costs(memory, "layer", ["nf4", "int8"], Budget(avg_bits=6.3))
    idx = policy.best_guess(scores, costs, [4, 8])
    assert list(idx) == [0, 1, 0, 0]          # room for one upgrade: the important layer gets it
    no_budget = policy.unit_costs(memory, "layer", ["nf4", "int8", "bf16"], Budget())
    assert list(policy.best_guess(scores, no_budget, [4, 8, 16])) == [2, 2, 2, 2]


def test_sampling_is_centred_on_the_budget():
    """With a budget the thresholds shift so the *expected* plan fits; samples then sit near it."""
    memory = _memory()
    scores = UnitScores("x", tuple(np.linspace(1, 10, 8)), "group")
    budget = Budget(avg_bits=7.0)
    costs = policy.unit_costs(memory, "group", ["nf4", "int8", "bf16"], budget)
    beta = policy._calibrated_beta(scores, 3, 1.0, costs)
    assert costs.expected_fits(policy.probabilities(scores, 3, 1.0, beta))
    assert not costs.expected_fits(policy.probabilities(scores, 3, 1.0, beta - 0.05))


def test_impossible_budget_is_an_error():
    with pytest.raises(PlanError, match="exceeds the budget"):
        policy.seed_plans(UnitScores("x", (1, 2, 3, 4)), _memory(), PolicyConfig(), Budget(avg_bits=2.0), 0)


def test_scores_must_match_units():
    with pytest.raises(PlanError, match="3 unit scores but the pruned model has 4 layer units"):
        policy.seed_plans(UnitScores("x", (1, 2, 3)), _memory(), PolicyConfig(), Budget(), 0)


def test_sampled_seeds_spread_over_memory_when_the_budget_does_not_bind():
    """Budget just above uniform int8: the samples used to collapse onto uniform int8; now each aims at
    its own memory target between uniform nf4 and the largest other seed."""
    from qpruner.memory import LinearShape, ModelLayout
    from qpruner.config import QuantConfig
    shapes = (LinearShape(64, 64, False),) * 7
    layout = ModelLayout((shapes,) * 12, vocab=100, hidden=64, tied=True, head_bias=False, other_numel=64 * 25)
    memory = policy.PlanMemory(layout, QuantConfig(), "float32")
    all8 = memory(PrecisionPlan.uniform("int8", 12)).avg_bits
    scores = UnitScores("x", tuple(float(i + 1) for i in range(12)))
    seeds = policy.seed_plans(scores, memory, PolicyConfig(bits=(4, 8), seed_plans=4), Budget(avg_bits=all8 + 0.05), 0)
    sampled = [s for s in seeds if s.origin == "sampled"]
    assert len(sampled) == 4 and len({s.plan.formats for s in seeds}) == len(seeds)
    bits = sorted(memory(s.plan).avg_bits for s in sampled)
    low, high = memory(PrecisionPlan.uniform("nf4", 12)).avg_bits, all8
    assert low < bits[0] < bits[-1] < high and bits[-1] - bits[0] > 0.4 * (high - low)   # spread, not piled up


def test_default_seeds_are_the_ends_of_the_memory_range():
    """No sampled seeds (the default): the uniform plans that fit; the best guess only when just one does."""
    memory = _memory()
    all8 = memory(PrecisionPlan.uniform("int8", 4)).avg_bits
    scores = UnitScores("x", (1, 2, 3, 4))
    ends = policy.seed_plans(scores, memory, PolicyConfig(bits=(4, 8)), Budget(avg_bits=all8), 0)
    assert [(s.origin, s.plan.code()) for s in ends] == [("uniform", "4444"), ("uniform", "8888")]
    tight = policy.seed_plans(scores, memory, PolicyConfig(bits=(4, 8)), Budget(avg_bits=all8 - 1.0), 0)
    assert [s.origin for s in tight] == ["uniform", "best_guess"]      # one end fits: the best guess spans the range
    assert tight[1].plan.code() != "4444"


def test_greedy_chain_climbs_one_step_at_a_time_to_the_best_guess():
    memory = _memory()
    scores = UnitScores("x", (1.0, 100.0, 3.0, 2.0))
    costs = policy.unit_costs(memory, "layer", ["nf4", "int8", "bf16"], Budget(avg_bits=9.0))
    chain = policy.greedy_chain(scores, costs, [4, 8, 16])
    assert list(chain[0]) == [0, 0, 0, 0] and list(chain[-1]) == list(policy.best_guess(scores, costs, [4, 8, 16]))
    assert all(np.abs(b - a).sum() == 1 and np.all(b >= a) for a, b in zip(chain, chain[1:]))
    assert list(chain[1]) == [0, 1, 0, 0]                              # the most important layer first
    assert all(costs.fits(p) for p in chain)
    spaced = policy.chain_points(chain, 3)
    assert len(spaced) == 3 and list(spaced[0]) == list(chain[0]) and list(spaced[-1]) == list(chain[-1])
    assert len(policy.chain_points(chain, 100)) == len(chain)
