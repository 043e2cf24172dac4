"""Fine-tuning objectives beyond next-token SFT: DPO, a Bradley–Terry reward model, GRPO, and their weighted mix.

Losses only (issue 18): no CLI, trainer wiring or datasets here yet.
"""

from deepseek.finetune.objectives import (OBJECTIVES, MixedObjective, RewardModel, bradley_terry_loss, dpo_loss,
                                          grpo_advantages, grpo_loss, reference_logprobs, sequence_logprobs,
                                          token_logprobs)

__all__ = ["OBJECTIVES", "MixedObjective", "RewardModel", "bradley_terry_loss", "dpo_loss", "grpo_advantages",
           "grpo_loss", "reference_logprobs", "sequence_logprobs", "token_logprobs"]
