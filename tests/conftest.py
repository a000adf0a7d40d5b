"""Shared fixtures. Tiny models come from a seeded LlamaConfig; Ray stays on 127.0.0.1."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from qpruner import data, models
from qpruner.config import DataConfig, build_job


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny():
    return models.tiny_model()


@pytest.fixture(scope="session")
def tiny_splits():
    cfg = DataConfig(seq_len=64, calib_samples=4, eval_samples=8)
    return data.load_splits(cfg, models.byte_tokenizer())


@pytest.fixture
def tiny_job(tmp_path):
    """A small, fast job on the tiny model, writing under tmp_path."""
    return build_job({
        "name": "t", "results_dir": str(tmp_path), "device": "cpu",
        "model": {"source": "tiny"},
        "data": {"seq_len": 64, "calib_samples": 4, "eval_samples": 8},
        "prune": {"ratio": 0.5},
        "policy": {"bits": [4, 8, 16], "seed_plans": 2},
        "finetune": {"steps": 2, "batch_size": 2, "lora_r": 4},
    })
