import json
import math
import sys
import types

import pytest
import torch
from torch import nn

from qpruner import models, tasks
from qpruner.config import ONLINE_TASKS
from qpruner.errors import ConfigError


class UnigramModel(nn.Module):
    """Byte 'model' whose next-token distribution is fixed: log p(b) known for every byte."""

    def __init__(self, logp: dict[int, float], default: float):
        super().__init__()
        table = torch.full((256,), default)
        for b, v in logp.items():
            table[b] = v
        self.logits = table  # used as log-probs: log_softmax(table) == table when it is normalised

    def forward(self, input_ids):
        b, t = input_ids.shape
        return types.SimpleNamespace(logits=self.logits.expand(b, t, -1).clone())


def _normalised(logp: dict[int, float]):
    rest = 1.0 - sum(math.exp(v) for v in logp.values())
    return logp, math.log(rest / (256 - len(logp)))


def test_scores_match_hand_computed_acc_and_acc_norm():
    logp, default = _normalised({ord("a"): math.log(0.3), ord("b"): math.log(0.2), ord(" "): math.log(0.1)})
    model = UnigramModel(logp, default)
    tok = models.byte_tokenizer()
    items = [
        # " a" (2 bytes) vs " bb" (3 bytes): LL(" a") = log .1 + log .3 > LL(" bb"); per byte too -> both pick 0
        tasks.MCItem(("Q:",) * 2, (" a", " bb"), 0),
        # " x" vs " aaaa": LL(" aaaa") = log .1 + 4 log .3 = -7.12 > LL(" x") = log .1 + default (~ -8.7),
        # per byte " aaaa" -1.42 > " x" -4.4 -> both pick 1, label 1
        tasks.MCItem(("Q:",) * 2, (" x", " aaaa"), 1),
        # " b" vs " aaaaaaaaa": LL(" b") = -3.91 > LL(" a"*9) = -13.14 -> acc picks 0;
        # per byte: " b" -1.96 < " aaaaaaaaa" -1.31 -> acc_norm picks 1; label 1: acc wrong, acc_norm right
        tasks.MCItem(("Q:",) * 2, (" b", " aaaaaaaaa"), 1),
    ]
    task = tasks.tokenize_task("toy", items, tok, max_length=64)
    ll = tasks.loglikelihoods(model, task, batch_size=2)
    expected = [sum(logp.get(c, default) for c in cont.encode()) for item in items for cont in item.continuations]
    assert ll == pytest.approx(expected, rel=1e-5)
    result = tasks.score(model, task, batch_size=2)
    assert (result.acc, result.acc_norm, result.items) == (pytest.approx(2 / 3), pytest.approx(1.0), 3)


def test_trailing_context_spaces_move_to_the_continuation():
    tok = models.byte_tokenizer()
    ctx, cont = tasks._encode_pair(tok, "Answer: ", "yes")
    assert bytes(ctx) == b"Answer:" and bytes(cont) == b" yes"


def test_long_items_are_cut_from_the_left():
    task = tasks.tokenize_task("t", [tasks.MCItem(("x" * 100,) * 2, (" a", " b"), 0)], models.byte_tokenizer(), 16)
    # max_length counts the model's input: 16 tokens in, the last 2 of the 17-token sequence scored
    assert all(len(i) == 16 for i in task.inputs) and task.targets == ((32, 97), (32, 98))


def test_local_jsonl_both_schemas_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"context": "Q", "choices": [" a", " b"], "label": 1}) + "\n"
                    + json.dumps({"contexts": ["The cat", "The dog"], "continuation": " barked", "label": 1}) + "\n")
    items = tasks.load_task(str(path))
    assert items[0] == tasks.MCItem(("Q", "Q"), (" a", " b"), 1)
    assert items[1] == tasks.MCItem(("The cat", "The dog"), (" barked", " barked"), 1)
    assert tasks.task_name(str(path)) == "mine" and len(tasks.load_task(str(path), limit=1)) == 1
    path.write_text(json.dumps({"context": "Q", "choices": [" a"], "label": 3}) + "\n")
    with pytest.raises(ConfigError, match="mine.jsonl:1"):
        tasks.load_task(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        tasks.load_task(str(tmp_path / "nope.jsonl"))


def test_harness_prompt_formats():
    assert set(tasks.FORMATS) == set(ONLINE_TASKS)
    boolq = tasks.FORMATS["boolq"][3]({"passage": "P", "question": "is it", "answer": True})
    assert boolq == tasks.MCItem(("P\nQuestion: is it?\nAnswer:",) * 2, (" no", " yes"), 1)
    piqa = tasks.FORMATS["piqa"][3]({"goal": "G", "sol1": "s1", "sol2": "s2", "label": 0})
    assert piqa.contexts[0] == "Question: G\nAnswer:" and piqa.continuations == (" s1", " s2")
    hs = tasks.FORMATS["hellaswag"][3]({"activity_label": "Cooking", "ctx_a": "A man", "ctx_b": "then [title] he",
                                        "endings": ["cuts [step] it.", "eats  it."], "label": "1"})
    assert hs.contexts[0] == "Cooking: A man Then. he" and hs.continuations == (" cuts it.", " eats it.")
    assert hs.label == 1
    wg = tasks.FORMATS["winogrande"][3]({"sentence": "Sam gave _ the ball.", "option1": "Ann", "option2": "Bo",
                                         "answer": "2"})
    assert wg == tasks.MCItem(("Sam gave Ann", "Sam gave Bo"), (" the ball.", " the ball."), 1)
    arc = tasks.FORMATS["arc_easy"][3]({"question": "Q?", "choices": {"text": ["x", "y"], "label": ["1", "2"]},
                                        "answerKey": "2"})
    assert arc == tasks.MCItem(("Question: Q?\nAnswer:",) * 2, (" x", " y"), 1)
    obqa = tasks.FORMATS["openbookqa"][3]({"question_stem": "S", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                                           "answerKey": "B"})
    assert obqa == tasks.MCItem(("S", "S"), (" x", " y"), 1)


def test_online_tasks_go_through_datasets(monkeypatch):
    """Only the transport is faked: a stand-in `datasets` module returns the hub rows."""
    calls = []
    rows = [{"goal": f"G{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(5)]
    fake = types.SimpleNamespace(load_dataset=lambda path, name, split: calls.append((path, name, split)) or rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    items = tasks.load_task("piqa", limit=3)
    assert calls == [("baber/piqa", None, "validation")] and len(items) == 3 and items[2].label == 0
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match="pip install datasets"):
        tasks.load_task("piqa")
