"""The bad inputs of ``bench/reliability.py --bad-inputs``: job files, overrides, data files and model
directories that a careless or hostile user gives to `qpruner validate` and `qpruner search` (the real CLI,
in-process, on ``tune_jobs/tiny_smoke.yaml``). Each must be refused with exit 2 and one message, with no
traceback, and leave no file behind (the results directory named by the job must not appear)."""

from __future__ import annotations

import io
import json
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tune_jobs" / "tiny_smoke.yaml"
ENOUGH = ("some real text " * 400).encode()

OVERRIDES = [
    "finetune.steps=-1", "finetune.steps=abc", "finetune.steps=1e20", "finetune.steps=.nan", "finetune.steps=[1, 2]",
    "finetune.steps={a: 1}", "prune.ratio=3", "prune.ratio=-0.1", "prune.ratio=.nan", "prune.ratio=x",
    "policy.bits=[3]", "policy.bits=[]", "policy.bits=[4, 4]", "policy.budget_avg_bits=1", "policy.budget_avg_bits=-5",
    "policy.budget_avg_bits=.nan", "policy.budget_avg_bits=.inf", "search.num_trials=0", "search.num_trials=-3",
    "search.num_trials=1e9", "search.num_trials=many", "search.max_concurrent=0", "search.cpus_per_trial=-1",
    "search.gpus_per_trial=1.5", "search.searcher=tpe", "search.scheduler=hyperband", "search.metric=bleu",
    "search.objective={accuracy: 0}", "search.objective={bogus: 1}", "data.seq_len=4", "data.seq_len=100000",
    "data.seq_len=long", "data.calib_samples=0", "data.calib_samples=1000000000000", "data.eval_samples=0",
    "data.seed=1180591620717411303424", "data.seed=-1", "finetune.seed=1180591620717411303424", "search.seed=-1",
    "finetune.lr=-1", "finetune.lr=.nan", "finetune.batch_size=0", "finetune.lora_r=0", "finetune.lora_r=-2",
    "finetune.target_modules=[]", "finetune.target_modules=[nope]", "quant.four_bit=nf5", "quant.blocksize=7",
    "quant.compute_dtype=float8", "name=../etc", "name=/abs", "name=", "name=.hidden", "name=a/b", "name=" + "n" * 300,
    "model.source=builtin:gpt5", "model.source=/nonexistent/model", "model.source=org/name/extra",
    "data.source=builtin:wiki", "data.source=/nonexistent.txt", "data.source=notes.csv",
    "eval.tasks=[/nonexistent.jsonl]", "eval.tasks=[mmlu]", "eval.batch_size=0", "unknown.key=1", "finetune.stpes=3",
    "prune.layer_start=5 prune.layer_end=2", "prune.scope=neuron", "prune.importance=magic", "score.method=vibes",
    "policy.unit=atom", "search.keep_dashboard=true", "search.screen_share=0.95",
    "search.screen_share=0.2 search.searcher=hyperopt", "device=tpu", "nonsense", "=3", "finetune=3",
    "finetune.steps=" + "[" * 3000 + "]" * 3000, "search.max_failures=-1", "eval.context=1", "eval.stride=0",
    "data.calib_seq_len=100000", "search.metrics_linger_s=100000", "search.disk_full_wait_s=-1",
]

JOB_FILES = {
    "nested 3000 deep": "x: " + "[" * 3000 + "]" * 3000,
    "nested 200 deep": "model: " + "{a: " * 200 + "1" + "}" * 200,
    "billion laughs in name": None, "billion laughs in model": None, "billion laughs in eval.tasks": None,
    "a list, not a mapping": "- a\n- b\n",
    "empty": "",
    "invalid YAML": "finetune:\n\tsteps: 3\n",
    "non-string keys": "{1: 2, 3: 4}\n",
    "a section as a number": "finetune: 3\n",
    "unterminated string": "name: 'abc\n",
    "a 1 MB value": "name: " + "x" * 1_000_000 + "\n",
}


def _laughs(tail: str) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + tail + "\n"


