"""The memory-aware Bayesian searcher: knapsack, surrogate, hypervolume, and the Tune Searcher (no Ray runtime)."""

import itertools
import pickle

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from qpruner.frontier import (StepModel, front_points, hv_improvement, hv_improvements, hypervolume, knapsack_front,
                              prior_gain, score_shares)
from qpruner.memory import Budget, UnitCosts
from qpruner.search.additive import AdditiveSearcher

U = 8
WIDTH = np.array([1 + i % 3 for i in range(U)], dtype=float)
KEYS = [f"bits_{i:03d}" for i in range(U)]
WEIGHTS = np.stack([WIDTH, 2 * WIDTH], axis=1) * 1e6       # nf4, int8 bytes per unit


def _costs(avg_bits=6.5):
    numel = int(WEIGHTS[:, 0].sum() * 8 / 4)                 # all-nf4 = 4 average bits
    return UnitCosts(WEIGHTS, np.zeros_like(WEIGHTS), 1e7, numel, Budget(avg_bits=avg_bits))


def _quality(sens):
    return lambda idx: -float(sum(sens[u] * (1.0 if k == 0 else 0.05) for u, k in enumerate(idx)))


def _exact(costs, quality):
    plans = [p for p in itertools.product((0, 1), repeat=U) if costs.fits(np.array(p))]
    pts = [(costs.total(np.array(p)), quality(p)) for p in plans]
    qs = [q for _, q in pts]
    ref = (max(c for c, _ in pts) + 1, min(qs) - 0.1 * (max(qs) - min(qs)))
    return plans, pts, ref


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6), st.floats(0.3, 1.0))
@example([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], 0.99999)
def test_knapsack_front_is_the_exact_best_plan_at_every_capacity(values, frac):
    """Brute force over 2^3 x 2 options: the knapsack's plans are exactly the value-maximising plans."""
    vals = np.array(values).reshape(3, 2)
    costs = np.array([[1.0, 3.0], [2.0, 5.0], [1.0, 4.0]])
    cap = costs.min(1).sum() + frac * (costs.max(1).sum() - costs.min(1).sum())
    rows = knapsack_front(vals, costs, cap, bins=1000)
    every = [np.array(p) for p in itertools.product((0, 1), repeat=3)]
    value = lambda p: vals[np.arange(3), p].sum()
    cost = lambda p: costs[np.arange(3), p].sum()
    step = (cap - costs.min(1).sum()) / 1000
    # costs are rounded to bins: a plan may overshoot by rounding (at most half a bin per unit), and callers
    # re-check the exact budget, as here (hypothesis found frac=0.99999: the all-upgrade plan 8e-5 over)
    assert all(cost(r) <= cap + 3 * step / 2 + 1e-9 for r in rows)
    rows = [r for r in rows if cost(r) <= cap + 1e-9]
    feasible = [p for p in every if cost(p) <= cap + 1e-9]
    top = max(feasible, key=value)
    # the best feasible plan is found, unless it lies within rounding of the capacity (its bin then went to a
    # plan that overshoots by rounding and was dropped)
    assert max(value(r) for r in rows) == pytest.approx(value(top)) or cost(top) > cap - 3 * step
    for r in rows:  # nothing cheaper-or-equal is better
        assert not any(value(p) > value(r) + 1e-9 and cost(p) <= cost(r) for p in every)


def test_hypervolume_and_improvement():
    ref = (10.0, 0.0)
    assert hypervolume([(2.0, 1.0), (5.0, 2.0)], ref) == pytest.approx(8 * 1 + 5 * 1)
    assert front_points([(2.0, 1.0), (3.0, 0.5), (5.0, 2.0)]) == [(2.0, 1.0), (5.0, 2.0)]
    assert hv_improvement([(2.0, 1.0)], (3.0, 0.5), ref) == 0.0          # dominated: adds nothing
    assert hv_improvement([(2.0, 1.0)], (4.0, 3.0), ref) == pytest.approx(6 * 2)


def test_prior_gain_follows_scores_and_bits():
    g = prior_gain([1.0, 3.0], [4, 8, 16])
    assert g.shape == (2, 3) and np.all(g[:, 0] == 0)
    assert g[1, 2] > g[0, 2] and g[0, 1] > 0.99 * g[0, 2]      # int8 removes ~all of 4-bit's noise
    assert g[:, 2].sum() == pytest.approx(1.0)


