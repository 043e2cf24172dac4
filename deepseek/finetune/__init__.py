"""Fine-tuning: SFT data (chat template, assistant-only labels, packing) and objectives beyond next-token SFT: DPO,
a Bradley–Terry reward model, GRPO, and their weighted mix.

Every method runs through the Trainer from :mod:`deepseek.finetune.run` (``ds finetune run``): SFT, DPO, a reward
model (:mod:`~deepseek.finetune.reward`), GRPO (:mod:`~deepseek.finetune.grpo`) and the mixed objective
(:mod:`~deepseek.finetune.mixed`); ``ds finetune report`` draws a run (:mod:`~deepseek.finetune.report`).
"""

from deepseek.finetune.objectives import (OBJECTIVES, MixedObjective, RewardModel, bradley_terry_loss, dpo_loss,
                                          grpo_advantages, grpo_loss, reference_logprobs, sequence_logprobs,
                                          token_logprobs)
from deepseek.finetune.sft import (PackedBatch, SFTExample, encode_chat, encode_prompt_completion, pack,
                                   read_sft_jsonl, sft_targets)

__all__ = ["OBJECTIVES", "MixedObjective", "RewardModel", "bradley_terry_loss", "dpo_loss", "grpo_advantages",
           "grpo_loss", "reference_logprobs", "sequence_logprobs", "token_logprobs", "PackedBatch", "SFTExample",
           "encode_chat", "encode_prompt_completion", "pack", "read_sft_jsonl", "sft_targets"]
