"""``ds finetune run``: supervised (``method: sft``) or preference (``method: dpo``) fine-tuning of a model
directory, fully or through LoRA adapters.

Legend: B rows, T tokens of a packed row.

``finetune(config)`` loads ``config.init`` with :func:`deepseek.models.directory.load`, adds adapters when the
config has a ``lora`` section (everything else frozen) or trains every parameter, reads and packs the SFT chats
(:mod:`deepseek.finetune.sft`) or the preference pairs (:mod:`deepseek.finetune.preference`, loss
:class:`DPOLoss`), and hands model, batches and loss to the same
:class:`~deepseek.train.trainer.Trainer` as ``ds train``: metrics.jsonl, checkpoints, exact ``--resume``. The result
is ``run_dir/adapter`` (a PEFT adapter directory naming its base) or ``run_dir/model`` (a model directory).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from deepseek.config import ConfigError
from deepseek.finetune.config import FinetuneConfig
from deepseek.finetune.objectives import dpo_loss, reference_logprobs, sequence_logprobs
from deepseek.finetune.preference import PreferenceBatch, collate_pairs, read_preference_jsonl
from deepseek.finetune.sft import IGNORE_INDEX, pack, read_sft_jsonl, sft_targets
from deepseek.models.adapters import hf_module_name, save_adapter
from deepseek.models.directory import load, save
from deepseek.models.hf import mixtral_incompatibilities
from deepseek.nn.lora import apply_lora
from deepseek.nn.quantized import QuantizedExperts, QuantizedLinear
from deepseek.parallel import ParallelPlan
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
    leftover rows start the next batch). ``state_dict()`` is the position, so a resumed run sees the same batches.

    With ``world_size`` data-parallel ranks, every rank draws the same global batch and keeps rows
    ``[rank * B / W, (rank + 1) * B / W)`` of it: the ranks together train on what one process would."""

    def __init__(self, rows: SFTBatch, batch_size: int, seed: int = 0, *, rank: int = 0, world_size: int = 1):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be a multiple of the {world_size} data-parallel "
                              f"processes (and 0 <= rank < {world_size}, got rank {rank})")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0

    def _rows(self) -> int:
        return getattr(self.rows, dataclasses.fields(self.rows)[0].name).shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self._rows(), generator=generator)

    def __iter__(self) -> "SFTLoader":
        return self

    def __next__(self) -> SFTBatch:
        n, need, picked = self._rows(), self.batch_size, []
        while need:
            take = min(need, n - self.cursor)
            picked.append(self._order(self.epoch)[self.cursor:self.cursor + take])
            self.cursor, need = self.cursor + take, need - take
            if self.cursor == n:
                self.epoch, self.cursor = self.epoch + 1, 0
        share = self.batch_size // self.world_size
        index = torch.cat(picked)[self.rank * share:(self.rank + 1) * share]
        return type(self.rows)(*(getattr(self.rows, f.name)[index] for f in dataclasses.fields(self.rows)))

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


def preference_rows(path: str, tokenizer: Any, seq_len: int, *, on_bad: str) -> Optional[PreferenceBatch]:
    """Every pair of a preference JSONL file as one right-padded :class:`PreferenceBatch`; None when none is usable."""
    pairs = read_preference_jsonl(path, tokenizer, max_len=seq_len, on_bad=on_bad)
    return collate_pairs(pairs) if pairs else None


