"""Fine-tuning: SFT data (chat template, assistant-only labels, packing) and objectives beyond next-token SFT: DPO,
a Bradley–Terry reward model, GRPO, and their weighted mix.

SFT and DPO run through the Trainer: :mod:`deepseek.finetune.run` (``ds finetune run``); GRPO is a loss only so far.
"""

from deepseek.finetune.objectives import (OBJECTIVES, MixedObjective, RewardModel, bradley_terry_loss, dpo_loss,
                                          grpo_advantages, grpo_loss, reference_logprobs, sequence_logprobs,
                                          token_logprobs)
from deepseek.finetune.sft import (PackedBatch, SFTExample, encode_chat, encode_prompt_completion, pack,
                                   read_sft_jsonl, sft_targets)

__all__ = ["OBJECTIVES", "MixedObjective", "RewardModel", "bradley_terry_loss", "dpo_loss", "grpo_advantages",
           "grpo_loss", "reference_logprobs", "sequence_logprobs", "token_logprobs", "PackedBatch", "SFTExample",
           "encode_chat", "encode_prompt_completion", "pack", "read_sft_jsonl", "sft_targets"]
