"""Answers with citations: retrieved chunks become numbered sources in a chat prompt, a language model answers.

    generator = LocalGenerator("runs/chat/model")                         # our generation engine
    generator = OpenAIGenerator("http://127.0.0.1:8000/v1", "chat")        # any OpenAI-compatible server (ds serve)
    result = answer_question("How do I decode JSON?", hits, generator)
    result.answer, [c.location for c in result.citations]

The prompt is a system turn (answer from the sources, cite them as [n]) and a user turn holding the sources,
``[1] path:12-40`` followed by the chunk's text, then the question. A model directory renders it with its tokenizer's
chat template (:mod:`deepseek.data.chat`, the one serving and SFT use); an OpenAI-compatible server gets the two
messages. For a model directory the sources are fitted to its context: trailing sources are dropped, then the last
one is shortened, so the prompt plus ``max_new_tokens`` fits ``max_seq_len``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

from deepseek.errors import UserFacingError
from deepseek.rag.retrieve import Hit, chunk_location

SYSTEM_PROMPT = ("Answer the question using only the numbered sources below. Cite every source you use by its "
                 "number in brackets, like [1]. If the sources do not answer the question, say so.")
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


class GenerationError(UserFacingError, RuntimeError):
    """The language model could not be reached or refused the request."""


@dataclass
class Citation:
    """Source ``number`` of the prompt: where its chunk comes from, and whether the answer cites it."""

    number: int
    source: str
    span: tuple[int, int]
    span_unit: str
    title: str
    location: str
    cited: bool = False

    def to_dict(self) -> dict:
        return {"number": self.number, "source": self.source, "span": list(self.span), "span_unit": self.span_unit,
                "title": self.title, "location": self.location, "cited": self.cited}


@dataclass
class RagAnswer:
    """The answer to ``question``, the numbered sources it was given (``citations``) and the retrieved ``hits``."""

    question: str
    answer: str
    citations: list[Citation]
    hits: list[Hit]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.answer,
                "citations": [c.to_dict() for c in self.citations], "hits": [h.to_dict() for h in self.hits]}


class Generator(Protocol):
    """What :func:`answer_question` needs from a language model."""

    def complete(self, messages: list[dict]) -> str: ...

    def fits(self, messages: list[dict]) -> bool: ...


def source_block(number: int, hit: Hit, text: Optional[str] = None) -> str:
    """``[n] location (title)`` and the chunk's text (or ``text``, a shortened one)."""
    title = f" ({hit.chunk.title})" if hit.chunk.title else ""
    return f"[{number}] {chunk_location(hit.chunk)}{title}\n{(hit.chunk.text if text is None else text).strip()}"


def build_messages(question: str, blocks: Sequence[str]) -> list[dict]:
    """The system and user messages asking ``question`` over the source ``blocks``."""
    sources = "\n\n".join(blocks) if blocks else "(no sources were found)"
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]


def fit_sources(question: str, hits: Sequence[Hit], generator: Generator) -> tuple[list[dict], int]:
    """The messages for ``question`` with as many sources as fit the generator, and how many that is.

    Sources are dropped from the end (the least relevant first); if even the first alone is too long its text is
    cut to the longest prefix that fits (a binary search over characters). With no source fitting, none is sent.
    """
    blocks = [source_block(n, hit) for n, hit in enumerate(hits, start=1)]
    for count in range(len(blocks), 0, -1):
        messages = build_messages(question, blocks[:count])
        if generator.fits(messages):
            return messages, count
    if hits:
        text = hits[0].chunk.text
        low, high = 0, len(text)  # the longest prefix length that fits lies in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            if generator.fits(build_messages(question, [source_block(1, hits[0], text[:mid] + " …")])):
                low = mid
            else:
                high = mid - 1
        if low > 0:
            return build_messages(question, [source_block(1, hits[0], text[:low] + " …")]), 1
    messages = build_messages(question, [])
    if not generator.fits(messages):
        raise GenerationError("the question alone does not fit the model's context")
    return messages, 0


