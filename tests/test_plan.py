import pytest
from hypothesis import given, strategies as st

from qpruner import policy
from qpruner.errors import PlanError
from qpruner.plan import PrecisionPlan

formats = st.lists(st.sampled_from(["nf4", "fp4", "int8", "bf16"]), min_size=1, max_size=40)


@given(formats)
def test_dict_round_trip(fmts):
    plan = PrecisionPlan(tuple(fmts))
    assert PrecisionPlan.from_dict(plan.to_dict()) == plan
    assert len(plan.code()) == len(plan)


@given(st.lists(st.sampled_from([4, 8, 16]), min_size=1, max_size=40))
def test_search_encoding_round_trips(bits):
    plan = PrecisionPlan.from_bits(bits)
    assert policy.decode(policy.encode(plan), len(bits)) == plan
    assert plan.bits == tuple(bits)


def test_bad_plans_are_rejected_with_reasons():
    with pytest.raises(PlanError, match="unknown format"):
        PrecisionPlan(("nf4", "int3"))
    with pytest.raises(PlanError, match="unsupported bit width 5"):
        PrecisionPlan.from_bits([4, 5])
    with pytest.raises(PlanError, match="version"):
        PrecisionPlan.from_dict({"version": 99, "formats": ["nf4"]})
    with pytest.raises(PlanError, match="plan has 2 entries but the pruned model has 3 decoder layers"):
        PrecisionPlan(("nf4", "nf4")).check_units(3)
    with pytest.raises(PlanError, match="lacks 1 of 2 layers"):
        policy.decode({"bits_000": 4}, 2)
