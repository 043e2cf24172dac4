"""The batch generation engine: batched prompts, static KV cache, per-sequence sampling, stops, streaming.

The engine of ``ds generate`` and ``ds.pipeline``; the server's continuous-batching engine
(``generate/continuous.py``) shares its per-sequence logic (:class:`~deepseek.generate.sequence.SequenceState`:
stops, length, text, logprobs) and its :class:`~deepseek.generate.sampling.Sampler`. Prompts of different
lengths are left-padded into one batch and prefilled in a single forward; then each step feeds one
token per live sequence. Finished sequences leave the batch (their cache rows are dropped), so a
long request does not keep paying for short ones that are done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer

from deepseek.compile import jit
from deepseek.data.tokenizer import PAD
from deepseek.generate.params import SamplingParams
from deepseek.generate.sampling import Sampler
from deepseek.generate.sequence import (FinishReason, Prompt, SequenceState, TokenLogprob, check_prompt_ids,
                                        encode_prompts, sampling_vocab_size, token_logprobs)
from deepseek.nn.kv_cache import KVCache


@dataclass
class GenerationOutput:
    """One finished sequence: the completion text (stop string excluded) and its token ids."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StreamEvent:
    """A piece of output for prompt ``index`` (one per token); the last event of a sequence has ``finish_reason``."""

    index: int
    delta: str
    token_id: Optional[int] = None
    finish_reason: Optional[FinishReason] = None
    logprob: Optional[TokenLogprob] = None  # when the sequence's parameters ask for ``logprobs``


def _as_params(params, n: int, overrides: dict) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams.from_dict(overrides)
    elif overrides:
        raise TypeError("pass sampling options either as `params` or as keyword arguments, not both")
    if isinstance(params, dict):
        params = SamplingParams.from_dict(params)
    if isinstance(params, SamplingParams):
        return [params] * n
    params = [p if isinstance(p, SamplingParams) else SamplingParams.from_dict(p) for p in params]
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return params


def generate_stream(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt],
                    params: Union[SamplingParams, dict, Sequence[SamplingParams], None] = None,
                    compile: bool = False, **options) -> Iterator[StreamEvent]:
    """Generate for a batch of prompts, yielding text deltas as they are decided.

    ``params`` is one :class:`SamplingParams` for all prompts or one per prompt; sampling options may
    instead be given as keyword arguments (``max_new_tokens=32, temperature=0.8, stop=["\\n\\n"]``).
    ``compile=True`` runs the decoding step through ``torch.compile`` (static shapes, compiled once per
    model and batch size; the first call pays the compilation).
    """
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        raise TypeError("generate_stream takes a list of prompts; use stream() for one prompt")
    params_list = _as_params(params, len(prompts), options)
    yield from _decode(model, tokenizer, encode_prompts(tokenizer, prompts), params_list, compile)


def _decode_step(model: torch.nn.Module, compiled: bool) -> Callable:
    """One decoding step: eager, or compiled once per model (static shapes; falls back to eager).

    The compiled step is kept on the model, so later generate calls reuse the compilation.
    """
    if not compiled:
        return lambda ids, cache: model(ids, cache=cache, logits_to_keep=1)
    step = getattr(model, "_ds_compiled_decode_step", None)
    if step is None:
        step = jit(lambda ids, cache: model(ids, cache=cache, logits_to_keep=1))
        model._ds_compiled_decode_step = step
    return step


