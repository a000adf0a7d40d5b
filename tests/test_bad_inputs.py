"""#25.6 / #25.7: bad data and model files, and out-of-range values, are refused by `validate` (exit 2, one
clear message, no traceback), and `search` / `prune` refuse them before writing anything."""

import json
import sys
from pathlib import Path

import pytest

from qpruner.cli import main

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "tune_jobs" / "tiny_smoke.yaml")


def _text(tmp_path, name, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _parquet(tmp_path, name, column, values) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / name
    pq.write_table(pa.table({column: values}), path)
    return str(path)


ENOUGH = ("some real text " * 400).encode()          # > (8 + 4 + 1) x 64 bytes: tiny_smoke's need


def _bad_data(tmp_path):
    src = {
        "txt not UTF-8": (_text(tmp_path, "bad.txt", b"hello \xff world " + ENOUGH), "not UTF-8"),
        "jsonl not UTF-8": (_text(tmp_path, "bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n'), "not UTF-8"),
        "corrupt parquet": (_text(tmp_path, "bad.parquet", b"PAR1 not really" + ENOUGH), "not a readable parquet"),
        "empty txt": (_text(tmp_path, "empty.txt", b""), "the splits need"),
        "one token": (_text(tmp_path, "one.txt", b"a"), "the splits need"),
        "null jsonl row": (_text(tmp_path, "null.jsonl", b'{"text": null}\n'), "(null)"),
        "wrong jsonl field": (_text(tmp_path, "field.jsonl", b'{"body": "x"}\n'), "no such field"),
        "jsonl not an object": (_text(tmp_path, "list.jsonl", b"[1, 2]\n"), "not an object"),
        "parquet no column": (_parquet(tmp_path, "col.parquet", "body", ["x" * 2000]), "has no column 'text'"),
        "parquet null row": (_parquet(tmp_path, "null.parquet", "text", ["x" * 2000, None]), "empty (null) row"),
        "parquet numbers": (_parquet(tmp_path, "num.parquet", "text", [1, 2, 3]), "not text"),
    }
    cases = {name: (["data.source=" + path], expected) for name, (path, expected) in src.items()}
    cases.update({
        "huge calib_samples": (["data.calib_samples=1000000000000"], "above the maximum"),
        "huge data seed": (["data.seed=1180591620717411303424"], "above the maximum"),
        "huge finetune seed": (["finetune.seed=1180591620717411303424"], "above the maximum"),
        "negative search seed": (["search.seed=-1"], "below the minimum"),
        "300-character name": (["name=" + "n" * 300], "at most 100"),
    })
    return cases


CASES = ["txt not UTF-8", "jsonl not UTF-8", "corrupt parquet", "empty txt", "one token", "null jsonl row",
         "wrong jsonl field", "jsonl not an object", "parquet no column", "parquet null row", "parquet numbers",
         "huge calib_samples", "huge data seed", "huge finetune seed", "negative search seed", "300-character name"]


def _model_dir(tmp_path, broken: str) -> str:
    from qpruner import models
    out = tmp_path / f"model_{broken}"
    model = models.tiny_model()
    model.save_pretrained(out, safe_serialization=True)
    weights = out / "model.safetensors"
    if broken == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif broken == "config":
        config = json.loads((out / "config.json").read_text())
        config["hidden_size"] = config["hidden_size"] * 2
        (out / "config.json").write_text(json.dumps(config))
    elif broken == "layers":
        config = json.loads((out / "config.json").read_text())
        config["num_hidden_layers"] = config["num_hidden_layers"] + 3
        (out / "config.json").write_text(json.dumps(config))
    elif broken == "pickle_only":
        import torch
        from safetensors.torch import load_file
        torch.save(load_file(weights), out / "pytorch_model.bin")
        weights.unlink()
    return str(out)


@pytest.mark.parametrize("case", CASES)
def test_bad_data_and_values_are_refused_by_validate_and_before_any_write(tmp_path, capsys, case):
    overrides, expected = _bad_data(tmp_path)[case]
    assert main(["validate", JOB, f"results_dir={tmp_path / 'results'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    for command in ("prune", "search"):
        assert main([command, JOB, f"results_dir={tmp_path / 'results'}", *overrides]) == 2
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("broken, expected", [("truncated", "truncated"), ("config", "disagree"),
                                              ("layers", "decoder layers"), ("pickle_only", "never pickles")])
def test_broken_model_directories_are_refused_before_loading(tmp_path, capsys, broken, expected):
    source = _model_dir(tmp_path, broken)
    assert main(["validate", JOB, f"model.source={source}", f"results_dir={tmp_path / 'results'}"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert main(["prune", JOB, f"model.source={source}", f"results_dir={tmp_path / 'results'}"]) == 2
    assert not (tmp_path / "results").exists()


def test_device_cuda_without_cuda_is_a_note_for_validate_and_an_error_for_search(tmp_path, capsys, monkeypatch):
    import qpruner.config as config
    monkeypatch.setattr(config, "cuda_available", lambda: False)
    assert main(["validate", JOB, "device=cuda"]) == 0
    assert "no CUDA device" in capsys.readouterr().err
    for command in ("prune", "search"):
        assert main([command, JOB, "device=cuda", f"results_dir={tmp_path / 'results'}"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_failure_after_validation_leaves_a_new_directory_as_it_was(tmp_path, monkeypatch, capsys):
    """Anything that fails after validation (here: loading the model) in a directory the run created leaves
    no marker, lock or directory behind; in a directory with work in it, everything stays."""
    import qpruner.job as job_mod
    from qpruner.errors import ModelError

    def broken(*args, **kwargs):
        raise ModelError("simulated: the weights could not be read")

    monkeypatch.setattr(job_mod.models, "load_model", broken)
    out = tmp_path / "results"
    for command in ("prune", "search"):
        assert main([command, JOB, f"results_dir={out}"]) == 2
        assert "simulated" in capsys.readouterr().err and not out.joinpath("tiny_smoke").exists()
    keep = out / "tiny_smoke"
    monkeypatch.undo()
    assert main(["prune", JOB, f"results_dir={out}"]) == 0
    monkeypatch.setattr(job_mod.models, "load_model", broken)
    assert main(["prune", JOB, f"results_dir={out}", "--force"]) == 2
    assert (keep / "pruned" / "model.safetensors").is_file() and (keep / ".qpruner-run.json").is_file()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
