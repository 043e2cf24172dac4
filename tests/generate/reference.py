"""Slow, obviously-correct references for generation tests: one full forward of a finished sequence, and
sampling redone by hand from its raw logits (float64, written from the definitions, not from the sampler).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from deepseek.generate import SamplingParams


def full_forward_logits(model, prompt_ids: list[int], token_ids: list[int], vocab: int) -> torch.Tensor:
    """[N, vocab] float64: the raw logits each of the N produced tokens was chosen from, from one forward of the
    whole sequence without a cache (position p predicts token p + 1)."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt_ids) - 1:-1, :vocab]
    return logits.double()


def hand_distribution(raw_V: torch.Tensor, context: list[int], previous: list[int], p: SamplingParams
                      ) -> torch.Tensor:
    """[V] float64: the distribution the next token is drawn from, by the definitions.

    ``context`` is prompt + ``previous`` (the tokens generated so far). CTRL repetition penalty on every
    context token; OpenAI penalties ``- frequency * count - presence * [count > 0]`` on generated tokens; then
    temperature; top-k keeps the k most likely; top-p keeps the most likely tokens while the mass before each
    is below ``top_p``; renormalised. Greedy (temperature 0): all mass on the argmax.
    """
    V = raw_V.shape[0]
    logits = raw_V.clone()
    for token in set(context):
        penalty = p.repetition_penalty
        logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
    counts = torch.bincount(torch.tensor(previous, dtype=torch.long), minlength=V).double()
    logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).double()
    if p.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), V).double()
    order = torch.argsort(logits, descending=True).tolist()
    if p.top_k:
        order = order[:p.top_k]
    probs = torch.zeros(V, dtype=torch.float64)
    probs[order] = torch.softmax(logits[order] / p.temperature, dim=0)
    kept, before = [], 0.0
    for token in order:
        if before >= p.top_p:
            break
        kept.append(token)
        before += float(probs[token])
    nucleus = torch.zeros(V, dtype=torch.float64)
    nucleus[kept] = probs[kept]
    return nucleus / nucleus.sum()


def hand_sampled_tokens(raw_NV: torch.Tensor, prompt_ids: list[int], token_ids: list[int], p: SamplingParams
                        ) -> list[int]:
    """The tokens a seeded sequence must produce: at step i, the distribution of :func:`hand_distribution` given
    the actual tokens before it, inverted at the i-th uniform draw of the sequence's generator (one draw per
    token, tokens in order of decreasing probability)."""
    generator = torch.Generator().manual_seed(p.seed)
    out = []
    for i in range(raw_NV.shape[0]):
        probs = hand_distribution(raw_NV[i], list(prompt_ids) + token_ids[:i], token_ids[:i], p)
        u = float(torch.rand((), generator=generator))
        mass = 0.0
        for token in torch.argsort(probs, descending=True).tolist():
            mass += float(probs[token])
            if mass >= u:
                break
        out.append(token)
    return out


def assert_follows_hand_sampling(raw_NV, prompt_ids, token_ids, params: SamplingParams, sensitive_to: dict) -> None:
    """``token_ids`` are exactly the hand-sampled tokens, and would not be with any one of ``sensitive_to``'s
    parameter changes (so a sampler that ignored that parameter could not pass)."""
    assert hand_sampled_tokens(raw_NV, prompt_ids, token_ids, params) == token_ids
    for name, value in sensitive_to.items():
        assert hand_sampled_tokens(raw_NV, prompt_ids, token_ids, replace(params, **{name: value})) != token_ids, name
