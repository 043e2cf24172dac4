"""``ds finetune run``: supervised fine-tuning of a model directory, fully or through LoRA adapters.

Legend: B rows, T tokens of a packed row.

``finetune(config)`` loads ``config.init`` with :func:`deepseek.models.directory.load`, adds adapters when the
config has a ``lora`` section (everything else frozen) or trains every parameter, reads and packs the SFT chats
(:mod:`deepseek.finetune.sft`), and hands model, batches and loss to the same
:class:`~deepseek.train.trainer.Trainer` as ``ds train``: metrics.jsonl, checkpoints, exact ``--resume``. The result
is ``run_dir/adapter`` (a PEFT adapter directory naming its base) or ``run_dir/model`` (a model directory).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from deepseek.config import ConfigError
from deepseek.finetune.config import FinetuneConfig
from deepseek.finetune.sft import IGNORE_INDEX, pack, read_sft_jsonl, sft_targets
from deepseek.models.adapters import hf_module_name, save_adapter
from deepseek.models.directory import load, save
from deepseek.models.hf import mixtral_incompatibilities
from deepseek.nn.lora import apply_lora
from deepseek.nn.quantized import QuantizedExperts, QuantizedLinear
from deepseek.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


@dataclass
class SFTBatch:
    """Packed rows, each [B, T]: ``inputs`` token ids, ``targets`` (next-token labels, -100 = no loss),
    ``positions`` (0 at every example's start) and ``document_ids`` (padding -1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor


def sft_loss(model: nn.Module, batch: SFTBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the assistant tokens of a packed batch (fused head + loss)."""
    return model(batch.inputs, targets=batch.targets, document_ids=batch.document_ids, positions=batch.positions)


def sft_rows(path: str, tokenizer: Any, seq_len: int, *, pack_rows: bool, on_bad: str) -> Optional[SFTBatch]:
    """Every row of an SFT JSONL file, packed (or one example per row), as one :class:`SFTBatch` of all rows;
    None when the file has no usable row."""
    examples = read_sft_jsonl(path, tokenizer, max_len=seq_len, on_bad=on_bad)
    if not examples:
        return None
    if pack_rows:
        batches = pack(examples, seq_len)
    else:  # one example per row: pack() of a single example never shares its row
        batches = [b for ex in examples for b in pack([ex], seq_len)]
    ids_BT = torch.cat([b.ids for b in batches])
    document_ids_BT = torch.cat([b.document_ids for b in batches])
    targets_BT = sft_targets(torch.cat([b.labels for b in batches]), document_ids_BT)
    return SFTBatch(ids_BT, targets_BT, torch.cat([b.positions for b in batches]), document_ids_BT)


class SFTLoader:
    """Batches of ``batch_size`` rows drawn from ``rows`` in a seeded order reshuffled every epoch (an epoch's
    leftover rows start the next batch). ``state_dict()`` is the position, so a resumed run sees the same batches."""

    def __init__(self, rows: SFTBatch, batch_size: int, seed: int = 0):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.rows.inputs.shape[0], generator=generator)

    def __iter__(self) -> "SFTLoader":
        return self

    def __next__(self) -> SFTBatch:
        n, need, picked = self.rows.inputs.shape[0], self.batch_size, []
        while need:
            take = min(need, n - self.cursor)
            picked.append(self._order(self.epoch)[self.cursor:self.cursor + take])
            self.cursor, need = self.cursor + take, need - take
            if self.cursor == n:
                self.epoch, self.cursor = self.epoch + 1, 0
        index = torch.cat(picked)
        return SFTBatch(*(t[index] for t in (self.rows.inputs, self.rows.targets, self.rows.positions,
                                            self.rows.document_ids)))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


@torch.no_grad()
def evaluate_sft(model: nn.Module, rows: SFTBatch, batch_size: int) -> dict[str, float]:
    """Mean loss per scored (assistant) token over all rows: ``{"val_loss": ...}``."""
    device = next(model.parameters()).device
    nats, scored = 0.0, 0
    for start in range(0, rows.inputs.shape[0], batch_size):
        part = SFTBatch(*(t[start:start + batch_size].to(device) for t in (rows.inputs, rows.targets, rows.positions,
                                                                            rows.document_ids)))
        count = int((part.targets != IGNORE_INDEX).sum())
        if count:
            nats += float(sft_loss(model, part)) * count
            scored += count
    return {"val_loss": nats / scored} if scored else {}


def prepare_model(config: FinetuneConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of ``config.init``, adapted (LoRA) or made fully trainable, in training mode."""
    model, tokenizer = load(config.init)
    if model.config.max_seq_len < config.seq_len:
        raise ConfigError(f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    lora = config.lora_config()
    quantized = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))})
    if lora is None and quantized:  # its integer weights take no gradient: only norms would train
        raise ConfigError(f"init: {config.init} is quantized ({', '.join(quantized)}); a full fine-tune would train "
                          f"only its floating-point norms. Add a lora section (QLoRA), or fine-tune the "
                          f"unquantized model")
    if lora is None:
        model.requires_grad_(True)
    else:
        reasons = mixtral_incompatibilities(model.config)
        if reasons:  # found now, not after the run: the adapter is saved in PEFT's format for the HF export
            raise ConfigError("lora: the adapter directory is PEFT's format for the Hugging Face export of the base, "
                              "which this model has none of: " + "; ".join(reasons))
        torch.manual_seed(config.seed)
        try:
            summary = apply_lora(model, lora)
        except ValueError as exc:
            raise ConfigError(f"lora: {exc}") from None
        unmapped = [name for name in summary.modules if hf_module_name(name) is None]
        if unmapped:  # found now, not when the adapter is saved after the run
            raise ConfigError(f"lora.target_modules: {', '.join(unmapped[:4])}{', ...' if len(unmapped) > 4 else ''} "
                              f"have no counterpart in PEFT's (Hugging Face Mixtral) module names; adaptable there: "
                              f"attn.q/k/v/o, ffn.experts, lm_head")
        log.info("LoRA: %s", summary)
    return model.train(), tokenizer


