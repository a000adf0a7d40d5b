import pytest
from hypothesis import given, strategies as st

from qpruner import policy
from qpruner.errors import PlanError
from qpruner.plan import PrecisionPlan

formats = st.lists(st.sampled_from(["nf4", "fp4", "int8", "bf16"]), min_size=1, max_size=40)


@given(formats, st.sampled_from(["layer", "group", "linear"]))
def test_dict_round_trip(fmts, unit):
    plan = PrecisionPlan(tuple(fmts), unit)
    assert PrecisionPlan.from_dict(plan.to_dict()) == plan
    assert len(plan.code()) == len(plan)


@given(st.lists(st.sampled_from([4, 8, 16]), min_size=1, max_size=40), st.sampled_from(["layer", "group", "linear"]),
       st.sampled_from(["nf4", "fp4"]))
def test_search_encoding_round_trips(bits, unit, four_bit):
    plan = PrecisionPlan.from_bits(bits, four_bit, unit)
    assert policy.decode(policy.encode(plan), len(bits), four_bit, unit) == plan
    assert plan.bits == tuple(bits)


def test_bad_plans_are_rejected_with_reasons():
    with pytest.raises(PlanError, match="unknown format"):
        PrecisionPlan(("nf4", "int3"))
    with pytest.raises(PlanError, match="unsupported bit width 5"):
        PrecisionPlan.from_bits([4, 5])
    with pytest.raises(PlanError, match="version"):
        PrecisionPlan.from_dict({"version": 99, "formats": ["nf4"]})
    with pytest.raises(PlanError, match=r"plan has 2 entries but the pruned model has 3 layer units \(3 decoder"):
        PrecisionPlan(("nf4", "nf4")).check_units(3)
    with pytest.raises(PlanError, match="has 6 group units"):
        PrecisionPlan(("nf4",) * 4, "group").check_units(3)
    with pytest.raises(PlanError, match="unknown unit"):
        PrecisionPlan(("nf4",), "block")
    with pytest.raises(PlanError, match="lacks 1 of 2 units"):
        policy.decode({"bits_000": 4}, 2)


def test_per_linear_expansion():
    plan = PrecisionPlan(("nf4", "int8", "bf16", "fp4"), "group")
    layers = plan.per_linear()
    assert len(layers) == 2 and plan.n_layers() == 2
    assert layers[0] == {"q_proj": "nf4", "k_proj": "nf4", "v_proj": "nf4", "o_proj": "nf4",
                         "gate_proj": "int8", "up_proj": "int8", "down_proj": "int8"}
    assert layers[1]["o_proj"] == "bf16" and layers[1]["down_proj"] == "fp4"
    linear = PrecisionPlan(tuple(["nf4", "int8"] * 7), "linear")
    assert list(linear.per_linear()[1].values()) == ["int8", "nf4", "int8", "nf4", "int8", "nf4", "int8"]