def cited_numbers(answer: str) -> set[int]:
    """The source numbers an answer cites: ``[2]``, ``[1, 3]``."""
    return {int(n) for group in _CITATION.findall(answer) for n in group.split(",")}


def answer_question(question: str, hits: Sequence[Hit], generator: Generator) -> RagAnswer:
    """Ask ``generator`` to answer ``question`` from ``hits``; the result lists the sources it was given."""
    messages, used = fit_sources(question, hits, generator)
    text = generator.complete(messages).strip()
    cited = cited_numbers(text)
    citations = [Citation(n, h.chunk.source, tuple(h.chunk.span), h.chunk.span_unit, h.chunk.title,
                          chunk_location(h.chunk), n in cited) for n, h in enumerate(hits[:used], start=1)]
    return RagAnswer(question, text, citations, list(hits[:used]))


class LocalGenerator:
    """Answers with a model directory through the framework's generation engine and its chat template.

    Sampling defaults come from the directory's ``generation.json``; ``max_new_tokens`` and ``temperature`` (0 =
    greedy) override them. The prompt is fitted to ``max_seq_len - max_new_tokens`` tokens.
    """

    def __init__(self, model_dir: str | Path, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: Optional[int] = None, precision: str = "auto"):
        from deepseek.data.chat import chat_template
        from deepseek.generate import pipeline

        self.pipe = pipeline("text-generation", str(model_dir), precision=precision)
        self.template = chat_template(self.pipe.tokenizer)
        max_len = self.pipe.model.config.max_seq_len
        self.max_new_tokens = max(1, min(max_new_tokens, max_len // 2))  # leave room for sources in short contexts
        self.max_prompt_tokens = max_len - self.max_new_tokens
        stop = list(self.pipe.defaults.get("stop") or [])  # generation.json's stops still apply, next to the turn end
        self.options = {"max_new_tokens": self.max_new_tokens, "temperature": temperature,
                        "stop": list(dict.fromkeys([*stop, *self.template.stop_strings])),
                        "stop_token_ids": list(dict.fromkeys([*(self.pipe.defaults.get("stop_token_ids") or []),
                                                              *self.template.stop_token_ids])),
                        **({"seed": seed} if seed is not None else {})}

    def render(self, messages: list[dict]) -> str:
        return self.template.render([(m["role"], m["content"]) for m in messages])

    def fits(self, messages: list[dict]) -> bool:
        return len(self.pipe.tokenizer.encode(self.render(messages)).ids) <= self.max_prompt_tokens

    def complete(self, messages: list[dict]) -> str:
        return self.pipe(self.render(messages), return_full_text=False, **self.options)[0]["generated_text"]


class OpenAIGenerator:
    """Answers through an OpenAI-compatible ``/v1/chat/completions`` (our ``ds serve``, vLLM, OpenAI itself).

    ``url`` is the API base (``http://host:port/v1``; a bare ``http://host:port`` gets ``/v1``). The key comes from
    ``api_key`` or ``OPENAI_API_KEY``; local servers without authentication accept any. The server's context length
    is not known here, so every source is sent.
    """

    def __init__(self, url: str, model: str, *, api_key: Optional[str] = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, seed: Optional[int] = None, timeout_s: float = 120.0):
        import openai

        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.model = model
        self.options = {"max_tokens": max_new_tokens, "temperature": temperature,
                        **({"seed": seed} if seed is not None else {})}
        self.client = openai.OpenAI(base_url=base, api_key=api_key or os.environ.get("OPENAI_API_KEY", "unused"),
                                    timeout=timeout_s, max_retries=1)

    def fits(self, messages: list[dict]) -> bool:
        return True

    def complete(self, messages: list[dict]) -> str:
        import openai

        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, **self.options)
        except openai.APIConnectionError as exc:
            raise GenerationError(f"cannot reach the language model at {self.client.base_url}: {exc}") from None
        except openai.APIStatusError as exc:
            raise GenerationError(f"the language model at {self.client.base_url} answered {exc.status_code}: "
                                  f"{exc.message}") from None
        return reply.choices[0].message.content or ""
