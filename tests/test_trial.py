import math

import pytest

from qpruner import models, quantize
from qpruner.config import EvalConfig, FinetuneConfig, QuantConfig
from qpruner.memory import Budget, ModelLayout
from qpruner.plan import PrecisionPlan
from qpruner.trial import FAILED_OBJECTIVE, INFEASIBLE_OBJECTIVE, TrialContext, TrialResult, run_trial


@pytest.fixture
def context(tiny, tiny_splits):
    from qpruner import prune
    from qpruner.config import PruneConfig
    prune.prune_(tiny, tiny_splits.calib, PruneConfig(ratio=0.5))
    config_dict, state = models.model_state(tiny)
    return TrialContext(config_dict, state, ModelLayout.from_model(tiny), tiny_splits.train[:64],
                        tiny_splits.eval, QuantConfig(), FinetuneConfig(steps=2, batch_size=2, lora_r=2),
                        EvalConfig(before_finetune=True), Budget(avg_bits=9.0))


def test_a_trial_quantizes_trains_evaluates_and_measures(context):
    plan = PrecisionPlan(("nf4", "int8", "nf4", "int8"))
    r = run_trial(context, plan)
    assert r.status == "ok" and r.error is None
    assert r.weight_bytes == r.weight_bytes_predicted
    assert 0.0 <= r.accuracy <= 1.0 and math.isfinite(r.perplexity) and r.perplexity > 1
    assert r.objective == r.accuracy
    assert r.perplexity_before is not None
    assert r.adapter_bytes > 0 and r.peak_kind in ("cpu_rss", "none")
    assert r.train_loss_first is not None and {"quantize", "finetune", "eval", "total"} <= set(r.seconds)
    again = TrialResult.from_metrics(r.to_metrics())
    assert again == r


def test_an_infeasible_plan_is_not_trained(context, monkeypatch):
    import qpruner.trial as trial_mod
    monkeypatch.setattr(trial_mod, "build_quantized", lambda *a, **k: pytest.fail("an infeasible plan was built"))
    r = run_trial(context, PrecisionPlan(("bf16",) * 4))
    assert r.status == "infeasible" and r.budget_excess > 0
    assert r.objective == pytest.approx(INFEASIBLE_OBJECTIVE - r.budget_excess)
    assert r.accuracy is None


def test_perplexity_objective(context):
    from dataclasses import replace
    r = run_trial(replace(context, metric="perplexity"), PrecisionPlan(("int8",) * 4))
    assert r.objective == pytest.approx(-math.log(r.perplexity))


def test_a_nan_loss_is_a_failed_trial_with_its_reason(context, monkeypatch):
    import qpruner.trial as trial_mod
    from qpruner.errors import TrialFailed

    def boom(*args, **kwargs):
        raise TrialFailed("non-finite training loss (nan) at step 0")

    monkeypatch.setattr(trial_mod, "finetune_", boom)
    r = run_trial(context, PrecisionPlan(("nf4",) * 4))
    assert r.status == "failed" and r.objective == FAILED_OBJECTIVE
    assert "non-finite training loss" in r.error


def test_the_evaluated_model_is_the_quantized_one(context, monkeypatch):
    import qpruner.trial as trial_mod
    seen = []
    real_evaluate = trial_mod.evaluate

    def spy(model, *args, **kwargs):
        seen.append(quantize.applied_formats(model))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(trial_mod, "evaluate", spy)
    plan = PrecisionPlan(("fp4", "int8", "bf16", "nf4"))
    run_trial(context, plan)
    assert seen and all(formats == plan.per_linear() for formats in seen)


def test_tasks_and_a_weighted_objective(context, tmp_path):
    import json
    from dataclasses import replace
    from qpruner import tasks
    path = tmp_path / "toy.jsonl"
    path.write_text("\n".join(json.dumps({"context": f"def f{i}():", "choices": ["\n    return 1", " zzz"], "label": 0})
                              for i in range(4)))
    task = tasks.tokenize_task("toy", tasks.load_task(str(path)), models.byte_tokenizer(), 64)
    ctx = replace(context, tasks=(task,), objective={"accuracy": 1.0, "toy:acc_norm": 0.5, "perplexity": 0.1})
    r = run_trial(ctx, PrecisionPlan(("int8",) * 4))
    assert set(r.tasks) == {"toy:acc", "toy:acc_norm", "toy:acc_se", "toy:acc_norm_se"} and 0 <= r.tasks["toy:acc"] <= 1
    assert r.objective == pytest.approx(r.accuracy + 0.5 * r.tasks["toy:acc_norm"] - 0.1 * math.log(r.perplexity))
    p = r.tasks["toy:acc_norm"]
    assert r.tasks["toy:acc_norm_se"] == pytest.approx(math.sqrt(p * (1 - p) / 3))
    assert r.objective_se == pytest.approx(math.sqrt(r.accuracy_se ** 2 + (0.5 * r.tasks["toy:acc_norm_se"]) ** 2
                                                     + (0.1 * r.nll_se) ** 2))
    assert r.nll == pytest.approx(math.log(r.perplexity)) and r.nll_se > 0
    assert len(r.eval_window_nll) == len(r.eval_window_tokens) == ctx.eval.shape[0]
    again = TrialResult.from_metrics(r.to_metrics())
    assert again.tasks == r.tasks and again == r


def test_intermediate_reports(context):
    from dataclasses import replace
    ctx = replace(context, finetune=replace(context.finetune, steps=3, eval_every=1))
    reports = []
    r = run_trial(ctx, PrecisionPlan(("nf4",) * 4), on_report=reports.append)
    assert [x["step"] for x in reports] == [1, 2] and all(x["status"] == "running" for x in reports)
    assert all(x["objective"] == x["accuracy"] for x in reports) and r.train_steps == 3


def test_a_screen_builds_the_plan_but_neither_trains_nor_evaluates_everything(context, monkeypatch):
    from dataclasses import replace

    import qpruner.trial as trial_mod
    from qpruner.trial import run_screen
    ctx = replace(context, metric="perplexity", screen_windows=3)
    plan = PrecisionPlan(("nf4", "int8", "nf4", "int8"))
    monkeypatch.setattr(trial_mod, "finetune_", lambda *a, **k: pytest.fail("a screen fine-tuned"))
    s = run_screen(ctx, plan)
    assert s.status == "screened" and s.fidelity == "screen" and s.error is None
    assert len(s.eval_window_tokens) == 3 < ctx.eval.shape[0]
    assert s.train_steps == 0 and s.adapter_bytes is None and "finetune" not in s.seconds
    assert s.objective == pytest.approx(-s.nll) and s.weight_bytes == s.weight_bytes_predicted
    assert TrialResult.from_metrics(s.to_metrics()) == s
    monkeypatch.undo()
    # a full trial screens itself before fine-tuning: the same build, the same windows, the same number
    full = run_trial(ctx, plan)
    assert full.fidelity == "full" and full.status == "ok"
    assert full.objective_screen == pytest.approx(s.objective, abs=1e-9)
    assert full.objective != pytest.approx(s.objective)


def test_a_screen_needs_screen_windows_and_an_over_budget_plan_is_not_built(context):
    from dataclasses import replace

    from qpruner.trial import run_screen
    with pytest.raises(ValueError, match="screen_windows"):
        run_screen(context, PrecisionPlan(("nf4",) * 4))
    r = run_screen(replace(context, screen_windows=2), PrecisionPlan(("bf16",) * 4))
    assert r.status == "infeasible"
