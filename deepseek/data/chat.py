"""The chat template: how (role, content) turns become model text. One renderer, used by serving
(``/v1/chat/completions``) and by SFT (:mod:`deepseek.finetune.sft`), so training sees what serving sends.

Tokenizers trained by the framework have role tokens: ``<|user|>text<|end|>...<|assistant|>``, and a reply ends at
``<|end|>``. Others (the byte tokenizer) get a plain ``User: ...`` transcript ending in ``Assistant:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from deepseek.data.tokenizer import ASSISTANT, END, SYSTEM, USER

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ChatTemplate:
    """A turn renders as ``prefixes[role] + content + suffix``; a reply is asked for with ``generation_prompt``.

    ``generation_prompt`` is the start of the assistant's prefix: what serving writes, the text after it is what
    the model generates (and what SFT trains on). Generation stops at ``stop_token_ids`` or ``stop_strings``.
    """

    prefixes: dict
    suffix: str
    generation_prompt: str
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def render(self, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
        """The text of ``turns`` ((role, content) pairs), then the generation prompt if asked."""
        text = "".join(f"{self.prefixes[role]}{content}{self.suffix}" for role, content in turns)
        return text + self.generation_prompt if add_generation_prompt else text

    def segments(self, turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        """The rendered text (no generation prompt) cut into (text, generated) pieces: ``generated`` is True on
        what the model would produce after the generation prompt of an assistant turn (its content, then the
        suffix that ends it). Joined, the texts equal :meth:`render` with ``add_generation_prompt=False``."""
        pieces = []
        for role, content in turns:
            text = f"{self.prefixes[role]}{content}{self.suffix}"
            if role == "assistant":
                cut = len(self.generation_prompt)
                pieces += [(text[:cut], False), (text[cut:], True)]
            else:
                pieces.append((text, False))
        return pieces


def chat_template(tokenizer) -> ChatTemplate:
    """The template of ``tokenizer`` (a Hugging Face ``tokenizers.Tokenizer``): role tokens if it has them all."""
    role_ids = [tokenizer.token_to_id(t) for t in (*ROLE_TOKENS.values(), END)]
    if all(i is not None for i in role_ids):
        return ChatTemplate(dict(ROLE_TOKENS), END, ASSISTANT, stop_token_ids=(role_ids[-1], role_ids[1]))
    prefixes = {role: f"{name}: " for role, name in PLAIN_NAMES.items()}
    return ChatTemplate(prefixes, "\n", "Assistant:", stop_strings=("\nUser:", "\nSystem:"))


def render_chat(tokenizer, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> str:
    """``turns`` ((role, content) pairs, roles from :data:`ROLES`) as ``tokenizer``'s chat template renders them."""
    return chat_template(tokenizer).render(turns, add_generation_prompt)
