"""Sampling parameters of one request, with their validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from deepseek.config import ConfigError, from_dict


@dataclass
class SamplingParams:
    """How to pick tokens for one sequence. ``temperature == 0`` means greedy decoding.

    ``top_k == 0`` and ``top_p == 1`` disable those filters; ``repetition_penalty`` follows CTRL
    (Keskar et al., 2019): logits of tokens already in the context are divided by it when positive
    and multiplied when negative. ``stop`` strings end generation and are not included in the text;
    ``stop_token_ids`` (plus the tokenizer's end-of-sequence token unless ``ignore_eos``) end it too.
    ``presence_penalty`` / ``frequency_penalty`` (OpenAI's) subtract from the logits of tokens already
    generated, once / per occurrence. ``logprobs = n`` reports each chosen token's log-probability and the
    ``n`` most likely alternatives (the model's distribution, before any penalty or temperature).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise ConfigError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        return from_dict(cls, data)
