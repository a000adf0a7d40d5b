"""Memory admission: a plan whose predicted fine-tuning peak exceeds a trial's memory is never trained."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from qpruner import finetune_memory
from qpruner.config import EvalConfig, FinetuneConfig, QuantConfig, build_job
from qpruner.finetune_memory import (ADMISSION_MARGIN, HOST_SHARE, cap_gpu_memory, estimate, host_memory,
                                     trial_memory_limit)
from qpruner.memory import Budget, ModelLayout
from qpruner.plan import PrecisionPlan
from qpruner.trial import Precheck, TrialContext, run_trial

ROOT = Path(__file__).resolve().parents[1]
GB = 10**9


def test_the_memory_a_trial_has():
    assert trial_memory_limit(3.5, "cuda", 0.5, 1, gpu_total=80 * GB) == int(3.5e9)           # the setting wins
    assert trial_memory_limit(None, "cuda", 0.5, 1, gpu_total=80 * GB) == 40 * GB             # share of the GPU
    assert trial_memory_limit(None, "cuda", 1.0, 1, gpu_total=80 * GB) == 80 * GB
    assert trial_memory_limit(None, "cuda", 0.5, 1) is None                                   # GPU unknown
    assert trial_memory_limit(None, "cpu", 0, 2, host_total=24 * GB, host_cpus=2) == int(HOST_SHARE * 24 * GB)
    assert trial_memory_limit(None, "cpu", 0, 1, host_total=24 * GB, host_cpus=2) == int(HOST_SHARE * 12 * GB)
    assert trial_memory_limit(None, "cpu", 0, 0, host_total=24 * GB, host_cpus=4) == int(HOST_SHARE * 6 * GB)
    assert trial_memory_limit(None, "cpu", 0, 1) is None
    assert 0 < host_memory() <= 2**50


def test_a_container_limit_below_the_host_ram_is_the_one_that_counts(monkeypatch):
    real = Path.read_text

    def fake(self, *a, **k):
        if str(self) == "/sys/fs/cgroup/memory.max":
            return "4000000000\n"
        if str(self) == "/sys/fs/cgroup/memory/memory.limit_in_bytes":
            raise OSError("no cgroup v1")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", fake)
    assert host_memory() == 4_000_000_000


def test_a_fractional_gpu_trial_is_held_to_its_share(monkeypatch):
    calls = []

    class Props:
        total_memory = 80 * GB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    device = torch.device("cuda", 0)
    assert cap_gpu_memory(40 * GB, device) == 0.5 and calls == [(0.5, device)]
    assert cap_gpu_memory(80 * GB, device) is None and len(calls) == 1      # the whole GPU: nothing to cap
    assert cap_gpu_memory(40 * GB, torch.device("cpu")) is None and len(calls) == 1


@pytest.fixture
def context(tiny, tiny_splits):
    from qpruner import models
    config, state = models.model_state(tiny)
    return TrialContext(config, state, ModelLayout.from_model(tiny), tiny_splits.train[:64], tiny_splits.eval,
                        QuantConfig(), FinetuneConfig(steps=2, batch_size=2, lora_r=2), EvalConfig(), Budget(avg_bits=16.5))


def test_a_plan_over_the_trial_memory_is_answered_with_the_reason_and_never_built(context, monkeypatch):
    import qpruner.trial as trial_mod
    small, large = PrecisionPlan(("nf4",) * 4), PrecisionPlan(("bf16",) * 4)
    peak_small, peak_large = Precheck.of(context).peak(small), Precheck.of(context).peak(large)
    limit = int(peak_small * ADMISSION_MARGIN) + 1     # the small plan with its margin fits, the large one does not
    assert peak_large * ADMISSION_MARGIN > limit
    monkeypatch.setattr(trial_mod, "build_quantized", lambda *a, **k: pytest.fail("an over-memory plan was built"))
    r = run_trial(context, large, memory_limit=limit)
    assert r.status == "infeasible" and r.objective < -999 and r.peak_bytes_estimate == peak_large
    assert "over memory" in r.error and f"{peak_large / 1e9:.2f} GB" in r.error
    _, none = Precheck.of(context, limit)(small)
    assert none is None                                             # under the limit: trained as usual


def _job(tmp_path, **search):
    return ROOT / "tune_jobs" / "tiny_smoke.yaml", [f"results_dir={tmp_path}"] + [f"search.{k}={v}" for k, v in search.items()]


def _peaks(tmp_path) -> dict:
    """Predicted peaks of the tiny smoke job's uniform plans (the job's own pruning, in this process)."""
    from qpruner import job as job_mod
    from qpruner.config import load_job
    job = load_job(ROOT / "tune_jobs" / "tiny_smoke.yaml", [f"results_dir={tmp_path / 'probe'}"])
    (tmp_path / "probe" / job.name).mkdir(parents=True)
    prepared = job_mod.prepare(job, tmp_path / "probe" / job.name)
    check = Precheck.of(prepared.context)
    return {f: check.peak(PrecisionPlan.uniform(f, prepared.context.n_layers)) for f in ("nf4", "int8", "bf16")}


def test_a_search_whose_plans_all_exceed_the_memory_trains_nothing_and_exits_2(tmp_path):
    job, overrides = _job(tmp_path, memory_per_trial_gb=0.0001)
    proc = subprocess.run([sys.executable, "-m", "qpruner.cli", "search", str(job), *overrides], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no plan fits in a trial's memory" in proc.stderr and "0.00 GB a trial has" in proc.stderr
    assert "needs an estimated" in proc.stderr and "Traceback" not in proc.stderr
    trials = tmp_path / "tiny_smoke" / "trials.parquet"
    assert not trials.exists() or (pd.read_parquet(trials)["status"] != "ok").all()


def test_plans_over_the_memory_get_a_row_with_the_reason_and_the_rest_train(tmp_path):
    peaks = _peaks(tmp_path)
    limit = peaks["nf4"] * ADMISSION_MARGIN * 1.001
    assert peaks["int8"] * ADMISSION_MARGIN > limit
    job, overrides = _job(tmp_path, memory_per_trial_gb=limit / 1e9, num_trials=3)
    proc = subprocess.run([sys.executable, "-m", "qpruner.cli", "search", str(job), *overrides], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    trials = pd.read_parquet(tmp_path / "tiny_smoke" / "trials.parquet")
    trained = trials[trials["status"] == "ok"]
    over = trials[trials["error"].fillna("").str.startswith("over memory")]
    assert len(trained) >= 1 and (trained["peak_bytes_estimate"] * ADMISSION_MARGIN <= limit).all()
    assert len(over) >= 1 and (over["status"] == "infeasible").all()
    assert (over["peak_bytes_estimate"] * ADMISSION_MARGIN > limit).all()
    assert proc.returncode in (0, 1), proc.stderr[-2000:]   # 1: fewer plans fit than num_trials (said so)


def test_the_default_admits_the_demo_on_this_machine():
    job = build_job({"search": {"cpus_per_trial": 1}})
    from qpruner.search.run import driver_memory_limit
    limit = driver_memory_limit(job)
    assert limit is not None and limit > 1 * GB                     # 0.7 x RAM x (1 of this machine's CPUs)
    assert finetune_memory.host_cpus() >= 1


def _config_only_model(tmp_path) -> str:
    """A LLaMA-2-7B-shaped model directory holding only its config (no weights are needed to size it)."""
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(tmp_path / "llama7b")
    from safetensors.torch import save_file
    save_file({"placeholder": torch.zeros(1)}, str(tmp_path / "llama7b" / "model.safetensors"))  # validate wants weights
    return str(tmp_path / "llama7b")


def test_a_model_too_big_for_the_drivers_device_is_refused_before_loading(tmp_path, monkeypatch):
    from qpruner import job as job_mod
    from qpruner.errors import ModelError
    source = _config_only_model(tmp_path)
    job = build_job({"model": {"source": source, "dtype": "bfloat16"}, "device": "cpu"})
    assert 6.5e9 < job_mod.models.source_params(job.model) < 7e9
    monkeypatch.setattr(finetune_memory, "host_memory", lambda: 16 * GB)
    with pytest.raises(ModelError, match=r"6\.7B-parameter model needs about 27\.0 GB .* 16\.0 GB.*need 13\.5 GB"):
        job_mod.check_driver_memory(job, torch.device("cpu"))
    free = build_job({"model": {"source": source, "dtype": "bfloat16"}, "device": "cpu",
                      "prune": {"importance": "l2"}, "score": {"method": "block_influence"}})
    monkeypatch.setattr(finetune_memory, "host_memory", lambda: 8 * GB)
    with pytest.raises(ModelError, match="needs about 13.5 GB") as err:
        job_mod.check_driver_memory(free, torch.device("cpu"))
    assert "Gradient-free" not in str(err.value)
    monkeypatch.setattr(finetune_memory, "host_memory", lambda: 64 * GB)
    job_mod.check_driver_memory(job, torch.device("cpu"))     # fits: no error


def test_the_estimate_follows_micro_batches_and_checkpointing(context):
    plan, base = PrecisionPlan(("nf4",) * 4), FinetuneConfig(batch_size=8, lora_r=2)
    full = estimate(context.layout, plan, QuantConfig(), base, 128)
    micro = estimate(context.layout, plan, QuantConfig(), FinetuneConfig(batch_size=8, micro_batch_size=2, lora_r=2), 128)
    ckpt = estimate(context.layout, plan, QuantConfig(), FinetuneConfig(batch_size=8, lora_r=2,
                                                                        gradient_checkpointing=True), 128)
    assert micro.activations * 4 == full.activations and micro.weights == full.weights
    assert ckpt.activations < full.activations and ckpt.optimizer == full.optimizer


def test_a_container_cpu_quota_is_the_cpu_count_that_counts(monkeypatch):
    real = Path.read_text

    def fake(self, *a, **k):
        if str(self) == "/sys/fs/cgroup/cpu.max":
            return "50000 100000\n"           # half a CPU: a pod's cpu limit
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", fake)
    assert finetune_memory.host_cpus() == 1
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "max 100000\n" if str(self) == "/sys/fs/cgroup/cpu.max"
                        else real(self, *a, **k))
    assert finetune_memory.host_cpus() == len(__import__("os").sched_getaffinity(0))