def test_step_model_recovers_unit_effects():
    rng = np.random.default_rng(0)
    effect = rng.lognormal(0, 1, U)
    plans = rng.integers(0, 2, size=(24, U))
    y = 3.0 + plans @ effect
    model = StepModel(score_shares(np.ones(U)), 2).fit(plans, y)
    mean, sd = model.predict(plans)
    assert np.max(np.abs(mean - y)) < 0.1 * np.ptp(y) and np.all(sd >= 0)
    assert np.corrcoef(model.effects(model.mean)[:, 1], effect)[0, 1] > 0.95


def test_step_model_learns_each_steps_size_and_trusts_scores_as_far_as_they_hold():
    """Three options: the top step gains 0.1 of the first (the prior says 0.12); with scores that point the
    right way the fit puts the gain where they point, with scores that point the wrong way it spreads it."""
    rng = np.random.default_rng(3)
    n = 12
    gain1 = rng.lognormal(0, 1, n)
    gain2 = 0.1 * gain1
    plans = rng.integers(0, 3, size=(60, n))
    y = ((plans >= 1) * gain1).sum(1) + ((plans >= 2) * gain2).sum(1) + rng.normal(0, 0.01, 60)
    good = StepModel(score_shares(gain1), 3).fit(plans, y)
    eff = good.effects(good.mean)
    assert np.corrcoef(eff[:, 1], gain1)[0, 1] > 0.95
    assert (eff[:, 2] - eff[:, 1]).sum() == pytest.approx(gain2.sum(), rel=0.3)
    wrong = StepModel(score_shares(1.0 / gain1), 3).fit(plans, y)
    assert wrong.mean[1] < good.mean[1]                  # G_1: the weight on the (misleading) scores shrinks


def test_hv_improvements_match_the_hypervolume_difference():
    rng = np.random.default_rng(0)
    ref = (100.0, -1.0)
    known = rng.uniform(0, 90, (7, 2))
    cands = rng.uniform(0, 95, (40, 2))
    got = hv_improvements(known[:, 0], known[:, 1], cands[:, 0], cands[:, 1], ref)
    pts = [tuple(p) for p in known]
    want = [hv_improvement(pts, tuple(c), ref) for c in cands]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert hv_improvements([], [], [10.0], [1.0], ref) == pytest.approx([(100 - 10) * 2.0])


def _searcher(costs, seed=0, scores=None, points=None):
    return AdditiveSearcher(KEYS, [4, 8], costs, scores, points, seed), KEYS


def _run(searcher, quality, n, concurrency=1):
    got, pending = [], []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        if config is None or config == AdditiveSearcher.FINISHED:
            break
        pending.append((f"t{i}", searcher._idx(config)))
        if len(pending) >= concurrency:
            tid, idx = pending.pop(0)
            got.append(idx)
            searcher.on_trial_complete(tid, {"objective": quality(idx)})
    return got


@pytest.mark.parametrize("concurrency", [1, 2])
def test_searcher_fills_the_front_within_budget_without_repeats(concurrency):
    rng = np.random.default_rng(1)
    sens = rng.lognormal(0, 1, U) * WIDTH
    costs, quality = _costs(), _quality(sens)
    plans, pts, ref = _exact(costs, quality)
    exact = hypervolume(pts, ref)
    searcher, keys = _searcher(costs, scores=sens * rng.lognormal(0, 0.5, U),
                               points=[{k: 4 for k in KEYS}])
    got = _run(searcher, quality, 16, concurrency)
    assert len(got) == len(set(got)) == 16 - (concurrency - 1)          # no repeats
    assert all(costs.fits(np.array(p)) for p in got)                    # never over the budget
    found = hypervolume([(costs.total(np.array(p)), quality(p)) for p in got], ref)
    assert found / exact > 0.95


def test_searcher_beats_random_sampling_on_average():
    ratios, randoms = [], []
    for seed in range(4):
        rng = np.random.default_rng(10 + seed)
        sens = rng.lognormal(0, 1, U) * WIDTH
        costs, quality = _costs(), _quality(sens)
        plans, pts, ref = _exact(costs, quality)
        exact = hypervolume(pts, ref)
        searcher, keys = _searcher(costs, seed=seed, scores=np.ones(U), points=[{k: 4 for k in KEYS}])
        got = _run(searcher, quality, 8)
        ratios.append(hypervolume([(costs.total(np.array(p)), quality(p)) for p in got], ref) / exact)
        pick = [plans[i] for i in rng.choice(len(plans), 8, replace=False)]
        randoms.append(hypervolume([(costs.total(np.array(p)), quality(p)) for p in pick], ref) / exact)
    assert np.median(ratios) > np.median(randoms) + 0.05


