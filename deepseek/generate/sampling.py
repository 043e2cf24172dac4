"""Choosing the next token from logits, one row per sequence, each row with its own parameters.

Legend: B sequences, V vocabulary. Everything is vectorised over rows except the random draws, which
use one generator per sequence so that a seeded request gives the same tokens whatever else is in
the batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from deepseek.generate.params import SamplingParams


def seeded_generator(seed: Optional[int], device: torch.device | str = "cpu") -> Optional[torch.Generator]:
    """A sequence's own random stream when it has a seed (None: the global one)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Per-row sampling state for a batch: parameters as tensors, penalty state, generators.

    The penalty state (``seen``: tokens in each row's context, ``output_counts``: occurrences in its output)
    is allocated here when a row needs it, or handed in as views of state that outlives one Sampler
    (continuous batching builds one per step over slots that keep their state).
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device: torch.device | str = "cpu",
                 generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                 output_counts: Optional[torch.Tensor] = None, seen: Optional[torch.Tensor] = None):
        self.params = list(params)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        self.top_k = torch.tensor([p.top_k for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        self.all_greedy = all(p.greedy for p in params)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.any_top_k = any(p.top_k > 0 for p in params)
        self.any_top_p = any(p.top_p < 1.0 for p in params)
        # Tokens in each row's context [B, V], for the repetition penalty (a mask, so no history gathering).
        self.seen = None
        if self.any_penalty:
            self.seen = seen if seen is not None else torch.zeros(len(params), vocab_size, dtype=torch.bool,
                                                                  device=device)
        # Generators are per sequence and may outlive one Sampler (continuous batching builds one per step).
        self.generators = (list(generators) if generators is not None
                           else [seeded_generator(p.seed, self.device) for p in params])
        # Occurrences of each token in each row's output so far [B, V], for presence/frequency penalties.
        self.output_counts = output_counts
        self.presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        self.any_output_penalty = any(p.presence_penalty or p.frequency_penalty for p in params)

    def observe(self, ids_BT: torch.Tensor, valid_BT: Optional[torch.Tensor] = None) -> None:
        """Record tokens (a prompt) as seen, for the repetition penalty; padding excluded."""
        if self.seen is None:
            return
        ids = ids_BT.clamp(0, self.vocab_size - 1)
        if valid_BT is None:
            self.seen.scatter_(1, ids, True)
            return
        counts = torch.zeros_like(self.seen, dtype=torch.int32).scatter_add_(1, ids, valid_BT.to(torch.int32))
        self.seen |= counts > 0

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows in ``keep`` (after other sequences finished)."""
        rows = keep.tolist()
        self.params = [self.params[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self.temperature, self.top_k = self.temperature[keep], self.top_k[keep]
        self.top_p, self.penalty = self.top_p[keep], self.penalty[keep]
        if self.seen is not None:
            self.seen = self.seen[keep]
        self.presence, self.frequency = self.presence[keep], self.frequency[keep]
        if self.output_counts is not None:
            self.output_counts = self.output_counts[keep]

    def record_output(self, tokens_B: torch.Tensor) -> None:
        """Account for the tokens just chosen (one per row): they join the context the repetition penalty
        sees, and the output counts of the presence/frequency penalties."""
        if self.seen is None and not self.any_output_penalty:
            return
        tokens_B = tokens_B.clamp(0, self.vocab_size - 1)
        if self.seen is not None:
            self.seen.scatter_(1, tokens_B.unsqueeze(1), True)
        if not self.any_output_penalty:
            return
        if self.output_counts is None:
            self.output_counts = torch.zeros(len(self.params), self.vocab_size, dtype=torch.int32, device=self.device)
        rows = torch.arange(tokens_B.shape[0], device=tokens_B.device)
        self.output_counts[rows, tokens_B] += 1

    def penalised_logits(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (fp32, decodable ids only) after the repetition, presence and frequency penalties."""
        logits = logits_BV[:, : self.vocab_size].float()
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.any_output_penalty and self.output_counts is not None:
            counts = self.output_counts[:, : self.vocab_size].float()
            logits = logits - self.frequency * counts - self.presence * (counts > 0).float()
        return logits

    def _sorted_distribution(self, logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's sampling distribution over its ids sorted by likelihood: (probabilities, ids), [B, V] each.

        Probabilities are unnormalised after top-p (sampling scales by the total).
        """
        # One sort serves both filters: top-k keeps a prefix of it, top-p a prefix of its probabilities.
        sorted_logits, sorted_ids = (logits_BV / self.temperature.clamp_min(1e-5)).sort(dim=-1, descending=True)
        if self.any_top_k:
            sorted_logits = _filter_top_k(sorted_logits, self.top_k)
        sorted_probs = sorted_logits.softmax(dim=-1)
        if self.any_top_p:
            sorted_probs = _filter_top_p(sorted_probs, self.top_p)
        return sorted_probs, sorted_ids

    def probabilities(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """The distribution each row's next token is drawn from, [B, V] in vocabulary order, rows summing to 1.

        Greedy rows (temperature 0) put all the mass on their penalised argmax. Not used when sampling (which
        draws from the sorted distribution directly); it states what :meth:`__call__` samples from.
        """
        logits = self.penalised_logits(logits_BV)
        sorted_probs, sorted_ids = self._sorted_distribution(logits)
        probs = torch.zeros_like(sorted_probs).scatter_(1, sorted_ids, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        greedy = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return torch.where(self.temperature == 0, greedy, probs)

    def __call__(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """The next token of every row: [B] int64."""
        logits = self.penalised_logits(logits_BV)
        if self.all_greedy:
            return logits.argmax(dim=-1)
        greedy_choice = logits.argmax(dim=-1)
        sorted_probs, sorted_ids = self._sorted_distribution(logits)
        cdf = sorted_probs.cumsum(dim=-1)
        u = self._uniform(len(self.params)).unsqueeze(1) * cdf[:, -1:]
        index = torch.searchsorted(cdf, u).clamp_max(cdf.shape[1] - 1)
        sampled = sorted_ids.gather(1, index).squeeze(1)
        return torch.where(self.temperature.squeeze(1) == 0, greedy_choice, sampled)

    def _uniform(self, n: int) -> torch.Tensor:
        draws = [torch.rand((), generator=g, device=self.device) if g is not None else torch.rand((), device=self.device)
                 for g in self.generators[:n]]
        return torch.stack(draws)


def _filter_top_k(sorted_logits_BV: torch.Tensor, top_k_B: torch.Tensor) -> torch.Tensor:
    """On logits sorted in descending order, keep each row's first ``top_k`` (rows with top_k == 0 keep all)."""
    rank = torch.arange(sorted_logits_BV.shape[1], device=sorted_logits_BV.device)
    k = torch.where(top_k_B > 0, top_k_B, sorted_logits_BV.shape[1])
    return sorted_logits_BV.masked_fill(rank >= k.unsqueeze(1), float("-inf"))


def _filter_top_p(sorted_probs_BV: torch.Tensor, top_p_B1: torch.Tensor) -> torch.Tensor:
    """Nucleus filter on probabilities sorted in descending order: keep the smallest prefix reaching ``top_p``."""
    before = sorted_probs_BV.cumsum(dim=-1) - sorted_probs_BV  # mass strictly before each token
    return sorted_probs_BV.masked_fill(before >= top_p_B1, 0.0)
