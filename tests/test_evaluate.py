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


def test_windows_score_every_token_once():
    from qpruner.evaluate import windows
    for n, context, stride in ((64, 64, 64), (64, 32, 16), (100, 32, 32), (100, 30, 7), (10, 64, 64)):
        spans = windows(n, context, stride)
        # overlapping windows score every token but the first exactly once; non-overlapping ones
        # cannot score the first token of each window (nothing before it inside the window)
        expected = n - 1 if stride < context or n <= context else n - len(spans)
        assert sum(s for _, _, s in spans) == expected
        assert all(e - b <= context for b, e, _ in spans)
        for b, e, s in spans[1:]:
            assert e - s - b >= min(context - stride, b)         # each scored token keeps >= context - stride


def test_strided_perplexity_equals_a_token_by_token_reference(tiny):
    """Reference: each token t scored once, from the window that scores it, via a separate forward."""
    from qpruner.evaluate import windows
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, 20))
    stream = ids.reshape(-1)
    got = evaluate(tiny, ids, batch_size=2, context=24, stride=8)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b, e, scored in windows(stream.numel(), 24, 8):
            logp = torch.log_softmax(tiny(input_ids=stream[None, b:e]).logits[0].float(), -1)
            for t in range(e - scored, e):
                nll -= float(logp[t - b - 1, stream[t]])
                count += 1
    assert got.tokens == count == 59
    assert got.nll == pytest.approx(nll / count, rel=1e-5)
    same = evaluate(tiny, ids, context=20)  # stride defaults to the window: the 3 rows, 19 scored in each
    assert same.tokens == 3 * 19


import pytest  # noqa: E402


def test_window_standard_errors_and_paired_differences():
    import math
    from qpruner.evaluate import paired_diff, ratio_se
    sums, counts = [2.0, 4.0, 6.0], [2, 2, 2]                  # window means 1, 2, 3
    assert ratio_se(sums, counts) == pytest.approx(math.sqrt(3 / 2 * (4 + 0 + 4)) / 6)
    assert math.isnan(ratio_se([1.0], [1]))
    diff, se = paired_diff([3.0, 5.0, 7.0], sums, counts)      # +1 NLL per window of 2 tokens
    assert diff == pytest.approx(0.5) and se == pytest.approx(0.0)
    with pytest.raises(ValueError):
        paired_diff([1.0], [1.0, 2.0], [1, 1])


def test_evaluate_reports_window_sums_that_add_up(tiny, tiny_splits):
    from qpruner.evaluate import evaluate
    m = evaluate(tiny, tiny_splits.eval, batch_size=3)
    assert len(m.window_nll) == len(m.window_tokens) == len(m.window_correct) == tiny_splits.eval.shape[0]
    assert sum(m.window_nll) / sum(m.window_tokens) == pytest.approx(m.nll)
    assert sum(m.window_correct) / sum(m.window_tokens) == pytest.approx(m.accuracy)
    assert m.nll_se > 0 and 0 < m.accuracy_se < 0.5