def test_searcher_finishes_when_the_space_is_exhausted_and_restores():
    costs = _costs(avg_bits=4.6)                      # room for one or two int8 units
    quality = _quality(np.ones(U))
    feasible = [p for p in itertools.product((0, 1), repeat=U) if costs.fits(np.array(p))]
    searcher, _ = _searcher(costs)
    got = _run(searcher, quality, 100)
    assert sorted(got) == sorted(feasible)            # every feasible plan once, then FINISHED
    searcher, _ = _searcher(costs)
    _run(searcher, quality, 3)
    blob = pickle.dumps(searcher.observed)
    searcher.save(path := __import__("tempfile").mktemp())
    again, _ = _searcher(costs)
    again.restore(path)
    assert pickle.dumps(again.observed) == blob and again.suggest("x") == searcher.suggest("x")


def test_over_budget_answers_are_remembered_not_fitted():
    costs = _costs()
    searcher, keys = _searcher(costs, points=[{k: 8 for k in KEYS}, {k: 4 for k in KEYS}])
    config = searcher.suggest("a")                   # all-int8 is over 6.5 bits: skipped, all-nf4 first
    assert set(config.values()) == {4}
    searcher.on_trial_complete("a", {"objective": -1000.5})
    assert searcher.observed == {} and len(searcher.evaluated) == 1


def test_tight_budget_on_many_units_never_ends_early():
    """30 units, room for only a few upgrades: random plans almost never fit, the fallback still finds new ones."""
    w = np.stack([np.full(30, 1e6), np.full(30, 2e6)], axis=1)
    numel = int(w[:, 0].sum() * 8 / 4)
    costs = UnitCosts(w, np.zeros_like(w), 1e7, numel, Budget(avg_bits=4.5))   # <= 3 upgrades of 30
    keys = [f"bits_{i:03d}" for i in range(30)]
    searcher = AdditiveSearcher(keys, [4, 8], costs, None, None, 0)
    got = []
    for i in range(40):
        config = searcher.suggest(f"t{i}")
        assert config is not None and config != AdditiveSearcher.FINISHED
        idx = searcher._idx(config)
        assert costs.fits(np.array(idx)) and idx not in got
        got.append(idx)
        searcher.on_trial_complete(f"t{i}", {"objective": -float(sum(k == 0 for k in idx))})


def test_knapsack_with_no_room_returns_the_cheapest_plan():
    costs = np.array([[1e6, 2e6], [1e6, 3e6]])
    rows = knapsack_front(np.array([[0.0, 1.0], [0.0, 1.0]]), costs, capacity=2e6)
    assert rows.tolist() == [[0, 0]]


def test_the_surrogate_learns_each_pruned_variants_offset():
    """Joint search: y = per-unit effects (shared) + an offset per pruning amount; the fit recovers both."""
    rng = np.random.default_rng(0)
    effects = rng.uniform(0.01, 0.2, U)
    offsets = np.array([0.0, -0.3, -0.8])
    shares = np.stack([score_shares(np.ones(U))] * 3)                  # [V, U]
    plans = rng.integers(0, 2, size=(60, U))
    variants = rng.integers(0, 3, size=60)
    y = (plans * effects).sum(1) + offsets[variants]
    model = StepModel(shares, 2).fit(plans, y, variants)
    mean, _ = model.predict(plans, variants)
    assert np.abs(mean - y).max() < 0.02
    theta = model.mean
    assert [model.offset(theta, v) for v in range(3)] == pytest.approx(offsets, abs=0.02)