class DPOLoss:
    """``loss_fn(model, batch)`` of DPO for the Trainer: chosen and rejected in one policy forward of 2B rows, the
    reference's log-probs of the same rows under no_grad (``reference`` None: the model with its LoRA adapters
    disabled), then :func:`~deepseek.finetune.objectives.dpo_loss`. ``last`` holds the last call's metrics
    (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracy``, ``rewards/margin``, floats)."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, reference: Optional[nn.Module] = None):
        self.beta, self.label_smoothing, self.reference = beta, label_smoothing, reference
        self.last: dict[str, float] = {}

    def terms(self, model: nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids_BT = torch.cat([batch.chosen_ids, batch.rejected_ids])
        mask_BT = torch.cat([batch.chosen_mask, batch.rejected_mask])
        if self.reference is not None and next(self.reference.parameters()).device != ids_BT.device:
            self.reference.to(ids_BT.device)
        policy_B = sequence_logprobs(model, ids_BT, mask_BT)
        ref_B = reference_logprobs(model, ids_BT, mask_BT, reference=self.reference)
        n = batch.chosen_ids.shape[0]
        return dpo_loss(policy_B[:n], policy_B[n:], ref_B[:n], ref_B[n:], beta=self.beta,
                        label_smoothing=self.label_smoothing)

    def __call__(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        loss, metrics = self.terms(model, batch)
        self.last = {name: float(value) for name, value in metrics.items()}
        log.info("dpo loss %.4f %s", float(loss.detach()), " ".join(f"{k}={v:.4f}" for k, v in self.last.items()))
        return loss


@torch.no_grad()
def evaluate_dpo(model: nn.Module, rows: PreferenceBatch, batch_size: int, loss: DPOLoss) -> dict[str, float]:
    """DPO loss and reward metrics over all pairs (means weighted by pairs): ``val_loss``, ``val_rewards/...``."""
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = rows.chosen_ids.shape[0]
    try:
        for start in range(0, total, batch_size):
            part = PreferenceBatch(*(getattr(rows, f.name)[start:start + batch_size].to(device)
                                     for f in dataclasses.fields(rows)))
            value, metrics = loss.terms(model, part)
            n = part.chosen_ids.shape[0]
            for name, figure in {"val_loss": value, **{f"val_{k}": v for k, v in metrics.items()}}.items():
                sums[name] = sums.get(name, 0.0) + float(figure) * n
    finally:
        model.train(training)
    return {name: figure / total for name, figure in sums.items()}


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


def finetune(config: FinetuneConfig, parallel: Optional[ParallelPlan] = None) -> TrainResult:
    """Run the fine-tune ``config`` describes (what ``ds finetune run`` does); the result lands in
    ``run_dir/adapter`` (LoRA) or ``run_dir/model`` (full). ``parallel``: this rank's plan under torchrun
    (:func:`deepseek.finetune.distributed.finetune_distributed`); each rank then trains on its share of every
    batch, and rank 0 writes the result."""
    plan = parallel or ParallelPlan()
    config.check_paths()
    model, tokenizer = prepare_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    kind = "LoRA" if config.lora is not None else "full"
    if plan.is_main:
        print(f"{kind} fine-tune of {config.init}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.2f}%)", flush=True)
    dpo = config.method == "dpo"
    read = ((lambda path: preference_rows(path, tokenizer, config.seq_len, on_bad=config.data.on_bad)) if dpo else
            (lambda path: sft_rows(path, tokenizer, config.seq_len, pack_rows=config.pack,
                                   on_bad=config.data.on_bad)))
    what = "preference pair" if dpo else "SFT row"
    train_rows = read(config.data.train)
    if train_rows is None:
        raise ConfigError(f"data.train: {config.data.train} has no usable {what} (all bad, longer than "
                          f"seq_len={config.seq_len}, or the file is empty)")
    eval_rows = read(config.data.eval) if config.data.eval else None
    if config.data.eval and eval_rows is None:  # e.g. a held-out split that --module left empty
        warnings.warn(f"data.eval: {config.data.eval} has no usable {what}; no evaluation")
    train_config = config.train_config()
    if dpo:  # a full fine-tune's reference is a frozen copy of the init model (twice the weights in memory)
        reference = None if config.lora is not None else copy.deepcopy(model).requires_grad_(False).eval()
        loss_fn: Any = DPOLoss(config.dpo.beta, config.dpo.label_smoothing, reference)
    else:
        loss_fn = sft_loss

    def eval_fn(m: nn.Module) -> dict[str, float]:
        if eval_rows is None:
            return {}
        if dpo:
            return evaluate_dpo(m, eval_rows, train_config.micro_batch, loss_fn)
        return evaluate_sft(m, eval_rows, train_config.micro_batch)

    def save_result(m: nn.Module, path: Path) -> None:  # the Trainer's final save of run_dir/model
        if config.lora is not None:
            save_adapter(m, path.with_name("adapter"), base_model_name_or_path=str(config.init))
        else:
            save(m, tokenizer, path)

    loader = SFTLoader(train_rows, config.batch_size, config.seed, rank=plan.data_rank,
                       world_size=plan.data_parallel_size)
    trainer = Trainer(model, train_config, batches=loader, loss_fn=loss_fn,
                      eval_fn=eval_fn if eval_rows is not None else None, tokenizer=tokenizer,
                      save_model=save_result, trial_loss_fn=loss_fn, parallel=plan)
    try:
        return trainer.fit()
    finally:
        plan.close()  # DDP reducers go before the process group
        trainer.parallel_model = trainer.step_fn = None


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


__all__ = ["DPOLoss", "FinetuneConfig", "SFTBatch", "SFTLoader", "evaluate_dpo", "evaluate_sft", "finetune", "merge_adapter", "prepare_model",
           "preference_rows", "result_path", "sft_loss", "sft_rows"]
