"""Checks of a job's local input files that need no model: run by ``validate`` (and so before any search or
prune writes anything), and the one place that turns a bad file into a clear :class:`ConfigError` or
:class:`ModelError` message instead of a traceback.

* **Text** (``data.source`` a ``.txt`` / ``.jsonl`` / ``.parquet`` file): readable, UTF-8, every row a
  string under ``data.text_field`` (no ``null`` rows, no missing column), and enough of it: the splits need
  ``(eval_samples + calib_samples + 1) * seq_len`` tokens, and no tokenizer makes more tokens than the text
  has bytes (plus one end-of-text token per document), so fewer bytes than that can never be enough. The
  exact count needs the tokenizer and is checked again when the model is loaded (``data.make_splits``).
* **A model directory** (``model.source``): its weights exist as safetensors, each file's header parses and
  its tensors lie inside the file (a truncated download is caught here), and the config's shapes agree with
  the weights' (vocabulary x hidden size of the embedding, number of decoder layers).

Imports no torch: ``qpruner validate`` stays light.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from .config import TEXT_SUFFIXES


def read_texts(path: Path, field: str, where: str = "data.source") -> list[str]:
    """The documents of a local text file (one for ``.txt``, one per row otherwise), or a ConfigError that
    names the file, the row and the fix."""
    from .errors import ConfigError
    name = path.name
    try:
        if name.endswith(".txt"):
            return [path.read_text(encoding="utf-8")]
        if name.endswith(".jsonl"):
            return _jsonl_texts(path, field, where)
        if name.endswith(".parquet"):
            return _parquet_texts(path, field, where)
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{where}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                           "UTF-8"]) from None
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path} ({exc.strerror or exc})"]) from None
    raise ConfigError([f"{where}: {path} must end in one of {list(TEXT_SUFFIXES)}"])


def _jsonl_texts(path: Path, field: str, where: str) -> list[str]:
    from .errors import ConfigError
    texts = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError([f"{where}: {path}:{lineno} is not valid JSON ({exc.msg})"]) from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                got = "null" if isinstance(row, dict) and row.get(field) is None and field in row else (
                    "no such field" if isinstance(row, dict) else f"a {type(row).__name__}, not an object")
                raise ConfigError([f"{where}: {path}:{lineno} has no string field {field!r} ({got}); set "
                                   "data.text_field to the field holding the text, or fix the row"])
            texts.append(row[field])
    return texts


def _parquet_texts(path: Path, field: str, where: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .errors import ConfigError
    try:
        schema = pq.read_schema(path)
        if field not in schema.names:
            raise ConfigError([f"{where}: {path} has no column {field!r}; columns: {schema.names}; set "
                               "data.text_field"])
        column = pq.read_table(path, columns=[field]).column(field)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise ConfigError([f"{where}: {path} is not a readable parquet file ({str(exc)[:200]})"]) from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ConfigError([f"{where}: column {field!r} of {path} holds {column.type}, not text"])
    if column.null_count:
        first = next(i for i, v in enumerate(column.to_pylist()) if v is None)
        raise ConfigError([f"{where}: column {field!r} of {path} has {column.null_count} empty (null) row(s), the "
                           f"first at row {first}; drop them or fill them with text"])
    return [str(t) for t in column.to_pylist()]


def check_text(data) -> list[str]:
    """Problems of ``data.source`` (a DataConfig) when it is a local file: see the module docstring."""
    from .errors import ConfigError
    path = Path(data.source).expanduser()
    try:
        texts = read_texts(path, data.text_field)
    except ConfigError as exc:
        return list(exc.problems)
    need = (data.eval_samples + data.calib_samples + 1) * data.seq_len
    most = sum(len(t.encode("utf-8")) for t in texts) + len(texts)   # a token is at least a byte (+ EOS each)
    if most < need:
        return [f"data.source: {data.source} holds {most - len(texts):,} bytes of text in {len(texts)} document(s), "
                f"at most {most:,} tokens; the splits need (eval_samples {data.eval_samples} + calib_samples "
                f"{data.calib_samples} + 1) x seq_len {data.seq_len} = {need:,} tokens. Use more text, a shorter "
                "data.seq_len or fewer samples"]
    return []


# --- model directories ---------------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file; ValueError when it is not one or its tensors overrun the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"header of {n:,} bytes in a file of {size:,}")
        header = json.loads(fh.read(n))
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: its tensors need {8 + n + end:,} bytes, the file has {size:,}")
    return header


def check_model_dir(path: Path, source: str, config: dict) -> list[str]:
    """Weights present, readable and of the config's shapes (headers only; no tensor is read)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        return [f"model.source: {source!r} has no .safetensors weights" + (
            f" (only {', '.join(bins[:3])}: qpruner loads safetensors only, never pickles; convert them, e.g. "
            "save_pretrained(..., safe_serialization=True))" if bins else "")]
    shapes: dict[str, list] = {}
    for f in files:
        try:
            header = safetensors_header(f)
        except (OSError, ValueError) as exc:
            return [f"model.source: {f} is not a readable safetensors file ({exc}); download or save it again"]
        shapes.update({k: v.get("shape") for k, v in header.items() if k != "__metadata__"})
    problems = []
    embed = next((v for k, v in shapes.items() if k.endswith("embed_tokens.weight")), None)
    want = [config.get("vocab_size"), config.get("hidden_size")]
    if embed is not None and None not in want and list(embed) != want:
        problems.append(f"model.source: {source!r}: config.json says vocab_size x hidden_size = {want[0]} x {want[1]}, "
                        f"the weights' embedding is {embed[0]} x {embed[1]}; config.json and the weights disagree")
    layers = {int(m.group(1)) for k in shapes if (m := re.search(r"\.layers\.(\d+)\.", k))}
    n = config.get("num_hidden_layers")
    if layers and n is not None and len(layers) != int(n):
        problems.append(f"model.source: {source!r}: config.json says {n} decoder layers, the weights hold "
                        f"{len(layers)}; config.json and the weights disagree")
    return problems
