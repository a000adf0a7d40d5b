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


@given(formats, st.sampled_from(["layer", "group", "linear"]),
       st.one_of(st.none(), st.sampled_from([0.0, 0.1, 0.2, 0.35])))
def test_a_plan_with_its_pruning_amount_round_trips_through_every_encoding(fmts, unit, pruned):
    from qpruner.results import plan_columns, plan_of_row
    plan = PrecisionPlan(tuple(fmts), unit, pruned)
    assert PrecisionPlan.from_dict(plan.to_dict()) == plan
    assert PrecisionPlan.from_key(plan.key(), unit) == plan
    assert plan_of_row(plan_columns(plan)) == plan
    bits = plan.bits
    assert policy.decode(policy.encode(plan), len(bits), "nf4", unit).pruned == pruned
    assert (plan.key() == ",".join(fmts)) == (pruned is None)    # one identity: the amount is part of it
    assert plan.code().startswith(f"p{100 * pruned:g}-") if pruned is not None else len(plan.code()) == len(plan)


def test_the_same_formats_at_two_pruning_amounts_are_two_plans():
    a, b = PrecisionPlan(("nf4", "int8"), pruned=0.1), PrecisionPlan(("nf4", "int8"), pruned=0.2)
    assert a != b and a.key() != b.key() and len({a, b, PrecisionPlan(("nf4", "int8"))}) == 3
    assert PrecisionPlan(("nf4",), pruned=0.1 + 1e-12) == PrecisionPlan(("nf4",), pruned=0.1)
    with pytest.raises(PlanError, match="pruning amount"):
        PrecisionPlan(("nf4",), pruned=1.5)
