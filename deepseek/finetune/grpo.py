"""``method: grpo``: group-relative policy optimisation on a prompt file, sampling with our generation engine.

Legend: P prompts per step, G samples per prompt (``grpo.group_size``), B = P*G sequences, T tokens.

Each step (:class:`GRPOLoss`, the Trainer's ``loss_fn``):

1. samples G completions of each of the step's P prompts with the policy itself, all B requests on one
   :class:`~deepseek.generate.continuous.ContinuousBatchingEngine` (the batched engine ``ds eval`` samples with),
   each request seeded from the step's prompt seeds (:class:`PromptLoader`), every request queued before the
   engine starts, so the batches it forms and the samples are the same on every run: a resumed run samples what
   the uninterrupted one did;
2. scores every completion with the weighted rewards of ``grpo.rewards``: the built-in functions of
   :mod:`deepseek.evaluation.rewards` (``parses`` in process with ``ast``, ``doctests`` only in sandboxed
   subprocesses, ``length``), a trained reward model (``model``, :func:`deepseek.finetune.reward.load_reward_model`),
   and any Python function passed to :class:`GRPOLoss`;
3. turns the rewards into group-normalised advantages (:func:`~deepseek.finetune.objectives.grpo_advantages`) and
   takes :func:`~deepseek.finetune.objectives.grpo_loss` over the completion tokens with a per-token KL to the
   reference (the model with its LoRA adapters disabled, or a frozen copy for a full fine-tune). One update per
   sampled batch, so the ratio to the sampling policy is 1 and ``clip_fraction`` stays 0 (TRL's default).

Prompts are JSONL rows with a string ``prompt``: the ``prompts_*.jsonl`` of ``ds finetune prepare-examples`` (a
``def`` line and docstring to complete, with its doctests) or plain ``{"prompt": ...}`` rows. They are encoded as
plain text, without the chat template (a completion continues the prompt, as in ``ds eval``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from deepseek.data.chat import chat_template
from deepseek.evaluation.codegen import chat_prompt as code_chat_prompt
from deepseek.evaluation.codegen import as_completion, completion_prompt, reply_code, truncate
from deepseek.evaluation.rewards import doctests_rewards, is_code_prompt, length_reward, parses_reward
from deepseek.finetune.config import GRPOConfig
from deepseek.finetune.objectives import grpo_advantages, grpo_loss, reference_token_logprobs, token_logprobs
from deepseek.finetune.sft import BadRow, read_jsonl_rows
from deepseek.generate.continuous import ContinuousBatchingEngine
from deepseek.generate.params import SamplingParams

RewardFn = Callable[[dict, str, list[int]], float]
"""A Python reward: (prompt row, completion text, completion token ids) -> reward."""


@dataclass
class Prompt:
    """One prompt: its JSONL row (``prompt`` and, for doctest prompts, ``doctests``/``entry_point``/``module``),
    its token ids and where it came from (``path:line``)."""

    row: dict
    ids: list[int]
    source: str = ""


def chat_turns(row: dict) -> list[tuple[str, str]]:
    """The turns that ask for ``row`` in chat style: a code prompt as ``ds eval --prompt-style chat`` asks it (the
    SFT data's system prompt and instruction), any other prompt as one user turn."""
    return code_chat_prompt(row) if is_code_prompt(row) else [("user", row["prompt"])]


def answer_text(row: dict, reply: str) -> str:
    """What the rewards score of a chat reply: its code block; for a code prompt on a new line after the prompt's
    stub, whose definition it replaces (as ``ds eval`` checks chat answers)."""
    return "\n" + reply_code(reply) if is_code_prompt(row) else reply_code(reply)


def read_prompts(path: str | Path, tokenizer: Any, max_prompt_len: int, on_bad: str = "skip",
                 problems: Optional[list[str]] = None, prompt_style: str = "completion") -> list[Prompt]:
    """The prompts of a JSONL file, encoded as plain text or (``prompt_style="chat"``) as :func:`chat_turns`
    rendered by the tokenizer's chat template; a row without a non-empty string ``prompt``, or one over
    ``max_prompt_len`` tokens (no room left for the completion), is reported as ``path:line: reason`` (skipped, or a
    ValueError with ``on_bad="error"``)."""
    template = chat_template(tokenizer) if prompt_style == "chat" else None

    def encode(row: Any) -> tuple[dict, list[int]]:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise BadRow("row has no non-empty string 'prompt'")
        if template is not None:
            text = template.render(chat_turns(row))
        else:  # a code stub without its trailing whitespace, as `ds eval` encodes it (see completion_prompt)
            text = completion_prompt(row["prompt"]) if is_code_prompt(row) else row["prompt"]
        ids = tokenizer.encode(text).ids
        if len(ids) > max_prompt_len:
            raise BadRow(f"prompt of {len(ids)} tokens leaves no room for grpo.max_new_tokens (at most "
                         f"{max_prompt_len} prompt tokens)")
        return row, ids

    return [Prompt(row, ids, where) for where, (row, ids) in read_jsonl_rows(path, encode, on_bad, problems)]


@dataclass
class PromptBatch:
    """The prompts of one step, each [P]: ``index`` into the prompt list, ``seed`` of its group's sampling."""

    index: torch.Tensor
    seed: torch.Tensor


@dataclass
class _PromptRows:
    index: torch.Tensor


class PromptLoader:
    """Batches of ``batch_size`` prompt indices in a seeded order reshuffled every epoch (as the SFT loader), each
    prompt with the seed of its samples: a function of the run's seed and how many prompts were drawn before it,
    so ``state_dict()`` (the position and that count) makes a resumed run sample exactly as the uninterrupted one."""

    def __init__(self, n_prompts: int, batch_size: int, seed: int = 0):
        from deepseek.finetune.run import SFTLoader

        self.order = SFTLoader(_PromptRows(torch.arange(n_prompts)), batch_size, seed)
        self.seed, self.batch_size, self.drawn = seed, batch_size, 0

    def __iter__(self) -> "PromptLoader":
        return self

    def __next__(self) -> PromptBatch:
        index = next(self.order).index
        seed = self.seed * 1_000_003 + self.drawn + torch.arange(self.batch_size)
        self.drawn += self.batch_size
        return PromptBatch(index, seed)

    def state_dict(self) -> dict[str, int]:
        return {**self.order.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)
        self.drawn = int(state["drawn"])


def sample_groups(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[list[int]], seeds: Sequence[int],
                  group_size: int, params: SamplingParams) -> list[tuple[list[int], str]]:
    """``(token ids, text)`` of ``group_size`` completions of each prompt (prompt-major: B = P*G), all sampled on
    one continuous-batching engine; sample g of prompt p has the seed ``seeds[p] * group_size + g``. Every request
    is queued before the engine starts, so the engine's batches, and with the seeds the samples, are reproducible.
    The model's training mode is restored afterwards (the engine puts it in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    longest = max(len(ids) for ids in prompt_ids) + params.max_new_tokens
    n = len(prompt_ids) * group_size
    engine = ContinuousBatchingEngine(model, tokenizer, max_running=min(n, 64),
                                      max_batched_tokens=max(512, min(n, 64) + 1), max_queue=n,
                                      max_len=min(longest + 1, model.config.max_seq_len), name="grpo")
    texts: dict[str, list[str]] = {}
    requests = []
    try:
        for ids, seed in zip(prompt_ids, seeds):
            for g in range(group_size):
                request = engine.submit(ids, dataclasses.replace(params, seed=int(seed) * group_size + g),
                                        on_event=lambda e: texts.setdefault(e.request_id, []).append(e.delta))
                requests.append(request)
        engine.start()
        for request in requests:
            request.done.wait()
    finally:
        engine.stop()
        for module, training in modes:
            module.training = training
    if any(r.finish_reason == "error" for r in requests):
        raise RuntimeError(f"the generation engine failed while sampling GRPO completions: {engine.failure}")
    # the text is cut at its first stop string, as `ds eval` cuts it (the engine stops there, its text may hold it)
    return [(list(r.token_ids), truncate("".join(texts.get(r.request_id, [])), params.stop)) for r in requests]


def right_padded(prompts: Sequence[list[int]], completions: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], completion mask [B, T]) of prompt + completion rows, right-padded with 0 (mask 0 there)."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids_BT = torch.zeros(len(prompts), length, dtype=torch.long)
    mask_BT = torch.zeros(len(prompts), length, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids_BT[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask_BT[b, len(p):len(p) + len(c)] = 1
    return ids_BT, mask_BT


class GRPOLoss:
    """``loss_fn(model, batch: PromptBatch)`` of GRPO for the Trainer (see the module docstring).

    ``prompts``: the prompt list the batches index. ``reference``: a frozen copy for a full fine-tune, None for LoRA
    (the adapters disabled). ``reward_model``: a :class:`~deepseek.finetune.objectives.RewardModel` scored with the
    weight ``config.rewards["model"]``. ``reward_fns``: extra Python rewards, name -> (weight, function).
    ``last`` holds the call's ``rewards/<name>`` (mean of each reward), ``rewards/total`` (mean weighted sum),
    ``kl``, ``clip_fraction`` and ``completion_tokens`` (mean completion length); :meth:`evaluate` scores greedy
    completions of held-out prompts.
    """

    def __init__(self, config: GRPOConfig, prompts: Sequence[Prompt], tokenizer: Any, *,
                 reference: Optional[nn.Module] = None, reward_model: Optional[nn.Module] = None,
                 reward_fns: Optional[dict[str, tuple[float, RewardFn]]] = None):
        self.config, self.prompts, self.tokenizer = config, list(prompts), tokenizer
        self.reference, self.reward_model = reference, reward_model
        self.weights = config.weights()
        self.reward_fns = dict(reward_fns or {})
        clash = sorted(set(self.reward_fns) & set(self.weights))
        if clash:
            raise ValueError(f"reward_fns {', '.join(clash)} clash with grpo.rewards' names")
        if self.weights.get("model") and reward_model is None:
            raise ValueError("grpo.rewards.model has a weight but no reward_model was given")
        self.chat = config.prompt_style == "chat"
        template = chat_template(tokenizer)
        self.params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                     top_p=config.top_p,
                                     stop=list(template.stop_strings if self.chat else config.stop),
                                     stop_token_ids=list(template.stop_token_ids if self.chat else ()))
        self.last: dict[str, float] = {}

    def rewards(self, rows: Sequence[dict], prompt_ids: Sequence[list[int]],
                samples: Sequence[tuple[list[int], str]]) -> dict[str, torch.Tensor]:
        """Each weighted reward of the B samples, name -> [B] fp32 (unweighted); a chat reply is scored by its code
        (:func:`answer_text`)."""
        texts = [answer_text(row, text) if self.chat else as_completion(row["prompt"], text) if is_code_prompt(row)
                 else text for row, (_, text) in zip(rows, samples)]
        samples = [(ids, text) for (ids, _), text in zip(samples, texts)]
        out: dict[str, list[float]] = {}
        if "parses" in self.weights:
            out["parses"] = [parses_reward(row, text) for row, text in zip(rows, texts)]
        if "doctests" in self.weights:
            out["doctests"] = doctests_rewards(rows, texts, timeout_s=self.config.doctest_timeout_s)
        if "length" in self.weights:
            out["length"] = [length_reward(len(ids), self.config.max_new_tokens) for ids, _ in samples]
        if "model" in self.weights:
            out["model"] = self._model_rewards(prompt_ids, [ids for ids, _ in samples])
        for name, (_, fn) in self.reward_fns.items():
            out[name] = [float(fn(row, text, ids)) for row, (ids, text) in zip(rows, samples)]
        return {name: torch.tensor(values, dtype=torch.float32) for name, values in out.items()}

    @torch.no_grad()
    def _model_rewards(self, prompt_ids: Sequence[list[int]], completions: Sequence[list[int]]) -> list[float]:
        ids_BT, completion_mask_BT = right_padded(prompt_ids, completions)
        real_BT = completion_mask_BT + _prompt_mask(prompt_ids, ids_BT.shape[1])  # the reward reads the last real token
        device = next(self.reward_model.parameters()).device
        return self.reward_model.eval()(ids_BT.to(device), real_BT.to(device)).tolist()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, prompts: Sequence[Prompt], batch_size: int = 16) -> dict[str, float]:
        """Held-out prompts: one greedy completion each, scored by the same rewards; ``val_rewards/<name>`` (means,
        unweighted), ``val_rewards/total`` and ``val_completion_tokens``."""
        greedy = dataclasses.replace(self.params, temperature=0.0, top_p=1.0)
        sums: dict[str, float] = {}
        for start in range(0, len(prompts), batch_size):
            part = prompts[start:start + batch_size]
            samples = sample_groups(model, self.tokenizer, [p.ids for p in part], [0] * len(part), 1, greedy)
            rewards = self.rewards([p.row for p in part], [p.ids for p in part], samples)
            figures = {**{f"val_rewards/{name}": values.sum() for name, values in rewards.items()},
                       "val_rewards/total": sum(self._weight(name) * values for name, values in rewards.items()).sum(),
                       "val_completion_tokens": sum(len(ids) for ids, _ in samples)}
            for name, value in figures.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        return {name: value / len(prompts) for name, value in sums.items()}

    def _weight(self, name: str) -> float:
        return self.weights[name] if name in self.weights else self.reward_fns[name][0]

    def __call__(self, model: nn.Module, batch: PromptBatch) -> torch.Tensor:
        cfg, G = self.config, self.config.group_size
        prompts = [self.prompts[int(i)] for i in batch.index.tolist()]
        samples = sample_groups(model, self.tokenizer, [p.ids for p in prompts], batch.seed.tolist(), G, self.params)
        rows = [p.row for p in prompts for _ in range(G)]
        prompt_ids = [p.ids for p in prompts for _ in range(G)]
        rewards = self.rewards(rows, prompt_ids, samples)
        total_B = sum(self._weight(name) * values for name, values in rewards.items())
        advantages_B = grpo_advantages(total_B, G)
        device = batch.index.device
        ids_BT, mask_BT = (t.to(device) for t in right_padded(prompt_ids, [ids for ids, _ in samples]))
        if self.reference is not None and next(self.reference.parameters()).device != device:
            self.reference.to(device)
        policy_BT = token_logprobs(model, ids_BT)
        ref_BT = reference_token_logprobs(model, ids_BT, reference=self.reference) if cfg.beta else None
        loss, metrics = grpo_loss(policy_BT, None, ref_BT, advantages_B.to(device), mask_BT[:, 1:], beta=cfg.beta,
                                  clip_eps=cfg.clip_eps)
        self.last = {**{f"rewards/{name}": float(values.mean()) for name, values in rewards.items()},
                     "rewards/total": float(total_B.mean()), "kl": float(metrics["kl"]),
                     "clip_fraction": float(metrics["clip_fraction"]),
                     "completion_tokens": sum(len(ids) for ids, _ in samples) / len(samples)}
        return loss


def _prompt_mask(prompt_ids: Sequence[list[int]], length: int) -> torch.Tensor:
    """[B, length] 1 on each row's prompt tokens."""
    mask = torch.zeros(len(prompt_ids), length, dtype=torch.long)
    for b, ids in enumerate(prompt_ids):
        mask[b, :len(ids)] = 1
    return mask
