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
    # Three rows, the same logits, parameters whose distributions all differ: any mix-up between rows shows.
    params = [SamplingParams(repetition_penalty=4.0),  # greedy; the seen token 0 drops to 0.75: token 1
              SamplingParams(temperature=1.0, top_k=2, seed=1),  # softmax([3, 2]) on {0, 1}
              SamplingParams(temperature=0.5, top_p=0.9, seed=2)]  # softmax([6, 4, 2, 0]): the nucleus is {0, 1}
    sampler = Sampler(params, vocab_size=4)
    sampler.observe(torch.tensor([[0], [0], [0]]))
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(3, -1)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0],
                             [*torch.tensor([3.0, 2.0]).softmax(0), 0.0, 0.0],
                             [*torch.tensor([6.0, 4.0]).softmax(0), 0.0, 0.0]])
    torch.testing.assert_close(sampler.probabilities(logits), expected)
    draws = torch.stack([sampler(logits) for _ in range(2000)])  # [2000, 3]
    assert draws[:, 0].eq(1).all()
    for row in (1, 2):
        freq = torch.bincount(draws[:, row], minlength=4).float() / len(draws)
        torch.testing.assert_close(freq, expected[row], atol=0.035, rtol=0)


def test_distribution_follows_temperature_top_p_and_openai_penalties_by_hand():
    params = SamplingParams(temperature=0.6, top_p=0.8, presence_penalty=0.4, frequency_penalty=0.7, seed=0)
    sampler = Sampler([params], vocab_size=6)
    for token in (2, 2, 4):  # generated so far: token 2 twice, token 4 once
        sampler.record_output(torch.tensor([token]))
    raw = torch.tensor([[1.0, 0.5, 2.0, -0.5, 1.5, 0.0]])
    # By hand: penalties on generated tokens, then temperature, then the nucleus of mass 0.8, renormalised.
    penalised = raw[0] - 0.7 * torch.tensor([0, 0, 2, 0, 1, 0]) - 0.4 * torch.tensor([0, 0, 1, 0, 1, 0])
    torch.testing.assert_close(sampler.penalised_logits(raw)[0], penalised)
    probs = (penalised / 0.6).softmax(0)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    nucleus = torch.zeros(6)
    nucleus[order[before < 0.8]] = probs[order[before < 0.8]]
    expected = nucleus / nucleus.sum()
    assert (expected > 0).sum() == 4  # the filter really cuts tokens off (3 and 5)
    torch.testing.assert_close(sampler.probabilities(raw)[0], expected)
    # And the draws come from that distribution (counts of 4000 seeded draws).
    counts = torch.bincount(torch.stack([sampler(raw)[0] for _ in range(4000)]), minlength=6)
    torch.testing.assert_close(counts.float() / 4000, expected, atol=0.03, rtol=0)
