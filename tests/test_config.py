from pathlib import Path

import pytest
import yaml

from qpruner.config import JobConfig, build_job, load_job, save_job, to_dict
from qpruner.errors import ConfigError

JOBS = sorted(Path(__file__).resolve().parents[1].joinpath("tune_jobs").glob("*.yaml"))


def test_there_are_job_files():
    names = {p.stem for p in JOBS}
    assert {"tiny_smoke", "smollm2_demo", "llama2_7b_20pct"} <= names


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_file_validates(path):
    job = load_job(path)
    assert isinstance(job, JobConfig)
    assert job.name == yaml.safe_load(path.read_text()).get("name", path.stem)


def _problems(data, overrides=()):
    with pytest.raises(ConfigError) as info:
        build_job(data, overrides)
    return info.value.problems


def test_unknown_key_names_the_key_and_suggests():
    problems = _problems({"finetune": {"stepz": 3}})
    assert len(problems) == 1
    assert "finetune.stepz" in problems[0] and "did you mean 'steps'" in problems[0]


def test_unknown_section_suggests():
    problems = _problems({"serch": {}})
    assert "serch" in problems[0] and "did you mean 'search'" in problems[0]


def test_all_problems_are_reported_at_once():
    problems = _problems({
        "finetune": {"steps": "ten", "lr": -1},
        "prune": {"ratio": 1.5, "importance": "taylr"},
        "policy": {"bits": [4, 5], "budget_gb": 1.0, "budget_avg_bits": 6},
        "data": {"source": "missing_file.txt"},
        "search": {"metric": "acc"},
    })
    text = "\n".join(problems)
    for key in ("finetune.steps", "finetune.lr", "prune.ratio", "prune.importance", "policy.bits[1]",
                "policy: give budget_avg_bits or budget_gb", "data.source", "search.metric"):
        assert key in text, key
    assert "did you mean 'taylor'" in text
    assert len(problems) == 8


def test_wrong_types_are_rejected():
    problems = _problems({"finetune": {"batch_size": 2.5}, "prune": {"attention": "yes"},
                          "policy": {"bits": 4}})
    text = "\n".join(problems)
    assert "finetune.batch_size: expected an integer" in text
    assert "prune.attention: expected true or false" in text
    assert "policy.bits: expected a list" in text


def test_missing_model_directory_and_bad_builtin():
    assert "does not exist" in _problems({"model": {"source": "./no/such/dir"}})[0]
    assert "did you mean 'builtin:smollm2-135m'" in _problems({"model": {"source": "builtin:smollm2-135"}})[0]


def test_float_strings_and_ints_are_numbers():
    job = build_job({"finetune": {"lr": "2e-4"}, "prune": {"ratio": 0}})
    assert job.finetune.lr == pytest.approx(2e-4) and isinstance(job.prune.ratio, float)


def test_overrides_apply_and_are_validated():
    job = build_job({}, ["finetune.steps=3", "policy.bits=[4, 8]", "search.ray_address=auto"])
    assert job.finetune.steps == 3 and job.policy.bits == (4, 8) and job.search.ray_address == "auto"
    problems = _problems({}, ["finetune.steps=-1", "nonsense", "search.num_trails=3"])
    text = "\n".join(problems)
    assert "finetune.steps" in text and "expected key=value" in text and "did you mean 'num_trials'" in text


