"""Zero-shot multiple choice, scored exactly as lm-evaluation-harness scores it.

An item has contexts and continuations; usually one context and one continuation per choice, for
WinoGrande one context per choice and a shared continuation ("partial scoring"). For each choice,
``LL = sum log p(continuation tokens | context)``, where the continuation tokens are those of
``encode(context + continuation)`` after the tokens of ``encode(context)`` (trailing spaces of the
context move to the continuation first), and a sequence longer than the model's window is cut from
the left. Then

* ``acc``      = mean over items of ``[argmax_i LL_i == label]``;
* ``acc_norm`` = mean over items of ``[argmax_i LL_i / bytes(continuation_i) == label]``
  (the harness divides by the continuation's length; we use UTF-8 bytes, equal for ASCII).

Sources:

* a local JSONL file, one item per line: ``{"context": str, "choices": [str, ...], "label": int}``
  or ``{"contexts": [str, ...], "continuation": str, "label": int}``; the task is named after the file;
* when online (with the ``datasets`` package): ``boolq``, ``piqa``, ``hellaswag``, ``winogrande``,
  ``arc_easy``, ``arc_challenge``, ``openbookqa``, with the harness's prompt formats (:data:`FORMATS`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .data import iter_jsonl
from .errors import ConfigError


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: a context and a continuation per choice, and the right choice."""
    contexts: tuple[str, ...]        # one per choice (the same string repeated for most tasks)
    continuations: tuple[str, ...]   # one per choice
    label: int

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise ConfigError(["a multiple-choice item needs one context and one continuation per choice, and two "
                               "choices or more"])
        if not 0 <= self.label < len(self.contexts):
            raise ConfigError([f"a multiple-choice item's label {self.label} is not a choice index "
                               f"(0..{len(self.contexts) - 1})"])


@dataclass(frozen=True)
class MCResult:
    """Accuracy (raw and length-normalised) of a model on a task."""
    task: str
    acc: float
    acc_norm: float
    items: int
    seconds: float


# ----------------------------------------------------------------------------------------------
# sources


