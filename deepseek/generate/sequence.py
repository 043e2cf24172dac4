"""One sequence being generated, the same for every engine: its parameters, tokens, stops, text and logprobs.

Both engines (:func:`~deepseek.generate.engine.generate` for a batch that starts together, and the
continuous-batching server engine) keep one :class:`SequenceState` per sequence and hand it every token they
sample. Whether that token ends the sequence (a stop token, a stop string, its length limit), the text it
releases and its log-probabilities are decided here, so a stop or logprob fix lands in every caller at once.
Which prompts a model can read is checked here too (:func:`encode_prompts`, :func:`check_prompt_ids`).

Legend: B rows of a batch, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer

from deepseek.data.tokenizer import BOS, EOS
from deepseek.generate.detokenizer import IncrementalDetokenizer, StopStringMatcher
from deepseek.generate.params import SamplingParams
from deepseek.generate.sampling import seeded_generator

Prompt = Union[str, Sequence[int]]
FinishReason = Literal["stop", "length"]


@dataclass
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives, (token id, log-probability)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class SequenceState:
    """Everything one sequence carries between decoding steps (see the module docstring).

    ``room`` is how many tokens the sequence may add before its context is full: ``max_new`` is the smaller of
    that and ``params.max_new_tokens``. ``generator`` is the sequence's own random stream (None unless seeded),
    so a seeded sequence samples the same tokens whatever else shares its batch.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, room: int,
                 device: torch.device | str = "cpu"):
        eos = tokenizer.token_to_id(EOS)
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = frozenset(params.stop_token_ids) | (
            {eos} if eos is not None and not params.ignore_eos else frozenset())
        self.max_new = min(params.max_new_tokens, room)
        self.generator = seeded_generator(params.seed, device)
        self.token_ids: list[int] = []
        self.finish_reason: Optional[FinishReason] = None
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(params.stop)

    def append(self, token: int) -> tuple[str, Optional[FinishReason]]:
        """Account for one new token: the text it releases, and the finish reason when it ends the sequence.

        A stop token ends the sequence and adds no text of its own; a stop string is cut from the text.
        """
        self.token_ids.append(token)
        if token in self.stop_ids:
            text, _ = self.matcher.feed(self.detok.flush())
            return self._end(text + self.matcher.finish(), "stop")
        text, stopped = self.matcher.feed(self.detok.push(token))
        if stopped:
            return self._end(text, "stop")
        if len(self.token_ids) >= self.max_new:
            more, _ = self.matcher.feed(self.detok.flush())
            return self._end(text + more + self.matcher.finish(), "length")
        return text, None

    def _end(self, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
        self.finish_reason = reason
        return text, reason


def token_logprobs(logits_BV: torch.Tensor, tokens: list[int], seqs: Sequence[SequenceState], vocab_size: int
                   ) -> list[Optional[TokenLogprob]]:
    """Log-probabilities of the chosen ``tokens`` for the rows whose parameters ask (``logprobs``), else None.

    The model's own distribution over the ``vocab_size`` decodable ids, before penalties, temperature and
    filters. One host transfer for the whole batch.
    """
    wanted = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    out: list[Optional[TokenLogprob]] = [None] * len(seqs)
    if not wanted:
        return out
    log_probs = logits_BV[wanted, :vocab_size].float().log_softmax(-1)
    chosen_ids = torch.tensor([[tokens[row]] for row in wanted], device=log_probs.device)
    chosen = log_probs.gather(1, chosen_ids).squeeze(1)
    n_top = max(seqs[row].params.logprobs for row in wanted)
    values, ids = log_probs.topk(n_top) if n_top else (log_probs[:, :0], log_probs[:, :0].long())
    chosen_list, values_list, ids_list = chosen.tolist(), values.tolist(), ids.tolist()
    for i, row in enumerate(wanted):
        n = seqs[row].params.logprobs
        out[row] = TokenLogprob(tokens[row], chosen_list[i], list(zip(ids_list[i][:n], values_list[i][:n])))
    return out


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt (strings are encoded; id lists pass through). Empty prompts get BOS."""
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            bos = tokenizer.token_to_id(BOS)
            if bos is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no {BOS} token to start from")
            ids = [bos]
        encoded.append(ids)
    return encoded


def check_prompt_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Refuse ids outside the model's embedding table (``vocab_size``) before they reach it."""
    if max(ids) >= vocab_size or min(ids) < 0:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")


def sampling_vocab_size(model: torch.nn.Module, tokenizer: Tokenizer) -> int:
    """How many ids a sequence may produce: a model's vocabulary may be padded beyond its tokenizer's, and ids
    the tokenizer cannot decode are never sampled."""
    return min(model.config.vocab_size, tokenizer.get_vocab_size())
