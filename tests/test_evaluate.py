import math

import torch
from torch import nn

from qpruner.evaluate import evaluate


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is the same fixed vector at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids):
        b, t = input_ids.shape
        return type("Out", (), {"logits": self.logits.expand(b, t, -1).clone()})()


def test_perplexity_and_accuracy_by_hand():
    model = FixedLogits([0.0, math.log(3.0), 0.0, 0.0])  # p = [1/6, 1/2, 1/6, 1/6]
    ids = torch.tensor([[0, 1, 1, 2], [3, 1, 0, 1]])
    m = evaluate(model, ids, batch_size=1)
    targets = [1, 1, 2, 1, 0, 1]
    nll = sum(-math.log(0.5 if t == 1 else 1 / 6) for t in targets) / len(targets)
    assert m.tokens == 6
    assert m.nll == __import__("pytest").approx(nll)
    assert m.perplexity == __import__("pytest").approx(math.exp(nll))
    assert m.accuracy == 4 / 6  # argmax is always token 1


def test_evaluation_leaves_training_mode_as_it_was(tiny):
    tiny.train()
    evaluate(tiny, torch.randint(0, 256, (2, 8)))
    assert tiny.training