def test_load_job_defaults_name_to_stem_and_saves_round_trip(tmp_path):
    path = tmp_path / "my_job.yaml"
    path.write_text("finetune:\n  steps: 4\n")
    job = load_job(path)
    assert job.name == "my_job" and job.finetune.steps == 4
    save_job(job, tmp_path / "resolved.yaml")
    again = load_job(tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(job)


def test_load_job_errors_on_missing_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_job(bad)


def test_joint_pruning_amounts_are_validated():
    from qpruner.config import build_job
    from qpruner.errors import ConfigError
    job = build_job({"prune": {"param_ratios": [0.3, 0.0, 0.1], "param_ratio": 0.1}})
    assert job.prune.param_ratios == (0.3, 0.0, 0.1)
    for prune, match in (({"param_ratios": [0.2]}, "two or more distinct"),
                         ({"param_ratios": [0.1, 0.1]}, "two or more distinct"),
                         ({"param_ratios": [0.0, 0.2], "scope": "layer"}, "same decoder layers"),
                         ({"param_ratios": [0.0, 0.2], "param_ratio": 0.3}, "must be one of"),
                         ({"param_ratios": [0.0, 0.99]}, "above the maximum")):
        with pytest.raises(ConfigError, match=match):
            build_job({"prune": prune})


@pytest.mark.parametrize("overrides, expected", [
    (["policy.bits=[]"], "policy.bits: expected distinct values"),            # was a min() traceback
    (["prune.layer_start=5", "prune.layer_end=2"], "pruned layers [start, end) run backwards"),
    (["prune.layer_start=-2", "prune.layer_end=-5"], "pruned layers [start, end) run backwards"),
    (["model.source=tiny", "prune.layer_start=5"], "tiny has 4 decoder layers"),
    (["prune.layer_start=0", "prune.layer_end=31"], "builtin:smollm2-135m has 30 decoder layers"),
    (["finetune.target_modules=[]"], "LoRA would train nothing"),
    (["search.objective={accuracy: 0}"], "every weight is 0"),
    (["finetune.batch_size=0"], "below the minimum 1"),                       # was a ZeroDivisionError
    (["search.gpus_per_trial=2"], "multi-GPU trials are not implemented"),    # reserved 2, used 1 (#26)
    (["search.screen_share=0.2", "search.scheduler=asha", "finetune.eval_every=1"], "scheduler's cut-offs"),
    (["search.screen_share=0.2", "search.searcher=hyperopt"], "screening is a mode of the additive searcher"),
    (["search.screen_share=0.2", "eval.tasks=[piqa]", "search.metric=piqa:acc"], "a screen evaluates perplexity"),
])
def test_inputs_that_failed_only_after_loading_are_refused_before_any_work(overrides, expected):
    problems = _problems({"model": {"source": "builtin:smollm2-135m"}}, overrides)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_stored_job_of_an_earlier_run_is_still_read_and_an_empty_objective_is_none():
    """Checks added after runs were recorded apply to new jobs only: status/report/export still read an old
    job.yaml (check_files=False). An empty objective mapping means no objective, as before."""
    old = {"model": {"source": "tiny"}, "prune": {"layer_start": 2, "layer_end": 2},
           "search": {"objective": {"accuracy": 0.0}}}
    job = build_job(old, check_files=False)
    assert job.prune.layer_start == job.prune.layer_end == 2
    assert build_job({"model": {"source": "tiny"}, "prune": {"layer_start": 2, "layer_end": 2}}).prune.layer_end == 2
    assert not build_job({"model": {"source": "tiny"}, "search": {"objective": {}}}).search.objective


def test_layer_range_of_a_local_model_is_checked_from_its_config(tmp_path):
    import json
    import numpy as np
    from safetensors.numpy import save_file
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 12}))
    save_file({"lm_head.weight": np.zeros((2, 2), dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    job = build_job({"model": {"source": str(tmp_path)}, "prune": {"layer_start": 4, "layer_end": 12}})
    assert job.prune.layer_end == 12
    problems = _problems({"model": {"source": str(tmp_path)}, "prune": {"layer_start": 4, "layer_end": 13}})
    assert any("has 12 decoder layers" in p for p in problems), problems


def _laughs(levels: int, tail: str) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + tail + "\n"


@pytest.mark.parametrize("text", [
    "x: " + "[" * 3000 + "]" * 3000,                      # deeper than the parser can go
    "model: " + "{a: " * 200 + "1" + "}" * 200,           # parses, but deeper than any job file
    _laughs(9, "name: *a8"), _laughs(9, "model: *a8"), _laughs(9, "eval: {tasks: *a8}"),
])
def test_hostile_yaml_is_refused_quickly_and_briefly(tmp_path, text):
    """#25.5: no RecursionError, no exponential expansion in an error message: a short ConfigError."""
    import time
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert time.perf_counter() - t0 < 5 and len(str(info.value)) < 2000


def test_error_messages_quote_values_briefly():
    from qpruner.validation import show
    nested = [[list(range(50))] * 50] * 50
    assert len(show(nested)) < 200 and show("abc") == "'abc'"
