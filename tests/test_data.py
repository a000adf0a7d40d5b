import json

import pytest
import torch

from qpruner import data, models
from qpruner.config import DataConfig
from qpruner.errors import ConfigError


def test_pydoc_is_real_text():
    texts = data.load_texts(DataConfig())
    assert len(texts) > 50 and sum(len(t.split()) for t in texts) > 30000


def test_splits_are_disjoint_and_deterministic():
    cfg = DataConfig(seq_len=32, calib_samples=5, eval_samples=7, seed=3)
    stream = torch.arange(32 * 40)  # every block is unique
    a, b = data.make_splits(stream, cfg), data.make_splits(stream, cfg)
    assert torch.equal(a.calib, b.calib) and torch.equal(a.eval, b.eval) and torch.equal(a.train, b.train)
    blocks = lambda t: {int(row[0]) // 32 for row in t}
    assert not blocks(a.calib) & blocks(a.eval)
    assert not blocks(a.train) & (blocks(a.calib) | blocks(a.eval))
    assert len(blocks(a.calib) | blocks(a.eval) | blocks(a.train)) == 40
    ev = sorted(blocks(a.eval))   # a stretch of text in order, skipping only calibration blocks
    assert [int(r[0]) // 32 for r in a.eval] == ev
    assert set(range(ev[0], ev[-1] + 1)) - set(ev) <= blocks(a.calib)
    other = data.make_splits(stream, DataConfig(seq_len=32, calib_samples=5, eval_samples=7, seed=4))
    assert not torch.equal(other.eval, a.eval)


def test_calibration_does_not_depend_on_the_evaluation_size():
    """Changing data.eval_samples must not change the pruned model (its key leaves eval_samples out)."""
    stream = torch.arange(32 * 60)
    small = data.make_splits(stream, DataConfig(seq_len=32, calib_samples=5, eval_samples=4, seed=1))
    large = data.make_splits(stream, DataConfig(seq_len=32, calib_samples=5, eval_samples=30, seed=1))
    assert torch.equal(small.calib, large.calib) and small.eval.shape[0] == 4 and large.eval.shape[0] == 30
    more = data.make_splits(stream, DataConfig(seq_len=32, calib_samples=8, eval_samples=4, seed=1))
    assert torch.equal(more.calib[:5], small.calib)  # more calibration samples extend the same draw


def test_too_little_text_is_a_clear_error():
    with pytest.raises(ConfigError, match="blocks of data.seq_len=32"):
        data.make_splits(torch.arange(100), DataConfig(seq_len=32, calib_samples=2, eval_samples=2))


def test_jsonl_and_txt_sources(tmp_path):
    rows = [{"text": "first document"}, {"text": "second document"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert data.load_texts(DataConfig(source=str(path))) == ["first document", "second document"]
    txt = tmp_path / "d.txt"
    txt.write_text("plain text")
    assert data.load_texts(DataConfig(source=str(txt))) == ["plain text"]


def test_jsonl_errors_name_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:2 has no string field 'text'"):
        data.load_texts(DataConfig(source=str(path)))
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:2 is not valid JSON"):
        data.load_texts(DataConfig(source=str(path)))


def test_parquet_source(tmp_path):
    import pandas as pd
    path = tmp_path / "d.parquet"
    pd.DataFrame({"content": ["a b", "c d"]}).to_parquet(path)
    assert data.load_texts(DataConfig(source=str(path), text_field="content")) == ["a b", "c d"]
    with pytest.raises(ConfigError, match="no column 'text'"):
        data.load_texts(DataConfig(source=str(path)))


def test_tokenize_puts_eos_between_documents():
    class Tok:
        eos_token_id = 99
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]
    assert data.tokenize(Tok(), ["ab c", "def"]).tolist() == [2, 1, 99, 3, 99]
    assert data.tokenize(models.byte_tokenizer(), ["ab"]).tolist() == [97, 98]


def _wikitext_like_repo(root, config="wikitext-2-raw-v1"):
    """A Hub dataset repository as the Hub stores Salesforce/wikitext: parquet per config and split, declared
    in the README's YAML header (blank rows included, as WikiText has them)."""
    import pandas as pd
    for split, n in (("train", 30), ("test", 5)):
        rows = [{"text": ""} if i % 3 == 0 else {"text": f" = Section {split} {i} = \n words of line {i} .\n"}
                for i in range(n)]
        (root / config).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(root / config / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        f"- config_name: {config}\n  data_files:\n"
        f"  - split: train\n    path: {config}/train-*.parquet\n"
        f"  - split: test\n    path: {config}/test-*.parquet\n---\n# wikitext-like\n")
    return root


@pytest.mark.parametrize("split, expected", [("train", 20), ("test", 3)])
def test_a_hub_dataset_with_config_and_split_is_read_through_the_hub_transport(monkeypatch, tmp_path, split,
                                                                                expected):
    """data.source = a Hub dataset id, data.dataset_config, data.split: only the HTTP transport is faked
    (tests/fake_hub.py); huggingface_hub and datasets run as they do online."""
    from fake_hub import FakeHub
    hub = FakeHub({"someone/wikitext": _wikitext_like_repo(tmp_path / "repo")})
    hub.install(monkeypatch, tmp_path / "cache")
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache", raising=False)
    try:
        cfg = DataConfig(source="someone/wikitext", dataset_config="wikitext-2-raw-v1", split=split)
        texts = data.load_texts(cfg)
        assert len(texts) == expected and all(t.strip() for t in texts)    # WikiText's blank rows dropped
        assert texts[0].startswith(f" = Section {split} 1 =")
        firsts = data.load_texts(DataConfig(source="someone/wikitext", dataset_config="wikitext-2-raw-v1",
                                            split=split, max_documents=2))
        assert firsts == texts[:2]                                           # streamed: only the first rows
        with pytest.raises(ConfigError, match="no column 'body'"):
            data.load_texts(DataConfig(source="someone/wikitext", dataset_config="wikitext-2-raw-v1",
                                       split=split, text_field="body"))
    finally:
        hub.uninstall()
    assert any("/datasets/someone/wikitext/resolve/" in p for _, p in hub.requests)


def test_validate_says_which_sources_need_the_network(capsys):
    from pathlib import Path

    from qpruner.cli import main
    job = str(Path(__file__).resolve().parents[1] / "tune_jobs" / "tiny_smoke.yaml")
    assert main(["validate", job]) == 0
    assert "needs the network" not in capsys.readouterr().err           # built-in model and text: offline
    assert main(["validate", job, "data.source=Salesforce/wikitext", "data.dataset_config=wikitext-2-raw-v1",
                 "data.split=test"]) == 0
    err = capsys.readouterr().err
    assert "data.source 'Salesforce/wikitext' is a Hugging Face Hub dataset" in err and "needs the network" in err
