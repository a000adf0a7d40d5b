"""Text sources and deterministic, disjoint calibration / fine-tune / evaluation splits.

Sources: ``builtin:pydoc`` (the 79 documentation topics of the standard library's
``pydoc_data.topics``: ~65k words of real English, no download), local ``.txt`` (one document),
``.jsonl`` (one document per line, text under ``text_field``), ``.parquet`` (column ``text_field``),
or a Hugging Face dataset name when online (needs the ``datasets`` package).

Splitting: all documents are tokenized into one stream (EOS between documents when the tokenizer
has one) and cut into non-overlapping blocks of ``seq_len`` tokens. With a generator seeded by
``seed``:

* calibration: the first ``calib_samples`` blocks of a random permutation of all blocks (cut to
  their first ``calib_seq_len`` tokens when set). It depends only on the text, ``seq_len``,
  ``calib_samples`` and ``seed``, so changing the evaluation size never changes the pruned model,
  and more calibration samples are a superset of fewer;
* evaluation: ``eval_samples`` consecutive blocks of the remaining ones, in text order, from a
  random start (a contiguous stretch of real text, skipping only calibration blocks);
* fine-tuning: every other block, shuffled.

The splits are therefore disjoint by construction and identical for identical (source, tokenizer,
config).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TEXT_SUFFIXES, DataConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    """Token blocks of the three disjoint splits: calibration, fine-tuning and evaluation."""
    calib: torch.Tensor  # [calib_samples, seq_len] token ids
    train: torch.Tensor  # [n_train, seq_len]
    eval: torch.Tensor   # [eval_samples, seq_len]

    def describe(self) -> str:
        return (f"{self.calib.shape[0]} x {self.calib.shape[1]} calibration, {self.train.shape[0]} fine-tune and "
                f"{self.eval.shape[0]} evaluation samples of {self.eval.shape[1]} tokens")


def load_texts(cfg: DataConfig) -> list[str]:
    """The documents of ``cfg.source``, in a fixed order (the first ``cfg.max_documents`` when set)."""
    source = cfg.source
    if source == "builtin:pydoc":
        from pydoc_data.topics import topics
        texts = [topics[k] for k in sorted(topics)]
    elif source.endswith(TEXT_SUFFIXES):
        from .sources import read_texts
        texts = read_texts(Path(source).expanduser(), cfg.text_field)   # clear errors: not UTF-8, bad rows, nulls
    else:
        texts = load_hub_texts(cfg)
    return texts[:cfg.max_documents] if cfg.max_documents else texts


def iter_jsonl(path: str | Path, where: str = ""):
    """(line number, parsed row) of every non-blank line; invalid JSON is a ConfigError that names the
    line (``where`` prefixes the message, e.g. the config key)."""
    with Path(path).open(encoding="utf-8") as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError([f"{where}{path}:{lineno} is not valid JSON ({exc.msg})"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{where}{path}: line {lineno + 1} is not UTF-8 ({exc.reason}); save the file as "
                               "UTF-8"]) from None


def load_hub_texts(cfg: DataConfig) -> list[str]:
    """The documents of a Hugging Face Hub dataset: ``cfg.source`` (its id), ``dataset_config``, ``split``,
    ``revision``, the first ``max_documents`` (streamed, so a corpus the size of C4 is never downloaded whole).
    Empty rows are dropped (WikiText keeps its blank lines as rows). Needs the network, or the datasets cache
    with ``HF_DATASETS_OFFLINE=1``."""
    name = cfg.source
    try:
        import datasets
    except ImportError:
        raise ConfigError([f"data.source: {name!r} is a Hugging Face dataset; that needs `pip install datasets` "
                           "and network access (or use a local .txt / .jsonl / .parquet file)"]) from None
    what = f"{name}" + (f" ({cfg.dataset_config})" if cfg.dataset_config else "") + f", split {cfg.split}"
    logger.info("data: reading the Hub dataset %s%s", what, f", first {cfg.max_documents} documents"
                if cfg.max_documents else "")
    try:
        ds = datasets.load_dataset(name, cfg.dataset_config, split=cfg.split, revision=cfg.revision,
                                   streaming=cfg.max_documents is not None)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError([f"data.source: cannot read the Hub dataset {what}: {first[:500]}. Check the id, "
                           "data.dataset_config and data.split (and the network, or HF_TOKEN for a gated one)"]) from None
    columns = list(getattr(ds, "column_names", None) or (getattr(ds, "features", None) or {}).keys())
    if columns and cfg.text_field not in columns:
        raise ConfigError([f"data.text_field: the Hub dataset {what} has no column {cfg.text_field!r}; columns: "
                           f"{columns}"])
    texts = []
    for row in ds:   # streamed with max_documents: stops reading there
        text = str(row[cfg.text_field])
        if text.strip():
            texts.append(text)
            if cfg.max_documents is not None and len(texts) >= cfg.max_documents:
                break
    return texts


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One 1-D stream of token ids; EOS between documents when the tokenizer defines one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def make_splits(stream: torch.Tensor, cfg: DataConfig) -> Splits:
    """Cut a token stream into the calibration, fine-tune and evaluation splits (see the module docstring)."""
    n_blocks = stream.numel() // cfg.seq_len
    need = cfg.eval_samples + cfg.calib_samples + 1
    if n_blocks < need:
        raise ConfigError([f"data: {cfg.source} gives {stream.numel()} tokens = {n_blocks} blocks of "
                           f"data.seq_len={cfg.seq_len}, but eval_samples + calib_samples + 1 fine-tune "
                           f"block = {need}; use more text, a shorter seq_len or fewer samples"])
    blocks = stream[: n_blocks * cfg.seq_len].view(n_blocks, cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    e, c = cfg.eval_samples, cfg.calib_samples
    order = torch.randperm(n_blocks, generator=gen)
    calib_ids, rest = order[:c], order[c:].sort().values      # calibration: independent of e
    start = int(torch.randint(0, len(rest) - e + 1, (1,), generator=gen))
    eval_ids = rest[start:start + e]
    train_ids = torch.cat([rest[:start], rest[start + e:]])
    train_ids = train_ids[torch.randperm(len(train_ids), generator=gen)]
    calib = blocks[calib_ids][:, : cfg.calib_seq_len or cfg.seq_len]
    return Splits(calib=calib.clone(), train=blocks[train_ids].clone(), eval=blocks[eval_ids].clone())


def load_splits(cfg: DataConfig, tokenizer) -> Splits:
    """Read ``cfg.source``, tokenize it and return its splits."""
    splits = make_splits(tokenize(tokenizer, load_texts(cfg)), cfg)
    logger.info("data %s: %s", cfg.source, splits.describe())
    return splits