def _data_files(where: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    where.mkdir(parents=True, exist_ok=True)
    raw = {"txt not UTF-8": ("bad.txt", b"hello \xff world " + ENOUGH),
           "jsonl not UTF-8": ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n'),
           "corrupt parquet": ("bad.parquet", b"PAR1 not really" + ENOUGH), "empty txt": ("empty.txt", b""),
           "one token": ("one.txt", b"a"), "null jsonl row": ("null.jsonl", b'{"text": null}\n'),
           "wrong jsonl field": ("field.jsonl", b'{"body": "x"}\n'), "jsonl not an object": ("list.jsonl", b"[1, 2]\n"),
           "invalid jsonl": ("broken.jsonl", b'{"text": "x"\n'), "binary txt": ("bin.txt", bytes(range(256)) * 40)}
    out = {}
    for name, (file, content) in raw.items():
        (where / file).write_bytes(content)
        out[name] = where / file
    for name, file, column, values in (("parquet no column", "col.parquet", "body", ["x" * 2000]),
                                       ("parquet null row", "null.parquet", "text", ["x" * 2000, None]),
                                       ("parquet numbers", "num.parquet", "text", [1, 2, 3])):
        pq.write_table(pa.table({column: values}), where / file)
        out[name] = where / file
    return out


def _model_dirs(where: Path) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file

    from qpruner import models
    out = {}
    for broken in ("truncated weights", "config hidden_size wrong", "config layers wrong", "pickle weights only",
                   "no config.json", "config.json not JSON", "unsupported model_type"):
        d = where / broken.replace(" ", "_")
        models.tiny_model().save_pretrained(d, safe_serialization=True)
        config, weights = d / "config.json", d / "model.safetensors"
        cfg = json.loads(config.read_text())
        if broken == "truncated weights":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif broken == "config hidden_size wrong":
            config.write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}))
        elif broken == "config layers wrong":
            config.write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 3}))
        elif broken == "pickle weights only":
            torch.save(load_file(weights), d / "pytorch_model.bin")
            weights.unlink()
        elif broken == "no config.json":
            config.unlink()
        elif broken == "config.json not JSON":
            config.write_text("{not json")
        elif broken == "unsupported model_type":
            config.write_text(json.dumps({**cfg, "model_type": "gpt2"}))
        out[broken] = d
    file_not_dir = where / "model_file.safetensors"
    file_not_dir.write_bytes(b"x")
    out["a file, not a directory"] = file_not_dir
    return out


def _one(name: str, kind: str, job: Path, overrides: list[str], results: Path) -> dict:
    """`validate` then `search` in-process; what each printed, returned, raised, and left behind."""
    from qpruner.cli import main
    codes, messages, clean = [], [], True
    for command in ("validate", "search"):
        err = io.StringIO()
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                codes.append(main([command, str(job), f"results_dir={results}", *overrides]))
        except SystemExit as exc:   # argparse refusing the command line: a usage message, not a traceback
            codes.append(int(exc.code or 0))
        except BaseException:       # noqa: BLE001 - escaping main() is exactly what is counted
            clean = False
            codes.append(-1)
            err.write(traceback.format_exc(limit=2))
        text = err.getvalue()
        clean = clean and "Traceback (most recent call last)" not in text
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        messages.append(next((line[2:] for line in lines if line.startswith("- ")), lines[0] if lines else ""))
    wrote = sorted(str(p.relative_to(results)) for p in results.rglob("*")) if results.exists() else []
    return {"name": name, "kind": kind, "exit": codes[1], "exit_validate": codes[0], "clean": clean,
            "wrote": ", ".join(wrote[:3]) + (" ..." if len(wrote) > 3 else ""), "message": messages[1] or messages[0]}


def run_all(work: Path) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for i, override in enumerate(OVERRIDES):
        out.append(_one(override[:60], "override", JOB, override.split(" "), work / f"o{i}"))
    for i, (name, text) in enumerate(JOB_FILES.items()):
        if text is None:
            text = _laughs({"name": "name: *a8", "model": "model: *a8", "eval.tasks": "eval: {tasks: *a8}"}[
                name.rsplit(" ", 1)[1]])
        path = work / f"job{i}.yaml"
        path.write_text(text)
        out.append(_one(name, "job file", path, [], work / f"j{i}"))
    bad_utf8 = work / "job_latin1.yaml"
    bad_utf8.write_bytes("name: caf\xe9\n".encode("latin-1"))
    out.append(_one("job file not UTF-8", "job file", bad_utf8, [], work / "jl"))
    for i, (name, path) in enumerate(_data_files(work / "data").items()):
        out.append(_one(name, "data file", JOB, [f"data.source={path}"], work / f"d{i}"))
    for i, (name, path) in enumerate(_model_dirs(work / "models").items()):
        out.append(_one(name, "model directory", JOB, [f"model.source={path}"], work / f"m{i}"))
    return out
