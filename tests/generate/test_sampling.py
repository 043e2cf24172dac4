"""The sampler's filters against hand-computed references."""

import torch

from deepseek.generate import Sampler, SamplingParams


def test_repetition_penalty_follows_ctrl_rule():
    sampler = Sampler([SamplingParams(repetition_penalty=2.0)], vocab_size=4)
    sampler.observe(torch.tensor([[0, 1]]))
    logits = torch.tensor([[3.0, -1.0, 2.0, 1.0]])
    # seen: 0 (3 -> 1.5), 1 (-1 -> -2); unseen 2 stays 2.0 and wins.
    assert sampler(logits).tolist() == [2]


def test_padding_is_not_seen():
    sampler = Sampler([SamplingParams(repetition_penalty=2.0)], vocab_size=4)
    sampler.observe(torch.tensor([[3, 0]]), torch.tensor([[False, True]]))
    assert sampler.seen.tolist() == [[True, False, False, False]]


def test_top_k_restricts_support():
    params = SamplingParams(temperature=1.0, top_k=2, seed=0)
    sampler = Sampler([params], vocab_size=5)
    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0, 0.5]])
    picks = {int(sampler(logits)) for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_smallest_nucleus():
    sampler = Sampler([SamplingParams(temperature=1.0, top_p=0.6, seed=0)], vocab_size=3)
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    picks = {int(sampler(probs.log())) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.6, so the second token is needed; the third is not


def test_sampling_frequencies_follow_probabilities():
    sampler = Sampler([SamplingParams(temperature=1.0, seed=123)], vocab_size=3)
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    counts = torch.bincount(torch.stack([sampler(probs.log()) for _ in range(3000)]).flatten(), minlength=3)
    freq = counts.float() / counts.sum()
    assert torch.allclose(freq, probs[0], atol=0.04)


def test_rows_use_their_own_parameters():
    sampler = Sampler([SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=1)], vocab_size=3)
    logits = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]])
    assert sampler(logits).tolist() == [1, 0]
