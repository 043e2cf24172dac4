"""Preference and RL objectives: DPO, a Bradley–Terry reward model, GRPO, and the seeds' weighted mix of losses.

Legend: B sequences, T tokens, V vocabulary, D model width, P prompts, G samples per prompt (GRPO's group).

Conventions follow TRL (``DPOTrainer`` sigmoid loss, ``RewardTrainer``, ``GRPOTrainer``) so numbers can be compared
with it. Every function here is a pure loss on tensors except the three that run a model (:func:`token_logprobs`,
:func:`sequence_logprobs`, :func:`reference_logprobs`) and :class:`RewardModel`.

Masks: ``completion_mask`` [B, T] is 1 on the completion tokens of ``input_ids`` (the response whose probability is
scored) and 0 on the prompt and the padding. Token ``t`` is predicted by the logits at position ``t - 1``, so the
first token of a sequence is never scored.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepseek.nn.lora import LORA_MODULES, disable_adapters
from deepseek.nn.router import Router

OBJECTIVES = ("sft", "rl", "dpo")  # the terms MixedObjective knows: SFT cross-entropy, GRPO, DPO


# -- log-probabilities -----------------------------------------------------------------------------------------


def token_logprobs(model: nn.Module, input_ids_BT: torch.Tensor,
                   attention_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1 from one forward: [B, T-1] fp32 (entry t-1 scores token t)."""
    logits_BTV = model(input_ids_BT, attention_mask=attention_mask_BT)[:, :-1].float()
    picked_BT = logits_BTV.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    return picked_BT - logits_BTV.logsumexp(dim=-1)  # log_softmax at the picked token, without a [B, T, V] copy


