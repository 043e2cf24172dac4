"""``method: reward``: a Bradley–Terry reward model trained on preference pairs, and the directory it is saved as.

Legend: B pairs, T tokens.

The model is :class:`~deepseek.finetune.objectives.RewardModel`: the language model of ``init`` (with LoRA adapters
when the config has a ``lora`` section, else every weight trains) plus a scalar head, which always trains. The loss
is :func:`~deepseek.finetune.objectives.bradley_terry_loss` of the chosen and the rejected chat's rewards, both
sides in one forward of 2B rows; the logged ``accuracy`` is the share of pairs whose chosen side scores higher.

The result, ``run_dir/reward``::

    reward.json                 {"base": <init>, "lm": "adapter" | "model"}
    adapter/ or model/          the LM's PEFT adapter (naming the base) or its full model directory
    reward_head.safetensors     the head's weight [1, D] and bias [1]

:func:`load_reward_model` reads it back (GRPO's ``grpo.reward_model``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepseek.atomic import write_atomically
from deepseek.config import ConfigError
from deepseek.finetune.objectives import RewardModel, bradley_terry_loss
from deepseek.finetune.preference import PreferenceBatch
from deepseek.models.adapters import load_adapter, save_adapter
from deepseek.models.directory import load, save

REWARD_JSON = "reward.json"
HEAD_FILE = "reward_head.safetensors"


def attention_mask_of(completion_mask_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] 1 up to each right-padded row's last completion token (its last real token), 0 on the padding."""
    T = completion_mask_BT.shape[1]
    positions_BT = torch.arange(T, device=completion_mask_BT.device).expand_as(completion_mask_BT)
    last_B1 = (positions_BT * completion_mask_BT.to(torch.long)).argmax(dim=-1, keepdim=True)
    return (positions_BT <= last_B1).to(torch.long)


def pair_rewards(model: RewardModel, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards [B], rejected rewards [B]) from one forward of both sides' 2B rows."""
    ids_BT = torch.cat([batch.chosen_ids, batch.rejected_ids])
    mask_BT = attention_mask_of(torch.cat([batch.chosen_mask, batch.rejected_mask]))
    rewards = model(ids_BT, mask_BT)
    n = batch.chosen_ids.shape[0]
    return rewards[:n], rewards[n:]


class RewardLoss:
    """``loss_fn(model, batch)`` of reward training for the Trainer: the Bradley–Terry loss of a preference batch;
    ``last`` holds the call's ``rewards/accuracy`` and ``rewards/margin`` (mean chosen - rejected reward)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def terms(self, model: RewardModel, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        chosen_B, rejected_B = pair_rewards(model, batch)
        margin_B = (chosen_B - rejected_B).detach()
        return bradley_terry_loss(chosen_B, rejected_B), {"rewards/accuracy": float((margin_B > 0).float().mean()),
                                                          "rewards/margin": float(margin_B.mean())}

    def __call__(self, model: RewardModel, batch: PreferenceBatch) -> torch.Tensor:
        loss, self.last = self.terms(model, batch)
        return loss


@torch.no_grad()
def evaluate_reward(model: RewardModel, rows: PreferenceBatch, batch_size: int) -> dict[str, float]:
    """Held-out pairs: ``val_loss`` (Bradley–Terry) and ``val_accuracy`` (chosen scored higher), means over pairs."""
    device = next(model.parameters()).device
    sums, total = {"val_loss": 0.0, "val_accuracy": 0.0}, rows.chosen_ids.shape[0]
    for start in range(0, total, batch_size):
        part = PreferenceBatch(*(getattr(rows, f.name)[start:start + batch_size].to(device)
                                 for f in dataclasses.fields(rows)))
        loss, metrics = RewardLoss().terms(model, part)
        n = part.chosen_ids.shape[0]
        sums["val_loss"] += float(loss) * n
        sums["val_accuracy"] += metrics["rewards/accuracy"] * n
    return {name: value / total for name, value in sums.items()}


def save_reward_model(model: RewardModel, tokenizer: Any, path: str | Path, *, base: str, adapter: bool) -> Path:
    """Write ``model`` as a reward directory (see the module docstring), atomically; returns ``path``."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        if adapter:
            save_adapter(model.lm, folder / "adapter", base_model_name_or_path=str(base))
        else:
            save(model.lm, tokenizer, folder / "model")
        head = {name: tensor.detach().float().cpu().contiguous() for name, tensor in model.head.state_dict().items()}
        save_file(head, str(folder / HEAD_FILE))
        (folder / REWARD_JSON).write_text(json.dumps({"base": str(base), "lm": "adapter" if adapter else "model"},
                                                     indent=2) + "\n")

    write_atomically(Path(path), write)
    return Path(path)


def load_reward_model(path: str | Path) -> tuple[RewardModel, Any]:
    """``(reward model in eval mode, tokenizer)`` of a reward directory written by :func:`save_reward_model`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / REWARD_JSON).is_file():
        raise ConfigError(f"{path} is not a reward model directory (no {REWARD_JSON}; it is run_dir/reward of a "
                          f"`method: reward` run)")
    info = json.loads((path / REWARD_JSON).read_text())
    if info.get("lm") == "adapter":
        lm, tokenizer = load(info["base"])
        load_adapter(lm, path / "adapter")
    else:
        lm, tokenizer = load(path / "model")
    model = RewardModel(lm)
    model.head.load_state_dict({name: t.to(model.head.weight.dtype) for name, t in load_file(path / HEAD_FILE).items()})
    return model.eval(), tokenizer


def reward_model_of(lm: nn.Module, seed: int) -> RewardModel:
    """A :class:`RewardModel` on ``lm`` with a seeded head (its parameters train, whatever the LM's do)."""
    torch.manual_seed(seed)
    return RewardModel(lm).train()