def test_the_joint_searcher_prices_each_variant_with_its_own_tables():
    """Three pruned variants (narrower = cheaper); a budget in bytes that only the pruned ones' int8 plans meet.
    Every proposal names a variant, fits that variant's exact budget, and none repeats; the searcher finds
    the variants' fronts and hands its state through a JSON checkpoint."""
    budget = Budget(total_bytes=1e7 + WEIGHTS[:, 1].sum() * 0.85)
    tables = [UnitCosts(WEIGHTS * f, np.zeros_like(WEIGHTS), 1e7, int(WEIGHTS[:, 0].sum() * f * 2), budget)
              for f in (1.0, 0.8, 0.6)]
    amounts = [0.0, 0.2, 0.4]
    searcher = AdditiveSearcher(KEYS, [4, 8], tables, [None, None, None], None, 0,
                                variants=amounts, variant_key="prune_amount")
    sens = np.linspace(1.0, 0.1, U)
    seen = set()
    for i in range(30):
        config = searcher.suggest(f"t{i}")
        assert config["prune_amount"] in amounts
        plan = searcher._idx(config)
        v, idx = plan[0], np.array(plan[1:])
        assert tables[v].fits(idx) and plan not in seen
        seen.add(plan)
        quality = _quality(sens)(idx) - 0.5 * amounts[v]            # pruning costs quality
        searcher.on_trial_complete(f"t{i}", {"objective": quality})
    assert {p[0] for p in seen} == {0, 1, 2}
    assert not any(p[0] == 0 and all(k == 1 for k in p[1:]) for p in seen)   # unpruned all-int8: over budget
    path = __import__("tempfile").mktemp()
    searcher.save(path)
    again = AdditiveSearcher(KEYS, [4, 8], tables, [None] * 3, None, 0, variants=amounts, variant_key="prune_amount")
    again.restore(path)
    assert again.observed == searcher.observed and again.suggest("x") == searcher.suggest("x")


def test_many_running_trials_get_distinct_proposals_spread_over_memory():
    """64 proposals before any result (a cluster filling its slots): all feasible, all distinct, and spread
    along the memory axis rather than copies of one plan (each running trial enters the front at its
    draw's value)."""
    n = 30
    w = np.stack([np.full(n, 1e6), np.full(n, 2e6), np.full(n, 4e6)], axis=1)
    costs = UnitCosts(w, np.zeros_like(w), 1e7, int(w[:, 0].sum() * 2), Budget(avg_bits=8.5))
    keys = [f"bits_{i:03d}" for i in range(n)]
    scores = np.random.default_rng(0).lognormal(0, 1, n)
    searcher = AdditiveSearcher(keys, [4, 8, 16], costs, scores, [{k: 4 for k in keys}, {k: 8 for k in keys}], 0)
    for i, bits in enumerate((4, 8)):                          # the two ends are known
        searcher.suggest(f"end{i}")
        searcher.on_trial_complete(f"end{i}", {"objective": -3.8 + 0.17 * (bits == 8)})
    plans = [searcher._idx(searcher.suggest(f"t{i}")) for i in range(64)]
    assert len(set(plans)) == 64 and all(costs.fits(np.array(p)) for p in plans)
    mem = np.array([costs.total(np.array(p)) for p in plans])
    low, high = costs.total(np.zeros(n, dtype=int)), costs.capacity() + costs.fixed
    assert np.ptp(mem) > 0.5 * (high - low)
    hamming = [sum(a != b for a, b in zip(p, q)) for i, p in enumerate(plans) for q in plans[:i]]
    assert np.median(hamming) >= 3


def test_screens_teach_the_model_what_few_full_trials_cannot():
    """Full qualities of 3 plans, and screens of 40 more that see 1.5x the differences plus a discrepancy
    of their own: fitted with the screens, the model's unit effects follow the truth (the slope between
    fidelities is given); without them, three plans cannot tell 12 units apart."""
    from qpruner.frontier import Screens
    rng = np.random.default_rng(4)
    n = 12
    effect = rng.lognormal(0, 0.8, n)
    full_plans = np.array([np.zeros(n, int), np.ones(n, int), np.r_[np.ones(6, int), np.zeros(6, int)]])
    y = full_plans @ effect
    screen_plans = rng.integers(0, 2, size=(40, n))
    ys = 1.5 * (screen_plans @ (effect * rng.lognormal(0, 0.1, n))) + 2.0 + rng.normal(0, 0.02, 40)
    alone = StepModel(score_shares(np.ones(n)), 2).fit(full_plans, y)
    screened = StepModel(score_shares(np.ones(n)), 2).fit(full_plans, y, screen=Screens(screen_plans, ys, slope=1.5))
    corr = [np.corrcoef(m.effects(m.mean)[:, 1], effect)[0, 1] for m in (alone, screened)]
    assert corr[1] > 0.9 and corr[1] > corr[0] + 0.2
    # it still describes the full fidelity: the total gain is the full one, not 1.5x it
    assert screened.effects(screened.mean)[:, 1].sum() == pytest.approx(effect.sum(), rel=0.25)


def _screening(share, seed=0):
    costs = _costs()
    return AdditiveSearcher(KEYS, [4, 8], costs, None, [{k: 4 for k in KEYS}], seed, screen_share=share), costs