@torch.inference_mode()
def _decode(model, tokenizer: Tokenizer, prompt_ids: list[list[int]], params: list[SamplingParams],
            compiled: bool = False) -> Iterator[StreamEvent]:
    config = model.config
    device = next(model.parameters()).device
    batch = len(prompt_ids)
    if batch == 0:
        return
    longest = max(map(len, prompt_ids))
    room = config.max_seq_len - longest
    if room < 1:
        raise ValueError(f"prompt of {longest} tokens leaves no room under max_seq_len={config.max_seq_len}")
    for ids in prompt_ids:
        check_prompt_ids(ids, config.vocab_size)
    seqs = [SequenceState(ids, p, tokenizer, room, device) for ids, p in zip(prompt_ids, params)]
    max_new = max(s.max_new for s in seqs)

    pad_id = tokenizer.token_to_id(PAD) or 0
    ids_BT = torch.full((batch, longest), pad_id, dtype=torch.long)
    valid_BT = torch.zeros(batch, longest, dtype=torch.bool)
    for row, ids in enumerate(prompt_ids):
        ids_BT[row, longest - len(ids):] = torch.tensor(ids)
        valid_BT[row, longest - len(ids):] = True
    all_valid = bool(valid_BT.all())
    ids_BT, valid_BT = ids_BT.to(device), valid_BT.to(device)

    # A compiled step needs fixed shapes: a static cache, and finished rows stay in the batch (ignored).
    cache = KVCache.for_model(model, batch, longest + max_new, static=compiled)
    vocab = sampling_vocab_size(model, tokenizer)
    sampler = Sampler(params, vocab, device, generators=[s.generator for s in seqs])
    sampler.observe(ids_BT, valid_BT)
    want_logprobs = any(p.logprobs is not None for p in params)
    logits_BV = model(ids_BT, cache=cache, attention_mask=None if all_valid else valid_BT, logits_to_keep=1)[:, -1]
    step = _decode_step(model, compiled)
    live = list(range(batch))  # prompt index of each row of the running batch
    alive = [True] * batch

    while True:
        next_ids = sampler(logits_BV)
        sampler.record_output(next_ids)
        tokens = next_ids.tolist()
        logprobs = (token_logprobs(logits_BV, tokens, [seqs[i] for i in live], vocab) if want_logprobs
                    else [None] * len(tokens))
        for row, (token, logprob) in enumerate(zip(tokens, logprobs)):
            if not alive[row]:
                continue
            delta, reason = seqs[live[row]].append(token)
            yield StreamEvent(live[row], delta, token, reason, logprob)
            alive[row] = reason is None
        if not any(alive):
            return
        if not compiled and not all(alive):  # eager: drop finished rows, later steps get cheaper
            keep_rows = [row for row, ok in enumerate(alive) if ok]
            keep = torch.tensor(keep_rows, device=device)
            cache.select(keep)
            sampler.select(keep)
            next_ids = next_ids[keep]
            live = [live[r] for r in keep_rows]
            alive = [True] * len(keep_rows)
        logits_BV = step(next_ids.unsqueeze(1), cache)[:, -1]


def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Union[Prompt, Sequence[Prompt]],
             params: Union[SamplingParams, dict, Sequence[SamplingParams], None] = None,
             compile: bool = False, **options) -> Union[GenerationOutput, list[GenerationOutput]]:
    """Generate completions. One prompt (a string) gives one output; a list gives a list.

    >>> out = generate(model, tokenizer, "def add(a, b):", max_new_tokens=32, stop=["\\n\\n"])
    >>> out.text, out.finish_reason
    """
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    batch = [prompts] if single else list(prompts)
    texts = [""] * len(batch)
    tokens: list[list[int]] = [[] for _ in batch]
    reasons: list[Optional[FinishReason]] = [None] * len(batch)
    encoded = encode_prompts(tokenizer, batch)
    for event in _decode(model, tokenizer, encoded, _as_params(params, len(batch), options), compile):
        texts[event.index] += event.delta
        if event.token_id is not None:
            tokens[event.index].append(event.token_id)
        if event.finish_reason:
            reasons[event.index] = event.finish_reason
    outputs = [GenerationOutput(t, ids, r or "length", len(e)) for t, ids, r, e in zip(texts, tokens, reasons, encoded)]
    return outputs[0] if single else outputs


def stream(model: torch.nn.Module, tokenizer: Tokenizer, prompt: Prompt,
           params: Union[SamplingParams, dict, None] = None, compile: bool = False, **options) -> Iterator[str]:
    """Text deltas of one completion as they are generated; joined they equal ``generate(...).text``."""
    for event in _decode(model, tokenizer, encode_prompts(tokenizer, [prompt]), _as_params(params, 1, options),
                         compile):
        if event.delta:
            yield event.delta