def item_from_json(row: dict, where: str) -> MCItem:
    """A multiple-choice item from a JSON row (``where`` names it in errors)."""
    try:
        if "choices" in row:
            choices = [str(c) for c in row["choices"]]
            return MCItem((str(row["context"]),) * len(choices), tuple(choices), int(row["label"]))
        contexts = [str(c) for c in row["contexts"]]
        return MCItem(tuple(contexts), (str(row["continuation"]),) * len(contexts), int(row["label"]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ConfigError([f"{where}: not a multiple-choice item ({exc}); expected "
                           '{"context", "choices", "label"} or {"contexts", "continuation", "label"}']) from None


def load_jsonl(path: str | Path, limit: int | None = None) -> list[MCItem]:
    """Multiple-choice items from a local ``.jsonl`` file."""
    items = []
    for lineno, row in iter_jsonl(path):
        items.append(item_from_json(row, f"{path}:{lineno}"))
        if limit and len(items) >= limit:
            break
    return items


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _boolq(d):
    return MCItem((f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",) * 2, (" no", " yes"), int(bool(d["answer"])))


def _piqa(d):
    return MCItem((f"Question: {d['goal']}\nAnswer:",) * 2, (" " + d["sol1"], " " + d["sol2"]), int(d["label"]))


def _hellaswag(d):
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    query = _hellaswag_clean(d["activity_label"] + ": " + ctx)
    endings = tuple(" " + _hellaswag_clean(e) for e in d["endings"])
    return MCItem((query,) * len(endings), endings, int(d["label"]))


def _winogrande(d):
    cut = d["sentence"].index("_")
    continuation = " " + d["sentence"][cut + 1:].strip()
    contexts = tuple(d["sentence"][:cut] + option for option in (d["option1"], d["option2"]))
    return MCItem(contexts, (continuation,) * 2, int(d["answer"]) - 1)


def _arc(d):
    labels = list(d["choices"]["label"])
    key = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(d["answerKey"], d["answerKey"])
    labels = [{"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}.get(x, x) for x in labels]
    choices = tuple(" " + c for c in d["choices"]["text"])
    return MCItem((f"Question: {d['question']}\nAnswer:",) * len(choices), choices, labels.index(key))


def _openbookqa(d):
    choices = tuple(" " + c for c in d["choices"]["text"])
    return MCItem((d["question_stem"],) * len(choices), choices, list(d["choices"]["label"]).index(d["answerKey"].strip()))


# name -> (dataset path, config, split, converter): the harness's datasets and prompt formats
FORMATS = {
    "boolq": ("super_glue", "boolq", "validation", _boolq),
    "piqa": ("baber/piqa", None, "validation", _piqa),
    "hellaswag": ("Rowan/hellaswag", None, "validation", _hellaswag),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", _winogrande),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    "openbookqa": ("allenai/openbookqa", "main", "test", _openbookqa),
}


def task_name(spec: str) -> str:
    """The task's name: a file's stem, or the built-in task's name."""
    return Path(spec).stem if spec.endswith(".jsonl") else spec


def load_task(spec: str, limit: int | None = None) -> list[MCItem]:
    """Items of a task: a local ``.jsonl`` file, or one of :data:`FORMATS` (needs ``datasets`` and network)."""
    if spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise ConfigError([f"eval.tasks: file {spec!r} does not exist"])
        return load_jsonl(spec, limit)
    if spec not in FORMATS:
        raise ConfigError([f"eval.tasks: unknown task {spec!r}; expected a .jsonl file or one of {sorted(FORMATS)}"])
    try:
        import datasets
    except ImportError:
        raise ConfigError([f"eval.tasks: {spec!r} is loaded from the Hugging Face hub, which needs "
                           "`pip install datasets` and network access; or use a local .jsonl file"]) from None
    path, name, split, convert = FORMATS[spec]
    rows = datasets.load_dataset(path, name, split=split)
    items = []
    for row in rows:
        items.append(convert(row))
        if limit and len(items) >= limit:
            break
    return items


# ----------------------------------------------------------------------------------------------
# scoring


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as the harness splits them."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return whole[:len(ctx)], whole[len(ctx):]


@dataclass(frozen=True)
class TokenizedTask:
    """A task ready for a model: no tokenizer needed any more (trials get this, not text)."""
    name: str
    inputs: tuple[tuple[int, ...], ...]       # per (item, choice): the tokens fed to the model
    targets: tuple[tuple[int, ...], ...]      # per (item, choice): the continuation tokens scored
    choices: tuple[int, ...]                  # per item: number of choices
    labels: tuple[int, ...]
    target_bytes: tuple[int, ...]             # per (item, choice): UTF-8 bytes of the continuation


def tokenize_task(name: str, items: list[MCItem], tokenizer, max_length: int) -> TokenizedTask:
    """Tokenize a task's items once, so trials score it without a tokenizer."""
    inputs, targets, sizes = [], [], []
    for item in items:
        for context, continuation in zip(item.contexts, item.continuations):
            ctx, cont = _encode_pair(tokenizer, context, continuation)
            if not ctx or not cont:
                raise ConfigError([f"task {name}: an empty context or continuation in {context[-40:]!r} / "
                                   f"{continuation!r}; every item needs text on both sides"])
            seq = (ctx + cont)[-(max_length + 1):]
            inputs.append(tuple(seq[:-1]))
            targets.append(tuple(seq[-len(cont):]))
            sizes.append(len(continuation.encode("utf-8")))
    return TokenizedTask(name, tuple(inputs), tuple(targets), tuple(len(i.contexts) for i in items),
                         tuple(i.label for i in items), tuple(sizes))


@torch.no_grad()
def loglikelihoods(model: nn.Module, task: TokenizedTask, batch_size: int = 8, device="cpu") -> list[float]:
    """``sum log p(continuation | context)`` for every (item, choice), batched (right padding)."""
    out = [0.0] * len(task.inputs)
    order = sorted(range(len(task.inputs)), key=lambda i: -len(task.inputs[i]))  # long first: less padding
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(task.inputs[i]) for i in idx)
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(task.inputs[i])] = torch.tensor(task.inputs[i])
        logprobs = F.log_softmax(model(input_ids=batch.to(device)).logits.float(), dim=-1)
        for row, i in enumerate(idx):
            n, length = len(task.targets[i]), len(task.inputs[i])
            positions = torch.arange(length - n, length, device=logprobs.device)
            out[i] = float(logprobs[row, positions, torch.tensor(task.targets[i], device=logprobs.device)].sum())
    return out


def score(model: nn.Module, task: TokenizedTask, batch_size: int = 8, device="cpu") -> MCResult:
    """Score ``model`` on a tokenized task as lm-eval does (log-likelihood of each continuation)."""
    t0 = time.perf_counter()
    lls = loglikelihoods(model, task, batch_size, device)
    acc = acc_norm = pos = 0
    for n, label in zip(task.choices, task.labels):
        ll = lls[pos:pos + n]
        norm = [v / max(1, b) for v, b in zip(ll, task.target_bytes[pos:pos + n])]
        pos += n
        acc += int(max(range(n), key=lambda i: ll[i]) == label)
        acc_norm += int(max(range(n), key=lambda i: norm[i]) == label)
    items = len(task.labels)
    return MCResult(task.name, acc / items, acc_norm / items, items, time.perf_counter() - t0)