def sequence_logprobs(model: nn.Module, input_ids_BT: torch.Tensor, completion_mask_BT: torch.Tensor,
                      attention_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities, one forward: [B] fp32.

    ``completion_mask`` [B, T] marks the completion tokens in ``input_ids`` (prompt and padding 0). The mask of the
    first position is ignored: nothing predicts it.
    """
    if completion_mask_BT.shape != input_ids_BT.shape:
        raise ValueError(f"completion_mask {tuple(completion_mask_BT.shape)} must have input_ids' shape "
                         f"{tuple(input_ids_BT.shape)}")
    logp_BT = token_logprobs(model, input_ids_BT, attention_mask_BT)
    return (logp_BT * completion_mask_BT[:, 1:].to(logp_BT.dtype)).sum(dim=-1)


def has_adapters(model: nn.Module) -> bool:
    """True if ``model`` holds LoRA adapters (:func:`deepseek.nn.lora.apply_lora`)."""
    return any(isinstance(m, LORA_MODULES) for m in model.modules())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # A reference forward in training mode would add its tokens to the routers' expert-load counts (the balancing
    # bias update) and to their aux loss, and would apply dropout: run it in eval mode, then restore each module.
    # Each router also keeps its last forward's routing and aux loss for the trainer to read: with LoRA the policy
    # and the reference are one model, so the reference forward must not overwrite the policy's.
    modes = [(m, m.training) for m in model.modules()]
    routed = [(r, r._last_experts, r.aux_loss) for r in model.modules() if isinstance(r, Router)]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for r, last_experts, aux_loss in routed:
            r._last_experts, r.aux_loss = last_experts, aux_loss


def _reference_forward(model: nn.Module, reference: Optional[nn.Module], forward):
    """``forward(m)`` on the reference without gradients, in eval mode: ``reference`` itself, or ``model`` with its
    LoRA adapters disabled (see :func:`reference_logprobs`)."""
    if reference is model:
        raise ValueError("reference is the policy model itself; pass a frozen copy, or use LoRA adapters and no "
                         "reference (the base with the adapters disabled is the reference)")
    if reference is None and not has_adapters(model):
        raise ValueError("a full fine-tune needs an explicit frozen reference model (reference=...); only a model "
                         "with LoRA adapters serves as its own reference, with the adapters disabled")
    with torch.no_grad():
        if reference is not None:
            with _eval_mode(reference):
                return forward(reference)
        with disable_adapters(model), _eval_mode(model):
            return forward(model)


def reference_logprobs(model: nn.Module, input_ids_BT: torch.Tensor, completion_mask_BT: torch.Tensor,
                       attention_mask_BT: Optional[torch.Tensor] = None,
                       reference: Optional[nn.Module] = None) -> torch.Tensor:
    """The reference model's :func:`sequence_logprobs` [B], without gradients, in eval mode.

    ``reference`` given (a full fine-tune): that frozen model. Otherwise ``model`` must hold LoRA adapters and the
    reference is ``model`` itself with them disabled (:func:`deepseek.nn.lora.disable_adapters`): the base exactly,
    no second copy of the weights. A model without adapters and no ``reference`` is a ValueError (the policy is not
    its own reference).
    """
    return _reference_forward(model, reference, lambda m: sequence_logprobs(m, input_ids_BT, completion_mask_BT,
                                                                            attention_mask_BT))


def reference_token_logprobs(model: nn.Module, input_ids_BT: torch.Tensor,
                             attention_mask_BT: Optional[torch.Tensor] = None,
                             reference: Optional[nn.Module] = None) -> torch.Tensor:
    """The reference model's :func:`token_logprobs` [B, T-1] (GRPO's per-token KL), chosen as
    :func:`reference_logprobs` chooses it."""
    return _reference_forward(model, reference, lambda m: token_logprobs(m, input_ids_BT, attention_mask_BT))


# -- DPO -------------------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
             ref_rejected_B: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's sigmoid loss (Rafailov et al., 2023; TRL ``loss_type="sigmoid"``) from sequence log-probs [B] each.

    ``logits = beta * ((pi_c - pi_r) - (ref_c - ref_r))``; ``loss = mean(-(1 - eps) logsigmoid(logits)
    - eps logsigmoid(-logits))`` with ``eps = label_smoothing`` (cDPO: the preference label is flipped with
    probability eps). Returns ``(loss, metrics)``, metrics detached: ``rewards/chosen`` and ``rewards/rejected``
    (means of ``beta * (pi - ref)``), ``rewards/accuracy`` (share of pairs whose chosen reward is higher) and
    ``rewards/margin`` (mean chosen - rejected reward).
    """
    if not beta > 0:
        raise ValueError(f"dpo beta must be positive, got {beta!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    logits_B = beta * ((policy_chosen_B - policy_rejected_B) - (ref_chosen_B - ref_rejected_B))
    losses_B = -(1 - label_smoothing) * F.logsigmoid(logits_B) - label_smoothing * F.logsigmoid(-logits_B)
    chosen_B = (beta * (policy_chosen_B - ref_chosen_B)).detach()
    rejected_B = (beta * (policy_rejected_B - ref_rejected_B)).detach()
    metrics = {"rewards/chosen": chosen_B.mean(), "rewards/rejected": rejected_B.mean(),
               "rewards/accuracy": (chosen_B > rejected_B).float().mean(),
               "rewards/margin": (chosen_B - rejected_B).mean()}
    return losses_B.mean(), metrics


# -- reward model ----------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A scalar reward per sequence: a Bradley–Terry head (``Linear(D, 1)``) on the language model's final hidden
    state (after its last norm) at each sequence's last non-padding token.

    ``model(input_ids [B, T], attention_mask [B, T] or None) -> rewards [B]``. Left or right padding both work.
    The hidden states are read with a forward hook on ``lm.norm`` (the model has no hidden-state output); the LM's
    head still computes its logits, which are thrown away (a cost to remove if reward training gets large).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        d_model = lm.config.d_model
        weight = lm.norm.weight
        self.head = nn.Linear(d_model, 1, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(d_model + 1))  # TRL/HF's score-head init
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = self.lm.norm.register_forward_hook(lambda _module, _args, out: captured.append(out))
        try:
            self.lm(input_ids_BT, attention_mask=attention_mask_BT)
        finally:
            hook.remove()
        hidden_BTD = captured[-1]
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            last_B = torch.full((B,), T - 1, device=input_ids_BT.device)
        else:  # the highest position holding a token: right padding and left padding alike
            positions_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
            last_B = (positions_BT * attention_mask_BT.to(torch.long)).argmax(dim=-1)
        hidden_BD = hidden_BTD[torch.arange(B, device=input_ids_BT.device), last_B]
        return self.head(hidden_BD.to(self.head.weight.dtype)).squeeze(-1).float()


def bradley_terry_loss(rewards_chosen_B: torch.Tensor, rewards_rejected_B: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry pairwise loss (TRL's ``RewardTrainer``): ``-mean(logsigmoid(r_chosen - r_rejected))``."""
    return -F.logsigmoid(rewards_chosen_B - rewards_rejected_B).mean()


# -- GRPO ------------------------------------------------------------------------------------------------------


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages (DeepSeekMath's GRPO, TRL's ``GRPOTrainer``): [P*G] -> [P*G].

    ``rewards`` holds G consecutive samples per prompt. Each becomes ``(r - mean_group) / (std_group + eps)`` with
    the *unbiased* std (Bessel's correction, ``torch.std``'s default, as TRL) and ``eps = 1e-4`` as TRL. A group
    whose rewards are all equal gets zero advantages (it carries no preference signal).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"grpo group_size must be an integer >= 2 (the unbiased std needs two samples), "
                         f"got {group_size!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"grpo rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    rewards_PG = rewards.float().view(-1, group_size)
    mean_P1 = rewards_PG.mean(dim=1, keepdim=True)
    std_P1 = rewards_PG.std(dim=1, keepdim=True)
    return ((rewards_PG - mean_P1) / (std_P1 + eps)).view(-1)


def grpo_loss(policy_logprobs_BT: torch.Tensor, old_logprobs_BT: Optional[torch.Tensor],
              ref_logprobs_BT: Optional[torch.Tensor], advantages_B: torch.Tensor, mask_BT: torch.Tensor,
              beta: float = 0.04, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with a KL penalty to the reference, per token (TRL's ``loss_type="grpo"``).

    Token log-probs [B, T] (policy with gradients; ``old`` from the policy that sampled, None = the policy itself
    detached, i.e. one update per batch; ``ref`` may be None when ``beta`` is 0), ``advantages`` [B] (from
    :func:`grpo_advantages`), ``mask`` [B, T] (1 on completion tokens).

    Per token: ``ratio = exp(pi - old)``, ``surrogate = min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``,
    ``kl = exp(ref - pi) - (ref - pi) - 1`` (Schulman's k3 estimator, non-negative, as DeepSeekMath), and
    ``loss_t = -surrogate + beta * kl``; the loss is the mean over each sequence's tokens, then over sequences.
    Metrics (detached, over all masked tokens): ``kl``, ``clip_fraction`` (share of tokens where the clipped term
    is the smaller, so its gradient is zero).
    """
    if old_logprobs_BT is None:
        old_logprobs_BT = policy_logprobs_BT.detach()
    if ref_logprobs_BT is None and beta != 0:
        raise ValueError("grpo_loss needs ref_logprobs for the KL term (or beta=0)")
    mask = mask_BT.to(policy_logprobs_BT.dtype)
    advantages_B1 = advantages_B.to(policy_logprobs_BT.dtype)[:, None]
    ratio_BT = torch.exp(policy_logprobs_BT - old_logprobs_BT)
    unclipped_BT = ratio_BT * advantages_B1
    clipped_BT = torch.clamp(ratio_BT, 1 - clip_eps, 1 + clip_eps) * advantages_B1
    per_token_BT = -torch.min(unclipped_BT, clipped_BT)
    if ref_logprobs_BT is not None:
        delta_BT = ref_logprobs_BT - policy_logprobs_BT
        kl_BT = torch.exp(delta_BT) - delta_BT - 1
    else:
        kl_BT = torch.zeros_like(per_token_BT)
    if beta != 0:
        per_token_BT = per_token_BT + beta * kl_BT
    loss = ((per_token_BT * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1)).mean()
    n_tokens = mask.sum().clamp_min(1)
    metrics = {"kl": ((kl_BT * mask).sum() / n_tokens).detach(),
               "clip_fraction": (((clipped_BT < unclipped_BT).to(mask.dtype) * mask).sum() / n_tokens).detach()}
    return loss, metrics


# -- the mixed objective -----------------------------------------------------------------------------------------


class MixedObjective:
    """The seeds' ``objective: {sft: 0.7, rl: 0.2, dpo: 0.1}``: a weighted sum of per-objective losses.

    ``weights`` maps names of :data:`OBJECTIVES` to non-negative finite numbers, not all zero (they need not sum
    to 1). :meth:`combine` takes ``{name: scalar loss}`` and returns ``(total, logged)``.
    """

    def __init__(self, weights: dict[str, float]):
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"objective weights must be a non-empty mapping of {', '.join(OBJECTIVES)} to "
                             f"weights, got {weights!r}")
        unknown = sorted(set(weights) - set(OBJECTIVES))
        if unknown:
            raise ValueError(f"unknown objective(s) {', '.join(map(str, unknown))}; known: {', '.join(OBJECTIVES)}")
        for name, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise ValueError(f"objective weight {name}={weight!r} must be a non-negative finite number")
        if not any(weights.values()):
            raise ValueError(f"objective weights are all zero: {weights!r}")
        self.weights = {name: float(weights[name]) for name in OBJECTIVES if name in weights}

    def combine(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """``total = sum(weight[name] * losses[name])`` over the weighted terms; returns ``(total, logged)`` with
        ``logged`` each given term's unweighted value and ``"total"``, as floats.

        Every name with a positive weight must be given; a name without a weight is a ValueError (a term that
        would silently not count). A zero-weight term may be given (logged, not added) or left out.
        """
        extra = sorted(set(losses) - set(self.weights))
        if extra:
            raise ValueError(f"loss term(s) {', '.join(map(str, extra))} have no objective weight; weighted: "
                             f"{', '.join(self.weights)}")
        missing = [name for name, weight in self.weights.items() if weight > 0 and name not in losses]
        if missing:
            raise ValueError(f"objective term(s) {', '.join(missing)} are weighted but no loss was given for them")
        total = sum(self.weights[name] * loss for name, loss in losses.items() if self.weights[name] > 0)
        # Logging reads each term back to the host: one sync per step, where the trainer logs anyway.
        logged = {name: float(loss.detach()) for name, loss in losses.items()}
        logged["total"] = float(total.detach())
        return total, logged