def test_screening_spends_its_share_of_the_compute_and_never_counts_screens_as_trained():
    from qpruner.search.additive import FIDELITY_KEY, SCREEN
    rng = np.random.default_rng(2)
    sens = rng.lognormal(0, 1, U) * WIDTH
    quality = _quality(sens)
    searcher, costs = _screening(0.3)
    seconds = {"screen": 1.0, "full": 10.0}
    spent = {"screen": 0.0, "full": 0.0}
    fulls, screens = [], []
    for i in range(40):
        config = searcher.suggest(f"t{i}")
        assert config != AdditiveSearcher.FINISHED
        kind = "screen" if config.get(FIDELITY_KEY) == SCREEN else "full"
        idx = searcher._idx({k: v for k, v in config.items() if k != FIDELITY_KEY})
        assert costs.fits(np.array(idx))
        (screens if kind == "screen" else fulls).append(idx)
        spent[kind] += seconds[kind]
        result = {"objective": 1.5 * quality(idx) + 0.3, "seconds_total": seconds[kind]} if kind == "screen" else \
            {"objective": quality(idx), "objective_screen": 1.5 * quality(idx) + 0.3, "seconds_total": seconds[kind]}
        searcher.on_trial_complete(f"t{i}", result)
    assert fulls[0] == (0,) * U and screens                        # the seed first, then screens and full trials
    assert 0.2 <= spent["screen"] / (spent["screen"] + spent["full"]) <= 0.3 + 1.0 / sum(spent.values())
    assert set(searcher.observed) == set(fulls) and len(set(fulls)) == len(fulls)   # screens are never "trained"
    assert len(set(screens)) == len(screens)
    assert set(searcher.screened) >= set(screens)                  # and full trials' own screens are kept too
    assert searcher._screens().slope == pytest.approx(1.5, rel=1e-6)
    # a full trial's candidates may be screened plans; a screen's never are
    model, thetas, rows, variants, keys = searcher._posterior()
    cand, _ = searcher._new(rows, variants, keys, screen=True)
    assert not {tuple(int(i) for i in r) for r in cand} & set(searcher.screened)


def test_screening_state_round_trips(tmp_path):
    searcher, _ = _screening(0.5)
    for i in range(5):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"objective": -float(i), "seconds_total": 2.0})
    searcher.suggest("running")
    path = tmp_path / "s.json"
    searcher.save(str(path))
    other, _ = _screening(0.5)
    other.restore(str(path))
    assert other.screened == searcher.screened and other.seconds == searcher.seconds
    assert other.pending_screens == searcher.pending_screens and other.observed == searcher.observed


def test_screen_share_must_be_a_share():
    with pytest.raises(ValueError, match="screen_share"):
        _screening(1.0)


def test_screens_that_cost_too_much_are_named_once(caplog):
    import logging
    searcher, _ = _screening(0.3)
    with caplog.at_level(logging.WARNING, logger="qpruner.search.additive"):
        for i, (fid, took) in enumerate((("full", 10.0), ("screen", 2.0), ("screen", 2.0))):
            searcher.suggest(f"t{i}")
            assert (f"t{i}" in searcher.pending_screens) == (fid == "screen")   # the seed, then two screens
            searcher.on_trial_complete(f"t{i}", {"objective": -float(i), "seconds_total": took})
    assert sum("a screen costs 20% of a full trial" in r.message for r in caplog.records) == 1


def test_a_failed_screen_is_not_screened_again_and_does_not_ban_training():
    searcher, _ = _screening(0.5)
    searcher.suggest("seed")
    searcher.on_trial_complete("seed", {"objective": -1.0, "seconds_total": 10.0})
    config = searcher.suggest("s1")
    idx = searcher._idx({k: v for k, v in config.items() if k != "fidelity"})
    assert "s1" in searcher.pending_screens
    searcher.on_trial_complete("s1", {"objective": -2000.0, "seconds_total": 1.0})   # e.g. out of memory
    assert idx in searcher.unscreenable and idx not in searcher.evaluated and idx not in searcher.screened


def test_a_searcher_pickled_by_an_earlier_version_gets_the_screening_state():
    import pickle
    searcher, _ = _screening(0.0)
    for name in ("screen_share", "pending_screens", "screened", "unscreenable", "seconds", "_warned_cost"):
        del searcher.__dict__[name]
    again = pickle.loads(pickle.dumps(searcher))
    assert again.screen_share == 0.0 and again.screened == {} and again.pending_screens == set()
    assert again.suggest("t0") is not None