def finetune(config: FinetuneConfig) -> TrainResult:
    """Run the fine-tune ``config`` describes (what ``ds finetune run`` does); the result lands in
    ``run_dir/adapter`` (LoRA) or ``run_dir/model`` (full)."""
    config.check_paths()
    model, tokenizer = prepare_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    kind = "LoRA" if config.lora is not None else "full"
    print(f"{kind} fine-tune of {config.init}: {trainable:,} of {total:,} parameters train "
          f"({100 * trainable / total:.2f}%)", flush=True)
    train_rows = sft_rows(config.data.train, tokenizer, config.seq_len, pack_rows=config.pack,
                          on_bad=config.data.on_bad)
    if train_rows is None:
        raise ConfigError(f"data.train: {config.data.train} has no usable SFT row (all bad, longer than "
                          f"seq_len={config.seq_len}, or the file is empty)")
    eval_rows = (sft_rows(config.data.eval, tokenizer, config.seq_len, pack_rows=config.pack,
                          on_bad=config.data.on_bad) if config.data.eval else None)
    if config.data.eval and eval_rows is None:  # e.g. a held-out split that --module left empty
        warnings.warn(f"data.eval: {config.data.eval} has no usable SFT row; no evaluation")
    train_config = config.train_config()

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return evaluate_sft(m, eval_rows, train_config.micro_batch) if eval_rows is not None else {}

    def save_result(m: nn.Module, path: Path) -> None:  # the Trainer's final save of run_dir/model
        if config.lora is not None:
            save_adapter(m, path.with_name("adapter"), base_model_name_or_path=str(config.init))
        else:
            save(m, tokenizer, path)

    trainer = Trainer(model, train_config, batches=SFTLoader(train_rows, config.batch_size, config.seed),
                      loss_fn=sft_loss, eval_fn=eval_fn if eval_rows is not None else None, tokenizer=tokenizer,
                      save_model=save_result, trial_loss_fn=sft_loss)
    return trainer.fit()


def result_path(config: FinetuneConfig) -> Path:
    """Where ``finetune(config)`` writes its result."""
    return Path(config.run_dir) / ("adapter" if config.lora is not None else "model")


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """``ds lora merge``: the model directory ``base`` with the PEFT adapter ``adapter`` folded into its weights,
    written as the model directory ``out``."""
    from deepseek.models.adapters import load_adapter
    from deepseek.nn.lora import merge_lora

    model, tokenizer = load(base)
    load_adapter(model, adapter)
    merge_lora(model)
    return save(model, tokenizer, out)


__all__ = ["FinetuneConfig", "SFTBatch", "SFTLoader", "evaluate_sft", "finetune", "merge_adapter", "prepare_model",
           "result_path", "sft_loss", "sft_rows"]
